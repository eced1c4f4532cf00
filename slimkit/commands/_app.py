"""The typer app every command registers on, the shared helpers, and the option generator.

A command's options are declared once, on the option objects' fields
(``dataclasses.field(metadata={"flag": ..., "short": ..., "help": ...})``: :class:`Target`,
:class:`ModelRef`, :class:`Search`, :class:`Store`, :class:`Budget`, :class:`TrainConfig`). A
command names the objects it takes as parameter defaults; :func:`command` turns each into the
object's flags and hands the command the built object::

    @command()
    def apply(recipe: ..., model: ModelRef = options(ModelRef), target: Target = options(Target),
              out: Path = option(Store, "out", default="runs/apply", help="Folder for ..."),
              quiet: QuietOpt = False) -> None:
        ...  # model is a ModelRef, target a Target, out a Path

A value an object rejects (its ``__post_init__`` raises :class:`ConfigError` naming the field)
comes back naming the flag (``--max-seconds, field 'max_seconds': must be > 0 seconds``), exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional, Union

import typer
from rich.console import Console

from ..errors import ConfigError, SlimkitError
from ..search import Search, Store

__all__ = ["app", "stdout", "command", "options", "option", "flags_of", "DataOpt", "QuietOpt",
           "SEED", "OVERWRITE", "run_out",
           "require_model", "parse_batches", "flag_of"]

app = typer.Typer(
    name="slimkit",
    help="Fit a trained PyTorch model to a deployment budget: measure, compress, export, measure again.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
stdout = Console(highlight=False)

# Options that belong to no option object: the data source and how much to print.
DataOpt = Annotated[str, typer.Option("--data", "-d", help="digits (built in), idx:DIR, npz:FILE or package.module:function.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only print the result.")]



def require_model(model: str | None, weights: Path | str | None,
                  example: str = "zoo:lenet5 --weights model.safetensors") -> None:
    """A model comes from --model, or from --weights of a model slimkit saved (its spec is inside)."""
    if not model and not weights:
        raise SlimkitError(f"--model is required, e.g. --model {example}.")


def parse_batches(text: str, flag: str = "--batch") -> tuple[int, ...]:
    """``"1,64"`` -> ``(1, 64)``, with a message naming ``flag`` for anything else.

    >>> parse_batches("1, 64")
    (1, 64)
    """
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise SlimkitError(f"{flag} must be comma-separated integers like 1,64; got '{text}'.") from None
    if not sizes or any(b < 1 for b in sizes):
        raise SlimkitError(f"{flag} sizes must be integers >= 1, like 1,64; got '{text}'.")
    return sizes


# ----------------------------------------------------------------------------- the option generator


@dataclasses.dataclass(frozen=True)
class _Use:
    """How one command takes an option object: which fields, with which defaults and help.

    ``single``: the command takes that one field's value, not the object. ``build``: pass the
    built object (``False``: a dict of the parsed values, for objects built another way).
    """

    cls: type
    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    helps: Mapping[str, str] = dataclasses.field(default_factory=dict)
    single: str | None = None
    build: bool = True

    def fields(self) -> list[dataclasses.Field]:
        offered = {f.name: f for f in dataclasses.fields(self.cls) if "flag" in f.metadata}
        names = [self.single] if self.single else (self.only or list(offered))
        unknown = [n for n in [*names, *self.skip, *self.defaults, *self.helps] if n not in offered]
        if unknown:
            raise TypeError(f"{self.cls.__name__} has no CLI field {unknown[0]!r}; fields with a flag: {', '.join(offered)}")
        return [offered[n] for n in names if n not in self.skip]


def options(cls: type, *, only: Sequence[str] | None = None, skip: Sequence[str] = (),
            defaults: Mapping[str, Any] | None = None, help: Mapping[str, str] | None = None,
            build: bool = True) -> Any:
    """A command parameter's default: the flags of ``cls``'s fields; the command gets the built object.

    ``only`` / ``skip`` choose the fields, ``defaults`` and ``help`` override per field for this
    command; ``build=False`` passes a dict of the parsed values instead (build it inside
    :func:`flags_of`).
    """
    return _Use(cls, tuple(only) if only else None, tuple(skip), dict(defaults or {}), dict(help or {}), build=build)


def option(cls: type, name: str, *, default: Any = dataclasses.MISSING, help: str | None = None) -> Any:
    """A command parameter's default: the one flag of field ``name`` of ``cls``; the command gets its value."""
    return _Use(cls, defaults={} if default is dataclasses.MISSING else {name: default},
                helps={name: help} if help else {}, single=name)


