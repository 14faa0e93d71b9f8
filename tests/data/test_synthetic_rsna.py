"""The chest X-ray phantom: an RSNA folder the real reader accepts, with every storage variant."""

import collections

import numpy as np
import pydicom

from data.dicom import read_dicom_image
from data.rsna import read_rsna_dataset
from data.synthetic.rsna import ensure_rsna_phantom


def test_phantom_is_a_valid_rsna_folder_with_every_decoder_path(tmp_path):
    root = ensure_rsna_phantom(tmp_path, num_patients=60, matrix=40, seed=1)
    assert ensure_rsna_phantom(tmp_path, num_patients=60, matrix=40, seed=1) == root  # cached
    patients = read_rsna_dataset(root)
    assert len(patients) == 60
    positives = [p for p in patients if p.label == 1]
    assert 0.08 < len(positives) / 60 < 0.4
    assert all(p.boxes for p in positives) and all(p.detailed_class == "Lung Opacity" for p in positives)
    assert {p.detailed_class for p in patients} == {"Normal", "No Lung Opacity / Not Normal", "Lung Opacity"}
    kinds = collections.Counter()
    for patient in patients:
        path = root / "stage_2_train_images" / f"{patient.patient_id}.dcm"
        dataset = pydicom.dcmread(path)
        assert dataset.PatientID == patient.patient_id and dataset.ViewPosition in ("AP", "PA")
        kinds[(str(dataset.file_meta.TransferSyntaxUID), dataset.PhotometricInterpretation,
               int(dataset.BitsStored))] += 1
        image = read_dicom_image(path)
        assert image.shape == (40, 40) and np.isfinite(image).all()
        for x, y, width, height in patient.boxes:
            assert 0 <= x and 0 <= y and x + width <= 40 and y + height <= 40
    assert set(kinds) == {("1.2.840.10008.1.2.1", "MONOCHROME2", 8), ("1.2.840.10008.1.2.4.50", "MONOCHROME2", 8),
                          ("1.2.840.10008.1.2.1", "MONOCHROME1", 8), ("1.2.840.10008.1.2.1", "MONOCHROME2", 12)}
