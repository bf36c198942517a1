"""`tileflow viz`: one self-contained HTML page showing what the pass pipeline did.

SOURCE is a `debug_dir` written by the pass manager (every pass's before/after graph as JSON and
code, kernel sources, `report.json`) or an archive from `tileflow export` (report and kernel
sources only). Everything the page needs is computed here, at report time, and embedded as one
JSON document: node lists deduplicated across passes, nodes grouped by nn.Module path, a Graphviz
`dot` layout per group (so the browser never lays out thousands of nodes), the added/removed/changed
marks of each pass and a unified diff of the readable code. The page itself
(`viz_template.html`) is vanilla JS and CSS with no external references, so it works offline from
a single file.
"""

from __future__ import annotations

import difflib
import hashlib
import html
import json
import math
import re
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import click

from .graph_layout import LayoutInput, layout_all, layout_engine
from .kernel_spec import EPILOGUES, ROUNDED_DTYPES

__all__ = ["VizError", "build_html", "collect", "debug_dir_root", "output_conflict", "render", "viz_command", "write_html"]

TEMPLATE_NAME = "viz_template.html"
TITLE_TOKEN = "__TILEFLOW_TITLE__"
DATA_TOKEN = "__TILEFLOW_DATA__"

# String arguments longer than this (the tile plan JSON of a padded_gemm) are shortened: the plan
# is shown readably from the node's `tileflow` metadata instead.
MAX_ARG_CHARS = 160
# Groups with more items than this are listed, not drawn: a few hundred boxes is where an SVG
# drawing stops being readable anyway.
MAX_DRAWN_ITEMS = 400
# Kernel tags that must agree between a padded_gemm node and a kernel's epilogue for a link: every
# epilogue a GEMM can fuse (one list, kernel_spec's, so a new activation cannot be missed here) but
# the cast, which follows the dtypes rather than an argument of the node (`round` follows the node's
# round_first and the dtype).
_EPILOGUE_TAGS = frozenset(EPILOGUES) - {"cast"}
# A lone surrogate: how Python decodes a path's non-UTF-8 bytes (and how JSON's "\udce9" reads
# back). UTF-8 cannot encode it, so the page must not carry it raw.
_SURROGATE = re.compile("[\ud800-\udfff]")


class VizError(Exception):
    """SOURCE cannot be visualized; the message (one line) says why."""


# ---------------------------------------------------------------------------------------------
# public API


def collect(source_path: str | Path) -> dict[str, Any]:
    """The data the page embeds, read from a debug_dir, a report.json in one, or an archive."""
    path = Path(source_path)
    if not path.exists():
        raise VizError(f"{path} does not exist; pass a debug_dir or an archive from `tileflow export`")
    if path.is_dir():
        data = _from_debug_dir(path)
    elif zipfile.is_zipfile(path):
        data = _from_archive(path)
    elif path.suffix == ".json":
        data = _from_debug_dir(path.parent, report_file=path)
    else:
        raise VizError(f"{path} is neither a debug_dir, a report.json nor a tileflow archive (.pt2 zip)")
    data["layout"] = layout_engine()
    return data


def build_html(source_path: str | Path) -> str:
    """The whole page for SOURCE as one HTML string (data, script and style inlined)."""
    return render(collect(source_path))


def render(data: dict[str, Any]) -> str:
    """The page for data from `collect`."""
    template = resources.files("tileflow").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    title = html.escape(_SURROGATE.sub("\ufffd", f"tileflow viz: {data['source']['path']}"))
    # Split at the data token first: the title (a path) and the data may both contain either
    # token's text, and neither may be mistaken for the template's own.
    head, _, tail = template.partition(DATA_TOKEN)
    return head.replace(TITLE_TOKEN, title) + script_json(data) + tail


