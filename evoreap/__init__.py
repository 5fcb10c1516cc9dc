"""evoreap: prune the experts of Mixture-of-Experts language models, with per-layer keep counts found by search."""

__version__ = "0.1.0"
