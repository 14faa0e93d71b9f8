"""Steps shared by the 2D slice recipes (`train_atrium.py`, `train_lung.py`).

Both scripts keep their own config, defaults and phantom; the recipe they share lives here, top to
bottom in `train_slice_segmentation`.
"""

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from data.samplers import WeightedSliceSampler
from data.slices import SliceDataset
from engine.benchmark import benchmark_training
from engine.checkpoint import resume_training, save_checkpoint, training_state
from engine.distributed import cleanup_distributed, main_process_first, rank_and_world_size
from engine.layout import resolve_memory_format, resolve_norm
from engine.optim import build_optimizer
from engine.loader import build_loader
from engine.results import write_metrics
from engine.runtime import start_run
from engine.slicewise import num_outputs, validate_volumes
from engine.train import train_one_epoch
from engine.volumes import prepare_volumes
from losses import build_loss
from models import UNet


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
        data_dir = make_phantom(Path(config.cache_dir) / "synthetic") if config.data_dir is None else config.data_dir
        dataset, plan, entry, train_ids, val_ids = prepare_volumes(
            data_dir, config.cache_dir, logger, val_fraction=config.val_fraction, split_seed=config.split_seed,
            fold=config.fold, patient_pattern=config.patient_pattern, splits_file=config.splits_file,
            spacing=config.spacing, hu_window=hu_window, workers=config.workers, resume=resume)
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
