"""Build a Triton kernel from a KernelSpec: render, write to disk, import, wrap in a launcher.

Triton's `@triton.jit` reads a kernel's source with `inspect`, so the generated text has to live
in a real file before it is imported. Files go to an on-disk cache keyed by the spec's digest
salted with the tileflow and Triton versions (a new version of either renders afresh) and by a
hash of the rendered text itself (two trees with one version string, a checkout and an edited
copy, render different text: each gets its own file); the resulting `CompiledKernel` is memoized
in-process, so building a spec twice returns the same object and never rewrites or re-imports the
file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from tileflow.kernel_spec import KernelSpec, file_stem
from tileflow.targets import CompiledKernel, triton_interpreter_enabled

__all__ = [
    "build_triton_kernel",
    "cache_root",
    "clear_memo",
    "kernel_identifier",
    "tileflow_version",
]

# In-process memo: (spec digest, interpreter on?) -> CompiledKernel. The interpreter flag is part
# of the key because `@triton.jit` picks the interpreted or compiled function at import time.
_MEMO: dict[tuple[str, bool], CompiledKernel] = {}
_LOCK = threading.RLock()


def tileflow_version() -> str:
    """Installed tileflow version, or `0+unknown` when running from an uninstalled tree."""
    try:
        return importlib.metadata.version("tileflow")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def cache_root() -> Path:
    """Where generated sources are cached.

    `$TILEFLOW_CACHE_DIR` when set (absolute: a kernel's recorded source path must outlive a
    change of working directory), else `~/.cache/tileflow/triton`.
    """
    env = os.environ.get("TILEFLOW_CACHE_DIR")
    if env:
        return Path(env).expanduser().absolute()
    return Path.home() / ".cache" / "tileflow" / "triton"


def clear_memo() -> None:
    """Forget every in-process CompiledKernel (tests use it; on-disk files are kept)."""
    with _LOCK:
        _MEMO.clear()


def kernel_identifier(spec: KernelSpec) -> str:
    """The Python identifier a rendered module gives its entry kernel: `spec.name` sanitized.

    Renderers should name their `@triton.jit` entry point with this, so that `build_triton_kernel`
    can find it among helper `@triton.jit` functions.
    """
    ident = re.sub(r"\W", "_", spec.name)
    if not ident or ident[0].isdigit():
        ident = "_" + ident
    return ident


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _ensure_source_file(path: Path, text: str) -> None:
    """Make `path` hold exactly `text`, writing only when it is missing or differs."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return  # another process (or an earlier run) already wrote it
    except (OSError, UnicodeDecodeError):
        pass
    try:
        _write_atomic(path, text)
    except OSError as exc:
        raise OSError(f"cannot write the generated kernel source {path} ({exc.strerror or exc}); set "
                      "TILEFLOW_CACHE_DIR to a writable directory") from exc


