"""Builds nash_fast._C (csrc/ through CMakeLists.txt) during `pip install [-e] .`; metadata is in pyproject.toml.

The library must be compiled against the torch that will load it. pip builds in an isolated
environment without torch, so the torch of the installing environment is located with an isolated
(-I) interpreter and its headers and CMake package are used directly; nothing is downloaded.
Without torch, cmake or a C++ compiler the install still succeeds: nash_fast then warns once and
uses backend="torch" on CPUs. NASH_FAST_REQUIRE_NATIVE=1 turns a failed build into an error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
TORCH_PROBE = "import json, torch, torch.utils; print(json.dumps([torch.__version__, torch.utils.cmake_prefix_path]))"


def installed_torch() -> tuple[str, str] | None:
    """(version, CMake prefix path) of the torch importable here or in the installing environment."""
    for flags in ([], ["-I"]):  # -I ignores the PYTHONPATH of pip's isolated build environment
        try:
            out = subprocess.run([sys.executable, *flags, "-c", TORCH_PROBE], capture_output=True, text=True,
                                 timeout=300, check=True).stdout
            version, prefix = json.loads(out.strip().splitlines()[-1])
            return version, prefix
        except (subprocess.SubprocessError, OSError, ValueError, IndexError):
            continue
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            self._build_with_cmake(ext)
        except RuntimeError as exc:
            if os.environ.get("NASH_FAST_REQUIRE_NATIVE") == "1":
                raise
            print(f"WARNING: nash_fast._C (native CPU kernels) not built: {exc}. nash_fast will use "
                  "backend='torch' on CPUs.", file=sys.stderr)

    def _build_with_cmake(self, ext: Extension) -> None:
        torch_info = installed_torch()
        if torch_info is None:
            raise RuntimeError("torch is not installed (install it first: pip install torch)")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake is not on PATH")
        version, prefix = torch_info
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        suffix = target.name[len("_C"):]
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={prefix}", f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DNASH_FAST_OUTPUT_DIR={target.parent}", f"-DNASH_FAST_EXT_SUFFIX={suffix}",
        ]
        jobs = str(max(1, min(os.cpu_count() or 1, 8)))
        for cmd in (configure, [cmake, "--build", str(build_dir), "--parallel", jobs]):
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                tail = (result.stdout + result.stderr)[-3000:]
                raise RuntimeError(f"`{' '.join(cmd[:2])} ...` failed:\n{tail}")
        # The build record: nash_fast refuses a library built for another torch (its C++ ABI differs).
        # Editable installs copy the library into the source tree, so the record goes there too.
        record = json.dumps({"torch": version}) + "\n"
        target.with_name("_C.json").write_text(record)
        if self.inplace or getattr(self, "editable_mode", False):
            (ROOT / "nash_fast" / "_C.json").write_text(record)


setup(ext_modules=[Extension("nash_fast._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
