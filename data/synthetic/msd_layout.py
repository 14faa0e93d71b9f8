"""Write arrays as a Medical Segmentation Decathlon folder, so phantoms go through the real reader.

A dataset folder looks exactly like a downloaded MSD task::

    <root>/dataset.json
    <root>/imagesTr/<case_id>.nii.gz   (i, j, k) or (i, j, k, channel), the case's affine
    <root>/labelsTr/<case_id>.nii.gz   (i, j, k) uint8 class indices, same affine
    <root>/imagesTs/<case_id>.nii.gz   test images, no labels

Arrays are given in the file's own index order (i, j, k), the order nibabel returns from
`np.asanyarray(img.dataobj)`; the affine maps (i, j, k, 1) to RAS+ millimetres.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import nibabel as nib
import numpy as np

# (case_id, image (i, j, k[, channel]), label (i, j, k) or None for test cases, affine (4, 4))
Case = tuple[str, np.ndarray, np.ndarray | None, np.ndarray]

COMPLETE_MARKER = "dataset.json"  # written last, so its presence means every case file is there


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Save `array` with `affine` the way a DICOM-to-NIfTI converter does.

    Args:
        array: (i, j, k) or (i, j, k, channel); its dtype is kept on disk (int16 CT, uint8 labels).
        affine: (4, 4) voxel (i, j, k, 1) -> RAS+ millimetres.
        path: destination ending in `.nii.gz`.
    """
    image = nib.Nifti1Image(array, affine)
    image.header.set_data_dtype(array.dtype)
    # Scanner exports fill both qform and sform with code 1 ("scanner anatomical"); readers that
    # prefer one or the other must then agree.
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))


def _check_case(case_id: str, image: np.ndarray, label: np.ndarray | None,
                *, affine: np.ndarray, tensor_image_size: str, num_channels: int) -> None:
    spatial_ndim = 3
    expected_ndim = spatial_ndim if tensor_image_size == "3D" else spatial_ndim + 1
    if image.ndim != expected_ndim:
        raise ValueError(f"case {case_id}: image has {image.ndim} dims, "
                         f"tensorImageSize {tensor_image_size} needs {expected_ndim}")
    if tensor_image_size == "4D" and image.shape[3] != num_channels:
        raise ValueError(f"case {case_id}: image has {image.shape[3]} channels, "
                         f"modality lists {num_channels}")
    if label is not None and label.shape != image.shape[:spatial_ndim]:
        raise ValueError(f"case {case_id}: label shape {label.shape} != image spatial shape "
                         f"{image.shape[:spatial_ndim]}")
    if np.asarray(affine).shape != (4, 4):
        raise ValueError(f"case {case_id}: affine must be 4x4")


def write_msd_dataset(root: str | Path, *, name: str, description: str,
                      modality: dict[int, str], labels: dict[int, str],
                      cases: Iterable[Case], tensor_image_size: str = "3D",
                      test_cases: Iterable[Case] = (), reference: str = "synthetic phantom",
                      licence: str = "CC-BY-SA 4.0") -> Path:
    """Write a complete MSD folder at `root` and return its path.

    Cases are consumed one at a time, so a generator keeps only one volume in memory.

    Args:
        root: dataset folder to create (may exist and be empty).
        name, description, reference, licence: copied into dataset.json.
        modality: channel index -> modality name, e.g. {0: "CT"} or {0: "FLAIR", 1: "T1w"}.
        labels: class index -> class name, e.g. {0: "background", 1: "liver", 2: "cancer"}.
        cases: training cases (case_id, image, label, affine); every label must be an array.
        tensor_image_size: "3D" for (i, j, k) images, "4D" for (i, j, k, channel) images.
        test_cases: cases written to imagesTs; their label must be None.
    """
    if tensor_image_size not in ("3D", "4D"):
        raise ValueError(f"tensor_image_size must be '3D' or '4D', got {tensor_image_size!r}")
    root = Path(root)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)

    training = []
    for case_id, image, label, affine in cases:
        if label is None:
            raise ValueError(f"training case {case_id} has no label")
        _check_case(case_id, image, label, affine=affine, tensor_image_size=tensor_image_size,
                    num_channels=len(modality))
        write_nifti(image, affine, root / "imagesTr" / f"{case_id}.nii.gz")
        write_nifti(label.astype(np.uint8), affine, root / "labelsTr" / f"{case_id}.nii.gz")
        training.append({"image": f"./imagesTr/{case_id}.nii.gz",
                         "label": f"./labelsTr/{case_id}.nii.gz"})

    test = []
    for case_id, image, label, affine in test_cases:
        if label is not None:
            raise ValueError(f"test case {case_id} must not carry a label")
        _check_case(case_id, image, None, affine=affine, tensor_image_size=tensor_image_size,
                    num_channels=len(modality))
        write_nifti(image, affine, root / "imagesTs" / f"{case_id}.nii.gz")
        test.append(f"./imagesTs/{case_id}.nii.gz")

    # MSD writes the dictionary keys as strings ("0": "CT"), so we do too.
    description_json = {
        "name": name,
        "description": description,
        "reference": reference,
        "licence": licence,
        "tensorImageSize": tensor_image_size,
        "modality": {str(index): value for index, value in sorted(modality.items())},
        "labels": {str(index): value for index, value in sorted(labels.items())},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    (root / COMPLETE_MARKER).write_text(json.dumps(description_json, indent=4))
    return root


def dataset_folder_name(name: str, params: dict) -> str:
    """`<name>-<12 hex chars>` naming one set of generator parameters."""
    encoded = json.dumps({"name": name, **params}, sort_keys=True).encode()
    return f"{name}-{hashlib.sha256(encoded).hexdigest()[:12]}"


def ensure_dataset(cache_root: str | Path, name: str, make_fn: Callable[..., Path],
                   **params) -> Path:
    """Return `<cache_root>/<name>-<hash of params>`, generating it with `make_fn` if absent.

    Generation writes into a temporary folder beside the final one and renames it into place, so
    an interrupted run never leaves a half-written folder under the final name. Concurrent callers
    each generate, the first rename wins and the others discard their copy.

    Args:
        cache_root: folder holding generated datasets.
        name: dataset name; change it when the generator's output changes.
        make_fn: `make_fn(root, **params)` writes a complete MSD folder at `root`.
        params: JSON-serialisable generator parameters; they key the folder.
    """
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    final = cache_root / dataset_folder_name(name, params)
    if (final / COMPLETE_MARKER).is_file():
        return final
    if final.exists():
        # Not produced by us (we only ever rename complete folders into place): discard it.
        shutil.rmtree(final)

    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_root))
    try:
        make_fn(temporary, **params)
        os.rename(temporary, final)
    except OSError:
        # Another process renamed its complete copy first; keep theirs.
        if not (final / COMPLETE_MARKER).is_file():
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return final
