"""Throughput of a recipe's training step on its own data and model: `--benchmark N` in every script.

The first step is timed apart, since it pays for torch.compile, cuDNN autotuning and the workers'
start; the N steps after it give steps/s, samples/s and the share of time spent waiting on the loader.
Nothing is validated or checkpointed.
"""

import json
import resource
import sys
import time
from pathlib import Path

import torch

from engine.distributed import cleanup_distributed, is_main_process
from engine.logging import RunLogger
from engine.train import train_one_epoch


class StepLoader:
    """The first ``steps`` batches of ``loader``, crossing epochs (``sampler.set_epoch``) when one
    epoch holds fewer; has a length, for the progress bar."""

    def __init__(self, loader, sampler, steps: int):
        self.loader, self.sampler, self.steps = loader, sampler, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        taken, epoch = 0, 0
        while True:
            self.sampler.set_epoch(epoch)
            for batch in self.loader:
                yield batch
                taken += 1
                if taken == self.steps:
                    return
            epoch += 1


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (MB) and, on CUDA, the most memory tensors ever held."""
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    memory = {"peak_rss_mb": rss}
    if device.type == "cuda":
        memory["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory


def benchmark_training(model, loader, sampler, loss_fn, optimizer, *, steps: int, scheduler, scaler,
                       device: torch.device, amp_dtype: torch.dtype | None, grad_clip: float | None,
                       memory_format, out: Path, logger: RunLogger) -> dict:
    """Time one warm-up step, then ``steps`` training steps; log the figures and write
    ``out/benchmark.json``. The run ends here: under torchrun every process then leaves the process
    group (`cleanup_distributed`), as after training, rather than exiting inside it.

    Returns:
        ``steps``, ``first_step_s``, ``steps_per_s``, ``samples_per_s``, ``data_wait_fraction``,
        ``peak_rss_mb`` and on CUDA ``cuda_max_allocated_mb``.
    """
    step_settings = dict(scheduler=scheduler, scaler=scaler, device=device, amp_dtype=amp_dtype,
                         grad_clip=grad_clip, memory_format=memory_format)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    train_one_epoch(model, StepLoader(loader, sampler, 1), loss_fn, optimizer, **step_settings,
                    description="warm-up")
    first_step_s = time.perf_counter() - started
    started = time.perf_counter()
    timed = train_one_epoch(model, StepLoader(loader, sampler, steps), loss_fn, optimizer, **step_settings,
                            description="benchmark")
    results = {
        "steps": steps,
        "first_step_s": first_step_s,
        "steps_per_s": steps / (time.perf_counter() - started),
        "samples_per_s": timed["samples_per_s"],
        "data_wait_fraction": timed["data_wait_fraction"],
        **peak_memory_mb(device),
    }
    if is_main_process():  # under torchrun each rank times its own steps; rank 0 reports
        (out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    logger.info(
        f"benchmark on {device}: {steps} steps, {results['steps_per_s']:.3f} steps/s, "
        f"{results['samples_per_s']:.2f} samples/s, data wait {100 * results['data_wait_fraction']:.1f}%, "
        f"first step (compile, workers) {results['first_step_s']:.1f} s, peak RSS {results['peak_rss_mb']:.0f} MB"
        + (f", CUDA max allocated {results['cuda_max_allocated_mb']:.0f} MB" if device.type == "cuda" else ""))
    cleanup_distributed()
    return results
