"""How tileflow's compile time grows with model depth, measured on the CPU (no GPU needed).

Builds small-config transformers models with random weights (hidden 64, 4 heads, vocab 128; no
download) at each `--layers` depth, compiles each with `torch.compile(backend=TileflowBackend(
{"target": "reference"}), dynamic=True)` and runs one call (`--batch`, 8 tokens, `use_cache=False`).
The first call's time splits into:

- dynamo: Dynamo's tracing (the first call, less the backend call and the step itself);
- aot: AOTAutograd's lowering to ATen (the backend call, less tileflow's `compile_graph`);
- one column per pass (the pipeline's own timing of it, `report.graphs[...].passes`), then
  `lower` (kernel specs), `residual` (the executor of what is left) and `other` (the rest of
  `compile_graph`: snapshots around each pass, reports), and how much of tileflow's time was
  the garbage collector's pauses (`gc`: a full collection over a deep model's heap takes
  seconds and lands in whichever pass runs; the columns above include it);
- padding: `check_padding` on the compiled graph (what `cuda_graphs=True` runs per graph on a
  GPU; on the CPU the config captures nothing, so it is timed here directly). At batch 1 (the
  default, as a serving step packs its tokens in one row) it walks the whole graph; at batch 2
  it refuses at the first flattened [B*T, ...] view, so its time says little.

The first model is compiled once at 1 layer before the measured rows (imports, first-call
set-up). `--path export` times `tileflow.export.export_model` (torch.export, then `compile_graph`);
`--path stages` times `tileflow.distributed.build_stage_program` (torch.export and its
decompositions, the passes plus `disaggregate`, then `split_stages`). The last column is the growth from the row above, scaled
to a 4x step in depth, of tileflow's own time (less the GC pauses) and of torch's (a linear
pass gives ~4x; >= 8x is quadratic somewhere). Nothing is written unless `--write`.

    python bench/compile_time.py [--models llama,gpt2] [--layers 2,8] [--path dynamo|export|stages]
                                 [--options JSON] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, markdown_table, write_results  # noqa: E402

import tileflow  # noqa: E402
import tileflow.backend  # noqa: E402
import tileflow.compiler  # noqa: E402
import tileflow.export  # noqa: E402
from tileflow.padding_safety import check_padding  # noqa: E402

VOCAB, HIDDEN, HEADS = 128, 64, 4
SEQ = 8


def build(name: str, layers: int) -> torch.nn.Module:
    """Model `name` with `layers` decoder layers, seeded random weights, eval mode."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=layers,
                  num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=256)
    if name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif name == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif name == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common, head_dim=16, sliding_window=8))
    elif name.startswith("mixtral"):
        experts = int(name[len("mixtral"):] or 8)
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, num_local_experts=experts, num_experts_per_tok=2))
    elif name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=256, n_embd=HIDDEN, n_layer=layers, n_head=HEADS, bos_token_id=0,
            eos_token_id=0))
    else:
        raise SystemExit(f"unknown model {name!r}: llama, qwen2, gemma2, mixtral<experts>, gpt2")
    return model.eval()


