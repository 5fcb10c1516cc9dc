"""One search run end to end: set-up (model, budget, data, saliency, reference, study), the leader or worker
loop, and the final comparison on held-out data."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from tqdm.auto import tqdm

from evoreap.adapters import MoEAdapter
from evoreap.allocation import Allocation, keep_masks, kept_experts
from evoreap.checkpoint.quant import expert_stored_bits
from evoreap.criteria import DEFAULT_MIN_COUNT, get_criterion, score_experts
from evoreap.data import TokenData, load_tokens
from evoreap.data.guard import check_overlap
from evoreap.data.loader import check_data, check_seq_len
from evoreap.errors import SettingError, UsageError
from evoreap.export import ExportResult, export_pruned
from evoreap.export.core import check_out
from evoreap.files import check_destination, check_writable_dir
from evoreap.models import LoadedModel, load_config, load_model, load_tokenizer, resolve_model
from evoreap.observe.store import cache_root, observe_cached
from evoreap.pipeline.config import SearchConfig
from evoreap.pipeline.report import write_report
from evoreap.recovery.repair import FIT_TOKENS, RepairSettings, fit_repair, settings_for_source
from evoreap.recovery.store import Repair, applied, export_edits, storage_dtype
from evoreap.recovery.floors import (Floor, domain_seeds, floor_proxies, parse_floors, penalized, ranked_curves,
                                     repair_for_floors)
from evoreap.recovery.floors import constraints as floor_constraints
from evoreap.recovery.reinject import saliency
from evoreap.pipeline.rundir import RunDir, default_run_name, find_unfinished, identity_hash
from evoreap.proxies import evaluate, get_proxy, loss_value, parse_proxy_weights, token_order
from evoreap.proxies.population import PopulationEvaluator, StateCache
from evoreap.proxies.streamed import StreamedEvaluator, streamed_fingerprint, streamed_reference_cached
from evoreap.pipeline.streaming import Streamed, memory_limit_gb, observe_streamed, open_streamed, placement_memory, \
    wants_streaming
from evoreap.reference import model_fingerprint, reference_cached
from evoreap.search.driver import LIVE, EvolutionSettings, Group, Leader, SearchLimits, work_queue
from evoreap.search.evolution import layer_mass_curves
from evoreap.search.samplers import optuna_sampler_search
from evoreap.search.space import Budget, SearchSpace, load_space_settings
from evoreap.search.storage import StorageSpec, check_storage, fail_dead_trials, mask_url, open_storage, \
    present, probe_storage

log = logging.getLogger(__name__)
STUDY_NAME = "evoreap"


@dataclass
class SearchSession:
    config: SearchConfig
    loaded: LoadedModel
    space: SearchSpace
    settings: EvolutionSettings
    run: RunDir
    storage_url: str
    study: optuna.Study
    search_data: TokenData
    scores: dict[int, torch.Tensor]
    curves: list[list[float]]
    reference: Any
    order: torch.Tensor
    weights: dict[str, float] | None
    observation_key: str
    heldout: TokenData
    stats: Any
    population: PopulationEvaluator | StreamedEvaluator | None = None  # made on first use by stage_scorer
    floors: tuple[Floor, ...] = ()  # --floor: per-domain bounds, candidates that miss one are infeasible
    streamed: Streamed | None = None  # --offload / --max-memory: the model streamed layer by layer from its shards

    # -- set-up -----------------------------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, config: SearchConfig, loaded: LoadedModel | None = None,
                datasets: dict[str, Any] | None = None) -> SearchSession:
        """Check everything, then load (unless ``loaded`` is given), observe, build the reference and open the
        study. Every setting and destination is checked before anything is created or any weight is read.
        ``datasets`` maps ``data``/``calib_data``/``heldout_data`` to in-memory datasets that replace those specs
        (the config then holds their fingerprints)."""
        datasets = datasets or {}

        def spec(role: str) -> Any:
            return datasets.get(role, getattr(config, role))

        t0 = time.time()
        config.check()
        # Cheap checks first: a bad budget, space, criterion or proxy fails before any weight is read.
        model_config = loaded.adapter.config if loaded is not None else load_config(
            config.model, trust_remote_code=config.trust_remote_code)
        adapter = MoEAdapter(model_config)
        vocab = getattr(model_config.get_text_config(), "vocab_size", None)
        if isinstance(vocab, int) and config.reference_top_k > vocab:  # the held-out table always uses it
            raise SettingError("reference_top_k", f"{{name}} {config.reference_top_k} is larger than the vocabulary "
                               f"({vocab}); pass at most that (the default 64 is plenty)")
        check_seq_len(config.seq_len, adapter.config)  # longer than the model's positions: refused before any weight
        space_settings = load_space_settings(config.space)

        # a pre-quantized source: --budget-gb counts the bytes it stores per routed-expert weight (with scales)
        stored_bits = expert_stored_bits(config.model, adapter) if config.budget_gb is not None else None

        def build(sizes: tuple[int, ...] | None = None) -> SearchSpace:
            budget = Budget.resolve(adapter, fraction=config.budget, params=config.budget_params, gb=config.budget_gb,
                                    bits=config.bits, params_per_expert=sizes, stored_bits=stored_bits)
            return SearchSpace.build(adapter, space_settings, budget, params_per_expert=sizes)

        space = build()  # from the config's expert size: exact unless layers differ (checked once loaded)
        get_criterion(config.criterion)
        proxy = get_proxy(config.proxy)
        weights = parse_proxy_weights(config.proxy_weights) if config.proxy_weights else None
        settings = _evolution_settings(config)
        # Then every destination (run directory, cache, storage, --export) and the database: still nothing is
        # created or loaded, so a mistake here leaves nothing behind.
        check_destinations(config, loaded)
        # The data (paths, domains, first records, a chat template where chats need one) before any weight is read
        tokenizer = (lambda: loaded.tokenizer) if loaded is not None else (
            lambda: load_tokenizer(config.model, trust_remote_code=config.trust_remote_code))
        for role, split in (("calib_data", "calibration"), ("data", "search"), ("heldout_data", "heldout")):
            check_data(spec(role), split, chat_template=config.chat_template, tokenizer=tokenizer)
        if config.worker:
            torch.set_num_threads(1)

        streamed = None
        if loaded is not None and (config.offload or memory_limit_gb(config.max_memory, config.device_map)):
            raise SettingError("offload", "{name} / --max-memory stream a model directory from its shards; this "
                               "model is already in memory: pass its directory instead")
        if loaded is None and wants_streaming(config.model, offload=config.offload, device_map=config.device_map,
                                              max_memory=config.max_memory, dtype=config.dtype,
                                              trust_remote_code=config.trust_remote_code):
            if config.repair:
                raise SettingError("repair", "{name} fits router parameters through the whole model, which is "
                                   "streamed here (--offload / --max-memory); afterwards run evoreap repair "
                                   "--objective local --offload on the best allocation (fitted layer by layer)")
            streamed = open_streamed(config.model, dtype=config.dtype, device=config.device,
                                     trust_remote_code=config.trust_remote_code, cache_dir=config.cache_dir)
            loaded = streamed.loaded
        elif loaded is None:
            loaded = load_model(config.model, dtype=config.dtype, device=config.device,
                                trust_remote_code=config.trust_remote_code, device_map=config.device_map,
                                max_memory=placement_memory(config.max_memory, config.device_map))
        if config.repair:  # a low-rank set cannot be merged into a quantized checkpoint: refused before the search
            settings_for_source(RepairSettings(params=config.repair), loaded.path, explicit=True)
        sizes = adapter.expert_params_per_layer(loaded.model)
        if len(set(sizes)) > 1:  # layers of unequal expert size: the budget and the space in real parameters
            space = build(sizes)
        tok = loaded.tokenizer
        overlaps = _guard_overlap(config, tok, spec)
        calib = load_tokens(spec("calib_data"), tok, split="calibration", seq_len=config.seq_len,
                            tokens=config.calib_tokens, seed=config.seed, chat_template=config.chat_template)
        # a row of L tokens scores L-1 next-token positions: load enough rows for the top fidelity
        search = load_tokens(spec("data"), tok, split="search", seq_len=config.seq_len, seed=config.seed,
                             samples=-(-settings.fidelities[-1] // max(config.seq_len - 1, 1)),
                             chat_template=config.chat_template)
        heldout = load_tokens(spec("heldout_data"), tok, split="heldout", seq_len=config.seq_len,
                              tokens=config.heldout_tokens, seed=config.seed, chat_template=config.chat_template)
        if weights:
            unknown = sorted(set(weights) - set(search.domains))
            if unknown:
                raise UsageError(f"--proxy-weights names {', '.join(unknown)}, not a domain of the search data "
                                 f"({', '.join(search.domains)})")

        identity = {
            "model": loaded.path,
            # the same identity resident or streamed: a run started one way resumes the other
            "model_fingerprint": streamed_fingerprint(streamed.seq, config.cache_dir) if streamed is not None
            else model_fingerprint(loaded.model, config.cache_dir),
            "space": space.describe(),
            "criterion": config.criterion, "min_count": config.min_count, "proxy": proxy.name,
            "proxy_weights": weights, "sampler": config.sampler, "evolution": asdict(settings),
            "seed": config.seed, "seq_len": config.seq_len, "reference_top_k": config.reference_top_k,
            "calibration": calib.fingerprints, "search": search.fingerprints, "heldout": heldout.fingerprints,
        }
        if config.floor:  # floors change trial values; runs without one keep their identity
            identity["floor"] = config.floor
        identity = _jsonable(identity)
        runs_dir = Path(config.runs_dir)
        name = config.run
        if name is None:
            found = find_unfinished(runs_dir, identity)
            name = found.name if found else default_run_name(loaded.path, f"b{space.total}")
            if found:
                log.info("resuming unfinished run %s (same settings)", name)
        # the replayable settings (evoreap search --config RUN_DIR); to_dict masks a storage password
        run = RunDir.open(name, runs_dir, identity, config.replace(run=name).to_dict())
        storage_url = config.storage or f"sqlite:///{(run.path / 'study.db').resolve()}"

        key, stats = _observe(loaded, calib, config) if streamed is None else observe_streamed(
            streamed, calib, cache_dir=config.cache_dir, batch_size=config.batch_size, progress=not config.worker)
        scores = _scores(stats, config)
        mass = score_experts(stats, "reap_x_frequency", min_count=0)
        curves = layer_mass_curves(space, mass)
        reference = None
        floors = parse_floors(config.floor)
        if proxy.needs_reference or any(get_proxy(f.proxy).needs_reference for f in floors):
            reference = _reference(loaded, streamed, search, config)
        storage = open_storage(storage_url)
        # One study per run and settings: runs sharing a --storage URL never see each other's trials. The model's
        # path is left out so that workers on other machines (other paths, same weights) join the same study.
        portable = {k: v for k, v in identity.items() if k != "model"}
        study_name = f"{STUDY_NAME}-{run.path.name}-{identity_hash(portable)}"
        study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize",
                                    load_if_exists=True)
        if not config.worker:
            study.set_user_attr("space", space.describe())
            run.environment({"observation_key": key, "storage": mask_url(storage_url), "study": study.study_name,
                             "allowed_overlaps": overlaps, "data": {
                "calibration": calib.file_hashes, "search": search.file_hashes, "heldout": heldout.file_hashes}})
        log.info("set-up: %s, %d MoE layers x %d experts, budget %s -> %d experts kept (uniform %s), run %s (%.1fs)",
                 adapter.name, len(space.layers), adapter.num_experts, space.budget.described, space.total,
                 space.uniform[0] if len(set(space.uniform)) == 1 else list(space.uniform), run.path, time.time() - t0)
        return cls(config, loaded, space, settings, run, storage_url, study, search, scores, curves, reference,
                   token_order(search, config.seed), weights, key, heldout, stats, floors=floors, streamed=streamed)

    # -- scoring ----------------------------------------------------------------------------------------------------
    def masks_for(self, counts: tuple[int, ...], scores: dict[int, torch.Tensor] | None = None):
        alloc = Allocation(self.space.layers, tuple(counts))
        return keep_masks(self.loaded.adapter, alloc, scores or self.scores)

    def scorer(self, counts: tuple[int, ...], tokens: int) -> tuple[float, dict[str, Any]]:
        if self.streamed is not None:  # one candidate is a stage of one: every layer read once
            return self.stage_scorer([(counts, tokens)])[0]
        result = evaluate(self.loaded.model, self.loaded.adapter, self.masks_for(counts), self.search_data,
                          proxies=_proxies(self.config.proxy, self.floors), reference=self.reference,
                          order=self.order, n_tokens=tokens, batch_size=self.config.batch_size)
        value = loss_value(result, self.config.proxy, self.weights)
        return self._floored(value, result, {"values": result.values, "per_domain": result.per_domain,
                                             "scored_tokens": result.tokens,
                                             "routed_params": self.space.routed_params(counts)})

    def _floored(self, value: float, result: Any, attrs: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """With --floor: the floors' violations as Optuna constraints (``attrs["constraints"]``, read by the
        driver), and an infeasible candidate's value penalised so that it ranks after every feasible one."""
        if not self.floors:
            return value, attrs
        violations = floor_constraints(self.floors, result.per_domain)
        return penalized(value, violations), {**attrs, "constraints": violations, "unpenalised": value}

    def stage_scorer(self, requests: list[tuple[tuple[int, ...], int]], progress: Any = None
                     ) -> list[tuple[float, dict[str, Any]]]:
        """Score a group of (allocation, tokens) requests together with the population engine (shared prefixes and
        hidden states kept across generations); the same values as :meth:`scorer` gives one by one."""
        if self.population is None and self.streamed is not None:
            # a stage checkpoints after every layer under the run directory: a killed stage resumes there; nodes'
            # states are kept across stages on disk (streamed/states, --state-cache-gb of them) for later stages
            self.population = StreamedEvaluator(self.streamed.seq, self.search_data, reference=self.reference,
                                                order=self.order, batch_size=self.config.batch_size,
                                                max_state_bytes=int(self.config.state_cache_gb * 2**30),
                                                resume_dir=self.run.path / "streamed", cache_dir=self.config.cache_dir,
                                                store_bytes=int(self.config.state_cache_gb * 2**30))
        if self.population is None:
            cache = StateCache(int(self.config.state_cache_gb * 2**30))
            self.population = PopulationEvaluator(self.loaded.model, self.loaded.adapter, self.search_data,
                                                  reference=self.reference, order=self.order,
                                                  batch_size=self.config.batch_size, cache=cache)
        out: list[tuple[float, dict[str, Any]] | None] = [None] * len(requests)
        by_tokens: dict[int, list[int]] = {}
        for i, (_, tokens) in enumerate(requests):
            by_tokens.setdefault(tokens, []).append(i)
        for tokens, idx in by_tokens.items():
            results = self.population.score([self.masks_for(requests[i][0]) for i in idx],
                                            proxies=_proxies(self.config.proxy, self.floors), n_tokens=tokens,
                                            progress=progress)
            for i, result in zip(idx, results):
                counts = requests[i][0]
                out[i] = self._floored(loss_value(result, self.config.proxy, self.weights), result,
                                       {"values": result.values, "per_domain": result.per_domain,
                                        "scored_tokens": result.tokens,
                                        "routed_params": self.space.routed_params(counts)})
        return out

    def retain_elites(self, elites: list[tuple[int, ...]]) -> None:
        """Tell the population engine (if it keeps states across stages) which candidates are the elites: their
        hidden states stay cached before any other's, since the next generation's children start from them."""
        retain = getattr(self.population, "retain", None)
        if retain is not None:
            retain([self.masks_for(c) for c in elites])

    def _stage_scorer(self):
        # auto: the population engine (0.86x single's time on the demo's main search, same values); a streamed
        # model always scores whole stages, each layer read once per stage
        if self.streamed is not None or self.config.engine in ("auto", "population"):
            return self.stage_scorer
        return None

    # -- roles ------------------------------------------------------------------------------------------------------
    def work(self) -> None:
        """A worker: score queued trials until the leader marks the study done, announced in the study meanwhile
        (so that every process sizes its share of a stage from the live workers)."""
        with present(self.study) as me:
            while not self.study.user_attrs.get("done"):
                if work_queue(self.study, self.space, self.scorer, self._stage_scorer(), self._group(), me=me) == 0:
                    time.sleep(0.1)
                self.study = optuna.load_study(study_name=self.study.study_name, storage=self.study._storage)

    def lead(self) -> SearchResult:
        fail_dead_trials(self.study)
        self.study.set_user_attr("done", False)
        s = self.settings
        # generation 0 (the seeds) is one step of the bar; within a generation it moves with the tokens scored, as a
        # share of what a generation scores at most (every child at stage 1, the survivors at stages 2 and 3)
        bar = tqdm(total=s.generations + 1, desc="search", unit="gen", disable=self.config.quiet,
                   bar_format="{l_bar}{bar}| {n:.2f}/{total} gen [{elapsed}<{remaining}{postfix}]")
        per_gen = s.offspring * s.fidelities[0] + sum(k * f for k, f in zip(s.survivors, s.fidelities[1:]))
        state: dict[str, Any] = {"generation": 0, "spent": 0, "done": 0, "best": None}

        def show(**post: Any) -> None:
            if state["best"] is not None:
                post["best"] = f"{state['best']:.4g}"
            bar.set_postfix(post, refresh=False)
            bar.refresh()

        def on_stage(info: dict[str, Any]) -> None:
            gen = info.get("generation") or 0
            if gen != state["generation"]:
                state.update(generation=gen, spent=0, done=0)
            if info.get("finished"):
                state["spent"] += state["done"]
                state["done"] = 0
                return
            state["done"] = info["tokens_done"]
            expected = info["tokens_total"] if gen == 0 else per_gen
            bar.n = gen + min(0.99, (state["spent"] + state["done"]) / max(1, expected))
            show(stage=f"gen {gen} stage {info.get('stage')}",
                 scored=f"{info['tokens_done'] / 1e3:.0f}k/{info['tokens_total'] / 1e3:.0f}k tok")

        def progress(info: dict[str, Any]) -> None:
            state["best"] = info["best"]
            # the evolution reports each generation; an Optuna sampler every offspring/2 trials
            bar.n = info["generation"] + 1 if self.config.sampler == "evolution" else min(bar.total, int(bar.n) + 1)
            show(tokens=f"{info['tokens'] / 1e6:.2f}M", trials=info["trials"])

        limits = SearchLimits(trials=self.config.trials, time_limit=self.config.time_limit,
                              token_budget=self.config.token_budget)
        t0 = time.time()
        try:
            if self.config.sampler == "evolution":
                result = Leader(self.study, self.space, self.scorer, s, self.curves, limits,
                                on_progress=progress, stage_scorer=self._stage_scorer(), group=self._group(),
                                on_stage=on_stage, extra_seeds=self.check_floors(),
                                on_elites=self.retain_elites).run()
            else:
                result = optuna_sampler_search(self.study, self.space, self.scorer, self.config.sampler, s, limits,
                                               on_progress=progress)
        finally:
            bar.close()
            self.study.set_user_attr("done", True)
        result["seconds"] = round(time.time() - t0, 1)
        return self.finish(result)

    def _repair_best(self, kept: dict[int, list[int]], heldout_ref: Any) -> tuple[Repair, dict[str, Any]]:
        """--repair: fit the best allocation's repair (calibration text, early stopping on the search data), store
        it beside best_allocation.json, and score it on held-out data."""
        cfg, model, adapter = self.config, self.loaded.model, self.loaded.adapter
        fit = load_tokens(cfg.calib_data, self.loaded.tokenizer, split="calibration", seq_len=cfg.seq_len,
                          tokens=min(cfg.calib_tokens, FIT_TOKENS), seed=cfg.seed)
        settings = RepairSettings(params=cfg.repair, seed=cfg.seed)

        def ref_of(data: TokenData) -> Any:
            return reference_cached(model, data, top_k=cfg.reference_top_k, cache_dir=cfg.cache_dir,
                                    batch_size=cfg.batch_size, progress=not cfg.quiet)

        path = self.run.path / "best_allocation.repair.safetensors"
        repair = fit_repair(model, adapter, kept, fit, self.search_data,
                            stop_reference=self.reference if self.reference is not None else ref_of(self.search_data),
                            fit_reference=ref_of(fit), settings=settings,
                            storage_dtype=storage_dtype(self.loaded.path, adapter, next(model.parameters()).dtype),
                            checkpoint=self.run.path / ".repair.partial", progress=not cfg.quiet)
        repair.save(path)
        masks = {i: torch.zeros(adapter.num_experts, dtype=torch.bool).index_fill_(0, torch.tensor(k), True)
                 for i, k in kept.items() if len(k) < adapter.num_experts}
        with applied(model, repair, kept):
            r = evaluate(model, adapter, masks, self.heldout, proxies=("nll", "kl", "esap"), reference=heldout_ref,
                         batch_size=cfg.batch_size, other_model=True)
        log.info("repair (%s): search-split KL %.4f -> %.4f (%s), held-out NLL %.4f; wrote %s", cfg.repair,
                 repair.meta["search"]["kl_before"], repair.meta["search"]["kl_after"],
                 "kept" if repair.accepted else "rejected", r.values["nll"], path)
        return repair, {"values": r.values, "per_domain": r.per_domain, "tokens": r.tokens}

    def check_floors(self) -> dict[str, tuple[int, ...]]:
        """Before the search: one seed per floored domain (the analytic allocation from that domain's saliency),
        checked on the floors at full fidelity; a seed that breaks a floor is repaired by moving layer steps while
        that helps (:func:`repair_for_floors`) and the result joins the seeds. A floor that none of them meets is
        reported with the best value they reach, the repaired seeds included (the search then treats candidates
        that miss it as infeasible). Returns the seeds."""
        if not self.floors:
            return {}
        seeds = {"uniform": self.space.uniform, **domain_seeds(self.space, self.stats, self.floors)}
        fidelity = self.settings.fidelities[-1]
        checked = {name: self.scorer(c, fidelity)[1] for name, c in seeds.items()}
        moves: dict[str, Any] = {}
        for domain in dict.fromkeys(f.domain for f in self.floors):
            # a domain seed that breaks a floor is moved towards the floors, layer step by layer step, ranked by the
            # domain's saliency in the criterion's order and kept only where measured to help
            name = f"floor:{domain}"
            if any(all(v <= 0 for v in c["constraints"].values()) for c in checked.values()):
                break  # a seed already meets every floor
            # start from the seed closest to the floors (on the demo the uniform one, not the domain's own seed)
            start = min(checked, key=lambda n: (sum(max(0.0, v) for v in checked[n]["constraints"].values()), n))
            if all(checked[start]["constraints"][f.name] <= 0 for f in self.floors if f.domain == domain):
                continue  # this domain's floors hold there: its saliency cannot guide the moves the others need
            scored: dict[tuple[int, ...], dict[str, Any]] = {}

            def violations(c: tuple[int, ...]) -> dict[str, float]:
                scored[c] = self.scorer(c, fidelity)[1]
                return scored[c]["constraints"]

            fixed = repair_for_floors(self.space, seeds[start],
                                      ranked_curves(self.space, saliency(self.stats, domain), self.scores),
                                      violations, start=checked[start]["constraints"])
            moves[name] = {"from": start, "moves": [list(m) for m in fixed.moves],
                           "evaluations": fixed.evaluations}
            if fixed.moves:
                seeds[f"{name}:repaired"], checked[f"{name}:repaired"] = fixed.counts, scored[fixed.counts]
                log.info("seed %s repaired for the %s floors in %d moves (%d evaluations): floor excess %.4f -> "
                         "%.4f", start, domain, len(fixed.moves), fixed.evaluations,
                         sum(max(0.0, v) for v in checked[start]["constraints"].values()), fixed.excess)
        for f in self.floors:
            best_name = min(checked, key=lambda n: checked[n]["constraints"][f.name])
            worst = checked[best_name]["constraints"][f.name]
            value = checked[best_name]["per_domain"][f.domain][f.proxy]
            if worst > 0:
                log.warning("floor %s is not met by any seed at budget %s: the best reaches %.4f (seed %s); it may be "
                            "unreachable at this budget", f.describe(), self.space.budget.described, value, best_name)
            else:
                log.info("floor %s: met by seed %s (%.4f)", f.describe(), best_name, value)
        self.run.write("floors.json", {"floors": [f.describe() for f in self.floors],
                                       "seeds": {n: {"counts": list(seeds[n]), "constraints": v["constraints"],
                                                     "per_domain": v["per_domain"]} for n, v in checked.items()},
                                       "repairs": moves})
        return {n: c for n, c in seeds.items() if n != "uniform"}

    def _group(self) -> Group:
        """Trials one process takes at a time: its share of the stage among the workers announced live in the study
        (local ones and those started with --worker on other machines), so all waiting ones when it is alone."""
        return LIVE

    # -- the end ----------------------------------------------------------------------------------------------------
    def finish(self, result: dict[str, Any]) -> SearchResult:
        space, adapter = self.space, self.loaded.adapter
        best, uniform = tuple(result["best"]), space.uniform
        heldout = self.heldout
        ref = _reference(self.loaded, self.streamed, heldout, self.config, progress=not self.config.quiet)
        names = ("nll", "kl", "esap")
        candidates = {"unpruned": None, f"uniform ({self.config.criterion})": self.masks_for(uniform)}
        for baseline in ("reap", "frequency"):  # the usual uniform baselines, beside the chosen criterion's
            if baseline != self.config.criterion:
                candidates[f"uniform ({baseline})"] = self.masks_for(uniform, _scores(self.stats, self.config,
                                                                                      baseline))
        candidates["searched"] = self.masks_for(best)
        # one layer-by-layer pass for the whole table (shared prefixes once), with a bar of scored tokens
        if self.streamed is not None:
            judge = StreamedEvaluator(self.streamed.seq, heldout, reference=ref, batch_size=self.config.batch_size,
                                      max_state_bytes=int(self.config.state_cache_gb * 2**30),
                                      cache_dir=self.config.cache_dir)
        else:
            judge = PopulationEvaluator(self.loaded.model, adapter, heldout, reference=ref,
                                        batch_size=self.config.batch_size, cache=StateCache(0))
        bar = tqdm(desc="held-out table", unit="tok", unit_scale=True, disable=self.config.quiet, leave=False)

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            rows = dict(zip(candidates, judge.score(list(candidates.values()), proxies=names, progress=advance)))
        finally:
            bar.close()
        table = {k: {"values": v.values, "per_domain": v.per_domain, "tokens": v.tokens} for k, v in rows.items()}

        kept = kept_experts(Allocation(space.layers, best), adapter, self.scores)  # as export and evaluate choose
        meta = {"budget": space.budget.described, "budget_params": space.budget.params,
                "criterion": self.config.criterion, "min_count": self.config.min_count, "proxy": self.config.proxy,
                "proxy_weights": self.weights, "search_value": result["best_value"],
                "uniform_search_value": result["uniform_value"], "heldout": table["searched"]["values"],
                "observation_key": self.observation_key, "model": self.loaded.path, "run": str(self.run.path),
                "calibration_data": self.config.calib_data, "search_data": self.config.data}
        alloc = Allocation(space.layers, best, meta).with_experts(kept)
        self.run.write("history.json", {k: result[k] for k in ("history", "correlations", "scored_top")})
        shutil.rmtree(self.run.path / "streamed", ignore_errors=True)  # the search is over: no stage to resume
        summary = {k: v for k, v in result.items() if k not in ("history", "scored_top")}
        summary.update(best=list(best), uniform=list(uniform), trials=len(result["history"]), heldout=table,
                       space=space.describe())
        self.run.write("result.json", summary)
        alloc.save(self.run.path / "best_allocation.json", adapter)  # the one allocation writer
        edits = None
        if self.config.repair:  # beside best_allocation.json, where evaluate and export find it
            repair, row = self._repair_best(kept, ref)
            table[f"searched + repair ({self.config.repair})"] = row
            summary.update(heldout=table, repair={k: repair.meta[k] for k in ("accepted", "search", "seconds")})
            self.run.write("result.json", summary)
            if self.config.export:
                edits = export_edits(repair, self.loaded.path, adapter, kept)
                meta = {**meta, "repair": {k: repair.meta[k] for k in ("params", "objective", "accepted", "search")}}
        exported = None
        if self.config.export:
            exported = export_pruned(self.loaded.path, self.config.export, kept, meta=meta,
                                     overwrite=self.config.overwrite, progress=not self.config.quiet, edits=edits)
            log.info("exported the pruned model to %s", exported.out)
        if not self.config.no_plots:
            if importlib.util.find_spec("matplotlib") is None:  # plotting is an optional extra
                log.warning("no pictures or report (no matplotlib); pip install 'evoreap[plot]'")
            else:
                write_report(self.run.path, artifacts=True, storage=self.storage_url)
        return SearchResult(alloc, table, self.run.path, summary, exported)


