"""Per-layer expert counts for a stock transformers Mixture-of-Experts causal LM.

Written by evoreap export from evoreap's own template; it is not copied from the model that was pruned. The class
below is the stock causal LM of this checkpoint's ``model_type`` (its forward pass is untouched). Its only change:
before the weights load, each MoE layer listed in ``config.evoreap_experts_per_layer`` gets a router and fused experts
sized to the number of experts that layer kept, so the stock loader fills them exactly.

Load with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
"""

from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

MODEL_TYPE = "qwen3_moe"  # evoreap: set at export
ROUTER_ATTR = "gate"  # evoreap: set at export
EXPERTS_ATTR = "experts"  # evoreap: set at export
COUNTS_KEY = "evoreap_experts_per_layer"
# attributes of the router and experts modules that hold the expert count
COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")

StockForCausalLM = MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[MODEL_TYPE]]


def _shrink(module: nn.Module, old: int, new: int) -> None:
    """Give every tensor of ``module`` whose dim 0 is the expert dim ``new`` rows (uninitialised: the weights load
    into them), and update its expert-count attributes."""
    for name, p in list(module.named_parameters(recurse=False)):
        if p.dim() and p.shape[0] == old:
            setattr(module, name, nn.Parameter(p.new_empty((new, *p.shape[1:])), requires_grad=p.requires_grad))
    for name, b in list(module.named_buffers(recurse=False)):
        if b is not None and b.dim() and b.shape[0] == old:
            module._buffers[name] = b.new_empty((new, *b.shape[1:]))  # keeps the buffer's persistence
    for attr in COUNT_ATTRS:
        if getattr(module, attr, None) == old:
            setattr(module, attr, new)


class EvoreapForCausalLM(StockForCausalLM):
    """The stock model with the per-layer expert counts of ``config.evoreap_experts_per_layer``."""

    def __init__(self, config):
        super().__init__(config)
        counts = getattr(config, COUNTS_KEY, None) or {}
        layers = self.get_decoder().layers
        for key, new in counts.items():
            block = layers[int(key)].mlp
            router, experts = getattr(block, ROUTER_ATTR), getattr(block, EXPERTS_ATTR)
            old = int(router.weight.shape[0])
            if int(new) != old:
                _shrink(router, old, int(new))
                _shrink(experts, old, int(new))
