"""Faults during a search: a trial that hangs, a signal that ends the search, a process that
died, an output folder that stops taking files.

- **Trial timeout** (``--trial-timeout``): :func:`deadline` arms ``SIGALRM`` around a trial's
  work; when it fires, :class:`TrialTimeoutError` fails that trial and the search goes on. The
  alarm interrupts Python code and ``time.sleep``; a single long call into C (one ONNX Runtime
  run) is interrupted when it returns.
- **SIGTERM / Ctrl-C** (a scheduler's time limit): :func:`stop_signals` turns both into an
  orderly stop. Inside a trial's work (:func:`armed`) the trial is stopped at once and recorded
  as failed (error ``Interrupted``); between trials (Optuna's own bookkeeping, a database
  transaction) the signal only asks the search to stop after the current step, so no
  transaction is cut in half. The caller then writes the finished trials' results and raises
  :class:`SearchInterrupted` (exit code 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM).
- **A process that died** (SIGKILL, a lost machine): :func:`recover_lost` puts a trial still
  RUNNING for a process of this machine that no longer exists back into the queue (WAITING):
  the same trial number is run again with its parameters, so a kill never costs a trial
  number, never duplicates one and never changes what the search draws. Trials of other
  machines are left to Optuna's heartbeat (failed after a grace period, then retried).
- **Reproducible draws**: :func:`per_trial_seed` reseeds a named sampler before each trial
  from ``(seed, trial number)``, so what a trial draws does not depend on how many times the
  search was restarted (only on the trials before it, as for any sampler).
- **An output folder that stops taking files** (read-only, full disk): :func:`write_error`
  turns the ``OSError`` into a :class:`~slimkit.errors.SlimkitError` that names the folder
  and the cause; the study (its database) is untouched, so the same command resumes.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import SlimkitError

__all__ = ["TrialTimeoutError", "Interrupted", "SearchInterrupted", "deadline", "armed", "stop_signals",
           "StopSignals", "recover_lost", "per_trial_seed", "write_error", "write_cause", "writable",
           "this_worker", "signal_name"]

# a trial with no ``worker`` attribute this old was created by a process that died at once
UNCLAIMED_S = 5.0
# the errors of a folder that stopped taking files
WRITE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST,
                errno.EIO}


class TrialTimeoutError(Exception):
    """A trial ran past ``--trial-timeout``: it is recorded as failed and the search goes on."""


class _Alarm(BaseException):
    """Raised by the ``SIGALRM`` handler: a ``BaseException`` so that no ``except Exception`` in a
    step swallows it; the trial's guard turns it into :class:`TrialTimeoutError`."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C inside a trial (Optuna records a ``KeyboardInterrupt`` as a failed trial)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal_name(signum)}")
        self.signum = signum


class SearchInterrupted(SlimkitError):
    """The search was stopped by a signal after writing the finished trials' results; exit code
    128 + the signal (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


def signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- trial timeout


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise :class:`TrialTimeoutError` if the block runs longer than ``seconds`` (``None``: no
    limit; outside the main thread, where no signal handler can run, no limit either). The
    previous ``SIGALRM`` handler and timer are restored afterwards."""
    if not seconds or not _main_thread():
        yield
        return

    def ring(signum: int, frame: Any) -> None:
        raise _Alarm()

    previous = signal.signal(signal.SIGALRM, ring)
    old_delay, _ = signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    except _Alarm:
        raise TrialTimeoutError(f"stopped after {seconds:g} s: the trial hit the trial timeout "
                                f"(--trial-timeout {seconds:g})") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_delay:
            signal.setitimer(signal.ITIMER_REAL, old_delay)


# ----------------------------------------------------------------------------- SIGTERM / Ctrl-C


class StopSignals:
    """SIGTERM and SIGINT while a search runs: :attr:`signum` is the first one received."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_trial = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if self.in_trial and first:
            self.in_trial = False
            raise Interrupted(signum)

    def callback(self, study: Any, trial: Any) -> None:
        """An Optuna callback: stop the search after this trial once a signal came."""
        if self.signum is not None:
            study.stop()

    def install(self) -> None:
        if not _main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


_ACTIVE: list[StopSignals] = []


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """SIGTERM and Ctrl-C turned into an orderly stop while the block runs (see the module doc)."""
    stop = StopSignals()
    stop.install()
    _ACTIVE.append(stop)
    try:
        yield stop
    except KeyboardInterrupt:  # Interrupted, or a Ctrl-C that came before the handler was set
        stop.signum = stop.signum or signal.SIGINT
    except BaseException:
        if stop.signum is None:
            raise
        # a signal cut Optuna's bookkeeping short; the study's transactions are whole, so the
        # trial in flight is either recorded or still RUNNING (recover_lost puts it back)
    finally:
        _ACTIVE.remove(stop)
        stop.restore()


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """A trial's work: a stop signal interrupts it at once (one that came already stops it here)."""
    stop = _ACTIVE[-1] if _ACTIVE else None
    if stop is None:
        yield
        return
    if stop.signum is not None:
        raise Interrupted(stop.signum)
    stop.in_trial = True
    try:
        yield
    finally:
        stop.in_trial = False


