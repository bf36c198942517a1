"""The pass manager: timing, counts, lint, verification, rollback, strict mode and debug dumps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

import tileflow
from tileflow.config import Config
from tileflow.pipeline import PassContext, PassManager, PassResult, TileflowError, get_pass, register_pass
from tileflow.report import GraphReport

aten = torch.ops.aten


def _relu_to_sigmoid(gm: fx.GraphModule) -> None:
    """A half-done rewrite for the pass manager to undo: every relu becomes a sigmoid."""
    for node in gm.graph.nodes:
        if node.target is aten.relu.default:
            node.target = aten.sigmoid.default


@register_pass
class RaisingPass:
    """A deliberately failing pass: edits the graph, then raises."""

    name = "test_raising"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        _relu_to_sigmoid(gm)
        raise RuntimeError("boom")


def _register_swap(name: str, old: object, new: object, doc: str, count: bool = True) -> None:
    """Register a pass that swaps one op for another and claims success (or, without `count`,
    says it changed nothing): only `verify` can catch it."""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in gm.graph.nodes:
            if node.target is old:
                node.target = new
                if count:
                    result.count("swapped")
        return result

    register_pass(type(f"Swap_{name}", (), {"__doc__": doc, "name": name, "run": run}))


_register_swap("test_wrong_numerics", aten.relu.default, aten.sigmoid.default, "Swaps relu for sigmoid.")
_register_swap("test_quiet_swap", aten.relu.default, aten.sigmoid.default,
               "Swaps relu for sigmoid and counts nothing (`changed` stays False).", count=False)


@register_pass
class InvalidGraphPass:
    """Leaves a graph that uses a value before it is defined: lint must reject it."""

    name = "test_invalid_graph"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        first, last = nodes[0], nodes[-1]
        first.args = (last,) + tuple(first.args[1:])
        return PassResult(changed=True)


@register_pass
class FallbackPass:
    """Handles nothing and says why, per node."""

    name = "test_fallback"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in gm.graph.nodes:
            if node.target is aten.relu.default:
                result.fallback(node, "relu is not supported by this test pass")
        return result


def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ w.t()) * 2


def traced() -> tuple[fx.GraphModule, list[torch.Tensor]]:
    inputs = [torch.randn(5, 8), torch.randn(6, 8)]
    return make_fx(fn, tracing_mode="symbolic")(*inputs), inputs


def context(config: Config, tmp: Path | None = None) -> PassContext:
    return PassContext(config=config, report=GraphReport(graph_id="g"), artifact_dir=tmp)


def test_records_time_counts_and_rewrites() -> None:
    gm, inputs = traced()
    config = Config(passes=("canonicalize",))
    ctx = context(config)
    PassManager.from_config(config).run(gm, ctx)
    [record] = ctx.report.passes
    assert record.name == "canonicalize" and record.ms > 0
    assert record.nodes_after < record.nodes_before  # t + mm became one linear
    assert record.rewrites == {"canonical_linear": 1}
    assert any(n.target is aten.linear.default for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*inputs), fn(*inputs))


def test_raising_pass_is_rolled_back_and_reported() -> None:
    gm, inputs = traced()
    config = Config(passes=("test_raising", "canonicalize"))
    ctx = context(config)
    PassManager.from_config(config).run(gm, ctx)
    torch.testing.assert_close(gm(*inputs), fn(*inputs))  # relu is back
    [fallback] = ctx.report.fallbacks
    assert fallback.pass_name == "test_raising" and "boom" in fallback.reason
    assert ctx.report.passes[0].error == "RuntimeError: boom"
    assert ctx.report.passes[1].changed  # the next pass still ran


def test_strict_raises() -> None:
    gm, _ = traced()
    config = Config(passes=("test_raising",), strict=True)
    with pytest.raises(TileflowError, match="boom"):
        PassManager.from_config(config).run(gm, context(config))
    config = Config(passes=("test_fallback",), strict=True)
    with pytest.raises(TileflowError, match="relu is not supported"):
        PassManager.from_config(config).run(traced()[0], context(config))


def test_node_fallbacks_are_reported() -> None:
    gm, _ = traced()
    config = Config(passes=("test_fallback",))
    ctx = context(config)
    PassManager.from_config(config).run(gm, ctx)
    [fallback] = ctx.report.fallbacks
    assert fallback.node.startswith("relu") and fallback.pass_name == "test_fallback"


def test_lint_failure_is_rolled_back() -> None:
    gm, inputs = traced()
    config = Config(passes=("test_invalid_graph",))
    ctx = context(config)
    PassManager.from_config(config).run(gm, ctx)
    assert ctx.report.passes[0].error is not None
    torch.testing.assert_close(gm(*inputs), fn(*inputs))


@pytest.mark.parametrize("name", ["test_wrong_numerics", "test_quiet_swap"])
def test_verify_catches_wrong_numerics(name: str) -> None:
    """A pass that changes the results is rolled back, also one that says it changed nothing
    (the check ran only for passes whose result counted a rewrite: that one went through)."""
    gm, inputs = traced()
    config = Config(passes=(name,), verify=True)
    ctx = context(config)
    PassManager.from_config(config).run(gm, ctx, real_inputs=inputs)
    assert "changed output 0" in ctx.report.fallbacks[0].reason
    torch.testing.assert_close(gm(*inputs), fn(*inputs))
    # Without verify the wrong pass goes through: the check is what caught it.
    gm2, _ = traced()
    config = Config(passes=(name,))
    PassManager.from_config(config).run(gm2, context(config))
    assert not torch.allclose(gm2(*inputs), fn(*inputs))


def test_debug_dir_has_before_after_code_and_json(tmp_path: Path) -> None:
    gm, _ = traced()
    config = Config(passes=("canonicalize",))
    PassManager.from_config(config).run(gm, context(config, tmp_path))
    before = (tmp_path / "passes" / "00_canonicalize.before.py").read_text()
    after = (tmp_path / "passes" / "00_canonicalize.after.py").read_text()
    assert "aten.mm" in before and "aten.linear" in after
    nodes = json.loads((tmp_path / "passes" / "00_canonicalize.after.json").read_text())
    linear = next(n for n in nodes if n["target"] == "aten.linear.default")
    assert linear["dtype"] == "float32" and len(linear["shape"]) == 2
    assert (tmp_path / "input.py").exists() and (tmp_path / "output.json").exists()


def test_unknown_pass_name() -> None:
    with pytest.raises(ValueError, match="available passes are"):
        get_pass("no_such_pass")


def test_failing_pass_through_torch_compile(tmp_path: Path) -> None:
    x, w = torch.randn(7, 8), torch.randn(6, 8)
    report = tileflow.Report()
    options = {"passes": ["canonicalize", "test_raising"], "debug_dir": str(tmp_path)}
    compiled = torch.compile(fn, backend=tileflow.TileflowBackend(options, report=report), dynamic=True)
    torch.testing.assert_close(compiled(x, w), fn(x, w))
    assert [f.pass_name for f in report.fallbacks] == ["test_raising"]
    saved = tileflow.Report.from_json((tmp_path / "report.json").read_text())
    assert saved.fallbacks[0].reason == report.fallbacks[0].reason
    strict = torch.compile(fn, backend=tileflow.TileflowBackend({**options, "strict": True}), dynamic=True)
    with pytest.raises(Exception, match="boom"):
        strict(x, w)


def test_verify_through_torch_compile() -> None:
    x, w = torch.randn(7, 8), torch.randn(6, 8)
    report = tileflow.Report()
    options = {"passes": ["canonicalize", "test_wrong_numerics"], "verify": True}
    compiled = torch.compile(fn, backend=tileflow.TileflowBackend(options, report=report), dynamic=True)
    torch.testing.assert_close(compiled(x, w), fn(x, w))
    x2 = torch.randn(11, 8)
    torch.testing.assert_close(compiled(x2, w), fn(x2, w))
    [graph] = report.graphs
    assert graph.passes[0].changed and graph.passes[1].error is not None
    assert "checked each pass" in graph.extra["verify"]


def test_verify_pins_no_symbolic_heads() -> None:
    """With `verify=True` the passes run at the first call, after Dynamo built the graph's
    guards: a head count pinned then would never be checked (another head count reused the
    graph while its report said the attention was rewritten for the first). So the attention
    after a graph break keeps its fallback there, with the reason, and every head count equals
    eager."""

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    torch._dynamo.reset()
    report = tileflow.Report()
    options = {"target": "reference", "verify": True}
    compiled = torch.compile(attention, backend=tileflow.TileflowBackend(options, report=report), dynamic=True)
    for heads in (4, 2):
        q, k, v = (torch.randn(1, heads, 5, 8) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert "meta_attention" not in report.rewrites
    assert any("head count or head dim is symbolic" in f.reason for f in report.fallbacks), report.fallbacks


class _Counting(torch.nn.Module):
    """A buffer counted once per call and an input doubled in place: verify's runs must not repeat them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.add_(1)
        y = torch.relu(self.lin(x)) + self.steps
        x.mul_(2)
        return y


