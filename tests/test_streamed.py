"""The layer-streamed engine: a stage scored layer by layer from the shards (model on the meta device) gives every
candidate the values of its own masked forward on the resident model, spilled to disk or not; the streamed reference
is the resident one and shares its cache entry; a stage killed after a layer resumes from there."""

import pytest
import torch

from evoreap.adapters import MoEAdapter
from evoreap.fingerprint import note_loaded
from evoreap.models import load_config
from evoreap.observe.sequential import SequentialModel
from evoreap.proxies import evaluate, select_sequences, token_order
from evoreap.proxies.streamed import StreamedEvaluator, streamed_fingerprint, streamed_reference_cached
from evoreap.reference import model_fingerprint, reference_cached
from evoreap.testing import ARCHITECTURES, tiny_model

from test_population import PROXIES, _close, _random_mask, tiny_data

FIELDS = ("topk_logprobs", "topk_ids", "tail_logmass", "target_logprob", "valid")


def _saved(arch, tmp_path):
    """test_population's model and data, saved; the resident model is marked as holding exactly those files (as
    load_model marks it) before anything fingerprints it, and the reference is built from it."""
    model = tiny_model(arch)
    adapter = MoEAdapter.for_model(model)
    data, g = tiny_data()
    path = tmp_path / arch
    model.save_pretrained(path)
    note_loaded(model, path)
    ref = reference_cached(model, data, top_k=16, cache_dir=tmp_path / "cache", batch_size=4, progress=False)
    return model, adapter, data, ref, g, str(path)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_streamed_equals_one_masked_forward_per_candidate(arch, tmp_path):
    """Shared prefixes (a sibling differing in the last MoE layer, a duplicate, the unpruned model), hidden states
    spilled to disk (a memory bound smaller than one batch's states), and the reference built the same way."""
    model, adapter, data, ref, g, path = _saved(arch, tmp_path)
    layers = adapter.moe_layer_indices
    base = {i: _random_mask(adapter, g) for i in layers}
    cands = [base, {**base, layers[-1]: _random_mask(adapter, g)}, dict(base), None]
    order = token_order(data, 0)
    want = [evaluate(model, adapter, c, data, proxies=PROXIES, reference=ref, order=order, n_tokens=40,
                     batch_size=4) for c in cands]
    seq = SequentialModel(path, load_config(path))
    assert streamed_fingerprint(seq, tmp_path / "cache") == model_fingerprint(model, tmp_path / "cache")
    ev = StreamedEvaluator(seq, data, reference=ref, order=order, batch_size=4, max_state_bytes=40000,
                           cache_dir=tmp_path / "cache", store_bytes=1 << 30, store_dir=tmp_path / "states")
    got = ev.score(cands, proxies=PROXIES, n_tokens=40)
    for g_, w in zip(got, want):
        _close(g_, w)
        assert g_.values == w.values  # bit-equal: the same layer code on the same inputs
    n = len(model.get_decoder().layers)
    positions = len(select_sequences(data, order, 40)) * data.seq_len
    assert ev.layers_read == list(range(n))  # each layer read once for the whole stage
    assert ev.work.computed == (n + (n - layers[-1]) + (n - layers[0])) * positions
    assert ev.work.attention_shared == 2 * positions  # two branch points: each layer's attention ran once there
    assert 0 < ev.peak_state_bytes <= 40000 and ev.spilled_state_bytes > 0  # the rest went to disk
    assert all(p.is_meta for p in seq.model.parameters())  # nothing stays resident

    # a second stage (the next generation): children of the elite `base` start from its stored states where they
    # first differ (the layers below are not read), `base` itself is not recomputed at all
    ev.retain([base])
    mid = layers[len(layers) // 2]
    stage2 = [{**base, mid: _random_mask(adapter, g)}, {**base, layers[-1]: _random_mask(adapter, g)}, base]
    want2 = [evaluate(model, adapter, c, data, proxies=PROXIES, reference=ref, order=order, n_tokens=40,
                      batch_size=4) for c in stage2[:2]] + [want[0]]
    before = ev.work
    for g_, w in zip(ev.score(stage2, proxies=PROXIES, n_tokens=40), want2):
        assert g_.values == w.values and g_.per_domain == w.per_domain
    assert ev.layers_read[n:] == list(range(mid, n))
    assert ev.work.computed - before.computed == ((n - mid) + (n - layers[-1])) * positions
    # skipped, per start node (both children start from the same node when mid is the last MoE layer)
    assert ev.work.cached - before.cached == (sum({mid, layers[-1]}) + n) * positions
    ev.close()
    assert not (tmp_path / "states").exists()
    # the streamed reference is the resident one, bit for bit
    streamed = StreamedEvaluator(seq, data, batch_size=4, max_state_bytes=0).reference_distributions(16)
    assert streamed.key == ref.key
    assert all(torch.equal(getattr(streamed, f), getattr(ref, f)) for f in FIELDS)


def test_streamed_reference_shares_the_cache_entry(tmp_path):
    model, _, data, _, _, path = _saved("qwen3_moe", tmp_path)
    cache = tmp_path / "cache"
    seq = SequentialModel(path, load_config(path))
    built = streamed_reference_cached(seq, data, top_k=8, cache_dir=cache, batch_size=4)
    entries = list((cache / "reference").iterdir())
    resident = reference_cached(model, data, top_k=8, cache_dir=cache, batch_size=4, progress=False)
    assert list((cache / "reference").iterdir()) == entries  # reused, not rebuilt
    assert all(torch.equal(getattr(built, f), getattr(resident, f)) for f in FIELDS)
    # and the other way round: a resident reference is found by the streamed path without reading a layer
    other = data.subset(torch.arange(4))
    reference_cached(model, other, top_k=8, cache_dir=cache, batch_size=4, progress=False)
    seq2 = SequentialModel(path, load_config(path))
    read = []
    seq2.loader.materialise = lambda *a, **k: read.append(a)
    streamed_reference_cached(seq2, other, top_k=8, cache_dir=cache, batch_size=4)
    assert read == []


def test_killed_stage_resumes_after_the_last_completed_layer(tmp_path, monkeypatch):
    model, adapter, data, ref, g, path = _saved("qwen2_moe", tmp_path)
    layers = adapter.moe_layer_indices
    base = {i: _random_mask(adapter, g) for i in layers}
    cands = [base, {**base, layers[-1]: _random_mask(adapter, g)}, None]
    order = token_order(data, 0)
    want = [evaluate(model, adapter, c, data, proxies=PROXIES, reference=ref, order=order, n_tokens=60,
                     batch_size=2) for c in cands]
    resume = tmp_path / "run" / "streamed"

    def evaluator():
        seq = SequentialModel(path, load_config(path))
        return StreamedEvaluator(seq, data, reference=ref, order=order, batch_size=2, max_state_bytes=4000,
                                 resume_dir=resume), seq

    kill_at = 2
    ev, seq = evaluator()
    real = seq.loader.materialise

    def dies(module, prefix, device, buffers=None):
        if prefix.endswith(f"layers.{kill_at}."):
            raise KeyboardInterrupt("killed")
        return real(module, prefix, device, buffers)

    monkeypatch.setattr(seq.loader, "materialise", dies)
    with pytest.raises(KeyboardInterrupt):
        ev.score(cands, proxies=PROXIES, n_tokens=60)
    assert ev.layers_read == list(range(kill_at))
    (stage,) = resume.iterdir()
    assert (stage / "manifest.json").is_file()

    ev, _ = evaluator()  # a new process: same stage (candidates in another order), resumed
    got = ev.score(list(reversed(cands)), proxies=PROXIES, n_tokens=60)[::-1]
    n = len(model.get_decoder().layers)
    assert ev.layers_read == list(range(kill_at, n))  # the completed layers are not read again
    for g_, w in zip(got, want):
        assert g_.values == w.values and g_.per_domain == w.per_domain
    assert list(resume.iterdir()) == []  # a finished stage leaves nothing behind

    # states kept across stages that vanish under a running stage (another process sharing the store evicted them):
    # the stage is scored again from the embeddings, same values
    ev, seq = evaluator()
    ev = StreamedEvaluator(seq, data, reference=ref, order=order, batch_size=2, store_bytes=1 << 30,
                           store_dir=tmp_path / "states")
    ev.score(cands[:1], proxies=PROXIES, n_tokens=60)
    for f in (tmp_path / "states").iterdir():
        f.unlink()
    read = len(ev.layers_read)
    assert ev.score(cands[:1], proxies=PROXIES, n_tokens=60)[0].values == want[0].values
    assert ev.layers_read[read:] == list(range(n))
    ev.close()


def test_search_streamed_never_loads_the_model_resumes_a_killed_stage_and_equals_the_resident_search(
        small_model_dir, tmp_path, monkeypatch):
    """`evoreap search --max-memory GB` below the weights' size streams: no load_model, the observation and the
    reference come from the cache entries of the resident run (not rebuilt). Killed while a stage is at layer 2,
    the same command resumes the stage at layer 2 (its completed layers are not read again).
    The same best allocation and held-out table as the resident population engine; --export still works; the
    setting is stored for --config replay."""
    import json

    import evoreap.pipeline.session as session_mod
    from evoreap.cli import main
    from evoreap.observe.sequential import LayerLoader

    cache = tmp_path / "cache"
    common = ["search", "--model", str(small_model_dir), "--budget", "0.5", "--generations", "0", "--offspring", "2",
              "--population", "2", "--fidelities", "64,96,128", "--survivors", "2,1", "--calib-tokens", "256",
              "--heldout-tokens", "64", "--seq-len", "32", "--batch-size", "4", "--cache-dir", str(cache),
              "--no-plots", "-q"]
    assert main(common + ["--runs-dir", str(tmp_path / "resident"), "--engine", "population"]) == 0
    entries = sorted(p.name for p in cache.rglob("*") if p.parent.name in ("reference", "observations"))

    def no_load(*a, **k):
        raise AssertionError("the whole model was loaded")

    real, reads, kill = LayerLoader.materialise, [], {"at": 1}

    def spy(self, module, prefix, device, buffers=None):
        if ".layers." in prefix:
            reads.append(int(prefix.split(".")[-2]))
            # observation and reference come from the cache: the first read of layer 2 is in the seeds' stage
            if kill["at"] and reads.count(2) == kill["at"]:
                raise KeyboardInterrupt
        return real(self, module, prefix, device, buffers)

    monkeypatch.setattr(session_mod, "load_model", no_load)
    monkeypatch.setattr(LayerLoader, "materialise", spy)
    streamed = common + ["--runs-dir", str(tmp_path / "streamed"), "--run", "r", "--max-memory", "1e-6",
                         "--export", str(tmp_path / "pruned")]
    assert main(streamed) == 130
    assert sorted(p.name for p in cache.rglob("*") if p.parent.name in ("reference", "observations")) == entries
    assert reads == [0, 1, 2]  # killed in the seeds' stage, at layer 2
    reads.clear()
    kill["at"] = 0
    assert main(streamed) == 0
    # the stage resumed after layer 1; then the held-out table in one pass (its reference is the resident run's)
    assert reads == [2, 3, 0, 1, 2, 3]
    assert not (tmp_path / "streamed" / "r" / "streamed").exists()  # no stage checkpoint left behind

    a, b = (json.loads((d / "result.json").read_text()) for d in (next((tmp_path / "resident").iterdir()),
                                                                   tmp_path / "streamed" / "r"))
    assert a["best"] == b["best"] and a["best_value"] == pytest.approx(b["best_value"], abs=1e-6)
    for row, values in a["heldout"].items():
        for name, v in values["values"].items():
            assert b["heldout"][row]["values"][name] == pytest.approx(v, abs=1e-6), (row, name)
    assert (tmp_path / "pruned" / "config.json").is_file()
    stored = json.loads((tmp_path / "streamed" / "r" / "config.json").read_text())
    assert stored["config"]["max_memory"] == "1e-6"


def test_evaluate_streamed_equals_resident(small_model_dir, tmp_path, monkeypatch):
    """`evaluate --offload` (a masked allocation, in one layer-by-layer pass with the unpruned model) and
    `evaluate --pruned DIR --max-memory GB` (an export, streamed from its own shards) give the resident tables."""
    import evoreap.pipeline.judge as judge
    from evoreap.allocation import Allocation
    from evoreap.export import export_pruned

    adapter = MoEAdapter(load_config(str(small_model_dir)))
    layers = adapter.moe_layer_indices
    kept = {i: [0, 2, 4, 6] if i % 2 else [1, 2, 3, 5, 7] for i in layers}
    alloc = Allocation(tuple(layers), tuple(len(kept[i]) for i in layers), {"model": str(small_model_dir)})
    alloc = alloc.with_experts(kept)
    export_pruned(small_model_dir, tmp_path / "pruned", kept, progress=False)
    kw = dict(data="demo", tokens=192, seq_len=64, batch_size=4, cache_dir=str(tmp_path / "c"), generate_tokens=0)
    want = judge.evaluate_pruned(str(small_model_dir), allocation=alloc, **kw).results
    want_export = judge.evaluate_pruned(str(small_model_dir), pruned=tmp_path / "pruned", **kw).results

    def no_load(*a, **k):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(judge, "load_model", no_load)
    got = judge.evaluate_pruned(str(small_model_dir), allocation=alloc, offload=True, **kw).results
    got_export = judge.evaluate_pruned(str(small_model_dir), pruned=tmp_path / "pruned", max_memory="1e-6",
                                       **kw).results
    for w, g_ in ((want, got), (want_export, got_export)):
        assert w.keys() == g_.keys()
        for row in w:
            assert g_[row]["tokens"] == w[row]["tokens"]
            for name, v in w[row]["overall"].items():
                assert g_[row]["overall"][name] == pytest.approx(v, abs=1e-5), (row, name)
    with pytest.raises(Exception, match="--offload streams layers"):
        judge.evaluate_pruned(str(small_model_dir), allocation=alloc, offload=True, device_map="auto", **kw)


def test_a_crafted_stage_checkpoint_is_ignored(tmp_path):
    """A manifest naming files outside its stage directory (or of another stage) is not resumed from: the stage
    starts over, and nothing it names is read or deleted."""
    import json

    from evoreap.proxies.streamed import MANIFEST, _read_manifest

    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"keep me")
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "n1-b0.safetensors").write_bytes(b"x")
    identity = {"format": "evoreap-streamed-stage", "model": "fp"}
    for files in ({"1-0": "../victim.safetensors"}, {"1-0": "n2-b0.safetensors"}, {"../1": "n1-b0.safetensors"}):
        (stage / MANIFEST).write_text(json.dumps({**identity, "layer_done": 1, "files": files}))
        assert _read_manifest(stage, identity) == (-1, {})
    (stage / MANIFEST).write_text(json.dumps({**identity, "layer_done": 1, "files": {"1-0": "n1-b0.safetensors"}}))
    assert _read_manifest(stage, identity) == (1, {"1-0": "n1-b0.safetensors"})
    assert _read_manifest(stage, {**identity, "model": "other"}) == (-1, {})
    assert victim.read_bytes() == b"keep me"


