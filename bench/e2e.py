"""End-to-end step throughput: eager vs Inductor vs tileflow, without and with nano-batching.

On a GPU: a Llama-3-8B-shaped model (hidden 4096, 32 query / 8 KV heads, FFN 14336, vocabulary
128256) with random bf16 weights and `--layers` layers (default 4, so it fits beside the
baselines), in one run and in up to three parts (`--parts`):

- `prefill`: one forward step of T tokens (T in 256..4096, no KV cache) for eager PyTorch,
  `torch.compile` Inductor (dynamic shapes), tileflow (`backend="tileflow"`, Triton kernels)
  without nano-batching, and tileflow with nano-batching (`nano_batches="auto"`: the split
  search and CUDA streams), each without and with CUDA graphs (`cuda_graphs=True`);
- `mixed`: serving steps of T tokens over a paged KV cache, half prefill chunks (up to 512
  tokens over cached prefixes) and half decodes (contexts of 512-2048), run the way
  `tileflow.serving` runs them (the model cut at its attention ops, `meta_attention_varlen` over
  the cache) with the dense stages as ATen ops, through Inductor, or as tileflow compiled them,
  tileflow also with the step cut into two nano-batches on two streams (their kernels over SM
  shares in proportion to their tokens, and over the whole device), cut where the split
  search's cost model says a split wins (`nano_batches="auto"`), and with its dense stages
  replayed from CUDA graphs per token bucket (`cuda_graphs=True`);
- `trace`: a NanoFlow-like request trace (prompt/output 512/512 and 1024/512) served to the end
  by `tileflow.serving.ServingEngine` (continuous batching, a 4096-token budget, each step
  launched before the previous step's tokens are read back), with the same methods and
  tileflow+graphs with the steps run one at a time: tokens processed per second (prompt +
  generated), generated tokens per second, mean TTFT and time between tokens.

The serving parts give every method the same attention (tileflow's meta-attention over the paged
cache: `bench/attention.py` compares it with SDPA and FlexAttention), so they compare the dense
work between attentions and the host work around it.

Each method is checked before it is timed (prefill: logits against eager; mixed steps: against
the ATen program on the same step and cache; relative error of bf16 logits); step times are
medians over CUDA events, the trace is wall clock. Tokens/s is compared with the
optimal-throughput bound NanoFlow uses, measured peak FLOP/s / (2 x parameters) tokens/s
(attention FLOPs ignored, as there; parameters that multiply, so not the input embedding), and
the table is written under bench/results/ with the device, date, versions and command.

On a CPU-only machine it says so and runs every part at a tiny scale as a smoke check (fp32, a
tiny Llama; the nano-batched path on simulated streams): each method must match eager or the ATen
program to 1e-5, and the traces' greedy tokens must not depend on the program.

    python bench/e2e.py [--layers N] [--tokens 256,1024,4096] [--parts prefill,mixed,trace]
                        [--trace-requests 256] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOKENS = [256, 512, 1024, 2048, 4096]
PARTS = ("prefill", "mixed", "trace")
PASSES_NANO = ("canonicalize", "attention", "gemm_padding", "nanobatch")
# Serving programs: the model cut at its attention ops; dense stages as ATen ops run eagerly,
# the same through Inductor, or with tileflow's passes (padded GEMMs; Inductor for the rest on
# CUDA, as `backend="tileflow"` does).
SERVING_PROGRAMS = {
    "ATen": {"passes": ("canonicalize", "attention"), "residual": "eager"},
    "Inductor": {"passes": ("canonicalize", "attention"), "residual": "inductor"},
    "tileflow": {},
    "tileflow+graphs": {"cuda_graphs": True},
}
# Serving methods: (program, nano-batches per step). tileflow+nano splits each step into two
# nano-batches on their own streams (decodes apart from prompt chunks); tileflow+graphs replays
# its dense stages from CUDA graphs (vLLM's piecewise capture: attention runs between them).
SERVING_METHODS = {"ATen": ("ATen", 1), "Inductor": ("Inductor", 1), "tileflow": ("tileflow", 1),
                   "tileflow+nano": ("tileflow", 2), "tileflow+graphs": ("tileflow+graphs", 1)}
# The mixed steps also run the nano-batches with every kernel over the whole device (no SM
# shares): what partitioning the SMs gains. The traces also serve with the engine's steps one at
# a time (each step's tokens read back before the next is scheduled): what overlapping the
# host's work with the device's gains.
WHOLE_GRIDS = "tileflow+nano, whole grids"
# And cut where the split search's cost model says a split wins (`ServingEngine(nano_batches="auto")`).
AUTO = "tileflow+auto"
MIXED_METHODS = {**SERVING_METHODS, WHOLE_GRIDS: ("tileflow", 2), AUTO: ("tileflow", "auto")}
IN_TURN = "tileflow+graphs, steps in turn"
TRACE_METHODS = {**SERVING_METHODS, IN_TURN: ("tileflow+graphs", 1)}
BLOCK = 16  # KV page size
DEBUG_DIR = Path(__file__).resolve().parent / "results" / "debug-e2e-prefill-graphs"


@dataclass(frozen=True)
class Scale:
    """Everything that differs between the GPU run and the CPU smoke check."""

    device: str
    vocab: int
    nano_batches: int | str  # the nano-batched method's split ("auto" needs CUDA)
    tolerance: float  # relative error allowed against the reference (bf16 on the GPU)
    chunk: int  # mixed steps: prompt chunk size ...
    prefixes: tuple[int, ...]  # ... over cached prefixes of these lengths ...
    contexts: tuple[int, int]  # ... and decodes with contexts in this range
    traces: tuple[tuple[int, int], ...]  # (prompt, output) tokens per request
    budget: int  # tokens per serving step


GPU = Scale("cuda", 128256, "auto", 3e-2, 512, (0, 512, 1024, 2048), (512, 2048), ((512, 512), (1024, 512)), 4096)
# One trace in the smoke check (a second, 12/5, took a fifth of its time): prompts of 20 that span
# a 16-token page, chunked over cached prefixes at the 32-token budget, and decodes.
SMOKE = Scale("cpu", 256, 2, 1e-5, 8, (0, 5, 16), (3, 40), ((20, 4),), 32)


def _llama(layers: int, *, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int, device: str = "cpu"):
    """A Llama with random weights, built and initialized on `device`: on the CPU, initializing
    the 8B-shaped model's 1.5 B float32 parameters takes tens of seconds of a GPU session."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=8192,
    )
    with torch.device(device):
        return LlamaForCausalLM(config).eval()


