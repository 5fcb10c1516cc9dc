"""The run itself: settings (:class:`SearchConfig`), the session that wires observe -> search -> evaluate ->
export, the run directory and its report. Sits above every other package except the API and the CLI."""

from evoreap.pipeline.config import SearchConfig

__all__ = ["SearchConfig"]
