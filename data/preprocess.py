"""One-time preprocessing of a dataset into a memory-mapped cache, and its inverse for predictions.

Per case: canonical orientation (`data/nifti.py`) -> crop to the body -> intensity normalisation
(`data/intensity.py`) -> resampling to the target spacing (`data/resample.py`) -> foreground
locations per class. Each cache entry lives in `<cache_dir>/<dataset>-<hash of the plan>/`:

    <case>_image.npy       float32 (C, Z, Y, X), normalised
    <case>_label.npy       uint8 (Z, Y, X)
    <case>_foreground.npz  class_<k>: int32 (N, 3) voxel indices (z, y, x), N <= max_foreground_locations
    <case>.json            properties: geometry before/after, crop box, channel_min, ...
    plan.json              the PreprocessPlan
    manifest.json          the completed case ids and their source files, written last

Planning reads every case once to fingerprint it (spacing, CT intensity samples); the fingerprints
live in `<cache_dir>/<dataset>-fingerprint-<hash of the planning parameters>/<case>.json`, each with
the path, size and modification time of the image and label it came from, so a later start (another
run, a `--resume`, the other torchrun processes) plans without opening a scan, and a changed file is
read again.

Every file is written under a temporary name and renamed, and a case's JSON is written after its
arrays, so a case with a JSON file is complete and an interrupted run resumes where it stopped.
"""

import hashlib
import json
import multiprocessing
import os
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from data.intensity import (
    ct_statistics,
    nonzero_box_share,
    nonzero_mask,
    normalize_ct,
    normalize_zscore,
    sample_foreground,
    uses_nonzero_mask,
)
from data.msd import DatasetError, MSDCase, MSDDataset, check_case
from data.nifti import SourceGeometry, Volume, read_nifti, write_nifti_like
from data.resample import ANISOTROPY_RATIO, resample_image, resample_label, resampled_shape, separate_axis

PLAN_VERSION = 2  # bump when the preprocessing code changes what it writes, so old caches are not reused
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)  # a full-resolution CT takes a few GB per worker


