"""Liver and liver-tumour segmentation with a 3D U-Net on CT (Medical Segmentation Decathlon layout).

    python train_liver3d.py                                   # synthetic liver CT phantom, CPU-sized
    python train_liver3d.py --data-dir /data/Task03_Liver --amp --compile   # patch and network planned
    python train_liver3d.py --data-dir /data/Task27_ACDC --patch-size 16,256,224 --strides "1,2,2;1,2,2;2,2,2;2,2,2"
    python train_liver3d.py --resume runs/liver3d/last.pt     # continue an interrupted run
    python train_liver3d.py --config runs/liver3d/config.json --out runs/again   # rerun a config

Any MSD task folder works (dataset.json gives the classes and input channels). What is not given is
planned from the preprocessed data (models/planning.py): the U-Net's per-axis strides and kernel sizes
from the target spacing (thick slices are not downsampled at first), the patch and depth from the
median shape within the memory of nnU-Net's 128^3 patch at batch 2. The recipe, top to bottom:
config -> data (preprocess once, cache) -> network plan -> model -> loss -> optimizer -> resume ->
compile -> epoch loop (train, pseudo-Dice on fixed validation patches, checkpoint) -> final
whole-volume validation -> metrics.json.
"""

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from data.augment3d import Augment3DConfig
from data.msd import read_msd_dataset
from data.patches import PatchDataset
from data.preprocess import PreprocessPlan, load_preprocessed_case, plan_preprocessing, preprocess_dataset, \
    save_prediction
from data.samplers import EpochSampler
from data.splits import PATIENT_PATTERN, count_patients, split_cases
from data.synthetic.liver import ensure_liver_phantom
from engine.checkpoint import load_checkpoint, resume_training, save_checkpoint, training_state
from engine.config import check_sizes, parse_config, save_config
from engine.distributed import cleanup_distributed, main_process_first, rank_and_world_size
from engine.evaluate import evaluate
from engine.inference import default_window_batch_size, trained_flips
from engine.layout import resolve_memory_format, resolve_norm
from engine.loader import build_loader
from engine.logging import RunLogger
from engine.metrics import metric_key, surface_scores
from engine.optim import build_optimizer
from engine.pictures import foreground_slice_index, overlay_slice
from engine.postprocess import keep_largest_foreground, largest_foreground_share
from engine.pseudo_dice import ValidationPatch, draw_validation_patches, pseudo_dice, read_validation_patches
from engine.results import write_metrics
from engine.runtime import start_run
from engine.throughput import benchmark_training
from engine.train import train_one_epoch
from losses import DeepSupervisionLoss, DiceCELoss
from models import UNet
from models.planning import plan_patch, resolve_topology


