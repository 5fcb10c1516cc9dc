"""evoreap: prune the experts of Mixture-of-Experts language models, with per-layer keep counts found by search.

The Python API (:mod:`evoreap.api`)::

    import evoreap

    result = evoreap.search("path/to/model", budget=0.5)
    evoreap.export(result.allocation, "pruned/")
"""

from evoreap.version import __version__

# Three of the API's names are also subpackages (evoreap.search, .observe, .export). Importing the API first loads
# those subpackages, so the names below are bound last and stay the functions: a later ``import evoreap.search.x``
# finds the subpackage in sys.modules and leaves the attribute alone. Inside evoreap, always import submodules by
# their full dotted path (``from evoreap.search.space import ...``), never ``from evoreap import search``.
from evoreap.api import evaluate, export, observe, reinject, repair, search  # noqa: E402
from evoreap.allocation import Allocation  # noqa: E402
from evoreap.pipeline.config import SearchConfig  # noqa: E402
from evoreap.pipeline.judge import EvaluationResult  # noqa: E402
from evoreap.pipeline.session import SearchResult  # noqa: E402

__all__ = ["Allocation", "EvaluationResult", "SearchConfig", "SearchResult", "__version__", "evaluate", "export",
           "observe", "reinject", "repair", "search"]
