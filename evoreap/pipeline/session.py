"""One search run end to end: set-up (model, budget, data, saliency, reference, study), the leader or worker
loop, and the final comparison on held-out data."""

from __future__ import annotations

import importlib.util
import logging
import os
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
from evoreap.criteria import DEFAULT_MIN_COUNT, get_criterion, score_experts
from evoreap.data import TokenData, load_tokens
from evoreap.data.guard import check_overlap
from evoreap.data.loader import check_seq_len
from evoreap.errors import SettingError, UsageError
from evoreap.export import ExportResult, export_pruned
from evoreap.export.core import check_out
from evoreap.files import check_destination, check_writable_dir
from evoreap.models import LoadedModel, load_config, load_model, resolve_model
from evoreap.observe.store import cache_root, observe_cached
from evoreap.pipeline.config import SearchConfig
from evoreap.pipeline.report import write_report
from evoreap.pipeline.rundir import RunDir, default_run_name, find_unfinished, identity_hash
from evoreap.proxies import evaluate, get_proxy, loss_value, parse_proxy_weights, token_order
from evoreap.reference import model_fingerprint, reference_cached
from evoreap.search.driver import EvolutionSettings, Leader, SearchLimits, work_queue
from evoreap.search.evolution import layer_mass_curves
from evoreap.search.samplers import optuna_sampler_search
from evoreap.search.space import Budget, SearchSpace, load_space_settings
from evoreap.search.storage import StorageSpec, check_storage, fail_dead_trials, mask_url, open_storage, \
    probe_storage

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

        def build(sizes: tuple[int, ...] | None = None) -> SearchSpace:
            budget = Budget.resolve(adapter, fraction=config.budget, params=config.budget_params, gb=config.budget_gb,
                                    bits=config.bits, params_per_expert=sizes)
            return SearchSpace.build(adapter, space_settings, budget, params_per_expert=sizes)

        space = build()  # from the config's expert size: exact unless layers differ (checked once loaded)
        get_criterion(config.criterion)
        proxy = get_proxy(config.proxy)
        weights = parse_proxy_weights(config.proxy_weights) if config.proxy_weights else None
        settings = _evolution_settings(config)
        # Then every destination (run directory, cache, storage, --export) and the database: still nothing is
        # created or loaded, so a mistake here leaves nothing behind.
        check_destinations(config, loaded)
        if config.worker:
            torch.set_num_threads(1)

        if loaded is None:
            loaded = load_model(config.model, dtype=config.dtype, device=config.device,
                                trust_remote_code=config.trust_remote_code)
        sizes = adapter.expert_params_per_layer(loaded.model)
        if len(set(sizes)) > 1:  # layers of unequal expert size: the budget and the space in real parameters
            space = build(sizes)
        tok = loaded.tokenizer
        overlaps = _guard_overlap(config, tok, spec)
        calib = load_tokens(spec("calib_data"), tok, split="calibration", seq_len=config.seq_len,
                            tokens=config.calib_tokens, seed=config.seed)
        # a row of L tokens scores L-1 next-token positions: load enough rows for the top fidelity
        search = load_tokens(spec("data"), tok, split="search", seq_len=config.seq_len, seed=config.seed,
                             samples=-(-settings.fidelities[-1] // max(config.seq_len - 1, 1)))
        heldout = load_tokens(spec("heldout_data"), tok, split="heldout", seq_len=config.seq_len,
                              tokens=config.heldout_tokens, seed=config.seed)
        if weights:
            unknown = sorted(set(weights) - set(search.domains))
            if unknown:
                raise UsageError(f"--proxy-weights names {', '.join(unknown)}, not a domain of the search data "
                                 f"({', '.join(search.domains)})")

        identity = {
            "model": loaded.path, "model_fingerprint": model_fingerprint(loaded.model, config.cache_dir),
            "space": space.describe(),
            "criterion": config.criterion, "min_count": config.min_count, "proxy": proxy.name,
            "proxy_weights": weights, "sampler": config.sampler, "evolution": asdict(settings),
            "seed": config.seed, "seq_len": config.seq_len, "reference_top_k": config.reference_top_k,
            "calibration": calib.fingerprints, "search": search.fingerprints, "heldout": heldout.fingerprints,
        }
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

        key, stats = _observe(loaded, calib, config)
        scores = _scores(stats, config)
        mass = score_experts(stats, "reap_x_frequency", min_count=0)
        curves = layer_mass_curves(space, mass)
        reference = None
        if proxy.needs_reference:
            reference = reference_cached(loaded.model, search, top_k=config.reference_top_k, cache_dir=config.cache_dir,
                                         batch_size=config.batch_size, progress=not config.worker)
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
                   token_order(search, config.seed), weights, key, heldout, stats)

    # -- scoring ----------------------------------------------------------------------------------------------------
    def masks_for(self, counts: tuple[int, ...], scores: dict[int, torch.Tensor] | None = None):
        alloc = Allocation(self.space.layers, tuple(counts))
        return keep_masks(self.loaded.adapter, alloc, scores or self.scores)

    def scorer(self, counts: tuple[int, ...], tokens: int) -> tuple[float, dict[str, Any]]:
        result = evaluate(self.loaded.model, self.loaded.adapter, self.masks_for(counts), self.search_data,
                          proxies=_proxies(self.config.proxy), reference=self.reference, order=self.order,
                          n_tokens=tokens, batch_size=self.config.batch_size)
        value = loss_value(result, self.config.proxy, self.weights)
        return value, {"values": result.values, "per_domain": result.per_domain, "scored_tokens": result.tokens,
                       "routed_params": self.space.routed_params(counts)}

    # -- roles ------------------------------------------------------------------------------------------------------
    def work(self) -> None:
        """A worker: score queued trials until the leader marks the study done."""
        while not self.study.user_attrs.get("done"):
            if work_queue(self.study, self.space, self.scorer) == 0:
                time.sleep(0.1)
            self.study = optuna.load_study(study_name=self.study.study_name, storage=self.study._storage)

    def lead(self) -> SearchResult:
        fail_dead_trials(self.study)
        self.study.set_user_attr("done", False)
        s = self.settings
        bar = tqdm(total=s.generations, desc="search", unit="gen", disable=self.config.quiet)

        def progress(info: dict[str, Any]) -> None:
            bar.update(1)
            bar.set_postfix(best=f"{info['best']:.4g}", tokens=f"{info['tokens'] / 1e6:.2f}M", trials=info["trials"])

        limits = SearchLimits(trials=self.config.trials, time_limit=self.config.time_limit,
                              token_budget=self.config.token_budget)
        t0 = time.time()
        try:
            if self.config.sampler == "evolution":
                result = Leader(self.study, self.space, self.scorer, s, self.curves, limits,
                                on_progress=progress).run()
            else:
                result = optuna_sampler_search(self.study, self.space, self.scorer, self.config.sampler, s, limits,
                                               on_progress=progress)
        finally:
            bar.close()
            self.study.set_user_attr("done", True)
        result["seconds"] = round(time.time() - t0, 1)
        return self.finish(result)

    # -- the end ----------------------------------------------------------------------------------------------------
    def finish(self, result: dict[str, Any]) -> SearchResult:
        space, adapter = self.space, self.loaded.adapter
        best, uniform = tuple(result["best"]), space.uniform
        heldout = self.heldout
        ref = reference_cached(self.loaded.model, heldout, top_k=self.config.reference_top_k,
                               cache_dir=self.config.cache_dir, batch_size=self.config.batch_size, progress=False)
        names = ("nll", "kl", "esap")
        rows = {"unpruned": evaluate(self.loaded.model, adapter, None, heldout, proxies=names, reference=ref,
                                     batch_size=self.config.batch_size)}
        rows[f"uniform ({self.config.criterion})"] = evaluate(self.loaded.model, adapter, self.masks_for(uniform),
                                                             heldout, proxies=names, reference=ref,
                                                             batch_size=self.config.batch_size)
        for baseline in ("reap", "frequency"):  # the usual uniform baselines, beside the chosen criterion's
            if baseline != self.config.criterion:
                other = _scores(self.stats, self.config, baseline)
                rows[f"uniform ({baseline})"] = evaluate(self.loaded.model, adapter, self.masks_for(uniform, other),
                                                         heldout, proxies=names, reference=ref,
                                                         batch_size=self.config.batch_size)
        rows["searched"] = evaluate(self.loaded.model, adapter, self.masks_for(best), heldout, proxies=names,
                                    reference=ref, batch_size=self.config.batch_size)
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
        summary = {k: v for k, v in result.items() if k not in ("history", "scored_top")}
        summary.update(best=list(best), uniform=list(uniform), trials=len(result["history"]), heldout=table,
                       space=space.describe())
        self.run.write("result.json", summary)
        alloc.save(self.run.path / "best_allocation.json", adapter)  # the one allocation writer
        exported = None
        if self.config.export:
            exported = export_pruned(self.loaded.path, self.config.export, kept, meta=meta,
                                     overwrite=self.config.overwrite, progress=not self.config.quiet)
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


def _proxies(proxy: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((proxy, "nll")))


def _evolution_settings(config: SearchConfig) -> EvolutionSettings:
    return EvolutionSettings(generations=config.generations, population=config.population, offspring=config.offspring,
                             fidelities=tuple(config.fidelities), survivors=tuple(config.survivors),
                             guided=config.guided, seed=config.seed)


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
