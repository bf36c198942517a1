"""`tileflow viz`: one self-contained HTML page from a debug_dir or an exported archive.

Most tests parse the page: the embedded JSON (graphs, passes, before/after nodes, diff marks,
code diffs, kernel sources) and that nothing in it points off the page. One drives the page in
headless Chromium (Debian's package, through Playwright) and saves a screenshot.
"""

from __future__ import annotations

import json
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from click.testing import CliRunner

import tileflow
from tileflow.viz import build_html, collect, script_json, viz_command, write_html

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import VOCAB, build  # noqa: E402

DATA_RE = re.compile(r'<script type="application/json" id="tileflow-data">(.*?)</script>', re.S)


@pytest.fixture(scope="module")
def llama_debug_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A debug_dir from compiling the small Llama once (shared: compiling is the slow part)."""
    root = tmp_path_factory.mktemp("llama_debug")
    model = build("llama")
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"debug_dir": str(root)}), dynamic=True)
    with torch.no_grad():
        compiled(torch.randint(0, VOCAB, (1, 8)), use_cache=False)
    return root


@pytest.fixture(scope="module")
def llama_page(llama_debug_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """The page written through the click command, and its embedded data."""
    out = tmp_path_factory.mktemp("page") / "report.html"
    result = CliRunner().invoke(viz_command, [str(llama_debug_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    text = out.read_text(encoding="utf-8")
    return text, embedded_data(text)


def embedded_data(page: str) -> dict:
    [raw] = DATA_RE.findall(page)
    return json.loads(raw)


def outside_data(page: str) -> str:
    """The page without its embedded JSON: what the template and script themselves contain."""
    return DATA_RE.sub("", page)


def test_every_graph_and_pass_has_nodes_and_a_diff(llama_debug_dir: Path, llama_page: tuple[str, dict]) -> None:
    _, data = llama_page
    report = json.loads((llama_debug_dir / "report.json").read_text())
    assert [g["id"] for g in data["graphs"]] == [g["graph_id"] for g in report["graphs"]]
    for graph, rep in zip(data["graphs"], report["graphs"]):
        assert [p["name"] for p in graph["passes"]] == [p["name"] for p in rep["passes"]] == ["canonicalize", "attention", "gemm_padding"]
        for p in graph["passes"]:
            before, after = data["snapshots"][p["before"]], data["snapshots"][p["after"]]
            assert len(before["nodes"]) == p["nodes_before"] and len(after["nodes"]) == p["nodes_after"]
            assert isinstance(p["diff"], str) and p["diff"].startswith("---")  # every pass here changed code
            assert set(p["marks"]) == {"added", "removed", "changed"}
        # Consecutive passes share a snapshot instead of storing the same nodes twice.
        assert graph["passes"][0]["after"] == graph["passes"][1]["before"]
        assert graph["input"] is not None and graph["output"] is not None


def test_gemm_padding_marks_linears_removed_and_padded_gemms_added(llama_page: tuple[str, dict]) -> None:
    _, data = llama_page
    graph = data["graphs"][0]
    p = next(p for p in graph["passes"] if p["name"] == "gemm_padding")
    before = {n["name"]: n for n in data["snapshots"][p["before"]]["nodes"]}
    after = {n["name"]: n for n in data["snapshots"][p["after"]]["nodes"]}
    removed_targets = {before[n]["target"] for n in p["marks"]["removed"]}
    added_targets = {after[n]["target"] for n in p["marks"]["added"]}
    assert "aten.linear.default" in removed_targets
    assert "tileflow.padded_gemm.default" in added_targets
    assert not set(p["marks"]["added"]) & set(before) and not set(p["marks"]["removed"]) & set(after)
    for name in p["marks"]["changed"]:
        assert name in before and name in after
    assert "+" in p["diff"] and "padded_gemm" in p["diff"]


def test_nodes_carry_metadata_groups_and_kernel_links(llama_page: tuple[str, dict]) -> None:
    _, data = llama_page
    graph = data["graphs"][0]
    snap = data["snapshots"][graph["output"]]
    gemm = next(n for n in snap["nodes"] if n.get("tileflow", {}).get("kind") == "padded_gemm")
    assert gemm["module"].startswith("model.layers.0.") and gemm["group"] == gemm["module"]
    assert gemm["shape"] and gemm["dtype"] == "float32"
    assert "M " in gemm["tileflow"]["plan"]
    assert "modeling_llama.py" in data["strings"][gemm["src"]]
    # Every linked kernel has its source embedded, and shares the node's K (the K of the GEMM's
    # input: 64, or the MLP's 128 for the down projection; a link to every padded_gemm kernel of
    # the graph would give the Q/K/V GEMM the down projection's kernels too).
    from tileflow.viz import _params

    by_name = {n["name"]: n for n in snap["nodes"]}
    gemms = [n for n in snap["nodes"] if n.get("tileflow", {}).get("kind") == "padded_gemm"]
    ks = {}
    for node in gemms:
        ks[node["name"]] = int(by_name[node["args"][0].lstrip("%")]["shape"][-1])
        assert node["kernels"], node["name"]
        for k in node["kernels"]:
            kernel = graph["kernels"][k]
            assert kernel["spec"]["op"] == "padded_gemm" and kernel["spec"]["dtype"] == "float32"
            assert _params(kernel["spec"])["k"] == ks[node["name"]], (node["name"], kernel["name"])
            assert data["sources"][kernel["source"]].strip()
    assert set(ks.values()) == {64, 128}  # the check above tells the GEMMs' kernels apart
    attn = next(n for n in snap["nodes"] if n.get("tileflow", {}).get("kind") == "meta_attention")
    assert attn["tileflow"]["gqa"] == 2
    # Groups follow the module hierarchy, each laid out in layers; weights sit with their layer.
    groups = snap["groups"]
    assert {"", "model", "model.layers", "model.layers.0", "model.layers.0.self_attn"} <= set(groups)
    assert "model.layers.0" in groups["model.layers"]["children"]
    assert groups[""]["count"] == len(snap["nodes"])
    attn_group = groups["model.layers.0.self_attn"]
    ys = [y for _, y, _ in attn_group["items"]]
    assert max(ys) > 0 and len(attn_group["items"]) == len(attn_group["nodes"]) + len(attn_group["children"])
    for a, b in attn_group["edges"]:
        assert 0 <= a < len(attn_group["items"]) and 0 <= b < len(attn_group["items"])
    placeholders = [n for n in snap["nodes"] if n["op"] == "placeholder" and n.get("shape") == ["64", "64"]]
    assert placeholders and all(n["group"].startswith("model.layers.") for n in placeholders)


def test_kernel_sources_are_embedded(llama_debug_dir: Path, llama_page: tuple[str, dict]) -> None:
    _, data = llama_page
    files = sorted(llama_debug_dir.glob("graph_*/kernels/*"))
    assert files
    for f in files:
        key = f"{f.parent.parent.name}/kernels/{f.name}"
        assert data["sources"][key] == f.read_text()
    assert all(k["source"] in data["sources"] for g in data["graphs"] for k in g["kernels"] if k["source"])


def test_page_is_self_contained_with_search_and_collapse(llama_page: tuple[str, dict]) -> None:
    page, _ = llama_page
    shell = outside_data(page)
    assert "http://" not in shell and "https://" not in shell
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert not re.search(r"<link\b|@import|url\(", shell, re.I)
    for fn in ("function filterNodes(", "function toggleGroup(", "function renderGroup(", "function drawGroup(",
               "function showKernel(", "function highlightPython(", "function renderDiff("):
        assert fn in shell, fn
    assert 'id="search"' in shell
    # Only the root is expanded at first: every other group starts collapsed.
    assert 'expanded: new Set([""])' in shell
    # Exactly one data block and one script: the JSON cannot have broken out of its tag.
    assert len(DATA_RE.findall(page)) == 1
    assert page.count("</script>") == 2


def test_script_json_cannot_close_the_script_tag() -> None:
    data = {"source": "x = '</script><script>alert(1)</script>' & y", "inf": float("-inf")}
    text = script_json(data)
    assert "</" not in text and "<" not in text and "&" not in text
    assert json.loads(text) == {"source": data["source"], "inf": "-inf"}


def _bare_data(path: str) -> dict:
    """The data `collect` returns for a source with no graphs, at `path`."""
    return {"version": 1, "source": {"kind": "debug_dir", "path": path, "archive": None}, "graphs": [],
            "snapshots": [], "strings": [], "sources": {}, "layout": "built-in"}


def test_template_tokens_in_the_source_path_stay_text() -> None:
    """A path holding `__TILEFLOW_DATA__` went into the title first, and the data then replaced
    that copy instead of the script's: the data block held the bare token and the page broke."""
    from tileflow.viz import DATA_TOKEN, TITLE_TOKEN, render

    path = f"/runs/{DATA_TOKEN}/{TITLE_TOKEN}"
    page = render(_bare_data(path))
    assert embedded_data(page)["source"]["path"] == path
    assert re.search(r"<title>tileflow viz: ([^<]*)</title>", page).group(1) == path
    assert page.count("</script>") == 2


