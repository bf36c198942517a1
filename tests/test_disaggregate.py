"""The `disaggregate` pass, the stage program it yields, and the pieces of the distributed runtime
that need no second process (layout, rotation, KV cache)."""

from __future__ import annotations

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import needs_transformers
from torch import fx

import tileflow
from tileflow.distributed import (
    CausalLMStep, Layout, PagedKVCache, PeerError, build_stage_program, build_stage_programs, replica_of,
)
from tileflow.graph_utils import constant_number, constant_values
from tileflow.passes.disaggregate import lamina_bytes, local_attention
from tileflow.report import GraphReport

EXAMPLE = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None])


def _llama(heads: int, kv_heads: int, layers: int = 2):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64 // heads, max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(("heads", "kv_heads", "layers"), [(4, 4, 2), (8, 2, 3)])
def test_cut_traffic_matches_lamina_formula(heads: int, kv_heads: int, layers: int) -> None:
    model = _llama(heads, kv_heads, layers)
    report = GraphReport(graph_id="g")
    program = build_stage_program(CausalLMStep(model), EXAMPLE, max_tokens=64, report=report)
    info = report.extra["disaggregate"]
    assert info["attention_stages"] == layers and info["dense_stages"] == layers + 1
    tokens = sympy.Symbol(info["token_symbol"], integer=True, positive=True)
    # By hand: per layer q and the output (heads·d each), k and v (kv_heads·d each), fp32.
    hand = layers * tokens * 4 * 64 // heads * (2 * heads + 2 * kv_heads)
    assert sympy.simplify(sympy.sympify(info["bytes_per_iteration"], locals={str(tokens): tokens}) - hand) == 0
    d = model.config.hidden_size
    assert sympy.simplify(hand - lamina_bytes(4, d, heads // kv_heads, tokens, layers)) == 0
    assert [c.group_size for c in program.cuts] == [heads // kv_heads] * layers


@pytest.mark.parametrize("tuple_return", [True, False])
def test_stage_program_matches_the_model_and_attention_reads_only_its_dense_neighbours(
    tuple_return: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not tuple_return:  # torch 2.11's split_module, which cannot return every stage's outputs as a tuple
        import tileflow.passes.disaggregate as disaggregate

        real = disaggregate.split_module

        def split_module(m, root_m, split_callback, qualname_map=None, keep_original_order=False):
            return real(m, root_m, split_callback, qualname_map, keep_original_order)

        monkeypatch.setattr(disaggregate, "split_module", split_module)
    model = _llama(8, 2, 2)
    program = build_stage_program(CausalLMStep(model), EXAMPLE, max_tokens=64)
    kinds = [s.kind for s in program.stages]
    assert kinds == ["dense", "attention", "dense", "attention", "dense"]
    for stage in program.stages:
        if stage.kind == "attention":
            # q, k, v come from the dense stage just before; the output goes only to the one after.
            assert {(s.kind, s.index) for s in stage.inputs} == {("stage", stage.id - 1)}
            assert program.consumers[(stage.id, 0)] == [stage.id + 1]
        else:
            assert all(s.kind != "stage" or program.stages[s.index].kind == "dense" or s.index == stage.id - 1
                       for s in stage.inputs)
    assert_program_matches_eager(program, model, (1, 3, 9))


def test_programs_of_several_configs_share_one_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """`build_stage_programs` exports and decomposes the step once; each config's program gets its
    own passes on its own graph (padded GEMMs in tileflow's, ATen linears left in the one
    without `gemm_padding`, built after it) and both give the model's logits."""
    import tileflow.distributed.program as program_module

    exports, decompositions = [], []
    real_export, real_decompose = program_module.export_program, program_module.decompose_exported
    monkeypatch.setattr(program_module, "export_program", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    monkeypatch.setattr(program_module, "decompose_exported",
                        lambda *a, **k: decompositions.append(1) or real_decompose(*a, **k))
    model = _llama(4, 2)
    configs = {"tileflow": tileflow.Config(), "aten": tileflow.Config(passes=("canonicalize", "attention"))}
    programs = build_stage_programs(CausalLMStep(model), EXAMPLE, configs, max_tokens=64)
    assert len(exports) == len(decompositions) == 1 and list(programs) == ["tileflow", "aten"]

    def gemms(program) -> int:
        return sum(n.target is torch.ops.tileflow.padded_gemm.default
                   for s in program.dense for n in s.module.graph.nodes)

    assert gemms(programs["tileflow"]) > 0 and gemms(programs["aten"]) == 0
    for program in programs.values():
        assert_program_matches_eager(program, model, (1, 5))


def assert_program_matches_eager(program, model, lengths: tuple[int, ...]) -> None:
    """The stage program (attention run locally) gives the eager model's logits (SDPA, with
    transformers' own masks) for a packed step of each length."""
    model.config._attn_implementation = "sdpa"
    for t in lengths:
        ids, pos = torch.randint(0, 96, (1, t)), torch.arange(t)[None]
        (logits,) = program.run([ids, pos])
        with torch.no_grad():
            expected = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


class _LogitsStep(torch.nn.Module):
    """A model's logits over packed ids and positions, with the model's attention as configured
    (unlike `CausalLMStep`, which switches it to "tileflow_causal")."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def test_masked_attention_stays_colocated_with_the_reason() -> None:
    model = _llama(4, 2)
    model.config._attn_implementation = "sdpa"  # the causal mask becomes a tensor in the graph
    report = GraphReport(graph_id="g")
    with pytest.raises(ValueError, match="mask tensor"):
        build_stage_program(_LogitsStep(model), EXAMPLE, max_tokens=64, report=report)
    assert "disaggregate" not in report.rewrites and "disaggregate" not in report.extra
    assert any(f.pass_name == "disaggregate" and "tileflow_causal" in f.reason for f in report.fallbacks)


def test_cuts_carry_sliding_windows() -> None:
    """Mistral's window (3 keys, shorter than the steps) rides on the cut, and the attention stage
    applies it: the program's logits equal the eager model's (SDPA with transformers' own mask)."""
    import transformers

    cfg = transformers.MistralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=3,
    )
    model = transformers.MistralForCausalLM(cfg).eval()
    program = build_stage_program(CausalLMStep(model), EXAMPLE, max_tokens=64)
    assert [(c.sliding_window, c.softcap) for c in program.cuts] == [(3, None), (3, None)]
    assert_program_matches_eager(program, model, (1, 5, 9))


def test_layers_with_state_outside_attention_are_refused_at_build() -> None:
    """LFM2's short convolutions read the tokens before each one outside attention: a served
    step read the sequences packed beside it and none of its own earlier steps (logits off by
    about 3e-4 here, more in trained models), without an error. `CausalLMStep` refuses layer
    types other than attention and token-wise ones; a step that hides them is refused by the
    pass at its convolution over the tokens."""
    import transformers

    import tileflow

    cfg = transformers.Lfm2Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["conv", "full_attention"], block_ff_dim=96, block_auto_adjust_ff_dim=False,
    )
    model = transformers.Lfm2ForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="'conv' layers"):
        CausalLMStep(model)

    tileflow.register_transformers()
    model.config._attn_implementation = "tileflow_causal"
    report = GraphReport(graph_id="g")
    with pytest.raises(ValueError, match="convolution over the token dimension"):
        build_stage_program(_LogitsStep(model), EXAMPLE, max_tokens=64, report=report)
    assert "disaggregate" not in report.rewrites


def test_a_step_that_does_not_export_is_refused_with_where_it_broke() -> None:
    """A data-dependent branch in the step (DBRX's and LongCat's expert loops) failed deep inside
    torch.export with a guard error; it is a ValueError naming the export and the model's line."""
    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(96, 32)

        def forward(self, ids, pos):
            x = self.embed(ids)
            if (ids > 10).sum() > 2:  # data-dependent: no one graph for every input
                x = x * 2
            return x

    with pytest.raises(ValueError, match=r"cannot be exported .* at test_disaggregate\.py:\d+"):
        build_stage_program(Step(), EXAMPLE, max_tokens=64)


def test_a_softcap_known_only_at_run_time_is_not_cut() -> None:
    import tileflow

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(96, 32)

        def forward(self, ids, pos):
            x = self.embed(ids).view(1, -1, 2, 16).transpose(1, 2)
            cap = pos.float().amax() + 30.0  # a cap the attention stages cannot know ahead
            return tileflow.ops.meta_attention(x, x, x, causal=True, softcap=cap)

    report = GraphReport(graph_id="g")
    with pytest.raises(ValueError, match="cap known only at run time"):
        build_stage_program(Step(), EXAMPLE, max_tokens=64, report=report)


def test_constant_number_reads_the_constants_exports_leave() -> None:
    root = torch.nn.Module()
    root.register_buffer("cap", torch.tensor(50.0))
    root.sinks = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    graph = fx.Graph()
    runtime = graph.placeholder("runtime")
    held = graph.call_function(torch.ops.aten.clone.default, (graph.get_attr("cap"),))
    made = graph.call_function(torch.ops.aten.scalar_tensor.default, (30.0,))
    cast = graph.call_function(torch.ops.prims.convert_element_type.default, (made, torch.float64))
    sinks = graph.call_function(torch.ops.aten.view.default, (graph.get_attr("sinks"), [1, 3, 1, 1]))
    graph.output((runtime, held, cast, sinks))
    fx.GraphModule(root, graph)
    assert (constant_number(held), constant_number(cast), constant_number(2), constant_number(runtime)) == (
        50.0, 30.0, 2.0, None)
    assert constant_values(sinks) == (0.5, -1.0, 2.0) and constant_values(runtime) is None
    assert constant_number(sinks) is None  # three values are not a number


def test_graph_without_attention_falls_back() -> None:
    report = GraphReport(graph_id="g")
    mlp = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 8))

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, ids, pos):
            return self.mlp(ids) + pos[..., None]

    with pytest.raises(ValueError, match="no tileflow::meta_attention"):
        build_stage_program(Step(), EXAMPLE, max_tokens=64, report=report)


