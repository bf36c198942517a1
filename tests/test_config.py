"""Config: options, environment variables, validation and use_config."""

from __future__ import annotations

import pytest
import torch

import tileflow
from tileflow.config import Config, current_config, use_config


def test_defaults_and_options() -> None:
    config = Config.from_options({"target": "reference", "max_tokens": 512, "passes": ["canonicalize"]}, env={})
    assert config.target == "reference"
    assert config.max_tokens == 512
    assert config.passes == ("canonicalize",)
    assert config.strict is False and config.verify is False
    assert Config.from_options(None, env={}) == Config()


def test_unknown_option_lists_valid_keys() -> None:
    with pytest.raises(ValueError) as info:
        Config.from_options({"max_token": 5}, env={})
    message = str(info.value)
    assert "max_token" in message and "max_tokens" in message and "debug_dir" in message


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"target": "cuda"}, "'target' must be one of"),
        ({"residual": "aot"}, "'residual' must be one of"),
        ({"max_tokens": 0}, "'max_tokens' must be a positive integer"),
        ({"max_tokens": "8"}, "'max_tokens' must be a positive integer"),
        ({"nano_batches": 0}, "'nano_batches' must be 'auto' or an integer"),
        # A string would read as on: "false" too.
        ({"strict": "false"}, "'strict' must be True or False, got 'false'"),
        ({"cuda_graphs": 1}, "'cuda_graphs' must be True or False"),
        ({"verify_atol": float("nan")}, "'verify_atol' must be a non-negative number"),
        ({"debug_dir": 123}, "'debug_dir' must be a path or None"),
        ({"tile_timings": "/no/such/timings.json"}, r"no file at '/no/such/timings.json'.*--measure-tiles FILE"),
        ({"tile_timings": ""}, r"'tile_timings' is an empty path: give a file .* or None"),
        # Built-in passes match what the ones before them left: their order is fixed.
        ({"passes": ["gemm_padding", "canonicalize"]}, r"out of order \(\['gemm_padding', 'canonicalize'\]\)"),
        ({"passes": ["canonicalize", "attention", "nanobatch", "gemm_padding"]}, "out of order"),
        ({"passes": ["gemm_padding"]}, r"add 'canonicalize' before them"),
        ({"passes": ["canonicalize", "attention", "canonicalize"]}, r"names \['canonicalize'\] more than once"),
        ({"nano_batches": 2}, r"nano_batches=2 needs the 'nanobatch' pass, which 'passes' does not name"),
        ({"nano_batches": "auto", "passes": ["canonicalize", "gemm_padding"]}, "add it after 'gemm_padding'"),
        ({"verify_rtol": -1.0}, "'verify_rtol' must be a non-negative number"),
    ],
)
def test_bad_values(options: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Config.from_options(options, env={})


def test_passes_given_as_a_list_become_a_tuple() -> None:
    assert Config(passes=["canonicalize", "attention"]).passes == ("canonicalize", "attention")


def test_environment_variables_and_precedence() -> None:
    env = {"TILEFLOW_MAX_TOKENS": "1024", "TILEFLOW_STRICT": "yes", "TILEFLOW_TARGET": "reference",
           "TILEFLOW_PASSES": "canonicalize,nanobatch", "TILEFLOW_NANO_BATCHES": "auto", "TILEFLOW_LOG": "info"}
    config = Config.from_options({"max_tokens": 64}, env=env)
    assert config.max_tokens == 64  # an explicit option beats the environment
    assert config.strict is True
    assert config.target == "reference"
    assert config.passes == ("canonicalize", "nanobatch")
    assert config.nano_batches == "auto"


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"TILEFLOW_MAX_TOKENS": "lots"}, "TILEFLOW_MAX_TOKENS='lots' is not an integer"),
        ({"TILEFLOW_STRICT": "maybe"}, "TILEFLOW_STRICT='maybe' is not a boolean"),
        ({"TILEFLOW_VERIFY_ATOL": "x"}, "TILEFLOW_VERIFY_ATOL='x' is not a number"),
        ({"TILEFLOW_TARGETT": "triton"}, "unknown environment variable TILEFLOW_TARGETT"),
        ({"TILEFLOW_TARGET": "gpu"}, "'target' must be one of"),
        ({"TILEFLOW_NANO_BATCHES": "x"}, "TILEFLOW_NANO_BATCHES='x' is neither 'auto' nor an integer"),
    ],
)
def test_bad_environment(env: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Config.from_options({}, env=env)


_ENTRY = '{"device": "cpu", "dtype": "float32", "n": 40, "k": 24, "tile": {"block_m": 16, "block_n": 32, "block_k": 32}, '


@pytest.mark.parametrize("text, what", [("not json", "JSONDecodeError"), ("{}", "TypeError: the file holds a JSON dict"),
                                        ('[{"device": "h100"}]', "KeyError"),
                                        # (NaN, 0 and negative times failed only at that shape's first GEMM.)
                                        (f'[{_ENTRY}"tile_seconds": NaN}}]', "ValueError: a tile time must be positive"),
                                        (f'[{_ENTRY}"tile_seconds": 0}}]', "ValueError: a tile time must be positive")])
def test_a_malformed_tile_timings_file_is_an_error(tmp_path, text: str, what: str) -> None:
    """Read when the config is made: a malformed file used to leave every GEMM unplanned, with
    only a fallback in the report (and `{}` read as no timings at all)."""
    path = tmp_path / "timings.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"tile_timings file .* is malformed \\({what}"):
        Config(tile_timings=str(path))


def test_tile_timings_default_to_the_shipped_ones_and_none_means_the_model(monkeypatch) -> None:
    """`auto` (the default) plans from the tile times tileflow ships for the device, the H200's
    today, and from the cost model on a device it ships none for; None, or an empty
    TILEFLOW_TILE_TIMINGS, is the cost model everywhere."""
    import torch

    from tileflow import runtime
    from tileflow.devices import get_device
    from tileflow.tiles import build_tile_plan

    assert Config().tile_timings == "auto"
    assert Config.from_options({}, env={"TILEFLOW_TILE_TIMINGS": ""}).tile_timings is None
    assert Config.from_options({}, env={"TILEFLOW_TILE_TIMINGS": "auto"}).tile_timings == "auto"
    assert runtime.shipped_tile_timings(get_device("H100-SXM")) is None
    assert runtime.shipped_tile_timings(get_device("cpu")) is None
    for name in ("H200", "H100-SXM"):
        device = get_device(name)
        monkeypatch.setattr(runtime, "device_for_target", lambda target, device_type, device=device: device)
        model = build_tile_plan(6144, 4096, "bfloat16", m_max=8192, device=device)
        assert runtime.gemm_plan(6144, 4096, torch.bfloat16, "triton", "cuda", m_max=8192, tile_timings=None) == model
        auto = runtime.gemm_plan(6144, 4096, torch.bfloat16, "triton", "cuda", m_max=8192, tile_timings="auto")
        # The H200's measured plan runs TMA kernels, which the model never plans.
        assert (auto != model and any(p.tma for p in auto.pieces)) if name == "H200" else auto == model


def test_a_relative_tile_timings_path_survives_a_change_of_directory(tmp_path, monkeypatch) -> None:
    """The planner reads the file later, and `replace` checks it again: from wherever it runs."""
    (tmp_path / "timings.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    config = Config(tile_timings="timings.json")
    monkeypatch.chdir("/")
    assert config.replace(cuda_graphs=True).tile_timings == str(tmp_path / "timings.json")


def test_command_line_options_read_as_environment_variables() -> None:
    """`--options KEY=VALUE` takes a value as its option's environment variable does: `True`
    and `true` are both on (JSON's `true` alone was), passes may be comma-separated."""
    from tileflow.cli import SpecError, _parse_options

    assert _parse_options(("strict=True", "verify=false", "max_tokens=64", "passes=canonicalize,attention",
                           "nano_batches=auto", "target=reference")) == {
        "strict": True, "verify": False, "max_tokens": 64, "passes": ("canonicalize", "attention"),
        "nano_batches": "auto", "target": "reference"}
    assert _parse_options(('passes=["canonicalize", "attention"]',)) == {"passes": ("canonicalize", "attention")}
    with pytest.raises(SpecError, match="--options strict='maybe' is not a boolean"):
        _parse_options(("strict=maybe",))


def test_passes_command_lists_the_pipeline_in_order() -> None:
    from click.testing import CliRunner

    from tileflow.cli import main

    lines = CliRunner().invoke(main, ["passes"]).output.splitlines()
    assert lines[:5] == ["canonicalize  (default)", "attention  (default)", "gemm_padding  (default)", "nanobatch",
                         "disaggregate"]


def test_passes_command_marks_the_pipeline_tileflow_passes_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compile without a `passes` option runs TILEFLOW_PASSES's: those are the ones marked."""
    from click.testing import CliRunner

    from tileflow.cli import main

    monkeypatch.setenv("TILEFLOW_PASSES", "canonicalize,attention")
    assert Config.from_options(None).passes == ("canonicalize", "attention")
    lines = CliRunner().invoke(main, ["passes"]).output.splitlines()
    assert lines[:5] == ["canonicalize  (default)", "attention  (default)", "gemm_padding", "nanobatch",
                         "disaggregate"]


def test_a_compile_with_no_passes_says_so_in_its_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty TILEFLOW_PASSES (a shell's `TILEFLOW_PASSES= python ...`) runs no passes: the report
    printed an empty pass table and "rewrites: none", as for a graph with nothing to rewrite; it
    now says that no passes ran and why. A graph given the default passes has no such note."""
    from tileflow.report import format_report

    def compiled_report() -> str:
        fn = torch.compile(torch.nn.Linear(4, 4), backend="tileflow", options={"target": "reference"}, dynamic=True)
        fn(torch.ones(3, 4))
        graph = tileflow.session_report().graphs[-1]
        report = tileflow.report.Report()
        report.graphs.append(graph)
        return format_report(report)

    monkeypatch.setenv("TILEFLOW_PASSES", "")
    torch._dynamo.reset()
    text = compiled_report()
    assert "passes: none: the options name no passes" in text and "unset them for the default passes" in text
    monkeypatch.delenv("TILEFLOW_PASSES")
    torch._dynamo.reset()
    text = compiled_report()
    assert "passes: none" not in text and "padded_gemm=1" in text


def test_use_config_scopes_eager_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TILEFLOW_TARGET", raising=False)
    assert current_config().target == "auto"
    with use_config(Config(target="reference", max_tokens=64)) as config:
        assert current_config() is config
        with use_config(Config(target="triton")):
            assert current_config().target == "triton"
        assert current_config().max_tokens == 64
    assert current_config().target == "auto"
    with pytest.raises(TypeError):
        with use_config({"target": "reference"}):  # type: ignore[arg-type]
            pass


def test_torch_compile_options_reach_config() -> None:
    fn = torch.compile(lambda x: x * 2, backend="tileflow", options={"max_tokens": 77, "target": "reference"})
    assert torch.equal(fn(torch.ones(3)), torch.full((3,), 2.0))
    config = tileflow.session_report().graphs[-1].config
    assert config["max_tokens"] == 77 and config["target"] == "reference"
    bad = torch.compile(lambda x: x + 1, backend="tileflow", options={"no_such_knob": 1})
    with pytest.raises(Exception, match="no_such_knob"):
        bad(torch.ones(2))
    with pytest.raises(Exception, match="not a tileflow setting"):
        torch.compile(lambda x: x + 1, backend="tileflow", mode="max-autotune")(torch.ones(2))


def test_the_documented_golden_update_variable_is_not_a_config_error() -> None:
    """README: `TILEFLOW_UPDATE_GOLDEN=1 python -m pytest tests -k golden`; exported in a shell, it
    used to make every Config (every compile) raise "unknown environment variable"."""
    assert Config.from_options({}, env={"TILEFLOW_UPDATE_GOLDEN": "1"}) == Config()
    with pytest.raises(ValueError, match="unknown environment variable TILEFLOW_UPDATE_GOLDN"):
        Config.from_options({}, env={"TILEFLOW_UPDATE_GOLDN": "1"})


def test_unknown_keys_to_the_constructor_and_replace_name_the_valid_ones() -> None:
    """`Config(max_token=4)` and `.replace(max_token=4)` were bare TypeErrors; they say what the
    options are, as `from_options` does."""
    for make in (lambda: Config(max_token=4), lambda: Config().replace(max_token=4)):
        with pytest.raises(ValueError, match=r"unknown tileflow option\(s\) \['max_token'\]; valid options are .*'max_tokens'"):
            make()


def test_an_empty_debug_dir_is_refused() -> None:
    """debug_dir="" was accepted and then read as false: no artifact was written, silently (as
    tile_timings, an empty path says what was wrong; TILEFLOW_DEBUG_DIR="" still means off)."""
    with pytest.raises(ValueError, match="debug_dir"):
        Config(debug_dir="")
    assert Config.from_options(env={"TILEFLOW_DEBUG_DIR": ""}).debug_dir is None


def test_debug_dir_is_text_and_not_a_file(tmp_path) -> None:
    """A Path debug_dir read back from a report's JSON as text (so a report did not equal its own
    round trip); a file given as the folder failed at the first call with an OS error."""
    assert Config(debug_dir=tmp_path).debug_dir == str(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="which is a file: give a folder"):
        Config(debug_dir=tmp_path / "f")


def test_auto_residual_is_inductor_on_cuda_only() -> None:
    """`residual="auto"` resolves by device: Inductor on CUDA, eager elsewhere (no compile time on
    the CPU); a named mode is kept, and an unknown one refused."""
    from tileflow.residual import resolve_residual

    assert resolve_residual("auto", "cuda") == "inductor"
    assert resolve_residual("auto", "cpu") == "eager"
    assert resolve_residual("inductor", "cpu") == "inductor" and resolve_residual("eager", "cuda") == "eager"
    with pytest.raises(ValueError, match="unknown residual mode 'aot'"):
        resolve_residual("aot", "cpu")


@pytest.mark.parametrize(
    "options, needle",
    [
        # A bool is an int to Python: each of these was accepted as 1 (or as on) with no error.
        ({"max_tokens": True}, "'max_tokens' must be a positive integer, got True"),
        ({"verify_rtol": True}, "'verify_rtol' must be a non-negative number, got True"),
        ({"nano_batches": True, "passes": ["canonicalize", "gemm_padding", "nanobatch"]},
         "'nano_batches' must be 'auto' or an integer >= 1, got True"),
        # A string "false" for verify would read as on, as for strict.
        ({"verify": "false"}, "'verify' must be True or False, got 'false'"),
    ],
)
def test_bools_and_strings_are_not_numbers_or_switches(options: dict, needle: str) -> None:
    """Every type check of `Config` is reached: a bool where a number goes, and text where a bool goes, are refused."""
    with pytest.raises(ValueError, match=needle):
        Config.from_options(options, env={})


def test_current_config_follows_the_environment_between_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """`current_config` caches the environment's config, but a changed `TILEFLOW_*` variable is read again."""
    monkeypatch.setenv("TILEFLOW_MAX_TOKENS", "64")
    assert current_config().max_tokens == 64
    monkeypatch.setenv("TILEFLOW_MAX_TOKENS", "128")
    assert current_config().max_tokens == 128
    monkeypatch.delenv("TILEFLOW_MAX_TOKENS")
    assert current_config().max_tokens == Config().max_tokens


def test_replace_reads_passes_as_the_options_do() -> None:
    """`replace(passes="a,b")` and a JSON list are split into names, as `from_options` does (not refused as text)."""
    config = Config().replace(passes="canonicalize, attention")
    assert config.passes == ("canonicalize", "attention")
    assert Config().replace(passes='["canonicalize"]').passes == ("canonicalize",)


def test_environment_values_are_read_stripped_and_on_counts_as_true() -> None:
    """An environment value's spaces are ignored, and every documented spelling of a boolean is read."""
    config = Config.from_options({}, env={"TILEFLOW_MAX_TOKENS": " 256 ", "TILEFLOW_STRICT": " on ", "TILEFLOW_VERIFY": "off"})
    assert config.max_tokens == 256 and config.strict is True and config.verify is False


@pytest.mark.parametrize("max_tokens, buckets", [(1, (16,)), (16, (16,)), (100, (16, 32, 64, 128)),
                                                 (8192, (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192))])
def test_graph_buckets_end_at_the_first_at_or_above_max_tokens(max_tokens: int, buckets: tuple[int, ...]) -> None:
    """CUDA-graph buckets are the powers of two from 16 to the first at or above `max_tokens`, no further."""
    assert Config(max_tokens=max_tokens).graph_buckets() == buckets


def test_an_option_overrides_a_malformed_environment_variable() -> None:
    """The explicit option wins, so the environment variable it replaces is never parsed (nor refused)."""
    assert Config.from_options({"max_tokens": 64}, env={"TILEFLOW_MAX_TOKENS": "lots"}).max_tokens == 64


def test_auto_target_resolves_by_device_and_unknown_targets_are_refused() -> None:
    """`auto` is `triton` for CUDA tensors, `ascend` for NPU ones and `reference` otherwise; a
    concrete target stays as given whatever the device; an unknown target, or `auto` asked for
    its backend, is a ValueError naming the valid ones."""
    from tileflow.targets import get_backend, resolve_target

    assert resolve_target("auto", torch.device("cuda")) == "triton"
    assert resolve_target("auto", "npu") == "ascend"
    assert resolve_target("auto", torch.device("cpu")) == "reference"
    assert resolve_target("auto", None) == "reference"
    assert resolve_target("triton", torch.device("cpu")) == "triton"
    assert resolve_target("reference", torch.device("cuda")) == "reference"
    with pytest.raises(ValueError, match="unknown target 'gpu'"):
        resolve_target("gpu", torch.device("cuda"))
    with pytest.raises(ValueError, match="no kernel backend for target 'auto'"):
        get_backend("auto")
    assert get_backend("reference").name == "reference"


def test_a_relative_debug_dir_survives_a_change_of_directory(tmp_path, monkeypatch) -> None:
    """As `tile_timings`: a relative debug_dir is the folder under the directory the config was made
    in. Read against the working directory at each compile, one backend wrote its graphs into two
    folders, and the second's report.json also listed the graph left in the first."""
    import json

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    backend = tileflow.TileflowBackend({"debug_dir": "dd", "target": "reference"}, report=tileflow.Report())
    assert backend.config.debug_dir == str(tmp_path / "a" / "dd")
    torch.compile(lambda x: x * 2, backend=backend)(torch.ones(3))
    monkeypatch.chdir(tmp_path / "b")
    torch.compile(lambda x: x + 2, backend=backend)(torch.ones(3))
    root = tmp_path / "a" / "dd"
    listed = [g["graph_id"] for g in json.loads((root / "report.json").read_text())["graphs"]]
    assert listed == sorted(p.name for p in root.iterdir() if p.name.startswith("graph_")) and len(listed) == 2
    assert not (tmp_path / "b" / "dd").exists()


@pytest.mark.parametrize("max_tokens", [2**31, 2**40, 10**30])
def test_a_max_tokens_past_any_plan_is_refused_when_the_config_is_made(max_tokens: int) -> None:
    """The tile planner costs every 16 rows up to max_tokens: 2**31 took minutes to compile a
    4-GEMM model, 2**40 rolled gemm_padding back on a 512 GiB MemoryError and 10**30 left every
    GEMM unplanned ("Maximum allowed size exceeded"), each only in the report."""
    with pytest.raises(ValueError, match=r"'max_tokens' must be at most"):
        Config(max_tokens=max_tokens)
    with pytest.raises(ValueError, match=r"'max_tokens' must be at most"):
        Config.from_options({}, env={"TILEFLOW_MAX_TOKENS": str(max_tokens)})
    assert Config(max_tokens=1 << 24).max_tokens == 1 << 24


@pytest.mark.parametrize(
    "options, env, needle",
    [
        ({}, {"TILEFLOW_TARGET": "gpu"}, r"'target' must be one of .*TILEFLOW_TARGET='gpu'"),
        ({}, {"TILEFLOW_MAX_TOKENS": "0"}, r"'max_tokens' must be a positive integer.*TILEFLOW_MAX_TOKENS='0'"),
        # nano_batches from the environment, passes from the options: the error says which is which.
        ({"passes": ["canonicalize"]}, {"TILEFLOW_NANO_BATCHES": "2"},
         r"needs the 'nanobatch' pass.*TILEFLOW_NANO_BATCHES='2'"),
    ],
)
def test_a_bad_value_from_the_environment_names_its_variable(options: dict, env: dict, needle: str) -> None:
    """README: a value of the wrong kind is a ValueError that names it. A value from a TILEFLOW_*
    variable was refused as an option the caller never passed ("set nano_batches=1")."""
    with pytest.raises(ValueError, match=needle):
        Config.from_options(options, env=env)
    with pytest.raises(ValueError) as info:  # and only the environment's values are named
        Config.from_options({"target": "gpu"}, env={"TILEFLOW_STRICT": "1"})
    assert "TILEFLOW_" not in str(info.value)