def test_undecodable_path_bytes_still_write_a_page(tmp_path: Path) -> None:
    """Python reads a folder name's non-UTF-8 bytes as lone surrogates; raw in the page they made
    writing it raise UnicodeEncodeError. They travel as JSON escapes (and U+FFFD in the title)."""
    from tileflow.viz import render

    path = "/runs/caf\udce9"  # what os.fsdecode(b"/runs/caf\xe9") gives
    page = render(_bare_data(path))
    (tmp_path / "page.html").write_text(page, encoding="utf-8")
    assert embedded_data(page)["source"]["path"] == path
    assert "<title>tileflow viz: /runs/caf\ufffd</title>" in page


def test_python_api_matches_the_command(llama_debug_dir: Path, llama_page: tuple[str, dict], tmp_path: Path) -> None:
    _, data = llama_page
    assert embedded_data(build_html(llama_debug_dir)) == data
    out = write_html(llama_debug_dir / "report.json", tmp_path / "sub" / "page.html")  # a report.json works too
    assert embedded_data(out.read_text())["graphs"] == data["graphs"]
    # A single graph's folder is a source on its own.
    [graph_dir] = sorted(llama_debug_dir.glob("graph_*"))  # ids are numbered per process
    assert [g["id"] for g in collect(graph_dir)["graphs"]] == [graph_dir.name]


def test_a_failing_graphviz_is_one_clear_error(llama_debug_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A `dot` on PATH that fails (a broken install) ends the command with what to do, not a traceback."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dot = bin_dir / "dot"
    dot.write_text("#!/bin/sh\necho 'dot: broken plugin' >&2\nexit 3\n")
    dot.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = CliRunner().invoke(viz_command, [str(llama_debug_dir), "-o", str(tmp_path / "out.html")])
    assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert "exit code 3" in result.output and "broken plugin" in result.output and "built-in layout" in result.output
    assert not (tmp_path / "out.html").exists()


def test_archive_source(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8)).eval()
    tokens = torch.export.Dim("tokens", min=2, max=64)
    archive = tileflow.export_model(model, (torch.randn(4, 16),), ({0: tokens},), options={"target": "reference"})
    path = archive.save(tmp_path / "tiny.pt2")
    out = tmp_path / "tiny.html"
    result = CliRunner().invoke(viz_command, [str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    data = embedded_data(page)
    assert data["source"]["kind"] == "archive"
    [graph] = data["graphs"]
    assert [p["name"] for p in graph["passes"]] == ["canonicalize", "attention", "gemm_padding"]
    assert all(p["before"] is None and p["diff"] is None for p in graph["passes"])  # not in archives
    members = [n for n in zipfile.ZipFile(path).namelist() if n.startswith("kernels/")]
    assert members and graph["kernels"]
    for k in graph["kernels"]:
        assert k["source"] in data["sources"]
    assert "http://" not in outside_data(page)


def test_an_encrypted_archive_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    """zipfile's RuntimeError for an encrypted member escaped the archive reader: the error line
    named the member ("File 'manifest.json' is encrypted, ...") but not the archive."""
    path = tmp_path / "locked.pt2"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"report": {"graphs": []}}))
    raw = bytearray(path.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        at = raw.find(signature)
        raw[at + flags_at] |= 1  # general purpose bit 0: encrypted
    path.write_bytes(bytes(raw))
    line = one_error_line(CliRunner().invoke(viz_command, [str(path), "-o", str(tmp_path / "out.html")]))
    assert f"{path} is not a readable archive" in line and "encrypted" in line, line


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "not_zip", "zip_no_manifest", "bad_report",
                                  "malformed_report"])
def test_bad_source_is_a_one_line_error(kind: str, tmp_path: Path) -> None:
    source = tmp_path / "src"
    if kind == "empty_dir":
        source.mkdir()
    elif kind == "not_zip":
        source = tmp_path / "model.pt2"
        source.write_text("not an archive")
    elif kind == "zip_no_manifest":
        source = tmp_path / "model.pt2"
        with zipfile.ZipFile(source, "w") as zf:
            zf.writestr("other.txt", "x")
    elif kind == "bad_report":
        source.mkdir()
        (source / "report.json").write_text("{ not json")
    elif kind == "malformed_report":  # JSON, but a pass that is a string (it raised AttributeError)
        source.mkdir()
        (source / "report.json").write_text('{"schema": 1, "graphs": [{"graph_id": "g", "passes": ["canonicalize"]}]}')
    result = CliRunner().invoke(viz_command, [str(source), "-o", str(tmp_path / "out.html")])
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert str(source) in lines[0]
    assert not (tmp_path / "out.html").exists()


CHROMIUM = Path("/usr/bin/chromium")
# Without these, Chromium keeps trying to reach Google's services from a machine with no network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@dataclass
class Browser:
    """A headless Chromium page, with what it logged as errors and every URL it requested."""

    page: Any
    errors: list[str]
    requests: list[str]


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright, launched once for the file (each launch costs
    seconds of CPU; every test still gets a fresh page in a context of its own)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the [test] extra has it)")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (the README's test command installs it)")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def browser(chromium: Any) -> Iterator[Browser]:
    """A fresh page, in a new browser context (no cookies, storage or cache from another test)."""
    context = chromium.new_context(viewport={"width": 1500, "height": 1000})
    try:
        page = context.new_page()
        env = Browser(page, [], [])
        page.on("console", lambda msg: env.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: env.errors.append(str(exc)))
        page.on("request", lambda req: env.requests.append(req.url))
        yield env
    finally:
        context.close()


def test_page_in_headless_chromium(browser: Browser, llama_page: tuple[str, dict], tmp_path: Path) -> None:
    page = browser.page
    page_path = tmp_path / "report.html"
    page_path.write_text(llama_page[0], encoding="utf-8")
    page.goto(page_path.as_uri())
    assert "layout: graphviz dot" in page.inner_text("#source") or "layout: built-in" in page.inner_text("#source")

    # Select the pass that rewrote the most: its diff and both graphs appear.
    page.locator("#sidebar .step", has_text="gemm_padding").first.click()
    page.wait_for_selector("pre.diff")
    assert "padded_gemm" in page.inner_text("pre.diff")
    assert page.locator(".sides .side").count() == 2
    legend = page.inner_text(".legend")
    assert "added" in legend and "removed" in legend

    # Expand the changed groups and open an added node's details.
    page.locator(".legend .link", has_text="expand changed groups").click()
    # The before side marks the removed linears, the after side the added GEMMs, never the reverse.
    before_side, after_side = page.locator(".side:nth-child(1) svg"), page.locator(".side:nth-child(2) svg")
    assert before_side.locator("g.box.removed[data-node]").count() > 0
    assert after_side.locator("g.box.added[data-node]").count() > 0
    assert before_side.locator("g.box.added").count() == after_side.locator("g.box.removed").count() == 0
    box = page.locator(".side:nth-child(2) svg g.box.added[data-node]").first
    box.click()
    details = page.inner_text("#details")
    assert "padded_gemm" in details and "args" in details
    box.scroll_into_view_if_needed()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viz_gemm_padding.png"), full_page=False)

    # The search box finds nodes by target.
    page.fill("#search", "meta_attention")
    page.wait_for_function("document.querySelector('#main').innerText.includes('match')")
    assert "meta_attention" in page.inner_text("#main")
    assert browser.errors == [], browser.errors
    assert all(url.startswith("file://") for url in browser.requests), browser.requests  # nothing off the page
    assert (ARTIFACTS / "viz_gemm_padding.png").stat().st_size > 10_000