@dataclass
class Config:
    # data
    data_dir: str | None = None  # MSD task folder (dataset.json, imagesTr/, labelsTr/); none = synthetic liver phantom
    out: str = "runs/liver3d"  # run folder: config.json, last.pt, best.pt, metrics.json, log.jsonl, TensorBoard
    cache_dir: str = ".cache"  # preprocessed arrays (and the generated phantom) live here, keyed by their parameters
    spacing: tuple[float, ...] | None = None  # target spacing z,y,x in mm; auto = the training set's median
    val_fraction: float = 0.2  # share of patients held out for validation (ignored when --fold is set)
    fold: int | None = None  # 5-fold cross-validation: validate on fold 0..4 instead of a val_fraction split
    split_seed: int = 12345  # case split seed, fixed so runs with other --seed validate on the same cases
    patient_pattern: str = PATIENT_PATTERN  # regex whose group 1 is a case's patient (ACDC: acdc_<patient>_f<frame>); a patient's cases stay on one side; '' = every case its own patient
    splits_file: str | None = None  # nnU-Net's splits_final.json: its --fold is the split, winning over val_fraction and patient_pattern
    synthetic_cases: int = 20  # phantom only: number of generated CT volumes
    synthetic_matrix: int = 128  # phantom only: in-plane voxels per slice (the size knob; tests use ~24)
    # sampling and augmentation
    patch_size: tuple[int, ...] | None = None  # patch size z,y,x (one int: a cube); auto: the median preprocessed shape, shrunk until a step fits the memory of a 128^3 patch at batch 2 and 32 base channels, divisible by the downsampling
    foreground_share: float = 0.33  # share of patches centred on a voxel of a random foreground class (nnU-Net)
    foreground_sampling: str = "per_batch"  # per_batch (round(batch_size x foreground_share) of every batch, nnU-Net) or per_sample (each patch draws at foreground_share)
    augment: Augment3DConfig = field(default_factory=Augment3DConfig)  # edit in config.json, pass --config
    # model
    base_channels: int = 32  # feature channels at full resolution, doubled each level up to max_channels
    depth: int | None = None  # resolution levels of the U-Net, the bottleneck included; none: planned, downsampling while an axis keeps at least 4 voxels (and see min_downsamplings)
    min_downsamplings: int = 4  # a planned depth downsamples at least this often while an axis keeps 2 voxels (a 32^3 patch: 4 levels to 2^3, as BasicUNet; measured on real MRI in the README); 0 = nnU-Net's rule alone
    max_channels: int = 320  # cap on feature channels (nnU-Net's 320 for 3D)
    strides: tuple[tuple[int, ...], ...] | None = None  # per downsampling z,y,x strides, e.g. 1,2,2;2,2,2 (one entry: every level); auto: planned from the target spacing, an axis at least twice as coarse as the finest stays 1
    kernel_sizes: tuple[tuple[int, ...], ...] | None = None  # per level z,y,x kernel sizes, e.g. 1,3,3;3,3,3;3,3,3 (one entry: every level); auto: planned, 1 across an axis while it is at least twice as coarse as the finest
    norm: str = "instance"  # instance (nnU-Net; computed by nn.InstanceNorm3d on CUDA, nn.GroupNorm elsewhere: the faster there), instance_norm or group_norm (force one), or batch
    memory_format: str = "auto"  # layout of activations: auto (contiguous on CUDA and MPS, channels_last on the CPU), channels_last or contiguous
    upsample: str = "transpose"  # transpose (nnU-Net) or interpolate (trilinear + conv)
    deep_supervision: bool = True  # extra losses on the coarser decoder outputs (nnU-Net)
    batch_dice: bool = True  # soft Dice of the loss summed over the whole batch (nnU-Net) or taken per patch and averaged (MONAI's DiceCELoss)
    # optimisation
    recipe: str = "default"  # default (the settings below: AdamW, warm-up, cosine, lr planned from the budget) or nnunet (SGD lr 0.01, Nesterov momentum 0.99, poly schedule and nnU-Net's depth rule alone, as nnU-Net); explicit flags override either
    optimizer: str = "adamw"  # adamw (learns in hundreds of steps; measured on real MRI in the README) or sgd (Nesterov, nnU-Net)
    lr: float | None = None  # initial learning rate (after warm-up); none: planned, SGD 0.01 (nnU-Net), AdamW 3e-3 for up to 500 optimizer steps and 3e-3 x sqrt(500 / steps) beyond, at least 3e-4
    momentum: float = 0.99  # SGD only: Nesterov momentum (nnU-Net)
    weight_decay: float = 1e-4  # AdamW's decoupled weight decay (nnU-Net's SGD: 3e-5 L2)
    schedule: str = "cosine"  # cosine (linear warm-up, then half a cosine to 0) or poly (nnU-Net: lr*(1-t)^0.9)
    warmup_steps: int = 50  # cosine only: iterations of linear warm-up
    grad_clip: float = 12.0  # max gradient norm (nnU-Net); 0 disables
    batch_size: int = 2  # patches per step (per process)
    epochs: int = 1000  # total epochs (a resumed run continues up to this number)
    steps_per_epoch: int = 250  # iterations per epoch (nnU-Net: 250); under torchrun each process takes ceil(steps / processes)
    # validation
    val_every: int = 50  # pseudo-Dice on fixed validation patches every N epochs and after the last (picks best.pt); whole volumes are validated once, after training
    val_patches_per_case: int = 4  # pseudo-Dice: fixed patches per validation case, half centred on foreground
    overlap: float = 0.5  # sliding-window overlap between neighbouring windows (fraction of the patch)
    window_batch_size: int | None = None  # windows (and pseudo-Dice patches) per forward pass at validation; none = ~2^23 voxels on a GPU (4 windows of 128^3), 2 on a CPU
    tta: bool = False  # mirroring test-time augmentation at the final validation, along the axes training flips (augment.mirror_axes; all three: 8x slower)
    keep_largest_component: bool | None = None  # keep the largest connected foreground piece (all classes together) at validation; auto: on when in every training label it holds at least 99% of the foreground (one organ: liver, heart, atrium)
    nsd_tolerance_mm: float = 2.0  # normalised surface Dice counts boundary voxels within this distance as correct
    # hardware and reproducibility
    device: str = "auto"  # auto (cuda, then mps, then cpu), cuda, cuda:1, mps or cpu
    amp: bool = False  # mixed precision: fp16 autocast + GradScaler on CUDA, bf16 on CPU
    amp_dtype: str = "auto"  # auto, fp16 or bf16
    compile: bool = False  # torch.compile the model (slow start, faster steps on GPU)
    benchmark: int = 0  # N > 0: time N training steps (steps/s, samples/s, data wait, first step, peak memory) and stop; no validation or checkpoints
    workers: int | None = None  # DataLoader processes preparing patches, per training process (0 = in it); none = its share of the cores available, less one
    seed: int = 0  # seeds weights, sampling and augmentation; same seed and workers -> same numbers
    deterministic: bool = False  # force deterministic kernels on CUDA (slower; CPU runs are deterministic anyway)


