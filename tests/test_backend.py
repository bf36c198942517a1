"""Registration, capture, explain, report and logging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tileflow
from tileflow.capture import capture_exported, export_program
from tileflow.compiler import compile_graph
from tileflow.config import Config
from models import VOCAB, build


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TILEFLOW_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=300)


@pytest.fixture(scope="module")
def fresh_process() -> subprocess.CompletedProcess:
    """One fresh interpreter (each costs a torch import and a cold Dynamo) for two tests: with
    TILEFLOW_LOG unset, `backend="tileflow"` without importing tileflow first; a marker line on
    stderr; then, TILEFLOW_LOG set (every backend reads it again), a second compile. Its stdout
    is the first compile's rewrites, printed last."""
    return run_python(
        """
        import os, sys, torch
        assert not torch._dynamo.config.specialize_float
        f = torch.compile(lambda x: torch.nn.functional.linear(x, torch.ones(3, 4)).relu(), backend="tileflow", dynamic=True)
        # Looking the backend up imported tileflow, which has Dynamo bake Python floats in.
        assert torch._dynamo.config.specialize_float
        out = f(torch.randn(5, 4))
        assert out.shape == (5, 3)
        assert "tileflow" in sys.modules  # Dynamo found us through the entry point
        import tileflow
        rewrites = tileflow.session_report().rewrites
        sys.stderr.write("<quiet above>\\n")
        os.environ["TILEFLOW_LOG"] = "info"
        torch._dynamo.reset()
        torch.compile(lambda x: x.sin() @ x.t(), backend="tileflow", dynamic=True)(torch.randn(4, 4))
        print(rewrites)
        """
    )


def test_backend_string_works_without_importing_tileflow(fresh_process: subprocess.CompletedProcess) -> None:
    assert fresh_process.returncode == 0, fresh_process.stderr
    assert "canonical_linear" in fresh_process.stdout


