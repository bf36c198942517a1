"""Causal masks written as triangles (`tileflow.mask_rule`): the complement of a triangle of
ones (`~tril(ones)`, `triu(ones, 1)` as the keys to hide), a triangle of -inf (`full(-inf).triu(1)`),
a triangle of float ones compared with 0 or 1 (nanoGPT's `bias[:, :, :T, :T] == 0`, and its
causal buffer as a constant attribute). Each is proven the kernel's rule exactly when it is one;
near misses (another diagonal, the other triangle, a slice at an offset, a buffer that is not
lower-triangular) are not."""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import tileflow
from tileflow.mask_rule import MaskRule, mask_rule

META = torch.ops.tileflow.meta_attention.default
CAUSAL = MaskRule(True, None)
NEG = float("-inf")
LOWEST = torch.finfo(torch.float32).min


def _ones(s: Any) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool)


def _square(build: Callable[[Any], torch.Tensor]) -> MaskRule | None:
    """`mask_rule` of the mask `build(S)` makes (True / 0 = attend), traced with a symbolic S.
    Tensors `build` closes over become constant attributes (get_attr), as an exported module's
    buffers are."""
    gm = make_fx(lambda x: build(x.shape[0]), tracing_mode="symbolic", _allow_non_fake_inputs=True)(torch.empty(6))
    s = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[0]
    (out,) = next(n for n in gm.graph.nodes if n.op == "output").args
    return mask_rule(out, s, s)


def _buffer(pattern: torch.Tensor) -> torch.Tensor:
    return pattern.float().view(1, 1, *pattern.shape)


BUFFER = _buffer(torch.ones(32, 32).tril())  # nanoGPT's `tril(ones(T, T)).view(1, 1, T, T)`
# Near misses, constants as well (made outside the traces).
TRIL_1, TRIL_MINUS_1, TRIU = (_buffer(torch.ones(32, 32).tril(1)), _buffer(torch.ones(32, 32).tril(-1)),
                              _buffer(torch.ones(32, 32).triu()))
ONE_ABOVE = _buffer(torch.ones(32, 32).tril().index_put_((torch.tensor(3), torch.tensor(9)), torch.tensor(1.0)))
TWOS = BUFFER * 2


# -- mask_rule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda s: ~torch.triu(_ones(s), 1),                              # ~(the keys to hide)
    lambda s: ~torch.triu(_ones(s), diagonal=1),
    lambda s: ~~torch.tril(_ones(s)),
    lambda s: ~(~torch.tril(_ones(s))),
    lambda s: torch.full((s, s), NEG).triu(1),                       # additive
    lambda s: torch.triu(torch.full((s, s), NEG), diagonal=1),
    lambda s: torch.triu(torch.full((s, s), LOWEST), diagonal=1),
    lambda s: torch.tril(torch.ones(s, s)) == 1,
    lambda s: torch.tril(torch.ones(s, s)) != 0,
    lambda s: ~(torch.tril(torch.ones(s, s)) == 0),
    lambda s: torch.tril(torch.ones(s, s)).bool(),
    lambda s: ~(torch.tril(torch.ones(s, s)).view(1, 1, s, s)[:, :, :s, :s] == 0),  # nanoGPT, built in forward
    lambda s: BUFFER[:, :, :s, :s] != 0,                             # nanoGPT's buffer, a constant
    lambda s: ~(BUFFER[:, :, :s, :s] == 0),
    lambda s: BUFFER.bool()[0, 0, :s, :s],
    lambda s: BUFFER.tril(1)[:, :, :s, :s] != 0,                     # (still the lower triangle)
])
def test_triangles_that_are_the_causal_rule_are_proven(build: Callable[[Any], torch.Tensor]) -> None:
    assert _square(build) == CAUSAL


def test_a_constant_triangle_an_op_writes_in_place_is_not_read() -> None:
    """The causal buffer's values are read as constants only when no op of the graph writes it:
    here a `fill_(1)` runs before the mask reads the buffer, so at run time every key is kept
    (the triangle read at compile time would hide the future)."""
    attribute = BUFFER.clone()
    gm = make_fx(lambda x: attribute[:, :, : x.shape[0], : x.shape[0]] != 0, tracing_mode="symbolic",
                 _allow_non_fake_inputs=True)(torch.empty(6))
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    (out,) = next(n for n in gm.graph.nodes if n.op == "output").args
    s = placeholder.meta["val"].shape[0]
    assert mask_rule(out, s, s) == CAUSAL  # the same graph with no write: read as the triangle
    [buffer] = [n for n in gm.graph.nodes if n.op == "get_attr"]
    with gm.graph.inserting_after(buffer):
        gm.graph.call_function(torch.ops.aten.fill_.Scalar, (buffer, 1.0))
    gm.recompile()
    assert mask_rule(out, s, s) is None
    assert bool(gm(torch.empty(5)).all())  # what the graph computes: every key kept