def test_killed_reference_build_resumes_after_the_last_completed_layer(tmp_path, monkeypatch):
    """The streamed reference checkpoints after each layer (under the cache root): killed while reading layer k,
    the same call resumes there, reads only layers k.., and gives the resident reference bit for bit."""
    model, _, data, want, _, path = _saved("qwen2_moe", tmp_path)  # the resident reference (top 16, batches of 4)
    cache = tmp_path / "cache2"
    kill_at, reads = 2, []

    def seq_reading(die: bool):
        seq = SequentialModel(path, load_config(path))
        real = seq.loader.materialise

        def spy(module, prefix, device, buffers=None):
            if ".layers." in prefix:
                if die and prefix.endswith(f"layers.{kill_at}."):
                    raise KeyboardInterrupt("killed")
                reads.append(int(prefix.split(".")[-2]))
            return real(module, prefix, device, buffers)

        monkeypatch.setattr(seq.loader, "materialise", spy)
        return seq

    with pytest.raises(KeyboardInterrupt):  # states on disk beyond 2 kB: the checkpoint holds spilled ones too
        streamed_reference_cached(seq_reading(True), data, top_k=16, cache_dir=cache, batch_size=4,
                                  max_state_bytes=2000)
    assert reads == list(range(kill_at))
    assert len(list((cache / "streamed-reference").iterdir())) == 1
    reads.clear()
    got = streamed_reference_cached(seq_reading(False), data, top_k=16, cache_dir=cache, batch_size=4,
                                    max_state_bytes=2000)
    assert reads == list(range(kill_at, len(model.get_decoder().layers)))
    assert got.key == want.key
    assert all(torch.equal(getattr(got, f), getattr(want, f)) for f in FIELDS)
    assert not (cache / "streamed-reference").exists()  # nothing left behind


