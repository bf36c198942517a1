"""Small FX helpers shared by the pipeline and the passes: metadata, snapshots, dumps, shapes."""

from __future__ import annotations

import copy
import math
import operator
import re
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._pytree import tree_map


def _collective(name: str) -> Any:
    """`torch.ops._c10d_functional.<name>.default`, or None in a torch built without distributed."""
    try:
        return getattr(torch.ops._c10d_functional, name).default
    except (AttributeError, RuntimeError):
        return None


# Tensor parallelism's functional collectives, as DTensor, `funcol` and a traced
# `dist.all_reduce` leave them in ATen graphs. The gather concatenates the ranks' tensors along
# dim 0 and the reduce-scatter cuts dim 0 among them; the wait returns its tensor.
ALL_REDUCE: Any = _collective("all_reduce")
ALL_GATHER: Any = _collective("all_gather_into_tensor")
REDUCE_SCATTER: Any = _collective("reduce_scatter_tensor")
WAIT_TENSOR: Any = _collective("wait_tensor")

_aten = torch.ops.aten
# Ops whose second argument is their output's size (a view's shape, `x.new_empty(size)`): run over
# some of the rows, their size at the token dim is those rows' count (the nano-batch runtime sets it).
SIZED_BY_ARGUMENT: frozenset[Any] = frozenset({
    _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.expand.default,
    _aten.new_empty.default, _aten.new_zeros.default, _aten.new_ones.default, _aten.new_full.default,
})
# Factories whose first argument is their output's size (`torch.ones(k * T, 1)`): run over some
# rows (a routing's, per nano-batch), the size at the rows' dim is set as `SIZED_BY_ARGUMENT`'s.
SIZED_BY_FIRST_ARGUMENT: frozenset[Any] = frozenset({_aten.ones.default, _aten.zeros.default, _aten.full.default})


def bind_arguments(node: fx.Node) -> dict[str, Any]:
    """An op node's arguments by schema name, defaults filled in (None where the schema has none)."""
    schema = node.target._schema
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def op_name(node: fx.Node) -> str:
    """The op's short name (`padded_gemm`, `add`, ...)."""
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0] if isinstance(target, torch._ops.OpOverload) else name


def meta_val(node: Any) -> Any:
    """The example value (usually a FakeTensor) recorded on a node, or the constant itself."""
    if isinstance(node, fx.Node):
        return node.meta.get("val")
    return node


def traced_contiguous(node: Any) -> bool:
    """Whether `node`'s traced value is a tensor known to be contiguous (False when not a
    tensor, or when its symbolic sizes leave it open)."""
    value = meta_val(node)
    return isinstance(value, torch.Tensor) and value.is_contiguous() is True


def token_dim(value: Any, token: Any) -> int | None:
    """The dim of a tensor whose size is exactly the token symbol, or None."""
    if not isinstance(value, torch.Tensor):
        return None
    dims = [i for i, s in enumerate(value.shape) if isinstance(s, torch.SymInt) and s.node.expr == token]
    return dims[0] if len(dims) == 1 else None


def fake_mode_of(gm: fx.GraphModule) -> Any:
    """The FakeTensorMode the graph's metadata was traced under (None if it has none)."""
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    vals += [n.meta.get("val") for n in gm.graph.nodes if n.op != "placeholder"][:50]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def shape_env_of(gm: fx.GraphModule) -> Any:
    """The ShapeEnv behind the graph's symbolic sizes (None for a static graph)."""
    mode = fake_mode_of(gm)
    return getattr(mode, "shape_env", None)


def infer_meta(node: fx.Node) -> Any:
    """Compute and store `node.meta["val"]` by running its target on its inputs' fake values."""
    if node.op != "call_function":
        return node.meta.get("val")
    mode = None
    for arg in node.all_input_nodes:
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            from torch._guards import detect_fake_mode

            mode = detect_fake_mode([val])
            if mode is not None:
                break
    args, kwargs = tree_map(meta_val, (node.args, node.kwargs))
    if mode is None:
        return None
    # (The Python dispatcher runs the decompositions symbolic sizes need, as tracing does: without
    # it an op decomposed in Python, say `lerp`, fails on sizes that are not numbers.)
    with enable_python_dispatcher(), mode:
        val = node.target(*args, **kwargs)
    node.meta["val"] = val
    return val


