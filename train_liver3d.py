"""Liver and liver-tumour segmentation with a 3D U-Net on CT (Medical Segmentation Decathlon layout).

    python train_liver3d.py                                   # synthetic liver CT phantom, CPU-sized
    python train_liver3d.py --data-dir /data/Task03_Liver --patch 128 --amp --compile
    python train_liver3d.py --resume runs/liver3d/last.pt     # continue an interrupted run
    python train_liver3d.py --config runs/liver3d/config.json --out runs/again   # rerun a config

Any MSD task folder works (dataset.json gives the classes and input channels). The recipe, top to
bottom: config -> data (preprocess once, cache) -> model -> loss -> optimizer -> resume -> compile ->
epoch loop (train, validate, checkpoint) -> final validation -> metrics.json.
"""

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from data.augment3d import Augment3DConfig
from data.msd import read_msd_dataset
from data.patches import EpochSampler, PatchDataset
from data.preprocess import PreprocessPlan, load_preprocessed_case, plan_preprocessing, preprocess_dataset, \
    save_prediction
from data.splits import split_cases
from data.synthetic.liver import ensure_liver_phantom
from engine.benchmark import benchmark_training
from engine.checkpoint import load_checkpoint, resume_training, save_checkpoint, training_state
from engine.config import parse_config
from engine.distributed import cleanup_distributed, main_process_first, rank_and_world_size
from engine.evaluate import evaluate
from engine.logging import RunLogger, foreground_slice_index, overlay_slice
from engine.optim import build_optimizer
from engine.postprocess import keep_largest_foreground
from engine.loader import build_loader
from engine.runtime import metric_key, start_run, surface_scores
from engine.train import train_one_epoch
from losses import DeepSupervisionLoss, DiceCELoss
from models import UNet


@dataclass
class Config:
    # data
    data_dir: str | None = None  # MSD task folder (dataset.json, imagesTr/, labelsTr/); none = synthetic liver phantom
    out: str = "runs/liver3d"  # run folder: config.json, last.pt, best.pt, metrics.json, log.jsonl, TensorBoard
    cache_dir: str = ".cache"  # preprocessed arrays (and the generated phantom) live here, keyed by their parameters
    spacing: tuple[float, ...] | None = None  # target spacing z,y,x in mm; auto = the training set's median
    val_fraction: float = 0.2  # share of cases held out for validation (ignored when --fold is set)
    fold: int | None = None  # 5-fold cross-validation: validate on fold 0..4 instead of a val_fraction split
    split_seed: int = 12345  # case split seed, fixed so runs with other --seed validate on the same cases
    synthetic_cases: int = 20  # phantom only: number of generated CT volumes
    synthetic_matrix: int = 128  # phantom only: in-plane voxels per slice (the size knob; tests use ~24)
    # sampling and augmentation
    patch: tuple[int, ...] = (128, 128, 128)  # patch size: one int (a cube) or z,y,x
    fg_prob: float = 0.33  # share of patches centred on a voxel of a random foreground class (nnU-Net)
    augment: Augment3DConfig = field(default_factory=Augment3DConfig)  # edit in config.json, pass --config
    # model
    base_channels: int = 32  # feature channels at full resolution, doubled each level up to max_channels
    depth: int = 5  # resolution levels of the U-Net (4 poolings for depth 5)
    max_channels: int = 320  # cap on feature channels (nnU-Net's 320 for 3D)
    norm: str = "instance"  # instance (small batches, nnU-Net) or batch
    upsample: str = "transpose"  # transpose (nnU-Net) or interpolate (trilinear + conv)
    deep_supervision: bool = True  # extra losses on the coarser decoder outputs (nnU-Net)
    # optimisation
    optimizer: str = "sgd"  # sgd (Nesterov, nnU-Net) or adamw
    lr: float = 0.01  # initial learning rate (nnU-Net: 0.01 with SGD; ~1e-3 suits AdamW)
    momentum: float = 0.99  # SGD Nesterov momentum (nnU-Net)
    weight_decay: float = 3e-5  # L2 penalty (nnU-Net)
    schedule: str = "poly"  # poly (nnU-Net: lr*(1-t)^0.9) or cosine (with linear warm-up)
    warmup_steps: int = 0  # cosine only: iterations of linear warm-up
    grad_clip: float = 12.0  # max gradient norm (nnU-Net); 0 disables
    batch_size: int = 2  # patches per step (per process)
    epochs: int = 1000  # total epochs (a resumed run continues up to this number)
    steps_per_epoch: int = 250  # iterations per epoch (nnU-Net: 250); under torchrun the processes share them
    # validation
    val_every: int = 50  # validate every N epochs; always after the last epoch
    overlap: float = 0.5  # sliding-window overlap between neighbouring windows (fraction of the patch)
    tta: bool = False  # mirroring test-time augmentation at the final validation (8 flips in 3D: 8x slower)
    keep_largest: bool = False  # keep the largest connected foreground component (one organ, e.g. liver)
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
SYNTHETIC_PROFILE = dict(
    patch=(32, 80, 80), base_channels=8, depth=4, epochs=32, steps_per_epoch=25, val_every=16,
    fg_prob=0.8, optimizer="adamw", lr=4e-3, weight_decay=1e-4, schedule="cosine", warmup_steps=25,
    keep_largest=True, tta=True, workers=1)


