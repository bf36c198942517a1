"""The serving loop: continuous batching over a paged KV cache, with speculative verify.

Every step packs the scheduler's entries into one flat token batch and runs the model's step as
tileflow compiled it (a `StageProgram`: the dense stages between attentions); each attention stage
writes the step's new k/v into the paged cache and runs `meta_attention_varlen` over it, with a
tree mask when the step verifies drafts. Each request's tokens are greedy or drawn as its
`SamplingParams` say (`sampling.py`: a draw keyed by its seed and position, so batching and
speculation change its tokens only as far as they change its logits); a verify entry keeps the
drafted tokens equal to the ones the model picks plus the model's own next token, and the cache
length rolls back over the rest.

Without drafts the steps overlap (vLLM's asynchronous scheduling): the engine schedules and
launches step n + 1 before it reads step n's tokens back, as if every request went on. Step
n + 1's decode inputs are gathered from step n's predictions on the device, and the host's work
for one step (scheduling, the batch layout, the kernel launches) runs while the device computes
the one before. A request whose token read back from step n is one of its stop tokens finishes
then, and its entry in step n + 1 (already launched) is dropped: its cache rows are released
with its blocks, and nothing it computed there is kept.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from tileflow.passes.disaggregate import AttentionCut, StageProgram

from ..config import current_config, use_config
from ..devices import detect_device
from ..runtime.paged_kv import PagedBatch, PagedKV, check_chunk_blocks
from ..runtime.streams import CudaStreams, StreamExecutor, grid_share
from ..schedule import DEFAULT_STREAM_OF_RESOURCE
from ..transfers import to_device
from .blocks import BlockAllocator, KVGroup, kv_groups, sliding_blocks_for
from .nano_batches import AutoSplit, sm_shares, split_entries
from .sampling import RowSampling, SamplingParams, pick_tokens, row_sampling, token_logprobs
from .scheduler import Entry, Request, Scheduler, accept_draft


def _check_nano_batches(nano_batches: Any, program: StageProgram) -> None:
    """Refuse a `nano_batches` setting the engine cannot run with this program."""
    if nano_batches != "auto" and (isinstance(nano_batches, bool) or not isinstance(nano_batches, int)
                                   or nano_batches < 1):
        raise ValueError(f"nano_batches must be an int >= 1 (1: no split) or \"auto\", got {nano_batches!r}")
    if nano_batches != 1 and getattr(program, "cuda_graphs", False):
        raise ValueError(
            f"nano_batches={nano_batches!r} runs stages of several nano-batches at once on separate streams, but "
            "this program's stages replay CUDA graphs one at a time: build it without cuda_graphs, or use "
            "nano_batches=1"
        )


def prompt_lookup_draft(tokens: Sequence[int], max_draft: int, ngram: int = 2) -> list[int]:
    """Drafts by prompt lookup: find the latest earlier occurrence of the last `ngram` tokens and
    propose the tokens that followed it. `ngram` must be at least 1 (a 0-gram, `tokens[-0:]`,
    would be the whole sequence, found nowhere: drafting silently off)."""
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise ValueError(f"prompt_lookup_draft: ngram must be an int >= 1 (the tokens matched), got {ngram!r}")
    if max_draft < 1 or len(tokens) <= ngram:
        return []
    tail = list(tokens[-ngram:])
    for i in range(len(tokens) - ngram - 1, -1, -1):
        if list(tokens[i : i + ngram]) == tail:
            return list(tokens[i + ngram : i + ngram + max_draft])
    return []


@dataclass(frozen=True)
class StepInputs:
    """A step's device inputs: packed token ids and positions `[1, T]`, the batch layout over the
    paged KV cache (over each KV group's cache in `batches`: `batch` is the first group's), and
    the verify tree mask (None when nothing is verified)."""

    ids: torch.Tensor
    positions: torch.Tensor
    batch: PagedBatch
    tree_mask: torch.Tensor | None
    batches: tuple[PagedBatch, ...]


@dataclass
class Metrics:
    """What a run measured (seconds, wall clock)."""

    steps: int = 0
    tokens_in_steps: int = 0
    generated: int = 0
    drafted: int = 0
    accepted: int = 0
    preemptions: int = 0  # requests sent back to recompute for want of KV blocks
    nano_batched_steps: int = 0  # steps run as several nano-batches (`nano_batches`)
    ttft: dict[int, float] = field(default_factory=dict)  # by request id: from `add` to its first token
    token_times: dict[int, list[float]] = field(default_factory=dict)
    wall: float = 0.0  # of every `run` call
    # Time the host spent waiting for steps' tokens: near the wall time, the device is the
    # bottleneck; near zero (with overlapped steps), the host is.
    waited: float = 0.0

    def summary(self) -> dict[str, float]:
        """TTFT and time between tokens (means), tokens/s, drafted tokens and their acceptance
        rate, the steps run as nano-batches, and the share of the wall time the host waited for
        the device."""
        gaps = [b - a for times in self.token_times.values() for a, b in zip(times, times[1:])]
        return {
            "steps": self.steps,
            "generated_tokens": self.generated,
            "tokens_per_s": self.generated / self.wall if self.wall else 0.0,
            "mean_ttft_s": sum(self.ttft.values()) / len(self.ttft) if self.ttft else 0.0,
            "mean_tbt_s": sum(gaps) / len(gaps) if gaps else 0.0,
            # (0.0 both when every draft was rejected and when none was made: the count tells)
            "drafted_tokens": self.drafted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "preemptions": self.preemptions,
            "nano_batched_steps": self.nano_batched_steps,
            "mean_step_tokens": self.tokens_in_steps / self.steps if self.steps else 0.0,
            "host_waiting_share": self.waited / self.wall if self.wall else 0.0,
        }


@dataclass
class _StepScores:
    """A step's logprobs (`token_logprobs` over the rows of requests that asked for them, with
    the largest top-n any of them asked for) and where each row's sit (row -> index)."""

    values: torch.Tensor
    index: dict[int, int]


