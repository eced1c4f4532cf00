"""The CLI's options are declared once, on the option objects' fields, and generated for every command."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import slimkit
from slimkit.cli import app
from slimkit.commands._app import SEED, command, option, options
from slimkit.errors import ConfigError
from slimkit.measure import Target
from slimkit.models import ModelRef
from slimkit.search import Store
from slimkit.training import TrainConfig

SOURCE = Path(slimkit.__file__).parent

# Flags every command takes from one declaration (a field's metadata).
ONCE = ["--out", "--lr", "--threads", "--batch", "--seed", "--overwrite", "--model", "--weights", "--trust-pickle"]

# The declarations allowed besides the option objects', each a flag with another meaning there.
OWN_MEANING = {
    ("commands/nas.py", "--batch"): "latency-table measures at one batch size (an int)",
    ("commands/nas.py", "--out"): "latency-table writes one file, not a run folder",
    ("commands/nas.py", "--overwrite"): "latency-table replaces that file",
    ("commands/search.py", "--out"): "worker: where this machine keeps its trials (optional)",
    ("commands/search.py", "--weights"): "worker: a local copy of the study's input weights",
}

_DECLARED = re.compile(r'(?:"flag":\s*|typer\.Option\(\s*)"(--[a-z][a-z-]*)')


def _commands() -> dict[str, dict[str, object]]:
    """``{command: {flag: click option}}`` of the real app."""
    group = typer.main.get_command(app)
    return {name: {o: p for p in cmd.params for o in p.opts} for name, cmd in group.commands.items()}


def _meta(cls: type, name: str) -> dict:
    return dict(next(f.metadata for f in dataclasses.fields(cls) if f.name == name))


def test_each_shared_flag_is_declared_in_one_place():
    where: dict[str, list[str]] = {flag: [] for flag in ONCE}
    for path in sorted(SOURCE.rglob("*.py")):
        rel = path.relative_to(SOURCE).as_posix()
        for flag in _DECLARED.findall(path.read_text()):
            if flag in where and (rel, flag) not in OWN_MEANING:
                where[flag].append(rel)
        implicit = re.findall(r"\b(out|lr|threads|batch|seed|overwrite|model|weights|trust_pickle): Annotated\[",
                              path.read_text())  # typer.Option(help=...) on a parameter named like the flag
        assert not [n for n in implicit if (rel, f"--{n.replace('_', '-')}") not in OWN_MEANING], (rel, implicit)
    assert {flag: len(files) for flag, files in where.items()} == {flag: 1 for flag in ONCE}, where


def test_commands_share_the_target_flags_and_override_only_defaults():
    cmds = _commands()
    target_flags = [_meta(Target, f.name)["flag"] for f in dataclasses.fields(Target) if "flag" in f.metadata]
    assert target_flags == ["--target", "--batch", "--threads", "--max-seconds"]

    def described(name: str) -> dict[str, tuple]:
        return {flag: (cmds[name][flag].help, cmds[name][flag].default) for flag in target_flags}

    assert described("apply") == described("profile") == described("distill") == described("decompose")
    assert described("profile")["--batch"] == ("Batch sizes to time, comma separated.", "1,64")
    assert cmds["profile"]["-b"] is cmds["profile"]["--batch"] and cmds["apply"]["-t"] is cmds["apply"]["--target"]
    assert cmds["compress"]["--max-seconds"].default == 1.0 and cmds["profile"]["--max-seconds"].default == 2.0
    model_flags = {"--model", "-m", "--weights", "-w", "--trust-pickle"}
    for name in ("profile", "apply", "sensitivity", "lottery", "deep-compress", "decompose", "compress"):
        assert model_flags <= set(cmds[name]), name
        assert cmds[name]["--model"].help == _meta(ModelRef, "spec")["help"]
    outs = {name: str(cmds[name]["--out"].default) for name in ("train", "apply", "compress", "lottery")}
    assert outs == {"train": "runs/train", "apply": "runs/apply", "compress": "runs/compress", "lottery": "runs/lottery"}
    assert cmds["lottery"]["--lr"].help == cmds["train"]["--lr"].help == _meta(TrainConfig, "lr")["help"]
    assert cmds["decompose"]["--lr"].default == 5e-4 and cmds["train"]["--lr"].default == 3e-3  # FROM_SCRATCH (issue 13)


@pytest.mark.parametrize("args,flag,reason", [
    (["profile", "--model", "zoo:lenet5", "--max-seconds", "0"], "--max-seconds", "must be > 0 seconds"),
    (["profile", "--model", "zoo:lenet5", "--threads", "0"], "--threads", "must be >= 1"),
    (["train", "--model", "zoo:lenet5", "--lr", "0"], "--lr", "must be in (0, 10)"),
    (["lottery", "--model", "zoo:lenet300", "--optimizer", "rmsprop"], "--optimizer", "choose one of"),
])
def test_a_value_an_object_rejects_names_its_flag(cli, tmp_path, args, flag, reason):
    r = cli(*args, "--out", tmp_path / "o") if args[0] != "profile" else cli(*args)
    assert r.code == 2, r
    assert f"error: {flag}, field" in r.err and reason in r.err and "Traceback" not in r.err
    assert not (tmp_path / "o").exists()  # rejected before any work


def test_the_generator_builds_the_objects_a_command_declares():
    local = typer.Typer()
    seen: dict[str, object] = {}

    @command("run", on=local)
    def run(target: Target = options(Target, only=("batch_sizes", "max_seconds"), defaults={"max_seconds": 0.5}),
            store: Store = options(Store, only=("out",), defaults={"out": "runs/x"}),
            seed: int = SEED,
            lr: float = option(TrainConfig, "lr", default=0.1, help="Step size.")) -> None:
        seen.update(target=target, store=store, seed=seed, lr=lr)

    runner = CliRunner()
    r = runner.invoke(local, ["-b", "1,8", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert seen == {"target": Target(batch_sizes=(1, 8), max_seconds=0.5), "store": Store(out=Path("runs/x")),
                    "seed": 3, "lr": 0.1}
    assert "Step size." in runner.invoke(local, ["--help"]).output
    bad = runner.invoke(local, ["--max-seconds", "-1"])
    assert isinstance(bad.exception, ConfigError) and str(bad.exception).startswith("--max-seconds, field 'max_seconds'")
    bad = runner.invoke(local, ["--batch", "1,x"])
    assert "--batch must be comma-separated integers like 1,64; got '1,x'" in str(bad.exception)
    with pytest.raises(TypeError, match="no CLI field 'layers'"):
        options(Target, only=("layers",)).fields()
