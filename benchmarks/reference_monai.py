"""The MONAI tutorial recipe for segmentation, trained on our data and scored by our metrics.

    pip install -r benchmarks/requirements-bench.txt                     # MONAI (benchmarks only)
    python benchmarks/reference_monai.py --data-dir /data/Task28_LA2018 --steps 500 --patch-size 32 --batch-size 8
    python benchmarks/reference_monai.py --data-dir /data/Task28_LA2018 --spatial-dims 2 --image-size 256

What MONAI supplies: the network (`BasicUNet`, features 16-256), the loss (`DiceCELoss` in 3D,
`DiceLoss` in 2D), Adam at a constant 1e-3, the patch sampling (`RandCropByPosNegLabeld`, half the
patches centred on foreground), the augmentation (flips on every spatial axis, a small random affine,
Gaussian noise) and the Gaussian-weighted `sliding_window_inference`.

What we supply, so that the comparison is about the recipe alone: the arrays and the split. The data
are the recipe's own preprocessed cache, built by the recipe's own function (`train_liver3d.prepare_data`
in 3D, `engine.volumes.prepare_volumes` as `train_atrium.py` calls it in 2D) with the recipe's default
split, so the reference trains and validates on exactly the cases and voxels the recipe does. Volumes
smaller than the patch are padded with each channel's minimum, as the recipes pad. Each validation case
is scored whole by our metrics (`engine.metrics.dice_per_class`, `engine.surface_metrics`) on the
preprocessed grid, into a `metrics.json` with the recipes' keys (`dice_<label>`, `dice_mean`,
`hd95_<label>`, `nsd_<label>`) without post-processing, as the tutorial. `summary.json` adds the Dice
of the same predictions with the recipes' post-processing (`engine.postprocess.keep_largest_foreground`,
the largest connected foreground piece kept), to compare with a recipe run that keeps it.

The budget is counted as the recipes count it: `--steps` optimizer steps of `--batch-size` patches
(3D) or slices (2D), each drawn from a training case (slice) chosen uniformly with replacement.

2D mode (`--spatial-dims 2`): the samples are the acquired slices (axis 0 of the `(z, y, x)` volume, as
`train_atrium.py`) of the training volumes, every slice equally likely (`train_atrium.py`'s default),
at the preprocessed resolution: a window of `--image-size` is cut by the same pos/neg sampler from the
slice (padded with the volume's minimum where the slice is smaller) and validation slides that window
over each slice. `train_atrium.py` instead resizes the whole slice to `--image-size`; with an image
size at least the slice's, both see the whole slice. The loss is `DiceLoss` with one sigmoid output
for one foreground class (as MONAI's 2D tutorial), with a softmax over classes otherwise.

Deterministic on the CPU for a seed and a number of workers (`monai.utils.set_determinism`, MONAI's
per-worker transform seeds); prints the wall time. Writes `metrics.json`, `dice_per_case.csv` and
`summary.json` (times, the split, the settings, the Dice with the largest piece kept) into `--out`, and
the trained weights (`model.pt`, a state dict for `build_model`) before validation starts.
"""

import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch
from tqdm import tqdm

import train_atrium
import train_liver3d
from data.preprocess import load_preprocessed_case
from engine.config import build_parser, config_from_dict
from engine.inference import pad_to_patch
from engine.logging import RunLogger
from engine.postprocess import keep_largest_foreground
from engine.metrics import dice_per_class, metric_key, surface_scores
from engine.results import write_metrics
from engine.runtime import pick_device
from engine.surface_metrics import mean_surface_metrics, surface_metrics_per_class
from engine.volumes import prepare_volumes