def test_verify_runs_leave_mutated_inputs_and_buffers_alone() -> None:
    torch.manual_seed(0)
    model, eager = _Counting().eval(), _Counting().eval()
    eager.load_state_dict(model.state_dict())
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"verify": True}, report=report), dynamic=True)
    with torch.no_grad():
        for rows in (3, 5, 7):
            x = torch.randn(rows, 8)
            x_compiled, x_eager = x.clone(), x.clone()
            torch.testing.assert_close(compiled(x_compiled), eager(x_eager), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x_compiled, x_eager)
            assert model.steps.item() == eager.steps.item()
    # The passes were right: none was rolled back for the inputs the check runs had changed.
    assert not report.fallbacks, report.fallbacks
    assert report.graphs[0].passes[0].changed and "checked each pass" in report.graphs[0].extra["verify"]


_register_swap("test_wrong_mutation", aten.mul.Tensor, aten.add.Tensor,
               "Changes only what the graph writes back into its input (x *= 2 becomes x += 2).")


def test_verify_catches_a_pass_that_changes_an_input_mutation() -> None:
    def step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x @ w.t())
        x.mul_(2)
        return y

    report = tileflow.Report()
    options = {"passes": ["canonicalize", "test_wrong_mutation"], "verify": True}
    compiled = torch.compile(step, backend=tileflow.TileflowBackend(options, report=report), dynamic=True)
    x, w = torch.randn(5, 8), torch.randn(6, 8)
    x_compiled, x_eager = x.clone(), x.clone()
    torch.testing.assert_close(compiled(x_compiled, w), step(x_eager, w))
    torch.testing.assert_close(x_compiled, x_eager)
    [fallback] = report.fallbacks
    assert fallback.pass_name == "test_wrong_mutation" and "changed output" in fallback.reason


