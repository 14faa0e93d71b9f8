import math

import pytest
import torch

from engine.train import train_one_epoch


def make_loader(num_batches):
    generator = torch.Generator().manual_seed(0)
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
