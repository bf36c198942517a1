"""CPU-debug builds of emitted Ascend C kernels: compile with g++, load, launch through ctypes.

CANN builds kernels for the CPU in its debug mode (`ASCENDC_CPU_DEBUG`, `ICPU_RUN_KF`), which
runs every block of a launch in turn on the host. tileflow uses the same mode to verify its
emitted code on machines without an NPU: the kernel and host files of a `KernelSources` are
compiled with `-DASCENDC_CPU_DEBUG` against a directory of Ascend C headers for the CPU — CANN's
own, or the test double under `tests/ascend_cpu/` — with warnings as errors, into a shared
library loaded with ctypes.

Libraries are cached on disk by a hash of the sources, the headers and the compiler command, so a
kernel compiles once per change. Builders of one spec may race (threads, or processes sharing the
cache): each writes the sources atomically and compiles into its own temporary file, then moves
the library into place, so every builder succeeds and a partial library is never loaded.

The headers every kernel of one kind includes are parsed once: they are compiled into a
precompiled header (a "prelude", cached beside the libraries) that each build includes first.
g++ ignores a precompiled header it cannot use and parses the text instead, so the prelude only
ever changes how long a build takes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .sources import KernelSources, cache_root

__all__ = ["CpuDebugLibrary", "build_cpu_debug", "compiler_flags", "write_atomic"]

_CXX_FLAGS: tuple[str, ...] = (
    "-std=c++17", "-O1", "-g0", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
    "-DASCENDC_CPU_DEBUG",
)


def compiler_flags() -> tuple[str, ...]:
    """The g++ flags of a CPU-debug build (warnings are errors: emitted code must be clean)."""
    return _CXX_FLAGS


def _header_digest(include_dirs: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for inc in include_dirs:
        for path in sorted(Path(inc).rglob("*.h")):
            h.update(str(path.relative_to(inc)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`, so a
    concurrent reader (another build's compiler) sees the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CpuDebugLibrary:
    """A loaded CPU-debug build of one kernel's sources.

    `call(function, *args)` calls an `extern "C"` function of the library. After a launch (a
    `*_run_cpu` function) it asks the headers' error hook (`tileflow_cpu_double_last_error`, when
    the headers have one) and raises RuntimeError with its message, so a failed check inside a
    kernel reaches Python as an exception instead of a crash. The hook's state is per OS thread
    (ctypes releases the GIL during a launch, so other threads may launch meanwhile) and the
    hook is asked on the thread that launched, right after the launch, so the message is this
    launch's own. Only launches reset it, so other calls do not consult it.
    """

    def __init__(self, sources: KernelSources, path: Path) -> None:
        self.sources = sources
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self._last_error = getattr(self.lib, "tileflow_cpu_double_last_error", None)
        if self._last_error is not None:
            self._last_error.restype = ctypes.c_char_p

    def call(self, function: str, *args: Any, restype: Any = ctypes.c_int) -> Any:
        """Call `function(*args)`; ints/floats/pointers as ctypes values or torch CPU tensors."""
        fn = getattr(self.lib, function)
        fn.restype = restype
        result = fn(*(_c_arg(a) for a in args))
        if self._last_error is not None and function.endswith("_run_cpu"):
            message = self._last_error().decode()
            if message:
                raise RuntimeError(f"{self.sources.ident}: {function} failed on the CPU: {message}")
        return result


def _c_arg(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ValueError(f"a CPU-debug launch needs CPU tensors, got one on {value.device}")
        return ctypes.c_void_p(value.data_ptr())
    if value is None:
        return ctypes.c_void_p(0)
    return value


_INCLUDE = re.compile(r'\s*#\s*include\s*[<"]([^>"]+)[>"]')


def shared_includes(sources: KernelSources) -> list[str]:
    """The `#include` lines of `sources`' kernel and host files that name none of its own files
    (its tiling header), each once, in the order they first appear: the headers every kernel of
    this kind parses alike."""
    own = {Path(rel).name for rel in sources.files}
    lines: list[str] = []
    for rel in (sources.kernel_file, sources.host_file):
        for line in sources.files[rel].splitlines():
            match = _INCLUDE.match(line)
            if match and Path(match.group(1)).name not in own and line.strip() not in lines:
                lines.append(line.strip())
    return lines


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout


def _precompiled_prelude(cxx: str, sources: KernelSources, include_dirs: Sequence[Path], header_digest: str,
                         root: Path) -> Path | None:
    """A header of `shared_includes(sources)` with its precompiled form beside it (built once per
    include list, headers and flags); None when there is nothing to share or g++ cannot build it
    (the build then parses the headers itself)."""
    includes = shared_includes(sources)
    if not includes:
        return None
    text = "\n".join(includes) + "\n"
    # `-shared` is a link flag; every other flag must match the build's for g++ to use the result.
    flags = [flag for flag in _CXX_FLAGS if flag != "-shared"]
    # With the compiler's version: one another g++ wrote would be skipped, every build slower.
    key = hashlib.sha256("\n".join([text, header_digest, cxx, _compiler_version(cxx), *flags]).encode())
    header = root / f"prelude-{key.hexdigest()[:16]}" / "prelude.h"
    compiled = header.with_name("prelude.h.gch")
    if not compiled.exists():
        write_atomic(header, text)
        tmp = compiled.with_name(f".{compiled.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        cmd = [cxx, *flags, *(f"-I{inc}" for inc in include_dirs), "-x", "c++-header", str(header), "-o", str(tmp)]
        try:
            if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
                return None
            os.replace(tmp, compiled)
        finally:
            tmp.unlink(missing_ok=True)
    return header


def build_cpu_debug(
    sources: KernelSources, include_dirs: Sequence[Path], build_dir: Path | None = None
) -> CpuDebugLibrary:
    """Compile `sources` (kernel + host files) for the CPU and load the library.

    `include_dirs` must provide the Ascend C headers (`kernel_operator.h`, `tikicpulib.h`, ...).
    Raises RuntimeError with the compiler's output when the build fails (a warning is a failure).
    """
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise RuntimeError("a CPU-debug build needs a C++17 compiler: install g++ or set CXX")
    include_dirs = [Path(p).resolve() for p in include_dirs]
    for inc in include_dirs:
        if not (inc / "kernel_operator.h").exists() and not any(inc.rglob("kernel_operator.h")):
            raise RuntimeError(f"{inc} holds no kernel_operator.h: pass the Ascend C CPU headers' folder")
    header_digest = _header_digest(include_dirs)
    key = hashlib.sha256(sources.digest().encode())
    key.update(header_digest.encode())
    key.update(" ".join((cxx, *_CXX_FLAGS)).encode())
    digest = key.hexdigest()[:16]
    builds = build_dir or cache_root() / "cpu"
    root = builds / f"{sources.ident}-{digest}"
    lib_path = root / f"lib{sources.ident}.so"
    if not lib_path.exists():
        for rel, text in sources.files.items():
            write_atomic(root / rel, text)
        prelude = _precompiled_prelude(cxx, sources, include_dirs, header_digest, builds)
        # Each builder links into its own file (pid + thread), then moves it into place: racing
        # builders of one spec all succeed, and the library path only ever names a whole library.
        tmp = lib_path.with_name(f".{lib_path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        cmd = [cxx, *_CXX_FLAGS, *(("-include", str(prelude)) if prelude else ()),
               *(f"-I{inc}" for inc in include_dirs), f"-I{root / 'op_host'}",
               str(root / sources.kernel_file), str(root / sources.host_file), "-o", str(tmp)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(
                    f"compiling {sources.ident} for the CPU failed ({' '.join(cmd)}):\n{run.stderr[-6000:]}"
                )
            os.replace(tmp, lib_path)
        finally:
            tmp.unlink(missing_ok=True)
    return CpuDebugLibrary(sources, lib_path)
