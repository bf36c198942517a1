"""A CPU stand-in for CUDA graphs, for the tests of captured steps."""

from __future__ import annotations

import pytest
import torch


class ReplayOnCpu:
    """A captured graph's behaviour on the CPU: fixed output tensors that each replay overwrites,
    computed from whatever the static inputs hold at replay time. Counts captures and replays
    over all instances (tests reset them)."""

    captures = 0
    replays = 0

    def capture(self, fn):
        type(self).captures += 1
        self.fn = fn
        self.outputs = fn()
        return self.outputs

    def replay(self) -> None:
        type(self).replays += 1
        fresh = torch.utils._pytree.tree_leaves(self.fn())
        for static, new in zip(torch.utils._pytree.tree_leaves(self.outputs), fresh):
            if isinstance(static, torch.Tensor):  # an int output (the token count) stays as captured
                _overwrite(static, new)


def _overwrite(static: torch.Tensor, new: torch.Tensor) -> None:
    """Write `new` into `static` as a replay rewrites a graph's memory: an output broadcast along
    a dim (stride 0, `x[:, :1].expand(-1, 8)`) holds one element there, written once."""
    for dim, stride in enumerate(static.stride()):
        if stride == 0:
            static, new = static.narrow(dim, 0, 1), new.narrow(dim, 0, 1)
    static.copy_(new)


def replay_on_cpu_with_noise(monkeypatch: pytest.MonkeyPatch) -> type[ReplayOnCpu]:
    """Make captured steps replay on the CPU (`ReplayOnCpu`), with the padded rows of float inputs
    filled with random values rather than the runtime's 0: the padding walk assumes nothing of
    them but that they are finite, and a leak of padded rows that adds zeros (a sum over the
    tokens, `x.T @ x`) would give the right outputs over zeros. Integer and bool inputs keep the
    runtime's pad value, which the walk's index facts rely on (`PAD_VALUE`). Resets the counts."""
    import tileflow.runtime.streams as streams

    monkeypatch.setattr(streams, "GRAPH_FACTORY", ReplayOnCpu)
    fill = streams.CudaGraphBuckets._fill
    noise = torch.Generator().manual_seed(0)

    def fill_with_noise(self, static: torch.Tensor, value: torch.Tensor, dim: int | None, tokens: int) -> None:
        fill(self, static, value, dim, tokens)
        if dim is not None and static.is_floating_point():
            padded = static.narrow(dim, tokens, static.shape[dim] - tokens)
            padded.copy_(torch.randn(padded.shape, generator=noise) * 3)

    monkeypatch.setattr(streams.CudaGraphBuckets, "_fill", fill_with_noise)
    ReplayOnCpu.captures = ReplayOnCpu.replays = 0
    return ReplayOnCpu