def test_nano_batch_timeline_in_headless_chromium(browser: Browser, llama_page: tuple[str, dict], tmp_path: Path) -> None:
    from tileflow.devices import get_device
    from tileflow.search import OpProfile, modeled_timeline
    from tileflow.viz import render

    d, ctx = 4096, 1024
    ops = [OpProfile("qkv", "compute", 2 * d * 3 * d, 8 * d, 6 * d * d), OpProfile("attn", "memory", 4 * ctx * d, 4 * ctx * d),
           OpProfile("allreduce", "network", 0, 2 * d), OpProfile("mlp", "compute", 16 * d * d, 8 * d, 16 * d * d),
           OpProfile("experts", "compute", 16 * d * d, 8 * d, 64 * d * d, whole=True)]  # (a barrier: one bar)
    timeline = modeled_timeline(ops, [192, 192, 128], 0.6, get_device("H100"))
    data = embedded_data(llama_page[0])
    data["graphs"][0]["extra"] = {"nano_batch": {"timeline": timeline}}
    page_path = tmp_path / "timeline.html"
    page_path.write_text(render(data), encoding="utf-8")
    page = browser.page
    page.goto(page_path.as_uri())
    page.locator("#sidebar .step", has_text="overview").first.click()
    page.wait_for_selector(".timeline svg")
    assert page.locator(".timeline g.bar").count() == len(timeline) == 13
    experts = page.locator('.timeline g.bar[data-op="experts"]')
    assert experts.count() == 1 and experts.get_attribute("data-nb") == "all"
    assert experts.locator("title").text_content().startswith("experts · every nano-batch, once (512 tokens)")
    # One row per stream; a nano-op's bar sits in its stream's row, in time order.
    rows = page.eval_on_selector_all(
        ".timeline g.bar rect", "rs => rs.map(r => [r.parentNode.dataset.op, +r.getAttribute('y'), +r.getAttribute('x')])"
    )
    streams = {e["op"]: e["stream"] for e in timeline}
    y_of: dict[int, float] = {}
    for (op, y, _), entry in zip(rows, timeline):
        assert op == entry["op"]
        assert y_of.setdefault(streams[op], y) == y
    assert len(set(y_of.values())) == len(set(streams.values())) >= 2
    xs = [x for _, _, x in rows]
    assert xs == sorted(xs)
    assert page.locator(".timeline g.bar title").first.text_content().startswith(f"{timeline[0]['op']} · nano-batch 0 (192 tokens)")
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(".timeline").screenshot(path=str(ARTIFACTS / "viz_timeline.png"))
    # A split over sequences (a decode step's) counts sequences, and its bars say so.
    data["graphs"][0]["extra"]["nano_batch"]["split_over"] = "sequences"
    page_path.write_text(render(data), encoding="utf-8")
    page.goto(page_path.as_uri())
    page.locator("#sidebar .step", has_text="overview").first.click()
    page.wait_for_selector(".timeline svg")
    assert "nano-batch 0 (192 sequences)" in page.locator(".timeline g.bar title").first.text_content()
    assert browser.errors == [], browser.errors


def test_nano_batch_timeline_values_are_not_markup(browser: Browser, llama_page: tuple[str, dict], tmp_path: Path) -> None:
    """The timeline's stream and nano-batch values went into the SVG markup unescaped: a report.json
    with markup there ran it in the page."""
    from tileflow.viz import render

    evil = '<img src="x" onerror="document.title=\'pwned\'">'
    entry = {"op": "mlp", "stream": evil, "nano_batch": evil, "tokens": 8, "resource": "compute", "start_us": 0.0, "finish_us": 50.0}
    data = embedded_data(llama_page[0])
    data["graphs"][0]["extra"] = {"nano_batch": {"timeline": [entry]}}
    page_path = tmp_path / "timeline.html"
    page_path.write_text(render(data), encoding="utf-8")
    page = browser.page
    page.goto(page_path.as_uri())
    page.wait_for_selector(".timeline svg")
    assert page.locator("#main img").count() == 0
    assert evil in page.inner_text(".timeline")  # shown as text
    assert page.title() != "pwned"
    assert page.locator(".timeline g.bar").get_attribute("data-nb") == evil


def test_kernel_link_of_a_node_keeps_its_graph(browser: Browser, llama_page: tuple[str, dict], tmp_path: Path) -> None:
    """A node's kernel links looked kernels up in whichever graph was shown when clicked: after
    selecting another graph, the details panel still showing the node opened that graph's kernel
    of the same index (or failed on a graph with fewer kernels)."""
    from tileflow.viz import render

    data = embedded_data(llama_page[0])
    first = data["graphs"][0]
    data["graphs"].append({**first, "id": "graph_other", "kernels": [], "passes": [], "input": None, "output": None})
    page_path = tmp_path / "two_graphs.html"
    page_path.write_text(render(data), encoding="utf-8")
    page = browser.page
    page.goto(page_path.as_uri())
    page.locator("#sidebar .step", has_text="output graph").first.click()
    page.fill("#search", "padded_gemm")
    page.wait_for_function("document.querySelector('#main').innerText.includes('match')")
    page.locator("#main .node-row").first.click()
    link = page.locator("#details span.link.mono").first
    name = link.inner_text()
    page.locator("#sidebar .graph-title", has_text="graph_other").click()
    link.click()
    assert page.inner_text("#details h2") == name
    [kernel] = [k for k in first["kernels"] if k["name"] == name]
    assert data["sources"][kernel["source"]].splitlines()[0] in page.inner_text("#details pre:last-of-type")
    assert browser.errors == [], browser.errors


def test_output_graph_is_labelled_output_when_no_pass_changed_it(browser: Browser, llama_page: tuple[str, dict], tmp_path: Path) -> None:
    """Input and output share one snapshot when nothing changed the graph; choosing "output graph"
    showed the heading "input graph" and highlighted both entries."""
    from tileflow.viz import render

    data = embedded_data(llama_page[0])
    data["graphs"][0]["output"] = data["graphs"][0]["input"]
    page_path = tmp_path / "unchanged.html"
    page_path.write_text(render(data), encoding="utf-8")
    page = browser.page
    page.goto(page_path.as_uri())
    page.locator("#sidebar .step", has_text="output graph").first.click()
    assert page.inner_text("#main h2").endswith(": output graph")
    assert page.locator("#sidebar .step.active").all_inner_texts() == ["output graph"]
    page.locator("#sidebar .step", has_text="input graph").first.click()
    assert page.inner_text("#main h2").endswith(": input graph")
    assert page.locator("#sidebar .step.active").all_inner_texts() == ["input graph"]
    assert browser.errors == [], browser.errors


def test_deep_model_draws_only_what_is_expanded(browser: Browser, tmp_path: Path) -> None:
    """Twelve layers (over 700 nodes; Dynamo took over two minutes to trace 32 on one core)
    collapse to a handful of boxes, and opening one layer draws that layer, not the model. Static
    shapes: the page is what is checked, and Dynamo traces them in two thirds of the time."""
    import transformers

    root = tmp_path / "llama12_debug"
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    compiled = torch.compile(model, backend=tileflow.TileflowBackend({"debug_dir": str(root)}), dynamic=False)
    with torch.no_grad():
        compiled(torch.randint(0, 64, (1, 8)), use_cache=False)
    page_path = write_html(root, root / "report.html")
    nodes = embedded_data(page_path.read_text())["graphs"][0]["nodes_in"]
    assert nodes > 700

    page = browser.page
    page.goto(page_path.as_uri())
    page.locator("#sidebar .step", has_text="gemm_padding").first.click()
    page.wait_for_selector("pre.diff")
    after = page.locator(".side").nth(1)
    # Collapsed: the top level only, a handful of boxes for hundreds of nodes.
    counts = [after.locator("svg g.box").count()]
    for group in ("model", "model.layers", "model.layers.7", "model.layers.7.mlp"):
        after.locator(f"svg g.box.group[data-group='{group}']").first.click()
        counts.append(after.locator("svg g.box").count())
    assert counts[0] < 10
    assert all(a < b for a, b in zip(counts, counts[1:])), counts
    assert counts[-1] < nodes / 4  # one layer open of 12: far from every node
    assert after.locator("svg g.box[data-group='model.layers.3']").count() == 1  # still one box
    assert browser.errors == [], browser.errors


@pytest.mark.parametrize("kind", ["debug_dir", "report_json"])
def test_output_onto_the_source_is_refused(kind: str, tmp_path: Path) -> None:
    """`-o DIR/report.json` used to replace the debug_dir's report with the page."""
    root = tmp_path / "dd"
    root.mkdir()
    report = root / "report.json"
    report.write_text(json.dumps({"schema": 1, "recompiles": 0, "graphs": []}))
    source = root if kind == "debug_dir" else report
    result = CliRunner().invoke(viz_command, [str(source), "-o", str(report)])
    assert result.exit_code != 0 and "would overwrite" in result.output, result.output
    assert json.loads(report.read_text())["schema"] == 1


