"""One torchrun process of a recipe, for the torchrun tests:

    torchrun --nproc-per-node 2 tests/torchrun_recipe.py train_atrium --device cpu --out RUN ...

runs the recipe's main with the given flags. Every process but rank 0 then writes
``rank<R>_found_metrics`` beside the run folder: whether rank 0's metrics.json was already on disk when
the recipe returned on this process (it must be, or a process failing on its way out could have
torchrun stop rank 0 before its results are written). With RANK_WEIGHTS_DIR set, every process also
writes its weights there after every epoch (``rank<R>_epoch<E>.pt``).
"""

import importlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the recipes live at the repository root


def keep_weights_after_every_epoch(recipe, weights_dir: Path) -> None:
    train_one_epoch, epochs = recipe.train_one_epoch, []

    def train_and_keep_weights(model, *args, **kwargs):
        stats = train_one_epoch(model, *args, **kwargs)
        torch.save(model.state_dict(), weights_dir / f"rank{os.environ['RANK']}_epoch{len(epochs)}.pt")
        epochs.append(stats)
        return stats

    recipe.train_one_epoch = train_and_keep_weights


def main(recipe_name: str, argv: list[str]) -> None:
    recipe = importlib.import_module(recipe_name)
    if "RANK_WEIGHTS_DIR" in os.environ:
        keep_weights_after_every_epoch(recipe, Path(os.environ["RANK_WEIGHTS_DIR"]))
    recipe.main(argv)
    rank, out = os.environ["RANK"], Path(argv[argv.index("--out") + 1])
    if rank != "0":
        (out.parent / f"rank{rank}_found_metrics").write_text(str((out / "metrics.json").is_file()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
