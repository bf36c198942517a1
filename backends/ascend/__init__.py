"""The Ascend C backend: not in this version yet. It reports itself unavailable with the reason,
so `target="ascend"` fails with a clear error instead of a crash."""

from __future__ import annotations

from pathlib import Path

from tileflow.kernel_spec import KernelSpec
from tileflow.targets import CompiledKernel


class AscendBackend:
    """Placeholder that explains what is missing (the emitter arrives with the Ascend issue)."""

    name = "ascend"

    def available(self) -> tuple[bool, str]:
        """Never available in this version; the message says why."""
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            return False, "torch_npu is not installed (pip install 'tileflow[ascend]' on an Ascend machine), and this tileflow version has no Ascend C emitter yet"
        return False, "this tileflow version has no Ascend C emitter yet; use target='reference' or 'triton'"

    def build(self, spec: KernelSpec, artifact_dir: Path | None = None) -> CompiledKernel:
        """Always raises: see `available()`."""
        raise RuntimeError(self.available()[1])


BACKEND = AscendBackend()
