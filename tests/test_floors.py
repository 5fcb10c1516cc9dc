"""Per-domain floors in the search (--floor): parsing, Optuna constraints, infeasible candidates ranked after
feasible ones, floor seeds, an unreachable floor reported before the search; and --repair at the end of a search."""

import json

import optuna
import pytest

from evoreap.errors import UsageError
from evoreap.recovery.floors import Floor, constraints, parse_floors, penalized
from evoreap.recovery.store import Repair

from test_search_cli import search


def test_parse_floors_takes_the_proxys_direction():
    floors = parse_floors("tools:esap=0.95, code:kl=0.2")
    assert floors == (Floor("tools", "esap", 0.95, True), Floor("code", "kl", 0.2, False))
    per = {"tools": {"esap": 0.93, "kl": 0.1}, "code": {"esap": 0.8, "kl": 0.15}}
    c = constraints(floors, per)
    assert c == {"floor:tools:esap": pytest.approx(0.02), "floor:code:kl": pytest.approx(-0.05)}
    assert penalized(0.3, c) > 1e5 and penalized(0.3, {"a": -0.1}) == 0.3
    assert penalized(0.3, {"a": 0.01}) < penalized(0.1, {"a": 0.02})  # closer to feasible ranks first
    for bad in ("tools:esap", "tools=0.9", "tools:esap=x", ":esap=1", "tools:esap=0.9,tools:esap=0.8"):
        with pytest.raises(UsageError):
            parse_floors(bad)
    with pytest.raises(UsageError, match="did you mean 'esap'"):
        parse_floors("tools:esapp=0.9")
    with pytest.raises(UsageError, match="no 'poetry' tokens"):
        constraints(parse_floors("poetry:kl=1"), per)


def test_search_with_floors_and_repair(small_model_dir, tmp_path, capfd):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    # code KL can never be below 0 (unreachable: reported), tools KL below 50 always holds
    code = search(small_model_dir, runs, cache, "--budget", "0.5", "--run", "fl", "--floor",
                  "code:kl=0,tools:kl=50", "--repair", "router", "--no-plots", "--generations", "0")
    assert code == 0
    assert "floor code kl <= 0 is not met by any seed" in capfd.readouterr().err
    run = runs / "fl"
    floors = json.loads((run / "floors.json").read_text())
    assert set(floors["seeds"]) >= {"uniform", "floor:code", "floor:tools"}
    url = f"sqlite:///{run / 'study.db'}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(set(t.constraints) >= {"budget", "floor:code:kl", "floor:tools:kl"} for t in done)
    for t in done:  # every candidate misses the code floor: its value is the penalty plus its violation
        assert t.constraints["floor:code:kl"] > 0 and t.value == pytest.approx(penalized(0, t.constraints))
        assert t.constraints["floor:code:kl"] == pytest.approx(t.user_attrs["per_domain"]["code"]["kl"])
    seeded = {tuple(t.params[f"k{i}"] for i in range(4)) for t in done if t.user_attrs.get("generation") == 0}
    assert tuple(floors["seeds"]["floor:tools"]["counts"]) in seeded
    result = json.loads((run / "result.json").read_text())
    assert "searched + repair (router)" in result["heldout"]
    rep = Repair.load(run / "best_allocation.repair.safetensors")
    assert rep.meta["params"] == "router"
    repaired, searched = (result["heldout"][k]["values"]["kl"] for k in ("searched + repair (router)", "searched"))
    assert (repaired < searched) if rep.accepted else repaired == pytest.approx(searched, rel=1e-9)