class _CountingBackend(tileflow.TileflowBackend):
    """A TileflowBackend that counts the graphs Dynamo hands it and, per graph, the float64
    scalar tensors among their inputs (the Python floats Dynamo turned into tensors)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scalar_float_inputs: list[int] = []

    def __call__(self, gm, example_inputs):
        self.scalar_float_inputs.append(sum(isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype == torch.float64
                                            for x in example_inputs))
        return super().__call__(gm, example_inputs)


@pytest.mark.parametrize("specialize", [True, False])
def test_python_floats_are_baked_in_and_symbolic_floats_still_compile(specialize: bool) -> None:
    """Importing tileflow has Dynamo specialize Python floats: Llama's norm eps and attention
    scale reach the graph as constants, and Dynamo traces the model once. With symbolic floats
    turned back on (Dynamo's default), the scale makes AOTAutograd restart Dynamo's analysis, so
    the backend sees the frame twice, and the model still compiles to one graph that matches
    eager at every length."""
    assert torch._dynamo.config.specialize_float
    model = build("llama")
    report = tileflow.Report()
    backend = _CountingBackend({"target": "reference"}, report=report)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    # Dynamo's own patch: torch 2.11's config module drops a monkeypatched entry on undo.
    with torch._dynamo.config.patch(specialize_float=specialize), torch.no_grad():
        for seq_len in (3, 9):
            ids = torch.randint(0, VOCAB, (2, seq_len))
            got, want = compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits
            assert (got - want).abs().max().item() <= 1e-4, seq_len
    assert len(report.graphs) == 1 and report.recompiles == 0
    assert report.rewrites["meta_attention"] == 2
    if specialize:
        assert backend.scalar_float_inputs == [0]
    else:
        assert len(backend.scalar_float_inputs) == 2 and min(backend.scalar_float_inputs) > 0, backend.scalar_float_inputs


def test_logging_is_silent_by_default_and_on_with_env(fresh_process: subprocess.CompletedProcess) -> None:
    proc = fresh_process
    assert proc.returncode == 0, proc.stderr
    quiet, marker, loud = proc.stderr.partition("<quiet above>\n")
    # Nothing on stdout but the line the script prints itself at the end.
    assert marker and "[tileflow" not in quiet and len(proc.stdout.splitlines()) == 1
    assert "[tileflow INFO] tileflow.pipeline" in loud and "canonicalize" in loud
    bad = run_python("import tileflow", TILEFLOW_LOG="chatty")
    assert bad.returncode != 0 and "TILEFLOW_LOG='chatty' is not a log level" in bad.stderr


def test_configure_from_env_adds_one_handler_and_reads_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """`configure_from_env` runs at import and again for every backend: it must attach its stderr
    handler once (twice printed every message twice), and read `TILEFLOW_LOG= Debug ` as debug."""
    import logging

    from tileflow.log import configure_from_env, get_logger

    logger = get_logger()
    saved_handlers, saved_level = list(logger.handlers), logger.level
    try:
        logger.handlers = [h for h in logger.handlers if not getattr(h, "_tileflow_handler", False)]
        monkeypatch.setenv("TILEFLOW_LOG", " Debug ")
        configure_from_env()
        configure_from_env()
        assert logger.level == logging.DEBUG
        assert sum(bool(getattr(h, "_tileflow_handler", False)) for h in logger.handlers) == 1
    finally:
        logger.handlers, logger.level = saved_handlers, saved_level


@pytest.fixture(scope="module")
def llama_explained(tmp_path_factory: pytest.TempPathFactory):
    """`tileflow.explain` of the small Llama for the reference target (the default on a CPU) with
    a debug_dir, compiled once for the tests that read its report and its written graph: the
    model, the report, and the debug_dir."""
    debug_dir = tmp_path_factory.mktemp("llama_explained")
    model = build("llama")
    torch._dynamo.reset()
    report = tileflow.explain(model, torch.randint(0, VOCAB, (1, 7)), use_cache=False,
                              options={"target": "reference", "debug_dir": str(debug_dir)})
    return model, report, debug_dir


def test_explain_report_prints_and_round_trips(llama_explained) -> None:
    _, report, _ = llama_explained
    [graph] = report.graphs
    names = [p.name for p in report.passes]
    assert names == ["canonicalize", "attention", "gemm_padding"]
    assert report.rewrites["meta_attention"] == 2  # one per layer
    assert report.rewrites["canonical_linear"] == 15  # 2 layers x 7 projections + lm_head
    # Per layer: q, k and v share one GEMM, gate and up one SwiGLU kernel; then o, down, lm_head.
    assert report.rewrites["padded_gemm"] == 9 and report.rewrites["fused_siblings"] == 4
    text = str(report)
    assert "canonicalize" in text and "canonical_linear=15" in text and "graph_" in text
    assert "tile plans" in text and "padded_gemm=9" in text and "fused_siblings=4" in text
    for symbol, (lo, hi) in graph.symbols.items():  # an unbounded range reads [lo, ∞), not [lo, None]
        assert f"{symbol}∈[{lo}, {'∞)' if hi is None else f'{hi}]'}" in text
    again = tileflow.Report.from_json(report.to_json())
    assert again == report and again.rewrites == report.rewrites
    assert json.loads(report.to_json())["graphs"][0]["symbols"]


def test_recompiles_count_only_this_reports_own_compiles_of_a_frame() -> None:
    """A second `explain` of one function is Dynamo's recompile of its frame (the first explain's
    backend compiled it), not one of the second report's; a guard failure under one backend is."""
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    first = tileflow.explain(double, torch.randn(4))
    second = tileflow.explain(double, torch.randn(4))
    assert (first.recompiles, second.recompiles) == (0, 0)
    report = tileflow.Report()
    compiled = torch.compile(double, backend=tileflow.TileflowBackend({}, report=report), dynamic=True)
    compiled(torch.randn(4))
    compiled(torch.randn(4, dtype=torch.float64))  # a dtype guard fails: the frame compiles again
    assert len(report.graphs) == 2 and report.recompiles == 1


