import json

import nibabel as nib
import numpy as np

from data.msd import read_msd_dataset
from data.nifti import read_nifti
from data.synthetic.heart import ensure_heart_phantom


def test_heart_phantom_is_a_task02_like_msd_folder(tmp_path):
    root = ensure_heart_phantom(tmp_path, num_cases=3, matrix=32)
    assert ensure_heart_phantom(tmp_path, num_cases=3, matrix=32) == root  # cached by its parameters
    dataset = read_msd_dataset(root)
    assert dataset.modality == {0: "MRI"} and dataset.labels == {0: "background", 1: "left atrium"}
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 3
    for case in dataset.cases:
        image, label = read_nifti(case.image_path), read_nifti(case.label_path, is_label=True)
        spacing = np.asarray(image.spacing)
        assert spacing.max() / spacing.min() > 1.25  # thicker slices than pixels
        assert 0.002 < (label.array > 0).mean() < 0.05
        signal = image.array[0]
        atrium = signal[label.array > 0].mean()
        # MRI: arbitrary units, bright blood; the atrium is as bright as the other bright pools,
        # so intensity alone cannot find it.
        assert atrium > 2.5 * np.median(signal)
        assert (signal[label.array == 0] > 0.8 * atrium).sum() > (label.array > 0).sum()
    assert nib.load(dataset.cases[0].image_path).get_data_dtype() == np.int16
