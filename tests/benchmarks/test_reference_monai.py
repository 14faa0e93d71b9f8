"""The MONAI reference on tiny phantoms: it runs in 3D and 2D, writes the recipes' metric keys for the
recipe's validation cases, and repeats exactly for a seed. The runs need MONAI (benchmarks only) and
are skipped without it; the flag checks do not."""

import json

import numpy as np
import pytest
import torch

import train_atrium
import train_liver3d
from benchmarks import reference_monai
from data.preprocess import load_preprocessed_case
from data.synthetic.heart import ensure_heart_phantom
from data.synthetic.liver import ensure_liver_phantom
from engine.logging import RunLogger


@pytest.fixture(autouse=True)
def narrow_network(monkeypatch):
    """The tutorial's widths (16-256) take seconds a step on a CPU; these runs test the plumbing."""
    monkeypatch.setattr(reference_monai, "FEATURES", (4, 4, 8, 8, 16, 4))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(data_dir, cache_dir, out, *flags):
    return reference_monai.main(["--data-dir", str(data_dir), "--steps", "2", "--workers", "0",
                                 "--cache-dir", str(cache_dir), "--out", str(out), *flags])


def test_3d_reference_scores_the_recipes_validation_cases_and_repeats(tmp_path, cache_dir):
    pytest.importorskip("monai")
    data_dir = ensure_liver_phantom(cache_dir / "synthetic", num_cases=5, matrix=24)
    first = run(data_dir, cache_dir, tmp_path / "first", "--patch-size", "32", "--batch-size", "1", "--workers", "1")
    again = run(data_dir, cache_dir, tmp_path / "again", "--patch-size", "32", "--batch-size", "1", "--workers", "1")
    assert set(first) == {"dice_liver", "dice_cancer", "dice_mean", "hd95_liver", "hd95_cancer", "nsd_liver",
                          "nsd_cancer"}
    assert all(0 <= first[key] <= 1 for key in ("dice_liver", "dice_cancer", "dice_mean", "nsd_liver", "nsd_cancer"))
    assert json.loads((tmp_path / "first" / "metrics.json").read_text()) == first
    summary = json.loads((tmp_path / "first" / "summary.json").read_text())
    assert again == first and json.loads((tmp_path / "again" / "summary.json").read_text())["final_loss"] == \
        summary["final_loss"]
    assert (summary["steps"], summary["batch_size"]) == (2, 1)
    # The recipe's own data preparation on the same folder validates on the same cases.
    recipe = train_liver3d.Config(data_dir=str(data_dir), cache_dir=str(cache_dir), workers=0)
    *_, train_ids, val_ids = train_liver3d.prepare_data(recipe, RunLogger(tmp_path / "log", active=False))
    assert (summary["train_cases"], summary["validation_cases"]) == (train_ids, val_ids)
    rows = (tmp_path / "first" / "dice_per_case.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == val_ids


def test_3d_reference_keeps_its_weights_and_scores_the_largest_piece_too(tmp_path, cache_dir, monkeypatch):
    """The weights are on disk before validation starts; summary.json adds the Dice of the same
    predictions with the recipes' post-processing. Each prediction here is the case's own label plus a
    one-voxel island in a background corner: Dice below 1 as predicted, exactly 1 with the piece kept."""
    pytest.importorskip("monai")
    data_dir = ensure_liver_phantom(cache_dir / "synthetic", num_cases=5, matrix=24)
    cases = []

    def load_and_remember(entry, case_id):
        cases.append(load_preprocessed_case(entry, case_id))
        return cases[-1]

    def label_with_an_island(model, image, **_):
        assert (tmp_path / "run" / "model.pt").is_file()  # saved before validation
        prediction = np.array(cases[-1].label, dtype=np.uint8)
        corner = tuple(0 if prediction[0, 0, 0] == 0 else -1 for _ in range(3))
        assert prediction[corner] == 0 and prediction.max() > 0
        prediction[corner] = 1
        return prediction

    monkeypatch.setattr(reference_monai, "load_preprocessed_case", load_and_remember)
    monkeypatch.setattr(reference_monai, "predict_case", label_with_an_island)
    metrics = run(data_dir, cache_dir, tmp_path / "run", "--patch-size", "32", "--batch-size", "1")
    kept = json.loads((tmp_path / "run" / "summary.json").read_text())["largest_piece_kept"]
    assert set(kept) == {"dice_liver", "dice_cancer", "dice_mean"}
    assert metrics["dice_liver"] < 1 and kept["dice_liver"] == 1.0
    model = reference_monai.build_model(reference_monai.parse_args(["--data-dir", str(data_dir)]), 1, 3)
    model.load_state_dict(torch.load(tmp_path / "run" / "model.pt", weights_only=True))


def test_2d_reference_on_slices(tmp_path, cache_dir):
    pytest.importorskip("monai")
    data_dir = ensure_heart_phantom(cache_dir / "synthetic", num_cases=5, matrix=24)
    # 48 > the 24-pixel slices: every slice is padded to the window, as the recipes pad.
    metrics = run(data_dir, cache_dir, tmp_path / "run", "--spatial-dims", "2", "--image-size", "48",
                  "--batch-size", "3")
    assert set(metrics) == {"dice_left_atrium", "dice_mean", "hd95_left_atrium", "nsd_left_atrium"}
    assert 0 <= metrics["dice_left_atrium"] <= 1 and metrics["dice_mean"] == metrics["dice_left_atrium"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["image_size"] == [48, 48]


@pytest.mark.parametrize("flags, message", [
    (["--steps", "3"], "--data-dir is required"),
    (["--data-dir", "/d", "--patch-size", "24"], "--patch-size 24,24,24: BasicUNet halves every axis 4 times"),
    (["--data-dir", "/d", "--patch-size", "16,32"], "give 3 sizes"),
    (["--data-dir", "/d", "--spatial-dims", "2", "--image-size", "40"], "--image-size 40,40"),
    (["--data-dir", "/d", "--spatial-dims", "1"], "--spatial-dims 1: choose 3"),
    (["--data-dir", "/d", "--steps", "0"], "--steps 0"),
])
def test_flags_the_reference_refuses(flags, message):
    with pytest.raises(SystemExit, match=message):
        reference_monai.parse_args(flags)


def test_batch_size_defaults_to_the_recipes():
    three, two = (reference_monai.parse_args(["--data-dir", "/d", "--spatial-dims", dims]) for dims in ("3", "2"))
    assert reference_monai.batch_size(three) == train_liver3d.Config.batch_size
    assert reference_monai.batch_size(two) == train_atrium.Config.batch_size