@pytest.mark.parametrize("build", [
    lambda s: ~torch.triu(_ones(s)),                                  # triu(0) hidden: the own key too
    lambda s: ~torch.triu(_ones(s), 2),                               # one key ahead seen
    lambda s: ~torch.tril(_ones(s)),                                  # (as a keep-mask) strictly upper
    lambda s: ~torch.tril(_ones(s), -1),                              # anti-causal
    lambda s: ~(torch.tril(_ones(s)) & torch.triu(_ones(s), -2)),     # a window's complement: two pieces
    lambda s: torch.tril(_ones(s), 1),
    lambda s: torch.tril(_ones(s), -1),
    lambda s: torch.full((s, s), NEG).triu(),                         # triu(0) of -inf
    lambda s: torch.full((s, s), NEG).triu(2),
    lambda s: torch.full((s, s), NEG).tril(-1),                       # the other triangle
    lambda s: torch.full((s, s), -1e4).triu(1),                       # not a hiding value
    lambda s: torch.full((s, s), NEG).triu(1).tril(1),                # a band of -inf: hides one diagonal
    lambda s: torch.tril(torch.ones(s, s), 1) == 1,
    lambda s: torch.tril(torch.ones(s, s), -1) != 0,
    lambda s: torch.tril(torch.ones(s, s)) == 0,                      # the hidden keys, as a keep-mask
    lambda s: torch.tril(torch.full((s, s), 2.0)) == 1,               # all False
    lambda s: torch.tril(torch.full((s, s), 2.0)) != 0,               # (not read: 2s are no 0/1 tensor)
    lambda s: BUFFER[:, :, 1:s + 1, 1:s + 1] != 0,                    # a slice at an offset (not read)
    lambda s: BUFFER[:, :, 1:s + 1, :s] != 0,                         # rows from 1: one key ahead
    lambda s: BUFFER[:, :, :s, :s] == 0,
    lambda s: BUFFER.transpose(-1, -2)[:, :, :s, :s] != 0,            # upper-triangular
    lambda s: TRIL_1[:, :, :s, :s] != 0,
    lambda s: TRIL_MINUS_1[:, :, :s, :s] != 0,
    lambda s: TRIU[:, :, :s, :s] != 0,
    lambda s: ONE_ABOVE[:, :, :s, :s] != 0,                          # one 1 above the diagonal
    lambda s: TWOS[:, :, :s, :s] == 2,                                # (not read)
    lambda s: TWOS[:, :, :s, :s] != 0,                                # (not read)
    lambda s: _buffer(torch.ones(32, 32).tril(1))[:, :, :s, :s] != 0,  # built in the graph
    lambda s: torch.cat([BUFFER, _buffer(torch.ones(32, 32))], 1)[:, :, :s, :s] != 0,  # one plane all ones
])
def test_triangles_that_are_not_the_causal_rule_are_not_proven(build: Callable[[Any], torch.Tensor]) -> None:
    rule = _square(build)
    assert rule is None or rule == MaskRule(False, None) and bool(build(7).all()), rule


BUFFERS = {d: _buffer(torch.ones(32, 32).tril(d)) for d in range(-3, 4)}


def test_every_proven_triangle_equals_the_rule_at_every_diagonal() -> None:
    """Brute force: for each form and diagonal d in -3..3, what mask_rule proves (or not) agrees
    with the mask's own values at several sizes."""
    forms = {
        "not_triu": lambda s, d: ~torch.triu(_ones(s), d),
        "not_tril": lambda s, d: ~torch.tril(_ones(s), d),
        "tril": lambda s, d: torch.tril(_ones(s), d),
        "full_triu": lambda s, d: torch.full((s, s), NEG).triu(d),
        "full_tril": lambda s, d: torch.full((s, s), NEG).tril(d),
        "ones_eq0": lambda s, d: ~(torch.tril(torch.ones(s, s), d) == 0),
        "ones_eq1": lambda s, d: torch.triu(torch.ones(s, s), d) == 1,
        "built": lambda s, d: _buffer(torch.ones(32, 32).tril(d))[:, :, :s, :s] != 0,
        "buffer": lambda s, d: BUFFERS[d][:, :, :s, :s] != 0,
    }
    proven = set()
    for name, form in forms.items():
        for d in range(-3, 4):
            rule = _square(lambda s: form(s, d))
            if rule is not None:
                proven.add((name, d))
            for s in (1, 2, 5, 9):
                mask = form(s, d)
                keep = (mask if mask.dtype == torch.bool else mask == 0).reshape(s, s)
                causal = torch.ones(s, s, dtype=torch.bool).tril()
                if rule is not None:
                    assert rule == CAUSAL and torch.equal(keep, causal), (name, d, s)
            if rule is None:  # the forms not proven are the ones that are not the rule at some size
                assert any(not torch.equal((form(s, d) if form(s, d).dtype == torch.bool else form(s, d) == 0)
                                           .reshape(s, s), torch.ones(s, s, dtype=torch.bool).tril())
                           for s in (2, 5, 9)), (name, d)
    assert proven == {("not_triu", 1), ("tril", 0), ("full_triu", 1), ("ones_eq0", 0), ("built", 0), ("buffer", 0)}