def test_pass_through_torch_compile_only_annotates() -> None:
    # One compile gives both the report (the graphs it adds to the session's report: what
    # `tileflow.explain` returns for the same options) and the logits checked against eager.
    from tileflow.report import session_report

    model = _llama(4, 2)
    step = CausalLMStep(model)
    opts = {"passes": ("canonicalize", "attention", "gemm_padding", "disaggregate")}
    ids = torch.randint(0, 96, (1, 7))
    pos = torch.arange(7)[None]
    torch._dynamo.reset()
    seen = len(session_report().graphs)
    compiled = torch.compile(step, backend="tileflow", dynamic=True, options=opts)
    with torch.no_grad():
        got = compiled(ids, pos)
    graphs = session_report().graphs[seen:]
    assert sum(g.rewrites.get("disaggregate", 0) for g in graphs) == 2
    assert graphs[0].extra["disaggregate"]["bytes_per_token"] == 2 * 4 * 16 * (2 * 4 + 2 * 2)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    model.config._attn_implementation = "tileflow_causal"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lamina_llama3_70b_by_hand() -> None:
    # LLaMA3-70B: d = 8192, G = 64 / 8 = 8, L = 80, bf16; batch 300 → (2 + 1/4)·2·8192·300·80 bytes.
    assert lamina_bytes(2, 8192, 8, 300, 80) == 884_736_000


@settings(max_examples=200, deadline=None)
@given(replicas=st.integers(1, 8), stage=st.integers(0, 100))
def test_rotation_moves_each_batch_to_the_next_replica(replicas: int, stage: int) -> None:
    batches = replicas + 1  # Lamina: n batches over n − 1 replicas
    for j in range(batches):
        assert replica_of(j, stage + 1, replicas) == (replica_of(j, stage, replicas) + 1) % replicas
    # At every stage the first n − 1 batches occupy every replica once.
    assert sorted(replica_of(j, stage, replicas) for j in range(replicas)) == list(range(replicas))


@given(world=st.integers(2, 12), models=st.integers(1, 4), kv_heads=st.integers(1, 16))
def test_kv_shards_cover_heads_contiguously(world: int, models: int, kv_heads: int) -> None:
    if world - models < 1:
        with pytest.raises(ValueError, match="at least one model worker and one attention worker"):
            Layout(world, models)
        return
    layout = Layout(world, models)
    assert layout.model_ranks + layout.attention_ranks == list(range(world))
    if len(layout.attention_ranks) > kv_heads:
        with pytest.raises(ValueError, match="at most"):
            layout.kv_shards(kv_heads)
        return
    shards = layout.kv_shards(kv_heads)
    assert shards[0][0] == 0 and shards[-1][1] == kv_heads
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
    sizes = [hi - lo for lo, hi in shards]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_paged_kv_cache_blocks_and_release() -> None:
    cache = PagedKVCache(2, 1, 2, block_size=2, num_blocks=3, dtype=torch.float32)
    assert cache.reserve(7, 3) == 0  # two blocks
    rows = torch.arange(6.0).view(3, 1, 2)
    cache.write_batch(1, cache.prepare([cache.blocks(7)], [3], [0]), rows, -rows)
    cache.commit(7, 3)
    flat = cache.k[1][torch.tensor(cache.blocks(7))].reshape(-1, 1, 2)[:3]
    torch.testing.assert_close(flat, rows)
    torch.testing.assert_close(cache.v[1][torch.tensor(cache.blocks(7))].reshape(-1, 1, 2)[:3], -rows)
    assert cache.reserve(8, 2) == 0  # the last block
    with pytest.raises(RuntimeError, match="KV cache full"):
        cache.reserve(7, 2)
    cache.release(8)
    assert cache.reserve(7, 2) == 3 and cache.length(7) == 3