@dataclass
class _UnreadStep:
    """A launched step whose tokens the host has not read yet: its predictions on the device, the
    copy of them (and of its logprobs) on its way to the host, the event that says they arrived,
    and where the placeholders for them sit: (request, index in its tokens), and (request, index
    in its logprobs, row)."""

    predictions: torch.Tensor
    host: torch.Tensor
    scores: _StepScores | None
    arrived: torch.cuda.Event | None
    placeholders: list[tuple[Request, int]]
    scored: list[tuple[Request, int, int]]


class ServingEngine:
    """Runs requests to completion through a `StageProgram` over packed tokens.

    The KV cache has `num_blocks` blocks of `block_size` positions in every layer, in the
    program's attention dtype (`dtype`, when given, must be that one). A model that mixes full
    and sliding-window layers gets that memory as two KV groups, each with its own blocks,
    allocator and cache (`kv_groups`, `allocators`, `kvs`; the first group's are `allocator` and
    `kv`): the sliding layers' blocks go back behind the window while a request runs, and the
    full layers get the memory the sliding ones do not need as more blocks (the sliding group
    gets `blocks.sliding_blocks_for` the engine's decode slots, budget and drafts).
    `overlap` (default: on unless drafting) launches each step before reading the previous
    step's tokens back; between `step` calls the tokens of the step in flight are placeholders in
    `Request.tokens` (negative: -1 - row of that step), until the next step or `synchronize`.
    Blocks of layers that slide a window go back behind it while their request runs
    (`Scheduler`, `sliding_window` and `sliding_group`).
    `nano_batches` k > 1 cuts every step of several entries into k nano-batches (`split_entries`);
    `"auto"` cuts a step where the split search's cost model, on the device's table entry, says
    a split wins, as it says (`nano_batches.AutoSplit`), and runs every step whole where there
    are no streams (off CUDA, unless `streams` are given): there nano-batches run one after
    another. A fixed k runs each nano-batch on its own stream; `"auto"` runs the streams of the
    split search's model: dense stages on one, attention on another (`_forward_nano`). With
    nano-batches and `nano_shares`, each nano-batch's persistent kernels take a share of the
    device's SMs about in proportion to its tokens (`sm_shares`; NanoFlow's partition: kernels
    that each filled the device could not run side by side), and under `"auto"` the shares the
    split search costed the cut at: a dense stage's kernels its compute stream's, attention's
    its memory stream's; without, every kernel takes the whole device.
    """

    def __init__(
        self, program: StageProgram, *, token_budget: int = 64, decode_slots: int = 8, max_draft: int = 0,
        block_size: int = 16, num_blocks: int = 256, dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu", nano_batches: int | str = 1, streams: StreamExecutor | None = None,
        overlap: bool | None = None, nano_shares: bool = True,
    ) -> None:
        for name, value in (("token_budget", token_budget), ("decode_slots", decode_slots), ("max_draft", max_draft),
                            ("block_size", block_size), ("num_blocks", num_blocks)):
            # A float budget or draft length passed the range checks below, then failed mid-run as a
            # slice bound, with requests holding blocks (a float cache size, as a bare TypeError).
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an int, got {value!r}")
        # Checked here, not only by BlockAllocator: sizing a sliding group or checking attention
        # chunks divides by the block size first (a bare ZeroDivisionError).
        if block_size < 1 or num_blocks < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        if overlap and max_draft:
            raise ValueError(
                "overlap=True launches a step before the previous step's tokens are on the host, but drafting "
                "(max_draft > 0) needs them to propose the next tokens: use max_draft=0, or overlap=False"
            )
        _check_nano_batches(nano_batches, program)
        max_tokens = getattr(program, "max_tokens", None)
        if max_tokens is not None and token_budget > max_tokens:
            raise ValueError(f"token_budget {token_budget} is more than the {max_tokens} tokens a step of this program "
                             "may hold: lower it, or build the program with build_stage_program(max_tokens=...)")
        cuts = program.cuts
        heads = {(c.num_kv_heads, c.head_dim) for c in cuts}
        if len(heads) != 1:
            raise ValueError(f"every layer must have the same KV heads and head size, got {sorted(heads)}")
        (hkv, d), = heads
        # The KV cache holds what the attention reads: the program's q, k and v dtype.
        dtypes = {c.dtype for c in cuts}
        if len(dtypes) != 1:
            raise ValueError(f"every layer's attention must have one dtype, got {sorted(map(str, dtypes))}")
        (attention_dtype,) = dtypes
        if dtype is not None and dtype != attention_dtype:
            raise ValueError(f"dtype={dtype} for the KV cache, but the program's attention runs in {attention_dtype}: "
                             f"pass dtype={attention_dtype} (or leave dtype out)")
        check_chunk_blocks((c.attention_chunk for c in cuts), block_size)
        self.program = program
        windows = [c.sliding_window for c in cuts]
        # A model mixing full and sliding layers: the sliding ones get what the running requests
        # can hold under the window, the full ones the rest of the memory (`kv_groups`).
        widest = max((w for w in windows if w is not None), default=None)
        self.kv_groups: list[KVGroup] = kv_groups(windows, num_blocks, None if widest is None else sliding_blocks_for(
            widest, block_size=block_size, decode_slots=decode_slots, token_budget=token_budget, max_draft=max_draft))
        self.allocators = [BlockAllocator(g.num_blocks, block_size) for g in self.kv_groups]
        self.allocator = self.allocators[0]
        sliding = self.kv_groups[1:]
        self.scheduler = Scheduler(self.allocator, token_budget=token_budget, decode_slots=decode_slots,
                                   max_draft=max_draft, sliding_window=self.kv_groups[0].window,
                                   sliding_group=(self.allocators[1], sliding[0].window) if sliding else None)
        self.device = torch.device(device)
        self.kvs = [PagedKV(len(g.layers), hkv, d, block_size=block_size, num_blocks=g.num_blocks,
                            dtype=attention_dtype, device=self.device) for g in self.kv_groups]
        self.kv = self.kvs[0]
        # Each cut's (group, layer in the group's cache).
        self._layer_at = {cuts[i].index: (g, j) for g, group in enumerate(self.kv_groups)
                          for j, i in enumerate(group.layers)}
        # Chunked attention layers read each step through its chunk view (`PagedKV.prepare`), per group.
        self._attention_chunks = [sorted({cuts[i].attention_chunk for i in g.layers} - {None}) for g in self.kv_groups]
        self.max_draft = max_draft
        self.metrics = Metrics()
        # The time base of every stamp in the metrics, fixed for the engine's life: a request's
        # tokens may come in several `run` calls, or in `step` calls outside one.
        self._start = time.perf_counter()
        self._arrivals: dict[int, float] = {}  # request id -> when `add` queued it, until its first token
        self._nano_batches = nano_batches
        self.nano_shares = nano_shares
        # Per group, by request id: see _block_ids.
        self._block_arrays: list[dict[int, tuple[list[int], np.ndarray]]] = [{} for _ in self.kv_groups]
        self.overlap = not max_draft if overlap is None else overlap
        self._in_flight: _UnreadStep | None = None  # the launched step whose tokens are not read yet
        # Where nano-batches run: CUDA streams on a GPU, one after another elsewhere (tests pass
        # simulated streams, which run them in random interleavings).
        self.streams = streams if streams is not None else CudaStreams(self.device) if self.device.type == "cuda" else None
        self._auto_split: AutoSplit | None = None  # "auto"'s cost model, made at its first step (`nano_groups`)
        self._auto_refused: str | None = None  # why "auto" runs every step whole, once said

    @property
    def program(self) -> StageProgram:
        """The stage program the engine runs; checked when set against `nano_batches` (a
        program replaying CUDA graphs takes no nano-batches)."""
        return self._program

    @program.setter
    def program(self, value: StageProgram) -> None:
        _check_nano_batches(getattr(self, "_nano_batches", 1), value)
        self._program = value

    @property
    def nano_batches(self) -> int | str:
        """Nano-batches per step: an int k >= 1 (1: no split) or `"auto"`; checked when set (as
        against the program's CUDA graphs)."""
        return self._nano_batches

    @nano_batches.setter
    def nano_batches(self, value: int | str) -> None:
        _check_nano_batches(value, self.program)
        self._nano_batches = value

    def add(self, request: Request) -> None:
        """Queue a request; ValueError for token ids the model has no embedding for, for a
        request longer than the program's `max_positions` (GPT-2's learned position table), or
        for an id this engine has served before."""
        self._check(request)
        self._queue(request)

    def _queue(self, request: Request) -> None:
        """Queue a request `_check` passed."""
        self.scheduler.add(request)
        # TTFT counts from here: a request may join between steps or runs, long after a run began.
        self._arrivals[request.id] = time.perf_counter() - self._start

    def _check(self, request: Request) -> None:
        """ValueError when `add` would refuse the request; queues nothing."""
        vocab = getattr(self.program, "vocab_size", None)
        if vocab is not None:
            bad = sorted({t for t in (*request.prompt, *request.stop_tokens) if t >= vocab})
            if bad:
                raise ValueError(f"request {request.id}: token ids {bad[:5]} are not below the model's vocabulary "
                                 f"size {vocab}")
        positions = getattr(self.program, "max_positions", None)
        # Every token but the last generated one is fed to the model, at positions 0, 1, ...
        if positions is not None and len(request.prompt) + request.max_new_tokens - 1 > positions:
            fix = (f"lower max_new_tokens to {positions + 1 - len(request.prompt)} or shorten the prompt"
                   if len(request.prompt) <= positions else f"shorten the prompt to at most {positions} tokens")
            what = self.program.max_positions_reason
            raise ValueError(
                f"request {request.id}: {len(request.prompt)} prompt tokens and {request.max_new_tokens} new ones reach "
                f"position {len(request.prompt) + request.max_new_tokens - 2}, past the model's {positions} {what}: {fix}"
            )
        # (A request done, or one whose id is waiting or running: the scheduler says why.)
        active = {r.id for r in (*self.scheduler.waiting, *self.scheduler.running)}
        if not request.done and request.id not in active and (
                request.id in self._arrivals or request.id in self.metrics.token_times):
            # Its metrics would merge with the earlier request's (and an earlier token still being
            # read back would stamp this one's first-token time).
            raise ValueError(f"request id {request.id} was already served by this engine: ids must be unique over "
                             "its life (metrics are kept by id)")
        self.scheduler.check(request)

    def run(self, requests: Sequence[Request] = (), *, progress: bool = False) -> Metrics:
        """Serve until every request is done; returns the metrics. The requests are all checked
        before any is queued: when `add` would refuse one, ValueError and none is queued (queued
        up to the bad one, the others would be served by a later run, and a corrected list
        refused as holding ids already waiting)."""
        requests = list(requests)
        seen: set[Any] = set()
        for r in requests:
            self._check(r)
            if r.id in seen:
                raise ValueError(f"a request with id {r.id} is in the list twice: ids must be unique "
                                 "(metrics and abort() go by id)")
            seen.add(r.id)
        for r in requests:
            self._queue(r)
        total = sum(r.max_new_tokens for r in list(self.scheduler.waiting) + self.scheduler.running)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="tok", desc="serving")
        start = time.perf_counter()
        while self.scheduler.has_work():
            before = self.metrics.generated
            self.step()
            if bar is not None:
                bar.update(self.metrics.generated - before)
        self.synchronize()
        # Summed over runs, as the tokens and steps are (tokens/s divides one by the other).
        self.metrics.wall += time.perf_counter() - start
        if bar is not None:
            bar.close()
        return self.metrics

    def step(self) -> list[Entry]:
        """One scheduler step through the model. With `overlap`, the step's tokens are read back
        during the next step (or by `synchronize`, or at once when no work is left): until then
        they, and the decode inputs in the next step's entries, are placeholders."""
        drafts = {
            r.id: prompt_lookup_draft(r.tokens, self.max_draft) for r in self.scheduler.running if not r.prefilling
        } if self.max_draft else {}
        entries = self.scheduler.schedule(drafts)
        self.metrics.preemptions += len(self.scheduler.last_preempted)
        if not entries:
            if not self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("step() with no request waiting or running: add() one first")
            raise RuntimeError("the scheduler produced an empty step with requests pending (no KV room?)")
        try:
            logits = self.forward(entries)
            predictions = pick_tokens(logits[0], self._row_sampling(entries))
            scores = self._scores(entries, logits[0], predictions)
        except Exception as exc:
            # The step's requests end here ("error"), their blocks back (nothing of this step was
            # registered for prefix reuse: that happens at commit); the other requests go on.
            # Left running, the next step would fail the same way, and so would every later run.
            failed = sorted({e.request.id for e in entries})
            # With overlap, the step before this one is still in flight: read its tokens back now,
            # or the requests ended here would keep placeholders (negative ids) among their tokens.
            lost = ""
            try:
                self.synchronize()
            except Exception as read_back:  # the device failed that step too: its tokens are lost
                self._in_flight = None
                lost = (f"; the step before it could not be read back either ({type(read_back).__name__}: "
                        f"{read_back}), so its tokens are lost")
            for e in entries:
                if not e.request.done:
                    self._finish(e.request, "error")
            raise RuntimeError(f"a step of requests {failed} failed ({type(exc).__name__}: {exc}); they ended with "
                               f"finish_reason 'error', and the engine serves the others{lost}") from exc
        self.metrics.steps += 1
        self.metrics.tokens_in_steps += logits.shape[1]
        if not self.overlap:
            start = time.perf_counter()
            tokens = predictions.tolist()  # waits for the device
            values = scores.values.tolist() if scores is not None else []
            now = time.perf_counter()
            self.metrics.waited += now - start
            _, scored = self._commit(entries, tokens, now - self._start)
            _fill_logprobs(scored, values, scores)
            return entries
        # This step is queued on the device: read the previous one's tokens while it runs, then
        # commit this one's as placeholders (-1 - row), which the next step gathers on the device.
        self.synchronize()
        placeholders, scored = self._commit(entries, list(range(-1, -1 - len(predictions), -1)), None)
        hosts, arrived = _start_read_back(predictions, *([scores.values] if scores is not None else []))
        if scores is not None:
            scores = _StepScores(hosts[1], scores.index)  # the copy on its way to the host
        self._in_flight = _UnreadStep(predictions, hosts[0], scores, arrived, placeholders, scored)
        if not self.scheduler.has_work():  # nothing left to overlap with
            self.synchronize()
        return entries

    def synchronize(self) -> None:
        """Read back the tokens of the step in flight (overlapped steps), waiting for the device,
        and put them in place of their placeholders."""
        step, self._in_flight = self._in_flight, None
        if step is None:
            return
        start = time.perf_counter()
        if step.arrived is not None:
            step.arrived.synchronize()
        values = step.host.tolist()
        _fill_logprobs(step.scored, step.scores.values.tolist() if step.scores is not None else [], step.scores)
        self.metrics.waited += time.perf_counter() - start
        now = time.perf_counter() - self._start
        for r, index in step.placeholders:
            token = r.tokens[index] = values[-1 - r.tokens[index]]
            self._stamp(r, 1, now)
            if token in r.stop_tokens:
                if not r.done:
                    self._finish(r, "stop")  # the step launched after this one drops r's entry (_commit)
                elif r.finish_reason == "length":  # its last token: a stop token, as it turns out
                    r.finish_reason = "stop"

    def _commit(self, entries: Sequence[Entry], predictions: list[int], now: float | None
                ) -> tuple[list[tuple[Request, int]], list[tuple[Request, int, int]]]:
        """Advance every entry's request by the step's `predictions` (one per packed row; tokens,
        or placeholders when `now` is None, which are returned as (request, index) and stamped
        when read). Also returns where the new tokens' logprobs go, for requests that asked:
        (request, index in its logprobs, the row that picked the token), NaN until filled."""
        placeholders, scored = [], []
        for e, picks in _picking_rows(entries):
            r = e.request
            if r.done:  # stopped by a token read back after this step was launched
                continue
            added = self._advance(e, predictions[picks.stop - len(e.tokens) : picks.stop])
            if now is not None:
                self._stamp(r, added, now)
            else:
                placeholders.extend((r, i) for i in range(len(r.tokens) - added, len(r.tokens)))
            if added and r.sampling.logprobs is not None:
                # The new tokens are the picks of the entry's rows from its first picking row on
                # (accepted drafts equal the picks of the rows before them).
                scored.extend((r, len(r.logprobs) + j, picks.start + j) for j in range(added))
                r.logprobs.extend([math.nan] * added)
                r.top_logprobs.extend({} for _ in range(added))
        return placeholders, scored

    def _row_sampling(self, entries: Sequence[Entry]) -> RowSampling | None:
        """The step's rows that draw their token (requests that sample, not greedy), with the
        position each draws for. None when every request of the step is greedy."""
        rows: list[int] = []
        params: list[SamplingParams] = []
        positions: list[int] = []
        for e, picks in _picking_rows(entries):
            if not e.request.sampling.greedy:
                rows.extend(picks)
                # Row i of the entry (at position start + i) picks the token after it.
                after = e.start + len(e.tokens) - len(picks) + 1
                positions.extend(range(after, after + len(picks)))
                params.extend([e.request.sampling] * len(picks))
        return row_sampling(self.device, rows, params, positions) if rows else None

    def _scores(self, entries: Sequence[Entry], logits: torch.Tensor, predictions: torch.Tensor) -> _StepScores | None:
        """The logprobs of the step's picks (and the top-n) for the requests that asked for them,
        computed on the device; None when none did."""
        rows: list[int] = []
        top = 0
        for e, picks in _picking_rows(entries):
            asked = e.request.sampling.logprobs
            if asked is not None:
                rows.extend(picks)
                top = max(top, asked)
        if not rows:
            return None
        (index,) = to_device(self.device, np.array(rows, dtype=np.int64))
        values = token_logprobs(logits, index, predictions[index], top)
        return _StepScores(values, {r: i for i, r in enumerate(rows)})

    def _stamp(self, r: Request, count: int, now: float) -> None:
        """`count` of r's tokens reached the host at `now` (the first one sets r's TTFT, from when
        r was added)."""
        if count:
            arrival = self._arrivals.pop(r.id, None)
            if arrival is not None:
                self.metrics.ttft[r.id] = now - arrival
            self.metrics.token_times.setdefault(r.id, []).extend([now] * count)

    def prepare(self, entries: Sequence[Entry]) -> StepInputs:
        """The host work of a step: the packed token ids and positions, the batch layout over the
        KV cache (built once for every layer) and the verify tree mask, all on the engine's device,
        copied without waiting for it. Placeholder tokens (negative: overlapped steps) are gathered
        on the device from the predictions of the step in flight. The requests' blocks must
        already hold every entry's positions."""
        tokens = np.array([t for e in entries for t in e.tokens], dtype=np.int64)
        q_lens, starts = [len(e.tokens) for e in entries], [e.start for e in entries]
        batches = tuple(kv.prepare([self._block_ids(e.request, g) for e in entries], q_lens, starts,
                                   attention_chunks=self._attention_chunks[g]) for g, kv in enumerate(self.kvs))
        batch = batches[0]
        pending = np.flatnonzero(tokens < 0)  # placeholders for the step in flight's tokens
        if not pending.size:
            (ids,) = to_device(self.device, tokens[None])
        else:
            if self._in_flight is None:
                raise ValueError(f"entries hold placeholder tokens {tokens[pending].tolist()} but no step is in flight")
            ids, where, rows = to_device(self.device, tokens[None], pending, -1 - tokens[pending])
            ids[0, where] = self._in_flight.predictions[rows]  # on the device, after the step that makes them
        return StepInputs(ids, batch.positions[None], batch, self._tree_mask(entries), batches)

    @torch.no_grad()  # serving never needs gradients (and compiled stages guard on grad mode)
    def forward(self, entries: Sequence[Entry], inputs: StepInputs | None = None) -> torch.Tensor:
        """Run the model over the entries' tokens packed into one batch, writing their k/v into
        the cache; returns the logits `[1, total tokens, vocab]` (on the engine's device).
        `inputs` is `prepare(entries)` when the caller already made it (then the step is not
        split into nano-batches)."""
        # Every layer's attention call asks for the eager config; with none set, that reads a dozen
        # environment variables (about 15 us per layer on a CPU like CI's). One step, one config:
        # read it once here.
        with use_config(current_config()):
            if self.nano_batches != 1 and inputs is None and len(entries) > 1:
                groups, stream_shares = self._nano_plan(entries)
                if len(groups) > 1:
                    self.metrics.nano_batched_steps += 1
                    return self._forward_nano(groups, stream_shares)
            step = inputs if inputs is not None else self.prepare(entries)
            # Key starts (a step traced with packed position ids) are not needed: each request's
            # queries read only its own KV cache.
            attend = lambda cut, q, k, v, key_starts=None: self._attend(step, cut, q, k, v)  # noqa: E731
            (logits,) = self.program.run([step.ids, step.positions], attention=attend)
            return logits

    def nano_groups(self, entries: Sequence[Entry]) -> list[list[Entry]]:
        """The nano-batches `forward` runs a step of these entries as (one group: whole): k of
        them with `nano_batches` k (`split_entries`); with `"auto"`, as the cost model on the
        device's table entry cuts the step for the program the engine runs now, and whole
        without streams, where the nano-batches would run one after another with nothing to
        overlap."""
        return self._nano_plan(entries)[0]

    def _nano_plan(self, entries: Sequence[Entry]) -> tuple[list[list[Entry]], dict[int, float] | None]:
        """`nano_groups`, and with `"auto"` the SM share per stream of the split search's model
        (`DEFAULT_STREAM_OF_RESOURCE`) the cut was costed at (None: the tokens set the shares)."""
        if self.nano_batches != "auto":
            return split_entries(entries, self.nano_batches), None
        if self.streams is None or len(entries) < 2:
            return [list(entries)], None
        if self._auto_split is None or self._auto_split.program is not self.program:
            self._auto_split, self._auto_refused = AutoSplit(self.program, detect_device(str(self.device))), None
        groups, stream_shares = self._auto_split.split(entries)
        why = self._auto_split.refused
        if not self._auto_split.costed:
            why = "the program's dense stages hold no padded GEMM to cost (built without the gemm_padding pass?)"
        if why is not None and why != self._auto_refused:
            self._auto_refused = why
            warnings.warn(f'nano_batches="auto" runs every step whole: {why}; give an int nano_batches to split',
                          RuntimeWarning, stacklevel=3)
        return groups, stream_shares

    def _forward_nano(self, groups: list[list[Entry]], stream_shares: dict[int, float] | None = None) -> torch.Tensor:
        """NanoFlow's overlap for a serving step: the nano-batches (whole sequences, so each
        one's attention needs no other's) run the program stage by stage, so one nano-batch's
        memory-bound decode attention can run beside another's GEMMs. Dense stages are
        token-wise and every nano-batch writes and reads only its own sequences' KV, so nothing
        crosses between nano-batches until the logits are joined.

        With a fixed k (`stream_shares` None), each nano-batch runs on its own stream and, with
        `nano_shares`, its persistent kernels launch over its token share of the device
        (`sm_shares`). Under `"auto"` the streams are the split search's model's, one per kind
        of op (`DEFAULT_STREAM_OF_RESOURCE`): every dense stage on the compute stream and every
        attention on the memory stream, in turn by nano-batch, a stage waiting on an event
        after its nano-batch's previous one; each launches at the share the search costed its
        stream at (`stream_shares`). So, as in the model, two nano-batches' dense stages never
        run at once, and the shares running together never add up to more than the device.

        A tensor that crosses streams (a stage's outputs, the step's inputs) stays referenced
        until its nano-batch's turn collecting the logits, enqueued after all of that
        nano-batch's stages, which allocates nothing; what any stream runs after that is the
        next step's, forked after `end` joins them all: the caching allocator cannot hand its
        memory to work that might run while another stream still reads it."""
        runs: list[Any] = [None] * len(groups)
        outputs: list[torch.Tensor | None] = [None] * len(groups)
        dense = [stage.kind == "dense" for stage in self.program.stages]
        ran = [0] * len(groups)  # stages each nano-batch has run
        token_shares = sm_shares(groups) if stream_shares is None else None

        def stream_of(j: int, stage: int) -> int:
            """The stream of nano-batch j's stage (`len(dense)`: the turn collecting its output,
            on its last stage's stream)."""
            if stream_shares is None:
                return j
            return DEFAULT_STREAM_OF_RESOURCE["compute" if dense[min(stage, len(dense) - 1)] else "memory"]

        def share_of(j: int, stage: int) -> float | None:
            """The device share nano-batch j's stage launches over (None: all of it)."""
            if not self.nano_shares or stage == len(dense):
                return None
            if stream_shares is None:
                return token_shares[j]
            return stream_shares.get(stream_of(j, stage))

        def start(j: int) -> None:
            step = self.prepare(groups[j])
            attend = lambda cut, q, k, v, key_starts=None: self._attend(step, cut, q, k, v)  # noqa: E731
            runs[j] = self.program.stepwise([step.ids, step.positions], attention=attend)

        def advance(j: int, stage: int) -> None:
            # A generator runs whatever stage comes next: a stream missing its wait would run a
            # stage early on the wrong stream and share, and still give the right logits.
            if ran[j] != stage:
                raise RuntimeError(f"nano-batch {j}'s stage {stage} was launched after {ran[j]} of its stages ran: "
                                   "a stream is missing a wait on its previous stage")
            try:
                with grid_share(share_of(j, stage)):  # the stage's kernels are launched inside next()
                    next(runs[j])
                ran[j] += 1
            except StopIteration as done:
                outputs[j] = done.value[0]

        streams = self.streams
        # Without streams (the CPU) the nano-batches run in the same order, one piece at a time.
        launch = streams.launch if streams is not None else (lambda stream, fn: fn())
        if streams is not None:
            streams.begin()
        for j in range(len(groups)):
            launch(stream_of(j, 0), lambda j=j: start(j))
        # One launch per stage per nano-batch, round robin: a stream never waits for the host to
        # finish enqueueing another nano-batch's whole step. The extra turn collects the outputs.
        after: list[Any] = [None] * len(groups)  # per nano-batch, the event after its last stage
        for stage in range(len(dense) + 1):
            for j in range(len(groups)):
                stream = stream_of(j, stage)
                if after[j] is not None:
                    streams.wait(stream, after[j])
                    after[j] = None
                launch(stream, lambda j=j, stage=stage: advance(j, stage))
                if streams is not None and stage < len(dense) and stream_of(j, stage + 1) != stream:
                    after[j] = streams.record(stream)
        if streams is not None:
            streams.end()
        return torch.cat(outputs, dim=1)

    def _block_ids(self, r: Request, group: int = 0) -> np.ndarray:
        """r's block list in KV group `group` (`r.blocks` for the first) as an int32 array,
        converted once per block list: the scheduler gives a request a new list when it admits
        it and keeps it to the end, so the list (the same object, the same length) keys the
        array; any other list gets a new one."""
        blocks = getattr(r, self.scheduler.groups[group].blocks)
        arrays = self._block_arrays[group]
        cached = arrays.get(r.id)
        if cached is None or cached[0] is not blocks or len(cached[1]) != len(blocks):
            cached = arrays[r.id] = (blocks, np.asarray(blocks, dtype=np.int32))
        return cached[1]

    def _advance(self, e: Entry, predictions: list[int]) -> int:
        """Commit the entry's outcome to its request; returns how many tokens it appended."""
        r = e.request
        if e.kind == "prefill":
            r.computed += len(e.tokens)
            self.scheduler.register_full_blocks(r, r.computed)
            if r.prefilling:
                return 0
            new = [predictions[-1]]
        elif e.kind == "decode":  # most entries of most steps: nothing drafted to check
            r.computed += 1
            new = [predictions[0]]
        else:
            draft = e.tokens[1:]
            accepted = accept_draft(draft, predictions)
            self.metrics.drafted += len(draft)
            self.metrics.accepted += accepted
            # The last token and the accepted drafts now have KV; the rejected drafts' slots are
            # past the new length and get overwritten.
            r.computed += 1 + accepted
            new = draft[:accepted] + [predictions[accepted]]
        new = new[: r.max_new_tokens - r.generated]
        # Placeholders (negative) never match: an overlapped step's stop tokens are found when read.
        stop = None
        if r.stop_tokens and not r.stop_tokens.isdisjoint(new):
            stop = next(i for i, t in enumerate(new) if t in r.stop_tokens)
            new = new[: stop + 1]
        r.tokens += new
        r.generated += len(new)
        self.metrics.generated += len(new)
        if r.generated >= r.max_new_tokens or stop is not None:
            self._finish(r, "length" if stop is None else "stop")
        return len(new)

    def abort(self, request_id: int) -> bool:
        """End a waiting or running request now (`finish_reason` "abort"), keeping the tokens it
        has; its KV blocks are free for the next step. Call it between steps. With overlapped
        steps, its token from the step in flight still arrives (with the next step's read-back or
        `synchronize`), and no later step includes it. False when no unfinished request has this
        id."""
        r = self.scheduler.find(request_id)
        if r is None:
            return False
        self._finish(r, "abort")
        return True

    def _finish(self, r: Request, reason: str) -> None:
        self.scheduler.finish(r, reason)
        for arrays in self._block_arrays:
            arrays.pop(r.id, None)

    def _tree_mask(self, entries: list[Entry]) -> torch.Tensor | None:
        """The step's tree mask when it verifies drafts: linear drafts, each drafted token sees the
        tokens before it; entries longer than the mask (prompt chunks) stay causal."""
        if not any(e.kind == "verify" for e in entries):
            return None
        s = 1 + self.max_draft
        mask = torch.tril(torch.ones(s, s, dtype=torch.bool)).expand(len(entries), s, s).contiguous()
        return to_device(self.device, mask)[0]

    def _attend(self, step: StepInputs, cut: AttentionCut, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                ) -> torch.Tensor:
        q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, heads, head_dim]
        group, layer = self._layer_at[cut.index]
        kv, batch, tree = self.kvs[group], step.batches[group], step.tree_mask
        kv.write_batch(layer, batch, k, v)
        out = kv.attend_batch(layer, q, batch, scale=cut.scale, tree_mask=tree,
                                   sliding_window=cut.sliding_window, softcap=cut.softcap,
                                   sinks=cut.sink_logits(self.device), attention_chunk=cut.attention_chunk)
        return out.unsqueeze(0).transpose(1, 2)