@register_pass
class PlanThenRaisePass:
    """Leaves a plan on gm.meta and in the report, then fails: the rollback must undo both."""

    name = "test_plan_then_raise"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        gm.meta["tileflow_nanobatch"] = object()
        ctx.report.plans.append({"op": "padded_gemm"})
        ctx.report.extra["nano_batch"] = {"setting": 2}
        raise RuntimeError("schedule check failed")


def test_rollback_undoes_what_a_pass_left_on_the_module_and_report() -> None:
    gm, inputs = traced()
    config = Config(passes=("canonicalize", "test_plan_then_raise"))
    ctx = context(config)
    PassManager.from_config(config).run(gm, ctx)
    assert "tileflow_nanobatch" not in gm.meta  # else compile_graph runs the rejected plan
    assert ctx.report.plans == [] and "nano_batch" not in ctx.report.extra
    [fallback] = ctx.report.fallbacks
    assert "schedule check failed" in fallback.reason
    torch.testing.assert_close(gm(*inputs), fn(*inputs))


@register_pass
class MarkPass:
    """Records a note on the relu, as gemm_padding and attention record theirs on their nodes."""

    name = "test_mark"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in gm.graph.nodes:
            if node.target is aten.relu.default:
                node.meta["tileflow"] = {"kind": "marked"}
                result.count("marked")
        return result


@register_pass
class MarkInPlaceThenRaisePass:
    """Extends the nodes' notes in place (as nanobatch marks its splits), then fails."""

    name = "test_mark_in_place_then_raise"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        for node in gm.graph.nodes:
            if isinstance(node.meta.get("tileflow"), dict):
                node.meta["tileflow"]["nano"] = {"split": True}
        raise RuntimeError("schedule check failed")


