"""One process, as every recipe runs without torchrun: the helpers answer for a world of one and
call no collective."""

import datetime

import pytest
import torch
import torch.distributed as dist

from engine.distributed import barrier, cleanup_distributed, is_main_process, main_process_first, \
    rank_and_world_size, setup_distributed, true_on_every_rank


@pytest.fixture
def no_collectives(monkeypatch):
    """Fail any collective: with one process none may be called."""
    def refuse(*args, **kwargs):
        raise AssertionError("a collective was called in a world of one process")

    monkeypatch.setattr(dist, "all_reduce", refuse)
    monkeypatch.setattr(dist, "barrier", refuse)


def test_without_torchrun_nothing_is_joined(monkeypatch, no_collectives):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert setup_distributed("auto") == (0, 1, "auto")  # the device is left to the recipe's choice
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert setup_distributed("cuda:1") == (0, 1, "cuda:1")
    assert not dist.is_initialized()
    assert rank_and_world_size() == (0, 1) and is_main_process()
    cleanup_distributed()  # nothing to destroy


def test_helpers_in_a_world_of_one_return_at_once(no_collectives):
    assert true_on_every_rank(torch.tensor(True)) is True
    assert true_on_every_rank(torch.tensor(False)) is False
    barrier()
    ran = []
    with main_process_first():
        ran.append(True)
    assert ran == [True]


def test_a_one_process_gloo_group_is_rank_zero_of_one_and_is_destroyed(tmp_path, no_collectives):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        assert rank_and_world_size() == (0, 1) and is_main_process()
        assert true_on_every_rank(torch.tensor(False)) is False
        with main_process_first():
            barrier()
    finally:
        cleanup_distributed()
    assert not dist.is_initialized()
