"""A mask built from positions becomes the meta-kernel's own causal / sliding-window rule
(`tileflow.mask_rule`, applied by the attention pass): proven at every size, or left as it is."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

import tileflow
from tileflow.mask_rule import MaskRule, mask_rule

META = torch.ops.tileflow.meta_attention.default
LOWEST = torch.finfo(torch.float32).min


# -- the proof on traced graphs ----------------------------------------------------------------
def _traced(build: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], t: int = 5,
            p: int = 3) -> tuple[torch.fx.GraphModule, torch.fx.Node, MaskRule | None]:
    """The graph of `build(x, past)` (a mask for T = x.shape[1] queries over P + T keys, P =
    past.shape[0]) traced with symbolic sizes, its output node and `mask_rule` of its mask."""
    gm = make_fx(build, tracing_mode="symbolic")(torch.zeros(1, t), torch.zeros(p))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    x, past = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    return gm, output, mask_rule(output.args[0], x.shape[1], past.shape[0] + x.shape[1])


def _traced_rule(build: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], t: int = 5, p: int = 3) -> MaskRule | None:
    """`mask_rule` of the mask `build(x, past)` makes (see `_traced`)."""
    return _traced(build, t, p)[2]


def _keeps(mask: torch.Tensor, t: int, p: int) -> torch.Tensor:
    """The keys a mask (bool, or additive: 0 where seen) shows each query: [T, P + T]."""
    keep = mask if mask.dtype == torch.bool else mask == 0
    return keep.reshape(-1, t, p + t)[0]


def _positions(x: torch.Tensor, past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions [T, 1] after a cache of P tokens, key positions [1, P + T]."""
    t, p = x.shape[1], past.shape[0]
    return (torch.arange(t) + p)[:, None], torch.arange(p + t)[None, :]


def _rule_mask(rule: MaskRule, t: int, p: int) -> torch.Tensor:
    """The keys the kernel's rule shows each query: [T, P + T]."""
    q = torch.arange(p, p + t)[:, None]
    k = torch.arange(p + t)[None, :]
    keep = k <= q if rule.causal else torch.ones(t, p + t, dtype=torch.bool)
    return keep & (k > q - rule.sliding_window) if rule.sliding_window is not None else keep


def _causal(x, past):
    q, k = _positions(x, past)
    return k <= q


def _windowed(x, past):
    # transformers' `and_masks` form: a fill of True, then each rule in turn.
    q, k = _positions(x, past)
    return q.new_ones((), dtype=torch.bool) & (k > q - 4) & (k <= q)


def _eager_float(x, past):
    q, k = _positions(x, past)
    return torch.where((k <= q)[None, None], torch.zeros(()), torch.tensor(LOWEST))


def _sdpa_conversion(x, past):
    q, k = _positions(x, past)
    return torch.where(~(k <= q), float("-inf"), 0.0)


def _mirrored_and_strict(x, past):
    q, k = _positions(x, past)
    return (q >= k) & (q - 3 < k)  # j <= p and j > p - 3: a window of 3


def _expanded_and_viewed(x, past):
    q, k = _positions(x, past)
    keep = (k <= q)[None, None].expand(2, 1, -1, -1)
    return keep.reshape(2, 1, 1, q.shape[0], k.shape[1])[:, 0]


def _two_masks_added(x, past):
    q, k = _positions(x, past)
    causal = torch.where(k <= q, 0.0, float("-inf"))
    window = torch.where(k > q - 6, 0.0, LOWEST)
    return causal + window


def _positions_sliced(x, past):
    # Keys numbered from 1, sliced back to the first P + T and lowered by one: positions again.
    t, p = x.shape[1], past.shape[0]
    k = (torch.arange(1, p + t + 2)[: p + t] - 1)[None, :]
    q = torch.arange(p + t)[p:][:, None]  # the last T positions
    return k <= q


def _packed_sequences_of_one(x, past):
    # transformers' packed-sequence term with no position ids passed: sequence starts where the
    # positions do not step by 1 (`diff` with a prepended position before the first), counted
    # by a running sum, compared at the query's and the key's positions: one sequence, all True.
    t, p = x.shape[1], past.shape[0]
    position_ids = (torch.arange(p + t))[None, :]
    starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    packed = starts.cumsum(-1)
    b = torch.arange(1)[:, None, None, None]
    q_idx = torch.arange(p, p + t)[None, None, :, None]
    kv_idx = torch.arange(p + t)[None, None, None, :]
    causal = position_ids[b, kv_idx] <= position_ids[b, q_idx]
    return q_idx.new_ones((), dtype=torch.bool) & causal & (packed[b, q_idx] == packed[b, kv_idx])


def _tril_of_ones(x, past):
    # SDPA's decomposition of is_causal, bottom-right aligned over a cache of P keys.
    return torch.ones(x.shape[1], past.shape[0] + x.shape[1], dtype=torch.bool).tril(past.shape[0])


def _band_of_triangles(x, past):
    keep = torch.ones(x.shape[1], past.shape[0] + x.shape[1], dtype=torch.bool)
    return keep.tril(past.shape[0]) & keep.triu(past.shape[0] - 3)


def _all_true(x, past):
    q, k = _positions(x, past)
    return torch.ones(q.shape[0], k.shape[1], dtype=torch.bool)


@pytest.mark.parametrize("build, rule", [
    (_causal, MaskRule(True, None)),
    (_windowed, MaskRule(True, 4)),
    (_eager_float, MaskRule(True, None)),
    (_sdpa_conversion, MaskRule(True, None)),
    (_mirrored_and_strict, MaskRule(True, 3)),
    (_expanded_and_viewed, MaskRule(True, None)),
    (_two_masks_added, MaskRule(True, 6)),
    (_positions_sliced, MaskRule(True, None)),
    (_packed_sequences_of_one, MaskRule(True, None)),
    (_all_true, MaskRule(False, None)),
    (_tril_of_ones, MaskRule(True, None)),
    (_band_of_triangles, MaskRule(True, 4)),
])
def test_masks_built_from_positions_are_proven_the_kernels_rule(build, rule: MaskRule) -> None:
    """Each form is proven the rule it is, and the rule's mask equals the model's at other
    query and cache lengths than the traced ones."""
    assert _traced_rule(build) == rule
    for t, p in ((1, 0), (4, 0), (7, 5), (13, 2)):
        assert torch.equal(_rule_mask(rule, t, p), _keeps(build(torch.zeros(1, t), torch.zeros(p)), t, p)), (t, p)


def _top_left(x, past):
    # SDPA's is_causal alignment: query i sees keys j <= i, whatever the cache holds.
    t, p = x.shape[1], past.shape[0]
    return torch.arange(p + t)[None, :] <= torch.arange(t)[:, None]


def _diagonal_hidden(x, past):
    q, k = _positions(x, past)
    return k < q  # the first query sees no key


def _empty_window(x, past):
    q, k = _positions(x, past)
    return (k <= q) & (k > q)


def _anti_causal(x, past):
    q, k = _positions(x, past)
    return k >= q


