"""Recovery after pruning: router repair by distillation (:mod:`.repair`, stored and applied by :mod:`.store`),
re-injection of pruned experts for a domain (:mod:`.reinject`) and per-domain floors for the search
(:mod:`.floors`)."""

from evoreap.recovery.repair import OBJECTIVES, PARAM_SETS, RepairSettings, fit_repair
from evoreap.recovery.store import Repair, applied, export_edits, repair_path, storage_dtype

__all__ = ["OBJECTIVES", "PARAM_SETS", "Repair", "RepairSettings", "applied", "export_edits", "fit_repair",
           "repair_path", "storage_dtype"]
