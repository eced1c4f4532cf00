"""Real services for the search tests: a throwaway PostgreSQL server and a headless Chromium.

PostgreSQL: Debian's binaries (``/usr/lib/postgresql/*/bin``) start a fresh cluster on
127.0.0.1 at a free port, in a temporary folder, with ``fsync`` off; ``initdb`` refuses to run
as root, so as root the cluster belongs to the ``postgres`` user (``runuser``).

Chromium: driven through the DevTools protocol over ``--remote-debugging-pipe`` (file
descriptors 3 and 4, NUL-separated JSON), so no driver binary, no open port and no extra
Python package is needed, and the console, uncaught exceptions and network requests are
observed directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import pwd
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimkit.measure.backends import get_backend

# ----------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL bin folder holding initdb and pg_ctl, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a throwaway PostgreSQL server; yield a SQLAlchemy URL to an empty database."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL binaries are not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="slimkit-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse root: run them as the postgres user
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    root.chmod(0o700)
    data, port = root / "data", _free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
            f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off", "start")
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "slimkit")
        yield f"postgresql://postgres@127.0.0.1:{port}/slimkit"
    finally:
        with contextlib.suppress(Exception):
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- Chromium


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    """A headless Chromium driven over the DevTools pipe."""

    def __init__(self) -> None:
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("chromium is not installed (apt-get install chromium)")
        self.profile = tempfile.mkdtemp(prefix="slimkit-chromium-")
        cmd_r, self._cmd_w = os.pipe()  # we write commands; chromium reads fd 3
        self._res_r, res_w = os.pipe()  # chromium writes fd 4; we read

        def wire_fds() -> None:  # in the child: our pipe ends become fds 3 and 4, whatever they were
            hi_r, hi_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(res_w, fcntl.F_DUPFD, 10)
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", "--disable-extensions", "--mute-audio",
             f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4, cmd_r, res_w), preexec_fn=wire_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)

    def _read(self, until: Any, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                msg = json.loads(raw)
                if until(msg):
                    return msg
                if "method" in msg:
                    self.events.append(msg)
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._res_r], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self._res_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = False,
             timeout: float = 30) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        wanted = self._id
        reply = self._read(lambda m: m.get("id") == wanted, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str, timeout: float = 30) -> None:
        """Navigate and wait for the load event (then a short settle for late console messages)."""
        self.events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        self._read(lambda m: m.get("method") == "Page.loadEventFired", timeout)
        with contextlib.suppress(TimeoutError):
            self._read(lambda m: False, 0.5)

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                        session=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries since the last ``open``."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log: " + p["entry"].get("text", ""))
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def screenshot(self, path: str | Path) -> None:
        import base64

        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=True)
        Path(path).write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=5)
        with contextlib.suppress(Exception):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for fd in (self._cmd_w, self._res_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------- small searches


@dataclass
class FailWhen:
    """Config of the test step ``test_fail``: raise when ``fail`` is set."""

    fail: bool = False


@contextlib.contextmanager
def failing_step() -> Iterator[None]:
    """Register a real recipe step ``test_fail`` (with a search space) for the duration of the block.

    Its space adds it only to trial 1, configured to raise, so that trial fails for real inside
    the search (as a broken method would) while the others complete.
    """
    from slimkit import pipeline as rc
    from slimkit.pipeline import _recipe

    def handler(ctx: Any, cfg: FailWhen) -> dict[str, Any]:
        if cfg.fail:
            raise RuntimeError("test_fail: this step fails on purpose")
        return {"failed": False}

    def space(trial: Any) -> FailWhen | None:
        return FailWhen(fail=True) if trial.number == 1 else None

    rc.register_step("test_fail", FailWhen, forbids={"exported"})(handler)
    rc.register_space("test_fail", order=55)(space)
    try:
        yield
    finally:
        _recipe._STEPS.pop("test_fail", None)


@dataclass
class OnTrial:
    """Config of a test step made by :func:`one_trial_step`: ``on`` in the one trial that runs it."""

    on: bool = False


@contextlib.contextmanager
def one_trial_step(name: str, action: Any, trial_number: int = 1) -> Iterator[None]:
    """Register a real recipe step ``name`` for the duration of the block: its space adds it only
    to trial ``trial_number``, where it calls ``action()`` (sleep, break the output folder...)."""
    from slimkit import pipeline as rc
    from slimkit.pipeline import _recipe

    def handler(ctx: Any, cfg: OnTrial) -> dict[str, Any]:
        if cfg.on:
            action()
        return {"ran": cfg.on}

    def space(trial: Any) -> OnTrial | None:
        return OnTrial(on=True) if trial.number == trial_number else None

    rc.register_step(name, OnTrial, forbids={"exported"})(handler)
    rc.register_space(name, order=55)(space)
    try:
        yield
    finally:
        _recipe._STEPS.pop(name, None)


def sleeping_step(trial_number: int = 1, seconds: float = 120.0) -> contextlib.AbstractContextManager[None]:
    """A step ``test_sleep`` that sleeps ``seconds`` in trial ``trial_number`` (a trial that hangs)."""
    return one_trial_step("test_sleep", lambda: time.sleep(seconds), trial_number)


# Every search the tests share (the pytest session is one process): arguments -> (folder, error).
_SEARCHES: dict[tuple, tuple[Path, Exception | None]] = {}

FAST = {"batch_sizes": (1, 16), "threads": 1, "max_seconds": 0.05, "finetune_batches": 3}

# which option object each flat argument of a test belongs to
_OPTION_OF = {
    "target": ("runtime", "batch_sizes", "threads", "max_seconds"),
    "budget": ("max_latency_ms", "min_throughput", "max_size_kb", "max_accuracy_drop"),
    "search": ("objective", "trials", "timeout", "trial_timeout", "sampler", "seed", "val_size", "verbose"),
    "store": ("out", "storage", "study", "overwrite"),
    "space": ("methods", "finetune_batches", "warm", "finalists", "final_epochs", "final_batches"),
}


def compress_options(**flat: Any) -> dict[str, Any]:
    """``compress``'s option objects from flat arguments, e.g. ``compress_options(trials=2, out=d, **FAST)``."""
    from slimkit.measure import Target
    from slimkit.search import Budget, CompressSpace, Search, Store

    classes = {"target": Target, "budget": Budget, "search": Search, "store": Store, "space": CompressSpace}
    unknown = set(flat) - {k for keys in _OPTION_OF.values() for k in keys}
    assert not unknown, f"not an option of compress: {unknown}"
    defaults = {"target": {"max_seconds": 1.0}}
    return {name: classes[name](**{**defaults.get(name, {}), **{k: v for k, v in flat.items() if k in keys}})
            for name, keys in _OPTION_OF.items()}


