"""Command-line configuration built from a recipe's ``@dataclass``.

Every recipe keeps its settings in one dataclass whose fields carry a trailing comment. That comment is
the field's ``--help`` text, so the documentation a researcher reads in the script and on the command
line is the same sentence.

Precedence, lowest first: the dataclass defaults, a profile of overrides chosen by the recipe (e.g. a
CPU-sized recipe for the synthetic data), a saved ``config.json`` (``--config``) or the config stored in a
checkpoint (``--resume``), and last the flags given explicitly on the command line.

Settings renamed since a run was saved keep loading: ``RENAMED`` maps each old field name to its new
one, for a saved ``config.json``, a checkpoint's config and the old spelling of a flag alike.
"""

import argparse
import dataclasses
import inspect
import json
import re
import typing
from pathlib import Path

# Old config field -> its name now. Runs saved before a rename (config.json, the "config" of every
# checkpoint) and commands written with the old flag (--fg-prob) read as the new name.
RENAMED = {
    "patch": "patch_size",
    "fg_prob": "foreground_share",
    "fg_sampling": "foreground_sampling",
    "keep_largest": "keep_largest_component",  # train_liver3d.py
    "largest_component": "keep_largest_component",  # train_atrium.py, train_lung.py
}


def rename_old_keys(values: dict) -> dict:
    """A saved config dict with each old field name of ``RENAMED`` replaced by the current one."""
    return {RENAMED.get(key, key): value for key, value in values.items()}


def rename_old_flags(argv: list[str]) -> list[str]:
    """``--fg-prob 0.5`` -> ``--foreground-share 0.5`` (also ``--fg-prob=0.5``) for every old name of
    ``RENAMED``; other arguments are returned unchanged."""
    renamed = []
    for argument in argv:
        flag, equals, value = argument.partition("=")
        old = flag[2:].replace("-", "_") if flag.startswith("--") else None
        if old in RENAMED:
            argument = "--" + RENAMED[old].replace("_", "-") + equals + value
        renamed.append(argument)
    return renamed


_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def field_comments(config_class: type) -> dict[str, str]:
    """The trailing comment of each field in the source of ``config_class``."""
    comments = {}
    for line in inspect.getsource(config_class).splitlines():
        match = _FIELD_COMMENT.match(line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _parse_optional_floats(text: str) -> tuple[float, ...] | None:
    return None if text.lower() in ("none", "auto") else tuple(float(v) for v in text.split(","))


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _parse_optional_ints(text: str) -> tuple[int, ...] | None:
    return None if text.lower() in ("none", "auto") else _parse_ints(text)


def _parse_optional_int_tuples(text: str) -> tuple[tuple[int, ...], ...] | None:
    """``1,2,2;2,2,2`` -> ((1, 2, 2), (2, 2, 2)): one tuple per level, axes separated by commas."""
    return None if text.lower() in ("none", "auto") else tuple(_parse_ints(part) for part in text.split(";"))


def _parse_optional_str(text: str) -> str | None:
    return None if text.lower() == "none" else text


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "auto") else int(text)


def _parse_optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_optional_bool(text: str) -> bool | None:
    return None if text.lower() in ("none", "auto") else parse_bool(text)


# How a field's annotation turns into an argparse ``type`` and a value hint for --help.
_PARSERS = {
    int: (int, "INT"),
    float: (float, "FLOAT"),
    str: (str, "TEXT"),
    int | None: (_parse_optional_int, "INT|none"),
    float | None: (_parse_optional_float, "FLOAT|none"),
    str | None: (_parse_optional_str, "TEXT|none"),
    tuple[int, ...]: (_parse_ints, "N[,N,N]"),
    tuple[int, ...] | None: (_parse_optional_ints, "N[,N,N]|auto"),
    tuple[tuple[int, ...], ...] | None: (_parse_optional_int_tuples, "Z,Y,X[;Z,Y,X...]|auto"),
    tuple[float, ...] | None: (_parse_optional_floats, "Z,Y,X|auto"),
}


def build_parser(config_class: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field; defaults are left out so that
    ``parse_args`` returns only the flags that were given (they override saved configs)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)
    comments = field_comments(config_class)
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        # argparse expands %-formats in help strings; a comment such as "80% of patches" must stay text.
        help_text = f"{comments.get(field.name, '')} (default: {_format_default(field)})".replace("%", "%%")
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation):
            continue  # a group of settings (e.g. augmentation): edited in config.json, passed with --config
        if annotation is bool or annotation == bool | None:
            # `--amp` switches on, `--amp false` switches off again (useful over a saved config);
            # an optional one also takes `auto` (planned).
            optional = annotation != bool
            parser.add_argument(flag, dest=field.name, nargs="?", const=True,
                                type=_parse_optional_bool if optional else parse_bool,
                                metavar="BOOL|auto" if optional else "BOOL", help=help_text)
        else:
            parse, metavar = _PARSERS[annotation]
            parser.add_argument(flag, dest=field.name, type=parse, metavar=metavar, help=help_text)
    return parser


