"""`tileflow.mask_rule`: which masks are proven to be the meta-kernel's causal / sliding-window
rule, and that a proven one gives eager's output (the mask dropped, the rule's flags set)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import tileflow
from tileflow.mask_rule import MaskRule, mask_rule

A = torch.arange
LOWEST = torch.finfo(torch.float32).min
CAUSAL = MaskRule(True, None)


def _rule(build: Callable[[Any, Any], torch.Tensor], q_len: int = 5, kv_len: int = 7) -> MaskRule | None:
    """`mask_rule` of the mask `build(T, S)` makes, traced with symbolic T (queries) and S (keys)."""
    def fn(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return build(q.shape[0], k.shape[0])

    gm = make_fx(fn, tracing_mode="symbolic")(torch.empty(q_len), torch.empty(kv_len))
    q, k = (n.meta["val"].shape[0] for n in gm.graph.nodes if n.op == "placeholder")
    (out,) = [n for n in gm.graph.nodes if n.op == "output"][0].args
    return mask_rule(out[0] if isinstance(out, (list, tuple)) else out, q, k)


def _square(build: Callable[[Any], torch.Tensor]) -> MaskRule | None:
    """As `_rule`, queries and keys one length S."""
    return _rule(lambda t, s: build(s), 6, 6)


def kv(s: Any) -> torch.Tensor:
    return A(s)[None, :]


def qp(s: Any) -> torch.Tensor:
    return A(s)[:, None]


# -- proven: each with the exact rule ----------------------------------------------------------
@pytest.mark.parametrize("build, want", [
    (lambda s: kv(s) <= qp(s), CAUSAL),
    (lambda s: qp(s) >= kv(s), CAUSAL),
    (lambda s: kv(s) < qp(s) + 1, CAUSAL),
    (lambda s: kv(s) - qp(s) <= 0, CAUSAL),
    (lambda s: (kv(s) <= qp(s)) & (kv(s) > qp(s) - 3), MaskRule(True, 3)),
    (lambda s: (kv(s) <= qp(s)) & (kv(s) >= qp(s) - 3), MaskRule(True, 4)),
    (lambda s: (kv(s) <= qp(s)) * (qp(s) - 5 < kv(s)), MaskRule(True, 5)),
    (lambda s: (kv(s) <= qp(s)) & (kv(s) <= qp(s) + 4), CAUSAL),  # the tighter upper bound
    (lambda s: kv(s) == qp(s), MaskRule(True, 1)),
    (lambda s: torch.ones(s, s, dtype=torch.bool) & (kv(s) <= qp(s)), CAUSAL),
    (lambda s: torch.ones(s, s, dtype=torch.bool), MaskRule(False, None)),
    (lambda s: (kv(s) <= qp(s))[None, None].expand(2, 3, s, s), CAUSAL),
    (lambda s: (kv(s) <= qp(s)).view(1, s, s), CAUSAL),
    (lambda s: torch.where(kv(s) <= qp(s), 0.0, float("-inf")), CAUSAL),
    (lambda s: torch.where(kv(s) <= qp(s), 0.0, LOWEST), CAUSAL),
    (lambda s: torch.where(~(kv(s) <= qp(s)), float("-inf"), 0.0), CAUSAL),
    (lambda s: torch.where(kv(s) <= qp(s), 0.0, LOWEST).half(), CAUSAL),  # lowest -> -inf
    # float16's lowest as a number rounded into the float16 mask (-65500 is -65504 there)
    (lambda s: torch.where(kv(s) <= qp(s), torch.zeros((), dtype=torch.float16), -65500.0), CAUSAL),
    (lambda s: torch.where(kv(s) <= qp(s), 0.0, float("-inf")) + torch.where(kv(s) > qp(s) - 2, 0.0, float("-inf")),
     MaskRule(True, 2)),
])
def test_proven_masks(build: Callable[[Any], torch.Tensor], want: MaskRule) -> None:
    assert _square(build) == want


def test_positions_after_a_cache_prefix_are_the_bottom_right_rule() -> None:
    # q at arange(T) + (S - T), keys at arange(S): causal for S > T; the top-left mask is not.
    assert _rule(lambda t, s: A(s)[None, :] <= (A(t) + (s - t))[:, None]) == CAUSAL
    assert _rule(lambda t, s: (A(s)[None, :] <= (A(t) + (s - t))[:, None])
                 & (A(s)[None, :] > (A(t) + (s - t))[:, None] - 4)) == MaskRule(True, 4)
    assert _rule(lambda t, s: A(s)[None, :] <= A(t)[:, None]) is None


def test_a_view_to_other_sizes_is_no_band() -> None:
    # a [s, t] band viewed as [t, s]: its rows and keys are not the band's
    assert _rule(lambda t, s: (A(t)[None, :] <= A(s)[:, None] + (s - t)).view(t, s)) is None


def test_a_band_expanded_from_one_key_is_not_read_as_one() -> None:
    assert _square(lambda s: (kv(1) <= qp(s)).expand(s, s)) in (None, MaskRule(False, None))


def test_an_arange_with_a_symbolic_start_is_read() -> None:
    # arange(S - T, S): its start a SymInt node (at b524cfa sympify raised on the node)
    assert _rule(lambda t, s: A(s)[None, :] <= A(s - t, s)[:, None]) == CAUSAL
    assert _rule(lambda t, s: A(s)[None, :] <= A(s - t + 1, s + 1)[:, None]) is None  # one key ahead


def test_a_negative_constant_slice_start_counts_from_the_end() -> None:
    # Static sizes: q at arange(5)[-3:] = 2, 3, 4 over 5 keys at j - 5: every key is seen.
    gm = make_fx(lambda x: (A(5) - 5)[None, :] <= A(5)[-3:][:, None])(torch.empty(1))
    (out,) = [n for n in gm.graph.nodes if n.op == "output"][0].args
    assert mask_rule(out[0] if isinstance(out, (list, tuple)) else out, 3, 5) is None
    gm = make_fx(lambda x: A(5)[None, :] <= A(5)[-3:][:, None])(torch.empty(1))  # the rule, not read
    (out,) = [n for n in gm.graph.nodes if n.op == "output"][0].args
    assert mask_rule(out[0] if isinstance(out, (list, tuple)) else out, 3, 5) in (None, CAUSAL)


# -- not proven: each differs from the rule at some size (masks equal to it that are not read,
# such as a slice of rows and keys from 1, are left out: proving them would be no bug) ----------
@pytest.mark.parametrize("build", [
    lambda s: kv(s) < qp(s),                                    # the query's own key hidden
    lambda s: kv(s) <= qp(s) + 1,                               # one key ahead seen
    lambda s: kv(s) >= qp(s),                                   # anti-causal
    lambda s: kv(s) > qp(s) - 3,                                # a window bounded from below only
    lambda s: (kv(s) <= qp(s)) & (kv(s) > qp(s)),               # empty
    lambda s: (A(s)[None, :] <= A(s)[:, None]).transpose(0, 1),  # transposed: anti-causal
    lambda s: A(s, dtype=torch.int16)[None, :] <= A(s, dtype=torch.int16)[:, None],
    # int32 positions that wrap past 2**31 - 1 from the 7th token on (-2**31 there): keys after
    # the wrap are earlier than every query before it
    lambda s: (A(s, dtype=torch.int32) + (2**31 - 6))[None, :] <= (A(s, dtype=torch.int32) + (2**31 - 6))[:, None],
    lambda s: (A(s, dtype=torch.int32) - (2**31 - 2))[None, :] <= (A(s, dtype=torch.int32) - (2**31 - 2))[:, None],
    # int64 positions wrap too: past 2**63 - 1 from the 4th token on, below -2**63 for the first 3
    lambda s: (A(s) + (2**63 - 3))[None, :] <= (A(s) + (2**63 - 3))[:, None],
    lambda s: (A(s) - (2**63 - 2) - 5)[None, :] <= (A(s) - (2**63 - 2) - 5)[:, None],
    lambda s: A(s).float()[None, :] <= A(s).float()[:, None],
    lambda s: A(s, dtype=torch.int8).long()[None, :] <= A(s, dtype=torch.int8).long()[:, None],
    lambda s: (kv(s) <= qp(s)).float(),                         # 0 / 1: hides nothing
    lambda s: torch.where(kv(s) <= qp(s), float("-inf"), 0.0),  # branches swapped
    lambda s: torch.where(kv(s) <= qp(s), 0.0, -1e4),           # a finite, not lowest, value
    lambda s: torch.where(kv(s) <= qp(s), torch.tensor(0.0, dtype=torch.float16),
                          torch.tensor(torch.finfo(torch.float16).min, dtype=torch.float16)).float(),
    lambda s: torch.where(kv(s) <= qp(s), 0.0, float("-inf")) - torch.where(kv(s) > qp(s) - 2, 0.0, float("-inf")),
    lambda s: (kv(s) <= qp(s)) | (kv(s) > qp(s) - 2),
    lambda s: (A(s + 1)[None, :] <= A(s + 1)[:, None])[1:, :s],  # rows from 1, keys from 0: j <= i + 1
    lambda s: A(s)[None, :] <= A(s).cumsum(0)[:, None],
    # a running count of a fill of True is 1, 2, 3, ... (not the fill): j <= i + (i + 1) - 1 = 2i
    lambda s: kv(s) <= qp(s) + torch.ones(s, dtype=torch.bool).cumsum(0)[:, None] - 1,
    lambda s: A(s)[None, :] <= A(s)[:, None] + A(s)[:, None],   # j <= 2i
    lambda s: A(1, s + 1)[None, :] <= A(s)[:, None],            # keys at j + 1: strict
    lambda s: A(0, 2 * s, 2)[None, :] <= A(s)[:, None],         # keys at 2j
    lambda s: torch.full((s, s), False) & (kv(s) <= qp(s)),     # nothing seen
    lambda s: torch.where(kv(s) <= qp(s), kv(s).float(), float("-inf")),  # a bias j on the seen keys
    lambda s: A(1)[None, :] <= A(s)[:, None] - s + 1,           # one key column broadcast over the keys
    lambda s: A(s)[None, :] <= A(1)[:, None],                   # one query row broadcast over the queries
])
def test_unproven_masks(build: Callable[[Any], torch.Tensor]) -> None:
    assert _square(build) is None


# -- soundness holes (these fail at b524cfa) ---------------------------------------------------
def test_int32_positions_offset_by_a_multiple_of_a_size_are_not_read() -> None:
    # The offset's number part is 0 (within the int32 bound), but s * 2147483 is within s of
    # 2**31 at s = 1000: keys from 648 on wrap to -2**31 and are seen by every query before them.
    def pos(n: Any, s: Any) -> torch.Tensor:
        return A(n, dtype=torch.int32) + s * 2147483

    assert _square(lambda s: pos(s, s)[None, :] <= pos(s, s)[:, None]) is None
    mask = pos(1000, 1000)[None, :] <= pos(1000, 1000)[:, None]
    assert not torch.equal(mask, A(1000)[None, :] <= A(1000)[:, None])  # (it is not the rule there)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_positions_that_count_an_index_many_times_are_not_read(dtype: torch.dtype) -> None:
    # j + c * i <= i + c * i is j <= i in integers, but c * i wraps (int32: c = 2**31 - 3, from
    # i = 2 on; int64: c = 2**63 - 3): the offset's number part is 0, its index counted c times.
    # `add`'s alpha scales the index, as does a position added to itself again and again.
    c = 2**31 - 3 if dtype == torch.int32 else 2**63 - 3

    def by_alpha(s: Any) -> torch.Tensor:
        q, k = A(s, dtype=dtype)[:, None], A(s, dtype=dtype)[None, :]
        return torch.add(k, q, alpha=c) <= torch.add(q, q, alpha=c)

    def by_sums(s: Any) -> torch.Tensor:
        q, k = A(s, dtype=dtype)[:, None], A(s, dtype=dtype)[None, :]
        many = q
        for bit in bin(c)[3:]:  # many = c * q, by doubling and adding (c's bits after its top one)
            many = many + many + (q if bit == "1" else 0)
        return k + many <= q + many

    for build in (by_alpha, by_sums):
        assert not torch.equal(build(8), A(8)[None, :] <= A(8)[:, None])  # (it is not the rule there)
        assert _square(build) is None


def test_a_size_one_position_broadcast_is_not_read_as_varying() -> None:
    # arange(1) along the query dim is 0 in every row once broadcast: the mask is all True.
    assert _square(lambda s: torch.ones(s, s, dtype=torch.bool) & (kv(1) <= qp(s))) != CAUSAL
    assert _square(lambda s: torch.ones(s, s, dtype=torch.bool) & (kv(s) <= qp(1))) != CAUSAL
    # j - 0 > i - 2 in every row: i - 1 keys at the start are not a window.
    assert _square(lambda s: (kv(s) <= qp(s)) & (A(1)[None, :] > qp(s) - 2)) is None


def test_a_negative_symbolic_slice_start_counts_from_the_end() -> None:
    # arange(S)[-T:] is S - T + i: compared with keys at j - S, every key is seen.
    assert _rule(lambda t, s: (A(s) - s)[None, :] <= A(s)[-t:][:, None]) is None


def test_a_hiding_constant_cast_to_bool_hides_nothing() -> None:
    # bool(-inf) is True: where(keep, 0, True) adds 1.0 to the hidden keys' scores.
    assert _square(lambda s: torch.where(kv(s) <= qp(s), 0.0, torch.tensor(float("-inf")).bool())) is None


# -- end to end: proven masks become the kernel's flags and give eager's output ----------------
def _compiled(fn: Callable[..., torch.Tensor]) -> tuple[Callable[..., torch.Tensor], tileflow.Report]:
    torch._dynamo.reset()
    report = tileflow.Report()
    return torch.compile(fn, backend=tileflow.TileflowBackend({"target": "reference"}, report=report),
                         dynamic=True), report


def _prefixed(mask: Callable[[Any, Any], torch.Tensor], manual: bool = False) -> Callable[..., torch.Tensor]:
    """Attention of T new tokens over a cache prefix of P keys (S = P + T) under `mask(T, S)`."""
    def fn(q: torch.Tensor, k_past: torch.Tensor) -> torch.Tensor:
        k = torch.cat([k_past, q], 2)
        v = torch.cat([k_past.flip(-1), q * 2], 2)
        m = mask(q.shape[2], k.shape[2])
        if manual:
            return torch.softmax(q @ k.transpose(-1, -2) * 0.5 + m, -1) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    return fn


def _matches_eager(fn: Callable[..., torch.Tensor], sizes=((5, 3), (9, 4), (7, 11), (12, 2))) -> tileflow.Report:
    compiled, report = _compiled(fn)
    gen = torch.Generator().manual_seed(0)
    for t, p in sizes:
        q, k_past = torch.randn(1, 2, t, 8, generator=gen), torch.randn(1, 2, p, 8, generator=gen)
        want, got = fn(q, k_past), compiled(q, k_past)
        assert not want.isnan().any()
        assert (got - want).abs().max().item() <= 1e-5, (t, p)
    return report


def _window(t: Any, s: Any, w: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Keys at or before the query's position after a prefix (S - T), and `w(q_pos)` below them."""
    q_pos, k_pos = (A(t) + (s - t))[:, None], A(s)[None, :]
    return (k_pos <= q_pos) if w is None else (k_pos <= q_pos) & (k_pos > w(q_pos))


