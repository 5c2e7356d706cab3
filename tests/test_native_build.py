"""The native library (csrc/, CMakeLists.txt, setup.py): built by the README's install, from a clean
clone with CMake alone, and optional: without cmake the install succeeds and nash_fast falls back."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nash_fast.logprobs as lp_mod

ROOT = Path(__file__).resolve().parents[1]
HAVE_TOOLCHAIN = shutil.which("cmake") is not None and (shutil.which("c++") or shutil.which("g++")) is not None


@pytest.mark.skipif(not HAVE_TOOLCHAIN, reason="no cmake / C++ compiler here")
def test_install_built_the_native_library():
    """The README's `pip install -e .` built nash_fast._C for this torch (CI has cmake and g++)."""
    ok, why = lp_mod.native_status()
    assert ok, why
    assert lp_mod.native_cpu_isa(torch.float32) in ("vnni", "avx512", "avx2", "portable")


@pytest.mark.skipif(not HAVE_TOOLCHAIN, reason="no cmake / C++ compiler here")
def test_kernels_run_on_torch_threads():
    """The kernels' at::parallel_for runs on as many threads as torch.get_num_threads(): ATen's parallel_for is a
    header template that silently runs serially in a library compiled without OpenMP (this library once was,
    and every "2-thread" native measurement ran on one core)."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.ops.nash_fast.cpu_parallel_threads() == threads
    finally:
        torch.set_num_threads(before)


CHECK_LIBRARY = textwrap.dedent("""
    import importlib.util, sys, torch
    spec = importlib.util.spec_from_file_location("nash_fast._C", sys.argv[1])
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(70, 33, generator=g), torch.randn(150, 33, generator=g)
    y = torch.randint(0, 150, (70,), generator=g)
    logp, lse = torch.ops.nash_fast.token_logprobs_forward(h, w, None, y, None)
    z = (h.double() @ w.double().t()).log_softmax(-1)
    assert (logp.double() - z.gather(1, y[:, None])[:, 0]).abs().max() < 1e-4
    print("ok", torch.ops.nash_fast.cpu_isa(torch.bfloat16))
""")


@pytest.mark.skipif(not HAVE_TOOLCHAIN or shutil.which("git") is None, reason="no cmake / C++ compiler / git here")
def test_clean_clone_builds_with_cmake(tmp_path):
    """What is committed builds with the documented CMake commands alone, and the library works."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    out = tmp_path / "out"
    prefix = torch.utils.cmake_prefix_path
    for cmd in (["cmake", "-S", str(clone), "-B", str(tmp_path / "build"), f"-DCMAKE_PREFIX_PATH={prefix}",
                 f"-DPython3_EXECUTABLE={sys.executable}", f"-DNASH_FAST_OUTPUT_DIR={out}"],
                ["cmake", "--build", str(tmp_path / "build"), "--parallel", "2"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (library,) = out.glob("_C*.so")
    result = subprocess.run([sys.executable, "-c", CHECK_LIBRARY, str(library)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout + result.stderr


def test_install_without_cmake_still_succeeds(tmp_path):
    """setup.py's build step without cmake: one warning, exit 0, no library (nash_fast falls back)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = dict(os.environ, PATH=str(bin_dir))  # no cmake on PATH (python is called by absolute path)
    env.pop("NASH_FAST_REQUIRE_NATIVE", None)
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
         str(tmp_path / "temp")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nash_fast._C (native CPU kernels) not built: cmake is not on PATH" in result.stderr
    assert not list((tmp_path / "lib").rglob("_C*.so"))


FALLBACK = textwrap.dedent("""
    import warnings, torch
    import nash_fast
    from nash_fast import sequence_logprobs
    # bf16: the dtype backend="auto" runs natively on CPU (fp32 / fp16 go to the torch backend anyway)
    h, w, y = torch.randn(6, 4).bfloat16(), torch.randn(9, 4).bfloat16(), torch.randint(0, 9, (6,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = sequence_logprobs(h, w, y)
        b = sequence_logprobs(h, w, y)
    assert torch.equal(a, sequence_logprobs(h, w, y, backend="torch")) and torch.equal(a, b)
    print(len(caught), caught[0].message)
""")


def test_without_the_library_nash_fast_imports_and_falls_back_with_one_warning():
    env = dict(os.environ, NASH_FAST_DISABLE_NATIVE="1")
    result = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    count, message = result.stdout.split(" ", 1)
    assert count == "1" and "native CPU kernels unavailable (disabled by NASH_FAST_DISABLE_NATIVE=1)" in message