def test_paged_kv_cache_gives_back_blocks_behind_every_layers_window() -> None:
    """A window of 3 keys over blocks of 2: a sequence decoding token by token holds at most 3
    blocks, the ones it gave back are NaN-filled, and its attention equals that of a cache that
    keeps every block."""
    gen = torch.Generator().manual_seed(0)
    window = 3
    kept = PagedKVCache(1, 1, 4, block_size=2, num_blocks=16, dtype=torch.float32)
    windowed = PagedKVCache(1, 1, 4, block_size=2, num_blocks=16, dtype=torch.float32, sliding_window=window)
    for step in range(12):
        n = 3 if step == 0 else 1  # a prompt of 3 tokens, then decodes
        q, k, v = (torch.randn(n, h, 4, generator=gen) for h in (2, 1, 1))
        outs = []
        for cache in (kept, windowed):
            start = cache.reserve(7, n)
            batch = cache.prepare([cache.blocks(7)], [n], [start])
            cache.write_batch(0, batch, k, v)
            free = [b for b in range(cache.num_blocks) if cache.allocator.is_free(b)]
            cache.k[0][free], cache.v[0][free] = float("nan"), float("nan")
            outs.append(cache.attend_batch(0, q, batch, scale=0.5, sliding_window=window))
            cache.commit(7, n)
        torch.testing.assert_close(outs[1], outs[0])
        assert sum(windowed.allocator.refs) <= 3
    assert sum(kept.allocator.refs) == 7 and len(windowed.blocks(7)) == 7  # 14 positions
    windowed.release(7)
    assert windowed.allocator.all_free()


@given(st.lists(st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 64), st.integers(0, 4096)),
                         min_size=1, max_size=5, unique_by=lambda t: t[0]), min_size=1, max_size=4),
       st.lists(st.integers(0, 10**6), max_size=5), st.integers(1, 3))
def test_step_plan_round_trips(batches, release, inputs_per_batch) -> None:
    from tileflow.distributed.layout import BatchShape, decode_plan, encode_plan

    shapes = [BatchShape(*(tuple(col) for col in zip(*b))) for b in batches]
    assert decode_plan(encode_plan(shapes, release, inputs_per_batch)) == (shapes, release, inputs_per_batch)


def test_attention_worker_rejects_positions_that_do_not_continue_the_cache() -> None:
    from types import SimpleNamespace

    from tileflow.distributed import AttentionWorker, BatchShape, LayerShard

    worker = AttentionWorker(Layout(2), SimpleNamespace(rank=1))
    worker.layers = [LayerShard(2, 1, 4, 0, 1, scale=0.5)]
    worker.block_size, worker.num_blocks = 4, 8
    payload = torch.randn(3, 2 + 2, 4)
    out = worker._attend(0, BatchShape((5,), (3,), (0,)), payload.clone())
    assert out.shape == (3, 2, 4) and worker.cache.length(5) == 3
    with pytest.raises(ValueError, match="start at position 2 but the KV cache holds 3"):
        worker._attend(0, BatchShape((5,), (1,), (2,)), torch.randn(1, 4, 4))


def test_attention_worker_gives_back_sliding_layers_blocks_in_their_own_group() -> None:
    """A full layer beside a 3-key sliding one, told `sliding_blocks` in its INIT: the worker
    keeps them in two KV groups (`kv_groups`): the sliding layer's blocks go back behind the
    window (NaN-filled from then on) and the full layer gets the memory that saves, as more
    blocks; its outputs equal those of a worker keeping one pool of every block."""
    from types import SimpleNamespace

    from tileflow.distributed import AttentionWorker, BatchShape, LayerShard
    from tileflow.distributed.attention_worker import encode_init

    layers = [LayerShard(2, 1, 4, 0, 1, scale=0.5), LayerShard(2, 1, 4, 0, 1, scale=0.5, sliding_window=3)]
    workers, inbox, outbox = [], [], []
    for sliding_blocks in (None, 6):
        ctl, floats = encode_init(layers, 2, 12, sliding_blocks)
        inbox.append(floats)
        # The transport of a one-model-worker layout: q/k/v in, attention out, in work-item order.
        transport = SimpleNamespace(rank=1, recv=lambda *args: inbox.pop(0), send=lambda out, rank: outbox.append(out))
        worker = AttentionWorker(Layout(2), transport)
        worker._init(ctl)
        assert worker.layers == layers and worker.sliding_blocks == sliding_blocks
        workers.append(worker)
    gen = torch.Generator().manual_seed(0)
    lengths = {5: 0, 6: 0}
    for step in range(10):
        # Two sequences: prompts of 5 and 3 tokens, then decodes; the second is released at step 7.
        seqs = [s for s in (5, 6) if not (s == 6 and step >= 7)]
        q_lens = [5 if s == 5 else 3 for s in seqs] if step == 0 else [1] * len(seqs)
        batch = BatchShape(tuple(seqs), tuple(q_lens), tuple(lengths[s] for s in seqs))
        payloads = [torch.randn(sum(q_lens), 4, 4, generator=gen) for _ in layers]
        outs = []
        for worker in workers:
            for cache in worker.caches:  # the blocks no one holds: NaN (a read would show)
                free = [b for b in range(cache.num_blocks) if cache.allocator.is_free(b)]
                for t in (*cache.k, *cache.v):
                    t[free] = float("nan")
            inbox.extend(p.clone() for p in payloads)
            worker._step([batch], [6] if step == 7 else [])
            outs.append(outbox[:])
            outbox.clear()
        for a, b in zip(*outs):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b)
        for s, n in zip(seqs, q_lens):
            lengths[s] += n
        full, sliding = workers[1].caches
        # The full layer keeps every block of its sequences; the sliding one its window's and step's.
        assert sum(full.allocator.refs) == sum(-(-lengths[s] // 2) for s in seqs)
        assert all(len(sliding.blocks(s)) - sliding._seqs[s].released <= (3 + q - 3) // 2 + 2
                   for s, q in zip(seqs, q_lens))
    assert [c.num_blocks for c in workers[0].caches] == [12]
    assert [c.num_blocks for c in workers[1].caches] == [18, 6]  # the 6 blocks the sliding layer leaves
    # Sequence 5's 14 positions: 7 blocks in the full layer, 2 in the sliding one.
    assert sum(full.allocator.refs) == 7 and sum(sliding.allocator.refs) == 2


def test_attention_worker_whose_sliding_group_is_full_says_to_raise_sliding_blocks() -> None:
    """A worker told too few `sliding_blocks` for a step: the error names the sliding layers'
    group and `sliding_blocks` (more `num_blocks` would only give the full layers more)."""
    from types import SimpleNamespace

    from tileflow.distributed import AttentionWorker, BatchShape, LayerShard
    from tileflow.distributed.attention_worker import encode_init

    layers = [LayerShard(2, 1, 4, 0, 1, scale=0.5), LayerShard(2, 1, 4, 0, 1, scale=0.5, sliding_window=3)]
    ctl, floats = encode_init(layers, 2, 12, 1)
    worker = AttentionWorker(Layout(2), SimpleNamespace(rank=1, recv=lambda *args: floats))
    worker._init(ctl)
    with pytest.raises(RuntimeError, match="KV cache full.*sliding layers' KV group, 1 blocks: raise sliding_blocks"):
        worker._attend(0, BatchShape((5,), (5,), (0,)), torch.randn(5, 4, 4))


def test_embedding_rows_follow_the_token_ids_through_views() -> None:
    """`build_stage_program` records the vocabulary the serving engine checks token ids against:
    the rows of the table the first input indexes, found through the views GPT-2 puts first."""
    from tileflow.capture import capture_exported
    from tileflow.distributed.program import embedding_rows

    class Embed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = torch.nn.Embedding(50, 8), torch.nn.Embedding(20, 8)

        def forward(self, ids: torch.Tensor, positions: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return (self.wte(ids.view(-1, ids.shape[-1])) + self.wpe(positions)) * scale

    example = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None], torch.ones(1))
    gm = capture_exported(torch.export.export(Embed(), example)).gm
    assert [embedding_rows(gm, i) for i in range(4)] == [50, 20, None, None]


class _TableStep(torch.nn.Module):
    """A packed step `(ids, positions) -> out` with a table of 64 rows to look rows up in."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(64, 3))


def _step_graph(step: torch.nn.Module) -> fx.GraphModule:
    """`step`'s graph exported over a dynamic token count, as `build_stage_program` exports it."""
    from tileflow.capture import capture_exported, export_program

    tokens = torch.export.Dim("tokens", min=1, max=32)
    example = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None])
    with torch.no_grad():
        return capture_exported(export_program(step, example, ({1: tokens}, {1: tokens}), strict=False)).gm


