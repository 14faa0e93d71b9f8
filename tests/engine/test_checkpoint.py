import random

import numpy as np
import pytest
import torch

from engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    resume_training,
    save_checkpoint,
    training_state,
)


def test_round_trip_loads_with_weights_only(tmp_path):
    model = torch.nn.Conv3d(1, 2, 3)
    state = {"model": model.state_dict(), "epoch": 7, "config": {"patch_size": [8, 8, 8], "amp": False},
             "rng": capture_rng_state()}
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["epoch"] == 7 and loaded["config"]["patch_size"] == [8, 8, 8]
    assert torch.equal(loaded["model"]["weight"], model.weight.detach())
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path / "last.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"epoch": 2, "bad": Unpicklable()}, tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_damaged_checkpoint_names_the_file(tmp_path):
    save_checkpoint({"weights": torch.randn(1000)}, tmp_path / "last.pt")
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt: cannot read the checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_survives_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # meta weights hold no values
def test_resume_onto_another_device_restores_the_rng_streams_and_moves_optimizer_state(tmp_path):
    # "meta" stands in for a GPU: parameters live off the host, so a checkpoint loaded onto their
    # device would put the RNG states there too, where torch.set_rng_state and NumPy refuse them.
    def training_objects(device):
        torch.manual_seed(0)
        model = torch.nn.Conv3d(1, 3, 3).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
        return model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)

    model, optimizer, scheduler, scaler = training_objects("cpu")
    model(torch.randn(2, 1, 5, 7, 9)).sum().backward()
    optimizer.step()
    scheduler.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = training_state(model, optimizer, scheduler, scaler, epoch=4, best_metric=0.25)
    save_checkpoint(state, tmp_path / "last.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    model, optimizer, scheduler, scaler = training_objects("meta")
    assert resume_training(tmp_path / "last.pt", model, optimizer, scheduler, scaler) == (5, 0.25)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    state = optimizer.state[model.weight]
    assert state["exp_avg"].device.type == state["exp_avg_sq"].device.type == "meta"  # beside its parameter
    assert scheduler.last_epoch == 1 and optimizer.param_groups[0]["lr"] == 0.05