def size_value(graph: fx.Graph, node: fx.Node, dim: int) -> Any:
    """`node`'s size along `dim` as a graph value made at the graph's insertion point: the int
    where static, else a `sym_size` node carrying the SymInt."""
    size = meta_val(node).shape[dim]
    if isinstance(size, int):
        return size
    made = graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
    made.meta["val"] = size
    return made


def copy_source_meta(src: fx.Node, dst: fx.Node) -> None:
    """Carry the model source location and module path of `src` over to its replacement."""
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node", "seq_nr"):
        if key in src.meta and key not in dst.meta:
            dst.meta[key] = src.meta[key]


def is_view_op(target: Any) -> bool:
    """True for ops whose output aliases their first input without writing it, per their schema
    (view, transpose, slice, expand, ...): memory an output or a reader reaches through them."""
    schema = getattr(target, "_schema", None)
    returns = schema.returns if schema is not None else ()
    return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write


def written_arguments(node: fx.Node) -> list[fx.Node]:
    """The values an op writes in place, per its schema's alias annotations (`copy_`'s and
    `add_`'s self, an `out=` tensor): none for a functional op."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return []
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(value, fx.Node):
                written.append(value)
    return written


def viewed_by(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """`nodes` and every value whose memory they share as views of it, through chains of view
    ops (the graph's outputs and what they view, say)."""
    seen, stack = set(nodes), list(nodes)
    while stack:
        base = _view_base(stack.pop())
        if base is not None and base not in seen:
            seen.add(base)
            stack.append(base)
    return seen


def _view_base(node: fx.Node) -> fx.Node | None:
    """The value `node` is a view of: a view op's first input, or the multi-output view op
    (`split`, `unbind`, `chunk`) that an element `getitem` takes comes from; None for others."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.target is operator.getitem:
        # (An element of `split` aliases the split tensor as much as a `view` would.)
        source = node.args[0]
        return source if source.op == "call_function" and is_view_op(source.target) else None
    return node.args[0] if is_view_op(node.target) else None


def written_in_place(graph: fx.Graph) -> set[fx.Node]:
    """The values some op of `graph` writes in place (`written_arguments`), and what they view
    (for `reads_written`)."""
    return viewed_by([w for node in graph.nodes for w in written_arguments(node)])


def reads_written(node: fx.Node, written: set[fx.Node]) -> bool:
    """Whether `node` reads memory some op writes in place (`written` from `written_in_place`):
    one of its inputs, or what an input views. Such a read may not move across the write, nor
    merge with a like read on the write's other side."""
    for value in node.all_input_nodes:
        while value is not None:
            if value in written:
                return True
            value = _view_base(value)
    return False


def attribute(module: Any, qualname: str) -> Any:
    """The attribute `qualname` (dotted: `layers.0.weight`) of `module`: what a get_attr node reads."""
    for part in qualname.split("."):
        module = getattr(module, part)
    return module


def transposed_dims(node: Any) -> tuple[int, int] | None:
    """The two dims `node` swaps, as non-negative indices in increasing order, when it is a
    transpose: `aten.t`, `aten.transpose.int`, or an `aten.permute` that swaps exactly two dims
    (torch.export's core decompositions write every transpose as a permute). Else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    src = meta_val(node.args[0]) if node.args else None
    if not isinstance(src, torch.Tensor):
        return None
    rank = src.dim()
    if node.target is torch.ops.aten.t.default:
        return (0, 1) if rank == 2 else None
    if node.target is torch.ops.aten.transpose.int:
        a, b = sorted(d % rank for d in node.args[1:3])
        return (a, b) if a != b else None
    if node.target is torch.ops.aten.permute.default:
        moved = [i for i, d in enumerate(node.args[1]) if d % rank != i]
        if len(moved) == 2 and node.args[1][moved[0]] % rank == moved[1]:
            return moved[0], moved[1]
    return None


def any_ancestor(node: fx.Node, test: Callable[[fx.Node], bool],
                 stop: Callable[[fx.Node], bool] | None = None) -> bool:
    """Whether `test` holds for `node` or any node its value is computed from, not looking past
    the nodes `stop` holds for."""
    stack, seen = [node], set()
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if test(cur):
            return True
        if stop is None or not stop(cur):
            stack.extend(cur.all_input_nodes)
    return False


def depends_on_sizes(node: fx.Node) -> bool:
    """Whether `node`'s value depends on a size or a graph input (else it is made of numbers)."""
    return any_ancestor(node, lambda n: n.op != "call_function" or isinstance(n.meta.get("val"), torch.SymInt))


def in_graph(node: fx.Node, graph: fx.Graph) -> bool:
    """Whether `node` is (still) one of `graph`'s nodes, in constant time.

    `node in graph.nodes` is a linear walk of the whole graph (FX's node list has no
    `__contains__`), so a pass that asks it for each node it visits is quadratic in the graph's
    size: 80 decoder layers made it a large share of the passes' time. A node leaves its graph only
    through `erase_node`, which marks it erased."""
    return node.graph is graph and not node._erased


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """`graph.eliminate_dead_code()` as it runs inside Dynamo's compile, wherever it runs.

    FX keeps an op tagged random (SDPA's CPU flash kernel, for its dropout argument) as impure
    unless a TracingContext is active, where it follows Inductor's `fallback_random` (False). The
    passes also run outside one (verify's compile on the first call, `tileflow export`): there a
    replaced attention, nothing using it, stayed in the graph with the mask ops feeding it, and ran
    beside the meta-kernel on every call. Returns whether anything was erased."""
    return graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure(impure_random=False))


