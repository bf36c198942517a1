"""The compiled paths on a real CUDA GPU: models through the Triton kernels, bf16, and the
nano-batch runtime on real CUDA streams and CUDA graphs.

Everything here needs a GPU (the CPU suite covers the same paths with the interpreter and the
simulated streams); without one the module is skipped as a whole.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import tileflow
import tileflow.runtime.nanobatch as nanobatch_runtime
from tileflow.runtime.streams import CudaStreams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SEQ_LENS, VOCAB, ZOO, build  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NANO_PASSES = ("canonicalize", "attention", "gemm_padding", "nanobatch")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


def _attention_variants() -> dict[str, int]:
    """Compiled variants (Triton's per-specialization cache entries) of every meta-attention
    kernel built for the GPU in this process, by kernel name."""
    return {k.spec.name: sum(len(caches[0]) for caches in k.launch.kernel.device_caches.values())
            for k in tileflow.runtime.compiled_kernels("meta_attention")
            if k.target == "triton" and not k.meta.get("interpreted", True)}


def _spied_executors(monkeypatch: pytest.MonkeyPatch) -> list:
    """The executors nano-batch runners pick from now on, in order (one per split step)."""
    executors: list = []
    original = nanobatch_runtime.NanoBatchRunner._executor_for

    def spy(self, device):
        executors.append(original(self, device))
        return executors[-1]

    monkeypatch.setattr(nanobatch_runtime.NanoBatchRunner, "_executor_for", spy)
    return executors


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "mixtral", "gpt2"])
def test_models_on_the_gpu_match_eager(name: str) -> None:
    """fp32 models through the compiled Triton kernels (IEEE fp32 dots) match eager on the GPU
    over five sequence lengths, with one compiled graph."""
    model = build(name).cuda()
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"max_tokens": 4096}, report=report), dynamic=True)
    before = _attention_variants()
    for tokens in SEQ_LENS:
        ids = torch.randint(0, VOCAB, (2, tokens), device="cuda")
        with torch.no_grad():
            want = model(ids, use_cache=False).logits
            got = compiled(ids, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(report.graphs) == 1 and report.recompiles == 0
    kernels = tileflow.runtime.compiled_kernels("padded_gemm")
    assert any(k.target == "triton" and not k.meta.get("interpreted", True) for k in kernels)
    # Nor does Triton compile an attention kernel per sequence length (the dense op's page is the
    # whole sequence; the kernel's page size is a compile-time constant only for paged caches).
    after = _attention_variants()
    grown = {name: n - before.get(name, 0) for name, n in after.items()}
    assert after and all(n < len(SEQ_LENS) for n in grown.values()), f"compiled variants over {SEQ_LENS}: {grown}"


@pytest.mark.parametrize("name", ["llama", "gemma2", "phi3"])
def test_bf16_models_on_the_gpu_are_close_to_fp32(name: str) -> None:
    """bf16 weights and activations through the Triton kernels (Gemma-2's GeGLU and Phi-3's
    stacked SwiGLU as gated kernels): against the fp32 model, within twice the error of eager
    bf16 itself (or 1e-2), so the bound tracks bf16 rounding."""
    def make() -> torch.nn.Module:
        if name in ZOO:
            torch.manual_seed(0)
            return ZOO[name][0]().eval()
        return build(name)

    model = make().cuda()
    model_bf16 = make().cuda().to(torch.bfloat16)
    compiled = torch.compile(model_bf16, backend="tileflow", dynamic=True)
    for tokens in (7, 33, 100):
        ids = torch.randint(0, VOCAB, (1, tokens), device="cuda")
        with torch.no_grad():
            want = model(ids, use_cache=False).logits
            eager_err = _rel_err(model_bf16(ids, use_cache=False).logits, want)
            ours_err = _rel_err(compiled(ids, use_cache=False).logits, want)
        assert ours_err < max(2 * eager_err, 1e-2), (tokens, ours_err, eager_err)


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("k", [2, 3])
def test_nano_batches_on_cuda_streams_match_eager(monkeypatch: pytest.MonkeyPatch, k: int, cuda_graphs: bool) -> None:
    """The nano-batched graph on real CUDA streams (and replayed from CUDA graphs) equals eager,
    step after step, for token counts in and across graph buckets."""
    model = build("llama").cuda()
    backend = tileflow.TileflowBackend({"passes": NANO_PASSES, "nano_batches": k, "cuda_graphs": cuda_graphs})
    compiled = torch.compile(model, backend=backend, dynamic=True)
    executors = _spied_executors(monkeypatch)
    for tokens in (9, 16, 40, 9, 64):
        ids = torch.randint(0, VOCAB, (1, tokens), device="cuda")
        with torch.no_grad():
            want = model(ids, use_cache=False).logits
            for _ in range(2):  # a replay must not disturb the previous step's output
                got = compiled(ids, use_cache=False).logits
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert executors and all(isinstance(ex, CudaStreams) for ex in executors)


def test_mixture_of_experts_routed_per_nano_batch_on_cuda_streams_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixtral nano-batched on real CUDA streams, its experts' routing run per nano-batch
    (`tileflow.routing`: each nano-batch's own sort, int32 counts on the GPU and grouped GEMMs),
    equals eager step after step."""
    report = tileflow.Report()
    model = build("mixtral").cuda()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": NANO_PASSES, "nano_batches": 3},
                                                                     report=report), dynamic=True)
    executors = _spied_executors(monkeypatch)
    for tokens in (9, 16, 40):
        ids = torch.randint(0, VOCAB, (1, tokens), device="cuda")
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                       rtol=1e-4, atol=1e-4)
    assert executors and all(isinstance(ex, CudaStreams) for ex in executors)
    assert any(g["extra"].get("nano_batch", {}).get("routed_experts") for g in report.to_dict()["graphs"])