def flag_of(cls: type, name: str) -> str:
    """The flag declared for field ``name`` of ``cls`` (``Target``, ``"batch_sizes"`` -> ``--batch``)."""
    flag = next(f.metadata["flag"] for f in dataclasses.fields(cls) if f.name == name)
    return str(flag).split("/")[0]


@contextmanager
def flags_of(*classes: type) -> Iterator[None]:
    """Inside: a :class:`ConfigError` about a field of one of ``classes`` names its flag."""
    try:
        yield
    except ConfigError as e:
        raise _at_flag(e, classes) from None


def _at_flag(e: ConfigError, classes: Sequence[type]) -> ConfigError:
    if e.where or not e.field:
        return e
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name == e.field and "flag" in f.metadata:
                return ConfigError(e.reason, field=e.field, where=flag_of(cls, f.name))
    return e


def _is_ints(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple and typing.get_args(tp)[:1] == (int,)


def _cli_type(tp: Any) -> tuple[Any, bool]:
    """The type typer parses a field as, and whether ``None`` is allowed: ``str | Path | None`` ->
    ``(Path, True)``; ``tuple[int, ...]`` -> ``(str, False)`` (comma separated, see :func:`parse_batches`)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = Path if Path in args else args[0]
        return _cli_type(base)[0], len(args) < len(typing.get_args(tp))
    return (str if _is_ints(tp) else tp), False


def _param(use: _Use, f: dataclasses.Field, hints: dict[str, Any], name: str) -> inspect.Parameter:
    meta = f.metadata
    tp, optional = _cli_type(meta.get("type", hints[f.name]))
    if f.name in use.defaults:
        default = use.defaults[f.name]
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        default = f.default_factory()  # type: ignore[misc]
    if _is_ints(hints[f.name]) and isinstance(default, (tuple, list)):
        default = ",".join(map(str, default))
    elif tp is Path and isinstance(default, str):
        default = Path(default)
    decls = [meta["flag"], *([meta["short"]] if meta.get("short") else [])]
    info = typer.Option(*decls, help=use.helps.get(f.name, meta.get("help")))
    annotation = Optional[tp] if (optional or default is None) and tp is not bool else tp
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, info])


def _flag_name(pname: str, use: _Use, field: str) -> str:
    """The generated parameter's name: the command's own for one field, ``target__threads`` for an object's."""
    return pname if use.single else f"{pname}__{field}"


def _value(use: _Use, hints: dict[str, Any], field: str, raw: Any) -> Any:
    if _is_ints(hints[field]) and isinstance(raw, str):
        return parse_batches(raw, flag_of(use.cls, field))
    return raw


def _collect(pname: str, use: _Use, kwargs: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(use.cls)
    values = {f.name: _value(use, hints, f.name, kwargs.pop(_flag_name(pname, use, f.name))) for f in use.fields()}
    if use.single:
        with flags_of(use.cls):
            use.cls(**values)  # the object checks its own field (e.g. --max-accuracy-drop in [0, 1])
        return values[use.single]
    if not use.build:
        return values
    with flags_of(use.cls):
        return use.cls(**values)


def command(name: str | None = None, *, on: typer.Typer = app,
            **typer_kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command on :data:`app` (or ``on``), its :func:`options` / :func:`option` defaults turned
    into flags (an example in this module's docstring); the command itself is returned unchanged."""
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        params: list[inspect.Parameter] = []
        uses: dict[str, _Use] = {}
        for p in sig.parameters.values():
            if isinstance(p.default, _Use):
                use = uses[p.name] = p.default
                hints = typing.get_type_hints(use.cls)
                params += [_param(use, f, hints, _flag_name(p.name, use, f.name)) for f in use.fields()]
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(fn)
        def run(**kwargs: Any) -> Any:
            for pname, use in uses.items():
                kwargs[pname] = _collect(pname, use, kwargs)
            return fn(**kwargs)

        run.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        del run.__wrapped__  # typer must read the generated signature, not fn's
        on.command(name, **typer_kwargs)(run)
        return fn

    return register


# ----------------------------------------------------------------------------- one run's options

# A command that writes one run (not a search) takes these; the flags are Search's and Store's.
SEED: Any = option(Search, "seed", help="Seed of the train/val/test split and of training.")
OVERWRITE: Any = option(Store, "overwrite", help="Replace the results of a previous run in --out.")


def run_out(default: str, help: str = "Folder for model.onnx, model.safetensors and result.json.") -> Any:
    """``--out`` of a command that writes one run into a folder (default ``default``)."""
    return option(Store, "out", default=default, help=help)