def test_state_store_reads_only_its_own_files_and_keeps_the_elites_longest(tmp_path):
    """A state file is read back only under a name the store makes and with metadata repeating its keys and
    contents' hash: a foreign, renamed or altered file is ignored (and deleted, being in the store's directory);
    files with other names are never touched. The bound evicts unpinned states first and never protected ones."""
    from safetensors.torch import save_file

    from evoreap.proxies.streamed import StateStore

    a, b, c, d = ("%064x" % i for i in range(4))
    t = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    other = tmp_path / "keep.safetensors"
    save_file({"h": t}, str(other))
    store = StateStore(tmp_path, 1 << 20)
    store.put(StateStore.name(a, c), t)
    store.max_bytes = 3 * store.bytes  # three states (every file here has the same size)
    store.put(StateStore.name(b, c), t + 1)
    assert torch.equal(store.get(StateStore.name(a, c), torch.device("cpu")), t)
    # a copy under another batch's name: its metadata names the first batch, so it is not used
    (tmp_path / StateStore.name(a, d)).write_bytes((tmp_path / StateStore.name(a, c)).read_bytes())
    assert store.has(StateStore.name(a, d)) and store.get(StateStore.name(a, d), torch.device("cpu")) is None
    assert not (tmp_path / StateStore.name(a, d)).exists()
    # contents altered under the same header: the hash differs
    raw = bytearray((tmp_path / StateStore.name(b, c)).read_bytes())
    raw[-1] ^= 1
    (tmp_path / StateStore.name(b, c)).write_bytes(bytes(raw))
    assert store.get(StateStore.name(b, c), torch.device("cpu")) is None
    # a plain safetensors file (no metadata) under a store name
    save_file({"h": t}, str(tmp_path / StateStore.name(b, d)))
    assert store.get(StateStore.name(b, d), torch.device("cpu")) is None
    # a link under a store name is not followed
    (tmp_path / StateStore.name(d, d)).symlink_to(other)
    assert not store.has(StateStore.name(d, d)) and store.get(StateStore.name(d, d), torch.device("cpu")) is None
    assert other.is_file()
    # eviction: `a` pinned (an elite), `b` protected (a running stage starts from it), the unpinned `c` goes first
    store.put(StateStore.name(b, c), t)
    store.pin({a})
    store.protect({StateStore.name(b, c)})
    store.put(StateStore.name(c, c), t)
    store.put(StateStore.name(d, c), t)  # full: the oldest unpinned, unprotected state (c) makes room
    assert [store.has(StateStore.name(k, c)) for k in (a, b, c, d)] == [True, True, False, True]
    store.protect({StateStore.name(b, c), StateStore.name(d, c)})
    store.put(StateStore.name(c, d), t)  # now only the pinned one can go
    assert not store.has(StateStore.name(a, c)) and store.has(StateStore.name(b, c))
    store.protect({StateStore.name(b, c), StateStore.name(d, c), StateStore.name(c, d)})
    store.put(StateStore.name(a, c), t)  # no room left that may be taken: not kept
    assert not store.has(StateStore.name(a, c)) and store.bytes <= store.max_bytes
    # a new process in the same directory finds the states (and only them)
    again = StateStore(tmp_path, store.max_bytes)
    assert sorted(again.index) == sorted(store.index)
    assert torch.equal(again.get(StateStore.name(c, d), torch.device("cpu")), t)
    store.close()
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]  # only its own files are deleted


