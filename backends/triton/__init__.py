"""The Triton backend: KernelSpec -> generated Triton source -> compiled kernel (GPU, or the CPU
interpreter under TRITON_INTERPRET=1)."""

from __future__ import annotations

from pathlib import Path

from tileflow.kernel_spec import KernelSpec
from tileflow.targets import CompiledKernel, triton_interpreter_enabled


class TritonBackend:
    """Builds KernelSpecs into Triton kernels."""

    name = "triton"
    # Its padded GEMM kernels read sibling GEMMs' weights as N segments.
    gemm_segments = True

    def available(self) -> tuple[bool, str]:
        """Needs the triton package, and a CUDA GPU or TRITON_INTERPRET=1."""
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "the triton package is not installed (pip install 'tileflow[triton]')"
        import torch

        if torch.cuda.is_available() or triton_interpreter_enabled():
            return True, ""
        return False, "no CUDA GPU is visible; set TRITON_INTERPRET=1 (before importing triton) to run Triton kernels on the CPU interpreter"

    def build(self, spec: KernelSpec, artifact_dir: Path | None = None) -> CompiledKernel:
        """Generate, cache and compile the kernel for `spec`."""
        from .build import build_triton_kernel

        if spec.op == "padded_gemm":
            from .gemm import make_gemm_launcher, render_gemm_source

            return build_triton_kernel(spec, render_gemm_source, make_gemm_launcher, artifact_dir)
        if spec.op == "grouped_gemm":
            from .grouped_gemm import make_grouped_gemm_launcher, render_grouped_gemm_source

            return build_triton_kernel(spec, render_grouped_gemm_source, make_grouped_gemm_launcher, artifact_dir)
        if spec.op == "meta_attention":
            from .attention import build_attention_kernel

            return build_attention_kernel(spec, artifact_dir)
        raise ValueError(f"the triton backend has no kernel family {spec.op!r}")


BACKEND = TritonBackend()
