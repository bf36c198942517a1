"""The hybrid serving loop: block allocator, scheduler invariants (property tests over a model
that answers at random), and greedy decoding equal to eager transformers generation, with and
without speculative verify and with prefix reuse."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from models import needs_transformers

from tileflow.report import GraphReport
from tileflow.passes.disaggregate import AttentionCut
from tileflow.serving import (
    BlockAllocator, OutOfBlocks, Request, SamplingParams, Scheduler, ServingEngine, accept_draft, prefix_hashes,
    prompt_lookup_draft,
)

VOCAB = 64


# ---- a model that answers at random (for the scheduler's invariants) ---------------------------

def held(r: Request, group: int) -> list[int]:
    """The blocks r holds in KV group `group` of its engine (0: `blocks`, 1: `window_blocks`)."""
    return r.held_window_blocks if group else r.held_blocks


def poison_freed_blocks(engine: ServingEngine) -> list[int]:
    """Fill every block with NaN the moment it becomes free (no reference, not cached for prefix
    reuse), in every layer of its KV group: attention that read one again would output NaN. A
    block a window passed is taken out of the prefix cache first, so prompt blocks are poisoned
    too. Returns the list of (group, block) given back while their request still ran (sliding
    windows), growing as it runs."""
    window_releases = []
    for group, (allocator, kv) in enumerate(zip(engine.allocators, engine.kvs)):
        def release_and_poison(block: int, group=group, allocator=allocator, kv=kv, release=allocator.release) -> None:
            running = any(block in held(r, group) for r in engine.scheduler.running)
            release(block)
            if running:
                window_releases.append((group, block))
                if allocator.refs[block] == 0 and not allocator.is_free(block):
                    allocator.forget(block)
            if allocator.is_free(block):
                for cache in (*kv.k, *kv.v):
                    cache[block] = float("nan")

        allocator.release = release_and_poison
    return window_releases


class RandomProgram:
    """Looks like a StageProgram of one layer (or one per entry of `windows`: each layer's sliding
    window, None for full attention): runs the attention stages (so the KV cache and the varlen
    op are exercised) and returns logits from a seeded generator."""

    def __init__(self, seed: int, sliding_window: int | None = None, windows: tuple[int | None, ...] | None = None
                 ) -> None:
        self.cuts = [AttentionCut(i, "attn", 2, 1, 4, 0.5, torch.float32, 64, sliding_window=w)
                     for i, w in enumerate(windows or (sliding_window,))]
        self.gen = torch.Generator().manual_seed(seed)
        self.steps: list[int] = []

    def run(self, inputs, attention):
        ids, pos = inputs
        t = ids.shape[1]
        self.steps.append(t)
        for cut in self.cuts:
            q = torch.randn(1, 2, t, 4, generator=self.gen)
            k = torch.randn(1, 1, t, 4, generator=self.gen)
            out = attention(cut, q, k, k.clone())
            assert out.shape == q.shape and torch.isfinite(out).all()
        # Mostly repeat the input token (so drafts get accepted sometimes), else random.
        logits = torch.randn(1, t, VOCAB, generator=self.gen)
        logits[0, torch.arange(t), ids[0]] += 2.0
        return [logits]


@settings(max_examples=60, deadline=None)
# A preempted request that would come straight back in the same step were admission not paused.
@example(prompts=[[0] * 12, [0] * 12], new_tokens=[4, 5, 1, 1, 1, 1, 1], slots=2, draft=0, extra_budget=1, seed=0,
         stops=set(), overlap=False, aborts={}, spare_blocks=0, window=None, mixed=False)
# A window far shorter than the requests: their leading blocks go back while they run.
@example(prompts=[list(range(8)) * 4, [1, 2] * 9], new_tokens=[12, 9, 1, 1, 1, 1, 1], slots=2, draft=2,
         extra_budget=3, seed=1, stops=set(), overlap=False, aborts={}, spare_blocks=1, window=3, mixed=False)
# Prompts longer than the whole cache under a window: chunks cut short to the blocks there are,
# or waiting for some.
@example(prompts=[[i % 8 for i in range(40)], [3] * 25], new_tokens=[6, 4, 1, 1, 1, 1, 1], slots=2, draft=1,
         extra_budget=9, seed=2, stops=set(), overlap=False, aborts={}, spare_blocks=0, window=6, mixed=False)
# A verify's blocks kept after its drafts were rejected, into a step of one token.
@example(prompts=[[0, 1, 2, 0, 2, 0, 0]], new_tokens=[9, 1, 1, 1, 1, 1, 1], slots=1, draft=3, extra_budget=1,
         seed=10, stops=set(), overlap=False, aborts={}, spare_blocks=0, window=4, mixed=False)
# Full and sliding layers mixed: the sliding group (a pool smaller than the full group's) gives
# blocks back behind the window while the full group keeps the whole length, with drafts, prefix
# reuse (the repeated prompt) and preemption.
@example(prompts=[[i % 8 for i in range(30)], [i % 8 for i in range(30)] + [1, 2], [5] * 9],
         new_tokens=[12, 8, 6, 1, 1, 1, 1], slots=2, draft=2, extra_budget=6, seed=3, stops=set(), overlap=False,
         aborts={}, spare_blocks=12, window=5, mixed=True)
@given(
    prompts=st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=40), min_size=1, max_size=7),
    new_tokens=st.lists(st.integers(1, 12), min_size=7, max_size=7),
    slots=st.integers(1, 4), draft=st.integers(0, 3), extra_budget=st.integers(1, 20), seed=st.integers(0, 1000),
    stops=st.sets(st.integers(0, 7), max_size=3), overlap=st.booleans(),
    aborts=st.dictionaries(st.integers(0, 6), st.integers(0, 30), max_size=3),
    spare_blocks=st.integers(0, 12), window=st.none() | st.integers(1, 12), mixed=st.booleans(),
)
def test_scheduler_invariants(prompts, new_tokens, slots, draft, extra_budget, seed, stops, overlap, aborts,
                              spare_blocks, window, mixed) -> None:
    # Mixed: a full-attention layer beside two sliding ones (windows `window` and a narrower one),
    # in two KV groups.
    mixed = mixed and window is not None
    program = RandomProgram(seed, window, windows=(window, None, max(1, window - 3)) if mixed else None)
    draft = 0 if overlap else draft  # overlapped steps do not draft
    budget = slots * (1 + draft) + extra_budget
    # As few KV blocks as the longest request's life needs, and a few more: requests grow into
    # each other's room and the youngest are preempted. Under a window, a request needs only its
    # widest step's (a one-token prompt chunk, or a decode slot with its drafts): prompts longer
    # than the cache (not with a full layer beside, which needs the life's).
    lives = [-(-(len(p) + n + draft) // 4) for p, n in zip(prompts, new_tokens)]
    if window is not None and not mixed:
        lives = [min(life, (window + draft - 2) // 4 + 2) for life in lives]
    num_blocks = max(lives) + spare_blocks
    engine = ServingEngine(program, token_budget=budget, decode_slots=slots, max_draft=draft, block_size=4,
                           num_blocks=num_blocks, overlap=overlap)
    groups = engine.kv_groups
    assert len(groups) == 1 + mixed and [g.window for g in groups] == ([None, window] if mixed else [window])
    # The groups' blocks take no more memory than num_blocks blocks in every layer.
    assert sum(len(g.layers) * g.num_blocks for g in groups) <= len(program.cuts) * num_blocks
    # Odd seeds sample every other request (the keyed draws, through placeholders and preemption).
    # Even requests of even seeds ask for logprobs (placed as their tokens are, read back late).
    sampling = [SamplingParams(0.8, top_k=seed % 5, seed=seed + i) if seed % 2 and i % 2
                else SamplingParams(logprobs=i % 3) if i % 2 == 0 and seed % 2 == 0 else SamplingParams()
                for i in range(len(prompts))]
    requests = [Request(i, p, new_tokens[i], stop_tokens=stops, sampling=sampling[i]) for i, p in enumerate(prompts)]
    for r in requests:
        engine.add(r)
    assert engine.scheduler.sliding_window == (None if mixed else window)
    poison_freed_blocks(engine)  # a read of a block given back turns the attention output NaN
    # Every request is served within a bound: its tokens at >= 1 per step, computed again after
    # each preemption (only older requests' growth preempts it: at most their blocks in all).
    bound = sum(len(p) + n for p, n in zip(prompts, new_tokens)) * (2 + sum(lives))
    aborted, preemptions = set(), 0
    for step in range(bound):
        for i in sorted(i for i, at in aborts.items() if at == step and i < len(requests)):
            # Waiting, running or done: only an unfinished request can be aborted.
            unfinished = not requests[i].done
            assert engine.abort(i) is unfinished
            aborted.add(i)
        if not engine.scheduler.has_work():
            break
        ready = [r for r in engine.scheduler.running if not r.prefilling]
        before = list(engine.scheduler.running)
        entries = engine.step()
        assert sum(len(e.tokens) for e in entries) <= budget
        decoding = [e.request for e in entries if e.kind in ("decode", "verify")]
        preempted = engine.scheduler.last_preempted
        preemptions += len(preempted)
        # Every request past its prompt got its slot, in order, unless it gave its blocks up.
        assert decoding == [r for r in ready if r not in preempted]
        assert all(not r.blocks and not r.window_blocks and (r.done or r in engine.scheduler.waiting)
                   for r in preempted)
        assert not preempted or all(e.request in before for e in entries)  # a step that preempts admits no one
        assert len(engine.scheduler.running) <= slots
        assert len({id(e.request) for e in entries}) == len(entries)
        # Every reference is a running request's block; nothing leaks across preemptions.
        for g, allocator in enumerate(engine.allocators):
            assert sum(allocator.refs) == sum(len(held(r, g)) for r in engine.scheduler.running)
        for e in entries:
            if window is not None:  # a request holds its window's and its step's blocks, not its length's
                # (or its drafts', after a verify whose drafts were rejected)
                assert len(held(e.request, int(mixed))) <= (window + max(len(e.tokens), 1 + draft) - 3) // 4 + 2, window
            r = e.request
            if (window is None or mixed) and not r.done:  # a full layer's blocks cover the whole length, none given back
                assert r.released == 0 and len(r.blocks) * 4 >= e.start + len(e.tokens)
    assert not engine.scheduler.has_work(), "a request starved"
    engine.synchronize()  # an abort after the last step leaves that step's tokens in flight
    for r in requests:  # each ran to its token count, to its first stop token, or until aborted
        generated = r.tokens[len(r.prompt):]
        assert r.done and len(generated) == r.generated and min(generated, default=0) >= 0
        if r.sampling.logprobs is not None:  # one per token, each read back (no NaN left)
            assert len(r.logprobs) == len(r.top_logprobs) == r.generated
            assert all(lp <= 0 for lp in r.logprobs) and all(len(t) == min(r.sampling.logprobs, VOCAB) for t in r.top_logprobs)
        assert not stops & set(generated[:-1])
        if r.finish_reason == "abort":
            assert r.id in aborted and r.generated <= r.max_new_tokens
        else:
            assert r.finish_reason == ("stop" if generated[-1] in stops else "length")
            assert r.generated == r.max_new_tokens or r.finish_reason == "stop"
    assert engine.metrics.generated == sum(r.generated for r in requests)
    assert engine.metrics.preemptions == preemptions
    event("preempted" if engine.metrics.preemptions else "no preemption")  # --hypothesis-show-statistics
    for allocator, group in zip(engine.allocators, groups):
        assert allocator.all_free()
        allocator.drop_cache()
        assert sorted(allocator._free) == list(range(group.num_blocks))


def test_block_allocator_refcounts_and_cache() -> None:
    a = BlockAllocator(3, 2)
    b0, b1 = a.allocate(), a.allocate()
    a.register(b0, "h0")
    a.share(b0)
    assert a.refs[b0] == 2
    a.release(b0)
    a.release(b0)
    assert a.lookup(["h0", "h1"]) == [b0] and a.available == 2  # cached, idle, still reusable
    a.release(b1)
    with pytest.raises(ValueError, match="released more often"):
        a.release(b1)
    assert a.is_free(b1) and not a.is_free(b0)  # b0 stays cached for reuse
    with pytest.raises(ValueError, match="block 1 is not in use"):  # a free block offered would be overwritten
        a.register(b1, "h1")
    assert a.lookup(["h1"]) == []
    with pytest.raises(ValueError, match="nothing to forget"):
        a.forget(b1)
    got = {a.allocate(), a.allocate(), a.allocate()}  # the idle cached block is evicted last
    assert got == {0, 1, 2} and a.lookup(["h0"]) == []
    with pytest.raises(OutOfBlocks):
        a.allocate()
    c = BlockAllocator(1, 2)
    block = c.allocate()
    c.register(block, "h")
    c.release(block)
    c.forget(block)  # no longer offered: free, and found by no lookup
    assert c.is_free(block) and c.lookup(["h"]) == [] and c.all_free()


def test_drafting_and_acceptance() -> None:
    assert prompt_lookup_draft([5, 6, 7, 8, 5, 6], 3) == [7, 8, 5]
    assert prompt_lookup_draft([1, 2, 3], 3) == []
    assert prompt_lookup_draft([5, 6, 7, 5, 6], 1, ngram=1) == [7]
    for ngram in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="ngram must be an int >= 1"):
            prompt_lookup_draft([5, 6, 7, 5, 6], 2, ngram=ngram)
    assert accept_draft([7, 8, 9], [7, 8, 1, 4]) == 2
    assert accept_draft([7], [6, 1]) == 0
    assert prefix_hashes([1, 2, 3, 4, 5], 2)[0] != prefix_hashes([1, 3, 3, 4, 5], 2)[0]
    assert prefix_hashes([1, 2, 3, 4, 5], 2)[1] == prefix_hashes([1, 2, 3, 4, 9], 2)[1]


def test_verified_drafts_and_a_prompt_chunk_share_the_token_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafts count against the token budget: a step that verifies a request's drafts fills only
    what is left with a prompt chunk. (Drafts left out of the count took steps past the budget,
    which the random invariants rarely reach: a request drafting beside a long prompt.)"""
    import tileflow.serving.engine

    # Every decoding request drafts max_draft tokens (the random program's tokens repeat nothing).
    monkeypatch.setattr(tileflow.serving.engine, "prompt_lookup_draft", lambda tokens, max_draft: [7] * max_draft)
    slots, draft = 2, 3
    budget = slots * (1 + draft) + 4
    for seed in range(3):
        engine = ServingEngine(RandomProgram(seed), token_budget=budget, decode_slots=slots, max_draft=draft,
                               block_size=4, num_blocks=64, overlap=False)
        engine.add(Request(0, [1, 2] * 4, 12))
        engine.add(Request(1, [3] * 40, 4))  # chunked over several steps
        shared = 0
        while engine.scheduler.has_work():
            entries = engine.step()
            assert sum(len(e.tokens) for e in entries) <= budget
            shared += {"verify", "prefill"} <= {e.kind for e in entries}
        assert shared  # steps verified drafts beside a chunk that filled the rest