def _tril_top_left(x, past):
    return torch.ones(x.shape[1], past.shape[0] + x.shape[1], dtype=torch.bool).tril()  # top-left: not past the cache


def _per_query_term(x, past):
    q, k = _positions(x, past)
    return (k <= q) & (x[0] > 0)[:, None]  # queries read from the inputs: not one term for every query


def _two_key_terms(x, past):
    q, k = _positions(x, past)
    keys = torch.cat([past, x[0]])
    return (k <= q) & (keys > 0)[None, :] & (keys < 1)[None, :]  # joined one at a time: not read


def _half_eager_with_a_key_term(x, past):
    # float16's lowest, -65504, does not absorb a score: eager's softmax of a row the term hides
    # whole is not even, and no average of V stands for it.
    q, k = _positions(x, past)
    return torch.where((k <= q) & (torch.cat([past, x[0]]) > 0)[None, :], 0.0, torch.finfo(torch.float16).min).half()


def _half_eager_with_a_key_term_built_in_float16(x, past):
    # The same mask built in float16 itself (the one above is built in float32, where -65504
    # hides nothing, and is refused before its key term is weighed): it hides with float16's
    # lowest value, which does not absorb a score either.
    q, k = _positions(x, past)
    zero = torch.tensor(0.0, dtype=torch.float16)
    return torch.where((k <= q) & (torch.cat([past, x[0]]) > 0)[None, :], zero, torch.finfo(torch.float16).min)


def _int32_positions_offset_by_two_sizes(x, past):
    # Keys at j + T and queries at i + P + T, int32: j <= i + P is the rule, but a query's
    # position carries two sizes (P + T), which may pass 2**31 together where each stays below.
    t, p = x.shape[1], past.shape[0]
    q = torch.arange(t, dtype=torch.int32) + (p + t)
    k = torch.arange(p + t, dtype=torch.int32) + t
    return k[None, :] <= q[:, None]


def _bool_of_an_eager_mask_inverted(x, past):
    # where(bool(mask), 0, lowest) keeps the keys the mask hides
    return torch.where(torch.where(_causal(x, past), 0.0, LOWEST).bool(), 0.0, LOWEST)


def _bool_mask_clamped(x, past):
    # a bool mask promoted by the clamp: 1.0 where seen, 0.0 where "hidden" (nothing is hidden)
    return torch.clamp_min(_causal(x, past), LOWEST)


def _clamped_above_lowest(x, past):
    # a clamp at -1e4 makes every hidden key an ordinary score
    return torch.where(_causal(x, past), 0.0, float("-inf")).clamp_min(-1e4)


def _global_first_key(x, past):
    q, k = _positions(x, past)
    return (k <= q) | (k == 0)


def _sliced_from_one(x, past):
    t, p = x.shape[1], past.shape[0]
    q, k = (torch.arange(t) + p)[:, None], torch.arange(p + t + 1)[None, :]
    return (k <= q)[:, 1:]  # P + T keys, each shifted by one


def _int8_positions(x, past):
    t, p = x.shape[1], past.shape[0]
    q = (torch.arange(t) + p).to(torch.int8)[:, None]
    return torch.arange(p + t, dtype=torch.int8)[None, :] <= q


def _float_positions(x, past):
    t, p = x.shape[1], past.shape[0]
    return torch.arange(p + t, dtype=torch.float32)[None, :] <= (torch.arange(t) + p).float()[:, None]


def _causal_as_zero_one(x, past):
    q, k = _positions(x, past)
    return (k <= q).float()  # 0/1 added to the scores: hides nothing


def _half_lowest_widened(x, past):
    q, k = _positions(x, past)
    half = torch.where(k <= q, torch.tensor(0.0, dtype=torch.float16), torch.finfo(torch.float16).min)
    return half.float()  # -65504 is an ordinary float32 value


def _soft_fill(x, past):
    q, k = _positions(x, past)
    return torch.where(k <= q, 0.0, -1e4)


def _positions_from_an_input(x, past):
    q = x[0].long()[:, None]  # positions passed in: their values are not known
    return torch.arange(past.shape[0] + x.shape[1])[None, :] <= q


