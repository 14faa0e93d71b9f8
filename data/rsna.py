"""The RSNA Pneumonia Detection Challenge layout: labels per patient, a stratified split, and a cache of
decoded, resized images so that training never decodes DICOM twice.

    <root>/stage_2_train_labels.csv          patientId,x,y,width,height,Target (one row per box)
    <root>/stage_2_train_images/<patientId>.dcm
    <root>/stage_2_detailed_class_info.csv   optional: patientId,class (Normal, No Lung Opacity /
                                             Not Normal, Lung Opacity), repeated per box

Boxes are kept in the pixel coordinates of the DICOM file, ``(x, y, width, height)`` with x along
columns; ``scale_boxes`` maps them to the cached image size.
"""

import csv
import hashlib
import json
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.augment2d import Augment2DConfig, augment_intensity_2d, make_coordinate_map_2d, \
    sample_spatial_transform_2d, warp_2d
from data.dicom import read_dicom_image
from data.splits import split_cases

LABELS_FILE = "stage_2_train_labels.csv"
CLASSES_FILE = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"
DETAILED_CLASSES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
CACHE_VERSION = 1  # bump when decoding or resizing changes, so cached images are rebuilt


@dataclass
class RsnaPatient:
    """One patient: the image-level label and the opacity boxes ``(x, y, width, height)`` in pixels."""

    patient_id: str
    label: int
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    detailed_class: str | None = None


def read_rsna_labels(labels_csv: Path, classes_csv: Path | None = None) -> list[RsnaPatient]:
    """Patients in ``labels_csv`` (sorted by id), one label each however many boxes they have.

    Raises:
        ValueError: naming the patient, for a repeated row, a patient with both Target 0 and 1, a
            positive row without a box, a negative row with one, or a detailed class that
            contradicts the label.
    """
    patients: dict[str, RsnaPatient] = {}
    seen_rows = set()
    with open(labels_csv, newline="") as file:
        reader = csv.DictReader(file)
        _check_columns(labels_csv, reader.fieldnames, ("patientId", "x", "y", "width", "height", "Target"))
        for line, row in enumerate(reader, start=2):
            patient_id, target = row["patientId"].strip(), row["Target"].strip()
            where = f"{labels_csv}:{line}: patient {patient_id}"
            if target not in ("0", "1"):
                raise ValueError(f"{where}: Target must be 0 or 1, got {target!r}")
            key = (patient_id, row["x"], row["y"], row["width"], row["height"], target)
            if key in seen_rows:
                raise ValueError(f"{where}: duplicate row")
            seen_rows.add(key)
            label = int(target)
            patient = patients.setdefault(patient_id, RsnaPatient(patient_id, label))
            if patient.label != label:
                raise ValueError(f"{where}: contradictory rows, Target 0 and Target 1 for one patient")
            box = [row[k].strip() for k in ("x", "y", "width", "height")]
            if label == 1:
                if not all(box):
                    raise ValueError(f"{where}: Target 1 row without a box")
                patient.boxes.append(tuple(float(v) for v in box))
            elif any(box):  # (a second negative row is an exact repeat, caught above)
                raise ValueError(f"{where}: Target 0 row with a box")
    if not patients:
        raise ValueError(f"{labels_csv}: no patients (a header without rows)")
    if classes_csv is not None:
        _attach_detailed_classes(patients, classes_csv)
    return [patients[k] for k in sorted(patients)]


def _check_columns(path: Path, found: list[str] | None, required: tuple[str, ...]) -> None:
    missing = [name for name in required if name not in (found or [])]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; the header must hold "
                         f"{','.join(required)} (found {','.join(found or []) or 'an empty file'})")


def _attach_detailed_classes(patients: dict[str, RsnaPatient], classes_csv: Path) -> None:
    # The original file repeats a patient's class once per box; repeats must agree.
    with open(classes_csv, newline="") as file:
        reader = csv.DictReader(file)
        _check_columns(classes_csv, reader.fieldnames, ("patientId", "class"))
        for line, row in enumerate(reader, start=2):
            patient_id, name = row["patientId"].strip(), row["class"].strip()
            where = f"{classes_csv}:{line}: patient {patient_id}"
            if patient_id not in patients:
                raise ValueError(f"{where}: not in {LABELS_FILE}")
            if name not in DETAILED_CLASSES:
                raise ValueError(f"{where}: unknown class {name!r}; expected one of {DETAILED_CLASSES}")
            patient = patients[patient_id]
            if patient.detailed_class not in (None, name):
                raise ValueError(f"{where}: contradictory classes {patient.detailed_class!r} and {name!r}")
            if (name == "Lung Opacity") != (patient.label == 1):
                raise ValueError(f"{where}: class {name!r} contradicts Target {patient.label}")
            patient.detailed_class = name