def test_prepare_follows_each_requests_block_list() -> None:
    """The engine converts a request's block list to an array once; a request id that comes back
    with another list (a new request, or new blocks appended) gets its own blocks, never stale ones."""
    from tileflow.serving import Entry

    engine = ServingEngine(RandomProgram(0), token_budget=16, decode_slots=2, block_size=4, num_blocks=16)

    def table_row(blocks: list[int], start: int) -> list[int]:
        request = Request(3, [1] * (start + 1), 1)
        request.blocks = blocks
        step = engine.prepare([Entry(request, [1], start, "decode")])
        return step.batch.block_table[0, : len(blocks)].tolist()

    assert table_row([5, 6], 6) == [5, 6]
    assert table_row([9, 2], 6) == [9, 2]  # same id, same length, another list
    blocks = [7]
    assert table_row(blocks, 2) == [7]
    blocks.append(11)  # the same list, grown
    assert table_row(blocks, 6) == [7, 11]


class _CountedKeys(tuple):
    """The config's environment keys, counting each time the environment is read through them."""

    reads = 0

    def __iter__(self):
        type(self).reads += 1
        return super().__iter__()


def test_a_serving_step_reads_the_environments_config_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer's attention asks for the eager config: a step pins it, so the environment is
    read as often for a model of four layers as for one of one."""
    import tileflow.config as config_module

    def reads_per_run(layers: int) -> int:
        engine = ServingEngine(RandomProgram(0, windows=(None,) * layers), token_budget=16, decode_slots=2,
                               block_size=4, num_blocks=32)
        keys = _CountedKeys(config_module._ENV_KEYS)
        monkeypatch.setattr(config_module, "_ENV_KEYS", keys)
        _CountedKeys.reads = 0
        engine.run([Request(0, [1, 2, 3, 4, 5], 3), Request(1, [6, 7], 3)])
        return _CountedKeys.reads

    one, four = reads_per_run(1), reads_per_run(4)
    assert one > 0 and four == one


def test_scheduler_rejects_budgets_without_room_for_prompts() -> None:
    with pytest.raises(ValueError, match="no room for prompt chunks"):
        ServingEngine(RandomProgram(0), token_budget=8, decode_slots=4, max_draft=1)


@pytest.mark.parametrize("setting", [{"token_budget": 20.5}, {"max_draft": 1.5}, {"decode_slots": 2.0},
                                     {"num_blocks": 16.0}, {"max_draft": True}])
def test_engine_refuses_sizes_that_are_not_ints(setting: dict) -> None:
    # A float budget or draft length used to be accepted, then failed mid-run as a slice bound.
    kwargs = {"token_budget": 16, "decode_slots": 2, "block_size": 4, "num_blocks": 16, **setting}
    with pytest.raises(ValueError, match=f"{next(iter(setting))} must be an int"):
        ServingEngine(EchoProgram(last=7), **kwargs)
    assert ServingEngine(EchoProgram(last=7), token_budget=np.int64(16), decode_slots=2).scheduler.token_budget == 16


@pytest.mark.parametrize("windows", [(None,), (5,), (5, None)], ids=["full", "sliding", "mixed"])
def test_engine_refuses_an_empty_block_size_for_every_model(windows: tuple[int | None, ...]) -> None:
    # A model with a sliding window sized its sliding group (`sliding_blocks_for`) by dividing by
    # the block size before any check: block_size=0 was a bare ZeroDivisionError, a ValueError
    # only for full-attention models.
    with pytest.raises(ValueError, match="block_size must be >= 1, got 16 and 0"):
        ServingEngine(RandomProgram(0, windows=windows), token_budget=16, decode_slots=2, block_size=0, num_blocks=16)


def test_scheduler_rejects_a_request_twice_and_a_done_one() -> None:
    engine = ServingEngine(RandomProgram(0), token_budget=16, decode_slots=2, block_size=4, num_blocks=16)
    first = Request(7, [1, 2, 3], 2)
    engine.add(first)
    # Same object, or another with its id: metrics and abort() go by id.
    for again in (first, Request(7, [4], 1)):
        with pytest.raises(ValueError, match="a request with id 7 is already waiting or running"):
            engine.add(again)
    engine.run()
    with pytest.raises(ValueError, match="request 7 is done: make a new Request"):
        engine.add(first)  # it would stay in `running` forever, done
    assert engine.allocator.all_free() and first.generated == 2


def test_run_queues_none_of_its_requests_when_it_refuses_one() -> None:
    # run() used to queue its requests one by one: a refused one left those before it queued
    # (served by the next run) and the corrected list was refused as holding ids already waiting.
    engine = ServingEngine(RandomProgram(0), token_budget=16, decode_slots=2, block_size=4, num_blocks=8)
    good = Request(0, [1, 2, 3], 4)
    with pytest.raises(ValueError, match="request 1 needs 11 KV blocks, more than the 8 there are"):
        engine.run([good, Request(1, list(range(40)), 4)])
    with pytest.raises(ValueError, match="a request with id 2 is in the list twice"):
        engine.run([Request(2, [1], 2), Request(2, [4], 1)])
    assert not engine.scheduler.has_work() and not good.done
    fixed = Request(1, [1, 2], 4)
    engine.run([good, fixed])
    assert good.generated == fixed.generated == 4 and engine.allocator.all_free()


def test_engine_refuses_a_budget_beyond_the_programs_steps(llama_program) -> None:
    program, _ = llama_program  # built for steps of up to 256 tokens
    with pytest.raises(ValueError, match="token_budget 300 is more than the 256 tokens a step of this program may hold"):
        ServingEngine(program, token_budget=300, decode_slots=2)


def test_engine_cache_takes_the_programs_attention_dtype(llama_program) -> None:
    program, _ = llama_program  # a float32 model
    assert ServingEngine(program, token_budget=32).kv.k[0].dtype == torch.float32
    with pytest.raises(ValueError, match=r"dtype=torch.float16 for the KV cache, but the program's attention runs in "
                                         r"torch.float32: pass dtype=torch.float32"):
        ServingEngine(program, token_budget=32, dtype=torch.float16)


def test_engine_refuses_token_ids_past_the_vocabulary(llama_program) -> None:
    # Inside the step such an id is an index error mid-batch (a device-side assert on a GPU).
    program, _ = llama_program
    assert program.vocab_size == VOCAB  # read from the embedding the token ids index
    engine = ServingEngine(program, token_budget=32, decode_slots=2)
    with pytest.raises(ValueError, match=rf"request 0: token ids \[{VOCAB}\] are not below the model's vocabulary size {VOCAB}"):
        engine.add(Request(0, [1, VOCAB, 2], 2))
    with pytest.raises(ValueError, match="not below the model's vocabulary"):
        engine.add(Request(1, [1], 2, stop_tokens=frozenset({VOCAB + 5})))
    assert not engine.scheduler.has_work()
    engine.add(Request(2, [VOCAB - 1, 0], 2))  # the largest id is fine
    assert engine.run().generated == 2


def test_engine_serves_gpt2_up_to_its_learned_positions_and_refuses_past_them(llama_program) -> None:
    """GPT-2 looks its positions up in a table of `n_positions` rows: a request that would feed a
    position past it is refused when added (inside a step it is an index error mid-batch, a
    device-side assert on a GPU), and one that reaches the last row is served as eager generates
    it, drafts included. RoPE models (Llama) have no such table and no such limit."""
    import transformers

    from tileflow.distributed import CausalLMStep, build_stage_program

    assert llama_program[0].max_positions is None
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=None, eos_token_id=None)  # no EOS: 13 new tokens each time
    model = transformers.GPT2LMHeadModel(cfg).eval()
    reference = copy.deepcopy(model)
    program = build_stage_program(CausalLMStep(model), (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None]),
                                  max_tokens=64)
    assert (program.vocab_size, program.max_positions) == (VOCAB, 32)
    engine = ServingEngine(program, token_budget=24, decode_slots=2, max_draft=2, block_size=4, num_blocks=32)
    prompt = torch.randint(1, VOCAB, (20,)).tolist()
    with pytest.raises(ValueError, match="reach position 32, past the model's 32 learned positions: lower "
                                         "max_new_tokens to 13"):
        engine.add(Request(0, prompt, 14))
    with pytest.raises(ValueError, match="shorten the prompt to at most 32 tokens"):
        engine.add(Request(2, prompt * 2, 1))
    request = Request(1, prompt, 13)  # its last fed token sits at position 31
    engine.run([request])
    with torch.no_grad():
        ids = torch.tensor([prompt])
        want = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=13, do_sample=False,
                                  pad_token_id=0)
    assert request.tokens == want[0].tolist()


@needs_transformers("5.24", "on 5.17 OPT builds a mask of ones, which an exported serving step cannot take")
def test_engine_refuses_positions_past_a_shifted_position_table() -> None:
    """OPT reads its table of max_positions + 2 rows at position + 2: the add hid the table from
    the check, so a request past it was accepted and failed mid-run (holding its blocks, and
    failing every later run); it is refused when added now, and the last position is served as
    eager generates it."""
    import transformers

    from tileflow.distributed import CausalLMStep, build_stage_program

    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=16, word_embed_proj_dim=32)
    model = transformers.OPTForCausalLM(cfg).eval()
    reference = copy.deepcopy(model)
    program = build_stage_program(CausalLMStep(model), (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None]),
                                  max_tokens=32)
    assert program.max_positions == 16
    engine = ServingEngine(program, token_budget=32, decode_slots=1, block_size=4, num_blocks=16)
    with pytest.raises(ValueError, match="past the model's 16 learned positions"):
        engine.add(Request(0, list(range(1, 18)), 1))
    prompt = torch.randint(3, VOCAB, (12,)).tolist()
    request = Request(1, prompt, 5)  # its last fed token sits at position 15
    engine.run([request])
    with torch.no_grad():
        ids = torch.tensor([prompt])
        want = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
    assert request.tokens == want[0].tolist()


@pytest.mark.parametrize("overlap", [False, True])
def test_an_id_the_engine_served_is_refused(overlap: bool) -> None:
    """A finished request's id was taken again, and the two requests' metrics merged (with
    overlap, the first one's token read back late stamped the second's first-token time)."""
    engine = ServingEngine(RandomProgram(0), token_budget=8, decode_slots=2, block_size=4, num_blocks=8, overlap=overlap)
    engine.add(Request(0, [3, 4], 1))
    engine.add(Request(1, [5, 6], 4))
    engine.step()  # request 0 is done at this step's commit; with overlap its token is still unread
    with pytest.raises(ValueError, match="request id 0 was already served by this engine"):
        engine.add(Request(0, [7, 8, 9], 3))
    metrics = engine.run()
    assert sorted(metrics.token_times) == [0, 1] and len(metrics.token_times[0]) == 1
    with pytest.raises(RuntimeError, match="no request waiting or running"):
        engine.step()


@pytest.mark.parametrize("max_new_tokens", [0, 2.5, "3"])
def test_requests_need_an_integer_token_count(max_new_tokens) -> None:
    with pytest.raises(ValueError, match="max_new_tokens an int >= 1"):
        Request(0, [1], max_new_tokens)
    with pytest.raises(ValueError, match="the prompt must be a list of token ids, got Tensor"):
        Request(0, torch.tensor([1, 2]), 2)


@pytest.mark.parametrize("prompt", [[3, -1, 2], [3, 2.0], [True, 1]])
def test_requests_reject_prompts_that_are_not_token_ids(prompt) -> None:
    # A negative id would otherwise stand for a token of the step in flight.
    with pytest.raises(ValueError, match=r"the prompt must hold token ids \(ints >= 0\)"):
        Request(0, prompt, 2)
    assert Request(1, [np.int64(3), 0], 2).prompt == [3, 0]  # numpy ids are ids


# ---- a real model: the same tokens as eager generation ----------------------------------------

# (`llama_program`, the tiny Llama's stage program and its eager reference: tests/conftest.py.)


def _eager_greedy(model, prompt: list[int], n: int, stop: list[int] | None = None) -> list[int]:
    """transformers' greedy generation; it stops after the model's EOS token (or one of `stop`)."""
    ids = torch.tensor([prompt])
    kwargs = {} if stop is None else {"eos_token_id": stop}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             **kwargs)
    return out[0, len(prompt):].tolist()


def _eos(model) -> frozenset[int]:
    """The stop tokens transformers' generation uses for `model` (its EOS), for engine requests."""
    eos = model.generation_config.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else eos or [])


