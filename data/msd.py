"""Medical Segmentation Decathlon (MSD) datasets: `dataset.json`, `imagesTr/`, `labelsTr/`, `imagesTs/`.

The reader only finds files and parses metadata; `check_case` opens a case to verify that its
image and label describe the same grid and that the label uses declared classes.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.nifti import read_nifti, read_nifti_header

AFFINE_TOLERANCE_MM = 1e-3
# nnU-Net names the image of channel c of a case `<case>_<cccc>.nii.gz` beside the label `<case>.nii.gz`.
CHANNEL_SUFFIX = "_0000"


class DatasetError(ValueError):
    """A dataset problem; the message names the file, what is wrong and how to fix it."""


@dataclass(frozen=True)
class MSDCase:
    case_id: str
    image_path: Path
    label_path: Path


@dataclass
class MSDDataset:
    """An MSD task folder.

    Args:
        name: task name, e.g. "Task03_Liver".
        root: the task folder.
        modality: channel index -> modality name, e.g. {0: "CT"}.
        labels: class index -> class name, e.g. {0: "background", 1: "liver", 2: "cancer"}.
        cases: labelled training cases, sorted by case id.
        test_images: unlabelled test images as listed (not checked: the test split is often not downloaded).
    """

    name: str
    root: Path
    modality: dict[int, str]
    labels: dict[int, str]
    cases: list[MSDCase]
    test_images: list[Path]


@dataclass(frozen=True)
class CaseInfo:
    """What `check_case` learned from a case's headers and label map.

    Args:
        shape: spatial shape (Z, Y, X) of the canonical arrays.
        spacing: voxel size (z, y, x) in millimetres.
        num_channels: image channels.
        label_values: class indices present in the label map, sorted.
    """

    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    num_channels: int
    label_values: tuple[int, ...]


def nifti_stem(path: Path) -> str:
    """The file name without its NIfTI extension, digits and all: `patient_1001.nii.gz` -> `patient_1001`."""
    return path.name.removesuffix(".gz").removesuffix(".nii")


def label_stems(image_stem: str) -> list[str]:
    """Names the label of an image may have, most specific first: the image's own name, then, for
    nnU-Net's layout, the name without the channel suffix (`liver_7_0000` -> `liver_7`)."""
    if image_stem.endswith(CHANNEL_SUFFIX):
        return [image_stem, image_stem.removesuffix(CHANNEL_SUFFIX)]
    return [image_stem]


def _is_other_channel(image_stem: str, label_ids: set[str]) -> bool:
    """Whether the image is channel 1, 2, ... of a case in nnU-Net's layout (`liver_7_0001` beside
    the label `liver_7`)."""
    case_id, _, channel = image_stem.rpartition("_")
    return len(channel) == 4 and channel.isdigit() and case_id in label_ids


def _is_nifti(path: Path) -> bool:
    # macOS writes `._name` resource-fork files next to every file copied to a non-Apple disk.
    return not path.name.startswith("._") and path.name.endswith((".nii", ".nii.gz"))


def _int_keyed(values: object, key: str, json_path: Path) -> dict[int, str]:
    """MSD stores index maps with string keys: {"0": "background", "1": "liver"}."""
    if not isinstance(values, dict) or not values:
        raise DatasetError(f'{json_path}: key "{key}" must be a non-empty object like {{"0": "name"}}.')
    try:
        return {int(index): str(name) for index, name in sorted(values.items(), key=lambda item: int(item[0]))}
    except (TypeError, ValueError):
        raise DatasetError(
            f'{json_path}: key "{key}" must map integer indices to names, like {{"0": "background"}}; got {values}.'
        ) from None


def _resolve(root: Path, relative: object, what: str, json_path: Path) -> Path:
    if not isinstance(relative, str):
        raise DatasetError(
            f'{json_path}: {what} must be a path string like "./imagesTr/case.nii.gz"; got {relative!r}.'
        )
    path = root / relative
    if not path.is_file():
        raise DatasetError(f"{path}: {what} listed in {json_path} does not exist. Re-extract the dataset archive.")
    return path


def _cases_from_json(root: Path, json_path: Path, training: object) -> list[MSDCase]:
    if not isinstance(training, list):
        raise DatasetError(f'{json_path}: key "training" must be a list of {{"image": ..., "label": ...}} objects.')
    cases = []
    for entry in training:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(f'{json_path}: every entry of key "training" needs "image" and "label"; got {entry!r}.')
        if Path(str(entry["image"])).name.startswith("._"):
            continue
        image_path = _resolve(root, entry["image"], "training image", json_path)
        label_path = _resolve(root, entry["label"], "training label", json_path)
        # The label names the case: images may carry nnU-Net's channel suffix, labels never do.
        cases.append(MSDCase(nifti_stem(label_path), image_path, label_path))
    return cases


def _read_dataset_json(root: Path, json_path: Path) -> MSDDataset:
    try:
        metadata = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{json_path}: not valid JSON ({error}). Restore it from the dataset archive.") from None
    if not isinstance(metadata, dict):
        raise DatasetError(f"{json_path}: must hold a JSON object with keys modality, labels, training.")
    for key in ("modality", "labels", "training"):
        if key not in metadata:
            raise DatasetError(f'{json_path}: missing key "{key}". Restore it from the dataset archive.')
    test = metadata.get("test", [])
    if not isinstance(test, list) or not all(isinstance(item, str) for item in test):
        raise DatasetError(f'{json_path}: key "test" must be a list of path strings.')
    return MSDDataset(
        name=str(metadata.get("name", root.name)),
        root=root,
        modality=_int_keyed(metadata["modality"], "modality", json_path),
        labels=_int_keyed(metadata["labels"], "labels", json_path),
        cases=_cases_from_json(root, json_path, metadata["training"]),
        test_images=[root / item for item in test if not Path(item).name.startswith("._")],
    )