@dataclass
class PreprocessPlan:
    """Every parameter of the preprocessing; its hash names the cache entry.

    Args:
        dataset_name: MSD task name.
        labels: class index -> name; foreground locations are stored for every index >= 1.
        target_spacing: (z, y, x) millimetres.
        channel_schemes: per channel, "ct" (nnU-Net's CT scheme) or "zscore" (per image).
        channel_statistics: per channel, CT statistics {"lower", "upper", "mean", "std"} or None.
        channel_use_nonzero_mask: per channel, whether "zscore" is computed inside the non-zero mask
            (`data.intensity.uses_nonzero_mask`) rather than over the whole image; False for CT.
    """

    dataset_name: str
    labels: dict[int, str]
    target_spacing: tuple[float, float, float]
    channel_schemes: list[str]
    channel_statistics: list[dict[str, float] | None]
    channel_use_nonzero_mask: list[bool]
    crop_margin: int = 3  # voxels kept around the body so boundary patches still see some context
    ct_body_threshold: float = -500.0  # HU: air is about -1000, the lungs about -800 to -500, tissue above
    anisotropy_ratio: float = ANISOTROPY_RATIO
    max_foreground_locations: int = 10_000  # per class and case: enough to sample patches, small on disk
    seed: int = 0
    version: int = PLAN_VERSION

    def to_dict(self) -> dict:
        """Plain JSON types only, so the plan fits in a checkpoint loaded with weights_only=True."""
        values = asdict(self)
        values["labels"] = {str(index): name for index, name in self.labels.items()}
        values["target_spacing"] = [float(size) for size in self.target_spacing]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "PreprocessPlan":
        values = dict(values)
        values["labels"] = {int(index): name for index, name in values["labels"].items()}
        values["target_spacing"] = tuple(float(size) for size in values["target_spacing"])
        # Plans of version 1 z-scored every non-CT channel inside the non-zero mask: checkpoints that
        # carry one keep being fed images normalised (up to hole filling) as they were trained on.
        values.setdefault("channel_use_nonzero_mask", [scheme == "zscore" for scheme in values["channel_schemes"]])
        return cls(**values)

    def hash(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class PreprocessedCase:
    """A cached case. `image` (C, Z, Y, X) float32 and `label` (Z, Y, X) uint8 are read-only memmaps;
    `foreground` maps each foreground class to int32 (N, 3) voxel indices (z, y, x)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    foreground: dict[int, np.ndarray]
    properties: dict = field(repr=False)


def _case_rng(seed: int, case_id: str) -> np.random.Generator:
    # Seeded by case id, not by position, so a case gets the same samples in any worker order.
    return np.random.default_rng([seed, zlib.crc32(case_id.encode())])


def _map_cases(function: Callable, jobs: list[tuple], workers: int, description: str) -> Iterator:
    """Run `function(*job)` for every job, in worker processes when workers > 1, with a progress bar."""
    if workers <= 1 or len(jobs) <= 1:
        yield from tqdm((function(*job) for job in jobs), total=len(jobs), desc=description, unit="case")
        return
    # spawn, not fork: forking a process that already runs torch/OpenMP threads can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(function, *job) for job in jobs]
        yield from tqdm((future.result() for future in futures), total=len(jobs), desc=description, unit="case")


def _write_atomically(path: Path, write: Callable) -> None:
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as file:
        write(file)
    os.replace(temporary, path)


def _write_json(path: Path, values: dict) -> None:
    _write_atomically(path, lambda file: file.write(json.dumps(values, indent=1).encode()))


def _select_cases(dataset: MSDDataset, case_ids: list[str]) -> list[MSDCase]:
    by_id = {case.case_id: case for case in dataset.cases}
    unknown = sorted(set(case_ids) - by_id.keys())
    if unknown:
        raise DatasetError(f"{dataset.root}: cases {unknown} are not training cases of {dataset.name}.")
    return [by_id[case_id] for case_id in case_ids]


def _case_fingerprint(case: MSDCase, ct_channels: list[int], num_samples: int, seed: int) -> dict:
    image = read_nifti(case.image_path)
    label = read_nifti(case.label_path, is_label=True)
    rng = _case_rng(seed, case.case_id)
    samples = {
        channel: sample_foreground(image.array[channel], label.array, num_samples, rng) for channel in ct_channels
    }
    return {"spacing": image.spacing, "samples": samples, "nonzero_box_share": nonzero_box_share(image.array)}


def _file_identity(path: Path) -> list:
    """Resolved path, size and modification time (ns): what tells a replaced or edited file apart
    without reading it."""
    status = path.stat()
    return [str(path.resolve()), status.st_size, status.st_mtime_ns]


def _case_files(case: MSDCase) -> dict[str, list]:
    return {"image": _file_identity(case.image_path), "label": _file_identity(case.label_path)}


def _plain(value):
    """`json.dumps` fallback for NumPy arrays and scalars."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _fingerprint_cases(
    dataset: MSDDataset,
    cases: list[MSDCase],
    *,
    ct_channels: list[int],
    samples_per_case: int,
    seed: int,
    workers: int,
    cache_dir: Path | None,
) -> list[dict]:
    """`_case_fingerprint` of every case as plain JSON values (arrays as lists, channel keys as
    strings), taken from the fingerprint cache for every case whose image and label are unchanged.

    The cache folder is keyed by the dataset folder, the fingerprint's parameters and PLAN_VERSION:
    a key added to `_case_fingerprint` needs a PLAN_VERSION bump, so that fingerprints cached
    without it are computed again.
    """
    folder = None
    if cache_dir is not None:
        parameters = [str(dataset.root.resolve()), ct_channels, samples_per_case, seed, PLAN_VERSION]
        key = hashlib.sha256(json.dumps(parameters).encode()).hexdigest()[:12]
        folder = Path(cache_dir) / f"{dataset.name}-fingerprint-{key}"
    # Taken before reading: a file that changes while it is read is read again at the next start.
    files = {case.case_id: _case_files(case) for case in cases}
    fingerprints = {}
    for case in cases:
        path = None if folder is None else folder / f"{case.case_id}.json"
        if path is not None and path.is_file():
            record = json.loads(path.read_text())
            if record["files"] == files[case.case_id]:
                fingerprints[case.case_id] = record["fingerprint"]
    todo = [case for case in cases if case.case_id not in fingerprints]
    if todo:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        jobs = [(case, ct_channels, samples_per_case, seed) for case in todo]
        for case, fingerprint in zip(todo, _map_cases(_case_fingerprint, jobs, workers, "Fingerprint")):
            # Through JSON on the first start too, so that every start plans from the same values.
            text = json.dumps({"files": files[case.case_id], "fingerprint": fingerprint}, default=_plain)
            if folder is not None:
                _write_atomically(folder / f"{case.case_id}.json", lambda file: file.write(text.encode()))
            fingerprints[case.case_id] = json.loads(text)["fingerprint"]
    return [fingerprints[case.case_id] for case in cases]


