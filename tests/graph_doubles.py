"""A CPU stand-in for CUDA graphs, for the tests of captured steps."""

from __future__ import annotations

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
                static.copy_(new)
