"""Targets: which kernel backend builds a KernelSpec, and the interface every backend implements.

A backend lives in its own folder under `backends/` and exposes a `KernelBackend`. tileflow's ops
and runtime talk to a backend only through `build(spec) -> CompiledKernel`; they never import a
backend's internals.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from .kernel_spec import KernelSpec

TARGETS: tuple[str, ...] = ("auto", "triton", "ascend", "reference")


@dataclass
class CompiledKernel:
    """A built kernel: its spec, the source text the backend generated, and how to launch it.

    `launch` takes the op's tensors (see the op's docstring in `tileflow/ops.py`) and returns the
    output. `source_path` is where the source was written (None if it was not written out).
    """

    spec: KernelSpec
    target: str
    source: str
    launch: Callable[..., Any]
    source_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.launch(*args, **kwargs)


class KernelBackend(Protocol):
    """What a backend provides."""

    name: str

    def available(self) -> tuple[bool, str]:
        """(True, "") when the backend can build and run here, else (False, what is missing)."""

    def build(self, spec: KernelSpec, artifact_dir: Path | None = None) -> CompiledKernel:
        """Generate the source for `spec`, build it (cached), and return the launcher."""


_BACKEND_MODULES = {
    "reference": "tileflow.backends.reference",
    "triton": "tileflow.backends.triton",
    "ascend": "tileflow.backends.ascend",
}


def resolve_target(target: str, device: Any = None) -> str:
    """Turn `auto` into a concrete target for tensors on `device` (a torch.device or None).

    `auto` picks `triton` for CUDA tensors, `ascend` for NPU tensors, and `reference` on the CPU
    (Triton runs on the CPU only when TRITON_INTERPRET=1 is set, and then only when asked for).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; valid targets are {TARGETS}")
    if target != "auto":
        return target
    device_type = getattr(device, "type", device)
    if device_type == "cuda":
        return "triton"
    if device_type == "npu":
        return "ascend"
    return "reference"


def get_backend(target: str) -> KernelBackend:
    """The backend object for a concrete target name (not `auto`)."""
    if target not in _BACKEND_MODULES:
        raise ValueError(
            f"no kernel backend for target {target!r}; valid targets are {tuple(_BACKEND_MODULES)}"
        )
    module = importlib.import_module(_BACKEND_MODULES[target])
    return module.BACKEND


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1).

    Asks Triton itself (`triton.knobs.runtime.interpret`, what `@triton.jit` reads): it takes
    `1`, `true`, `on`, `yes` for on and anything else (`false`, `off`, `2`) for off, and a
    reading of its own took `TRITON_INTERPRET=false` for on, so the backend said it could run on
    a CPU and built a compiled kernel, which failed at launch for want of a GPU driver.
    """
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # no Triton (the backend says so): Triton's spelling all the same
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")
