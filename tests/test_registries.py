"""Registries (criteria, proxies, samplers, architectures): a duplicate name is refused with a RegistryError (a
ValueError), an unknown name gets "did you mean", a plugin colliding with a built-in is skipped with a warning, and
every built-in is registered as soon as its registry module is imported (checked in a fresh interpreter, so that no
other import helps)."""

import dataclasses
import json
import logging
import subprocess
import sys

import pytest

import evoreap.criteria as criteria
from evoreap.adapters.spec import BY_MODEL_TYPE, SPECS, register_architecture
from evoreap.criteria import CRITERIA, list_criteria, register_criterion
from evoreap.errors import RegistryError, UsageError
from evoreap.proxies.registry import PROXIES, register_proxy
from evoreap.registry import Registry
from evoreap.search.samplers import make_sampler, register_sampler

BUILT_INS = {
    "evoreap.criteria:CRITERIA": ["reap", "frequency", "gate_mass", "ean", "reap_x_frequency", "max_activation",
                                  "random"],
    "evoreap.proxies.registry:PROXIES": ["nll", "kl", "esap", "top1"],
    "evoreap.search.samplers:SAMPLERS": ["evolution", "tpe", "cmaes", "random"],
    "evoreap.adapters.spec:BY_MODEL_TYPE": ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe",
                                            "gpt_oss"],
}


def test_registry_basics():
    r = Registry("widget", hint="see the docs")
    r.add("alpha", 1)
    r.add("beta", 2)
    assert r.names() == ("alpha", "beta") and list(r) == ["alpha", "beta"] and len(r) == 2
    assert "alpha" in r and "gamma" not in r and r.get("beta") == 2 and r.find("gamma") is None
    with pytest.raises(RegistryError, match="widget 'alpha' is already registered"):
        r.add("alpha", 3)
    assert r.get("alpha") == 1  # the first registration stands
    with pytest.raises(UsageError, match=r"unknown widget 'alpah'; did you mean alpha\? known: alpha, beta \(see"):
        r.get("alpah")
    with pytest.raises(RegistryError):
        r.add("", 4)
    assert r.pop("beta") == 2 and r.pop("beta", None) is None and r.names() == ("alpha",)
    assert issubclass(RegistryError, ValueError) and issubclass(RegistryError, UsageError)


# Imports the registry module with an empty stand-in for the evoreap package itself, so that the package's own
# __init__ (which imports the whole API) cannot register anything on the module's behalf.
_ALONE = """
import importlib.util, json, sys, types
spec = importlib.util.find_spec("evoreap")
pkg = types.ModuleType("evoreap")
pkg.__path__, pkg.__spec__, pkg.__file__ = list(spec.submodule_search_locations), spec, spec.origin
pkg.__version__ = "0"
sys.modules["evoreap"] = pkg
import {module} as m
watch = ("evoreap.api", "evoreap.evaluation", "evoreap.criteria", "evoreap.proxies.registry", "evoreap.search.samplers")
print(json.dumps([list(m.{name}.names()), sorted(k for k in watch if k in sys.modules and k != "{module}")]))
"""


@pytest.mark.parametrize("module_registry", sorted(BUILT_INS))
def test_every_built_in_is_registered_by_importing_its_registry_module_alone(module_registry):
    module, name = module_registry.split(":")
    out = subprocess.run([sys.executable, "-c", _ALONE.format(module=module, name=name)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    names, others = json.loads(out.stdout.strip().splitlines()[-1])
    assert names == BUILT_INS[module_registry]
    assert others == [], f"importing {module} also imported {others}"


def test_duplicate_criterion_is_refused():
    with pytest.raises(RegistryError, match="criterion 'reap' is already registered"):
        register_criterion("reap", "another reap")(lambda stats, min_count: stats.count)
    assert CRITERIA.get("reap").fn is criteria.reap
    register_criterion("test_dup_criterion", "first")(lambda stats, min_count: stats.count)
    try:
        with pytest.raises(RegistryError):
            register_criterion("test_dup_criterion", "second")(lambda stats, min_count: stats.count)
        assert CRITERIA.get("test_dup_criterion").description == "first"
    finally:
        CRITERIA.pop("test_dup_criterion")
    with pytest.raises(RegistryError, match="must be a non-empty word"):
        register_criterion("bad name", "spaces")


def test_duplicate_proxy_is_refused():
    with pytest.raises(RegistryError, match="proxy 'kl' is already registered"):
        register_proxy("kl", higher_is_better=False, needs_reference=False)(lambda inputs: inputs.valid.float())
    with pytest.raises(RegistryError, match="proxy 'top1' is already registered"):
        register_proxy("top1", higher_is_better=True, needs_reference=True)(lambda inputs: inputs.valid.float())
    assert PROXIES.get("kl").needs_reference


def test_duplicate_sampler_is_refused():
    with pytest.raises(RegistryError, match="sampler 'tpe' is already registered"):
        register_sampler("tpe", "another tpe")
    with pytest.raises(UsageError, match="did you mean cmaes"):
        make_sampler("cmaess", 0)
    with pytest.raises(UsageError, match="not an Optuna sampler"):
        make_sampler("evolution", 0)
    assert type(make_sampler("random", 0)).__name__ == "RandomSampler"


def test_duplicate_architecture_is_refused():
    qwen3 = SPECS[0]
    with pytest.raises(RegistryError, match="model type 'qwen3_moe' is already registered"):
        register_architecture(dataclasses.replace(qwen3, name="Other", model_types=("brand_new_moe", "qwen3_moe")))
    assert "brand_new_moe" not in BY_MODEL_TYPE  # nothing of a refused spec is registered
    with pytest.raises(RegistryError, match="unknown router kind"):
        register_architecture(dataclasses.replace(qwen3, name="Odd", model_types=("odd_moe",), router_kind="odd"))
    spec = register_architecture(dataclasses.replace(qwen3, name="Test-MoE", model_types=("test_arch_moe",)))
    try:
        assert BY_MODEL_TYPE.get("test_arch_moe") is spec
        with pytest.raises(RegistryError):
            register_architecture(spec)
    finally:
        BY_MODEL_TYPE.pop("test_arch_moe")


def test_criterion_plugin_colliding_with_a_built_in_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    (tmp_path / "evoreap_collide_plugin.py").write_text(
        "import torch\n"
        "from evoreap.criteria import register_criterion\n"
        "def loud(stats, min_count):\n"
        "    '''a plugin that wants the name reap'''\n"
        "    return -stats.max_norm\n"
        "@register_criterion('frequency', 'a module-registered plugin that wants the name frequency')\n"
        "def freq(stats, min_count):\n"
        "    return -stats.count\n")
    dist = tmp_path / "evoreap_collide_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evoreap-collide-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[evoreap.criteria]\nreap = evoreap_collide_plugin:loud\n"
                                           "collide_module = evoreap_collide_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(criteria, "_entry_points_loaded", False)
    monkeypatch.setattr(logging.getLogger("evoreap"), "propagate", True)  # the CLI tests may have turned it off
    try:
        with caplog.at_level(logging.WARNING, logger="evoreap.criteria"):
            names = [n for n, _ in list_criteria()]
        assert names.count("reap") == 1 and CRITERIA.get("reap").fn is criteria.reap
        assert CRITERIA.get("frequency").fn is criteria.frequency
        text = caplog.text
        assert "criterion plugin reap" in text and "skipped" in text and "collide_module" in text
    finally:
        sys.modules.pop("evoreap_collide_plugin", None)
