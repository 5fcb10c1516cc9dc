"""Router repair: with the cut experts removed (masked), fit a few parameters so that the pruned model's outputs match
the unpruned model's again.

What is fitted (``params``, :data:`PARAM_SETS`): the kept rows of every pruned layer's router (with its bias where
the architecture has one; ``e_score_correction_bias`` only steers the top-k choice, so it gets no gradient and
stays as it is), optionally the norm before each MoE block, optionally one output scale per kept expert, optionally
a rank-``r`` update ``B @ A`` of every kept expert's down projection (``B`` starts at zero, so the fit starts at the
unrepaired model; merged into the expert weights on export, so the checkpoint stays a plain one).

Against what (``objective``, :data:`OBJECTIVES`):

* ``kl``: end to end, the KL divergence from the unpruned model's cached top-K distributions
  (:mod:`evoreap.reference`) on the fitting text, through the whole masked model;
* ``local``: layer by layer, each pruned MoE block's output against the unpruned block's output on the unpruned
  model's own hidden states (inputs captured once, so layers are independent of each other).

Fitting text is the calibration split; early stopping reads the search split (never held-out): end-to-end KL for
``kl``, the layer-local error for ``local``. At the end the best parameters are kept only if they lower the
search-split KL below the unrepaired pruned model's; otherwise the repair is an identity (``accepted: false``), so
a repair never makes the search-split result worse.

Deterministic for a seed (batch order is a function of the seed and the step), and resumable: the parameters, the
best ones and Adam's moments are checkpointed in safetensors with a JSON state at every evaluation, and a re-run
with the same inputs continues from the last one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from evoreap.adapters import MoEAdapter
from evoreap.data import TokenData
from evoreap.errors import EvoreapError, SettingError, UsageError
from evoreap.files import sha256_file, shareable, write_json_atomic
from evoreap.fingerprint import weights_fingerprint
from evoreap.masking import masked
from evoreap.proxies import evaluate
from evoreap.proxies.registry import ProxyInputs, get_proxy
from evoreap.recovery.store import (LOWRANK_A, LOWRANK_B, SCALE, Repair, allocation_fingerprint, fold_down,
                                    folded_leaf, folded_parts, lowrank_delta, refuse_quantized_lowrank, swapped)
from evoreap.reference import Reference, model_device, scored_positions

log = logging.getLogger(__name__)

PARAM_SETS: dict[str, tuple[str, ...]] = {
    "router": ("router",),
    "router+norm": ("router", "norm"),
    "router+scale": ("router", "scale"),
    "router+norm+scale": ("router", "norm", "scale"),
    "router+norm+scale+lowrank": ("router", "norm", "scale", "lowrank"),
}
OBJECTIVES: dict[str, str] = {
    "kl": "end-to-end KL to the unpruned model's cached top-K distributions",
    "local": "layer-local matching of each MoE block's output on the unpruned model's hidden states",
}
SCHEDULES = ("cosine", "constant")
RETRIES = 2  # a fit that never improves (steps too large for a small error: uniform 0.75 on the demo) retries at lr/3
FIT_TOKENS = 65536  # default fitting text: on the demo 16384 tokens left the fit data-bound (search KL still falling)
_STATE = "state.json"
_ATTEMPTS = "attempts.json"  # in a retry's checkpoint: the rejected attempts before it


QUANTIZED_PARAMS = "router+norm+scale"  # the default for a quantized checkpoint (no low-rank update to merge)


def settings_for_source(settings: RepairSettings, src: Any, explicit: bool) -> RepairSettings:
    """``settings`` for the model in directory ``src`` (anything else passes): a quantized checkpoint keeps its
    format on export, so a low-rank update cannot be merged into its experts; the default parameter set falls back
    to :data:`QUANTIZED_PARAMS` for it, an ``explicit`` low-rank set is refused (UsageError)."""
    if "lowrank" not in PARAM_SETS[settings.params] or not isinstance(src, (str, Path)) or not Path(src).is_dir():
        return settings
    try:
        refuse_quantized_lowrank(src)
    except UsageError:
        if explicit:
            raise
        log.info("%s is quantized: repairing %s (no low-rank update of its experts)", src, QUANTIZED_PARAMS)
        return replace(settings, params=QUANTIZED_PARAMS)
    return settings


def lr_at(settings: RepairSettings, step: int, total: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``: a pure function of the step, so that a
    resumed repair continues on the same schedule without any scheduler state to checkpoint."""
    if settings.schedule == "constant":
        return settings.lr
    warmup = max(1, total // 20)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    return settings.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass(frozen=True)
class RepairSettings:
    """How a repair is fitted.

    Attributes:
        params: a key of :data:`PARAM_SETS`.
        objective: a key of :data:`OBJECTIVES`.
        lr: Adam learning rate (the norm and the scales learn at this rate too; they start at their own values / 1).
        epochs: passes over the fitting text at most.
        batch_size: sequences per step (``kl``); ``local`` takes ``batch_size * seq_len`` tokens per step.
        evals_per_epoch: early-stopping evaluations on the search split per epoch.
        patience: evaluations without improvement before stopping.
        seed: batch order.
        schedule: ``cosine`` (linear warm-up over the first 5% of the steps, then cosine decay to 0 at the last
            step, so that the late steps settle instead of hopping around the optimum) or ``constant``.
        rank: rank of the down projection update of the ``lowrank`` parameter sets.
        guard: never hurt a domain of the search split: an evaluation where some domain's KL is worse than the
            unrepaired one by more than ``guard_tolerance`` (relative) cannot become the best, and a final repair
            that still hurts a domain is rejected. Without it, such domains are only reported.
        guard_tolerance: relative worsening of one domain's search-split KL that counts as hurting it.
    """

    # Defaults measured on the demo (searched 0.5 allocation, benchmarks/recovery.py): router+norm+scale+lowrank
    # with the kl objective fits best (search KL 0.112 -> 0.051 at rank 8, 1.05x the time per step of
    # router+norm+scale, which reaches 0.076; rank 32: 0.044 at 1.12x, kept at 8 until it is checked at the other
    # budgets); lr 3e-2 overshoots at the start (search KL 0.112 -> 0.162) and ends worse than 1e-2;
    # 3 epochs of 16k tokens stopped while the search KL was still falling.
    params: str = "router+norm+scale+lowrank"
    objective: str = "kl"
    lr: float = 1e-2
    epochs: int = 8
    batch_size: int = 8
    evals_per_epoch: int = 2
    patience: int = 4
    seed: int = 0
    schedule: str = "cosine"
    rank: int = 8
    guard: bool = False
    guard_tolerance: float = 0.02

    def check(self) -> RepairSettings:
        if self.params not in PARAM_SETS:
            raise SettingError("params", f"{{name}} {self.params!r} is not one of {', '.join(PARAM_SETS)}")
        if self.schedule not in SCHEDULES:
            raise SettingError("schedule", f"{{name}} {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.objective not in OBJECTIVES:
            raise SettingError("objective", f"{{name}} {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        for name in ("epochs", "batch_size", "evals_per_epoch", "patience", "rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SettingError(name, f"{{name}} must be a whole number >= 1, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise SettingError("lr", f"{{name}} must be a positive number, got {self.lr!r}")
        t = self.guard_tolerance
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise SettingError("guard_tolerance", f"{{name}} must be a number >= 0, got {t!r}")
        return self


@dataclass(frozen=True)
class RepairResult:
    """A finished repair: the record, where it was written, and the search-split KL before and after."""

    repair: Repair
    path: Path | None
    accepted: bool
    search_kl_before: float
    search_kl_after: float
    seconds: float

    @property
    def hurt_domains(self) -> dict[str, tuple[float, float]]:
        """Domains whose search-split KL the repair made worse (beyond the guard tolerance): name -> (before,
        after)."""
        return {d: (v["before"], v["after"]) for d, v in self.repair.meta["search"].get("per_domain", {}).items()
                if d in self.repair.meta["search"].get("hurt_domains", [])}


@dataclass(frozen=True)
class _Target:
    name: str  # model tensor name (or "<experts>.output_scale", "<experts>.down_proj_lowrank_a" / "_b")
    kind: str  # router | norm | scale | lowrank
    layer: int


def _targets(model: torch.nn.Module, adapter: MoEAdapter, kept: dict[int, list[int]], settings: RepairSettings,
             device: torch.device | None = None) -> tuple[list[_Target], dict[str, torch.Tensor]]:
    """What is fitted for the pruned layers of ``kept``, and the starting values (float32 leaves) on ``device``
    (default: the model's; the streamed repair names the device of the one layer it has materialised)."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    kinds = PARAM_SETS[settings.params]
    e = adapter.num_experts
    targets: list[_Target] = []
    start: dict[str, torch.Tensor] = {}
    for layer in adapter.layers(model):
        if len(kept.get(layer.index, range(e))) >= e:
            continue  # nothing cut, nothing to repair
        router = names[id(layer.router)]
        for attr in ("weight", "bias"):  # e_score_correction_bias only steers the choice: no gradient reaches it
            t = layer.router._parameters.get(attr)
            if t is not None:
                targets.append(_Target(f"{router}.{attr}", "router", layer.index))
        if "norm" in kinds:
            norm = adapter.moe_norm(model, layer.index)
            if norm._parameters.get("weight") is not None:
                targets.append(_Target(f"{names[id(norm)]}.weight", "norm", layer.index))
        if "scale" in kinds:
            targets.append(_Target(f"{names[id(layer.experts)]}.{SCALE}", "scale", layer.index))
        if "lowrank" in kinds:
            for leaf in (LOWRANK_B, LOWRANK_A):
                targets.append(_Target(f"{names[id(layer.experts)]}.{leaf}", "lowrank", layer.index))
    named = dict(model.named_parameters())
    device = model_device(model) if device is None else device
    for t in targets:
        if t.kind == "scale":
            start[t.name] = torch.ones(e, dtype=torch.float32, device=device)
        elif t.kind == "lowrank":
            experts, _, leaf = t.name.rpartition(".")
            n, d0, d1 = named[f"{experts}.down_proj"].shape
            if leaf == LOWRANK_B:  # zero: B @ A starts at 0, the fit starts at the unrepaired model
                start[t.name] = torch.zeros(n, d0, settings.rank, dtype=torch.float32, device=device)
            else:  # seeded per layer, scaled like a Linear's init so that B's steps move B @ A at a sane rate
                g = torch.Generator().manual_seed(settings.seed * 1_000_003 + 7919 * t.layer + 1)
                start[t.name] = (torch.randn(n, settings.rank, d1, generator=g) / math.sqrt(d1)).to(device)
        else:
            start[t.name] = named[t.name].detach().float().clone()
    return targets, start


def _masks(adapter: MoEAdapter, kept: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    e = adapter.num_experts
    out = {}
    for layer, idx in kept.items():
        if len(idx) < e:
            m = torch.zeros(e, dtype=torch.bool)
            m[list(idx)] = True
            out[layer] = m
    return out


@contextmanager
def _with_values(model: torch.nn.Module, adapter: MoEAdapter, masks: dict[int, torch.Tensor],
                 targets: list[_Target], values: dict[str, torch.Tensor]):
    """The masked model computing with ``values``: router/norm tensors swapped in, output scales as a router hook
    (registered after the mask's hook, so it scales the masked routing's weights), low-rank updates as
    ``down_proj + B @ A`` swapped in (the experts' own forward reads ``down_proj``; a hook cannot reach the
    intermediate activations a separate low-rank path would need)."""
    named = dict(model.named_parameters())
    swaps = {t.name: values[t.name].to(named[t.name].dtype) for t in targets if t.kind in ("router", "norm")}
    for experts, parts in folded_parts({t.name: values[t.name] for t in targets if t.kind == "lowrank"}).items():
        w = named[f"{experts}.down_proj"]
        swaps[f"{experts}.down_proj"] = (w.float() + torch.bmm(parts[LOWRANK_B], parts[LOWRANK_A])).to(w.dtype)
    layers = {layer.index: layer for layer in adapter.layers(model)}
    with ExitStack() as stack:
        stack.enter_context(swapped(model, swaps))
        stack.enter_context(masked(model, adapter, masks))
        for t in targets:
            if t.kind == "scale":
                handle = layers[t.layer].router.register_forward_hook(_scale_hook(values[t.name]))
                stack.callback(handle.remove)
        yield


def _scale_hook(scale: torch.Tensor):
    def hook(module, args, output):
        logits, weights, idx = output
        return logits, weights * scale[idx].to(weights.dtype), idx

    return hook


def _kl_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, ref: dict[str, torch.Tensor]
             ) -> torch.Tensor:
    """Mean KL(unpruned || model) over the valid positions of one batch (the ``kl`` proxy, with gradients)."""
    device = model_device(model)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    valid = scored_positions(mask).to(device)
    inputs = ProxyInputs(out.logits[:, :-1], ids[:, 1:].to(device, torch.long), valid, ref)
    values = get_proxy("kl").fn(inputs)
    return torch.where(valid, values, torch.zeros_like(values)).sum() / valid.sum().clamp_min(1)


# -- layer-local ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def capture_blocks(model: torch.nn.Module, adapter: MoEAdapter, layers: list[int], data: TokenData,
                   batch_size: int, progress: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer: the unpruned model's input to the norm before the block and the block's output, ``[N, H]``
    float32 over the real tokens of ``data``."""
    wanted = {layer.index: layer for layer in adapter.layers(model) if layer.index in layers}
    xs: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    ys: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    keep: list[torch.Tensor] = []
    handles = []

    def pre(i):
        return lambda module, args: xs[i].append(args[0].detach().float().reshape(-1, args[0].shape[-1])[keep[0]])

    def post(i):
        def hook(module, args, output):
            y = output[0] if isinstance(output, tuple) else output
            ys[i].append(y.detach().float().reshape(-1, y.shape[-1])[keep[0]])

        return hook

    try:
        for i, layer in wanted.items():
            handles.append(adapter.moe_norm(model, i).register_forward_pre_hook(pre(i)))
            handles.append(layer.block.register_forward_hook(post(i)))
        device = model_device(model)
        for ids, mask, _ in tqdm(data.batches(batch_size), total=data.num_batches(batch_size), desc="capture",
                                 unit="batch", disable=not progress):
            keep[:] = [mask.reshape(-1).bool().to(device)]
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: (torch.cat(xs[i]), torch.cat(ys[i])) for i in wanted}


def _local_loss(model: torch.nn.Module, adapter: MoEAdapter, pairs: dict[int, tuple[torch.Tensor, torch.Tensor]],
                index: torch.Tensor | None) -> torch.Tensor:
    """Sum over layers of the relative squared error of the (masked, repaired) block output on tokens ``index``."""
    total = torch.zeros((), device=model_device(model))
    layers = {layer.index: layer for layer in adapter.layers(model)}
    for i, (x, y) in pairs.items():
        if index is not None:
            x, y = x[index], y[index]
        device = model_device(model)
        x, y = x.to(device), y.to(device)
        h = adapter.moe_norm(model, i)(x[None].to(layers[i].router.weight.dtype))
        out = layers[i].block(h)
        out = (out[0] if isinstance(out, tuple) else out).reshape(y.shape).float()
        total = total + ((out - y) ** 2).sum() / (y ** 2).sum().clamp_min(1e-12)
    return total


# -- checkpoints ------------------------------------------------------------------------------------------------------
def _identity(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _save_state(directory: Path, identity: str, step: int, values: dict[str, torch.Tensor],
                best: dict[str, torch.Tensor], opt: torch.optim.Optimizer, names: list[str], info: dict[str, Any]):
    """One checkpoint: a step-named safetensors file, then the JSON state that names it and its sha256 (so a kill
    between the two writes leaves the previous, consistent pair), then the older tensor files go."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"value/{n}": values[n].detach() for n in names} | {f"best/{n}": best[n] for n in names}
    state = opt.state_dict()["state"]
    for i, n in enumerate(names):
        for k, v in state.get(i, {}).items():
            tensors[f"adam/{k}/{n}"] = v.detach().reshape(-1) if k == "step" else v.detach()
    path = directory / f"state-{step:08d}.safetensors"
    tmp = directory / f".{path.name}.tmp"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    shareable(tmp)
    tmp.replace(path)
    write_json_atomic(directory / _STATE, {"identity": identity, "step": step, "file": path.name,
                                            "sha256": sha256_file(path), **info})
    for old in directory.glob("state-*.safetensors"):
        if old.name != path.name:
            old.unlink(missing_ok=True)


def _load_state(directory: Path, identity: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    try:
        info = json.loads((directory / _STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(info, dict) or info.get("identity") != identity:
        log.warning("ignoring the repair checkpoint in %s: it was made for other inputs or settings", directory)
        return None
    path = directory / str(info.get("file", ""))
    try:
        if sha256_file(path) != info.get("sha256"):
            raise EvoreapError("sha256 mismatch")
        return info, load_file(str(path))
    except Exception as e:  # a damaged checkpoint is not worth failing for: start over
        log.warning("ignoring the damaged repair checkpoint in %s (%s); starting over", directory, e)
        return None


def _load_attempts(directory: Path | None, identity: str) -> list[dict[str, Any]] | None:
    """The rejected attempts recorded in a retry's checkpoint made for ``identity``; None when there is none."""
    if directory is None:
        return None
    try:
        info = json.loads((directory / _ATTEMPTS).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(info, dict) or info.get("identity") != identity or not isinstance(info.get("attempts"), list):
        return None
    return info["attempts"]


# -- fitting ----------------------------------------------------------------------------------------------------------
def fit_repair(model: torch.nn.Module, adapter: MoEAdapter, kept: dict[int, list[int]], fit: TokenData,
               stop: TokenData, *, stop_reference: Reference, fit_reference: Reference | None = None,
               settings: RepairSettings = RepairSettings(), storage_dtype: str = "float32",
               checkpoint: str | Path | None = None, progress: bool = True,
               on_step: Callable[[int], None] | None = None) -> Repair:
    """Fit the repair of ``kept`` (layer -> kept original experts) on ``fit`` and stop early on ``stop``.

    ``stop_reference`` is the unpruned model's reference on ``stop`` (the search split); ``fit_reference`` the one
    on ``fit``, needed by the ``kl`` objective. ``storage_dtype`` is the dtype the checkpoint stores weights in (the
    fitted values are rounded to it, so that an export reproduces them). ``checkpoint``: a directory for resumable
    state (removed when the repair is done). ``on_step(step)`` is called after every optimiser step.
    """
    settings.check()
    if settings.objective == "kl" and fit_reference is None:
        raise UsageError("the kl objective needs the unpruned model's reference on the fitting text (fit_reference)")
    t0 = time.time()
    model.eval()
    masks = _masks(adapter, kept)
    if not masks:
        raise UsageError("the allocation keeps every expert; there is nothing to repair")
    targets, values = _targets(model, adapter, kept, settings)
    names = [t.name for t in targets]
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(storage_dtype,
                                                                                              torch.float32)
    model_fp = weights_fingerprint(model)
    identity = _identity(model=model_fp, kept=allocation_fingerprint(kept), settings=asdict(settings),
                         fit=fit_reference.key if fit_reference is not None else fit.fingerprints,
                         stop=stop_reference.key, storage=storage_dtype, rows=[len(fit), len(stop)])
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        ckpts = [None if checkpoint is None else Path(checkpoint) if r == 0 else
                 Path(checkpoint).with_name(f"{Path(checkpoint).name}.retry{r}") for r in range(RETRIES + 1)]

        def identity_of(attempt: RepairSettings) -> str:
            return _identity(model=model_fp, kept=allocation_fingerprint(kept), settings=asdict(attempt),
                             fit=fit_reference.key if fit_reference is not None else fit.fingerprints,
                             stop=stop_reference.key, storage=storage_dtype, rows=[len(fit), len(stop)])

        # A retry's checkpoint starts with the record of the rejected attempts before it (fits are deterministic,
        # so those need not run again): resume at the latest retry made for these very inputs.
        first, attempts = 0, []
        for r in range(RETRIES, 0, -1):
            earlier = _load_attempts(ckpts[r], identity_of(replace(settings, lr=settings.lr / 3 ** r)))
            if earlier is not None:
                first, attempts = r, earlier
                break
        with _deterministic():
            for r in range(first, RETRIES + 1):
                attempt = replace(settings, lr=settings.lr / 3 ** r)
                if r > 0:
                    targets, values = _targets(model, adapter, kept, attempt)
                    identity = identity_of(attempt)
                rep = _fit(model, adapter, kept, masks, targets, values, names, fit, stop, stop_reference,
                           fit_reference, attempt, dtype, storage_dtype, model_fp, identity, ckpts[r], progress,
                           on_step, t0)
                attempts.append({"lr": attempt.lr, "accepted": rep.accepted, "steps": rep.meta["steps"],
                                 "search_kl_after": rep.meta["search"]["kl_after"]})
                search = rep.meta["search"]
                if rep.accepted or r == RETRIES or search["stop_best"] < search["stop_before"]:
                    break  # retry only a fit that never improved on its start: its steps were too large
                log.info("repair at lr %g never improved on the search split; retrying at lr %g", attempt.lr,
                         attempt.lr / 3)
                if ckpts[r + 1] is not None:
                    nxt = replace(settings, lr=settings.lr / 3 ** (r + 1))
                    ckpts[r + 1].mkdir(parents=True, exist_ok=True)
                    write_json_atomic(ckpts[r + 1] / _ATTEMPTS, {"identity": identity_of(nxt), "attempts": attempts})
            return Repair(rep.tensors, {**rep.meta, "attempts": attempts})
    finally:
        for p in frozen:
            p.requires_grad_(True)


def verdict_meta(settings: RepairSettings, *, model_fp: str, kept: dict[int, list[int]], storage_dtype: str,
                 accepted: bool, kl: tuple[float, float], domains: tuple[dict[str, float], dict[str, float]],
                 hurt: list[str], stop_tokens: int, stop_metric: str, stop: tuple[float, float]) -> dict[str, Any]:
    """The repair file's record of a finished fit (what it was fitted to, with what, and the verdict on the search
    split), shared by the resident and the streamed fit; logs a hurt domain and a rejection."""
    (kl_before, kl_after), (before, after) = kl, domains
    if hurt:
        log.warning("the repair makes the search-split KL of %s worse (%s)%s", ", ".join(hurt),
                    ", ".join(f"{d} {before[d]:.4f} -> {after[d]:.4f}" for d in hurt),
                    "; --guard rejects it" if settings.guard else "; --guard would refuse it")
    if not accepted:
        log.info("repair rejected: search-split KL %.4f -> %.4f; keeping the unrepaired parameters", kl_before,
                 kl_after)
    return {"format_note": "evoreap router repair", "model_fingerprint": model_fp,
            "allocation_fingerprint": allocation_fingerprint(kept),
            "kept": {str(k): [int(i) for i in v] for k, v in sorted(kept.items())},
            "params": settings.params, "objective": settings.objective, "settings": asdict(settings),
            "storage_dtype": storage_dtype, "accepted": accepted,
            "search": {"kl_before": kl_before, "kl_after": kl_after, "tokens": stop_tokens,
                       "per_domain": {d: {"before": before[d], "after": after.get(d)} for d in before},
                       "hurt_domains": hurt, "guard": settings.guard, "stop_metric": stop_metric,
                       "stop_before": stop[0], "stop_best": stop[1]}}


@contextmanager
def _deterministic():
    """With more than one thread, the gradients the experts' dispatch accumulates (index_add) are summed in a racing
    order; a seeded repair must give the same parameters on every run and after a resume, so ask torch for its
    deterministic kernels while fitting (warn_only: an op without one warns instead of failing)."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


def _fit(model, adapter, kept, masks, targets, values, names, fit, stop, stop_reference, fit_reference, settings,
         dtype, storage_dtype, model_fp, identity, ckpt, progress, on_step, t0) -> Repair:
    local = settings.objective == "local"
    pruned_layers = sorted(masks)
    if local:
        seq = fit.seq_len
        fit_pairs = capture_blocks(model, adapter, pruned_layers, fit, settings.batch_size, progress)
        stop_pairs = capture_blocks(model, adapter, pruned_layers, stop, settings.batch_size, progress)
        n_fit = next(iter(fit_pairs.values()))[0].shape[0]
        per_step = settings.batch_size * seq
        steps_per_epoch = max(1, n_fit // per_step)
    else:
        steps_per_epoch = fit.num_batches(settings.batch_size)
    total = steps_per_epoch * settings.epochs
    eval_every = max(1, steps_per_epoch // settings.evals_per_epoch)

    params = [values[n].requires_grad_(True) for n in names]
    opt = torch.optim.Adam(params, lr=settings.lr)

    def stop_value(current: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One history entry's values: the stop metric, and for ``kl`` each domain's KL (for the guard)."""
        with torch.no_grad():
            if local:
                with _with_values(model, adapter, masks, targets, current):
                    return {"value": float(_local_loss(model, adapter, stop_pairs, None))}
            kl, domains = search_kl_per_domain(model, adapter, masks, targets, current, stop, stop_reference,
                                               settings.batch_size)
            return {"value": kl, "domains": domains}

    def eligible(entry: dict[str, Any]) -> bool:
        """With the guard, an evaluation that hurts a domain (against the start) may not become the best."""
        start = history[0].get("domains")
        if not settings.guard or not start or "domains" not in entry:
            return True
        return not _hurt(start, entry["domains"], settings.guard_tolerance)

    step, best, history, bad = 0, {n: values[n].detach().clone() for n in names}, [], 0
    resumed = _load_state(ckpt, identity) if ckpt is not None else None
    if resumed is not None:
        info, tensors = resumed
        step, bad, history = int(info["step"]), int(info["bad"]), list(info["history"])
        with torch.no_grad():
            for n in names:
                values[n].copy_(tensors[f"value/{n}"])
                best[n] = tensors[f"best/{n}"].clone()
        state = {i: {k: (tensors[f"adam/{k}/{n}"].reshape(()) if k == "step" else tensors[f"adam/{k}/{n}"])
                     for k in ("step", "exp_avg", "exp_avg_sq") if f"adam/{k}/{n}" in tensors}
                 for i, n in enumerate(names)}
        opt.load_state_dict({"state": {i: s for i, s in state.items() if s},
                             "param_groups": opt.state_dict()["param_groups"]})
        log.info("resuming the repair at step %d of %d (%s)", step, total, ckpt)
    else:
        history.append({"step": 0, **stop_value(values)})
    best_value = min(h["value"] for h in history if eligible(h))
    base_value = history[0]["value"]

    bar = tqdm(total=total, initial=step, desc=f"repair ({settings.params}, {settings.objective})", unit="step",
               disable=not progress)
    stopped = bad >= settings.patience
    while step < total and not stopped:
        epoch, pos = divmod(step, steps_per_epoch)
        g = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
        if local:
            order = torch.randperm(n_fit, generator=g)
            index = order[pos * per_step:(pos + 1) * per_step]
            with _with_values(model, adapter, masks, targets, values):
                loss = _local_loss(model, adapter, fit_pairs, index)
        else:
            order = torch.randperm(len(fit), generator=g)
            rows = order[pos * settings.batch_size:(pos + 1) * settings.batch_size]
            ref = fit_reference.rows(rows, model_device(model))
            with _with_values(model, adapter, masks, targets, values):
                loss = _kl_loss(model, fit.input_ids[rows], fit.attention_mask[rows], ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr_at(settings, step, total)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", best=f"{best_value:.4f}")
        if step % eval_every == 0 or step == total:
            entry = {"step": step, **stop_value(values)}
            history.append(entry)
            value = entry["value"]
            if value < best_value - 1e-6 and eligible(entry):
                best_value, bad = value, 0
                best = {n: values[n].detach().clone() for n in names}
            else:
                bad += 1
            stopped = bad >= settings.patience
            if ckpt is not None:
                _save_state(ckpt, identity, step, values, best, opt, names, {"bad": bad, "history": history})
        if on_step is not None:
            on_step(step)
    bar.close()

    # Round to the storage dtype (what an export writes), then accept only if the search-split KL improves.
    final = {n: (best[n] if folded_leaf(n) else best[n].to(dtype).float()) for n in names}
    unrepaired = _targets(model, adapter, kept, settings)[1]
    kl_before, domains_before = search_kl_per_domain(model, adapter, masks, targets, unrepaired, stop,
                                                     stop_reference, settings.batch_size, dtype)
    kl_after, domains_after = search_kl_per_domain(model, adapter, masks, targets, final, stop, stop_reference,
                                                   settings.batch_size, dtype)
    hurt = _hurt(domains_before, domains_after, settings.guard_tolerance)
    accepted = kl_after < kl_before and not (settings.guard and hurt)
    chosen = final if accepted else unrepaired
    tensors = {n: (chosen[n].detach().float().cpu() if folded_leaf(n) else chosen[n].detach().to(dtype).cpu())
               for n in names}
    meta = verdict_meta(settings, model_fp=model_fp, kept=kept, storage_dtype=storage_dtype, accepted=accepted,
                        kl=(kl_before, kl_after), domains=(domains_before, domains_after), hurt=hurt,
                        stop_tokens=stop.num_tokens, stop_metric="local" if local else "kl",
                        stop=(base_value, best_value))
    meta.update(steps=step, steps_total=total, history=history, seconds=round(time.time() - t0, 1))
    if ckpt is not None:
        for f in ckpt.glob("*"):
            f.unlink(missing_ok=True)
        try:
            ckpt.rmdir()
        except OSError:
            pass
    return Repair(tensors, meta)


def _hurt(before: dict[str, float], after: dict[str, float], tolerance: float) -> list[str]:
    """Domains whose KL ``after`` is worse than ``before`` by more than ``tolerance`` (relative)."""
    return [d for d in before if d in after and after[d] > before[d] * (1 + tolerance) + 1e-9]


def search_kl(model: torch.nn.Module, adapter: MoEAdapter, masks: dict[int, torch.Tensor], targets: list[_Target],
              values: dict[str, torch.Tensor], data: TokenData, reference: Reference, batch_size: int,
              dtype: torch.dtype | None = None) -> float:
    """Token-mean KL on ``data`` of the masked model with ``values``, scales and low-rank updates merged into
    ``down_proj`` (rounded to ``dtype``) as :meth:`Repair.overrides` does (the model's fingerprint changes while
    swapped: ``other_model``)."""
    return search_kl_per_domain(model, adapter, masks, targets, values, data, reference, batch_size, dtype)[0]


def search_kl_per_domain(model: torch.nn.Module, adapter: MoEAdapter, masks: dict[int, torch.Tensor],
                         targets: list[_Target], values: dict[str, torch.Tensor], data: TokenData,
                         reference: Reference, batch_size: int, dtype: torch.dtype | None = None
                         ) -> tuple[float, dict[str, float]]:
    """:func:`search_kl` and the token-mean KL of each domain of ``data``."""
    named = dict(model.named_parameters())
    swaps: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        folded = {t.name: values[t.name].detach() for t in targets if t.kind in ("scale", "lowrank")}
        for experts, parts in folded_parts(folded).items():
            swaps.update(fold_down(named, experts, parts.get(SCALE), lowrank_delta(parts),
                                   dtype or named[f"{experts}.down_proj"].dtype))
        for t in targets:
            if t.kind in ("router", "norm"):
                swaps[t.name] = values[t.name].detach().to(named[t.name].dtype)
    with swapped(model, swaps):
        result = evaluate(model, adapter, masks, data, proxies=("kl",), reference=reference, batch_size=batch_size,
                          other_model=True)
    return result.values["kl"], {d: v["kl"] for d, v in result.per_domain.items()}