def read_rsna_dataset(root: Path) -> list[RsnaPatient]:
    """Labels of an RSNA folder, checking that every patient's image is there."""
    root = Path(root)
    if not (root / LABELS_FILE).is_file():
        raise FileNotFoundError(f"{root}: no {LABELS_FILE}. Pass the folder of the RSNA Pneumonia "
                                "Detection Challenge download (with stage_2_train_images/).")
    classes_csv = root / CLASSES_FILE
    patients = read_rsna_labels(root / LABELS_FILE, classes_csv if classes_csv.is_file() else None)
    missing = [p.patient_id for p in patients if not image_path(root, p.patient_id).is_file()]
    if missing:
        raise FileNotFoundError(f"{root / IMAGES_DIR}: no image for {len(missing)} patient(s) in "
                                f"{LABELS_FILE}, e.g. patient {missing[0]} ({missing[0]}.dcm)")
    return patients


def image_path(root: Path, patient_id: str) -> Path:
    return Path(root) / IMAGES_DIR / f"{patient_id}.dcm"


def split_patients(patients: list[RsnaPatient], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of (training, validation) patients, split by patient and stratified by the detailed
    class when known, else by the label, so both sides keep the class mix."""
    strata = defaultdict(list)
    for patient in patients:
        strata[patient.detailed_class or str(patient.label)].append(patient.patient_id)
    validation = set()
    for ids in strata.values():
        if len(ids) >= 2:  # a lone patient cannot be split; it trains
            validation.update(split_cases(ids, val_fraction, seed, patient_pattern="")[1])  # ids are patients
    train = [i for i, p in enumerate(patients) if p.patient_id not in validation]
    val = [i for i, p in enumerate(patients) if p.patient_id in validation]
    return train, val


def scale_boxes(boxes, source_shape: tuple[int, int], image_size: tuple[int, int]) -> list[tuple[float, ...]]:
    """Boxes from DICOM pixels to the ``image_size`` (H, W) the cache holds."""
    sy, sx = image_size[0] / source_shape[0], image_size[1] / source_shape[1]
    return [(x * sx, y * sy, w * sx, h * sy) for x, y, w, h in boxes]


def decode_and_resize(path: Path, image_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """One DICOM file as an ``image_size`` (H, W) uint8 image and the file's (rows, columns).

    The grey scale is windowed per image from the 0.5th to the 99.5th percentile, which puts 8-bit,
    12-bit and rescaled files on one scale whatever their exposure or bit depth.
    """
    pixels = read_dicom_image(path)
    low, high = np.percentile(pixels, [0.5, 99.5])
    scaled = np.clip((pixels - low) / max(high - low, 1e-6), 0, 1).astype(np.float32)
    # Pillow's resize filters widen with the reduction, so a 1024 -> 224 resize does not alias;
    # the output's aspect stretches films of another aspect, and scale_boxes stretches their boxes alike.
    height, width = image_size
    resized = Image.fromarray(scaled, mode="F").resize((width, height), Image.BILINEAR)
    return np.round(np.asarray(resized) * 255).clip(0, 255).astype(np.uint8), pixels.shape


def cache_images(root: Path, patients: list[RsnaPatient], image_size: tuple[int, int], cache_dir: Path,
                 workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Decode every patient's image once into ``<cache_dir>/rsna-<key>/images.npy``.

    Returns:
        (N, H, W) uint8 memmap of ``image_size`` (H, W) in the order of ``patients``, and (N, 2) int source
        (rows, columns) for ``scale_boxes``. The entry is keyed by the folder, patient ids and image
        size; it is written under a temporary name and renamed, so a crash never leaves a partial cache.
    """
    ids = [p.patient_id for p in patients]
    key = hashlib.sha256(json.dumps([str(Path(root).resolve()), ids, list(image_size), CACHE_VERSION]).encode())
    entry = Path(cache_dir) / f"rsna-{key.hexdigest()[:12]}"
    images_file, shapes_file = entry / "images.npy", entry / "shapes.npy"
    if not shapes_file.is_file():  # shapes.npy is written last
        entry.mkdir(parents=True, exist_ok=True)
        temporary = entry / f".images.{os.getpid()}.npy"
        images = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8,
                                           shape=(len(ids), *image_size))
        paths = [image_path(root, i) for i in ids]
        shapes = np.zeros((len(ids), 2), dtype=np.int64)
        with ProcessPoolExecutor(max(workers, 1)) as pool:
            for i, (image, shape) in enumerate(pool.map(decode_and_resize, paths, [tuple(image_size)] * len(ids),
                                                        chunksize=16)):
                images[i], shapes[i] = image, shape
        images.flush()
        del images
        os.replace(temporary, images_file)
        np.save(entry / f".shapes.{os.getpid()}.npy", shapes)
        os.replace(entry / f".shapes.{os.getpid()}.npy", shapes_file)
    return np.load(images_file, mmap_mode="r"), np.load(shapes_file)