class _NumberIndexAndComparison(_TableStep):
    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        scale = torch.log1p(((torch.arange(t) + 1) // 2).float())  # a number: the tokens' positions
        rows = self.table[torch.arange(t)]  # an index
        seen = (torch.arange(t)[:, None] >= torch.arange(t)).sum(-1, keepdim=True)  # a comparison
        return rows * scale[:, None] + seen


class _IndicesThroughFloats(_TableStep):
    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        rows = self.table[(torch.arange(t) / 2).long()]  # an index through a float
        index = torch.arange(t).float()
        seen = (index[:, None] >= index).float().sum(-1, keepdim=True)  # a comparison of floats
        return rows + seen


class _FloatPositions(torch.nn.Module):
    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.log1p(torch.arange(ids.shape[1], dtype=torch.float32))[None, :] + ids


def test_token_indices_read_as_numbers_become_the_steps_positions() -> None:
    """`token_indices_as_positions` (Llama 4's temperature tuning computes `arange(T)` as the
    tokens' positions) replaces an `arange(T)` the graph uses only as a number by the step's
    positions, and leaves one used as an index (a lookup, a comparison) as it was: the packed
    step with restarting positions then computes what each sequence alone would."""
    from tileflow.distributed.program import token_indices_as_positions

    gm = _step_graph(_NumberIndexAndComparison())
    assert token_indices_as_positions(gm) == (1, 3)  # the lookup's and the comparison's two are left
    positions = torch.tensor([[5, 6, 7, 0, 1, 2, 3]])
    index = torch.arange(7)
    want = gm.table[index] * torch.log1p(((positions[0] + 1) // 2).float())[:, None] + (index + 1)[:, None]
    torch.testing.assert_close(gm(torch.zeros(1, 7, dtype=torch.long), positions), want)


def test_token_indices_that_become_indices_again_are_left_alone() -> None:
    """An `arange(T)` that turns floating point and then back into an index (a bucket lookup
    `(arange(T) / 2).long()`, a mask from comparing float indices) is an index, and is left as it
    was: the graph computes the same before and after, with restarting positions. One created
    floating (`arange(T, dtype=float)`) and read only as a number is replaced."""
    from tileflow.distributed.program import token_indices_as_positions

    ids, positions = torch.zeros(1, 7, dtype=torch.long), torch.tensor([[5, 6, 7, 0, 1, 2, 3]])
    gm, scale = _step_graph(_IndicesThroughFloats()), _step_graph(_FloatPositions())
    want = gm(ids, positions)
    assert token_indices_as_positions(gm) == (0, 2)
    torch.testing.assert_close(gm(ids, positions), want)
    assert token_indices_as_positions(scale) == (1, 0)
    torch.testing.assert_close(scale(ids, positions), torch.log1p(positions.float()))


class _IndexedTemperature(torch.nn.Module):
    """A step flagged as reading token indices as positions (as `CausalLMStep` flags Llama 4),
    exact only below position 3 otherwise, with an arange used as a number and, optionally,
    one used as an index."""

    position_limit = (3, "(a test's bound)")
    reads_index_as_position = True

    def __init__(self, indexed: bool) -> None:
        super().__init__()
        self.indexed = indexed
        self.table = torch.nn.Parameter(torch.randn(64, 4))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        out = self.table[ids[0]] * torch.log1p(torch.arange(t).float())[:, None]
        return out + self.table[torch.arange(t)] if self.indexed else out


@pytest.mark.parametrize("indexed", [False, True])
def test_a_token_index_left_in_the_step_keeps_the_position_bound(indexed: bool) -> None:
    """The bound of a step that reads token indices as positions is lifted only when every
    arange over its tokens was replaced: an index left (here a lookup) might be one the model
    reads as a position, so the build still refuses steps past the bound."""
    example = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None])
    match = "exact only below 3" if indexed else "cannot be disaggregated"  # past the bound: no attention to cut
    with pytest.raises(ValueError, match=match):
        build_stage_program(_IndexedTemperature(indexed), example, max_tokens=8)


class _AttentionLast(torch.nn.Module):
    """A step whose attention output is the graph's output (no dense node after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(96, 32)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        import tileflow

        x = self.embed(ids).view(1, -1, 2, 16).transpose(1, 2)
        return tileflow.ops.meta_attention(x, x, x, causal=True)


class _AdjacentAttentions(_AttentionLast):
    """Two attentions with no node between them: the second's queries are the first's output."""

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        import tileflow

        x = self.embed(ids).view(1, -1, 2, 16).transpose(1, 2)
        a = tileflow.ops.meta_attention(x, x, x, causal=True)
        return tileflow.ops.meta_attention(a, x, x, causal=True) + 1


@pytest.mark.parametrize("step", [_AttentionLast, _AdjacentAttentions])
def test_attention_output_read_outside_the_next_dense_stage_is_relayed(step) -> None:
    # Before: split_stages raised "stages [0, 1] are not dense/attention alternating" (no node for
    # the dense stage after the attention). Now an alias in that stage relays the output.
    torch.manual_seed(0)
    model = step()
    program = build_stage_program(model, EXAMPLE, max_tokens=64)
    cuts = len(program.cuts)
    assert [s.kind for s in program.stages] == ["dense", "attention"] * cuts + ["dense"]
    for stage in program.stages:
        if stage.kind == "attention":  # what ModelWorker requires of every cut
            assert program.consumers[(stage.id, 0)] == [stage.id + 1]
    ids, pos = torch.randint(0, 96, (1, 7)), torch.arange(7)[None]
    (out,) = program.run([ids, pos])
    torch.testing.assert_close(out, model(ids, pos))


class _Recorder:
    """A transport stand-in on rank 0 that records what would be sent."""

    rank = 0

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, value, dst: int) -> None:
        self.sent.append((dst, value))


def test_model_worker_refuses_a_batch_it_cannot_run_before_sending_the_plan() -> None:
    # Before: the plan went to the attention workers, then the dense stage failed on an export
    # guard (too many tokens) or an embedding index error, leaving them reading the next step's
    # messages as this one's q/k/v.
    from tileflow.distributed import Batch, ModelWorker

    class Step(_AttentionLast):
        def forward(self, ids, pos):
            return super().forward(ids, pos) * 2

    program = build_stage_program(Step(), EXAMPLE, max_tokens=16)
    t = _Recorder()
    worker = ModelWorker(program, Layout(2), t)
    too_long = Batch([torch.zeros(1, 20, dtype=torch.long), torch.arange(20)[None]], [0], [20], [0])
    with pytest.raises(ValueError, match="20 tokens is more than the 16"):
        worker.step([too_long])
    past_vocab = Batch([torch.tensor([[3, 96]]), torch.arange(2)[None]], [0], [2], [0])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\)"):
        worker.step([past_vocab])
    # Float ids, or ids of shape [1, T, 1], failed inside the dense stage once the plan was out.
    for ids in (torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[[1], [2], [3]]])):
        with pytest.raises(ValueError, match=r"input 0 \(token ids\) .* must be an integer tensor of shape \[1, 3\]"):
            worker.step([Batch([ids, torch.arange(3)[None]], [0], [3], [0])])
    # Positions that do not continue a sequence from its start: the attention workers place keys
    # by `starts` and the rotary embedding reads the positions, so the logits differed silently.
    restarted = Batch([torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6, 0, 1]])], [0, 1], [2, 2], [5, 7])
    with pytest.raises(ValueError, match=r"positions \(input 1\) of sequence 1 must run from its start 7 to 8 .*got \[0, 1\]"):
        worker.step([restarted])
    assert t.sent == []


@pytest.mark.parametrize("sizes", [{"num_blocks": 0}, {"block_size": 0}, {"block_size": True}])
def test_model_worker_refuses_block_sizes_the_attention_workers_would_refuse_mid_step(sizes) -> None:
    """`num_blocks=0` or `block_size=0` went out in INIT unchecked; the attention workers refused
    them when making their caches at the first step, once its plan was out, which ended the run."""
    from tileflow.distributed import ModelWorker

    program = build_stage_program(_AttentionLast(), EXAMPLE, max_tokens=16)
    with pytest.raises(ValueError, match=f"{next(iter(sizes))} must be an int >= 1"):
        ModelWorker(program, Layout(2), _Recorder(), **sizes)


@pytest.mark.parametrize("nano_batches", [2, "auto"])
def test_a_stage_program_refuses_nano_batches_it_would_not_apply(nano_batches) -> None:
    """The stages are cut from the graph and run whole: with `nano_batches=2` the pass annotated
    every node and the program ran unsplit, without a word."""
    config = tileflow.Config(passes=("canonicalize", "attention", "gemm_padding", "nanobatch"), nano_batches=nano_batches)
    with pytest.raises(ValueError, match=f"nano_batches={nano_batches!r}: a disaggregated step's dense stages run unsplit"):
        build_stage_program(_AttentionLast(), EXAMPLE, max_tokens=16, config=config)


class _FailureRecorder(_Recorder):
    def send_failure(self, reason: str, dst: int) -> None:
        self.sent.append((dst, f"failure: {reason}"))

    def flush(self, timeout_s: float | None = None) -> None:
        pass


def test_a_step_failing_after_its_plan_ends_the_run_on_every_rank() -> None:
    """A dense stage failing once the plan is out left the attention workers reading the next
    step's messages as this one's (a valid step then died with an unrelated shape error): every
    rank is told why, and the leader refuses later steps. The stages run without autograd."""
    from tileflow.distributed import Batch, ModelWorker

    program = build_stage_program(_AttentionLast(), EXAMPLE, max_tokens=16)
    grad_modes = []

    def failing_stage(*args):
        grad_modes.append(torch.is_grad_enabled())
        raise RuntimeError("a kernel failed")

    program.stages[0].module = failing_stage
    t = _FailureRecorder()
    worker = ModelWorker(program, Layout(2), t)
    batch = Batch([torch.tensor([[1, 2, 3]]), torch.arange(3)[None]], [0], [3], [0])
    with pytest.raises(RuntimeError, match="a kernel failed"):
        worker.step([batch])
    assert grad_modes == [False]
    assert t.sent[-1][0] == 1 and "the leader's step failed: RuntimeError: a kernel failed" in t.sent[-1][1]
    with pytest.raises(RuntimeError, match="an earlier step failed after the other ranks had its plan"):
        worker.step([batch])


@needs_transformers("5.24", "on 5.17 LongRoPE branches on the step's largest position, so the step does "
                            "not export as one graph")
def test_longrope_positions_are_bounded_where_the_packed_step_is_exact() -> None:
    """LongRoPE picks its factors by the step's largest position: a short sequence packed beside
    one past original_max_position_embeddings was rotated with the long factors (0.3 off). The
    program's positions stop there, and below it a packed step equals each sequence alone."""
    import transformers

    from tileflow.passes.disaggregate import local_attention

    torch.manual_seed(0)
    head_dim = 16
    cfg = transformers.Phi3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=16, pad_token_id=0,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
                         "short_factor": [1.0] * (head_dim // 2), "long_factor": [1.0 + i for i in range(head_dim // 2)]})
    model = transformers.Phi3ForCausalLM(cfg).eval()
    reference = transformers.Phi3ForCausalLM(cfg).eval()
    reference.load_state_dict(model.state_dict())
    program = build_stage_program(CausalLMStep(model), EXAMPLE, max_tokens=64)
    assert program.max_positions == 16 and "LongRoPE" in program.max_positions_reason
    lengths = [15, 3]

    def per_sequence(cut, q, k, v):  # causal attention within each packed sequence
        outs, at = [], 0
        for n in lengths:
            outs.append(local_attention(cut, *(x[:, :, at:at + n].contiguous() for x in (q, k, v))))
            at += n
        return torch.cat(outs, dim=2)[0].transpose(0, 1).contiguous().unsqueeze(0).transpose(1, 2)

    seqs = [torch.randint(1, 96, (n,)) for n in lengths]
    with torch.no_grad():
        (packed,) = program.run([torch.cat(seqs)[None], torch.cat([torch.arange(n) for n in lengths])[None]],
                                attention=per_sequence)
        for seq, rows in zip(seqs, packed[0].split(lengths)):
            torch.testing.assert_close(rows, reference(input_ids=seq[None]).logits[0], rtol=1e-5, atol=1e-5)


def test_model_worker_refuses_layers_with_different_kv_heads() -> None:
    # Before: accepted; each attention worker then refused its INIT, and the leader heard only that
    # the worker died.
    import tileflow
    from tileflow.distributed import ModelWorker

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(96, 64)

        def forward(self, ids, pos):
            x = self.embed(ids)
            q, k = x.view(1, -1, 4, 16).transpose(1, 2), x[..., :32].reshape(1, -1, 2, 16).transpose(1, 2)
            a = tileflow.ops.meta_attention(q, k, k, causal=True)
            return tileflow.ops.meta_attention(a + 1, a[:, :1] * 2, a[:, :1] * 2, causal=True) * 3

    program = build_stage_program(Step(), EXAMPLE, max_tokens=64)
    assert [c.num_kv_heads for c in program.cuts] == [2, 1]
    with pytest.raises(ValueError, match="layers differ in KV heads"):
        ModelWorker(program, Layout(2), _Recorder())


def test_attention_worker_cache_lives_where_the_payload_arrives() -> None:
    # Under NCCL the q/k/v arrive on cuda:N; the cache was made on the CPU regardless, so the
    # first write mixed devices. No GPU here: a "meta" payload stands in for the device.
    from types import SimpleNamespace

    from tileflow.distributed import AttentionWorker, BatchShape, LayerShard

    worker = AttentionWorker(Layout(2), SimpleNamespace(rank=1))
    worker.layers = [LayerShard(2, 1, 4, 0, 1, scale=0.5)]
    worker.block_size, worker.num_blocks = 4, 8
    try:
        worker._attend(0, BatchShape((5,), (3,), (0,)), torch.empty(3, 2 + 2, 4, device="meta"))
    except (NotImplementedError, RuntimeError):
        pass  # the attention itself cannot run on meta tensors; where the cache went is the point
    assert worker.cache is not None and worker.cache.device == torch.device("meta")
    assert worker.cache.k[0].device == torch.device("meta")


def test_latent_attention_with_narrower_values_is_cut() -> None:
    """DeepSeek-V3's latent attention (values narrower than queries and keys) is cut like any
    other: the value rows cross padded to the query head size (the meta-kernel takes one), and
    the logits are eager's (the stage program failed with a shape error before)."""
    import transformers

    args = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                first_k_dense_replace=1, n_group=1, topk_group=1)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**args)).eval()
    program = build_stage_program(CausalLMStep(model), EXAMPLE, max_tokens=64)
    assert len(program.cuts) == 2
    assert_program_matches_eager(program, model, (1, 5, 9))