def test_output_onto_a_graphs_report_in_the_debug_dir_is_refused(llama_debug_dir: Path, tmp_path: Path) -> None:
    """Only the root report.json was protected: `-o DIR/graph_000/report.json` replaced that
    graph's report with the page. A page may still go into the debug_dir."""
    [graph_dir] = sorted(llama_debug_dir.glob("graph_*"))
    graph_report = graph_dir / "report.json"
    before = graph_report.read_text()
    result = CliRunner().invoke(viz_command, [str(llama_debug_dir), "-o", str(graph_report)])
    assert result.exit_code != 0 and "would overwrite" in result.output, result.output
    assert graph_report.read_text() == before
    page = llama_debug_dir / "page.html"
    try:
        assert CliRunner().invoke(viz_command, [str(llama_debug_dir), "-o", str(page)]).exit_code == 0
    finally:
        page.unlink(missing_ok=True)  # the debug_dir is shared by the module's tests


# ---------------------------------------------------------------------------------------------
# hand-made debug_dirs: fast checks of what viz reads and refuses


def tiny_nodes(module: str = "act") -> list[dict]:
    """x -> relu -> output, as `graph_to_json` writes nodes."""
    return [
        {"name": "x", "op": "placeholder", "target": "x", "args": [], "kwargs": {}, "users": ["relu"], "module": None},
        {"name": "relu", "op": "call_function", "target": "aten.relu.default", "args": ["%x"], "kwargs": {},
         "users": ["output"], "module": module},
        {"name": "output", "op": "output", "target": "output", "args": [["%relu"]], "kwargs": {}, "users": []},
    ]


def make_debug_dir(root: Path, graphs: dict[str, list[dict]] | None = None, recompiles: tuple[str, ...] = ()) -> Path:
    """A debug_dir as the compiler writes one: per graph its report.json, input/output nodes, one
    pass's before/after and a kernel; the root report.json listing the graphs."""
    entries = []
    for gid, nodes in (graphs or {"graph_000": tiny_nodes()}).items():
        gdir = root / gid
        (gdir / "passes").mkdir(parents=True)
        (gdir / "kernels").mkdir()
        n = len(nodes)
        entry = {
            "graph_id": gid, "compile_id": "0/0", "nodes_in": n, "nodes_out": n, "symbols": {}, "fallbacks": [],
            "passes": [{"name": "noop", "ms": 0.1, "changed": False, "nodes_before": n, "nodes_after": n,
                        "rewrites": {}, "error": None, "graph": gid}],
            "kernels": [{"name": "k", "target": "reference", "source_path": str(gdir / "kernels" / "k.py"), "spec": None,
                         "graph": gid}],
            "plans": [], "residual": "eager", "target": "reference", "debug_dir": str(gdir), "config": {}, "extra": {},
            "recompile": gid in recompiles,
        }
        for name in ("input.json", "output.json", "passes/00_noop.before.json", "passes/00_noop.after.json"):
            (gdir / name).write_text(json.dumps(nodes))
        for name in ("passes/00_noop.before.py", "passes/00_noop.after.py"):
            (gdir / name).write_text("def forward(x):\n    return relu(x)\n")
        (gdir / "kernels" / "k.py").write_text("def kernel(x):\n    return x\n")
        (gdir / "report.json").write_text(json.dumps(entry))
        entries.append(entry)
    (root / "report.json").write_text(json.dumps({"schema": 1, "recompiles": len(recompiles), "graphs": entries}))
    return root


def one_error_line(result: Any) -> str:
    """The command's single `Error: ...` line (it failed, with no traceback)."""
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def _snapshot_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("source", ["root", "root_report", "graph_dir", "graph_report"])
@pytest.mark.parametrize("target", ["graph_001/report.json", "graph_000/passes/00_noop.after.json", "graph_000/input.json",
                                    "report.json", "graph_000/kernels/k.html", "graph_001/page.html", "notes.txt",
                                    "graph_002/page.html", "pages/page.html"])
def test_output_into_the_debug_dir_is_refused(source: str, target: str, tmp_path: Path) -> None:
    """With SOURCE a report.json or a graph folder, -o could name any other file of the debug_dir
    (another graph's report, a snapshot, the root report) and viz replaced it with the page; and
    a page written under kernels/ was embedded as a kernel by the next viz."""
    root = make_debug_dir(tmp_path / "dd", {"graph_000": tiny_nodes(), "graph_001": tiny_nodes()})
    src = {"root": root, "root_report": root / "report.json", "graph_dir": root / "graph_000",
           "graph_report": root / "graph_000" / "report.json"}[source]
    before = _snapshot_files(root)
    line = one_error_line(CliRunner().invoke(viz_command, [str(src), "-o", str(root / target)]))
    assert "would " in line and str(root / target) in line
    assert _snapshot_files(root) == before
    # A page in a new folder (graph_002/ above) was written, and the next viz named that folder as
    # a graph left by an earlier run: only the top level takes a page, as the README says.
    assert sorted(p.name for p in root.iterdir()) == ["graph_000", "graph_001", "report.json"]


def test_a_new_non_page_file_in_the_debug_dir_is_not_called_an_overwrite(tmp_path: Path) -> None:
    """`-o DIR/notes.txt`, a file DIR did not have, was refused with "would overwrite a file of
    the debug_dir": nothing was there to overwrite."""
    root = make_debug_dir(tmp_path / "dd")
    line = one_error_line(CliRunner().invoke(viz_command, [str(root), "-o", str(root / "notes.txt")]))
    assert "overwrite" not in line and "would write a file other than a page into" in line, line
    assert not (root / "notes.txt").exists()
    line = one_error_line(CliRunner().invoke(viz_command, [str(root), "-o", str(root / "report.json")]))
    assert "would overwrite" in line, line


@pytest.mark.parametrize("name", ["page.html", "PAGE.HTML", "page.htm"])
def test_a_page_at_the_debug_dirs_top_level_is_written(name: str, tmp_path: Path) -> None:
    """`.HTML` and `.htm` were refused with "would overwrite the report it reads"."""
    root = make_debug_dir(tmp_path / "dd")
    for source in (root, root / "graph_000", root / "report.json"):
        result = CliRunner().invoke(viz_command, [str(source), "-o", str(root / name)])
        assert result.exit_code == 0, result.output
        assert embedded_data((root / name).read_text())["graphs"][0]["id"] == "graph_000"


def test_output_under_a_file_says_the_file_is_not_a_folder(tmp_path: Path) -> None:
    """`-o file.py/x.html` failed with a bare "File exists"."""
    root = make_debug_dir(tmp_path / "dd")
    (tmp_path / "file.py").write_text("x = 1\n")
    line = one_error_line(CliRunner().invoke(viz_command, [str(root), "-o", str(tmp_path / "file.py" / "x.html")]))
    assert f"{tmp_path / 'file.py'} is a file, not a folder" in line


def test_a_failed_compile_leaves_no_stale_root_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A debug_dir reused by a run that crashed: graph_000 was rewritten but the old run's root
    report.json stayed, and viz drew the new graph under the old report (its model, passes and
    kernels). The root report now lists only this run's finished graphs from the start."""
    import tileflow.compiler

    root = make_debug_dir(tmp_path / "dd", {"graph_000": tiny_nodes(), "graph_001": tiny_nodes()})

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("lowering crashed")

    monkeypatch.setattr(tileflow.compiler, "lower_graph", crash)
    compiled = torch.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval(),
                             backend=tileflow.TileflowBackend({"debug_dir": str(root)}), dynamic=True)
    with pytest.raises(Exception, match="lowering crashed"), torch.no_grad():
        compiled(torch.randn(4, 8))
    assert json.loads((root / "report.json").read_text())["graphs"] == []


@pytest.mark.parametrize("damage", ["snapshot", "input", "graph_report_missing", "graph_report_other"])
def test_files_of_two_runs_are_refused(damage: str, tmp_path: Path) -> None:
    """The reused debug_dir of a run that crashed (or of an older tileflow, which kept the stale
    root report) gave a page drawing one run's graph under another's report, silently."""
    root = make_debug_dir(tmp_path / "dd")
    graph_dir = root / "graph_000"
    other = tiny_nodes()[1:]  # another run's graph: a node fewer
    if damage == "snapshot":
        (graph_dir / "passes" / "00_noop.after.json").write_text(json.dumps(other))
        expected = "records 3 nodes after pass 0 (noop) but"
    elif damage == "input":
        (graph_dir / "input.json").write_text(json.dumps(other))
        expected = "records 3 nodes in the input graph but"
    elif damage == "graph_report_missing":
        (graph_dir / "report.json").unlink()
        expected = "lists graph_000 but"
    else:
        own = json.loads((graph_dir / "report.json").read_text())
        (graph_dir / "report.json").write_text(json.dumps({**own, "nodes_in": 271}))
        expected = "describe different compiles of graph_000"
    out = tmp_path / "page.html"
    line = one_error_line(CliRunner().invoke(viz_command, [str(root), "-o", str(out)]))
    assert expected in line and "two runs" in line, line
    assert not out.exists()