@dataclass(frozen=True)
class SearchResult:
    """What a search produced: the best allocation (with its kept experts), the held-out table (unpruned, uniform
    baselines and searched: ``{"values", "per_domain", "tokens"}`` per row), the run directory, the run's summary
    (``result.json``) and the export, if one was asked for."""

    allocation: Allocation
    table: dict[str, Any]
    run_dir: Path
    summary: dict[str, Any]
    export: ExportResult | None = None


def check_destinations(config: SearchConfig, loaded: LoadedModel | None = None) -> StorageSpec | None:
    """Check, creating nothing, every place a search writes to: the run directory (a resumed run's config must be
    readable), the cache, the ``--storage`` file or database (connected to once), and the ``--export`` directory
    (empty unless ``--overwrite``, not the model, the run directory, the cache or the storage file). Returns the
    checked ``--storage`` (None for the default, a SQLite file in the run directory)."""
    runs_dir = Path(config.runs_dir).expanduser()
    RunDir.check(config.run, runs_dir)
    cache = cache_root(config.cache_dir)
    check_writable_dir(cache, "--cache-dir" if config.cache_dir is not None else "cache directory ($EVOREAP_CACHE)")
    spec = check_storage(config.storage) if config.storage else None
    if config.export and not config.worker:
        model = loaded.path if loaded is not None else resolve_model(config.model)
        if not Path(model).is_dir():
            raise SettingError("export", f"{{name}} writes a pruned copy of a local model directory, and {model} is "
                               "not one (a hub id or an in-memory model); download or save it first")
        sources = {"run directory": runs_dir / config.run if config.run else runs_dir, "cache directory": cache}
        if spec is not None and spec.path is not None:
            sources["storage file"] = spec.path
        check_destination(config.export, sources=sources, what="--export")
        check_out(config.export, model, config.overwrite, what="--export")  # not the model, empty or its own
    if spec is not None:
        probe_storage(spec)  # last: a wrong password or an unreachable server, before any weight is read
    return spec