def prepare_data(config: Config, logger: RunLogger, *, resume: str | None = None):
    """Read the task folder (or generate the phantom), split by case, preprocess once into the cache.

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
    train_ids, val_ids = split_cases(case_ids, config.val_fraction, config.split_seed, config.fold)
    # Intensity statistics come from all labelled cases, as in nnU-Net, so every fold shares one cache.
    # Without --workers preprocessing keeps its own default: a full-resolution CT takes a few GB per process.
    if resume:  # the plan the weights were trained with
        plan = PreprocessPlan.from_dict(load_checkpoint(resume)["plan"])
    else:
        plan = plan_preprocessing(dataset, case_ids, cache_dir=cache_dir, target_spacing=config.spacing,
                                  workers=config.workers)
    entry = preprocess_dataset(dataset, plan, cache_dir, case_ids, workers=config.workers)
    logger.info(f"{dataset.name}: {len(train_ids)} training / {len(val_ids)} validation cases, "
                f"{len(dataset.modality)} channel(s), classes {dataset.labels}, "
                f"spacing {plan.target_spacing} mm, cache {entry}")
    return dataset, plan, entry, train_ids, val_ids


def validate(model, entry: Path, val_ids: list[str], *, labels: dict[int, str], spacing: tuple[float, ...],
             config: Config, device: torch.device, amp_dtype: torch.dtype | None, logger: RunLogger, epoch: int,
             save_dir: Path | None = None) -> dict:
    """Whole-volume validation on the preprocessed grid (voxels of ``spacing`` mm): mean Dice, HD95
    and normalised surface Dice per class over the cases.
    Draws the first case into TensorBoard. The final validation (``save_dir`` given) mirrors when
    ``config.tta`` and writes every prediction as NIfTI in the source image's geometry, so it
    overlays the original CT in ITK-SNAP or 3D Slicer."""
    def on_prediction(case_id, image, label, prediction):
        if case_id == val_ids[0]:
            z = foreground_slice_index(label)
            logger.image(f"val/{case_id}", overlay_slice(image[0, z], label[z], prediction[z]), epoch)
        if save_dir is not None:
            properties = load_preprocessed_case(entry, case_id).properties
            save_prediction(prediction, properties, save_dir / f"{case_id}.nii.gz")

    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    cases = ((case_id, case.image, case.label) for case_id in val_ids
             for case in [load_preprocessed_case(entry, case_id)])
    results = evaluate(model, cases, num_classes=len(labels), roi_size=config.patch, device=device,
                       amp_dtype=amp_dtype, overlap=config.overlap, mirror_axes=(0, 1, 2) if config.tta and save_dir else (),
                       postprocess=keep_largest_foreground if config.keep_largest else None,
                       on_prediction=on_prediction, spacing=spacing, tolerance_mm=config.nsd_tolerance_mm)
    scores = {metric_key(labels[k]): v for k, v in results["mean"].items()}
    scores["dice_mean"] = float(np.mean(list(scores.values())))
    scores.update(surface_scores(results["surface_mean"], labels))
    logger.scalars(scores, epoch, prefix="val/")
    logger.info("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return {"scores": scores, "per_case": results["per_case"], "surface_per_case": results["surface_per_case"]}


def write_metrics(validation: dict, labels: dict[int, str], out: Path) -> None:
    """metrics.json (flat numeric keys) and dice_per_case.csv (Dice, HD95 in mm and NSD of each
    class) from the final validation."""
    (out / "metrics.json").write_text(json.dumps(validation["scores"], indent=2) + "\n")
    classes = [k for k in sorted(labels) if k > 0]
    rows = ["case," + ",".join(metric_key(labels[k], metric) for metric in ("dice", "hd95", "nsd") for k in classes)]
    for case_id, dice in validation["per_case"].items():
        surface = validation["surface_per_case"][case_id]
        values = [dice[k] for k in classes] + [surface[k][key] for key in ("hd95_mm", "nsd") for k in classes]
        rows.append(case_id + "," + ",".join(f"{value:.6f}" for value in values))
    (out / "dice_per_case.csv").write_text("\n".join(rows) + "\n")


def main(argv: list[str]) -> dict:
    config, resume = parse_config(Config, argv, __doc__, SYNTHETIC_PROFILE)
    out, device, amp_dtype, workers, logger = start_run(config, resume)
    rank, world_size = rank_and_world_size()  # (0, 1) unless launched by torchrun

    # Data: patches drawn from the memory-mapped cache; the sampler hands (epoch, index) keys to the
    # workers, so every patch is reproducible whatever the number of workers or a resume.
    with main_process_first():  # under torchrun rank 0 fills the cache, the others then read it
        dataset, plan, entry, train_ids, val_ids = prepare_data(config, logger, resume=resume)
    train_data = PatchDataset(entry, train_ids, config.patch, config.steps_per_epoch * config.batch_size,
                              config.fg_prob, config.augment, config.seed)
    sampler = EpochSampler(len(train_data), num_replicas=world_size, rank=rank)
    loader = build_loader(train_data, sampler, batch_size=config.batch_size, workers=workers, device=device)

    # Model, loss, optimizer.
    model = UNet(spatial_dims=3, in_channels=len(dataset.modality), num_classes=len(dataset.labels),
                 base_channels=config.base_channels, depth=config.depth, max_channels=config.max_channels,
                 norm=config.norm, upsample=config.upsample, deep_supervision=config.deep_supervision)
    # Channels-last 3D: cuDNN's fast fp16 kernels and oneDNN's CPU kernels (~2x here) both prefer it.
    memory_format = torch.contiguous_format if device.type == "mps" else torch.channels_last_3d
    model = model.to(device, memory_format=memory_format)
    loss_fn = DiceCELoss(include_background=False, batch_dice=True)  # nnU-Net: CE + batch Dice
    if config.deep_supervision:
        loss_fn = DeepSupervisionLoss(loss_fn)
    optimizer, scheduler = build_optimizer(model.parameters(), config.optimizer, config.lr, config.momentum,
                                           config.weight_decay, config.schedule,
                                           config.epochs * len(loader), config.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, best_dice = 0, -1.0
    if resume:  # every state that shapes the following steps: weights, optimizer, schedule, scaler, RNGs
        start_epoch, best_dice = resume_training(resume, model, optimizer, scheduler, scaler, device)
        logger.info(f"resumed from {resume} at epoch {start_epoch + 1}")

    train_model = model  # the plain model is what we save: its state_dict loads anywhere
    if world_size > 1:  # torchrun: gradients are averaged over the processes at every step
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)
    eval_model = train_model if world_size == 1 else model  # rank 0 validates alone, outside DDP
    if config.benchmark:  # throughput only: no validation, no checkpoints
        return benchmark_training(train_model, loader, sampler, loss_fn, optimizer, steps=config.benchmark,
                                  scheduler=scheduler, scaler=scaler, device=device, amp_dtype=amp_dtype,
                                  grad_clip=config.grad_clip, memory_format=memory_format, out=out, logger=logger)

    def checkpoint_state(epoch: int) -> dict:
        return training_state(model, optimizer, scheduler, scaler, epoch, best_dice,
                              config=dataclasses.asdict(config), plan=plan.to_dict(), task="liver3d",
                              labels={str(k): v for k, v in dataset.labels.items()})

    # Epoch loop: train, validate every val_every epochs and after the last, checkpoint every epoch.
    validation = None
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
        if rank == 0 and ((epoch + 1) % config.val_every == 0 or last_epoch):  # one process validates every case
            validation = validate(eval_model, entry, val_ids, labels=dataset.labels, spacing=plan.target_spacing,
                                  config=config, device=device, amp_dtype=amp_dtype, logger=logger, epoch=epoch,
                                  save_dir=out / "predictions" if last_epoch else None)
            record.update(validation["scores"])
            if validation["scores"]["dice_mean"] > best_dice:
                best_dice = validation["scores"]["dice_mean"]
                save_checkpoint(checkpoint_state(epoch), out / "best.pt")
        if rank == 0:
            save_checkpoint(checkpoint_state(epoch), out / "last.pt")
        logger.record(record)

    if rank > 0:  # rank 0 writes the results
        cleanup_distributed()
        return {}
    if validation is None:  # resumed after the last epoch: nothing left to train, validate once
        validation = validate(eval_model, entry, val_ids, labels=dataset.labels, spacing=plan.target_spacing,
                              config=config, device=device, amp_dtype=amp_dtype, logger=logger,
                              epoch=config.epochs - 1, save_dir=out / "predictions")
    write_metrics(validation, dataset.labels, out)
    logger.close()
    cleanup_distributed()
    return validation["scores"]


if __name__ == "__main__":
    main(sys.argv[1:])
