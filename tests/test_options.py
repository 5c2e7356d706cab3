"""The option machinery shared by the command-line programs (nash_fast.options)."""

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from nash_fast.options import add_field_option, changed_options, flag, option, read_yaml_mapping


def test_changed_options_names_each_change_a_resume_may_not_make():
    saved = {"beta": 0.1, "lr": 1e-3, "output_dir": "a"}
    assert changed_options(saved, {"beta": 0.1, "lr": 1e-3, "output_dir": "b"}, ["output_dir"]) == ""
    assert changed_options(saved, {"beta": 0.2, "lr": 1e-2, "output_dir": "a"}, ["lr"]) == "--beta 0.1 -> 0.2"
    assert changed_options(saved, {"beta": 0.2, "lr": 1e-2, "output_dir": "a"}, []) == \
        "--beta 0.1 -> 0.2, --lr 0.001 -> 0.01"
    # An option the saved run does not know (added later): unchanged, or the value `absent` says it had then.
    assert changed_options(saved, {**saved, "new_option": 3}, []) == ""
    assert changed_options(saved, {**saved, "new_option": 3}, [], absent={"new_option": 2}) == "--new-option 2 -> 3"
    assert changed_options(saved, {**saved, "new_option": 2}, [], absent={"new_option": 2}) == ""


@dataclass
class _Config:
    steps: int | None = option(None, "Steps.")
    plot: bool = option(True, "Plot.")
    mode: str = option("a", "Mode.", choices=("a", "b"))


def test_fields_become_options_with_one_converter_for_flags_and_yaml(tmp_path):
    parser = argparse.ArgumentParser()
    for f in dataclasses.fields(_Config):
        add_field_option(parser, f, [flag(f.name)], help=f.metadata["help"], default=f.default)
    assert vars(parser.parse_args([])) == {"steps": None, "plot": True, "mode": "a"}
    assert vars(parser.parse_args(["--steps", "1e3", "--no-plot", "--mode", "b"])) == {
        "steps": 1000, "plot": False, "mode": "b"}
    assert vars(parser.parse_args(["--steps", "none", "--plot", "off"]))["plot"] is False
    (tmp_path / "c.yaml").write_text("steps: 5e-7\nplot: on\n")
    assert read_yaml_mapping(tmp_path / "c.yaml") == {"steps": "5e-7", "plot": "on"}  # scalars stay text


@pytest.mark.parametrize("text, message", [("a: 1\na: 2\n", "option 'a' is given twice"),
                                           ("- 1\n", "expected a mapping"), ("a: [\n", "not valid YAML")])
def test_read_yaml_mapping_refuses_with_the_option_named(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_yaml_mapping(tmp_path / "c.yaml", "--config")
    assert str(error.value).startswith("--config")
    (tmp_path / "bad.yaml").write_bytes(b"a: 1\nb: \xff\n")
    with pytest.raises(ValueError, match="line 2 is not UTF-8"):
        read_yaml_mapping(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="no such file"):
        read_yaml_mapping(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml_mapping(tmp_path / "empty.yaml") == {}