def _import_module(module_name: str, path: Path) -> ModuleType:
    """Import the file at `path` as `module_name` (registered in sys.modules first, as
    `import` would, so anything that looks the module up by name finds it)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import generated kernel source {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _find_kernel(module: ModuleType, spec: KernelSpec, path: Path) -> Any:
    """The module's entry `@triton.jit` function: the one named `kernel_identifier(spec)`, or
    the only jitted function in the module."""
    ident = kernel_identifier(spec)
    if hasattr(module, ident):
        return getattr(module, ident)
    from triton.runtime.jit import KernelInterface

    jitted = [
        v for v in vars(module).values()
        # skip jitted helpers the module merely imported from elsewhere
        if isinstance(v, KernelInterface)
        and getattr(getattr(v, "fn", None), "__module__", module.__name__) == module.__name__
    ]
    if len(jitted) == 1:
        return jitted[0]
    raise ImportError(
        f"generated source {path} defines no kernel named {ident!r} "
        f"and {len(jitted)} @triton.jit functions (expected exactly one)"
    )


_INTERPRETER_NUMPY_CHECKED = False


def _check_interpreter_numpy(triton_version: str) -> None:
    """Warn once when the interpreter cannot run loops bounded by loaded values: Triton before
    3.7 makes a Python int of a one-element array, which numpy 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"), so the attention kernels and the persistent,
    split-K and stream-K GEMMs fail there (compiled on a GPU they run)."""
    global _INTERPRETER_NUMPY_CHECKED
    if _INTERPRETER_NUMPY_CHECKED:
        return
    _INTERPRETER_NUMPY_CHECKED = True
    import numpy

    def major_minor(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", version)[:2])

    if major_minor(triton_version) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        warnings.warn(f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run kernels whose loops are "
                      f"bounded by loaded values under numpy {numpy.__version__} (tileflow's attention, and its "
                      f"persistent, split-K and stream-K GEMMs): install numpy<2.4, or Triton 3.7 or newer",
                      RuntimeWarning, stacklevel=3)


def build_triton_kernel(
    spec: KernelSpec,
    render: Callable[[KernelSpec], str],
    make_launcher: Callable[[KernelSpec, Any], Callable[..., Any]],
    artifact_dir: Path | None = None,
) -> CompiledKernel:
    """Render, write, import and wrap the Triton kernel for `spec` (cached).

    - `render(spec)` returns the module's source text;
    - `make_launcher(spec, kernel_fn)` turns the imported `@triton.jit` function into the launcher.

    The source goes to `cache_root()/<digest>/<text hash>/<spec.name>.py` (a name too long for a
    file cut, `kernel_spec.file_stem`), where the digest is
    `spec.digest(tileflow_version(), triton.__version__)` and the text hash a hash of the rendered
    source; it is written atomically and only when missing or different. The CompiledKernel is memoized per digest, so building the same spec
    again returns the same object. When `artifact_dir` is given the source is also copied there as
    `<spec.name>.py` (on every call, so each run's artifact directory gets its copy).
    """
    import triton  # imported here: importing this module must not require Triton

    digest = spec.digest(tileflow_version(), triton.__version__)
    key = (digest, triton_interpreter_enabled())
    with _LOCK:
        kernel = _MEMO.get(key)
        if kernel is None:
            if key[1]:
                _check_interpreter_numpy(triton.__version__)
            text = render(spec)
            # The file is named by its text as well: the version strings do not change when the
            # generator is edited (an editable install, a second checkout), and two such trees
            # sharing one file rewrote it in turn, so a process could import, or (the interpreter
            # reads the file at the first launch) run, the other tree's kernel.
            text_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
            path = cache_root() / digest / text_hash / f"{file_stem(spec.name)}.py"
            _ensure_source_file(path, text)
            module_name = f"_tileflow_triton_{digest}_{text_hash}" + ("_interp" if key[1] else "")
            module = _import_module(module_name, path)
            kernel_fn = _find_kernel(module, spec, path)
            kernel = CompiledKernel(
                spec=spec,
                target="triton",
                source=text,
                launch=make_launcher(spec, kernel_fn),
                source_path=path,
                meta={
                    "digest": digest,
                    "module": module_name,
                    "kernel_name": getattr(kernel_fn, "__name__", kernel_identifier(spec)),
                    "triton_version": triton.__version__,
                    "tileflow_version": tileflow_version(),
                    "interpreted": key[1],
                },
            )
            _MEMO[key] = kernel
            if key[1] and spec.dtype == "bfloat16":
                # Once per kernel: the interpreter's tl.dot multiplies bf16 bit patterns as
                # integers (numpy has no bf16), so such a kernel's results are garbage on the CPU.
                # Only bf16 operands are dotted: a bf16 output is a cast, which it does right.
                warnings.warn(
                    f"{spec.name}: bf16 kernels give wrong results under TRITON_INTERPRET=1 (Triton's "
                    "interpreter computes bf16 dots wrongly); run them on a GPU, or use fp16/fp32 or the "
                    "reference target on the CPU", RuntimeWarning, stacklevel=2)
    if artifact_dir is not None:
        # Written from the kept text (not copied from the cache file, which may be pruned).
        _write_atomic(Path(artifact_dir) / f"{file_stem(spec.name)}.py", kernel.source)
    return kernel