def test_module_less_nodes_join_their_first_user_in_graph_order() -> None:
    """A rewrite reorders a node's `users` (the order the uses were added): an input read by
    layers 0 and 2 was shown under layers.2 after canonicalize, and the layer boxes got cycles."""
    from tileflow.viz import assign_groups, build_groups

    def node(name: str, module: str | None, args: list[str], users: list[str], op: str = "call_function") -> dict:
        return {"name": name, "op": op, "target": "aten.add.Tensor", "module": module, "args": args, "users": users}

    nodes = [
        node("x", None, [], ["add_2", "add_0"], "placeholder"),  # used last by layers.2 first in `users`
        node("add_0", "layers.0", ["%x"], ["relu"]),
        node("relu", None, ["%add_0"], ["add_2", "add_1"]),  # module-less: its first user is layers.1's add
        node("add_1", "layers.1", ["%relu"], ["add_2"]),
        node("add_2", "layers.2", ["%add_1", "%x", "%relu"], ["output"]),
        node("output", None, [["%add_2"]], [], "output"),
    ]
    groups_of = assign_groups(nodes)
    assert groups_of == ["layers.0", "layers.0", "layers.1", "layers.1", "layers.2", ""]
    layers = build_groups(nodes, groups_of)["layers"]
    order = {item: y for _, y, item in layers["items"]}
    assert all(order[layers["items"][a][2]] < order[layers["items"][b][2]] for a, b in layers["edges"]), layers


@pytest.mark.parametrize("activation", ["gelu_tanh", "none"])
def test_gemm_links_only_kernels_of_its_activation(activation: str) -> None:
    """The tags compared were a hand-kept list without gemm_padding's "gelu_tanh": before
    lowering, a gelu_tanh GEMM and a plain one each linked to every kernel of their shape."""
    from tileflow.kernel_spec import ACTIVATIONS
    from tileflow.viz import link_kernels

    tile = {"block_m": 16, "block_n": 32, "block_k": 32}
    plan = json.dumps({"pieces": [{"config": tile}], "dtype": "float32", "k": 64, "n": 128})
    node = {"name": "gemm", "op": "call_function", "target": "tileflow.padded_gemm.default",
            "args": ["%x", "%w", None, None, activation, plan], "tileflow": {"kind": "padded_gemm"}}
    kernels = [{"name": f"gemm_{e or 'plain'}", "spec": {"op": "padded_gemm", "dtype": "float32", "tile": tile,
                                                           "params": [["k", 64], ["n", 128]], "epilogue": [e] if e else []}}
               for e in ("", *ACTIVATIONS)]
    [linked] = link_kernels(node, kernels)
    assert kernels[linked]["name"] == f"gemm_{'plain' if activation == 'none' else activation}"


def test_gemm_with_a_rounding_cast_links_only_the_rounding_kernel() -> None:
    """`round_first` (args[10]) of a float16 GEMM cast to float32 picks the `round` kernel; the
    same GEMM without it (a user's direct cast) the plain cast's."""
    from tileflow.viz import link_kernels

    tile = {"block_m": 16, "block_n": 32, "block_k": 32}
    plan = json.dumps({"pieces": [{"config": tile}], "dtype": "float16", "k": 64, "n": 128})
    kernels = [{"name": "_".join(ep), "spec": {"op": "padded_gemm", "dtype": "float16", "tile": tile,
                                               "params": [["k", 64], ["n", 128]], "epilogue": list(ep)}}
               for ep in (("cast",), ("round", "cast"))]
    for tail, want in (([], "cast"), ([None, None, True], "round_cast")):
        node = {"name": "gemm", "op": "call_function", "target": "tileflow.padded_gemm.default",
                "args": ["%x", "%w", None, None, "none", "torch.float32", plan, "triton", *tail],
                "tileflow": {"kind": "padded_gemm"}}
        [linked] = link_kernels(node, kernels)
        assert kernels[linked]["name"] == want


INT64_MAX = 9223372036854775807  # the end of every slice-to-end in an HF graph


def slice_nodes() -> list[dict]:
    """x -> x[0:] (as aten.slice with end INT64_MAX) -> output."""
    return [
        {"name": "x", "op": "placeholder", "target": "x", "args": [], "kwargs": {}, "users": ["slice_1"], "module": None},
        {"name": "slice_1", "op": "call_function", "target": "aten.slice.Tensor", "args": ["%x", 0, 0, INT64_MAX],
         "kwargs": {"step": -INT64_MAX - 1}, "users": ["output"], "module": "act"},
        {"name": "output", "op": "output", "target": "output", "args": [["%slice_1"]], "kwargs": {}, "users": []},
    ]


def test_ints_past_2_53_reach_the_page_exactly() -> None:
    """JSON.parse reads numbers as doubles: INT64_MAX showed as 9223372036854776000."""
    text = script_json({"args": ["%x", 0, 2**53, 2**53 + 1, INT64_MAX, -INT64_MAX - 1, True, 1.5]})
    assert json.loads(text)["args"] == ["%x", 0, 2**53, str(2**53 + 1), str(INT64_MAX), str(-INT64_MAX - 1), True, 1.5]


def test_recompiles_and_unlisted_graph_folders_are_reported(tmp_path: Path) -> None:
    """The page dropped each graph's recompile flag and the report's count; and graph folders of
    an earlier `tileflow.explain` into the same debug_dir were left out without a word."""
    root = make_debug_dir(tmp_path / "dd", {"graph_000": tiny_nodes(), "graph_001": slice_nodes(), "graph_002": tiny_nodes()},
                          recompiles=("graph_002",))
    report = json.loads((root / "report.json").read_text())
    report["graphs"] = report["graphs"][1:]  # an explain that compiled graph_001 and graph_002 only
    (root / "report.json").write_text(json.dumps(report))
    result = CliRunner().invoke(viz_command, [str(root), "-o", str(root / "page.html")])
    assert result.exit_code == 0, result.output
    [note] = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert note.startswith("note: ") and "graph_000" in note and "graph_001" not in note
    data = embedded_data((root / "page.html").read_text())
    assert data["source"]["unlisted"] == ["graph_000"] and data["recompiles"] == 1
    assert [(g["id"], g["recompile"]) for g in data["graphs"]] == [("graph_001", False), ("graph_002", True)]


def test_recompiles_unlisted_folders_and_int64_in_headless_chromium(browser: Browser, tmp_path: Path) -> None:
    root = make_debug_dir(tmp_path / "dd", {"graph_000": tiny_nodes(), "graph_001": slice_nodes(), "graph_002": tiny_nodes()},
                          recompiles=("graph_002",))
    report = json.loads((root / "report.json").read_text())
    report["graphs"] = report["graphs"][1:]
    (root / "report.json").write_text(json.dumps(report))
    page_path = write_html(root, root / "page.html")
    page = browser.page
    page.goto(page_path.as_uri())
    assert "2 graph(s), 1 recompile(s)" in page.inner_text("#source")
    assert page.locator("#sidebar .graph-title .badge.recompile").count() == 1
    assert "recompile" in page.locator("#sidebar .graph-title", has_text="graph_002").inner_text()
    assert "graph_000" in page.inner_text("#sidebar .note.unlisted")
    page.locator("#sidebar .step", has_text="output graph").first.click()
    page.fill("#search", "slice")
    page.wait_for_function("document.querySelector('#main').innerText.includes('match')")
    page.locator("#main .node-row").first.click()
    details = page.inner_text("#details")
    assert str(INT64_MAX) in details and str(-INT64_MAX - 1) in details and "9223372036854776000" not in details
    assert browser.errors == [], browser.errors


PROC_MEM = Path("/proc/self/mem")  # a file that exists but reads fail (EIO), even for root


@pytest.mark.skipif(not PROC_MEM.exists(), reason="needs Linux's /proc/self/mem")
@pytest.mark.parametrize("unreadable", ["graph_000/kernels/k.py", "graph_000/passes/00_noop.before.py", "report.json"])
def test_an_unreadable_file_is_a_cannot_read_error(unreadable: str, tmp_path: Path) -> None:
    """A kernel or code file that failed to read was reported as "cannot write OUT"; and
    `tileflow report` on an unreadable report.json ended in a traceback."""
    from tileflow.cli import main

    root = make_debug_dir(tmp_path / "dd")
    (root / unreadable).unlink()
    (root / unreadable).symlink_to(PROC_MEM)
    out = tmp_path / "page.html"
    line = one_error_line(CliRunner().invoke(viz_command, [str(root), "-o", str(out)]))
    assert line == f"Error: cannot read {root / unreadable}: Input/output error"
    assert not out.exists()
    if unreadable == "report.json":
        result = CliRunner().invoke(main, ["report", str(root)])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert result.output.strip() == f"error: cannot read {root / unreadable}: Input/output error"


