"""tileflow.Config: every knob of the compiler, from `torch.compile(options=...)` and `TILEFLOW_*`.

Precedence: an explicit option beats its `TILEFLOW_<KEY>` environment variable, which beats the
default. An unknown key or a value of the wrong kind is a `ValueError` that names the key and says
what is valid, so a typo never silently does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass, fields
from typing import Any, Iterator, Mapping

from .targets import TARGETS

RESIDUALS: tuple[str, ...] = ("auto", "eager", "inductor")
# tileflow's own passes, in the only order they may run (see `_check_pass_order`).
BUILTIN_PASSES: tuple[str, ...] = ("canonicalize", "attention", "gemm_padding", "nanobatch", "disaggregate")
DEFAULT_PASSES: tuple[str, ...] = ("canonicalize", "attention", "gemm_padding")
# The largest `max_tokens`: the tile planner costs every 16 rows up to it, per GEMM shape (2**31
# took minutes for a 4-GEMM model, 2**40 a 512 GiB array); 16M tokens still plans in about a second.
MAX_TOKENS_LIMIT = 1 << 24
# Environment variables that are tileflow's but not Config keys.
_NON_CONFIG_ENV = frozenset({"TILEFLOW_LOG", "TILEFLOW_CACHE_DIR", "TILEFLOW_UPDATE_GOLDEN"})  # the last: tests/golden_files.py


@dataclass(frozen=True)
class Config:
    """The compiler's settings.

    Attributes:
        target: where kernels run: `auto` (triton on CUDA, ascend on an NPU, reference on CPU),
            `triton`, `ascend` or `reference`.
        residual: how the graph left after the passes runs: `eager` FX, `inductor`, or `auto`
            (inductor on CUDA, eager on CPU).
        max_tokens: the most tokens tile plans cover: the shape environment's upper bound of the
            token dimension, capped at this (an unbounded dimension gets this); a longer call runs
            the nearest plan's tiles and logs a warning. At most `MAX_TOKENS_LIMIT` (2**24).
        strict: turn every fallback (a pass or node tileflow could not handle, a torch.compile
            graph `cuda_graphs` does not capture because a padded replay could differ from the
            step) into an error. A graph with no symbolic token dim (a static one) still runs
            uncaptured, with the reason in the report.
        verify: check each pass's numerics against the unrewritten graph on the first real
            inputs; a pass whose outputs diverge is rolled back (or raises with `strict`).
        verify_rtol / verify_atol: tolerances of that check.
        debug_dir: when set, each compiled graph writes its passes' before/after code, its
            kernels and `report.json` under this folder (the visualizer reads it); each rank
            of a multi-process launch under its `rank_<r>` subfolder (`compiler.debug_root`).
            A relative path is made absolute when the config is made.
        passes: the ordered pass names to run (see `tileflow.pipeline.available_passes()`).
        nano_batches: `auto`, or an integer (1 turns nano-batching off; >= 2 forces a split).
        tile_timings: per-tile times measured on the device, which replace the cost model's
            estimates on the device they were measured for, at their shapes and, carried along
            each config's time against K, at the other shapes of plain GEMMs: `auto` (the
            times tileflow ships for the device, `tileflow/tile_timings/<device>.json`: the
            H200 today; the cost model elsewhere), the path of a JSON file
            (`python bench/gemm.py --measure-tiles FILE`), or None for the cost model alone.
        cuda_graphs: on CUDA, capture each compiled step (nano-batched or whole) once per token
            bucket (powers of two from 16 to the first at or above `max_tokens`) and input
            signature as a CUDA graph and replay it (a step whose padded rows could reach real
            ones: at each token count up to 32, unpadded); in a serving program
            (`build_stage_program`), each dense stage between two attentions. Off by default (on a
            GPU it has run only in `tests/test_gpu.py` and `bench/e2e.py`).
    """

    target: str = "auto"
    residual: str = "auto"
    max_tokens: int = 8192
    strict: bool = False
    verify: bool = False
    verify_rtol: float = 1e-4
    verify_atol: float = 1e-4
    debug_dir: str | None = None
    passes: tuple[str, ...] = DEFAULT_PASSES
    nano_batches: str | int = 1
    tile_timings: str | None = "auto"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        _check_choice("target", self.target, TARGETS)
        _check_choice("residual", self.residual, RESIDUALS)
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"tileflow option 'max_tokens' must be a positive integer, got {self.max_tokens!r}")
        if self.max_tokens > MAX_TOKENS_LIMIT:
            raise ValueError(f"tileflow option 'max_tokens' must be at most {MAX_TOKENS_LIMIT} (tile plans cost every "
                             f"token count up to it), got {self.max_tokens!r}: give the most tokens one call runs")
        for name in ("verify_rtol", "verify_atol"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:  # NaN too
                raise ValueError(f"tileflow option {name!r} must be a non-negative number, got {value!r}")
        if isinstance(self.passes, list):
            object.__setattr__(self, "passes", tuple(self.passes))
        if not isinstance(self.passes, tuple) or not all(isinstance(p, str) for p in self.passes):
            raise ValueError(f"tileflow option 'passes' must be a sequence of pass names, got {self.passes!r}")
        _check_pass_order(self.passes)
        for name in ("strict", "verify", "cuda_graphs"):  # a string such as "false" would read as on
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"tileflow option {name!r} must be True or False, got {getattr(self, name)!r}")
        for name in ("debug_dir", "tile_timings"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (str, os.PathLike)):
                choices = "'auto', a path or None" if name == "tile_timings" else "a path or None"
                raise ValueError(f"tileflow option {name!r} must be {choices}, got {getattr(self, name)!r}")
        if self.debug_dir is not None:
            object.__setattr__(self, "debug_dir", os.fspath(self.debug_dir))  # a Path reads back from JSON as text
            if not self.debug_dir:  # read as false, it would write nothing, silently
                raise ValueError("tileflow option 'debug_dir' is an empty path: give a folder, or None for no artifacts")
            # Absolute, as tile_timings: each compile writes under it, maybe from another working
            # directory (a backend's graphs would land in two folders, the second's report listing both).
            object.__setattr__(self, "debug_dir", os.path.abspath(self.debug_dir))
            if os.path.exists(self.debug_dir) and not os.path.isdir(self.debug_dir):
                raise ValueError(f"tileflow option 'debug_dir' names {self.debug_dir!r}, which is a file: give a folder")
        if self.tile_timings is not None and self.tile_timings != "auto":
            if not os.fspath(self.tile_timings):
                # abspath("") is the working directory: "no file at <cwd>" would not say what was wrong.
                raise ValueError("tileflow option 'tile_timings' is an empty path: give a file written by "
                                 "`python bench/gemm.py --measure-tiles FILE`, 'auto', or None for the cost model alone")
            from .runtime import load_tile_timings  # here: the runtime imports this module

            # Absolute: the planner reads it later, maybe from another working directory.
            object.__setattr__(self, "tile_timings", os.path.abspath(self.tile_timings))
            # Read now (a missing or malformed file would otherwise leave every GEMM unplanned,
            # only a fallback in the report saying why).
            load_tile_timings(self.tile_timings)
        nb = self.nano_batches
        if not (nb == "auto" or (isinstance(nb, int) and not isinstance(nb, bool) and nb >= 1)):
            raise ValueError(
                f"tileflow option 'nano_batches' must be 'auto' or an integer >= 1, got {nb!r}"
            )
        if nb != 1 and "nanobatch" not in self.passes:  # else the knob would do nothing
            raise ValueError(
                f"tileflow option nano_batches={nb!r} needs the 'nanobatch' pass, which 'passes' does not name "
                f"({list(self.passes)}): add it after 'gemm_padding', or set nano_batches=1"
            )

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The valid option names."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> "Config":
        """Build a Config from `torch.compile` options, then `TILEFLOW_*` variables, then defaults."""
        if options is not None and not isinstance(options, Mapping):
            # dict() would take a list of pairs silently and fail on `["verify"]` with "dictionary
            # update sequence element #0 has length 6", which names neither options nor the fix.
            raise ValueError(f"tileflow options must be a mapping of option names to values, such as "
                             f"options={{'verify': True}}; got {type(options).__name__} {options!r}; "
                             f"valid options are {list(cls.keys())}")
        options = dict(options or {})
        env = os.environ if env is None else env
        valid = cls.keys()
        _check_keys(options)
        values: dict[str, Any] = {}
        from_env: dict[str, str] = {}  # key -> `NAME='raw'`, for each value the environment gave
        for name, raw in env.items():
            if not name.startswith("TILEFLOW_") or name in _NON_CONFIG_ENV:
                continue
            key = name[len("TILEFLOW_"):].lower()
            if key not in valid:
                raise ValueError(
                    f"unknown environment variable {name}; valid ones are "
                    f"{sorted('TILEFLOW_' + k.upper() for k in valid) + sorted(_NON_CONFIG_ENV)}"
                )
            if key not in options:
                values[key] = _parse_env(key, name, raw)
                from_env[key] = f"{name}={raw!r}"
        for key, value in options.items():
            values[key] = _coerce(key, value)
        try:
            return cls(**values)
        except ValueError as exc:
            # The refused values the caller never passed as options: say where they came from.
            named = sorted(text for key, text in from_env.items() if re.search(rf"\b{key}\b", str(exc)))
            if not named:
                raise
            raise ValueError(f"{exc} (set in the environment: {', '.join(named)})") from None

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (validated like the constructor)."""
        _check_keys(changes)
        return dataclasses.replace(self, **{k: _coerce(k, v) for k, v in changes.items()})

    def graph_buckets(self) -> tuple[int, ...]:
        """Token buckets of CUDA-graph capture: 16, 32, ... up to the first >= `max_tokens`."""
        buckets = [16]
        while buckets[-1] < self.max_tokens:
            buckets.append(buckets[-1] * 2)
        return tuple(buckets)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        data = dataclasses.asdict(self)
        data["passes"] = list(self.passes)
        return data


