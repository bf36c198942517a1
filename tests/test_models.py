"""Real transformers architectures through `torch.compile(backend="tileflow")`, against eager."""

from __future__ import annotations

import pytest
import torch

import tileflow
from tileflow import runtime
from models import MODELS, SEQ_LENS, VOCAB, build


# Every model on the reference target; Llama and GPT-2 on Triton's kernels too (Mixtral in the
# extended run; its experts' grouped kernels run on Triton in the default one: test_grouped_gemm).
# Llama on the reference kernels in the extended run: the default one makes these checks of its
# graph on Triton's kernels, and test_backend's test_python_floats_are_baked_in_and_symbolic_floats_still_compile
# runs it on the reference kernels against eager, on one graph.
CASES = [pytest.param(name, "reference", marks=[pytest.mark.extended] if name == "llama" else [])
         for name in sorted(MODELS)] + [("llama", "triton"), ("gpt2", "triton"),
                                        pytest.param("mixtral", "triton", marks=pytest.mark.extended)]


@pytest.mark.parametrize("name, target", CASES)
def test_model_matches_eager_with_one_graph(name: str, target: str) -> None:
    model = build(name)
    report = tileflow.Report()
    backend = tileflow.TileflowBackend({"target": target, "max_tokens": 4096}, report=report)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    built_at_compile = None
    with torch.no_grad():
        # Three of the lengths on Triton's kernels (each call runs them in the interpreter), the
        # shortest and longest among them; all five on the reference ones.
        for seq_len in SEQ_LENS[::2] if target == "triton" else SEQ_LENS:
            ids = torch.randint(0, VOCAB, (2, seq_len))
            got = compiled(ids, use_cache=False).logits
            want = model(ids, use_cache=False).logits
            assert got.shape == want.shape == (2, seq_len, VOCAB)
            assert (got - want).abs().max().item() <= 1e-4, f"{name} at seq_len={seq_len}"
            if built_at_compile is None:
                built_at_compile = len(runtime.compiled_kernels())
    # Every kernel was built when the graph was compiled: new token counts built nothing.
    assert len(runtime.compiled_kernels()) == built_at_compile
    # One compile serves every length: the token dimension stayed symbolic.
    assert len(report.graphs) == 1 and report.recompiles == 0
    graph = report.graphs[0]
    assert any(hi is None or hi >= max(SEQ_LENS) for _, hi in graph.symbols.values())
    rewrites = report.rewrites
    # Every linear (GPT-2's Conv1D included) is a padded_gemm, or shares one: an up projection its gate's SwiGLU kernel, a
    # K or V projection its Q's.
    merged = rewrites.get("fused_swiglu", 0) + rewrites.get("fused_siblings", 0)
    assert rewrites["canonical_linear"] == rewrites["padded_gemm"] + merged > 0
    if name in ("llama", "qwen2", "mistral"):
        assert rewrites["fused_swiglu"] == 2
    # Q, K and V: one GEMM per layer (GPT-2's attention projection is one Conv1D already).
    assert rewrites.get("fused_siblings", 0) == (0 if name == "gpt2" else 4)
    # GPT-2's MLP activation (`gelu_new`, the tanh GELU written out) is its c_fc GEMM's epilogue.
    if name == "gpt2":
        assert rewrites["canonical_gelu_tanh"] == rewrites["fused_gelu_tanh"] == 2
    # Every attention (2 layers) runs on the meta-attention kernel.
    assert rewrites["meta_attention"] == 2
    # MoE experts (2 layers x gate/up and down) run as grouped GEMMs, the gate/up ones with the
    # SwiGLU fused: nothing falls back.
    assert not report.fallbacks, report.fallbacks
    if name == "mixtral":
        assert rewrites["grouped_gemm"] == 4 and rewrites["fused_grouped_swiglu"] == 2
        assert {p["op"] for p in graph.plans} == {"padded_gemm", "grouped_gemm"}
    else:
        assert "grouped_gemm" not in rewrites
    # Kernels: at most 6 per distinct (op, N, K, dtype, epilogue), all reported.
    groups: dict[tuple, set] = {}
    for kernel in graph.kernels:
        spec = kernel.spec
        assert kernel.target == target
        if spec["op"] not in ("padded_gemm", "grouped_gemm"):
            continue
        params = dict(spec["params"])
        key = (spec["op"], params["n"], params["k"], spec["dtype"], tuple(spec["epilogue"]))
        groups.setdefault(key, set()).add(kernel.name)
    assert groups and all(1 <= len(names) <= 6 for names in groups.values())
    assert any(op == "grouped_gemm" for op, *_ in groups) == (name == "mixtral")
    # The meta-attention kernels are built ahead too (decode- and prefill-sized tiles).
    assert any(k.spec["op"] == "meta_attention" for k in graph.kernels)
    assert len(graph.plans) == len({(p["op"], p["n"], p["k"], p.get("gated")) for p in graph.plans})