def erase_unused(graph: fx.Graph, nodes: Iterable[Any]) -> int:
    """Erase those of `nodes` that nothing uses and that have no side effect, then the inputs that
    leaves unused, transitively; return how many were erased.

    The local form of `graph.eliminate_dead_code()` for a rewrite that knows which nodes it may
    have left dead: that one lints and walks the whole graph, so calling it per rewrite made a
    pass quadratic in the model's depth."""
    stack = [n for n in nodes if isinstance(n, fx.Node)]
    erased = 0
    while stack:
        node = stack.pop()
        if node._erased or node.users or node.op != "call_function" or node.is_impure():
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased += 1
        stack.extend(inputs)
    return erased


def split_off_checks(gm: fx.GraphModule, checks: Sequence[fx.Node]) -> fx.GraphModule:
    """Move `checks` (asserts: nodes with no value) out of `gm` into a module of their own, which
    takes `gm`'s inputs and runs them and what they are computed from, returning None. The ops
    they read stay in `gm` when something else there uses them too."""
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        copies[node] = graph.node_copy(node)
    needed: set[fx.Node] = set()
    stack = list(checks)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    for node in gm.graph.nodes:  # in graph order, so every input is copied before its users
        if node in needed and node not in copies:
            copies[node] = graph.node_copy(node, copies.__getitem__)
    graph.output(None)
    for check in checks:
        inputs = check.all_input_nodes
        gm.graph.erase_node(check)
        erase_unused(gm.graph, inputs)
    gm.recompile()
    return fx.GraphModule(gm, graph)


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """True when two (possibly symbolic) shapes are provably equal."""
    if len(a) != len(b):
        return False
    return all(statically_known_true(x == y) for x, y in zip(a, b))


