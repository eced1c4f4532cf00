"""Where a search lives: its Optuna storage, the study, and the study kit every search uses.

The default storage is a SQLite file in the output folder (``DIR/study.db``), so every search
is resumable: the same command again loads the study and goes on. ``--storage
postgresql://...`` lets several processes or machines share one study; ``slimkit worker``
joins it knowing only the storage and the study name, because the study holds the whole
search configuration (:class:`~slimkit.search.SearchRecord`) and the baseline figures in its
user attributes.

The kit, shared by ``compress`` and ``nas``: :func:`open_place` (overwrite cleaning, resume
detection, the output folder, the storage), :func:`open_or_resume` (create the study or check
its stored settings against the current ones), :func:`ensure_baseline`, :func:`join_study`
(a worker's side), :func:`make_sampler`, :func:`quiet_optuna`, :func:`optimize`.

Heartbeats mark a trial whose process died (SIGKILL, a lost machine) as failed once it has
been silent for :data:`GRACE_S` seconds; that trial is then retried once with the same
parameters. A trial's completion is one database transaction, so a kill at any moment loses
no completed trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _console, _io
from ..data import DataBundle
from ..errors import ConfigError, SlimkitError
from ._options import SAMPLERS, Store
from ._record import BASELINE_ATTR, DIRECTIONS, FINISHED, METRICS, RESULT_FILES, STUDY_ATTR, SearchRecord

__all__ = ["open_storage", "default_storage", "redact", "file_sha256", "study_names", "validation_subset",
           "quiet_optuna", "make_sampler", "clean_outputs", "count_finished", "finished_states", "trial_counts",
           "StudyPlace", "open_place", "open_or_resume", "ensure_baseline", "Joined", "join_study", "optimize",
           "check_worker_args", "worker_sampler", "worker_seed", "HEARTBEAT_S", "GRACE_S"]

HEARTBEAT_S = 5
GRACE_S = 20
# what each kind of search is called in messages
_WHAT = {"compress": "search", "nas": "architecture search"}
_HOLDS = {"compress": "a slimkit compress search", "nas": "an architecture search (slimkit nas)"}
_NOT = {"compress": "a compress search", "nas": "an architecture search"}


# ----------------------------------------------------------------------------- storage


def file_sha256(path: str | Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_storage(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def redact(url: str) -> str:
    """The storage URL without its password, for messages and files."""
    return re.sub(r"(//[^:/@]+:)[^@/]*@", r"\1***@", url)


def open_storage(url: str) -> Any:
    """An Optuna RDB storage with heartbeats (stale trials fail, then retry once)."""
    import optuna

    if not re.match(r"^(sqlite|postgresql|postgres|mysql)(\+\w+)?://", url):
        raise SlimkitError(f"--storage must be a database URL such as postgresql://user:password@host:5432/db or "
                           f"sqlite:///path/study.db; got '{redact(url)}'.")
    url = re.sub(r"^postgres://", "postgresql://", url)
    kwargs: dict[str, Any] = {}
    _check_sqlite_file(url)
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # several processes may share one file
    else:
        kwargs["pool_pre_ping"] = True
    try:
        for attempt in range(4):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return optuna.storages.RDBStorage(
                        url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
            except Exception as e:
                # two processes opening a new database at once race to create its schema; the loser
                # finds it made (a unique or "already exists" error) and opens it as it is
                raced = "alembic_version" in str(e) or "already exists" in str(e)
                if not raced or attempt == 3:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")
    except ImportError as e:
        raise SlimkitError(f"cannot open the storage {redact(url)}: {e} (PostgreSQL needs the 'psycopg' "
                           "package: pip install 'psycopg[binary]').") from None
    except Exception as e:  # sqlalchemy's OperationalError and friends
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlimkitError(f"cannot open the storage {redact(url)}: {first}. Check that the database server runs, "
                           "that the URL's host, port, user and database are right, and that it accepts this "
                           "machine.") from None


_SQLITE_MAGIC = b"SQLite format 3\x00"


def _check_sqlite_file(url: str) -> None:
    """Refuse a ``sqlite:///FILE`` whose FILE exists but is not a SQLite database (before SQLAlchemy
    reports it as a server problem). A missing or empty file becomes a new study database."""
    m = re.match(r"^sqlite(\+\w+)?:///([^?]+)", url)
    if not m or m.group(2) == ":memory:":
        return
    path = Path(m.group(2))
    if not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return

    expected = "give sqlite:///FILE for a new file or a study database slimkit wrote (DIR/study.db)"

    def check(p: Path) -> None:
        with open(p, "rb") as f:
            if f.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
                raise SlimkitError(f"study database {p} is not a SQLite database (no SQLite header at its start); "
                                   f"{expected}.")

    _io.read_file(path, "study database", check, expected=expected)


def study_names(storage: Any) -> list[str]:
    import optuna

    with contextlib.suppress(Exception):
        return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    return []


def validation_subset(data: DataBundle, size: int | None, seed: int) -> DataBundle:
    """``data`` with at most ``size`` validation examples (a fixed random subset, by ``seed``).

    Trials are judged on the validation split after every fine-tune epoch; on a large split a
    subset makes trials quicker (at the price of a noisier accuracy: about
    ``sqrt(p (1 - p) / size)``). The test split, which the final figures use, is untouched.
    """
    if size is None or size >= len(data.x_val):
        return data
    import torch

    idx = torch.randperm(len(data.x_val), generator=torch.Generator().manual_seed(seed + 104729))[:size]
    return dataclasses.replace(data, x_val=data.x_val[idx], y_val=data.y_val[idx])


# ----------------------------------------------------------------------------- Optuna


def quiet_optuna() -> None:
    """Optuna's own logging off: slimkit prints one line per trial itself."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_sampler(sampler: str | Any, *, seed: int | None, trials: int) -> Any:
    """The Optuna sampler for a name (``--sampler``); an Optuna sampler object is used as is.

    Constraints come from ``trial.set_constraint``.

    >>> type(make_sampler("random", seed=0, trials=10)).__name__
    'RandomSampler'
    """
    import optuna

    if not isinstance(sampler, str):
        return sampler
    startup = max(4, min(10, trials // 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-feature warnings of multivariate TPE, GP
        if sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True,
                                              constant_liar=True, warn_independent_sampling=False)
        if sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, trials // 4)))
        if sampler == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
        if sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if sampler == "grid":
            return optuna.samplers.BruteForceSampler(seed=seed)
    raise ConfigError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}.", field="sampler")