# Without --data-dir the recipe trains on the phantom in ~14 minutes on 2 CPU cores: smaller patches, a
# narrower network, 800 steps instead of 250,000, AdamW (further than SGD in few steps), more patches on
# the rare tumour, and the liver's post-processing (one connected organ) with mirroring at the end.
# Its network halves every axis at every level: the planner agrees at the default 128 matrix (2.6-3.3 mm
# pixels, 2.5-5 mm slices), but the small matrices of quick runs have ~16 mm pixels and would plan z-only
# levels, and the phantom's figures should not depend on the matrix size.
SYNTHETIC_PROFILE = dict(
    patch_size=(32, 80, 80), base_channels=8, depth=4, strides=((2, 2, 2),), kernel_sizes=((3, 3, 3),),
    epochs=32, steps_per_epoch=25, val_every=16,
    foreground_share=0.8, foreground_sampling="per_sample", optimizer="adamw", lr=4e-3, weight_decay=1e-4,
    schedule="cosine", warmup_steps=25,
    keep_largest_component=True, tta=True, workers=1)


# Named sets of settings for --recipe; `default` is the dataclass defaults of the same fields.
RECIPES = {
    "nnunet": dict(optimizer="sgd", lr=0.01, momentum=0.99, weight_decay=3e-5, schedule="poly", warmup_steps=0,
                   foreground_share=0.33, foreground_sampling="per_batch", min_downsamplings=0),
}


def prepare_data(config: Config, logger: RunLogger, *, resume: str | None = None):
    """Read the task folder (or generate the phantom), split by patient, preprocess once into the cache.

    A later start plans from the cached fingerprints and opens no scan unless one changed; a resumed
    run (``resume``, its checkpoint) keeps the plan its weights were trained with, whatever changed.
    """
    cache_dir = Path(config.cache_dir)
    if config.data_dir is None:
        data_dir = ensure_liver_phantom(cache_dir / "synthetic", num_cases=config.synthetic_cases,
                                        matrix=config.synthetic_matrix)
    else:
        data_dir = Path(config.data_dir)
    dataset = read_msd_dataset(data_dir)
    case_ids = [case.case_id for case in dataset.cases]
    try:
        train_ids, val_ids = split_cases(case_ids, config.val_fraction, config.split_seed, config.fold,
                                         patient_pattern=config.patient_pattern, splits_file=config.splits_file)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    # Intensity statistics come from all labelled cases, as in nnU-Net, so every fold shares one cache.
    # Without --workers preprocessing keeps its own default: a full-resolution CT takes a few GB per process.
    if resume:  # the plan the weights were trained with
        plan = PreprocessPlan.from_dict(load_checkpoint(resume)["plan"])
    else:
        plan = plan_preprocessing(dataset, case_ids, cache_dir=cache_dir, target_spacing=config.spacing,
                                  workers=config.workers)
    entry = preprocess_dataset(dataset, plan, cache_dir, case_ids, workers=config.workers)
    logger.info(f"{dataset.name}: {len(train_ids)} training / {len(val_ids)} validation cases "
                f"({count_patients(train_ids, config.patient_pattern)} / "
                f"{count_patients(val_ids, config.patient_pattern)} patients), "
                f"{len(dataset.modality)} channel(s), classes {dataset.labels}, "
                f"spacing {plan.target_spacing} mm, cache {entry}")
    return dataset, plan, entry, train_ids, val_ids


