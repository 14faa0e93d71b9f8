import datetime
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from engine.train import train_one_epoch

ROOT = Path(__file__).resolve().parents[2]


def make_loader(num_batches, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(2, 1, 5, 7, generator=generator),
             "label": torch.randint(0, 2, (2, 5, 7), generator=generator)} for _ in range(num_batches)]


def run_epoch(loss_fn, loader, clip=None):
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 2, 3, padding=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = train_one_epoch(model, loader, loss_fn, optimizer, scheduler=scheduler, scaler=scaler,
                            device=torch.device("cpu"), amp_dtype=None, grad_clip=clip, progress=False)
    return model, stats


def test_steps_match_a_hand_written_loop():
    loader = make_loader(3)
    model, stats = run_epoch(torch.nn.functional.cross_entropy, loader)

    torch.manual_seed(0)
    reference = torch.nn.Conv2d(1, 2, 3, padding=1)
    losses = []
    for step, batch in enumerate(loader):
        loss = torch.nn.functional.cross_entropy(reference(batch["image"]), batch["label"])
        reference.zero_grad()
        loss.backward()
        with torch.no_grad():
            for parameter in reference.parameters():
                parameter -= 0.1 * 0.5 ** step * parameter.grad
        losses.append(loss.item())
    assert torch.allclose(model.weight, reference.weight, atol=1e-6)
    assert math.isclose(stats["loss"], sum(losses) / 3, rel_tol=1e-6)
    assert stats["steps"] == 3 and stats["nonfinite_steps"] == 0
    assert math.isclose(stats["lr"], 0.1 * 0.5 ** 3)
    assert 0 <= stats["data_wait_fraction"] <= 1


def test_a_nonfinite_loss_skips_its_step_and_is_counted():
    calls = []

    def sometimes_nan(output, label):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(output, label)
        return loss * math.nan if len(calls) == 2 else loss

    model, stats = run_epoch(sometimes_nan, make_loader(3))
    assert stats["nonfinite_steps"] == 1 and stats["steps"] == 3
    assert torch.isfinite(model.weight).all() and math.isfinite(stats["loss"])


@pytest.mark.filterwarnings("ignore:Detected call of")  # no optimizer step ever succeeds here
def test_a_run_of_nonfinite_losses_stops_with_advice_but_a_broken_run_does_not():
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model = torch.nn.Conv2d(1, 2, 3, padding=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def epoch(loss_fn, num_batches):
        return train_one_epoch(model, make_loader(num_batches), loss_fn, optimizer, scheduler=scheduler,
                               scaler=scaler, device=torch.device("cpu"), amp_dtype=None, grad_clip=None,
                               progress=False, max_nonfinite_in_a_row=3)

    def always_nan(output, label):
        return torch.nn.functional.cross_entropy(output, label) * math.nan

    def alternating(output, label):
        alternating.calls += 1
        loss = torch.nn.functional.cross_entropy(output, label)
        return loss * math.nan if alternating.calls % 3 else loss  # two bad, one good, ...

    alternating.calls = 0
    assert epoch(alternating, 9)["nonfinite_steps"] == 6  # never three in a row: the run goes on
    with pytest.raises(SystemExit, match="NaN or infinite for 3 steps in a row.*--lr"):
        epoch(always_nan, 5)


def test_out_of_memory_names_the_settings_to_lower():
    class Exhausted(torch.nn.Module):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = torch.nn.Conv2d(1, 2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(SystemExit, match=r"batch of \(2, 1, 5, 7\).*--batch-size.*--amp"):
        train_one_epoch(Exhausted(), make_loader(1), torch.nn.functional.cross_entropy, optimizer,
                        scheduler=scheduler, scaler=torch.amp.GradScaler("cpu", enabled=False),
                        device=torch.device("cpu"), amp_dtype=None, grad_clip=None, progress=False)


def train_under_ddp_with_nan_on_rank_one(rank: int, world_size: int, store: str, out: Path) -> None:
    """One gloo process of ``test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank``: an
    epoch where rank 1 alone sees a NaN loss at step 2, then one where it sees nothing else."""
    # A short timeout: a rank left waiting for a partner fails the test in seconds instead of hanging.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=30))
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Conv2d(1, 2, 3, padding=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    steps = []

    def nan_on_rank_one(at_steps):
        def loss_fn(output, label):
            steps.append(1)
            loss = torch.nn.functional.cross_entropy(output, label)
            return loss * math.nan if rank == 1 and len(steps) in at_steps else loss
        return loss_fn

    def epoch(loss_fn, num_batches, max_nonfinite_in_a_row=20):
        return train_one_epoch(model, make_loader(num_batches, seed=rank), loss_fn, optimizer, scheduler=scheduler,
                               scaler=torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"),
                               amp_dtype=None, grad_clip=1.0, progress=False,
                               max_nonfinite_in_a_row=max_nonfinite_in_a_row)

    stats = epoch(nan_on_rank_one(at_steps={2}), 5)
    weights = {name: value.clone() for name, value in model.module.state_dict().items()}
    steps.clear()
    try:
        epoch(nan_on_rank_one(at_steps=range(3, 100)), 7, max_nonfinite_in_a_row=3)
        stopped = None
    except SystemExit as stop:
        stopped = str(stop)
    torch.save({"stats": stats, "weights": weights, "stopped": stopped}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    # Two gloo processes on the CPU, as torchrun would start them.
    world_size = 2
    command = [sys.executable, __file__, str(world_size), str(tmp_path / "store"), str(tmp_path)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    processes = [subprocess.Popen([*command, str(rank)], cwd=ROOT, env=environment, stderr=subprocess.PIPE, text=True)
                 for rank in range(world_size)]
    try:
        errors = [process.communicate(timeout=120)[1] for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert all(process.returncode == 0 for process in processes), errors
    first, second = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world_size))
    assert first["stats"]["nonfinite_steps"] == second["stats"]["nonfinite_steps"] == 1
    assert first["stats"]["steps"] == second["stats"]["steps"] == 5
    for name, value in first["weights"].items():
        assert torch.equal(value, second["weights"][name]), name
    # Three bad steps in a row on rank 1 alone stop both ranks at the same step.
    assert first["stopped"] == second["stopped"] and "for 3 steps in a row (step 5)" in first["stopped"]


if __name__ == "__main__":  # a process of test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank
    world_size, store, out, rank = sys.argv[1:]
    train_under_ddp_with_nan_on_rank_one(int(rank), int(world_size), store, Path(out))