def small_search(root: Path, weights: Path, **kwargs: Any) -> tuple[Path, Exception | None]:
    """A real ``compress`` of lenet5 on digits, run once per session for each set of arguments.

    Returns the output folder and the :class:`NoFeasibleTrialError` it raised, if any. Callers
    must not change the folder (copy it first).
    """
    from slimkit.errors import NoFeasibleTrialError
    from slimkit.models import ModelRef
    from slimkit.search import compress

    key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
    if key not in _SEARCHES:
        out = root / f"search-{len(_SEARCHES)}"
        args = {**FAST, "methods": ["finetune"], "trials": 2, **kwargs}
        err = None
        with failing_step() if "test_fail" in (args.get("methods") or ()) else contextlib.nullcontext():
            try:
                compress(ModelRef("zoo:lenet5", weights=weights), "digits", **compress_options(out=out, **args))
            except NoFeasibleTrialError as e:
                err = e
        _SEARCHES[key] = (out, err)
    return _SEARCHES[key]


class ChosenTimes:
    """A latency backend that reports chosen numbers (real speed-ups belong in benchmarks): ``ort-cpu``,
    with the calls of an artifact whose file name starts with a given prefix
    taking that many extra milliseconds (the first prefix that matches)."""

    name = "ort-cpu"
    needs_onnx = True

    def __init__(self, ms: dict[str, float]):
        self.ms = ms
        self.real = get_backend("ort-cpu")

    def prepare(self, model, onnx_path, threads):
        runner = self.real.prepare(model, onnx_path, threads)
        delay = next((ms for prefix, ms in self.ms.items() if Path(onnx_path).name.startswith(prefix)), 0.0) / 1000

        class Slow:
            def __call__(self, x):
                time.sleep(delay)
                return runner(x)

            def layer_times(self, x, repeats):
                return runner.layer_times(x, repeats)

            def close(self):
                runner.close()

        return Slow()