@pytest.mark.parametrize("max_draft", [0, 3])
def test_greedy_tokens_equal_eager_generation(llama_program, max_draft: int) -> None:
    program, reference = llama_program
    gen = torch.Generator().manual_seed(max_draft + 1)
    shared = torch.randint(0, VOCAB, (17,), generator=gen).tolist()
    prompts = [shared[:13], torch.randint(0, VOCAB, (30,), generator=gen).tolist(), shared + [3], [5]]
    engine = ServingEngine(program, token_budget=24, decode_slots=3, max_draft=max_draft, block_size=4, num_blocks=64)
    requests = [Request(i, p, 10, stop_tokens=_eos(reference)) for i, p in enumerate(prompts)]
    metrics = engine.run(requests)
    for r in requests:
        assert r.tokens[len(r.prompt):] == _eager_greedy(reference, r.prompt, 10), r.id
    summary = metrics.summary()
    assert summary["generated_tokens"] == sum(r.generated for r in requests) and metrics.steps < 40
    assert 0 <= metrics.waited < metrics.wall and summary["host_waiting_share"] == metrics.waited / metrics.wall
    if max_draft:
        assert 0 < metrics.accepted <= metrics.drafted  # a repetitive random model accepts some drafts
    assert engine.allocator.all_free()


@pytest.mark.parametrize("max_draft,nano_batches", [(0, 1), (3, 1), (0, 2)])
def test_sampled_tokens_equal_eager_sampling_in_any_batch(llama_program, monkeypatch: pytest.MonkeyPatch,
                                                          max_draft: int, nano_batches: int) -> None:
    """Sampled requests (temperature, top-k, top-p, min-p, each with its seed) served beside greedy ones,
    with overlapped steps, drafts or nano-batches, get exactly the tokens the eager model draws
    one token at a time with the same seeds: the draw is keyed by seed and position, so
    batching, speculation and chunking change nothing. With drafts, an oracle drafter proposes
    the eager tokens with every other draft's last token wrong, so verify steps accept and
    reject drafted tokens that were drawn, not taken as the argmax."""
    import tileflow.serving.engine as engine_module
    from tileflow.serving import generate_reference

    program, reference = llama_program
    gen = torch.Generator().manual_seed(40 + max_draft + nano_batches)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (23, 5, 12, 30, 8)]
    prompts[2] = prompts[0][:8] + [1, 2, 1, 2]  # shares a cached prefix with request 0
    kinds = [SamplingParams(1.0, seed=1), SamplingParams(0.7, top_k=8, seed=2, logprobs=3), SamplingParams(logprobs=0),
             SamplingParams(1.3, top_p=0.8, min_p=0.05, seed=3), SamplingParams(0.5, top_k=5, top_p=0.9)]  # the last seeds itself
    requests = [Request(i, p, 10, stop_tokens=_eos(reference), sampling=s) for i, (p, s) in enumerate(zip(prompts, kinds))]
    wants = [generate_reference(reference, r.prompt, 10, r.sampling, r.stop_tokens) for r in requests]

    def oracle_draft(tokens: list[int], k: int) -> list[int]:
        full = next(r.prompt + w for r, w in zip(requests, wants) if (r.prompt + w)[: len(tokens)] == tokens)
        draft = full[len(tokens) : len(tokens) + k]
        if draft and len(tokens) % 2:
            draft[-1] = (draft[-1] + 1) % VOCAB
        return draft

    monkeypatch.setattr(engine_module, "prompt_lookup_draft", oracle_draft)
    engine = ServingEngine(program, token_budget=24, decode_slots=3, max_draft=max_draft, block_size=4, num_blocks=64,
                           nano_batches=nano_batches)
    engine.run(requests)
    for r, want in zip(requests, wants):
        assert r.tokens[len(r.prompt):] == want, r.id
    # Logprobs where asked (a sampled and a greedy request): the eager model's log-softmax at each
    # generated token, before temperature and filters; the top-n, the n most likely tokens.
    for r in requests[1:3]:
        with torch.no_grad():
            scores = reference(torch.tensor([r.tokens]), use_cache=False).logits[0].double().log_softmax(-1)
        rows = scores[len(r.prompt) - 1 : len(r.tokens) - 1]
        generated = torch.tensor(r.tokens[len(r.prompt):])
        assert len(r.logprobs) == len(r.top_logprobs) == r.generated
        torch.testing.assert_close(torch.tensor(r.logprobs, dtype=torch.float64), rows[torch.arange(r.generated), generated],
                                   rtol=0, atol=1e-4)
        for got, row in zip(r.top_logprobs, rows):
            best = row.topk(r.sampling.logprobs)
            assert list(got) == best.indices.tolist()
            torch.testing.assert_close(torch.tensor(list(got.values()), dtype=torch.float64), best.values, rtol=0, atol=1e-4)
    assert all(not r.logprobs and not r.top_logprobs for r in requests if r.sampling.logprobs is None)
    # The draws are not the argmax: some sampled request differs from greedy generation.
    assert any(r.tokens[len(r.prompt):] != _eager_greedy(reference, r.prompt, 10) for r in requests if r.id != 2)
    assert wants[2] == _eager_greedy(reference, requests[2].prompt, 10)
    if max_draft:
        m = engine.metrics
        assert 0 < m.accepted < m.drafted and m.steps < 20, (m.accepted, m.drafted, m.steps)
    assert engine.allocator.all_free()


@pytest.mark.parametrize("max_draft,overlap", [(0, True), (0, False), (3, False)])
def test_preempted_requests_recompute_and_generate_the_same_tokens(llama_program, max_draft: int,
                                                                   overlap: bool) -> None:
    """A cache of 12 blocks for requests whose lives need up to 11: they grow into each other's
    room, the youngest are preempted and recompute their prompt and generated tokens later; the
    tokens are still eager generation's, and every block comes back."""
    program, reference = llama_program
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (30, 13, 18, 5)]
    engine = ServingEngine(program, token_budget=24, decode_slots=3, max_draft=max_draft, block_size=4, num_blocks=12,
                           overlap=overlap)
    requests = [Request(i, p, 10, stop_tokens=_eos(reference)) for i, p in enumerate(prompts)]
    metrics = engine.run(requests)
    assert metrics.preemptions > 0
    for r in requests:
        assert r.tokens[len(r.prompt):] == _eager_greedy(reference, r.prompt, 10), r.id
    assert engine.allocator.all_free()


# Models whose attention layers carry a sliding window (Mistral's, every other layer of Gemma-2's
# and gpt-oss's), a logit soft-cap (Gemma-2's) or attention sinks (gpt-oss's): the window shorter
# than the prompts, the cap small enough and the sinks large enough to change the result.
_WINDOWED = {
    "mistral": ("MistralConfig", "MistralForCausalLM", "sdpa", {"sliding_window": 5}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "eager",
               {"head_dim": 16, "sliding_window": 5, "attn_logit_softcapping": 0.5, "initializer_range": 0.2}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", "eager",
                {"head_dim": 16, "sliding_window": 5, "num_local_experts": 4, "num_experts_per_tok": 2}),
    # Phi-3.5-MoE's window is only in its mask (its attention function gets no sliding_window):
    # served over the whole cache before, its logits were off by about 0.3.
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", "sdpa",
               {"sliding_window": 5, "num_local_experts": 4, "num_experts_per_tok": 2}),
}
_EVERY_LAYER_SLIDES = ("mistral", "phimoe")


_MIXED = ("gemma2", "gpt_oss")  # full-attention layers beside sliding ones


@functools.lru_cache(maxsize=None)
def _windowed_model(name: str):
    """(the tileflow program, the eager reference model, its config) of a tiny `_WINDOWED` model."""
    import transformers

    from tileflow.distributed import CausalLMStep, build_stage_program

    config_cls, model_cls, reference_attention, extra = _WINDOWED[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **extra)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # gpt-oss's sinks start at zero: random ones, to matter
        for module in model.modules():
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.normal_(0.0, 2.0)
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = reference_attention
    program = build_stage_program(CausalLMStep(model), (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None]),
                                  max_tokens=256)
    return program, reference, cfg


# Phi-3.5-MoE's window (in its mask alone) in the extended run: its mask is read in the default
# run by test_attention's test of the "tileflow_causal" attention function.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.extended) if n == "phimoe" else n for n in sorted(_WINDOWED)])
def test_sliding_window_softcap_and_sink_models_equal_eager_generation(name: str) -> None:
    program, reference, cfg = _windowed_model(name)
    extra = _WINDOWED[name][3]
    layer_types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * 2
    assert [c.sliding_window for c in program.cuts] == [5 if t == "sliding_attention" else None for t in layer_types]
    assert all(c.softcap == extra.get("attn_logit_softcapping") for c in program.cuts)
    assert all((c.sinks is not None) == (name == "gpt_oss") for c in program.cuts)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (13, 30, 3)]
    # Greedy tokens of these tiny random models barely depend on attention: the logits of a step
    # over a prompt chunk and a cached prefix longer than the window are compared too.
    _check_a_chunk_behind_a_cached_prefix(program, reference, prompts[1], num_blocks=16)
    for max_draft in (0, 3):  # decode steps, and tree verify within the window
        # Mistral's requests hold only their window's blocks: 6 of them serve a 30-token prompt
        # (8 blocks; 11 with its new tokens) beside two others.
        engine = ServingEngine(program, token_budget=24, decode_slots=3, max_draft=max_draft, block_size=4,
                               num_blocks=6 if name in _EVERY_LAYER_SLIDES else 64)
        # Every layer of Mistral slides its window: the blocks it passes go back while the
        # requests run (and are NaN from then on); Gemma-2's and gpt-oss's sliding layers' blocks
        # (their own group) too, while their full layers keep all.
        assert engine.scheduler.sliding_window == (5 if name in _EVERY_LAYER_SLIDES else None)
        window_releases = poison_freed_blocks(engine)
        requests = [Request(i, p, 10, stop_tokens=_eos(reference)) for i, p in enumerate(prompts)]
        engine.run(requests)
        for r in requests:
            assert r.tokens[len(r.prompt):] == _eager_greedy(reference, r.prompt, 10), (name, max_draft, r.id)
        assert window_releases and {g for g, _ in window_releases} == {int(name in _MIXED)}
        assert all(a.all_free() for a in engine.allocators)


