"""Checkpoints: one dict of tensors and plain Python values, written atomically, loaded safely.

A checkpoint holds everything inference needs without the training data (config, preprocessing plan,
label names) and everything training needs to continue as if never stopped (optimizer, scaler,
scheduler, epoch, RNG states). Only tensors and plain types are stored, so it loads with
``torch.load(..., weights_only=True)``, which cannot run code hidden in a file.
"""

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` so that a crash at any moment leaves either the previous file or
    the new one, never a half-written one: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint``; restores nothing by itself."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint. Pass RUN/last.pt or RUN/best.pt "
                                "of an existing run folder.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated files raise from deep inside the zip reader
        raise ValueError(f"{path}: cannot read the checkpoint ({type(error).__name__}: {error}). "
                         "It is not a checkpoint of this codebase or it is damaged.") from None


def training_state(model, optimizer, scheduler, scaler, *, epoch: int, best_metric: float, **inference) -> dict:
    """The checkpoint dict of a training run at the end of ``epoch``. ``model`` is the plain model
    (not its compiled or DDP wrapper, whose keys carry prefixes); ``inference`` holds what predicting
    needs without the training data (config, preprocessing plan, label names, task)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "best_metric": best_metric, "rng": capture_rng_state(),
            **inference}


def resume_training(path: Path, model, optimizer, scheduler, scaler) -> tuple[int, float]:
    """Load every state that shapes the following steps from a ``training_state`` checkpoint into
    the given objects and the global RNGs; returns (first epoch to train, best metric so far).

    The file is read into host memory whatever the training device: the RNG states must stay CPU
    tensors (``torch.set_rng_state`` and NumPy refuse GPU tensors), and ``load_state_dict`` of the
    model and of the optimizer copies each tensor onto the device of the parameter it belongs to.
    """
    checkpoint = load_checkpoint(path, map_location="cpu")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(checkpoint["rng"])
    return checkpoint["epoch"] + 1, checkpoint["best_metric"]


def capture_rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and lists (``weights_only``-safe)."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    state = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
