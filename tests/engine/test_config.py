import dataclasses
import json
from dataclasses import dataclass

import pytest

from engine.config import build_parser, check_sizes, config_from_dict, field_comments, parse_config


@dataclass
class ToyConfig:
    lr: float = 0.01  # initial learning rate
    patch_size: tuple[int, ...] = (64, 64, 64)  # patch size z,y,x
    spacing: tuple[float, ...] | None = None  # target spacing; auto = median
    data_dir: str | None = None  # task folder
    amp: bool = False  # mixed precision
    fold: int | None = None  # validation fold
    foreground_share: float = 0.33  # share of patches on foreground, 33% as nnU-Net


def test_comments_become_help_text():
    assert field_comments(ToyConfig) == {
        "lr": "initial learning rate", "patch_size": "patch size z,y,x",
        "spacing": "target spacing; auto = median", "data_dir": "task folder",
        "amp": "mixed precision", "fold": "validation fold",
        "foreground_share": "share of patches on foreground, 33% as nnU-Net"}
    help_text = build_parser(ToyConfig, "toy").format_help()
    assert "initial learning rate (default: 0.01)" in help_text
    assert "patch size z,y,x (default: 64,64,64)" in help_text
    assert "33% as nnU-Net" in help_text


def test_only_explicit_flags_are_returned_and_parsed_by_type():
    parser = build_parser(ToyConfig, "toy")
    assert vars(parser.parse_args([])) == {}
    flags = vars(parser.parse_args(["--lr", "3e-4", "--patch-size", "32,48,64", "--spacing", "2.5,0.8,0.8",
                                    "--amp", "--fold", "none", "--data-dir", "/data/Task03_Liver"]))
    assert flags == {"lr": 3e-4, "patch_size": (32, 48, 64), "spacing": (2.5, 0.8, 0.8), "amp": True,
                     "fold": None, "data_dir": "/data/Task03_Liver"}
    assert vars(parser.parse_args(["--amp", "false"])) == {"amp": False}


def test_config_from_dict_restores_tuples_and_rejects_unknown_keys():
    saved = dataclasses.asdict(ToyConfig(patch_size=(16, 32, 48)))
    saved["patch_size"] = list(saved["patch_size"])  # as JSON gives it back
    assert config_from_dict(ToyConfig, saved).patch_size == (16, 32, 48)
    with pytest.raises(ValueError, match="unknown configuration keys \\['learning_rate'\\]"):
        config_from_dict(ToyConfig, {"learning_rate": 1.0})


def test_optional_float_fields_parse_none_and_numbers():
    @dataclasses.dataclass
    class Shares:
        share: float | None = 0.5  # share of something; none = off

    parser = build_parser(Shares, "test")
    assert vars(parser.parse_args(["--share", "none"])) == {"share": None}
    assert vars(parser.parse_args(["--share", "0.25"])) == {"share": 0.25}


def test_per_level_tuples_parse_from_semicolons_and_come_back_from_json():
    @dataclasses.dataclass
    class Network:
        strides: tuple[tuple[int, ...], ...] | None = None  # per level z,y,x; auto = planned
        patch_size: tuple[int, ...] | None = None  # patch z,y,x; auto = planned
        depth: int | None = None  # levels; none = planned

    parser = build_parser(Network, "test")
    assert vars(parser.parse_args(["--strides", "1,2,2;2,2,2", "--patch-size", "16,32,32", "--depth", "3"])) == {
        "strides": ((1, 2, 2), (2, 2, 2)), "patch_size": (16, 32, 32), "depth": 3}
    assert vars(parser.parse_args(["--strides", "2,2,2"])) == {"strides": ((2, 2, 2),)}
    assert vars(parser.parse_args(["--strides", "auto", "--patch-size", "auto", "--depth", "auto"])) == {
        "strides": None, "patch_size": None, "depth": None}
    assert "Z,Y,X[;Z,Y,X...]|auto" in parser.format_help()
    restored = config_from_dict(Network, {"strides": [[1, 2, 2], [2, 2, 2]], "patch_size": [16, 32, 32]})
    assert restored.strides == ((1, 2, 2), (2, 2, 2)) and restored.patch_size == (16, 32, 32)


def test_parse_config_precedence_and_single_values_for_tuples(tmp_path):
    from engine.config import parse_config, save_config

    profile = {"lr": 0.5, "patch_size": (8, 8, 8)}
    config, resume = parse_config(ToyConfig, ["--patch-size", "32"], "toy", profile)
    assert (config.lr, config.patch_size, resume) == (0.5, (32, 32, 32), None)  # profile, then the flag
    config, _ = parse_config(ToyConfig, ["--data-dir", "/data"], "toy", profile)
    assert (config.lr, config.patch_size) == (0.01, (64, 64, 64))  # real data: no profile
    save_config(ToyConfig(lr=0.2, fold=3), tmp_path / "config.json")
    config, _ = parse_config(ToyConfig, ["--config", str(tmp_path / "config.json"), "--fold", "1"], "toy", profile)
    assert (config.lr, config.fold) == (0.2, 1)  # the saved file, then the flag


