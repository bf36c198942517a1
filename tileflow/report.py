"""Report: what the compiler did, per compiled graph. Prints as tables, round-trips through JSON.

The pass manager fills one `GraphReport` per graph it compiles; a `Report` collects them (one for
`tileflow.explain`, one per process for plain `torch.compile(backend="tileflow")`). The visualizer
reads the same JSON.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

SCHEMA_VERSION = 1


@dataclass
class PassRecord:
    """One pass run on one graph."""

    name: str
    ms: float
    changed: bool
    nodes_before: int
    nodes_after: int
    rewrites: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    graph: str = ""


@dataclass
class Fallback:
    """A node (or a whole pass) tileflow left as it was, and why."""

    node: str
    reason: str
    pass_name: str = ""
    graph: str = ""


@dataclass
class KernelRecord:
    """A kernel emitted for a graph."""

    name: str
    target: str
    source_path: str | None = None
    spec: dict[str, Any] | None = None
    graph: str = ""


@dataclass
class GraphReport:
    """Everything about one compiled graph."""

    graph_id: str
    compile_id: str | None = None
    nodes_in: int = 0
    nodes_out: int = 0
    symbols: dict[str, list[int | None]] = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    kernels: list[KernelRecord] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)
    residual: str = ""
    target: str = ""
    debug_dir: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    recompile: bool = False  # a recompile of a frame this session compiled before

    @property
    def rewrites(self) -> dict[str, int]:
        """Counts by rewrite kind, summed over this graph's passes."""
        total: Counter[str] = Counter()
        for record in self.passes:
            total.update(record.rewrites)
        return dict(total)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (includes the derived `rewrites`)."""
        data = asdict(self)
        data["rewrites"] = self.rewrites
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GraphReport":
        """Inverse of `to_dict`."""
        data = dict(data)
        data.pop("rewrites", None)
        data["passes"] = [PassRecord(**p) for p in data.get("passes", [])]
        data["fallbacks"] = [Fallback(**f) for f in data.get("fallbacks", [])]
        data["kernels"] = [KernelRecord(**k) for k in data.get("kernels", [])]
        return cls(**data)


@dataclass
class Report:
    """What tileflow did to every graph it compiled in one session (`tileflow.explain` or a process)."""

    graphs: list[GraphReport] = field(default_factory=list)
    recompiles: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: set[int] = set()

    def __getstate__(self) -> dict[str, Any]:
        # A lock cannot be pickled or copied (a report sent back from a worker process).
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def compiled_frame_before(self, frame: int) -> bool:
        """Whether this report already holds a finished compile of Dynamo frame `frame`: a
        recompile. Dynamo's own count also grows when another backend (an earlier `explain`,
        Inductor) compiled the frame first."""
        with self._lock:
            return frame in self._frames

    def note_compiled_frame(self, frame: int) -> None:
        """Note that a compile of Dynamo frame `frame` finished (see `compiled_frame_before`)."""
        with self._lock:
            self._frames.add(frame)

    def add_graph(self, graph: GraphReport, *, recompile: bool = False) -> None:
        """Record a newly compiled graph (thread-safe: Dynamo may compile from several threads)."""
        with self._lock:
            graph.recompile = recompile
            self.graphs.append(graph)
            if recompile:
                self.recompiles += 1

    @property
    def passes(self) -> list[PassRecord]:
        """Every pass run, over all graphs, in order."""
        return [p for g in self.graphs for p in g.passes]

    @property
    def rewrites(self) -> dict[str, int]:
        """Counts by rewrite kind over all graphs."""
        total: Counter[str] = Counter()
        for g in self.graphs:
            total.update(g.rewrites)
        return dict(total)

    @property
    def fallbacks(self) -> list[Fallback]:
        """Every fallback, over all graphs."""
        return [f for g in self.graphs for f in g.fallbacks]

    @property
    def kernels(self) -> list[KernelRecord]:
        """Every kernel emitted, over all graphs."""
        return [k for g in self.graphs for k in g.kernels]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "schema": SCHEMA_VERSION,
            "recompiles": self.recompiles,
            "graphs": [g.to_dict() for g in self.graphs],
            "rewrites": self.rewrites,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Serialize to JSON text."""
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        """Inverse of `to_dict`."""
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(
                f"report schema {data.get('schema')!r} is not supported by this tileflow "
                f"(expects {SCHEMA_VERSION}); regenerate the report with this version"
            )
        return cls(
            graphs=[GraphReport.from_dict(g) for g in data.get("graphs", [])],
            recompiles=int(data.get("recompiles", 0)),
        )

    @classmethod
    def from_json(cls, text: str) -> "Report":
        """Parse the output of `to_json`."""
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Report) and self.to_dict() == other.to_dict()

    def __str__(self) -> str:
        return format_report(self)


def _table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    """A plain-text table with aligned columns."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join([line, sep, *body])


def format_report(report: Report) -> str:
    """Human-readable summary: one block per graph, then totals."""
    out = [f"tileflow report: {len(report.graphs)} graph(s), {report.recompiles} recompile(s)"]
    for g in report.graphs:
        syms = ", ".join(f"{s}∈[{lo}, {hi}]" if hi is not None else f"{s}∈[{lo}, ∞)"
                         for s, (lo, hi) in g.symbols.items()) or "none"
        out.append("")
        out.append(
            f"graph {g.graph_id} (compile {g.compile_id}): {g.nodes_in} -> {g.nodes_out} nodes, "
            f"target={g.target}, residual={g.residual}, symbols: {syms}"
        )
        out.append(
            _table(
                ["pass", "ms", "changed", "nodes", "rewrites"],
                [
                    [
                        p.name,
                        f"{p.ms:.1f}",
                        "error" if p.error else ("yes" if p.changed else "no"),
                        f"{p.nodes_before} -> {p.nodes_after}",
                        ", ".join(f"{k}={v}" for k, v in sorted(p.rewrites.items())) or "-",
                    ]
                    for p in g.passes
                ],
            )
        )
        if g.fallbacks:
            out.append("fallbacks:")
            out.append(_table(["pass", "node", "reason"], [[f.pass_name, f.node, f.reason] for f in g.fallbacks]))
        notes = {k: v for k, v in g.extra.items() if isinstance(v, str)}
        if notes:
            # The one-line notes in `extra` say why a feature asked for did not apply (a CUDA graph not
            # captured, verify skipped, a nano-batch plan dropped, the residual run eagerly).
            out.append("notes:")
            out.extend(f"  {k}: {v}" for k, v in sorted(notes.items()))
        if g.plans:
            out.append("tile plans (M range -> tile config):")
            for plan in g.plans:
                gated = " (gated: gate and up)" if plan.get("gated") else ""
                times = f" [{plan['tile_times']}]" if plan.get("tile_times") else ""
                out.append(f"  {plan.get('op', '')}{gated} N={plan.get('n')} K={plan.get('k')} {plan.get('dtype')}: "
                           f"{plan.get('describe', '')}{times}")
        if g.kernels:
            out.append("kernels:")
            out.append(_table(["name", "target", "source"], [[k.name, k.target, k.source_path or "-"] for k in g.kernels]))
    totals = ", ".join(f"{k}={v}" for k, v in sorted(report.rewrites.items())) or "none"
    out.append("")
    out.append(f"rewrites: {totals}; fallbacks: {len(report.fallbacks)}; kernels: {len(report.kernels)}")
    return "\n".join(out)


_SESSION = Report()


def session_report() -> Report:
    """The report of every graph compiled by `torch.compile(backend="tileflow")` in this process."""
    return _SESSION
