"""Optuna storage and trial plumbing shared by the search leader and its workers.

Every scored candidate is one Optuna trial: params ``k<layer>`` (keep counts), ``set_constraint("budget", ...)``
(<= 0 means within budget), and user attrs ``key`` (candidate + token count), ``tokens``, ``stage``,
``generation``, ``origin``, ``values`` and ``per_domain``. The leader enqueues the trials it needs; any process
(leader or worker) pops a WAITING trial, scores it and tells the result. Trials are owned by ``host:pid`` so that a
restarted leader can fail trials whose process is gone at once instead of waiting for a heartbeat to expire.

A trial being scored also beats: Optuna's own heartbeat on RDB storages (SQLite, PostgreSQL, MySQL), and a
``evoreap:beat`` system attr (wall-clock seconds) on storages without one (journal files). A trial whose beat is
older than the grace period is failed by the leader even when its owner ran on another machine; the leader then
asks for it again.

Every process that scores (the leader and each worker, on any machine) also announces itself in the study: a study
system attr ``evoreap:worker:<host:pid>`` holding its last beat, renewed every ``HEARTBEAT_INTERVAL`` seconds and
cleared when it stops (:func:`present`). This is the live-worker count a process sizes its share of a stage from
(:func:`live_workers`), kept in the storage itself (journal and RDB alike: no service besides it), and a worker whose
beat is older than the timeout is neither counted nor trusted with its trials: the leader fails them and asks for them
again, once. Beats are wall-clock seconds compared across machines, so their clocks must agree to well within the
timeout (NTP); a worker that reads a beat from its own future (another machine's clock ahead of its own) says so
once per worker (:func:`check_clocks`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import optuna
import sqlalchemy
from optuna.trial import TrialState

from evoreap.errors import UsageError
from evoreap.files import real

log = logging.getLogger(__name__)

OWNER_ATTR = "evoreap:owner"
BEAT_ATTR = "evoreap:beat"
WORKER_ATTR = "evoreap:worker:"  # + worker id: a study system attr with the worker's last beat (None: it stopped)
ENQUEUING_ATTR = "evoreap:enqueuing"  # the id of the worker enqueuing a stage right now (None: none is)
HEARTBEAT_INTERVAL = 15  # seconds between beats of a running trial and of a worker
GRACE_PERIOD = 60  # a running trial or a worker whose last beat is older than this is taken for dead
CLOCK_TOLERANCE = 10  # seconds a beat may lie in this machine's future before the clocks are said to disagree


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Worker:
    """A process that scores trials, as the study sees it: its id (``host:pid``, the owner of the trials it takes),
    the seconds between its beats, the seconds of silence after which a worker or a trial is taken for dead, and the
    clock beats are read from (wall-clock seconds; tests pass their own)."""

    id: str = field(default_factory=owner_id)
    interval: float = HEARTBEAT_INTERVAL
    timeout: float = GRACE_PERIOD
    clock: Callable[[], float] = time.time


def announce(study: optuna.Study, me: Worker, alive: bool = True) -> None:
    """One beat of worker ``me`` in the study (``alive=False``: it stops, and is no longer counted at once)."""
    study._storage.set_study_system_attr(study._study_id, WORKER_ATTR + me.id, me.clock() if alive else None)


def worker_beats(study: optuna.Study, attrs: dict[str, Any] | None = None) -> dict[str, float | None]:
    """Every worker that ever announced itself in the study (or in the study's system ``attrs``, read already): its
    last beat, None if it stopped."""
    if attrs is None:
        attrs = study._storage.get_study_system_attrs(study._study_id)
    return {k.removeprefix(WORKER_ATTR): v if isinstance(v, (int, float)) else None
            for k, v in attrs.items() if k.startswith(WORKER_ATTR)}


def _fresh(beat: float | None, now: float, timeout: float) -> bool:
    return beat is not None and now - beat <= timeout


def live_workers(study: optuna.Study, me: Worker | None = None, attrs: dict[str, Any] | None = None) -> list[str]:
    """The workers whose last beat is at most ``me.timeout`` old by ``me.clock``, always including ``me`` itself (it
    is asking, so it is alive), sorted."""
    me = me or Worker()
    now = me.clock()
    return sorted({w for w, beat in worker_beats(study, attrs).items() if _fresh(beat, now, me.timeout)} | {me.id})


def stage_incomplete(study: optuna.Study, me: Worker | None = None, attrs: dict[str, Any] | None = None) -> bool:
    """Whether another live worker is still enqueuing a stage (:func:`enqueue_stage`): a share sized now would be a
    share of the trials queued so far, not of the stage."""
    me = me or Worker()
    if attrs is None:
        attrs = study._storage.get_study_system_attrs(study._study_id)
    by = attrs.get(ENQUEUING_ATTR)
    return isinstance(by, str) and by != me.id and by in live_workers(study, me, attrs)


def check_clocks(study: optuna.Study, me: Worker, warned: set[str], attrs: dict[str, Any] | None = None) -> None:
    """Warn (once per worker, remembered in ``warned``) about each other worker whose last beat lies more than
    :data:`CLOCK_TOLERANCE` seconds in the future of ``me.clock``: their clocks disagree, and liveness compares beats
    across machines. The process whose clock is behind is the one that sees this, whichever side it is on."""
    now = me.clock()
    for w, beat in worker_beats(study, attrs).items():
        if w != me.id and w not in warned and beat is not None and beat - now > CLOCK_TOLERANCE:
            warned.add(w)
            log.warning("worker %s's clock is %.0f s ahead of this machine's: workers compare beats across machines "
                        "and take one silent for %g s for dead, so synchronise the clocks (NTP)", w, beat - now,
                        me.timeout)


@contextlib.contextmanager
def present(study: optuna.Study, me: Worker | None = None) -> Iterator[Worker]:
    """Announce ``me`` in the study and beat every ``me.interval`` seconds (a daemon thread, which also checks the
    other workers' clocks against this one's, :func:`check_clocks`) while the body runs; on leaving, clear the beat
    so that the others stop counting this worker at once."""
    me = me or Worker()
    announce(study, me)
    stop, warned = threading.Event(), set()

    def loop() -> None:
        while not stop.wait(me.interval):
            try:
                announce(study, me)
                check_clocks(study, me, warned)
            except Exception:  # a storage hiccup must not kill the worker; the next beat tries again
                pass

    thread = threading.Thread(target=loop, name="evoreap-worker-beat", daemon=True)
    thread.start()
    try:
        yield me
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):  # unreachable storage: the beat then simply grows old
            announce(study, me, alive=False)


@dataclass(frozen=True)
class StorageSpec:
    """A checked storage URL: ``kind`` is ``journal``, ``sqlite`` or ``server`` (PostgreSQL, MySQL); ``path`` is the
    file of a journal or SQLite storage."""

    url: str
    kind: str
    path: Path | None = None

    @property
    def shown(self) -> str:
        return mask_url(self.url)


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for every message, log line and file evoreap writes."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
        if parsed.password is not None:
            return parsed.render_as_string(hide_password=True)
        return url
    except Exception:  # not a SQLAlchemy URL: hide anything between "user:" and "@" all the same
        return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def _scrub(text: str, url: str) -> str:
    """A driver's message with the URL's password (if any) masked wherever it appears."""
    try:
        password = sqlalchemy.engine.make_url(url).password
    except Exception:
        password = None
    text = text.replace(url, mask_url(url))
    return text.replace(password, "***") if password and len(password) >= 3 else text


def _is_journal(url: str) -> bool:
    return url.startswith("journal://") or (url.endswith((".log", ".jsonl")) and "://" not in url)


def check_storage(url: str) -> StorageSpec:
    """Check a storage URL without opening, creating or connecting to anything: the scheme is known, its driver is
    installed, and a journal or SQLite file can be created where it points. Raises UsageError saying what to fix."""
    if _is_journal(url):
        path = Path(url.removeprefix("journal://")).expanduser()
        if not str(path).strip():
            raise UsageError(f"storage URL {url!r} names no file; use journal:///path/to/journal.log")
        _check_storage_file(path, url, "journal.log")
        return StorageSpec(url, "journal", path)
    hint = "use sqlite:///runs/NAME/study.db, postgresql://user:pass@host:port/db, or journal:///path/to/journal.log"
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:
        raise UsageError(f"storage URL {mask_url(url)!r} is not understood; {hint}") from None
    backend = parsed.get_backend_name()
    if backend == "postgres":
        raise UsageError(f"storage URL {mask_url(url)!r}: write postgresql://, not postgres://")
    if backend not in ("sqlite", "postgresql", "mysql"):
        raise UsageError(f"storage URL {mask_url(url)!r} is not understood (scheme {backend!r}); {hint}")
    try:
        dialect = parsed.get_dialect()
    except Exception:
        raise UsageError(f"storage URL {mask_url(url)!r} names a driver SQLAlchemy does not know "
                         f"({parsed.drivername!r}); {hint}") from None
    try:
        dialect.import_dbapi()
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        if parsed.drivername == "postgresql":  # no driver named: whichever of psycopg 3 and psycopg2 is installed
            for driver in ("psycopg", "psycopg2"):
                if driver != dialect.driver and importlib.util.find_spec(driver) is not None:
                    return check_storage(parsed.set(drivername=f"postgresql+{driver}")
                                         .render_as_string(hide_password=False))
        if backend == "postgresql":
            fix = ("install evoreap[postgres] (pip install 'evoreap[postgres]', which brings psycopg 3, the driver "
                   "SQLAlchemy uses for postgresql://)" if dialect.driver == "psycopg"
                   else f"install the {dialect.driver} driver, or write postgresql:// and install evoreap[postgres]")
        else:
            fix = f"install the {dialect.driver} driver (e.g. mysql+pymysql:// with pip install pymysql)"
        raise UsageError(f"storage URL {mask_url(url)} needs the Python module {missing}, which is not installed; "
                         f"{fix}") from None
    if backend != "sqlite":
        if not parsed.database:
            raise UsageError(f"storage URL {mask_url(url)} names no database; use "
                             f"{backend}://user:pass@host:port/DATABASE")
        return StorageSpec(url, "server")
    if parsed.database in (None, "", ":memory:"):
        raise UsageError(f"storage URL {url!r} is an in-memory database, which workers cannot share and a re-run "
                         "cannot resume; use sqlite:///path/to/study.db")
    path = Path(parsed.database).expanduser()
    _check_storage_file(path, url, "study.db")
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise UsageError(f"storage file {path} exists and is not a SQLite database; choose another path "
                                 "(or move that file away)")
    return StorageSpec(url, "sqlite", path)


def _check_storage_file(path: Path, url: str, example: str) -> None:
    if path.is_symlink() and not path.exists():
        raise UsageError(f"storage file {path} is a dangling symlink (to {os.readlink(path)}); pass a real path")
    if path.is_dir():
        raise UsageError(f"storage {mask_url(url)} points at the directory {path}; name a file in it, e.g. "
                         f"{path / example}")
    parent = real(path).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot create storage file {path}: {parent} is a file, not a directory; choose another "
                         "--storage path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create storage file {path}: {parent} is not writable; choose another --storage "
                         "path")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise UsageError(f"storage file {path} is not readable and writable; fix its permissions or choose another")


def probe_storage(spec: StorageSpec, timeout: float = 10.0) -> None:
    """Connect once to a database server and close again (creates no table): a wrong password or an unreachable
    host fails here, before any model is loaded. Journal and SQLite files are only checked (:func:`check_storage`),
    since opening them would create them."""
    if spec.kind != "server":
        return
    args = {"connect_timeout": int(timeout)}
    try:
        engine = sqlalchemy.create_engine(spec.url, connect_args=args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as e:  # sqlalchemy raises driver-specific errors
        raise UsageError(f"cannot open storage {spec.shown}: {_first_line(e, spec.url)}; check the URL, the "
                         "credentials and that the database is reachable") from None


def _first_line(e: BaseException, url: str) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    first = text.splitlines()[0].strip() if text else type(e).__name__
    return _scrub(first, url)


_SCHEMA_ATTEMPTS = 5


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: ``sqlite:///path``, ``postgresql://...``, ``mysql://...`` or a journal file
    (``journal:///path/to/file.log`` or a path ending in ``.log``/``.jsonl``). Checks it first
    (:func:`check_storage`); errors never show the password."""
    spec = check_storage(url)
    if spec.kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = str(spec.path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
        except OSError as e:
            raise UsageError(f"cannot open journal storage {path}: {e.strerror or e}; choose a writable path") \
                from None
    engine = {"connect_args": {"timeout": 60}} if spec.kind == "sqlite" else {"pool_pre_ping": True}
    for attempt in range(_SCHEMA_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in optuna 5 but are what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(spec.url, engine_kwargs=engine,
                                                  heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            # Two processes creating the tables of a new database at once (a leader and a worker started together):
            # PostgreSQL refuses the second CREATE TYPE/TABLE. The tables exist a moment later; open them then.
            if not re.search(r"duplicate key|already exists", str(e)):
                raise UsageError(f"cannot open storage {spec.shown}: {_first_line(e, url)}; check the URL, the "
                                 "credentials and that the database is reachable") from None
            if attempt == _SCHEMA_ATTEMPTS - 1:
                raise UsageError(f"cannot create the tables of storage {spec.shown}: another process kept creating "
                                 "them; start the workers again") from None
            time.sleep(0.5 * (attempt + 1))
        except Exception as e:  # sqlalchemy raises driver-specific errors
            raise UsageError(f"cannot open storage {spec.shown}: {_first_line(e, url)}; check the URL, the "
                             "credentials and that the database is reachable") from None
    raise AssertionError("unreachable")


def trials_by_key(study: optuna.Study, states: tuple[TrialState, ...]) -> dict[str, optuna.trial.FrozenTrial]:
    out = {}
    for t in study.get_trials(deepcopy=False, states=states):
        key = t.user_attrs.get("key")
        if key is not None and key not in out:
            out[key] = t
    return out


def _sqlite_path(storage: optuna.storages.BaseStorage) -> str | None:
    """The database file of a SQLite RDB storage (possibly behind Optuna's cache); None for any other storage."""
    backend = getattr(storage, "_backend", storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        return None
    url = sqlalchemy.engine.make_url(backend.url)
    return url.database if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
        else None


def _claim_lock(storage: optuna.storages.BaseStorage) -> contextlib.AbstractContextManager:
    """What serialises claims across processes: a lock file on SQLite storages, nothing elsewhere.

    Optuna's WAITING -> RUNNING check is atomic on PostgreSQL/MySQL (SELECT ... FOR UPDATE) and on journal files
    (log order), but not on SQLite, where two processes can both read WAITING and both take the trial (measured:
    32 double claims among 300 trials with 4 processes), scoring it twice and failing the second ``tell``. SQLite
    is single-host, so a lock file beside the database makes the check-and-set one step.
    """
    path = _sqlite_path(storage)
    return filelock.FileLock(path + ".claim.lock", timeout=600) if path else contextlib.nullcontext()


def pop_waiting(study: optuna.Study, me: Worker | None = None) -> optuna.trial.Trial | None:
    """Take one WAITING (enqueued) trial, atomically across processes; None when there is none.

    Unlike ``study.ask()`` this never creates a fresh trial from the sampler when the queue is empty.
    """
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if (trial := claim_trial(study, t, me)) is not None:
            return trial
    return None


def claim_trial(study: optuna.Study, t: optuna.trial.FrozenTrial, me: Worker | None = None
                ) -> optuna.trial.Trial | None:
    """Take the trial ``t`` (seen WAITING) for worker ``me`` (default: this process), atomically across processes;
    None if another process took it first."""
    me = me or Worker()
    storage = study._storage
    try:
        with _claim_lock(storage):
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return None
        storage.set_trial_system_attr(t._trial_id, OWNER_ATTR, me.id)
    except optuna.exceptions.UpdateFinishedTrialError:  # taken and finished (or failed) by someone else
        return None
    _beat(storage, t._trial_id, me.clock)
    return optuna.trial.Trial(study, t._trial_id)


def _native_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def _beat(storage: optuna.storages.BaseStorage, trial_id: int, clock: Callable[[], float] = time.time) -> None:
    """One beat of a running trial; a trial finished meanwhile (told, or failed by a leader) is left alone."""
    try:
        if _native_heartbeat(storage):
            storage.record_heartbeat(trial_id)
        else:
            storage.set_trial_system_attr(trial_id, BEAT_ATTR, clock())
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial_id: int, me: Worker | None = None) -> Iterator[None]:
    """Beat for ``trial_id`` every ``me.interval`` seconds while the body runs (a daemon thread)."""
    me = me or Worker()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(me.interval):
            try:
                _beat(study._storage, trial_id, me.clock)
            except Exception:  # a storage hiccup must not kill the scoring; the next beat tries again
                pass

    thread = threading.Thread(target=loop, name=f"evoreap-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_dead_trials(study: optuna.Study, me: Worker | None = None) -> int:
    """Fail RUNNING trials that nobody is scoring any more; returns how many were failed.

    Call it only from a process that holds no trial (the leader between rounds; it alone asks for failed trials
    again, so each is asked for once). A trial is dead when its owner is a process on this host that is gone, or
    this very process (a restarted leader that got the same pid, as in containers), or a worker whose announced beat
    (:func:`present`) is older than ``me.timeout`` seconds or that stopped, or when the trial's own beat is older than
    that (any host: Optuna's heartbeat on RDB storages, the ``evoreap:beat`` attr elsewhere).
    """
    me = me or Worker()
    host = socket.gethostname()
    storage = study._storage
    native = _native_heartbeat(storage)
    now = me.clock()
    workers = worker_beats(study)
    dead = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(OWNER_ATTR, "")
        h, _, pid = owner.rpartition(":")
        beat = t.system_attrs.get(BEAT_ATTR)
        started = t.datetime_start.timestamp() if t.datetime_start else None
        last = beat if isinstance(beat, (int, float)) else started  # killed before its first beat: its start
        if owner == me.id or (h == host and pid.isdigit() and not _alive(int(pid))):
            dead.append(t._trial_id)
        elif owner in workers and not _fresh(workers[owner], now, me.timeout):
            dead.append(t._trial_id)  # its worker went silent (killed, machine down) with a share in hand
        elif (not owner or not native) and last is not None and now - last > me.timeout:
            dead.append(t._trial_id)  # (not owner: killed between claiming the trial and signing it)
    failed = 0
    for trial_id in dead:
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed += 1
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
    if native:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
                optuna.storages.fail_stale_trials(study)
                failed += len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
        except Exception:  # heartbeat bookkeeping must never stop the search
            pass
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed worker stays a zombie until its parent (the leader itself) reaps it: that is dead too
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def enqueue(study: optuna.Study, params: dict[str, int], attrs: dict[str, Any]) -> None:
    study.enqueue_trial(params, user_attrs=attrs)


def enqueue_stage(study: optuna.Study, trials: list[tuple[dict[str, int], dict[str, Any]]],
                  me: Worker | None = None) -> None:
    """Enqueue a stage's ``(params, attrs)`` trials as one: Optuna enqueues one trial at a time, and a worker polling
    meanwhile would size its share from the first few (a share of 1 where 12 were coming, and no shared prefixes);
    workers that share by :func:`stage_incomplete` wait until the last one is queued. A leader killed midway leaves
    its id there, which counts only as long as its beat is fresh."""
    if not trials:
        return
    me = me or Worker()
    study._storage.set_study_system_attr(study._study_id, ENQUEUING_ATTR, me.id)
    try:
        for params, attrs in trials:
            enqueue(study, params, attrs)
    finally:
        study._storage.set_study_system_attr(study._study_id, ENQUEUING_ATTR, None)
