"""`tileflow export` / `tileflow.load`: round trip through a fresh process, archive contents, and
one clear message for each kind of bad input."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest
import torch
import torch.utils._pytree as pytree
from click.testing import CliRunner

import tileflow
from tileflow.cli import main
from tileflow.pipeline import PassContext, PassResult, register_pass

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent

# The SPEC module the CLI imports: the small Llama of tests/models.py (seeded, so a second process
# rebuilds the same weights), exported as input_ids -> logits with a dynamic sequence length.
SPEC_MODULE = textwrap.dedent(
    f"""
    import dataclasses
    import sys
    from typing import NamedTuple
    import torch
    sys.path.insert(0, {str(TESTS_DIR)!r})
    from models import VOCAB, build

    from tileflow.cli import LogitsOnly


    def llama():
        ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
        return LogitsOnly(build("llama")), (ids,), ({{1: torch.export.Dim("seq", min=2, max=512)}},)


    def raises():
        raise RuntimeError("no weights here")


    def wrong_shape():
        return 42


    def tiny():
        torch.manual_seed(0)
        return torch.nn.Linear(16, 32).eval(), (torch.randn(4, 16),), ({{0: torch.export.Dim("tokens", min=2, max=64)}},)


    class Halves(NamedTuple):
        low: torch.Tensor
        high: torch.Tensor


    class HalvedLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(16, 32)

        def forward(self, x):
            y = self.linear(x)
            return Halves(y[:, :16], y[:, 16:])


    def halves():
        torch.manual_seed(0)
        return HalvedLinear().eval(), (torch.randn(4, 16),), ({{0: torch.export.Dim("tokens", min=2, max=64)}},)


    @dataclasses.dataclass
    class Peak:
        value: torch.Tensor


    @dataclasses.dataclass
    class Scores:
        logits: torch.Tensor
        extra: Halves
        peak: Peak


    class ScoredLinear(HalvedLinear):
        def forward(self, x):
            y = self.linear(x)
            return Scores(y.softmax(-1), Halves(y.amax(-1), y.amin(-1)), Peak(y.abs().amax()))


    def scored():
        torch.manual_seed(0)
        return ScoredLinear().eval(), (torch.randn(4, 16),), ({{0: torch.export.Dim("tokens", min=2, max=64)}},)
    """
)

# Runs in a fresh interpreter (under TRITON_INTERPRET=0, as a process on a machine without a GPU
# starts), one torch import for the checks of three tests:
# - the CLI's Llama archive (argv 1): load, compare with eager over several lengths, and prove that
#   no Dynamo frame was compiled (with a positive control showing the counter does move);
# - before anything has imported transformers' `modeling_outputs`, the archive of a program
#   returning a transformers `ModelOutput` (argv 3; its input and eager's output in argv 4):
#   load and run it;
# - a triton archive (argv 5): loading it says why it cannot run here;
# - the archives of programs returning a NamedTuple and a dataclass (holding a NamedTuple) of the
#   SPEC module (argv 6 and 9; their input and eager's outputs in argv 7): load and run them; one
#   returning a NamedTuple defined inside a function (argv 8): loading it says which class it
#   cannot find.
LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, traceback
    import torch
    import torch._dynamo.utils as dutils
    import tileflow
    sys.path.insert(0, sys.argv[2])
    from models import VOCAB, build

    run = tileflow.load(sys.argv[1])
    fresh = "transformers.modeling_outputs" not in sys.modules
    try:
        data = torch.load(sys.argv[4])
        out = tileflow.load(sys.argv[3])(data["x"])
        torch.testing.assert_close(out.last_hidden_state, data["want"])
        output = type(out).__name__
    except Exception:
        output = traceback.format_exc()
    model = build("llama")
    errors = {}
    with torch.no_grad():
        for n in (2, 5, 13, 64, 512):
            ids = torch.randint(0, VOCAB, (1, n))
            errors[n] = (run(ids) - model(ids, use_cache=False).logits).abs().max().item()
    frames = sum(dutils.counters["frames"].values())
    graphs = dutils.counters["stats"]["unique_graphs"]
    torch.compile(lambda x: x * 2, backend="eager")(torch.ones(3))
    control = dutils.counters["stats"]["unique_graphs"]

    def load_error(path):
        try:
            tileflow.load(path)
            return {"loaded": True}
        except RuntimeError as e:
            return {"RuntimeError": str(e)}
        except Exception:
            return {"other": traceback.format_exc()}

    triton = load_error(sys.argv[5])
    try:
        data = torch.load(sys.argv[7])
        got = tileflow.load(sys.argv[6])(data["x"])
        torch.testing.assert_close(tuple(got), data["want"])
        named = [type(got).__module__, type(got).__qualname__, list(got._fields)]
        got = tileflow.load(sys.argv[9])(data["x"])
        torch.testing.assert_close((got.logits, tuple(got.extra), got.peak.value), data["scores"])
        named += [type(got).__qualname__, type(got.extra).__qualname__, type(got.peak).__qualname__]
    except Exception:
        named = traceback.format_exc()
    local = load_error(sys.argv[8])
    print(json.dumps({"errors": errors, "frames": frames, "graphs": graphs, "control": control,
                      "output": output, "fresh": fresh, "triton": triton, "named": named, "local": local}))
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("spec")
    (d / "tf_export_spec.py").write_text(SPEC_MODULE)
    return d


@pytest.fixture(scope="module")
def archive(spec_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """The small Llama exported through the real CLI in a subprocess (`python -m tileflow`, as
    where the `tileflow` script is not on PATH)."""
    out = spec_dir / "llama.pt2"
    proc = subprocess.run(
        [sys.executable, "-m", "tileflow", "export", "tf_export_spec:llama", "-o", str(out), "--target", "reference"],
        cwd=spec_dir, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc


def _cli(args: list[str], cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, args)
    finally:
        os.chdir(old)


class _ModelOutputLinear(torch.nn.Module):
    """A linear layer returning a transformers `ModelOutput`, as an exported HF model does."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.modeling_outputs import BaseModelOutput  # (registered with pytree as it is imported)

        self.linear = torch.nn.Linear(16, 8)
        self.output = BaseModelOutput

    def forward(self, x: torch.Tensor) -> Any:
        return self.output(last_hidden_state=self.linear(x))


@pytest.fixture(scope="module")
def output_archive(spec_dir: Path) -> tuple[Path, Path, dict]:
    """`_ModelOutputLinear` exported (its archive, a file of an input and eager's output for it,
    and the manifest), for the fresh process of `fresh_load` to load."""
    torch.manual_seed(0)
    model = _ModelOutputLinear().eval()
    x = torch.randn(4, 16)
    archive = tileflow.export_model(model, (x,), ({0: torch.export.Dim("tokens", min=2, max=64)},),
                                    options={"target": "reference"})
    path = archive.save(spec_dir / "output.pt2")
    torch.save({"x": x, "want": model(x).last_hidden_state.detach()}, spec_dir / "io.pt")
    return path, spec_dir / "io.pt", archive.manifest


@pytest.fixture(scope="module")
def triton_archive(spec_dir: Path) -> tuple[Path, Any]:
    """The SPEC's tiny Linear exported for the triton target (built under the interpreter) through
    the CLI, and the CLI's result."""
    out = spec_dir / "tiny_triton.pt2"
    return out, _cli(["export", "tf_export_spec:tiny", "-o", str(out), "--target", "triton"], spec_dir)


