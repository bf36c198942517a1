"""The `tileflow` command line."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import click
import torch

from .capture import error_summary
from .config import BUILTIN_PASSES, DEFAULT_PASSES, option_from_text
from .pipeline import available_passes


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tileflow")
def main() -> None:
    """tileflow: a torch.compile backend and ahead-of-time compiler for LLM serving."""


@main.command("passes")
def passes_command() -> None:
    """List the passes that `options={"passes": [...]}` can name: the built-in ones in the order
    they run (those a compile without a `passes` option runs here marked: TILEFLOW_PASSES's when
    it is set), then any registered in this process (a custom pass registers where its module is
    imported, so from the shell: none)."""
    names = available_passes()
    # A compile reads TILEFLOW_PASSES when its options name no passes: marking the built-in
    # default instead would list passes that this environment's compiles do not run.
    raw = os.environ.get("TILEFLOW_PASSES")
    try:
        default = DEFAULT_PASSES if raw is None else option_from_text("passes", raw, "TILEFLOW_PASSES")
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    for name in [*(p for p in BUILTIN_PASSES if p in names), *(p for p in names if p not in BUILTIN_PASSES)]:
        click.echo(f"{name}  (default)" if name in default else name)


@main.command("report")
@click.argument("source", metavar="REPORT_JSON", type=click.Path(exists=True))
def report_command(source: str) -> None:
    """Print a report as tables: a debug_dir's report.json (or the debug_dir itself, or one
    graph's folder or report.json in it), or an archive from `tileflow export`."""
    from .report import GraphReport, Report

    path = Path(source)
    if path.is_dir():
        if not (path / "report.json").is_file():
            from .viz import no_report_hint

            hint = no_report_hint(path) or "; give a debug_dir, one of its graph folders, or a report.json"
            click.echo(f"error: {source} is a folder without a report.json{hint}", err=True)
            sys.exit(2)
        path = path / "report.json"
    try:
        if zipfile.is_zipfile(path):
            from .export import MANIFEST_MEMBER

            with zipfile.ZipFile(path) as zf:
                manifest = json.loads(zf.read(MANIFEST_MEMBER))
            data = manifest.get("report") if isinstance(manifest, dict) else None
            if data is None:  # else "'NoneType' object has no attribute 'get'" would say it
                raise ValueError(f"its {MANIFEST_MEMBER} has no report")
        elif path.suffix == ".pt2" and path.is_file():
            # Else read as JSON: "Expecting value: line 1 column 1" would not say what is wrong.
            click.echo(f"error: {source} is not a readable tileflow archive (truncated or not a zip file); "
                       "re-export it", err=True)
            sys.exit(2)
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {type(data).__name__}, not a report object")
        if "graph_id" in data and "graphs" not in data:
            # One graph's report.json (DIR/graph_NNN/report.json): the same data, one graph,
            # counted as a recompile when it was one (as viz counts it).
            graph = GraphReport.from_dict(data)
            report = Report(graphs=[graph], recompiles=int(bool(graph.recompile)))
        else:
            report = Report.from_dict(data)
        text = str(report)
    except OSError as exc:  # a file that exists but cannot be read (permissions, an I/O error)
        click.echo(f"error: cannot read {exc.filename or path}: {exc.strerror or exc}", err=True)
        sys.exit(2)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, zipfile.BadZipFile, zlib.error,
            EOFError) as exc:
        # AttributeError: not an object; KeyError: an archive without a manifest; ValueError: bad JSON or values.
        click.echo(f"error: {source} is not a tileflow report: {exc}", err=True)
        sys.exit(2)
    click.echo(text)


# ---------------------------------------------------------------------------------------------
# tileflow export


class LogitsOnly(torch.nn.Module):
    """Export wrapper of a causal LM: input_ids -> logits, no KV cache (a cache object is not an
    exportable output)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's logits for `input_ids` [B, S], computed without a KV cache."""
        return self.model(input_ids, use_cache=False).logits


class SpecError(Exception):
    """A SPEC (or its options) that cannot be used; the message says what to fix (one line)."""