def _window_by_the_size(x, past):
    q, k = _positions(x, past)
    return (k <= q) & (k > q - x.shape[1] // 2)  # a window that grows with the step


def _other_key_count(x, past):
    # The rule for P + T - 1 keys: proven only against attention over that many keys.
    t, p = x.shape[1], past.shape[0]
    return torch.arange(p + t - 1)[None, :] <= (torch.arange(t) + p - 1)[:, None]


def _one_key_broadcast(x, past):
    # arange(1) is key 0 in every column once broadcast: `0 >= q - 3`, not a window.
    q, k = _positions(x, past)
    return (k <= q) & (torch.arange(1)[None, :] >= q - 3)


def _one_query_broadcast(x, past):
    q, k = _positions(x, past)
    return (k <= q) & (k > q[:1] - 4)  # the first query's position for every row


def _negated_fill(x, past):
    q, k = _positions(x, past)
    return (k <= q) & ~torch.ones((), dtype=torch.bool)  # False everywhere


def _packed_from_an_input(x, past):
    # Position ids passed in (`x` holds them): where sequences start is known only at run time.
    q, k = _positions(x, past)
    packed = (x[0].long() != 1).cumsum(-1)
    return (k <= q) & (packed[:, None] == torch.cat([packed[:1].expand(past.shape[0]), packed])[None, :])


def _read_one_row_back(x, past):
    # Positions read at each row's previous one: row 0 reads index -1, the last position
    # (negative indices wrap), and sees every key.
    t, p = x.shape[1], past.shape[0]
    pos = torch.arange(p + t)
    q = pos[torch.arange(t) - 1] + p + 1
    return torch.arange(p + t)[None, :] <= q[:, None]


def _key_term_beside_a_lowest_mask(x, past):
    # SDPA's -inf conversion of the rule and a key term, added to an eager mask of the rule: a
    # row whose keys the term hides sees the rule's hidden keys at the lowest value, and eager
    # averages them (the kernel, given the rule and the key mask, would see nothing).
    q, k = _positions(x, past)
    keyed = torch.where((k <= q) & (torch.cat([past, x[0]]) > 0)[None, :], 0.0, float("-inf"))
    return keyed + torch.where(k <= q, 0.0, LOWEST)


@pytest.mark.parametrize("build", [
    _key_term_beside_a_lowest_mask, _tril_top_left, _packed_from_an_input, _read_one_row_back, _per_query_term,
    _two_key_terms, _half_eager_with_a_key_term, _half_eager_with_a_key_term_built_in_float16,
    _int32_positions_offset_by_two_sizes, _bool_of_an_eager_mask_inverted, _clamped_above_lowest, _bool_mask_clamped,
    _top_left, _other_key_count, _one_key_broadcast, _negated_fill, _diagonal_hidden, _empty_window, _anti_causal,
    _global_first_key, _sliced_from_one, _int8_positions, _float_positions, _causal_as_zero_one, _half_lowest_widened, _soft_fill,
    _positions_from_an_input, _window_by_the_size,
])
def test_masks_that_are_not_the_rule_at_every_size_are_not_proven(build) -> None:
    """Near misses: an alignment, a hidden diagonal, a term read from the inputs per query, two
    key terms, a float16 eager (lowest-value) mask with a key term, the bool of a mask read
    inverted, a clamp above the lowest value, a bool mask clamped (its 0s and 1s), a bitwise or,
    a shifted slice, positions that wrap or round, a 0/1 or soft mask, a window of the step's
    size. None is proven (some equal the rule at some sizes only, or at none)."""
    assert _traced_rule(build) is None


# -- a term over the keys: the rule and a key mask -----------------------------------------------
def _with_a_padding_term(x, past):
    q, k = _positions(x, past)
    return (k <= q) & (torch.cat([past, x[0]]) > 0)[None, :]  # keys read from the inputs


def _sdpa_conversion_with_a_padding_term(x, past):
    q, k = _positions(x, past)
    return torch.where((k <= q) & (k > q - 3) & (torch.cat([past, x[0]]) > 0)[None, :], 0.0, float("-inf"))


def _expanded_padding_term(x, past):
    # transformers' form: attention_mask[batch_idx, kv_idx] over [B, 1, 1, S_kv], the whole
    # mask expanded to the batch.
    q, k = _positions(x, past)
    pad = torch.stack([torch.cat([past, x[0]]) > 0, torch.cat([past, x[0]]) < 1])
    term = pad[torch.arange(2)[:, None, None, None], k[None, None]]
    return (torch.ones((), dtype=torch.bool) & (k <= q)[None, None] & term).expand(2, 1, q.shape[0], k.shape[1])


def _one_query_broadcast(x, past):
    q, k = _positions(x, past)
    return (k <= q) & (k > q[:1] - 4)  # the first query's position for every row: a key term


def _prepend_that_breaks_the_run(x, past):
    q, k = _positions(x, past)
    pos = torch.arange(past.shape[0] + x.shape[1])
    steps = torch.diff(pos, prepend=pos[:1] - 2)  # 2 at the first key, 1 after: key 0 hidden
    return (k <= q) & (steps[None, :] == 1)


def _zero_one_key_term(x, past):
    q, k = _positions(x, past)
    return (k <= q) & torch.arange(past.shape[0] + x.shape[1])[None, :].bool()  # key 0 hidden


def _eager_with_a_key_term(x, past):
    # transformers' eager mask: rows the term hides whole average every key in eager
    q, k = _positions(x, past)
    return torch.where((k <= q) & (k > q - 4) & (torch.cat([past, x[0]]) > 0)[None, :], 0.0, LOWEST)


def _eager_keys_only_in_bfloat16(x, past):
    keys = torch.ones((), dtype=torch.bool) & (torch.cat([past, x[0]]) > 0)[None, :]  # (a bidirectional model's)
    # (transformers' form: `where(mask, tensor(0.0, dtype=dtype), finfo(dtype).min)`)
    zero = torch.tensor(0.0, dtype=torch.bfloat16)
    return torch.where(keys.expand(x.shape[1], -1), zero, torch.finfo(torch.bfloat16).min)


def _bool_of_an_eager_mask(x, past):
    # MPT's `masked_fill(scores, mask.bool(), lowest)`, as the attention pass reads it
    return torch.where(_eager_with_a_key_term(x, past).bool(), LOWEST, 0.0)


def _eager_clamped_at_lowest(x, past):
    # XGLM's `max(scores + mask, lowest)`, as the attention pass reads it: -inf becomes the lowest
    return _sdpa_conversion_with_a_padding_term(x, past).clamp_min(LOWEST)


def _eager_clamped_at_minus_infinity(x, past):
    # a clamp at -inf changes nothing: the lowest value still hides, and empty rows still average
    return _eager_with_a_key_term(x, past).clamp_min(float("-inf"))


def _eager_cast_into_half(x, past):
    # float32's lowest past float16's: the cast makes it -inf, a row the term hides whole sees nothing
    return _eager_with_a_key_term(x, past).half()


@pytest.mark.parametrize("build, causal, window, average", [
    (_with_a_padding_term, True, None, False), (_sdpa_conversion_with_a_padding_term, True, 3, False),
    (_expanded_padding_term, True, None, False), (_one_query_broadcast, True, None, False),
    (_prepend_that_breaks_the_run, True, None, False), (_zero_one_key_term, True, None, False),
    (_eager_with_a_key_term, True, 4, True), (_eager_keys_only_in_bfloat16, False, None, True),
    (_eager_cast_into_half, True, 4, False), (_bool_of_an_eager_mask, True, 4, True),
    (_eager_clamped_at_lowest, True, 3, True), (_eager_clamped_at_minus_infinity, True, 4, True),
])
def test_a_term_the_same_for_every_query_is_kept_as_the_key_mask(build, causal: bool, window: int | None,
                                                                  average: bool) -> None:
    """A term `&`-ed into the rule whose query dim is 1 (transformers' padding term, a term over
    the keys alone) is the rule's `key_mask`: that node itself, evaluated by the traced graph,
    and-ed with the kernel's rule equals the mask at other query and cache lengths, on fresh
    random inputs. A mask that hides with float32's or bfloat16's lowest value (an eager mask,
    MPT's `bool` of one, XGLM's clamp at it) says that the rows it hides whole average every key
    (`empty_rows_average`); cast into float16, that value is -inf, and such rows see nothing."""
    gm, output, rule = _traced(build)
    mask = output.args[0]
    assert rule is not None and (rule.causal, rule.sliding_window, rule.empty_rows_average) == (causal, window, average)
    key = rule.key_mask
    assert key.meta["val"].dtype == torch.bool and key.meta["val"].shape[-2] == 1
    output.args = ((mask, key),)  # the graph now returns the key mask too
    gm.recompile()
    hidden_by_the_term = 0
    for t, p in ((1, 0), (4, 0), (7, 5), (13, 2)):
        x, past = torch.randn(1, t), torch.randn(p)
        got_mask, got_key = gm(x, past)
        torch.testing.assert_close(got_mask, build(x, past))
        keeps = got_mask if got_mask.dtype == torch.bool else got_mask == 0  # every batch row
        rule_keeps = _rule_mask(MaskRule(causal, window), t, p).expand_as(keeps)
        assert torch.equal(rule_keeps & got_key, keeps), (t, p)
        hidden_by_the_term += int((rule_keeps & ~keeps).sum())
    assert hidden_by_the_term > 0  # (the term hides keys the rule shows: the comparison sees it)


# -- a float term the same for every query on the keys the rule keeps: the rule's key bias ------
def _alibi_counted_along_the_keys(x, past, dtype=torch.float32, slopes=None):
    """Falcon's ALiBi given a padding mask: two heads' slopes (or `slopes`, [2, 1, 1]) times each
    key's count of kept keys before it (an integer tensor), [2, 1, P + T], in `dtype`."""
    keep = (torch.cat([past, x[0]]) > 0).long()
    positions = (keep.cumsum(-1) - 1) * keep
    if slopes is None:
        slopes = torch.pow(torch.full((), 0.5), torch.arange(1, 3, dtype=torch.int32))[:, None, None]
    return (slopes * positions).to(dtype)


def _falcon_alibi_mask(x, past):
    # Falcon: `masked_fill(alibi / sqrt(d), eager_mask < -1, lowest)`, [2, T, P + T]
    q, k = _positions(x, past)
    eager = torch.where((k <= q) & (torch.cat([past, x[0]]) > 0)[None, :], 0.0, LOWEST)
    return torch.masked_fill(_alibi_counted_along_the_keys(x, past) / 4.0, eager < -1, LOWEST)


def _alibi_where_not_kept(x, past):
    q, k = _positions(x, past)
    keep = (k <= q) & (k > q - 3) & (torch.cat([past, x[0]]) > 0)[None, :]
    return torch.where(~keep, LOWEST, _alibi_counted_along_the_keys(x, past) * 0.25)


@pytest.mark.parametrize("build, window", [(_falcon_alibi_mask, None), (_alibi_where_not_kept, 3)])
def test_a_bounded_term_kept_where_the_rule_keeps_is_the_key_bias(build, window: int | None) -> None:
    """A float term the same for every query that provably holds no lowest value (positions
    times numbers), set to the lowest value where a rule-and-padding mask hides keys (Falcon folds
    its ALiBi into its mask so): the rule with the key mask and the term as its `key_bias`, and
    `where(rule & key_mask, key_bias, lowest)` evaluated by the traced graph equals the mask at
    other query and cache lengths, on fresh random inputs."""
    gm, output, rule = _traced(build)
    mask = output.args[0]
    assert rule is not None and (rule.causal, rule.sliding_window, rule.empty_rows_average) == (True, window, True)
    assert rule.key_bias is not None and rule.key_bias.meta["val"].shape[-2] == 1
    output.args = ((mask, rule.key_mask, rule.key_bias),)
    gm.recompile()
    for t, p in ((1, 0), (4, 0), (7, 5), (13, 2)):
        x, past = torch.randn(1, t), torch.randn(p)
        got_mask, key, bias = gm(x, past)
        torch.testing.assert_close(got_mask, build(x, past))
        keeps = _rule_mask(MaskRule(True, window), t, p) & key
        torch.testing.assert_close(torch.where(keeps, bias, LOWEST).expand_as(got_mask), got_mask)


def _float_term_from_an_input(x, past):
    q, k = _positions(x, past)
    eager = torch.where((k <= q) & (torch.cat([past, x[0]]) > 0)[None, :], 0.0, LOWEST)
    return torch.masked_fill(torch.cat([past, x[0]])[None, :] * 0.5, eager < -1, LOWEST)  # may hold any value


def _term_in_half(x, past):
    q, k = _positions(x, past)
    lowest = torch.finfo(torch.float16).min
    eager = torch.where(k <= q, torch.tensor(0.0, dtype=torch.float16), lowest)
    return torch.masked_fill(_alibi_counted_along_the_keys(x, past, torch.float16), eager < -1, lowest)


def _term_per_query(x, past):
    q, k = _positions(x, past)
    term = _alibi_counted_along_the_keys(x, past).expand(2, x.shape[1], -1)  # a query dim of T
    return torch.masked_fill(term, ~(k <= q), LOWEST)


def _hidden_below_the_lowest_value(x, past):
    q, k = _positions(x, past)
    eager = torch.where((k <= q) & (torch.cat([past, x[0]]) > 0)[None, :], 0.0, LOWEST)
    return torch.masked_fill(_alibi_counted_along_the_keys(x, past), eager <= LOWEST * 1.0000001, LOWEST)


def _hidden_where(compare: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """Falcon's form with `compare(eager_mask)` for its `eager_mask < -1`."""
    def build(x, past):
        q, k = _positions(x, past)
        eager = torch.where((k <= q) & (torch.cat([past, x[0]]) > 0)[None, :], 0.0, LOWEST)
        return torch.masked_fill(_alibi_counted_along_the_keys(x, past) / 4.0, compare(eager), LOWEST)
    return build


def _term_filled_with_a_number(x, past):
    q, k = _positions(x, past)
    return torch.masked_fill(_alibi_counted_along_the_keys(x, past), ~(k <= q), -1e4)  # not a hiding value


@pytest.mark.parametrize("build", [
    _float_term_from_an_input, _term_in_half, _term_per_query, _hidden_below_the_lowest_value,
    _term_filled_with_a_number,
    _hidden_where(lambda eager: eager <= -1e-50),  # -0.0 in float32, and 0 <= -0.0: every key hidden
    _hidden_where(lambda eager: eager < -3.4028234e38),  # float32's lowest in float32: no key hidden
])
def test_terms_that_may_hide_keys_or_vary_by_query_are_not_key_biases(build) -> None:
    """Near misses of the key bias: a term read from a float input (it may hold the lowest value,
    which eager's softmax treats as hidden), one in float16 (positions times slopes may round to
    its lowest), one with a query dim, a comparison that marks no key of an eager mask, a fill
    that hides nothing, and two comparisons whose number rounds in float32 (where torch compares)
    to one that marks every key or none (a second reader's find: read as doubles, both were
    proven). None is proven."""
    assert _traced_rule(build) is None


@pytest.mark.parametrize("dtype, keyed", [
    (torch.float8_e4m3fn, True), (torch.float8_e4m3fnuz, True), (torch.float8_e4m3fnuz, False),
])
def test_a_mask_cast_into_a_float8_dtype_without_infinity_is_not_the_rule(dtype: torch.dtype, keyed: bool) -> None:
    """float8_e4m3fn holds no -inf: a -inf cast into it saturates to its lowest, -448, a finite
    value, which a mask with a key term may not hide with (the rows the term hides whole average
    their keys in eager); the fnuz float8 dtypes make -inf NaN (every hidden key NaN, with a key
    term or not). A mask cast into one is not the kernel's rule."""
    def build(x, past):
        mask = (_sdpa_conversion_with_a_padding_term(x, past) if keyed
                else torch.where(_causal(x, past), 0.0, float("-inf")))
        return mask.to(dtype)

    hidden = build(torch.randn(1, 4), torch.randn(2)).float()
    assert not (hidden == float("-inf")).any()  # (what the cast made of -inf: -448 or NaN)
    assert _traced_rule(build) is None


# Random conjunctions of comparisons of positions: what the proof accepts, the kernel's rule
# gives at every size tried; what is the rule at every size tried, the proof accepts. Each draw
# starts from a rule (causal, maybe a window) written either way round, and adds a few random
# terms that may be redundant (`k <= q + 2` beside causal) or not.
_TERM = st.tuples(st.sampled_from(["le", "lt", "ge", "gt", "eq"]), st.booleans(), st.integers(-6, 6))


@st.composite
def _terms(draw) -> list[tuple[str, bool, int]]:
    """(op, keys first, c): `op(k, q + c)` with keys first, else `op(q, k + c)`."""
    terms = []
    if draw(st.booleans()):
        terms.append(("le", True, 0) if draw(st.booleans()) else ("ge", False, 0))  # k <= q
    if draw(st.booleans()):
        w = draw(st.integers(1, 6))
        terms.append(("gt", True, -w) if draw(st.booleans()) else ("lt", False, w))  # k > q - w
    return terms + draw(st.lists(_TERM, max_size=2))


def _conjunction(terms, aligned: bool):
    def build(x, past):
        t, p = x.shape[1], past.shape[0]
        q = (torch.arange(t) + (p if aligned else 0))[:, None]
        k = torch.arange(p + t)[None, :]
        keep = q.new_ones((), dtype=torch.bool)
        for op, keys_first, c in terms:
            lhs, rhs = (k, q + c) if keys_first else (q, k + c)
            keep = keep & getattr(torch, op)(lhs, rhs)
        return keep
    return build


def _a_rule_at(mask: Callable, sizes) -> bool:
    """Whether `mask` equals one rule (causal with a window of 1..P+T+1 or none, or all True) at every size."""
    candidates = [MaskRule(True, None), MaskRule(False, None)] + [MaskRule(True, w) for w in range(1, 40)]
    return any(all(torch.equal(_rule_mask(r, t, p), mask(torch.zeros(1, t), torch.zeros(p))) for t, p in sizes)
               for r in candidates)


# Draws per run: 10 in the default run, the 60 it had in the extended one (each traces a mask).
@pytest.mark.parametrize("examples", [10, pytest.param(60, marks=pytest.mark.extended)])
def test_random_conjunctions_are_proven_exactly_when_they_are_the_rule(examples: int) -> None:
    settings(max_examples=examples, deadline=None)(given(terms=_terms(), aligned=st.booleans())(_conjunction_checked))()


def _conjunction_checked(terms, aligned: bool) -> None:
    build = _conjunction(terms, aligned)
    rule = _traced_rule(build)
    sizes = [(t, p) for t in (2, 3, 8, 17) for p in (0, 2, 11)]
    if rule is not None:
        for t, p in sizes:
            assert torch.equal(_rule_mask(rule, t, p), build(torch.zeros(1, t), torch.zeros(p))), (rule, t, p)
    else:
        assert not _a_rule_at(build, sizes), "a rule at every size tried, not proven"


# Falcon-like masks `where(hidden, fill, term)` drawn at random: the term's form, the condition
# marking the hidden keys, the fill, a window and a padding term or not.
_KEY_TERMS = {
    "alibi": lambda x, past: _alibi_counted_along_the_keys(x, past) / 4.0,  # bounded: a key bias
    "alibi_bf16": lambda x, past: _alibi_counted_along_the_keys(x, past, torch.bfloat16).float(),
    "from_an_input": lambda x, past: torch.cat([past, x[0]])[None, None, :] * 1e38,  # may overflow
    "per_query": lambda x, past: (_alibi_counted_along_the_keys(x, past) + torch.arange(x.shape[1])[:, None]),
    # past float32's range on the way, scaled back after: -inf (or NaN) where the scale alone says 1e8
    "overflow_then_scaled": lambda x, past: _alibi_counted_along_the_keys(x, past, slopes=torch.full((2, 1, 1), -1e38))
    * 1e-30,
    "numbers_overflow": lambda x, past: _alibi_counted_along_the_keys(
        x, past, slopes=torch.full((2, 1, 1), 3e38) * 10.0) * 1e-30,
}
_NUMBERS = (-1.0, 0.0, -0.5, -1e-50, -1e30, -3.4028234e38, LOWEST)


@st.composite
def _key_biased_masks(draw) -> tuple[str, str, float, float, int | None, bool]:
    return (draw(st.sampled_from(sorted(_KEY_TERMS))), draw(st.sampled_from(["lt", "le", "not"])),
            draw(st.sampled_from(_NUMBERS)), draw(st.sampled_from([LOWEST, float("-inf"), -1e4, 0.0])),
            draw(st.sampled_from([None, 2, 4])), draw(st.booleans()))


def _key_biased_mask(term: str, compare: str, c: float, fill: float, window: int | None, padded: bool) -> Callable:
    def build(x, past):
        q, k = _positions(x, past)
        keep = k <= q
        if window is not None:
            keep = keep & (k > q - window)
        if padded:
            keep = keep & (torch.cat([past, x[0]]) > 0)[None, :]
        eager = torch.where(keep, 0.0, LOWEST)
        hidden = ~keep if compare == "not" else getattr(torch, compare)(eager, c)
        return torch.masked_fill(_KEY_TERMS[term](x, past), hidden, fill)
    return build


# Draws per run: 8 in the default run, the 40 it had in the extended one (each traces a mask and
# runs it at four sizes).
@pytest.mark.parametrize("examples", [8, pytest.param(40, marks=pytest.mark.extended)])
def test_random_key_biased_masks_are_proven_only_as_what_they_are(examples: int) -> None:
    """Whatever the form, a proven rule with a key bias is the mask: where the rule and the key
    mask keep a key the mask holds the key bias, finite and at most 2^100 in size, elsewhere a
    hiding value; and its rows that see no key average every key exactly when the fill is float32's
    finite lowest value and there is a padding term. Falcon's own forms (a bounded term, a
    comparison that marks exactly the eager mask's hidden keys, a hiding fill) are proven; others
    may or may not be."""
    settings(max_examples=examples, deadline=None)(given(form=_key_biased_masks())(_key_biased_mask_checked))()


def _key_biased_mask_checked(form) -> None:
    term, compare, c, fill = form[:4]
    build = _key_biased_mask(*form)
    gm, output, rule = _traced(build)
    marks_the_hidden = compare == "not" or (c in (-1.0, -0.5, -1e30) and compare in ("lt", "le"))
    if term in ("alibi", "alibi_bf16") and marks_the_hidden and fill in (LOWEST, float("-inf")):
        assert rule is not None and rule.key_bias is not None, form
    if rule is None or rule.key_bias is None:
        return
    output.args = ((output.args[0], rule.key_mask, rule.key_bias),)
    gm.recompile()
    for t, p in ((2, 0), (3, 2), (8, 0), (17, 11)):
        x, past = torch.randn(1, t), torch.randn(p)
        mask, key, bias = gm(x, past)
        keeps = _rule_mask(MaskRule(rule.causal, rule.sliding_window), t, p) & (True if key is None else key)
        keeps, bias = keeps.expand_as(mask), bias.expand_as(mask)
        assert torch.isfinite(bias).all() and bias.abs().max() <= 2.0**100, (form, t, p)
        assert torch.equal(mask[keeps], bias[keeps]), (form, t, p)
        assert (mask[~keeps] <= LOWEST).all(), (form, t, p)
    assert rule.empty_rows_average == (form[3] == LOWEST and rule.key_mask is not None), form


# -- the attention pass: the rule instead of the mask, outputs equal eager ----------------------
def _heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s, _ = x.shape
    q, k, v = x.split([64, 32, 32], dim=-1)
    return (q.reshape(b, s, 4, 16).transpose(1, 2), k.reshape(b, s, 2, 16).transpose(1, 2),
            v.reshape(b, s, 2, 16).transpose(1, 2))


def _sdpa_windowed(x: torch.Tensor) -> torch.Tensor:
    q, k, v = _heads(x)
    pos = torch.arange(x.shape[1])
    keep = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 5)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None], enable_gqa=True)