# ---------------------------------------------------------------------------------------------
# what a user debugging a pass reads: marks, code diff, reasons, escaping, determinism


def edit_graph_report(root: Path, gid: str, **fields: Any) -> None:
    """Set `fields` on graph `gid`'s entry in both the root report.json and the graph's own one."""
    report = json.loads((root / "report.json").read_text())
    for entry in report["graphs"]:
        if entry["graph_id"] == gid:
            entry.update(fields)
            (root / gid / "report.json").write_text(json.dumps(entry))
    (root / "report.json").write_text(json.dumps(report))


def test_diff_marks_name_each_node_once_and_see_dtype_and_kwargs_changes() -> None:
    """A node whose only change is its dtype or a keyword argument is "changed"; an added node is
    "added" only, never also "changed" (it has nothing to differ from)."""
    from tileflow.viz import diff_marks

    before = tiny_nodes()
    before[1] = {**before[1], "dtype": "float32", "kwargs": {"inplace": False}}
    dtype_only = [*before[:1], {**before[1], "dtype": "float16"}, before[2]]
    kwargs_only = [*before[:1], {**before[1], "kwargs": {"inplace": True}}, before[2]]
    extra = {"name": "relu_1", "op": "call_function", "target": "aten.relu.default", "args": ["%relu"], "kwargs": {},
             "users": ["output"], "module": "act"}
    added = [*before[:2], extra, before[2]]
    assert diff_marks(before, dtype_only) == {"added": [], "removed": [], "changed": ["relu"]}
    assert diff_marks(before, kwargs_only) == {"added": [], "removed": [], "changed": ["relu"]}
    assert diff_marks(before, added) == {"added": ["relu_1"], "removed": [], "changed": []}
    assert diff_marks(added, before) == {"added": [], "removed": ["relu_1"], "changed": []}


def test_code_diff_adds_the_after_code_and_removes_the_before_code(tmp_path: Path) -> None:
    """The page colors `+` lines as what the pass added: they must be the after code's lines,
    and the file names say which side is which."""
    root = make_debug_dir(tmp_path / "dd")
    passes = root / "graph_000" / "passes"
    (passes / "00_noop.before.py").write_text("def forward(x):\n    return aten_linear(x)\n")
    (passes / "00_noop.after.py").write_text("def forward(x):\n    return padded_gemm(x)\n")
    [p] = collect(root)["graphs"][0]["passes"]
    lines = p["diff"].splitlines()
    assert lines[:2] == ["--- noop.before.py", "+++ noop.after.py"]
    assert "+    return padded_gemm(x)" in lines and "-    return aten_linear(x)" in lines


def test_a_rolled_back_pass_and_fallbacks_keep_their_reasons(tmp_path: Path) -> None:
    """A pass that failed (rolled back) and the nodes left to fallbacks carry their reasons into
    the page: without them a user cannot tell why a pass did nothing."""
    root = make_debug_dir(tmp_path / "dd")
    report = json.loads((root / "report.json").read_text())
    passes = [{**report["graphs"][0]["passes"][0], "error": "RuntimeError: boom <in> & out"}]
    fallbacks = [{"node": "relu", "reason": "unsupported dtype float64", "pass_name": "noop", "graph": "graph_000"}]
    edit_graph_report(root, "graph_000", passes=passes, fallbacks=fallbacks)
    [graph] = collect(root)["graphs"]
    assert graph["passes"][0]["error"] == "RuntimeError: boom <in> & out"
    assert graph["fallbacks"] == fallbacks


def test_a_snapshot_with_more_nodes_than_recorded_is_refused(tmp_path: Path) -> None:
    """Mixed runs are caught whichever run's graph is bigger, not only when a node is missing."""
    root = make_debug_dir(tmp_path / "dd")
    bigger = tiny_nodes()
    bigger.insert(2, {"name": "relu_1", "op": "call_function", "target": "aten.relu.default", "args": ["%relu"],
                      "kwargs": {}, "users": ["output"], "module": "act"})
    (root / "graph_000" / "passes" / "00_noop.before.json").write_text(json.dumps(bigger))
    line = one_error_line(CliRunner().invoke(viz_command, [str(root), "-o", str(tmp_path / "page.html")]))
    assert "records 3 nodes before pass 0 (noop) but" in line and "holds 4" in line, line


def test_graph_reports_that_differ_in_their_passes_are_refused(tmp_path: Path) -> None:
    """The root report and a graph's own report.json that list different passes (another run's
    pipeline) are two compiles, even when their node counts agree."""
    root = make_debug_dir(tmp_path / "dd")
    own = json.loads((root / "graph_000" / "report.json").read_text())
    own["passes"][0]["name"] = "canonicalize"
    (root / "graph_000" / "report.json").write_text(json.dumps(own))
    line = one_error_line(CliRunner().invoke(viz_command, [str(root), "-o", str(tmp_path / "page.html")]))
    assert "describe different compiles of graph_000" in line, line


