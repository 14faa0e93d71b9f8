"""Steps shared by the 2D slice recipes (`train_atrium.py`, `train_lung.py`).

Both scripts keep their own config, defaults and phantom; the recipe they share lives here, top to
bottom in `train_slice_segmentation`, over the step it is made of: reading and caching the volumes.
"""

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from data.intensity import ct_window_statistics
from data.msd import DatasetError, read_msd_dataset
from data.preprocess import PreprocessPlan, plan_preprocessing, preprocess_dataset
from data.samplers import WeightedSliceSampler
from data.slices import SliceDataset
from data.splits import count_patients, split_cases
from engine.benchmark import benchmark_training
from engine.checkpoint import load_checkpoint, resume_training, save_checkpoint, training_state
from engine.distributed import cleanup_distributed, main_process_first, rank_and_world_size
from engine.layout import resolve_memory_format, resolve_norm
from engine.logging import RunLogger
from engine.optim import build_optimizer
from engine.loader import build_loader
from engine.results import write_metrics
from engine.runtime import start_run
from engine.slicewise import num_outputs, validate_volumes
from engine.train import train_one_epoch
from losses import build_loss
from models import UNet


def prepare_volumes(data_dir: str | None, make_phantom: Callable[[Path], Path], cache_dir: str,
                    val_fraction: float, split_seed: int, fold: int | None, spacing: tuple[float, ...] | None,
                    hu_window: tuple[float, ...] | None, workers: int | None, logger: RunLogger, *,
                    patient_pattern: str, splits_file: str | None, resume: str | None = None):
    """Read the task folder (or generate the phantom), split by patient (`data/splits.py`: cases
    grouped by ``patient_pattern``, or fold ``fold`` of ``splits_file``), preprocess once into the cache.

    MRI channels are z-scored per volume; CT channels get the foundation's foreground statistics or,
    with `hu_window` (lower, upper), that fixed Hounsfield window mapped onto [-1, 1]. A later start
    plans from the cached fingerprints and opens no scan unless one changed; a resumed run (`resume`,
    its checkpoint) keeps the plan its weights were trained with. `workers` none: preprocessing's own
    default (a full-resolution CT takes a few GB per process).

    Returns:
        dataset, plan, cache entry, training case ids, validation case ids.
    """
    cache_dir = Path(cache_dir)
    root = make_phantom(cache_dir / "synthetic") if data_dir is None else Path(data_dir)
    dataset = read_msd_dataset(root)
    case_ids = [case.case_id for case in dataset.cases]
    try:
        train_ids, val_ids = split_cases(case_ids, val_fraction, split_seed, fold, patient_pattern=patient_pattern,
                                         splits_file=splits_file)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    # Intensity statistics come from all labelled cases, as in train_liver3d.py, so folds share a cache.
    if resume:  # the plan the weights were trained with, its HU window included
        plan = PreprocessPlan.from_dict(load_checkpoint(resume)["plan"])
    else:
        plan = plan_preprocessing(dataset, case_ids, cache_dir=cache_dir, target_spacing=spacing, workers=workers)
        if hu_window is not None:
            if "ct" not in plan.channel_schemes:
                raise DatasetError(f"--hu-window needs a CT channel; {dataset.name} has {dataset.modality}.")
            statistics = [ct_window_statistics(*hu_window) if scheme == "ct" else values
                          for scheme, values in zip(plan.channel_schemes, plan.channel_statistics)]
            plan = dataclasses.replace(plan, channel_statistics=statistics)
    entry = preprocess_dataset(dataset, plan, cache_dir, case_ids, workers=workers)
    logger.info(f"{dataset.name}: {len(train_ids)} training / {len(val_ids)} validation cases "
                f"({count_patients(train_ids, patient_pattern)} / {count_patients(val_ids, patient_pattern)} patients), "
                f"{len(dataset.modality)} channel(s) {dataset.modality}, classes {dataset.labels}, "
                f"spacing {plan.target_spacing} mm, cache {entry}")
    return dataset, plan, entry, train_ids, val_ids