def _picking_rows(entries: Sequence[Entry]) -> Iterator[tuple[Entry, range]]:
    """Each entry and the rows of the packed step whose picks it uses: a prompt chunk only its
    last row (the tokens after the others are the prompt's), decode and verify entries all."""
    row = 0
    for e in entries:
        n = len(e.tokens)
        yield e, range(row + n - 1 if e.kind == "prefill" else row, row + n)
        row += n


def _fill_logprobs(scored: Sequence[tuple[Request, int, int]], values: list[list[float]],
                   scores: _StepScores | None) -> None:
    """Put a step's logprobs (read back: `values`) where `_commit` left NaN for them."""
    for r, i, row in scored:
        v = values[scores.index[row]]
        r.logprobs[i] = v[0]
        k = (len(v) - 1) // 2  # the step's top-n: values, then their token ids
        r.top_logprobs[i] = {int(v[1 + k + j]): v[1 + j] for j in range(min(r.sampling.logprobs, k))}


def _start_read_back(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """Start copying a step's results (its predictions, its logprobs) to the host without
    waiting for them: (the host tensors, the event recorded after the copies; None on the CPU,
    where they already are)."""
    if tensors[0].device.type != "cuda":
        return list(tensors), None
    hosts = []
    for t in tensors:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        hosts.append(host)
    arrived = torch.cuda.Event()
    arrived.record()
    return hosts, arrived