def _format_default(field: dataclasses.Field) -> str:
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def config_from_dict(config_class: type, values: dict):
    """Build ``config_class`` from a plain dict (as JSON gives it back): lists become tuples, dicts
    of a nested dataclass field become that dataclass, and a key the class does not know (a config
    saved by another version of the script) is named in the error."""
    hints = typing.get_type_hints(config_class)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown configuration keys {unknown}; known keys are {sorted(hints)}")
    converted = {}
    for key, value in values.items():
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value = config_from_dict(hints[key], value)
        elif isinstance(value, list):
            value = _to_tuples(value)
        converted[key] = value
    return config_class(**converted)


def _to_tuples(value):
    """JSON lists back to tuples, nested ones too (per-level strides)."""
    return tuple(_to_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def parse_config(config_class: type, argv: list[str], description: str, synthetic_profile: dict, *,
                 recipes: dict[str, dict] | None = None):
    """Parse a recipe's command line into ``(config, resume_path)``.

    Precedence, lowest first: the dataclass defaults; ``synthetic_profile`` when no ``--data-dir`` is
    given; a saved ``--config`` file, or the config inside the ``--resume`` checkpoint; the settings of
    a ``--recipe`` given on the command line (``recipes[name]``; the dataclass defaults of the same
    fields for a name ``recipes`` does not hold, e.g. ``default``); the other flags given explicitly. A
    single number for a tuple field whose default has several (``--image-size 256``, or a saved
    ``"image_size": 256``) is repeated to that length.
    """
    parser = build_parser(config_class, description)
    parser.add_argument("--config", help="start from a saved RUN/config.json; explicit flags override it")
    parser.add_argument("--resume", help="continue from RUN/last.pt with its config; explicit flags "
                                         "(e.g. --epochs) override it")
    flags = vars(parser.parse_args(rename_old_flags(argv)))
    config_file, resume = flags.pop("config", None), flags.pop("resume", None)
    if resume:
        from engine.checkpoint import load_checkpoint  # checkpoints need torch; configs do not

        values = rename_old_keys(load_checkpoint(resume)["config"])
    elif config_file:
        values = rename_old_keys(read_config_file(config_file))
    else:
        values = dict(synthetic_profile) if flags.get("data_dir") is None else {}
    defaults = {field.name: field.default for field in dataclasses.fields(config_class)}
    if recipes and "recipe" in flags:
        values.update(recipe_settings(recipes, flags["recipe"], defaults))
    values.update(flags)
    for name, value in values.items():
        default = defaults.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and isinstance(default, tuple):
            value = values[name] = (value,)  # a size saved as one int (train_pneumonia.py's image_size once was)
        if isinstance(value, (tuple, list)) and len(value) == 1 and isinstance(default, tuple) and len(default) > 1:
            values[name] = tuple(value) * len(default)
    return config_from_dict(config_class, values), resume


def check_sizes(flag: str, sizes: tuple[int, ...] | None, axes: str) -> None:
    """Stop unless ``sizes`` holds one positive int (the same along every axis) or one per axis of
    ``axes`` (e.g. ``"z,y,x"``); None (planned later) passes. Checked right after parsing: a patch
    with two sizes for a 3D network would otherwise fail deep inside augmentation."""
    if sizes is None:
        return
    count = len(axes.split(","))
    if len(sizes) not in (1, count) or min(sizes) < 1:
        raise SystemExit(f"{flag} {','.join(str(size) for size in sizes)}: give 1 or {count} positive integers "
                         f"({axes}; one: the same along every axis)")


def recipe_settings(recipes: dict[str, dict], name: str, defaults: dict) -> dict:
    """The fields a named recipe sets: ``recipes[name]``, or for the recipe of the dataclass defaults
    those defaults of every field some recipe changes, so switching back is complete."""
    if name in recipes:
        return dict(recipes[name])
    if name != defaults.get("recipe"):
        raise SystemExit(f"--recipe {name}: choose {', '.join([defaults.get('recipe'), *recipes])}")
    return {key: defaults[key] for settings in recipes.values() for key in settings}


def read_config_file(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"{path}: cannot read the configuration ({error}). "
                         "Pass the config.json written into a run folder.") from None


def save_config(config, path: Path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
