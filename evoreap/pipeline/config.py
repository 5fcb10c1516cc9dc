"""The typed settings of one search run, and the single source of ``evoreap search``'s options.

Every field of :class:`SearchConfig` is one setting, with its default, help text and option group as field metadata.
The CLI builds its options from these fields (nothing is stated twice), a run directory stores the resolved config as
``config.json``, and ``evoreap search --config FILE`` (JSON or YAML) replays it, with any option given on the command
line overriding the file. Config files are untrusted input: unknown keys and values of the wrong type are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evoreap.criteria import DEFAULT_CRITERION
from evoreap.errors import SettingError, UsageError
from evoreap.files import write_json_atomic
from evoreap.recovery.floors import parse_floors
from evoreap.recovery.repair import PARAM_SETS
from evoreap.search.samplers import SAMPLERS
from evoreap.search.storage import mask_url

MASKED = "***"  # what a stored storage URL shows in place of its password
_MAX_CONFIG_BYTES = 1 << 20


def setting(default: Any, help: str, *, group: str, choices: tuple[str, ...] | None = None,
            metavar: str | None = None, cli: bool = True) -> Any:
    """A config field: ``default`` and ``help`` feed the CLI option and the docs; ``cli=False`` keeps it off the
    command line (set by the library or derived)."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "metavar": metavar,
                                            "cli": cli})


