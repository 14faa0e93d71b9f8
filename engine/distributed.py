"""Several processes training one model with PyTorch's DistributedDataParallel, launched by torchrun.

    torchrun --nproc-per-node 4 train_liver3d.py --data-dir /data/Task03_Liver --patch-size 128 --amp
    torchrun --nproc-per-node 2 train_liver3d.py --device cpu        # gloo on the CPU, e.g. to test

torchrun starts one process per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE; without it the
recipes run as one process and nothing here does anything. Each process draws its own share of every
epoch's samples (the samplers shard one seeded draw into the same number of full batches per process),
`--batch-size` is per process (the global batch is world size x batch size), DDP averages the
gradients, and rank 0 alone validates, logs and writes checkpoints, which hold the plain model and
load without DDP. Every collective must be called as often on every rank: a decision that skips
one (a step with a NaN loss) is taken by all ranks together (`true_on_every_rank`).
"""

import datetime
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

# Rank 0 validates while the others wait at the next gradient all-reduce (or, after the last epoch, at
# cleanup_distributed's barrier); a whole-volume validation of a large task takes far longer than the
# default 10-30 minute collective timeout.
TIMEOUT = datetime.timedelta(hours=3)


def setup_distributed(device_name: str) -> tuple[int, int, str]:
    """Join the torchrun process group when there is one.

    Args:
        device_name: the recipe's ``--device``.

    Returns:
        (rank, world size, device name for this process): ``cuda:LOCAL_RANK`` with NCCL when CUDA is
        used, else the CPU with gloo; (0, 1, device_name) when not launched by torchrun.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device_name
    if not dist.is_initialized():
        local_rank = int(os.environ["LOCAL_RANK"])
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT,
                                device_id=torch.device("cuda", local_rank) if use_cuda else None)
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    return dist.get_rank(), dist.get_world_size(), device


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world_size()[0] == 0


def true_on_every_rank(flag: torch.Tensor) -> bool:
    """Whether the boolean scalar ``flag`` holds on every process: one all-reduce (MIN) under
    torchrun, the flag itself otherwise. A decision that changes which collectives follow (skip a
    step, stop the run) must be taken this way, or the ranks' gradient all-reduces pair different
    steps and NCCL hangs until the timeout."""
    if rank_and_world_size()[1] == 1:
        return bool(flag)
    flag = flag.to(torch.int32)  # NCCL and gloo reduce integers, not bools
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def barrier() -> None:
    if rank_and_world_size()[1] > 1:
        dist.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. writing the preprocessing cache), the others after it, when
    they find the work done."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def cleanup_distributed() -> None:
    """The end of a run: every process waits here for all the others, then all leave the process
    group together. Called by every rank after rank 0 has written its results, so no process leaves
    (and exits) while rank 0 still works: torchrun stops the whole group as soon as one process exits
    with an error, and a process that fails on its way out would otherwise cost rank 0 its final
    validation, metrics.json and predictions."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
