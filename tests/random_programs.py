"""Random programs for the fuzz tests of the passes: chains of ops over `[T, 8]` rows (one
sequence) or `[B, S, 8]` ones (sequences), some token-wise (GEMMs, elementwise ops, norms, RoPE's
stacks, lookups in tables, top-k scatters) and some reading across tokens or sequences (scans,
flips, means and softmaxes along them, argsort orders, score matrices, attention). A program is a
list of steps `(op, operands)`, each operand an earlier value's index (0: the input)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from hypothesis import strategies as st

H = 8
_GEN = torch.Generator().manual_seed(0)
W = torch.randn(H, H, generator=_GEN) / math.sqrt(H)
BIAS = torch.randn(H, generator=_GEN)
TABLE = torch.randn(16, H, generator=_GEN)
CONV = torch.randn(H, 1, 3, generator=_GEN)


def _positions(x: torch.Tensor) -> torch.Tensor:
    """Per-row integer positions in [0, 16), computed from the row itself."""
    return (x[..., 0].abs() * 10).long() % TABLE.shape[0]


def _rope(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), -1).flatten(-2)


def _heads(x: torch.Tensor) -> torch.Tensor:
    # Two heads of 4 moved before the tokens and back (layout ops around a per-head scale).
    heads = x.unflatten(-1, (2, H // 2)).transpose(-3, -2) * torch.tensor([[[1.0]], [[-0.5]]])
    return heads.transpose(-3, -2).flatten(-2)


def _topk_scatter(x: torch.Tensor) -> torch.Tensor:
    values, index = x.topk(2, -1)
    return torch.zeros_like(x).scatter(-1, index, values.softmax(-1))


def _gathered_lookup(x: torch.Tensor) -> torch.Tensor:
    # GPT-J's rotary lookup before transformers 5.24: positions repeated across the table's width.
    positions = _positions(x)
    repeated = positions.unsqueeze(-1).repeat(*([1] * positions.dim()), H)
    return torch.gather(TABLE.expand(*positions.shape[:-1], -1, -1), -2, repeated)


def _causal_scores(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    scores = (x @ y.transpose(-1, -2)) / math.sqrt(H)
    hidden = torch.ones(scores.shape, dtype=torch.bool).triu(1)
    return scores.masked_fill(hidden, float("-inf")).softmax(-1) @ y


def _attention(x: torch.Tensor) -> torch.Tensor:
    # One causal head over each sequence, `[B, 1, S, 8]` (its queries tell the nanobatch pass
    # which size holds the tokens; one sequence is a batch of 1).
    heads = x.unsqueeze(-3) if x.dim() == 3 else x[None, None]
    return torch.nn.functional.scaled_dot_product_attention(heads, heads, heads, is_causal=True).view(x.shape)


def _split_halves(x: torch.Tensor) -> torch.Tensor:
    first, second = x.split(H // 2, -1)
    return torch.cat([second * 2, first.sigmoid()], -1)


def _max_picks(x: torch.Tensor) -> torch.Tensor:
    values, index = x.max(-1, keepdim=True)
    return x - values + index.to(x.dtype)


def _causal_conv(x: torch.Tensor) -> torch.Tensor:
    # A depthwise convolution over the last 3 tokens (Mamba's): channels first, padded at the start.
    channels = x.transpose(-1, -2).reshape(-1, H, _tokens(x))
    out = torch.nn.functional.conv1d(channels, CONV, padding=2, groups=H)[..., : _tokens(x)]
    return out.reshape(*x.shape[:-2], H, _tokens(x)).transpose(-1, -2)


def _rewritten_length_rows(x: torch.Tensor) -> torch.Tensor:
    # `[T, 1]` values, T written as `T // 2 * 2 + T % 2`: not taken for the token count.
    return 0.1 * torch.arange(_tokens(x) // 2 * 2 + _tokens(x) % 2, dtype=x.dtype)[:, None]


def _tokens(x: torch.Tensor) -> int:
    return x.shape[-2]


# (name, operands, op): each op maps operands shaped as the input, `[T, 8]` or `[B, S, 8]`, to a
# value of that shape. The token dim is -2: over sequences, the ops "across tokens" read across
# one sequence's tokens (the split keeps sequences whole), those along dim 0 across sequences.
TOKEN_WISE: list[tuple[str, int, Callable[..., torch.Tensor]]] = [
    ("linear", 1, lambda x: x @ W),
    ("linear_bias", 1, lambda x: torch.nn.functional.linear(x, W, BIAS)),
    ("product", 2, lambda x, y: x * y.tanh()),
    ("silu", 1, torch.nn.functional.silu),
    # (Norms with an eps of 1e-2: a program may cancel rows to about 0 first, a cumulative sum of
    # centred rows, whose rounding a small eps would amplify past the tolerance. A GEMM over a
    # nano-batch's rows rounds otherwise than over all of them.)
    ("rms_norm", 1, lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-2)),
    ("layer_norm", 1, lambda x: torch.nn.functional.layer_norm(x, (H,), eps=1e-2)),
    ("softmax_features", 1, lambda x: x.softmax(-1)),
    ("heads", 1, _heads),
    ("rope", 1, _rope),
    ("cat_features", 2, lambda x, y: torch.cat([x[..., : H // 2], y[..., H // 2:]], -1)),
    ("topk_scatter", 1, _topk_scatter),
    ("indexed_lookup", 1, lambda x: TABLE[_positions(x)]),
    ("gathered_lookup", 1, _gathered_lookup),
    ("column_scale", 2, lambda x, y: x * y[..., :1]),
    ("row_max", 1, lambda x: x - x.amax(-1, keepdim=True)),
    ("expand", 1, lambda x: x[..., :1].expand(x.shape)),
    ("where", 2, lambda x, y: torch.where(x > 0, x, y)),
    ("arange_rows", 1, lambda x: x + 0.1 * torch.arange(_tokens(x), dtype=x.dtype)[:, None]),
    ("embedding", 1, lambda x: torch.nn.functional.embedding(_positions(x), TABLE)),
    ("index_select", 1, lambda x: TABLE.index_select(0, _positions(x).flatten()).view(x.shape)),
    ("split_halves", 1, _split_halves),
    ("max_picks", 1, _max_picks),
    ("sort_features", 1, lambda x: x.sort(-1).values),
    ("cumsum_features", 1, lambda x: x.cumsum(-1)),
    ("clamp", 1, lambda x: x.clamp(-0.5, 0.5)),
    ("bfloat16_round_trip", 1, lambda x: x.to(torch.bfloat16).to(x.dtype)),
    ("masked_fill_rows", 2, lambda x, y: x.masked_fill(y[..., :1] > 0, 0.0)),
    ("gelu_tanh", 1, lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    ("logsumexp", 1, lambda x: x - x.logsumexp(-1, keepdim=True)),
    ("einsum_heads", 2, lambda x, y: torch.einsum("...hd,...he->...hd", x.unflatten(-1, (2, 4)),
                                                  y.unflatten(-1, (2, 4))).flatten(-2)),
    # A whole value as long as the tokens, its length written otherwise: each nano-batch's rows
    # must meet it whole (it runs whole, with its reader).
    ("rewritten_length", 1, lambda x: x * _rewritten_length_rows(x)),
    # ... added to a GEMM's output, fused in as its residual (Jamba's Mamba layers).
    ("residual_of_rewritten_length", 1, lambda x: x @ W + _rewritten_length_rows(x) * x[..., :1, :].exp()),
]
ACROSS_TOKENS: list[tuple[str, int, Callable[..., torch.Tensor]]] = [
    ("cumsum", 1, lambda x: x.cumsum(-2)),
    ("cummax", 1, lambda x: x.cummax(-2).values),
    ("shifted", 1, lambda x: torch.nn.functional.pad(x, (0, 0, 1, 0))[..., :-1, :]),
    ("causal_conv", 1, _causal_conv),
    ("centered", 1, lambda x: x - x.mean(-2, keepdim=True)),
    ("whole_layer_norm", 1, lambda x: torch.nn.functional.layer_norm(x, x.shape[-2:], eps=1e-2)),
    ("flip", 1, lambda x: x.flip(-2)),
    ("softmax_tokens", 1, lambda x: x.softmax(-2)),
    ("roll", 1, lambda x: torch.roll(x, 1, -2)),
    ("causal_scores", 2, _causal_scores),
    ("attention", 1, _attention),
    ("token_gram", 2, lambda x, y: x @ ((x.transpose(-1, -2) @ y) / _tokens(x))),
    ("sorted_rows", 1, lambda x: torch.gather(x, -2, x[..., :1].argsort(-2).expand(x.shape))),
    ("indexed_rows", 1, lambda x: x.flatten(0, -2)[x.flatten(0, -2)[:, 0].argsort()].view(x.shape)),
    ("gathered_rows", 2, lambda x, y: torch.gather(x, -2, (_positions(y) % _tokens(x)).unsqueeze(-1).expand(x.shape))),
    ("first_row", 1, lambda x: x * x[..., :1, :]),
    ("flip_dim0", 1, lambda x: x.flip(0)),
    ("centered_dim0", 1, lambda x: x - x.mean(0, keepdim=True)),
]
OPS = TOKEN_WISE + ACROSS_TOKENS


# Every program starts with a GEMM (rows to split) and an attention over its rows.
PROLOGUE = [(0, (0,)), (len(TOKEN_WISE) + [name for name, _, _ in ACROSS_TOKENS].index("attention"), (1,))]


@st.composite
def programs(draw: st.DrawFn) -> list[tuple[int, tuple[int, ...]]]:
    """The prologue, then a chain of ops each reading earlier values (value 0 is the input), a
    third of them across tokens."""
    steps = list(PROLOGUE)
    for _ in range(draw(st.integers(1, 6))):
        across = draw(st.integers(0, 2)) == 0
        op = draw(st.integers(len(TOKEN_WISE), len(OPS) - 1) if across else st.integers(0, len(TOKEN_WISE) - 1))
        operands = tuple(draw(st.integers(0, len(steps))) for _ in range(OPS[op][1]))
        steps.append((op, operands))
    return steps


def program(steps: list[tuple[int, tuple[int, ...]]]) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """The function running `steps` on an input, returning every value but the input."""
    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = [x]
        for op, operands in steps:
            values.append(OPS[op][2](*(values[i] for i in operands)))
        return tuple(values[1:])  # (every value live: the prologue's attention tells the token dim)

    return run




def names(steps: list[tuple[int, tuple[int, ...]]]) -> list[str]:
    """The ops' names, for assertion messages."""
    return [OPS[op][0] for op, _ in steps]