@dataclass(frozen=True)
class SearchConfig:
    """Every setting of ``evoreap search`` / :func:`evoreap.search`. Field names are the CLI's options with ``_`` for
    ``-`` (``calib_tokens`` is ``--calib-tokens``)."""

    # -- model ------------------------------------------------------------------------------------------------------
    model: str | None = setting(None, "local model directory or hub id (None: the bundled demo MoE)",
                                group="model", metavar="MODEL")
    trust_remote_code: bool = setting(False, "allow a model directory's own Python code to run (read it first)",
                                      group="model")
    device: str = setting("cpu", "torch device, e.g. cpu, cuda, cuda:1", group="model")
    dtype: str = setting("float32", "compute dtype: float32, bfloat16 or float16", group="model")
    device_map: str | None = setting(None, "place the model through accelerate: auto, balanced, balanced_low_0, "
                                           "sequential, or a JSON file of module -> device (an index, cpu, disk); "
                                           "None: all on --device", group="model", metavar="MAP")
    max_memory: str | None = setting(None, "GB (e.g. 2) without --device-map: a model whose weights exceed it is "
                                           "streamed layer by layer from its shards (as --offload); with "
                                           "--device-map, memory for accelerate's placement: GB on --device or "
                                           "DEVICE=SIZE pairs (0=20GiB,cpu=60GiB), the rest offloaded to disk",
                                     group="model", metavar="MEM")
    offload: bool = setting(False, "stream the model from its safetensors shards one decoder layer at a time "
                                   "(models larger than memory): the whole model is never loaded; each stage of "
                                   "candidates reads every layer once", group="model")
    seed: int = setting(0, "seed for data order, sampling and the search", group="model")
    # -- budget (give one) ------------------------------------------------------------------------------------------
    budget: float | None = setting(None, "fraction of routed-expert parameters kept, in (0, 1]", group="budget",
                                   metavar="F")
    budget_params: int | None = setting(None, "routed-expert parameters kept", group="budget", metavar="N")
    budget_gb: float | None = setting(None, "size of the routed experts after quantisation, in GB (with --bits)",
                                      group="budget", metavar="G")
    bits: float | None = setting(None, "bits per weight for --budget-gb", group="budget", metavar="B")
    # -- search -----------------------------------------------------------------------------------------------------
    space: str = setting("default", "search space: a name in search_spaces/ or a YAML path", group="search")
    criterion: str = setting(DEFAULT_CRITERION, "which experts a layer keeps (evoreap observe --list-criteria)",
                             group="search")
    min_count: int | None = setting(None, "routed tokens below which an expert's mean score is not trusted "
                                          "(None: the criteria's default)", group="search")
    proxy: str = setting("kl", "candidate score, a registered proxy: kl, esap, nll or top1", group="search")
    proxy_weights: str | None = setting(None, "per-domain weights of the proxy, e.g. code:2,drama:1", group="search")
    sampler: str = setting("evolution", "evolution, or a registered Optuna sampler (tpe, cmaes, random) over a "
                                        "repaired continuous encoding", group="search")
    generations: int = setting(20, "generations of the evolutionary search", group="search")
    population: int = setting(4, "elites kept per generation", group="search")
    offspring: int = setting(12, "children per generation", group="search")
    fidelities: tuple[int, ...] = setting((4096, 16384, 32768), "tokens per racing stage (the last is the full "
                                                                "fidelity), comma-separated", group="search")
    survivors: tuple[int, ...] = setting((4, 2), "candidates passing stage 1 and stage 2", group="search")
    guided: float = setting(0.5, "share of saliency-guided mutations, in [0, 1]", group="search")
    trials: int | None = setting(None, "stop after this many scored trials", group="search")
    time_limit: float | None = setting(None, "stop after this many seconds", group="search")
    token_budget: int | None = setting(None, "stop after scoring this many tokens", group="search")
    # auto picks the population engine for a resident model: on the demo's main search it computes 0.573 of the
    # layer work of one forward per candidate and takes 0.86x single's wall time, same best allocation
    # (benchmarks/population.py); a streamed model (--offload / --max-memory) always scores whole stages
    engine: str = setting("auto", "how candidates are scored: auto (population for a resident model, streamed "
                                  "from the shards with --offload / --max-memory), single (one masked forward each) "
                                  "or population (a whole stage layer by layer, shared prefixes computed once); "
                                  "same values", group="search", choices=("auto", "single", "population"))
    state_cache_gb: float = setting(1.0, "memory for hidden states the population engine keeps across "
                                         "generations, in GB (0: none); streamed, the memory for a stage's states "
                                         "and as much disk for those kept across stages", group="search",
                                    metavar="GB")
    floor: str | None = setting(None, "per-domain floors, DOMAIN:PROXY=BOUND comma-separated (e.g. "
                                      "tools:esap=0.95,code:kl=0.2): candidates that miss one are infeasible",
                                group="search", metavar="FLOORS")
    repair: str | None = setting(None, "repair the best allocation at the end (evoreap repair): router, router+norm, "
                                       "router+scale, router+norm+scale or router+norm+scale+lowrank (not for a "
                                       "quantized checkpoint)", group="run", metavar="PARAMS")
    # -- data -------------------------------------------------------------------------------------------------------
    data: str = setting("demo", "search data spec (split 'search' for bundled domains)", group="data")
    calib_data: str = setting("demo", "calibration data for saliency (split 'calibration')", group="data")
    calib_tokens: int = setting(65536, "calibration tokens", group="data")
    heldout_data: str = setting("demo", "final evaluation data (split 'heldout')", group="data")
    heldout_tokens: int = setting(32768, "held-out tokens for the final table", group="data")
    seq_len: int = setting(256, "tokens per packed sequence", group="data")
    batch_size: int = setting(8, "sequences per forward pass", group="data")
    reference_top_k: int = setting(64, "top-K log-probs of the unpruned model cached for kl/esap", group="data")
    allow_overlap: bool = setting(False, "run even if calibration/search/held-out data overlap", group="data")
    chat_template: str | None = setting(None, "Jinja chat template file for chat ('messages') records (None: the "
                                              "tokenizer's own; chats on a tokenizer without one are refused)",
                                        group="data", metavar="FILE")
    # -- run --------------------------------------------------------------------------------------------------------
    run: str | None = setting(None, "run name (None: model, budget and time; an unfinished run with the same "
                                    "settings is resumed)", group="run")
    runs_dir: str = setting("runs", "where run directories live", group="run")
    storage: str | None = setting(None, "Optuna storage URL (None: sqlite:///RUN/study.db); postgresql://... or "
                                        "journal:///path.log for many workers", group="run")
    workers: int = setting(1, "worker processes on this machine", group="run")
    worker: bool = setting(False, "only score queued trials of the run named by --run (start on other machines "
                                  "with the same --run and --storage; each process takes its share of a stage "
                                  "among the workers live in the storage)", group="run")
    cache_dir: str | None = setting(None, "observation/reference cache (None: $EVOREAP_CACHE or ~/.cache/evoreap)",
                                    group="run")
    export: str | None = setting(None, "export the best allocation to this directory", group="run")
    overwrite: bool = setting(False, "let --export replace an earlier evoreap export", group="run")
    no_plots: bool = setting(False, "skip the pictures and report", group="run")
    quiet: bool = setting(False, "no progress bars", group="run", cli=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name), None))

    def check(self) -> None:
        """The settings that need no model: counts, shares and combinations (SettingError names the first wrong
        one). The budget, space, criterion and proxy are checked against the model's config by the session."""
        at_least = [("workers", 1), ("batch_size", 1), ("seq_len", 2), ("calib_tokens", 1), ("heldout_tokens", 1),
                    ("reference_top_k", 1), ("min_count", 0), ("trials", 1), ("token_budget", 1)]
        for name, low in at_least:
            value = getattr(self, name)
            if value is not None and value < low:
                why = " (a sequence of L tokens scores L-1 next-token predictions)" if name == "seq_len" else ""
                raise SettingError(name, f"{{name}} must be at least {low}{why}, got {value}")
        for name, low in (("generations", 0), ("population", 1), ("offspring", 1)):
            if getattr(self, name) < low:
                raise SettingError(name, f"{{name}} must be >= {low}, got {getattr(self, name)}")
        if not 0.0 <= self.state_cache_gb < math.inf:
            raise SettingError("state_cache_gb", f"{{name}} must be a size in GB >= 0, got {self.state_cache_gb}")
        if not 0.0 <= self.guided <= 1.0:
            raise SettingError("guided", f"{{name}} is a share of mutations, in [0, 1]; got {self.guided}")
        if self.time_limit is not None and not 0 < self.time_limit < math.inf:
            raise SettingError("time_limit", f"{{name}} must be a positive number of seconds, got {self.time_limit}")
        f = self.fidelities
        if len(f) != 3 or sorted(f) != list(f) or min(f) <= 0:
            raise SettingError("fidelities", f"{{name}} needs three increasing token counts, got {list(f)}")
        s = self.survivors
        if len(s) != 2 or min(s) < 1 or s[1] > s[0]:
            raise SettingError("survivors", f"{{name}} needs two counts, the second not larger, got {list(s)}")
        if not SAMPLERS.find(self.sampler):
            raise SettingError("sampler", f"{{name}}: {SAMPLERS.unknown_message(self.sampler)}")
        if self.floor:
            try:
                parse_floors(self.floor)
            except UsageError as e:
                raise SettingError("floor", f"{{name}}: {e}") from None
        if self.repair is not None and self.repair not in PARAM_SETS:
            raise SettingError("repair", f"{{name}} {self.repair!r} is not one of {', '.join(PARAM_SETS)}")
        if self.worker and self.run is None:  # else a worker elsewhere would make a run of its own and wait on it
            raise SettingError("worker", "{name} needs --run NAME: the run name the leader logs on its set-up line")

    # -- files ------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; a storage URL's password is masked (a run directory is shareable)."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.metadata["cli"]}
        if out["storage"]:
            out["storage"] = mask_url(out["storage"])
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> SearchConfig:
        if not isinstance(data, dict):
            raise UsageError(f"{where} is not a search config: expected a mapping of settings")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                close = [k for k in known if k.startswith(str(key)[:4])]
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise UsageError(f"{where}: unknown setting {key!r}{hint}")
        values = {k: _coerce(known[k], v, where) for k, v in data.items()}
        if isinstance(values.get("storage"), str) and MASKED in values["storage"]:
            raise UsageError(f"{where}: the storage URL's password was masked when the run was stored; pass "
                             "--storage with the full URL")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> SearchConfig:
        """A JSON or YAML file of settings, or a run directory's ``config.json`` (its ``config`` entry)."""
        import yaml

        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "config.json"
        if p.is_file() and p.stat().st_size > _MAX_CONFIG_BYTES:
            raise UsageError(f"config file {path} is larger than {_MAX_CONFIG_BYTES >> 20} MiB; it is not a "
                             "search config")
        try:
            text = p.read_text(encoding="utf-8")
            data = yaml.safe_load(text) if p.suffix in (".yaml", ".yml") else json.loads(text)
        except FileNotFoundError:
            raise UsageError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, RecursionError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            kind = "YAML" if p.suffix in (".yaml", ".yml") else "JSON"
            raise UsageError(f"config file {path} cannot be read as {kind} ({first}); pass a config.json that "
                             "evoreap search wrote, or a file of settings") from None
        if isinstance(data, dict) and isinstance(data.get("config"), dict) and "identity" in data:
            data = data["config"]  # a run directory's config.json
        return cls.from_dict(data, str(path))

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    def replace(self, **changes: Any) -> SearchConfig:
        return dataclasses.replace(self, **changes)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(SearchConfig)


def _coerce(f: dataclasses.Field, value: Any, where: str | None) -> Any:
    """``value`` checked against the field's type (JSON lists become tuples); a wrong type is a SettingError
    (``where`` names the file it came from)."""
    hint = _hints()[f.name]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    prefix = f"{where}: " if where else ""
    if value is None:
        if optional:
            return None
        raise SettingError(f.name, prefix + "{name} must not be empty")
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)  # nan: refused by the range checks
        value = float(value) if ok else value
    elif base is str:
        ok = isinstance(value, str)
    else:  # tuple[int, ...]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    if not ok:
        raise SettingError(f.name, prefix + f"{{name}} must be {_type_name(base)}{' or null' if optional else ''}, "
                                            f"got {value!r:.60}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise SettingError(f.name, prefix + f"{{name}} must be one of {', '.join(choices)}, got {value!r:.60}")
    return value


def _type_name(base: Any) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        base, "a list of whole numbers")