@pytest.mark.parametrize("setting", [2, "auto"])
def test_decode_steps_split_over_sequences_on_cuda_streams_match_eager(monkeypatch: pytest.MonkeyPatch,
                                                                       setting: int | str) -> None:
    """Decode steps over a cache (`[B, 1]` ids) split over their sequences on real CUDA streams
    equal eager, step after step, with k = 2 and with "auto" (the device's own figures; the
    search's answer stood in for: two halves of the sequence bucket at shares 0.75 / 0.25, so
    that the streams run with their SM shares)."""
    from test_nanobatch import _decoded

    from tileflow import search as search_module
    from tileflow.search import SplitPlan

    def halves(costs: list, device: object, bucket: int, **options: object) -> SplitPlan:
        return SplitPlan(2, (bucket // 2, bucket - bucket // 2), {"compute": 0, "memory": 1, "network": 2},
                         {0: 0.75, 1: 0.25, 2: 0.0}, 1.0, 2.0)

    monkeypatch.setattr(search_module, "search_split", halves)
    monkeypatch.setattr(search_module, "split_wins", lambda *args, **options: True)
    model = build("llama").cuda()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"passes": NANO_PASSES, "nano_batches": setting}),
                             dynamic=True)
    executors = _spied_executors(monkeypatch)
    for batch in (3, 5):
        ids = torch.randint(0, VOCAB, (batch, 7), device="cuda")
        for got, want in zip(_decoded(model, compiled, ids, steps=4), _decoded(model, model, ids, steps=4)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The prefill and three decode steps of each batch ran split, each on the streams.
    assert len(executors) == 8 and all(isinstance(ex, CudaStreams) for ex in executors)


@pytest.fixture
def nccl_group():
    """A one-rank NCCL process group (its all-reduces are copies, through NCCL on the streams)."""
    import torch.distributed as dist

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_all_reduces_split_on_the_network_stream_match_eager(monkeypatch: pytest.MonkeyPatch, nccl_group,
                                                              cuda_graphs: bool) -> None:
    """A Llama whose row-parallel projections end in an all-reduce (a forward hook, as tensor
    parallelism has it; one rank, so the sum is the output), nano-batched: each nano-batch's
    all-reduce runs through NCCL on the network stream, waited for on the compute stream, with
    and without CUDA graphs, and the logits equal eager's with the same all-reduces."""
    import torch.distributed._functional_collectives as funcol

    model = build("llama").cuda()
    for layer in model.model.layers:
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            proj.register_forward_hook(lambda module, args, out: funcol.all_reduce(out, "sum", nccl_group))
    backend = tileflow.TileflowBackend({"passes": NANO_PASSES, "nano_batches": 2, "cuda_graphs": cuda_graphs})
    compiled = torch.compile(model, backend=backend, dynamic=True)
    runners: list = []
    original = nanobatch_runtime.NanoBatchRunner._executor_for

    def spy(self, device):
        runners.append(self)
        return original(self, device)

    monkeypatch.setattr(nanobatch_runtime.NanoBatchRunner, "_executor_for", spy)
    for tokens in (9, 16, 40, 9):
        ids = torch.randint(0, VOCAB, (1, tokens), device="cuda")
        with torch.no_grad():
            want = model(ids, use_cache=False).logits
            for _ in range(2):
                torch.testing.assert_close(compiled(ids, use_cache=False).logits, want, rtol=1e-4, atol=1e-4)
    runner = runners[-1]
    reduces = [op for op in runner.last_schedule.ops.values() if op.op == "all_reduce"]
    assert len(reduces) == 4 * 2 and {op.resource for op in reduces} == {"network"}
    if cuda_graphs:  # captured with NCCL's work inside, at the buckets of 9, 16 and 40 tokens
        assert runner._graphs.captures > 0 and not runner._graphs._failed


def _serving_llama():
    """A small Llama on the GPU, its eager SDPA twin for `generate`, the stop tokens generate uses
    (its EOS) and an example step input for `build_stage_program`."""
    import copy

    model = build("llama").cuda()
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "sdpa"
    eos = [reference.generation_config.eos_token_id]  # requests stop after it, as generate does
    example = (torch.zeros(1, 4, dtype=torch.long, device="cuda"), torch.arange(4, device="cuda")[None])
    return model, reference, eos, example


def _assert_eager_tokens(reference, requests, what=()) -> None:
    """Every request's generated tokens are `generate`'s greedy tokens for its prompt (a sampled
    request's: the eager model's draws under its seed)."""
    from tileflow.serving import generate_reference

    for r in requests:
        if not r.sampling.greedy:
            want = generate_reference(reference, r.prompt, r.max_new_tokens, r.sampling, r.stop_tokens)
            assert r.tokens[len(r.prompt):] == want, (*what, r.id)
            continue
        ids = torch.tensor([r.prompt], device="cuda")
        with torch.no_grad():
            want = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_new_tokens,
                                      do_sample=False, pad_token_id=0)
        assert r.tokens[len(r.prompt):] == want[0, len(r.prompt):].tolist(), (*what, r.id)


