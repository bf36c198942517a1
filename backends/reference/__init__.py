"""The reference backend: KernelSpecs executed with PyTorch ops (CPU default, and the test oracle).

It runs the same tile plans and task tables as the device backends, tile by tile, so their math is
tested on the CPU without any kernel compiler.
"""

from __future__ import annotations

from pathlib import Path

from tileflow.kernel_spec import KernelSpec, file_stem
from tileflow.targets import CompiledKernel

from .attention import build_reference_attention
from .gemm import (
    make_reference_grouped_launcher,
    make_reference_launcher,
    render_reference_gemm,
    render_reference_grouped_gemm,
)

# GEMM families: (render the tile loop as source, wrap the compiled source in a launcher).
_GEMMS = {
    "padded_gemm": (render_reference_gemm, make_reference_launcher),
    "grouped_gemm": (render_reference_grouped_gemm, make_reference_grouped_launcher),
}


class ReferenceBackend:
    """Builds KernelSpecs into PyTorch-op launchers."""

    name = "reference"

    def available(self) -> tuple[bool, str]:
        """Always available: it needs nothing but torch."""
        return True, ""

    def build(self, spec: KernelSpec, artifact_dir: Path | None = None) -> CompiledKernel:
        """Render the spec's tile loop as Python source, compile it and return the launcher."""
        if spec.op == "meta_attention":
            return build_reference_attention(spec)
        if spec.op not in _GEMMS:
            raise ValueError(f"the reference backend has no kernel family {spec.op!r}")
        render, make_launcher = _GEMMS[spec.op]
        source = render(spec)
        path = None
        if artifact_dir is not None:
            artifact_dir.mkdir(parents=True, exist_ok=True)
            path = artifact_dir / f"{file_stem(spec.name)}.reference.py"
            path.write_text(source)
        return CompiledKernel(spec=spec, target="reference", source=source,
                              launch=make_launcher(spec, source), source_path=path)


BACKEND = ReferenceBackend()