# The window is a literal in each: an int Dynamo reads from a closure or an argument becomes a
# size symbol under dynamic=True, and a symbolic window is not taken (a fixed count is).
_WINDOWS = {None: None, 1: lambda p: p - 1, 3: lambda p: p - 3, 6: lambda p: p - 6}


@pytest.mark.parametrize("manual", [False, True], ids=["sdpa", "manual"])
@pytest.mark.parametrize("window", list(_WINDOWS))
def test_a_proven_rule_matches_eager_after_a_prefix(manual: bool, window: int | None) -> None:
    below = _WINDOWS[window]

    def mask(t: Any, s: Any) -> torch.Tensor:
        keep = _window(t, s, below)
        return torch.where(keep, 0.0, LOWEST) if manual else keep

    report = _matches_eager(_prefixed(mask, manual))
    assert report.rewrites["meta_attention"] == 1 and report.rewrites.get("mask_as_rule") == 1
    assert not report.rewrites.get("mask_ranges") and not report.rewrites.get("mask_as_float32_bias")
    (graph,) = report.graphs
    assert graph.rewrites.get("mask_as_rule") == 1


def test_query_positions_sliced_from_the_keys_after_the_prefix_are_the_rule() -> None:
    report = _matches_eager(_prefixed(lambda t, s: A(s)[None, :] <= A(s)[s - t:][:, None]))
    assert report.rewrites.get("mask_as_rule") == 1