# ----------------------------------------------------------------------------------------------
# Refusals and the attention stage's arguments, one attention over embedded tokens


class _Step(torch.nn.Module):
    """One attention over embedded tokens, 2 heads of 16, with `attend(x, pos)` choosing the call."""

    def __init__(self, attend) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(96, 32)
        self.attend = attend

    def forward(self, ids, pos):
        x = self.embed(ids).view(1, -1, 2, 16).transpose(1, 2)
        return self.attend(x, pos)


def _refused(attend, needle: str) -> None:
    """Building the step raises with `needle` (the pass's reason), and no cut is counted."""
    report = GraphReport(graph_id="g")
    with pytest.raises(ValueError, match=needle):
        build_stage_program(_Step(attend), EXAMPLE, max_tokens=64, report=report)
    assert "disaggregate" not in report.rewrites


def test_attention_sinks_known_only_at_run_time_are_not_cut() -> None:
    """Sinks computed from the inputs cannot ride on the cut as constants; cutting anyway
    dropped them (the attention stage ran without sinks)."""
    def attend(x, pos):
        p = pos.float()
        sinks = torch.stack([p.amax(), p.amin()])
        return tileflow.ops.meta_attention(x, x, x, causal=True, sinks=sinks)

    _refused(attend, "sinks known only at run time")