# A training label whose largest foreground piece holds less than this share has a target in several
# pieces (both kidneys, several nodules), and the largest-piece post-processing would delete real ones.
ONE_PIECE_SHARE = 0.99


def plan_postprocessing(config: Config, entry: Path, train_ids: list[str], logger: RunLogger) -> Config:
    """The config with ``keep_largest_component`` resolved: as given, or planned from the training
    labels (never the validation ones): on when the largest connected foreground piece holds at least
    ONE_PIECE_SHARE of the foreground in every one of them. The shares are cached in the entry."""
    if config.keep_largest_component is not None:
        return config
    cache = entry / "largest_foreground_share.json"
    shares = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = [case_id for case_id in train_ids if case_id not in shares]
    for case_id in missing:
        shares[case_id] = largest_foreground_share(load_preprocessed_case(entry, case_id).label)
    if missing and rank_and_world_size()[0] == 0:
        temporary = cache.with_suffix(".tmp")
        temporary.write_text(json.dumps(shares, indent=1, sort_keys=True))
        temporary.replace(cache)
    smallest = min(train_ids, key=lambda case_id: shares[case_id])
    keep = shares[smallest] >= ONE_PIECE_SHARE
    logger.info(f"post-processing: {'keep' if keep else 'no'} largest foreground piece (planned: the largest "
                f"piece holds {100 * shares[smallest]:.1f}% of the foreground in {smallest}, the least of "
                f"{len(train_ids)} training labels; on from {100 * ONE_PIECE_SHARE:.0f}%)")
    return dataclasses.replace(config, keep_largest_component=keep)


# AdamW's planned learning rate: ADAMW_LR up to ADAMW_LR_STEPS optimizer steps (measured on real MRI at
# 500 steps), then falling as 1 / sqrt(steps) (2,000 steps: 1.5e-3, measured in the README), never below
# ADAMW_MIN_LR (the Adam learning rate nnU-Net's variants train 250,000 steps with). SGD: nnU-Net's 0.01.
ADAMW_LR, ADAMW_LR_STEPS, ADAMW_MIN_LR = 3e-3, 500, 3e-4
SGD_LR = 0.01


def plan_learning_rate(config: Config, total_steps: int, logger: RunLogger) -> Config:
    """The config with ``lr`` resolved: as given, or planned from the optimizer and ``total_steps``,
    the optimizer steps of one process (under torchrun fewer, of larger batches)."""
    if config.lr is not None:
        return config
    if config.optimizer == "sgd":
        lr = SGD_LR
    else:
        lr = max(ADAMW_MIN_LR, ADAMW_LR * math.sqrt(min(1.0, ADAMW_LR_STEPS / total_steps)))
    logger.info(f"learning rate {lr:.3g} (planned for {config.optimizer} and {total_steps} optimizer steps)")
    return dataclasses.replace(config, lr=lr)


def median_shape(entry: Path, case_ids: list[str]) -> tuple[float, ...]:
    """Per-axis median (z, y, x) shape of the preprocessed cases (cropped and resampled), from their
    ``<case>.json``."""
    return tuple(float(size) for size in np.median(
        [load_preprocessed_case(entry, case_id).properties["shape"] for case_id in case_ids], axis=0))


