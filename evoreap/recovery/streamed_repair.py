"""Layer-local router repair of a model larger than memory (``evoreap repair --objective local --offload``).

The resident ``local`` objective (:func:`evoreap.recovery.repair.fit_repair`) captures every pruned MoE block's
input and output with the whole model, then fits all layers' parameters with one Adam and one early-stopping rule on
the summed search-split block error. Its layers never interact while fitting: a layer's loss depends only on its own
parameters and the unpruned model's own states, Adam is elementwise and the learning rate a function of the step;
only the stopping rule (the best evaluation of the *summed* error, with patience) couples them. So here the model is
on the meta device (:class:`~evoreap.observe.sequential.SequentialModel`) and its decoder layers are read from the
shards one at a time, up to the last pruned one:

1. the unpruned hidden states of the fitting (calibration) and stopping (search) text enter layer ``d``; one call of
   the unpruned layer per batch gives its MoE block's input (to the norm before it) and output, and the states that
   enter layer ``d + 1``;
2. a pruned layer's parameters are fitted on those pairs exactly as the resident fit moves them (same tokens per
   step, same schedule), for every step the resident fit may take; the values and the layer's stopping error at
   every early-stopping evaluation are written to a per-layer safetensors file;
3. the layer is freed, and a checkpoint (the layer files, the states for the next layer, a manifest validated as
   :mod:`evoreap.proxies.streamed` validates its stage manifests) lets a killed repair resume at the next layer.

Then the resident stopping rule runs on the summed errors, each layer takes its values at the chosen evaluation, and
the resident acceptance rule (search-split KL below the unrepaired pruned model's, scored layer by layer with
:class:`~evoreap.proxies.streamed.StreamedEvaluator`) decides, with the resident retry at lr/3. The parameters equal
the resident ``local`` repair's (tested), in the same :class:`~evoreap.recovery.store.Repair` file. The price of
deciding the stop at the end: every layer runs all ``epochs`` (the resident fit may stop earlier), and the KL
before/after costs two scoring passes over the layers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from evoreap.data import TokenData
from evoreap.errors import EvoreapError, UsageError
from evoreap.files import sha256_file, shareable, write_json_atomic
from evoreap.fingerprint import checkpoint_fingerprint
from evoreap.observe.sequential import LayerBuffers, LayerCapture, SequentialModel
from evoreap.proxies.population import DEFAULT_CACHE_BYTES, _layers_replaced
from evoreap.proxies.streamed import MANIFEST, StreamedEvaluator, _Frontier, _read_manifest, streamed_fingerprint, \
    streamed_reference_cached
from evoreap.recovery.repair import RETRIES, RepairSettings, _deterministic, _hurt, _identity, _masks, _Target, \
    _targets, _with_values, lr_at, verdict_meta
from evoreap.recovery.store import LOWRANK_A, LOWRANK_B, SCALE, Repair, allocation_fingerprint, fold_down, \
    folded_leaf, folded_parts, lowrank_delta
from evoreap.reference import Reference

log = logging.getLogger(__name__)

_FORMAT = "evoreap-streamed-repair"
_LAYER = "layer-{:05d}.safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def fit_repair_streamed(seq: SequentialModel, kept: dict[int, list[int]], fit: TokenData, stop: TokenData, *,
                        stop_reference: Reference | None = None, reference_top_k: int = 64,
                        settings: RepairSettings = RepairSettings(objective="local"),
                        storage_dtype: str = "float32", checkpoint: str | Path | None = None, progress: bool = True,
                        max_state_bytes: int = DEFAULT_CACHE_BYTES, cache_dir: str | Path | None = None) -> Repair:
    """:func:`~evoreap.recovery.repair.fit_repair` with ``objective="local"`` for the model ``seq`` streams from its
    shards (see the module docstring). ``max_state_bytes`` bounds the hidden states held in memory between layers
    (the rest goes to disk); ``checkpoint`` is a directory for the per-layer checkpoints (removed when done).
    ``stop_reference``: the unpruned model's reference on ``stop`` (default: from the cache, or built layer by layer
    with ``reference_top_k``)."""
    settings.check()
    if settings.objective != "local":
        raise UsageError(f"a streamed repair fits layer by layer, which is the local objective; --objective "
                         f"{settings.objective} runs the whole model (drop --offload / --max-memory, or use "
                         "--objective local)")
    t0 = time.time()
    model, adapter = seq.model, seq.adapter
    masks = _masks(adapter, kept)
    if not masks:
        raise UsageError("the allocation keeps every expert; there is nothing to repair")
    if stop_reference is None:
        stop_reference = streamed_reference_cached(seq, stop, top_k=reference_top_k, cache_dir=cache_dir,
                                                   batch_size=settings.batch_size, max_state_bytes=max_state_bytes)
    elif stop_reference.model_fingerprint != streamed_fingerprint(seq, cache_dir):
        raise EvoreapError("the search-split reference was computed with another model than the checkpoint streamed "
                           "here; rebuild the reference")
    targets, _ = _targets(model, adapter, kept, settings)  # names only: the values are on the meta device
    names = [t.name for t in targets]
    dtype = _DTYPES.get(storage_dtype, torch.float32)
    model_fp = checkpoint_fingerprint(seq.path, cache_dir)  # what weights_fingerprint gives the loaded model
    root = Path(checkpoint) if checkpoint is not None else None
    tmp = tempfile.TemporaryDirectory(prefix="evoreap-repair-") if root is None else None
    base = Path(tmp.name) if tmp is not None else root
    attempts: list[dict[str, Any]] = []
    kl_before = None
    try:
        with _deterministic():
            for r in range(RETRIES + 1):
                attempt = replace(settings, lr=settings.lr / 3 ** r)
                identity = {"format": _FORMAT, "job": _identity(
                    model=model_fp, kept=allocation_fingerprint(kept), settings=asdict(attempt),
                    fit=fit.fingerprints, stop=stop_reference.key, storage=storage_dtype, rows=[len(fit), len(stop)],
                    data=_data_digest(fit) + _data_digest(stop))}
                plan = _Plan(fit, attempt)
                files = _LayerPass(seq, kept, masks, targets, fit, stop, attempt, plan, base / f"attempt-{r}",
                                   identity, max_state_bytes, progress).run()
                chosen, history, steps, start, stop_best = _resolve(files, names, targets, plan, attempt)
                final = {n: (chosen[n] if folded_leaf(n) else chosen[n].to(dtype).float()) for n in names}
                if kl_before is None:
                    kl_before, domains_before = streamed_search_kl(seq, masks, targets, start, stop, stop_reference,
                                                                   settings.batch_size, dtype, max_state_bytes)
                kl_after, domains_after = streamed_search_kl(seq, masks, targets, final, stop, stop_reference,
                                                             settings.batch_size, dtype, max_state_bytes)
                hurt = _hurt(domains_before, domains_after, settings.guard_tolerance)
                accepted = kl_after < kl_before and not (settings.guard and hurt)
                stop_before = history[0]["value"]
                attempts.append({"lr": attempt.lr, "accepted": accepted, "steps": steps, "search_kl_after": kl_after})
                if accepted or r == RETRIES or stop_best < stop_before:
                    break
                log.info("repair at lr %g never improved on the search split; retrying at lr %g", attempt.lr,
                         attempt.lr / 3)
        picked = final if accepted else start
        tensors = {n: (picked[n].float() if folded_leaf(n) else picked[n].to(dtype)) for n in names}
        meta = verdict_meta(attempt, model_fp=model_fp, kept=kept, storage_dtype=storage_dtype, accepted=accepted,
                            kl=(kl_before, kl_after), domains=(domains_before, domains_after), hurt=hurt,
                            stop_tokens=stop.num_tokens, stop_metric="local", stop=(stop_before, stop_best))
        meta.update(steps=steps, steps_total=plan.total, history=history, engine="streamed",
                    seconds=round(time.time() - t0, 1), attempts=attempts)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        return Repair(tensors, meta)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _data_digest(data: TokenData) -> str:
    return hashlib.sha256(data.input_ids.numpy().tobytes() + data.attention_mask.numpy().tobytes()).hexdigest()


class _Plan:
    """The resident local fit's step plan: tokens per step, steps per epoch, total steps and evaluation steps."""

    def __init__(self, fit: TokenData, settings: RepairSettings):
        self.n_fit = int(fit.attention_mask.bool().sum())  # capture_blocks keeps the real tokens
        self.per_step = settings.batch_size * fit.seq_len
        self.steps_per_epoch = max(1, self.n_fit // self.per_step)
        self.total = self.steps_per_epoch * settings.epochs
        every = max(1, self.steps_per_epoch // settings.evals_per_epoch)
        self.eval_steps = [0] + [s for s in range(1, self.total + 1) if s % every == 0 or s == self.total]
        self.evaluated = set(self.eval_steps)


def _block_loss(adapter, layer, norm, pair: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor | None
                ) -> torch.Tensor:
    """One layer's term of :func:`evoreap.recovery.repair._local_loss` (the same operations, so the same bits): the
    relative squared error of the masked, repaired block's output on tokens ``index``."""
    x, y = pair
    if index is not None:
        x, y = x[index], y[index]
    device = layer.router.weight.device
    x, y = x.to(device), y.to(device)
    h = norm(x[None].to(layer.router.weight.dtype))
    out = layer.block(h)
    out = (out[0] if isinstance(out, tuple) else out).reshape(y.shape).float()
    return ((out - y) ** 2).sum() / (y ** 2).sum().clamp_min(1e-12)


def _fit_layer(model, adapter, index: int, kept: list[int], keep: torch.Tensor, targets: list[_Target],
               pairs: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
               settings: RepairSettings, plan: _Plan) -> dict[str, torch.Tensor]:
    """Every step of the resident fit for layer ``index`` alone; ``value/K/NAME`` at evaluation ``K``, ``start/NAME``
    and the stopping error ``loss`` ``[K]`` (float32, as the resident sum adds it up)."""
    layer = next(m for m in adapter.layers(model) if m.index == index)
    norm = adapter.moe_norm(model, index)
    # the resident starting values, of this (materialised) layer alone
    values = _targets(model, adapter, {index: kept}, settings, device=layer.router.weight.device)[1]
    names = [t.name for t in targets]
    out = {f"start/{n}": values[n].detach().clone() for n in names}
    opt = torch.optim.Adam([values[n].requires_grad_(True) for n in names], lr=settings.lr)
    fit_pair, stop_pair = pairs
    losses: list[torch.Tensor] = []

    def evaluation(k: int) -> None:
        with torch.no_grad(), _with_values(model, adapter, {index: keep}, targets, values):
            losses.append(_block_loss(adapter, layer, norm, stop_pair, None).detach().float().reshape(()))
        out.update({f"value/{k}/{n}": values[n].detach().clone() for n in names})

    evaluation(0)
    order, epoch_of = None, -1
    for step in range(plan.total):
        epoch, pos = divmod(step, plan.steps_per_epoch)
        if epoch != epoch_of:
            g = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
            order, epoch_of = torch.randperm(plan.n_fit, generator=g), epoch
        rows = order[pos * plan.per_step:(pos + 1) * plan.per_step]
        with _with_values(model, adapter, {index: keep}, targets, values):
            loss = _block_loss(adapter, layer, norm, fit_pair, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr_at(settings, step, plan.total)
        opt.step()
        if step + 1 in plan.evaluated:
            evaluation(len(losses))
    out["loss"] = torch.stack(losses)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


class _LayerPass:
    """One pass over the decoder layers up to the last pruned one, fitting each pruned layer (module docstring)."""

    def __init__(self, seq: SequentialModel, kept, masks, targets, fit: TokenData, stop: TokenData,
                 settings: RepairSettings, plan: _Plan, directory: Path, identity: dict[str, Any],
                 max_state_bytes: int, progress: bool):
        self.seq, self.kept, self.masks, self.settings, self.plan = seq, kept, masks, settings, plan
        self.splits = (fit, stop)
        self.targets = {i: [t for t in targets if t.layer == i] for i in masks}
        self.dir, self.identity, self.max_state_bytes, self.progress = directory, identity, max_state_bytes, progress
        self.last = max(masks)

    @staticmethod
    def node(d: int, split: int) -> int:
        """The frontier node of the states entering layer ``d`` of split ``split``: a new name per layer, so that a
        checkpoint's files are never overwritten by the next layer's."""
        return 2 * d + split

    def _batches(self, split: int) -> int:
        return self.splits[split].num_batches(self.settings.batch_size)

    def _resume(self) -> tuple[int, dict[str, str], dict[int, str]]:
        done, files = _read_manifest(self.dir, self.identity)
        layers: dict[int, str] = {}
        if done >= 0:
            m = json.loads((self.dir / MANIFEST).read_text(encoding="utf-8"))
            fitted = m.get("layers")
            want = [i for i in self.masks if i <= done]
            ok = isinstance(fitted, dict) and sorted(fitted) == sorted(str(i) for i in want) and all(
                isinstance(v, str) and (self.dir / _LAYER.format(i)).is_file()
                and sha256_file(self.dir / _LAYER.format(i)) == v for i, v in ((i, fitted[str(i)]) for i in want))
            if ok:
                layers = {i: _LAYER.format(i) for i in want}
            else:
                log.warning("repair checkpoint %s misses or has damaged layer files; the pass starts over", self.dir)
                done, files = -1, {}
        if done < 0 and self.dir.exists():  # another run's leftovers: nothing in it is ours to resume
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        return done, files, layers

    def run(self) -> dict[int, Path]:
        """The per-layer files of the fitted layers (``layer -> path``)."""
        seq = self.seq
        done, files, layers = self._resume()
        if done >= self.last:
            return {i: self.dir / f for i, f in layers.items()}
        front = _Frontier(self.max_state_bytes, self.dir, keep_files_until_commit=True)
        if done >= 0:
            front.files = {tuple(int(x) for x in k.split("-")): v for k, v in files.items()}
            log.info("resuming the streamed repair after layer %d (%s)", done, self.dir)
        args = self._arguments(front if done < 0 else None)
        moe = {m.index: m for m in seq.adapter.layers(seq.model)}
        device = seq.device
        bar = tqdm(total=self.last + 1, initial=done + 1, desc=f"repair ({self.settings.params}, local, offload)",
                   unit="layer", disable=not self.progress)
        for d in range(done + 1, self.last + 1):
            layer = seq.decoder.layers[d]
            seq.loader.materialise(layer, f"{seq.prefix}layers.{d}.", device)
            try:
                for p in layer.parameters():
                    p.requires_grad_(False)
                pairs = []
                for s in range(2):
                    pairs.append(self._advance(layer, moe.get(d) if d in self.masks else None, d, s, args[s], front))
                if d in self.masks:
                    tensors = _fit_layer(seq.model, seq.adapter, d, self.kept[d], self.masks[d], self.targets[d],
                                         tuple(pairs),
                                         self.settings, self.plan)
                    path = self.dir / _LAYER.format(d)
                    tmp = self.dir / f".{path.name}.tmp"
                    save_file(tensors, str(tmp))
                    shareable(tmp)
                    tmp.replace(path)
                    layers[d] = path.name
                del pairs
            finally:
                layer.to("meta")
            write_json_atomic(self.dir / MANIFEST, {**self.identity, "layer_done": d, "files": front.persist(),
                                                    "layers": {str(i): sha256_file(self.dir / f)
                                                               for i, f in layers.items()}})
            front.commit()
            bar.update(1)
        bar.close()
        return {i: self.dir / f for i, f in layers.items()}

    @torch.no_grad()
    def _advance(self, layer, moe, d: int, split: int, args, front: _Frontier
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Run the unpruned layer ``d`` on split ``split``'s states (its successors go into ``front``), recording the
        MoE block's input to its norm and output on the real tokens when ``moe`` is given (as capture_blocks)."""
        seq, data, bs = self.seq, self.splits[split], self.settings.batch_size
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        keep: list[torch.Tensor] = []
        handles = []
        if moe is not None:
            handles.append(seq.adapter.moe_norm(seq.model, d).register_forward_pre_hook(
                lambda m, a: xs.append(a[0].detach().float().reshape(-1, a[0].shape[-1])[keep[0]])))

            def post(module, a, output):
                y = output[0] if isinstance(output, tuple) else output
                ys.append(y.detach().float().reshape(-1, y.shape[-1])[keep[0]])

            handles.append(moe.block.register_forward_hook(post))
        try:
            for b in range(self._batches(split)):
                _, mask, _ = data.batch(b, bs)
                keep[:] = [mask.reshape(-1).bool().to(seq.device)]
                h = front.get((self.node(d, split), b), seq.device)
                _, a, kw = args[b][d]
                out = layer(h, *a, **kw)
                if d < self.last:
                    front.put((self.node(d + 1, split), b), out[0] if isinstance(out, tuple) else out)
                front.drop((self.node(d, split), b))
                del h, out
        finally:
            for handle in handles:
                handle.remove()
        return (torch.cat(xs), torch.cat(ys)) if moe is not None else None

    @torch.no_grad()
    def _arguments(self, front: _Frontier | None) -> list[list[dict[int, tuple]]]:
        """Every layer's arguments per batch of each split from one pass of the decoder with stand-in layers (as
        :class:`~evoreap.proxies.streamed.StreamedEvaluator` gets them); layer 0's inputs go into ``front``."""
        seq, bs = self.seq, self.settings.batch_size
        out: list[list[dict[int, tuple]]] = [[], []]
        seq._materialise_outer()
        try:
            for s, data in enumerate(self.splits):
                for b in range(self._batches(s)):
                    ids, mask, _ = data.batch(b, bs)
                    sink: dict[int, tuple] = {}
                    stand_ins = [LayerCapture(i, layer, sink) for i, layer in enumerate(seq.decoder.layers)]
                    with _layers_replaced(seq.decoder, stand_ins):
                        seq.decoder(input_ids=ids.to(seq.device), attention_mask=mask.to(seq.device),
                                    use_cache=False)
                    if front is not None:
                        front.put((self.node(0, s), b), sink[0][0])
                    out[s].append({i: (None, a, kw) for i, (_, a, kw) in sink.items()})
        finally:
            seq._free_outer()
        return out


def _resolve(files: dict[int, Path], names: list[str], targets: list[_Target], plan: _Plan,
             settings: RepairSettings) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], int,
                                                dict[str, torch.Tensor], float]:
    """The resident stopping rule on the summed per-layer errors: each target's values at the best evaluation, the
    history, the step the fit stopped at, the starting values and the best summed error."""
    losses = {}
    for i, path in files.items():
        with safe_open(str(path), framework="pt") as f:
            losses[i] = f.get_tensor("loss")
    k_max = len(plan.eval_steps)
    if any(v.shape != (k_max,) for v in losses.values()):
        raise EvoreapError("a repair layer file has another number of evaluations than this fit; delete the "
                           "checkpoint and run again")
    summed = []
    for k in range(k_max):  # added up in float32 in layer order, as the resident _local_loss does
        total = torch.zeros(())
        for i in sorted(losses):
            total = total + losses[i][k]
        summed.append(float(total))
    history = [{"step": 0, "value": summed[0]}]
    best_value, best_k, bad, last = summed[0], 0, 0, 0
    for k in range(1, k_max):
        history.append({"step": plan.eval_steps[k], "value": summed[k]})
        last = k
        if summed[k] < best_value - 1e-6:
            best_value, best_k, bad = summed[k], k, 0
        else:
            bad += 1
        if bad >= settings.patience:
            break
    layer_of = {t.name: t.layer for t in targets}
    chosen, start = {}, {}
    for n in names:
        with safe_open(str(files[layer_of[n]]), framework="pt") as f:
            chosen[n] = f.get_tensor(f"value/{best_k}/{n}")
            start[n] = f.get_tensor(f"start/{n}")
    return chosen, history, plan.eval_steps[last], start, best_value


class _RepairedLoader:
    """``seq.loader`` writing the given values into each layer as it is read: routers and norms as they are, output
    scales and low-rank updates merged into ``down_proj`` rounded to ``dtype`` (what
    :func:`evoreap.recovery.repair.search_kl_per_domain` swaps into the resident model)."""

    def __init__(self, inner, targets: list[_Target], values: dict[str, torch.Tensor], dtype: torch.dtype | None):
        self.inner, self.targets, self.values, self.dtype = inner, targets, values, dtype

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def materialise(self, module: torch.nn.Module, prefix: str, device: torch.device,
                    buffers: LayerBuffers | None = None) -> None:
        self.inner.materialise(module, prefix, device, buffers)  # then overwritten in place: a reused buffer is too
        named = {prefix + n: p for n, p in [*module.named_parameters(), *module.named_buffers()]}
        new: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            folded = {t.name: self.values[t.name].detach() for t in self.targets if t.kind in ("scale", "lowrank")}
            for experts, parts in folded_parts(folded).items():
                if f"{experts}.down_proj" in named:
                    new.update(fold_down(named, experts, parts.get(SCALE), lowrank_delta(parts),
                                         self.dtype or named[f"{experts}.down_proj"].dtype))
            for t in self.targets:
                if t.kind in ("router", "norm") and t.name in named:
                    new[t.name] = self.values[t.name].detach().to(named[t.name].dtype)
            for n, v in new.items():
                named[n].copy_(v.to(named[n].device))


@contextmanager
def _loading_with(seq: SequentialModel, targets: list[_Target], values: dict[str, torch.Tensor],
                  dtype: torch.dtype | None) -> Iterator[None]:
    inner = seq.loader
    seq.loader = _RepairedLoader(inner, targets, values, dtype)
    try:
        yield
    finally:
        seq.loader = inner


def streamed_search_kl(seq: SequentialModel, masks: dict[int, torch.Tensor], targets: list[_Target],
                       values: dict[str, torch.Tensor], data: TokenData, reference: Reference, batch_size: int,
                       dtype: torch.dtype | None = None, max_state_bytes: int = DEFAULT_CACHE_BYTES
                       ) -> tuple[float, dict[str, float]]:
    """:func:`evoreap.recovery.repair.search_kl_per_domain` for a streamed model: the masked model with ``values``
    scored layer by layer; the KL and each domain's."""
    with _loading_with(seq, targets, values, dtype):
        ev = StreamedEvaluator(seq, data, reference=reference, batch_size=batch_size, max_state_bytes=max_state_bytes,
                               other_model=True)
        result = ev.score([masks], proxies=("kl",))[0]
    return result.values["kl"], {d: v["kl"] for d, v in result.per_domain.items()}


def check_streamed(repair: Repair, seq: SequentialModel, kept: dict[int, list[int]],
                   cache_dir: str | Path | None = None) -> None:
    """:meth:`Repair.check` for a model streamed from its shards (its weights fingerprint is its files')."""
    if allocation_fingerprint(kept) != repair.meta["allocation_fingerprint"]:
        raise UsageError("the repair was fitted to other kept experts than this allocation's; run evoreap repair "
                         "again for this allocation (or pass --no-repair)")
    if checkpoint_fingerprint(seq.path, cache_dir) != repair.meta["model_fingerprint"]:
        raise UsageError("the repair was fitted to another model (its weights differ); run evoreap repair again for "
                         "this model")
    named = dict(seq.model.named_parameters()) | dict(seq.model.named_buffers())
    unknown = [n for n in repair.tensors if (n if not folded_leaf(n) else f"{n.rpartition('.')[0]}.down_proj")
               not in named]
    if unknown:
        raise EvoreapError(f"the repair names {unknown[0]}, which this model does not have")


def applied_streamed(seq: SequentialModel, repair: Repair):
    """While inside, every decoder layer ``seq`` reads from its shards carries ``repair``'s values, as
    :func:`evoreap.recovery.store.applied` gives them to a resident model (check first: :func:`check_streamed`)."""
    kinds = {SCALE: "scale", LOWRANK_A: "lowrank", LOWRANK_B: "lowrank"}
    targets = [_Target(n, kinds.get(folded_leaf(n) or "", "router"), -1) for n in repair.tensors]
    return _loading_with(seq, targets, repair.tensors, repair.storage_dtype)