# -- the attention pass end to end: torch.compile(dynamic=True) ----------------------------------
def _heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s, _ = x.shape
    return tuple(t.reshape(b, s, 4, 16).transpose(1, 2) for t in x.split([64, 64, 64], dim=-1))


class _Manual(nn.Module):
    """`softmax(q @ k^T / 4 (masked)) @ v` under the mask `hide(S)` (True: hide) or `add(S)`."""

    def __init__(self, hide: Callable[[Any], torch.Tensor] | None = None,
                 add: Callable[[Any], torch.Tensor] | None = None, sdpa: bool = False) -> None:
        super().__init__()
        self.hide, self.add, self.sdpa = hide, add, sdpa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _heads(x)
        s = x.shape[1]
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.add(s) if self.add else ~self.hide(s))
        att = q @ k.transpose(-1, -2) * 0.25
        att = att.masked_fill(self.hide(s), NEG) if self.hide is not None else att + self.add(s)
        return att.softmax(-1) @ v


def _compile_and_compare(m: nn.Module, lengths=(3, 6, 11, 17),
                         keep: list | None = None) -> tuple[tileflow.Report, list[torch.fx.Node]]:
    """Compile `m` (target reference, dynamic sizes), check it equals eager (fp32, tight) at each
    length, and return the report and the graph's meta_attention calls (the compiled `m` appended
    to `keep`, for a test that calls it again)."""
    from test_attention import compile_attention

    torch._dynamo.reset()
    compiled, _, gm, report = compile_attention(m, torch.randn(2, 5, 192))
    if keep is not None:
        keep.append(compiled)
    gen = torch.Generator().manual_seed(0)
    for s in lengths:
        x = torch.randn(2, s, 192, generator=gen)
        want = m(x)
        assert not want.isnan().any()
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
    return report, [n for n in gm.graph.nodes if n.target is META]


@pytest.mark.parametrize("m", [
    _Manual(hide=lambda s: torch.triu(_ones(s), diagonal=1)),
    _Manual(hide=lambda s: ~torch.tril(_ones(s))),
    _Manual(add=lambda s: torch.full((s, s), NEG).triu(1)),
    _Manual(add=lambda s: torch.triu(torch.full((s, s), NEG), diagonal=1)),
    _Manual(add=lambda s: torch.triu(torch.full((s, s), NEG), diagonal=1), sdpa=True),
    _Manual(hide=lambda s: torch.triu(_ones(s), diagonal=1), sdpa=True),
    _Manual(hide=lambda s: torch.tril(torch.ones(s, s)).view(1, 1, s, s) == 0),  # nanoGPT's, built in forward
], ids=["masked_fill_triu", "masked_fill_not_tril", "add_full_triu", "add_triu_full", "sdpa_triu_full",
        "sdpa_not_triu", "masked_fill_ones_eq0"])
def test_triangle_masks_become_the_causal_rule(m: nn.Module) -> None:
    report, (meta,) = _compile_and_compare(m)
    assert report.rewrites.get("mask_as_rule") == 1, (report.rewrites, report.fallbacks)
    assert (meta.args[3], meta.args[4], meta.args[7]) == (None, True, None)  # no bias, causal, no ranges


