"""Hybrid prefill/decode/verify scheduling under a fixed token budget (XY-Serve's hybrid P/D/V).

Each step first gives every running request that finished its prompt a decode slot: its last
token, plus the drafted tokens to verify when a drafter proposed some. The rest of the budget
goes to prompt chunks, oldest request first, so long prompts are chunked over several steps and
no request waits forever.

KV blocks are given as requests grow (vLLM's paged allocation): a request is admitted when the
blocks for its prompt are free, less the prompt blocks it shares with a cached prefix, and each
decode or verify slot takes the blocks its new positions need. When none is left, the youngest
running request is preempted: its blocks go back, and it returns to the head of the queue to
recompute its prompt and the tokens it generated when it is admitted again (vLLM's recompute
preemption). The oldest request is never preempted for another, and every request's widest need
fits the cache (its whole life; under a window, its widest step), so each request finishes.

When every attention layer of the model slides a window of `w` keys (Mistral's), a request's
leading blocks go back as soon as its next query position has moved `w` past their last token:
no later query of it sees them, so a request holds about `(w + max(tokens in its step,
max_draft)) / block_size` blocks (a verify's blocks stay when its drafts are rejected), not its
whole length. Their entries stay in its block list (positions keep their index), unread. Such a
request is admitted with one free block, and each prompt chunk takes the blocks it writes, so a
prompt longer than the whole cache is served; a cached prefix serves it when the blocks its first
query sees are cached, even if the earlier ones were evicted. A chunk leaves one free block for
each other running request, whose next decode slot would otherwise preempt it (to recompute the
prompt from its start) for the block it crosses into; it is cut short to the blocks it may take,
or waits a step without preempting anyone. A request is admitted only when budget is left after every
running request's chunk and a block beyond those left for them is free, that is when those
chunks end their prompts, so the running requests older than one in its prompt are all past
theirs, and their decode slots preempt it, the youngest, if they still need its blocks.

A model whose layers mix full attention and sliding windows (Gemma-2/3, Cohere2, gpt-oss,
OLMo-3) keeps its KV in two groups, each its own block pool (vLLM's hybrid KV cache; the engine
sizes them, `blocks.kv_groups`): the full layers' blocks (`Request.blocks`) as above without a
window, all of a prompt's at admission and none back before the request ends, and the sliding
layers' (`Request.window_blocks`) as above under the widest of their windows. Every rule holds in
each group: admission needs both groups' blocks (a cached prefix counts where every group has
what its first query sees), a prompt chunk takes its sliding blocks as it goes, and a decode slot
short of a block in either group preempts the youngest request, which gives back both.
"""

from __future__ import annotations

import numbers
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from .blocks import BlockAllocator, first_block_in_window, prefix_hashes, release_behind_window
from .sampling import SamplingParams


