"""Per-request sampling: the keyed noise is uniform and independent across rows, draws follow the
filtered softmax, top-k/top-p keep exactly the tokens they should (property test against a plain
float64 reference), and a row's token depends on nothing but its logits, seed and position."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tileflow.serving import Request, SamplingParams, next_tokens
from tileflow.serving.sampling import filter_logits, gumbel_noise, keyed_bits, row_keys, unit_interval


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    expected = probs.double() * n
    return (((counts.double() - expected) ** 2) / expected).sum().item()


@pytest.mark.parametrize("same_seed", [False, True])
def test_keyed_noise_is_uniform_and_independent_across_rows(same_seed: bool) -> None:
    seeds = torch.full((64,), 12345) if same_seed else torch.randint(0, 2**62, (64,))
    u = unit_interval(keyed_bits(torch.from_numpy(row_keys(seeds.numpy(), np.arange(64))), 4096))
    assert u.dtype == torch.float32 and bool(((u > 0) & (u < 1)).all())
    # 16 equal buckets over 262144 values: chi-square with 15 degrees of freedom stays far below 60
    # (p < 1e-6) for uniform numbers; a biased hash (say, its low bits) fails it.
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert _chi_square(counts, torch.full((16,), 1 / 16)) < 60
    # Rows (consecutive positions, one seed or many) are uncorrelated: each correlation is about
    # N(0, 1/64) over 4096 values, so none of the 2016 pairs comes near 0.1.
    corr = torch.corrcoef(u.double())
    corr.fill_diagonal_(0)
    assert corr.abs().max().item() < 0.1


def test_noise_stays_finite_at_the_extreme_hash_values() -> None:
    """Every 32-bit value maps inside (0, 1) and to finite Gumbel noise: (2**24 - 1 + 1/2) / 2**24
    rounded to 1.0 in float32 once, which made the noise +inf and the draw an arbitrary token."""
    bits = torch.tensor([0, 1, 2**24 - 1, 2**31, 2**32 - 256, 2**32 - 1], dtype=torch.int64)
    u, g = unit_interval(bits), gumbel_noise(bits)
    assert bool(((u > 0) & (u < 1)).all()) and bool(torch.isfinite(g).all())
    assert g[0].item() == pytest.approx(33 * math.log(2), rel=1e-5)  # u = 2**-33: the largest noise
    assert g[-1].item() == pytest.approx(-math.log(24 * math.log(2)), rel=1e-5)  # u just under 1


def test_seeds_that_agree_in_32_bits_draw_differently() -> None:
    # 12345 and 6695189633 folded to the same 32-bit key when the seed's halves were mixed into one.
    a, b = row_keys(np.array([12345, 6695189633]), np.array([5, 5]))
    assert (a != b).all()


def test_draws_follow_the_temperature_scaled_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 30000
    params = [SamplingParams(0.7, seed=s) for s in range(n)]
    tokens = next_tokens(logits.expand(n, -1), params, [5] * n)
    counts = torch.bincount(tokens, minlength=6)
    # 5 degrees of freedom: 35 is p ~ 1e-6; argmax (every draw token 0) would give about 13000.
    assert _chi_square(counts, (logits.double() / 0.7).softmax(0)) < 35


@pytest.mark.parametrize("top_k,top_p,min_p,support", [(2, 1.0, 0.0, [0, 1]), (0, 0.6, 0.0, [0, 1]),
                                                        (3, 0.9, 0.0, [0, 1, 2]), (0, 1.0, 0.2, [0, 1, 2])])
def test_draws_stay_in_the_filtered_set(top_k: int, top_p: float, min_p: float, support: list[int]) -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()  # probabilities 0.5, 0.3, 0.15, 0.05
    n = 20000
    params = [SamplingParams(1.0, top_k=top_k, top_p=top_p, min_p=min_p, seed=s) for s in range(n)]
    counts = torch.bincount(next_tokens(logits.expand(n, -1), params, [0] * n), minlength=4)
    kept = torch.zeros(4, dtype=torch.bool)
    kept[support] = True
    assert counts[~kept].sum() == 0
    probs = logits.exp()[kept] / logits.exp()[kept].sum()
    assert _chi_square(counts[kept], probs) < 35


def _reference_keep(row: list[float], top_k: int, top_p: float, min_p: float) -> tuple[set[int], bool]:
    """The tokens top-k (with every token tied with the k-th, as transformers' and vLLM's
    filters), then top-p, then min-p keep, by the definition (float64, top-p's ties broken by
    index), and whether some token sits within float32 rounding of a cut (it may go either
    way)."""
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    if top_k:
        kth = row[order[min(top_k, len(order)) - 1]]
        order = [i for i in order if row[i] >= kth]
    weights = [math.exp(row[i] - row[order[0]]) for i in order]  # p / p_max
    total, before, kept, near = sum(weights), 0.0, set(), False
    for i, w in zip(order, weights):
        if top_p < 1:
            near |= abs(before / total - top_p) < 1e-5
        if min_p > 0:
            near |= abs(math.log(w) - math.log(min_p)) < 1e-5
        if (top_p >= 1 or before < top_p * total) and w >= min_p:
            kept.add(i)
        before += w
    return kept, near


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(-40, 40), min_size=1, max_size=12), min_size=1, max_size=6),
    top_k=st.lists(st.integers(0, 14), min_size=6, max_size=6),
    top_p=st.lists(st.sampled_from([0.05, 0.3, 0.5, 0.77, 0.9, 1.0]), min_size=6, max_size=6),
    min_p=st.lists(st.sampled_from([0.0, 0.0, 0.01, 0.2, 0.6, 1.0]), min_size=6, max_size=6),
)
def test_filter_keeps_exactly_the_top_k_top_p_min_p_set(rows, top_k, top_p, min_p) -> None:
    width = max(map(len, rows))
    # Logits on a grid of 1/8 (ties included), padded rows filled with very unlikely tokens.
    padded = [[v / 8 for v in r] + [-100.0 - i for i in range(width - len(r))] for r in rows]
    n = len(rows)
    out = filter_logits(torch.tensor(padded), torch.tensor(top_k[:n]), torch.tensor(top_p[:n]), torch.tensor(min_p[:n]))
    for i, row in enumerate(padded):
        kept = {j for j in range(width) if out[i, j] != -math.inf}
        want, near_the_cut = _reference_keep(row, top_k[i], top_p[i], min_p[i])
        if not near_the_cut:
            assert kept == want, (row, top_k[i], top_p[i], min_p[i])
        assert max(row) in {row[j] for j in kept}  # the most likely token always stays
        assert all(out[i, j] == row[j] for j in kept)


def test_top_k_keeps_the_tokens_transformers_keeps_with_ties() -> None:
    """bf16 logits tie often: the cut keeps every token tied with the k-th, as transformers'
    `TopKLogitsWarper` does (the first filter cut ties by token id, favouring low ids)."""
    from transformers.generation.logits_process import TopKLogitsWarper

    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(64, 40, generator=gen) * 0.5).round(decimals=1)  # many ties per row
    for k in (1, 2, 5, 13, 40, 41):
        ks = torch.full((64,), k)
        ours = filter_logits(logits, ks, torch.ones(64), torch.zeros(64))
        theirs = TopKLogitsWarper(top_k=k)(None, logits.clone())
        assert torch.equal(ours == -math.inf, theirs == -math.inf), k


def test_a_rows_token_depends_only_on_its_logits_seed_and_position() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 50, generator=gen)
    params = [SamplingParams(0.9, top_k=10 * (i % 3), top_p=(1.0, 0.8)[i % 2], min_p=0.05 * (i % 4 == 3), seed=100 + i)
              for i in range(8)]
    positions = list(range(20, 28))
    together = next_tokens(logits, params, positions)
    alone = torch.stack([next_tokens(logits[i : i + 1], params[i : i + 1], positions[i : i + 1])[0] for i in range(8)])
    reversed_ = next_tokens(logits.flip(0), params[::-1], positions[::-1]).flip(0)
    assert together.tolist() == alone.tolist() == reversed_.tolist()
    # Another seed or position draws again: over 8 rows, some token changes.
    assert next_tokens(logits, [SamplingParams(0.9, seed=7)] * 8, positions).tolist() != \
        next_tokens(logits, [SamplingParams(0.9, seed=8)] * 8, positions).tolist()
    # Greedy rows (temperature 0, or below vLLM's 1e-5) are the argmax.
    greedy = [SamplingParams(), SamplingParams(1e-6, seed=1)] * 4
    assert next_tokens(logits, greedy, positions).tolist() == logits.argmax(-1).tolist()


def test_a_top_p_below_float32s_range_keeps_the_best_token() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert next_tokens(logits, [SamplingParams(1.0, top_p=1e-46, seed=1)], [0]).item() == 1


def test_requests_seed_themselves_from_torch() -> None:
    torch.manual_seed(11)
    first = Request(0, [1, 2], 4, sampling=SamplingParams(0.8)).sampling.seed
    torch.manual_seed(11)
    again = Request(1, [1, 2], 4, sampling=SamplingParams(0.8)).sampling.seed
    assert first is not None and first == again
    assert Request(2, [1], 1, sampling=SamplingParams(0.8, seed=5)).sampling.seed == 5
    assert Request(3, [1], 1).sampling.seed is None  # greedy needs none


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": True}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"top_k": 2**70}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"),
    ({"min_p": -0.1}, "min_p"), ({"min_p": 1.1}, "min_p"), ({"logprobs": -1}, "logprobs"), ({"logprobs": 1.5}, "logprobs"), ({"logprobs": True}, "logprobs"),
])
def test_bad_sampling_parameters_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_requests_refuse_sampling_that_is_not_sampling_params() -> None:
    with pytest.raises(ValueError, match="SamplingParams"):
        Request(0, [1], 1, sampling={"temperature": 0.7})
    with pytest.raises(ValueError, match="seed"):
        next_tokens(torch.zeros(1, 4), [SamplingParams(0.5)], [0])  # unseeded: the request seeds it


@pytest.mark.parametrize("filters", [{}, {"top_k": 40, "top_p": 0.9, "min_p": 0.02}])
def test_fused_draws_equal_eager_draws(filters: dict) -> None:
    """The draw compiled by Inductor (the default on CUDA; here its C++ backend) gives the eager
    draw's tokens, for one row and for many, temperature-only and filtered."""
    from tileflow.serving.sampling import draw, row_sampling

    logits = torch.randn(40, 700) * 3
    for rows in ([7], list(range(40))):
        params = [SamplingParams(0.8, seed=50 + r, **filters) for r in rows]
        sampling = row_sampling("cpu", rows, params, [9 + r for r in rows])
        fused, eager = draw(logits, sampling, fused=True), draw(logits, sampling, fused=False)
        assert fused.tolist() == eager.tolist()