@pytest.mark.parametrize("max_draft", [0, 3])
@pytest.mark.parametrize("name", _MIXED)
def test_mixed_window_models_hold_sliding_blocks_for_the_window_only(name: str, max_draft: int) -> None:
    """Gemma-2 and gpt-oss alternate full and 5-key sliding layers. Their sliding layers' blocks
    go back behind the window (NaN from then on) while their full layers keep every position,
    and the memory the sliding layers no longer need goes to the full layers: three requests
    whose lives need 31 blocks run side by side without a preemption in a cache of 26 blocks
    per layer (one pool of 26 would preempt), generating eager's greedy tokens with and without
    drafts; a later prompt reuses a cached prefix in both groups."""
    program, reference, _ = _windowed_model(name)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (30, 26, 28)]
    lives = [-(-(len(p) + 12 - 1) // 4) for p in prompts]
    assert sum(lives) == 31
    engine = ServingEngine(program, token_budget=24, decode_slots=3, max_draft=max_draft, block_size=4, num_blocks=26)
    # One full and one sliding layer: the sliding group sized for 3 requests' windows and steps
    # (3 * ((5 + max_draft) // 4 + 3) + 24 // 4 blocks), the full group given the rest.
    sliding = 3 * ((5 + max_draft) // 4 + 3) + 6
    assert [(g.window, g.num_blocks) for g in engine.kv_groups] == [(None, 26 + 26 - sliding), (5, sliding)]
    assert sum(kv.k[0].numel() * len(kv.k) for kv in engine.kvs) == 2 * 26 * 4 * 2 * 16  # 26 blocks of 2 layers
    window_releases = poison_freed_blocks(engine)
    peaks = [0, 0]
    schedule = engine.scheduler.schedule

    def schedule_and_count(*args, **kwargs):
        entries = schedule(*args, **kwargs)
        for g, allocator in enumerate(engine.allocators):
            peaks[g] = max(peaks[g], sum(1 for refs in allocator.refs if refs))
        for e in entries:  # the sliding layers hold the window and the step; the full ones all
            r = e.request
            assert len(r.held_window_blocks) <= (5 + max(len(e.tokens), 1 + max_draft) - 3) // 4 + 2
            assert r.released == 0 and len(r.blocks) * 4 >= e.start + len(e.tokens)
        return entries

    engine.scheduler.schedule = schedule_and_count
    requests = [Request(i, p, 12, stop_tokens=()) for i, p in enumerate(prompts)]
    engine.run(requests)
    for r in requests:
        assert r.tokens[len(r.prompt):] == _eager_greedy(reference, r.prompt, 12, stop=[]), (name, max_draft, r.id)
    assert engine.metrics.preemptions == 0 and peaks[0] > 26 and peaks[1] <= sliding
    assert {g for g, _ in window_releases} == {1}
    # Prefix reuse: a prompt computed and finished (its blocks cached in both groups), then the
    # same prompt and 3 more tokens: its 5 full blocks are cached; its first query (position 20)
    # sees only the sliding group's block 4, so blocks 0-3 of that group are passed, not shared.
    prefix = prompts[1][:22]
    engine.run([Request(3, prefix, 1)])
    second = Request(4, prefix + [1, 2, 3], 6, stop_tokens=())
    engine.add(second)
    fed = engine.metrics.tokens_in_steps
    engine.step()  # computes the 5 tokens after the cached 20
    assert engine.metrics.tokens_in_steps - fed == 5 and (second.released, second.window_released) == (0, 4)
    engine.run()
    assert second.tokens[len(second.prompt):] == _eager_greedy(reference, second.prompt, 6, stop=[])
    assert all(a.all_free() for a in engine.allocators)


def test_mixed_window_blocks_free_room_for_more_requests() -> None:
    """The memory effect, in block counts: three requests of 59 positions (15 blocks each, 45 in
    all) on a model with a full-attention layer and an 8-key sliding one, in 32 blocks per
    layer. Served as one pool (every layer kept whole, as when no layer slides), they preempt
    each other (a pool of 32 blocks); in two groups the sliding layer gets 19 blocks (each
    request's window and step; 11 held at most) and the full layer the other 13 blocks' memory
    too, 45 blocks, which hold all three whole: no preemption, in the same memory."""
    prompts = [[(i + j) % 8 for j in range(40)] for i in range(3)]

    def serve(windows):
        engine = ServingEngine(RandomProgram(0, windows=windows), token_budget=16, decode_slots=3, block_size=4,
                               num_blocks=32, overlap=False)
        peaks = [0] * len(engine.allocators)
        schedule = engine.scheduler.schedule

        def schedule_and_count(*args, **kwargs):
            entries = schedule(*args, **kwargs)
            for g, allocator in enumerate(engine.allocators):
                peaks[g] = max(peaks[g], sum(1 for refs in allocator.refs if refs))
            return entries

        engine.scheduler.schedule = schedule_and_count
        engine.run([Request(i, p, 20) for i, p in enumerate(prompts)])
        assert all(a.all_free() for a in engine.allocators)
        memory = sum(kv.k[0].numel() * len(kv.k) for kv in engine.kvs)
        return [g.num_blocks for g in engine.kv_groups], peaks, engine.metrics.preemptions, memory

    whole = serve((None, None))
    hybrid = serve((None, 8))
    assert whole[:2] == ([32], [32]) and whole[2] > 0
    # (The requests start a prompt chunk apart: at most 43 full-group blocks are held at once.)
    assert hybrid[:3] == ([45, 19], [43, 11], 0) and hybrid[3] == whole[3]


def test_kv_groups_split_layers_and_memory_as_documented() -> None:
    """`kv_groups` on hand-sized cases: one group when every layer slides (keyed by the widest
    window, which it must keep), when none does, or without a sliding-block count (a mixed model
    then keeps every block: window None); else the full layers (in order, interleaved ones too)
    and the sliding ones (the widest window, at most `num_blocks` blocks), the full group given
    every whole block the memory of `num_blocks` blocks per layer still holds."""
    from tileflow.serving import KVGroup, kv_groups

    assert kv_groups([4, 8, 6], 10, 5) == [KVGroup((0, 1, 2), 8, 10)]
    assert kv_groups([None, None], 10, 5) == [KVGroup((0, 1), None, 10)]
    assert kv_groups([None, 4], 10) == [KVGroup((0, 1), None, 10)]
    # 2 full and 3 sliding layers in 5 * 32 blocks' memory, 19 of them sliding: the full group
    # gets the largest n with 2 n + 3 * 19 <= 5 * 32 (a rounding that floored before scaling,
    # or scaled by full / sliding layers, gave it fewer).
    windows = [None, 8, None, 4, 8]
    full = max(n for n in range(32, 200) if 2 * n + 3 * 19 <= 5 * 32)
    assert full == 51
    assert kv_groups(windows, 32, 19) == [KVGroup((0, 2), None, full), KVGroup((1, 3, 4), 8, 19)]
    # More sliding blocks asked than there are: the sliding group gets num_blocks, the full one too.
    assert kv_groups([None, 4], 10, 50) == [KVGroup((0,), None, 10), KVGroup((1,), 4, 10)]


def test_an_engine_sizes_the_sliding_group_for_the_widest_window() -> None:
    """Sliding layers of windows 8 and 4 beside full ones: the sliding group must hold what
    decode_slots requests keep under the widest window (8 keys: 8 // 4 + 3 blocks each, plus
    16 // 4 for the step's prompt chunks: 19), not the narrowest (16), and the full group gets
    the rest of 32 blocks per layer's memory."""
    engine = ServingEngine(RandomProgram(0, windows=(None, 8, None, 4, 8)), token_budget=16, decode_slots=3,
                           block_size=4, num_blocks=32, overlap=False)
    assert [(g.layers, g.window, g.num_blocks) for g in engine.kv_groups] == [((0, 2), None, 51), ((1, 3, 4), 8, 19)]
    assert [kv.k[0].shape[0] for kv in engine.kvs] == [51, 19] and [len(kv.k) for kv in engine.kvs] == [2, 3]


def test_a_chunked_sliding_layer_reads_its_groups_chunk_view() -> None:
    """A sliding layer that also attends in chunks sits in the second KV group: that group's
    step layout carries the chunk view (each group its own chunk sizes). Its output for a
    12-token prompt equals a float64 brute force over keys in the query's chunk of 8, its
    window of 8 and not after it; the full layer's is plain causal."""
    import dataclasses

    program = RandomProgram(0, windows=(None, 8))
    program.cuts[1] = dataclasses.replace(program.cuts[1], attention_chunk=8)
    seen: list[tuple[AttentionCut, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    run = program.run

    def recording_run(inputs, attention):
        def attend(cut, q, k, v, key_starts=None):
            out = attention(cut, q, k, v)
            seen.append((cut, q, k, v, out))
            return out
        return run(inputs, attend)

    program.run = recording_run
    engine = ServingEngine(program, token_budget=16, decode_slots=1, block_size=4, num_blocks=8, overlap=False)
    assert engine._attention_chunks == [[], [8]]
    engine.add(Request(0, list(range(12)), 1))
    engine.step()
    pos = torch.arange(12)
    causal = pos[None, :] <= pos[:, None]
    chunked = causal & (pos[None, :] > pos[:, None] - 8) & (pos[None, :] // 8 == pos[:, None] // 8)
    for (cut, q, k, v, out), mask in zip(seen, (causal, chunked)):
        scores = (q[0].double() @ k[0].double().transpose(-1, -2)) * cut.scale  # [heads, T, T]
        want = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[0].double()
        torch.testing.assert_close(out[0].double(), want, rtol=1e-5, atol=1e-5)


def test_chunked_attention_model_equals_eager_generation() -> None:
    """Llama 4 attends in chunks on its RoPE layers (a query sees only its chunk's keys), a rule
    that lives only in its mask: served as plain causal attention its logits were off by 0.35
    (refused since). Each step is read through its chunk view, and the logits of a prompt chunk
    across two chunk boundaries, greedy tokens with and without drafts (verify slots cross
    boundaries too) and with nano-batches equal eager's. Its NoPE layers' temperature tuning
    reads a token's index in the forward for its position (`arange(T)`): the build reads the
    step's positions there instead, so with a floor_scale of 4 the factor changes every 4
    positions and still matches; a step where that is not done is exact only below
    floor_scale - 1 and refuses longer steps. A block size that does not divide the chunk is
    refused."""
    import transformers

    from tileflow.distributed import CausalLMStep, build_stage_program
    from tileflow.serving import Entry

    torch.manual_seed(0)
    cfg = transformers.Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
        attention_chunk_size=8, no_rope_layers=[1, 0], floor_scale=4, attn_scale=1.0, max_position_embeddings=256)
    model = transformers.Llama4ForCausalLM(cfg).eval()
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "sdpa"
    example = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None])
    unread = CausalLMStep(copy.deepcopy(model))
    unread.reads_index_as_position = False
    with pytest.raises(ValueError, match="temperature tuning.*max_tokens <= 3"):
        build_stage_program(unread, example, max_tokens=64)
    report = GraphReport(graph_id="llama4")
    program = build_stage_program(CausalLMStep(model), example, max_tokens=64, report=report)
    assert [c.attention_chunk for c in program.cuts] == [8, None]
    assert program.max_positions is None
    assert report.extra["token_indices_as_positions"].startswith("1 arange") and "; 0 used as indices" in \
        report.extra["token_indices_as_positions"]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (13, 30, 3)]
    engine = ServingEngine(program, token_budget=32, decode_slots=2, block_size=4, num_blocks=16)
    first = Entry(Request(0, prompts[1], 1, blocks=list(range(8))), prompts[1][:13], 0, "prefill")
    engine.forward([first])
    rest = Entry(first.request, prompts[1][13:], 13, "prefill")  # positions 13-29: chunks 1, 2 and 3
    with torch.no_grad():
        want = reference(torch.tensor([prompts[1]])).logits[0, 13:]
    torch.testing.assert_close(engine.forward([rest]).reshape(want.shape), want, rtol=1e-4, atol=1e-4)
    for max_draft, nano_batches in ((0, 1), (3, 1), (0, 2)):
        engine = ServingEngine(program, token_budget=24, decode_slots=3, max_draft=max_draft, block_size=4,
                               num_blocks=64, nano_batches=nano_batches)
        requests = [Request(i, p, 10, stop_tokens=_eos(reference)) for i, p in enumerate(prompts)]
        engine.run(requests)
        for r in requests:
            assert r.tokens[len(r.prompt):] == _eager_greedy(reference, r.prompt, 10), (max_draft, nano_batches, r.id)
        assert engine.allocator.all_free()
        assert bool(engine.metrics.drafted) == bool(max_draft)
    with pytest.raises(ValueError, match="chunks of 8 positions, which the KV block size 3 does not divide"):
        ServingEngine(program, token_budget=24, block_size=3)


def _check_a_chunk_behind_a_cached_prefix(program, reference, prompt: list[int], num_blocks: int) -> None:
    """The engine's logits for `prompt[20:]` as a prompt chunk behind its first 20 tokens, cached
    by an earlier step (longer than the models' windows), equal eager's for the whole prompt.
    (A model's sliding layers keep their blocks apart: `window_blocks`.)"""
    from tileflow.serving import Entry

    engine = ServingEngine(program, token_budget=32, decode_slots=2, block_size=4, num_blocks=num_blocks)
    first = Entry(Request(0, prompt, 1, blocks=list(range(8)), window_blocks=list(range(8))), prompt[:20], 0, "prefill")
    engine.forward([first])
    rest = Entry(first.request, prompt[20:], 20, "prefill")
    with torch.no_grad():
        want = reference(torch.tensor([prompt])).logits[0, 20:]
    torch.testing.assert_close(engine.forward([rest]).reshape(want.shape), want, rtol=1e-4, atol=1e-4)


# Newer architectures of the model zoo (tests/models.py) whose attention differs from Llama's:
# sliding layers with a RoPE base of their own (Gemma 3), interleaved RoPE (Cohere 2, GPT-J),
# RoPE over part of the head (Phi, GPT-J), a layer without RoPE (SmolLM3), scaled scores
# (Granite's attention multiplier), experts (OLMoE).
_ZOO_SERVED = ("gemma3", "cohere2", "phi", "gptj", "smollm3", "granite", "olmoe")


@pytest.mark.extended
@pytest.mark.parametrize("name", _ZOO_SERVED)
def test_newer_architectures_serve_as_eager_generates(name: str) -> None:
    """The engine over each model's stage program: a prompt chunk behind a cached prefix longer
    than the sliding windows gives eager's logits, and greedy tokens with drafts equal eager
    generation's."""
    from models import VOCAB as ZOO_VOCAB
    from models import ZOO

    from tileflow.distributed import CausalLMStep, build_stage_program

    torch.manual_seed(0)
    model = ZOO[name][0]().eval()
    reference = copy.deepcopy(model)
    program = build_stage_program(CausalLMStep(model), (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None]),
                                  max_tokens=64)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, ZOO_VOCAB, (n,), generator=gen).tolist() for n in (13, 30, 3)]
    _check_a_chunk_behind_a_cached_prefix(program, reference, prompts[1], num_blocks=64)
    engine = ServingEngine(program, token_budget=24, decode_slots=3, max_draft=3, block_size=4, num_blocks=64)
    # (Their default configs' EOS ids lie past the small vocabulary, which the engine refuses as
    # stop tokens; eager generation never makes them.)
    stops = frozenset(t for t in _eos(reference) if t < ZOO_VOCAB)
    requests = [Request(i, p, 10, stop_tokens=stops) for i, p in enumerate(prompts)]
    engine.run(requests)
    for r in requests:
        assert r.tokens[len(r.prompt):] == _eager_greedy(reference, r.prompt, 10), r.id
    assert all(a.all_free() for a in engine.allocators)