def _manual_eager_causal(x: torch.Tensor) -> torch.Tensor:
    # transformers' eager attention: repeat_kv, scores plus a where(keep, 0, lowest) mask, a
    # float32 softmax.
    q, k, v = _heads(x)
    k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
    pos = torch.arange(x.shape[1])
    mask = torch.where(pos[None, :] <= pos[:, None], torch.zeros(()), torch.tensor(LOWEST))
    scores = q @ k.transpose(-1, -2) * 0.25 + mask
    return scores.softmax(-1, dtype=torch.float32) @ v


def _sdpa_top_left(x: torch.Tensor) -> torch.Tensor:
    # Not the rule: every query sees keys up to its own index plus 2 (a lookahead of 2).
    q, k, v = _heads(x)
    pos = torch.arange(x.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pos[None, :] <= pos[:, None] + 2, enable_gqa=True)


@pytest.mark.parametrize("fn, causal, window", [(_sdpa_windowed, True, 5), (_manual_eager_causal, True, None),
                                                (_sdpa_top_left, None, None)])
@pytest.mark.parametrize("target", ["reference", "triton"])
def test_the_attention_pass_applies_the_rule_instead_of_the_mask(fn, causal, window, target: str) -> None:
    """A proven mask: meta_attention gets the kernel's flags and no bias or ranges (no mask node
    left in the graph); a mask that is not the rule (a lookahead) keeps its bias. Both equal eager
    (fp32) at lengths around the window, under the Triton interpreter too."""
    from test_attention import compile_attention

    x = torch.randn(1, 3, 128)
    compiled, _, gm, report = compile_attention(fn, x, target=target)
    for length in (2, 5, 6, 13):
        x = torch.randn(1, length, 128)
        torch.testing.assert_close(compiled(x), fn(x), rtol=1e-5, atol=1e-5)
    (meta,) = [n for n in gm.graph.nodes if n.target is META]
    args = list(meta.args) + [None] * (10 - len(meta.args))
    if causal is None:
        assert args[3] is not None and args[7] is not None and "mask_as_rule" not in report.rewrites
        return
    assert (args[3], args[4], args[7], args[9]) == (None, causal, None, window)
    assert report.rewrites["mask_as_rule"] == 1 and "mask_ranges" not in report.rewrites
    assert not any(n.target in (torch.ops.aten.where.self, torch.ops.aten.where.Scalar, torch.ops.aten.le.Tensor)
                   for n in gm.graph.nodes), "the mask is still computed"