class _Timers:
    """Wall time spent inside wrapped functions, summed by label, and the garbage collector's
    pauses inside the "tileflow" ones (`gc_ms`): a full collection over a deep model's heap
    (AOTAutograd's fake tensors and sympy expressions) takes seconds, and lands in whichever
    pass is running."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self.graphs: list[Any] = []
        self.gc_ms = 0.0
        self._inside = 0
        self._gc_start = 0.0

    def wrap(self, label: str, fn: Callable[..., Any], keep_graph: bool = False) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._inside += label == "tileflow"
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside -= label == "tileflow"
                self.ms[label] = self.ms.get(label, 0.0) + (time.perf_counter() - start) * 1e3
                if keep_graph:
                    self.graphs.append(args[0])
        return timed

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """A `gc.callbacks` entry."""
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._inside:
            self.gc_ms += (time.perf_counter() - self._gc_start) * 1e3


# What the dynamo and export paths time: compile_graph (as both front ends call it), lowering and
# the residual build. (module, attribute, label, keep the graph argument)
_COMPILE_PARTS = [(tileflow.backend, "compile_graph", "tileflow", True),
                  (tileflow.export, "compile_graph", "tileflow", True),
                  (tileflow.compiler, "lower_graph", "lower", False),
                  (tileflow.compiler, "build_residual", "residual", False)]


@contextlib.contextmanager
def _patched(timers: _Timers, parts: list[tuple[Any, str, str, bool]] = _COMPILE_PARTS) -> Iterator[None]:
    """Time each `parts` function under its label while the block runs (and the GC's pauses)."""
    originals = [getattr(mod, attr) for mod, attr, _, _ in parts]
    for (mod, attr, label, keep_graph), fn in zip(parts, originals):
        setattr(mod, attr, timers.wrap(label, fn, keep_graph=keep_graph))
    gc.callbacks.append(timers.on_gc)
    try:
        yield
    finally:
        gc.callbacks.remove(timers.on_gc)
        for (mod, attr, _, _), fn in zip(parts, originals):
            setattr(mod, attr, fn)


def _padding_ms(graphs: list[Any]) -> float:
    """`check_padding` over each compiled graph with a single token symbol (as cuda_graphs runs it)."""
    from tileflow.passes.nanobatch import token_symbol

    total = 0.0
    for gm in graphs:
        found = token_symbol(gm)
        if found is None:
            continue
        start = time.perf_counter()
        check_padding(gm, found[0])
        total += (time.perf_counter() - start) * 1e3
    return total


def measure_dynamo(name: str, layers: int, options: dict[str, Any], batch: int) -> dict[str, float]:
    """One first call of the torch.compile'd model, split by phase (ms)."""
    torch._dynamo.reset()
    model = build(name, layers)
    report = tileflow.Report()
    backend = tileflow.TileflowBackend({"target": "reference", **options}, report=report)
    timers = _Timers()
    backend_call = timers.wrap("backend", backend.__call__)
    compiled = torch.compile(model, backend=backend_call, dynamic=True)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(1))
    with _patched(timers), torch.no_grad():
        start = time.perf_counter()
        compiled(ids, use_cache=False)
        total = (time.perf_counter() - start) * 1e3
        step_start = time.perf_counter()
        compiled(ids, use_cache=False)  # a second call: the step itself, to leave out of Dynamo's share
        step = (time.perf_counter() - step_start) * 1e3
    row = _split(report, timers)
    row["dynamo"] = total - timers.ms.get("backend", 0.0) - step
    row["aot"] = timers.ms.get("backend", 0.0) - timers.ms.get("tileflow", 0.0)
    row["graphs"] = len(report.graphs)
    row["padding"] = _padding_ms(timers.graphs)
    return row


def measure_export(name: str, layers: int, options: dict[str, Any], batch: int) -> dict[str, float]:
    """`export_model` of the model's logits, sequence dynamic in [2, 64], split by phase (ms)."""
    from tileflow.cli import LogitsOnly

    model = build(name, layers)
    timers = _Timers()
    example = torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(1))
    with _patched(timers):
        start = time.perf_counter()
        archive = tileflow.export.export_model(LogitsOnly(model), (example,),
                                               ({1: torch.export.Dim("seq", min=2, max=64)},),
                                               options={"target": "reference", **options})
        total = (time.perf_counter() - start) * 1e3
    row = _split(archive.report, timers)
    row["dynamo"] = total - timers.ms.get("tileflow", 0.0)  # torch.export, twice (before and after the passes)
    row["aot"] = 0.0
    row["graphs"] = len(archive.report.graphs)
    row["padding"] = _padding_ms(timers.graphs)
    return row


def measure_stages(name: str, layers: int, options: dict[str, Any], batch: int) -> dict[str, float]:
    """`build_stage_program` of the model's serving step, split by phase (ms); a step packs its
    tokens in one row, whatever `batch` says."""
    from tileflow.distributed import CausalLMStep, build_stage_program
    from tileflow.report import GraphReport

    import tileflow.distributed.program as program_module
    import tileflow.passes.disaggregate as disaggregate

    model = build(name, layers)
    step = CausalLMStep(model)
    inputs = [torch.randint(0, VOCAB, (1, SEQ)), torch.arange(SEQ).unsqueeze(0)]
    report = GraphReport(graph_id="stages")
    timers = _Timers()
    # torch's share: the export and its decompositions (`capture_exported`'s run_decompositions).
    parts = [(program_module, "export_program", "export", False), (program_module, "capture_exported", "export", False),
             (disaggregate, "split_stages", "split", False)]
    with _patched(timers, parts):
        start = time.perf_counter()
        build_stage_program(step, inputs, max_tokens=64, config=tileflow.Config.from_options({"target": "reference", **options}),
                            report=report)
        total = (time.perf_counter() - start) * 1e3
    passes = _pass_ms([report])
    row: dict[str, float] = {**passes, "split": timers.ms.get("split", 0.0)}
    row["dynamo"] = timers.ms.get("export", 0.0)
    row["aot"] = 0.0
    row["tileflow"] = total - row["dynamo"]
    row["other"] = row["tileflow"] - sum(passes.values()) - row["split"]
    row["graphs"] = 1
    return row