def test_rollback_undoes_notes_a_pass_added_to_a_nodes_metadata_in_place(tmp_path: Path) -> None:
    """The snapshot copied each node's meta shallowly: nanobatch's split marks, written into the
    `tileflow` dict gemm_padding left on a node, outlived the rollback, and `tileflow viz` showed
    the rolled-back pass changing those nodes (and the output graph still carrying the marks)."""
    gm, inputs = traced()
    config = Config(passes=("test_mark", "test_mark_in_place_then_raise"), debug_dir=str(tmp_path))
    PassManager.from_config(config).run(gm, context(config, tmp_path))
    [marked] = [n for n in gm.graph.nodes if "tileflow" in n.meta]
    assert marked.meta["tileflow"] == {"kind": "marked"}
    stem = tmp_path / "passes" / "01_test_mark_in_place_then_raise"
    assert json.loads(Path(f"{stem}.after.json").read_text()) == json.loads(Path(f"{stem}.before.json").read_text())
    torch.testing.assert_close(gm(*inputs), fn(*inputs))


class _Dropped(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 32)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.relu(self.linear(x)))


@pytest.mark.parametrize("strict", [False, True])
def test_verify_runs_random_ops_from_one_state_and_leaves_the_callers(strict: bool) -> None:
    """Each check run drew other dropout masks, so verify rolled every correct pass back (strict
    raised), and it consumed the caller's random numbers, so the first call differed from eager
    under the same seed."""
    model, x = _Dropped().train(), torch.randn(6, 16)
    report = tileflow.Report()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"verify": True, "strict": strict}, report=report),
                             dynamic=True)
    with torch.no_grad():
        torch.manual_seed(123)
        got = compiled(x)
        after = torch.rand(3)
        torch.manual_seed(123)
        want = model(x)
        assert torch.equal(after, torch.rand(3))  # the check runs left the caller's generator as eager does
    torch.testing.assert_close(got, want)
    assert not report.fallbacks and report.rewrites.get("padded_gemm") == 1


def test_pass_names_must_name_files() -> None:
    """A pass's name names its files in a debug_dir: one with '/' crashed the compile there (and
    '../x' would write outside it)."""
    for name in ("team/noop", "..", "a b"):
        with pytest.raises(ValueError, match="must be letters, digits"):
            register_pass(type("Bad", (), {"name": name, "run": lambda self, gm, ctx: PassResult()}))


_F = torch.tensor([1.0, 2.0])


@pytest.mark.parametrize(
    "expected, actual, needle",
    [
        ([_F], [_F, _F], r"changed the number of outputs \(1 -> 2\)"),
        ([_F], [_F.double()], r"changed output 0 from \(2,\)/torch.float32 to \(2,\)/torch.float64"),
        ([3], [4], "changed output 0: 3 -> 4"),
        ([torch.tensor([1, 2])], [torch.tensor([1, 3])], "changed integer output 0"),
        ([_F], [_F + 1e-3], "changed output 0: max abs diff 0.001 exceeds rtol=0.0001, atol=0.0001"),
    ],
)
def test_check_numerics_refuses_each_kind_of_change(expected: list, actual: list, needle: str) -> None:
    """`verify`'s comparison catches an extra output, a new dtype (allclose alone would pass it), a
    changed non-tensor output, a changed integer tensor and a float beyond the tolerance."""
    from tileflow.pipeline import _check_numerics

    with pytest.raises(AssertionError, match=needle):
        _check_numerics("p", expected, actual, Config())


def test_check_numerics_accepts_nans_in_place_and_half_precision_rounding() -> None:
    """NaNs where the unrewritten graph had them are no change, and float16 / bfloat16 outputs are
    checked no tighter than their rounding (2e-2), whatever `verify_rtol` / `verify_atol` say."""
    from tileflow.pipeline import _check_numerics

    nan = torch.tensor([float("nan"), 1.0])
    _check_numerics("p", [nan], [nan.clone()], Config())
    for dtype in (torch.float16, torch.bfloat16):
        half = torch.tensor([0.0, 4.0], dtype=dtype)
        # 0.05 off at 4.0: past the atol alone, within atol + rtol * 4 of half precision.
        _check_numerics("p", [half], [half + torch.tensor([0.01, 0.05], dtype=dtype)], Config())