def step_ms(fn, scale: Scale) -> float:
    """Median time of `fn()` in ms: CUDA events on the GPU, a few wall-clock runs on the CPU."""
    if scale.device == "cuda":
        from common import median_ms

        return median_ms(lambda _: fn(), rep_ms=300)
    from common import wall_median_ms

    return wall_median_ms(fn, 3)


def serving_programs(model, max_tokens: int, names=tuple(SERVING_PROGRAMS)) -> dict:
    """The named serving programs (`StageProgram`s) of `model` (which is switched to the
    packed-token causal attention serving needs)."""
    import torch

    import tileflow
    from tileflow.distributed import CausalLMStep, build_stage_programs

    device = next(model.parameters()).device
    step = CausalLMStep(model)
    example = (torch.zeros(1, 4, dtype=torch.long, device=device), torch.arange(4, device=device)[None])
    configs = {name: tileflow.Config(**SERVING_PROGRAMS[name]) for name in names}
    return build_stage_programs(step, example, configs, max_tokens=max_tokens)


def mixed_entries(tokens: int, rng, scale: Scale):
    """A serving step of `tokens` tokens: half prompt chunks (at most `scale.chunk` tokens, each
    over a cached prefix drawn from `scale.prefixes`), half decodes (contexts drawn from
    `scale.contexts`), each sequence on its own blocks (ids from 0). Returns (entries, blocks used)."""
    from tileflow.serving import Entry, Request

    spans = []  # (start, new tokens, kind)
    left = tokens // 2
    while left > 0:
        n = min(scale.chunk, left)
        spans.append((rng.choice(scale.prefixes), n, "prefill"))
        left -= n
    spans += [(rng.randint(*scale.contexts) - 1, 1, "decode") for _ in range(tokens - tokens // 2)]
    entries, next_block = [], 0
    for i, (start, n, kind) in enumerate(spans):
        request = Request(i, [0] * (start + n), 1)
        need = -(-(start + n) // BLOCK)
        request.blocks = list(range(next_block, next_block + need))
        next_block += need
        entries.append(Entry(request, [rng.randrange(scale.vocab) for _ in range(n)], start, kind))
    return entries, next_block


def serving_engine(program, scale: Scale, *, num_blocks: int, slots: int, budget: int | None = None, nano: int = 1,
                   overlap: bool | None = None):
    """A `ServingEngine` over `program` whose KV cache holds random values (a cached prefix's
    rows are then as expensive to attend to as real ones)."""
    import torch

    from tileflow.serving import ServingEngine

    dtype = torch.bfloat16 if scale.device == "cuda" else torch.float32
    engine = ServingEngine(program, token_budget=budget or scale.budget, decode_slots=slots, block_size=BLOCK,
                           num_blocks=num_blocks, dtype=dtype, device=scale.device, nano_batches=nano,
                           overlap=overlap)
    gen = torch.Generator(device=scale.device).manual_seed(0)
    for kv in engine.kvs:  # every KV group's cache (a model mixing full and sliding layers has two)
        for cache in kv.k + kv.v:
            cache.normal_(generator=gen)
    return engine


def warmup_entries(tokens: int, context: int, vocab: int):
    """A warm-up step of `tokens` tokens: `tokens // 2` decodes at `context` (sharing the blocks
    before their last, so thousands fit a small cache) beside one prompt chunk of the rest (from
    position 0), or one decode for a 1-token step. Returns (entries, blocks used)."""
    from tileflow.serving import Entry, Request

    decodes = max(tokens // 2, 1)
    shared = list(range((context - 1) // BLOCK))  # every decode's blocks but its last
    entries, next_block = [], len(shared)
    for i in range(decodes):
        request = Request(i, [0] * context, 1)
        request.blocks, next_block = shared + [next_block], next_block + 1
        entries.append(Entry(request, [i % vocab], context - 1, "decode"))
    chunk = tokens - decodes
    if chunk:
        request = Request(decodes, [0] * chunk, 1)
        need = -(-chunk // BLOCK)
        request.blocks, next_block = list(range(next_block, next_block + need)), next_block + need
        entries.append(Entry(request, [t % vocab for t in range(chunk)], 0, "prefill"))
    return entries, next_block


def warm_up(program, scale: Scale, nano: int = 1) -> int:
    """Run `program` once at each step size whose kernels or CUDA graphs no smaller step uses
    (`tileflow.distributed.warmup_token_counts`, up to the step budget): each GEMM kernel's
    Triton compile and each graph bucket's capture, before a timed run. The steps mix decodes
    (alternately at a context whose page count is a multiple of 16 and at one whose count is not:
    Triton specializes the attention kernel on the block table's row stride) with a prompt chunk,
    so both attention tile heights run, split over the KV or not. With `nano` > 1 instead: one
    mixed step through the nano-batched path (its kernels are the program's, compiled by the
    warm-up without). Returns the steps run."""
    import random

    import torch

    from tileflow.distributed import warmup_token_counts

    if nano > 1:
        steps = [mixed_entries(min(scale.budget, 2 * scale.chunk), random.Random(1), scale)]
    else:
        long = -(-scale.contexts[0] // (16 * BLOCK)) * 16 * BLOCK  # a multiple of 16 pages
        counts = warmup_token_counts(program, scale.budget)
        if counts[-1] < 64 <= scale.budget or counts[-1] < scale.budget < 64:
            # A step of 64 tokens holds a 32-token prompt chunk, which runs the prefill-sized
            # attention tile beside the decodes' decode-sized one (a program whose GEMMs and
            # graphs need no step of 34 tokens or more would otherwise never run it).
            counts.append(min(64, scale.budget))
        steps = [warmup_entries(t, long if i % 2 == 0 else long - BLOCK - 1, scale.vocab) for i, t in enumerate(counts)]
    engine = serving_engine(program, scale, num_blocks=max(b for _, b in steps), slots=1, nano=nano)
    with torch.no_grad():
        for entries, _ in steps:
            engine.forward(entries)
    return len(steps)


def trace_requests(count: int, prompt: int, output: int, vocab: int, seed: int = 0):
    """`count` requests with random `prompt`-token prompts, each asking for `output` tokens."""
    import random

    from tileflow.serving import Request

    rng = random.Random(seed)
    return [Request(i, [rng.randrange(vocab) for _ in range(prompt)], output) for i in range(count)]


def _timed(failures: list[str], what: str, fn):
    """`fn()`, or None with the failure recorded (the run goes on; the exit status becomes 1).
    Prints how long it took, compiles included: what a GPU session's stage limits must allow."""
    start = time.perf_counter()
    try:
        out = fn()
        print(f"  {what}: {time.perf_counter() - start:.1f} s", flush=True)
        return out
    except Exception as exc:  # noqa: BLE001 -- reported, and the exit status is 1
        failures.append(f"{what}: {type(exc).__name__}: {exc}")
        print(f"FAIL: {failures[-1]} (after {time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
        traceback.print_exc()
        return None


def prefill_part(model, tokens: list[int], bound: float, scale: Scale, failures: list[str], progress=None) -> str:
    """Prefill-shaped forward steps of T tokens (no KV cache) through every method."""
    import torch

    import tileflow
    from common import allow_recompiles, markdown_table, poison_next_output, rel_err

    # Each method below recompiles the model's forward (up to 7 of Dynamo's 8 by default): one
    # more (a new guard at some token count) would run a method eagerly under its name.
    allow_recompiles()
    nano = tileflow.TileflowBackend({"passes": PASSES_NANO, "nano_batches": scale.nano_batches})
    methods = {
        "eager": model,
        "Inductor": torch.compile(model, dynamic=True),
        "tileflow": torch.compile(model, backend="tileflow", dynamic=True),
        "tileflow+nano": torch.compile(model, backend=nano, dynamic=True),
    }
    graph_report = tileflow.Report()  # whether each graph was captured, and if not, why
    if scale.device == "cuda":
        # Steps replayed as one CUDA graph per token bucket, whole or nano-batched (whose nano-ops
        # run op by op): launch overhead is what graphs remove.
        # Its graphs go to DEBUG_DIR (packed with the results by gpu_session.sh, not committed):
        # why a step is captured only at exact token counts on the GPU, where the same model is
        # captured at buckets on the CPU, is read from them.
        graphs = tileflow.TileflowBackend({"cuda_graphs": True, "debug_dir": str(DEBUG_DIR)}, report=graph_report)
        methods["tileflow+graphs"] = torch.compile(model, backend=graphs, dynamic=True)
        # Inductor's own CUDA graphs (one recording per token count), the baseline for the above.
        methods["Inductor+graphs"] = torch.compile(model, dynamic=True, mode="reduce-overhead")
        graphs = tileflow.TileflowBackend({"passes": PASSES_NANO, "nano_batches": scale.nano_batches, "cuda_graphs": True},
                                          report=graph_report)
        methods["tileflow+nano+graphs"] = torch.compile(model, backend=graphs, dynamic=True)
    rows = []
    headers = (["tokens"] + [f"{n} tok/s" for n in methods] + ["tileflow / Inductor"]
               + (["tileflow+graphs / Inductor+graphs"] if "Inductor+graphs" in methods else [])
               + ["best nano / tileflow", "best nano % of bound"])

    def section() -> str:
        notes = sorted({g.extra.get("cuda_graphs", "no note") for g in graph_report.graphs})
        captured = f"\n- tileflow's CUDA graphs: {'; '.join(notes)}" if notes else ""
        return ("## Prefill-shaped steps\n\n" + markdown_table(headers, rows)
                + "\n\n- forward passes of T tokens with no KV cache; medians over CUDA events" + captured)

    for t in tokens:
        ids = torch.randint(0, scale.vocab, (1, t), device=scale.device)
        rate: dict[str, float | None] = {}
        with torch.no_grad():
            want = model(ids, use_cache=False).logits
            out_dtype, want = want.dtype, want.float()
            for name, fn in methods.items():
                def measure(fn=fn):
                    # The previous method's logits (the right values) were just freed: NaN there.
                    poison_next_output(want.shape, out_dtype, ids.device)
                    err = rel_err(fn(ids, use_cache=False).logits.float(), want)
                    if not err < scale.tolerance:
                        raise AssertionError(f"relative error {err:.2e} against eager")
                    return t / step_ms(lambda: fn(ids, use_cache=False), scale) * 1e3

                rate[name] = _timed(failures, f"prefill {name} at T={t}", measure)
        nano_best = max((rate[n] for n in methods if n.startswith("tileflow+nano") and rate[n]), default=None)
        graphed = [_ratio(rate["tileflow+graphs"], rate["Inductor+graphs"])] if "Inductor+graphs" in methods else []
        rows.append([t] + [_rate(rate[n]) for n in methods]
                    + [_ratio(rate["tileflow"], rate["Inductor"])] + graphed
                    + [_ratio(nano_best, rate["tileflow"]), _share(nano_best, bound)])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
        if progress:
            progress(section())
    return section()


def mixed_part(programs: dict, tokens: list[int], bound: float, scale: Scale, failures: list[str], progress=None) -> str:
    """Serving steps of T tokens, half prompt chunks over cached prefixes and half decodes."""
    import random

    import torch

    from common import markdown_table, poison_next_output, rel_err

    rng = random.Random(0)
    steps = {t: mixed_entries(t, rng, scale) for t in tokens}
    engine = serving_engine(programs["ATen"], scale, num_blocks=max(b for _, b in steps.values()), slots=1)
    rows = []
    auto_cut: dict[int, str] = {}
    headers = ["tokens", "step", "host prepare ms"] + [f"{n} tok/s" for n in MIXED_METHODS] + [
        "tileflow / Inductor", "nano / tileflow", "nano SM shares / whole grids", "auto / tileflow", "auto's cut",
        "graphs / tileflow", "tileflow % of bound"]

    def section() -> str:
        return ("## Mixed prefill/decode serving steps\n\n" + markdown_table(headers, rows)
                + "\n\n- one step through `ServingEngine.forward` (packed tokens, k/v written into a paged cache of "
                  f"{BLOCK}-token pages holding random values, `meta_attention_varlen` for every method); prompt chunks "
                  f"of up to {scale.chunk} tokens over cached prefixes of {min(scale.prefixes)}-{max(scale.prefixes)} "
                  f"tokens, decode contexts {scale.contexts[0]}-{scale.contexts[1]}; medians over CUDA events of the step "
                  "with its inputs prepared (host prepare ms: `ServingEngine.prepare`, once), except tileflow+nano, whose "
                  "two nano-batches (decodes, prompt chunks) each prepare their inputs on their own stream in the step, "
                  "their persistent kernels over a share of the SMs in proportion to their tokens (whole grids: every "
                  "kernel over the whole device); tileflow+auto cuts the step where the split search's cost model says a "
                  "split wins (auto's cut: the nano-batches' tokens; one count: run whole, timed as tileflow is)")

    for t, (entries, _) in steps.items():
        rate: dict[str, float | None] = {}
        start = time.perf_counter()
        inputs = engine.prepare(entries)
        if scale.device == "cuda":
            torch.cuda.synchronize()
        prepare_ms = 1e3 * (time.perf_counter() - start)
        with torch.no_grad():
            engine.program, engine.nano_batches = programs["ATen"], 1
            want = engine.forward(entries, inputs)
            out_dtype, want = want.dtype, want.float()
            for name, (program, nano) in MIXED_METHODS.items():
                def measure(program=programs[program], nano=nano, shares=name != WHOLE_GRIDS):
                    engine.program, engine.nano_batches, engine.nano_shares = program, nano, shares
                    # A nano-batched step prepares each nano-batch itself (on its stream); one "auto" runs
                    # whole is timed as the whole methods are, its inputs prepared.
                    groups = engine.nano_groups(entries) if nano == "auto" else None
                    given = inputs if nano == 1 or (groups is not None and len(groups) == 1) else None
                    if groups is not None:  # (the token counts of the nano-batches the step runs as)
                        auto_cut[t] = "+".join(str(sum(len(e.tokens) for e in g)) for g in groups)
                    poison_next_output(want.shape, out_dtype, want.device)
                    err = rel_err(engine.forward(entries, given).float(), want)
                    if not err < scale.tolerance:
                        raise AssertionError(f"relative error {err:.2e} against the ATen program")
                    return t / step_ms(lambda: engine.forward(entries, given), scale) * 1e3

                rate[name] = _timed(failures, f"mixed {name} at T={t}", measure)
        decodes = sum(e.kind == "decode" for e in entries)
        rows.append([t, f"{len(entries) - decodes} chunks + {decodes} decodes", f"{prepare_ms:.1f}"]
                    + [_rate(rate[n]) for n in MIXED_METHODS]
                    + [_ratio(rate["tileflow"], rate["Inductor"]), _ratio(rate["tileflow+nano"], rate["tileflow"]),
                       _ratio(rate["tileflow+nano"], rate[WHOLE_GRIDS]), _ratio(rate[AUTO], rate["tileflow"]),
                       auto_cut.get(t, "-"),
                       _ratio(rate["tileflow+graphs"], rate["tileflow"]), _share(rate["tileflow"], bound)])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
        if progress:
            progress(section())
    return section()


def trace_part(programs: dict, count: int, bound: float, scale: Scale, failures: list[str], progress=None) -> str:
    """Request traces served to the end by the serving engine, per program; every program must
    generate the ATen program's tokens on the CPU (fp32), and is only reported on the GPU (bf16
    greedy decoding can flip a near-tie)."""
    import torch

    from common import markdown_table

    rows = []
    headers = ["trace (requests x prompt/output)", "method", "steps", "processed tok/s", "generated tok/s",
               "processed % of bound", "mean TTFT ms", "mean time between tokens ms",
               "host waiting for the device", "requests equal to ATen's"]

    def section() -> str:
        return ("## Request traces\n\n" + markdown_table(headers, rows)
                + f"\n\n- `ServingEngine.run`: all requests arrive at once, {count} decode slots, {scale.budget}-token "
                  "steps; wall clock, host scheduling included; processed = prompt + generated tokens; host waiting "
                  "for the device: the share of the wall time spent reading steps' tokens back (near 100%: the device "
                  "is the bottleneck; near 0: the host); every method "
                  f"overlaps each step's host work with the previous step on the device, except \"{IN_TURN}\"")

    warmed: set[tuple[str, int]] = set()  # (program, nano-batches) warmed up
    for prompt, output in scale.traces:
        blocks = count * -(-(prompt + output) // BLOCK) + 64
        generated = {}
        for name, (program_name, nano) in TRACE_METHODS.items():
            def serve(program=programs[program_name], name=name, nano=nano, program_name=program_name):
                overlap = name != IN_TURN
                # Untimed steps at every size whose kernels or graphs no smaller step uses (sizes 1
                # are specialized; each GEMM plan piece is compiled and each graph bucket captured
                # at first use), once per program and nano-batching: not inside the timed trace.
                for key in [k for k in dict.fromkeys([(program_name, 1), (program_name, nano)]) if k not in warmed]:
                    warmed.add(key)
                    warm_up(program, scale, key[1])
                engine = serving_engine(program, scale, num_blocks=blocks, slots=count, nano=nano, overlap=overlap)
                requests = trace_requests(count, prompt, output, scale.vocab)
                with torch.no_grad():
                    metrics = engine.run(requests)
                generated[name] = [r.tokens for r in requests]
                if scale.device == "cpu" and generated[name] != generated["ATen"]:
                    raise AssertionError("the trace's greedy tokens differ from the ATen program's")
                return metrics

            metrics = _timed(failures, f"trace {prompt}/{output} {name}", serve)
            if metrics is None:
                rows.append([f"{count} x {prompt}/{output}", name] + ["FAIL"] * 8)
            else:
                m, processed = metrics.summary(), metrics.tokens_in_steps / metrics.wall
                same = sum(g == a for g, a in zip(generated[name], generated.get("ATen", [])))
                rows.append([f"{count} x {prompt}/{output}", name, m["steps"], _rate(processed), _rate(m["tokens_per_s"]),
                             _share(processed, bound), f"{1e3 * m['mean_ttft_s']:.0f}", f"{1e3 * m['mean_tbt_s']:.1f}",
                             f"{100 * m['host_waiting_share']:.0f}%", f"{same}/{count}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
            if progress:
                progress(section())
    return section()


def run(scale: Scale, model, tokens: list[int], parts: list[str], trace_count: int, peak_tflops: float,
        failures: list[str], checkpoint=None) -> str:
    """The named parts for `model` at `scale`; returns the results' markdown. `checkpoint(text)`
    gets the markdown so far after every row (the GPU run rewrites its results file with it, so
    a stage cut by its time limit keeps the rows it measured)."""
    import torch

    params = sum(p.numel() for p in model.parameters())
    # Only weights that multiply do FLOPs: the input embedding is a lookup (with a 128k vocabulary
    # it is a third of the 8B-shaped model's parameters here).
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    bound = peak_tflops * 1e12 / (2 * matmul_params)  # tokens/s at the compute ceiling
    sections = [
        f"- model: {model.config.num_hidden_layers} layers, {params / 1e9:.3f} B parameters, random weights",
        f"- optimal throughput bound: measured {peak_tflops:.0f} TFLOP/s / (2 x {matmul_params / 1e9:.3f} B matmul "
        f"parameters) = {bound:,.0f} tokens/s (the input embedding is a lookup: no FLOPs)",
    ]
    print("\n".join(sections), flush=True)

    def progress(section: str) -> None:
        if checkpoint:
            checkpoint("\n\n".join(sections + [section] + [f"- FAILED: {failure}" for failure in failures]))

    if "prefill" in parts:
        sections.append(prefill_part(model, tokens, bound, scale, failures, progress))
    if "mixed" in parts or "trace" in parts:
        # Serving switches the model to packed-token attention: after the prefill part.
        start = time.perf_counter()
        programs = serving_programs(model, max_tokens=max(scale.budget, *tokens))
        # On a fresh GPU machine the build (exports, passes, Triton and Inductor compiles) is most
        # of the stage's time: a stage cut before its first row still says how far it got.
        print(f"- serving programs built in {time.perf_counter() - start:.0f} s: {', '.join(programs)}", flush=True)
        if "mixed" in parts:
            sections.append(mixed_part(programs, tokens, bound, scale, failures, progress))
        if "trace" in parts:
            sections.append(trace_part(programs, trace_count, bound, scale, failures, progress))
    return "\n\n".join(sections + [f"- FAILED: {failure}" for failure in failures])


def smoke(parts: list[str]) -> int:
    """CPU: every part at a tiny scale, each method checked to 1e-5."""
    import torch

    import tileflow.runtime.nanobatch as nanobatch_runtime
    from tileflow.runtime.streams import SimulatedStreams

    print("bench/e2e.py: no CUDA GPU here; timings need one. Running the CPU smoke check.")
    torch.manual_seed(0)
    model = _llama(1, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=SMOKE.vocab)
    # On the CPU the nano-batched path runs its streams simulated (random valid interleavings).
    nanobatch_runtime.NanoBatchRunner._executor_for = lambda self, device: SimulatedStreams(seed=1)
    failures: list[str] = []
    updates: list[str] = []  # what the GPU run writes to its results file after every row
    text = run(SMOKE, model, [16, 40], parts, 6, peak_tflops=1.0, failures=failures, checkpoint=updates.append)
    titles = {"prefill": "## Prefill-shaped steps", "mixed": "## Mixed prefill/decode serving steps",
              "trace": "## Request traces"}
    if not updates or any(titles[p] not in updates[-1] or titles[p] not in text for p in parts):
        failures.append("the partial results written after each row miss a part's table")
        print(f"FAIL: {failures[-1]}", file=sys.stderr)
    print("smoke check failed" if failures else "smoke check passed")
    return 1 if failures else 0


def gpu_model(layers: int):
    """The Llama-3-8B-shaped bf16 model with `layers` layers, on the GPU."""
    import torch

    return _llama(layers, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=GPU.vocab, device="cuda").to(torch.bfloat16)


def run_gpu(layers: int, tokens: list[int], parts: list[str], trace_count: int, write: bool) -> int:
    import torch

    from common import environment, measured_matmul_tflops, results_name, sized_name, write_results

    torch.manual_seed(0)
    env = environment()
    peak = measured_matmul_tflops(torch.bfloat16)
    model = gpu_model(layers)
    print(f"{env['device']}: Llama-3-8B-shaped, bf16 ceiling {peak:.0f} TFLOP/s")
    failures: list[str] = []
    body = "- model: Llama-3-8B-shaped (hidden 4096, 32/8 heads, FFN 14336, vocabulary 128256), bf16\n"
    title = "End-to-end step throughput (bf16)"
    # e2e-prefill and e2e-serving run in one session on one commit: each needs its own file.
    name = sized_name(results_name("e2e", parts, PARTS), tokens, TOKENS)

    def checkpoint(text: str) -> None:
        if write:
            write_results(name, title, env, body + text, partial=True)

    body += run(GPU, model, tokens, parts, trace_count, peak, failures, checkpoint)
    if write:
        print(f"wrote {write_results(name, title, env, body)}")
    return 1 if failures else 0


def _ratio(a: float | None, b: float | None) -> str:
    """`a / b` as a table cell; FAIL when either method failed."""
    return "FAIL" if not (a and b) else f"{a / b:.2f}"


def _rate(rate: float | None) -> str:
    """A tokens/s cell; FAIL when the method failed."""
    return "FAIL" if rate is None else f"{rate:,.0f}"


def _share(rate: float | None, bound: float) -> str:
    """`rate` as a percentage of the bound; FAIL when the method failed."""
    return "FAIL" if rate is None else f"{100 * rate / bound:.0f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 8B-shaped model")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated step sizes")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    parser.add_argument("--trace-requests", type=int, default=256, help="requests per trace (all decode at once)")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS) or args.trace_requests < 1:
        parser.error(f"--parts takes names from {PARTS} (got {args.parts!r}); --trace-requests must be >= 1")
    import torch

    if not torch.cuda.is_available():
        return smoke(parts)
    return run_gpu(args.layers, [int(t) for t in args.tokens.split(",")], parts, args.trace_requests, not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