def _proxies(proxy: str, floors: tuple[Floor, ...] = ()) -> tuple[str, ...]:
    return tuple(dict.fromkeys((proxy, "nll", *floor_proxies(floors))))


def _evolution_settings(config: SearchConfig) -> EvolutionSettings:
    return EvolutionSettings(generations=config.generations, population=config.population, offspring=config.offspring,
                             fidelities=tuple(config.fidelities), survivors=tuple(config.survivors),
                             guided=config.guided, seed=config.seed)


def _reference(loaded: LoadedModel, streamed: Streamed | None, data: TokenData, config: SearchConfig,
               progress: bool | None = None):
    """The unpruned model's reference on ``data`` (cached): from the resident model, or built layer by layer from
    the shards when the model is streamed (the same cache entry either way)."""
    if streamed is not None:
        return streamed_reference_cached(streamed.seq, data, top_k=config.reference_top_k, cache_dir=config.cache_dir,
                                         batch_size=config.batch_size,
                                         max_state_bytes=int(config.state_cache_gb * 2**30))
    return reference_cached(loaded.model, data, top_k=config.reference_top_k, cache_dir=config.cache_dir,
                            batch_size=config.batch_size, progress=not config.worker if progress is None else progress)


def _observe(loaded: LoadedModel, calib: TokenData, config: SearchConfig):
    return observe_cached(loaded, calib, cache_dir=config.cache_dir, batch_size=config.batch_size,
                          progress=not config.worker)


