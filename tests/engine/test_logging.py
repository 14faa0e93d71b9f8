import json
import math
import re

import numpy as np

from engine.logging import RunLogger


def test_records_are_json_lines_readable_before_close_and_appended_on_resume(tmp_path):
    logger = RunLogger(tmp_path / "run")
    logger.record({"epoch": 0, "loss": 0.5})
    # Flushed at once: a run killed now keeps this line.
    assert (tmp_path / "run" / "log.jsonl").read_text() == '{"epoch": 0, "loss": 0.5}\n'
    logger.close()
    resumed = RunLogger(tmp_path / "run")
    resumed.record({"epoch": 1, "loss": 0.25})
    resumed.close()
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"epoch": 0, "loss": 0.5}, {"epoch": 1, "loss": 0.25}]


def test_scalars_go_to_tensorboard_under_the_prefix_skipping_what_is_not_a_finite_number(tmp_path, monkeypatch):
    logger = RunLogger(tmp_path)
    written = []
    monkeypatch.setattr(logger.writer, "add_scalar", lambda tag, value, step: written.append((tag, value, step)))
    logger.scalars({"loss": 0.5, "steps": 4, "hd95": math.inf, "dice": math.nan, "case": "liver_1"}, 3,
                   prefix="train/")
    logger.close()
    assert written == [("train/loss", 0.5, 3), ("train/steps", 4, 3)]
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_info_prints_one_time_stamped_line(tmp_path, capsys):
    logger = RunLogger(tmp_path)
    logger.info("epoch 1/2: loss 0.5")
    logger.close()
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] epoch 1/2: loss 0\.5\n", capsys.readouterr().out)


def test_an_inactive_logger_writes_and_prints_nothing(tmp_path, capsys):
    logger = RunLogger(tmp_path / "rank1", active=False)
    logger.info("hello")
    logger.scalars({"loss": 0.5}, 0)
    logger.image("val/case", np.zeros((4, 4, 3), np.uint8), 0)
    logger.record({"epoch": 0})
    logger.close()
    assert not (tmp_path / "rank1").exists() and capsys.readouterr().out == ""