def _local_pair_model() -> torch.nn.Module:
    """A model returning a NamedTuple defined inside this function (so no other process can find
    it by module and name); its module is set to the SPEC module's, which a fresh process imports
    without this file's imports."""
    from typing import NamedTuple

    class Pair(NamedTuple):
        first: torch.Tensor
        second: torch.Tensor

    Pair.__module__ = "tf_export_spec"

    class Paired(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Pair:
            return Pair(x * 2, x + 1)

    return Paired()


@pytest.fixture(scope="module")
def container_archives(spec_dir: Path) -> dict[str, Any]:
    """The SPEC's `halves` and `scored` (a Linear returning the NamedTuple `Halves`, and the
    dataclass `Scores` holding one and the dataclass `Peak`, of the SPEC module) exported through
    the CLI, a file of an input and eager's outputs for them, and an archive of
    `_local_pair_model`, for `fresh_load` to load."""
    paths = {name: spec_dir / f"{name}.pt2" for name in ("halves", "scored")}
    for name, out in paths.items():
        result = _cli(["export", f"tf_export_spec:{name}", "-o", str(out), "--target", "reference"], spec_dir)
        assert result.exit_code == 0, result.output
    spec = sys.modules["tf_export_spec"]
    x = torch.randn(5, 16)
    with torch.no_grad():
        # (As plain tuples: the fresh process's classes are its own import of the SPEC module.)
        scores = spec.scored()[0](x)
        want = {"x": x, "want": tuple(spec.halves()[0](x)),
                "scores": (scores.logits, tuple(scores.extra), scores.peak.value)}
    torch.save(want, spec_dir / "halves-io.pt")
    local = tileflow.export_model(_local_pair_model(), (torch.ones(3, 4),), ({0: torch.export.Dim("n", max=16)},),
                                  options={"target": "reference"})
    return {**paths, "io": spec_dir / "halves-io.pt", "local": local.save(spec_dir / "local.pt2")}


@pytest.fixture(scope="module")
def fresh_load(archive, output_archive, triton_archive, container_archives, spec_dir: Path) -> dict:
    """LOAD_SCRIPT's result: the CLI's Llama archive, `output_archive`, `triton_archive` and
    `container_archives` loaded in one fresh process."""
    out_path, io_path, _ = output_archive
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(archive[0]), str(TESTS_DIR), str(out_path), str(io_path),
         str(triton_archive[0]), str(container_archives["halves"]), str(container_archives["io"]),
         str(container_archives["local"]), str(container_archives["scored"])],
        cwd=spec_dir, env=_env(TRITON_INTERPRET="0"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_round_trip_in_fresh_process_without_dynamo(archive, fresh_load: dict) -> None:
    _, proc = archive
    for stage in ("export", "passes", "kernels", "packaging"):
        assert stage in proc.stderr  # the progress lines
    result = fresh_load
    assert all(error <= 1e-4 for error in result["errors"].values()), result["errors"]  # (NaN fails too)
    assert result["frames"] == 0 and result["graphs"] == 0  # load never traced with Dynamo
    assert result["control"] >= 1  # and the counter is live: a torch.compile does move it


def test_archive_holds_rewritten_program_plans_and_kernels(archive) -> None:
    path, _ = archive
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
        program = torch.export.load(io.BytesIO(zf.read("program.pt2")))
    assert {"manifest.json", "program.pt2"} <= names
    assert any(n.startswith("kernels/") for n in names)
    assert manifest["target"] == "reference"
    assert manifest["dynamic"] == {"seq": [2, 512]}
    assert manifest["inputs"] == [{"kind": "tensor", "shape": [1, "seq"], "dtype": "int64", "device": "cpu"}]
    assert manifest["rewrites"]["padded_gemm"] >= 1 and manifest["rewrites"]["meta_attention"] == 2
    # SwiGLU fused as on the JIT path: torch.export's table decomposes silu unless it is kept whole.
    assert manifest["rewrites"].get("fused_swiglu") == 2
    assert manifest["plans"] and all(p["op"] == "padded_gemm" for p in manifest["plans"])
    assert manifest["report"]["graphs"][0]["rewrites"]["meta_attention"] == 2
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert any(t.startswith("tileflow.padded_gemm") for t in targets)
    assert any(t.startswith("tileflow.meta_attention") for t in targets)
    # The manifest lists the tileflow ops the program calls (`tileflow viz` shows them).
    assert {"tileflow.padded_gemm.default", "tileflow.meta_attention.default"} <= set(manifest["tileflow_ops"])
    assert not any("silu" in t or "sigmoid" in t for t in targets)  # in the GEMMs' epilogues
    for key in ("tileflow_version", "torch_version", "triton_version", "content_sha256"):
        assert key in manifest


def test_out_of_range_length_and_wrong_dtype(archive) -> None:
    run = tileflow.load(archive[0])
    with pytest.raises(ValueError, match=r"input 0 dim 1 is 700 but the archive was exported for seq in \[2, 512\]"):
        run(torch.zeros(1, 700, dtype=torch.long))
    with pytest.raises(ValueError, match="input 0 has dtype float32 but the archive was exported for int64"):
        run(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="input 0 dim 0 is 2 but the archive was exported with it fixed at 1"):
        run(torch.zeros(2, 8, dtype=torch.long))


def test_tampered_archive(archive, tmp_path: Path) -> None:
    bad = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(archive[0]) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "program.pt2":
                data = bytearray(data)
                data[len(data) // 2] ^= 0xFF
                data = bytes(data)
            dst.writestr(info.filename, data)
    with pytest.raises(ValueError, match="corrupt or was modified: the content hash"):
        tileflow.load(bad)


def test_edited_manifest_is_detected(archive, tmp_path: Path) -> None:
    """The content hash covers the manifest: a wider dynamic range written into it (which would
    let inputs the program was never checked for through) is refused like an edited program."""
    bad = tmp_path / "widened.pt2"
    with zipfile.ZipFile(archive[0]) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "manifest.json":
                manifest = json.loads(data)
                manifest["dynamic"]["seq"] = [1, 100000]
                data = json.dumps(manifest).encode()
            dst.writestr(info.filename, data)
    with pytest.raises(ValueError, match="corrupt or was modified: the content hash"):
        tileflow.load(bad)


def test_inputs_fixed_at_export_are_checked(tmp_path: Path) -> None:
    """An input exported as None (an optional mask) or as a number is built into the program:
    passing a tensor or another value there is refused, not silently ignored."""
    from tileflow.export import export_model

    class Scaled(torch.nn.Module):
        def forward(self, x, mask=None, k: int = 3):
            return x * k if mask is None else x * mask

    archive = export_model(Scaled(), (torch.randn(2, 4), None, 3), ({0: torch.export.Dim("n", min=1, max=8)}, None, None),
                           options={"target": "reference"})
    run = tileflow.load(archive.save(tmp_path / "scaled.pt2"))
    x = torch.randn(5, 4)
    torch.testing.assert_close(run(x, None, 3), x * 3)
    with pytest.raises(ValueError, match=r"input 1 is a tensor of shape \[5, 4\] but the archive was exported with it fixed at None"):
        run(x, torch.zeros(5, 4), 3)
    with pytest.raises(ValueError, match="input 2 is 4 but the archive was exported with it fixed at 3"):
        run(x, None, 4)
    assert not list(tmp_path.glob("*.partial"))


def test_a_size_the_program_asserts_against_is_left_out_of_the_recorded_range(tmp_path: Path) -> None:
    """MPT slices its ALiBi table at `max(0, max_seq_len - seq)`; torch.export's trace asserts the
    start is not 0, a guard `export_program`'s retry defers to the program. The archive records
    seq up to max_seq_len - 1, so max_seq_len is refused by name at the call (not by an assert
    on an internal symbol), and the sizes below it still match eager. (Also test_model_zoo's export
    check of MPT, which the default run makes here: both attentions on the meta-kernel with ALiBi
    and the exported program matching eager at 3 and 20.)"""
    sys.path.insert(0, str(TESTS_DIR))
    from models import VOCAB, export_zoo_model

    model, archive = export_zoo_model("mpt", "reference")
    assert archive.manifest["dynamic"]["seq"] == [2, 63]
    run = tileflow.load(archive.save(tmp_path / "mpt.pt2"))
    with pytest.raises(ValueError, match=r"input 0 dim 1 is 64 but the archive was exported for seq in \[2, 63\]"):
        run(torch.randint(0, VOCAB, (1, 64)))
    ids = torch.randint(0, VOCAB, (1, 63))
    with torch.no_grad():
        torch.testing.assert_close(run(ids), model(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)
        program = archive.program.module()
        for seq_len in (3, 20):
            ids = torch.randint(0, VOCAB, (1, seq_len))
            torch.testing.assert_close(program(ids), model(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)


class _RefusesSomeSizes(torch.nn.Module):
    """A model whose trace refuses sizes inside its range: one length, and pairs of lengths."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        torch._check(x.shape[0] != 10)
        torch._check(x.shape[0] != y.shape[0] + 1)
        return x.sum() * 2 + y.sum()


def test_sizes_the_program_asserts_against_inside_the_range_are_refused_by_name(tmp_path: Path) -> None:
    """A runtime assert of the trace that refuses a size in the middle of the recorded range
    (only the ends are cut from the range) is checked before the call: a clear ValueError naming
    the inputs, their sizes and the condition over the archive's dim names, where the program
    raised mid-run on an internal symbol. Sizes it accepts run as eager."""
    from tileflow.export import export_model

    seq, other = torch.export.Dim("seq", min=2, max=32), torch.export.Dim("other", min=2, max=32)
    model = _RefusesSomeSizes()
    archive = export_model(model, (torch.randn(8), torch.randn(4)), ({0: seq}, {0: other}), options={"target": "reference"})
    assert archive.manifest["dynamic"] == {"seq": [2, 32], "other": [2, 32]}
    run = tileflow.load(archive.save(tmp_path / "checks.pt2"))
    x, y = torch.randn(11), torch.randn(4)
    torch.testing.assert_close(run(x, y), model(x, y))
    with pytest.raises(ValueError, match=r"input 0 dim 0 is 10, which the program refuses: the model's trace requires Ne\(seq, 10\)"):
        run(torch.randn(10), y)
    with pytest.raises(ValueError, match=r"input 0 dim 0 is 5, input 1 dim 0 is 4|input 1 dim 0 is 4, input 0 dim 0 is 5"):
        run(torch.randn(5), y)


class _RefusesSizesAfterANone(torch.nn.Module):
    """A model taking a None between its tensors whose trace refuses one size of its last input."""

    def forward(self, x: torch.Tensor, mask: None, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        torch._check(z.shape[0] != 10)
        return x.sum() + y.sum() * 2 + z.sum()


def test_size_checks_read_the_inputs_they_name_when_a_none_sits_between_tensors(tmp_path: Path) -> None:
    """The runtime asserts are checked against the input that carries their dim, also when an
    input that is not a tensor (None, kept as a constant placeholder) sits before it: a size of
    another input that the program accepts runs, and the refused size of the asserted input is
    the ValueError naming that input (input 3), not the program's internal assert."""
    from tileflow.export import export_model

    dims = tuple(torch.export.Dim(name, min=2, max=32) for name in ("seq", "other", "last"))
    model = _RefusesSizesAfterANone()
    example = (torch.randn(8), None, torch.randn(4), torch.randn(6))
    archive = export_model(model, example, ({0: dims[0]}, None, {0: dims[1]}, {0: dims[2]}), options={"target": "reference"})
    run = tileflow.load(archive.save(tmp_path / "none_between.pt2"))
    x, y, z = torch.randn(8), torch.randn(10), torch.randn(6)
    torch.testing.assert_close(run(x, None, y, z), model(x, None, y, z))
    with pytest.raises(ValueError, match=r"input 3 dim 0 is 10, which the program refuses: .*Ne\(last, 10\)"):
        run(x, None, torch.randn(4), torch.randn(10))


class _AlibiSlice(torch.nn.Module):
    """MPT's ALiBi slice, `table[max(0, 64 - seq):]` added to the seq rows: exported past 64, the
    trace asserts `seq + max(0, 64 - seq) == 64`, which refuses every seq above 64."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[max(0, 64 - x.shape[0]):]


@pytest.mark.parametrize("top", [200, None])
def test_a_long_refused_tail_or_an_open_range_is_left_out_of_the_recorded_range(tmp_path: Path, top) -> None:
    """A range exported far past the sizes a runtime assert accepts (more refused sizes than the
    ends are stepped in by) or without a max: the archive still records only the sizes the
    program runs, and the first refused one is refused by name at the call."""
    from tileflow.export import export_model

    dim = torch.export.Dim("seq", min=2) if top is None else torch.export.Dim("seq", min=2, max=top)
    model = _AlibiSlice().eval()
    archive = export_model(model, (torch.randn(8),), ({0: dim},), options={"target": "reference"})
    accepted = [n for n in (63, 64, 65, 136, 199) if _runs(model, n)]
    assert archive.manifest["dynamic"]["seq"] == [2, max(accepted)]
    run = tileflow.load(archive.save(tmp_path / "alibi.pt2"))
    x = torch.randn(max(accepted))
    torch.testing.assert_close(run(x), model(x))
    with pytest.raises(ValueError, match=rf"input 0 dim 0 is 65 but the archive was exported for seq in \[2, {max(accepted)}\]"):
        run(torch.randn(65))


def _runs(model: torch.nn.Module, size: int) -> bool:
    """Whether eager `model` takes a `size`-row input."""
    try:
        model(torch.randn(size))
    except RuntimeError:
        return False
    return True


def test_a_model_torch_export_cannot_trace_is_a_clear_error() -> None:
    """torch.export's own errors reached the user raw (the CLI showed one line of a guard on an
    internal symbol); they name the model's line now, as serving programs' builds do."""
    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if (x > 0).sum() > 3:  # a branch on the values: no one graph for every input
                return x * 2
            return x

    with pytest.raises(ValueError, match=r"cannot be exported over the given dynamic ranges \(torch.export\) "
                                         r"at test_export\.py:\d+: \w+: .*a data-dependent branch"):
        tileflow.export_model(DataDependent(), (torch.randn(4, 8),), ({0: torch.export.Dim("n", min=2, max=16)},))


def test_truncated_file(archive, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.pt2"
    data = archive[0].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable tileflow archive"):
        tileflow.load(bad)


def test_loading_an_ascend_export_folder_names_its_archive(archive, tmp_path: Path) -> None:
    """`export --target ascend` writes a folder with the archive in it, as model.pt2."""
    folder = tmp_path / "ascend_project"
    folder.mkdir()
    (folder / "model.pt2").write_bytes(archive[0].read_bytes())
    with pytest.raises(ValueError, match=f"is a folder: load the archive in it, {folder / 'model.pt2'}"):
        tileflow.load(folder)


def test_unavailable_target_in_fresh_process(triton_archive, fresh_load: dict) -> None:
    """A triton archive (built under the interpreter) cannot load without a GPU or the interpreter
    (loaded in `fresh_load`'s process, started with TRITON_INTERPRET=0)."""
    out, result = triton_archive
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(out) as zf:
        assert any(n.startswith("kernels/") and n.endswith(".py") for n in zf.namelist())
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the triton target is available here")
    message = fresh_load["triton"].get("RuntimeError", "")
    assert "exported for target 'triton', which cannot run here" in message, fresh_load["triton"]
    assert "TRITON_INTERPRET=1" in message


def test_ascend_export_writes_the_project_beside_the_archive(spec_dir: Path) -> None:
    out = spec_dir / "tiny_ascend"
    result = _cli(["export", "tf_export_spec:tiny", "-o", str(out), "--target", "ascend"], spec_dir)
    assert result.exit_code == 0, result.output
    assert "wrote the Ascend C project" in result.output
    manifest = json.loads((out / "kernels.json").read_text())
    kernels = manifest["kernels"]
    assert kernels and {k["spec"]["op"] for k in kernels} <= {"padded_gemm", "meta_attention"}
    for k in kernels:  # every kernel has its device code, tiling, host code and binding
        for rel in k["files"]:
            assert (out / rel).is_file() and (out / rel).read_text().strip()
        assert f'extern "C" __global__ __aicore__ void {k["ident"]}(' in (out / f"op_kernel/{k['ident']}.cpp").read_text()
    cmake = (out / "CMakeLists.txt").read_text()
    assert "ascendc_library(" in cmake and all(f"op_kernel/{k['ident']}.cpp" in cmake for k in kernels)
    # The report's kernel paths name the archive's members (they dropped op_kernel/).
    with zipfile.ZipFile(out / "model.pt2") as zf:
        report = json.loads(zf.read("manifest.json"))["report"]
        paths = [k["source_path"] for g in report["graphs"] for k in g["kernels"] if k.get("source_path")]
        assert paths and all(p in zf.namelist() for p in paths), (paths, zf.namelist())
    # The archive beside it names its target; loading it here says what is missing (in this
    # process: no NPU runtime is imported here either).
    with pytest.raises(RuntimeError, match="exported for target 'ascend', which cannot run here") as err:
        tileflow.load(out / "model.pt2")
    assert "torch_npu" in str(err.value)


# The same path (a transformers config folder exported through the CLI, loaded, run, and a length
# past the range refused) in the default run: test_cli_example_sizes_follow_the_dynamic_ranges.
@pytest.mark.extended
def test_export_from_transformers_config(tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS_DIR))
    from models import VOCAB, build

    build("llama").config.save_pretrained(tmp_path / "cfg")
    out = tmp_path / "cfg.pt2"
    result = _cli(["export", str(tmp_path / "cfg"), "-o", str(out), "--dynamic", "seq=2:64", "--seq-len", "6"], tmp_path)
    assert result.exit_code == 0, result.output
    run = tileflow.load(out)
    assert run.manifest["dynamic"] == {"seq": [2, 64]}
    assert run(torch.randint(0, VOCAB, (1, 33))).shape == (1, 33, VOCAB)
    with pytest.raises(ValueError, match=r"exported for seq in \[2, 64\]"):
        run(torch.randint(0, VOCAB, (1, 65)))


@pytest.mark.parametrize("text", ["[]", "{", '{"graphs": 3}'])
def test_report_command_says_a_file_is_not_a_report(text: str, tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text(text)
    result = _cli(["report", str(tmp_path / "report.json")], tmp_path)
    assert result.exit_code == 2 and "is not a tileflow report" in result.stderr, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("options", [{"passes": ["canonicalize", "gemm_padding", "nanobatch"], "nano_batches": 2},
                                     {"cuda_graphs": True}])
def test_export_refuses_what_an_archive_cannot_hold(options: dict) -> None:
    # The nano-batch schedule and CUDA graphs live in a compiled model's runtime, not in the graph.
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SiLU())
    with pytest.raises(ValueError, match="does not archive nano-batching or CUDA graphs"):
        tileflow.export_model(model, (torch.randn(4, 8),), options=options)


def test_export_refuses_options_that_are_no_mapping() -> None:
    # dict() took a list of pairs silently and failed on ["verify"] naming neither options nor the fix.
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SiLU())
    for options in (["verify"], [("verify", True)]):
        with pytest.raises(ValueError, match=r"tileflow options must be a mapping .*options=\{'verify': True\}"):
            tileflow.export_model(model, (torch.randn(4, 8),), options=options)


@register_pass
class _ReluToSigmoid:
    """Swaps relu for sigmoid and claims success: only `verify` can catch it."""

    name = "test_export_relu_to_sigmoid"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten.relu.default:
                node.target = torch.ops.aten.sigmoid.default
                result.count("swapped")
        return result


def test_export_verify_checks_each_pass_on_the_example_inputs() -> None:
    """`verify=True` in an export runs each pass's graph on the example args against the
    unrewritten one (it used to record "skipped"): the wrong pass is rolled back, the GEMM
    rewrite kept, and the archive computes the model."""
    torch.manual_seed(0)
    # The ReLU before the GEMM: after it, gemm_padding would fuse it and leave the bad pass nothing.
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(8, 16))
    x = torch.randn(4, 8)
    options = {"target": "reference", "verify": True,
               "passes": ["canonicalize", "gemm_padding", "test_export_relu_to_sigmoid"]}
    archive = tileflow.export_model(model, (x,), ({0: torch.export.Dim("tokens", min=2, max=64)},), options=options)
    [graph] = archive.report.graphs
    assert graph.extra["verify"] == "checked each pass against the unrewritten graph"
    errors = {p.name: p.error for p in graph.passes}
    assert errors["gemm_padding"] is None and "changed output 0" in errors["test_export_relu_to_sigmoid"]
    assert graph.rewrites.get("padded_gemm") == 1
    with torch.no_grad():
        torch.testing.assert_close(archive.program.module()(x), model(x))
    with pytest.raises(ValueError, match="only emits its kernels here: drop verify"):
        tileflow.export_model(model, (x,), options={"target": "ascend", "verify": True})


class _CountsItsCalls(torch.nn.Module):
    """A buffer updated in place on every call (a step counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.proj(x) + self.calls


def test_export_verify_leaves_the_models_buffers_as_they_were(tmp_path: Path) -> None:
    """An exported module's buffers are its own attributes: verify's runs of the graph updated
    them in place, so the archive started from the state after verification (the counter's
    first call gave 3 instead of 1). Now each run restores them and compares what it wrote."""
    torch.manual_seed(0)
    model, x = _CountsItsCalls(), torch.randn(4, 8)
    fresh = _CountsItsCalls()
    fresh.load_state_dict(model.state_dict())
    options = {"target": "reference", "verify": True}
    archive = tileflow.export_model(model, (x,), ({0: torch.export.Dim("tokens", min=2, max=64)},), options=options)
    assert model.calls.item() == 0
    assert all(p.error is None for p in archive.report.graphs[0].passes)
    archive.save(tmp_path / "counter.pt2")
    loaded = tileflow.export.load(tmp_path / "counter.pt2")
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(loaded(x), fresh(x))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("tf_export_spec:missing", "has no attribute 'missing'"),
        ("tf_export_spec:raises", "raises() raised RuntimeError: no weights here"),
        ("tf_export_spec:wrong_shape", "returned a int; it must return (model, example_args)"),
        ("not-a-spec", "neither package.module:function nor a transformers config"),
    ],
)
def test_bad_spec_is_one_line_exit_2(spec_dir: Path, spec: str, message: str) -> None:
    result = _cli(["export", spec, "-o", str(spec_dir / "never.pt2")], spec_dir)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("dynamic, message", [
    ("tokens=8:8", "MIN 8 must be below MAX 8 (for one fixed size, leave the dim static"),
    ("tokens=9:3", "MIN 9 must be below MAX 3"),
    ("tokens=8", "must look like NAME=MIN:MAX"),
    (("tokens=2:8", "tokens=2:16"), "tokens is given twice (2:8 and 2:16): give each dim once"),
])
def test_bad_dynamic_range_is_one_line_exit_2(spec_dir: Path, dynamic: str | tuple[str, ...], message: str) -> None:
    flags = [f for d in ((dynamic,) if isinstance(dynamic, str) else dynamic) for f in ("--dynamic", d)]
    result = _cli(["export", "tf_export_spec:tiny", "-o", str(spec_dir / "never.pt2"), *flags], spec_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: --dynamic ") and message in line


def test_an_output_path_naming_a_folder_is_refused_before_the_export(spec_dir: Path) -> None:
    result = _cli(["export", "tf_export_spec:tiny", "-o", str(spec_dir / "newdir") + "/"], spec_dir)
    assert result.exit_code == 2 and "is a folder; give the archive's file name" in result.stderr
    assert not (spec_dir / "newdir").exists()


def test_bad_spec_in_subprocess_has_no_traceback(spec_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tileflow.cli", "export", "tf_export_spec:raises", "-o", "x.pt2"],
        cwd=spec_dir, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: SPEC 'tf_export_spec:raises': raises() raised RuntimeError: no weights here; fix the function"
    ]


def _tiny_debug_dir(root: Path) -> Path:
    """A debug_dir of one small compiled graph."""
    torch._dynamo.reset()
    tileflow.explain(torch.nn.Linear(16, 32), torch.randn(4, 16), options={"debug_dir": str(root)})
    return root


def test_report_command_reads_what_viz_reads(tmp_path: Path) -> None:
    """A debug_dir, one graph's folder or report.json in it, and an archive all print (they used to
    be refused: a graph's own report.json with "schema None ... regenerate the report")."""
    root = _tiny_debug_dir(tmp_path / "dd")
    archive = tmp_path / "tiny.pt2"
    tileflow.export_model(torch.nn.Linear(16, 32), (torch.randn(4, 16),), ({0: torch.export.Dim("tokens", min=2, max=64)},),
                          options={"target": "reference"}).save(archive)
    [graph_dir] = root.glob("graph_*")  # graph ids count on over the process
    for source in (root, root / "report.json", graph_dir, graph_dir / "report.json", archive):
        result = _cli(["report", str(source)], tmp_path)
        assert result.exit_code == 0, (source, result.output)
        assert result.stdout.startswith("tileflow report: 1 graph(s)") and "padded_gemm=1" in result.stdout
    result = _cli(["report", str(tmp_path)], tmp_path)  # a folder without a report.json
    assert result.exit_code == 2 and "is a folder without a report.json" in result.stderr


@pytest.mark.parametrize("text", ['{"schema": 1, "graphs": [{"graph_id": "g", "symbols": {"s0": [1]}}]}',
                                  '{"schema": 1, "graphs": [{"graph_id": "g", "passes": [{"name": "p", "ms": "x", '
                                  '"changed": true, "nodes_before": 1, "nodes_after": 1}]}]}'])
def test_report_command_bad_values_are_one_line(text: str, tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text(text)
    result = _cli(["report", str(tmp_path / "report.json")], tmp_path)
    assert result.exit_code == 2 and "is not a tileflow report" in result.stderr, result.output
    assert "Traceback" not in result.output


def test_a_reused_debug_dir_adds_no_stale_kernels_to_an_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second process exporting into the same debug_dir compiles a graph of the same id: the
    first one's kernels used to stay in its kernels/ folder and be packed into the new archive."""
    import itertools

    import tileflow.compiler

    dyn = ({0: torch.export.Dim("tokens", min=2, max=64)},)
    options = {"target": "reference", "debug_dir": str(tmp_path / "dd")}
    monkeypatch.setattr(tileflow.compiler, "_GRAPH_IDS", itertools.count())
    tileflow.export_model(torch.nn.Linear(16, 32), (torch.randn(4, 16),), dyn, options=options)
    monkeypatch.setattr(tileflow.compiler, "_GRAPH_IDS", itertools.count())  # as in a fresh process
    second = tileflow.export_model(torch.nn.Linear(24, 40, bias=False), (torch.randn(4, 24),), dyn, options=options)
    assert second.kernels and all("_k24_n40" in name for name in second.kernels), sorted(second.kernels)
    assert sorted(p.name for p in (tmp_path / "dd" / "graph_000" / "kernels").iterdir()) == sorted(second.kernels)


def test_export_reads_tileflow_environment_variables(spec_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TILEFLOW_DEBUG_DIR and TILEFLOW_TARGET count as for torch.compile (both used to be ignored)."""
    monkeypatch.setenv("TILEFLOW_DEBUG_DIR", str(tmp_path / "dd"))
    tileflow.export_model(torch.nn.Linear(16, 32), (torch.randn(4, 16),), options={"target": "reference"})
    assert (tmp_path / "dd" / "report.json").is_file()
    monkeypatch.delenv("TILEFLOW_DEBUG_DIR")
    monkeypatch.setenv("TILEFLOW_TARGET", "ascend")
    out = tmp_path / "ascend"
    result = _cli(["export", "tf_export_spec:tiny", "-o", str(out)], spec_dir)
    assert result.exit_code == 0, result.output
    assert "target=ascend" in result.stdout and (out / "model.pt2").is_file() and (out / "CMakeLists.txt").is_file()
    result = _cli(["export", "tf_export_spec:tiny", "-o", str(tmp_path / "ref.pt2"), "--target", "reference"], spec_dir)
    assert result.exit_code == 0 and "target=reference" in result.stdout, result.output


def test_an_unwritable_output_is_refused_before_the_export(spec_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    result = _cli(["export", "tf_export_spec:tiny", "-o", str(tmp_path / "afile" / "model.pt2")], spec_dir)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()  # no progress lines: nothing was compiled
    assert line == f"error: cannot write {tmp_path / 'afile' / 'model.pt2'}: {tmp_path / 'afile'} is a file, not a folder"


# ---------------------------------------------------------------------------------------------
# Inputs torch.export takes that the archive once mishandled (a second reader's findings)


class _Halves(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(2, -1) + x


class _Shifted(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y[1:] + x


@pytest.mark.parametrize("module,derived,recorded,good,bad,message", [
    (_Halves, lambda n: 2 * n, "2*n", 10, 12, r"at 2\*n = 10"),
    (_Shifted, lambda n: n + 1, "n + 1", 6, 9, r"at n \+ 1 = 6"),
])
def test_a_derived_dim_is_exported_recorded_and_checked(tmp_path: Path, module, derived, recorded: str, good: int,
                                                        bad: int, message: str) -> None:
    """y of 2 * n rows beside x of n: the export crashed after the compile (a derived size taken
    for a symbol); the archive now records it as `2*n` and refuses a y that breaks it. With an
    offset (y of n + 1 rows), the re-export spells it out (`Dim + 1`) and the archive records
    `n + 1`. Either runs another size of n."""
    n = torch.export.Dim("n", min=2, max=16)
    archive = tileflow.export_model(module(), (torch.randn(4), torch.randn(int(derived(4)))), ({0: n}, {0: derived(n)}),
                                    options={"target": "reference"})
    assert [i["shape"] for i in archive.manifest["inputs"]] == [["n"], [recorded]]
    run = tileflow.load(archive.save(tmp_path / "derived.pt2"))
    x, y = torch.randn(5), torch.randn(good)
    torch.testing.assert_close(run(x, y), module()(x, y))
    with pytest.raises(ValueError, match=rf"input 1 dim 0 is {bad} but the archive was exported with it {message}"):
        run(torch.randn(5), torch.randn(bad))


class _AtLeast100(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.zeros(max(100, x.shape[0]))  # the trace asserts n >= 100


def test_a_long_refused_head_is_left_out_of_the_recorded_range() -> None:
    """98 refused sizes at the bottom (more than the ends are stepped in by): the range recorded
    was [66, 200], whose first size the program refuses; now the sizes it runs."""
    archive = tileflow.export_model(_AtLeast100(), (torch.randn(150),), ({0: torch.export.Dim("n", min=2, max=200)},),
                                    options={"target": "reference"})
    assert archive.manifest["dynamic"]["n"] == [100, 200]
    assert _runs(_AtLeast100(), 100) and not _runs(_AtLeast100(), 99)


class _Scaled(torch.nn.Module):
    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return x * k


def test_a_dynamic_int_input_stays_dynamic_and_is_checked(tmp_path: Path) -> None:
    """An int marked Dim.DYNAMIC was fixed at its example value in the archive, and a call with
    another value died on a guard inside the program; it is an int input with a range now."""
    archive = tileflow.export_model(_Scaled(), (torch.randn(4), 3), (None, torch.export.Dim.DYNAMIC),
                                    options={"target": "reference"})
    assert archive.manifest["inputs"][1] == {"kind": "int", "dim": "k"}
    run = tileflow.load(archive.save(tmp_path / "scaled.pt2"))
    torch.testing.assert_close(run(torch.ones(4), 5), torch.full((4,), 5.0))
    with pytest.raises(ValueError, match="input 1 must be an int"):
        run(torch.ones(4), 2.5)
    fixed = tileflow.export_model(_Scaled(), (torch.randn(4), 3), None, options={"target": "reference"})
    with pytest.raises(ValueError, match="fixed at 3"):
        tileflow.load(fixed.save(tmp_path / "fixed.pt2"))(torch.ones(4), 5)


class _PairSum(torch.nn.Module):
    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return xs[0] + xs[1]


def test_a_list_input_is_called_as_the_model_takes_it(tmp_path: Path) -> None:
    """A list input exported fine but the loaded program could not be called at all."""
    n = torch.export.Dim("n", min=2, max=16)
    archive = tileflow.export_model(_PairSum(), ([torch.randn(4), torch.randn(4)],), ([{0: n}, {0: n}],),
                                    options={"target": "reference"})
    assert archive.manifest["dynamic"] == {"n": [2, 16]}
    run = tileflow.load(archive.save(tmp_path / "pair.pt2"))
    torch.testing.assert_close(run([torch.ones(7), torch.ones(7)]), torch.full((7,), 2.0))
    with pytest.raises(ValueError, match=r"input 1 dim 0 is 8 but input 0 dim 0 \(the same dim n\) is 7"):
        run([torch.ones(7), torch.ones(8)])


class _DividesBySize(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._check(128 // x.shape[0] != 7)
        return x * 2


def test_a_range_from_0_with_an_assert_dividing_by_the_size(tmp_path: Path) -> None:
    """The range's ends are evaluated at size 0 too: a ZeroDivisionError escaped the export."""
    archive = tileflow.export_model(_DividesBySize(), (torch.randn(8),), ({0: torch.export.Dim("n", min=0, max=64)},),
                                    options={"target": "reference"})
    assert archive.manifest["dynamic"]["n"] == [1, 64]
    run = tileflow.load(archive.save(tmp_path / "div.pt2"))
    torch.testing.assert_close(run(torch.ones(3)), torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="input 0 dim 0 is 17, which the program refuses"):
        run(torch.ones(17))


def test_an_export_failure_says_torchs_reason_and_fix() -> None:
    """Two dims the model adds together must be one: the message named tileflow's own line and
    a data-dependent hint that did not apply, and dropped torch's reason and fix."""
    class Add(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    dims = ({0: torch.export.Dim("a", min=2, max=16)}, {0: torch.export.Dim("b", min=2, max=16)})
    with pytest.raises(ValueError) as err:
        tileflow.export_model(Add(), (torch.randn(4), torch.randn(4)), dims, options={"target": "reference"})
    message = str(err.value)
    assert "must always be equal" in message and "Suggested fix: b = a" in message
    assert "capture.py" not in message and "data-dependent" not in message


def test_device_and_a_lone_tensor_example(tmp_path: Path) -> None:
    """An input on another device than the program's is refused by name (a meta tensor came
    back); a lone tensor as the example is one input (it was split into rows)."""
    linear = torch.nn.Linear(16, 8).eval()
    archive = tileflow.export_model(linear, torch.randn(4, 16), options={"target": "reference"})
    assert archive.manifest["inputs"] == [{"kind": "tensor", "shape": [4, 16], "dtype": "float32", "device": "cpu"}]
    run = tileflow.load(archive.save(tmp_path / "linear.pt2"))
    with pytest.raises(ValueError, match="input 0 is on meta but the archive's program runs on cpu"):
        run(torch.randn(4, 16, device="meta"))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        archive.save(tmp_path)


def test_cli_example_sizes_follow_the_dynamic_ranges(tmp_path: Path) -> None:
    """A dynamic batch exported with the example batch of 1 (which torch.export fixes), or a seq
    range above the example length, failed after the build with a misleading message; the
    examples now move inside the ranges, and ones given outside them are refused up front. (The
    archive of a transformers config: it loads, runs, and refuses a length past its range.)"""
    sys.path.insert(0, str(TESTS_DIR))
    from models import VOCAB, build

    build("llama").config.save_pretrained(tmp_path / "cfg")
    out = tmp_path / "batch.pt2"
    result = _cli(["export", str(tmp_path / "cfg"), "-o", str(out), "--dynamic", "batch=1:4", "--dynamic", "seq=16:32"],
                  tmp_path)
    assert result.exit_code == 0, result.output
    run = tileflow.load(out)
    assert run.manifest["dynamic"] == {"batch": [1, 4], "seq": [16, 32]}
    assert run(torch.randint(0, VOCAB, (3, 20))).shape == (3, 20, VOCAB)
    with pytest.raises(ValueError, match=r"exported for seq in \[16, 32\]"):
        run(torch.randint(0, VOCAB, (3, 33)))
    result = _cli(["export", str(tmp_path / "cfg"), "-o", str(tmp_path / "x.pt2"), "--seq-len", "300"], tmp_path)
    assert result.exit_code == 2 and "--seq-len 300 lies outside the seq sizes" in result.output


def test_report_command_on_a_damaged_archive_is_one_line(archive, tmp_path: Path) -> None:
    """A flipped byte inside the compressed manifest raised zlib.error through `tileflow report`."""
    path = archive[0]
    info = zipfile.ZipFile(path).getinfo("manifest.json")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 5] ^= 0xFF
    bad = tmp_path / "damaged.pt2"
    bad.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["report", str(bad)])
    assert result.exit_code == 2 and "is not a tileflow report" in result.output and "Traceback" not in result.output


def test_report_command_on_a_truncated_archive_says_so(archive, tmp_path: Path) -> None:
    """A .pt2 that is no longer a zip file was read as JSON: "is not a tileflow report: Expecting
    value: line 1 column 1 (char 0)"; `tileflow.load` says what the file is and what to do."""
    bad = tmp_path / "truncated.pt2"
    bad.write_bytes(archive[0].read_bytes()[:100])
    result = CliRunner().invoke(main, ["report", str(bad)])
    assert result.exit_code == 2 and "is not a readable tileflow archive (truncated or not a zip file); re-export it" \
        in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Checks of `read_archive` and `LoadedProgram.check_inputs` each reached on its own


def _tiny_archive(tmp_path: Path) -> Path:
    """A Linear(16, 8) archive with its token dim in [2, 64]."""
    torch.manual_seed(0)
    dyn = ({0: torch.export.Dim("tokens", min=2, max=64)},)
    return tileflow.export_model(torch.nn.Linear(16, 8).eval(), (torch.randn(4, 16),), dyn,
                                 options={"target": "reference"}).save(tmp_path / "tiny.pt2")


def _rewritten(src: Path, dst: Path, manifest_changes: dict, drop: str | None = None) -> Path:
    """`src` with its manifest changed and the member `drop` left out, the content hash made right
    again: only the check under test can refuse it."""
    from tileflow.export import MANIFEST_MEMBER, content_hash

    with zipfile.ZipFile(src) as zf:
        manifest = json.loads(zf.read(MANIFEST_MEMBER))
        members = {n: zf.read(n) for n in zf.namelist() if n not in (MANIFEST_MEMBER, drop)}
    manifest.update(manifest_changes)
    manifest["content_sha256"] = content_hash(members, manifest)
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr(MANIFEST_MEMBER, json.dumps(manifest))
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


def test_an_archive_of_another_format_or_tileflow_version_is_refused(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An archive whose hash is right but whose format, tileflow version (the minor one too before
    1.0) or program is not this tileflow's is refused by name, not loaded."""
    import tileflow.export

    monkeypatch.setattr(tileflow.export, "_tileflow_version", lambda: "0.1.0")
    path = _tiny_archive(tmp_path)
    with pytest.raises(ValueError, match="has archive format 1; this tileflow reads format 2"):
        tileflow.load(_rewritten(path, tmp_path / "format.pt2", {"format": 1}))
    for other in ("0.2.0", "1.1.0"):
        with pytest.raises(ValueError, match=rf"was exported by tileflow {other}, incompatible with tileflow 0.1.0"):
            tileflow.load(_rewritten(path, tmp_path / "version.pt2", {"tileflow_version": other}))
    with pytest.raises(ValueError, match="has no program.pt2; re-export it"):
        tileflow.load(_rewritten(path, tmp_path / "empty.pt2", {}, drop="program.pt2"))
    x = torch.randn(5, 16)
    run = tileflow.load(_rewritten(path, tmp_path / "patch.pt2", {"tileflow_version": "0.1.7+local"}))
    torch.testing.assert_close(run(x), tileflow.load(path)(x))


def test_inputs_of_the_wrong_count_rank_or_below_the_range_are_refused(tmp_path: Path) -> None:
    """The count of inputs, each tensor's number of dims and a size below its range's minimum are
    checked before the program runs, each with its own message."""
    run = tileflow.load(_tiny_archive(tmp_path))
    with pytest.raises(ValueError, match=r"takes 1 input\(s\), got 2"):
        run(torch.randn(4, 16), torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"input 0 has 1 dims but the archive was exported for 2 \(\['tokens', 16\]\)"):
        run(torch.randn(16))
    with pytest.raises(ValueError, match=r"input 0 dim 0 is 1 but the archive was exported for tokens in \[2, 64\]"):
        run(torch.randn(1, 16))


def test_a_bool_is_no_int_input(tmp_path: Path) -> None:
    """A bool is an int to Python, but not what an int input was exported for: a dynamic int input
    and one fixed at its value both refuse True (and a fixed int refuses an equal float)."""
    archive = tileflow.export_model(_Scaled(), (torch.randn(4), 3), (None, torch.export.Dim.DYNAMIC),
                                    options={"target": "reference"})
    run = tileflow.load(archive.save(tmp_path / "dynamic.pt2"))
    with pytest.raises(ValueError, match="input 1 must be an int"):
        run(torch.ones(4), True)
    fixed = tileflow.export_model(_Scaled(), (torch.randn(4), 1), None, options={"target": "reference"})
    run = tileflow.load(fixed.save(tmp_path / "fixed.pt2"))
    for value in (True, 1.0):
        with pytest.raises(ValueError, match=f"input 1 is {value} but the archive was exported with it fixed at 1"):
            run(torch.ones(4), value)


def test_options_without_a_value_are_refused() -> None:
    """`--options KEY` with no `=` says the form to use (not that '' is no integer)."""
    from tileflow.cli import SpecError, _parse_options

    with pytest.raises(SpecError, match="--options 'max_tokens' must look like key=value"):
        _parse_options(("max_tokens",))


EXPORT_FAILS = textwrap.dedent(
    """
    import torch


    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x * 2 if (x > 0).sum() > 3 else x


    def model():
        return DataDependent(), (torch.randn(4, 8),), ({0: torch.export.Dim("n", min=2, max=16)},)
    """
)


def test_a_failed_export_exits_1_with_one_line(tmp_path: Path) -> None:
    """A SPEC that loads but whose export fails: exit status 1 (not 0, which a script would take
    for a written archive), the reason on one line, and no archive."""
    (tmp_path / "tf_export_fails_spec.py").write_text(EXPORT_FAILS)
    out = tmp_path / "never.pt2"
    result = _cli(["export", "tf_export_fails_spec:model", "-o", str(out)], tmp_path)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: export failed: ")
    assert "Traceback" not in result.output and not out.exists()


def test_a_dynamic_dim_the_spec_does_not_name_is_refused(spec_dir: Path) -> None:
    """`--dynamic` naming no Dim of the SPEC's dynamic_shapes would be ignored silently: it is an error."""
    result = _cli(["export", "tf_export_spec:tiny", "-o", str(spec_dir / "never.pt2"), "--dynamic", "seq=2:8"], spec_dir)
    assert result.exit_code == 2, result.output
    assert "--dynamic names ['seq'] are not Dims in the dynamic_shapes tiny() returned" in result.stderr


# GPT-2's table (no offset) in the extended run; the default one refuses a range past it, and
# exports the range its hint names, in the test after this one.
@pytest.mark.parametrize("name, most", [pytest.param("gpt2", 256, marks=pytest.mark.extended), ("opt", 64)])
def test_a_seq_range_past_a_learned_position_table_is_refused(tmp_path: Path, name: str, most: int) -> None:
    """GPT-2 looks its 256-row `wpe` up at `arange(seq)`, OPT its 66-row table at `arange(seq) + 2`:
    a program exported for longer sequences would accept calls that fail at the table. The export
    says how far the range may go; at that size it exports."""
    sys.path.insert(0, str(TESTS_DIR))
    from models import MODELS, ZOO

    (MODELS.get(name) or ZOO[name][0])().config.save_pretrained(tmp_path / "cfg")
    out = tmp_path / "x.pt2"
    result = _cli(["export", str(tmp_path / "cfg"), "-o", str(out), "--dynamic", f"seq=2:{most + 40}"], tmp_path)
    assert result.exit_code == 1, result.output
    assert f"seq may be at most {most}: declare seq with max={most} (--dynamic seq=2:{most})" in result.stderr
    assert not out.exists()
    result = _cli(["export", str(tmp_path / "cfg"), "-o", str(out), "--dynamic", f"seq=2:{most}"], tmp_path)
    assert result.exit_code == 0, result.output


def test_a_seq_range_whose_min_is_the_table_s_last_size_gets_a_hint_the_cli_accepts(tmp_path: Path) -> None:
    """GPT-2's 256-row `wpe` and `--dynamic seq=256:300`: only 256 fits. The hint named
    `--dynamic seq=256:256`, which the CLI refuses (MIN must be below MAX); the range it names
    exports."""
    sys.path.insert(0, str(TESTS_DIR))
    from models import MODELS

    MODELS["gpt2"]().config.save_pretrained(tmp_path / "cfg")
    out = tmp_path / "x.pt2"
    result = _cli(["export", str(tmp_path / "cfg"), "-o", str(out), "--dynamic", "seq=256:300"], tmp_path)
    assert result.exit_code == 1, result.output
    hint = re.search(r"--dynamic (seq=\d+:\d+)", result.stderr)
    assert hint is not None, result.stderr
    result = _cli(["export", str(tmp_path / "cfg"), "-o", str(out), "--dynamic", hint.group(1)], tmp_path)
    assert result.exit_code == 0, result.output


def test_a_dynamic_dim_a_transformers_config_has_not_is_refused(tmp_path: Path) -> None:
    """A transformers config exports input_ids [batch, seq]: `--dynamic` of any other name is an error before the build."""
    sys.path.insert(0, str(TESTS_DIR))
    from models import build

    build("llama").config.save_pretrained(tmp_path / "cfg")
    result = _cli(["export", str(tmp_path / "cfg"), "-o", str(tmp_path / "x.pt2"), "--dynamic", "heads=2:4"], tmp_path)
    assert result.exit_code == 2, result.output
    assert "--dynamic names ['heads'] are not dims of input_ids; use seq and/or batch" in result.stderr
    assert not (tmp_path / "x.pt2").exists()


def test_the_content_hash_tells_member_names_from_their_bytes() -> None:
    """The content hash records each member's length, so moving bytes between a member's name and
    its data (`a` holding `bc` vs `ab` holding `c`) or between two members changes it."""
    from tileflow.export import content_hash

    assert content_hash({"a": b"bc"}, {}) != content_hash({"ab": b"c"}, {})
    assert content_hash({"a": b"xy", "b": b"z"}, {}) != content_hash({"a": b"x", "b": b"yz"}, {})
    manifest = {"format": 2, "content_sha256": "anything"}
    assert content_hash({"a": b"x"}, manifest) == content_hash({"a": b"x"}, {**manifest, "content_sha256": "other"})


# ---------------------------------------------------------------------------------------------
# Range narrowing past the steps taken from each end (a mutation audit's findings)


def _narrowed(monkeypatch: pytest.MonkeyPatch, condition: Callable[[Any], Any], lo: int,
              hi: int | None) -> tuple[int, int | None]:
    """The range `_ranges_the_program_accepts` records for one size symbol whose program asserts
    `condition(size)`, stepping in 4 sizes from each end (the export steps in 64)."""
    import sympy

    import tileflow.export as export

    size = sympy.Symbol("s0", integer=True, positive=True)
    monkeypatch.setattr(export, "_asserted_conditions", lambda graph: [condition(size)])
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    return export._ranges_the_program_accepts(gm, {"s0": (lo, hi)}, max_steps=4)["s0"]


def test_refusals_past_the_steps_are_cut_only_as_a_head_or_a_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the sizes stepped in from an end, a run of refused sizes is cut from the range only
    when it is a head or a tail of it: when a probe inside finds a size the program runs (35
    below 64, 130 above 64), the range keeps its declared bottom, or the top it stepped down to,
    so no size the program accepts is recorded as refused; a bottom left refused is no start to
    bisect the top from. An open range whose assert refuses one inner size stays open."""
    import sympy

    assert _narrowed(monkeypatch, lambda s: s >= 100, 2, 200) == (100, 200)
    assert _narrowed(monkeypatch, lambda s: sympy.Or(sympy.Eq(s, 35), s >= 64), 2, 200) == (2, 200)
    assert _narrowed(monkeypatch, lambda s: s <= 64, 2, 200) == (2, 64)
    assert _narrowed(monkeypatch, lambda s: sympy.Or(s <= 64, sympy.Eq(s, 130)), 2, 200) == (2, 196)
    assert _narrowed(monkeypatch, lambda s: s <= 1000, 2, None) == (2, 1000)
    # Refused at both ends, with no head to cut: the top is not bisected from a refused bottom.
    assert _narrowed(monkeypatch, lambda s: sympy.Or(sympy.Eq(s, 35), sympy.Eq(s, 190)), 2, 200) == (2, 196)
    assert _narrowed(monkeypatch, lambda s: sympy.Ne(s, 11), 2, None) == (2, None)
    # An open range's refusals above 64 stop before the farthest probe (2 * 65 + 4): no tail, so it stays open.
    assert _narrowed(monkeypatch, lambda s: sympy.Or(s <= 64, sympy.Eq(s, 134)), 2, None) == (2, None)


def test_cli_example_size_moves_the_default_inside_the_range() -> None:
    """The default example size is moved inside the range from either side (below its bottom:
    up to it; above its top: down to it), a single-size range included; a given one is kept."""
    from tileflow.cli import SpecError, _example_size

    assert _example_size("--seq-len", None, 8, "seq", (16, 32)) == 16
    assert _example_size("--seq-len", None, 8, "seq", (2, 5)) == 5
    assert _example_size("--seq-len", None, 8, "seq", (2, 2)) == 2
    assert _example_size("--seq-len", 3, 8, "seq", (2, 5)) == 3
    with pytest.raises(SpecError, match="needs an example size of at least 2"):
        _example_size("--batch", None, 2, "batch", (2, 1))


def test_a_model_in_training_mode_is_exported_as_in_eval_mode(tmp_path: Path) -> None:
    """`export_model` puts the model in eval mode: a model left in training mode is archived
    without its dropout, so the loaded program computes the model's eval output."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5))  # training mode, as built
    x = torch.randn(4, 8)
    archive = tileflow.export_model(model, (x,), ({0: torch.export.Dim("tokens", min=2, max=64)},),
                                    options={"target": "reference"})
    run = tileflow.load(archive.save(tmp_path / "dropout.pt2"))
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(run(x), model.eval()(x), rtol=1e-4, atol=1e-4)


def test_both_ends_of_the_range_run_and_a_short_call_or_an_extra_dim_is_refused(tmp_path: Path) -> None:
    """The recorded range is inclusive at both ends: sizes 2 and 64 run and equal the Linear
    computed by hand; too few inputs and a tensor with more dims than exported are refused by
    name before the program runs, as is a fixed dim below its size (only one more input, one dim
    fewer and a fixed dim above its size were checked)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)  # the weights `_tiny_archive` seeds
    run = tileflow.load(_tiny_archive(tmp_path))
    for n in (2, 64):
        x = torch.randn(n, 16, dtype=torch.float64)
        want = x @ linear.weight.detach().double().T + linear.bias.detach().double()
        torch.testing.assert_close(run(x.float()).double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"takes 1 input\(s\), got 0"):
        run()
    with pytest.raises(ValueError, match=r"input 0 has 3 dims but the archive was exported for 2"):
        run(torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="input 0 dim 1 is 8 but the archive was exported with it fixed at 16"):
        run(torch.randn(4, 8))


def test_a_derived_dim_smaller_than_its_relation_is_refused(tmp_path: Path) -> None:
    """y must have exactly 2 * n rows: a y shorter than that is refused by name, not only a
    longer one."""
    n = torch.export.Dim("n", min=2, max=16)
    archive = tileflow.export_model(_Halves(), (torch.randn(4), torch.randn(8)), ({0: n}, {0: 2 * n}),
                                    options={"target": "reference"})
    run = tileflow.load(archive.save(tmp_path / "halves.pt2"))
    with pytest.raises(ValueError, match=r"input 1 dim 0 is 8 but the archive was exported with it at 2\*n = 10"):
        run(torch.randn(5), torch.randn(8))


class _ScaledWithin(torch.nn.Module):
    """x * k for an int k the model itself bounds to [2, 9]."""

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        torch._check(k >= 2)
        torch._check(k <= 9)
        return x * k


def test_a_dynamic_int_input_is_checked_against_its_range(tmp_path: Path) -> None:
    """A dynamic int input whose trace bounds it to [2, 9] records that range; its top runs and
    one past it is refused by name before the program runs."""
    archive = tileflow.export_model(_ScaledWithin(), (torch.randn(4), 3), (None, torch.export.Dim.DYNAMIC),
                                    options={"target": "reference"})
    assert archive.manifest["dynamic"] == {"k": [2, 9]}
    run = tileflow.load(archive.save(tmp_path / "within.pt2"))
    torch.testing.assert_close(run(torch.ones(4), 9), torch.full((4,), 9.0))
    with pytest.raises(ValueError, match=r"input 1 is 10 but the archive was exported for k in \[2, 9\]"):
        run(torch.ones(4), 10)


def test_an_archive_returning_a_transformers_output_loads_in_a_fresh_process(output_archive, fresh_load: dict) -> None:
    """A program whose output is a transformers `ModelOutput` (an HF model exported as it is)
    failed to load in a fresh process, where transformers' lazy `modeling_outputs` had not
    registered its classes with pytree, with torch's "check the warnings above"; `load` imports
    the modules of the program's containers first, which the manifest names. (Loaded and run in
    `fresh_load`'s process, before anything there imported `modeling_outputs`.)"""
    assert fresh_load["fresh"]
    assert fresh_load["output"] == "BaseModelOutput", fresh_load["output"][-2000:]
    assert output_archive[2]["pytree_modules"] == ["transformers.modeling_outputs"]
    assert output_archive[2]["pytree_containers"] == []  # (transformers registers its classes itself)


def test_archives_returning_a_named_tuple_or_a_dataclass_load_in_a_fresh_process(container_archives,
                                                                                fresh_load: dict) -> None:
    """`torch.export.save` refused a program whose output is a model's NamedTuple ("we didn't
    register a serializated_type_name"), and torch.export a model returning its own dataclass
    ("not a known type", reported as if the dynamic ranges were at fault). Export names each such
    class by its module and qualified name, and `load` finds it there again, as pickle does.
    (Loaded and run in `fresh_load`'s process: the classes come back, fields and values, a
    NamedTuple and a dataclass inside the dataclass too.)"""
    assert fresh_load["named"] == ["tf_export_spec", "Halves", ["low", "high"], "Scores", "Halves", "Peak"], \
        fresh_load["named"][-2000:]
    manifests = {k: json.loads(zipfile.ZipFile(container_archives[k]).read("manifest.json")) for k in ("halves", "scored")}
    assert manifests["halves"]["pytree_containers"] == [
        {"kind": "namedtuple", "module": "tf_export_spec", "qualname": "Halves", "serialized_name": "tf_export_spec.Halves"}]
    assert [(e["kind"], e["qualname"]) for e in manifests["scored"]["pytree_containers"]] == [
        ("dataclass", "Scores"), ("namedtuple", "Halves"), ("dataclass", "Peak")]
    # (load finds the named classes itself: their module is not among those it imports first)
    assert all("tf_export_spec" not in m["pytree_modules"] for m in manifests.values())


def test_a_named_tuple_no_other_process_can_find_loads_here_and_is_named_where_it_cannot(
        container_archives, fresh_load: dict, tmp_path: Path) -> None:
    """A NamedTuple defined inside a function saves and loads in the process that exported it
    (twice over: a second export of the class, defined again, names it again, and a program
    loaded before still runs and returns its own class; deregistering the first class broke it);
    a fresh process cannot find it and says which class, where, and what to do."""
    message = fresh_load["local"].get("RuntimeError", "")
    assert "the NamedTuple _local_pair_model.<locals>.Pair of module tf_export_spec" in message, fresh_load["local"]
    assert "cannot find" in message and "define it at the top level of an importable module" in message
    first = tileflow.load(container_archives["local"])
    again = tileflow.export_model(_local_pair_model(), (torch.ones(3, 4),), ({0: torch.export.Dim("n", max=16)},),
                                  options={"target": "reference"})
    x, want = torch.full((5, 4), 3.0), (torch.full((5, 4), 6.0), torch.full((5, 4), 4.0))
    for run in (first, tileflow.load(again.save(tmp_path / "again.pt2"))):
        got = run(x)
        assert type(got).__qualname__ == "_local_pair_model.<locals>.Pair", type(got)
        torch.testing.assert_close(tuple(got), want)
        assert [e["qualname"] for e in run.manifest["pytree_containers"]] == ["_local_pair_model.<locals>.Pair"]
    assert type(first(x)) is not type(again.program.module()(x))  # each program keeps its own class


def test_finding_a_returned_dataclass_changes_no_state_and_walks_every_instance(tmp_path: Path) -> None:
    """The dataclasses a model returns are found by running it once, on fake tensors: a buffer it
    updates in place is left as it was (run on the real tensors, the export would have changed
    the model and saved the changed buffer), and a dataclass found only inside a second instance
    of a class already found (a child node's `meta`) is registered too."""
    import dataclasses

    @dataclasses.dataclass
    class Meta:
        scale: torch.Tensor

    @dataclasses.dataclass
    class Node:
        value: torch.Tensor
        meta: Meta | None = None
        child: "Node | None" = None

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("seen", torch.zeros(4))

        def forward(self, x: torch.Tensor) -> Node:
            self.seen.add_(x.sum(0))
            return Node(x * 2, None, Node(x + 1, Meta(x.mean(0))))

    model = Counting()
    archive = tileflow.export_model(model, (torch.ones(3, 4),), ({0: torch.export.Dim("n", max=16)},),
                                    options={"target": "reference"})
    assert torch.equal(model.seen, torch.zeros(4))
    assert [e["qualname"] for e in archive.manifest["pytree_containers"]] == [Node.__qualname__, Meta.__qualname__]
    got = tileflow.load(archive.save(tmp_path / "node.pt2"))(torch.full((5, 4), 2.0))
    assert type(got.child.meta) is Meta and got.meta is None
    torch.testing.assert_close(got.child.meta.scale, torch.full((4,), 2.0))


def test_a_dataclass_an_archive_would_return_wrong_is_refused() -> None:
    """torch.export rebuilds a dataclass through its constructor from the constructor's fields: a
    field set outside it (`init=False`) came back as its default from the archive, silently. Such
    a class is refused at export, naming the field."""
    import dataclasses

    @dataclasses.dataclass
    class Scored:
        value: torch.Tensor
        doubled: torch.Tensor | None = dataclasses.field(init=False, default=None)

    class Scoring(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Scored:
            out = Scored(x)
            out.doubled = x * 2
            return out

    with pytest.raises(ValueError, match=r"field\(s\) \['doubled'\] set outside its constructor \(init=False\)"):
        tileflow.export_model(Scoring(), (torch.ones(3, 4),), ({0: torch.export.Dim("n", max=16)},),
                              options={"target": "reference"})


class _Owned(NamedTuple):
    """A NamedTuple its owner may register with pytree under a name of its own."""

    first: torch.Tensor
    second: torch.Tensor


def test_load_refuses_to_take_over_a_class_its_owner_registered_under_another_name(tmp_path: Path) -> None:
    """An archive names a NamedTuple `module.qualname`; where its owner has registered it with
    pytree under another name, load registered it again under the archive's (with only torch's
    warning), changing how the owner's saves name it for the whole process. It refuses, naming
    both names."""
    from tileflow import export as export_module

    class Pairing(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> _Owned:
            return _Owned(x, x + 1)

    path = tileflow.export_model(Pairing(), (torch.ones(3, 4),), ({0: torch.export.Dim("n", max=16)},),
                                 options={"target": "reference"}).save(tmp_path / "owned.pt2")
    pytree._deregister_pytree_node(_Owned)
    export_module._NAMED_CONTAINERS.pop(_Owned)
    pytree._register_namedtuple(_Owned, serialized_type_name="owner.Owned")
    try:
        with pytest.raises(RuntimeError, match=r"_Owned of .* is registered with pytree in this process under "
                                               r"'owner.Owned', not '.*_Owned' as the archive saved it"):
            tileflow.load(path)
    finally:
        pytree._deregister_pytree_node(_Owned)


def test_a_model_returning_a_plain_object_keeps_torch_exports_reason() -> None:
    """Only dataclasses are registered and exported again: an object of a plain class among the
    outputs leaves torch.export's own reason (register a pytree for it) in the error."""

    class Holder:
        def __init__(self, value: torch.Tensor) -> None:
            self.value = value

    class Holding(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Holder:
            return Holder(x * 2)

    with pytest.raises(ValueError, match="not a known type") as caught:
        tileflow.export_model(Holding(), (torch.ones(3, 4),), ({0: torch.export.Dim("n", max=16)},),
                              options={"target": "reference"})
    assert "Holder" in str(caught.value)


class _Operands(NamedTuple):
    """A model's input container (a NamedTuple of this module's)."""

    x: torch.Tensor
    shift: torch.Tensor


class _ShiftedLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, operands: _Operands) -> torch.Tensor:
        return self.linear(operands.x) + operands.shift


def test_an_archive_taking_a_named_tuple_loads_without_unpickling_it_unchecked(tmp_path: Path, capfd) -> None:
    """A program taking a NamedTuple keeps it among its pickled example inputs; torch.load's
    weights-only unpickler refused the class, fell back to a full unpickle and logged that on
    stderr (with a logging error of its own). `load` allows the archive's named containers for
    the load."""
    torch.manual_seed(0)
    model = _ShiftedLinear().eval()
    n = torch.export.Dim("n", min=2, max=64)
    archive = tileflow.export_model(model, (_Operands(torch.randn(5, 8), torch.randn(5, 8)),),
                                    (_Operands({0: n}, {0: n}),), options={"target": "reference"})
    path = archive.save(tmp_path / "operands.pt2")
    capfd.readouterr()
    run = tileflow.load(path)
    stderr = capfd.readouterr().err
    assert "Weights only load failed" not in stderr and "weights_only=False" not in stderr, stderr[-2000:]
    operands = _Operands(torch.randn(7, 8), torch.randn(7, 8))
    with torch.no_grad():
        torch.testing.assert_close(run(operands), model(operands))
    assert [e["qualname"] for e in archive.manifest["pytree_containers"]] == ["_Operands"]


@pytest.mark.parametrize("dim_as_kwarg", [False, True])
def test_a_running_count_reaches_its_length_times_the_count(dim_as_kwarg: bool) -> None:
    """OPT's positions: `cumsum(full([1, n], c), 1)` holds up to c * n, its dim given either way."""
    import torch.fx as fx

    from tileflow.export import _largest_value

    graph = fx.Graph()
    ones = graph.call_function(torch.ops.aten.full.default, ([1, 7], 2))
    ones.meta["val"] = torch.empty(1, 7)
    counts = graph.call_function(torch.ops.aten.cumsum.default, (ones,) if dim_as_kwarg else (ones, 1),
                                 {"dim": 1} if dim_as_kwarg else {})
    shifted = graph.call_function(torch.ops.aten.sub.Tensor, (counts, 1))
    assert int(_largest_value(shifted)) == 13


def test_report_command_counts_a_graph_folders_own_recompile(tmp_path: Path) -> None:
    """A graph's own report.json of a recompile printed "0 recompile(s)" (viz counts it as 1): the
    recompile was lost from the text of `tileflow report DIR/graph_NNN`."""
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    torch._dynamo.reset()
    root = tmp_path / "dd"
    compiled = torch.compile(double, backend=tileflow.TileflowBackend({"debug_dir": str(root)}, report=tileflow.Report()),
                             dynamic=True)
    compiled(torch.randn(4))
    compiled(torch.randn(4, dtype=torch.float64))  # a dtype guard fails: the frame compiles again
    first, second = sorted(root.glob("graph_*"))
    assert json.loads((second / "report.json").read_text())["recompile"] is True
    for source, count in ((root, 1), (first, 0), (second, 1), (second / "report.json", 1)):
        result = _cli(["report", str(source)], tmp_path)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[0].endswith(f"{count} recompile(s)"), (source, result.stdout.splitlines()[0])


@pytest.mark.parametrize("manifest", ['{"format": 1}', "[]"])
def test_report_command_on_an_archive_without_a_report_says_so(manifest: str, tmp_path: Path) -> None:
    """A zip whose manifest.json holds no report printed "'NoneType' object has no attribute 'get'"
    (viz says "its manifest.json has no report")."""
    archive = tmp_path / "model.pt2"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("manifest.json", manifest)
    result = _cli(["report", str(archive)], tmp_path)
    assert result.exit_code == 2 and "manifest.json has no report" in result.stderr, result.output
    assert "NoneType" not in result.stderr and "Traceback" not in result.output


def test_an_archive_runs_no_replaced_attention_beside_the_meta_kernel(archive) -> None:
    """The attention pass's dead-code elimination runs outside Dynamo's tracing context in an
    export, where FX keeps SDPA's CPU flash kernel (tagged random, for its dropout) as impure: the
    exported Llama kept both replaced `scaled_dot_product_attention` calls, nothing using them,
    and ran them beside the meta-kernel (the attention pass reported 233 -> 234 nodes). (The
    module's CLI export of that Llama, read back from its archive.)"""
    with zipfile.ZipFile(archive[0]) as zf:
        program = torch.export.load(io.BytesIO(zf.read("program.pt2")))
        report = tileflow.Report.from_dict(json.loads(zf.read("manifest.json"))["report"])
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("tileflow.meta_attention.default") == 2
    assert not [t for t in targets if "scaled_dot_product" in t], targets
    attention = next(p for p in report.passes if p.name == "attention")
    assert attention.nodes_after < attention.nodes_before


class _SelfAttentionBlock(torch.nn.Module):
    """A hand-written attention block: a fused qkv Linear on the [B, S, D] input, causal SDPA."""

    def __init__(self, d: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


def test_an_archive_takes_an_input_laid_out_as_eager_takes_it(tmp_path: Path) -> None:
    """The canonicalize pass flattened the 3-D input of a Linear with `view`, chosen from the
    example's (contiguous) strides: the archive raised "view size is not compatible with input
    tensor's size and stride" for a permuted input that eager and torch.export's own program
    take (torch.compile guards on strides and recompiles; an exported program does not)."""
    torch.manual_seed(0)
    model = _SelfAttentionBlock().eval()
    dims = {0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("seq", min=2, max=64)}
    archive = tileflow.export_model(model, (torch.randn(2, 8, 32),), (dims,), options={"target": "reference"})
    run = tileflow.load(archive.save(tmp_path / "block.pt2"))
    x = torch.randn(32, 5, 3).permute(2, 1, 0)  # [3, 5, 32], not contiguous
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x), rtol=1e-4, atol=1e-4)


def test_cli_dynamic_moves_the_dims_derived_from_the_one_it_names(tmp_path: Path) -> None:
    """`--dynamic n=2:32` replaced the Dim n of the SPEC's dynamic_shapes but left `2 * n` on
    the old n (max 16): torch.export refused "Not all values of n ... n <= 32 satisfy ... <= 16",
    a range the user never gave."""
    (tmp_path / "tf_derived_spec.py").write_text(textwrap.dedent(
        """
        import torch


        class Halves(torch.nn.Module):
            def forward(self, x, y):
                return x.repeat(2) + y


        def derived():
            n = torch.export.Dim("n", min=2, max=16)
            return Halves(), (torch.randn(4), torch.randn(8)), ({0: n}, {0: 2 * n})
        """
    ))
    out = tmp_path / "derived.pt2"
    result = _cli(["export", "tf_derived_spec:derived", "-o", str(out), "--dynamic", "n=2:32"], tmp_path)
    assert result.exit_code == 0, result.output
    run = tileflow.load(out)
    assert run.manifest["dynamic"] == {"n": [2, 32]}
    torch.testing.assert_close(run(torch.ones(30), torch.ones(60)), torch.full((60,), 2.0))


@pytest.mark.parametrize("flags", [["--batch", "7"], ["--seq-len", "9"]])
def test_example_sizes_for_a_function_spec_are_refused(spec_dir: Path, flags: list[str]) -> None:
    """`--batch` / `--seq-len` size a transformers config's example only: with a function SPEC
    they were ignored without a word and the archive kept the function's own example sizes."""
    result = _cli(["export", "tf_export_spec:tiny", "-o", str(spec_dir / "sized.pt2"), *flags], spec_dir)
    assert result.exit_code == 2, result.output
    assert f"{flags[0]} applies only to a transformers config SPEC" in result.stderr
    assert not (spec_dir / "sized.pt2").exists()


def test_an_unnamed_dynamic_dim_is_named_by_where_it_is(tmp_path: Path) -> None:
    """A `Dim.DYNAMIC` dim was named by torch's symbol (`s77`) in the manifest and in the
    refusal of a size below its range, which also did not say that torch.export takes such a
    dim to be at least 2, nor how to export one that takes 1."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU()).eval()
    archive = tileflow.export_model(model, (torch.randn(4, 32),), ({0: torch.export.Dim.DYNAMIC},),
                                    options={"target": "reference"})
    run = tileflow.load(archive.save(tmp_path / "mlp.pt2"))
    assert run.manifest["dynamic"] == {"input_dim0": [2, None]}
    assert run.manifest["inputs"][0]["shape"] == ["input_dim0", 32]
    x = torch.randn(7, 32)
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x))
    with pytest.raises(ValueError, match=r"input 0 dim 0 is 1 but the archive was exported for input_dim0 in "
                                         r"\[2, None\]: .*Dim\(\.\.\., min=1\)"):
        run(torch.randn(1, 32))


def test_example_args_that_do_not_fit_forward_are_refused_by_name() -> None:
    """A keyword-only input was refused as "the model cannot be exported over the given dynamic
    ranges", from a TypeError deep in torch.export: the ranges were not the problem."""

    class Scaled(torch.nn.Module):
        def forward(self, x: torch.Tensor, *, scale: float) -> torch.Tensor:
            return x * scale

    with pytest.raises(ValueError, match=r"example_args do not fit Scaled.forward \(missing a required argument: "
                                         r"'scale'\): an archive takes positional inputs only"):
        tileflow.export_model(Scaled(), (torch.randn(3),), options={"target": "reference"})


class _GatedHalves(torch.nn.Module):
    """Two Linears over the halves of the [B, S, 2D] input (`x.chunk(2, -1)`: a split's items,
    views of the graph input)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, g = x.chunk(2, dim=-1)
        return self.a(u) * self.b(g)


class _UnboundPair(torch.nn.Module):
    """One Linear over both items of `x.unbind(0)`, x [2, B, S, D]."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.a = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = x.unbind(0)
        return self.a(p) + self.a(q)


@pytest.mark.parametrize("model, example, dims, given", [
    (_GatedHalves, (2, 8, 32), {0: "batch", 1: "seq"}, lambda: torch.randn(32, 5, 3).permute(2, 1, 0)),
    (_UnboundPair, (2, 2, 8, 16), {1: "batch", 2: "seq"}, lambda: torch.randn(2, 16, 5, 3).permute(0, 3, 2, 1)),
], ids=["chunk", "unbind"])
def test_an_archive_takes_a_permuted_input_split_into_a_linears_inputs(tmp_path: Path, model, example, dims,
                                                                       given) -> None:
    """`_laid_out_by_the_caller` walked only `_VIEW_LIKE` ops back to the graph input, not a
    split's or unbind's items: their Linears were flattened with `view` from the example's
    strides, and the archive raised "view size is not compatible" for a permuted input that
    eager and torch.export's own program take."""
    torch.manual_seed(0)
    module = model().eval()
    shapes = {d: torch.export.Dim(name, min=1 if name == "batch" else 2, max=64) for d, name in dims.items()}
    archive = tileflow.export_model(module, (torch.randn(*example),), (shapes,), options={"target": "reference"})
    run = tileflow.load(archive.save(tmp_path / "halves.pt2"))
    x = given()
    assert not x.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(run(x), module(x), rtol=1e-4, atol=1e-4)