def plan_network(config: Config, spacing: tuple[float, ...], shape: tuple[float, ...], logger: RunLogger) -> Config:
    """The config with the U-Net's geometry resolved: what it gives explicitly stays, the rest is
    planned (models/planning.py) from the target ``spacing`` and the median preprocessed ``shape``.
    A first level that leaves z alone (thick slices) also restricts rotations to the slice plane, as
    nnU-Net does: rotating out of plane would smear the few slices into each other. The resolved
    patch, depth, strides and kernel sizes go into config.json and every checkpoint, so a resumed
    run and predict.py build the same network."""
    fixed = dict(depth=config.depth, strides=config.strides, kernel_sizes=config.kernel_sizes,
                 min_downsamplings=config.min_downsamplings)
    try:
        if config.patch_size is None:
            patch, topology = plan_patch(spacing, shape, batch_size=config.batch_size,
                                         base_channels=config.base_channels, max_channels=config.max_channels, **fixed)
        else:
            patch = tuple(config.patch_size) * 3 if len(config.patch_size) == 1 else tuple(config.patch_size)
            topology = resolve_topology(spacing, patch, **fixed)
    except ValueError as error:
        raise SystemExit(f"network plan: {error}. Fix --patch-size, --depth, --strides or --kernel-sizes.") from None
    augment = config.augment
    if topology.strides[0][0] == 1:
        augment = dataclasses.replace(augment, rotation_in_plane_only=True)

    def origin(value) -> str:
        return "given" if value is not None else "planned"

    logger.info(f"network: patch {patch} ({origin(config.patch_size)}; median shape {tuple(round(s) for s in shape)}), "
                f"depth {topology.depth} ({origin(config.depth)}), strides {format_levels(topology.strides)} "
                f"({origin(config.strides)}), kernel sizes {format_levels(topology.kernel_sizes)} "
                f"({origin(config.kernel_sizes)}) for spacing {tuple(round(s, 3) for s in spacing)} mm"
                + (", rotation in plane only" if augment.rotation_in_plane_only else ""))
    return dataclasses.replace(config, patch_size=patch, depth=topology.depth, strides=topology.strides,
                               kernel_sizes=topology.kernel_sizes, augment=augment)


def format_levels(levels: tuple[tuple[int, ...], ...]) -> str:
    """((1, 2, 2), (2, 2, 2)) -> "1,2,2;2,2,2", as the flags take them."""
    return ";".join(",".join(str(value) for value in level) for level in levels)


def check_validation_settings(config: Config) -> None:
    """Stop before training, not after it, on settings the validation cannot use."""
    if config.val_patches_per_case < 1:
        raise SystemExit(f"--val-patches-per-case {config.val_patches_per_case}: the pseudo-Dice needs at least "
                         "1 patch per validation case (2 give one centred on foreground and one anywhere).")
    if config.window_batch_size is not None and config.window_batch_size < 1:
        raise SystemExit(f"--window-batch-size {config.window_batch_size}: give at least 1 window per forward "
                         "pass, or none for the default.")


