"""Manual attention whose scores stay flattened over heads, `[B * H, S, S_kv]`, from the q @ k^T
bmm to the softmax (no 4-D view between them: older OPT / BART / Whisper eager code, hand-written
models): matched where q's view names B and H, left as it was (equal to eager) where it does not
or where the form is not attention over q's heads."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import tileflow

H, D, E = 4, 8, 32  # heads, head dim, model width
SIZES = ((2, 7), (3, 11), (2, 16))  # (batch, sequence): three lengths (and two batches), one graph


class FlatAttention(nn.Module):
    """q, k, v projected from x and flattened to [B * H, S, D]; scores `form` keeps flattened."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.proj = nn.Linear(E, 3 * H * D)
        self.form = form

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (t.reshape(b * H, s, D) for t in self.proj(x).view(b, s, 3, H, D).permute(2, 0, 3, 1, 4))
        form = self.form
        if form == "baddbmm":  # GPT-2's reorder_and_upcast_attn: beta=0 ignores the empty bias
            w = torch.baddbmm(torch.empty(b * H, s, s, dtype=q.dtype), q, k.transpose(1, 2), beta=0, alpha=D**-0.5)
        elif form == "baddbmm_row_bias":  # a bias per flattened head, inside the product
            w = torch.baddbmm(table[: b * H, :1, :s], q, k.transpose(1, 2), alpha=D**-0.5)
        elif form in ("div", "masked_fill"):
            w = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(D)
        else:
            w = torch.bmm(q, k.transpose(1, 2)) * D**-0.5
        if form in ("causal_ss", "causal_1ss", "baddbmm", "float32_softmax"):
            causal = torch.full((s, s), float("-inf"), dtype=w.dtype).triu(1)
            w = w + (causal[None] if form == "causal_1ss" else causal)
        elif form == "masked_fill":
            w = w.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        elif form == "row_bias":  # [B * H, S, S]: row b * H + h is batch b, head h
            w = w + table[: b * H, :s, :s]
        if form == "float32_softmax":
            p = w.float().softmax(-1).to(v.dtype)
        else:
            p = w.softmax(2 if form == "softmax_dim2" else -1)
        return torch.bmm(p, v).reshape(b, H, s, D)


def _compiled(fn: Callable[..., Any]) -> tuple[Callable[..., Any], tileflow.Report]:
    torch._dynamo.reset()
    report = tileflow.Report()
    options = {"target": "reference", "passes": ["canonicalize", "attention"]}
    return torch.compile(fn, backend=tileflow.TileflowBackend(options, report=report), dynamic=True), report


def _check_equal(fn: Callable[..., Any], make: Callable[[int, int], tuple[Any, ...]], tol: float = 1e-5) -> tileflow.Report:
    """Compile `fn`, run it at every size of SIZES against eager; the report (one graph, no recompile)."""
    compiled, report = _compiled(fn)
    for b, s in SIZES:
        args = make(b, s)
        torch.testing.assert_close(compiled(*args), fn(*args), rtol=tol, atol=tol)
    assert len(report.graphs) == 1 and report.recompiles == 0, (len(report.graphs), report.recompiles)
    return report


TABLE = torch.randn(16, 20, 20)


@pytest.mark.parametrize("form", ["mul", "div", "causal_ss", "causal_1ss", "masked_fill", "baddbmm", "float32_softmax",
                                  "softmax_dim2", "row_bias", "baddbmm_row_bias"])
def test_flattened_scores_become_meta_attention(form: str) -> None:
    """Each form is one meta_attention, equal to eager at three lengths; a causal triangle
    ([S, S] or [1, S, S], added or filled) is the kernel's causal rule, not a bias; a bias per
    flattened row, added or inside the product, is unflattened to [B, H, ...] as q's rows were."""
    torch.manual_seed(0)
    model = FlatAttention(form).eval()
    with torch.no_grad():
        report = _check_equal(model, lambda b, s: (torch.randn(b, s, E), TABLE))
    assert report.rewrites.get("meta_attention") == 1 and not report.fallbacks, (report.rewrites, report.fallbacks)
    causal = form in ("causal_ss", "causal_1ss", "masked_fill", "baddbmm", "float32_softmax")
    assert (report.rewrites.get("mask_as_rule") == 1) == causal, report.rewrites
    assert ("product_bias" in report.rewrites) == (form == "baddbmm_row_bias"), report.rewrites