def test_alibi_attention_is_not_cut() -> None:
    """The attention stages do not apply ALiBi slopes: such a step stays colocated."""
    def attend(x, pos):
        return tileflow.ops.meta_attention(x, x, x, causal=True, alibi_slopes=[0.5, 0.25])

    _refused(attend, "ALiBi")


def test_non_causal_attention_is_not_cut() -> None:
    """A remote KV cache serves causal self-attention only."""
    def attend(x, pos):
        return tileflow.ops.meta_attention(x, x, x, causal=False)

    _refused(attend, "non-causal")


def test_attention_over_a_batch_of_two_rows_is_not_cut() -> None:
    """The step must pack its tokens into one row (batch dimension 1)."""
    def attend(x, pos):
        y = x.expand(2, -1, -1, -1)
        return tileflow.ops.meta_attention(y, y, y, causal=True)

    _refused(attend, "batch dimension 2 != 1")


def test_the_programs_outputs_are_listed_as_consumed_by_the_leader() -> None:
    """`consumers` marks each stage output the program returns with -1 (the leader collects
    it, `ModelWorker._needed_slots`); without it a non-leader replica never sends the logits."""
    def attend(x, pos):
        return tileflow.ops.meta_attention(x, x, x, causal=True)

    program = build_stage_program(_Step(attend), EXAMPLE, max_tokens=64)
    staged = [s for s in program.outputs if s.kind == "stage"]
    assert staged
    for src in staged:
        assert -1 in program.consumers[(src.index, src.slot)]


def test_the_attention_stage_applies_a_constant_softcap() -> None:
    """The program's attention stage applies the cut's soft-cap: its output equals the
    eager step's (the cap of 1.0 changes these scores a lot)."""
    def attend(x, pos):
        return tileflow.ops.meta_attention(4 * x, 4 * x, x, causal=True, softcap=1.0)

    torch.manual_seed(0)
    step = _Step(attend).eval()
    program = build_stage_program(step, EXAMPLE, max_tokens=64)
    assert [c.softcap for c in program.cuts] == [1.0]
    ids, pos = torch.randint(0, 96, (1, 6)), torch.arange(6)[None]
    with torch.no_grad():
        torch.testing.assert_close(program.run([ids, pos])[0], step(ids, pos))


def test_cross_attention_is_refused_with_its_reason() -> None:
    """Keys longer than the queries are named as cross-attention (without the guard, Lamina's
    traffic cross-check rolled the pass back with a bare AssertionError)."""
    def attend(x, pos):
        kv = torch.cat([x, x], dim=2)
        return tileflow.ops.meta_attention(x, kv, kv, causal=True)

    _refused(attend, "cross-attention")


def test_packed_sequences_key_starts_reach_the_attention_stage() -> None:
    """A step whose attention keeps packed sequences apart by key starts: the attention stage
    gets them (its default attention applied them to the row; dropped, the program let each
    sequence read the one before it: 0.41 off), and a custom attention is called with them."""
    def attend(x, pos):
        starts = (pos >= 3).long() * 3  # two sequences in the row: [0, 3) and [3, T)
        return tileflow.ops.meta_attention(x, x, x, causal=True, key_starts=starts)

    torch.manual_seed(0)
    step = _Step(attend).eval()
    program = build_stage_program(step, EXAMPLE, max_tokens=64)
    (attention,) = [s for s in program.stages if s.kind == "attention"]
    assert attention.key_starts is not None
    ids, pos = torch.randint(0, 96, (1, 6)), torch.arange(6)[None]
    seen = []

    def recording(cut, q, k, v, key_starts=None):
        seen.append(key_starts)
        return local_attention(cut, q, k, v, key_starts)

    with torch.no_grad():
        want = step(ids, pos)
        torch.testing.assert_close(program.run([ids, pos])[0], want)
        torch.testing.assert_close(program.run([ids, pos], attention=recording)[0], want)
    assert seen[0].tolist() == [[0, 0, 0, 3, 3, 3]]