def write_html(source_path: str | Path, out_path: str | Path) -> Path:
    """Write `build_html(source_path)` to `out_path` (parent folders are created); return it."""
    out = Path(out_path)
    text = build_html(source_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


def script_json(data: Any) -> str:
    """JSON safe to place inside `<script type="application/json">`.

    `<`, `>` and `&` become `\\u003c`-style escapes, which JSON.parse reads back unchanged, so a
    `</script>` anywhere in user data (a source line, a kernel) cannot end the script element.
    Lone surrogates (a path's undecodable bytes) are escaped the same way: raw, they would make
    the page unwritable as UTF-8.
    """
    text = json.dumps(_page_safe(data), separators=(",", ":"), default=str, ensure_ascii=False, allow_nan=False)
    text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# JSON.parse reads every number as a double, exact up to 2**53 only.
_MAX_EXACT_INT = 2**53


def _page_safe(value: Any) -> Any:
    """Values the page's JSON.parse reads back as written: `float("-inf")` (a mask fill value) ->
    "-inf" (JSON.parse rejects Python's `-Infinity`), and an int past 2**53 (9223372036854775807,
    the slice-to-end of every HF graph, showed as 9223372036854776000) -> its digits as a string,
    which the page shows as they are (only strings starting with "%" are node references)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_EXACT_INT:
        return str(value)
    if isinstance(value, dict):
        return {k: _page_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_page_safe(v) for v in value]
    return value


@click.command("viz")
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
    show_default=True, help="HTML file to write",
)
def viz_command(source: Path, output: Path) -> None:
    """Write one self-contained HTML page showing what tileflow's passes did.

    SOURCE is a debug_dir (`options={"debug_dir": DIR}`) or an archive from `tileflow export`.
    The page needs no server and no network: open it in a browser.
    """
    from .cli import output_problem  # here: cli imports this module

    try:
        conflict = output_conflict(source, output)
    except OSError as exc:  # a debug_dir that cannot be listed
        raise click.ClickException(f"cannot read {exc.filename or source}: {exc.strerror or exc}") from None
    if conflict:
        raise click.ClickException(f"-o {output} {conflict}; write the page elsewhere (e.g. -o report.html)")
    # Checked before reading SOURCE, which can take a while on a deep model.
    problem = output_problem(output)
    if problem:
        raise click.ClickException(f"cannot write {output}: {problem}")
    try:
        try:
            data = collect(source)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a field of the wrong kind
            raise VizError(f"{source} holds a malformed tileflow report ({type(exc).__name__}: {exc}); regenerate "
                           "it with this tileflow") from None
        except OSError as exc:  # the readers name the file they fail on; this is a last resort
            raise VizError(f"cannot read {exc.filename or source}: {exc.strerror or exc}") from None
        text = render(data)
    except (VizError, RuntimeError) as exc:  # RuntimeError: Graphviz failed (`layout_all`)
        raise click.ClickException(str(exc)) from None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
    unlisted = data["source"].get("unlisted")
    if unlisted:
        click.echo(f"note: {data['source']['path']} also holds {', '.join(unlisted)}, not listed in its report.json "
                   "(left by an earlier run or tileflow.explain into this debug_dir): not shown", err=True)
    graphs = data["graphs"]
    passes = sum(len(g["passes"]) for g in graphs)
    kernels = sum(len(g["kernels"]) for g in graphs)
    click.echo(
        f"wrote {output} ({len(text) / 1024:.0f} KiB; {len(graphs)} graph(s), {passes} pass run(s), {kernels} kernel(s))"
    )


# A graph's folder in a debug_dir, as the compiler names it (`compile_graph`).
_GRAPH_DIR_NAME = re.compile(r"graph_\d+")
# What a page may be called (any case: `.HTML` is a page too).
_PAGE_SUFFIXES = (".html", ".htm")


def _is_graph_dir(path: Path) -> bool:
    """Whether `path` is one graph's folder of a debug_dir (named so, or holding its files)."""
    return path.is_dir() and (
        bool(_GRAPH_DIR_NAME.fullmatch(path.name)) or (path / "passes").is_dir() or (path / "input.json").is_file()
    )


def debug_dir_root(source: Path) -> Path:
    """The debug_dir SOURCE belongs to: the folder holding the root report.json and the graph
    folders (SOURCE itself, its parent for a report.json, the parent of a graph folder)."""
    base = source if source.is_dir() else source.parent
    if _is_graph_dir(base) and (base.parent / "report.json").is_file():
        return base.parent
    return base


def output_conflict(source: Path, output: Path) -> str | None:
    """Why writing the page to `output` would damage what `source` is read from, else None.

    Nothing inside a graph folder of SOURCE's debug_dir may be written (viz reads those files,
    and a page under kernels/ would be read back as a kernel), nor any other file of the
    debug_dir but a page at its top level; nor SOURCE itself.
    """
    src, out = source.resolve(), output.resolve()
    if not src.exists():
        return None  # `collect` says so
    if out == src:
        return f"would overwrite the {'report' if src.suffix.lower() == '.json' else 'source'} it reads"
    if src.is_file() and zipfile.is_zipfile(src):
        return None  # an archive is the only file viz reads
    root = debug_dir_root(src)
    if not out.is_relative_to(root):
        return None
    graph_dirs = [root] if _is_graph_dir(root) else [d for d in root.iterdir() if _is_graph_dir(d)]
    for graph_dir in graph_dirs:
        if out.is_relative_to(graph_dir):
            where = f"{graph_dir.name}, a graph folder of the debug_dir {root}, whose files viz reads"
            return f"would overwrite {where}" if out.exists() else f"would write into {where}"
    if out.parent != root:
        # A folder made for the page could pass for a graph folder (graph_NNN, which the next viz
        # names as left by an earlier run, and a compile reaching that id deletes).
        return f"would write into a folder of the debug_dir {root} (only an .html page may go at its top level)"
    if out.suffix.lower() not in _PAGE_SUFFIXES:
        action = "would overwrite a file of" if out.exists() else "would write a file other than a page into"
        return f"{action} the debug_dir {root} (only an .html page may be written there)"
    return None


# ---------------------------------------------------------------------------------------------
# reading sources


def _read_text(path: Path, errors: str = "strict") -> str:
    """The file's text; VizError ("cannot read PATH: reason") when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors=errors)
    except OSError as exc:
        raise VizError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise VizError(f"cannot read {path}: it is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise VizError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def rank_folders(path: Path) -> list[Path]:
    """The `rank_<r>` folders a multi-process launch (torchrun) writes under its debug_dir, one
    debug_dir per rank (`compiler.debug_root`), in rank order; [] for any other folder."""
    found = [p for p in path.glob("rank_*") if re.fullmatch(r"rank_\d+", p.name) and (p / "report.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len("rank_"):]))


def no_report_hint(path: Path) -> str:
    """What to pass instead of `path`, a folder without a report.json: one of its rank folders
    when a launch of several processes wrote them ("" otherwise)."""
    ranks = rank_folders(path)
    if not ranks:
        return ""
    return (f"; it holds the debug_dirs of a multi-process launch, one per rank: give one of them "
            f"({', '.join(str(p) for p in ranks[:4])}{', ...' if len(ranks) > 4 else ''})")


def _from_debug_dir(root: Path, report_file: Path | None = None) -> dict[str, Any]:
    """A debug_dir's root (report.json listing graphs) or one graph's folder (its report.json)."""
    report_file = report_file or root / "report.json"
    if not report_file.is_file():
        raise VizError(f"{root} is not a tileflow debug_dir: it has no report.json{no_report_hint(root)}")
    report = _read_json(report_file)
    unlisted: list[str] = []
    if isinstance(report, dict) and isinstance(report.get("graphs"), list):
        graphs = [(g, root / str(g.get("graph_id", ""))) for g in report["graphs"] if isinstance(g, dict)]
        recompiles = report.get("recompiles")
        # A root report describes one session (one `tileflow.explain`, one process): graph folders
        # of an earlier one may sit beside its own. They are not shown, but they are named.
        listed = {graph_dir.name for _, graph_dir in graphs}
        unlisted = sorted(d.name for d in root.iterdir() if d.name not in listed and _is_graph_dir(d))
    elif isinstance(report, dict) and "graph_id" in report:
        graphs = [(report, root)]  # the folder of a single graph
        recompiles = int(bool(report.get("recompile")))
    else:
        raise VizError(f"{report_file} is not a tileflow report (no graphs)")
    builder = _Builder(kind="debug_dir", path=str(root), report_file=str(report_file))
    builder.recompiles = recompiles
    builder.unlisted = unlisted
    for graph, graph_dir in graphs:
        if graph_dir != root:
            _check_graph_report(report_file, graph, graph_dir)
        builder.add_graph(graph, _DirReader(graph_dir))
    return builder.data()


# A graph's fields that no longer change once its compile finished: the root report's entry and the
# graph's own report.json must agree on them.
_FIXED_FIELDS = ("graph_id", "compile_id", "nodes_in", "nodes_out")
_MIXED_RUNS = "files of two runs are mixed (a compile into this debug_dir that did not finish?); compile again into an empty debug_dir"


def _check_graph_report(report_file: Path, graph: dict[str, Any], graph_dir: Path) -> None:
    """VizError unless `graph_dir` holds the report.json of the graph `report_file` lists."""
    own_file = graph_dir / "report.json"
    if not graph_dir.is_dir():
        return  # nothing on disk to mix up: the page says the files are missing
    if not own_file.is_file():
        raise VizError(f"{report_file} lists {graph_dir.name} but {own_file} is missing: {_MIXED_RUNS}")
    own = _read_json(own_file)
    if not isinstance(own, dict):
        raise VizError(f"{own_file} is not a tileflow graph report")

    def fixed(g: dict[str, Any]) -> list[Any]:
        passes = g.get("passes") if isinstance(g.get("passes"), list) else []
        return [g.get(k) for k in _FIXED_FIELDS] + [
            [p.get(k) for k in ("name", "nodes_before", "nodes_after")] for p in passes if isinstance(p, dict)
        ]

    if fixed(own) != fixed(graph):
        raise VizError(f"{report_file} and {own_file} describe different compiles of {graph_dir.name}: {_MIXED_RUNS}")


def _from_archive(path: Path) -> dict[str, Any]:
    """An exported archive: the report in manifest.json and kernels/ sources, no per-pass graphs."""
    from .export import KERNELS_PREFIX, MANIFEST_MEMBER

    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if MANIFEST_MEMBER not in names:
                raise VizError(f"{path} is a zip file but not a tileflow archive: it has no {MANIFEST_MEMBER}")
            manifest = json.loads(zf.read(MANIFEST_MEMBER))
            kernels = {
                n: zf.read(n).decode("utf-8", errors="replace")
                for n in sorted(names)
                if n.startswith(KERNELS_PREFIX) and not n.endswith("/")
            }
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:
        # RuntimeError: an encrypted member, or (NotImplementedError) a compression zipfile lacks
        raise VizError(f"{path} is not a readable archive: {exc}") from None
    except json.JSONDecodeError as exc:
        raise VizError(f"{path} has a corrupt {MANIFEST_MEMBER} ({exc.msg})") from None
    report = manifest.get("report") if isinstance(manifest, dict) else None
    if not isinstance(report, dict) or not isinstance(report.get("graphs"), list):
        raise VizError(f"{path}: its {MANIFEST_MEMBER} has no report")
    builder = _Builder(kind="archive", path=str(path))
    builder.recompiles = report.get("recompiles")
    builder.archive_info = {k: manifest.get(k) for k in ("target", "tileflow_version", "torch_version", "created", "dynamic", "inputs", "tileflow_ops")}
    for graph in report["graphs"]:
        builder.add_graph(graph, _ArchiveReader(kernels))
    return builder.data()


class _DirReader:
    """Files of one graph's folder in a debug_dir (a missing file reads as None)."""

    def __init__(self, graph_dir: Path) -> None:
        self.dir = graph_dir

    def path(self, rel: str) -> Path:
        """Where the file `rel` of this graph is."""
        return self.dir / rel

    def nodes(self, rel: str) -> list[dict[str, Any]] | None:
        path = self.dir / rel
        if not path.is_file():
            return None
        nodes = _read_json(path)
        return nodes if isinstance(nodes, list) else None

    def text(self, rel: str) -> str | None:
        path = self.dir / rel
        return _read_text(path, errors="replace") if path.is_file() else None

    def kernel_sources(self) -> dict[str, str]:
        """Every file under kernels/, by its path relative to the graph's folder."""
        kdir = self.dir / "kernels"
        if not kdir.is_dir():
            return {}
        return {
            f.relative_to(self.dir).as_posix(): _read_text(f, errors="replace")
            for f in sorted(kdir.rglob("*"))
            if f.is_file()
        }


class _ArchiveReader:
    """What an archive has for a graph: kernel sources only."""

    def __init__(self, kernels: dict[str, str]) -> None:
        self.kernels = kernels

    def path(self, rel: str) -> str:
        return rel

    def nodes(self, rel: str) -> None:
        return None

    def text(self, rel: str) -> None:
        return None

    def kernel_sources(self) -> dict[str, str]:
        return dict(self.kernels)


# ---------------------------------------------------------------------------------------------
# building the embedded data


class _Builder:
    """Accumulates graphs, deduplicated node snapshots, interned strings and kernel sources."""

    def __init__(self, kind: str, path: str, report_file: str | None = None) -> None:
        self.kind = kind
        self.path = path
        self.report_file = report_file or path  # what the node counts are checked against
        self.graphs: list[dict[str, Any]] = []
        self.snapshots: list[dict[str, Any]] = []
        self._snapshot_ids: dict[str, int] = {}
        self.strings: list[str] = []
        self._string_ids: dict[str, int] = {}
        self.sources: dict[str, str] = {}
        self.archive_info: dict[str, Any] | None = None
        self.recompiles: Any = None  # the report's count
        self.unlisted: list[str] = []  # graph folders on disk that the report does not list

    def data(self) -> dict[str, Any]:
        return {
            "version": 1,
            "source": {"kind": self.kind, "path": self.path, "archive": self.archive_info, "unlisted": self.unlisted},
            "recompiles": self.recompiles,
            "graphs": self.graphs,
            "snapshots": self.snapshots,
            "strings": self.strings,
            "sources": self.sources,
        }

    def intern(self, text: str | None) -> int | None:
        """Index of `text` in the shared string table (source lines repeat in every snapshot)."""
        if text is None:
            return None
        if text not in self._string_ids:
            self._string_ids[text] = len(self.strings)
            self.strings.append(text)
        return self._string_ids[text]

    def add_graph(self, graph: dict[str, Any], reader: _DirReader | _ArchiveReader) -> None:
        graph_id = str(graph.get("graph_id", f"graph_{len(self.graphs):03d}"))
        input_nodes, output_nodes = reader.nodes("input.json"), reader.nodes("output.json")
        self._check_count(graph.get("nodes_in"), input_nodes, "in the input graph", reader.path("input.json"))
        self._check_count(graph.get("nodes_out"), output_nodes, "in the output graph", reader.path("output.json"))
        kernels = self._kernels(graph_id, graph.get("kernels") or [], reader.kernel_sources())
        passes = []
        for index, record in enumerate(graph.get("passes") or []):
            name = str(record.get("name", "?"))
            stem = f"passes/{index:02d}_{name}"
            before_nodes, after_nodes = reader.nodes(f"{stem}.before.json"), reader.nodes(f"{stem}.after.json")
            before_code, after_code = reader.text(f"{stem}.before.py"), reader.text(f"{stem}.after.py")
            self._check_count(record.get("nodes_before"), before_nodes, f"before pass {index} ({name})", reader.path(f"{stem}.before.json"))
            self._check_count(record.get("nodes_after"), after_nodes, f"after pass {index} ({name})", reader.path(f"{stem}.after.json"))
            passes.append(
                {
                    **{k: record.get(k) for k in ("name", "ms", "changed", "nodes_before", "nodes_after", "rewrites", "error")},
                    "before": self.add_snapshot(graph_id, before_nodes, kernels),
                    "after": self.add_snapshot(graph_id, after_nodes, kernels),
                    "marks": diff_marks(before_nodes, after_nodes) if before_nodes is not None and after_nodes is not None else None,
                    "diff": code_diff(before_code, after_code, name) if before_code is not None and after_code is not None else None,
                }
            )
        self.graphs.append(
            {
                "id": graph_id,
                **{k: graph.get(k) for k in ("compile_id", "recompile", "nodes_in", "nodes_out", "symbols", "target", "residual", "config", "plans", "extra", "rewrites")},
                "fallbacks": graph.get("fallbacks") or [],
                "passes": passes,
                "input": self.add_snapshot(graph_id, input_nodes, kernels),
                "output": self.add_snapshot(graph_id, output_nodes, kernels),
                "kernels": kernels,
            }
        )

    def _check_count(self, recorded: Any, nodes: list[dict[str, Any]] | None, what: str, where: Any) -> None:
        """VizError when a snapshot does not have the node count the report records for it: the
        report and the graph's files come from different runs, and the page would mix them."""
        if nodes is not None and isinstance(recorded, int) and recorded != len(nodes):
            raise VizError(f"{self.report_file} records {recorded} nodes {what} but {where} holds {len(nodes)}: "
                           f"{_MIXED_RUNS}")

    def _kernels(self, graph_id: str, records: list[dict[str, Any]], files: dict[str, str]) -> list[dict[str, Any]]:
        """The graph's kernel records, each with the key of its embedded source (or None)."""
        by_name: dict[str, str] = {}
        for rel in files:
            by_name.setdefault(Path(rel).name, rel)
        out: list[dict[str, Any]] = []
        used: set[str] = set()
        for rec in records:
            rel = _match_kernel_file(rec.get("source_path"), files, by_name)
            key = None
            if rel is not None:
                key = f"{graph_id}/{rel}"
                self.sources[key] = files[rel]
                used.add(rel)
            out.append({"name": rec.get("name"), "target": rec.get("target"), "spec": rec.get("spec"), "source": key})
        # Files the report does not list (e.g. shared helpers a backend wrote) are still shown.
        for rel, text in files.items():
            if rel not in used:
                key = f"{graph_id}/{rel}"
                self.sources[key] = text
                out.append({"name": Path(rel).name, "target": None, "spec": None, "source": key})
        return out

    def add_snapshot(self, graph_id: str, nodes: list[dict[str, Any]] | None, kernels: list[dict[str, Any]]) -> int | None:
        """Index of this node list in `snapshots`, adding it (grouped, laid out) when new.

        Pass N's "after" is usually pass N+1's "before", so identical lists are stored once.
        """
        if nodes is None:
            return None
        digest = hashlib.sha1(json.dumps(nodes, sort_keys=True, default=str).encode()).hexdigest()
        key = f"{graph_id}:{digest}"
        if key not in self._snapshot_ids:
            self._snapshot_ids[key] = len(self.snapshots)
            self.snapshots.append(self._snapshot(nodes, kernels))
        return self._snapshot_ids[key]

    def _snapshot(self, nodes: list[dict[str, Any]], kernels: list[dict[str, Any]]) -> dict[str, Any]:
        groups_of = assign_groups(nodes)
        compact = []
        for node, group in zip(nodes, groups_of):
            entry = {k: v for k, v in node.items() if k not in ("source", "args", "kwargs") and v is not None}
            entry["args"] = _shorten(node.get("args", []))
            if node.get("kwargs"):
                entry["kwargs"] = _shorten(node["kwargs"])
            src = self.intern(_short_source(node.get("source")))
            if src is not None:
                entry["src"] = src
            entry["group"] = group
            links = link_kernels(node, kernels)
            if links:
                entry["kernels"] = links
            compact.append(entry)
        return {"nodes": compact, "groups": build_groups(nodes, groups_of)}


def _match_kernel_file(source_path: Any, files: dict[str, str], by_name: dict[str, str]) -> str | None:
    """The kernels/ file a report's `source_path` names (reports hold absolute paths of the run)."""
    if not source_path:
        return None
    parts = Path(str(source_path)).parts
    if "kernels" in parts:  # keep sub-folders below kernels/ when the path has them
        rel = "/".join(parts[len(parts) - 1 - parts[::-1].index("kernels"):])
        if rel in files:
            return rel
    return by_name.get(Path(str(source_path)).name)


def _shorten(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_ARG_CHARS:
        return value[:MAX_ARG_CHARS] + f"… ({len(value)} chars)"
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    return value


def _short_source(source: Any) -> str | None:
    """`File "/long/site-packages/transformers/models/llama/modeling_llama.py", line 243, ...`
    -> the same from `transformers/...` on: the install prefix says nothing and repeats."""
    if not source:
        return None
    text = str(source)
    for marker in ("site-packages/", "dist-packages/"):
        cut = text.find(marker)
        if cut >= 0 and text.startswith('File "'):
            return 'File "' + text[cut + len(marker):]
    return text


# ---------------------------------------------------------------------------------------------
# pass diffs


def _node_refs(value: Any) -> Iterable[str]:
    """Names of the nodes an argument refers to (graph_to_json writes them as `%name`)."""
    if isinstance(value, str):
        if value.startswith("%"):
            yield value[1:]
    elif isinstance(value, list):
        for v in value:
            yield from _node_refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _node_refs(v)


def _signature(node: dict[str, Any]) -> str:
    # `tileflow` too: a pass may change only what it records on nodes (nanobatch's split marks, a
    # kernel target pinned), and its report counts those nodes as rewritten.
    return json.dumps([node.get(k) for k in ("op", "target", "args", "kwargs", "shape", "dtype", "tileflow")], default=str,
                      sort_keys=True)


def diff_marks(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Node names added, removed and changed (same name, different target/args/shape/tileflow
    metadata) by a pass."""
    old = {n["name"]: n for n in before}
    new = {n["name"]: n for n in after}
    return {
        "added": [n for n in new if n not in old],
        "removed": [n for n in old if n not in new],
        "changed": [n for n in new if n in old and _signature(new[n]) != _signature(old[n])],
    }


def code_diff(before: str, after: str, name: str) -> str:
    """Unified diff of a pass's readable code (empty when the pass left the code as it was)."""
    lines = difflib.unified_diff(
        before.splitlines(), after.splitlines(), fromfile=f"{name}.before.py", tofile=f"{name}.after.py", lineterm="", n=3
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# grouping and layout


def assign_groups(nodes: list[dict[str, Any]]) -> list[str]:
    """The module path each node is shown under.

    A node's own module when it has one. Inputs and other module-less nodes take the module of
    their first user that has one (a weight sits with the layer that reads it), then of an input;
    what is left, and the output, stays at the top level ("").
    """
    group: dict[str, str] = {n["name"]: n.get("module") or "" for n in nodes}
    position = {n["name"]: i for i, n in enumerate(nodes)}
    for node in reversed(nodes):  # users come later in a topologically ordered graph
        if not group[node["name"]] and node.get("op") != "output":
            # `users` is in the order the uses were added, which a rewrite reshuffles: sort it.
            users = sorted((u for u in node.get("users", []) if u in position), key=position.__getitem__)
            group[node["name"]] = next((group[u] for u in users if group[u]), "")
    for node in nodes:
        if not group[node["name"]] and node.get("op") != "output":
            group[node["name"]] = next((group[a] for a in _node_refs(node.get("args")) if group.get(a)), "")
    return [group[n["name"]] for n in nodes]


def _ancestors(path: str) -> list[str]:
    """"a.b.c" -> ["", "a", "a.b", "a.b.c"]."""
    parts = path.split(".") if path else []
    return [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]


def _item_in(group: str, node_group: str, node_index: int) -> int | str:
    """What stands for a node inside `group`'s drawing: the node itself, or the child group holding it."""
    if node_group == group:
        return node_index
    depth = len(group.split(".")) if group else 0
    return ".".join(node_group.split(".")[: depth + 1])


def _common_group(a: str, b: str) -> str:
    pa, pb = (a.split(".") if a else []), (b.split(".") if b else [])
    common = []
    for x, y in zip(pa, pb):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def build_groups(nodes: list[dict[str, Any]], groups_of: list[str]) -> dict[str, dict[str, Any]]:
    """The module tree with a drawing of each group's items.

    A group's items are its own nodes and its child groups (each drawn as one box). An edge
    between two nodes is drawn in exactly one group: the deepest one holding both, between the
    items that contain them. Items sit at [x, y] in the page's grid units, laid out by Graphviz
    `dot` (see `tileflow.graph_layout`).
    """
    groups: dict[str, dict[str, Any]] = {}

    def ensure(path: str) -> dict[str, Any]:
        if path not in groups:
            parent = path.rpartition(".")[0] if path else None
            groups[path] = {"parent": parent, "children": [], "nodes": [], "count": 0, "first": None}
            if parent is not None:
                ensure(parent)["children"].append(path)
        return groups[path]

    ensure("")
    for index, path in enumerate(groups_of):
        ensure(path)["nodes"].append(index)
        for anc in _ancestors(path):
            g = groups[anc]
            g["count"] += 1
            g["first"] = index if g["first"] is None else g["first"]

    index_of = {n["name"]: i for i, n in enumerate(nodes)}
    edges: dict[str, set[tuple[int | str, int | str]]] = {path: set() for path in groups}
    for v, node in enumerate(nodes):
        for name in set(_node_refs(node.get("args"))) | set(_node_refs(node.get("kwargs"))):
            u = index_of.get(name)
            if u is None:
                continue
            where = _common_group(groups_of[u], groups_of[v])
            a, b = _item_in(where, groups_of[u], u), _item_in(where, groups_of[v], v)
            if a != b:
                edges[where].add((a, b))

    drawn: list[tuple[dict[str, Any], list[int | str], list[list[int]]]] = []
    for path, g in groups.items():
        g["children"].sort(key=lambda c: groups[c]["first"])
        items: list[int | str] = sorted([*g["nodes"], *g["children"]], key=lambda it: it if isinstance(it, int) else groups[it]["first"])
        if len(items) > MAX_DRAWN_ITEMS:
            g["items"], g["edges"] = None, None  # listed only
            continue
        order = {item: i for i, item in enumerate(items)}
        pairs = sorted([order[a], order[b]] for a, b in edges[path] if a in order and b in order)
        drawn.append((g, items, pairs))
    positions = layout_all([LayoutInput(len(items), [tuple(p) for p in pairs]) for _, items, pairs in drawn])
    for (g, items, pairs), xy in zip(drawn, positions):
        g["items"] = [[x, y, item] for (x, y), item in zip(xy, items)]
        g["edges"] = pairs
    for g in groups.values():
        del g["first"]
    return groups


# ---------------------------------------------------------------------------------------------
# node -> kernel links


def _plan_of(node: dict[str, Any]) -> dict[str, Any] | None:
    for arg in node.get("args", []):
        if isinstance(arg, str) and arg.startswith("{") and '"pieces"' in arg:
            try:
                return json.loads(arg)
            except json.JSONDecodeError:
                return None
    return None


def _params(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec's params, stored as [name, value] pairs, as a dict."""
    try:
        return dict(spec.get("params") or [])
    except (TypeError, ValueError):
        return {}


def link_kernels(node: dict[str, Any], kernels: list[dict[str, Any]]) -> list[int]:
    """Indices of the graph's kernels that a tileflow node runs on.

    Lowering records them on the final graph's nodes; for the per-pass graphs (before lowering)
    they are matched on specs: padded_gemm: same dtype, K, N (or N/2 for a SwiGLU pair), a tile of the node's plan and the
    same epilogue tags; meta_attention: same GQA factor and head dim; grouped_gemm: on the final graph only. Nodes of other kinds, and
    kernels without a spec, are never linked.
    """
    meta = node.get("tileflow") or {}
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind not in ("padded_gemm", "grouped_gemm", "meta_attention"):
        return []
    if isinstance(meta.get("kernels"), list):
        # Recorded by lowering (the graph after the last pass): exact, no matching needed.
        names = set(meta["kernels"])
        return [i for i, k in enumerate(kernels) if k.get("name") in names]
    if kind == "grouped_gemm":
        return []  # linked on the final graph only (lowering records its kernels)
    links: list[int] = []
    if kind == "padded_gemm":
        plan = _plan_of(node)
        if plan is None:
            return []
        args = node.get("args", [])
        tags = set()
        if len(args) > 2 and args[2] is not None:
            tags.add("bias")
        if len(args) > 3 and args[3] is not None:
            tags.add("residual")
        if len(args) > 4 and isinstance(args[4], str) and args[4] != "none":
            tags.add(args[4])
        if len(args) > 10 and args[10] is True and plan.get("dtype") in ROUNDED_DTYPES:
            tags.add("round")  # round_first: a cast from a half-precision result
        # (N, tiles, segments param) of the kernels the node may run. Over sibling weights (N
        # segments, `fused_siblings`) lowering builds the segmented kernel of the whole N where one
        # launch reads every weight, else each segment's kernels by its own plan: never a plain
        # kernel of the summed N, which is another GEMM's (an LM head as wide as Q, K and V).
        tiles = [p.get("config") for p in plan.get("pieces", [])]
        segments = meta.get("segments")
        if isinstance(segments, list) and segments:
            own_plans = plan.get("segment_plans") or [None] * len(segments)
            wanted = [(plan.get("n"), tiles, "x".join(str(w) for w in segments))] + [
                (width, [p.get("config") for p in own.get("pieces", [])] if isinstance(own, dict) else tiles, None)
                for width, own in zip(segments, own_plans)
            ]
        else:
            wanted = [(plan.get("n"), tiles, None)]
        for i, k in enumerate(kernels):
            spec = k.get("spec") or {}
            params = _params(spec)
            if spec.get("op") != "padded_gemm" or spec.get("dtype") != plan.get("dtype") or params.get("k") != plan.get("k"):
                continue
            tile = spec.get("tile") or {}
            # The plan's N is the kernel's output width (for a SwiGLU pair, the gate's rows).
            if not any(params.get("n") == n and params.get("segments") == seg
                       and any(t and all(tile.get(f) == v for f, v in t.items() if f in tile) for t in ts)
                       for n, ts, seg in wanted):
                continue
            if set(spec.get("epilogue") or []) & _EPILOGUE_TAGS != tags & _EPILOGUE_TAGS:
                continue
            links.append(i)
    else:
        head_dim = node.get("shape", [None])[-1] if node.get("shape") else None
        flags = _attention_flags(node)
        for i, k in enumerate(kernels):
            spec = k.get("spec") or {}
            params = _params(spec)
            if spec.get("op") == "meta_attention" and params.get("gqa") == meta.get("gqa") and str(params.get("head_dim")) == str(head_dim) \
                    and all(bool(params.get(flag, False)) == on for flag, on in flags.items()):
                links.append(i)
    return links


def _attention_flags(node: dict[str, Any]) -> dict[str, bool]:
    """The kernel features a meta_attention node's arguments select, as lowering reads them
    (`attention_features`): layers of one model differ in them (Gemma-2's sliding window in
    every other layer), and each runs only its own kernels."""
    import torch

    from .lower import attention_features

    # (graph_to_json writes the arguments positionally, in the op's schema order)
    names = [a.name for a in torch.ops.tileflow.meta_attention.default._schema.arguments]
    return attention_features(dict(zip(names, node.get("args") or [])) | (node.get("kwargs") or {}))
