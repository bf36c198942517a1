"""Ahead-of-time export: a model -> tileflow's passes -> a self-checking archive -> `tileflow.load`.

`export_model` runs `torch.export`, brings the program to tileflow's ATen form (`capture_exported`),
runs the same pipeline as `torch.compile(backend="tileflow")` (`compile_graph`: passes, tile plans,
kernels), then re-exports the REWRITTEN graph, so the saved `.pt2` program calls
`tileflow::padded_gemm` / `tileflow::meta_attention` with their plans baked into the arguments.

The archive is a zip:

    program.pt2     torch.export.save of the rewritten program
    manifest.json   versions, target, dynamic ranges, input specs, report, tile plans, content hash
    kernels/...     kernel sources the target emitted (when it writes any)

`load(path)` checks the archive (format, tileflow major version, content hash, target runtime),
`torch.export.load`s the program and returns a callable that validates inputs against the recorded
dtypes and ranges. It never traces with Dynamo and never re-runs a pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import sympy
import torch
import torch.utils._pytree as pytree

from .capture import capture_exported, export_failure, export_program
from .compiler import compile_graph
from .config import Config
from .report import Report

# 2: the content hash covers the manifest too, and inputs that are not tensors record their value.
ARCHIVE_FORMAT = 2
PROGRAM_MEMBER = "program.pt2"
MANIFEST_MEMBER = "manifest.json"
KERNELS_PREFIX = "kernels/"

ProgressFn = Callable[[str], None]
STAGES = ("export", "passes", "kernels", "packaging")


def _tileflow_version() -> str:
    from . import __version__

    return __version__


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "__version__", None)


@dataclass
class ExportedArchive:
    """What `export_model` produced; `save(path)` writes it as a tileflow archive (zip).

    Attributes:
        program: the rewritten ExportedProgram (tileflow's custom ops in its graph).
        manifest: the manifest, without the content hash (added by `save`).
        report: the compiler's report for the exported graph.
        kernels: kernel file name -> source bytes, as the target emitted them.
    """

    program: torch.export.ExportedProgram
    manifest: dict[str, Any]
    report: Report
    kernels: dict[str, bytes] = field(default_factory=dict)

    def members(self) -> dict[str, bytes]:
        """Every archive member except the manifest, by name."""
        buf = io.BytesIO()
        torch.export.save(self.program, buf)
        members = {PROGRAM_MEMBER: buf.getvalue()}
        for name, data in sorted(self.kernels.items()):
            members[KERNELS_PREFIX + name] = data
        return members

    def save(self, path: str | Path) -> Path:
        """Write the archive to `path` (parent folders are created) and return the path."""
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder: give the archive's file name (e.g. {path / 'model.pt2'})")
        path.parent.mkdir(parents=True, exist_ok=True)
        members = self.members()
        # As it will read back (JSON types), so the hash the reader computes is this one.
        manifest = json.loads(json.dumps(self.manifest, default=str))
        manifest["members"] = sorted(members)
        manifest["content_sha256"] = content_hash(members, manifest)
        # Write to a temporary name first so an interrupted save never leaves a half archive
        # under the real name, nor a stale partial one (one per process: two saves never share it).
        tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(MANIFEST_MEMBER, json.dumps(manifest, indent=2))
                for name, data in members.items():
                    zf.writestr(name, data)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def write_ascend_project(archive: ExportedArchive, out_dir: str | Path) -> list[Path]:
    """Write the Ascend C project (kernels, tiling, operator bindings, CMake) for the archive's
    kernels into `out_dir`; see `tileflow.backends.ascend.project`. Returns the files written."""
    from .backends.ascend import render_sources
    from .backends.ascend.project import write_project
    from .kernel_spec import KernelSpec

    specs: dict[KernelSpec, None] = {}
    for graph in archive.report.graphs:
        for record in graph.kernels:
            if record.spec is not None:
                specs.setdefault(KernelSpec.from_dict(record.spec), None)
    if not specs:
        raise ValueError("the exported graph has no tileflow kernels, so there is no Ascend C project to write")
    return write_project([render_sources(spec) for spec in specs], Path(out_dir))


def content_hash(members: Mapping[str, bytes], manifest: Mapping[str, Any]) -> str:
    """sha256 over the manifest (all but this hash, as canonical JSON) and the members' names
    and bytes, in name order: editing the recorded inputs, ranges or versions is detected as
    surely as editing the program."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in manifest.items() if k != "content_sha256"}, sort_keys=True).encode())
    for name in sorted(members):
        data = members[name]
        h.update(name.encode())
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# export


def export_model(
    model: torch.nn.Module,
    example_args: Sequence[Any],
    dynamic_shapes: Any = None,
    *,
    options: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> ExportedArchive:
    """Export `model` ahead of time through tileflow's passes.

    `example_args` and `dynamic_shapes` are as for `torch.export.export` (`dynamic_shapes` may be
    a tuple aligned with the args or a dict keyed by `forward`'s parameter names; each tensor's
    entry maps dim index -> `torch.export.Dim`). `options` are tileflow options (`Config`), e.g.
    `{"target": "reference"}`. `progress(stage)` is called as each stage starts
    (export, passes, kernels, packaging). The model is put in eval mode. Returns an
    `ExportedArchive`; call `.save(path)`.
    """
    notify = progress or (lambda stage: None)
    # A lone tensor is one input (tuple() would split it into its rows).
    example_args = (example_args,) if isinstance(example_args, torch.Tensor) else tuple(example_args)
    # An archive holds the rewritten graph only: the nano-batch schedule and CUDA graphs live in
    # the runtime of a torch.compile'd model, so an archive made with them would run without them.
    config = Config.from_options(options)  # (first: it refuses options that are no mapping)
    options = dict(options or {})
    user_debug_dir = config.debug_dir  # from the options or TILEFLOW_DEBUG_DIR
    if "nanobatch" in config.passes or config.cuda_graphs:
        raise ValueError("tileflow export does not archive nano-batching or CUDA graphs (the 'nanobatch' pass, "
                         "cuda_graphs=True): drop them from the options, or use torch.compile(backend='tileflow')")
    # Ascend C kernels are emitted, not built: CANN may not be on the exporting machine.
    emit_only = config.target == "ascend"
    if config.verify and emit_only:
        raise ValueError("verify=True runs each pass's output on the example inputs, but an export for target "
                         "'ascend' only emits its kernels here: drop verify, or check the archive where CANN runs it")

    try:
        inspect.signature(model.forward).bind(*example_args)
    except TypeError as exc:
        # torch.export would blame the dynamic ranges: the archive takes positional inputs only.
        raise ValueError(f"example_args do not fit {type(model).__name__}.forward ({exc}): an archive takes "
                         "positional inputs only, so give each input in example_args (a keyword-only one "
                         "through a wrapper module whose forward takes it by position)") from None

    notify("export")
    model = model.eval()
    with torch.no_grad():
        try:
            try:
                ep = export_program(model, example_args, dynamic_shapes)
            except ValueError:
                raise
            except Exception:
                # pytree flattens the outputs, and knows no dataclass its owner did not register:
                # register those the model returns (as NamedTuples are named) and export again.
                if not _register_returned_dataclasses(model, example_args):
                    raise
                ep = export_program(model, example_args, dynamic_shapes)
        except ValueError:
            raise  # a refusal with its reason (tileflow's, or the model's own)
        except Exception as exc:
            raise export_failure(exc, "the model cannot be exported over the given dynamic ranges") from exc

    notify("passes")
    captured = capture_exported(ep)
    captured.range_constraints = _ranges_the_program_accepts(captured.gm, captured.range_constraints)
    names = _dim_names(model, example_args, dynamic_shapes, captured.example_inputs)
    _check_position_tables(captured.gm, captured.range_constraints, names)
    tmp_dir = None if user_debug_dir else tempfile.mkdtemp(prefix="tileflow-export-")
    try:
        config = config.replace(debug_dir=user_debug_dir or tmp_dir)
        report = Report()
        # The exported module takes the example args as the model does, so they are the real
        # inputs `verify` checks each pass on.
        compile_graph(captured.gm, captured.example_inputs, config, report, compile_id="export",
                      emit_only=emit_only, real_inputs=example_args if config.verify else None)
        graph_report = report.graphs[-1]

        notify("kernels")
        kernels: dict[str, bytes] = {}
        kdir = Path(graph_report.debug_dir) / "kernels" if graph_report.debug_dir else None
        if kdir is not None:
            if kdir.is_dir():
                for f in sorted(kdir.rglob("*")):
                    if f.is_file():
                        kernels[f.relative_to(kdir).as_posix()] = f.read_bytes()
    finally:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    notify("packaging")
    # Re-export the rewritten module: tileflow's ops have fake impls, so torch.export traces them
    # as opaque calls and the saved program carries them (plans and target are string args).
    symbols = _symbol_table(captured.example_inputs, captured.range_constraints, names)
    flat_args, spec = pytree.tree_flatten(example_args)
    leaf_shapes = [_leaf_dynamic_shape(v, symbols) for v in captured.example_inputs]
    if len(leaf_shapes) != len(flat_args):
        # Re-exporting without the ranges would silently make the program static: refuse.
        raise RuntimeError(
            f"the exported program has {len(leaf_shapes)} user inputs but example_args flatten to "
            f"{len(flat_args)}; pass the inputs as a flat tuple of tensors"
        )
    with torch.no_grad():
        program = export_program(captured.gm, example_args, pytree.tree_unflatten(leaf_shapes, spec))

    manifest = _manifest(program, report, graph_report.target, symbols, captured.example_inputs, kernels, kdir)
    return ExportedArchive(program=program, manifest=manifest, report=report, kernels=kernels)


def _ranges_the_program_accepts(gm: torch.fx.GraphModule, ranges: Mapping[str, tuple[int, int | None]],
                                max_steps: int = 64) -> dict[str, tuple[int, int | None]]:
    """`ranges`, each narrowed from its ends past the sizes the program's runtime asserts refuse.

    `export_program`'s retry turns guards torch.export could not prove into runtime asserts, and
    some of them are real: MPT slices its ALiBi table at `max(0, max_seq_len - s)` and the trace
    asserts the start is not 0, so a program exported for seq in [2, max_seq_len] stops at
    max_seq_len with an assert naming an internal symbol. Recording the range it accepts makes
    `LoadedProgram.check_inputs` refuse that size by name instead. Only single-symbol asserts are
    read, and only at the ends: up to `max_steps` sizes in from each, and past that (or with no
    max) the top by bisection when what it cuts off is a tail of refused sizes."""
    narrowed = dict(ranges)
    for expr in _asserted_conditions(gm.graph):
        if len(expr.free_symbols) != 1:
            continue
        sym = next(iter(expr.free_symbols))
        if str(sym) not in narrowed:
            continue
        lo, hi = narrowed[str(sym)]
        declared_lo = lo

        def refused(size: int) -> bool:
            return _refuses(expr, {sym: size})

        for _ in range(max_steps):
            if (hi is not None and lo >= hi) or not refused(lo):
                break
            lo += 1
        if refused(lo) and (hi is None or lo < hi):
            # More than `max_steps` refused sizes at the bottom: the first accepted one, when the
            # sizes before it are a head of refused ones; else the range stays as declared.
            lo = _first_accepted(refused, lo, hi, max_steps)
            if refused(lo):
                lo = declared_lo
        for _ in range(max_steps):
            if hi is None or hi <= lo or not refused(hi):
                break
            hi -= 1
        if not refused(lo) and (hi is None or hi > lo and refused(hi)):
            # More than `max_steps` refused sizes at the top, or no top at all (a Dim without
            # max): the last accepted size, found by bisection, when every size from it to the
            # first refused one past `max_steps` is refused (a tail, not a pattern such as Mod).
            hi = _last_accepted(refused, lo, hi, max_steps)
        narrowed[str(sym)] = (lo, hi)
    return narrowed


# Ops that carry an index tensor's values unchanged (`_largest_value`).
_SAME_VALUES = {torch.ops.aten.unsqueeze.default, torch.ops.aten.view.default, torch.ops.aten.reshape.default,
                torch.ops.aten.expand.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default,
                torch.ops.aten.squeeze.dim, torch.ops.aten.alias.default}


def _check_position_tables(gm: torch.fx.GraphModule, ranges: Mapping[str, tuple[int, int | None]],
                           names: Mapping[str, str]) -> None:
    """Refuse a dynamic range past a learned position table: GPT-2 looks `wpe` (n_positions rows)
    up at `arange(seq)`, so a program declared for longer sequences would fail at every call
    past the table (an index error; on a GPU a device-side assert) though its range accepts
    them. Raises ValueError naming the dim, the table and the largest size it holds."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.embedding.default:
            continue
        table = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        last = _largest_value(node.args[1])
        if table is None or last is None or not isinstance(table.shape[0], int):
            continue
        rows = int(table.shape[0])
        if len(last.free_symbols) != 1 or str(next(iter(last.free_symbols))) not in ranges:
            continue
        sym = next(iter(last.free_symbols))
        lo, hi = ranges[str(sym)]

        def refused(size: int) -> bool:  # the last position is past the table
            return bool(last.xreplace({sym: sympy.Integer(size)}) >= rows)

        top = hi if hi is not None else max(lo, rows) + 1
        if not refused(top):
            continue
        name = names.get(str(sym), str(sym))
        what = (f"the model looks its {rows}-row table {node.args[0].name} up at positions up to "
                f"{last.xreplace({sym: sympy.Symbol(name)})}")
        if refused(lo):
            raise ValueError(f"no {name} in the declared range [{lo}, {hi}] fits: {what}")
        good, _ = _bisected(refused, lo, top)
        if good == lo:  # a range of one size is no dynamic dim (`--dynamic seq=8:8` is refused)
            raise ValueError(f"{name} may reach {hi if hi is not None else 'any size'}, but {what}, so only {name} = "
                             f"{lo} fits: declare {name} with a smaller min and max={good} (--dynamic {name}=2:{good})"
                             if good > 2 else f"no dynamic {name} fits: {what}")
        raise ValueError(f"{name} may reach {hi if hi is not None else 'any size'}, but {what}, so {name} "
                         f"may be at most {good}: declare {name} with max={good} (--dynamic {name}={lo}:{good})")


def _largest_value(index: Any) -> sympy.Expr | None:
    """The largest value `index` holds when it counts positions as models build them, else None:
    `arange(start, end)` (step 1) holds up to `end - 1`; OPT's `cumsum(ones(n)) * ones - 1`, up
    to `n - 1`; views and copies keep it, integer shifts and non-negative constant scales move it."""
    if not isinstance(index, torch.fx.Node) or index.op != "call_function":
        return None
    target, args = index.target, index.args
    if target in _SAME_VALUES:
        return _largest_value(args[0])
    if target in (torch.ops.aten.add.Tensor, torch.ops.aten.add.Scalar, torch.ops.aten.sub.Tensor,
                  torch.ops.aten.sub.Scalar):
        top = _largest_value(args[0])
        if top is None or not isinstance(args[1], int) or index.kwargs.get("alpha", 1) != 1:
            return None
        return top + args[1] if target in (torch.ops.aten.add.Tensor, torch.ops.aten.add.Scalar) else top - args[1]
    if target in (torch.ops.aten.mul.Tensor, torch.ops.aten.mul.Scalar):
        for values, scale in ((args[0], args[1]), (args[1], args[0])):
            factor = _constant_fill(scale)
            top = _largest_value(values)
            if factor is not None and factor >= 0 and top is not None:
                return top * sympy.nsimplify(factor)
        return None
    if target in (torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step):
        end = _size_expr(args[0] if target is torch.ops.aten.arange.default else args[1])
        step = args[2] if target is torch.ops.aten.arange.start_step and len(args) > 2 else 1
        return end - 1 if end is not None and step == 1 else None
    if target is torch.ops.aten.cumsum.default:  # a running count of a constant c >= 0 along dim
        fill = _constant_fill(args[0])
        counted = args[0].meta.get("val") if isinstance(args[0], torch.fx.Node) else None
        dim = args[1] if len(args) > 1 else index.kwargs.get("dim")
        length = _size_expr(counted.shape[dim]) if isinstance(counted, torch.Tensor) and isinstance(dim, int) else None
        return length * sympy.nsimplify(fill) if fill is not None and fill >= 0 and length is not None else None
    return None


def _constant_fill(value: Any) -> float | None:
    """The one value a number or a `full(shape, c)` holds, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, torch.fx.Node) and value.target is torch.ops.aten.full.default:
        fill = value.args[1]
        return fill if isinstance(fill, (int, float)) and not isinstance(fill, bool) else None
    return None


def _size_expr(size: Any) -> sympy.Expr | None:
    """A size (an int, a SymInt, or a node computing one) as a sympy expression, else None."""
    value = size.meta.get("val") if isinstance(size, torch.fx.Node) else size
    if isinstance(value, torch.SymInt):
        return sympy.sympify(value.node.expr)
    return sympy.Integer(value) if isinstance(value, int) else None


def _refuses(expr: Any, sizes: Mapping[Any, int]) -> bool:
    """Whether the asserted condition `expr` is false at these sizes (symbol -> size); one that
    cannot be evaluated there (a division by a size of 0) counts as false."""
    try:
        return expr.xreplace({sym: sympy.Integer(int(size)) for sym, size in sizes.items()}) is sympy.false
    except (ZeroDivisionError, ArithmeticError, TypeError):
        return True


def _first_accepted(refused: Callable[[int], bool], lo: int, hi: int | None, max_steps: int,
                    limit: int = 1 << 62) -> int:
    """The smallest size in [lo, hi] (`lo` refused; `hi` None: unbounded) after a head of refused
    sizes from `lo`, or `lo` itself when there is no accepted size or the refusals are not such
    a head (a pattern such as Mod)."""
    step = 1
    while lo + step <= (hi if hi is not None else limit) and refused(lo + step):
        step *= 2
    good = lo + step if lo + step <= (hi if hi is not None else limit) else hi
    if good is None or refused(good):
        return lo
    good, _ = _bisected(refused, good, lo)
    probes = [*range(lo, min(lo + max_steps, good)), (lo + good) // 2, good - 1]
    return good if all(refused(size) for size in probes if size < good) else lo


def _bisected(refused: Callable[[int], bool], accepted: int, rejected: int) -> tuple[int, int]:
    """An accepted size and a refused one (either order) narrowed to neighbours by bisection."""
    while abs(rejected - accepted) > 1:
        mid = (accepted + rejected) // 2
        if refused(mid):
            rejected = mid
        else:
            accepted = mid
    return accepted, rejected


def _last_accepted(refused: Callable[[int], bool], lo: int, hi: int | None, max_steps: int,
                   limit: int = 1 << 62) -> int | None:
    """The largest size in [lo, hi] (`lo` accepted, `hi` refused or None: unbounded) before a
    tail of refused sizes that reaches `hi`, or `hi` itself when the refusals are not such a tail."""
    top, step = hi, 1
    if top is None:  # probe upwards until a size is refused
        while lo + step <= limit and not refused(lo + step):
            step *= 2
        if lo + step > limit:
            return None
        top = lo + step
    good, top = _bisected(refused, lo, top)
    far = hi if hi is not None else min(limit, 2 * top + max_steps)
    probes = [*range(top, min(top + max_steps, far) + 1), far, (top + far) // 2]
    return good if all(refused(size) for size in probes) else hi


def _normalize_dynamic_shapes(model: torch.nn.Module, n_args: int, dynamic_shapes: Any) -> list[Any]:
    """`dynamic_shapes` as a list aligned with the positional args (None where not given)."""
    if dynamic_shapes is None:
        return [None] * n_args
    if isinstance(dynamic_shapes, dict):
        params = [p for p in inspect.signature(model.forward).parameters]
        return [dynamic_shapes.get(name) for name in params[:n_args]]
    shapes = list(dynamic_shapes)
    return shapes + [None] * (n_args - len(shapes))


def _dim_names(model: torch.nn.Module, example_args: tuple, dynamic_shapes: Any, fake_inputs: Sequence[Any]) -> dict[str, str]:
    """Size symbol (e.g. `s27`) -> the user's Dim name (e.g. `seq`), where it can be matched; an
    int input's symbol -> its parameter's name (`forward`'s, for a flat argument)."""
    names: dict[str, str] = {}
    per_arg = _normalize_dynamic_shapes(model, len(example_args), dynamic_shapes)
    leaf_specs = [spec for arg, shape_spec in zip(example_args, per_arg) for spec in _leaf_specs(arg, shape_spec)]
    params = list(inspect.signature(model.forward).parameters)
    flat = len(leaf_specs) == len(example_args)
    for i, (spec, fake) in enumerate(zip(leaf_specs, fake_inputs)):
        if isinstance(fake, torch.SymInt) and fake.node.expr.is_Symbol and flat and i < len(params):
            names.setdefault(str(fake.node.expr), params[i])
        if not isinstance(fake, torch.Tensor) or not isinstance(spec, (dict, list, tuple)):
            continue
        items = spec.items() if isinstance(spec, dict) else enumerate(spec)
        for dim, dim_spec in items:
            size = fake.shape[dim]
            if not isinstance(size, torch.SymInt):
                continue
            name = getattr(dim_spec, "__name__", None)
            if not name and size.node.expr.is_Symbol:
                # A `Dim.DYNAMIC` / `Dim.AUTO` has no name: say where the dim is, not torch's `s77`.
                name = f"{params[i] if flat and i < len(params) else f'input{i}'}_dim{dim}"
            if name:
                names.setdefault(str(size.node.expr), name)
    return names


def _leaf_specs(arg: Any, shape_spec: Any) -> list[Any]:
    """`shape_spec` for each leaf of `arg` in pytree order (None where it gives none): a list,
    tuple or dict input comes with a spec of the same structure."""
    if isinstance(arg, (list, tuple)):
        specs = shape_spec if isinstance(shape_spec, (list, tuple)) and len(shape_spec) == len(arg) else [None] * len(arg)
        return [leaf for a, sp in zip(arg, specs) for leaf in _leaf_specs(a, sp)]
    if isinstance(arg, dict):
        specs = shape_spec if isinstance(shape_spec, dict) else {}
        return [leaf for key, a in arg.items() for leaf in _leaf_specs(a, specs.get(key))]
    return [shape_spec]


@dataclass
class _Symbol:
    name: str
    lo: int
    hi: int | None
    dim: Any = None


def _symbol_table(fake_inputs: Sequence[Any], ranges: Mapping[str, tuple[int, int | None]], names: Mapping[str, str]) -> dict[str, _Symbol]:
    """Every plain size symbol of the inputs (a tensor's dim, or an int input) -> its user-facing
    name, range and the re-export's Dim. A derived size (`2*s`, `s+1`) is not one: the re-export
    works its relation out again (`_leaf_dynamic_shape`)."""
    table: dict[str, _Symbol] = {}
    for fake in fake_inputs:
        sizes = fake.shape if isinstance(fake, torch.Tensor) else [fake] if isinstance(fake, torch.SymInt) else []
        for size in sizes:
            if not isinstance(size, torch.SymInt) or not size.node.expr.is_Symbol:
                continue
            key = str(size.node.expr)
            if key in table or key not in ranges:
                continue
            lo, hi = ranges[key]
            name = names.get(key, key)
            if isinstance(fake, torch.SymInt):
                # torch.export takes no named Dim for an int input: the range is re-derived.
                table[key] = _Symbol(name=name, lo=lo, hi=hi, dim=torch.export.Dim.DYNAMIC)
                continue
            kwargs = {"min": lo} if hi is None else {"min": lo, "max": hi}
            table[key] = _Symbol(name=name, lo=lo, hi=hi, dim=torch.export.Dim(re.sub(r"\W", "_", name), **kwargs))
    return table


def _leaf_dynamic_shape(fake: Any, symbols: Mapping[str, _Symbol]) -> Any:
    """The re-export's dynamic_shapes entry for one input leaf: dim -> Dim for symbolic dims (an
    int input: its Dim, or None, fixed at its value)."""
    if isinstance(fake, torch.SymInt):
        sym = symbols.get(str(fake.node.expr))
        return sym.dim if sym is not None else None
    if not isinstance(fake, torch.Tensor):
        return None
    spec: dict[int, Any] = {}
    for i, size in enumerate(fake.shape):
        if isinstance(size, torch.SymInt):
            sym = symbols.get(str(size.node.expr))
            spec[i] = sym.dim if sym is not None else _derived_dim(size.node.expr, symbols)
    return spec or None


def _derived_dim(expr: Any, symbols: Mapping[str, _Symbol]) -> Any:
    """A derived size `a*s + b` of one symbol as the same Dim arithmetic (torch.export wants the
    relation spelled out); any other one as `Dim.AUTO`, for torch.export to work out."""
    if len(expr.free_symbols) == 1 and (base := symbols.get(str(next(iter(expr.free_symbols))))) is not None:
        sym = next(iter(expr.free_symbols))
        coeff, const = expr.coeff(sym), expr.subs(sym, 0)
        if expr.is_polynomial(sym) and sympy.degree(expr, sym) == 1 and coeff.is_Integer and const.is_Integer:
            dim = base.dim if coeff == 1 else base.dim * int(coeff)
            return dim if const == 0 else dim + int(const)
    return torch.export.Dim.AUTO


def _size_name(size: Any, symbols: Mapping[str, _Symbol]) -> int | str:
    """A dim's size as the manifest records it: a number, a symbol's name, or a derived size as
    an expression of the names (`2*n`)."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    expr = size.node.expr
    if str(expr) in symbols:
        return symbols[str(expr)].name
    if all(str(s) in symbols for s in expr.free_symbols):
        return str(expr.xreplace({s: sympy.Symbol(symbols[str(s)].name, integer=True) for s in expr.free_symbols}))
    return str(expr)


def _input_specs(fake_inputs: Sequence[Any], symbols: Mapping[str, _Symbol]) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    for fake in fake_inputs:
        if isinstance(fake, torch.SymInt):
            # An int input kept dynamic, or fixed at its example value by the re-export.
            key = str(fake.node.expr)
            specs.append({"kind": "int", "dim": symbols[key].name} if key in symbols else
                         {"kind": "int", "value": int(fake.node.hint)})
            continue
        if not isinstance(fake, torch.Tensor):
            spec: dict[str, Any] = {"kind": type(fake).__name__}
            # torch.export specializes these: the program holds the value it was exported with.
            if fake is None or isinstance(fake, (bool, int, float, str)):
                spec["value"] = fake
            specs.append(spec)
            continue
        specs.append({"kind": "tensor", "shape": [_size_name(size, symbols) for size in fake.shape],
                      "dtype": str(fake.dtype).replace("torch.", ""), "device": fake.device.type})
    return specs


def _manifest(
    program: torch.export.ExportedProgram,
    report: Report,
    target: str,
    symbols: Mapping[str, _Symbol],
    fake_inputs: Sequence[Any],
    kernels: Mapping[str, bytes],
    kernel_dir: Path | None,
) -> dict[str, Any]:
    graph = report.graphs[-1]
    report_data = report.to_dict()
    # Kernel paths pointed into a temporary folder: point them at the archive's copies instead
    # (the path under the kernels folder: an Ascend project keeps its op_kernel/ and op_host/).
    for g in report_data["graphs"]:
        for k in g.get("kernels", []):
            if k.get("source_path"):
                source = Path(k["source_path"])
                inside = kernel_dir is not None and source.is_relative_to(kernel_dir)
                k["source_path"] = KERNELS_PREFIX + (source.relative_to(kernel_dir).as_posix() if inside else source.name)
    ops = sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function" and str(n.target).startswith("tileflow.")})
    named = _named_containers(program)
    return {
        "format": ARCHIVE_FORMAT,
        "tileflow_version": _tileflow_version(),
        "torch_version": torch.__version__,
        "triton_version": _triton_version(),
        "target": target,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dynamic": {s.name: [s.lo, s.hi] for s in symbols.values()},
        "inputs": _input_specs(fake_inputs, symbols),
        "rewrites": graph.rewrites,
        "tileflow_ops": ops,
        "plans": graph.plans,
        "kernels": sorted(kernels),
        "pytree_modules": _pytree_modules(program, named),
        "pytree_containers": named,
        "report": report_data,
    }


def _container_types(program: torch.export.ExportedProgram) -> list[type]:
    """The classes of the program's input and output containers, outer first (a NamedTuple's
    own class, which pytree keeps in its spec's context under one `namedtuple` node type)."""
    found: list[type] = []
    pending = [spec for spec in (program.call_spec.in_spec, program.call_spec.out_spec) if spec is not None]
    while pending:
        spec = pending.pop(0)
        cls = spec.context if _is_namedtuple_class(spec.context) else spec.type
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
        pending.extend(spec.children())
    return found


def _is_namedtuple_class(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, tuple) and hasattr(value, "_fields")


def _is_dataclass_class(value: Any) -> bool:
    return isinstance(value, type) and dataclasses.is_dataclass(value)


def _pytree_modules(program: torch.export.ExportedProgram, named: Sequence[Mapping[str, str]] = ()) -> list[str]:
    """The modules that define the containers of the program's inputs and outputs other than
    Python's own and those tileflow `named` (a transformers `CausalLMOutputWithPast`):
    `torch.export.load` rebuilds them only when their module has registered them with pytree,
    which transformers' lazy modules have not done in a fresh process until something imports
    them, so `load` imports these. (`load` finds the named ones itself, with its own errors.)"""
    ours = {(e["module"], e["qualname"]) for e in named}
    return sorted({cls.__module__ for cls in _container_types(program)
                   if (cls.__module__, cls.__qualname__) not in ours} - {"builtins", "collections"})


# The container classes tileflow registered with pytree for saving, by class: their saved name.
_NAMED_CONTAINERS: dict[type, str] = {}


def _named_containers(program: torch.export.ExportedProgram) -> list[dict[str, str]]:
    """Give each NamedTuple among the program's containers a name to be saved under, its module
    and qualified name (`torch.export.save` refuses a NamedTuple without one, which only its
    owner could register), and list those tileflow named (these and the dataclasses of
    `_register_returned_dataclasses`) for the manifest: `load` finds each class again by module
    and name, as pickle does, and registers it under the same name."""
    named: list[dict[str, str]] = []
    for cls in _container_types(program):
        if _is_namedtuple_class(cls) and cls not in pytree.SUPPORTED_SERIALIZED_TYPES:
            _register_container_as(cls, _qualified_name(cls))
        if cls in _NAMED_CONTAINERS:
            named.append({"kind": "namedtuple" if _is_namedtuple_class(cls) else "dataclass", "module": cls.__module__,
                          "qualname": cls.__qualname__, "serialized_name": _NAMED_CONTAINERS[cls]})
    return named


def _register_returned_dataclasses(model: torch.nn.Module, example_args: tuple) -> bool:
    """Register with pytree, under their module and qualified names, the dataclasses `model`
    returns for `example_args` that pytree does not know (torch.export cannot flatten them); say
    whether there were any. The model runs once on fake tensors, so nothing it writes in place
    (a buffer, an input) changes; a model that fails to run so has none (the export's own error
    stands). A dataclass torch.export would rebuild wrongly is refused (ValueError)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            pending = [model(*pytree.tree_map_only(torch.Tensor, mode.from_tensor, example_args))]
    except Exception:
        return False
    found: list[type] = []
    seen: set[int] = set()
    while pending:
        for leaf in pytree.tree_leaves(pending.pop()):
            cls = type(leaf)
            if not _is_dataclass_class(cls) or cls in pytree.SUPPORTED_NODES or id(leaf) in seen:
                continue
            seen.add(id(leaf))  # (each instance's fields walked: a class may nest others only in some)
            if cls not in found:
                found.append(cls)
            pending.extend(getattr(leaf, f.name) for f in dataclasses.fields(leaf))
    for cls in found:
        _check_rebuildable(cls)
    for cls in found:
        _register_container_as(cls, _qualified_name(cls))
    return bool(found)


def _check_rebuildable(cls: type) -> None:
    """Refuse a dataclass that torch.export would rebuild wrongly: it flattens the constructor's
    fields and calls the constructor, so a field outside it (`init=False`) would come back as
    its default and an init-only variable (`InitVar`) would be missing."""
    fields = dataclasses.fields(cls)
    outside = [f.name for f in fields if not f.init]
    names = {f.name for f in fields}
    init_only = [p for p in inspect.signature(cls.__init__).parameters if p != "self" and p not in names]
    if outside or init_only:
        parts = ([f"field(s) {outside} set outside its constructor (init=False)"] if outside else []) + (
            [f"init-only variable(s) {init_only}"] if init_only else [])
        raise ValueError(f"the model returns the dataclass {cls.__qualname__} of {cls.__module__}, with "
                         f"{' and '.join(parts)}: torch.export rebuilds a dataclass through its constructor from its "
                         "constructor's fields, so an archive would return it wrong; make them constructor fields, or "
                         "return a tuple or dict")


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _register_container_as(cls: type, name: str) -> None:
    """Register a NamedTuple or dataclass with pytree to be saved under `name`. A class of that
    module and name that tileflow registered before (a notebook cell run again, a reloaded
    module) keeps its registration (programs holding it still run and save), and the name now
    loads as the new class, as pickle would find it."""
    old = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(name)
    if old is not None and _NAMED_CONTAINERS.get(old) != name:
        raise ValueError(f"the program's inputs or outputs hold {cls.__qualname__} of {cls.__module__}, but pytree "
                         f"saves {old!r} under its name {name!r}: rename {cls.__qualname__}")
    if cls in pytree.SUPPORTED_SERIALIZED_TYPES and _NAMED_CONTAINERS.get(cls) is None:
        owner = pytree.SUPPORTED_SERIALIZED_TYPES[cls].serialized_type_name
        raise RuntimeError(f"{cls.__qualname__} of {cls.__module__} is registered with pytree in this process under "
                           f"{owner!r}, not {name!r} as the archive saved it: load it where its module does not "
                           "register it, or re-export it here")
    if _is_namedtuple_class(cls):
        pytree._register_namedtuple(cls, serialized_type_name=name)
    else:
        torch.export.register_dataclass(cls, serialized_type_name=name)
    _NAMED_CONTAINERS[cls] = name


def _register_containers(path: str | Path, named: Any) -> list[type]:
    """Register the manifest's containers (`_named_containers`) under the names their program was
    saved with, finding each class by module and qualified name (one only this process can
    reach, defined inside a function, as this process saved it); return the classes."""
    keys = ("kind", "module", "qualname", "serialized_name")
    if not isinstance(named, list) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), str) for k in keys) for e in named):
        raise ValueError(f"{path}: its manifest's pytree_containers is not a list of {', '.join(keys)} strings; "
                         "re-export it")
    classes: list[type] = []
    for entry in named:
        name = entry["serialized_name"]
        kind = "NamedTuple" if entry["kind"] == "namedtuple" else "dataclass"
        where = f"the {kind} {entry['qualname']} of module {entry['module']}"
        cls: Any = None
        try:
            cls = importlib.import_module(entry["module"])
            for part in entry["qualname"].split("."):
                cls = getattr(cls, part)
        except Exception as exc:
            if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
                classes.append(pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE[name])
                continue
            raise RuntimeError(
                f"{path}: the program's inputs or outputs are {where}, which this process cannot find "
                f"({type(exc).__name__}: {exc}). load finds it by module and name, as pickle does: define it at the "
                "top level of an importable module (or of the loading script, for __main__) before loading") from None
        if not (_is_namedtuple_class(cls) if entry["kind"] == "namedtuple" else _is_dataclass_class(cls)):
            raise RuntimeError(f"{path}: the program's inputs or outputs are {where}, but that name is now {cls!r}")
        if pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(name) is not cls:
            _register_container_as(cls, name)
        classes.append(cls)
    return classes


# ---------------------------------------------------------------------------------------------
# load


class LoadedProgram:
    """A loaded tileflow archive: call it like the exported model (positional tensor args)."""

    def __init__(self, manifest: dict[str, Any], program: torch.export.ExportedProgram, path: str) -> None:
        self.manifest = manifest
        self.program = program
        self.path = path
        self.module = program.module()
        self._size_checks = _size_checks(program, manifest)
        # The (input, dim) sizes the checks read, and the size tuples already accepted: sympy
        # costs about 10 us per assert, a dict lookup per call once a size has been seen.
        self._checked_dims = sorted({(i, d) for _, dims in self._size_checks for i, d, _ in dims.values()})
        self._accepted_sizes: set[tuple[int, ...]] = set()

    def check_inputs(self, args: Sequence[Any]) -> None:
        """Raise ValueError when `args` (as the model takes them: lists and dicts of tensors too)
        do not match the archive's recorded inputs. Inputs are numbered as leaves, in order."""
        specs = self.manifest["inputs"]
        leaves = pytree.tree_leaves(tuple(args))
        if len(leaves) != len(specs):
            raise ValueError(f"the archive {self.path} takes {len(specs)} input(s), got {len(leaves)}")
        ranges = self.manifest.get("dynamic", {})
        bound: dict[str, tuple[int, str]] = {}
        derived: list[tuple[str, int, str]] = []

        def within(name: str, size: int, where: str) -> None:
            lo, hi = ranges.get(name, [None, None])
            if (lo is not None and size < lo) or (hi is not None and size > hi):
                # torch.export takes a `Dim.DYNAMIC` or `Dim.AUTO` dim to be >= 2 (0 and 1 specialize).
                hint = (f": torch.export takes a dynamic dim to be at least 2 unless its Dim says otherwise; export "
                        f"with torch.export.Dim(..., min={size}) for it to take {size}") if lo == 2 and size < 2 else ""
                raise ValueError(f"{where} is {size} but the archive was exported for {name} in [{lo}, {hi}]{hint}")
            if name in bound and bound[name][0] != size:
                raise ValueError(f"{where} is {size} but {bound[name][1]} (the same dim {name}) is {bound[name][0]}")
            bound.setdefault(name, (int(size), where))

        for i, (arg, spec) in enumerate(zip(leaves, specs)):
            if spec.get("kind") == "int" and "dim" in spec:
                if isinstance(arg, bool) or not isinstance(arg, int):
                    raise ValueError(f"input {i} must be an int ({spec['dim']}), got {type(arg).__name__}")
                within(spec["dim"], arg, f"input {i}")
                continue
            if spec.get("kind") != "tensor":
                if "value" in spec and not (type(arg).__name__ == spec["kind"] and arg == spec["value"]):
                    got = f"a tensor of shape {list(arg.shape)}" if isinstance(arg, torch.Tensor) else repr(arg)
                    raise ValueError(f"input {i} is {got} but the archive was exported with it fixed at "
                                     f"{spec['value']!r} (its program has that value built in)")
                continue
            if not isinstance(arg, torch.Tensor):
                raise ValueError(f"input {i} must be a tensor, got {type(arg).__name__}")
            dtype = str(arg.dtype).replace("torch.", "")
            if dtype != spec["dtype"]:
                raise ValueError(f"input {i} has dtype {dtype} but the archive was exported for {spec['dtype']}")
            if "device" in spec and arg.device.type != spec["device"]:
                raise ValueError(f"input {i} is on {arg.device.type} but the archive's program runs on {spec['device']} "
                                 f"(its weights are there): move the input to {spec['device']}")
            shape = spec["shape"]
            if arg.dim() != len(shape):
                raise ValueError(f"input {i} has {arg.dim()} dims but the archive was exported for {len(shape)} ({shape})")
            for d, (size, want) in enumerate(zip(arg.shape, shape)):
                where = f"input {i} dim {d}"
                if isinstance(want, int):
                    if size != want:
                        raise ValueError(f"{where} is {size} but the archive was exported with it fixed at {want}")
                elif want in ranges or _derived_names(want) == [want]:
                    within(want, int(size), where)
                else:
                    derived.append((want, int(size), where))
        for want, size, where in derived:  # sizes derived from others (`2*n`), once those are bound
            expr = sympy.sympify(want, locals={n: sympy.Symbol(n, integer=True) for n in _derived_names(want)})
            value = expr.xreplace({sym: sympy.Integer(bound[str(sym)][0]) for sym in expr.free_symbols
                                   if str(sym) in bound})
            if value.is_number and int(value) != size:
                raise ValueError(f"{where} is {size} but the archive was exported with it at {want} = {int(value)}")
        key = tuple(int(leaves[i].shape[d]) for i, d in self._checked_dims)
        if key in self._accepted_sizes:
            return
        for expr, dims in self._size_checks:
            sizes = {sym: leaves[i].shape[d] for sym, (i, d, _) in dims.items()}
            if _refuses(expr, sizes):
                named = expr.xreplace({sym: sympy.Symbol(name, integer=True) for sym, (_, _, name) in dims.items()})
                where = ", ".join(f"input {i} dim {d} is {sizes[sym]}" for sym, (i, d, _) in dims.items())
                raise ValueError(f"{where}, which the program refuses: the model's trace requires {named} "
                                 "(a runtime check torch.export kept for these sizes); use other sizes")
        if len(self._accepted_sizes) < 4096:
            self._accepted_sizes.add(key)

    def __call__(self, *args: Any) -> Any:
        self.check_inputs(args)
        # Inference only: tileflow's ops have no autograd formulas.
        with torch.no_grad():
            return self.module(*args)

    def __repr__(self) -> str:
        return f"LoadedProgram({self.path!r}, target={self.manifest.get('target')!r}, dynamic={self.manifest.get('dynamic')})"


def _derived_names(text: str) -> list[str]:
    """The names in a manifest's size (`seq`, or `2*n + 1` for a derived one)."""
    return re.findall(r"[A-Za-z_]\w*", text)


def _size_checks(program: torch.export.ExportedProgram, manifest: Mapping[str, Any]) -> list[tuple[Any, dict[Any, tuple[int, int, str]]]]:
    """The program's runtime asserts on its input sizes (`_assert_scalar` of an expression over
    the user inputs' symbolic dims), each with its symbols' (input, dim, name in the manifest):
    `LoadedProgram.check_inputs` evaluates them before a call, so a size the model's trace
    refuses anywhere in the recorded range is refused by name instead of by an assert on an
    internal symbol mid-run."""
    # The user inputs' placeholders by position: the graph signature's `user_inputs` names a
    # constant input (None, an int) by its value, not its placeholder, so a name filter would
    # drop it and shift every later input onto the manifest's entry before it.
    from torch.export.graph_signature import InputKind

    placeholders = [n for n, s in zip((n for n in program.graph.nodes if n.op == "placeholder"),
                                      program.graph_signature.input_specs) if s.kind == InputKind.USER_INPUT]
    dims: dict[Any, tuple[int, int, str]] = {}
    for i, (node, spec) in enumerate(zip(placeholders, manifest.get("inputs", []))):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or spec.get("kind") != "tensor":
            continue
        for d, (size, name) in enumerate(zip(val.shape, spec["shape"])):
            if isinstance(size, torch.SymInt) and isinstance(name, str) and size.node.expr.is_Symbol:
                dims.setdefault(size.node.expr, (i, d, name))
    return [(expr, {sym: dims[sym] for sym in expr.free_symbols}) for expr in _asserted_conditions(program.graph)
            if expr.free_symbols and expr.free_symbols <= dims.keys()]


def _asserted_conditions(graph: torch.fx.Graph) -> list[Any]:
    """The sympy conditions of the graph's runtime asserts (`_assert_scalar` of a SymBool)."""
    conditions = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten._assert_scalar.default:
            val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
            if isinstance(val, torch.SymBool):
                conditions.append(val.node.expr)
    return conditions


def _major(version: str) -> str:
    """The part of a version that must match to read an archive: the major version, and the
    minor one too before 1.0 (0.x releases may change what they write)."""
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2]) if parts[0] == "0" else parts[0]


def read_archive(path: str | Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read and verify an archive: (manifest, members). Raises ValueError naming what is wrong."""
    path = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if MANIFEST_MEMBER not in names:
                raise ValueError(f"{path} is not a tileflow archive: it has no {MANIFEST_MEMBER}")
            manifest = json.loads(zf.read(MANIFEST_MEMBER))
            members = {n: zf.read(n) for n in names if n != MANIFEST_MEMBER and not n.endswith("/")}
    except FileNotFoundError:
        raise FileNotFoundError(f"no tileflow archive at {path}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        inside = os.path.join(path, "model.pt2")
        if os.path.isdir(path) and os.path.isfile(inside):  # `export --target ascend` writes a folder
            raise ValueError(f"{path} is a folder: load the archive in it, {inside}") from None
        raise ValueError(f"{path} is not a readable tileflow archive (truncated or not a zip file: {exc}); re-export it") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} has a corrupt {MANIFEST_MEMBER}: {exc}; re-export it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{path} has archive format {got!r}; this tileflow reads format {ARCHIVE_FORMAT}")
    made_by, here = str(manifest.get("tileflow_version", "?")), _tileflow_version()
    if _major(made_by) != _major(here):
        raise ValueError(f"{path} was exported by tileflow {made_by}, incompatible with tileflow {here} (version "
                         f"{_major(made_by)} vs {_major(here)}); re-export it")
    if PROGRAM_MEMBER not in members:
        raise ValueError(f"{path} has no {PROGRAM_MEMBER}; re-export it")
    digest = content_hash(members, manifest)
    if digest != manifest.get("content_sha256"):
        raise ValueError(
            f"{path} is corrupt or was modified: the content hash {digest[:12]}… does not match the "
            f"manifest's {str(manifest.get('content_sha256'))[:12]}…; re-export it"
        )
    return manifest, members


def load(path: str | Path) -> LoadedProgram:
    """Load a tileflow archive written by `tileflow export` / `export_model(...).save(path)`.

    Checks the archive (format, tileflow major version, content hash) and that its target's
    runtime is available here, then `torch.export.load`s the rewritten program. The returned
    callable validates inputs against the recorded dtypes and dynamic ranges (ValueError) and runs
    the program; no Dynamo tracing or pass happens here. Loading imports the modules that define
    the program's input and output containers (as the manifest names them) and runs the
    program: load only archives you trust, as with any exported program.
    """
    from .targets import get_backend

    manifest, members = read_archive(path)
    target = manifest.get("target", "reference")
    try:
        ok, why = get_backend(target).available()
    except (ValueError, ImportError) as exc:
        ok, why = False, str(exc)
    if not ok:
        raise RuntimeError(f"{path} was exported for target {target!r}, which cannot run here: {why}")
    for module in manifest.get("pytree_modules", []):
        # The program's input and output containers must be registered with pytree before
        # torch.export.load rebuilds them (its own error only says to read its warnings).
        if not isinstance(module, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module):
            raise ValueError(f"{path} names {module!r} as a module of its containers, which is no module name; "
                             "re-export it")
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise RuntimeError(f"{path}: the program's inputs or outputs are containers of {module}, which cannot be "
                               f"imported here ({type(exc).__name__}: {exc}); install what provides it") from None
    containers = _register_containers(path, manifest.get("pytree_containers", []))
    try:
        # The program keeps its example inputs, pickled: a container among them is a global that
        # torch.load's weights-only unpickler refuses (it fell back to a full unpickle, with a
        # logging error) unless allowed.
        with torch.serialization.safe_globals(containers):
            program = torch.export.load(io.BytesIO(members[PROGRAM_MEMBER]))
    except Exception as exc:  # a torch-internal failure: say which file and why, in one line
        raise RuntimeError(
            f"{path}: torch.export could not load {PROGRAM_MEMBER} (torch {torch.__version__}, exported with "
            f"torch {manifest.get('torch_version')}): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    return LoadedProgram(manifest, program, str(path))