def _check_keys(options: Mapping[str, Any]) -> None:
    """Raise ValueError naming the keys of `options` that are no option, and the valid ones."""
    unknown = sorted(k for k in options if k not in Config.keys())
    if unknown:
        raise ValueError(f"unknown tileflow option(s) {unknown}; valid options are {list(Config.keys())}")


_DATACLASS_INIT = Config.__init__


@functools.wraps(_DATACLASS_INIT)
def _checked_init(self: Config, *args: Any, **kwargs: Any) -> None:
    # Config(max_token=4) says which options exist, as from_options does (not a bare TypeError).
    _check_keys(kwargs)
    _DATACLASS_INIT(self, *args, **kwargs)


Config.__init__ = _checked_init  # type: ignore[method-assign]


def _check_pass_order(passes: tuple[str, ...]) -> None:
    """Built-in passes run at most once, in their pipeline order (each matches what the ones before
    it left: `gemm_padding` canonical linears, `nanobatch` the rewritten graph's nodes), and
    `attention` and `gemm_padding` after `canonicalize`; other passes go anywhere."""
    repeated = sorted({p for p in passes if passes.count(p) > 1})
    if repeated:
        raise ValueError(f"tileflow option 'passes' names {repeated} more than once: {list(passes)}")
    builtin = [p for p in passes if p in BUILTIN_PASSES]
    if builtin != sorted(builtin, key=BUILTIN_PASSES.index):
        raise ValueError(f"tileflow option 'passes' runs built-in passes out of order ({builtin}): they must keep "
                         f"the order {list(BUILTIN_PASSES)}")
    needs = [p for p in ("attention", "gemm_padding") if p in passes]
    if needs and "canonicalize" not in passes:
        raise ValueError(f"tileflow option 'passes': {needs} match the graph 'canonicalize' leaves; add "
                         f"'canonicalize' before them")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"tileflow option {key!r} must be one of {list(choices)}, got {value!r}")