def test_positions_from_an_arange_with_a_symbolic_start_are_read() -> None:
    # arange(P, P + T): its start a SymInt node of the graph (at b524cfa sympify raised on it,
    # and the attention pass was rolled back for the whole graph).
    report = _matches_eager(_prefixed(lambda t, s: A(s)[None, :] <= A(s - t, s)[:, None]))
    assert not report.fallbacks, report.fallbacks
    assert report.rewrites.get("mask_as_rule") == 1


def test_the_top_left_mask_after_a_prefix_stays_a_mask() -> None:
    report = _matches_eager(_prefixed(lambda t, s: A(s)[None, :] <= A(t)[:, None] + 1))
    assert report.rewrites["meta_attention"] == 1 and not report.rewrites.get("mask_as_rule")


@pytest.mark.parametrize("manual", [False, True], ids=["sdpa", "manual"])
def test_an_all_true_mask_is_no_mask_not_causal(manual: bool) -> None:
    def mask(t: Any, s: Any) -> torch.Tensor:
        keep = torch.ones(t, s, dtype=torch.bool)
        return torch.where(keep, 0.0, float("-inf")) if manual else keep

    report = _matches_eager(_prefixed(mask, manual))
    assert report.rewrites.get("mask_as_rule") == 1


@pytest.mark.parametrize("mask", [
    # size-1 positions broadcast: all True / j <= 0 + P
    lambda t, s: torch.ones(t, s, dtype=torch.bool) & (A(1)[None, :] <= (A(t) + (s - t))[:, None]),
    # a negative symbolic slice start: positions S - T + i, not i - T
    lambda t, s: (A(s) - s)[None, :] <= A(s)[-t:][:, None],
    # -inf cast to bool: the hidden keys get +1.0
    lambda t, s: torch.where(A(s)[None, :] <= (A(t) + (s - t))[:, None], 0.0, torch.tensor(float("-inf")).bool()),
], ids=["size_one_broadcast", "negative_slice_start", "hiding_constant_cast_to_bool"])
def test_masks_that_are_not_the_rule_keep_eagers_output(mask: Callable[[Any, Any], torch.Tensor]) -> None:
    _matches_eager(_prefixed(mask))
