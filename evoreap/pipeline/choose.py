"""Which experts an allocation keeps, for export and evaluate: the ones it lists, or the highest-scored ones.

An allocation that names counts only is completed from what it records (``meta.criterion``,
``meta.observation_key``) or, failing that, from the defaults: the default criterion, and an observation of the
model on the default calibration data (made once, then found in the cache). Nobody has to type a 64-hex key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from evoreap.adapters import MoEAdapter
from evoreap.allocation import Allocation, kept_experts
from evoreap.checkpoint import CheckpointIndex, read_tensor, router_tensor_infos
from evoreap.criteria import DEFAULT_CRITERION, DEFAULT_MIN_COUNT, score_experts
from evoreap.data import load_tokens
from evoreap.models import LoadedModel, load_model
from evoreap.observe.store import check_routers, load_observation, observe_cached, router_tensors
from evoreap.pipeline.config import SearchConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeptExperts:
    """The kept original expert indices per MoE layer, and where they came from (None: listed in the file)."""

    kept: dict[int, list[int]]
    criterion: str | None
    observation_key: str | None


def choose_experts(allocation: Allocation, adapter: MoEAdapter, model: str | LoadedModel, *,
                   criterion: str | None = None, observation: str | None = None, cache_dir: str | None = None,
                   dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> KeptExperts:
    """Validate ``allocation`` against the model and say which experts it keeps. ``model`` is the model's directory
    (its routers are read from the files, nothing else is loaded unless an observation must be made) or a loaded
    model."""
    allocation.validate(adapter)
    criterion = criterion or allocation.meta_text("criterion")
    key = observation or allocation.meta_text("observation_key")
    if allocation.experts is not None:
        return KeptExperts(kept_experts(allocation, adapter), criterion, key)
    criterion = criterion or DEFAULT_CRITERION
    expect = {layer: adapter.num_experts for layer in adapter.moe_layer_indices}
    if key:
        obs = load_observation(key, cache_dir=cache_dir, expect_experts=expect)
        check_routers(obs, _routers(model, adapter), _where(model))
        stats = obs.stats
    else:
        defaults = SearchConfig()
        log.info("the allocation names no observation: observing the model on the default calibration data (%s, "
                 "%d tokens), once; later runs find it in the cache", defaults.calib_data, defaults.calib_tokens)
        loaded = model if isinstance(model, LoadedModel) else load_model(
            model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        data = load_tokens(defaults.calib_data, loaded.tokenizer, split="calibration", seq_len=defaults.seq_len,
                           tokens=defaults.calib_tokens, seed=defaults.seed, model_config=loaded.adapter.config)
        key, stats = observe_cached(loaded, data, cache_dir=cache_dir, batch_size=defaults.batch_size)
    min_count = allocation.meta.get("min_count")
    if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 0:
        min_count = DEFAULT_MIN_COUNT
    scores = score_experts(stats, criterion, min_count=min_count)
    return KeptExperts(kept_experts(allocation, adapter, scores), criterion, key)


def _routers(model: str | LoadedModel, adapter: MoEAdapter) -> dict[str, torch.Tensor]:
    if isinstance(model, LoadedModel):
        return router_tensors(model.model, model.adapter)
    infos = router_tensor_infos(CheckpointIndex(model), adapter)
    return {name: read_tensor(info) for name, info in infos.items()}


def _where(model: str | LoadedModel) -> str:
    return str(model.path if isinstance(model, LoadedModel) else model)
