"""Writing results without ever leaving a half-written file or clobbering an input."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from .errors import SlimkitError

# Files whose presence marks a folder as holding a previous slimkit run.
RUN_MARKERS = (
    "result.json",
    "train.json",
    "model.onnx",
    "model.safetensors",
    "best.onnx",
    "lottery.json",
    "sensitivity.json",
    "model.slim",
)


T = TypeVar("T")


def read_file(path: str | os.PathLike, what: str, reader: Callable[[Path], T], *, expected: str = "") -> T:
    """``reader(path)`` behind the one guard every file a user gives is read through.

    A missing, empty or unreadable file, or one the reader cannot decode (wrong format,
    truncated, undecodable bytes), becomes a :class:`SlimkitError` that names the file, says
    what was expected (``expected``) and what went wrong, instead of a decoder's traceback.

    >>> read_file("/nonexistent.yaml", "recipe", Path.read_text)
    Traceback (most recent call last):
    ...
    slimkit.errors.SlimkitError: recipe /nonexistent.yaml does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise SlimkitError(f"{what} {path} does not exist.")
    if not path.is_file():
        raise SlimkitError(f"{what} {path} is not a file{'; ' + expected if expected else ''}.")
    if path.stat().st_size == 0:
        raise SlimkitError(f"{what} {path} is empty{'; ' + expected if expected else ''}.")
    try:
        return reader(path)
    except SlimkitError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # a decoder's own error (UnicodeDecodeError, protobuf DecodeError, ...)
        detail = str(e).strip().splitlines()[0][:300].rstrip(". ") if str(e).strip() else type(e).__name__
        raise SlimkitError(f"{what} {path} cannot be read ({type(e).__name__}: {detail})"
                           f"{'; ' + expected if expected else ''}.") from None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` over ``path`` in one step.

    The temporary file lives in the destination folder so the rename is atomic; if
    ``write`` raises, the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def prepare_out_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Create ``out`` for a new run, or refuse if it holds a previous one.

    A folder holding a previous run (any of :data:`RUN_MARKERS`) is only reused with
    ``overwrite=True``; even then an input file of this run inside ``out`` is never
    overwritten, so a user cannot lose the model they started from.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SlimkitError(f"--out {out} exists and is a file, not a folder; choose a folder path.")
    previous = [m for m in RUN_MARKERS if (out / m).exists()]
    if previous and not overwrite:
        raise SlimkitError(
            f"--out {out} already holds a previous run ({', '.join(previous)}). "
            "Choose another folder, or pass --overwrite to replace its results."
        )
    if overwrite:
        for given in inputs:
            if given is None:
                continue
            src = Path(given)
            if src.exists() and src.resolve().parent == out.resolve() and src.name in RUN_MARKERS:
                raise SlimkitError(
                    f"--out {out} holds the input file {src.name}, which this run would overwrite. "
                    "slimkit never overwrites an input model: copy it elsewhere or choose another --out."
                )
    out.mkdir(parents=True, exist_ok=True)
    return out