def _parse_dynamic(items: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """`NAME=MIN:MAX` strings -> {name: (min, max)}."""
    out: dict[str, tuple[int, int]] = {}
    for item in items:
        m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+)\s*:\s*(\d+)\s*", item)
        if not m:
            raise SpecError(f"--dynamic {item!r} must look like NAME=MIN:MAX, e.g. seq=2:512")
        lo, hi = int(m.group(2)), int(m.group(3))
        if lo >= hi:
            # torch.export.Dim needs a range: one size is a static dim (drop its --dynamic).
            raise SpecError(f"--dynamic {item!r}: MIN {lo} must be below MAX {hi} (for one fixed size, leave the "
                            "dim static: drop this --dynamic)")
        if m.group(1) in out:
            raise SpecError(f"--dynamic {m.group(1)} is given twice ({out[m.group(1)][0]}:{out[m.group(1)][1]} and "
                            f"{lo}:{hi}): give each dim once")
        out[m.group(1)] = (lo, hi)
    return out


def _parse_options(items: tuple[str, ...]) -> dict[str, Any]:
    """`key=value` strings -> tileflow options, each value read as its option's environment
    variable is (`true`/`True`/`1`, numbers, comma-separated passes)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--options {item!r} must look like key=value, e.g. max_tokens=4096")
        try:
            out[key.strip()] = option_from_text(key.strip(), raw, f"--options {key.strip()}")
        except ValueError as exc:
            raise SpecError(str(exc)) from None
    return out


def _transformers_config_path(spec: str) -> Path | None:
    """The config.json a SPEC names (a folder holding one, or the file itself), else None."""
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    if path.is_file() and path.suffix == ".json":
        return path
    return None


def _build_transformers(config_json: Path, seq_len: int | None, batch: int | None, dynamic: dict[str, tuple[int, int]]):
    """A random-weight causal LM from a local config, wrapped so forward(input_ids) -> logits.
    The example sizes (`seq_len`, `batch`; None: a default inside the ranges) must lie inside
    the dynamic ranges, and a dynamic dim's example must be at least 2 (torch.export fixes a dim
    it sees at 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(config_json))
        lm = AutoModelForCausalLM.from_config(cfg).eval()
    except Exception as exc:  # transformers' errors are long: keep the first line
        raise SpecError(f"cannot build a causal LM from {config_json}: {error_summary(exc)}") from None

    unknown = sorted(set(dynamic) - {"seq", "batch"})
    if unknown:
        raise SpecError(f"--dynamic names {unknown} are not dims of input_ids; use seq and/or batch")
    max_pos = getattr(cfg, "max_position_embeddings", None) or 512
    seq_lo, seq_hi = dynamic.get("seq", (2, max_pos))
    dims: dict[int, Any] = {1: torch.export.Dim("seq", min=seq_lo, max=seq_hi)}
    seq_len = _example_size("--seq-len", seq_len, 8, "seq", (max(seq_lo, 2), seq_hi))
    if "batch" in dynamic:
        dims[0] = torch.export.Dim("batch", min=dynamic["batch"][0], max=dynamic["batch"][1])
        batch = _example_size("--batch", batch, 2, "batch", (max(dynamic["batch"][0], 2), dynamic["batch"][1]))
    batch = batch or 1
    vocab = int(getattr(cfg, "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, (batch, seq_len))
    return LogitsOnly(lm), (ids,), ({**dims},)


def _example_size(option: str, given: int | None, default: int, dim: str, allowed: tuple[int, int]) -> int:
    """An example size inside `allowed`: the one `option` gave (else SpecError), or `default`
    moved inside."""
    lo, hi = allowed
    if lo > hi:
        raise SpecError(f"the {dim} range needs an example size of at least 2 inside it (torch.export fixes a dim "
                        f"it sees at 1): widen --dynamic {dim}=MIN:MAX to reach 2")
    if given is None:
        return min(max(default, lo), hi)
    if not lo <= given <= hi:
        raise SpecError(f"{option} {given} lies outside the {dim} sizes [{lo}, {hi}] the export may trace (a dynamic "
                        f"dim's example must be in its range and at least 2): pick {option} in it")
    return given


def _apply_dynamic(dynamic_shapes: Any, dynamic: dict[str, tuple[int, int]], where: str) -> Any:
    """Replace each Dim named in `dynamic` (anywhere in `dynamic_shapes`) by one with the new range."""
    if not dynamic:
        return dynamic_shapes
    if dynamic_shapes is None:
        raise SpecError(f"--dynamic was given but {where} returned no dynamic_shapes to name dims from")
    found: set[str] = set()
    replacements: dict[str, Any] = {}

    def replaced(name: str) -> Any:
        found.add(name)
        if name not in replacements:
            lo, hi = dynamic[name]
            replacements[name] = torch.export.Dim(name, min=lo, max=hi)
        return replacements[name]

    def walk(obj: Any) -> Any:
        name = getattr(obj, "__name__", None)
        root = getattr(obj, "root", None)
        if name is not None and root is not None and hasattr(obj, "fn"):
            # A derived Dim (`2 * n`) keeps its root: rebuild it over the new root, else it
            # keeps the old range and torch.export sees two ranges for one dim.
            if getattr(root, "__name__", None) in dynamic:
                return type(obj)(name, replaced(root.__name__), obj.fn)
            return obj
        if name is not None and hasattr(obj, "min") and hasattr(obj, "max"):
            return replaced(name) if name in dynamic else obj
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(walk(v) for v in obj)
        return obj

    out = walk(dynamic_shapes)
    missing = sorted(set(dynamic) - found)
    if missing:
        raise SpecError(f"--dynamic names {missing} are not Dims in the dynamic_shapes {where} returned")
    return out


def output_problem(path: Path) -> str | None:
    """Why the file `path` could not be written (its folder is created as needed), else None."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"{folder} is not writable ({exc.strerror or exc})"
    return None


def _load_spec_function(spec: str, dynamic: dict[str, tuple[int, int]]):
    """Import `package.module:function`, call it, and check what it returned."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise SpecError(
            f"SPEC {spec!r} is neither package.module:function nor a transformers config "
            "(a folder with config.json, or a config.json path)"
        )
    # Like `python -m`, let a module in the current folder be found from the console script.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SpecError(f"SPEC {spec!r}: cannot import module {module_name!r} ({exc}); check the name and that it is on PYTHONPATH") from None
    except Exception as exc:
        raise SpecError(f"SPEC {spec!r}: importing {module_name!r} raised {error_summary(exc)}") from None
    func = getattr(module, func_name, None)
    if func is None:
        raise SpecError(f"SPEC {spec!r}: module {module_name!r} has no attribute {func_name!r}")
    if not callable(func):
        raise SpecError(f"SPEC {spec!r}: {func_name!r} is a {type(func).__name__}, not a function")
    try:
        result = func()
    except Exception as exc:
        raise SpecError(f"SPEC {spec!r}: {func_name}() raised {error_summary(exc)}; fix the function") from None
    shape_hint = "it must return (model, example_args) or (model, example_args, dynamic_shapes)"
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        what = f"a {len(result)}-tuple" if isinstance(result, (tuple, list)) else f"a {type(result).__name__}"
        raise SpecError(f"SPEC {spec!r}: {func_name}() returned {what}; {shape_hint}")
    model, args = result[0], result[1]
    dynamic_shapes = result[2] if len(result) == 3 else None
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"SPEC {spec!r}: {func_name}() returned a {type(model).__name__} as the model; {shape_hint} with an nn.Module model")
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise SpecError(f"SPEC {spec!r}: example_args is a {type(args).__name__}; make it a tuple of inputs")
    return model, tuple(args), _apply_dynamic(dynamic_shapes, dynamic, f"{func_name}()")