def snapshot_graph(gm: fx.GraphModule) -> fx.Graph:
    """A structural copy of the graph (nodes and their metadata, shallow but for the `tileflow`
    notes), to restore later."""
    new_graph = fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    new_graph._codegen = copy.deepcopy(gm.graph._codegen)
    out = new_graph.graph_copy(gm.graph, {}, return_output_node=True)
    output_val, old_output = out  # type: ignore[misc]
    new_output = new_graph.output(output_val, type_expr=getattr(old_output, "type", None))
    new_output.meta = copy.copy(old_output.meta)
    # A node's `tileflow` notes are plain data that passes extend in place (nanobatch's split
    # marks, disaggregate's stages): shared with the live graph, they would outlive a rollback.
    for node in new_graph.nodes:
        if isinstance(node.meta.get("tileflow"), dict):
            node.meta["tileflow"] = copy.deepcopy(node.meta["tileflow"])
    return new_graph


def restore_graph(gm: fx.GraphModule, graph: fx.Graph) -> None:
    """Put a snapshot back as the module's graph."""
    gm.graph = graph
    gm.recompile()


def count_nodes(gm: fx.GraphModule) -> int:
    """Number of nodes in the graph (placeholders and output included)."""
    return len(gm.graph.nodes)


def graph_structure(gm: fx.GraphModule) -> str:
    """Every node's op, name, target and arguments, one per line: equal for two graphs exactly
    when they compute the same thing from the same inputs (what a plan made for one may be
    checked against before it drives the other)."""
    return "\n".join(f"{n.op} {n.name} {n.target} {n.args!r} {n.kwargs!r}" for n in gm.graph.nodes)


def graph_code(gm: fx.GraphModule) -> str:
    """The graph as readable Python code, with shapes and dtypes in the comments."""
    try:
        return gm.print_readable(print_output=False, include_stride=False, include_device=False)
    except TypeError:  # older signature
        return gm.print_readable(print_output=False)


def _describe_val(val: Any) -> dict[str, Any]:
    if isinstance(val, torch.Tensor):
        return {"shape": [str(s) for s in val.shape], "dtype": str(val.dtype).removeprefix("torch.")}
    if isinstance(val, (list, tuple)):
        return {"items": [_describe_val(v) for v in val]}
    if isinstance(val, (torch.SymInt, int, float, bool)):
        return {"value": str(val)}
    return {}


def _arg_text(arg: Any) -> Any:
    if isinstance(arg, fx.Node):
        return "%" + arg.name
    if isinstance(arg, (list, tuple)):
        return [_arg_text(a) for a in arg]
    if isinstance(arg, torch.dtype):
        return str(arg)
    if isinstance(arg, (int, float, bool, str)) or arg is None:
        return arg
    return str(arg)


def _source_line(node: fx.Node) -> str | None:
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [ln.strip() for ln in str(trace).strip().splitlines() if ln.strip()]
    # The last "File ..." line and the code under it point at the model's own line.
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{lines[i]} :: {code}"
    return lines[-1]


_ROOT_SOURCE = re.compile(r"^L\['\w+'\](?:\[\d+\])*\.")


# A module Dynamo reached through a global rather than through the model: transformers 5.25 makes
# `apply_rotary_pos_emb` one nn.Module of its modeling file, called from every layer
# (G['__import_transformers_dot_models_dot_llama_dot_modeling_llama'].apply_rotary_pos_emb).
_GLOBAL_SOURCE = re.compile(r"^G\['([^']*)'\](?:\.(.+))?$")


def _local_path(source: str) -> str:
    """A module's path in the model from Dynamo's source of it: the root is named by where Dynamo
    found it (L['self'] for a compiled module, L['fn'] under `tileflow.explain`, L['args'][0] when
    a decorator, transformers' output wrappers, passes the module on as an argument) and is the
    top level itself ("")."""
    return _ROOT_SOURCE.sub("", f"{source}.")[:-1].replace("L__self___", "")


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    paths = [str(entry[0] if isinstance(entry, tuple) else entry) for entry in stack.values()]
    glob = _GLOBAL_SOURCE.match(paths[-1])
    if glob is None:
        return _local_path(paths[-1]) or None
    # A global module's path says nothing of where it ran: one group would gather its calls from
    # every layer. It is placed under the module that called it (model.layers.0.self_attn.apply_rotary_pos_emb).
    name = glob.group(2) or glob.group(1)
    callers = [p for p in paths if not _GLOBAL_SOURCE.match(p)]
    caller = _local_path(callers[-1]) if callers else ""
    return f"{caller}.{name}" if caller else name