def test_inductor_fuses_the_draw_into_one_kernel() -> None:
    """What `draw(fused=True)` is for: Inductor (its C++ backend here; Triton on CUDA) makes the
    gather, the hash, the logs and the argmax one kernel, with no `[rows, vocab]` temporaries."""
    import re

    from torch._inductor.utils import run_and_get_code

    from tileflow.serving.sampling import noisy_argmax

    keys = torch.from_numpy(row_keys(np.full(6, 3), np.arange(6)))
    logits, rows, temperature = torch.randn(9, 500), torch.tensor([0, 2, 3, 5, 7, 8]), torch.full((6,), 0.7)
    fused, (code, *_) = run_and_get_code(torch.compile(noisy_argmax, dynamic=True), logits, rows, temperature, keys)
    assert fused.tolist() == noisy_argmax(logits, rows, temperature, keys).tolist()
    assert len(re.findall(r"\b(cpp_fused_\w+|triton_\w+) = async_compile", code)) == 1, code


def test_top_p_stops_at_the_first_token_whose_mass_reaches_it() -> None:
    """Top-p keeps the smallest set whose probability reaches top_p: with four equally likely
    tokens (0.25 each, exact in float32), top_p 0.5 keeps two, and 0.75 three (the property test
    skips rows this close to the cut, where float32 rounding may go either way; here it cannot)."""
    logits = torch.zeros(3, 4)
    out = filter_logits(logits, torch.zeros(3, dtype=torch.int64), torch.tensor([0.25, 0.5, 0.75]), torch.zeros(3))
    assert (out != -math.inf).sum(-1).tolist() == [1, 2, 3]


def test_min_p_keeps_the_tokens_exactly_at_its_bound() -> None:
    """Min-p keeps every token at least min_p times as likely as the most likely one, the bound
    included: min_p 1 keeps every token tied with the best, and min_p 0.5 a token exactly half as
    likely (logits on powers of two, exact in float32)."""
    logits = torch.tensor([[0.0, 0.0, -1.0], [0.0, -math.log(2.0), -1.0]])
    out = filter_logits(logits, torch.zeros(2, dtype=torch.int64), torch.ones(2), torch.tensor([1.0, 0.5]))
    assert (out != -math.inf).tolist() == [[True, True, False], [True, True, False]]


def test_greedy_below_the_cut_off_only() -> None:
    """Temperatures below 1e-5 are greedy (vLLM's cut-off); 1e-5 itself samples."""
    assert SamplingParams(0.0).greedy and SamplingParams(0.99e-5, seed=1).greedy
    assert not SamplingParams(1e-5, seed=1).greedy