class _Sigmoid(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x))


def test_a_compile_after_dynamo_reset_is_no_recompile(tmp_path) -> None:
    """`torch._dynamo.reset()` numbers frames from 0 again: a fresh compile then took the frame id
    of one compiled before and counted as a recompile. And a debug_dir's report.json counts its
    own graphs' recompiles, not the session's (another model's recompile showed there)."""
    import pickle

    def mlp() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()

    report = tileflow.Report()
    with torch.no_grad():
        torch.compile(mlp(), backend=tileflow.TileflowBackend({}, report=report), dynamic=True)(torch.randn(5, 32))
        torch._dynamo.reset()
        torch.compile(mlp(), backend=tileflow.TileflowBackend({}, report=report), dynamic=True)(torch.randn(5, 32))
    assert len(report.graphs) == 2 and report.recompiles == 0
    torch._dynamo.reset()
    session = tileflow.Report()
    recompiled = torch.compile(mlp(), backend=tileflow.TileflowBackend({"debug_dir": str(tmp_path / "a")}, report=session),
                               dynamic=False)
    other = torch.compile(_Sigmoid().eval(),  # its own forward: Sequential's would be the same frame
                          backend=tileflow.TileflowBackend({"debug_dir": str(tmp_path / "b")}, report=session), dynamic=False)
    with torch.no_grad():
        for n in (3, 5):
            recompiled(torch.randn(n, 32))  # a new static shape: the frame compiles again
        other(torch.randn(3, 32))
    assert session.recompiles == 1
    counts = {d: json.loads((tmp_path / d / "report.json").read_text())["recompiles"] for d in ("a", "b")}
    assert counts == {"a": 1, "b": 0}
    # A report crosses process boundaries (a worker's): it pickles and copies, lock and all.
    assert pickle.loads(pickle.dumps(session)) == session