@main.command("export")
@click.argument("spec")
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="archive to write (e.g. model.pt2); with --target ascend, a folder for the archive and the Ascend C project")
@click.option("--target", type=click.Choice(["reference", "triton", "ascend"]), default=None, help="kernel target (default: the options' target, else TILEFLOW_TARGET, else reference)")
@click.option("--dynamic", "dynamic", multiple=True, metavar="NAME=MIN:MAX", help="range of a named dynamic dim (repeatable)")
@click.option("--options", "options", multiple=True, metavar="KEY=VALUE", help="a tileflow option (repeatable)")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="example sequence length (transformers configs; default 8, kept inside the seq range)")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="example batch size (transformers configs; default 1, or 2 inside a dynamic batch range)")
def export_command(spec: str, output: str, target: str | None, dynamic: tuple[str, ...], options: tuple[str, ...],
                   seq_len: int | None, batch: int | None) -> None:
    """Compile a model ahead of time into a tileflow archive that `tileflow.load` runs.

    SPEC is `package.module:function` returning (model, example_args[, dynamic_shapes]), or a
    transformers config (a folder with config.json, or its path): the model is built from it with
    random weights and exported as input_ids [batch, seq] -> logits, with seq dynamic.
    """
    import warnings

    from .export import STAGES, export_model

    # torch's own pytree deprecation warnings would drown the progress lines; they are not ours.
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    try:
        ranges = _parse_dynamic(dynamic)
        opts = _parse_options(options)
        if target is not None:
            opts["target"] = target
        if "target" not in opts and "TILEFLOW_TARGET" not in os.environ:
            opts["target"] = "reference"
        from .config import Config

        try:
            # The options, then TILEFLOW_* variables (TILEFLOW_TARGET too), then the defaults.
            target = Config.from_options(opts).target
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        config_json = _transformers_config_path(spec)
        if config_json is not None:
            model, args, dyn = _build_transformers(config_json, seq_len, batch, ranges)
        else:
            if seq_len is not None or batch is not None:
                # The function builds its own example inputs: ignoring these would archive sizes
                # the user did not ask for, without a word.
                given = " and ".join(o for o, v in (("--seq-len", seq_len), ("--batch", batch)) if v is not None)
                raise SpecError(f"{given} applies only to a transformers config SPEC; {spec} is a function, "
                                "which returns its own example_args: size them there")
            model, args, dyn = _load_spec_function(spec, ranges)
        if target != "ascend" and (Path(output).is_dir() or output.endswith(("/", os.sep))):
            raise SpecError(f"{output} is a folder; give the archive's file name (e.g. model.pt2)")
        # Checked before the compile, which can take minutes, rather than after it.
        problem = output_problem(Path(output) / "model.pt2" if target == "ascend" else Path(output))
        if problem:
            raise SpecError(f"cannot write {output}: {problem}")
    except SpecError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)

    start = time.perf_counter()

    def progress(stage: str) -> None:
        # Plain step lines on stderr: stdout keeps only the result line, for scripts.
        n = STAGES.index(stage) + 1 if stage in STAGES else "?"
        click.echo(f"[{n}/{len(STAGES)}] {stage}  ({time.perf_counter() - start:.1f}s)", err=True)

    try:
        archive = export_model(model, args, dyn, options=opts, progress=progress)
        if target == "ascend":
            # The archive and the Ascend C project side by side in one folder.
            from .export import write_ascend_project

            # The project first: it refuses a graph without tileflow kernels before writing
            # anything, and then no archive is left as if the export had worked.
            project = write_ascend_project(archive, output)
            path = archive.save(Path(output) / "model.pt2")
        else:
            path = archive.save(output)
    except Exception as exc:  # export/compile failures: one line, what failed (TILEFLOW_LOG=debug for more)
        click.echo(f"error: export failed: {error_summary(exc)}", err=True)
        sys.exit(1)
    m = archive.manifest
    rewrites = ", ".join(f"{k}={v}" for k, v in sorted(m["rewrites"].items())) or "none"
    dims = ", ".join(f"{k} in [{lo}, {hi}]" for k, (lo, hi) in m["dynamic"].items()) or "none"
    click.echo(f"done in {time.perf_counter() - start:.1f}s", err=True)
    click.echo(f"wrote {path} (target={m['target']}; dynamic: {dims}; rewrites: {rewrites}; {len(archive.kernels)} kernel file(s))")
    if target == "ascend":
        click.echo(f"wrote the Ascend C project ({len(project)} files) into {output}: build it with CMake on an Ascend machine (see {Path(output) / 'README.md'})")


def _attach_subcommands() -> None:
    """`tileflow plan ...` and `tileflow viz` live beside their code; attach them here."""
    from .planner import plan
    from .viz import viz_command

    main.add_command(plan)
    main.add_command(viz_command)


_attach_subcommands()


if __name__ == "__main__":
    main()