def graph_to_json(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """Nodes as plain dicts (name, op, target, args, shape, dtype, source line, module path, users).

    The visualizer draws graphs from this; it is also handy in tests.
    """
    nodes = []
    for node in gm.graph.nodes:
        entry: dict[str, Any] = {
            "name": node.name,
            "op": node.op,
            "target": node.target if isinstance(node.target, str) else _target_name(node.target),
            "args": _arg_text(list(node.args)),
            "kwargs": {k: _arg_text(v) for k, v in node.kwargs.items()},
            "users": [u.name for u in node.users],
            "source": _source_line(node),
            "module": _module_path(node),
        }
        entry.update(_describe_val(node.meta.get("val")))
        extra = node.meta.get("tileflow")
        if extra:
            entry["tileflow"] = extra
        nodes.append(entry)
    return nodes


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    name = getattr(target, "__name__", None)
    module = getattr(target, "__module__", None)
    if name and module == "_operator":
        return f"operator.{name}"
    return name or str(target)


def free_symbols(values: Iterable[Any]) -> set[Any]:
    """The sympy symbols appearing in the sizes of these tensors or SymInts."""
    syms: set[Any] = set()
    for val in values:
        if isinstance(val, torch.SymInt):
            syms |= val.node.expr.free_symbols
        elif isinstance(val, torch.Tensor):
            for s in val.shape:
                if isinstance(s, torch.SymInt):
                    syms |= s.node.expr.free_symbols
    return syms


def symbol_ranges(gm: fx.GraphModule) -> dict[str, list[int | None]]:
    """Each symbol of the graph's inputs with its [lower, upper] range (None = unbounded)."""
    env = shape_env_of(gm)
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    out: dict[str, list[int | None]] = {}
    for sym in sorted(free_symbols(inputs), key=str):
        lo: int | None = None
        hi: int | None = None
        if env is not None and sym in env.var_to_range:
            vr = env.var_to_range[sym]
            lo = finite_bound(vr.lower)
            hi = finite_bound(vr.upper)
        out[str(sym)] = [lo, hi]
    return out


def finite_bound(value: Any) -> int | None:
    """A range bound as an int, or None for an unbounded side (torch's `int_oo` claims
    `is_finite`, so the conversion itself is the test)."""
    try:
        bound = int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    return bound if abs(bound) < 2**62 else None


# Ops a size-and-constant subgraph may use for `evaluate_at_example_sizes`: creation,
# arithmetic, layout and casts; nothing that reads a tensor input or depends on data.
_EVALUABLE = {
    _aten.arange.default, _aten.arange.start, _aten.arange.start_step, _aten.full.default,
    _aten.scalar_tensor.default, _aten.zeros.default, _aten.ones.default,
    _aten.mul.Tensor, _aten.mul.Scalar, _aten.add.Tensor, _aten.add.Scalar, _aten.sub.Tensor,
    _aten.sub.Scalar, _aten.div.Tensor, _aten.div.Scalar, _aten.pow.Tensor_Tensor, _aten.pow.Tensor_Scalar,
    _aten.pow.Scalar, _aten.reciprocal.default, _aten.neg.default,
    _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.squeeze.dims, _aten.squeeze.default, _aten.slice.Tensor, _aten.expand.default,
    _aten.repeat.default, _aten.clone.default, _aten.alias.default, _aten._to_copy.default, _aten.cat.default,
    torch.ops.prims.convert_element_type.default,
}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def size_hint(value: Any) -> int | None:
    """The example value of a SymInt (the size the graph was traced at), or an int itself."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        return None if hint is None else int(hint)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def evaluate_at_example_sizes(node: fx.Node, widen_floats: bool = True) -> torch.Tensor | None:
    """The value `node` takes at the graph's example sizes (the SymInts' hints), on the CPU and
    in float64 wherever the graph computes in a float dtype (in the graph's own float dtypes
    without `widen_floats`), when it depends on nothing but sizes and constants (aranges, fills,
    arithmetic, layout ops, casts: say an ALiBi bias built from the sequence length); None when
    it reads a tensor input or uses any other op."""
    env: dict[fx.Node, Any] = {}

    def widen(value: Any) -> Any:
        return torch.float64 if widen_floats and value in _FLOAT_DTYPES else value

    def visit(cur: fx.Node) -> bool:  # post-order: a node's inputs are evaluated before it
        if cur in env:
            return True
        hint = size_hint(cur.meta.get("val"))
        if hint is not None:  # a size: its example value, whatever computed it
            env[cur] = hint
            return True
        if cur.op != "call_function" or cur.target not in _EVALUABLE:
            return False
        if not all(visit(n) for n in cur.all_input_nodes):
            return False
        args = fx.node.map_arg(cur.args, lambda n: env[n])
        kwargs = {key: ("cpu" if key == "device" else widen(value))
                  for key, value in fx.node.map_arg(cur.kwargs, lambda n: env[n]).items()}
        if cur.target is torch.ops.prims.convert_element_type.default:
            args = (args[0], widen(args[1]))
        env[cur] = cur.target(*args, **kwargs)
        return True

    with unset_fake_temporarily():  # real numbers, even while a pass runs under fake tensors
        if not visit(node):
            return None
    value = env[node]
    return value if isinstance(value, torch.Tensor) else None


# Ops that move or copy a tensor's values without changing them (casts: only between the wide
# float dtypes, which `holds_no_lowest_value` checks).
_VALUE_KEEPING = {
    _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.squeeze.dims, _aten.squeeze.default, _aten.slice.Tensor, _aten.select.int,
    _aten.expand.default, _aten.repeat.default, _aten.clone.default, _aten.alias.default, _aten.contiguous.default,
    _aten.permute.default, _aten.transpose.int, _aten._to_copy.default, torch.ops.prims.convert_element_type.default,
}
# Float dtypes whose largest value is float32's or more.
_WIDE_FLOATS = (torch.bfloat16, torch.float32, torch.float64)


def holds_no_lowest_value(node: Any, factor: float = 1.0) -> bool:
    """Whether every value of `factor * node` is provably finite and at most 2^100 in size: far
    from any float dtype's lowest value (which masks use to hide keys), and absorbed by it (the
    lowest value plus such a number is that value in bfloat16, float32 and float64, whose
    spacing there is 2^104 or more). That is an integer tensor (at most 2^63 in size) times a
    tensor of numbers only, scaled by numbers, behind layout ops and casts, all in bfloat16 or a
    wider float (BLOOM's and Falcon's ALiBi, `slopes * positions` counted along a padding mask),
    with every value on the way within the bound (the numbers as the graph computes them, in
    their own dtypes, then the product and each scale in turn: an overflow to inf is not undone
    by a scale after it). Anything else read from data, or computed in float16, is not."""
    scales: list[float] = []  # the numbers met, from the outermost in
    while isinstance(node, fx.Node) and node.op == "call_function":
        val = node.meta.get("val")
        if not (isinstance(val, torch.Tensor) and val.dtype in _WIDE_FLOATS):
            return False
        if node.target in _VALUE_KEEPING:
            node = node.args[0]
            continue
        if node.target in (_aten.mul.Tensor, _aten.div.Tensor) and len(node.args) == 2:
            scale = constant_number(node.args[1])
            if scale is not None and isinstance(node.args[0], fx.Node):  # scaled by a number
                if not math.isfinite(scale) or (node.target is _aten.div.Tensor and scale == 0):
                    return False
                scales.append(scale if node.target is _aten.mul.Tensor else 1.0 / scale)
                node = node.args[0]
                continue
        if node.target is not _aten.mul.Tensor:
            return False
        for data, numbers in (node.args[:2], node.args[1::-1]):
            dv = data.meta.get("val") if isinstance(data, fx.Node) else None
            if not (isinstance(dv, torch.Tensor) and isinstance(numbers, fx.Node)) or dv.is_floating_point() or dv.is_complex():
                continue
            if depends_on_sizes(numbers):
                return False  # numbers that depend on a size or an input
            # In the dtypes the graph computes them in (float64 would hide an overflow to inf).
            value = evaluate_at_example_sizes(numbers, widen_floats=False)
            if value is None:
                return False
            with unset_fake_temporarily():
                largest = value.abs().max().item() if value.numel() else 0.0
            # Every value the chain computes, not only its last: the product, then each scale
            # from the innermost out (a scale down after an overflow leaves the inf).
            bound = 2.0**63 * largest
            for scale in (*reversed(scales), factor):
                if not (math.isfinite(bound) and bound <= 2.0**100):
                    return False
                bound *= abs(scale)
            return math.isfinite(bound) and bound <= 2.0**100
        return False
    return False


# Ops a constant passes through unchanged on its way to an attention (export's copies of a lifted
# constant, casts).
_CONSTANT_COPIES = {
    _aten.clone.default, _aten.lift_fresh_copy.default, _aten.detach.default, _aten.detach_.default,
    _aten._to_copy.default, torch.ops.prims.convert_element_type.default,
}


def constant_number(node: Any) -> float | None:
    """The value of a number, or of a one-element tensor the graph holds as a constant (an
    attribute, or `scalar_tensor` of a number) reached through copies and casts; None when the
    value is only known at run time (a graph input, say)."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    values = constant_values(node, max_values=1)
    return values[0] if values is not None and len(values) == 1 else None