def test_verify_notes_its_eager_residual_in_the_debug_dir(tmp_path) -> None:
    """The note was set after the debug_dir's report.json had been written: only memory had it."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU()).eval()
    report = tileflow.explain(model, torch.randn(5, 32), options={"verify": True, "residual": "inductor",
                                                                  "debug_dir": str(tmp_path)})
    note = "verify=True runs the residual graph eagerly"
    assert report.graphs[0].extra["residual_note"] == note
    assert json.loads((tmp_path / "report.json").read_text())["graphs"][0]["extra"]["residual_note"] == note


def test_explain_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown tileflow option"):
        tileflow.explain(torch.sin, torch.randn(3), options={"targte": "reference"})


@pytest.mark.parametrize("options", [["verify"], "verify=1", ("verify", True), 5])
def test_options_that_are_no_mapping_say_so(options) -> None:
    """`options=["verify"]` or `options="verify=1"` is a mistake for a dict: the error says that
    (not dict()'s "dictionary update sequence element #0 has length 6"), here and through
    torch.compile, and names the valid keys."""
    with pytest.raises(ValueError, match=r"must be a mapping .*valid options are \['target'"):
        tileflow.explain(torch.sin, torch.randn(3), options=options)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="tileflow options must be a mapping"):
        torch.compile(torch.sin, backend="tileflow", options=options)(torch.randn(3))


def test_dynamo_capture_keeps_sdpa_whole_and_tokens_symbolic(llama_explained) -> None:
    # The graph Dynamo captured of the module's Llama compile, as written to its debug_dir.
    _, _, debug_dir = llama_explained
    nodes = json.loads(next(debug_dir.glob("graph_*/input.json")).read_text())
    sdpa = [n for n in nodes if "scaled_dot_product" in n["target"]]
    assert len(sdpa) == 2  # one node per layer, not decomposed
    assert not any(n["target"] == "aten.softmax.int" or n["target"] == "aten._softmax.default" for n in nodes)
    ids = next(n for n in nodes if n["op"] == "placeholder" and n.get("dtype") == "int64")
    assert any(not dim.isdigit() for dim in ids["shape"])  # the sequence length is a symbol


def test_export_path_reuses_the_pipeline() -> None:
    model = build("llama")

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(ids, use_cache=False).logits

    seq = torch.export.Dim("seq", min=2, max=64)
    ids = torch.randint(0, VOCAB, (1, 8))
    ep = export_program(Step(), (ids,), ({1: seq},))
    captured = capture_exported(ep)
    assert captured.range_constraints and (2, 64) in captured.range_constraints.values()
    assert sum("scaled_dot_product" in str(n.target) for n in captured.gm.graph.nodes) == 2
    report = tileflow.Report()
    run = compile_graph(captured.gm, captured.example_inputs, Config(target="reference"), report)
    assert report.rewrites["canonical_linear"] == 15
    with torch.no_grad():
        for n in (3, 17, 40):
            ids = torch.randint(0, VOCAB, (1, n))
            torch.testing.assert_close(run(ids), model(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_report_text_shows_errors_fallbacks_and_round_trips_recompiles() -> None:
    """A rolled-back pass reads `error` in the table, fallbacks are listed with their reasons, the
    recompile count survives the JSON round trip, and a report of another schema is refused."""
    from tileflow.report import Fallback, GraphReport, PassRecord

    graph = GraphReport(graph_id="graph_000", passes=[PassRecord("p", 1.0, True, 3, 3, error="RuntimeError: boom")],
                        fallbacks=[Fallback(node="relu", reason="not supported here", pass_name="p")])
    report = tileflow.Report()
    report.add_graph(graph, recompile=True)
    text = str(report)
    assert "1 recompile(s)" in text
    row = next(line for line in text.splitlines() if line.startswith("p "))  # the passes table's row
    assert row.split()[2] == "error"  # the pass's "changed" column: not "yes"
    assert "fallbacks:" in text and "not supported here" in text and "fallbacks: 1;" in text
    again = tileflow.Report.from_json(report.to_json())
    assert again == report and again.recompiles == 1
    data = json.loads(report.to_json())
    data["schema"] = 2
    with pytest.raises(ValueError, match="report schema 2 is not supported by this tileflow"):
        tileflow.Report.from_dict(data)


def test_verify_runs_the_residual_it_notes(tmp_path) -> None:
    """With verify=True the residual runs eagerly whatever `residual` says: the graph's report names
    the mode it runs (eager), not the configured one, beside the note saying why."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU()).eval()
    report = tileflow.explain(model, torch.randn(5, 32), options={"verify": True, "residual": "inductor"})
    assert report.graphs[0].residual == "eager"
    assert report.graphs[0].config["residual"] == "inductor"


def test_cuda_graphs_on_the_cpu_says_why_nothing_was_captured() -> None:
    """`cuda_graphs=True` on a CPU graph captures nothing, and the graph's report says why (not silently ignored)."""
    report = tileflow.explain(torch.nn.Linear(16, 8).eval(), torch.randn(4, 16), options={"cuda_graphs": True})
    assert report.graphs[0].extra["cuda_graphs"] == "not captured: CUDA graphs capture CUDA work, this graph runs on cpu"


def test_fused_swiglu_kernels_are_built_for_the_intermediate_width(llama_explained) -> None:
    """Llama's separate gate and up projections fuse into one SwiGLU GEMM whose weights are each
    [intermediate, hidden]: the kernels built ahead have N = intermediate (not half of it, as for
    one stacked [2 * intermediate, hidden] weight), the width its plan was made for."""
    model, report, _ = llama_explained
    swiglu = [dict(k.spec["params"]) for k in report.kernels if k.spec and "swiglu" in k.spec["epilogue"]]
    assert swiglu and all(p["n"] == model.config.intermediate_size and p["k"] == model.config.hidden_size for p in swiglu)
    assert all(p["n"] == model.config.intermediate_size for p in report.graphs[0].plans if p.get("gated"))


def test_inputs_device_type_ignores_meta_and_prefers_an_accelerator() -> None:
    """The graph's device is where its real inputs live: meta tensors (no device) count for none,
    so a graph of meta inputs only runs on the CPU; a CUDA input beside CPU ones (a device graph
    with CPU-side scalars) makes it a CUDA graph, numbers aside."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tileflow.compiler import inputs_device_type

    meta = torch.empty(2, device="meta")
    with FakeTensorMode():
        cuda = torch.empty(2, device="cuda")
    assert inputs_device_type([]) == "cpu" and inputs_device_type([3, 0.5]) == "cpu"
    assert inputs_device_type([meta]) == "cpu"
    assert inputs_device_type([meta, meta, torch.empty(1)]) == "cpu"
    assert inputs_device_type([cuda, torch.empty(1), torch.empty(1), 3]) == "cuda"


def test_a_replay_runs_only_while_the_inputs_it_assumed_positive_are() -> None:
    """`positive_inputs` (an eps the padding proof took as positive) pick the replay at a call
    only when each is above 0: at 0 or below, the step runs plain."""
    from tileflow.compiler import _replayed_while_positive

    step = _replayed_while_positive(lambda *args: "replayed", lambda *args: "plain", (1, 2))
    x = torch.ones(3)
    assert step(x, torch.tensor(1e-6), 2.0) == "replayed"
    assert step(x, torch.tensor(0.0), 2.0) == "plain"
    assert step(x, torch.tensor(1e-6), 0) == "plain"
    assert step(x, torch.tensor(-1.0), 2.0) == "plain"
    assert _replayed_while_positive(len, print, ()) is len


def test_export_capture_decomposes_all_but_the_ops_matched_whole() -> None:
    """torch.export's table would write `silu` as `x * sigmoid(x)` and `linear` as a matmul and
    an add: the GEMM pass fuses `silu` into a GEMM's epilogue and matches `linear` whole, so
    capture leaves both, and only the ops it names (`hardsigmoid` is decomposed; so is `silu`'s
    backward in the table)."""
    from tileflow.capture import export_decompositions

    class Gate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.hardsigmoid(torch.nn.functional.silu(self.proj(x)))

    captured = capture_exported(export_program(Gate().eval(), (torch.randn(4, 16),), None))
    targets = {n.target for n in captured.gm.graph.nodes if n.op == "call_function"}
    assert {torch.ops.aten.silu.default, torch.ops.aten.linear.default} <= targets
    assert torch.ops.aten.sigmoid.default not in targets and torch.ops.aten.hardsigmoid.default not in targets
    table = export_decompositions()
    assert torch.ops.aten.silu.default not in table and torch.ops.aten.linear.default not in table
    assert torch.ops.aten.silu_backward.default in table


@pytest.mark.parametrize("args, message", [(("--seq-lens", "5,x"), "--seq-lens must be comma-separated integers"),
                                           (("--seq-lens", "5,0"), "--seq-lens must be >= 1, got '5,0'"),
                                           (("--batch", "0"), "--batch must be >= 1, got 0")])
def test_demo_example_refuses_bad_values_up_front(args: tuple[str, ...], message: str, usage_error) -> None:
    """examples/demo.py refuses a bad --seq-lens or --batch as a usage error (exit 2) naming it,
    before building a model: not a ValueError or a Dynamo traceback out of the compiled run."""
    assert message in usage_error("demo", *args)


def test_demo_example_refuses_lengths_past_the_models_positions(usage_error) -> None:
    """The demo's models have 512 positions: a longer --seq-lens is a usage error naming the flag
    (GPT-2's learned positions raised an IndexError out of the compiled run)."""
    message = usage_error("demo", "--model", "gpt2", "--seq-lens", "5,600")
    assert "--seq-lens must be <= 512" in message and "'5,600'" in message


def test_demo_example_fails_on_nan_outputs(monkeypatch, capsys) -> None:
    """The demo exits non-zero when the compiled model's logits are NaN: `max(worst, nan)` kept the
    old worst and `nan > 1e-4` is False, so NaN outputs passed the eager check (exit 0)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "demo.py"
    spec = importlib.util.spec_from_file_location("_example_demo_nan", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)

    def nan_backend(options: dict, report: tileflow.Report) -> object:
        # A stand-in for a miscompiling backend: every floating-point output NaN.
        def compile_fn(gm: torch.fx.GraphModule, example_inputs: list) -> object:
            def run(*args: object) -> object:
                out = gm(*args)
                return type(out)(o * float("nan") if isinstance(o, torch.Tensor) and o.is_floating_point() else o
                                 for o in out)
            return run
        return compile_fn

    monkeypatch.setattr(tileflow, "TileflowBackend", nan_backend)
    monkeypatch.setattr(sys, "argv", [path.name, "--seq-lens", "3", "--batch", "1"])
    torch._dynamo.reset()
    assert demo.main() == 1
    assert "FAIL" in capsys.readouterr().err


def test_report_text_shows_the_notes_in_extra(tmp_path) -> None:
    """`cuda_graphs=True` on the CPU: the README says the graph's report says it was not captured;
    `print(report)` and `tileflow report` printed no `extra`, so only the JSON said so."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU()).eval()
    torch._dynamo.reset()
    report = tileflow.explain(model, torch.randn(5, 32), options={"cuda_graphs": True})
    note = report.graphs[0].extra["cuda_graphs"]
    assert note.startswith("not captured")
    assert f"cuda_graphs: {note}" in str(report)


def test_verify_compiles_the_graph_it_compiles_without_verify(llama_explained, tmp_path) -> None:
    """With verify=True the passes run on the first call, outside Dynamo's tracing context, where
    FX's dead-code elimination keeps SDPA's CPU flash kernel (tagged random): the replaced
    attentions and the mask ops feeding them stayed in the step (206 nodes against 150) and ran
    beside the meta-kernel on every call."""
    # Without verify: the module's compile of the same model at the default options.
    model, report, debug_dir = llama_explained
    ids = torch.randint(0, VOCAB, (1, 7))
    counts = []
    for verify in (False, True):
        if verify:
            torch._dynamo.reset()
            debug_dir = tmp_path / "verify_True"
            report = tileflow.explain(model, ids, use_cache=False,
                                      options={"target": "reference", "verify": True, "debug_dir": str(debug_dir)})
        [graph] = report.graphs
        counts.append(graph.nodes_out)
        code = (debug_dir / graph.graph_id / "output.py").read_text()
        assert "torch.ops.aten._scaled_dot_product" not in code and code.count("meta_attention.default(") == 2
    assert counts[0] == counts[1], counts


def test_each_rank_of_a_launch_writes_its_own_debug_folder(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The processes of a torchrun launch number their graphs from graph_000 each: with one
    debug_dir they wrote their graphs and the root report.json over each other's. A rank of a
    launch of several writes under debug_dir/rank_<r>, a folder the visualizer reads as any."""
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        torch._dynamo.reset()
        torch.compile(double, backend=tileflow.TileflowBackend({"debug_dir": str(tmp_path)}, report=tileflow.Report()))(
            torch.randn(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank_0", "rank_1"]
    for rank in (0, 1):
        folder = tmp_path / f"rank_{rank}"
        [graph] = json.loads((folder / "report.json").read_text())["graphs"]
        assert graph["debug_dir"] == str(folder / graph["graph_id"]) and (folder / graph["graph_id"] / "report.json").is_file()
    monkeypatch.setenv("WORLD_SIZE", "1")
    torch._dynamo.reset()
    single = tmp_path / "single"
    torch.compile(double, backend=tileflow.TileflowBackend({"debug_dir": str(single)}, report=tileflow.Report()))(
        torch.randn(4))
    assert (single / "report.json").is_file() and not list(single.glob("rank_*"))
