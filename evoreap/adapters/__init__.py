"""Architecture adapters: the only place in evoreap that knows how each MoE family routes tokens."""

from evoreap.adapters.adapter import MoEAdapter, MoELayer, find_spec, text_config
from evoreap.adapters.routing import expert_forward, route
from evoreap.adapters.spec import SPECS, ArchSpec, register_architecture

__all__ = ["ArchSpec", "MoEAdapter", "MoELayer", "SPECS", "expert_forward", "find_spec", "register_architecture",
           "route", "text_config"]