# The MONAI tutorial recipe: fixed, so that it stays the same reference from run to run.
FEATURES = (16, 32, 64, 128, 256, 16)  # BasicUNet "16-256": the five encoder widths and the last decoder's
POOLINGS = 4  # BasicUNet halves every spatial axis four times, so patches are multiples of 16
POSITIVE, NEGATIVE = 1, 1  # RandCropByPosNegLabeld: half the patches centred on foreground, half on background
FLIP_PROBABILITY = 0.5  # each spatial axis flipped on its own
AFFINE_PROBABILITY = 0.5  # share of patches given the random affine below
ROTATION_RANGE = math.pi / 15  # radians, about each axis (+-12 degrees), as MONAI's spleen tutorial
SCALE_RANGE = 0.1  # per axis, scale 1 +- 0.1
NOISE_PROBABILITY = 0.2  # share of patches given Gaussian noise
NOISE_STD = 0.1  # on the z-scored intensities
WINDOWS_PER_FORWARD = 4  # sliding-window batch at validation: speed only, not the result


@dataclass
class Config:
    data_dir: str | None = None  # MSD task folder (dataset.json, imagesTr/, labelsTr/): the one the recipe trains on
    out: str = "runs/reference_monai"  # run folder: metrics.json, dice_per_case.csv, summary.json, log.jsonl
    cache_dir: str = ".cache"  # the recipes' preprocessed cache (filled here if empty): the arrays the recipe trains on
    spatial_dims: int = 3  # 3: 3D BasicUNet on patches (as train_liver3d.py); 2: 2D BasicUNet on slices (as train_atrium.py)
    spacing: tuple[float, ...] | None = None  # target spacing z,y,x in mm of the recipe's cache; auto = the recipe's (the median)
    patch_size: tuple[int, ...] = (64, 64, 64)  # 3D: patch z,y,x (one int = a cube), multiples of 16
    image_size: tuple[int, ...] = train_atrium.Config.image_size  # 2D: window H,W (one int = square), multiples of 16
    batch_size: int | None = None  # patches (3D) or slices (2D) per step; none = the recipe's default
    steps: int = 500  # optimizer steps; the budget of a recipe run is its epochs x steps per epoch
    lr: float = 1e-3  # Adam learning rate, constant (MONAI tutorials)
    overlap: float = 0.5  # sliding-window overlap at validation (fraction of the window), Gaussian weights
    nsd_tolerance_mm: float = 2.0  # normalised surface Dice counts boundary voxels this close as correct (as the recipes)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cuda, mps or cpu
    workers: int = 1  # DataLoader processes drawing patches (0 = in the main process)
    seed: int = 0  # seeds weights, sampling and augmentation (monai.utils.set_determinism)


def parse_args(argv: list[str]) -> Config:
    """Flags from the fields of `Config`; one number for a patch or image size repeats on every axis."""
    flags = vars(build_parser(Config, __doc__).parse_args(argv))
    for name in ("patch_size", "image_size"):
        if name in flags and len(flags[name]) == 1:
            flags[name] = flags[name] * len(getattr(Config, name))
    config = config_from_dict(Config, flags)
    if config.data_dir is None:
        raise SystemExit("--data-dir is required: the MSD task folder the recipe trains on, "
                         "e.g. --data-dir /data/Task28_LA2018")
    if config.spatial_dims not in (2, 3):
        raise SystemExit(f"--spatial-dims {config.spatial_dims}: choose 3 (patches) or 2 (slices)")
    window = window_size(config)
    if len(window) != config.spatial_dims or any(size % 2**POOLINGS for size in window):
        flag = "--patch-size" if config.spatial_dims == 3 else "--image-size"
        raise SystemExit(f"{flag} {','.join(map(str, window))}: BasicUNet halves every axis {POOLINGS} times, so give "
                         f"{config.spatial_dims} sizes that are multiples of {2**POOLINGS} (e.g. 32)")
    if config.steps < 1:
        raise SystemExit(f"--steps {config.steps}: train at least one step")
    return config


def window_size(config: Config) -> tuple[int, ...]:
    """The training patch (3D) or slice window (2D), which is also the sliding window."""
    return tuple(config.patch_size if config.spatial_dims == 3 else config.image_size)


