"""The Ascend C backend: KernelSpec -> Ascend C kernel, host tiling and PyTorch operator.

- `render_sources(spec)` emits a kernel's files (`sources.KernelSources`): the kernel
  (`__global__ __aicore__`, TPipe/TQue, Matmul API on the cube, epilogue/softmax on the vector
  unit), its tiling struct and host tiling function, and the torch_npu operator binding.
- `project.write_project` lays any number of kernels out as one CMake project for the CANN
  toolchain (`tileflow export --target ascend` writes it).
- On an Ascend machine (`torch_npu` sees an NPU and CANN is installed) `BACKEND.build(spec)`
  builds that project, loads the operators and returns a launcher.
- Anywhere, `build_cpu_debug_kernel(spec, include_dirs)` compiles the same sources in CANN's CPU
  debug mode (`ASCENDC_CPU_DEBUG`) with g++ and launches them on CPU tensors: that is how the
  emitted code is verified without an NPU (see tests/ascend_cpu/ for the headers used here).
"""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from tileflow.kernel_spec import KernelSpec, gemm_segments
from tileflow.targets import CompiledKernel

from .cpu_debug import build_cpu_debug
from .sources import EntryPoint, KernelSources

__all__ = ["BACKEND", "AscendBackend", "build_cpu_debug_kernel", "render_sources"]

# AI cores a CPU-debug launch deals its tiles over (the 910B's cube cores), unless told otherwise.
CPU_DEBUG_CORES = 24


def render_sources(spec: KernelSpec) -> KernelSources:
    """The emitted project files for `spec` (a `padded_gemm`, `grouped_gemm` or `meta_attention` spec)."""
    if spec.op in ("padded_gemm", "grouped_gemm"):
        from .gemm import render_gemm_sources

        for variant, what in (("split_k", "split-K"), ("stream_k", "stream-K"), ("tma", "TMA")):
            if spec.param(variant, False):
                raise ValueError(
                    f"{spec.name}: the Ascend C backend has no {what} GEMM (tile plans use it only on GPUs); "
                    f"build the spec without {variant}"
                )

        if spec.op == "padded_gemm" and len(gemm_segments(spec)) > 1:
            # Its kernel reads one [N, K] weight and its launcher takes no `more_weights`: the
            # passes keep sibling GEMMs apart on this target (runtime.segments_in_one_kernel).
            raise ValueError(
                f"{spec.name}: the Ascend C backend has no GEMM over N segments (sibling weights; Triton "
                "only); build one spec per weight"
            )
        return render_gemm_sources(spec)
    if spec.op == "meta_attention":
        from .attention import render_attention_sources

        return render_attention_sources(spec)
    raise ValueError(f"the Ascend C backend has no kernel family {spec.op!r}")


def _launcher(spec: KernelSpec, host_call, run, cores: int):
    if spec.op == "padded_gemm":
        from .gemm import make_gemm_launcher

        return make_gemm_launcher(spec, host_call, run, cores)
    if spec.op == "grouped_gemm":
        from .gemm import make_grouped_gemm_launcher

        return make_grouped_gemm_launcher(spec, host_call, run, cores)
    from .attention import make_attention_launcher

    return make_attention_launcher(spec, host_call, run, cores)


def build_cpu_debug_kernel(
    spec: KernelSpec, include_dirs: Sequence[Path], cores: int = CPU_DEBUG_CORES,
    build_dir: Path | None = None,
) -> CompiledKernel:
    """Emit `spec`, compile it for the CPU against `include_dirs` and return a launcher with the
    same interface as the other backends' (every block of each launch runs in turn)."""
    sources = render_sources(spec)
    lib = build_cpu_debug(sources, include_dirs, build_dir)

    def run(entry: EntryPoint, block_dim: int, tensors: list[torch.Tensor]) -> None:
        lib.call(f"{entry.name}_run_cpu", ctypes.c_uint32(block_dim), *tensors, restype=None)

    return CompiledKernel(
        spec=spec, target="ascend-cpu-debug", source=sources.combined(),
        launch=_launcher(spec, lib.call, run, cores), meta={"library": str(lib.path), "sources": sources},
    )


class AscendBackend:
    """Builds KernelSpecs into Ascend C operators on an Ascend machine."""

    name = "ascend"

    def available(self) -> tuple[bool, str]:
        """(True, "") with torch_npu, a visible NPU and the CANN toolchain; else what is missing."""
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            return False, (
                "torch_npu is not installed: target='ascend' needs an Ascend machine with torch_npu "
                "(pip install 'tileflow[ascend]') and the CANN toolkit; use target='reference' or "
                "'triton' here, or `tileflow export --target ascend` to write the Ascend C project"
            )
        if not (hasattr(torch, "npu") and torch.npu.is_available()):
            return False, "torch_npu is installed but sees no NPU (check the driver and ASCEND_RT_VISIBLE_DEVICES)"
        if not _cann_home():
            return False, (
                "the CANN toolkit was not found (set ASCEND_HOME_PATH, e.g. by sourcing "
                "/usr/local/Ascend/ascend-toolkit/set_env.sh); it compiles the emitted kernels"
            )
        if shutil.which("cmake") is None:
            return False, "cmake is not installed; the emitted Ascend C project builds with CMake"
        return True, ""

    def emit(self, spec: KernelSpec) -> dict[str, str]:
        """The emitted files of `spec` (project-relative path -> text), without building them."""
        return dict(render_sources(spec).files)

    def build(self, spec: KernelSpec, artifact_dir: Path | None = None) -> CompiledKernel:
        """Emit `spec`, build it with CANN (cached), load the operator and return the launcher."""
        ok, why = self.available()
        if not ok:
            raise RuntimeError(f"target='ascend' cannot build {spec.name}: {why}")
        from .project import build_npu_kernel

        sources = render_sources(spec)
        host_call, run, cores = build_npu_kernel(sources, artifact_dir)
        return CompiledKernel(spec=spec, target="ascend", source=sources.combined(),
                              launch=_launcher(spec, host_call, run, cores), meta={"sources": sources})


def _cann_home() -> str | None:
    for var in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"):
        if os.environ.get(var):
            return os.environ[var]
    default = Path("/usr/local/Ascend/ascend-toolkit/latest")
    return str(default) if default.exists() else None


BACKEND = AscendBackend()