def constant_values(node: Any, max_values: int | None = None) -> tuple[float, ...] | None:
    """The values of a tensor the graph holds as a constant (an attribute, a parameter, or
    `scalar_tensor` or a one-element `full`, `zeros` or `ones`), reached through copies, casts and reshapes (each cast
    applied: `tensor(-inf).bool()` holds True), flattened; None when they are only known at run time, or when there
    are more than `max_values`."""
    casts: list[torch.dtype] = []
    while isinstance(node, fx.Node) and node.op == "call_function" and (
            node.target in _CONSTANT_COPIES or node.target in (_aten.view.default, _aten.reshape.default)):
        out = node.meta.get("val")
        if isinstance(out, torch.Tensor) and node.target in (_aten._to_copy.default, torch.ops.prims.convert_element_type.default):
            casts.append(out.dtype)
        node = node.args[0]
    values = _constant_source_values(node, max_values)
    if values is None or not casts:
        return values
    source = node.meta.get("val") if isinstance(node, fx.Node) else None
    with unset_fake_temporarily():  # each cast applied to the values, as the graph applies it
        t = torch.tensor(values, dtype=source.dtype if isinstance(source, torch.Tensor) else torch.float64)
        for dtype in reversed(casts):
            t = t.to(dtype)
        return tuple(float(x) for x in t.tolist())


def _constant_source_values(node: Any, max_values: int | None) -> tuple[float, ...] | None:
    """`constant_values` of the node its copies and casts start from, as that node holds them."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is _aten.scalar_tensor.default:
        value = constant_number(node.args[0])
        return None if value is None else (value,)
    if node.op == "call_function" and node.target in (_aten.zeros.default, _aten.ones.default) and all(
            isinstance(d, int) and d == 1 for d in node.args[0]):  # `torch.zeros(())`: one number
        return (0.0 if node.target is _aten.zeros.default else 1.0,)
    if node.op == "call_function" and node.target is _aten.full.default and all(
            isinstance(d, int) and d == 1 for d in node.args[0]):  # `torch.full((), v)`: one number
        value = constant_number(node.args[1])
        return None if value is None else (value,)
    if node.op == "get_attr":
        value = node.graph.owning_module
        for name in str(node.target).split("."):
            value = getattr(value, name, None)
        if isinstance(value, torch.Tensor) and (max_values is None or value.numel() <= max_values):
            with unset_fake_temporarily():  # a real attribute, even while a pass runs under fake tensors
                return tuple(float(x) for x in value.detach().flatten().tolist())
    return None
