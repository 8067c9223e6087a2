"""The Optuna study of `protege tune` shared by processes and machines: opening its database (SQLite in the tune
folder, or a --storage URL), the trials of processes that died, the budget of finished trials every process counts
the same way, and each process's sampler seed. stages/tune.py runs the trials."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

from ..errors import RecipeError
from ..files import exclusive
from ..logs import quiet

log = logging.getLogger("protege.stages.tune")  # (its lines are the tune's)


def open_storage(url: Optional[str], out: Path):
    """The Optuna storage: a SQLite file in the tune folder, or the database URL given (several machines). Heartbeats
    let a process find trials whose process died."""
    import optuna

    given = url
    url = url or f"sqlite:///{(out / 'study.db').resolve()}"
    try:
        with quiet(), _creating(url):  # (heartbeats are marked experimental)
            return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120), url
    except Exception as e:  # sqlalchemy's own errors: a bad URL, a database that cannot be reached, a missing driver
        if given is None:
            raise
        raise RecipeError(f"--storage: cannot open the study database ({type(e).__name__}: {str(e).splitlines()[0][:140]}); give "
                          f"a database URL such as sqlite:////shared/tune.db or postgresql://user:password@host/db") from None


@contextlib.contextmanager
def _creating(url: str) -> Iterator[None]:
    """Hold an exclusive flock on ``<database>.lock`` beside a SQLite database file while Optuna opens it: two
    processes started together would otherwise both create its tables, and one fails (a UNIQUE constraint on
    alembic_version). A lock file of its own, not the database: closing a handle on the database would drop SQLite's
    own (POSIX) locks of this process. Other databases, in-memory and URI-style SQLite names, and a lock file that
    cannot be made (a missing or read-only folder: Optuna's own error, if any, is the one to show) go unguarded."""
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
        name = u.database if u.get_backend_name() == "sqlite" and "uri" not in u.query else None
    except Exception:  # (a URL SQLAlchemy cannot read: its error, through Optuna, is the one to show)
        name = None
    with contextlib.ExitStack() as guard:
        lock = Path(name + ".lock") if name and name != ":memory:" and not name.startswith("file:") else None
        if lock is not None and lock.parent.is_dir():  # (exclusive would make a missing folder)
            with contextlib.suppress(OSError):
                guard.enter_context(exclusive(lock))
        yield


def shown_url(url: str) -> str:
    """A storage URL as it may be written into a file: without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def fail_dead_trials(study, storage) -> None:
    """Trials still marked running whose process (on this machine) is gone: failed now, so they are replaced."""
    from optuna.trial import TrialState

    me = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
        if host == me and pid is not None and not _alive(int(pid)):
            try:
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except (RuntimeError, ValueError):  # another process resuming at the same moment failed it first
                continue
            log.info(f"tune: trial {t.number} was running in a process that ended (pid {pid}); marked failed, it will be replaced")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a trial of this very process cannot be running before it starts one
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finished(study) -> int:
    """Finished trials toward the budget (a trial stopped past it is not one of them)."""
    from optuna.trial import TrialState

    return sum(not t.user_attrs.get("beyond_budget")
               for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def settle(study, storage, kind: str) -> None:
    """Wait until no trial of the study is running: another process's trial stops at its next check now that the
    budget is full, and a dead process's trial is failed (on this machine at once, elsewhere by its heartbeat). Then
    every process of the tune sees the same finished trials, and ``counted`` the same first N."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    told = False
    while True:
        fail_dead_trials(study, storage)
        with quiet():  # (heartbeats are marked experimental)
            fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if not told:
            log.info(f"tune {kind}: waiting for {len(running)} trial(s) other processes are running (each stops at its next "
                     f"check: the study holds its finished trials)")
            told = True
        time.sleep(5)


def sampler_seed(seed: int, trials: int, running: int) -> int:
    """The sampler's seed for a process starting on a study that holds ``trials`` trials, ``running`` of them running:
    the recipe's seed mixed with both counts (numpy's SeedSequence), so that processes joining one study draw
    unrelated values. (Nearby plain seeds do not guarantee that: numpy's generators seeded 0 and 7920 draw almost the
    same first numbers, so a second process once repeated the first one's trial.)"""
    import numpy as np

    return int(np.random.SeedSequence([seed, trials, running]).generate_state(1)[0])


def all_trials(storage, name: str) -> list:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []


def delete_study(storage, name: str) -> None:
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass


def counted(study, trials: int) -> list:
    """The trials the budget counts: the first ``trials`` to finish (complete or pruned; by end time, then number).
    A trial another process was running when the budget filled is not among them (it is stopped at its next check, or,
    started by an older protege, ends past the budget), so every process of a tune picks the same best trial."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if not t.user_attrs.get("beyond_budget")]
    return sorted(done, key=lambda t: (t.datetime_complete, t.number))[:trials]
