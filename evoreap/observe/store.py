"""Observation directories: content-addressed, checksummed, resumable; safetensors and JSON only (no pickle).

Layout under the cache (``--cache-dir``, else ``$EVOREAP_CACHE``, else ``~/.cache/evoreap``)::

    observations/<key>/manifest.json            schema, versions, fingerprints, token counts, sha256 of every file
    observations/<key>/layer_<i>.safetensors    one MoE layer's raw float64 sums and counts
    observations/<key>.partial/progress.json    an interrupted run: batches done + the checkpoint's sha256
    observations/<key>.partial/sums-<b>.safetensors

The key hashes what determines the statistics: the model fingerprint (config + router weights + tokenizer + all
weights, see :mod:`evoreap.fingerprint`), the
exact token ids and masks per domain, the sequence length, the compute dtype and the batch size (batching changes
float rounding, and resuming must continue the very same additions). A finished directory appears atomically
(written under a temporary name, then renamed), and checkpoints replace each other atomically, so a crash at any
point leaves either the previous state or the next one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from evoreap.version import __version__
from evoreap.checkpoint.layout import ROUTER_TENSORS, router_key
from evoreap.checkpoint.quant import quant_label
from evoreap.errors import EvoreapError, UsageError
from evoreap.files import cache_root, sha256_file, sha256_json, shareable, write_json_atomic
from evoreap.fingerprint import weights_fingerprint
from evoreap.observe.recorder import observe
from evoreap.observe.stats import DOMAIN_FIELDS, FIELDS, ExpertStats

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: the model fingerprint covers all weights; 3: per-domain REAP sums
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
# Config entries that do not change what the model computes (or that the key records separately).
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "_experts_implementation",
                         "_attn_implementation", "_attn_implementation_internal", "_experts_implementation_internal",
                         "architectures", "use_cache", "output_router_logits"}


# -- hashing ---------------------------------------------------------------------------------------------------------
def _sha256_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def _sha256_json(obj: Any) -> str:
    return sha256_json(obj)



def config_hash(config: Any) -> str:
    """sha256 of the config's JSON, without entries that do not change the computation (versions, dtype, paths)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return _sha256_json(d)


def router_tensors(model: torch.nn.Module, adapter) -> dict[str, torch.Tensor]:
    """Every router weight, bias and ``e_score_correction_bias`` of a resident model, by canonical name."""
    out = {}
    for layer in adapter.layers(model):
        for name in ROUTER_TENSORS:
            t = getattr(layer.router, name, None)
            if isinstance(t, torch.Tensor):
                out[router_key(layer.index, name)] = t
    return out


def router_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the router tensors (as float32, in name order; dtype-stable for bf16/fp16 -> fp32 upcasts)."""
    h = hashlib.sha256()
    for name in sorted(tensors, key=lambda n: (int(n.split(".")[0]), n)):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()



def check_routers(observation, routers: dict[str, torch.Tensor], target: str) -> None:
    """Refuse (UsageError) an observation recorded on other router weights than ``routers`` (those of ``target``):
    its scores would rank another model's experts. The routers are first rounded to the dtype the observation ran
    in, as its fingerprint was taken there (an fp32 checkpoint observed with ``--dtype bfloat16``)."""
    model = observation.manifest.get("model") or {}
    want = (model.get("fingerprint") or {}).get("router_sha256")
    if not want:
        return
    dtype = getattr(torch, str(model.get("dtype")), None)
    if isinstance(dtype, torch.dtype):
        routers = {name: t.to(dtype) for name, t in routers.items()}
    if router_hash(routers) != want:
        where = f" ({model['path']})" if model.get("path") else ""
        raise UsageError(f"observation {observation.key[:12]} was recorded on a model with other router weights"
                         f"{where}, not {target}; observe this model or pass its observation")

def tokenizer_hash(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's full serialised state (fast tokenizers) or of its vocabulary."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _sha256_bytes(backend.to_str().encode())
    try:
        return _sha256_json(sorted(tokenizer.get_vocab().items()))
    except Exception:  # an exotic tokenizer: the fingerprint then rests on config + routers
        return None


def model_fingerprint(config: Any, routers: dict[str, torch.Tensor], tokenizer: Any = None,
                      weights: str | None = None) -> dict[str, str | None]:
    """``{"config_sha256", "router_sha256", "tokenizer_sha256", "weights_sha256", "sha256"}``; ``sha256`` combines
    them all. ``weights`` is the fingerprint of every weight (:func:`evoreap.fingerprint.weights_fingerprint`);
    the router hash stays separate because export and evaluate check it against a checkpoint's router tensors."""
    fp = {"config_sha256": config_hash(config), "router_sha256": router_hash(routers),
          "tokenizer_sha256": tokenizer_hash(tokenizer), "weights_sha256": weights}
    fp["sha256"] = _sha256_json(fp)
    return fp