def train_slice_segmentation(config, resume: str | None, make_phantom: Callable[[Path], Path], task: str,
                             hu_window: tuple[float, ...] | None = None) -> dict:
    """The 2D recipe of `train_atrium.py` and `train_lung.py`, top to bottom: data (preprocess once,
    cache; slices) -> model -> loss -> optimizer -> resume -> compile -> epoch loop (train, validate,
    checkpoint) -> final validation -> metrics.json.

    Args:
        config: the calling script's ``Config`` (its fields and their comments are the documentation).
        resume: a ``last.pt`` to continue from, or None.
        make_phantom: writes the synthetic task folder under a given root (used without --data-dir).
        task: name stored in the checkpoints (``predict.py`` reads it).
        hu_window: fixed Hounsfield window (lower, upper) for CT channels, or None.

    Returns:
        the flat validation scores written to metrics.json.
    """
    out, device, amp_dtype, workers, logger = start_run(config, resume)
    rank, world_size = rank_and_world_size()  # (0, 1) unless launched by torchrun

    # Data: every slice of the training volumes, read from the memory-mapped cache; the sampler hands
    # (epoch, index, slice) keys to the workers, so every sample is reproducible whatever the workers.
    with main_process_first():  # under torchrun rank 0 fills the cache, the others then read it
        dataset, plan, entry, train_ids, val_ids = prepare_volumes(
            config.data_dir, make_phantom, config.cache_dir, config.val_fraction, config.split_seed, config.fold,
            config.spacing, hu_window, config.workers, logger, patient_pattern=config.patient_pattern,
            splits_file=config.splits_file, resume=resume)
    train_data = SliceDataset(entry, train_ids, config.slice_axis, config.image_size, config.fit, config.augment,
                              config.seed)
    sampler = WeightedSliceSampler(train_data.slice_has_foreground, config.samples_per_epoch,
                                   config.foreground_share, config.seed, num_replicas=world_size, rank=rank)
    loader = build_loader(train_data, sampler, batch_size=config.batch_size, workers=workers, device=device,
                          drop_last=True)
    steps_per_epoch = len(loader)

    # Model, loss, optimizer: one sigmoid logit for the one foreground class.
    outputs = num_outputs(dataset.labels)
    norm, memory_format = resolve_norm(config.norm, device), resolve_memory_format(config.memory_format, device, 2)
    model = UNet(spatial_dims=2, in_channels=len(dataset.modality), num_classes=outputs,
                 base_channels=config.base_channels, depth=config.depth, max_channels=config.max_channels,
                 norm=norm, upsample=config.upsample)
    model = model.to(device, memory_format=memory_format)
    loss_fn = build_loss(config.loss, outputs)
    optimizer, scheduler = build_optimizer(model.parameters(), config.optimizer, config.lr, config.momentum, config.weight_decay,
                                           config.schedule, config.epochs * steps_per_epoch, config.warmup_steps)
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
        return training_state(model, optimizer, scheduler, scaler, epoch, best_dice,
                              config=dataclasses.asdict(config), plan=plan.to_dict(), task=task,
                              labels={str(k): v for k, v in dataset.labels.items()})

    def validate(epoch: int, save_dir: Path | None = None) -> dict:
        return validate_volumes(model, entry, val_ids, labels=dataset.labels, outputs=outputs,
                                axis=config.slice_axis, image_size=config.image_size, fit=config.fit,
                                largest_component=config.largest_component, spacing=plan.target_spacing,
                                tolerance_mm=config.nsd_tolerance_mm, device=device, amp_dtype=amp_dtype,
                                logger=logger, epoch=epoch, save_dir=save_dir)

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

    if rank > 0:  # rank 0 writes the results
        cleanup_distributed()
        return {}
    if validation is None:  # resumed after the last epoch: nothing left to train, validate once
        validation = validate(config.epochs - 1, save_dir=out / "predictions")
    write_metrics(validation, dataset.labels, out)
    logger.close()
    cleanup_distributed()
    return validation["scores"]