@pytest.mark.parametrize("max_draft,overlap", [(0, True), (0, False), (3, False)])
def test_stop_tokens_end_requests_as_generate_does(llama_program, max_draft: int, overlap: bool) -> None:
    """A request ends after the first of its stop tokens it generates, which it keeps, exactly
    where transformers' `generate` stops with those EOS tokens: one step at a time, with drafts
    (a stop token among the accepted ones), and overlapped (the stop is seen a step late, and the
    step already launched for the request is dropped). Its blocks all come back."""
    program, reference = llama_program
    gen = torch.Generator().manual_seed(40 + max_draft)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (7, 15, 3, 22, 9)]
    requests, stops_early = [], set()
    for i, prompt in enumerate(prompts):
        free_run = _eager_greedy(reference, prompt, 10)
        # Stop at a token the continuation reaches after 2-5 others (its first occurrence there).
        at = next((k for k in range(2 + i % 4, len(free_run) - 1) if free_run[k] not in free_run[:k]), None)
        stop = sorted(_eos(reference) | ({free_run[at]} if at is not None else set()))
        requests.append(Request(i, prompt, 10, stop_tokens=stop))
        if at is not None:
            stops_early.add(i)
    engine = ServingEngine(program, token_budget=24, decode_slots=3, max_draft=max_draft, block_size=4, num_blocks=64,
                           overlap=overlap)
    metrics = engine.run(requests)
    for r in requests:
        want = _eager_greedy(reference, r.prompt, 10, stop=sorted(r.stop_tokens))
        assert r.tokens[len(r.prompt):] == want, r.id
        assert r.done and r.generated == len(want)
    assert len(stops_early) >= 3 and all(requests[i].generated < 10 for i in stops_early)
    assert metrics.generated == sum(r.generated for r in requests) == sum(map(len, metrics.token_times.values()))
    assert engine.allocator.all_free()
    with pytest.raises(ValueError, match="stop_tokens must be token ids"):
        Request(0, [1], 2, stop_tokens=[-1])
    assert Request(0, [1], 2, stop_tokens=torch.tensor([4, 7]).numpy()).stop_tokens == {4, 7}


@pytest.mark.parametrize("overlap", [True, False])
def test_aborted_requests_free_their_blocks_and_leave_the_others_alone(llama_program, overlap: bool) -> None:
    """`abort` ends a running request at once (its tokens so far are a prefix of its greedy
    continuation) and a waiting one before it starts; the others still generate exactly what
    eager generation does, and every block comes back."""
    program, reference = llama_program
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (9, 14, 5, 8)]
    engine = ServingEngine(program, token_budget=24, decode_slots=2, block_size=4, num_blocks=64, overlap=overlap)
    requests = [Request(i, p, 10) for i, p in enumerate(prompts)]
    for r in requests:
        engine.add(r)
    for _ in range(3):
        engine.step()
    assert requests[0] in engine.scheduler.running and requests[3] in engine.scheduler.waiting
    assert engine.abort(0) and engine.abort(3)
    assert not engine.abort(0) and not engine.abort(99)  # already ended; never added
    assert requests[0].blocks == [] and requests[0] not in engine.scheduler.running
    engine.run()
    assert [r.finish_reason for r in requests] == ["abort", "length", "length", "abort"]
    kept = requests[0].tokens[len(prompts[0]):]
    assert 1 <= len(kept) == requests[0].generated < 10 and min(kept) >= 0
    assert kept == _eager_greedy(reference, prompts[0], 10, stop=[])[: len(kept)]
    assert requests[3].tokens == prompts[3] and requests[3].generated == 0
    for r in requests[1:3]:
        assert r.tokens[len(r.prompt):] == _eager_greedy(reference, r.prompt, 10, stop=[]), r.id
    assert engine.allocator.all_free()


class EchoProgram(RandomProgram):
    """A model that always agrees with the draft: row i predicts input token i + 1 (the last
    row predicts `last`)."""

    def __init__(self, last: int) -> None:
        super().__init__(0)
        self.last = last

    def run(self, inputs, attention):
        ids = inputs[0][0]
        following = torch.cat([ids[1:], torch.tensor([self.last])])
        return [torch.nn.functional.one_hot(following, VOCAB).float()[None]]


class _ClockedProgram(RandomProgram):
    """A RandomProgram whose every step takes one second of a fake clock (`now`)."""

    def __init__(self) -> None:
        super().__init__(0)
        self.now = 1000.0  # far from 0: a stamp taken against the wrong origin shows

    def run(self, inputs, attention):
        self.now += 1.0
        return super().run(inputs, attention)


@pytest.mark.parametrize("overlap", [False, True])
def test_metrics_time_each_request_from_its_arrival_across_runs(monkeypatch: pytest.MonkeyPatch,
                                                                overlap: bool) -> None:
    """TTFT counts from when a request was added, also when it joins between steps or runs long
    after the engine started; its tokens' times share one origin across `step` and `run` calls
    (no negative time between tokens), and tokens/s divides every run's tokens by every run's time."""
    import types

    import tileflow.serving.engine as engine_module

    program = _ClockedProgram()
    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(perf_counter=lambda: program.now))
    engine = ServingEngine(program, token_budget=16, decode_slots=2, block_size=4, num_blocks=32, overlap=overlap)
    # Without overlap a token is read back in the step that makes it; with it, in the next step.
    lag = 1.0 + overlap
    first = Request(0, [1, 2, 3], 4)
    engine.add(first)
    engine.step()  # outside any run: the first request's prefill
    engine.synchronize()  # its token read back now (a no-op without overlap)
    program.now += 10.0  # idle
    second = Request(1, [4, 5], 2)
    engine.add(second)  # joins mid-run
    engine.run()
    program.now += 50.0  # idle between runs
    engine.run([Request(2, [6], 3)])
    m = engine.metrics
    assert m.ttft == {0: 1.0, 1: lag, 2: lag}
    gaps = {i: np.diff(t).tolist() for i, t in m.token_times.items()}
    assert all(g >= 0 for gs in gaps.values() for g in gs), gaps
    assert sum(gaps[0]) == m.token_times[0][-1] - m.token_times[0][0] <= 3 + 10 + lag
    # The first run: 3 steps (first's last 3 tokens, second's 2 beside them); the second: 3.
    assert (m.wall, m.generated) == (6.0, 9) and m.summary()["tokens_per_s"] == 1.5


def test_a_stop_token_among_accepted_drafts_ends_the_request_there() -> None:
    """Drafts accepted past a stop token are cut after it: the request keeps the stop token and
    nothing the step accepted beyond it."""
    engine = ServingEngine(EchoProgram(last=7), token_budget=16, decode_slots=1, max_draft=3, block_size=4,
                           num_blocks=16)
    request = Request(0, [5, 6, 7, 8, 5, 6], 8, stop_tokens=[8])
    engine.run([request])
    # Prefill predicts 7; prompt lookup then drafts [8, 5, 6] after "6 7", all accepted.
    assert request.tokens[6:] == [7, 8] and request.done and engine.allocator.all_free()
    assert engine.metrics.accepted == 3 and engine.metrics.generated == 2


def test_prefix_reuse_shares_blocks_and_keeps_tokens(llama_program) -> None:
    program, reference = llama_program
    gen = torch.Generator().manual_seed(7)
    prefix = torch.randint(0, VOCAB, (12,), generator=gen).tolist()
    engine = ServingEngine(program, token_budget=32, decode_slots=1, block_size=4, num_blocks=32)
    first, second = (Request(i, prefix + tail, 4, stop_tokens=_eos(reference)) for i, tail in enumerate(([1, 2], [9])))
    engine.run([first])
    engine.add(second)
    fed = engine.metrics.tokens_in_steps
    engine.step()  # admits `second`, whose first 12 prompt tokens are cached in three full blocks
    assert second.computed == 13 and engine.metrics.tokens_in_steps - fed == 1
    engine.run()
    assert second.tokens[13:] == _eager_greedy(reference, second.prompt, 4)
    assert engine.allocator.all_free()


def test_a_cached_prefix_loses_its_last_block_first() -> None:
    """A finished request's prompt blocks stay cached; when an allocation evicts one of them it is
    the prefix's last block, so a later request still finds the blocks before it. (Released front
    to back, the first block went first: the rest stayed cached, never found again.)"""
    engine = ServingEngine(RandomProgram(0), token_budget=32, decode_slots=1, block_size=4, num_blocks=4,
                           overlap=False)
    prefix = list(range(12))  # three full blocks, cached when the first request ends
    engine.run([Request(0, prefix + [50], 1)])
    assert len(engine.allocator.lookup(prefix_hashes(prefix, 4))) == 3
    engine.run([Request(1, [40, 41, 42, 43, 44], 1)])  # two blocks: the free one and one evicted
    assert len(engine.allocator.lookup(prefix_hashes(prefix, 4))) == 2
    second = Request(2, prefix + [51], 2)
    engine.add(second)
    engine.step()
    assert second.computed == 13 and engine.program.steps[-1] == 5  # 8 tokens cached, 5 computed
    engine.run()
    assert second.done and engine.allocator.all_free()


@pytest.mark.parametrize("max_draft,overlap", [(0, True), (0, False), (3, False)])
def test_requests_whose_kv_fills_the_whole_cache_are_served(max_draft: int, overlap: bool) -> None:
    """A request's KV never holds its last generated token (never fed) nor drafts past its
    max_new_tokens: one whose prompt and new tokens but one fill the cache exactly is served."""
    engine = ServingEngine(EchoProgram(last=3), token_budget=8, decode_slots=1, max_draft=max_draft, block_size=4,
                           num_blocks=4, overlap=overlap)
    requests = [Request(0, [5, 6, 7, 8, 5, 6], 11), Request(1, list(range(16)), 1)]  # 16 positions each
    engine.run(requests)
    assert [r.generated for r in requests] == [11, 1] and engine.allocator.all_free()
    with pytest.raises(ValueError, match="needs 5 KV blocks, more than the 4 there are"):
        engine.add(Request(2, list(range(16)), 2))


def test_requests_read_stop_tokens_once_and_refuse_a_bare_id() -> None:
    # A generator used to be consumed by the validation: the request then had no stop tokens.
    assert Request(0, [1], 2, stop_tokens=(t for t in [7, 9])).stop_tokens == {7, 9}
    engine = ServingEngine(EchoProgram(last=7), token_budget=8, decode_slots=1, block_size=4, num_blocks=8)
    request = Request(1, [1, 2], 5, stop_tokens=iter([7]))
    engine.run([request])
    assert request.tokens == [1, 2, 7] and request.finish_reason == "stop"
    # One id (transformers' eos_token_id often is one) is refused with a hint, not a bare TypeError.
    with pytest.raises(ValueError, match=r"stop_tokens must be a collection of token ids, got 5: pass \[5\]"):
        Request(2, [1], 2, stop_tokens=5)
    # A 0-d tensor or array (an id as torch or numpy holds it) too: tuple() of it was a bare TypeError.
    for one in (torch.tensor(5), np.array(5)):
        with pytest.raises(ValueError, match=r"stop_tokens must be a collection of token ids, got .*5.*: pass \[5\]"):
            Request(3, [1], 2, stop_tokens=one)


def test_windowed_prompt_chunks_leave_decoding_requests_a_block() -> None:
    # A 100-token prompt beside a decoding request, under an 8-key window with 5 blocks of 4: were
    # the chunks to take every free block, the decoder would preempt the prompt (to start over)
    # each time it crossed into a new block.
    scheduler = Scheduler(BlockAllocator(5, 4), token_budget=9, decode_slots=2, sliding_window=8)
    decoder, prompt = Request(0, [1, 2, 3, 4], 60), Request(1, list(range(100)), 1)
    scheduler.add(decoder)
    scheduler.add(prompt)
    prompt_tokens = preemptions = 0
    while scheduler.has_work():
        entries = scheduler.schedule()
        preemptions += len(scheduler.last_preempted)
        for e in entries:  # what the engine does with the step's outcome
            r = e.request
            r.computed += len(e.tokens)
            prompt_tokens += len(e.tokens) * (e.kind == "prefill" and r is prompt)
            if not r.prefilling:
                r.tokens.append(0)
                r.generated += 1
                if r.generated == r.max_new_tokens:
                    scheduler.finish(r, "length")
    assert (preemptions, prompt_tokens) == (0, 100)
    assert scheduler.allocator.all_free()


