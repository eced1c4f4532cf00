"""Data sources, deterministic splits and calibration subsets.

A data spec names where the examples come from:

- ``digits``: the 8x8 digits that ship with scikit-learn (the embedded default);
- ``idx:DIR``: MNIST / Fashion-MNIST IDX files, gzipped or not;
- ``npz:FILE``: a NumPy archive with arrays ``x`` and ``y`` (optionally ``x_test``/``y_test``,
  ``x_val``/``y_val``, and ``attention_mask`` / ``attention_mask_test`` / ``attention_mask_val``
  for token ids);
- ``package.module:function``: user code returning ``(x, y)`` or a dict like the npz archive.

Every source becomes a :class:`DataBundle` split into train, validation and test by a seed, so
the same seed gives the same split everywhere. Examples are float32 (images, features; ``uint8``
pixels are scaled to [0, 1]), except token ids: a 2-D integer array ``x`` of shape ``(N, T)``
(int16/32/64, uint16/32) stays integer (int64), its vocabulary the largest id + 1. An optional
``attention_mask`` of the same shape (1 = token, 0 = padding) names the padding id
(:attr:`DataBundle.pad_id`): every padded position must hold that one id, and no real token may.

>>> data = load_data("digits", seed=0)
>>> data.input_shape, data.num_classes
((1, 8, 8), 10)
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import _io
from ..errors import SlimkitError

__all__ = ["DataBundle", "load_data", "resolve_data", "register_source", "SPLITS"]

SPLITS = ("train", "val", "test")


@dataclass
class DataBundle:
    """Examples split three ways, ready for training and measurement.

    ``x_*`` are float32 tensors of shape ``(N, *input_shape)``, or int64 token ids of shape
    ``(N, T)``; ``y_*`` int64 labels. ``pad_id``: the token id that marks padding, when the data
    says (an ``attention_mask``), else ``None``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    pad_id: int | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of the examples: ``torch.float32``, or ``torch.int64`` for token ids."""
        return self.x_train.dtype

    @property
    def is_tokens(self) -> bool:
        """Whether the examples are integer token ids (``(N, T)`` int64)."""
        return not self.x_train.dtype.is_floating_point

    @property
    def vocab_size(self) -> int | None:
        """For token ids, the largest id in any split + 1 (what an embedding must hold); else ``None``."""
        if not self.is_tokens:
            return None
        return 1 + max((int(x.max()) for x in (self.x_train, self.x_val, self.x_test) if x.numel()), default=0)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in SPLITS:
            raise SlimkitError(f"unknown split '{name}'; choose one of {', '.join(SPLITS)}.")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def calibration(self, n: int = 256) -> torch.Tensor:
        """``n`` training examples, the same ones for the same seed (for INT8 calibration)."""
        if n < 1:
            raise SlimkitError(f"the calibration set must hold at least 1 example, got {n}.")
        g = torch.Generator().manual_seed(self.seed + 7919)
        idx = torch.randperm(len(self.x_train), generator=g)[: min(n, len(self.x_train))]
        return self.x_train[idx]

    def example(self, batch: int = 1, split: str = "test") -> torch.Tensor:
        """A real input batch of ``batch`` examples (repeating the split if it is short)."""
        x, _ = self.split(split)
        reps = -(-batch // len(x))
        return x.repeat((reps,) + (1,) * (x.dim() - 1))[:batch].contiguous()

    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)[0]) for s in SPLITS}

    def describe(self) -> str:
        s = self.sizes()
        kind = f" token ids (vocabulary {self.vocab_size})" if self.is_tokens else ""
        return (
            f"{self.name}: {s['train']} train / {s['val']} val / {s['test']} test, "
            f"input {tuple(self.input_shape)}{kind}, {self.num_classes} classes"
        )


_Source = Callable[[str, int], DataBundle]
_SOURCES: dict[str, _Source] = {}


def register_source(prefix: str) -> Callable[[_Source], _Source]:
    """Register ``fn(argument, seed) -> DataBundle`` for specs ``prefix:argument``."""

    def deco(fn: _Source) -> _Source:
        _SOURCES[prefix] = fn
        return fn

    return deco


def load_data(spec: str = "digits", *, seed: int = 0) -> DataBundle:
    """Load a data spec (see the module docstring) and split it by ``seed``."""
    spec = (spec or "").strip()
    if not spec:
        raise SlimkitError("no data given: pass --data digits, idx:DIR, npz:FILE or package.module:function.")
    if spec in _SOURCES:
        return _SOURCES[spec]("", seed)
    prefix, sep, arg = spec.partition(":")
    if sep and prefix in _SOURCES:
        return _SOURCES[prefix](arg, seed)
    if sep and arg and all(p.isidentifier() for p in prefix.split(".")) and arg.isidentifier():
        return _from_callable(prefix, arg, seed)
    raise SlimkitError(
        f"unknown data spec '{spec}'. Use 'digits' (built in), 'idx:DIR' (MNIST/Fashion-MNIST IDX files), "
        "'npz:FILE' (arrays x and y) or 'package.module:function' (your own loader)."
    )


# --------------------------------------------------------------------------- building


_TOKEN_DTYPES = (np.int16, np.int32, np.int64, np.uint16, np.uint32)


def _is_tokens(x: np.ndarray) -> bool:
    """Token ids: a 2-D integer array ``(N, T)``; ``uint8`` stays pixels, other ranks stay images."""
    return x.ndim == 2 and x.dtype.type in _TOKEN_DTYPES


def _token_ids(x: np.ndarray, where: str) -> np.ndarray:
    if len(x) and x.min() < 0:
        raise SlimkitError(
            f"{where}: x holds integer token ids (N, T), but id {int(x.min())} is negative; token ids must be "
            "0..vocabulary-1. Store float features as a float array instead."
        )
    if x.shape[1] == 0:
        raise SlimkitError(f"{where}: x holds token ids of shape {x.shape}: each example needs at least one token.")
    return x.astype(np.int64)


def _to_float(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.number):
        raise SlimkitError(f"{where}: x must be numeric, got dtype {x.dtype}.")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise SlimkitError(f"{where}: x holds NaN or infinite values; clean the data first.")
    return x


def _examples(x: np.ndarray, where: str) -> np.ndarray:
    """Token ids as int64 ``(N, T)``, anything else as float32 features or images."""
    if _is_tokens(x):
        return _token_ids(x, where)
    return _shape_images(_to_float(x, where), where)


def _pad_id(x: np.ndarray, mask: Any, where: str) -> int | None:
    """The one id at the positions ``mask`` (an ``attention_mask``, 1 = token, 0 = padding) marks as
    padding; ``None`` when nothing is padded."""
    what = "attention_mask"
    if not _is_tokens(x):
        raise SlimkitError(f"{where}: an {what} goes with integer token ids x of shape (N, T); x has dtype "
                           f"{x.dtype} and shape {x.shape}. Drop the {what} or store x as integer ids.")
    mask = np.asarray(mask)
    if mask.shape != x.shape:
        raise SlimkitError(f"{where}: {what} has shape {mask.shape}, but x has {x.shape}; give one 0/1 flag per token.")
    if mask.dtype.kind not in "biuf" or not np.isin(mask, (0, 1)).all():  # bool, int, uint or float flags
        raise SlimkitError(f"{where}: {what} must hold only 0 (padding) and 1 (token).")
    padded = mask == 0
    if not padded.any():
        return None
    ids = np.unique(x[padded])
    if len(ids) != 1:
        raise SlimkitError(
            f"{where}: the padded positions ({what} 0) hold {len(ids)} different ids ({', '.join(map(str, ids[:5]))}"
            f"{', ...' if len(ids) > 5 else ''}); pad every sequence with one id (the tokenizer's pad id)."
        )
    pad = int(ids[0])
    if (x[~padded] == pad).any():
        raise SlimkitError(
            f"{where}: id {pad} marks padding ({what} 0) but also appears at {int((x[~padded] == pad).sum())} "
            "real token positions (attention_mask 1); the pad id must be used for padding only."
        )
    return pad


def _shape_images(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:  # (N, H, W) -> (N, 1, H, W)
        return x[:, None]
    if x.ndim in (2, 4):  # (N, F) flat features, (N, C, H, W) images
        return x
    raise SlimkitError(
        f"{where}: x has shape {x.shape}; expected (N, features), (N, H, W) or (N, C, H, W)."
    )


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise SlimkitError(f"{where}: y must be a 1-D array of {n} labels (one per example), got shape {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise SlimkitError(f"{where}: y must hold integer class labels, got dtype {y.dtype}.")
    if len(y) and y.min() < 0:
        raise SlimkitError(f"{where}: labels must be 0..K-1, found {int(y.min())}.")
    return y.astype(np.int64)


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with ``fraction`` of each class held out, by ``seed``."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        if len(idx) > 1:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        held.append(idx[:k])
        keep.append(idx[k:])
    keep_idx, held_idx = np.concatenate(keep), np.concatenate(held)
    return rng.permutation(keep_idx), rng.permutation(held_idx)


def build_bundle(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    masks: dict[str, Any] | None = None,
) -> DataBundle:
    """Validate arrays and split them into a :class:`DataBundle` (deterministic by seed).

    ``masks``: attention masks of the token ids, keyed ``"x"``, ``"x_test"``, ``"x_val"`` like the
    arrays they go with; they name the padding id (:attr:`DataBundle.pad_id`).
    """
    masks = {k: v for k, v in (masks or {}).items() if v is not None}
    pads: set[int] = set()
    raw = {"x": x, "x_test": x_test, "x_val": x_val}
    for key, mask in masks.items():
        if raw.get(key) is None:
            raise SlimkitError(f"{name}: an attention mask for '{key}' was given, but no array '{key}'.")
        pad = _pad_id(np.asarray(raw[key]), mask, f"{name} ({key})")
        if pad is not None:
            pads.add(pad)
    if len(pads) > 1:
        raise SlimkitError(f"{name}: the splits pad with different ids {sorted(pads)}; use one pad id throughout.")
    x = _examples(np.asarray(x), name)
    y = _labels(y, len(x), name)
    if len(x) < 10:
        raise SlimkitError(f"{name}: only {len(x)} examples; at least 10 are needed to split train/val/test.")
    if x_test is not None:
        if y_test is None:
            raise SlimkitError(f"{name}: x_test given without y_test.")
        x_test = _examples(np.asarray(x_test), name + " (x_test)")
        y_test = _labels(y_test, len(x_test), name + " (y_test)")
        if not len(x_test):
            raise SlimkitError(f"{name}: x_test holds no examples.")
        _same_kind(name, "x_test", x_test, x)
    else:
        keep, held = _stratified_split(y, test_fraction, seed)
        x, y, x_test, y_test = x[keep], y[keep], x[held], y[held]
    if x_val is not None:
        if y_val is None:
            raise SlimkitError(f"{name}: x_val given without y_val.")
        x_val = _examples(np.asarray(x_val), name + " (x_val)")
        y_val = _labels(y_val, len(x_val), name + " (y_val)")
        if not len(x_val):
            raise SlimkitError(f"{name}: x_val holds no examples.")
        _same_kind(name, "x_val", x_val, x)
    else:
        keep, held = _stratified_split(y, val_fraction, seed + 1)
        x, y, x_val, y_val = x[keep], y[keep], x[held], y[held]
    num_classes = int(max(y.max(), y_test.max(), y_val.max())) + 1
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731  (int64 ids, float32 examples, int64 labels)
    return DataBundle(
        name=name,
        x_train=t(x), y_train=t(y),
        x_val=t(x_val), y_val=t(y_val),
        x_test=t(x_test), y_test=t(y_test),
        num_classes=num_classes,
        seed=seed,
        pad_id=pads.pop() if pads else None,
    )


def _same_kind(name: str, key: str, a: np.ndarray, x: np.ndarray) -> None:
    """``a`` (x_test or x_val) holds examples like ``x``: same shape per example, ids or floats alike."""
    if (a.dtype == np.int64) != (x.dtype == np.int64):
        kinds = {True: "integer token ids", False: "float examples"}
        raise SlimkitError(f"{name}: {key} holds {kinds[a.dtype == np.int64]} but x holds {kinds[x.dtype == np.int64]}; "
                           "store both with the same dtype.")
    if a.shape[1:] != x.shape[1:]:
        raise SlimkitError(f"{name}: {key} examples have shape {a.shape[1:]}, x has {x.shape[1:]}.")


# --------------------------------------------------------------------------- sources


@register_source("digits")
def _digits(arg: str, seed: int) -> DataBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)  # (N, 8, 8) in [0, 1]
    return build_bundle("digits", x, d.target, seed=seed, val_fraction=0.15, test_fraction=0.2)


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain): the format of MNIST and Fashion-MNIST."""
    return _io.read_file(path, "IDX file", _parse_idx, expected="expected MNIST-style IDX data "
                         "(train-images-idx3-ubyte, train-labels-idx1-ubyte, gzipped or not)")