class _AttentionRecorder(_FailureRecorder):
    """`_FailureRecorder` that answers each attention receive with zeros of the layer's shape."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.tokens = heads, head_dim, 0

    def recv(self, src: int, what: str, timeout_s: float | None = None) -> torch.Tensor:
        return torch.zeros(self.tokens, self.heads, self.head_dim)


def test_released_sequences_go_out_in_one_step_plan_only() -> None:
    """`release` frees a sequence's blocks in the next step's plan and no later one: a later
    sequence reusing the id would otherwise have its fresh blocks freed under it every step."""
    from tileflow.distributed import Batch, ModelWorker
    from tileflow.distributed.layout import OP_STEP, decode_plan

    program = build_stage_program(_AttentionLast(), EXAMPLE, max_tokens=16)
    t = _AttentionRecorder(2, 16)
    worker = ModelWorker(program, Layout(2), t)
    releases = []
    for step in range(3):
        if step == 1:
            worker.release([0, 4])
        t.tokens, t.sent = 3, []
        worker.step([Batch([torch.tensor([[1, 2, 3]]), torch.arange(3 * step, 3 * step + 3)[None]], [7], [3], [3 * step])])
        plans = [v for dst, v in t.sent if dst == 1 and v.dtype == torch.int64 and int(v[0]) == OP_STEP]
        assert len(plans) == 1
        releases.append(decode_plan(plans[0])[1])
    assert releases == [[], [0, 4], []]


class _LateAttentionRecorder(_AttentionRecorder):
    """`_AttentionRecorder` whose first receive times out, as one from a rank that is only late."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__(heads, head_dim)
        self.late = True

    def recv(self, src: int, what: str, timeout_s: float | None = None) -> torch.Tensor:
        if self.late:
            self.late = False
            raise PeerError(f"rank 0: waiting for {what} from rank {src} failed (limit 30s): timed out")
        return super().recv(src, what, timeout_s)


def test_a_step_whose_receive_timed_out_refuses_later_steps() -> None:
    """A peer's failure (here a receive that timed out) left the leader open to another step.
    An attention worker that was only late sent its reply anyway, and
    the next step read it as its own attention output: every later step got the previous one's
    (with a late worker on threads, a Llama's logits then differed from eager by 0.33, and no
    rank said a word)."""
    from tileflow.distributed import Batch, ModelWorker
    from tileflow.distributed.layout import OP_STEP

    program = build_stage_program(_AttentionLast(), EXAMPLE, max_tokens=16)
    t = _LateAttentionRecorder(1, 16)  # two attention workers, one KV head each
    worker = ModelWorker(program, Layout(3), t)
    t.tokens = 3
    batch = Batch([torch.tensor([[1, 2, 3]]), torch.arange(3)[None]], [0], [3], [0])
    with pytest.raises(PeerError, match="timed out"):
        worker.step([batch])
    sent = len(t.sent)
    with pytest.raises(RuntimeError, match="an earlier step failed after the other ranks had its plan"):
        worker.step([batch])
    assert len(t.sent) == sent
    plans = [v for dst, v in t.sent if isinstance(v, torch.Tensor) and v.dtype == torch.int64 and int(v[0]) == OP_STEP]
    assert len(plans) == 2  # the one step's, to each attention worker


def test_work_items_run_each_dense_stage_of_every_batch_before_the_next_stage() -> None:
    """Stage-major order (staggered pipelining): batch 1's dense stage k runs while batch 0's
    attention k is away, not after batch 0's later stages."""
    from tileflow.distributed.layout import work_items

    assert work_items(2, 3) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert work_items(1, 2) == [(0, 0), (1, 0)] and work_items(3, 0) == []


def test_attention_inputs_stay_on_the_replica_that_made_them() -> None:
    """Over two model replicas, the q/k/v a dense stage makes for its attention go from its own
    replica to the attention workers: only values a later dense stage (or the leader) reads
    travel to the other replica."""
    from tileflow.distributed import ModelWorker

    program = build_stage_program(CausalLMStep(_llama(4, 2)), EXAMPLE, max_tokens=16)
    worker = ModelWorker(program, Layout(3, 2), _Recorder())
    for k in range(len(program.cuts)):
        attention_only = {slot for (stage, slot), users in program.consumers.items()
                          if stage == 2 * k and set(users) == {2 * k + 1}}
        assert attention_only  # the q/k/v this stage makes for its attention alone
        for j in range(3):
            other = 1 - replica_of(j, k, 2)
            assert not attention_only & set(worker._needed_slots(j, k, other)), (j, k)