def plan_preprocessing(
    dataset: MSDDataset,
    case_ids: list[str],
    *,
    cache_dir: str | Path | None = None,
    target_spacing: tuple[float, float, float] | None = None,
    workers: int | None = None,
    samples_per_case: int = 10_000,
    seed: int = 0,
) -> PreprocessPlan:
    """Fingerprint the cases `case_ids` and derive the preprocessing parameters.

    The recipes pass every labelled case, validation included, as nnU-Net does, so that all folds
    share one cache entry. CT statistics therefore come from the foreground of all labelled cases:
    the validation cases' intensities take part in the CT normalisation. Other channels are z-scored
    per image with that image's own statistics; only the choice of the non-zero mask looks at all
    cases.

    Args:
        cache_dir: keeps the fingerprints, so that a later call reads only the cases whose files
            changed (none: every case is read).
        target_spacing: (z, y, x) mm; default the per-axis median spacing of the cases.
        workers: processes reading cases; none = DEFAULT_WORKERS.
        samples_per_case: foreground voxels drawn per case for the CT statistics.
    """
    cases = _select_cases(dataset, case_ids)
    ct_channels = [channel for channel, name in dataset.modality.items() if name.lower() == "ct"]
    fingerprints = _fingerprint_cases(
        dataset, cases, ct_channels=ct_channels, samples_per_case=samples_per_case, seed=seed,
        workers=DEFAULT_WORKERS if workers is None else workers, cache_dir=cache_dir,
    )
    if target_spacing is None:
        target_spacing = tuple(float(size) for size in np.median([item["spacing"] for item in fingerprints], axis=0))
    schemes, statistics = [], []
    for channel in sorted(dataset.modality):
        is_ct = channel in ct_channels
        schemes.append("ct" if is_ct else "zscore")
        # float32 as sampled, so the statistics (and the plan's hash) are those of the arrays themselves.
        samples = [np.asarray(item["samples"][str(channel)], np.float32) for item in fingerprints] if is_ct else []
        statistics.append(ct_statistics(np.concatenate(samples)) if is_ct else None)
    use_mask = uses_nonzero_mask([item["nonzero_box_share"] for item in fingerprints])
    return PreprocessPlan(
        dataset_name=dataset.name,
        labels=dict(dataset.labels),
        target_spacing=tuple(target_spacing),
        channel_schemes=schemes,
        channel_statistics=statistics,
        channel_use_nonzero_mask=[use_mask and scheme == "zscore" for scheme in schemes],
        seed=seed,
    )


def body_bounding_box(image: np.ndarray, plan: PreprocessPlan) -> list[tuple[int, int]]:
    """(start, stop) per axis (z, y, x) of the body, plus `plan.crop_margin` voxels.

    CT: the largest connected component above `plan.ct_body_threshold`, which drops the air and
    the scanner table when it does not touch the patient. Other modalities: nonzero voxels in any
    channel (scanners and skull-stripping write exact zeros outside the body).

    Args:
        image: (C, Z, Y, X) unnormalised.
    """
    if "ct" in plan.channel_schemes:
        components, count = ndimage.label(image[plan.channel_schemes.index("ct")] > plan.ct_body_threshold)
        sizes = np.bincount(components.ravel())[1:]
        body = components == np.argmax(sizes) + 1 if count else components > 0
    else:
        body = np.any(image != 0, axis=0)
    box = ndimage.find_objects(body.astype(np.uint8))
    if not box or box[0] is None:
        return [(0, size) for size in image.shape[1:]]
    margin = plan.crop_margin
    return [(max(0, part.start - margin), min(size, part.stop + margin)) for part, size in zip(box[0], image.shape[1:])]


def _union_with_label(box: list[tuple[int, int]], label: np.ndarray) -> list[tuple[int, int]]:
    """Never crop away annotated voxels, even where the body rule misses them."""
    label_box = ndimage.find_objects((label > 0).astype(np.uint8))
    if not label_box or label_box[0] is None:
        return box
    return [(min(start, part.start), max(stop, part.stop)) for (start, stop), part in zip(box, label_box[0])]