_WINDOW = 3  # (a global: Dynamo would make a closure's int a size symbol under dynamic=True)


def _eager_over_a_cache(causal: bool, windowed: bool) -> Callable:
    """transformers' eager attention of T new tokens after P cached ones, under its mask for a
    padding mask `keys` ([B, P + T]): `where(rule & keys[b, kv], 0, lowest)`."""
    def attend(x, past_k, past_v, keys):
        q, k, v = _heads(x)
        k, v = (torch.cat([past, t], dim=2).repeat_interleave(2, dim=1) for past, t in ((past_k, k), (past_v, v)))
        t, s_kv = x.shape[1], k.shape[2]
        q_pos, k_pos = (torch.arange(t) + s_kv - t)[:, None], torch.arange(s_kv)[None, :]
        keep = torch.ones((), dtype=torch.bool)
        if causal:
            keep = keep & (k_pos <= q_pos)
        if windowed:
            keep = keep & (k_pos > q_pos - _WINDOW)
        keep = (keep & keys[:, None, None, :]).expand(x.shape[0], 1, t, s_kv)
        scores = q @ k.transpose(-1, -2) * 0.25 + torch.where(keep, torch.zeros(()), torch.tensor(LOWEST))
        return scores.softmax(-1, dtype=torch.float32) @ v
    return attend


