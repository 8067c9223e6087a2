"""A long tune's studies kept across sessions: the tuning benchmarks' scratch folders (benchmarks/runs/) do not outlive
the machine they ran on, so, while they tune, every study of the folder's study.db is copied into a JSON file under
benchmarks/results/ (committed), and a later run whose scratch folder is gone rebuilds study.db from it before
tuning: the finished trials count toward the budget and steer the sampler and the pruner as if they had never left.
A trial that was running when the copy was last made comes back failed (its process is gone), so `protege tune`
replaces it. The final runs are not kept: they start over (each fits in a session)."""
from __future__ import annotations

import contextlib
import json
import threading
from datetime import datetime
from pathlib import Path
from typing import Iterator

from protege.files import write_atomic
from protege.logs import quiet
from protege.stages.tune_study import open_storage

EVERY_S = 60


def snapshot(storage, recipe_file: Path) -> dict:
    """Every study of ``storage``: its attributes and its trials (params with their distributions, values, the
    per-step reports, times), with the recipe the folder tunes."""
    import optuna
    from optuna.distributions import distribution_to_json

    studies = {}
    for name in optuna.study.get_all_study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        studies[name] = {"user_attrs": study.user_attrs, "trials": [
            {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
             "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()},
             "user_attrs": t.user_attrs, "system_attrs": t.system_attrs,
             "start": t.datetime_start.isoformat() if t.datetime_start else None,
             "end": t.datetime_complete.isoformat() if t.datetime_complete else None}
            for t in study.get_trials(deepcopy=False)]}
    return {"recipe": recipe_file.read_text(), "studies": studies}


def _counts(snap: dict) -> dict[str, int]:
    return {name: len(s["trials"]) for name, s in snap["studies"].items()}


def _behind(have: dict, saved: dict) -> list[str]:
    """The studies of which ``saved`` holds more trials than ``have``."""
    mine = _counts(have)
    return [name for name, n in _counts(saved).items() if n > mine.get(name, 0)]


def restore(folder: Path, state: Path, recipe_file: Path) -> bool:
    """Rebuild ``folder``/study.db from ``state`` when the folder has none; returns whether it did. A study.db that
    holds fewer trials than ``state`` (an older scratch folder) is refused: tuning on would overwrite the newer file."""
    if not state.is_file():
        return False
    saved = json.loads(state.read_text())
    if saved["recipe"] != recipe_file.read_text():
        raise SystemExit(f"{state} holds the studies of another recipe than {recipe_file}; delete {state} to tune from scratch")
    db = folder / "study.db"
    if db.exists():
        behind = _behind(snapshot(open_storage(None, folder)[0], recipe_file), saved)
        if behind:
            raise SystemExit(f"{db} holds fewer trials of {', '.join(behind)} than {state} (an older scratch folder): delete "
                             f"{folder} to continue from {state}")
        return False
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _rebuild(open_storage(None, folder)[0], saved)
    except BaseException:  # (a half-built study.db would be taken for the real one on the next run)
        db.unlink(missing_ok=True)
        raise
    return True


def _rebuild(storage, saved: dict) -> None:
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import FrozenTrial, TrialState

    for name, s in saved["studies"].items():
        with quiet():
            study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        for k, v in s["user_attrs"].items():
            study.set_user_attr(k, v)
        for t in sorted(s["trials"], key=lambda t: t["number"]):  # (the storage numbers them in this order)
            running = t["state"] == "RUNNING"
            study.add_trial(FrozenTrial(
                number=t["number"], state=TrialState.FAIL if running else TrialState[t["state"]], value=t["value"],
                datetime_start=t["start"] and datetime.fromisoformat(t["start"]),
                datetime_complete=(t["end"] and datetime.fromisoformat(t["end"])) or (datetime.now() if running else None),
                params=t["params"], distributions={k: json_to_distribution(d) for k, d in t["distributions"].items()},
                user_attrs=t["user_attrs"],
                system_attrs={**t["system_attrs"], **({"fail_reason": "its process ended with an earlier session"} if running else {})},
                intermediate_values={int(k): v for k, v in t["intermediate_values"].items()}, trial_id=0))


@contextlib.contextmanager
def saving(folder: Path, state: Path, recipe_file: Path) -> Iterator[None]:
    """Copy ``folder``'s studies into ``state`` every minute while the block runs, and once more at its end. The
    database is opened here, before the tune (a folder holding only study.db is one `protege tune` takes as new),
    so the copying thread never creates it nor touches the process's logging set-up."""
    folder.mkdir(parents=True, exist_ok=True)
    storage, _ = open_storage(None, folder)
    stop = threading.Event()

    def save() -> None:
        snap = snapshot(storage, recipe_file)
        if state.is_file():
            old = json.loads(state.read_text())
            if _behind(snap, old):  # (never a copy with fewer trials over a fuller one)
                return
        text = json.dumps(snap, indent=1)
        if not state.is_file() or state.read_text() != text:
            write_atomic(state, text)

    def loop() -> None:
        told = False
        while not stop.wait(EVERY_S):
            try:
                save()
            except Exception as e:  # (a copy that fails now is made a minute later)
                if not told:
                    print(f"could not copy the studies into {state} ({type(e).__name__}: {e}); trying again each minute", flush=True)
                    told = True

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    try:
        yield
    except BaseException:
        stop.set()
        worker.join()
        with contextlib.suppress(Exception):  # (the tune's own error is the one to show)
            save()
        raise
    stop.set()
    worker.join()
    save()