@pytest.mark.parametrize("evicted", [False, True])
def test_windowed_prefix_reuse_shares_only_the_cached_blocks_the_window_sees(evicted: bool) -> None:
    # The second prompt starts with the first one's 24 tokens: 6 cached full blocks of 4. Its first
    # query (position 24) sees positions 19..24 under a 6-key window, so it shares blocks 4 and 5
    # (even when blocks 0-3 have left the cache); blocks 0-3 keep their index in its block list
    # without a reference, and are never read.
    program = RandomProgram(0, sliding_window=6)  # asserts every attention output is finite
    engine = ServingEngine(program, token_budget=32, decode_slots=1, block_size=4, num_blocks=16, overlap=False)
    prompt = [i % 7 for i in range(24)]
    first, second = Request(0, prompt, 3), Request(1, prompt + [5, 6, 1], 4)
    engine.run([first])
    cached = engine.allocator.lookup(prefix_hashes(prompt, 4))
    assert len(cached) == 6
    if evicted:
        for block in cached[:4]:
            engine.allocator.forget(block)
    engine.add(second)
    schedule = engine.scheduler.schedule

    def schedule_and_poison_passed(*args, **kwargs):
        entries = schedule(*args, **kwargs)
        for e in entries:  # NaN in the blocks its window passed: a read would show in the output
            for block in e.request.blocks[: e.request.released]:
                if engine.allocator.refs[block] == 0:  # (the entry may name any block)
                    for cache in (*engine.kv.k, *engine.kv.v):
                        cache[block] = float("nan")
        return entries

    engine.scheduler.schedule = schedule_and_poison_passed
    engine.step()
    assert (second.released, second.prefill_len) == (4, 27) and program.steps[-1] == 3  # 3 tokens computed
    assert second.held_blocks[:2] == cached[4:]
    assert [engine.allocator.refs[b] for b in second.held_blocks] == [1, 1, 1]
    engine.run()
    assert second.done and second.generated == 4 and engine.allocator.all_free()


def test_forward_with_prepared_inputs_equals_forward(llama_program) -> None:
    """`prepare` is the whole host side of a step: a step run on prepared inputs gives the same
    logits as one that prepares them itself, and both write the same rows into the cache."""
    from tileflow.serving import Entry

    program, _ = llama_program
    engines = [ServingEngine(program, token_budget=16, decode_slots=2, block_size=4, num_blocks=16) for _ in range(2)]
    for engine in engines:
        for cache in engine.kv.k + engine.kv.v:
            cache.normal_(generator=torch.Generator().manual_seed(5))
    ids = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))
    entries = [Entry(Request(0, [1] * 7, 1, blocks=[3, 9]), ids[0, :3].tolist(), 4, "prefill"),
               Entry(Request(1, [2] * 6, 1, blocks=[0, 12]), ids[0, 3:].tolist(), 5, "decode")]
    inputs = engines[0].prepare(entries)
    assert inputs.ids.tolist() == ids.tolist() and inputs.positions.tolist() == [[4, 5, 6, 5]]
    assert inputs.batch.host_seqlens_kv == (7, 6) and inputs.tree_mask is None
    torch.testing.assert_close(engines[0].forward(entries, inputs), engines[1].forward(entries), rtol=0, atol=0)
    for a, b in zip(engines[0].kv.k + engines[0].kv.v, engines[1].kv.k + engines[1].kv.v):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _RecordingProgram:
    """A StageProgram that logs each step it runs (for the order of launches and reads)."""

    def __init__(self, program, log: list[str]) -> None:
        self._program, self._log = program, log

    def __getattr__(self, name):
        return getattr(self._program, name)

    def run(self, inputs, attention):
        self._log.append("launch")
        return self._program.run(inputs, attention)


def test_overlapped_steps_launch_before_reading_back(llama_program) -> None:
    """With overlap (the default without drafts) each step is launched before the previous
    step's tokens are read back, its decode inputs are gathered from those predictions on the
    device, and the tokens are those of steps run one at a time, and of eager generation."""
    program, reference = llama_program
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (6, 19, 1, 11)]
    tokens = {}
    for overlap in (True, False):
        log: list[str] = []
        engine = ServingEngine(_RecordingProgram(program, log), token_budget=16, decode_slots=3, block_size=4,
                               num_blocks=64, overlap=overlap)
        assert engine.overlap is overlap
        read_back = engine.synchronize

        def synchronize(engine=engine, read_back=read_back, log=log) -> None:
            if engine._in_flight is not None:
                log.append("read")
            read_back()

        engine.synchronize = synchronize
        requests = [Request(i, p, 7, stop_tokens=_eos(reference)) for i, p in enumerate(prompts)]
        metrics = engine.run(requests)
        tokens[overlap] = [r.tokens for r in requests]
        assert metrics.generated == sum(r.generated for r in requests) == sum(map(len, metrics.token_times.values()))
        assert set(metrics.ttft) == {0, 1, 2, 3} and engine.allocator.all_free()
        if overlap:  # every read of a step comes after the next step's launch, but the last
            assert log == ["launch"] + ["launch", "read"] * (metrics.steps - 1) + ["read"]
        else:
            assert log == ["launch"] * metrics.steps
    assert tokens[True] == tokens[False]
    for r_tokens, prompt in zip(tokens[True], prompts):
        assert r_tokens[len(prompt):] == _eager_greedy(reference, prompt, 7)
    with pytest.raises(ValueError, match="overlap=True .* drafting"):
        ServingEngine(program, token_budget=24, decode_slots=3, max_draft=2, overlap=True)


def test_step_leaves_placeholders_until_the_next_step_reads_them(llama_program) -> None:
    """Between overlapped steps, the tokens of the step in flight are placeholders (-1 - row)
    that the next step's decode entries carry and `synchronize` replaces."""
    program, _ = llama_program
    engine = ServingEngine(program, token_budget=16, decode_slots=2, block_size=4, num_blocks=32)
    first, second = Request(0, [3, 1, 4, 1, 5], 4), Request(1, [9, 2, 6], 4)
    engine.add(first)
    engine.add(second)
    engine.step()  # both prompts whole: rows 0-4 and 5-7, each request's next token pending
    assert first.tokens[-1] == -1 - 4 and second.tokens[-1] == -1 - 7
    entries = engine.step()  # decodes carry the placeholders, gathered on the device
    assert [e.tokens for e in entries] == [[-5], [-8]]
    assert first.tokens[5] >= 0 and second.tokens[3] >= 0  # read back after the launch
    assert first.tokens[-1] == -1 and second.tokens[-1] == -2
    engine.synchronize()
    assert min(first.tokens + second.tokens) >= 0
    with pytest.raises(ValueError, match="placeholder tokens .* no step is in flight"):
        from tileflow.serving import Entry

        engine.prepare([Entry(first, [-3], first.computed, "decode")])


# Mistral's window lets 6 blocks of 8 serve its prompts of up to 75 tokens side by side; Llama 4's
# prompts (17-76 tokens) cross its chunks of 16.
# Windows and chunks through the engine, in the default run:
# test_sliding_window_softcap_and_sink_models_equal_eager_generation and
# test_chunked_attention_model_equals_eager_generation. The example's greedy Llama run is extended:
# the sampled one runs the same engine and check (against eager's draws), and greedy generation
# through the engine equals eager's in the in-process tests above.
@pytest.mark.parametrize("args", [pytest.param((), marks=pytest.mark.extended), pytest.param(("--arch", "mistral", "--window", "8", "--blocks", "6"),
                                                   marks=pytest.mark.extended),
                                  pytest.param(("--arch", "llama4", "--chunk", "16"), marks=pytest.mark.extended),
                                  ("--temperature", "0.8", "--top-p", "0.9")], ids=["llama", "mistral", "llama4", "sampled"])
def test_serve_example_checks_against_eager(args: tuple[str, ...], monkeypatch, capsys) -> None:
    # The script run as `__main__` in this process: a fresh interpreter only adds torch's import.
    import runpy
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = str(root / "examples" / "serve.py")
    monkeypatch.setattr(sys, "argv", [script, "--requests", "4", "--new-tokens", "8", "--check", *args])
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(script, run_name="__main__")
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.out[-2000:] + out.err[-2000:]
    assert "check passed: 4 requests" in out.out and '"acceptance_rate"' in out.out


@pytest.mark.parametrize("args, message", [(("--requests", "0"), "--requests must be >= 1, got 0"),
                                           (("--budget", "1"), "--budget must be >= 2, got 1"),
                                           (("--top-p", "1.5"), "top_p must be a number in (0, 1]"),
                                           # Both were tracebacks from inside the engine, after the model was built;
                                           # the chunk's told to pick a block size the example fixes at 8.
                                           (("--budget", "20"), "--budget must be above --slots * (1 + --draft) = 24"),
                                           (("--arch", "llama4", "--chunk", "12"),
                                            "--chunk must be a multiple of the KV block size 8, got 12"),
                                           # A shape flag of another architecture was silently ignored.
                                           (("--window", "4"), "--window applies to --arch mistral only, got --arch llama"),
                                           (("--arch", "mistral", "--chunk", "8"),
                                            "--chunk applies to --arch llama4 only, got --arch mistral")])
def test_serve_example_refuses_bad_values_up_front(args: tuple[str, ...], message: str, usage_error) -> None:
    """A bad flag value is a usage error (exit 2) naming it, before any model is built: not a run
    that serves nothing (--requests 0) or a traceback from inside torch.export (--budget 0)."""
    assert message in usage_error("serve", *args)


def test_serve_example_refuses_a_seed_out_of_range_up_front(usage_error) -> None:
    """A negative --seed failed after the model was built, as a traceback naming seed -1000 (the
    first request's seed * 1000), not the flag."""
    assert "--seed must be in [0, 2**63), got -1" in usage_error("serve", "--seed", "-1")


@pytest.mark.parametrize("args", [("--top-p", "0.95"), ("--top-k", "5"), ("--min-p", "0.1"),
                                  ("--temperature", "1e-6", "--top-p", "0.9")])
def test_serve_example_refuses_sampling_filters_on_greedy_decoding(usage_error, args: tuple[str, ...]) -> None:
    """Without a temperature (or one below the greedy cut-off) the requests are greedy and ignore
    the filters: `--top-p 0.95 --check` served and checked greedy decoding, the flag dropped."""
    assert "--temperature > 0 with them" in usage_error("serve", *args)


def test_serve_example_refuses_too_few_blocks_naming_the_flag(usage_error) -> None:
    """A cache too small for the example's random prompts was a traceback from inside the engine
    ("request 0 needs 9 KV blocks, more than the 1 there are"): a usage error naming --blocks."""
    err = usage_error("serve", "--blocks", "1", "--requests", "1", "--new-tokens", "2", "--draft", "0", "--slots", "1",
                      "--budget", "8")
    assert "--blocks 1 is too few for these requests" in err and "more than the 1 there are" in err


def test_serve_example_serves_a_large_seed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--seed 10**16 (any int below 2**63 is a valid SamplingParams seed) made request seeds of
    seed * 1000 + i, past 2**63: a ValueError after the model was built. They wrap now."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "serve.py"
    spec = importlib.util.spec_from_file_location("_example_serve_seed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [path.name, "--seed", str(10**16), "--requests", "2", "--new-tokens", "3",
                                      "--draft", "0", "--slots", "1", "--budget", "8", "--temperature", "0.8", "--check"])
    assert module.main() == 0
    assert "check passed: 2 requests equal eager sampling" in capsys.readouterr().out


# ---- nano-batched serving steps -----------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=30), parts=st.integers(1, 6))
def test_split_entries_contiguous_balanced_and_whole(sizes, parts) -> None:
    from tileflow.serving import Entry, split_entries

    entries = [Entry(Request(i, [0] * n, 1), [1] * n, 0, "prefill") for i, n in enumerate(sizes)]
    groups = split_entries(entries, parts)
    assert [e for g in groups for e in g] == entries  # contiguous, in order, every entry once
    assert len(groups) == min(parts, len(entries)) and all(groups)
    tokens = [sum(len(e.tokens) for e in g) for g in groups]
    assert max(tokens) <= -(-sum(sizes) // parts) + max(sizes)


def test_split_entries_refuses_fewer_than_one_part() -> None:
    """A step cut into no nano-batches (or fewer) is a caller's error, not one unsplit batch; a
    step without entries has no nano-batch."""
    from tileflow.serving import Entry, split_entries

    entries = [Entry(Request(i, [0], 1), [1], 0, "prefill") for i in range(3)]
    for parts in (0, -1):
        with pytest.raises(ValueError, match="parts must be >= 1"):
            split_entries(entries, parts)
    assert split_entries([], 2) == []  # the nano-batches it returns are never empty


@settings(max_examples=100, deadline=None)
@given(parts=st.integers(1, 5), total=st.integers(1, 12), data=st.data())
def test_split_entries_finds_an_exactly_equal_cut(parts: int, total: int, data) -> None:
    """When the entries can be cut into `parts` runs of exactly equal token counts, that cut is
    the one made (with positive sizes it is unique: the prefix sums rise strictly). A cut opened
    only once a batch holds more than its share put [3, 1 | 2, 2] as [3, 1, 2 | 2]: both are
    within the bound `test_split_entries_contiguous_balanced_and_whole` checks."""
    from tileflow.serving import Entry, split_entries

    def split(sizes: list[int], parts: int) -> list[list[int]]:
        entries = [Entry(Request(i, [0] * n, 1), [1] * n, 0, "prefill") for i, n in enumerate(sizes)]
        return [[len(e.tokens) for e in g] for g in split_entries(entries, parts)]

    assert split([3, 1, 2, 2], 2) == [[3, 1], [2, 2]]
    want: list[list[int]] = []
    for _ in range(parts):  # a random composition of `total` per nano-batch
        cuts = sorted(data.draw(st.sets(st.integers(1, total - 1)))) if total > 1 else []
        want.append([b - a for a, b in zip([0, *cuts], [*cuts, total])])
    assert split([n for g in want for n in g], parts) == want


@pytest.mark.parametrize("nano_batches,max_draft", [(2, 0), (3, 3)])
def test_nano_batched_steps_generate_the_same_tokens(llama_program, nano_batches: int, max_draft: int) -> None:
    """Steps split into nano-batches (run in random interleavings of their stages, as streams
    would) produce exactly the tokens of eager generation, with and without speculation."""
    from tileflow.runtime.streams import SimulatedStreams

    program, reference = llama_program
    gen = torch.Generator().manual_seed(20 + nano_batches)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (9, 30, 4, 17)]
    streams = SimulatedStreams(seed=nano_batches)
    engine = ServingEngine(program, token_budget=24, decode_slots=4, max_draft=max_draft, block_size=4, num_blocks=64,
                           nano_batches=nano_batches, streams=streams)
    requests = [Request(i, p, 8, stop_tokens=_eos(reference)) for i, p in enumerate(prompts)]
    for r in requests:
        engine.add(r)
    interleaved = False
    while engine.scheduler.has_work():
        engine.step()
        interleaved |= streams.interleaved
    for r in requests:
        assert r.tokens[len(r.prompt):] == _eager_greedy(reference, r.prompt, 8), r.id
    assert interleaved  # some step really ran one nano-batch's stages between another's
    assert engine.allocator.all_free()
    with pytest.raises(ValueError, match="nano_batches"):
        ServingEngine(program, nano_batches=0)


