"""Optuna storage and trial plumbing shared by the search leader and its workers.

Every scored candidate is one Optuna trial: params ``k<layer>`` (keep counts), ``set_constraint("budget", ...)``
(<= 0 means within budget), and user attrs ``key`` (candidate + token count), ``tokens``, ``stage``,
``generation``, ``origin``, ``values`` and ``per_domain``. The leader enqueues the trials it needs; any process
(leader or worker) pops a WAITING trial, scores it and tells the result. Trials are owned by ``host:pid`` so that a
restarted leader can fail trials whose process is gone at once instead of waiting for a heartbeat to expire.
"""

from __future__ import annotations

import os
import socket
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from evoreap.errors import UsageError

OWNER_ATTR = "evoreap:owner"


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: ``sqlite:///path``, ``postgresql://...``, ``mysql://...`` or a journal file
    (``journal:///path/to/file.log`` or a path ending in ``.log``/``.jsonl``)."""
    if url.startswith("journal://") or url.endswith((".log", ".jsonl")) and "://" not in url:
        path = url.removeprefix("journal://")
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not scheme.startswith(("sqlite", "postgresql", "mysql")):
        raise UsageError(f"storage URL {url!r} is not understood; use sqlite:///runs/NAME/study.db, "
                         "postgresql://user:pass@host/db, or journal:///path/to/journal.log")
    engine = {"connect_args": {"timeout": 60}} if scheme.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in optuna 5 but are what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=15, grace_period=60)
    except Exception as e:  # sqlalchemy raises driver-specific errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot open storage {url}: {first}; check the URL and that the database is reachable") \
            from None


def trials_by_key(study: optuna.Study, states: tuple[TrialState, ...]) -> dict[str, optuna.trial.FrozenTrial]:
    out = {}
    for t in study.get_trials(deepcopy=False, states=states):
        key = t.user_attrs.get("key")
        if key is not None and key not in out:
            out[key] = t
    return out


def pop_waiting(study: optuna.Study) -> optuna.trial.Trial | None:
    """Take one WAITING (enqueued) trial, atomically across processes; None when there is none.

    Unlike ``study.ask()`` this never creates a fresh trial from the sampler when the queue is empty.
    """
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        storage.set_trial_system_attr(t._trial_id, OWNER_ATTR, owner_id())
        return optuna.trial.Trial(study, t._trial_id)
    return None


def fail_dead_trials(study: optuna.Study) -> int:
    """Fail RUNNING trials whose owner process on this host is gone, and any whose heartbeat went stale."""
    host = socket.gethostname()
    failed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(OWNER_ATTR, "")
        h, _, pid = owner.rpartition(":")
        if h == host and pid.isdigit() and not _alive(int(pid)):
            try:
                study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                failed += 1
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
    storage = study._storage
    if callable(getattr(storage, "is_heartbeat_enabled", None)) and storage.is_heartbeat_enabled():
        try:
            optuna.storages.fail_stale_trials(study)
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
    return True


def enqueue(study: optuna.Study, params: dict[str, int], attrs: dict[str, Any]) -> None:
    study.enqueue_trial(params, user_attrs=attrs)