def data_fingerprints(data) -> dict[str, str]:
    """sha256 of exactly the token ids and masks of each domain's sequences (also right for subsets, whose
    ``TokenData.fingerprints`` still describe the parent)."""
    out = {}
    for d, name in enumerate(data.domains):
        rows = data.domain_ids == d
        ids = data.input_ids[rows].to(torch.int64).contiguous().numpy()
        mask = data.attention_mask[rows].to(torch.int8).contiguous().numpy()
        out[name] = _sha256_bytes(str(ids.shape).encode(), ids.tobytes(), mask.tobytes())
    return out


def observation_key(model_sha256: str, data_fingerprint: dict[str, str], seq_len: int, settings: dict[str, Any]
                    ) -> str:
    """The content address of an observation (64 hex digits)."""
    return _sha256_json({"schema": SCHEMA_VERSION, "model": model_sha256, "data": data_fingerprint,
                         "seq_len": seq_len, "settings": settings})


def observations_dir(cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "observations"


# -- writing ---------------------------------------------------------------------------------------------------------
def _save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
                             ) -> str:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    shareable(tmp)  # safetensors writes 0600
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def layer_file(index: int) -> str:
    return f"layer_{index:03d}.safetensors"


def write_observation(directory: Path, stats: ExpertStats, manifest: dict[str, Any]) -> Path:
    """Write ``stats`` (one safetensors per layer) and the manifest into ``directory``, atomically as a whole."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for i in stats.layers:
        files[layer_file(i)] = _save_safetensors_atomic(stats.layer_tensors(i), tmp / layer_file(i),
                                                        {"layer": str(i)})
    manifest = {**manifest, "layers": list(stats.layers), "tokens": stats.tokens,
                "domain_tokens": dict(zip(stats.domains, stats.domain_tokens)), "files": files}
    write_json_atomic(tmp / MANIFEST, manifest)
    if directory.exists():  # a concurrent run finished first: keep the one that is there
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    return directory


# -- reading ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Observation:
    key: str
    path: Path
    manifest: dict[str, Any]
    stats: ExpertStats


def _resolve(key_or_dir: str | Path, cache_dir: str | Path | None) -> Path:
    p = Path(key_or_dir).expanduser()
    if p.is_dir():
        return p
    root = observations_dir(cache_dir)
    key = str(key_or_dir)
    if (root / key).is_dir():
        return root / key
    if len(key) >= 6 and all(c in "0123456789abcdef" for c in key) and root.is_dir():
        hits = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(key)
                and not d.name.endswith(".partial") and not d.name.startswith(".")]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise UsageError(f"observation key prefix {key} is ambiguous ({len(hits)} matches in {root}); "
                             "give more digits")
    raise UsageError(f"no observation {key} in {root} (and no such directory); run `evoreap observe` first or "
                     "pass --cache-dir where it was written")


def _safe_name(name: str, where: Path) -> str:
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", "..") or "\\" in name:
        raise UsageError(f"{where / MANIFEST} names a file {name!r} outside its directory; refusing to read it "
                         "(the manifest is corrupted or was tampered with)")
    return name


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def manifest_problem(manifest: Any) -> str | None:
    """What is structurally wrong with an observation manifest (after its schema version), or None: every field
    :func:`load_observation` and the commands read, with its type."""
    if not isinstance(manifest, dict):
        return f"it is a JSON {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("key"), str):
        return '"key" is missing or not a string'
    model = manifest.get("model")
    if not isinstance(model, dict):
        return '"model" is missing or not an object'
    fp = model.get("fingerprint")
    if not isinstance(fp, dict) or not isinstance(fp.get("sha256"), str):
        return '"model.fingerprint.sha256" is missing or not a string'
    for name in ("path", "dtype"):
        if model.get(name) is not None and not isinstance(model[name], str):
            return f'"model.{name}" is not a string'
    data = manifest.get("data", {})  # optional (no domains) for observations written by hand
    if not isinstance(data, dict):
        return '"data" is not an object'
    domains = data.get("domains", [])
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains) or \
            len(set(domains)) != len(domains):
        return '"data.domains" is not a list of distinct strings'
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) and len(v) == 64
                                              for k, v in files.items()):
        return '"files" is missing or not a map of file names to sha256 digests'
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers or not all(_is_int(i) and i >= 0 for i in layers) or \
            len(set(layers)) != len(layers):
        return '"layers" is missing or not a list of distinct layer indices'
    if not _is_int(manifest.get("tokens")) or manifest["tokens"] < 0:
        return '"tokens" is missing or not a non-negative integer'
    dt = manifest.get("domain_tokens")
    if not isinstance(dt, dict) or not all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in dt.items()):
        return '"domain_tokens" is missing or not a map of domain names to token counts'
    return None


def _layer_problem(part: dict[str, torch.Tensor], meta: dict[str, str], index: int, domains: int) -> str | None:
    """What is wrong with the contents of one layer file (``domains``: rows of ``domain_count``), or None."""
    if meta.get("layer") != str(index):
        return f"it holds layer {meta.get('layer')!r}, not layer {index}"
    missing = set(FIELDS) - set(part)
    if missing:
        return f"it lacks {', '.join(sorted(missing))}"
    extra = set(part) - set(FIELDS)
    if extra:
        return f"it holds unexpected tensors {', '.join(sorted(extra))}"
    experts = part["count"].shape[-1] if part["count"].dim() == 1 else None
    if not experts:
        return f"count has shape {list(part['count'].shape)}, not [experts]"
    for f in FIELDS:
        t = part[f]
        want = [domains, experts] if f in DOMAIN_FIELDS else [experts]
        if t.dtype != torch.float64 or list(t.shape) != want:
            return f"{f} is {str(t.dtype).replace('torch.', '')} {list(t.shape)}, not float64 {want}"
        if not bool(torch.isfinite(t).all()):
            return f"{f} holds non-finite values"
    return None


def load_observation(key_or_dir: str | Path, *, cache_dir: str | Path | None = None,
                     expect_model_fingerprint: str | None = None,
                     expect_experts: dict[int, int] | None = None) -> Observation:
    """Read and verify an observation: schema and structure of the manifest, the sha256 of every file, each layer
    file's contents (its layer, every field's dtype and shape, one expert count throughout, finite values) and,
    if given, that it was made for the model whose fingerprint ``sha256`` is ``expect_model_fingerprint`` and
    whose MoE layers have ``expect_experts`` (layer index -> number of experts) experts."""
    directory = _resolve(key_or_dir, cache_dir)
    mpath = directory / MANIFEST
    again = f"delete {directory} and observe again"
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise UsageError(f"{directory} has no {MANIFEST}: it is not a finished observation") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{mpath} is corrupted (not valid JSON: {e}); {again}") from None
    except OSError as e:
        raise UsageError(f"cannot read {mpath} ({e.strerror or e}); {again}") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"{mpath} is damaged (it is a JSON {type(manifest).__name__}, not an object); {again}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UsageError(f"{mpath} has schema version {version}, this evoreap reads {SCHEMA_VERSION}; observe again "
                         "with this version")
    problem = manifest_problem(manifest)
    if problem:
        raise UsageError(f"{mpath} is damaged ({problem}); {again}")
    if expect_model_fingerprint is not None:
        have = manifest["model"]["fingerprint"]["sha256"]
        if have != expect_model_fingerprint:
            made_for = manifest["model"].get("path")
            raise UsageError(f"observation {directory.name} was made for another model ({made_for}, fingerprint "
                             f"{str(have)[:12]}), not this one ({expect_model_fingerprint[:12]}); observe this model "
                             "instead")
    files, layers = manifest["files"], manifest["layers"]
    domains = tuple(manifest.get("data", {}).get("domains", []))
    if expect_experts is not None and sorted(layers) != sorted(expect_experts):
        raise UsageError(f"observation {directory.name[:12]} covers MoE layers {sorted(layers)} but the model's are "
                         f"{sorted(expect_experts)}; it was made for another model: observe this model")
    for i in layers:
        name = layer_file(i)
        if name not in files:
            raise UsageError(f"{mpath} lists layer {i} but no checksum for {name}; {again}")
    for name, digest in files.items():
        path = directory / _safe_name(name, directory)
        if not path.is_file():
            raise UsageError(f"observation file {path} is missing; {again}")
        if sha256_file(path) != digest:
            raise UsageError(f"observation file {path} is corrupted (sha256 mismatch with the manifest); {again}")
    tensors: dict[str, torch.Tensor] = {}
    for i in layers:
        path = directory / layer_file(i)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                part = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise UsageError(f"cannot read {path}: {e}; {again}") from None
        problem = _layer_problem(part, meta, i, max(1, len(domains)))
        if problem:
            raise UsageError(f"{path} does not match its manifest ({problem}); {again}")
        experts = part["count"].numel()
        if expect_experts is not None and experts != expect_experts[i]:
            raise UsageError(f"observation {directory.name[:12]} has {experts} experts in layer {i} but the model has "
                             f"{expect_experts[i]}; it was made for another model: observe this model")
        tensors.update({f"{i}.{f}": part[f] for f in FIELDS})
    dt = manifest["domain_tokens"]
    tensors["tokens"] = torch.tensor(manifest["tokens"])
    tensors["domain_tokens"] = torch.tensor([dt.get(d, 0) for d in domains], dtype=torch.int64)
    stats = ExpertStats.from_tensors(tensors, domains)
    return Observation(manifest["key"], directory, manifest, stats)


# -- observe with the cache ------------------------------------------------------------------------------------------
def _read_progress(partial: Path, expect: dict[str, Any], domains: tuple[str, ...]
                   ) -> tuple[int, ExpertStats] | None:
    """The last consistent checkpoint of an interrupted run, or None (anything unreadable is discarded)."""
    try:
        progress = json.loads((partial / PROGRESS).read_text())
        if {k: progress.get(k) for k in expect} != expect:
            return None
        path = partial / _safe_name(progress["file"], partial)
        if sha256_file(path) != progress["sha256"]:
            log.warning("discarding a corrupted checkpoint in %s", partial)
            return None
        return int(progress["batches_done"]), ExpertStats.from_tensors(load_file(str(path)), domains)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UsageError):
        return None


def _write_progress(partial: Path, batches_done: int, stats: ExpertStats, expect: dict[str, Any]) -> None:
    name = f"sums-{batches_done:08d}.safetensors"
    digest = _save_safetensors_atomic(stats.to_tensors(), partial / name)
    write_json_atomic(partial / PROGRESS, {**expect, "batches_done": batches_done, "file": name, "sha256": digest})
    for old in partial.glob("sums-*.safetensors"):  # the progress file no longer points at older checkpoints
        if old.name != name:
            old.unlink(missing_ok=True)


def model_info(path: str | Path, adapter, routers: dict[str, torch.Tensor], tokenizer: Any, dtype: torch.dtype,
               weights: str | None = None) -> dict[str, Any]:
    """Identity and fingerprint of a model run in ``dtype`` (the ``model`` record of an observation); ``weights``
    is the fingerprint of all its weights (:mod:`evoreap.fingerprint`)."""
    info = {"path": str(path), "architecture": adapter.name, "model_type": adapter.config.model_type,
            "dtype": str(dtype).replace("torch.", ""),
            "fingerprint": model_fingerprint(adapter.config, routers, tokenizer, weights)}
    quant = quant_label(adapter.config)
    if quant is not None:  # a pre-quantized source, dequantized to ``dtype``: never mixed with a bf16 observation
        info["quantization"] = quant
    return info


def describe_model(loaded, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """:func:`model_info` of a resident :class:`~evoreap.models.LoadedModel` (``cache_dir``: where the content
    hashes of its checkpoint files are cached)."""
    return model_info(loaded.path, loaded.adapter, router_tensors(loaded.model, loaded.adapter), loaded.tokenizer,
                      next(loaded.model.parameters()).dtype, weights_fingerprint(loaded.model, cache_dir))


def _check_finite(stats: ExpertStats, info: dict[str, Any], partial: Path) -> None:
    """Refuse (EvoreapError) statistics with a NaN or inf: they are never checkpointed nor stored as complete."""
    bad = stats.first_non_finite()
    if bad is None:
        return
    try:
        partial.rmdir()  # only when empty: a resumable earlier checkpoint (all finite) is kept
    except OSError:
        pass
    layer, expert, fields = bad
    raise EvoreapError(f"observing {info.get('path')} gave non-finite {'/'.join(fields)} for expert {expert} of layer "
                       f"{layer}: the model's weights are not finite (NaN or inf) or overflow in {info.get('dtype')}; "
                       "repair or re-download the checkpoint (or observe in float32), nothing was stored")


def observe_cached(loaded, data, *, cache_dir: str | Path | None = None, batch_size: int = 8,
                   progress: bool = True, seed: int | None = None, checkpoint_every: int = 16,
                   model_info: dict[str, Any] | None = None, runner=None) -> tuple[str, ExpertStats]:
    """Observe ``data`` with ``loaded`` (a LoadedModel) through the cache: reuse a finished observation with the
    same key, resume an interrupted one, else observe from scratch, checkpointing every ``checkpoint_every``
    batches. Returns ``(key, stats)``.

    ``runner(initial, start_batch, stop_batch) -> ExpertStats`` replaces the in-memory observer (sequential mode);
    ``model_info`` then supplies the model's identity (see :func:`describe_model`).
    """
    info = model_info if model_info is not None else describe_model(loaded, cache_dir)
    experts = {layer.index: layer.num_experts for layer in loaded.adapter.layers(loaded.model)}
    settings = {"dtype": info["dtype"], "batch_size": batch_size}
    if info.get("quantization"):
        settings["quantization"] = info["quantization"]
    fps = data_fingerprints(data)
    key = observation_key(info["fingerprint"]["sha256"], fps, data.seq_len, settings)
    root = observations_dir(cache_dir)
    final = root / key
    if final.is_dir():
        obs = load_observation(final, expect_model_fingerprint=info["fingerprint"]["sha256"], expect_experts=experts)
        log.info("reusing observation %s (%d tokens)", key, obs.stats.tokens)
        return key, obs.stats

    n_batches = data.num_batches(batch_size)
    partial = root / f"{key}.partial"
    # The key names the rows of each domain, not how the domains interleave (a finished observation is the same
    # for any order); a checkpoint at batch k is only valid for the same row order, so progress records it.
    order = _sha256_bytes(json.dumps(list(data.domains)).encode(),
                          data.domain_ids.to(torch.int64).contiguous().numpy().tobytes())
    expect = {"schema_version": SCHEMA_VERSION, "key": key, "batch_size": batch_size, "row_order": order}
    start, stats = 0, None
    if partial.is_dir():
        found = _read_progress(partial, expect, data.domains)
        if found is not None:
            start, stats = found
            log.info("resuming observation %s at batch %d of %d", key, start, n_batches)
    partial.mkdir(parents=True, exist_ok=True)
    if runner is None:
        def runner(initial, lo, hi):
            return observe(loaded.model, loaded.adapter, data, batch_size=batch_size, progress=False,
                           initial=initial, start_batch=lo, stop_batch=hi)
    step = max(1, checkpoint_every)
    with tqdm(total=n_batches, initial=start, disable=not progress, desc="observe", unit="batch") as bar:
        while start < n_batches:
            stop = min(n_batches, start + step)
            stats = runner(stats, start, stop)
            _check_finite(stats, info, partial)
            start = stop
            bar.update(stop - bar.n)
            if start < n_batches:
                _write_progress(partial, start, stats, expect)
    if stats is None:
        raise UsageError("no data to observe (0 sequences)")
    manifest = {
        "schema_version": SCHEMA_VERSION, "evoreap_version": __version__, "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": info,
        "data": {"domains": list(data.domains), "fingerprints": fps, "source_fingerprints": dict(data.fingerprints),
                 "file_hashes": dict(data.file_hashes), "sequences": len(data), "seq_len": data.seq_len,
                 "seed": seed,
                 # per source: spec, content fingerprint, rows read, sequences and tokens taken (comparability)
                 "sources": [dataclasses.asdict(r) for r in getattr(data, "sources", ())]},
        "settings": settings,
    }
    write_observation(final, stats, manifest)
    shutil.rmtree(partial, ignore_errors=True)
    return key, load_observation(final, expect_model_fingerprint=info["fingerprint"]["sha256"],
                                 expect_experts=experts).stats