def _scores(stats, config: SearchConfig, criterion: str | None = None) -> dict[int, torch.Tensor]:
    """Expert scores by ``criterion`` (default: the run's ``--criterion``) with the run's min-count and seed."""
    min_count = DEFAULT_MIN_COUNT if config.min_count is None else config.min_count
    return score_experts(stats, criterion or config.criterion, min_count=min_count, seed=config.seed)


def _guard_overlap(config: SearchConfig, tokenizer: Any, spec: Any) -> list[dict[str, Any]]:
    roles = {"calibration": (spec("calib_data"), "calibration"), "search": (spec("data"), "search"),
             "heldout": (spec("heldout_data"), "heldout")}
    found = check_overlap(roles, tokenizer=tokenizer, allow=config.allow_overlap)
    return [asdict(o) | {"fraction": o.fraction} for o in found]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# -- one run, with local workers --------------------------------------------------------------------------------------
LEADER_ENV = "EVOREAP_LEADER_PID"
STORAGE_ENV = "EVOREAP_LEADER_STORAGE"  # the storage URL for local workers (it may hold a password)


def run_search(config: SearchConfig, loaded: LoadedModel | None = None,
               datasets: dict[str, Any] | None = None) -> SearchResult | None:
    """A whole search: a worker scores queued trials until the leader is done (returns None); a leader starts
    ``workers - 1`` local worker processes, leads, and returns the result."""
    if config.worker:
        _exit_with_leader()
    session = SearchSession.prepare(config, loaded, datasets)  # checks everything before it creates or loads
    if config.worker:
        session.work()
        return None
    procs = _spawn_workers(config, session) if config.workers > 1 else []
    try:
        return session.lead()
    finally:
        _stop_workers(procs)