def test_a_path_read_from_the_store_keeps_all_its_states(tmp_path):
    """As in the resident engine: re-scoring A (read from its deepest states) marks all of its states used, so a
    newcomer pushes out C's rather than A's early layers, and a child branching off A late starts there."""
    model, adapter, data, ref, g, path = _saved("qwen3_moe", tmp_path)
    layers, n = adapter.moe_layer_indices, len(model.get_decoder().layers)
    a, c, b = ({i: _random_mask(adapter, g) for i in layers} for _ in range(3))
    child = {**a, layers[-1]: _random_mask(adapter, g)}
    order = token_order(data, 0)
    ev = StreamedEvaluator(SequentialModel(path, load_config(path)), data, reference=ref, order=order, batch_size=4,
                           cache_dir=tmp_path / "cache", store_bytes=1 << 30, store_dir=tmp_path / "states")
    ev.score([a], proxies="nll", n_tokens=40)
    ev.store.max_bytes = 2 * ev.store.bytes  # room for two candidates' states
    for cands in ([c], [a], [b]):
        ev.score(cands, proxies="nll", n_tokens=40)
    before = ev.work.computed
    got = ev.score([child], proxies=PROXIES, n_tokens=40)[0]
    assert got.values == evaluate(model, adapter, child, data, proxies=PROXIES, reference=ref, order=order,
                                  n_tokens=40, batch_size=4).values
    positions = len(select_sequences(data, order, 40)) * data.seq_len
    assert ev.work.computed - before == (n - layers[-1]) * positions
    ev.close()


def test_state_stores_sharing_a_directory_share_its_bound(tmp_path):
    """Two processes' stores in one directory (workers of one run): the bound holds for the directory, not for
    each of them, and a state one evicted is a miss for the other rather than a wrong read."""
    from evoreap.proxies.streamed import StateStore

    keys = ["%064x" % i for i in range(6)]
    t = torch.ones(4, 256)
    first, second = StateStore(tmp_path, 1 << 30), StateStore(tmp_path, 1 << 30)
    first.put(StateStore.name(keys[0], keys[0]), t)
    bound = 3 * first.bytes
    first.max_bytes = second.max_bytes = bound
    for i in range(1, 6):
        (first if i % 2 else second).put(StateStore.name(keys[i], keys[0]), t * i)
        on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
        assert on_disk <= bound, (i, on_disk, bound)
    assert len(list(tmp_path.iterdir())) == 3
    assert first.get(StateStore.name(keys[0], keys[0]), torch.device("cpu")) is None  # evicted by the other
    assert torch.equal(first.get(StateStore.name(keys[4], keys[0]), torch.device("cpu")), t * 4)  # the other's
    first.close()
    second.close()
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