@pytest.mark.parametrize("shares", [True, False])
def test_nano_batches_split_the_grid_by_tokens(llama_program, monkeypatch: pytest.MonkeyPatch, shares: bool) -> None:
    """With `nano_shares`, each nano-batch's attention launches over its share of the device's
    programs (its share of the step's tokens, at least half an equal share); without, over all."""
    import tileflow.runtime.attention as attention_runtime
    from tileflow.runtime.streams import SimulatedStreams
    from tileflow.serving import Entry
    from tileflow.serving.engine import sm_shares

    program, _ = llama_program
    grids: list[tuple[int, int]] = []  # (tokens of the launch, prefill-sized grid)
    plan = attention_runtime._launch_plan

    def spying_plan(cu, lens, hq, hkv, target, programs, *args):
        grids.append((cu[-1], programs[1]))
        return plan(cu, lens, hq, hkv, target, programs, *args)

    monkeypatch.setattr(attention_runtime, "_launch_plan", spying_plan)
    engine = ServingEngine(program, token_budget=64, decode_slots=4, block_size=4, num_blocks=64, nano_batches=2,
                           streams=SimulatedStreams(seed=0), nano_shares=shares)
    chunk = Request(0, list(range(1, 41)), 1, blocks=list(range(10)))
    decodes = [Request(i, [5] * 8, 1, blocks=[10 + 2 * i, 11 + 2 * i]) for i in range(1, 4)]
    entries = [Entry(r, [3], 7, "decode") for r in decodes] + [Entry(chunk, chunk.prompt[:30], 0, "prefill")]
    engine.forward(entries)
    full = attention_runtime.attention_programs("reference", torch.device("cpu"))
    want = ([max(1, int(full * s)) for s in sm_shares([entries[:3], entries[3:]])] if shares else [full, full])
    assert sm_shares([entries[:3], entries[3:]]) == pytest.approx([0.25 / (0.25 + 30 / 33), 30 / 33 / (0.25 + 30 / 33)])
    assert sorted(set(grids)) == sorted({(3, want[0]), (30, want[1])})


@pytest.mark.parametrize("arch, max_draft", [("llama", 0), ("llama", 3), ("mixtral", 0)])
def test_graphed_stages_generate_the_same_tokens(monkeypatch: pytest.MonkeyPatch, arch: str, max_draft: int) -> None:
    """Dense stages replayed from per-bucket graphs (`Config.cuda_graphs`; a CPU stand-in for
    CUDA graphs here): steps of 1-24 real tokens run in 16- and 32-token buckets whose padding
    rows never reach the real ones (Mixtral's padded rows join its experts' groups), the
    attention in between runs over the real tokens, and the tokens are exactly eager
    generation's. A graphed program refuses nano-batches."""
    import transformers

    import tileflow
    import tileflow.runtime.streams
    from graph_doubles import ReplayOnCpu
    from tileflow.distributed import CausalLMStep, build_stage_program

    torch.manual_seed(0)
    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**sizes, num_local_experts=4,
                                                                           num_experts_per_tok=2)).eval()
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes)).eval()
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "sdpa"
    example = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None])
    monkeypatch.setattr(tileflow.runtime.streams, "GRAPH_FACTORY", ReplayOnCpu)
    ReplayOnCpu.captures = ReplayOnCpu.replays = 0
    program = build_stage_program(CausalLMStep(model), example, max_tokens=1024,
                                  config=tileflow.Config(cuda_graphs=True))
    assert program.dense[0].module.graphs.buckets == [16, 32, 64, 128, 256, 512]  # none past 512 tokens
    if arch == "llama" and max_draft == 0:  # (one build: buckets end at the export's token range)
        short = build_stage_program(CausalLMStep(model), example, max_tokens=40, config=tileflow.Config(cuda_graphs=True))
        assert short.dense[0].module.graphs.buckets == [16, 32, 40]
    assert program.cuda_graphs and all(type(s.module).__name__ == "GraphedStage" for s in program.dense)
    gen = torch.Generator().manual_seed(30 + max_draft)
    # A one-token prompt alone first: the 16-token bucket is captured from 1-row inputs, whose
    # size-1 token dim must still get the layout the stage views it in.
    first = Request(9, [5], 3, stop_tokens=_eos(reference))
    ServingEngine(program, token_budget=24, decode_slots=3, block_size=4, num_blocks=64).run([first])
    assert first.tokens[1:] == _eager_greedy(reference, [5], 3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (9, 21, 4)]
    engine = ServingEngine(program, token_budget=24, decode_slots=3, max_draft=max_draft, block_size=4, num_blocks=64)
    requests = [Request(i, p, 8, stop_tokens=_eos(reference)) for i, p in enumerate(prompts)]
    engine.run(requests)
    for r in requests:
        assert r.tokens[len(r.prompt):] == _eager_greedy(reference, r.prompt, 8), r.id
    assert not any(stage.module.graphs._failed for stage in program.dense)  # every stage captured
    buckets = {b for stage in program.dense for (b, *_) in stage.module.graphs._graphs}
    assert buckets <= {16, 32} and 16 in buckets
    # Graphs are captured once per bucket and stage, then replayed on the later steps.
    assert ReplayOnCpu.captures == sum(len(s.module.graphs._graphs) for s in program.dense)
    assert ReplayOnCpu.replays > ReplayOnCpu.captures
    with pytest.raises(ValueError, match="CUDA graphs one at a time"):
        ServingEngine(program, nano_batches=2)


class _FailingOnce(RandomProgram):
    """A RandomProgram whose `fail_at`-th run raises (a kernel failing mid-serve)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(0)
        self.calls, self.fail_at = 0, fail_at

    def run(self, inputs, attention):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("a kernel failed")
        return super().run(inputs, attention)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failed_step_ends_its_requests_and_the_engine_serves_on(overlap: bool) -> None:
    """A step that raised left its requests running with their blocks, so every later step and
    run failed the same way; they end with finish_reason "error", and later requests are served."""
    engine = ServingEngine(_FailingOnce(fail_at=2), token_budget=16, decode_slots=2, block_size=4, num_blocks=16,
                           overlap=overlap)
    first, second = Request(0, [1, 2, 3], 4), Request(1, [4, 5], 4)
    with pytest.raises(RuntimeError, match=r"a step of requests \[0, 1\] failed \(RuntimeError: a kernel failed\)"):
        engine.run([first, second])
    assert (first.finish_reason, second.finish_reason) == ("error", "error")
    later = Request(2, [6, 7, 8], 3)
    engine.run([later])
    assert later.finish_reason == "length" and later.generated == 3
    assert engine.allocator.all_free()


def test_metrics_summary_averages_over_the_right_counts() -> None:
    """`Metrics.summary`: TTFT averaged over the requests that got a first token, time between
    tokens over every gap between a request's consecutive tokens, acceptance over drafted tokens."""
    from tileflow.serving import Metrics

    m = Metrics(steps=4, tokens_in_steps=20, generated=6, drafted=8, accepted=3,
                ttft={0: 1.0, 1: 3.0}, token_times={0: [1.0, 2.0, 4.0], 1: [3.0, 4.0]}, wall=2.0, waited=0.5)
    s = m.summary()
    assert s["mean_ttft_s"] == 2.0
    assert s["mean_tbt_s"] == pytest.approx(4 / 3)  # gaps 1, 2 and 1: three gaps, two requests
    assert s["acceptance_rate"] == 3 / 8 and s["drafted_tokens"] == 8
    assert (s["tokens_per_s"], s["mean_step_tokens"], s["host_waiting_share"]) == (3.0, 5.0, 0.25)
    assert Metrics().summary()["acceptance_rate"] == 0.0 and Metrics().summary()["mean_tbt_s"] == 0.0
    assert Metrics().summary()["drafted_tokens"] == 0  # (a rate of 0.0 with nothing drafted)


def test_drafts_stop_short_of_max_new_tokens_so_a_full_cache_never_preempts() -> None:
    """A request whose prompt and new tokens but one fill the cache exactly: its verify slots
    draft at most max_new_tokens - generated - 1 tokens (the last generated token is never fed),
    so it never needs a block past the cache and is never preempted (to recompute everything),
    however long the drafts offered."""
    scheduler = Scheduler(BlockAllocator(4, 4), token_budget=8, decode_slots=1, max_draft=3)
    request = Request(0, list(range(6)), 11)  # 6 + 11 - 1 = 16 positions: the whole cache
    scheduler.add(request)
    while scheduler.has_work():
        entries = scheduler.schedule({request.id: [1, 1, 1]})
        assert not scheduler.last_preempted and len(entries) == 1
        (e,) = entries
        assert e.start + len(e.tokens) <= 16
        request.computed += len(e.tokens)  # the engine's outcome: every draft accepted
        if request.prefilling:
            continue
        new = ([1] if e.kind == "prefill" else [*e.tokens[1:], 1])[: request.max_new_tokens - request.generated]
        assert e.kind == "prefill" or len(new) == len(e.tokens)  # no draft past the last token
        request.tokens += new
        request.generated += len(new)
        if request.generated == request.max_new_tokens:
            scheduler.finish(request, "length")
    assert request.tokens[6:] == [1] * 11 and scheduler.allocator.all_free()


def test_a_windowed_prompt_chunk_without_a_block_waits_out_of_the_step() -> None:
    """Under a window, a prompt whose chunk finds no block it may take (the free ones are left for
    the decoding request) sits the step out: no entry at all, never an empty prompt chunk (which
    the engine would pack as zero rows and read its prediction off another request's row)."""
    scheduler = Scheduler(BlockAllocator(5, 4), token_budget=9, decode_slots=2, sliding_window=8)
    decoder, prompt = Request(0, [1, 2, 3, 4], 60), Request(1, list(range(100)), 1)
    scheduler.add(decoder)
    scheduler.add(prompt)
    waited = 0
    while scheduler.has_work():
        entries = scheduler.schedule()
        assert all(e.tokens for e in entries), [(e.request.id, e.kind, e.start) for e in entries if not e.tokens]
        waited += prompt in scheduler.running and prompt.prefilling and all(e.request is not prompt for e in entries)
        for e in entries:
            r = e.request
            r.computed += len(e.tokens)
            if not r.prefilling:
                r.tokens.append(0)
                r.generated += 1
                if r.generated == r.max_new_tokens:
                    scheduler.finish(r, "length")
    assert waited and scheduler.allocator.all_free()  # the prompt did wait for blocks in some step


def test_a_preempted_request_offers_its_recomputed_prompt_blocks_again() -> None:
    """A preempted request recomputes its prompt into new blocks where its cached ones were
    evicted meanwhile; those are offered for prefix reuse again (what it offered before the
    preemption does not count: those blocks may be gone), so a later request with the same prompt
    finds the whole prefix."""
    scheduler = Scheduler(BlockAllocator(6, 4), token_budget=32, decode_slots=2)
    old, young = Request(0, [1, 2, 3, 4], 16), Request(1, [7] * 9, 12)  # young: two full prompt blocks
    scheduler.add(old)
    scheduler.add(young)
    cached_after_prefills, preempted = [], []
    while scheduler.has_work():
        entries = scheduler.schedule()
        preempted += [r.id for r in scheduler.last_preempted]
        for e in entries:  # what the engine does with the step's outcome
            r = e.request
            r.computed += len(e.tokens)
            scheduler.register_full_blocks(r, r.computed)
            if r.prefilling:
                continue
            if r is young and e.kind == "prefill":
                cached_after_prefills.append(len(scheduler.allocator.lookup(prefix_hashes(young.prompt, 4))))
            r.tokens.append(0)
            r.generated += 1
            if r.generated == r.max_new_tokens:
                scheduler.finish(r, "length")
    # The old request's growth preempted the young one, and evicted one of its cached blocks.
    assert preempted == [1] and cached_after_prefills == [2, 2]
    assert scheduler.allocator.all_free()


