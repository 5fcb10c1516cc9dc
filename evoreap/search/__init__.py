"""Per-layer allocation search: search space and budget, evolutionary variation, the Optuna-backed driver."""
