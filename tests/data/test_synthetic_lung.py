import numpy as np
from scipy import ndimage

from data.msd import read_msd_dataset
from data.nifti import read_nifti
from data.splits import split_cases
from data.synthetic.lung import ensure_lung_phantom


def test_lung_phantom_is_a_task06_like_msd_folder(tmp_path):
    root = ensure_lung_phantom(tmp_path, num_cases=6, matrix=32)
    dataset = read_msd_dataset(root)
    assert dataset.modality == {0: "CT"} and dataset.labels == {0: "background", 1: "tumour"}
    tumour_free, tumour_hu = [], []
    for case in dataset.cases:
        image, label = read_nifti(case.image_path), read_nifti(case.label_path, is_label=True)
        hu, tumour = image.array[0], label.array > 0
        assert (hu < -700).mean() > 0.2 and np.median(hu[(hu > -950) & (hu < -700)]) < -780  # air and lungs
        assert tumour.mean() < 0.01
        if not tumour.any():
            tumour_free.append(case.case_id)
            continue
        tumour_hu.append(hu[tumour].max())
        sizes = np.bincount(ndimage.label(tumour)[0].ravel())[1:] * np.prod(image.spacing)
        diameters = (6 * sizes / np.pi) ** (1 / 3)
        assert diameters.max() < 45
    assert tumour_free == ["lung_006"]
    assert max(tumour_hu) > -100  # soft tissue density (tiny nodules blur into the lung at this size)


def test_default_split_validates_on_a_case_without_tumour():
    ids = [f"lung_{index:03d}" for index in range(1, 17)]
    _, validation = split_cases(ids, 0.2, seed=12345)
    assert len(validation) >= 4 and "lung_012" in validation  # every sixth case has no tumour