@pytest.mark.parametrize("causal, window, target", [
    (True, None, "reference"), (True, _WINDOW, "reference"), (False, None, "reference"), (True, _WINDOW, "triton"),
    *(pytest.param(c, w, "triton", marks=pytest.mark.extended) for c, w in ((True, None), (False, None))),
])
def test_rows_an_eager_mask_hides_whole_average_every_key(causal: bool, window: int | None, target: str) -> None:
    """Under an eager mask (hiding with float32's lowest value) a query row whose keys the padding
    term hides whole has every score at that value, and eager's softmax averages all S_kv values
    there. The kernel, given the rule and the key mask, sees no key in such a row; the pass
    averages V into exactly those rows: rows before a left padding's first key, rows whose window
    holds only hidden keys (random keys leave such rows in the middle), a row of no key at all,
    chunks after a cache. Equal to eager at every row on fresh random inputs, one graph."""
    from test_attention import compile_attention

    fn = _eager_over_a_cache(causal, window is not None)
    gen = torch.Generator().manual_seed(7)

    def inputs(b: int, t: int, p: int) -> tuple[torch.Tensor, ...]:
        keys = torch.rand(b, p + t, generator=gen) < 0.4
        keys[0], keys[1], keys[2, : (p + t) // 2] = True, False, False  # all seen, none, left-padded
        return (torch.randn(b, t, 128, generator=gen), torch.randn(b, 2, p, 16, generator=gen),
                torch.randn(b, 2, p, 16, generator=gen), keys)

    compiled, _, gm, report = compile_attention(fn, *inputs(4, 5, 3), target=target)
    averaged = 0
    for b, t, p in ((4, 2, 2), (3, 6, 4), (5, 9, 7), (4, 12, 2)):
        args = inputs(b, t, p)
        torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-5, atol=1e-5)
        keys = args[3][:, None, :].expand(b, t, p + t)
        q_pos, k_pos = torch.arange(p, p + t)[:, None], torch.arange(p + t)[None, :]
        rule = (k_pos <= q_pos if causal else torch.ones_like(keys[0])) & (k_pos > q_pos - (window or p + t))
        averaged += int((~(keys & rule).any(-1)).sum())
    assert averaged > 0  # (rows that see no key were met)
    assert report.rewrites["mask_as_rule"] == report.rewrites["empty_rows_average"] == 1, report.rewrites
    (meta,) = [n for n in gm.graph.nodes if n.target is META]
    assert (meta.args[4], (list(meta.args) + [None] * 10)[9]) == (causal, window)