def validate_patches(model, entry: Path, patches: list[ValidationPatch], *, labels: dict[int, str],
                     patch_size: tuple[int, ...], device: torch.device, amp_dtype: torch.dtype | None,
                     batch_size: int, logger: RunLogger, epoch: int) -> dict:
    """Periodic validation: the pseudo-Dice of each class over fixed validation patches, each predicted
    in one forward pass (`engine/pseudo_dice.py`). It follows training and picks best.pt; it is not the
    whole-volume Dice. Under torchrun every process predicts its share and the counts are summed."""
    rank, world_size = rank_and_world_size()
    share = read_validation_patches(entry, patches[rank::world_size], patch_size=patch_size)
    dice = pseudo_dice(model, share, num_classes=len(labels), device=device, amp_dtype=amp_dtype,
                       batch_size=batch_size)
    scores = {metric_key(labels[k], "pseudo_dice"): v for k, v in dice.items()}
    scores["pseudo_dice_mean"] = float(np.mean(list(dice.values())))
    logger.scalars(scores, epoch, prefix="val/")
    logger.info(f"pseudo-Dice over {len(patches)} validation patches (not whole volumes): "
                + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores


def validate(model, entry: Path, val_ids: list[str], *, labels: dict[int, str], spacing: tuple[float, ...],
             config: Config, device: torch.device, amp_dtype: torch.dtype | None, logger: RunLogger, epoch: int,
             save_dir: Path) -> dict:
    """Final validation on whole volumes, on the preprocessed grid (voxels of ``spacing`` mm): mean
    Dice, HD95 and normalised surface Dice per class over the cases.
    Mirrors along the axes training flipped when ``config.tta``, draws the first case into
    TensorBoard and writes every prediction to ``save_dir`` as NIfTI in the source image's geometry,
    so it overlays the original CT in ITK-SNAP or 3D Slicer."""
    def on_prediction(case_id, image, label, prediction):
        if case_id == val_ids[0]:
            z = foreground_slice_index(label)
            logger.image(f"val/{case_id}", overlay_slice(image[0, z], label[z], prediction[z]), epoch)
        properties = load_preprocessed_case(entry, case_id).properties
        save_prediction(prediction, properties, save_dir / f"{case_id}.nii.gz")

    save_dir.mkdir(parents=True, exist_ok=True)
    cases = ((case_id, case.image, case.label) for case_id in val_ids
             for case in [load_preprocessed_case(entry, case_id)])
    mirror_axes = trained_flips(dataclasses.asdict(config.augment), 3) if config.tta else ()
    results = evaluate(model, cases, num_classes=len(labels), patch_size=config.patch_size, device=device,
                       amp_dtype=amp_dtype, overlap=config.overlap, batch_size=config.window_batch_size,
                       mirror_axes=mirror_axes,
                       postprocess=keep_largest_foreground if config.keep_largest_component else None,
                       on_prediction=on_prediction, spacing=spacing, tolerance_mm=config.nsd_tolerance_mm)
    scores = {metric_key(labels[k]): v for k, v in results["mean"].items()}
    scores["dice_mean"] = float(np.mean(list(scores.values())))
    scores.update(surface_scores(results["surface_mean"], labels))
    logger.scalars(scores, epoch, prefix="val/")
    logger.info("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return {"scores": scores, "per_case": results["per_case"], "surface_per_case": results["surface_per_case"]}


def main(argv: list[str]) -> dict:
    config, resume = parse_config(Config, argv, __doc__, SYNTHETIC_PROFILE, recipes=RECIPES)
    check_sizes("--patch-size", config.patch_size, axes="z,y,x")
    if config.foreground_sampling not in ("per_sample", "per_batch"):
        raise SystemExit(f"--foreground-sampling {config.foreground_sampling}: choose per_sample or per_batch")
    check_validation_settings(config)
    out, device, amp_dtype, workers, logger = start_run(config, resume)
    rank, world_size = rank_and_world_size()  # (0, 1) unless launched by torchrun

    # Data: patches drawn from the memory-mapped cache; the sampler hands (epoch, index) keys to the
    # workers, so every patch is reproducible whatever the number of workers or a resume.
    with main_process_first():  # under torchrun rank 0 fills the cache, the others then read it
        dataset, plan, entry, train_ids, val_ids = prepare_data(config, logger, resume=resume)
    if resume and config.strides is None:  # written before networks were planned: the uniform network
        config = dataclasses.replace(config, strides=((2, 2, 2),), kernel_sizes=((3, 3, 3),))
    # Every case, as for the spacing: the folds of one dataset then train the same network.
    config = plan_network(config, plan.target_spacing, median_shape(entry, train_ids + val_ids), logger)
    with main_process_first():  # rank 0 caches the label statistics, the others read them
        config = plan_postprocessing(config, entry, train_ids, logger)
    train_data = PatchDataset(entry, train_ids, patch_size=config.patch_size,
                              samples_per_epoch=config.steps_per_epoch * config.batch_size,
                              foreground_share=config.foreground_share, augment=config.augment, seed=config.seed)
    foreground_per_batch = (round(config.batch_size * config.foreground_share)
                            if config.foreground_sampling == "per_batch" else None)
    # Whole batches: every rank takes ceil(steps_per_epoch / world_size) full ones, so all ranks step together.
    sampler = EpochSampler(config.steps_per_epoch, config.batch_size, foreground_per_batch=foreground_per_batch,
                           num_replicas=world_size, rank=rank)
    loader = build_loader(train_data, sampler, batch_size=config.batch_size, workers=workers, device=device)
    total_steps = config.epochs * sampler.batches_per_replica  # optimizer steps of this process
    config = plan_learning_rate(config, total_steps, logger)
    if rank == 0:
        save_config(config, out / "config.json")

    # Model, loss, optimizer.
    norm, memory_format = resolve_norm(config.norm, device), resolve_memory_format(config.memory_format, device, 3)
    logger.info(f"norm {norm}, memory format {memory_format}")
    model = UNet(spatial_dims=3, in_channels=len(dataset.modality), num_classes=len(dataset.labels),
                 base_channels=config.base_channels, depth=config.depth, max_channels=config.max_channels,
                 norm=norm, upsample=config.upsample, deep_supervision=config.deep_supervision,
                 strides=config.strides, kernel_sizes=config.kernel_sizes)
    model = model.to(device, memory_format=memory_format)
    loss_fn = DiceCELoss(include_background=False, batch_dice=config.batch_dice)  # nnU-Net: CE + batch Dice
    if config.deep_supervision:
        loss_fn = DeepSupervisionLoss(loss_fn)
    optimizer, scheduler = build_optimizer(model.parameters(), config.optimizer, lr=config.lr,
                                           momentum=config.momentum, weight_decay=config.weight_decay,
                                           schedule=config.schedule, total_steps=total_steps,
                                           warmup_steps=config.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, best_dice = 0, -1.0
    if resume:  # every state that shapes the following steps: weights, optimizer, schedule, scaler, RNGs
        start_epoch, best_dice = resume_training(resume, model, optimizer, scheduler, scaler)
        logger.info(f"resumed from {resume} at epoch {start_epoch + 1}")

    train_model = model  # wrapped below; the plain model is what we save (its state_dict loads anywhere)
    if world_size > 1:  # torchrun: gradients are averaged over the processes at every step
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # Compile what trains, and only that: validation runs the plain `model` (the same weights, outside
    # DDP), where a compiled one would trace new graphs for no-grad, eval mode and the last small batch.
    if config.compile:
        train_model = torch.compile(train_model)
    if config.benchmark:  # throughput only: no validation, no checkpoints
        return benchmark_training(train_model, loader, sampler, loss_fn, optimizer, steps=config.benchmark,
                                  scheduler=scheduler, scaler=scaler, device=device, amp_dtype=amp_dtype,
                                  grad_clip=config.grad_clip, memory_format=memory_format, out=out, logger=logger)

    def checkpoint_state(epoch: int) -> dict:
        return training_state(model, optimizer, scheduler, scaler, epoch=epoch, best_metric=best_dice,
                              config=dataclasses.asdict(config), plan=plan.to_dict(), task="liver3d",
                              labels={str(k): v for k, v in dataset.labels.items()})

    # Validation runs the plain `model`: outside DDP it makes no collective calls, and uncompiled it
    # traces no new graphs for eval mode. Its patches are fixed for the whole run and the same on every
    # process; split_seed, not seed, so runs with other seeds are compared on the same patches.
    validation_patches = draw_validation_patches(entry, val_ids, patch_size=config.patch_size,
                                                 patches_per_case=config.val_patches_per_case, seed=config.split_seed)
    window_batch_size = config.window_batch_size or default_window_batch_size(device, config.patch_size)

    # Epoch loop: train, pseudo-Dice every val_every epochs and after the last, checkpoint every epoch.
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        stats = train_one_epoch(train_model, loader, loss_fn, optimizer, scheduler=scheduler, scaler=scaler,
                                device=device, amp_dtype=amp_dtype, grad_clip=config.grad_clip,
                                memory_format=memory_format, description=f"epoch {epoch + 1}/{config.epochs}", progress=rank == 0)
        logger.scalars(stats, epoch, prefix="train/")
        logger.info(f"epoch {epoch + 1}/{config.epochs}: loss {stats['loss']:.4f}, lr {stats['lr']:.2e}, "
                    f"{stats['samples_per_s']:.1f} patches/s, data wait {100 * stats['data_wait_fraction']:.0f}%")
        record = {"epoch": epoch, **stats, "epoch_time_s": time.perf_counter() - started}
        last_epoch = epoch == config.epochs - 1
        if (epoch + 1) % config.val_every == 0 or last_epoch:  # every process scores its share of the patches
            scores = validate_patches(model, entry, validation_patches, labels=dataset.labels,
                                      patch_size=config.patch_size, device=device, amp_dtype=amp_dtype,
                                      batch_size=window_batch_size, logger=logger, epoch=epoch)
            record.update(scores)
            if scores["pseudo_dice_mean"] > best_dice:  # the best pseudo-Dice, the same on every process
                best_dice = scores["pseudo_dice_mean"]
                if rank == 0:
                    save_checkpoint(checkpoint_state(epoch), out / "best.pt")
        if rank == 0:
            save_checkpoint(checkpoint_state(epoch), out / "last.pt")
        logger.record(record)

    # Final validation of the last weights, by rank 0 alone: every case whole, with surface metrics,
    # predictions written. The other processes wait for it at cleanup_distributed's barrier (within
    # TIMEOUT), so all leave the process group together once the results are on disk.
    scores = {}
    if rank == 0:
        validation = validate(model, entry, val_ids, labels=dataset.labels, spacing=plan.target_spacing,
                              config=config, device=device, amp_dtype=amp_dtype, logger=logger,
                              epoch=config.epochs - 1, save_dir=out / "predictions")
        write_metrics(validation, dataset.labels, out)
        logger.close()
        scores = validation["scores"]
    cleanup_distributed()
    return scores


if __name__ == "__main__":
    main(sys.argv[1:])
