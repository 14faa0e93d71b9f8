"""Lung tumour segmentation with a 2D U-Net on chest CT slices (MSD Task06_Lung layout).

    python train_lung.py                                      # synthetic chest CT phantom, CPU-sized
    python train_lung.py --data-dir /data/Task06_Lung --amp
    python train_lung.py --data-dir /data/Task06_Lung --hu-window=-1000,400 --out runs/lung_window
    python train_lung.py --resume runs/lung/last.pt           # continue an interrupted run
    python train_lung.py --config runs/lung/config.json --out runs/again --seed 1   # rerun a config

Tumours fill far under 1% of the voxels and a few percent of the slices, so a weighted sampler makes
about half of the training slices show tumour, and the loss is binary cross-entropy (or Dice, or their
sum). The network sees one slice at a time; it is judged on the stacked volume (3D Dice per case, a
case without tumour scoring 1 only when nothing is predicted). The recipe, top to bottom: config ->
data (preprocess once, cache; slices, augmentation, sampler) -> model -> loss -> optimizer -> resume ->
compile -> epoch loop (train, validate, checkpoint) -> final validation -> metrics.json.
"""

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from data.augment2d import Augment2DConfig
from data.samplers import WeightedSliceSampler
from data.slices import SliceDataset
from data.splits import PATIENT_PATTERN
from data.synthetic.lung import ensure_lung_phantom
from engine.checkpoint import resume_training, save_checkpoint, training_state
from engine.config import check_sizes, parse_config
from engine.distributed import cleanup_distributed, main_process_first, rank_and_world_size
from engine.evaluate import validate_volumes
from engine.layout import resolve_memory_format, resolve_norm
from engine.loader import build_loader
from engine.optim import build_optimizer
from engine.results import write_metrics
from engine.runtime import start_run
from engine.slicewise import num_outputs
from engine.throughput import benchmark_training
from engine.train import train_one_epoch
from engine.volumes import prepare_volumes
from losses import build_loss
from models import UNet


