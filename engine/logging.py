"""What a run reports: console lines, a JSON-lines log, TensorBoard scalars and images.

Console messages go through ``tqdm.write`` so they never tear a progress bar. The JSON-lines log
(``log.jsonl``, one object per epoch) is the machine-readable record; TensorBoard is for looking.
"""

import json
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm


class RunLogger:
    """Console, ``log.jsonl`` and TensorBoard for one run folder; inactive on non-zero ranks.

    Args:
        run_dir: the run folder (created if missing).
        active: False on every process but rank 0, so only one process writes.
    """

    def __init__(self, run_dir: Path, active: bool = True):
        self.run_dir = Path(run_dir)
        self.active = active
        self.writer = None
        if active:
            from torch.utils.tensorboard import SummaryWriter  # imports TensorBoard only where used

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(self.run_dir))
            self.log_file = open(self.run_dir / "log.jsonl", "a", encoding="utf-8")

    def info(self, message: str) -> None:
        if self.active:
            tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}")

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        if self.active:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}{name}", value, step)

    def image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        if self.active:
            self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def record(self, values: dict) -> None:
        """Append one JSON object to ``log.jsonl`` (flushed, so a crash loses nothing logged)."""
        if self.active:
            self.log_file.write(json.dumps(values) + "\n")
            self.log_file.flush()

    def close(self) -> None:
        if self.active:
            self.writer.close()
            self.log_file.close()