def _parse_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise SlimkitError(f"cannot read IDX file {path}: {e}.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise SlimkitError(f"{path} is not an IDX file (bad magic number); expected MNIST-style IDX data.")
    ndim = raw[3]
    if ndim == 0:
        raise SlimkitError(f"{path} is not an IDX file of examples (its header gives no dimensions).")
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])  # type: ignore[call-overload]
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise SlimkitError(
            f"{path} is truncated or corrupt: header says shape {dims} ({expected} bytes), "
            f"file holds {len(raw) - header} bytes of data."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find_idx(folder: Path, split: str, kind: str) -> Path | None:
    # train-images-idx3-ubyte(.gz), train-images.idx3-ubyte, t10k-labels-idx1-ubyte.gz, ...
    rank = "idx3" if kind == "images" else "idx1"
    hits = sorted(p for p in folder.iterdir() if p.name.startswith(f"{split}-{kind}") and rank in p.name)
    return hits[0] if hits else None


@register_source("idx")
def _idx(arg: str, seed: int) -> DataBundle:
    folder = Path(arg).expanduser()
    if not arg or not folder.is_dir():
        raise SlimkitError(
            f"idx:{arg}: no such folder. Give the folder holding train-images-idx3-ubyte(.gz) and "
            "train-labels-idx1-ubyte(.gz); Debian's dataset-fashion-mnist installs them in "
            "/usr/share/datasets/fashion-mnist."
        )
    train_x, train_y = _find_idx(folder, "train", "images"), _find_idx(folder, "train", "labels")
    if train_x is None or train_y is None:
        raise SlimkitError(
            f"idx:{arg}: the folder has no train-images-idx3-ubyte / train-labels-idx1-ubyte files "
            "(gzipped or not)."
        )
    x, y = read_idx(train_x), read_idx(train_y)
    test_x, test_y = _find_idx(folder, "t10k", "images"), _find_idx(folder, "t10k", "labels")
    xt = yt = None
    if test_x is not None and test_y is not None:
        xt, yt = read_idx(test_x), read_idx(test_y)
    if len(x) != len(y):
        raise SlimkitError(f"idx:{arg}: {len(x)} training images but {len(y)} labels.")
    return build_bundle(f"idx:{arg}", x, y, x_test=xt, y_test=yt, seed=seed, val_fraction=0.1)


@register_source("npz")
def _npz(arg: str, seed: int) -> DataBundle:
    path = Path(arg).expanduser()
    if not path.exists():
        raise SlimkitError(f"npz:{arg}: no such file.")

    def parse(p: Path) -> dict[str, Any]:
        with open(p, "rb") as f:
            if f.read(2) != b"PK":
                raise SlimkitError(f"npz:{arg} is not a readable .npz archive (np.savez writes one).")
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except ValueError as e:
            if "pickle" not in str(e):
                raise SlimkitError(f"npz:{arg} is not a readable .npz archive: {e}.") from None
            raise SlimkitError(
                f"npz:{arg}: cannot read it without unpickling ({e}); store plain numeric arrays x and y."
            ) from None
        except Exception as e:  # zipfile.BadZipFile, OSError, ...
            raise SlimkitError(f"npz:{arg} is not a readable .npz archive: {e}.") from None

    arrays = _io.read_file(path, "data file", parse, expected="give a NumPy .npz archive with arrays x and y "
                           "(np.savez(FILE, x=..., y=...))")
    return _bundle_from_arrays(f"npz:{arg}", arrays, seed)


def _bundle_from_arrays(name: str, arrays: dict[str, Any], seed: int) -> DataBundle:
    if "x" not in arrays or "y" not in arrays:
        raise SlimkitError(f"{name}: expected arrays named 'x' and 'y', found {sorted(arrays) or 'none'}.")
    masks = {"x": arrays.get("attention_mask"), "x_test": arrays.get("attention_mask_test"),
             "x_val": arrays.get("attention_mask_val")}
    return build_bundle(
        name, arrays["x"], arrays["y"], seed=seed,
        x_test=arrays.get("x_test"), y_test=arrays.get("y_test"),
        x_val=arrays.get("x_val"), y_val=arrays.get("y_val"), masks=masks,
    )


def _from_callable(module: str, func: str, seed: int) -> DataBundle:
    fn = import_object(f"{module}:{func}", what="data loader")
    out = fn()
    name = f"{module}:{func}"
    if isinstance(out, DataBundle):
        return out
    if isinstance(out, dict):
        return _bundle_from_arrays(name, out, seed)
    if isinstance(out, (tuple, list)) and len(out) == 2:
        x, y = (np.asarray(a.numpy() if isinstance(a, torch.Tensor) else a) for a in out)
        return build_bundle(name, x, y, seed=seed)
    raise SlimkitError(f"{name} returned {type(out).__name__}; it must return (x, y) or a dict with 'x' and 'y'.")


def import_object(spec: str, *, what: str) -> Any:
    """Import ``package.module:attribute`` (the current folder is importable, as with ``python -m``)."""
    module, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise SlimkitError(f"cannot import module '{module}' for the {what} '{spec}': {e}.") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise SlimkitError(f"module '{module}' has no '{attr}' (the {what} '{spec}').") from None


def resolve_data(data: DataBundle | str, seed: int = 0) -> DataBundle:
    """``data`` itself, or the bundle a spec (``"digits"``, ``"idx:DIR"``...) loads with ``seed``."""
    return data if isinstance(data, DataBundle) else load_data(data, seed=seed)
