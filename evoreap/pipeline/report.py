"""Pictures and ``report.md`` for a search run, drawn from the JSON files the run stored (so ``evoreap plot RUN``
can redraw them at any time). Needs matplotlib (``pip install 'evoreap[plot]'``); headless (Agg backend)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from evoreap.criteria import score_experts
from evoreap.errors import EvoreapError, UsageError
from evoreap.files import write_text_atomic
from evoreap.observe.store import load_observation
from evoreap.pipeline.rundir import writable
from evoreap.search.storage import open_storage

log = logging.getLogger(__name__)


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("pictures need matplotlib: pip install 'evoreap[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read(run: Path, name: str, *keys: str) -> dict[str, Any]:
    """A JSON object the run stored, with ``keys`` present; anything else is a usage error naming the file."""
    p = run / name
    if not p.is_file():
        raise UsageError(f"{run} has no {name}; is it a finished evoreap search run?")
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{p} is not valid JSON ({e}); re-run the search that wrote it (it resumes) to rewrite it") \
            from None
    except OSError as e:
        raise UsageError(f"cannot read {p}: {e.strerror or e}") from None
    missing = [k for k in keys if k not in data] if isinstance(data, dict) else list(keys)
    if not isinstance(data, dict) or missing:
        what = f"lacks {', '.join(missing)}" if isinstance(data, dict) else "is not a JSON object"
        raise UsageError(f"{p} {what}; is it a run of this evoreap version? re-run the search that wrote it")
    return data


def plot_allocation(run: Path, result: dict[str, Any]) -> Path:
    plt = _plt()
    layers = result["space"]["layers"]
    best, uniform = result["best"], result["uniform"]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers) + 2), 3.6))
    x = range(len(layers))
    ax.bar([i - 0.2 for i in x], uniform, width=0.4, label="uniform", color="#9aa5b1")
    ax.bar([i + 0.2 for i in x], best, width=0.4, label="searched", color="#1f77b4")
    ax.set_xticks(list(x), [str(i) for i in layers])
    ax.set_xlabel("MoE layer (decoder layer index)")
    ax.set_ylabel("experts kept")
    ax.set_title(f"Experts kept per layer ({result['space']['budget']})")
    ax.legend()
    fig.tight_layout()
    out = run / "allocation.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_history(run: Path, history: dict[str, Any], proxy: str) -> Path:
    plt = _plt()
    rows = history["history"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    by_tokens: dict[int, list[tuple[int, float]]] = {}
    for i, h in enumerate(rows):
        by_tokens.setdefault(h["tokens"], []).append((i, h["value"]))
    for tokens, pts in sorted(by_tokens.items()):
        best, xs, ys = math.inf, [], []
        for i, v in pts:
            best = min(best, v)
            xs.append(i + 1)
            ys.append(best)
        (line,) = axes[0].step(xs, ys, where="post", label=f"{tokens:,} tokens")
        axes[0].scatter([i + 1 for i, _ in pts], [v for _, v in pts], s=8, alpha=0.35, color=line.get_color())
    axes[0].set_xlabel("trial")
    axes[0].set_ylabel(f"{proxy} (lower is better)")
    axes[0].set_title("Best so far per fidelity")
    axes[0].legend(fontsize=8)
    top = max(by_tokens)
    best, xs, ys = math.inf, [], []
    for h in rows:
        if h["tokens"] == top:
            best = min(best, h["value"])
            xs.append(h["tokens_spent"] / 1e6)
            ys.append(best)
    axes[1].step(xs, ys, where="post", color="#1f77b4")
    axes[1].set_xlabel("tokens scored so far (millions)")
    axes[1].set_ylabel(f"best {proxy} at {top:,} tokens")
    axes[1].set_title("Best full-fidelity score against search cost")
    fig.tight_layout()
    out = run / "history.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_saliency(run: Path, scores: dict[int, torch.Tensor], counts: dict[int, int] | None, criterion: str,
                  name: str = "saliency.png") -> Path:
    """Layers x experts, each row sorted by score (highest left), log colour scale, kept/cut boundary drawn."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    layers = sorted(scores)
    mat = torch.stack([scores[i].double().sort(descending=True).values for i in layers]).numpy()
    positive = mat[mat > 0]
    floor = positive.min() if positive.size else 1e-12
    mat = mat.clip(min=floor)
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * mat.shape[1] + 2), 0.4 * len(layers) + 1.8))
    im = ax.imshow(mat, aspect="auto", norm=LogNorm(vmin=floor, vmax=mat.max()), cmap="viridis")
    if counts:
        for row, layer in enumerate(layers):
            k = counts.get(layer)
            if k is not None:
                ax.plot([k - 0.5, k - 0.5], [row - 0.5, row + 0.5], color="red", lw=2)
        ax.plot([], [], color="red", lw=2, label="kept | cut")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("experts, sorted by score within each layer")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"Expert saliency ({criterion}, log scale)")
    fig.colorbar(im, ax=ax, label=criterion)
    fig.tight_layout()
    out = run / name
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_domain_usage(run: Path, stats: Any) -> Path:
    """Per domain, the share of each expert's routed tokens (layers x experts in index order)."""
    plt = _plt()
    layers = sorted(stats.count)
    domains = stats.domains
    fig, axes = plt.subplots(1, len(domains), figsize=(3.6 * len(domains), 0.35 * len(layers) + 1.8),
                             squeeze=False)
    for d, dom in enumerate(domains):
        mat = torch.stack([stats.domain_count[i][d] / stats.domain_count[i][d].sum().clamp(min=1)
                           for i in layers]).numpy()
        ax = axes[0][d]
        im = ax.imshow(mat, aspect="auto", cmap="magma")
        ax.set_title(f"{dom}")
        ax.set_xlabel("expert index")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers])
        if d == 0:
            ax.set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of the domain's routed tokens")
    fig.suptitle("Which experts each domain uses")
    out = run / "domain_usage.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def _store_artifacts(run: Path, env: dict[str, Any], pictures: list[Path], storage: str | None = None) -> None:
    """Attach the pictures to the run's Optuna study as artifacts (files in ``RUN/artifacts``), so that
    optuna-dashboard shows them beside the trials."""
    try:
        import optuna
        from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact


        study = optuna.load_study(study_name=env["study"], storage=open_storage(storage or env["storage"]))
        (run / "artifacts").mkdir(exist_ok=True)
        store = FileSystemArtifactStore(base_path=str(run / "artifacts"))
        stored = get_all_artifact_meta(study)

        def already(p: Path) -> bool:  # a finished run run again draws the same pictures: keep one copy each
            data = p.read_bytes()
            for m in stored:
                if m.filename == p.name:
                    with store.open_reader(m.artifact_id) as f:
                        if f.read() == data:
                            return True
            return False

        for p in pictures:
            if not already(p):
                upload_artifact(artifact_store=store, file_path=str(p), study_or_trial=study, mimetype="image/png")
    except Exception as e:  # pictures and report stand on their own; the dashboard copy is a convenience
        log.warning("pictures not stored as Optuna artifacts: %s", e)