@dataclass(eq=False)  # requests are identities: two with equal fields are still two requests
class Request:
    """A prompt to continue for `max_new_tokens` tokens, or until it generates one of
    `stop_tokens` (kept, as `generate` keeps its EOS token), and its serving state. `sampling`
    says how each token is picked (greedy by default); a sampled request without a seed gets
    one here, kept in `sampling.seed`."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    stop_tokens: frozenset[int] = frozenset()
    sampling: SamplingParams = SamplingParams()
    # Prompt + generated (committed). A negative entry -1 - row stands for a token the engine
    # launched but has not read back yet: row `row` of the step in flight (ServingEngine.overlap).
    tokens: list[int] = field(default_factory=list)
    computed: int = 0  # leading tokens whose KV is in the cache
    # Leading tokens computed as prompt chunks: the prompt, or after a preemption every token.
    prefill_len: int = field(default=0, init=False)
    blocks: list[int] = field(default_factory=list)
    # Leading entries of `blocks` given back because the window of every layer they serve has
    # passed them (see the module docstring): never read again, possibly another request's by now.
    released: int = field(default=0, init=False)
    # A model that mixes full and sliding-window layers: `blocks` are its full layers' and these
    # its sliding layers' (another pool; module docstring), released behind the window as above.
    window_blocks: list[int] = field(default_factory=list)
    window_released: int = field(default=0, init=False)
    generated: int = 0
    # With `sampling.logprobs` set, one entry per generated token: its log-probability, and the
    # most likely tokens' ({token: log-probability}, when sampling.logprobs > 0). NaN (and {})
    # until an overlapped step's values are read back, as its tokens are.
    logprobs: list[float] = field(default_factory=list, init=False)
    top_logprobs: list[dict[int, float]] = field(default_factory=list, init=False)
    done: bool = False
    # Why it ended, once done: "length" (max_new_tokens), "stop" (a stop token), "abort", or "error"
    # (a step it was in failed).
    finish_reason: str | None = None
    # The prompt's full blocks' prefix hashes, made once (see `prompt_hashes`).
    _hashes: tuple[int, list[str]] | None = field(default=None, init=False, repr=False)
    _registered: int = field(default=0, init=False, repr=False)  # leading prompt blocks offered for reuse

    def __post_init__(self) -> None:
        if isinstance(self.prompt, (str, bytes)) or not isinstance(self.prompt, Sequence):
            raise ValueError(f"request {self.id}: the prompt must be a list of token ids, got {type(self.prompt).__name__}")
        if not self.prompt or not _is_token_id(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"request {self.id}: needs a non-empty prompt and max_new_tokens an int >= 1, got "
                             f"{len(self.prompt)} tokens and {self.max_new_tokens!r}")
        # A negative token would read as a placeholder for a token in flight (see `tokens`).
        bad = [t for t in self.prompt if not _is_token_id(t)]
        if bad:
            raise ValueError(f"request {self.id}: the prompt must hold token ids (ints >= 0), got {bad[:5]}")
        # A 0-d tensor or array is one id too, though iterable in name (tuple() raises a bare TypeError).
        bare = getattr(self.stop_tokens, "ndim", None) == 0
        if bare or isinstance(self.stop_tokens, (numbers.Integral, str, bytes)) or not isinstance(self.stop_tokens, Iterable):
            # One id (transformers' eos_token_id often is one) would fail below as "not iterable".
            one = self.stop_tokens.item() if bare else self.stop_tokens
            hint = f": pass [{one}] for one stop token" if _is_token_id(one) else ""
            raise ValueError(f"request {self.id}: stop_tokens must be a collection of token ids, got "
                             f"{self.stop_tokens!r}{hint}")
        # Read once: a generator checked by all() and then read again would give no stop tokens.
        self.stop_tokens = tuple(self.stop_tokens)
        if not all(_is_token_id(t) for t in self.stop_tokens):
            raise ValueError(
                f"request {self.id}: stop_tokens must be token ids (ints >= 0), got {sorted(self.stop_tokens, key=str)}"
            )
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError(f"request {self.id}: sampling must be a SamplingParams, got {type(self.sampling).__name__}")
        self.sampling = self.sampling.seeded()
        self.prompt = [int(t) for t in self.prompt]
        self.stop_tokens = frozenset(int(t) for t in self.stop_tokens)
        self.tokens = list(self.prompt)
        self.prefill_len = len(self.prompt)

    def prompt_hashes(self, block_size: int) -> list[str]:
        """`prefix_hashes(prompt, block_size)`, computed on the first call only: admission (tried
        every step while the cache is full) and every prompt chunk need them."""
        if self._hashes is None or self._hashes[0] != block_size:
            self._hashes = (block_size, prefix_hashes(self.prompt, block_size))
        return self._hashes[1]

    @property
    def held_blocks(self) -> list[int]:
        """The blocks this request holds a reference to: `blocks` past the released ones."""
        return self.blocks[self.released:]

    @property
    def held_window_blocks(self) -> list[int]:
        """The sliding layers' blocks this request holds (a model mixing full and sliding
        layers): `window_blocks` past the released ones."""
        return self.window_blocks[self.window_released:]

    @property
    def prefilling(self) -> bool:
        """True until the KV of every token to prefill (the prompt; after a preemption, every
        token so far) is computed."""
        return self.computed < self.prefill_len


def _is_token_id(t: object) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0


class Entry(NamedTuple):  # a tuple: made for every running request in every step, cheaply
    """One request's part of a step: `tokens` at positions start … start + len − 1."""

    request: Request
    tokens: list[int]
    start: int
    kind: str  # "prefill" | "decode" | "verify"