class ChestXrayDataset(Dataset):
    """Normalised images and labels of some patients of the uint8 cache, augmented per draw.

    Keys are a position in ``indices`` (no augmentation: validation) or ``(epoch, draw, position)``
    from ``WeightedClassSampler``; the generator ``(seed, epoch, draw)`` makes every augmented sample
    reproducible whatever the number of workers.

    Args:
        images: (N, H, W) uint8 (the cache), all patients.
        labels: (N,) 0/1, all patients.
        indices: the patients (rows of ``images``) this dataset serves.
        mean, std: intensity statistics of the training split, on the 0-255 scale.
        augment: augmentation config, or None for none.
        crop_min_area: random resized crop: the smallest share of the image a crop keeps (1 = none).
        seed: base seed of every sample's generator.

    Items are ``{"image": (1, H, W) float32, "label": () int64, "index": () int64}`` with ``index``
    the row in ``images``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: list[int], *, mean: float, std: float,
                 augment: Augment2DConfig | None = None, crop_min_area: float = 1.0, seed: int = 0):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.mean, self.std = mean, std
        self.augment, self.crop_min_area, self.seed = augment, crop_min_area, seed

    def __getstate__(self) -> dict:
        # Spawned workers reopen the memmap themselves: pickling it would copy every image into each.
        state = self.__dict__.copy()
        if isinstance(self.images, np.memmap):
            state["images"] = str(self.images.filename)
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key) -> dict:
        if isinstance(self.images, str):
            self.images = np.load(self.images, mmap_mode="r")
        augmented = self.augment is not None and not isinstance(key, (int, np.integer))
        index = int(self.indices[key[2] if augmented else key])
        image = (np.asarray(self.images[index], dtype=np.float32)[None] - self.mean) / self.std  # (1, H, W)
        if augmented:
            epoch, draw, _ = key
            rng = np.random.default_rng([self.seed, epoch, draw])
            size = image.shape[1:]
            window, center = sample_resized_crop(rng, size, self.crop_min_area)
            params = sample_spatial_transform_2d(rng, size, self.augment)
            coordinates = make_coordinate_map_2d(size, window, params, fit="resize", center=center)
            # Outside the film is black film, whose normalised value is -mean/std, not 0 (mid-grey).
            image, _ = warp_2d(image, None, coordinates, np.float32(-self.mean / self.std),
                               self.augment.image_order)
            image = augment_intensity_2d(image, rng, self.augment)
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "label": torch.tensor(self.labels[index]), "index": torch.tensor(index)}


def sample_resized_crop(rng: np.random.Generator, size: tuple[int, int], min_area: float
                        ) -> tuple[tuple[int, int], tuple[float, float]]:
    """A random square-aspect window keeping ``min_area``..1 of the image, as (window size, centre):
    with ``make_coordinate_map_2d(fit="resize")`` it is zoomed to the full output (a random
    resized crop in the same single resampling; the aspect is kept, so anatomy is not stretched)."""
    fraction = float(np.sqrt(rng.uniform(min_area, 1.0)))
    window = (size[0] * fraction, size[1] * fraction)
    center = tuple(float(rng.uniform(w / 2, s - w / 2)) - 0.5 for w, s in zip(window, size))
    return window, center


def image_statistics(images: np.ndarray, indices: list[int]) -> tuple[float, float]:
    """Mean and standard deviation of the given cached images, on the 0-255 scale."""
    total = total_sq = 0.0
    for i in indices:
        image = np.asarray(images[i], dtype=np.float64)
        total += image.mean()
        total_sq += (image ** 2).mean()
    mean = total / len(indices)
    return float(mean), float(max(total_sq / len(indices) - mean ** 2, 1e-6) ** 0.5)
