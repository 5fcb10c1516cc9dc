"""Checkpoints on disk: the one place that reads a model directory without loading the model.

* :mod:`evoreap.checkpoint.reader` -- safetensors index and headers, validated once (:class:`CheckpointIndex`),
  tensors read by byte range (:func:`read_tensor`) and copied file to file (:func:`copy_ranges`);
* :mod:`evoreap.checkpoint.layout` -- how checkpoint tensor names map to each architecture's routers and experts
  (:class:`KeyLayout`);
* :mod:`evoreap.checkpoint.trust` -- whether a directory carries code transformers would run (:func:`needs_trust`);
* :mod:`evoreap.checkpoint.own_code` -- evoreap's own modeling code for its non-uniform exports, built in-process.

Used by inspect, observe ``--offload`` (:mod:`evoreap.observe.sequential`), the preflight, model loading,
fingerprints and export.
"""

from evoreap.checkpoint.layout import KeyLayout, router_tensor_infos
from evoreap.checkpoint.reader import (INDEX_NAME, CheckpointIndex, TensorInfo, copy_ranges, local_checkpoint,
                                       read_header, read_tensor)
from evoreap.checkpoint.trust import code_entries, needs_trust

__all__ = ["INDEX_NAME", "CheckpointIndex", "KeyLayout", "TensorInfo", "code_entries", "copy_ranges",
           "local_checkpoint", "needs_trust", "read_header", "read_tensor", "router_tensor_infos"]
