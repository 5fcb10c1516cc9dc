"""One search run end to end: set-up (model, budget, data, saliency, reference, study), the leader or worker
loop, and the final comparison on held-out data."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from evoreap.allocation import Allocation, keep_masks, kept_experts
from evoreap.data import TokenData, load_tokens
from evoreap.data.loader import check_seq_len
from evoreap.errors import UsageError
from evoreap.models import LoadedModel, load_model
from evoreap.search.driver import EvolutionSettings, Leader, SearchLimits, work_queue
from evoreap.search.evolution import layer_mass_curves
from evoreap.search.run import RunDir, default_run_name, find_unfinished, identity_hash
from evoreap.search.space import Budget, SearchSpace, load_space_settings
from evoreap.search.storage import StorageSpec, check_storage, fail_dead_trials, mask_url, open_storage, \
    probe_storage

log = logging.getLogger(__name__)
STUDY_NAME = "evoreap"


@dataclass
class SearchSession:
    args: argparse.Namespace
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
    def prepare(cls, args: argparse.Namespace) -> SearchSession:
        from evoreap.criteria import get_criterion
        from evoreap.proxies import get_proxy, parse_proxy_weights, token_order

        t0 = time.time()
        # Cheap checks first: a bad budget, space, criterion or proxy fails before any weight is read.
        from evoreap.adapters import MoEAdapter
        from evoreap.models import load_config

        config = load_config(args.model, trust_remote_code=args.trust_remote_code)
        adapter = MoEAdapter(config)
        vocab = getattr(config.get_text_config(), "vocab_size", None)
        if isinstance(vocab, int) and args.reference_top_k > vocab:  # the held-out table always uses it
            raise UsageError(f"--reference-top-k {args.reference_top_k} is larger than the vocabulary ({vocab}); "
                             "pass at most that (the default 64 is plenty)")
        check_seq_len(args.seq_len, adapter.config)  # longer than the model's positions: refused before any weight
        space_settings = load_space_settings(args.space)

        def build(sizes: tuple[int, ...] | None = None) -> SearchSpace:
            budget = Budget.resolve(adapter, fraction=args.budget, params=args.budget_params, gb=args.budget_gb,
                                    bits=args.bits, params_per_expert=sizes)
            return SearchSpace.build(adapter, space_settings, budget, params_per_expert=sizes)

        space = build()  # from the config's expert size: exact unless layers differ (checked once loaded)
        get_criterion(args.criterion)
        proxy = get_proxy(args.proxy)
        weights = parse_proxy_weights(args.proxy_weights) if args.proxy_weights else None
        settings = _evolution_settings(args)
        # Then every destination (run directory, cache, storage, --export) and the database: still nothing is
        # created or loaded, so a mistake here leaves nothing behind.
        check_destinations(args)
        if args.worker:
            torch.set_num_threads(1)

        loaded = load_model(args.model, dtype=args.dtype, device=args.device,
                            trust_remote_code=args.trust_remote_code)
        sizes = adapter.expert_params_per_layer(loaded.model)
        if len(set(sizes)) > 1:  # layers of unequal expert size: the budget and the space in real parameters
            space = build(sizes)
        tok = loaded.tokenizer
        overlaps = _guard_overlap(args, tok)
        calib = load_tokens(args.calib_data, tok, split="calibration", seq_len=args.seq_len, tokens=args.calib_tokens,
                            seed=args.seed)
        # a row of L tokens scores L-1 next-token positions: load enough rows for the top fidelity
        search = load_tokens(args.data, tok, split="search", seq_len=args.seq_len, seed=args.seed,
                             samples=-(-settings.fidelities[-1] // max(args.seq_len - 1, 1)))
        heldout = load_tokens(args.heldout_data, tok, split="heldout", seq_len=args.seq_len,
                              tokens=args.heldout_tokens, seed=args.seed)
        if weights:
            unknown = sorted(set(weights) - set(search.domains))
            if unknown:
                raise UsageError(f"--proxy-weights names {', '.join(unknown)}, not a domain of the search data "
                                 f"({', '.join(search.domains)})")

        identity = {
            "model": loaded.path, "model_fingerprint": _model_fp(loaded.model, args.cache_dir),
            "space": space.describe(),
            "criterion": args.criterion, "min_count": args.min_count, "proxy": proxy.name,
            "proxy_weights": weights, "sampler": args.sampler, "evolution": asdict(settings),
            "seed": args.seed, "seq_len": args.seq_len, "reference_top_k": args.reference_top_k,
            "calibration": calib.fingerprints, "search": search.fingerprints, "heldout": heldout.fingerprints,
        }
        identity = _jsonable(identity)
        runs_dir = Path(args.runs_dir)
        name = args.run
        if name is None:
            found = find_unfinished(runs_dir, identity)
            name = found.name if found else default_run_name(loaded.path, f"b{space.total}")
            if found:
                log.info("resuming unfinished run %s (same settings)", name)
        options = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        if options.get("storage"):
            options["storage"] = mask_url(options["storage"])  # never store a password in the run directory
        run = RunDir.open(name, runs_dir, identity, options)
        storage_url = args.storage or f"sqlite:///{(run.path / 'study.db').resolve()}"

        key, stats = _observe(loaded, calib, args)
        scores = _scores(stats, args)
        from evoreap.criteria import score_experts

        mass = score_experts(stats, "reap_x_frequency", min_count=0)
        curves = layer_mass_curves(space, mass)
        reference = None
        if proxy.needs_reference:
            from evoreap.reference import reference_cached

            reference = reference_cached(loaded.model, search, top_k=args.reference_top_k, cache_dir=args.cache_dir,
                                         batch_size=args.batch_size, progress=not args.worker)
        storage = open_storage(storage_url)
        # One study per run and settings: runs sharing a --storage URL never see each other's trials. The model's
        # path is left out so that workers on other machines (other paths, same weights) join the same study.
        portable = {k: v for k, v in identity.items() if k != "model"}
        study_name = f"{STUDY_NAME}-{run.path.name}-{identity_hash(portable)}"
        study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize",
                                    load_if_exists=True)
        if not args.worker:
            study.set_user_attr("space", space.describe())
            run.environment({"observation_key": key, "storage": mask_url(storage_url), "study": study.study_name,
                             "allowed_overlaps": overlaps, "data": {
                "calibration": calib.file_hashes, "search": search.file_hashes, "heldout": heldout.file_hashes}})
        log.info("set-up: %s, %d MoE layers x %d experts, budget %s -> %d experts kept (uniform %s), run %s (%.1fs)",
                 adapter.name, len(space.layers), adapter.num_experts, space.budget.described, space.total,
                 space.uniform[0] if len(set(space.uniform)) == 1 else list(space.uniform), run.path, time.time() - t0)
        return cls(args, loaded, space, settings, run, storage_url, study, search, scores, curves, reference,
                   token_order(search, args.seed), weights, key, heldout, stats)

    # -- scoring ----------------------------------------------------------------------------------------------------
    def masks_for(self, counts: tuple[int, ...], scores: dict[int, torch.Tensor] | None = None):
        alloc = Allocation(self.space.layers, tuple(counts))
        return keep_masks(self.loaded.adapter, alloc, scores or self.scores)

    def scorer(self, counts: tuple[int, ...], tokens: int) -> tuple[float, dict[str, Any]]:
        from evoreap.proxies import evaluate, loss_value

        result = evaluate(self.loaded.model, self.loaded.adapter, self.masks_for(counts), self.search_data,
                          proxies=_proxies(self.args.proxy), reference=self.reference, order=self.order,
                          n_tokens=tokens, batch_size=self.args.batch_size)
        value = loss_value(result, self.args.proxy, self.weights)
        return value, {"values": result.values, "per_domain": result.per_domain, "scored_tokens": result.tokens,
                       "routed_params": self.space.routed_params(counts)}

    # -- roles ------------------------------------------------------------------------------------------------------
    def work(self) -> None:
        """A worker: score queued trials until the leader marks the study done."""
        while not self.study.user_attrs.get("done"):
            if work_queue(self.study, self.space, self.scorer) == 0:
                time.sleep(0.1)
            self.study = optuna.load_study(study_name=self.study.study_name, storage=self.study._storage)

    def lead(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        fail_dead_trials(self.study)
        self.study.set_user_attr("done", False)
        s = self.settings
        bar = tqdm(total=s.generations, desc="search", unit="gen", disable=self.args.quiet)

        def progress(info: dict[str, Any]) -> None:
            bar.update(1)
            bar.set_postfix(best=f"{info['best']:.4g}", tokens=f"{info['tokens'] / 1e6:.2f}M", trials=info["trials"])

        limits = SearchLimits(trials=self.args.trials, time_limit=self.args.time_limit,
                              token_budget=self.args.token_budget)
        t0 = time.time()
        try:
            if self.args.sampler == "evolution":
                result = Leader(self.study, self.space, self.scorer, s, self.curves, limits,
                                on_progress=progress).run()
            else:
                from evoreap.search.samplers import optuna_sampler_search

                result = optuna_sampler_search(self.study, self.space, self.scorer, self.args.sampler, s, limits,
                                               on_progress=progress)
        finally:
            bar.close()
            self.study.set_user_attr("done", True)
        result["seconds"] = round(time.time() - t0, 1)
        return self.finish(result)

    # -- the end ----------------------------------------------------------------------------------------------------
    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        from evoreap.proxies import evaluate
        from evoreap.reference import reference_cached

        space, adapter = self.space, self.loaded.adapter
        best, uniform = tuple(result["best"]), space.uniform
        heldout = self.heldout
        ref = reference_cached(self.loaded.model, heldout, top_k=self.args.reference_top_k,
                               cache_dir=self.args.cache_dir, batch_size=self.args.batch_size, progress=False)
        names = ("nll", "kl", "esap")
        rows = {"unpruned": evaluate(self.loaded.model, adapter, None, heldout, proxies=names, reference=ref,
                                     batch_size=self.args.batch_size)}
        rows[f"uniform ({self.args.criterion})"] = evaluate(self.loaded.model, adapter, self.masks_for(uniform),
                                                             heldout, proxies=names, reference=ref,
                                                             batch_size=self.args.batch_size)
        for baseline in ("reap", "frequency"):  # the usual uniform baselines, beside the chosen criterion's
            if baseline != self.args.criterion:
                other = _scores(self.stats, self.args, baseline)
                rows[f"uniform ({baseline})"] = evaluate(self.loaded.model, adapter, self.masks_for(uniform, other),
                                                         heldout, proxies=names, reference=ref,
                                                         batch_size=self.args.batch_size)
        rows["searched"] = evaluate(self.loaded.model, adapter, self.masks_for(best), heldout, proxies=names,
                                    reference=ref, batch_size=self.args.batch_size)
        table = {k: {"values": v.values, "per_domain": v.per_domain, "tokens": v.tokens} for k, v in rows.items()}

        kept = kept_experts(Allocation(space.layers, best), adapter, self.scores)  # as export and evaluate choose
        meta = {"budget": space.budget.described, "budget_params": space.budget.params,
                "criterion": self.args.criterion, "min_count": self.args.min_count, "proxy": self.args.proxy,
                "proxy_weights": self.weights, "search_value": result["best_value"],
                "uniform_search_value": result["uniform_value"], "heldout": table["searched"]["values"],
                "observation_key": self.observation_key, "model": self.loaded.path, "run": str(self.run.path),
                "calibration_data": self.args.calib_data, "search_data": self.args.data}
        alloc = Allocation(space.layers, best, meta).with_experts(kept)
        self.run.write("history.json", {k: result[k] for k in ("history", "correlations", "scored_top")})
        summary = {k: v for k, v in result.items() if k not in ("history", "scored_top")}
        summary.update(best=list(best), uniform=list(uniform), heldout=table, space=space.describe())
        self.run.write("result.json", summary)
        alloc.save(self.run.path / "best_allocation.json", adapter)  # the one allocation writer
        print_summary(space, result, table, self.args.proxy)
        if self.args.export:
            from evoreap.export import export_pruned

            export_pruned(self.loaded.path, self.args.export, kept, meta=meta, overwrite=self.args.overwrite)
            print(f"exported the pruned model to {self.args.export}")
        if not self.args.no_plots:
            try:
                from evoreap.report import write_report

                write_report(self.run.path, artifacts=True, storage=self.storage_url)
            except ImportError as e:  # plotting is an optional extra
                log.warning("no pictures or report (%s); pip install 'evoreap[plot]'", e)
        print(f"run directory: {self.run.path}  (best allocation: {self.run.path / 'best_allocation.json'})")
        return summary


def print_summary(space: SearchSpace, result: dict[str, Any], table: dict[str, Any], proxy: str) -> None:
    best, uniform = result["best"], space.uniform
    print()
    print("keep counts per MoE layer")
    print("  layer   " + " ".join(f"{layer:>4d}" for layer in space.layers))
    print("  uniform " + " ".join(f"{k:>4d}" for k in uniform))
    print("  best    " + " ".join(f"{k:>4d}" for k in best))
    print()
    print(f"search split ({proxy}, lower is better): best {result['best_value']:.5f}  uniform "
          f"{result['uniform_value']:.5f}  after {result['generations']} generations, "
          f"{len(result['history'])} trials, {result['tokens_spent']:,} tokens ({result['stopped_by']})")
    print()
    print(f"held-out split ({next(iter(table.values()))['tokens']:,} tokens)")
    print(f"  {'model':24s} {'NLL':>8s} {'PPL':>9s} {'KL':>8s} {'ESAP':>7s}")
    import math

    for name, row in table.items():
        v = row["values"]
        print(f"  {name:24s} {v['nll']:8.4f} {math.exp(v['nll']):9.2f} {v['kl']:8.4f} {v['esap']:7.4f}")


def check_destinations(args: argparse.Namespace) -> StorageSpec | None:
    """Check, creating nothing, every place a search writes to: the run directory (a resumed run's config must be
    readable), the cache, the ``--storage`` file or database (connected to once), and the ``--export`` directory
    (empty unless ``--overwrite``, not the model, the run directory, the cache or the storage file). Returns the
    checked ``--storage`` (None for the default, a SQLite file in the run directory)."""
    from evoreap.files import check_destination, check_writable_dir
    from evoreap.models import resolve_model
    from evoreap.observe.store import cache_root

    runs_dir = Path(args.runs_dir).expanduser()
    RunDir.check(args.run, runs_dir)
    cache = cache_root(args.cache_dir)
    check_writable_dir(cache, "--cache-dir" if args.cache_dir is not None else "cache directory ($EVOREAP_CACHE)")
    spec = check_storage(args.storage) if args.storage else None
    if args.export and not args.worker:
        model = Path(resolve_model(args.model))
        if not model.is_dir():
            raise UsageError(f"--export writes a pruned copy of a local model directory, and {args.model} is a hub "
                             "id; download it first and pass --model DIR")
        sources = {"model directory": model, "run directory": runs_dir / args.run if args.run else runs_dir,
                   "cache directory": cache}
        if spec is not None and spec.path is not None:
            sources["storage file"] = spec.path
        out = Path(args.export).expanduser()
        check_destination(out, sources=sources, what="--export")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--export {args.export} is a file, not a directory; pass a directory path")
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            raise UsageError(f"--export {args.export} exists and is not empty; pass --overwrite to replace it once "
                             "the search is done, or choose a new path")
        check_writable_dir(out, "--export")
    if spec is not None:
        probe_storage(spec)  # last: a wrong password or an unreachable server, before any weight is read
    return spec


def _proxies(proxy: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((proxy, "nll")))


def _evolution_settings(args: argparse.Namespace) -> EvolutionSettings:
    if len(args.fidelities) != 3 or sorted(args.fidelities) != list(args.fidelities) or min(args.fidelities) <= 0:
        raise UsageError(f"--fidelities needs three increasing token counts, got {args.fidelities}")
    if len(args.survivors) != 2 or min(args.survivors) < 1 or args.survivors[1] > args.survivors[0]:
        raise UsageError(f"--survivors needs two counts, the second not larger, got {args.survivors}")
    if args.generations < 0 or args.population < 1 or args.offspring < 1:
        raise UsageError("--generations must be >= 0, --population and --offspring >= 1")
    return EvolutionSettings(generations=args.generations, population=args.population, offspring=args.offspring,
                             fidelities=tuple(args.fidelities), survivors=tuple(args.survivors), guided=args.guided,
                             seed=args.seed)


def _observe(loaded: LoadedModel, calib: TokenData, args: argparse.Namespace):
    from evoreap.observe.store import observe_cached

    return observe_cached(loaded, calib, cache_dir=args.cache_dir, batch_size=args.batch_size,
                          progress=not args.worker)


def _scores(stats, args: argparse.Namespace, criterion: str | None = None) -> dict[int, torch.Tensor]:
    """Expert scores by ``criterion`` (default: the run's ``--criterion``) with the run's min-count and seed."""
    from evoreap.criteria import DEFAULT_MIN_COUNT, score_experts

    min_count = DEFAULT_MIN_COUNT if args.min_count is None else args.min_count
    return score_experts(stats, criterion or args.criterion, min_count=min_count, seed=args.seed)


def _model_fp(model: torch.nn.Module, cache_dir: str | None = None) -> str:
    from evoreap.reference import model_fingerprint

    return model_fingerprint(model, cache_dir)


def _guard_overlap(args: argparse.Namespace, tokenizer: Any) -> list[dict[str, Any]]:
    from evoreap.data.guard import check_overlap

    found = check_overlap({"calibration": (args.calib_data, "calibration"), "search": (args.data, "search"),
                           "heldout": (args.heldout_data, "heldout")}, tokenizer=tokenizer, allow=args.allow_overlap)
    return [asdict(o) | {"fraction": o.fraction} for o in found]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