def _field_type(key: str) -> str:
    return {f.name: str(f.type) for f in fields(Config)}[key]


def _coerce(key: str, value: Any) -> Any:
    """Normalize a Python option value (lists of passes become tuples)."""
    if key == "passes" and isinstance(value, (list, tuple)):
        return tuple(value)
    if key == "passes" and isinstance(value, str):
        if value.strip().startswith("["):  # a JSON list, as `--options passes=["canonicalize"]`
            try:
                return tuple(json.loads(value))
            except (json.JSONDecodeError, TypeError):
                raise ValueError(f"tileflow option 'passes': {value!r} is not a JSON list of pass names") from None
        return tuple(p.strip() for p in value.split(",") if p.strip())
    return value


def option_from_text(key: str, text: str, source: str) -> Any:
    """An option's value written as text (a command line's KEY=VALUE, as an environment
    variable's) in its field's type; `source` names it in errors. An unknown key keeps its text:
    `Config` names it."""
    if key not in {f.name for f in fields(Config)}:
        return text
    return _parse_env(key, source, text)


def _parse_env(key: str, name: str, raw: str) -> Any:
    """Parse one environment variable's text into the field's type, with a clear error."""
    kind = _field_type(key)
    text = raw.strip()
    if kind == "bool":
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off")
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not an integer") from None
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None
    if key == "nano_batches":
        if text == "auto":
            return "auto"
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is neither 'auto' nor an integer") from None
    if key in ("debug_dir", "tile_timings"):
        return text or None
    return _coerce(key, text)


_CURRENT: contextvars.ContextVar[Config | None] = contextvars.ContextVar("tileflow_config", default=None)


_ENV_CONFIG: tuple[tuple[tuple[str, str | None], ...], Config] | None = None
_ENV_KEYS = tuple("TILEFLOW_" + f.name.upper() for f in fields(Config))


def current_config() -> Config:
    """The config for eager calls of tileflow's ops: the innermost `use_config`, else from env."""
    global _ENV_CONFIG
    config = _CURRENT.get()
    if config is not None:
        return config
    # Eager op calls ask for this on every call: parse the environment only when one of the
    # config variables changed (reading the known keys is far cheaper than scanning os.environ).
    env = tuple((k, os.environ.get(k)) for k in _ENV_KEYS)
    if _ENV_CONFIG is None or _ENV_CONFIG[0] != env:
        _ENV_CONFIG = (env, Config.from_options())
    return _ENV_CONFIG[1]


@contextlib.contextmanager
def use_config(config: Config) -> Iterator[Config]:
    """Set the config of eager tileflow op calls inside a `with` block."""
    if not isinstance(config, Config):
        raise TypeError(f"use_config expects a tileflow.Config, got {type(config).__name__}")
    token = _CURRENT.set(config)
    try:
        yield config
    finally:
        _CURRENT.reset(token)

