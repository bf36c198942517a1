"""The `tileflow` logger: silent by default, `TILEFLOW_LOG=info|debug` turns it on."""

from __future__ import annotations

import logging
import os

LOGGER_NAME = "tileflow"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def get_logger(name: str | None = None) -> logging.Logger:
    """The tileflow logger, or a child of it (`get_logger("pipeline")` -> `tileflow.pipeline`)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def configure_from_env() -> None:
    """Attach a stderr handler at the level `TILEFLOW_LOG` names; do nothing when it is unset.

    An unknown level is an error rather than a silent no-op, like every other tileflow setting.
    """
    logger = get_logger()
    raw = os.environ.get("TILEFLOW_LOG", "").strip().lower()
    if not raw:
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())
        return
    if raw not in _LEVELS:
        raise ValueError(f"TILEFLOW_LOG={raw!r} is not a log level; use one of {sorted(_LEVELS)}")
    logger.setLevel(_LEVELS[raw])
    if not any(getattr(h, "_tileflow_handler", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[tileflow %(levelname)s] %(name)s: %(message)s"))
        handler._tileflow_handler = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