# ----------------------------------------------------------------------------- lost trials


def this_worker() -> dict[str, Any]:
    """Who runs a trial (its ``worker`` attribute): this machine and process."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_lost(study: Any) -> list[int]:
    """Put back into the queue the trials still RUNNING for a dead process of this machine
    (returns their numbers); their parameters stay, so they run again as they were drawn.

    A trial is this machine's when its ``worker`` attribute names this host (set by the
    sampler hook of :func:`per_trial_seed`, or by the trial's recorder, milliseconds after the
    trial is created). A trial that never got a ``worker`` was killed in those milliseconds: it
    is lost once it is :data:`UNCLAIMED_S` seconds old (this waits for a younger one).
    """
    from optuna.trial import TrialState

    storage = study._storage
    host = socket.gethostname()
    lost: list[int] = []
    for _ in range(3):
        now = datetime.datetime.now()
        young = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            w = t.user_attrs.get("worker")
            if w:
                dead = w.get("host") == host and int(w.get("pid", -1)) != os.getpid() and not _alive(int(w["pid"]))
            else:
                age = (now - (t.datetime_start or now)).total_seconds()
                dead = age > UNCLAIMED_S
                if not dead:
                    young.append(UNCLAIMED_S - age)
            if dead:
                with contextlib.suppress(Exception):
                    storage.record_heartbeat(t._trial_id)  # fresh: no other process fails it as stale meanwhile
                with contextlib.suppress(Exception):
                    if storage.set_trial_state_values(t._trial_id, state=TrialState.WAITING):
                        lost.append(t.number)
        if not young:
            break
        time.sleep(min(max(young) + 0.1, UNCLAIMED_S))
    return sorted(lost)


# ----------------------------------------------------------------------------- reproducible draws


def _rngs(obj: Any, depth: int = 0) -> Iterator[Any]:
    import numpy as np
    from optuna.samplers import BaseSampler

    for value in vars(obj).values():
        if isinstance(value, np.random.RandomState):
            yield value
        elif isinstance(getattr(value, "rng", None), np.random.RandomState):
            yield value.rng  # Optuna's LazyRandomState
        elif isinstance(value, BaseSampler) and depth < 2:
            yield from _rngs(value, depth + 1)


def per_trial_seed(sampler: Any, seed: int) -> Any:
    """``sampler`` reseeded before each trial from ``(seed, trial number)``, and marking the trial
    as this process's at once (so that :func:`recover_lost` knows it)."""
    before = sampler.before_trial

    def before_trial(study: Any, trial: Any) -> None:
        with contextlib.suppress(Exception):
            study._storage.set_trial_user_attr(trial._trial_id, "worker", this_worker())
        for i, rng in enumerate(_rngs(sampler)):
            rng.seed((seed * 1_000_003 + trial.number * 7919 + i) % (2 ** 32))
        before(study, trial)

    sampler.before_trial = before_trial
    return sampler


# ----------------------------------------------------------------------------- unwritable output


def write_cause(e: BaseException) -> OSError | None:
    """The ``OSError`` of a folder that stopped taking files behind ``e`` (``e`` itself, or what a
    step wrapped it into: an export failure, a step error), or ``None``."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno in WRITE_ERRNOS:
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def writable(folder: Path) -> bool:
    """Whether ``folder`` (created if needed) takes a new file now."""
    probe = Path(folder) / f".slimkit-probe-{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError:
        return False
    return True


def write_error(e: OSError, folder: Path, what: str, *, study: str) -> SlimkitError:
    """The clear error of an output folder that stopped taking files."""
    cause = e.strerror or type(e).__name__
    where = f" ({e.filename})" if e.filename else ""
    return SlimkitError(f"cannot write {what} into {folder}: {cause}{where}. The study ({study}) is intact: make the "
                        "folder writable or free some space, then run the same command again to resume.")
