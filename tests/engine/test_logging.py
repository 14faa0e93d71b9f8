import json
import math
import re

import numpy as np

from engine.logging import RunLogger, foreground_slice_index, overlay_slice


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


def test_overlay_draws_grey_image_green_reference_and_red_prediction_outlines():
    image = np.arange(7 * 8, dtype=np.float32).reshape(7, 8)
    reference = np.zeros((7, 8), np.uint8)
    reference[1:4, 1:4] = 1  # a 3x3 square: its outline is all but the centre
    prediction = np.zeros((7, 8), np.uint8)
    prediction[3:6, 3:7] = 2  # overlaps the reference's corner (3, 3)
    rgb = overlay_slice(image, reference, prediction)
    assert rgb.shape == (7, 8, 3) and rgb.dtype == np.uint8

    green = np.all(rgb == (0, 255, 0), axis=-1)
    red = np.all(rgb == (255, 0, 0), axis=-1)
    expected_green = reference > 0
    expected_green[2, 2] = False
    expected_green[3, 3] = False  # drawn over in red
    np.testing.assert_array_equal(green, expected_green)
    expected_red = prediction > 0
    expected_red[4, 4:6] = False  # the inside of the 3x4 rectangle
    np.testing.assert_array_equal(red, expected_red)

    grey = rgb[~(green | red)]
    assert np.all(grey[:, 0] == grey[:, 1]) and np.all(grey[:, 1] == grey[:, 2])
    # Intensities scale from the 1st to the 99th percentile: the ends saturate.
    assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[6, 7]) == (255, 255, 255)
    low, high = np.percentile(image, [1, 99])
    assert rgb[2, 2, 0] == int((image[2, 2] - low) / (high - low) * 255)


def test_foreground_slice_index_is_the_fullest_axial_slice_or_the_middle():
    labels = np.zeros((7, 5, 6), np.uint8)
    labels[2, 1:3, 1:3] = 1  # 4 voxels
    labels[5, 0:3, 0:3] = 2  # 9 voxels, another class
    assert foreground_slice_index(labels) == 5
    assert foreground_slice_index(np.zeros((7, 5, 6), np.uint8)) == 3