def _images_by_case(folder: Path, label_ids: set[str]) -> dict[str, Path]:
    """Case id -> image, each image matched to its label's name: the same name, or the name plus
    nnU-Net's `_0000`; an unmatched image keeps its own name (and is then reported as unlabelled)."""
    images = {}
    for path in sorted(filter(_is_nifti, folder.iterdir())):
        stem = nifti_stem(path)
        case_id = next((name for name in label_stems(stem) if name in label_ids), None)
        if case_id is None and _is_other_channel(stem, label_ids):
            raise DatasetError(
                f"{path}: one file per channel is not supported. Stack the channels into one 4D NIfTI per case."
            )
        case_id = stem if case_id is None else case_id
        if case_id in images:
            raise DatasetError(f"{path}: case {case_id!r} already has the image {images[case_id].name}. "
                               "Keep one image per case.")
        images[case_id] = path
    return images


def _scan_folders(root: Path, modality: str) -> MSDDataset:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: missing, and {root / 'dataset.json'} is absent too; not an MSD dataset.")
    labels = {nifti_stem(path): path for path in filter(_is_nifti, labels_dir.iterdir())}
    images = _images_by_case(images_dir, set(labels))
    for case_id in sorted(images.keys() ^ labels.keys()):
        missing_from = labels_dir if case_id in images else images_dir
        present = images.get(case_id) or labels[case_id]
        raise DatasetError(f"{present}: has no matching file in {missing_from}. Add it or remove this file.")
    cases = [MSDCase(case_id, images[case_id], labels[case_id]) for case_id in sorted(images)]
    # Without dataset.json the classes are whatever the label maps hold.
    values = set()
    for case in cases:
        values.update(np.unique(read_nifti(case.label_path, is_label=True).array).tolist())
    class_names = {value: "background" if value == 0 else f"class_{value}" for value in sorted(values | {0})}
    test_dir = root / "imagesTs"
    test_images = sorted(filter(_is_nifti, test_dir.iterdir())) if test_dir.is_dir() else []
    return MSDDataset(root.name, root, {0: modality}, class_names, cases, test_images)


def read_msd_dataset(root: str | Path, modality: str = "CT") -> MSDDataset:
    """Read an MSD task folder.

    Args:
        root: folder holding `dataset.json`, `imagesTr/`, `labelsTr/` and optionally `imagesTs/`.
        modality: name of the single channel when `dataset.json` is absent (the folders are then
            scanned and the classes taken from the label values). "CT" selects CT intensity
            normalisation downstream; MSD's own `dataset.json` always wins when present.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist.")
    json_path = root / "dataset.json"
    dataset = _read_dataset_json(root, json_path) if json_path.is_file() else _scan_folders(root, modality)
    if not dataset.cases:
        where = "dataset.json lists none" if json_path.is_file() else "imagesTr/ holds no .nii.gz files"
        raise DatasetError(f"{root}: no training cases ({where}). Pass the task folder that holds "
                           "imagesTr/ and labelsTr/.")
    dataset.cases.sort(key=lambda case: case.case_id)
    seen = set()
    for case in dataset.cases:
        if case.case_id in seen:
            raise DatasetError(f"{case.image_path}: case id {case.case_id!r} appears twice. Rename one of the files.")
        seen.add(case.case_id)
    return dataset


def check_case(case: MSDCase, labels: dict[int, str]) -> CaseInfo:
    """Verify that a case's image and label share one grid and that the label uses declared classes.

    Args:
        case: the case to open.
        labels: declared classes, index -> name.

    Returns:
        The case's canonical shape, spacing, channel count and label values.
    """
    image_header = read_nifti_header(case.image_path)
    label_header = read_nifti_header(case.label_path)
    image_shape, label_shape = image_header.shape[:3], label_header.shape[:3]
    if image_shape != label_shape:
        raise DatasetError(
            f"{case.label_path}: label shape {label_shape} differs from image shape {image_shape} "
            f"of {case.image_path}. Resample the label onto the image grid or re-export both."
        )
    if not np.allclose(image_header.affine, label_header.affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        raise DatasetError(
            f"{case.label_path}: affine {np.round(label_header.affine, 4).tolist()} differs from the affine "
            f"{np.round(image_header.affine, 4).tolist()} of {case.image_path} by more than "
            f"{AFFINE_TOLERANCE_MM} mm. The label does not lie on the image grid; re-export it from the image."
        )
    label = read_nifti(case.label_path, is_label=True)
    values = tuple(int(value) for value in np.unique(label.array))
    undeclared = sorted(set(values) - labels.keys())
    if undeclared:
        raise DatasetError(
            f"{case.label_path}: label values {undeclared} are not declared classes {sorted(labels)}. "
            "Fix the label map or declare the classes in dataset.json."
        )
    image_dims = image_header.shape[3:]
    return CaseInfo(
        case_id=case.case_id,
        shape=label.array.shape,
        spacing=label.spacing,
        num_channels=int(np.prod(image_dims)) if image_dims else 1,
        label_values=values,
    )