@pytest.mark.parametrize("clamp", [float("-inf"), LOWEST])
def test_an_eager_mask_clamped_at_or_below_its_lowest_value_still_averages_rows_it_hides_whole(clamp: float) -> None:
    """`clamp_min(mask, c)` of an eager (finfo.min) mask with a padding term holds its hidden keys
    at max(lowest, c): the lowest value for c = -inf too, so a left-padding row that sees no key
    averages V in eager (it was read as hiding with -inf: such rows came out 0)."""
    from test_attention import compile_attention

    def attend(x, pad):
        q, k, v = _heads(x)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        q_pos, k_pos = torch.arange(x.shape[1])[:, None], torch.arange(x.shape[1])[None, :]
        mask = torch.where((k_pos <= q_pos) & pad[:, None, None, :], 0.0, LOWEST).clamp_min(clamp)
        scores = q @ k.transpose(-1, -2) * 0.25 + mask
        return scores.softmax(-1, dtype=torch.float32) @ v

    gen = torch.Generator().manual_seed(0)

    def inputs(b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        pad = torch.ones(b, t, dtype=torch.bool)
        pad[0, :3] = False  # batch row 0's first 3 queries see no key
        return torch.randn(b, t, 128, generator=gen), pad

    compiled, _, _, report = compile_attention(attend, *inputs(2, 6))
    for b, t in ((2, 6), (3, 9)):
        args = inputs(b, t)
        torch.testing.assert_close(compiled(*args), attend(*args), rtol=1e-5, atol=1e-5)
    assert report.rewrites.get("meta_attention") == report.rewrites.get("empty_rows_average") == 1, report.rewrites


# -- transformers models ------------------------------------------------------------------------
@pytest.mark.parametrize("name, implementation, window, use_cache", [
    ("llama", "eager", None, True), ("llama", "sdpa", None, False), ("mistral", "eager", 8, False),
    ("deepseek_v3_mla", "sdpa", None, True),
    # (SDPA's window: the unit tests above; the tileflow implementation's window: test_attention's)
    *(pytest.param(*case, marks=pytest.mark.extended) for case in (
        ("mistral", "sdpa", 8, True), ("mistral", "tileflow", 8, True), ("gemma2", "eager", 8, True))),
])
def test_models_masks_become_the_kernels_rule(name: str, implementation: str, window: int | None,
                                              use_cache: bool) -> None:
    """transformers builds a mask tensor under torch.compile for eager attention and for a
    sliding window (its shortcut to `is_causal` is off while tracing), and hands it to tileflow's
    own attention function (attn_implementation="tileflow") too; without a cache (`use_cache=False`,
    as the demo and bench/e2e.py call), it joins a packed-sequence term over the positions,
    `packed[q] == packed[k]`, which is all True there. DeepSeek-V3's latent attention (values of
    another head size) reaches the graph as SDPA's decomposition, `where(ones(S, S).tril(), 0,
    -inf)`. Every layer's is proven
    the kernel's rule: no float32 [S, S] bias and no ranges are made, the report counts one rule
    per attention, the kernels apply the window, and the logits equal eager at lengths on both
    sides of the window."""
    from models import MODELS, ZOO

    if implementation == "tileflow":
        tileflow.register_transformers()  # its attention function calls meta_attention with the mask
    model = (MODELS[name]() if name in MODELS else ZOO[name][0]()).eval()
    model.config._attn_implementation = implementation
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(report=report), dynamic=True)
    with torch.no_grad():
        for length in (5, 9, 12, 17, 23):
            ids = torch.randint(0, model.config.vocab_size, (1, length))
            torch.testing.assert_close(compiled(ids, use_cache=use_cache).logits, model(ids, use_cache=use_cache).logits,
                                       rtol=1e-4, atol=1e-4)
    rewrites = report.rewrites
    assert "mask_as_float32_bias" not in rewrites and "mask_ranges" not in rewrites, rewrites
    # Per graph: every attention's mask a rule (SDPA's graph for steps shorter than the window
    # gets no mask: transformers passes is_causal there, as tileflow has always taken).
    per_graph = [p.rewrites for g in report.graphs for p in g.passes if p.name == "attention"]
    layers = model.config.num_hidden_layers
    assert all(r.get("mask_as_rule") == layers or (implementation != "eager" and "mask_as_rule" not in r)
               for r in per_graph), per_graph
    assert rewrites["mask_as_rule"] >= 2, rewrites
    specs = [dict(k.spec["params"]) for k in report.kernels if k.spec["op"] == "meta_attention"]
    assert specs and all(not s["bias"] and s["causal"] for s in specs), specs
    # (Gemma-2 alternates windowed and full layers; SDPA's short steps are causal only.)
    assert any(s["sliding_window"] for s in specs) == (window is not None), specs


