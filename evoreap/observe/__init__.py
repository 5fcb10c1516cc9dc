"""Observation: per-expert routing statistics from calibration forwards, their on-disk store, and sequential
(layer-by-layer) observation of models larger than memory."""

from evoreap.observe.recorder import IMPLEMENTATION, Recorder, observe, recording
from evoreap.observe.stats import ExpertStats, LayerStats

__all__ = ["IMPLEMENTATION", "ExpertStats", "LayerStats", "Recorder", "observe", "recording"]