def count_finished(study: Any) -> int:
    return sum(t.state.name in FINISHED for t in study.get_trials(deepcopy=False))


def finished_states() -> tuple[Any, ...]:
    from optuna.trial import TrialState

    return tuple(getattr(TrialState, s) for s in FINISHED)


def trial_counts(study: Any) -> dict[str, int]:
    """``{"complete": n, "pruned": n, "fail": n}`` of the study's trials."""
    trials = study.get_trials(deepcopy=False)
    return {s.lower(): sum(t.state.name == s for t in trials) for s in FINISHED}


def optimize(study: Any, objective: Callable[[Any], Any], *, n_trials: int | None, timeout: float | None,
             callbacks: Sequence[Any] = ()) -> None:
    """``study.optimize`` as every search runs it: a failing trial does not stop the search."""
    study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(Exception,), gc_after_trial=True,
                   callbacks=list(callbacks))


# ----------------------------------------------------------------------------- open or resume


def clean_outputs(out: Path, storage_given: bool, extra: Iterable[str] = ()) -> None:
    """``--overwrite``: remove a previous search's files and folders (never anything else)."""
    for name in (*RESULT_FILES, *extra):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    shutil.rmtree(out / "trials", ignore_errors=True)
    if not storage_given:
        for suffix in ("", "-journal", "-wal", "-shm"):
            (out / f"study.db{suffix}").unlink(missing_ok=True)


@dataclass
class StudyPlace:
    """Where a study lives, opened: its folder, storage URL and object, its name, and whether
    the storage already holds it (a resumed search)."""

    out: Path
    url: str
    name: str
    storage: Any
    resuming: bool
    shared: bool

    def existing(self) -> Any | None:
        """The study as stored, or ``None`` when the storage does not hold it yet."""
        import optuna

        if self.name not in study_names(self.storage):
            return None
        return optuna.load_study(study_name=self.name, storage=self.storage)


def open_place(store: Store, *, inputs: Iterable[str | Path | None] = (), extra: Iterable[str] = ()) -> StudyPlace:
    """Open a search's place: with ``store.overwrite`` remove the previous search (its files,
    ``extra`` ones too, and its study), prepare the output folder for a new search (refusing one
    that holds another run), open the storage."""
    import optuna

    quiet_optuna()
    out = store.out_path
    url = store.storage or default_storage(out)
    name = store.study_name
    if store.overwrite:
        clean_outputs(out, store.storage is not None, extra)
    if out.exists() and not out.is_dir():
        raise SlimkitError(f"--out {out} exists and is a file, not a folder; choose a folder path.")
    if store.storage is None:
        resuming = (out / "study.db").exists()
        if not resuming:
            _io.prepare_out_dir(out, overwrite=store.overwrite, inputs=inputs)
        storage = open_storage(url)
    else:
        storage = open_storage(url)
        resuming = name in study_names(storage)
        if resuming and store.overwrite:
            optuna.delete_study(study_name=name, storage=storage)
            resuming = False
        if not resuming:
            _io.prepare_out_dir(out, overwrite=store.overwrite, inputs=inputs)
    return StudyPlace(out, url, name, storage, resuming, store.storage is not None)