def test_a_config_saved_under_old_field_names_loads_under_the_new_ones(tmp_path):
    import torch

    from engine.config import RENAMED, rename_old_flags, save_config

    old = {"lr": 0.2, "patch": [16, 24, 24], "fg_prob": 0.8, "data_dir": "/data"}  # as an old config.json holds it
    assert set(old) - {"lr", "data_dir"} <= set(RENAMED)
    (tmp_path / "config.json").write_text(json.dumps(old))
    config, _ = parse_config(ToyConfig, ["--config", str(tmp_path / "config.json")], "toy", {})
    assert (config.lr, config.patch_size, config.foreground_share) == (0.2, (16, 24, 24), 0.8)
    torch.save({"config": old, "epoch": 3}, tmp_path / "last.pt")  # an old checkpoint's stored config
    config, resume = parse_config(ToyConfig, ["--resume", str(tmp_path / "last.pt"), "--fg-prob", "0.5"], "toy", {})
    assert (config.patch_size, config.foreground_share, resume) == ((16, 24, 24), 0.5, str(tmp_path / "last.pt"))
    save_config(config, tmp_path / "new.json")  # written again: the new names only
    assert {"patch_size", "foreground_share"} <= set(json.loads((tmp_path / "new.json").read_text()))
    assert not set(RENAMED) & set(json.loads((tmp_path / "new.json").read_text()))
    assert rename_old_flags(["--patch=8", "--keep-largest", "--largest-component", "false", "--lr", "1"]) == [
        "--patch-size=8", "--keep-largest-component", "--keep-largest-component", "false", "--lr", "1"]


def test_sizes_are_one_or_one_per_axis_and_positive():
    for sizes in (None, (32,), (16, 32, 48)):  # planned, a cube, one per axis
        check_sizes("--patch-size", sizes, axes="z,y,x")
    check_sizes("--image-size", (1, 256), axes="H,W")
    for sizes, given in [((16, 24), "16,24"), ((8, 8, 8, 8), "8,8,8,8"), ((0,), "0"), ((32, -1, 32), "32,-1,32")]:
        with pytest.raises(SystemExit) as stop:
            check_sizes("--patch-size", sizes, axes="z,y,x")
        assert str(stop.value) == (f"--patch-size {given}: give 1 or 3 positive integers "
                                   "(z,y,x; one: the same along every axis)")
    with pytest.raises(SystemExit, match=r"^--image-size 24,24,24: give 1 or 2 positive integers \(H,W;"):
        check_sizes("--image-size", (24, 24, 24), axes="H,W")


@dataclass
class RecipeConfig:
    recipe: str = "default"  # named settings
    optimizer: str = "adamw"  # optimizer
    lr: float = 1e-3  # learning rate
    epochs: int = 10  # epochs
    data_dir: str | None = None  # task folder


NNUNET = {"nnunet": {"optimizer": "sgd", "lr": 0.01}}


def test_a_recipe_sets_its_fields_below_explicit_flags_and_above_a_saved_config(tmp_path):
    def parse(*argv, profile=None):
        return parse_config(RecipeConfig, list(argv), "toy", profile or {}, recipes=NNUNET)[0]

    assert parse() == RecipeConfig()
    assert parse("--recipe", "nnunet") == RecipeConfig(recipe="nnunet", optimizer="sgd", lr=0.01)
    assert parse("--recipe", "nnunet", "--lr", "0.02").lr == 0.02  # a flag beats the recipe
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(dataclasses.asdict(RecipeConfig(recipe="nnunet", optimizer="sgd", lr=0.01,
                                                                epochs=3))))
    # Back to the defaults from a saved nnunet run: every field a recipe changes returns, the rest stays.
    assert parse("--config", str(saved), "--recipe", "default") == RecipeConfig(epochs=3)
    # The synthetic profile sits below a recipe.
    assert parse("--recipe", "nnunet", profile={"lr": 5.0, "epochs": 2}) == RecipeConfig(
        recipe="nnunet", optimizer="sgd", lr=0.01, epochs=2)
    with pytest.raises(SystemExit, match="--recipe fast: choose default, nnunet"):
        parse("--recipe", "fast")


def test_an_optional_switch_takes_true_false_or_auto():
    @dataclass
    class Planned:
        keep_largest_component: bool | None = None  # planned when auto

    parser = build_parser(Planned, "toy")
    for argv, value in ((["--keep-largest-component"], True), (["--keep-largest-component", "false"], False),
                        (["--keep-largest-component", "auto"], None)):
        assert vars(parser.parse_args(argv)) == {"keep_largest_component": value}
    assert "BOOL|auto" in parser.format_help()