@dataclass
class Config:
    # data
    data_dir: str | None = None  # MSD task folder (dataset.json, imagesTr/, labelsTr/); none = the synthetic chest CT phantom
    out: str = "runs/lung"  # run folder: config.json, last.pt, best.pt, metrics.json, dice_per_case.csv, log.jsonl, TensorBoard, predictions/
    cache_dir: str = ".cache"  # preprocessed arrays (and the generated phantom) live here, keyed by their parameters
    spacing: tuple[float, ...] | None = None  # target voxel spacing z,y,x in mm; auto = the training set's median spacing
    val_fraction: float = 0.2  # share of patients held out for validation (ignored when --fold is set)
    fold: int | None = None  # 5-fold cross-validation: validate on fold 0..4 instead of a val_fraction split
    split_seed: int = 12345  # seed of the case split, fixed so that runs with other --seed values compare on the same cases
    patient_pattern: str = PATIENT_PATTERN  # regex whose group 1 is a case's patient (ACDC: acdc_<patient>_f<frame>); a patient's cases stay on one side; '' = every case its own patient
    splits_file: str | None = None  # nnU-Net's splits_final.json: its --fold is the split, winning over val_fraction and patient_pattern
    synthetic_cases: int = 16  # phantom only: number of generated CT volumes (every sixth without tumour)
    synthetic_matrix: int = 192  # phantom only: in-plane voxels per slice, 340 mm across (the size knob; tests use ~32)
    hu_window: tuple[float, ...] | None = None  # fixed Hounsfield window LOW,HIGH (e.g. -1000,400) instead of the tumour's intensity statistics
    # slices, sampling and augmentation
    slice_axis: int = 0  # axis of the (z, y, x) volume the slices are cut along: 0 = the acquired (axial) slices
    image_size: tuple[int, ...] = (256, 256)  # network input H,W in pixels (one int = square)
    fit: str = "crop"  # crop (a full-resolution window, so small nodules keep their pixels; sliding-window validation) or resize
    foreground_share: float | None = 0.5  # share of training slices showing tumour (weighted sampler); none = every slice equally likely
    samples_per_epoch: int = 4000  # slices drawn per epoch (with replacement)
    augment: Augment2DConfig = field(default_factory=lambda: Augment2DConfig(flip_axes=(1,)))  # spatial and intensity augmentation (edit via --config); left-right flips: tumours occur in either lung
    # model
    base_channels: int = 32  # feature channels at full resolution, doubled each level up to max_channels
    depth: int = 6  # resolution levels of the U-Net (5 poolings: 256 -> 8 pixels at the bottleneck)
    max_channels: int = 512  # cap on feature channels (nnU-Net's 512 for 2D)
    norm: str = "instance"  # instance (nnU-Net; computed by nn.InstanceNorm2d on CUDA, nn.GroupNorm elsewhere: the faster there), instance_norm or group_norm (force one), or batch
    memory_format: str = "auto"  # layout of activations: auto (contiguous on CUDA and MPS, channels_last on the CPU), channels_last or contiguous
    upsample: str = "transpose"  # transpose (nnU-Net) or interpolate (bilinear + conv)
    loss: str = "bce"  # bce (binary cross-entropy), dice (batch soft Dice) or bce_dice
    # optimisation
    optimizer: str = "adamw"  # adamw or sgd (Nesterov, nnU-Net)
    lr: float = 1e-3  # initial learning rate (~1e-3 suits AdamW; nnU-Net: 0.01 with SGD)
    momentum: float = 0.99  # SGD Nesterov momentum (nnU-Net)
    weight_decay: float = 1e-4  # decoupled weight decay (AdamW) or L2 penalty (SGD)
    schedule: str = "cosine"  # cosine (with linear warm-up) or poly (nnU-Net: lr*(1-t)^0.9)
    warmup_steps: int = 100  # cosine only: iterations of linear warm-up
    grad_clip: float = 12.0  # max gradient norm (nnU-Net); 0 disables
    batch_size: int = 16  # slices per step (per process)
    epochs: int = 100  # total epochs (a resumed run continues up to this number)
    # validation
    val_every: int = 10  # validate every N epochs; always after the last epoch
    keep_largest_component: bool = False  # keep only the largest connected 3D component (off: a patient may have several nodules)
    nsd_tolerance_mm: float = 2.0  # normalised surface Dice counts boundary voxels within this distance as correct
    # hardware and reproducibility
    device: str = "auto"  # auto (cuda, then mps, then cpu), cuda, cuda:1, mps or cpu
    amp: bool = False  # mixed precision: fp16 autocast + GradScaler on CUDA, bf16 on CPU
    amp_dtype: str = "auto"  # auto, fp16 or bf16
    compile: bool = False  # torch.compile the model (slow start, faster steps on GPU)
    benchmark: int = 0  # N > 0: time N training steps (steps/s, samples/s, data wait, first step, peak memory) and stop; no validation or checkpoints
    workers: int | None = None  # DataLoader processes preparing slices, per training process (0 = in it); none = its share of the cores available, less one
    seed: int = 0  # seeds weights, sampling and augmentation; same seed and workers -> same numbers
    deterministic: bool = False  # force deterministic kernels on CUDA (slower; CPU runs are deterministic anyway)


# Without --data-dir the recipe trains on the phantom in ~8 minutes on 2 CPU cores: 96-pixel crops,
# a small network, few epochs. The phantom keeps 1.8 mm pixels: at 2.7 mm an 8 mm nodule is three
# pixels across and looks like any vessel cut across.
SYNTHETIC_PROFILE = dict(
    image_size=(96, 96), base_channels=12, depth=4, samples_per_epoch=480, epochs=24, val_every=8,
    batch_size=16, lr=3e-3, warmup_steps=30, workers=1)