def test_a_cached_chunk_proves_the_rule_over_the_cache_prefix() -> None:
    """Chunked prefill against a DynamicCache: the chunk's queries sit after the cached tokens
    (positions `arange(T) + past`, keys `arange(past + T)`, past a symbol), and the mask of the
    layer whose keys the mask is sized by is proven causal there; logits equal one eager pass
    over the whole prompt."""
    import transformers
    from models import MODELS

    model = MODELS["llama"]().eval()
    model.config._attn_implementation = "eager"
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(report=report), dynamic=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 30))
    with torch.no_grad():
        cache = transformers.DynamicCache(config=model.config)
        got = torch.cat([compiled(ids[:, a:b], past_key_values=cache, use_cache=True).logits
                         for a, b in ((0, 9), (9, 20), (20, 30))], dim=1)
        torch.testing.assert_close(got, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert len(report.graphs) == 2  # the first chunk, then every chunk after a cache
    (cached,) = [p.rewrites for p in report.graphs[1].passes if p.name == "attention"]
    assert cached.get("mask_as_rule", 0) >= 1, cached


# -- left-padded batches --------------------------------------------------------------------------
def _left_padded(vocab: int, batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention_mask whose rows after the first are left-padded: by 3, and by
    all but 2 tokens (rows whose first queries see no key at all)."""
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :3] = 0
    if batch > 2:
        mask[2, :length - 2] = 0
    return ids, mask


@pytest.mark.parametrize("name, implementation, target", [
    ("llama", "sdpa", "reference"), ("qwen2", "tileflow", "reference"), ("llama", "eager", "reference"),
    ("gpt_oss", "eager", "reference"), ("mpt", "eager", "reference"), ("xglm", "eager", "reference"),
    # (a key mask and a window under the Triton interpreter: test_rows_an_eager_mask_hides_whole_...)
    *(pytest.param(*case, marks=pytest.mark.extended) for case in (
        ("mistral", "sdpa", "triton"), ("mistral", "eager", "triton"), ("gemma2", "eager", "reference"))),
])
def test_left_padded_batches_keep_only_the_padding_term(name: str, implementation: str, target: str) -> None:
    """With an attention_mask, transformers' mask is `causal (& window) & attention_mask[b, kv]`:
    proven the kernel's rule and a key mask, every layer reads the [B, 1, 1, S_kv] padding term
    as its bias where it read a float32 [B, 1, S, S_kv] one (with SDPA, with a window, and through
    attn_implementation="tileflow"). With eager attention (transformers' `finfo.min` mask), the
    rows the padding leaves no key average every key's value after the kernel, as eager's softmax
    of equal scores does, but with gpt-oss's sinks, which take such a row's weight in eager (the
    kernel's 0); MPT reads the mask as `masked_fill(scores, mask.bool(), lowest)` (with ALiBi),
    XGLM clamps the masked scores at the lowest value. Logits equal eager's at every position, the padded rows' included, over batch
    sizes and lengths on both sides of the windows, with one graph."""
    from models import MODELS, ZOO

    if implementation == "tileflow":
        tileflow.register_transformers()
    model = (MODELS[name]() if name in MODELS else ZOO[name][0]()).eval()
    model.config._attn_implementation = implementation
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"target": target}, report=report), dynamic=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for batch, length in ((2, 5), (3, 9), (3, 14)):
            ids, mask = _left_padded(model.config.vocab_size, batch, length, gen)
            torch.testing.assert_close(compiled(ids, attention_mask=mask, use_cache=False).logits,
                                       model(ids, attention_mask=mask, use_cache=False).logits, rtol=1e-4, atol=1e-4)
    assert len(report.graphs) == 1
    rewrites = report.rewrites
    layers = model.config.num_hidden_layers
    assert rewrites["mask_as_rule"] == rewrites["key_mask"] == layers and "mask_as_float32_bias" not in rewrites, rewrites
    averaged = layers if implementation == "eager" and name != "gpt_oss" else 0
    assert rewrites.get("empty_rows_average", 0) == averaged, rewrites
    specs = [dict(k.spec["params"]) for k in report.kernels if k.spec["op"] == "meta_attention"]
    assert specs and all(s["bias"] and s["causal"] for s in specs), specs
    assert any(s["sliding_window"] for s in specs) == (name in ("mistral", "gpt_oss", "gemma2")), specs


def test_falcons_alibi_along_a_padding_mask_is_the_rule_and_a_key_bias() -> None:
    """Falcon with ALiBi folds its slopes times positions counted along the padding mask into the
    mask it hands SDPA, `[B, H, S, S_kv]`: that mask is proven the causal rule, the key mask and
    the positions as a `[B, H, 1, S_kv]` key bias, so no mask over the rows is read, and the
    logits equal eager at every position of a left-padded batch with holes and a row padded all
    but its last token."""
    from models import _causal_lm

    torch.manual_seed(0)
    model = _causal_lm("FalconConfig", "FalconForCausalLM", num_key_value_heads=None, intermediate_size=None,
                       max_position_embeddings=None, alibi=True)().eval()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend(report=report), dynamic=True)
    with torch.no_grad():
        for length in (6, 11):
            ids = torch.randint(0, model.config.vocab_size, (3, length))
            mask = torch.ones(3, length, dtype=torch.long)
            mask[0, [1, 3]] = 0
            mask[1, :4] = 0
            mask[2, :-1] = 0
            torch.testing.assert_close(compiled(ids, attention_mask=mask, use_cache=False).logits,
                                       model(ids, attention_mask=mask, use_cache=False).logits, rtol=1e-4, atol=1e-4)
    rewrites = report.rewrites
    assert (rewrites["mask_as_rule"], rewrites["key_mask"], rewrites["key_bias"], rewrites["empty_rows_average"]) == (
        2, 2, 2, 2), rewrites
    assert "mask_ranges" not in rewrites and not report.fallbacks, rewrites
    specs = [dict(k.spec["params"]) for k in report.kernels if k.spec["op"] == "meta_attention"]
    assert specs and all(s["bias"] and s["causal"] for s in specs), specs


# Mistral's eager attention (a sliding window in the mask) in the extended run: the left-padded
# batches test below runs eager masks, and this one Llama's generation, in the default run.
@pytest.mark.parametrize("name, implementation", [("llama", "sdpa"),
                                                  pytest.param("mistral", "eager", marks=pytest.mark.extended)])
def test_left_padded_generation_equals_eager(name: str, implementation: str) -> None:
    """`generate` on a left-padded batch through a compiled forward: the prefill's mask is the
    rule and the padding term (Mistral's window too: `generate` passes the cache in, whose
    sliding layers' window Dynamo makes a symbol of at least 2, so the keys' offset `Max(0, 1 -
    w)` is 0 only by that symbol's range), and with SDPA each decode step's (one query over the
    cache) too; eager's one-query masks stay biases. Greedy tokens equal eager generation's."""
    from models import MODELS

    model = MODELS[name]().eval()
    model.config._attn_implementation = implementation
    ids, mask = _left_padded(model.config.vocab_size, 3, 9, torch.Generator().manual_seed(6))
    # 3 new tokens: the prefill's graph, then the decode graph taken twice (no more paths after)
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    report = tileflow.Report()
    forward = model.forward
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        model.forward = torch.compile(forward, backend=tileflow.TileflowBackend(report=report), dynamic=True)
        try:
            got = model.generate(ids, **kwargs)
        finally:
            model.forward = forward
    assert torch.equal(got, want)
    per_graph = [p.rewrites for g in report.graphs for p in g.passes if p.name == "attention"]
    layers = model.config.num_hidden_layers
    assert len(per_graph) >= 2 and per_graph[0].get("key_mask") == layers, per_graph  # the prefill
    assert all(r.get("key_mask") == layers for r in per_graph) == (implementation == "sdpa"), per_graph


def test_a_per_batch_key_term_of_one_key_after_a_cache_is_averaged_without_a_crash() -> None:
    """A key term broadcast along the keys too (`flag[b]`, [B, 1, 1, 1]: a whole sequence kept or
    hidden) is the same for every query and proven a key mask; under an eager mask with a cache
    (S < S_kv) the empty-row flags sliced its cumsum of one element at S_kv - S and the pass fell
    over (rolled back: 'Attempting to broadcast a dimension of length s at -2 ... [B, 4, 0, 16]')."""
    from test_attention import compile_attention

    def attend(x, past_k, past_v, flags):
        q, k, v = _heads(x)
        k, v = (torch.cat([past, t], dim=2).repeat_interleave(2, dim=1) for past, t in ((past_k, k), (past_v, v)))
        t, s_kv = x.shape[1], k.shape[2]
        q_pos, k_pos = (torch.arange(t) + s_kv - t)[:, None], torch.arange(s_kv)[None, :]
        keep = (k_pos <= q_pos) & flags[:, None, None, None]
        scores = q @ k.transpose(-1, -2) * 0.25 + torch.where(keep, torch.zeros(()), torch.tensor(LOWEST))
        return scores.softmax(-1, dtype=torch.float32) @ v

    gen = torch.Generator().manual_seed(3)

    def inputs(b: int, t: int, p: int) -> tuple[torch.Tensor, ...]:
        flags = torch.arange(b) % 2 == 0  # every other sequence hidden whole: its rows average V
        return (torch.randn(b, t, 128, generator=gen), torch.randn(b, 2, p, 16, generator=gen),
                torch.randn(b, 2, p, 16, generator=gen), flags)

    compiled, _, _, report = compile_attention(attend, *inputs(4, 5, 3))
    for b, t, p in ((4, 2, 2), (3, 6, 4)):
        args = inputs(b, t, p)
        torch.testing.assert_close(compiled(*args), attend(*args), rtol=1e-5, atol=1e-5)
    assert report.rewrites.get("meta_attention") == report.rewrites.get("empty_rows_average") == 1, report.rewrites