def batch_size(config: Config) -> int:
    """The given batch size, or the recipe's default: the same budget as a recipe run without the flag."""
    if config.batch_size is not None:
        return config.batch_size
    return train_liver3d.Config.batch_size if config.spatial_dims == 3 else train_atrium.Config.batch_size


def prepare_data(config: Config, logger: RunLogger):
    """The recipe's dataset, preprocessing plan, cache entry and split, from the recipe's own function
    with the recipe's default split settings."""
    if config.spatial_dims == 3:
        recipe = train_liver3d.Config(data_dir=config.data_dir, cache_dir=config.cache_dir, workers=config.workers,
                                      spacing=config.spacing)
        return train_liver3d.prepare_data(recipe, logger)
    recipe = train_atrium.Config(data_dir=config.data_dir, cache_dir=config.cache_dir, workers=config.workers,
                                 spacing=config.spacing)

    return prepare_volumes(recipe.data_dir, recipe.cache_dir, logger, val_fraction=recipe.val_fraction,
                           split_seed=recipe.split_seed, fold=recipe.fold, patient_pattern=recipe.patient_pattern,
                           splits_file=recipe.splits_file, spacing=recipe.spacing, workers=recipe.workers)


def pad_case(image: np.ndarray, label: np.ndarray, size: tuple[int, ...]):
    """Pad image (C, *spatial) with each channel's minimum and label (*spatial) with background up to
    at least ``size`` per axis (as the recipes pad). Returns the padded pair and the region of the
    original voxels."""
    # np.array copies: the cached arrays are read-only memory maps.
    padded_image, region = pad_to_patch(torch.from_numpy(np.array(image, dtype=np.float32)), size)
    padded_label = np.zeros(padded_image.shape[1:], dtype=np.uint8)
    padded_label[region] = label
    return padded_image.numpy(), padded_label, region


def training_samples(entry: Path, train_ids: list[str], config: Config) -> list[dict]:
    """MONAI data dicts of the training cases (3D) or of every slice along z of them (2D):
    ``{"image": (C, *spatial) float32, "label": (1, *spatial) uint8}``, padded to the window."""
    window = window_size(config)
    samples = []
    for case_id in train_ids:
        case = load_preprocessed_case(entry, case_id)
        if config.spatial_dims == 3:
            image, label, _ = pad_case(case.image, case.label, window)
            samples.append({"image": image, "label": label[None]})
            continue
        # The whole volume is padded in y and x, so every slice gets the volume's minimum, as in the recipe.
        image, label, _ = pad_case(case.image, case.label, (1, *window))
        samples += [{"image": np.ascontiguousarray(image[:, z]), "label": np.ascontiguousarray(label[None, z])}
                    for z in range(label.shape[0])]
    return samples


def training_transforms(config: Config):
    """Sampling and augmentation, MONAI's dictionary transforms.

    In 3D the foreground and background voxel indices of each volume are found once and cached
    (`FgBgToIndicesd`, as MONAI's tutorials do), not on every draw; a 2D slice is small enough to
    find them on each draw."""
    from monai.transforms import (Compose, FgBgToIndicesd, RandAffined, RandCropByPosNegLabeld, RandFlipd,
                                  RandGaussianNoised)

    keys = ["image", "label"]
    dims = config.spatial_dims
    indices = {"fg_indices_key": "label_fg_indices", "bg_indices_key": "label_bg_indices"} if dims == 3 else {}
    transforms = [FgBgToIndicesd("label")] if dims == 3 else []
    transforms += [
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=window_size(config), pos=POSITIVE,
                               neg=NEGATIVE, num_samples=1, **indices),
        RandAffined(keys, prob=AFFINE_PROBABILITY, rotate_range=(ROTATION_RANGE,) * (3 if dims == 3 else 1),
                    scale_range=(SCALE_RANGE,) * dims, mode=("bilinear", "nearest"), padding_mode=("border", "zeros")),
        *[RandFlipd(keys, prob=FLIP_PROBABILITY, spatial_axis=axis) for axis in range(dims)],
        RandGaussianNoised("image", prob=NOISE_PROBABILITY, std=NOISE_STD),
    ]
    return Compose(transforms)