def test_serving_engine_on_the_gpu_generates_eager_tokens() -> None:
    """The serving engine with its program, KV cache and step inputs on the GPU (dense stages
    through Inductor and the Triton GEMMs, meta-attention over the paged cache, fp32): greedy
    tokens equal eager transformers generation, with and without speculative verify, with
    steps split into nano-batches on CUDA streams, and with the dense stages replayed from CUDA
    graphs per token bucket."""
    import copy

    from tileflow.distributed import CausalLMStep, build_stage_program
    from tileflow.serving import Request, ServingEngine

    model, reference, eos, example = _serving_llama()
    program = build_stage_program(CausalLMStep(model), example, max_tokens=256)
    graphed = build_stage_program(CausalLMStep(copy.deepcopy(model)), example, max_tokens=256,
                                  config=tileflow.Config(cuda_graphs=True))
    assert graphed.cuda_graphs
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    for draft, nano, stages in ((0, 1, program), (2, 1, program), (0, 2, program), (2, 3, program),
                                (0, 1, graphed), (2, 1, graphed)):
        engine = ServingEngine(stages, token_budget=24, decode_slots=3, max_draft=draft, block_size=8, num_blocks=64,
                               device="cuda", nano_batches=nano)
        requests = [Request(i, p, 8, stop_tokens=eos) for i, p in enumerate(prompts)]
        engine.run(requests)
        _assert_eager_tokens(reference, requests, (draft, nano, stages.cuda_graphs))
        assert all(a.all_free() for a in engine.allocators)
    assert all(stage.module.graphs.captures > 0 and not stage.module.graphs._failed for stage in graphed.dense)