def test_embedding_rows_take_the_smallest_table_less_the_constant_shift() -> None:
    """Positions read at `p - 1` may reach one row further, at `2 + p` two rows less; ids read in
    two tables must fit the smaller one."""
    from tileflow.capture import capture_exported
    from tileflow.distributed.program import embedding_rows

    class Shifted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.wpe = torch.nn.Embedding(50, 8), torch.nn.Embedding(40, 8), torch.nn.Embedding(20, 8)

        def forward(self, ids: torch.Tensor, positions: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
            return self.a(ids) + self.b(ids) + self.wpe(positions - 1) + self.wpe(2 + later)

    example = (torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    gm = capture_exported(torch.export.export(Shifted(), example)).gm
    assert [embedding_rows(gm, i) for i in range(3)] == [40, 21, 18]


class _ShiftedIndex(_TableStep):
    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        return self.table[:t] * torch.arange(1, t + 1).float()[:, None]  # a number, but one past the index


def test_token_indices_that_do_not_start_at_zero_are_not_positions() -> None:
    """Only `arange(T)` is a token's index: `arange(1, T + 1)` is not replaced by the positions."""
    from tileflow.distributed.program import token_indices_as_positions

    assert token_indices_as_positions(_step_graph(_ShiftedIndex())) == (0, 0)


class _PositionTableStep(_AttentionLast):
    """`_AttentionLast` with a learned position table of 20 rows."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.wpe = torch.nn.Embedding(20, 32)
        self.position_limit = (limit, "a bound of the step")

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        import tileflow

        x = (self.embed(ids) + self.wpe(pos)).view(1, -1, 2, 16).transpose(1, 2)
        return tileflow.ops.meta_attention(x, x, x, causal=True)


def test_program_positions_stop_at_the_lower_of_the_step_bound_and_the_position_table() -> None:
    """A step bound below the position table's 20 rows is the program's; one above it is not."""
    assert build_stage_program(_PositionTableStep(8), EXAMPLE, max_tokens=8).max_positions == 8
    assert build_stage_program(_PositionTableStep(30), EXAMPLE, max_tokens=16).max_positions == 20


def test_paged_kv_cache_takes_a_window_of_one_key() -> None:
    """A window of 1 (each query sees only itself) is valid; 0 is not."""
    assert PagedKVCache(1, 1, 4, block_size=2, num_blocks=2, dtype=torch.float32, sliding_window=1).sliding_window == 1
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        PagedKVCache(1, 1, 4, block_size=2, num_blocks=2, dtype=torch.float32, sliding_window=0)


def test_model_worker_checks_positions_and_takes_a_batch_of_max_tokens() -> None:
    """Float positions, or positions of shape [1, T, 1], are refused before the plan goes out;
    a batch of exactly `max_tokens` tokens runs."""
    from tileflow.distributed import Batch, ModelWorker

    program = build_stage_program(_AttentionLast(), EXAMPLE, max_tokens=16)
    t = _AttentionRecorder(2, 16)
    worker = ModelWorker(program, Layout(2), t)
    ids = torch.tensor([[1, 2, 3]])
    for pos in (torch.arange(3.0)[None], torch.arange(3)[None, :, None]):
        with pytest.raises(ValueError, match=r"input 1 \(positions\) .* must be an integer tensor of shape \[1, 3\]"):
            worker.step([Batch([ids, pos], [0], [3], [0])])
    assert t.sent == []
    t.tokens = 16
    ((out,),) = worker.step([Batch([torch.ones(1, 16, dtype=torch.long), torch.arange(16)[None]], [0], [16], [0])])
    assert out.shape[-2] == 16  # [1, heads, tokens, head size]


def test_example_inputs_past_max_tokens_are_a_clear_error() -> None:
    """An example step longer than `max_tokens` (examples/serve.py --budget 3 with its 4-token
    example) failed deep in torch.export as "4 not in range [2, 3]"; name the example's size."""
    with pytest.raises(ValueError, match=r"example inputs hold 4 tokens.*max_tokens=3"):
        build_stage_program(CausalLMStep(_llama(4, 4)), EXAMPLE, max_tokens=3)


class _ReplicaTransport(_FailureRecorder):
    """A transport stand-in on model replica rank 1 that answers its receives from `answers` in
    order (an exception there is raised, as a failed receive would)."""

    rank = 1

    def __init__(self, answers: list) -> None:
        super().__init__()
        self.answers = answers

    def recv(self, src: int, what: str, timeout_s: float | None = None):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.mark.parametrize("failure", ["attention worker", "own stage"])
def test_a_model_replica_whose_step_fails_tells_the_leader_why(failure: str) -> None:
    """With two model replicas an attention worker's failure (a full KV cache) reached only the
    replica waiting for its output, and a replica's own failure reached no one: rank 0 reported
    only that rank 1 closed its connection (or waited out its timeout), without the reason."""
    from tileflow.distributed import BatchShape, ModelWorker, RunAborted
    from tileflow.distributed.layout import encode_plan

    program = build_stage_program(_AttentionLast(), EXAMPLE, max_tokens=16)
    plan = encode_plan([BatchShape((0,), (3,), (0,))], [], 2)
    reason = "rank 1: rank 2 reported a failure instead of attention output of layer 0 (batch 0): KV cache full"
    t = _ReplicaTransport([plan, torch.tensor([[1, 2, 3]]), torch.arange(3)[None], RunAborted(reason)])
    worker = ModelWorker(program, Layout(3, 2), t)  # replica 1 runs dense stage 1 of batch 0
    if failure == "own stage":
        def failing_stage(*args):
            raise RuntimeError("a kernel failed")

        program.stages[2].module = failing_stage
        t.answers[-1] = torch.zeros(3, 2, 16)  # the attention output arrives
        reason = "model replica rank 1: RuntimeError: a kernel failed"
    with pytest.raises((RunAborted, RuntimeError)):
        worker.serve()
    assert t.sent == [(0, f"failure: {reason}")]


def test_the_leader_sends_init_before_its_first_step_and_nothing_after_shutdown() -> None:
    """A first step without start() went out as the attention workers' INIT ("expected INIT from
    rank 0, got opcode 2"); a second start() as their next step plan ("unexpected opcode 1"); a
    step after shutdown() to ranks that had exited. Each time rank 0 heard only that a rank
    closed its connection."""
    from tileflow.distributed import Batch, ModelWorker
    from tileflow.distributed.layout import OP_INIT, OP_SHUTDOWN, OP_STEP

    program = build_stage_program(_AttentionLast(), EXAMPLE, max_tokens=16)
    t = _AttentionRecorder(2, 16)
    worker = ModelWorker(program, Layout(2), t)
    t.tokens = 3
    batch = Batch([torch.tensor([[1, 2, 3]]), torch.arange(3)[None]], [0], [3], [0])
    worker.step([batch])
    worker.start()
    ops = [int(v[0]) for dst, v in t.sent if dst == 1 and v.dtype == torch.int64 and v.dim() == 1]
    assert ops == [OP_INIT, OP_STEP]
    worker.shutdown()
    with pytest.raises(RuntimeError, match="the run was shut down"):
        worker.step([batch])
    worker.shutdown()
    ops = [int(v[0]) for dst, v in t.sent if dst == 1 and v.dtype == torch.int64 and v.dim() == 1]
    assert ops == [OP_INIT, OP_STEP, OP_SHUTDOWN]


def test_an_attention_worker_stops_cleanly_when_the_leader_shuts_down_before_starting() -> None:
    """A leader that stopped before its first step sent SHUTDOWN where the attention workers
    wait for INIT: they failed with "expected INIT from rank 0, got opcode 3"."""
    from tileflow.distributed import AttentionWorker
    from tileflow.distributed.layout import OP_SHUTDOWN

    t = _ReplicaTransport([torch.tensor([OP_SHUTDOWN])])
    AttentionWorker(Layout(2), t).serve()
    assert t.answers == []


def test_a_model_replica_does_not_echo_the_leaders_own_abort() -> None:
    """The leader's abort (`abort_run`) needs no answer: one would wait in its connection from
    this rank, read by the next receive of a run started there."""
    from tileflow.distributed import BatchShape, ModelWorker, RunAborted
    from tileflow.distributed.layout import encode_plan

    program = build_stage_program(_AttentionLast(), EXAMPLE, max_tokens=16)
    aborted = RunAborted("rank 1: rank 0 reported a failure instead of an output: the leader's step failed", 0)
    plan = encode_plan([BatchShape((0,), (3,), (0,))], [], 2)
    t = _ReplicaTransport([plan, torch.tensor([[1, 2, 3]]), torch.arange(3)[None], aborted])
    with pytest.raises(RunAborted):
        ModelWorker(program, Layout(3, 2), t).serve()
    assert t.sent == []


class _MeanOverTokens(_AttentionLast):
    """A step whose dense stage after the attention subtracts the mean over the tokens: rows a
    replay pads in would change every real row."""

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        import tileflow

        x = self.embed(ids).view(1, -1, 2, 16).transpose(1, 2)
        a = tileflow.ops.meta_attention(x, x, x, causal=True)
        return a - a.mean(dim=2, keepdim=True)


@pytest.mark.parametrize("strict", [False, True])
def test_a_stage_that_cannot_be_replayed_padded_is_noted_or_refused_under_strict(
        monkeypatch: pytest.MonkeyPatch, strict: bool) -> None:
    """`cuda_graphs` asked for and not applied to a dense stage (a replay at a token bucket
    could change its real rows) is a note in the report, and with `strict=True` an error, as it
    is for a compiled graph (strict only noted it for stage programs)."""
    import tileflow
    import tileflow.runtime.streams
    from graph_doubles import ReplayOnCpu
    from tileflow.pipeline import TileflowError
    from tileflow.report import GraphReport

    monkeypatch.setattr(tileflow.runtime.streams, "GRAPH_FACTORY", ReplayOnCpu)
    torch.manual_seed(0)
    config = tileflow.Config(cuda_graphs=True, strict=strict)
    report = GraphReport("stage program")
    if strict:
        with pytest.raises(TileflowError, match=r"cuda_graphs not applied to dense stage 1 \(strict=True\): "
                                                r"not captured: a replay at a token bucket could differ"):
            build_stage_program(_MeanOverTokens(), EXAMPLE, max_tokens=16, config=config, report=report)
        return
    program = build_stage_program(_MeanOverTokens(), EXAMPLE, max_tokens=16, config=config, report=report)
    assert "a replay at a token bucket could differ" in report.extra["cuda_graphs_stage_1"]
    assert type(program.dense[1].module).__name__ != "GraphedStage"