def main(argv: list[str]) -> dict:
    config, resume = parse_config(Config, argv, __doc__, SYNTHETIC_PROFILE)
    check_sizes("--image-size", config.image_size, axes="H,W")
    out, device, amp_dtype, workers, logger = start_run(config, resume)
    rank, world_size = rank_and_world_size()  # (0, 1) unless launched by torchrun

    # Data: every slice of the training volumes, read from the memory-mapped cache; the sampler hands
    # (epoch, index, slice) keys to the workers, so every sample is reproducible whatever the workers.
    with main_process_first():  # under torchrun rank 0 fills the cache, the others then read it
        if config.data_dir is None:  # the phantom, written once as a Decathlon task folder
            data_dir = ensure_lung_phantom(Path(config.cache_dir) / "synthetic",
                                           num_cases=config.synthetic_cases, matrix=config.synthetic_matrix)
        else:
            data_dir = Path(config.data_dir)
        dataset, plan, entry, train_ids, val_ids = prepare_volumes(
            data_dir, config.cache_dir, logger, val_fraction=config.val_fraction, split_seed=config.split_seed,
            fold=config.fold, patient_pattern=config.patient_pattern, splits_file=config.splits_file,
            spacing=config.spacing, hu_window=config.hu_window, workers=config.workers, resume=resume)
    # Augmentation: config.augment, drawn afresh for every slice (left-right flips: tumours occur in either lung).
    train_data = SliceDataset(entry, train_ids, axis=config.slice_axis, image_size=config.image_size,
                              fit=config.fit, augment=config.augment, seed=config.seed)
    # Sampler: --foreground-share of the draws (half by default) show tumour, held by few slices.
    sampler = WeightedSliceSampler(train_data.slice_has_foreground, num_samples=config.samples_per_epoch,
                                   foreground_share=config.foreground_share, seed=config.seed,
                                   num_replicas=world_size, rank=rank)
    loader = build_loader(train_data, sampler, batch_size=config.batch_size, workers=workers, device=device,
                          drop_last=True)

    # Model, loss, optimizer: one sigmoid logit for the one foreground class.
    outputs = num_outputs(dataset.labels)
    norm, memory_format = resolve_norm(config.norm, device), resolve_memory_format(config.memory_format, device, 2)
    model = UNet(spatial_dims=2, in_channels=len(dataset.modality), num_classes=outputs,
                 base_channels=config.base_channels, depth=config.depth, max_channels=config.max_channels,
                 norm=norm, upsample=config.upsample)
    model = model.to(device, memory_format=memory_format)
    # Loss (--loss, losses/by_name.py): binary cross-entropy by default; dice and bce_dice are the others.
    loss_fn = build_loss(config.loss, outputs)
    # Optimizer and schedule (--optimizer, --schedule): AdamW, linear warm-up then cosine, stepped every batch.
    optimizer, scheduler = build_optimizer(model.parameters(), config.optimizer, lr=config.lr,
                                           momentum=config.momentum, weight_decay=config.weight_decay,
                                           schedule=config.schedule, total_steps=config.epochs * len(loader),
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
                              config=dataclasses.asdict(config), plan=plan.to_dict(), task="lung",
                              labels={str(k): v for k, v in dataset.labels.items()})

    def validate(epoch: int, save_dir: Path | None = None) -> dict:  # every slice of every validation case
        return validate_volumes(model, entry, val_ids, labels=dataset.labels, outputs=outputs,
                                axis=config.slice_axis, image_size=config.image_size, fit=config.fit,
                                keep_largest_component=config.keep_largest_component, spacing=plan.target_spacing,
                                tolerance_mm=config.nsd_tolerance_mm, device=device, amp_dtype=amp_dtype,
                                logger=logger, epoch=epoch, save_dir=save_dir)

    # Epoch loop: train, validate every val_every epochs and after the last, checkpoint every epoch.
    validation = None
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        stats = train_one_epoch(train_model, loader, loss_fn, optimizer, scheduler=scheduler, scaler=scaler,
                                device=device, amp_dtype=amp_dtype, grad_clip=config.grad_clip,
                                memory_format=memory_format, description=f"epoch {epoch + 1}/{config.epochs}",
                                progress=rank == 0)
        logger.scalars(stats, epoch, prefix="train/")
        logger.info(f"epoch {epoch + 1}/{config.epochs}: loss {stats['loss']:.4f}, lr {stats['lr']:.2e}, "
                    f"{stats['samples_per_s']:.1f} slices/s, data wait {100 * stats['data_wait_fraction']:.0f}%")
        record = {"epoch": epoch, **stats, "epoch_time_s": time.perf_counter() - started}
        last_epoch = epoch == config.epochs - 1
        if rank == 0 and ((epoch + 1) % config.val_every == 0 or last_epoch):  # one process validates every case
            validation = validate(epoch, save_dir=out / "predictions" if last_epoch else None)
            record.update(validation["scores"])
            if validation["scores"]["dice"] > best_dice:
                best_dice = validation["scores"]["dice"]
                save_checkpoint(checkpoint_state(epoch), out / "best.pt")
        if rank == 0:
            save_checkpoint(checkpoint_state(epoch), out / "last.pt")
        logger.record(record)

    # The last epoch's validation, its predictions written, becomes metrics.json and dice_per_case.csv,
    # written by rank 0 while the other processes wait at cleanup_distributed's barrier.
    scores = {}
    if rank == 0:
        if validation is None:  # resumed after the last epoch: nothing left to train, validate once
            validation = validate(config.epochs - 1, save_dir=out / "predictions")
        write_metrics(validation, dataset.labels, out)
        logger.close()
        scores = validation["scores"]
    cleanup_distributed()
    return scores


if __name__ == "__main__":
    main(sys.argv[1:])