def test_auto_nano_batches_on_the_search_streams_generate_eager_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """`nano_batches="auto"` on CUDA: each split step runs its dense stages on one stream and
    its attention on another, each stage after an event on its nano-batch's previous one, at
    the search's SM shares (the search's answer stood in for: halves of every step of 8 tokens
    or more), and the tokens equal eager generation's."""
    import tileflow.serving.nano_batches as nano_batches
    from tileflow import search
    from tileflow.distributed import CausalLMStep, build_stage_program
    from tileflow.serving import Request, ServingEngine

    def halves(costs, device, count: int, snap=None, **options):
        sizes = snap([count // 2, count - count // 2]) if count >= 8 else [count]
        return search.CountSplit(sizes, {0: 0.75, 1: 0.25}, 0.75) if len(sizes) > 1 else None

    monkeypatch.setattr(nano_batches, "split_for_count", halves)
    model, reference, eos, example = _serving_llama()
    program = build_stage_program(CausalLMStep(model), example, max_tokens=256)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 40, 11)]
    engine = ServingEngine(program, token_budget=48, decode_slots=4, block_size=8, num_blocks=64, device="cuda",
                           nano_batches="auto")
    used: set[int] = set()
    launch = engine.streams.launch
    engine.streams.launch = lambda stream, fn: used.add(stream) or launch(stream, fn)
    requests = [Request(i, p, 8, stop_tokens=eos) for i, p in enumerate(prompts)]
    engine.run(requests)
    _assert_eager_tokens(reference, requests, ("auto",))
    assert engine.metrics.nano_batched_steps > 0
    assert used == {0, 1}  # the search's compute and memory streams only


def test_to_device_copies_without_waiting_for_the_device() -> None:
    """Host arrays of several dtypes reach the GPU unchanged, each view 16-byte aligned, with no
    synchronization (the copy is queued behind a long kernel instead of waiting for it)."""
    import numpy as np

    from tileflow.transfers import to_device

    arrays = [np.arange(5, dtype=np.int32), np.arange(7, dtype=np.int64) * 3, np.arange(6, dtype=np.int32).reshape(2, 3),
              np.array([True, False, True])]
    busy = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    busy @ busy  # keeps the stream busy while the copies are queued
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = to_device("cuda", *arrays)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for t, a in zip(got, arrays):
        assert t.is_cuda and t.is_contiguous() and t.data_ptr() % 16 == 0
        assert t.cpu().numpy().tolist() == a.tolist()


def test_overlapped_serving_steps_never_wait_for_the_device() -> None:
    """Once its kernels are built, an overlapped serving step (schedule, batch layout, task
    tables, the model's launches, a sampled request's draws; also split into nano-batches on
    streams) never synchronizes with the GPU; only reading the previous step's tokens back waits,
    and the tokens equal eager generation's (the sampled request's: eager draws, same seed)."""
    from tileflow.distributed import CausalLMStep, build_stage_program
    from tileflow.serving import Request, SamplingParams, ServingEngine

    model, reference, eos, example = _serving_llama()
    program = build_stage_program(CausalLMStep(model), example, max_tokens=256)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    import tileflow.runtime.attention

    # The middle request samples and returns logprobs: its draws and its logprobs are made on the
    # device and read back with the tokens, without waiting either.
    sampled = SamplingParams(0.9, top_k=20, top_p=0.9, seed=5, logprobs=2)

    def make_requests() -> list[Request]:
        return [Request(i, p, 8, stop_tokens=eos, sampling=sampled if i == 1 else SamplingParams())
                for i, p in enumerate(prompts)]

    for nano in (1, 2):  # also with nano-batches on CUDA streams, each over its SM share
        ServingEngine(program, token_budget=48, decode_slots=3, block_size=8, num_blocks=64, device="cuda",
                      nano_batches=nano).run(make_requests())
        tileflow.runtime.attention._launch_plan.cache_clear()  # every step builds and uploads its task tables again
        engine = ServingEngine(program, token_budget=48, decode_slots=3, block_size=8, num_blocks=64, device="cuda",
                               nano_batches=nano)
        assert engine.overlap
        read_back = engine.synchronize

        def synchronize(read_back=read_back) -> None:  # the one place a step may wait
            torch.cuda.set_sync_debug_mode("default")
            try:
                read_back()
            finally:
                torch.cuda.set_sync_debug_mode("error")

        engine.synchronize = synchronize
        requests = make_requests()
        torch.cuda.set_sync_debug_mode("error")
        try:
            engine.run(requests)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _assert_eager_tokens(reference, requests, (nano,))
        scored = requests[1]
        assert len(scored.logprobs) == len(scored.top_logprobs) == scored.generated
        assert all(lp <= 0 for lp in scored.logprobs) and all(len(top) == 2 for top in scored.top_logprobs)


