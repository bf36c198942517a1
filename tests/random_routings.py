"""Random mixture-of-experts routings for the fuzz tests of the nanobatch pass and the padding
proof: transformers' grouped-GEMM experts (route each token to its top experts, sort the routed
rows by expert, run each expert's rows through grouped GEMMs over offsets counted from the sorted
ids, weight the rows, put them back in token order, sum each token's rows) in the forms models
write it, and with defects that make the routing read across tokens (groups sorted the wrong way,
counts without a range, rows left in expert order, a scan or a flip over the rows) or that the
analyses do not follow (counts of the unsorted ids: the same counts, but not tied to the sort). A routing is drawn as a `Routing` (the choices) and run over `[T, 16]` rows (or `[B, S, 16]`
sequences) by `routed`.
(Ids that may be negative are no choice: eager leaves their rows unwritten, so no run equals it.)"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
from hypothesis import strategies as st

import tileflow

H, EXPERTS = 16, 4
_GEN = torch.Generator().manual_seed(0)
ROUTER = torch.randn(EXPERTS, H, generator=_GEN)
W_UP = torch.randn(EXPERTS, 8, H, generator=_GEN) / 4  # grouped_gemm weights are [E, N, K]
W_GATE_UP = torch.randn(EXPERTS, 16, H, generator=_GEN) / 4  # gate and up halves, one GEMM
W_DOWN = torch.randn(EXPERTS, H, 8, generator=_GEN) / 4


@dataclass(frozen=True)
class Routing:
    """The choices of one routing (`CHOICES`); `defects` names the fields whose values make it
    read across tokens, or that the analyses do not follow (`DEFECTS`)."""

    top: int = 2
    weights: str = "softmax_topk"  # softmax then top-k, top-k then softmax, sigmoids over their sum
    pick: str = "topk"  # or "max" (top 1 only: PhiMoE's sparse mixer)
    # "int32", "no_expert_to_0" (Zaya's), "modulo" ((id + 1) % E), "reversed" (E - 1 - id: in range,
    # but not known never negative)
    ids: str = "as_picked"
    stable: bool = False
    descending: bool = False
    masked_rows: bool = False  # transformers 5.17 zeroes rows whose sorted id is past the experts
    counted: str = "sorted"  # the ids the offsets count
    span: str = "range"  # the histogram's bins: over [0, E - 1], or over each call's own ids
    experts: str = "fused_silu"  # or "gate_up_halves" (one GEMM, its output cut), "down_only" (no first GEMM)
    weighted: str = "after"  # weights on the rows after the experts, or "before" them
    between: str = "none"  # what runs on the rows between the GEMMs
    unsort: str = "index_put"  # how the rows go back in token order
    residual: bool = True

    @property
    def defects(self) -> list[str]:
        """The fields holding a defect (`DEFECTS`)."""
        return [name for name, bad in DEFECTS.items() if getattr(self, name) in bad]


# Each field's values: those that keep each token's rows its own, and (`DEFECTS`) those that do
# not, or that neither analysis follows (the unsorted ids' counts).
CHOICES: dict[str, list] = {
    "top": [1, 2, 3], "weights": ["softmax_topk", "topk_softmax", "sigmoid_sum"], "pick": ["topk", "max"],
    "ids": ["as_picked", "int32", "no_expert_to_0", "modulo", "reversed"], "stable": [False, True],
    "descending": [False], "masked_rows": [False, True], "counted": ["sorted"], "span": ["range"],
    "experts": ["fused_silu", "gate_up_halves", "down_only"], "weighted": ["after", "before"],
    "between": ["none", "clamp"], "unsort": ["index_put", "argsort"], "residual": [False, True],
}
DEFECTS: dict[str, list] = {
    "descending": [True], "counted": ["unsorted"], "span": ["none"], "between": ["cumsum", "flip"], "unsort": ["none"],
}
_DEFECT_ODDS = 7  # each defect in about one routing of seven: about half the routings have none


def _routing(pick_from: Callable[[list], object], one_in: Callable[[int], bool]) -> Routing:
    values = {}
    for name, normal in CHOICES.items():
        values[name] = pick_from(DEFECTS[name]) if name in DEFECTS and one_in(_DEFECT_ODDS) else pick_from(normal)
    if values["top"] != 1:
        values["pick"] = "topk"  # (a max picks one expert)
    return Routing(**values)


@st.composite
def routings(draw: st.DrawFn) -> Routing:
    """A routing with each choice drawn by hypothesis."""
    return _routing(lambda values: draw(st.sampled_from(values)), lambda n: draw(st.integers(0, n - 1)) == 0)


def sample_routings(count: int = 24, seed: int = 7) -> list[Routing]:
    """`count` routings with each choice drawn uniformly from a generator seeded with `seed`: the
    same at every run, and more varied than hypothesis's first draws. (The defaults: among 24
    routings of seed 7 the defect-free ones take every value of `CHOICES`, and the others every
    defect.)"""
    rng = random.Random(seed)
    return [_routing(rng.choice, lambda n: rng.randrange(n) == 0) for _ in range(count)]


def routed(r: Routing) -> Callable[[torch.Tensor], torch.Tensor]:
    """The routing `r` as a function of `[T, 16]` rows, or of `[B, S, 16]` sequences."""
    grouped = tileflow.ops.grouped_gemm

    def run(inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.reshape(-1, H)  # (sequences `[B, S, 16]` flattened, as MoE layers take them)
        scores = x @ ROUTER.T
        if r.pick == "max":
            weights, ids = scores.softmax(-1).max(-1, keepdim=True)
        elif r.weights == "softmax_topk":
            weights, ids = scores.softmax(-1).topk(r.top, dim=-1)
        elif r.weights == "topk_softmax":
            weights, ids = scores.topk(r.top, dim=-1)
            weights = weights.softmax(-1)
        else:
            weights, ids = scores.sigmoid().topk(r.top, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
        if r.ids == "int32":
            ids = ids.int()
        elif r.ids == "no_expert_to_0":  # the last expert's picks sent to expert 0, their weight dropped
            weights = weights.masked_fill(ids == EXPERTS - 1, 0.0)
            ids = ids.masked_fill(ids == EXPERTS - 1, 0)
        elif r.ids == "modulo":
            ids = (ids + 1) % EXPERTS
        elif r.ids == "reversed":
            ids = EXPERTS - 1 - ids
        flat_w, flat_ids = weights.reshape(-1), ids.reshape(-1)
        sorted_ids, perm = torch.sort(flat_ids, stable=r.stable, descending=r.descending)
        rows = x[perm // r.top]
        if r.masked_rows:
            rows = rows.masked_fill((sorted_ids >= EXPERTS).unsqueeze(-1), 0.0)
        if r.weighted == "before":
            rows = rows * flat_w[perm].unsqueeze(-1)
        counted = flat_ids if r.counted == "unsorted" else sorted_ids
        span = {"min": 0, "max": EXPERTS - 1} if r.span == "range" else {}
        offsets = torch.cumsum(torch.histc(counted.float(), bins=EXPERTS, **span), dim=0, dtype=torch.int32)
        if r.experts == "gate_up_halves":
            gate, up = grouped(rows, W_GATE_UP, offsets).chunk(2, dim=-1)
            hidden = torch.nn.functional.silu(gate) * up
        elif r.experts == "fused_silu":
            hidden = grouped(rows, W_UP, offsets, activation="silu")
        else:
            hidden = rows[:, :8]  # (the rows' first columns: the down GEMM alone)
        if r.between == "clamp":
            hidden = hidden.clamp(-2.0, 2.0)
        elif r.between == "cumsum":
            hidden = hidden.cumsum(0)
        elif r.between == "flip":
            hidden = hidden.flip(0)
        y = grouped(hidden, W_DOWN, offsets)
        if r.weighted == "after":
            y = y * flat_w[perm].unsqueeze(-1)
        if r.unsort == "index_put":
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.shape[0])
            y = y[inverse]
        elif r.unsort == "argsort":
            y = y[torch.argsort(perm)]
        out = y.view(x.shape[0], -1, H).sum(1)
        return (out + x if r.residual else out).view(inputs.shape)

    return run
