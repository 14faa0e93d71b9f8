"""One epoch of training, with the optimizer step in plain sight."""

import math
import time

import torch
from tqdm import tqdm

from engine.distributed import true_on_every_rank


def train_one_epoch(model, loader, loss_fn, optimizer, *, scheduler, scaler, device: torch.device,
                    amp_dtype: torch.dtype | None, grad_clip: float | None,
                    memory_format=torch.contiguous_format, progress: bool = True,
                    description: str = "train", max_nonfinite_in_a_row: int = 20) -> dict:
    """Train ``model`` on every batch of ``loader`` once.

    ``amp_dtype`` is the autocast dtype, None for full precision; ``scaler`` is a GradScaler, enabled
    for fp16 only. The scheduler steps once per iteration (poly and cosine schedules are defined over iterations).
    Losses are accumulated on the device and read back only for the progress bar every few steps,
    so the GPU is not forced to wait for the CPU after each step. A step whose loss is NaN or
    infinite is skipped, under torchrun on every rank when it is so on any rank (the ranks then keep
    identical weights and step counts); ``max_nonfinite_in_a_row`` of them in a row stop the run
    (SystemExit with what to try), and running out of GPU memory stops it with the settings to lower.
    Either way the last completed epoch's checkpoint is untouched.

    Returns:
        dict with ``loss`` (mean over steps), ``lr`` (after the last step), ``steps``, ``samples_per_s``,
        ``data_wait_fraction`` (share of the epoch's wall time spent blocked on the loader) and
        ``nonfinite_steps`` (steps skipped because the loss was NaN or infinite).
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    steps = samples = nonfinite_steps = nonfinite_in_a_row = 0
    data_wait = 0.0
    bar = tqdm(total=len(loader), desc=description, leave=False, disable=not progress, dynamic_ncols=True)
    start = waiting_since = time.perf_counter()
    try:
        for batch in loader:
            data_wait += time.perf_counter() - waiting_since
            image = batch["image"].to(device, non_blocking=True, memory_format=memory_format)  # (B, C, *spatial)
            label = batch["label"].to(device, non_blocking=True)  # (B, *spatial) integer (uint8 masks)

            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(image)
            loss = loss_fn(output, label)  # losses compute in float32 whatever the autocast dtype

            optimizer.zero_grad(set_to_none=True)
            # One bad batch must not poison the weights (the check costs one device sync a step, small
            # beside a 3D U-Net step); many in a row mean the run has diverged. Under DDP every rank
            # skips when any rank's loss is bad, so all ranks keep stepping (and stopping) together.
            if not true_on_every_rank(torch.isfinite(loss)):
                nonfinite_steps += 1
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row >= max_nonfinite_in_a_row:
                    raise SystemExit(
                        f"{description}: the loss was NaN or infinite for {nonfinite_in_a_row} steps in a row (step "
                        f"{steps + 1}); the run stops, its last.pt holds the last completed epoch. Try a lower --lr, "
                        f"gradient clipping (--grad-clip), --amp off, or check the inputs for NaN voxels.")
            else:
                nonfinite_in_a_row = 0
                scaler.scale(loss).backward()
                if grad_clip:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach()
            scheduler.step()

            steps += 1
            samples += image.shape[0]
            bar.update()
            if progress and steps % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / max(steps - nonfinite_steps, 1):.4f}")
            waiting_since = time.perf_counter()
    except torch.OutOfMemoryError as error:
        raise SystemExit(f"Out of {device} memory at a batch of {tuple(image.shape)}: lower --batch-size or the "
                         f"patch/image size, use fewer --base-channels, or turn on --amp. ({error})") from error
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    bar.close()

    finite_steps = steps - nonfinite_steps
    return {
        "loss": loss_sum.item() / finite_steps if finite_steps else math.nan,
        "lr": optimizer.param_groups[0]["lr"],
        "steps": steps,
        "samples_per_s": samples / elapsed,
        "data_wait_fraction": data_wait / elapsed,
        "nonfinite_steps": nonfinite_steps,
    }