@pytest.mark.parametrize("m", [
    _Manual(hide=lambda s: torch.triu(_ones(s), diagonal=2)),        # one key ahead
    _Manual(hide=lambda s: ~torch.tril(_ones(s), -1) & ~torch.eye(s, dtype=torch.bool)),  # (a union: not read)
    _Manual(add=lambda s: torch.full((s, s), NEG).triu(2)),
    _Manual(add=lambda s: torch.full((s, s), NEG).tril(-1) + torch.full((s, s), NEG).triu(3)),  # a band
    _Manual(hide=lambda s: torch.tril(torch.ones(s, s), 1).view(1, 1, s, s) == 0),
], ids=["triu_2", "not_tril_and_eye", "full_triu_2", "two_triangles", "ones_tril_1_eq0"])
def test_near_miss_triangles_keep_their_mask(m: nn.Module) -> None:
    report, (meta,) = _compile_and_compare(m)
    assert not report.rewrites.get("mask_as_rule")
    assert meta.args[4] is False and meta.args[3] is not None


class _NanoGPT(nn.Module):
    """nanoGPT's CausalSelfAttention core: a registered buffer `tril(ones(T, T)).view(1, 1, T, T)`
    sliced to the sequence, `masked_fill(bias[:, :, :T, :T] == 0, -inf)`."""

    def __init__(self, buffer: torch.Tensor = BUFFER, offset: int = 0) -> None:
        super().__init__()
        self.register_buffer("bias", buffer.clone())
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _heads(x)
        t, o = x.shape[1], self.offset
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, o:o + t, o:o + t] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


def test_nanogpt_under_torch_compile_keeps_its_buffer_as_a_mask() -> None:
    """torch.compile passes the buffer as a graph input: its values may change between calls
    without a recompile, so it is never read as a rule. The mask stays (meta_attention with its
    bias), and a buffer changed after compiling still gives eager's output."""
    m = _NanoGPT()
    kept: list = []
    report, (meta,) = _compile_and_compare(m, keep=kept)
    assert not report.rewrites.get("mask_as_rule") and meta.args[3] is not None
    (compiled,) = kept
    with torch.no_grad():
        m.bias.copy_(torch.ones_like(m.bias))  # now no mask at all
    x = torch.randn(2, 7, 192)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)


def _exported(m: nn.Module, tmp_path: Any) -> tuple[tileflow.Report, Callable[..., torch.Tensor]]:
    from tileflow.export import export_model

    seq = torch.export.Dim("seq", min=2, max=24)
    archive = export_model(m, (torch.randn(2, 5, 192),), ({1: seq},), options={"target": "reference"})
    return archive.report, tileflow.load(archive.save(tmp_path / "nanogpt.pt2"))


@pytest.mark.parametrize("m, rule", [
    (_NanoGPT(), True),
    (_NanoGPT(offset=3), False),                                     # a slice at an offset: not read
    (_NanoGPT(_buffer(torch.ones(32, 32).tril(-1).fill_diagonal_(1))), True),  # (the same buffer)
    (_NanoGPT(_buffer(torch.ones(32, 32).tril(1))), False),          # one key ahead
], ids=["nanogpt", "offset", "same_values", "tril_1"])
def test_nanogpt_exported_reads_its_constant_buffer(m: nn.Module, rule: bool, tmp_path: Any) -> None:
    """An exported program holds the buffer as a constant attribute: a lower-triangular one sliced
    from 0 is the rule; others keep the mask. Both equal eager at several lengths."""
    report, run = _exported(m, tmp_path)
    assert report.rewrites.get("meta_attention") == 1
    assert bool(report.rewrites.get("mask_as_rule")) == rule, report.rewrites
    gen = torch.Generator().manual_seed(1)
    for s in (2, 9, 16) if m.offset == 0 else (2, 9):
        x = torch.randn(2, s, 192, generator=gen)
        torch.testing.assert_close(run(x), m(x), rtol=1e-5, atol=1e-5)


# -- padding safety: the rule, not a triangle it cannot read ----------------------------------------
@pytest.mark.parametrize("m", [
    _Manual(hide=lambda s: torch.triu(_ones(s), diagonal=1)),
    _Manual(add=lambda s: torch.full((s, s), NEG).triu(1)),
    _Manual(hide=lambda s: torch.triu(_ones(s), diagonal=1), sdpa=True),
], ids=["masked_fill_triu", "add_full_triu", "sdpa_not_triu"])
def test_a_triangle_taken_as_the_rule_may_be_replayed_padded(m: nn.Module) -> None:
    """The attention runs under the kernel's causal rule, which keeps padded keys from real
    queries: no padding hazard (a triu the padding analysis does not read was one)."""
    from test_attention import compile_attention

    from tileflow.padding_safety import check_padding
    from tileflow.passes.nanobatch import token_symbol

    torch._dynamo.reset()
    _, _, gm, _ = compile_attention(m, torch.randn(1, 5, 192))
    (token, *_) = token_symbol(gm)
    assert check_padding(gm, token).hazard is None
