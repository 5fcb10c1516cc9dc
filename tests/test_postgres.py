"""Many workers on shared storage: a real PostgreSQL server on loopback, and a journal file.

`evoreap search --workers 4 --storage URL` must finish exactly the trials a single-process run needs (same keys,
none lost or duplicated, none left WAITING/RUNNING) and end with the single-process run's best or better.

The PostgreSQL server comes from ``initdb``/``pg_ctl`` (Debian: ``apt-get install postgresql``, which .ci/run
does); the test is skipped, saying why, only where those or psycopg (3, evoreap[postgres]) are missing or the server
does not start. evoreap connects with the README's URL form, ``postgresql://user:pass@host:port/db``, as a role that
must give its password over TCP (scram-sha-256), and never shows or stores that password.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from evoreap.pipeline.session import STUDY_NAME

SEARCH = ["--budget", "0.5", "--generations", "3", "--offspring", "4", "--population", "2",
          "--fidelities", "256,512,1024", "--survivors", "2,1", "--calib-tokens", "2048", "--heldout-tokens", "1024",
          "--seq-len", "64", "--batch-size", "8", "--no-plots"]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PG_USER, PG_PASSWORD = "evoreap", "Pg-s3cret-w0rd"


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL server on 127.0.0.1 (a free port) with an empty database ``evoreap_test`` owned by
    the role ``evoreap``, which logs in over TCP with its password only; stopped at the end. Yields the port."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install 'evoreap[postgres]')")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="evoreap-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the postgres user
        runuser = shutil.which("runuser")
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        if not runuser:
            pytest.skip("running as root and runuser is missing; cannot start PostgreSQL as another user")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = [runuser, "-u", "postgres", "--"]
    data, log, port = root / "data", root / "server.log", _free_port()

    def sh(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)

    # the superuser only over the server's own socket; TCP (what evoreap uses) needs a password
    r = sh(initdb, "-D", str(data), "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
           "--no-sync")
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
    r = sh(pg_ctl, "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start")
    if r.returncode != 0:
        text = log.read_text() if log.exists() else r.stderr
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {text.strip().splitlines()[-1:]}")
    try:
        with psycopg.connect(host=str(root), port=port, user="postgres", dbname="postgres", autocommit=True) as con:
            con.execute(f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}'")
            con.execute(f"CREATE DATABASE evoreap_test OWNER {PG_USER}")
        yield port
    finally:
        sh(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server):
    """The README's URL form, user and password included (no driver named: SQLAlchemy picks psycopg 3)."""
    return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{postgres_server}/evoreap_test"


def search(model: Path, runs: Path, cache: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "evoreap.cli", "search", "--model", str(model), "--runs-dir", str(runs),
                        "--cache-dir", str(cache), "--run", name, *SEARCH, *extra], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def summary(storage: str, run_dir: Path) -> dict:
    import optuna
    from optuna.trial import TrialState

    from evoreap.search.storage import open_storage

    st = open_storage(storage)
    names = [n for n in optuna.get_all_study_names(st) if n.startswith(f"{STUDY_NAME}-{run_dir.name}-")]
    assert len(names) == 1, names
    study = optuna.load_study(study_name=names[0], storage=st)
    trials = study.get_trials(deepcopy=False)
    complete = [t.user_attrs["key"] for t in trials if t.state == TrialState.COMPLETE]
    result = json.loads((run_dir / "result.json").read_text())
    return {"keys": complete, "states": {s.name: sum(t.state == s for t in trials) for s in TrialState},
            "best": result["best"], "best_value": result["best_value"],
            "workers": {t.system_attrs.get("evoreap:owner") for t in trials if t.state == TrialState.COMPLETE}}