def _pass_ms(graph_reports: list[Any]) -> dict[str, float]:
    ms: dict[str, float] = {}
    for graph in graph_reports:
        for record in graph.passes:
            ms[record.name] = ms.get(record.name, 0.0) + record.ms
    return ms


def _split(report: Any, timers: _Timers) -> dict[str, float]:
    passes = _pass_ms(report.graphs)
    row: dict[str, float] = {**passes, "lower": timers.ms.get("lower", 0.0), "residual": timers.ms.get("residual", 0.0)}
    row["tileflow"] = timers.ms.get("tileflow", 0.0)
    row["other"] = row["tileflow"] - sum(passes.values()) - row["lower"] - row["residual"]
    row["gc"] = timers.gc_ms
    return row


MEASURE = {"dynamo": measure_dynamo, "export": measure_export, "stages": measure_stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama", help="comma-separated: llama, qwen2, gemma2, mixtral<experts>, gpt2")
    parser.add_argument("--layers", default="2,8", help="comma-separated depths, e.g. 2,8,32,80")
    parser.add_argument("--path", choices=sorted(MEASURE), default="dynamo",
                        help="dynamo: torch.compile; export: tileflow.export; stages: build_stage_program")
    parser.add_argument("--batch", type=int, default=1, help="rows of the call (dynamo and export paths)")
    parser.add_argument("--options", default="{}", help='tileflow options as JSON, e.g. \'{"passes": ["canonicalize", '
                        '"attention", "gemm_padding", "nanobatch"], "nano_batches": 2}\'')
    parser.add_argument("--write", action="store_true", help="write bench/results/compile_time-*.md")
    args = parser.parse_args()
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    options = json.loads(args.options)
    torch.set_num_threads(1)
    # Once at the smallest size first, so the rows measure compiling, not first imports.
    MEASURE[args.path](args.models.split(",")[0], 1, options, args.batch)
    first = "torch.export" if args.path != "dynamo" else "dynamo"
    rows, columns = [], None
    for name in args.models.split(","):
        previous: dict[int, tuple[float, float]] = {}
        for layers in (int(n) for n in args.layers.split(",")):
            row = MEASURE[args.path](name, layers, options, args.batch)
            passes = [k for k in row if k not in ("dynamo", "aot", "tileflow", "other", "graphs", "padding", "gc")]
            columns = columns or passes
            # GC pauses land by chance (a full collection over the whole heap): left out of the growth.
            own = row["tileflow"] - row.get("gc", 0.0)
            growth = ""
            d, (before_tf, before_torch) = max(previous.items()) if previous else (layers, (0.0, 0.0))
            # A depth measured again (`--layers 8,8`: the noise) has no step to scale: no growth.
            if d != layers:
                # The growth from the previous depth, scaled to a 4x step: t2/t1 ** (log 4 / log(d2/d1)).
                exponent = math.log(4) / math.log(layers / d)
                growth = (f"{(own / before_tf) ** exponent:.1f}x / "
                          f"{((row['dynamo'] + row['aot']) / before_torch) ** exponent:.1f}x")
            previous[layers] = (own, row["dynamo"] + row["aot"])
            rows.append([name, layers, int(row["graphs"]), f"{row['dynamo']:.0f}", f"{row['aot']:.0f}",
                         *(f"{row.get(p, 0.0):.0f}" for p in columns), f"{row['other']:.0f}",
                         f"{row['tileflow']:.0f}", f"{row.get('gc', 0.0):.0f}", f"{row.get('padding', 0.0):.0f}", growth])
            print(" | ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
    headers = ["model", "layers", "graphs", f"{first} ms", "aot ms", *(f"{p} ms" for p in columns or []), "other ms",
               "tileflow ms", "of which gc ms", "padding ms",
               f"growth per 4x depth: tileflow less gc / {first} + aot"]
    body = markdown_table(headers, rows)
    print(body)
    if args.write:
        print(f"wrote {write_results(f'compile_time-{args.path}', 'Compile time by model depth', environment(), body)}")


if __name__ == "__main__":
    main()
