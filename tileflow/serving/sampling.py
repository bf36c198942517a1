"""Per-request sampling (temperature, top-k, top-p, min-p) that gives the same tokens in any batch.

Each sampled token is the Gumbel-max draw `argmax(logits / temperature + g)`, where the noise
`g` is a counter-based hash of (the request's seed, the position of the token drawn, the
vocabulary index), not the state of a random generator. So a request's tokens depend only on its
seed and on its own logits:
- not on which requests share its step, their order, how the step was cut into nano-batches, or
  whether its steps overlapped;
- not on speculation: a verified draft is kept when it equals the token the draw gives at its
  position, and every other token comes from the same draw as well, so drafts change how many
  steps a request takes, never which tokens it gets. With deterministic drafts (prompt lookup, of
  any length), this is also exactly speculative sampling's distribution: the token at each
  position is drawn from the target model's (filtered) distribution, whatever was drafted;
- not on preemption: a recomputed request draws its next token with the same key.
The logits themselves must not depend on the batch for this to hold to the bit: in bf16, another
batch's kernels may round a near-tie the other way, as they may for greedy decoding.

Fresh keys at every position make the draws independent across positions, and the Gumbel-max
draw over a row samples `softmax(logits / temperature)` restricted to the tokens the filters keep
(exactly but for tokens whose probability is below 7e-12, see `gumbel_noise`; SGLang's
deterministic sampling keys its noise the same way).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Collection, Sequence

import numpy as np
import torch

from ..transfers import to_device

_MASK32 = 0xFFFFFFFF
# Two odd multipliers below 2**31 (hash-prospector's "lowbias32" family), so a 32-bit value times
# one stays inside int64 and the hash runs as plain int64 ops, in numpy or torch on any device.
_MUL_A, _MUL_B = 0x21F0AAAD, 0x735A2D97
_GREEDY_BELOW = 1e-5
_ELEMENTS_PER_CHUNK = 1 << 22  # rows x vocabulary hashed at once: bounds the int64 temporaries


@dataclass(frozen=True)
class SamplingParams:
    """How a request picks each new token.

    `temperature` 0 (the default) is greedy decoding and ignores the rest; so is any temperature
    below 1e-5 (vLLM's cut-off: dividing by less overflows the logits). Otherwise tokens are
    drawn from `softmax(logits / temperature)`, first cut to the `top_k` most likely tokens and
    those tied with the k-th (0: no cut), then to the smallest set of those whose probability reaches `top_p` (1: no cut), then
    to those at least `min_p` times as likely as the most likely token (0: no cut), in
    transformers' order. `seed` keys the draws; None gets a fresh one from torch's default
    generator when the request is made (so `torch.manual_seed` makes runs repeat), kept in
    `Request.sampling`. `logprobs`: None (the default) returns none; n >= 0
    returns each generated token's log-probability under the model's own distribution (the
    log-softmax of its logits, before temperature and filters, as vLLM's default), and with
    n > 0 the n most likely tokens' too (`Request.logprobs`, `Request.top_logprobs`).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        t, p = self.temperature, self.top_p
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {t!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k < 2**31:
            raise ValueError(f"top_k must be an int in [0, 2**31) (0: no limit), got {self.top_k!r}")
        if not _is_real(p) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1: no limit), got {p!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be a number in [0, 1] (0: no limit), got {self.min_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an int in [0, 2**63) or None, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None (none) or an int >= 0 (the chosen token's, plus that many "
                             f"most likely), got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        """True when tokens are the argmax of the logits."""
        return self.temperature < _GREEDY_BELOW

    def seeded(self) -> SamplingParams:
        """These parameters with a seed: their own, or a fresh one for a sampled request."""
        if self.greedy or self.seed is not None:
            return self
        return dataclasses.replace(self, seed=int(torch.randint(0, 2**62, ())))


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _mix32(x: Any) -> Any:
    """A 32-bit avalanche hash of each element of `x` (int64 holding values below 2**32; a torch
    tensor or a numpy array: the keys are made on the host, the noise on the device)."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 15)


def row_keys(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Two 32-bit keys per row, int64 `[rows, 2]`, from each row's seed (int64 >= 0) and the
    position of the token it draws: one from each half of the seed, the position mixed into
    both, so rows with another seed or position share their noise only by a 64-bit collision."""
    seeds, positions = np.asarray(seeds, dtype=np.int64), np.asarray(positions, dtype=np.int64)
    position = positions & _MASK32
    low = _mix32(_mix32((seeds & _MASK32) ^ 0x9E3779B9) ^ position)
    high = _mix32(_mix32(((seeds >> 32) & _MASK32) ^ 0x85EBCA6B) ^ _mix32(position ^ 0x5BD1E995))
    return np.stack([low, high], axis=-1)


def keyed_bits(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """32 random-looking bits per (row, vocabulary index), int64 `[rows, vocab]`: element (r, v)
    hashes v with row r's two keys, one per round of mixing (with one, two rows whose keys
    agreed in their high bits would draw the same numbers in another order)."""
    index = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    return _mix32(_mix32(index[None, :] ^ keys[:, :1]) ^ keys[:, 1:])


# Below 1 in float32 (the largest float32 under 1): float32 rounds the top 32-bit values to 1.
_UNDER_ONE = 1.0 - 2.0**-24


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), float32, from 32-bit values: (bits + 1/2) / 2**32, which keeps
    full relative precision near 0 (down to 2**-33), capped just under 1."""
    return ((bits.to(torch.float32) + 0.5) * 2.0**-32).clamp(max=_UNDER_ONE)


def gumbel_noise(bits: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise `-log(E)` from 32-bit values, with `E = -log1p(-u)` exponential
    (`u = unit_interval(bits)`): near u = 0 the exponential keeps u's relative precision, so the
    noise reaches 22.9 (a 24-bit uniform through -log(-log u) stops at 16.6), and the cap under 1
    bounds it below at -2.8: always finite. Tokens more than 25.7 below a row's best scaled
    logit can never be drawn, where their probability is below e**-25.7 = 7e-12 each."""
    return -torch.log(-torch.log1p(-unit_interval(bits)))


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """`logits` (float32 `[rows, vocab]`, already divided by the temperature) with every token
    outside each row's top-k (ties with the k-th kept), then outside the smallest set reaching
    top-p of what is left (ties broken by token id), then
    less than min_p times as likely as the most likely token, set to -inf. A row with top_k 0,
    top_p 1 and min_p 0 is unchanged; the most likely token always stays."""
    cut_k, cut_p = top_k > 0, top_p < 1
    ordered, order = logits.sort(dim=-1, descending=True, stable=True)  # stable: ties cut the same way
    # Top-k keeps every token tied with the k-th (as transformers and vLLM do): with bf16 logits
    # ties are common, and cutting them by index would favour low token ids.
    kth = ordered.gather(-1, (top_k.clamp(min=1, max=logits.shape[-1]) - 1)[:, None])
    keep = ~cut_k[:, None] | (ordered >= kth)
    ordered = ordered.masked_fill(~keep, -math.inf)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the mass of the more likely tokens
    # Rows without a top-p cut skip it: a float32 cumsum over a large vocabulary can reach 1.0
    # before its last tokens.
    keep &= ~cut_p[:, None] | (before < top_p[:, None])
    # p >= min_p * p_max, as logits (the cuts above keep the most likely token, so p_max is the
    # same before and after them); min_p 0 is a bound of -inf, which cuts nothing.
    keep &= ordered >= ordered[:, :1] + min_p[:, None].log()
    keep[:, 0] = True  # whatever the float32 rounding of a tiny top_p
    return torch.full_like(logits, -math.inf).scatter(-1, order, ordered.masked_fill(~keep, -math.inf))


@dataclass(frozen=True)
class RowSampling:
    """The sampled rows of a step's logits and their parameters, as tensors on the logits'
    device: row indices (int64 `[n]`), temperatures, top-p and min-p (float32), top-k (int64)
    and the noise keys (`row_keys`, int64 `[n, 2]`)."""

    rows: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    keys: torch.Tensor
    filtered: bool  # some row cuts by top-k, top-p or min-p (known on the host: no device sync to ask)


def row_sampling(device: torch.device | str, rows: Sequence[int], params: Sequence[SamplingParams],
                 positions: Sequence[int]) -> RowSampling | None:
    """`RowSampling` for the rows whose `params` sample (temperature > 0, seeded); row `rows[i]`
    draws the token at position `positions[i]` of its request. None when every row is greedy.
    The arrays reach the device without waiting for it (`to_device`)."""
    if not len(rows) == len(params) == len(positions):
        raise ValueError(f"{len(rows)} rows, {len(params)} sampling parameters and {len(positions)} positions: "
                         "give one of each per row")
    picked = [i for i, p in enumerate(params) if not p.greedy]
    if not picked:
        return None
    if any(params[i].seed is None for i in picked):
        raise ValueError("sampled rows need a seed: use SamplingParams.seeded() (requests seed themselves)")
    chosen = [params[i] for i in picked]
    keys = row_keys(np.array([p.seed for p in chosen], dtype=np.int64),
                    np.array([positions[i] for i in picked], dtype=np.int64))
    row_index, temperature, top_k, top_p, min_p, keys = to_device(
        device,
        np.array([rows[i] for i in picked], dtype=np.int64),
        np.array([p.temperature for p in chosen], dtype=np.float32),
        np.array([p.top_k for p in chosen], dtype=np.int64),
        np.array([p.top_p for p in chosen], dtype=np.float32),
        np.array([p.min_p for p in chosen], dtype=np.float32),
        keys,
    )
    filtered = any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in chosen)
    return RowSampling(row_index, temperature, top_k, top_p, min_p, keys, filtered)


def noisy_argmax(logits: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`argmax(logits[rows] / temperature + g)` per row, with the keyed Gumbel noise `g`
    (`gumbel_noise(keyed_bits(...))`): the draw itself, int64 `[n]`. Written as whole-tensor
    torch ops so that Inductor fuses it (`draw(fused=True)`) into one kernel over the logits:
    the gather, the hash, the logs and the argmax, without the `[n, vocab]` int64 temporaries
    eager ops write."""
    scores = logits[rows].float() / temperature[:, None]
    return (scores + gumbel_noise(keyed_bits(keys, logits.shape[-1]))).argmax(dim=-1)


@functools.cache
def _fused_noisy_argmax() -> Callable[..., torch.Tensor]:
    # dynamic: one compiled kernel for every row count (the vocabulary is the model's).
    return torch.compile(noisy_argmax, dynamic=True)


def draw(logits: torch.Tensor, sampling: RowSampling, *, fused: bool | None = None) -> torch.Tensor:
    """The tokens drawn for `sampling.rows` of `logits` `[rows, vocab]` (any float dtype and
    device), int64 `[n]`: Gumbel-max over the filtered, temperature-scaled logits with the keyed
    noise (see the module docstring). `fused` (default: on CUDA) runs `noisy_argmax` compiled
    by Inductor, one kernel over the logits; otherwise as eager ops, over chunks of rows so the
    int64 temporaries of the hash stay small for any vocabulary. Rows that top-k, top-p or
    min-p filter are scaled and filtered with eager ops first (a sort)."""
    if fused is None:
        fused = logits.device.type == "cuda"
    argmax = _fused_noisy_argmax() if fused else noisy_argmax
    n, vocab = sampling.rows.shape[0], logits.shape[1]
    chunk = max(1, n if fused else _ELEMENTS_PER_CHUNK // max(1, vocab))
    tokens = []
    for s in range(0, n, chunk):
        part = slice(s, s + chunk)
        rows, temperature = sampling.rows[part], sampling.temperature[part]
        if sampling.filtered:
            scaled = logits[rows].float() / temperature[:, None]
            scaled = filter_logits(scaled, sampling.top_k[part], sampling.top_p[part], sampling.min_p[part])
            # Already scaled: dividing by 1 again changes no bit.
            logits_part, rows, temperature = scaled, torch.arange(len(scaled), device=scaled.device), \
                torch.ones_like(temperature)
        else:
            logits_part = logits
        tokens.append(argmax(logits_part, rows, temperature, sampling.keys[part]))
    return torch.cat(tokens) if tokens else torch.empty(0, dtype=torch.int64, device=logits.device)


def pick_tokens(logits: torch.Tensor, sampling: RowSampling | None) -> torch.Tensor:
    """The token each row of `logits` `[rows, vocab]` picks: the keyed draw for `sampling.rows`,
    the argmax for the others; int64 `[rows]` on the logits' device."""
    tokens = logits.argmax(dim=-1)
    if sampling is not None:
        tokens[sampling.rows] = draw(logits, sampling)
    return tokens


def token_logprobs(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, top: int) -> torch.Tensor:
    """Per row of `logits[rows]` (`[rows, vocab]`, any float dtype): the log-probability of
    `tokens` (int64 `[n]`, one per row) under the row's log-softmax, then the `top` largest
    log-probabilities and their token ids; float32 `[n, 1 + 2 * top]` (ids as floats: exact
    below 2**24), one tensor so the host reads it back in one copy."""
    if logits.shape[-1] > 1 << 24:
        raise ValueError(f"a vocabulary of {logits.shape[-1]} tokens: token ids above 2**24 do not fit the float32 "
                         "read-back of logprobs")
    scores = logits[rows].float().log_softmax(dim=-1)
    parts = [scores.gather(1, tokens[:, None])]
    if top:
        best = scores.topk(min(top, scores.shape[-1]), dim=-1)
        parts += [best.values, best.indices.float()]
    return torch.cat(parts, dim=1)


def next_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]) -> torch.Tensor:
    """The token each row of `logits` `[rows, vocab]` picks under `params[i]` (greedy or drawn);
    `positions[i]` is the position in its request of the token row i picks."""
    return pick_tokens(logits, row_sampling(logits.device, range(len(params)), params, positions))


@torch.no_grad()
def generate_reference(model: torch.nn.Module, prompt: Sequence[int], max_new_tokens: int,
                       sampling: SamplingParams = SamplingParams(), stop_tokens: Collection[int] = ()) -> list[int]:
    """The tokens a request gets from the eager `model` (a transformers causal LM) one token at a
    time, each over the whole sequence so far with no cache: what a served request with the same
    prompt, seeded `sampling` and stop tokens must generate (the engine's check). Stops after the
    first stop token, keeping it."""
    if not sampling.greedy and sampling.seed is None:
        raise ValueError("generate_reference needs the seed the request used: pass request.sampling")
    tokens = list(prompt)
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([tokens], device=device), use_cache=False).logits[0, -1:]
        tokens.append(int(next_tokens(logits, [sampling], [len(tokens)])[0]))
        if tokens[-1] in stop_tokens:
            break
    return tokens[len(prompt):]