def _spawn_workers(config: SearchConfig, session: SearchSession) -> list[subprocess.Popen]:
    """Local workers replay the run's stored config (``RUN/config.json``); the storage URL, which may hold a
    password, reaches them through the environment, not their command line (where ps shows it)."""
    cmd = [sys.executable, "-m", "evoreap.cli", "search", "--config", str(session.run.path / "config.json"),
           "--run", session.run.path.name, "--worker", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", LEADER_ENV: str(os.getpid()), STORAGE_ENV: session.storage_url}
    log.info("starting %d worker processes", config.workers - 1)
    procs = []
    for i in range(config.workers - 1):
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(Path(session.run.path) / f"worker{i + 1}.log", "ab")))
        time.sleep(0.1)
    return procs


def _stop_workers(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """The study is marked done: workers end on their own within a poll; one still starting up (importing torch
    can take longer than a small search) has no trial and is terminated instead of waited for."""
    deadline = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()


def _exit_with_leader() -> None:
    """A worker spawned by a local leader (``--workers N``) ends when that leader is gone, even if it was killed
    before it could mark the study done; its unfinished trial is then failed and re-queued by the next leader."""
    leader = os.environ.get(LEADER_ENV)
    if not leader or leader != str(os.getppid()):  # started by hand (another machine): runs until the study is done
        return

    def watch() -> None:
        while os.getppid() == int(leader):
            time.sleep(1.0)
        log.warning("the leader (pid %s) is gone; this worker stops", leader)
        os._exit(3)

    threading.Thread(target=watch, name="evoreap-leader-watch", daemon=True).start()


def local_worker_storage() -> str | None:
    """The storage URL a local leader handed this worker process through the environment, if it is one."""
    if os.environ.get(LEADER_ENV) == str(os.getppid()):
        return os.environ.get(STORAGE_ENV)
    return None