@register_pass
class ReturnsNothingPass:
    """Rewrites relu to sigmoid and forgets to return a PassResult."""

    name = "test_returns_nothing"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        _relu_to_sigmoid(gm)
        return None  # type: ignore[return-value]


def test_a_pass_that_returns_no_result_is_rolled_back_with_the_reason() -> None:
    """A pass must return a PassResult: one that does not is a failed pass (rolled back, its reason
    in the report), not an AttributeError out of the pass manager."""
    gm, inputs = traced()
    config = Config(passes=("test_returns_nothing",))
    ctx = context(config)
    PassManager.from_config(config).run(gm, ctx)
    assert ctx.report.passes[0].error == "TypeError: pass 'test_returns_nothing' returned NoneType, expected PassResult"
    torch.testing.assert_close(gm(*inputs), fn(*inputs))


def test_verify_tolerances_reach_the_check() -> None:
    """`verify_atol` and `verify_rtol` each loosen the comparison on their own (neither is read for the other)."""
    from tileflow.pipeline import _check_numerics

    zeros, ones = torch.zeros(2), torch.ones(2)
    _check_numerics("p", [zeros], [zeros + 0.5], Config(verify_atol=1.0, verify_rtol=0.0))
    _check_numerics("p", [ones], [ones * 1.5], Config(verify_atol=0.0, verify_rtol=1.0))
    with pytest.raises(AssertionError, match="exceeds rtol=1.0, atol=0.0"):
        _check_numerics("p", [zeros], [zeros + 0.5], Config(verify_atol=0.0, verify_rtol=1.0))


def test_verify_without_real_inputs_says_it_was_skipped() -> None:
    """With only fake inputs there is nothing to run the check on: the report says so, and the passes still run."""
    gm, _ = traced()
    config = Config(passes=("canonicalize",), verify=True)
    ctx = context(config)
    PassManager.from_config(config).run(gm, ctx)
    assert ctx.report.extra["verify"] == "skipped: no real inputs (fake tensors only)"
    assert ctx.report.passes[0].changed


def _pin_context() -> tuple[PassContext, object]:
    """A PassContext over a fresh ShapeEnv whose guards are checked (as under Dynamo), and a
    function making a backed symbolic size of that env."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()

    def size(value: int, name: str) -> torch.SymInt:
        symbol = env.create_symbol(value, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
        return env.create_symintnode(symbol, hint=value)

    return PassContext(config=Config(), report=GraphReport(graph_id="g"), shape_env=env, shape_guards=True), size


def test_pin_static_pins_a_backed_size_with_a_guard() -> None:
    """The sizes pin_static accepts are static afterwards (a guard holds them to their example
    values), not merely reported as fine; static ones are left alone."""
    ctx, size = _pin_context()
    n, k = size(24, "n"), size(16, "k")
    assert ctx.pin_static([n, k, 8], "the weight", "plans need them") is None
    assert statically_known_true(n == 24) and statically_known_true(k == 16)


def test_pin_static_refuses_what_it_must_not_pin() -> None:
    """No guard checked (export), a size marked dynamic, one sharing a varying symbol, one with
    no example value (unbacked), one Dynamo saw change: each returns its reason and pins nothing."""
    ctx, size = _pin_context()
    t, n = size(5, "t"), size(24, "n")
    assert ctx.pin_static([t], "w", "need", [({t.node.expr}, "counts tokens")]) == \
        "w counts tokens: pinning it would recompile at every length"
    unbacked = ctx.shape_env.create_unbacked_symint()
    assert ctx.pin_static([unbacked], "w", "need") == "w is symbolic, with no example value to pin it to"
    assert dataclasses.replace(ctx, shape_guards=False).pin_static([n], "w", "need") == "w is symbolic; need"
    declared = dataclasses.replace(ctx, declared_dynamic=frozenset({n.node.expr}))
    assert declared.pin_static([n], "w", "need") == "w is marked dynamic (mark_dynamic); need"
    changed = dataclasses.replace(ctx, changed_sizes=frozenset({n.node.expr}))
    assert changed.pin_static([n], "w", "need") == ("w changed between calls (Dynamo made it dynamic): pinning it "
                                                     "would recompile at each value; need")
    assert not statically_known_true(t == 5) and not statically_known_true(n == 24)