def test_page_data_does_not_depend_on_the_order_files_are_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unlisted graph folders and kernel files the report does not name come out sorted, so the
    same debug_dir gives the same page whatever order the file system lists it in."""
    root = make_debug_dir(tmp_path / "dd", {"graph_000": tiny_nodes(), "graph_001": tiny_nodes(), "graph_002": tiny_nodes(),
                                            "graph_003": tiny_nodes()})
    report = json.loads((root / "report.json").read_text())
    report["graphs"] = report["graphs"][3:]
    (root / "report.json").write_text(json.dumps(report))
    for name in ("a_helper.py", "m_helper.py", "z_helper.py"):
        (root / "graph_003" / "kernels" / name).write_text(f"# {name}\n")
    first = collect(root)
    real_iterdir, real_rglob = Path.iterdir, Path.rglob
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(real_iterdir(self), reverse=True)))
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: iter(sorted(real_rglob(self, pattern), reverse=True)))
    second = collect(root)
    assert first["source"]["unlisted"] == second["source"]["unlisted"] == ["graph_000", "graph_001", "graph_002"]
    names = [k["name"] for k in second["graphs"][0]["kernels"]]
    assert names == [k["name"] for k in first["graphs"][0]["kernels"]] == ["k", "a_helper.py", "m_helper.py", "z_helper.py"]
    assert script_json(first) == script_json(second)


def test_kernel_files_of_one_name_in_two_subfolders_keep_their_own_source(tmp_path: Path) -> None:
    """A report's source_path under kernels/SUB/ picks that sub-folder's file, not the first file
    of the same name elsewhere under kernels/."""
    root = make_debug_dir(tmp_path / "dd")
    kdir = root / "graph_000" / "kernels"
    for sub in ("a", "b"):
        (kdir / sub).mkdir()
        (kdir / sub / "gemm.py").write_text(f"# kernel of {sub}\n")
    edit_graph_report(root, "graph_000", kernels=[
        {"name": "gemm_b", "target": "reference", "source_path": str(kdir / "b" / "gemm.py"), "spec": None, "graph": "graph_000"},
    ])
    data = collect(root)
    gemm = next(k for k in data["graphs"][0]["kernels"] if k["name"] == "gemm_b")
    assert gemm["source"] == "graph_000/kernels/b/gemm.py" and data["sources"][gemm["source"]] == "# kernel of b\n"


def test_unlisted_kernel_files_are_still_shown(tmp_path: Path) -> None:
    """A file under kernels/ that the report does not list (a backend's shared helper) is shown
    as a kernel without a spec, with its source."""
    root = make_debug_dir(tmp_path / "dd")
    (root / "graph_000" / "kernels" / "helpers.py").write_text("def helper():\n    pass\n")
    data = collect(root)
    helper = next(k for k in data["graphs"][0]["kernels"] if k["name"] == "helpers.py")
    assert helper["spec"] is None and data["sources"][helper["source"]] == "def helper():\n    pass\n"


def test_arguments_are_shortened_only_past_the_limit() -> None:
    """A string argument of exactly MAX_ARG_CHARS characters is shown whole; one more is cut."""
    from tileflow.viz import MAX_ARG_CHARS, _shorten

    assert _shorten(["x" * MAX_ARG_CHARS]) == ["x" * MAX_ARG_CHARS]
    assert _shorten({"plan": "y" * (MAX_ARG_CHARS + 1)}) == {"plan": "y" * MAX_ARG_CHARS + f"… ({MAX_ARG_CHARS + 1} chars)"}


def test_a_weight_read_through_a_module_less_view_joins_the_layer() -> None:
    """`w -> t (no module) -> mm (layers.0)`: t takes layers.0 from its user, and w then from t;
    a module-less node with no grouped user takes the group of its input."""
    from tileflow.viz import assign_groups

    def node(name: str, module: str | None, args: list[Any], users: list[str], op: str = "call_function") -> dict:
        return {"name": name, "op": op, "target": "aten.t.default", "module": module, "args": args, "users": users}

    nodes = [
        node("x", None, [], ["mm"], "placeholder"),
        node("w", None, [], ["t"], "placeholder"),
        node("t", None, ["%w"], ["mm"]),
        node("mm", "layers.0", ["%x", "%t"], ["view"]),
        node("view", None, ["%mm"], ["output"]),  # its only user is the output: it takes its input's group
        node("output", None, [["%view"]], [], "output"),
    ]
    assert assign_groups(nodes) == ["layers.0", "layers.0", "layers.0", "layers.0", "layers.0", ""]


_GEMM_TILE = {"block_m": 16, "block_n": 32, "block_k": 32}


def _gemm_kernel(name: str, n: int) -> dict:
    """A report's GEMM kernel entry: float32, K = 64, width `n`, on `_GEMM_TILE`."""
    return {"name": name, "spec": {"op": "padded_gemm", "dtype": "float32", "tile": _GEMM_TILE,
                                   "params": [["k", 64], ["n", n]], "epilogue": []}}


def test_gemm_links_only_kernels_of_its_width() -> None:
    """Two GEMMs of one K and tile but different N (q_proj and k_proj) link to their own kernel."""
    from tileflow.viz import link_kernels

    kernels = [_gemm_kernel("gemm_n64", 64), _gemm_kernel("gemm_n128", 128)]
    for n, want in ((64, "gemm_n64"), (128, "gemm_n128")):
        plan = json.dumps({"pieces": [{"config": _GEMM_TILE}], "dtype": "float32", "k": 64, "n": n})
        node = {"name": "gemm", "op": "call_function", "target": "tileflow.padded_gemm.default",
                "args": ["%x", "%w", None, None, "none", plan], "tileflow": {"kind": "padded_gemm"}}
        assert [kernels[i]["name"] for i in link_kernels(node, kernels)] == [want]


def test_attention_links_only_kernels_of_its_gqa_factor() -> None:
    """Two attention kernels of one head dim but different GQA factors: each node links its own."""
    from tileflow.viz import link_kernels

    kernels = [{"name": f"attn_gqa{g}", "spec": {"op": "meta_attention", "params": [["gqa", g], ["head_dim", 16]]}}
               for g in (1, 2)]
    for gqa in (1, 2):
        node = {"name": "attn", "op": "call_function", "target": "tileflow.meta_attention.default", "shape": ["1", "2", "s0", "16"],
                "args": [], "tileflow": {"kind": "meta_attention", "gqa": gqa}}
        assert [kernels[i]["name"] for i in link_kernels(node, kernels)] == [f"attn_gqa{gqa}"]


def test_markup_in_the_source_path_is_escaped_in_the_title() -> None:
    """The page title is HTML: a path holding `<`, `&` or quotes is shown as text, not parsed."""
    from tileflow.viz import render

    path = '/runs/<b>"x" & \'y\'</b>'
    page = render(_bare_data(path))
    assert "<title>tileflow viz: /runs/&lt;b&gt;&quot;x&quot; &amp; &#x27;y&#x27;&lt;/b&gt;</title>" in page
    assert embedded_data(page)["source"]["path"] == path


EVIL = '<img src="x" onerror="document.title=\'pwned\'">'


def test_markup_in_node_names_targets_errors_and_kernels_is_text_in_headless_chromium(browser: Browser, tmp_path: Path) -> None:
    """Node names and targets in the SVG drawing, a rolled-back pass's reason and a kernel's source
    go into the page as text: a debug_dir is data, never markup."""
    nodes = tiny_nodes()
    nodes[1] = {**nodes[1], "name": f"relu{EVIL}", "target": f"aten.{EVIL}.x"}
    nodes[0] = {**nodes[0], "users": [nodes[1]["name"]]}
    nodes[2] = {**nodes[2], "args": [[f"%{nodes[1]['name']}"]]}
    root = make_debug_dir(tmp_path / "dd", {"graph_000": nodes})
    report = json.loads((root / "report.json").read_text())
    edit_graph_report(root, "graph_000", passes=[{**report["graphs"][0]["passes"][0], "error": f"boom {EVIL}"}])
    (root / "graph_000" / "kernels" / "k.py").write_text(f"def kernel(x):\n    return x  {EVIL} </pre>\n")
    page_path = write_html(root, tmp_path / "page.html")
    page = browser.page
    page.goto(page_path.as_uri())
    page.locator("#sidebar .step", has_text="noop").first.click()
    assert f"rolled back: boom {EVIL}" in page.inner_text("#main")
    page.locator(".side").first.locator("svg g.box.group[data-group='act']").click()
    box = page.locator(".side").first.locator("svg g.box[data-node='1']")
    assert box.locator("title").text_content() == f"{nodes[1]['name']}\n{nodes[1]['target']}"
    assert box.locator("text").first.text_content() == f"relu{EVIL[:16]}…"  # clipped to the box, as text
    assert page.locator("#main img").count() == 0
    page.locator("#sidebar .step", has_text="overview").first.click()
    page.locator("#main span.link.mono", has_text="k").first.click()
    assert EVIL in page.inner_text("#details pre:last-of-type")
    assert page.locator("#details img").count() == 0
    assert page.title() != "pwned"
    assert browser.errors == [], browser.errors


def test_op_labels_name_the_op_of_any_namespace_in_headless_chromium(browser: Browser, tmp_path: Path) -> None:
    """The attention pass inserts `prims.convert_element_type.default`: its box and row were
    labelled "default" (only aten and tileflow ops showed their op's name)."""
    nodes = tiny_nodes()
    nodes[1] = {**nodes[1], "target": "prims.convert_element_type.default", "shape": ["4", "8"]}
    root = make_debug_dir(tmp_path / "dd", {"graph_000": nodes})
    page_path = write_html(root, tmp_path / "page.html")
    page = browser.page
    page.goto(page_path.as_uri())
    page.locator("#sidebar .step", has_text="noop").first.click()
    before = page.locator(".side").first
    before.locator("svg g.box.group[data-group='act']").click()
    box = page.locator(".side").first.locator("svg g.box[data-node='1']")
    assert box.locator("text").nth(1).text_content() == "convert_element_type"
    rows = page.locator(".side").first.locator(".node-row", has_text="relu")
    assert rows.first.inner_text().split() == ["relu", "convert_element_type", "[4,", "8]"]
    assert browser.errors == [], browser.errors


def test_pass_graph_links_agree_with_lowering(llama_debug_dir: Path) -> None:
    """Before lowering, links are matched on specs; after it, lowering records them. For the same
    node both must name the same kernels: the fused Q/K/V GEMM (N segments 64+32+32 = 128) linked
    to the LM head's kernels (N = 128, no segments) and not to its own."""
    data = collect(llama_debug_dir)
    [graph] = data["graphs"]
    final = {n["name"]: n for n in data["snapshots"][graph["output"]]["nodes"]}
    checked = 0
    for p in graph["passes"]:
        for node in data["snapshots"][p["after"]]["nodes"]:
            kind = (node.get("tileflow") or {}).get("kind")
            if kind in ("padded_gemm", "meta_attention") and node["name"] in final:
                names = lambda n: sorted(graph["kernels"][i]["name"] for i in n.get("kernels", []))  # noqa: E731
                assert names(node) == names(final[node["name"]]), (p["name"], node["name"])
                checked += 1
    assert checked >= 11


def test_sibling_gemm_links_its_segment_kernels_not_a_gemm_of_the_summed_width() -> None:
    """A `fused_siblings` GEMM's plan has the summed N; its kernels are each segment's (or one
    segmented kernel), never the plain kernel of that width, which another GEMM runs."""
    from tileflow.viz import link_kernels

    def plan(n: int) -> dict:
        return {"pieces": [{"config": _GEMM_TILE}], "dtype": "float32", "k": 64, "n": n}

    segmented = _gemm_kernel("qkv_segmented", 128)
    segmented["spec"]["params"].append(["segments", "64x32x32"])
    kernels = [_gemm_kernel("q_n64", 64), _gemm_kernel("kv_n32", 32), _gemm_kernel("lm_head_n128", 128), segmented]
    qkv = {"name": "qkv", "op": "call_function", "target": "tileflow.padded_gemm.default",
           "args": ["%x", "%wq", None, None, "none", None, json.dumps({**plan(128), "segment_plans": [plan(64), plan(32), plan(32)]}),
                    "reference", None, None, False, ["%wk", "%wv"], None],
           "tileflow": {"kind": "padded_gemm", "segments": [64, 32, 32]}}
    lm_head = {"name": "lm_head", "op": "call_function", "target": "tileflow.padded_gemm.default",
               "args": ["%x", "%w", None, None, "none", None, json.dumps(plan(128)), "reference"],
               "tileflow": {"kind": "padded_gemm"}}
    assert [kernels[i]["name"] for i in link_kernels(qkv, kernels)] == ["q_n64", "kv_n32", "qkv_segmented"]
    assert [kernels[i]["name"] for i in link_kernels(lm_head, kernels)] == ["lm_head_n128"]


def test_attention_links_only_kernels_of_its_window_and_cap() -> None:
    """Gemma-2: one GQA factor and head dim, a sliding window in every other layer. Each layer's
    attention links its own kernels, not the other layer's."""
    from tileflow.viz import link_kernels

    def kernel(name: str, **flags: bool) -> dict:
        params = [["causal", True], ["gqa", 2], ["head_dim", 16], ["sliding_window", flags.get("window", False)],
                  ["softcap", True], ["bias", False]]
        return {"name": name, "spec": {"op": "meta_attention", "dtype": "float32", "params": params}}

    kernels = [kernel("attn_window", window=True), kernel("attn_global")]
    # tileflow::meta_attention(q, k, v, attn_mask, causal, scale, target, mask_ranges, softcap, sliding_window)
    base = ["%q", "%k", "%v", None, True, 0.25, "reference", None, "%cap"]
    for args, want in ((base + [8], "attn_window"), (base, "attn_global")):
        node = {"name": "attn", "op": "call_function", "target": "tileflow.meta_attention.default",
                "shape": ["s0", "4", "s1", "16"], "args": args, "tileflow": {"kind": "meta_attention", "gqa": 2}}
        assert [kernels[i]["name"] for i in link_kernels(node, kernels)] == [want]


def test_a_pass_before_graph_holds_no_metadata_the_pass_added(tmp_path: Path) -> None:
    """A pass's before-graph JSON was taken before the pass but written after it, and its nodes'
    `tileflow` entries were the nodes' own meta dicts: nanobatch's split marks, added to the
    padded_gemm nodes' dicts in place, showed in the graph before nanobatch ran."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
    torch._dynamo.reset()
    tileflow.explain(model, torch.randn(8, 64), options={
        "debug_dir": str(tmp_path), "passes": ["canonicalize", "attention", "gemm_padding", "nanobatch"], "nano_batches": 2})
    [graph_dir] = [d for d in tmp_path.iterdir() if d.is_dir()]  # graph ids count on over the process
    passes = graph_dir / "passes"
    gemm_after = json.loads((passes / "02_gemm_padding.after.json").read_text())
    before = json.loads((passes / "03_nanobatch.before.json").read_text())
    after = json.loads((passes / "03_nanobatch.after.json").read_text())
    assert any("nano" in (n.get("tileflow") or {}) for n in after if n["name"].startswith("padded_gemm"))
    assert before == gemm_after  # nothing ran between the two passes
    assert not any("nano" in (n.get("tileflow") or {}) for n in before)


def test_diff_marks_see_a_change_of_tileflow_metadata_only() -> None:
    """nanobatch changes no op, argument or shape: it marks nodes split or whole in their
    `tileflow` metadata (the report's `nano_batch=N`). The page showed "~0 changed" for it."""
    from tileflow.viz import diff_marks

    before = tiny_nodes()
    marked = [*before[:1], {**before[1], "tileflow": {"nano": {"split": True, "token_dim": 0}}}, before[2]]
    assert diff_marks(before, marked) == {"added": [], "removed": [], "changed": ["relu"]}


def test_overview_tells_a_gated_plan_from_a_plain_one_in_headless_chromium(browser: Browser, llama_page: tuple[str, dict],
                                                                          tmp_path: Path) -> None:
    """The small Llama has two plans of N=128, K=64: the gated gate/up GEMM's and the LM head's.
    The overview printed both as "padded_gemm N=128 K=64 float32" (the text report marks the gated one)."""
    plans = embedded_data(llama_page[0])["graphs"][0]["plans"]
    assert any(p.get("gated") for p in plans)
    page_path = tmp_path / "report.html"
    page_path.write_text(llama_page[0], encoding="utf-8")
    page = browser.page
    page.goto(page_path.as_uri())
    lines = [t.partition(": M ")[0] for t in page.locator("#main div.mono").all_inner_texts() if "N=" in t]
    assert len(lines) == len(plans), lines
    assert len(set(lines)) == len(lines), lines
    assert sum("(gated: gate and up)" in t for t in lines) == sum(bool(p.get("gated")) for p in plans)
    assert browser.errors == [], browser.errors


def test_overview_shows_the_reports_notes_in_headless_chromium(browser: Browser, llama_page: tuple[str, dict],
                                                              tmp_path: Path) -> None:
    """A graph's one-line notes in `extra` (why its CUDA graph was not captured) reached the page
    data but were not shown."""
    from tileflow.viz import render

    note = "not captured: CUDA graphs capture CUDA work, this graph runs on cpu <b>"
    data = embedded_data(llama_page[0])
    data["graphs"][0]["extra"] = {"cuda_graphs": note, "nano_batch": {"setting": 2}}
    page_path = tmp_path / "notes.html"
    page_path.write_text(render(data), encoding="utf-8")
    page = browser.page
    page.goto(page_path.as_uri())
    assert note in page.inner_text("#main table")
    assert page.locator("#main table b").count() == 0
    assert browser.errors == [], browser.errors


class _Rotary(torch.nn.Module):
    """A module every layer calls through a global, as transformers 5.25 calls `apply_rotary_pos_emb`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sin() * 2


_ROTARY = _Rotary()


class _RotaryLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ROTARY(self.proj(x)) + 1


def test_a_global_module_is_grouped_under_the_layer_that_called_it(tmp_path: Path) -> None:
    """Nodes of a module reached through a global (Dynamo's G['__import_...'].apply_rotary_pos_emb,
    Llama's RoPE on transformers 5.25) were grouped by that global path: every layer's RoPE ops in
    one top-level group named after the modeling file, none under its own layer."""
    torch._dynamo.reset()
    root = tmp_path / "dd"
    model = torch.nn.Sequential(_RotaryLayer(), _RotaryLayer()).eval()
    tileflow.explain(model, torch.randn(4, 8), options={"debug_dir": str(root)})
    snap = collect(root)["snapshots"][0]
    groups = {n["name"]: n["group"] for n in snap["nodes"]}
    sines = sorted(name for name in groups if name.startswith("sin"))
    assert len(sines) == 2
    assert sorted(groups[name] for name in sines) == ["0._ROTARY", "1._ROTARY"], groups
    assert not any(path.startswith("G[") for path in snap["groups"]), list(snap["groups"])


def test_the_compiled_modules_own_nodes_are_at_the_top_level(tmp_path: Path) -> None:
    """`tileflow.explain(nn.Linear(...))`: the root module's own nodes were drawn in a group named
    after Dynamo's source of it, "L['fn']", rather than at the top level of the graph."""
    torch._dynamo.reset()
    root = tmp_path / "dd"
    tileflow.explain(torch.nn.Linear(16, 32), torch.randn(4, 16), options={"debug_dir": str(root)})
    snap = collect(root)["snapshots"][0]
    assert not any(path.startswith("L[") for path in snap["groups"]), list(snap["groups"])
    calls = [n for n in snap["nodes"] if n["op"] == "call_function"]
    assert calls and all(n["group"] == "" and "module" not in n for n in calls), calls


def test_a_launchs_debug_dir_names_its_rank_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchrun launch of two writes its graphs under debug_dir/rank_0 and rank_1, nothing at the
    top: viz and report on the debug_dir the options named said only that it held no report.json
    (or that it was no debug_dir), not where the ranks' reports are."""
    from tileflow.cli import main

    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        torch._dynamo.reset()
        torch.compile(lambda x: x * 2, backend=tileflow.TileflowBackend({"debug_dir": str(tmp_path)},
                                                                        report=tileflow.Report()))(torch.randn(4))
    for result in (CliRunner().invoke(viz_command, [str(tmp_path), "-o", str(tmp_path / "page.html")]),
                   CliRunner().invoke(main, ["report", str(tmp_path)])):
        assert result.exit_code != 0
        assert str(tmp_path / "rank_0") in result.output and str(tmp_path / "rank_1") in result.output, result.output
    assert CliRunner().invoke(main, ["report", str(tmp_path / "rank_1")]).exit_code == 0
