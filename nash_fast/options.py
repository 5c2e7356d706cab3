"""The option machinery of the command-line programs (train, self-play): options declared as dataclass fields,
one converter per option shared by its flag and its YAML key, on/off options spelled the same everywhere, the
YAML reader, and the rule for which options a resumed run may change.

    @dataclass
    class Config:
        lr: float | None = option(None, "Learning rate.")         # --lr; YAML key lr; `--lr 5e-7`, `lr: 5e-7`
    add_field_option(parser, field, [flag(field.name)])           # its argparse option (bool: --x, --x BOOL, --no-x)
    data = read_yaml_mapping(path)                                # every scalar as its text; a repeated key refused
    changed_options(saved, current, may_change)                   # "--beta 0.1 -> 0.2" or "" (a resume may go on)

A value given as a flag and the same text given as a YAML value become the same option value: both go through
the converters here (YAML 1.1 would read 5e-7 as a string; here it is the number). Standard library only
(PyYAML imported when a YAML file is read).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import field
from pathlib import Path
from typing import Iterable


def option(default, help, **extra):
    """A config field: its default and --help text (extra: choices=...)."""
    return field(default=default, metadata=dict(help=help, **extra))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def base_type(annotation) -> tuple[type, bool]:
    """'int | None' -> (int, True); 'str' -> (str, False): a string annotation (modules with __future__
    annotations) or the type itself (int, int | None)."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    base = next(p for p in parts if p != "None")
    return {"int": int, "float": float, "str": str, "bool": bool}[base], optional


def join_problems(problems: list[str]) -> str:
    """One line for one or several problems (each names its option)."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems with the options: " + "; ".join(problems)


# ------------------------------------------------------------------------------------------------ parsing
# A value given as a flag and the same text given as a YAML value become the same option value: both go
# through the converters below (the YAML file is read with every scalar kept as its text).

def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_YAML_FLOATS = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}


def parse_float(text: str) -> float:
    """A number as people write it: 5e-7, 5.0e-7, 1E-3, .5, 3, 1_000.5 (Python's syntax; YAML 1.1 would read
    5e-7 as a string) and YAML's .inf / .nan spellings (refused later as not finite, with the option named)."""
    stripped = text.strip()
    if stripped.lower() in _YAML_FLOATS:
        return _YAML_FLOATS[stripped.lower()]
    return float(stripped)


def parse_int(text: str) -> int:
    """An integer as people write it: 1000, 1_000, and 1e3 or 1000.0 (a number with an integer value); 2.5 is
    refused."""
    try:
        return int(text.strip())
    except ValueError:
        value = parse_float(text)
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise ValueError(f"not an integer: {text!r}") from None


parse_float.__name__, parse_int.__name__ = "float", "int"  # argparse's "invalid float value: ..." messages


def none_or(convert):
    def parse(text: str):
        if text.strip().lower() in ("none", "null", "~", ""):
            return None
        return convert(text)
    parse.__name__ = convert.__name__
    return parse


def option_converter(f: dataclasses.Field):
    """text -> value of option `f`, shared by the flag and the YAML key."""
    base, optional = base_type(f.type)
    convert = {bool: parse_bool, int: parse_int, float: parse_float, str: str}[base]
    return none_or(convert) if optional else convert


def add_bool_option(parser: argparse.ArgumentParser, names: list[str], *, dest: str, help: str,
                    convert=parse_bool, **kwargs) -> None:
    """An on/off option, the same in every nash_fast CLI (train, selfplay): `--plot` alone means true, `--plot BOOL`
    (or --plot=BOOL) takes true/false, yes/no, on/off, 1/0 as the YAML key does, and `--no-plot` means false.
    names: the option's spellings (e.g. ["--progress-bar", "--progress_bar"]); each gets its --no- form."""
    parser.add_argument(*names, dest=dest, nargs="?", const=True, type=convert, metavar="BOOL",
                        help=f"{help}; '{names[0]}' alone means true, '--no-{names[0][2:]}' false", **kwargs)
    negated = ["--no-" + name[2:] if "-" in name[2:] or "_" not in name[2:] else "--no_" + name[2:] for name in names]
    parser.add_argument(*negated, dest=dest, action="store_const", const=False, help=argparse.SUPPRESS, **kwargs)


def add_field_option(parser: argparse.ArgumentParser, f: dataclasses.Field, names: list[str], *, help: str,
                     **kwargs) -> None:
    """The argparse option of dataclass field `f` under `names`: an on/off option for a bool, else a value read by
    option_converter (its metavar the type's name unless the field has choices)."""
    base, _ = base_type(f.type)
    if base is bool:
        add_bool_option(parser, names, dest=f.name, help=help, convert=option_converter(f), **kwargs)
    else:
        parser.add_argument(*names, dest=f.name, type=option_converter(f), choices=f.metadata.get("choices"),
                            metavar=base.__name__.upper() if "choices" not in f.metadata else None, help=help,
                            **kwargs)


def help_with_default(f: dataclasses.Field) -> str:
    """The field's help text, with its default appended unless the text already says it."""
    text = f.metadata["help"]
    return text if "default" in text.lower() else text + f" (default: {f.default!r})"


# ------------------------------------------------------------------------------------------------ YAML

def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.BaseLoader):
        """BaseLoader (every scalar stays text), except that a key given twice in one mapping is an error
        (PyYAML keeps the last one silently)."""

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"option {key!r} is given twice (lines {seen[key]} and "
                            f"{key_node.start_mark.line + 1})", key_node.start_mark)
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: BaseLoader reports it
                    pass
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_yaml_mapping(path: str | os.PathLike, option: str = "--config") -> dict:
    """The YAML file's top-level mapping with every scalar as its text ({} for an empty file); ValueError naming
    `option` for a missing file, bytes that are not UTF-8 (with the line), invalid YAML, a key given twice, or a
    document that is not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{option}: no such file {str(path)!r}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{option} {path}: line {line} is not UTF-8 (byte 0x{raw[error.start]:02x})") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # scalars stay text: converted like flags
    except yaml.YAMLError as error:
        raise ValueError(f"{option} {path}: not valid YAML ({' '.join(str(error).split())})") from None
    if data is None or data == "":
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{option} {path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------ resuming

def changed_options(saved: dict, current: dict, may_change: Iterable[str], *, absent: dict | None = None) -> str:
    """The options a resumed run changed although they decide what is being computed, as
    "--name old -> new, ..." in name order ("" when there are none: the resume may go on). `saved` holds the options the run
    was started with, `current` this invocation's, `may_change` the options a resume may change (execution
    details, or extending the run). An option missing from `saved` (added to the program after the run was
    written) had the value `absent` gives for it then; without one it counts as unchanged."""
    allowed = set(may_change)
    absent = absent or {}

    def old(name):
        return saved[name] if name in saved else absent.get(name, current[name])

    changed = sorted(k for k in current if k not in allowed and old(k) != current[k])
    return ", ".join(f"{flag(k)} {old(k)!r} -> {current[k]!r}" for k in changed)