def test_flattened_scores_with_a_float32_softmax_in_bfloat16() -> None:
    """bf16 scores cast up for the softmax and P cast back (transformers' eager form): matched,
    within bf16's precision of eager (the kernel keeps the scores in float32)."""
    torch.manual_seed(0)
    model = FlatAttention("float32_softmax").eval().to(torch.bfloat16)
    with torch.no_grad():
        report = _check_equal(model, lambda b, s: (torch.randn(b, s, E, dtype=torch.bfloat16), TABLE), tol=3e-2)
    assert report.rewrites.get("meta_attention") == report.rewrites.get("mask_as_rule") == 1, report.rewrites


def _flat_qkv(x: torch.Tensor, w: torch.Tensor, grouping: str = "bhsd") -> tuple[torch.Tensor, ...]:
    """q, k, v flattened to [B * H, S, D]; `grouping` flattens k otherwise: from [H, B, S, D]
    (its rows are h * B + b) or from [B, S, H, D] without moving the heads first."""
    b, s, _ = x.shape
    q, k, v = (x @ w).view(b, s, 3, H, D).permute(2, 0, 3, 1, 4)
    if grouping == "hbsd":
        k = k.transpose(0, 1)
    elif grouping == "bshd":
        k = k.transpose(1, 2).contiguous()
    return q.reshape(b * H, s, D), k.reshape(b * H, s, D), v.reshape(b * H, s, D)


def _near_miss(x: torch.Tensor, w: torch.Tensor, form: str) -> torch.Tensor:
    b, s, _ = x.shape
    q, k, v = _flat_qkv(x, w, form if form in ("hbsd", "bshd") else "bhsd")
    scores = torch.bmm(q, k.transpose(1, 2)) * 0.3
    if form == "diagonal_2":  # a triangle that shows one key past each query's own: not causal
        scores = scores + torch.full((s, s), float("-inf")).triu(2)
    elif form == "upper":  # the other triangle
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).triu(), float("-inf"))
    p = scores.softmax(1 if form == "softmax_dim1" else -1)
    out = torch.bmm(p, v)
    return out if form == "output_flat" else out.reshape(b, H, s, D)


@pytest.mark.parametrize("form, reason", [
    ("softmax_dim1", "the softmax is not over the keys"),
    ("hbsd", "flattened from batches of"),
    ("bshd", "not [B, H, S_kv, D]"),
    ("output_flat", "P @ V is not over"),
])
def test_flattened_near_misses_are_left_as_they_were(form: str, reason: str) -> None:
    """Not attention over q's flattened heads (a softmax over the queries, k's rows grouped
    otherwise, an output never restored to [B, H, S, D]): left as it was, with its reason."""
    w = torch.randn(E, 3 * H * D) / 6
    compiled, report = _compiled(lambda x: _near_miss(x, w, form))
    for b, s in SIZES:
        x = torch.randn(b, s, E)
        torch.testing.assert_close(compiled(x), _near_miss(x, w, form), rtol=1e-5, atol=1e-5)
    assert "meta_attention" not in report.rewrites, report.rewrites
    assert any(reason in f.reason for f in report.fallbacks), [f.reason for f in report.fallbacks]


@pytest.mark.parametrize("form", ["diagonal_2", "upper"])
def test_flattened_scores_under_a_mask_that_is_not_causal_keep_it(form: str) -> None:
    """A triangle that is not the causal one is no rule: the call reads the mask as a bias."""
    w = torch.randn(E, 3 * H * D) / 6
    report = _check_equal(lambda x: _near_miss(x, w, form), lambda b, s: (torch.randn(b, s, E),))
    assert report.rewrites.get("meta_attention") == 1 and "mask_as_rule" not in report.rewrites, report.rewrites