def build_model(config: Config, in_channels: int, outputs: int) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=config.spatial_dims, in_channels=in_channels, out_channels=outputs,
                     features=FEATURES)


def build_loss(config: Config, outputs: int) -> torch.nn.Module:
    """DiceCELoss over softmax classes in 3D; DiceLoss in 2D, on one sigmoid output for one class."""
    from monai.losses import DiceCELoss, DiceLoss

    if config.spatial_dims == 3:
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if outputs == 1:
        return DiceLoss(sigmoid=True)
    return DiceLoss(to_onehot_y=True, softmax=True)


def train(model, loader, loss_fn, optimizer, *, device: torch.device, steps: int) -> list[float]:
    """The plain MONAI tutorial loop over ``steps`` batches; returns the loss of every step."""
    model.train()
    losses = []
    progress = tqdm(loader, total=steps, desc="train", unit="step")
    for batch in progress:
        image = batch["image"].as_subclass(torch.Tensor).to(device)  # (B, C, *spatial)
        label = batch["label"].as_subclass(torch.Tensor).to(device)  # (B, 1, *spatial)
        loss = loss_fn(model(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
    return losses


@torch.inference_mode()
def predict_case(model, image: np.ndarray, *, config: Config, outputs: int, device: torch.device) -> np.ndarray:
    """Label map (*spatial) of one preprocessed volume (C, Z, Y, X): the 3D window slid over the volume,
    or the 2D window slid over each slice along z, Gaussian-weighted (MONAI's `sliding_window_inference`)."""
    from monai.inferers import sliding_window_inference

    window = window_size(config)
    image = torch.from_numpy(np.array(image, dtype=np.float32))  # a copy of the read-only memory map
    if config.spatial_dims == 3:
        padded, region = pad_to_patch(image, window)
        inputs = padded[None]  # (1, C, Z, Y, X)
    else:
        padded, region = pad_to_patch(image, (1, *window))
        inputs = padded.transpose(0, 1)  # (Z, C, Y, X): the slices are the batch
    logits = sliding_window_inference(inputs.to(device), window, WINDOWS_PER_FORWARD, model, overlap=config.overlap,
                                      mode="gaussian")
    logits = torch.as_tensor(logits).float().cpu()
    if outputs == 1:
        labels = (torch.sigmoid(logits[:, 0]) > 0.5).to(torch.uint8)
    else:
        labels = logits.argmax(1).to(torch.uint8)
    labels = labels[0] if config.spatial_dims == 3 else labels  # (Z, Y, X)
    return labels[region].numpy()


def validate(model, entry: Path, val_ids: list[str], *, labels: dict[int, str], spacing: tuple[float, ...],
             config: Config, outputs: int, device: torch.device) -> dict:
    """Every validation case predicted whole and scored by our metrics, averaged as the recipes do."""
    model.eval()
    num_classes = len(labels)
    per_case, largest_piece, surface = {}, {}, {}
    for case_id in tqdm(val_ids, desc="validate", unit="case"):
        case = load_preprocessed_case(entry, case_id)
        prediction = predict_case(model, case.image, config=config, outputs=outputs, device=device)
        reference = np.asarray(case.label)
        per_case[case_id] = dice_per_class(prediction, reference, num_classes)
        largest_piece[case_id] = dice_per_class(keep_largest_foreground(prediction), reference, num_classes)
        surface[case_id] = surface_metrics_per_class(prediction, reference, num_classes, spacing,
                                                     config.nsd_tolerance_mm)
    scores = mean_dice(per_case, labels)
    scores.update(surface_scores(mean_surface_metrics(surface), labels))
    return {"scores": scores, "largest_piece_scores": mean_dice(largest_piece, labels), "per_case": per_case,
            "surface_per_case": surface}


def mean_dice(per_case: dict[str, list[float]], labels: dict[int, str]) -> dict[str, float]:
    """Mean Dice over the cases per foreground class (the recipes' keys) and their mean."""
    classes = [k for k in sorted(labels) if k > 0]
    scores = {metric_key(labels[k]): float(np.mean([dice[k] for dice in per_case.values()])) for k in classes}
    scores["dice_mean"] = float(np.mean(list(scores.values())))
    return scores


def write_results(validation: dict, *, labels: dict[int, str], summary: dict, out: Path) -> None:
    """metrics.json (the recipes' keys), dice_per_case.csv (Dice, HD95 and NSD per class and case),
    summary.json (times, split, settings)."""
    write_metrics(validation, labels, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: list[str]) -> dict:
    started = time.perf_counter()
    config = parse_args(argv)
    from monai.data import CacheDataset, DataLoader
    from monai.utils import set_determinism

    # An empty slice has no foreground to centre on; MONAI then draws background and warns every time.
    warnings.filterwarnings("ignore", message="Num foregrounds 0")
    set_determinism(seed=config.seed)
    out = Path(config.out)
    logger = RunLogger(out)
    device = pick_device(config.device)
    steps, samples_per_step = config.steps, batch_size(config)

    dataset, plan, entry, train_ids, val_ids = prepare_data(config, logger)
    logger.info(f"validation cases: {', '.join(val_ids)}")
    in_channels = len(dataset.modality)
    outputs = 1 if config.spatial_dims == 2 and len(dataset.labels) == 2 else len(dataset.labels)
    samples = training_samples(entry, train_ids, config)
    # The deterministic part (the cached foreground indices) is computed once; copy_cache=False because
    # no transform here changes its input in place, and copying whole volumes per draw costs more than a step.
    train_data = CacheDataset(samples, training_transforms(config), copy_cache=False, progress=False)
    sampler = torch.utils.data.RandomSampler(train_data, replacement=True, num_samples=steps * samples_per_step,
                                             generator=torch.Generator().manual_seed(config.seed))
    loader = DataLoader(train_data, batch_size=samples_per_step, sampler=sampler, num_workers=config.workers,
                        pin_memory=device.type == "cuda")

    model = build_model(config, in_channels, outputs).to(device)
    loss_fn = build_loss(config, outputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    train_started = time.perf_counter()
    losses = train(model, loader, loss_fn, optimizer, device=device, steps=steps)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    validation_started = time.perf_counter()
    validation = validate(model, entry, val_ids, labels=dataset.labels, spacing=plan.target_spacing, config=config,
                          outputs=outputs, device=device)
    finished = time.perf_counter()

    summary = {
        "wall_time_s": finished - started,
        "train_time_s": validation_started - train_started,
        "validation_time_s": finished - validation_started,
        "steps": steps,
        "batch_size": samples_per_step,
        "final_loss": float(np.mean(losses[-25:])),
        "largest_piece_kept": validation["largest_piece_scores"],
        "train_cases": train_ids,
        "validation_cases": val_ids,
        "config": dataclasses.asdict(config),
    }
    write_results(validation, labels=dataset.labels, summary=summary, out=out)
    logger.record({"step": steps, "loss": summary["final_loss"], **validation["scores"]})
    logger.info("validation: " + ", ".join(f"{key} {value:.4f}" for key, value in validation["scores"].items()))
    logger.info("with the largest foreground piece kept: " + ", ".join(
        f"{key} {value:.4f}" for key, value in validation["largest_piece_scores"].items()))
    logger.info(f"wall time {summary['wall_time_s']:.1f} s (training {summary['train_time_s']:.1f} s, "
                f"validation {summary['validation_time_s']:.1f} s)")
    logger.close()
    return validation["scores"]


if __name__ == "__main__":
    main(sys.argv[1:])