class _Group(NamedTuple):
    """A KV group as the scheduler sees it: its blocks' allocator, its window (None: its layers
    see the whole sequence), and the `Request` attributes holding a request's block list and
    released count in it."""

    allocator: BlockAllocator
    window: int | None
    blocks: str
    released: str


class Scheduler:
    """Fills steps of at most `token_budget` tokens; at most `decode_slots` requests run at once,
    so every running request gets its decode slot in every step. `sliding_window`: the window
    every attention layer of the model slides (None when some layer sees the whole sequence);
    blocks it has passed go back early (see the module docstring). `sliding_group`: for a model
    whose layers mix full attention (`allocator`'s blocks, `Request.blocks`) and sliding windows,
    the sliding layers' own allocator and their widest window (`Request.window_blocks`)."""

    def __init__(self, allocator: BlockAllocator, *, token_budget: int, decode_slots: int, max_draft: int = 0,
                 sliding_window: int | None = None, sliding_group: tuple[BlockAllocator, int] | None = None) -> None:
        if decode_slots < 1 or max_draft < 0:
            raise ValueError(f"decode_slots must be >= 1 and max_draft >= 0, got {decode_slots} and {max_draft}")
        for window in (sliding_window, *(sliding_group or ())[1:]):
            if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
                raise ValueError(f"sliding_window must be an int >= 1 or None, got {window!r}")
        if sliding_group is not None and (sliding_window is not None
                                          or sliding_group[0].block_size != allocator.block_size):
            raise ValueError("sliding_group is for a model whose other layers see the whole sequence "
                             "(sliding_window=None), with blocks of the same size as the allocator's")
        self.sliding_window = sliding_window
        if token_budget <= decode_slots * (1 + max_draft):
            raise ValueError(
                f"token_budget {token_budget} leaves no room for prompt chunks after {decode_slots} decode slots of up "
                f"to {1 + max_draft} tokens: raise it above {decode_slots * (1 + max_draft)}"
            )
        self.allocator = allocator
        # Every group a request takes blocks from: the first one is `allocator`'s.
        self.groups = [_Group(allocator, sliding_window, "blocks", "released")]
        if sliding_group is not None:
            self.groups.append(_Group(*sliding_group, "window_blocks", "window_released"))
        self._windowed = tuple(g for g in self.groups if g.window is not None)
        self._mixed = sliding_group is not None
        self.token_budget, self.decode_slots, self.max_draft = token_budget, decode_slots, max_draft
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._unfinished: dict[int, Request] = {}  # waiting or running, by id
        self.last_preempted: list[Request] = []  # by the latest `schedule`

    def add(self, request: Request) -> None:
        """Queue a request (first come, first served)."""
        self.check(request)
        self.waiting.append(request)
        self._unfinished[request.id] = request

    def check(self, request: Request) -> None:
        """ValueError when `add` would refuse the request (done, its id waiting or running, or
        needing more KV blocks than there are); queues nothing."""
        if request.done:
            raise ValueError(f"request {request.id} is done: make a new Request to serve its prompt again")
        if request.id in self._unfinished:
            raise ValueError(f"a request with id {request.id} is already waiting or running: ids must be unique "
                             "(metrics and abort() go by id)")
        # Its last generated token is never fed, and its drafts stop short of max_new_tokens (see
        # `schedule`): its KV never holds more than len(prompt) + max_new_tokens - 1 positions.
        life = self._blocks_for(len(request.prompt) + request.max_new_tokens - 1)
        for g in self.groups:
            # Under a window: the w + max_draft positions p - w + 1 … p + max_draft of its widest step
            # (a chunk can be one token), over at most (positions - 2) // block_size + 2 blocks.
            need = life if g.window is None else min(life, (g.window + self.max_draft - 2) // g.allocator.block_size + 2)
            if need > g.allocator.num_blocks:
                layers = (" of its sliding-window layers" if g.window is not None else " of its full-attention layers"
                          ) if self._mixed else ""
                raise ValueError(f"request {request.id} needs {need} KV blocks{layers}, more than the "
                                 f"{g.allocator.num_blocks} there are")

    def has_work(self) -> bool:
        """Requests waiting or running."""
        return bool(self.waiting or self.running)

    def schedule(self, drafts: dict[int, list[int]] | None = None) -> list[Entry]:
        """The next step's entries: decode/verify slots first, then prompt chunks. A slot that
        needs a block when none is free preempts the youngest running request (see the module
        docstring); a step that preempted admits no one (the request it preempted could come
        straight back, to be preempted again)."""
        budget = self.token_budget
        entries: list[Entry] = []
        prefilling = []
        self.last_preempted = []
        bs = self.allocator.block_size
        mixed = self._mixed
        i = 0
        while i < len(self.running):  # one pass per step over every running request: kept lean
            r = self.running[i]
            i += 1
            for g in self._windowed:
                self._release_passed(r, g)
            if r.computed < r.prefill_len:
                prefilling.append(r)
                continue
            room = min(self.max_draft, r.max_new_tokens - r.generated - 1)
            draft = drafts[r.id][: max(0, room)] if drafts and r.id in drafts else ()
            positions = r.computed + 1 + len(draft)
            # The call only when it grows.
            if (len(r.blocks) * bs < positions or mixed and len(r.window_blocks) * bs < positions) \
                    and not self._grow(r, positions):
                break  # r, the youngest left, gave its own blocks up
            entries.append(Entry(r, [r.tokens[-1], *draft], r.computed, "verify" if draft else "decode"))
            budget -= 1 + len(draft)
        for r in prefilling:  # older than any request preempted above: still running
            if budget > 0:
                budget -= self._chunk(r, budget, entries)
        if self.last_preempted:
            return entries
        while self.waiting and budget > 0 and len(self.running) < self.decode_slots and self._admit(self.waiting[0]):
            r = self.waiting.popleft()
            self.running.append(r)
            budget -= self._chunk(r, budget, entries)
        return entries

    def finish(self, request: Request, reason: str) -> None:
        """Drop a finished request (running or still waiting) and give its blocks back; `reason`
        becomes its `finish_reason`."""
        if request in self.waiting:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
        del self._unfinished[request.id]
        self._drop_blocks(request)
        request.done = True
        request.finish_reason = reason

    def find(self, request_id: int) -> Request | None:
        """The waiting or running request with this id, if any."""
        return self._unfinished.get(request_id)

    def register_full_blocks(self, request: Request, upto: int) -> None:
        """Offer the request's full prompt blocks below position `upto` for prefix reuse, in
        every group (not those it gave back already: they may hold another request's keys by now)."""
        bs = self.allocator.block_size
        hashes = request.prompt_hashes(bs)
        full = min(upto, len(request.prompt)) // bs
        # Blocks offered by earlier chunks stay offered.
        for g in self.groups:
            blocks = getattr(request, g.blocks)
            for i in range(max(request._registered, getattr(request, g.released)), full):
                g.allocator.register(blocks[i], hashes[i])
        request._registered = max(request._registered, full)

    def _chunk(self, r: Request, budget: int, entries: list[Entry]) -> int:
        """Add r's next prompt chunk, at most `budget` tokens, to the step; returns its length."""
        n = min(budget, r.prefill_len - r.computed)
        bs, spare = self.allocator.block_size, len(self.running) - 1  # a block for each other request
        # Only windowed groups take their prompt's blocks chunk by chunk (see `_admit`): a full
        # group's come whole at admission, so a cut below never strands blocks of another group.
        for g in self.groups:
            blocks = getattr(r, g.blocks)
            while len(blocks) * bs < r.computed + n:
                if g.allocator.available > spare:
                    blocks.append(g.allocator.allocate())
                elif len(blocks) * bs > r.computed:  # blocks for the chunk's start: a shorter chunk
                    n = len(blocks) * bs - r.computed
                else:  # none: r waits for blocks to come back (see the module docstring)
                    return 0
        entries.append(Entry(r, r.tokens[r.computed : r.computed + n], r.computed, "prefill"))
        return n

    def _blocks_for(self, positions: int) -> int:
        return -(-positions // self.allocator.block_size)

    def _admit(self, r: Request) -> bool:
        """Give r its prompt's blocks in every group, when free, less those a cached prefix
        shares: all of them, or in a windowed group the shared ones its first query sees and one
        more (its prompt chunks take the rest as they go)."""
        bs = self.allocator.block_size
        spare = len(self.running)  # under a window: one block for each running request (see `_chunk`)
        # When that fails even with nothing shared, the check below would too: skip the search.
        if any(1 + spare > g.allocator.available for g in self._windowed):
            return False
        # Reuse full prompt blocks, but always compute the last token to prefill (its logits are needed).
        end, found = self._cached_prefix(r.prompt_hashes(bs)[: (r.prefill_len - 1) // bs])
        needs = []
        for g, (_, kept) in zip(self.groups, found):
            need, keep_free = (self._blocks_for(r.prefill_len) - len(kept), 0) if g.window is None else (1, spare)
            if need + keep_free > g.allocator.available - sum(1 for b in kept if g.allocator.refs[b] == 0):
                return False
            needs.append(need)
        for g, (passed, kept), need in zip(self.groups, found, needs):
            for b in kept:
                g.allocator.share(b)
            # The passed blocks' entries are never read (`released`): any block id keeps their index.
            setattr(r, g.blocks, [0] * passed + kept + [g.allocator.allocate() for _ in range(need)])
            setattr(r, g.released, passed)
        r.computed = end * bs
        return True

    def _cached_prefix(self, hashes: Sequence[str]) -> tuple[int, list[tuple[int, list[int]]]]:
        """The longest cached prompt prefix (in blocks) a request can start from in every group,
        and per group (the count of its leading blocks a window has passed, the cached blocks
        after them). A full group needs the whole prefix cached; a windowed one only the blocks
        its first query sees: a block's hash covers every token before it, so the passed ones
        may have been evicted, as they are first (they go back first)."""
        bs = self.allocator.block_size
        whole = [g.allocator.lookup(hashes) if g.window is None else None for g in self.groups]
        for end in range(min([len(hashes)] + [len(k) for k in whole if k is not None]), 0, -1):
            found = []
            for g, kept in zip(self.groups, whole):
                if kept is not None:
                    found.append((0, kept[:end]))
                    continue
                passed = first_block_in_window(end * bs, g.window, bs)
                kept = g.allocator.lookup(hashes[passed:end])
                if len(kept) < end - passed:
                    break
                found.append((passed, kept))
            else:
                return end, found
        return 0, [(0, [])] * len(self.groups)

    def _grow(self, r: Request, positions: int) -> bool:
        """Give r the blocks for its first `positions` positions in every group, preempting the
        youngest running requests while a group has none free; False when r itself had to go."""
        for g in self.groups:
            blocks = getattr(r, g.blocks)
            while len(blocks) * g.allocator.block_size < positions:
                if g.allocator.available == 0:
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is r:
                        return False
                    continue
                blocks.append(g.allocator.allocate())
        return True

    def _drop_blocks(self, r: Request) -> None:
        """Give back every block r holds, in every group, its last block first, and empty its
        block lists. A prefix is found in the cache only from its first block on
        (`BlockAllocator.lookup`), and idle cached blocks are evicted least recently released
        first: released front to back, one eviction would take the prefix's first block and
        strand the rest, cached but never found again."""
        for g in self.groups:
            blocks = getattr(r, g.blocks)
            for block in reversed(blocks[getattr(r, g.released):]):
                g.allocator.release(block)
            setattr(r, g.blocks, [])
            setattr(r, g.released, 0)

    def _release_passed(self, r: Request, g: _Group) -> None:
        """Give back r's leading blocks in windowed group `g` whose every position is outside the
        window of its next query position, `r.computed` (it sees positions > r.computed - w;
        later ones see less)."""
        setattr(r, g.released, release_behind_window(g.allocator, getattr(r, g.blocks), getattr(r, g.released),
                                                     r.computed, g.window))

    def _preempt(self, r: Request) -> None:
        """Take a running request's blocks back and queue it first, to recompute every token it
        has (prompt and generated) as its prompt when admitted again."""
        self.running.remove(r)
        self._drop_blocks(r)
        r.computed = 0
        r.prefill_len = len(r.tokens)
        r._registered = 0
        self.waiting.appendleft(r)
        self.last_preempted.append(r)


def accept_draft(draft: Sequence[int], predictions: Sequence[int]) -> int:
    """How many drafted tokens the model agrees with: the longest prefix where draft[i] is the
    model's pick (greedy or drawn) after the tokens before it (predictions[i])."""
    n = 0
    while n < len(draft) and draft[n] == predictions[n]:
        n += 1
    return n