def _normalize(image: np.ndarray, plan: PreprocessPlan) -> np.ndarray:
    mask = nonzero_mask(image) if any(plan.channel_use_nonzero_mask) else None
    channels = []
    for channel, scheme, statistics, use_mask in zip(
        image, plan.channel_schemes, plan.channel_statistics, plan.channel_use_nonzero_mask
    ):
        if scheme == "ct":
            channels.append(normalize_ct(channel, statistics))
        else:
            channels.append(normalize_zscore(channel, mask if use_mask else None))
    return np.stack(channels)


def preprocess_volumes(
    image: Volume, label: Volume | None, plan: PreprocessPlan
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop, normalise and resample an image and optionally its label.

    Returns:
        image (C, Z', Y', X') float32, label (Z', Y', X') uint8 or None, and the properties dict.
    """
    if image.array.shape[0] != len(plan.channel_schemes):
        raise DatasetError(
            f"{image.path}: {image.array.shape[0]} channels, but the plan expects {len(plan.channel_schemes)}."
        )
    if label is not None and label.array.shape != image.array.shape[1:]:
        raise DatasetError(
            f"{label.path}: label grid {label.array.shape} differs from image grid {image.array.shape[1:]}."
        )
    box = body_bounding_box(image.array, plan)
    if label is not None:
        box = _union_with_label(box, label.array)
    crop = tuple(slice(start, stop) for start, stop in box)
    cropped = image.array[(slice(None),) + crop]
    normalized = _normalize(cropped, plan)

    axis = separate_axis(image.spacing, plan.target_spacing, plan.anisotropy_ratio)
    new_shape = resampled_shape(cropped.shape[1:], image.spacing, plan.target_spacing)
    resampled = resample_image(normalized, new_shape, axis)
    resampled_label = resample_label(label.array[crop], new_shape, axis) if label is not None else None
    properties = {
        "source_file": image.path.name,
        "source": image.source.to_dict(),
        "canonical_shape": list(image.array.shape[1:]),
        "spacing_before": list(image.spacing),
        "crop_box": [list(bounds) for bounds in box],
        "shape_after_crop": list(cropped.shape[1:]),
        "separate_axis": axis,
        "shape": list(new_shape),
        # Edge-aligned resampling keeps the extent, so the exact spacing differs from the target by rounding only.
        "spacing": [old * size / new for old, size, new in zip(image.spacing, cropped.shape[1:], new_shape)],
        "channel_min": [float(channel.min()) for channel in resampled],
    }
    return resampled, resampled_label, properties


def preprocess_image(volume: Volume, plan: PreprocessPlan) -> tuple[np.ndarray, dict]:
    """Preprocess a new image without a label (inference).

    Returns:
        (C, Z', Y', X') float32 and the properties that `restore_to_source` needs.
    """
    image, _, properties = preprocess_volumes(volume, None, plan)
    return image, properties


def foreground_locations(label: np.ndarray, plan: PreprocessPlan, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`class_<k>` -> int32 (N, 3) voxel indices (z, y, x) of class k, at most `plan.max_foreground_locations`."""
    locations = {}
    for value in sorted(plan.labels):
        if value == 0:
            continue
        voxels = np.argwhere(label == value).astype(np.int32)
        if len(voxels) > plan.max_foreground_locations:
            keep = rng.choice(len(voxels), size=plan.max_foreground_locations, replace=False)
            voxels = voxels[np.sort(keep)]
        locations[f"class_{value}"] = voxels.reshape(-1, 3)
    return locations


def _preprocess_case(case: MSDCase, plan_values: dict, entry: Path) -> str:
    plan = PreprocessPlan.from_dict(plan_values)
    source_files = _case_files(case)  # before reading, as for the fingerprint
    check_case(case, plan.labels)
    image, label, properties = preprocess_volumes(
        read_nifti(case.image_path), read_nifti(case.label_path, is_label=True), plan
    )
    properties["case_id"] = case.case_id
    properties["source_files"] = source_files
    properties["label_values"] = [int(value) for value in np.unique(label)]
    locations = foreground_locations(label, plan, _case_rng(plan.seed, case.case_id))
    _write_atomically(entry / f"{case.case_id}_image.npy", lambda file: np.save(file, image))
    _write_atomically(entry / f"{case.case_id}_label.npy", lambda file: np.save(file, label))
    _write_atomically(entry / f"{case.case_id}_foreground.npz", lambda file: np.savez(file, **locations))
    _write_json(entry / f"{case.case_id}.json", properties)  # last: marks the case complete
    return case.case_id


def _is_preprocessed(entry: Path, case_id: str, files: dict[str, list]) -> bool:
    """Whether the entry holds the case, made from the files it has now."""
    properties_path = entry / f"{case_id}.json"
    return properties_path.is_file() and json.loads(properties_path.read_text()).get("source_files") == files


def preprocess_dataset(
    dataset: MSDDataset,
    plan: PreprocessPlan,
    cache_dir: str | Path,
    case_ids: list[str],
    *,
    workers: int | None = None,
) -> Path:
    """Preprocess `case_ids` into the cache entry for `plan`, reusing whatever is already complete
    and made from the files as they are now (path, size and modification time).

    Args:
        workers: processes preprocessing cases; none = DEFAULT_WORKERS.

    Returns:
        The cache entry folder.
    """
    entry = Path(cache_dir) / f"{dataset.name}-{plan.hash()}"
    manifest_path = entry / "manifest.json"
    cases = _select_cases(dataset, case_ids)
    files = {case.case_id: _case_files(case) for case in cases}
    # A manifest without source files (an older cache) has every case made again, once.
    recorded = json.loads(manifest_path.read_text()).get("files", {}) if manifest_path.is_file() else {}
    if all(recorded.get(case_id) == case_files for case_id, case_files in files.items()):
        return entry
    entry.mkdir(parents=True, exist_ok=True)
    _write_json(entry / "plan.json", plan.to_dict())
    todo = [case for case in cases if not _is_preprocessed(entry, case.case_id, files[case.case_id])]
    jobs = [(case, plan.to_dict(), entry) for case in todo]
    for _ in _map_cases(_preprocess_case, jobs, DEFAULT_WORKERS if workers is None else workers,
                        f"Preprocessing {dataset.name}"):
        pass
    recorded.update(files)
    _write_json(manifest_path, {"cases": sorted(recorded), "files": recorded})
    return entry


def load_preprocessed_case(entry: str | Path, case_id: str) -> PreprocessedCase:
    """Open a cached case; image and label are memory-mapped, so only the patches read are loaded."""
    entry = Path(entry)
    properties_path = entry / f"{case_id}.json"
    if not properties_path.is_file():
        raise FileNotFoundError(f"{properties_path}: case {case_id!r} is not in this cache entry; run preprocessing.")
    with np.load(entry / f"{case_id}_foreground.npz", allow_pickle=False) as archive:
        foreground = {int(name.removeprefix("class_")): archive[name] for name in archive.files}
    return PreprocessedCase(
        case_id=case_id,
        image=np.load(entry / f"{case_id}_image.npy", mmap_mode="r", allow_pickle=False),
        label=np.load(entry / f"{case_id}_label.npy", mmap_mode="r", allow_pickle=False),
        foreground=foreground,
        properties=json.loads(properties_path.read_text()),
    )


def restore_to_source(label_map: np.ndarray, properties: dict) -> np.ndarray:
    """Put a label map from the preprocessed grid back on the full canonical grid of its source.

    Args:
        label_map: (Z', Y', X') class indices on the preprocessed grid.
        properties: the case's properties.

    Returns:
        (Z, Y, X) uint8 on the canonical grid of the source file (outside the crop: background).
    """
    if list(label_map.shape) != properties["shape"]:
        raise ValueError(f"label map of shape {label_map.shape} is not on the preprocessed grid {properties['shape']}.")
    crop_shape = tuple(properties["shape_after_crop"])
    uncropped = resample_label(np.asarray(label_map, dtype=np.uint8), crop_shape, properties["separate_axis"])
    restored = np.zeros(properties["canonical_shape"], dtype=np.uint8)
    restored[tuple(slice(start, stop) for start, stop in properties["crop_box"])] = uncropped
    return restored


def save_prediction(label_map: np.ndarray, properties: dict, path: str | Path) -> None:
    """Write a label map from the preprocessed grid as NIfTI with the source file's shape and affine."""
    geometry = SourceGeometry.from_dict(properties["source"])
    write_nifti_like(restore_to_source(label_map, properties), geometry, path)