def test_a_blocks_prefix_hash_covers_every_token_before_it() -> None:
    """A block's hash is its whole prefix's, not its own tokens': blocks with equal tokens at other
    positions, or after other tokens, never share KV (it differs by position and context). Hashed
    alone, a prompt of one repeated token found its first block again as its second."""
    first, second = prefix_hashes([7] * 8 + [1], 4)
    assert first != second
    assert prefix_hashes([1, 2, 3, 4], 2)[1] != prefix_hashes([9, 2, 3, 4], 2)[1]
    allocator = BlockAllocator(4, 4)
    blocks = [allocator.allocate(), allocator.allocate()]
    for block, h in zip(blocks, (first, second)):
        allocator.register(block, h)
    assert allocator.lookup(prefix_hashes([7] * 8 + [2, 3], 4)) == blocks
    assert allocator.lookup(prefix_hashes([7] * 4 + [5] * 4, 4)) == blocks[:1]


def test_a_blocks_prefix_hash_tells_token_boundaries_apart() -> None:
    """Token ids are hashed as a sequence, not as their digits run together: [1, 23] and [12, 3]
    are other prompts, and so are blocks [1, 2], [34, 5] and [1, 23], [4, 5] (the same digits in
    the same order across the block boundary). A hash that ran them together would hand one
    prompt another's cached KV blocks."""
    assert prefix_hashes([1, 23], 2) != prefix_hashes([12, 3], 2)
    assert prefix_hashes([1, 2, 34, 5], 2)[1] != prefix_hashes([1, 23, 4, 5], 2)[1]
    allocator = BlockAllocator(4, 2)
    blocks = [allocator.allocate(), allocator.allocate()]
    for block, h in zip(blocks, prefix_hashes([1, 23, 4, 5], 2)):
        allocator.register(block, h)
    assert allocator.lookup(prefix_hashes([12, 3, 4, 5], 2)) == []
    assert allocator.lookup(prefix_hashes([1, 23, 4, 5], 2)) == blocks


def test_lookup_stops_at_the_first_prefix_block_not_cached() -> None:
    """A cached prefix is the run of registered hashes from the first block on: a block whose
    predecessor left the cache is not part of it (it would land at its predecessor's index)."""
    allocator = BlockAllocator(4, 4)
    hashes = prefix_hashes(list(range(12)), 4)
    blocks = [allocator.allocate() for _ in hashes]
    for block, h in zip(blocks, hashes):
        allocator.register(block, h)
        allocator.release(block)
    allocator.forget(blocks[1])
    assert allocator.lookup(hashes) == blocks[:1]
    allocator.forget(blocks[0])
    assert allocator.lookup(hashes) == [] and allocator.lookup(hashes[2:]) == blocks[2:]


def test_blocks_a_window_passed_at_admission_are_never_offered_for_reuse() -> None:
    """A windowed request admitted on a cached prefix whose leading blocks were evicted holds
    placeholder entries for them (never read): registering its prompt blocks offers only the
    ones it holds, never a placeholder's block id under an evicted block's hash (a later request
    with that prefix would read another block's KV)."""
    engine = ServingEngine(RandomProgram(0, sliding_window=6), token_budget=32, decode_slots=1, block_size=4,
                           num_blocks=16, overlap=False)
    prompt = [i % 7 for i in range(24)]
    engine.run([Request(0, prompt, 3)])
    cached = engine.allocator.lookup(prefix_hashes(prompt, 4))
    for block in cached[:4]:
        engine.allocator.forget(block)
    second = Request(1, prompt + [5, 6, 1], 4)
    engine.add(second)
    engine.step()  # admitted past 4 passed blocks, its last 3 prompt tokens computed and registered
    assert second.released == 4 and engine.allocator.lookup(prefix_hashes(prompt, 4)) == []
    assert set(engine.allocator._hash_of) == set(cached[4:])
    engine.run()
    assert second.done and engine.allocator.all_free()


def test_prompt_lookup_drafts_from_the_latest_earlier_occurrence() -> None:
    """Prompt lookup proposes what followed the latest earlier occurrence of the last n-gram (the
    most recent context), including one that overlaps the n-gram itself."""
    assert prompt_lookup_draft([1, 2, 3, 1, 2, 4, 1, 2], 2) == [4, 1]
    assert prompt_lookup_draft([5, 5, 5], 3) == [5]  # the occurrence just before the tail


def test_a_preempted_request_goes_back_to_the_head_of_the_queue() -> None:
    """A preempted request is queued first, before requests that arrived after it (FCFS: it is
    older), so it is admitted again before them. (Queued last, a later request took its place.)"""
    scheduler = Scheduler(BlockAllocator(6, 4), token_budget=32, decode_slots=2)
    old, young, late = Request(0, [1, 2, 3, 4], 16), Request(1, [7] * 9, 12), Request(2, [5] * 4, 2)
    for r in (old, young, late):
        scheduler.add(r)
    admitted, preempted = [], []
    while scheduler.has_work():
        entries = scheduler.schedule()
        if scheduler.last_preempted:
            preempted += scheduler.last_preempted
            assert list(scheduler.waiting) == [young, late]
        admitted += [e.request.id for e in entries if e.kind == "prefill" and e.start == 0]
        for e in entries:  # what the engine does with the step's outcome
            r = e.request
            r.computed += len(e.tokens)
            if r.prefilling:
                continue
            r.tokens.append(0)
            r.generated += 1
            if r.generated == r.max_new_tokens:
                scheduler.finish(r, "length")
    assert preempted == [young] and admitted == [0, 1, 1, 2]
    assert scheduler.allocator.all_free()


def test_a_step_whose_budget_is_spent_admits_no_one() -> None:
    """Admission needs budget left after the running requests' tokens: a prompt chunk that spends
    the whole budget leaves the next request waiting, with no blocks and no (empty) prompt chunk
    of zero tokens, which the engine would pack as zero rows and read a prediction off another
    request's row."""
    scheduler = Scheduler(BlockAllocator(8, 4), token_budget=4, decode_slots=2)
    first, second = Request(0, [1, 2, 3, 4], 2), Request(1, [5, 6, 7], 2)
    scheduler.add(first)
    scheduler.add(second)
    entries = scheduler.schedule()
    assert [(e.request.id, e.kind, len(e.tokens)) for e in entries] == [(0, "prefill", 4)]
    assert list(scheduler.waiting) == [second] and not second.blocks
    first.computed, first.tokens = 4, first.tokens + [9]  # what the engine does with the step's outcome
    first.generated = 1
    entries = scheduler.schedule()  # a decode slot, then the waiting prompt in the budget left
    assert [(e.request.id, e.kind, len(e.tokens)) for e in entries] == [(0, "decode", 1), (1, "prefill", 3)]


class _CountingProgram(RandomProgram):
    """A model whose every row predicts its input token plus one."""

    def __init__(self) -> None:
        super().__init__(0)

    def run(self, inputs, attention):
        super().run(inputs, attention)  # the attention stages, into the KV cache
        return [torch.nn.functional.one_hot((inputs[0][0] + 1) % VOCAB, VOCAB).float()[None]]


def test_a_verify_keeps_the_accepted_drafts_and_the_models_token_after_them() -> None:
    """A verify whose drafts are accepted in part: the request keeps the accepted ones and the
    model's pick after the last of them (not after the last draft), and its computed KV ends
    there, the rejected drafts' positions left to be written again."""
    engine = ServingEngine(_CountingProgram(), token_budget=16, decode_slots=1, max_draft=3, block_size=4,
                           num_blocks=16, overlap=False)
    request = Request(0, [2, 3, 4, 9, 2], 6)
    engine.add(request)
    engine.step()  # the prefill picks 3
    (entry,) = engine.step()  # prompt lookup drafts [4, 9, 2] after "2 3"; the model picks 4, 5, 10, 3
    assert (entry.kind, entry.tokens) == ("verify", [3, 4, 9, 2])
    assert request.tokens[5:] == [3, 4, 5] and request.computed == len(request.tokens) - 1 == 7
    assert (engine.metrics.drafted, engine.metrics.accepted) == (3, 1)
    engine.run()
    assert request.tokens[5:] == [3, 4, 5, 6, 7, 8] and engine.allocator.all_free()


def test_verify_steps_count_drafts_and_stamp_every_accepted_token() -> None:
    """A verify step counts its drafted tokens (not the entry's length, which has the last token
    too) for the acceptance rate, and stamps a time for each token it appends: a request gets one
    token time per generated token."""
    engine = ServingEngine(EchoProgram(last=7), token_budget=16, decode_slots=1, max_draft=3, block_size=4,
                           num_blocks=16)
    request = Request(0, [5, 6, 7, 8, 5, 6], 8)
    metrics = engine.run([request])
    # Prefill predicts 7; prompt lookup drafts [8, 5, 6] after "6 7", all accepted, and the model's 7.
    assert request.tokens[6:11] == [7, 8, 5, 6, 7]
    assert metrics.drafted >= 3 and metrics.accepted == metrics.drafted
    assert metrics.summary()["acceptance_rate"] == 1.0
    assert len(metrics.token_times[0]) == request.generated == 8


def test_steps_count_their_packed_tokens_and_the_last_step_reads_back_at_once() -> None:
    """`tokens_in_steps` sums every step's packed tokens (not its entries); with overlap, a step
    after which no work is left reads its tokens back at once, leaving no placeholder; a finished
    request's block arrays are dropped."""
    program = RandomProgram(0)
    engine = ServingEngine(program, token_budget=16, decode_slots=2, block_size=4, num_blocks=32, overlap=True)
    requests = [Request(0, [1, 2, 3, 4, 5], 4), Request(1, [6, 7], 3)]
    for r in requests:
        engine.add(r)
    while engine.scheduler.has_work():
        engine.step()
    assert engine._in_flight is None
    assert all(min(r.tokens) >= 0 and r.done for r in requests)
    m = engine.metrics
    assert m.tokens_in_steps == sum(program.steps) == 5 + 2 + 3 + 2 and m.steps == len(program.steps)
    assert m.summary()["mean_step_tokens"] == sum(program.steps) / len(program.steps)
    assert engine._block_arrays == [{}]


@pytest.mark.parametrize("overlap", [False, True])
def test_metrics_count_the_time_the_host_waits_for_tokens(monkeypatch: pytest.MonkeyPatch, overlap: bool) -> None:
    """`waited` sums the time the host spent reading steps' tokens back, once per step read (a
    clock that ticks once per reading shows each wait), and `host_waiting_share` divides it by the
    wall time."""
    import types

    import tileflow.serving.engine as engine_module

    ticks = iter(range(10**6))
    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    engine = ServingEngine(RandomProgram(0), token_budget=16, decode_slots=2, block_size=4, num_blocks=32,
                           overlap=overlap)
    m = engine.run([Request(0, [1, 2, 3, 4, 5], 4), Request(1, [6, 7], 3)])
    assert m.steps == 4 and m.waited == m.steps  # one tick between the start and the end of each read
    assert 0 < m.summary()["host_waiting_share"] == m.waited / m.wall < 1


def test_a_failed_overlapped_step_reads_back_the_step_before_it() -> None:
    """With overlap, the step before a failed one is still in flight when the failure ends its
    requests ("error"): its tokens are read back then, so no request is left done with a
    placeholder (a negative token id) among its tokens, nor a step in flight."""
    engine = ServingEngine(_FailingOnce(fail_at=2), token_budget=16, decode_slots=2, block_size=4, num_blocks=16,
                           overlap=True)
    first, second = Request(0, [1, 2, 3], 4), Request(1, [4, 5], 4)
    with pytest.raises(RuntimeError, match="failed"):
        engine.run([first, second])
    assert engine._in_flight is None
    for r in (first, second):
        assert r.finish_reason == "error" and r.generated == 1 and min(r.tokens) >= 0, r.tokens
    assert engine.metrics.generated == 2 and set(engine.metrics.ttft) == {0, 1}


def test_a_failed_step_whose_predecessor_cannot_be_read_back_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the step in flight cannot be read back either (the device failed it too), the engine
    drops it and the step's error says its tokens are lost, rather than passing over it."""
    engine = ServingEngine(_FailingOnce(fail_at=2), token_budget=16, decode_slots=2, block_size=4, num_blocks=16,
                           overlap=True)

    def broken_read_back() -> None:
        raise RuntimeError("device lost")

    for r in (Request(0, [1, 2, 3], 4), Request(1, [4, 5], 4)):
        engine.add(r)
    engine.step()  # launched, not read back: in flight
    assert engine._in_flight is not None
    monkeypatch.setattr(engine, "synchronize", broken_read_back)
    with pytest.raises(RuntimeError, match=r"failed .* could not be read back either \(RuntimeError: device lost\)"):
        engine.step()
    assert engine._in_flight is None


def test_a_step_of_two_entries_is_split_into_two_nano_batches(llama_program) -> None:
    """With nano_batches=2, a step of just two entries still runs as two nano-batches (one
    program run per entry, stage by stage), not as one packed run."""
    from tileflow.runtime.streams import SimulatedStreams
    from tileflow.serving import Entry

    program, _ = llama_program
    runs: list[str] = []

    class _Spy(_RecordingProgram):
        def stepwise(self, inputs, attention):
            runs.append("nano")
            return self._program.stepwise(inputs, attention)

    engine = ServingEngine(_Spy(program, runs), token_budget=16, decode_slots=2, block_size=4, num_blocks=16,
                           nano_batches=2, streams=SimulatedStreams(seed=0))
    entries = [Entry(Request(0, [1] * 4, 1, blocks=[0]), [1, 1, 1, 1], 0, "prefill"),
               Entry(Request(1, [2] * 3, 1, blocks=[1]), [2, 2, 2], 0, "prefill")]
    assert engine.forward(entries).shape[:2] == (1, 7)
    assert runs == ["nano", "nano"]