def test_nano_batches_with_equal_shapes_share_task_tables_safely() -> None:
    """Two nano-batches of one serving step with the same shapes (equal prompt lengths, split
    evenly) share the attention's cached task tables, uploaded on one stream and read on the
    other: the reading stream waits for the upload, and the tokens equal eager generation."""
    from tileflow.distributed import CausalLMStep, build_stage_program
    from tileflow.serving import Request, ServingEngine

    model, reference, eos, example = _serving_llama()
    program = build_stage_program(CausalLMStep(model), example, max_tokens=256)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (24,), generator=gen).tolist() for _ in range(4)]
    engine = ServingEngine(program, token_budget=128, decode_slots=4, block_size=8, num_blocks=64, device="cuda",
                           nano_batches=2)
    requests = [Request(i, p, 8, stop_tokens=eos) for i, p in enumerate(prompts)]
    engine.run(requests)
    _assert_eager_tokens(reference, requests)


def test_a_cached_upload_is_waited_for_on_another_stream() -> None:
    """An upload queued on a busy stream and read on another stream: after `wait_for_upload`
    the reading stream sees the copied values, not the buffer's earlier contents."""
    import numpy as np

    from tileflow.transfers import record_upload, to_device, wait_for_upload

    values = np.arange(1 << 16, dtype=np.int32)
    busy, reader = torch.cuda.Stream(), torch.cuda.Stream()
    x = torch.randn(8192, 8192, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(busy):
        for _ in range(4):
            x = x @ x.T / 8192  # keeps `busy` occupied while the copy waits behind it
        (uploaded,) = to_device("cuda", values)
        ready = record_upload("cuda")
    with torch.cuda.stream(reader):
        wait_for_upload(ready, uploaded)
        seen = uploaded.clone()
    torch.cuda.synchronize()
    assert seen.cpu().numpy().tolist() == values.tolist()


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9,
                    reason="TMA needs a Hopper GPU or newer")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tma_gemm_over_segments_makes_its_descriptors_on_the_device(cuda_graph: bool) -> None:
    """The TMA kernel over N segments (Q, K and V) makes each program's weight descriptor on the
    device, in a global scratch buffer from the allocator tileflow gives Triton: bf16 equals
    float64, launched directly and replayed from a CUDA graph."""
    from tileflow.lower import gemm_spec
    from tileflow.kernel_spec import TileConfig
    from tileflow.runtime import get_kernel

    widths = (256, 128, 128)
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(300, 512, generator=gen, device="cuda").bfloat16()
    weights = [(torch.randn(w, 512, generator=gen, device="cuda") / 16).bfloat16() for w in widths]
    biases = [torch.randn(w, generator=gen, device="cuda").bfloat16() for w in widths]
    spec = gemm_spec(dtype=torch.bfloat16, out_dtype=torch.bfloat16, n=sum(widths), k=512,
                     tile=TileConfig(128, 128, 64, num_warps=4, num_stages=3), tma=True, has_bias=True, segments=widths)
    kernel = get_kernel("triton", spec)
    out = torch.full((300, sum(widths)), float("nan"), device="cuda", dtype=torch.bfloat16)

    def launch() -> None:
        kernel(x, weights[0], biases[0], out=out, more_weights=tuple(weights[1:]), more_biases=tuple(biases[1:]))

    launch()  # compiles (outside any capture)
    out.fill_(float("nan"))
    if cuda_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch()
        out.fill_(float("nan"))
        graph.replay()
    else:
        launch()
    torch.cuda.synchronize()
    want = torch.nn.functional.linear(x.double(), torch.cat(weights).double(), torch.cat(biases).double())
    assert _rel_err(out, want) < 1e-2