def open_or_resume(place: StudyPlace, record: SearchRecord, *,
                   on_create: Callable[[Any], None] | None = None) -> Any:
    """The study at ``place``: created with ``record`` (then ``on_create(study)``), or loaded and
    its stored settings checked against ``record`` (another kind of search, or other settings
    that the trials' figures depend on, are refused). The stored record is updated: the
    objective, the sampler... may change between runs."""
    import optuna

    directions: list[Any] = list(DIRECTIONS)
    st = optuna.create_study(study_name=place.name, storage=place.storage, directions=directions,
                             load_if_exists=True)
    stored = st.user_attrs.get(STUDY_ATTR)
    what = _WHAT.get(record.kind, "search")
    if stored is None:
        if st.get_trials(deepcopy=False):
            raise SlimkitError(f"study '{place.name}' in {redact(place.url)} was not made by slimkit {record.kind}; "
                               "choose another --study name.")
        st.set_metric_names(list(METRICS))
        st.set_user_attr(STUDY_ATTR, record.to_data())
        if on_create is not None:
            on_create(st)
        return st
    old = SearchRecord.from_data(stored)
    if old.kind != record.kind:
        raise SlimkitError(f"{place.out} holds {_HOLDS.get(old.kind, old.kind)}, study '{place.name}', not "
                           f"{_NOT.get(record.kind, record.kind)}; choose another --out (or --study), or pass "
                           "--overwrite to replace it.")
    diffs = record.differences(old)
    if diffs:
        raise SlimkitError(
            f"{place.out} already holds {what} '{place.name}' with other settings ({'; '.join(diffs)}). Its trials "
            "were measured under those settings: run the same command to resume it, pass --overwrite to start a new "
            "search there, or choose another --out (or --study).")
    st.set_user_attr(STUDY_ATTR, record.to_data())
    return st


def ensure_baseline(study: Any, measure: Callable[[], dict[str, Any]], *, status: str) -> dict[str, Any]:
    """The study's baseline figures: stored ones, or ``measure()`` once (showing ``status``) and stored."""
    baseline = study.user_attrs.get(BASELINE_ATTR)
    if baseline is None:
        with _console.status(status):
            baseline = measure()
        study.set_user_attr(BASELINE_ATTR, baseline)
    return baseline


# ----------------------------------------------------------------------------- a worker's side


@dataclass
class Joined:
    """A study a worker joined: the study, its record and baseline, the storage URL."""

    study: Any
    record: SearchRecord
    baseline: dict[str, Any]
    url: str


def check_worker_args(trials: int, total: int | None, timeout: float | None) -> None:
    if trials < 1:
        raise ConfigError(f"must be >= 1, got {trials}.", where="--trials")
    if total is not None and total < 1:
        raise ConfigError(f"must be >= 1, got {total}.", where="--total")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"must be > 0 seconds, got {timeout}.", where="--timeout")


def join_study(storage: str, study: str, *, weights: str | Path | None = None) -> Joined:
    """Load a study a search started, with its record and baseline; ``weights``: this machine's
    copy of the input weights (its hash must match the stored one)."""
    import optuna

    quiet_optuna()
    store = open_storage(storage)
    names = study_names(store)
    if study not in names:
        known = f" It holds: {', '.join(names)}." if names else " It holds no study."
        raise SlimkitError(f"no study '{study}' in {redact(storage)}.{known} Start one with slimkit compress ... "
                           f"--storage URL --study {study} (--trials 0 only sets it up).")
    st = optuna.load_study(study_name=study, storage=store)
    stored = st.user_attrs.get(STUDY_ATTR)
    if stored is None:
        raise SlimkitError(f"study '{study}' in {redact(storage)} was not made by slimkit compress.")
    record = SearchRecord.from_data(stored)
    baseline = st.user_attrs.get(BASELINE_ATTR)
    if baseline is None:
        raise SlimkitError(f"study '{study}' has no baseline yet: its slimkit {record.kind} is still measuring it; "
                           "start the worker again in a moment.")
    if weights is not None:
        if file_sha256(weights) != record.weights_sha256:
            raise SlimkitError(f"--weights {weights} is not the file this study started from "
                               f"({record.weights}; its SHA-256 differs).")
        record.weights = str(Path(weights).resolve())
    elif record.weights and not Path(record.weights).is_file():
        raise SlimkitError(f"the study's weights {record.weights} are not on this machine; copy them here and pass "
                           "--weights PATH.")
    return Joined(st, record, baseline, storage)


def worker_sampler(record: SearchRecord, override: Any = None) -> tuple[Any, str]:
    """A worker's sampler and its name: ``override`` (a name or an Optuna sampler object), else the
    study's preset (a study started with a sampler object, which no study stores, falls back to ``tpe``)."""
    sampler = override or (record.sampler if record.sampler in SAMPLERS else "tpe")
    return sampler, sampler if isinstance(sampler, str) else type(sampler).__name__


def worker_seed(record: SearchRecord) -> int:
    """A worker's sampler seed: the study's, moved by this process's id (workers draw apart)."""
    return record.seed + 1 + os.getpid()