def write_report(run: str | Path, artifacts: bool = False, storage: str | None = None) -> Path:
    """Draw every picture of a finished run and write its ``report.md``; with ``artifacts`` also attach the
    pictures to the run's Optuna study (done once, at the end of a search) in ``storage`` (default: the one
    ``environment.json`` names, whose password, if any, is masked there)."""
    run = Path(run)
    result = _read(run, "result.json", "space", "best", "uniform", "heldout", "generations", "tokens_spent",
                   "stopped_by", "best_value", "uniform_value")
    history = _read(run, "history.json", "history")
    best = _read(run, "best_allocation.json", "layers")
    config = _read(run, "config.json", "config")
    env = _read(run, "environment.json")
    if not writable(run):
        raise UsageError(f"cannot write the pictures and report.md into {run}: it is not writable; make it writable "
                         "(or copy the run directory somewhere writable and plot that)")
    try:
        return _write_report(run, result, history, best, config, env, artifacts, storage)
    except EvoreapError:  # already says what is wrong (a damaged observation, an unknown criterion)
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # a hand-edited or foreign file
        raise UsageError(f"{run} holds results this evoreap version cannot draw ({type(e).__name__}: {e}); re-run "
                         "the search that wrote them") from None


def _write_report(run: Path, result: dict[str, Any], history: dict[str, Any], best: dict[str, Any],
                  config: dict[str, Any], env: dict[str, Any], artifacts: bool, storage: str | None) -> Path:
    meta = best.get("meta", {})
    proxy = meta.get("proxy", "proxy")
    pictures = [plot_allocation(run, result), plot_history(run, history, proxy)]
    try:

        obs = load_observation(meta["observation_key"], cache_dir=config["config"].get("cache_dir"))
        scores = score_experts(obs.stats, meta.get("criterion", "reap"),
                               min_count=meta.get("min_count") or 0)
        kept = {int(k): v for k, v in best["layers"].items()}
        pictures.append(plot_saliency(run, scores, kept, meta.get("criterion", "reap")))
        pictures.append(plot_domain_usage(run, obs.stats))
    except (UsageError, KeyError) as e:
        log.warning("no saliency pictures: the observation is not available (%s)", e)
    lines = [f"# evoreap search report: {run.name}", "",
             f"- command: `evoreap {' '.join(env.get('command', [])[1:])}`",
             f"- model: `{meta.get('model')}`", f"- budget: {meta.get('budget')} ({meta.get('budget_params'):,} "
             "routed-expert params)", f"- criterion: {meta.get('criterion')}, proxy: {proxy}"
             + (f", weights {meta['proxy_weights']}" if meta.get("proxy_weights") else ""),
             f"- observation: `{meta.get('observation_key')}` (calibration data "
             f"{', '.join(env.get('data', {}).get('calibration', {}))})",
             f"- versions: evoreap {env.get('evoreap')}, torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}, optuna {env.get('optuna')}",
             f"- storage: `{env.get('storage')}` (open with `optuna-dashboard {env.get('storage')}`)",
             f"- search: {result['generations']} generations, {len(history['history'])} trials, "
             f"{result['tokens_spent']:,} tokens, {result.get('seconds', '?')} s, stopped by {result['stopped_by']}",
             "", "## Allocation", "", "| layer | " + " | ".join(str(i) for i in result["space"]["layers"]) + " |",
             "|---" * (len(result["space"]["layers"]) + 1) + "|",
             "| uniform | " + " | ".join(str(k) for k in result["uniform"]) + " |",
             "| searched | " + " | ".join(str(k) for k in result["best"]) + " |", "",
             f"Search split ({proxy}, lower is better): searched {result['best_value']:.5f}, uniform "
             f"{result['uniform_value']:.5f}.", "", "## Held-out", "",
             "| model | NLL | PPL | KL | ESAP |", "|---|---|---|---|---|"]
    for name, row in result["heldout"].items():
        v = row["values"]
        lines.append(f"| {name} | {v['nll']:.4f} | {math.exp(v['nll']):.2f} | {v['kl']:.4f} | {v['esap']:.4f} |")
    domains = list(next(iter(result["heldout"].values()))["per_domain"])
    lines += ["", "Per domain (KL to the unpruned model):", "", "| model | " + " | ".join(domains) + " |",
              "|---" * (len(domains) + 1) + "|"]
    for name, row in result["heldout"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row['per_domain'][d]['kl']:.4f}" for d in domains) + " |")
    if history.get("correlations"):
        rhos = [c["spearman"] for c in history["correlations"] if c["spearman"] == c["spearman"]]
        if rhos:
            lines += ["", f"Rank correlation between stage-1 and stage-2 scores: mean {sum(rhos) / len(rhos):.2f} "
                          f"over {len(rhos)} generations."]
    if artifacts:
        _store_artifacts(run, env, pictures, storage)
    lines += ["", "## Pictures", ""] + [f"![{p.stem}]({p.name})" for p in pictures]
    out = run / "report.md"

    write_text_atomic(out, "\n".join(lines) + "\n")
    return out
