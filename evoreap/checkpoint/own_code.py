"""evoreap's own modeling code for non-uniform exports: written into the export for other tools, never run from it.

A non-uniform export carries ``modeling_evoreap.py`` (rendered from :mod:`evoreap.checkpoint.modeling_template`)
and an ``auto_map`` naming it, so that ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works
anywhere.
evoreap itself never loads code from a model directory: it renders the same template in-process and builds the class
from that text (:func:`own_model_class`), then loads the weights with ``trust_remote_code=False``. Whatever else a
directory holds (an edited ``modeling_evoreap.py``, a ``custom_generate/`` folder, a tokenizer ``auto_map``) is
never imported by evoreap without ``--trust-remote-code``.
"""

from __future__ import annotations

import json
import re
import types
from functools import lru_cache
from pathlib import Path
from typing import Any

from evoreap.adapters import MoEAdapter
from evoreap.errors import EvoreapError

COUNTS_KEY = "evoreap_experts_per_layer"
MODELING_FILE = "modeling_evoreap.py"
REMOTE_CLASS = "EvoreapForCausalLM"
OWN_AUTO_MAP = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{REMOTE_CLASS}"}
_TEMPLATE = Path(__file__).with_name("modeling_template.py")


def render_modeling(adapter: MoEAdapter) -> str:
    """evoreap's own modeling template with this architecture's model type and attribute names filled in."""
    return _render(adapter.config.model_type, adapter.spec.router_attr, adapter.spec.experts_attr)


def _render(model_type: str, router_attr: str, experts_attr: str) -> str:
    text = _TEMPLATE.read_text(encoding="utf-8")
    values = {"MODEL_TYPE": model_type, "ROUTER_ATTR": router_attr, "EXPERTS_ATTR": experts_attr}
    for name, value in values.items():
        text, n = re.subn(rf'^{name} = "[^"\n]*"  # evoreap: set at export$', f"{name} = {json.dumps(value)}",
                          text, flags=re.M)
        if n != 1:
            raise EvoreapError(f"evoreap's modeling template has {n} lines setting {name}, expected one; the "
                               "installation is damaged: reinstall evoreap")
    return text


@lru_cache(maxsize=None)
def _class_for(model_type: str, router_attr: str, experts_attr: str) -> type:
    # The text is evoreap's packaged template with three string constants filled in by json.dumps: no byte of it
    # comes from a model directory.
    module = types.ModuleType(f"evoreap_pruned_{re.sub(r'[^0-9A-Za-z_]', '_', model_type)}")
    code = compile(_render(model_type, router_attr, experts_attr), str(_TEMPLATE), "exec")
    exec(code, module.__dict__)  # noqa: S102 - our own template, see above
    return getattr(module, REMOTE_CLASS)


def own_model_class(adapter: MoEAdapter) -> type:
    """The class that loads a non-uniform evoreap export of ``adapter``'s architecture, built in-process."""
    return _class_for(adapter.config.model_type, adapter.spec.router_attr, adapter.spec.experts_attr)


def is_own_export(config: dict[str, Any]) -> bool:
    """Whether a raw config.json is a non-uniform evoreap export (per-layer counts, our ``auto_map`` or none)."""
    target = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return isinstance(target.get(COUNTS_KEY), dict) and config.get("auto_map", OWN_AUTO_MAP) == OWN_AUTO_MAP