def test_graph_break_each_frame_goes_through_tileflow() -> None:
    model = build("llama")

    def step(ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids, use_cache=False).logits
        torch._dynamo.graph_break()  # a second frame after the break
        return torch.log_softmax(logits @ model.lm_head.weight, dim=-1)

    report = tileflow.Report()
    compiled = torch.compile(step, backend=tileflow.TileflowBackend(report=report), dynamic=True)
    with torch.no_grad():
        for seq_len in (3, 6, 11):
            ids = torch.randint(0, VOCAB, (1, seq_len))
            torch.testing.assert_close(compiled(ids), step(ids), rtol=1e-5, atol=1e-5)
    assert len(report.graphs) >= 2
    assert all(g.passes and g.passes[0].name == "canonicalize" for g in report.graphs)


def test_residual_inductor_on_a_model() -> None:
    """The CUDA default: the graph left after tileflow's passes goes through Inductor, with
    tileflow's ops opaque to it."""
    model = build("llama")
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"residual": "inductor"}, report=report), dynamic=True)
    with torch.no_grad():
        for seq_len in (3, 9, 17):
            ids = torch.randint(0, VOCAB, (2, seq_len))
            got = compiled(ids, use_cache=False).logits
            assert (got - model(ids, use_cache=False).logits).abs().max().item() <= 1e-4
    [graph] = report.graphs
    assert graph.residual == "inductor"
    assert report.rewrites["padded_gemm"] == 9 and report.rewrites["meta_attention"] == 2


def test_residual_inductor_keeps_eager_output_strides() -> None:
    """A KV cache's first update is `cat([empty, keys])`: eager returns a contiguous copy, and
    Inductor's decompositions (which drop the empty input) must not hand back the keys' transposed
    layout instead, else the next step's stride guards recompile it."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 32)

    def step(x: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        keys = lin(x).view(x.shape[0], x.shape[1], 2, 16).transpose(1, 2)
        return torch.cat([torch.empty(x.shape[0], 2, 0, 16), keys * cos], dim=-2)

    x, cos = torch.randn(2, 6, 32), torch.randn(2, 1, 6, 16)
    compiled = torch.compile(step, backend=tileflow.TileflowBackend({"residual": "inductor"}), dynamic=True)
    with torch.no_grad():
        got, want = compiled(x, cos), step(x, cos)
    torch.testing.assert_close(got, want)
    assert got.stride() == want.stride()


# Gemma-2's generation with its sliding layers, in the default run: test_serving's
# test_sliding_window_softcap_and_sink_models_equal_eager_generation.
@pytest.mark.parametrize("name", ["llama", "gpt2", pytest.param("gemma2", marks=pytest.mark.extended)])
def test_generate_through_a_compiled_forward(name: str) -> None:
    """The usual way to compile a transformers model: its `forward`, then `generate` with its
    DynamicCache (a prefill graph, then decode steps against a growing cache). Greedy tokens
    equal eager generation's, and tileflow compiles no more graphs than Dynamo traces (Gemma-2's
    sliding window adds one when the cache outgrows it: the model's own branch)."""
    from models import ZOO

    model = build(name) if name in MODELS else ZOO[name][0]().eval()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    traced: list[int] = []

    def count_graphs(gm: torch.fx.GraphModule, example_inputs) -> object:
        traced.append(1)
        return gm.forward

    report = tileflow.Report()
    forward = model.forward
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        for backend in (count_graphs, tileflow.TileflowBackend(report=report)):
            torch._dynamo.reset()
            model.forward = torch.compile(forward, backend=backend, dynamic=True)
            got = model.generate(ids, **kwargs)
            model.forward = forward
            assert torch.equal(got, want)
    assert len(report.graphs) == len(traced) <= 3
    assert report.rewrites["meta_attention"] == 2 * len(report.graphs) and not report.fallbacks