@pytest.fixture(scope="module")
def single(small_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    search(small_model_dir, root / "runs", root / "cache", "one")
    s = summary(f"sqlite:///{root / 'runs' / 'one' / 'study.db'}", root / "runs" / "one")
    assert len(s["keys"]) == len(set(s["keys"]))
    return {**s, "cache": root / "cache"}


def check_many_workers(single: dict, many: dict) -> None:
    assert len(many["keys"]) == len(set(many["keys"])), "a candidate was scored twice"
    assert sorted(many["keys"]) == sorted(single["keys"]), "candidates lost or added"
    assert many["states"]["WAITING"] == 0 and many["states"]["RUNNING"] == 0
    assert many["best_value"] <= single["best_value"] + 1e-12
    assert many["best"] == single["best"]
    # how many processes scored is printed, not asserted: on a loaded 2-core box the spawned workers may need
    # longer to import torch than this small search takes (tests/test_faults.py kills a worker that did score)


def run_with_workers(model: Path, runs: Path, cache: Path, name: str, storage: str) -> str:
    """--workers 4 plus one worker started by hand with --worker, as on another machine (it starts first, so it
    is ready when the leader enqueues) and ends by itself once the leader marks the study done."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    remote = subprocess.Popen([sys.executable, "-m", "evoreap.cli", "search", "--model", str(model), "--runs-dir",
                               str(runs), "--cache-dir", str(cache), "--run", name, *SEARCH, "--storage", storage,
                               "--worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        leader = search(model, runs, cache, name, "--storage", storage, "--workers", "4")
        _, err = remote.communicate(timeout=120)
    finally:
        if remote.poll() is None:
            remote.kill()
    assert remote.returncode == 0, err.decode()[-2000:]
    return leader.stdout + leader.stderr + err.decode()


def test_four_workers_on_postgresql(small_model_dir, tmp_path, single, postgres_url):
    """The README's ``postgresql://user:pass@host:port/db`` as it stands; the password is in no output and in no
    file of the run (config.json, environment.json, worker logs), where the URL appears masked."""
    output = run_with_workers(small_model_dir, tmp_path / "runs", single["cache"], "pg", postgres_url)
    many = summary(postgres_url, tmp_path / "runs" / "pg")
    check_many_workers(single, many)
    assert PG_PASSWORD not in output
    run = tmp_path / "runs" / "pg"
    for f in run.rglob("*"):
        if f.is_file():
            assert PG_PASSWORD.encode() not in f.read_bytes(), f
    env = json.loads((run / "environment.json").read_text())
    assert env["storage"] == postgres_url.replace(PG_PASSWORD, "***")
    print(f"\npostgresql: {len(many['keys'])} trials (single process {len(single['keys'])}), "
          f"{len(many['workers'])} processes scored, states {many['states']}")


def test_wrong_password_is_one_line_without_it(small_model_dir, tmp_path, postgres_server, capsys):
    """A wrong password fails before the model is loaded, in one line that masks the password it was given."""
    from evoreap.cli import main

    url = f"postgresql://{PG_USER}:Wrong-passw0rd@127.0.0.1:{postgres_server}/evoreap_test"
    rc = main(["search", "--model", str(small_model_dir), "--runs-dir", str(tmp_path / "runs"), "--cache-dir",
               str(tmp_path / "cache"), "--run", "x", *SEARCH, "--storage", url])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert rc == 2 and len(lines) == 1, err
    assert "Wrong-passw0rd" not in err and "***" in lines[0] and "password" in lines[0].lower(), lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_readme_url_opens_a_storage(postgres_url):
    """``open_storage`` takes the README's URL (no driver named) and gives a working Optuna storage."""
    import optuna

    from evoreap.search.storage import open_storage

    study = optuna.create_study(storage=open_storage(postgres_url), study_name="readme-url", load_if_exists=True)
    study.enqueue_trial({"x": 1})
    assert study.study_name in optuna.get_all_study_names(open_storage(postgres_url))


def test_four_workers_on_a_journal_file(small_model_dir, tmp_path, single):
    url = f"journal://{tmp_path / 'journal' / 'journal.log'}"
    run_with_workers(small_model_dir, tmp_path / "runs", single["cache"], "jr", url)
    many = summary(url, tmp_path / "runs" / "jr")
    check_many_workers(single, many)
    print(f"\njournal: {len(many['keys'])} trials (single process {len(single['keys'])}), "
          f"{len(many['workers'])} processes scored, states {many['states']}")


def _open(url: str) -> None:
    from evoreap.search.storage import open_storage

    open_storage(url)


def test_processes_creating_the_tables_at_once(postgres_url):
    """A leader and workers started together on an empty database all create Optuna's tables; PostgreSQL refuses
    the second CREATE TYPE with a unique violation, which used to end a worker with "cannot open storage"."""
    import multiprocessing

    import psycopg

    schema = "race"
    with psycopg.connect(postgres_url, autocommit=True) as con:
        con.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        con.execute(f"CREATE SCHEMA {schema}")
    url = f"{postgres_url}?options=-csearch_path%3D{schema}"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_open, args=(url,)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 6
