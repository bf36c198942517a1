"""Run a nano-batched step: the schedule the `nanobatch` pass planned, for the actual token count.

On the CPU (and wherever streams are not used) the nano-ops run one after another in a
topological order of the schedule: token-wise ops on their rows, the others on everything; the
result equals the unsplit graph's up to summation order inside the GEMMs. Schedules are built
once per token count and cached.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

aten = torch.ops.aten
# Ops whose shape argument (args[1]) holds the token dim's size: rewritten per nano-batch.
_SHAPED = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default}
_VIEWS = {aten.view.default, aten._unsafe_view.default}


class NanoBatchRunner:
    """Callable like the graph: splits each call into the plan's nano-batches, or runs `whole`
    (the graph's usual runner) when the plan keeps the step in one piece."""

    def __init__(self, gm: fx.GraphModule, plan: Any, whole: Callable[..., Any], *, check: bool = False) -> None:
        self.gm, self.plan, self.whole, self.check = gm, plan, whole, check
        self._schedule = lru_cache(maxsize=64)(self._build)
        self.last_schedule = None

    def _build(self, sizes: tuple[int, ...]) -> Any:
        schedule = self.plan.schedule(list(sizes))
        if self.check:
            from tileflow.schedule import check_schedule

            check_schedule(schedule, {s.name: (0, sum(sizes)) for s in self.plan.specs})
        return schedule, topological_order(schedule)

    def __call__(self, *args: Any) -> Any:
        index, dim = self.plan.token_input
        tokens = int(args[index].shape[dim])
        sizes = tuple(self.plan.sizes(tokens))
        if len(sizes) < 2:
            return self.whole(*args)
        schedule, order = self._schedule(sizes)  # built once per split
        self.last_schedule = schedule
        return run_schedule(self.gm, self.plan, schedule, args, order)


def run_schedule(
    gm: fx.GraphModule, plan: Any, schedule: Any, args: Sequence[Any], order: Sequence[str] | None = None,
) -> Any:
    """Execute every nano-op of `schedule` in `order` (default: `topological_order(schedule)`);
    return the graph's outputs."""
    dims: dict[str, int | None] = plan.token_dims
    whole: dict[str, Any] = {}
    pieces: dict[str, dict[tuple[int, int], Any]] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, args):
        whole[node.name] = value

    def full(node: fx.Node) -> Any:
        if node.name in whole:
            return whole[node.name]
        if node.op == "get_attr":
            value = gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            whole[node.name] = value
            return value
        parts = pieces[node.name]
        value = torch.cat([parts[r] for r in sorted(parts)], dim=dims[node.name])
        whole[node.name] = value
        return value

    def rows(node: fx.Node, lo: int, hi: int) -> Any:
        parts = pieces.get(node.name)
        if parts is not None and (lo, hi) in parts:
            return parts[(lo, hi)]
        return full(node).narrow(dims[node.name], lo, hi - lo)

    nodes = {n.name: n for n in gm.graph.nodes}
    for name in order if order is not None else topological_order(schedule):
        op = schedule.ops[name]
        node = nodes[op.original]
        lo, hi = op.rows
        if plan.split[node.name]:
            def arg(a: Any) -> Any:
                if isinstance(a, fx.Node):
                    return rows(a, lo, hi) if dims.get(a.name) is not None else full(a)
                return a

            call_args = fx.node.map_aggregate(node.args, arg)
            call_kwargs = fx.node.map_aggregate(node.kwargs, arg)
            target = node.target
            if target in _SHAPED:
                shape = list(call_args[1])
                shape[dims[node.name]] = hi - lo
                # A slice need not be viewable with the whole's strides: reshape copies when needed.
                target = aten.reshape.default if target in _VIEWS else target
                call_args = (call_args[0], shape, *call_args[2:])
            pieces.setdefault(node.name, {})[(lo, hi)] = target(*call_args, **call_kwargs)
        else:
            whole[node.name] = node.target(*fx.node.map_aggregate(node.args, _resolver(full)),
                                           **fx.node.map_aggregate(node.kwargs, _resolver(full)))
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    return fx.node.map_aggregate(output.args[0], _resolver(full))


def _resolver(full: Callable[[fx.Node], Any]) -> Callable[[Any], Any]:
    return lambda a: full(a) if isinstance(a, fx.Node) else a


def topological_order(schedule: Any) -> list[str]:
    """Nano-op names in an order that respects every dependency (streams merged)."""
    order, done = [], set()
    position = {name: i for i, name in enumerate(schedule.ops)}
    pending = sorted(schedule.ops, key=position.get)
    while pending:
        rest = []
        for name in pending:
            if all(d in done for d in schedule.ops[name].deps):
                order.append(name)
                done.add(name)
            else:
                rest.append(name)
        if len(rest) == len(pending):
            raise RuntimeError(f"schedule has a cycle among {rest[:5]}")
        pending = rest
    return order
