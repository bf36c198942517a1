"""tileflow: a torch.compile backend that rewrites LLM graphs the way serving systems do by hand.

    model = torch.compile(model, backend="tileflow", dynamic=True)
    report = tileflow.explain(model, input_ids)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import ops
from .backend import TileflowBackend, tileflow_backend
from .config import Config, current_config, use_config
from .explain import explain
from .export import export_model, load
from .log import configure_from_env
from .pipeline import PassContext, PassManager, PassResult, TileflowError, available_passes, register_pass
from .report import Report, session_report
from .transformers_integration import register_transformers

try:
    __version__ = version("tileflow")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

configure_from_env()

__all__ = [
    "Config",
    "PassContext",
    "PassManager",
    "PassResult",
    "Report",
    "TileflowBackend",
    "TileflowError",
    "available_passes",
    "current_config",
    "explain",
    "export_model",
    "load",
    "ops",
    "register_pass",
    "register_transformers",
    "session_report",
    "tileflow_backend",
    "use_config",
]