def test_flattened_scores_whose_heads_no_view_shows_fall_back() -> None:
    """q, k and v handed in as [B * H, S, D]: B and H are not known (not guessed): left as it
    was, the reason says so."""
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.bmm((torch.bmm(q, k.transpose(1, 2)) * 0.3).softmax(-1), v)

    compiled, report = _compiled(attention)
    for b, s in SIZES:
        q, k, v = (torch.randn(b * H, s, D) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert "meta_attention" not in report.rewrites
    assert any("no view shows the batch and head counts" in f.reason for f in report.fallbacks), report.fallbacks


def _split_queries(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """q, k and v of [B, H, S, D] flattened to [B * H * 2, S / 2, D]: each half of a head's
    queries meets only the same half of its keys (block-diagonal attention, not q's heads')."""
    b, s, _ = x.shape
    q, k, v = (t.reshape(b * H * 2, s // 2, D) for t in (x @ w).view(b, s, 3, H, D).permute(2, 0, 3, 1, 4))
    p = (torch.bmm(q, k.transpose(1, 2)) * 0.3).softmax(-1)
    return torch.bmm(p, v).reshape(b, H, s, D)


def test_flattened_scores_of_another_split_of_q_rows_are_left_as_they_were() -> None:
    """The flattened scores' shape is checked against q's [B, H, S, D] view: q, k and v split
    into B * H * 2 rows of S / 2 positions still look like q's heads behind their views (and P @ V
    is restored to [B, H, S, D]), but each half of the queries sees half the keys. Read as q's
    heads, every query would see every key: left as it was, with the reason."""
    w = torch.randn(E, 3 * H * D) / 6
    compiled, report = _compiled(lambda x: _split_queries(x, w))
    for b, s in ((2, 8), (3, 12), (2, 16)):
        x = torch.randn(b, s, E)
        torch.testing.assert_close(compiled(x), _split_queries(x, w), rtol=1e-5, atol=1e-5)
    assert "meta_attention" not in report.rewrites, report.rewrites
    assert any("the flattened scores are" in f.reason for f in report.fallbacks), [f.reason for f in report.fallbacks]


def _flat_cross(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Cross-attention over flattened scores (BART's and Whisper's older eager code): q from x,
    k and v from y, each [B * H, S | S_kv, D]."""
    b, s, n = x.shape[0], x.shape[1], y.shape[1]
    q = (x @ w[:, :H * D]).view(b, s, H, D).transpose(1, 2).reshape(b * H, s, D)
    k = (y @ w[:, H * D:2 * H * D]).view(b, n, H, D).transpose(1, 2).reshape(b * H, n, D)
    v = (y @ w[:, 2 * H * D:]).view(b, n, H, D).transpose(1, 2).reshape(b * H, n, D)
    p = (torch.bmm(q, k.transpose(1, 2)) * D**-0.5).softmax(-1)
    return torch.bmm(p, v).reshape(b, H, s, D)


def test_flattened_cross_attention_becomes_meta_attention() -> None:
    """Flattened scores of q's S queries over y's S_kv keys (more, fewer and as many): the
    scores' [B * H, S, S_kv] shape is q's rows and k's keys, one meta_attention, equal to eager,
    one graph (no rule reads the queries' positions, so their order does not matter)."""
    torch.manual_seed(0)
    w = torch.randn(E, 3 * H * D) / 6
    compiled, report = _compiled(_flat_cross)
    for s, n in ((7, 4), (3, 5), (12, 5), (6, 6)):
        x, y = torch.randn(2, s, E), torch.randn(2, n, E)
        torch.testing.assert_close(compiled(x, y, w), _flat_cross(x, y, w), rtol=1e-5, atol=1e-5)
    assert len(report.graphs) == 1 and report.recompiles == 0
    assert report.rewrites.get("meta_attention") == 1 and not report.fallbacks, (report.rewrites, report.fallbacks)
