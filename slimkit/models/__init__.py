"""Loading models safely, saving them so they load again, and the zoo.

A model spec is one of:

- ``zoo:NAME`` or ``zoo:NAME,key=value,...`` (e.g. ``zoo:resnet,width=0.5``): the built-in zoo;
- ``package.module:function``: your code, called with ``input_shape=`` and ``num_classes=``
  (and, for token ids, ``vocab=`` and ``pad=``) when it accepts them, returning an ``nn.Module``;
- ``FILE.pt`` with ``trust_pickle=True``: a fully pickled module. Unpickling runs arbitrary
  code, so it is refused without the flag;
- ``FILE.slim``: a Deep Compression packed model (it records its own architecture).

Weights are a ``.safetensors`` file or a state dict read with ``torch.load(..., weights_only=True)``.
A model slimkit saved (:func:`save_model`) carries its spec and the structural changes made
to it (pruned channels, decomposed layers), so :func:`load_model` rebuilds the compressed
architecture before loading its weights.

>>> model = load_model("zoo:lenet300", input_shape=(1, 8, 8), num_classes=10)
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import json
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .. import _io
from .._plugins import load_methods
from ..data import DataBundle, import_object
from ..errors import SlimkitError
from ..layers import set_module
from .zoo import create_model, register_model, zoo_names

__all__ = [
    "load_model",
    "save_model",
    "load_weights",
    "read_metadata",
    "module_versions",
    "create_model",
    "register_model",
    "register_model_file",
    "zoo_names",
    "register_structure_op",
    "record_structure",
    "forget_structure",
    "model_fingerprint",
    "structure_of",
    "origin_of",
    "set_origin",
    "check_fits",
    "input_dtype_of",
    "resolve_model",
    "ModelRef",
    "set_module",
]

PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"}
PACKED_SUFFIXES = {".slim"}  # formats that carry their architecture (register_model_file)
METADATA_KEY = "slimkit"
FORMAT_VERSION = 1

# ----------------------------------------------------------------------------- origin & structure
#
# A model remembers where it came from (its spec and the data shape it was built for) and the
# structural edits slimkit made to it, so that save_model/load_model round-trip compressed models.

_ORIGIN_ATTR = "_slimkit_origin"
_STRUCTURE_ATTR = "_slimkit_structure"

_StructureOp = Callable[[nn.Module, dict[str, Any]], None]
_STRUCTURE_OPS: dict[str, _StructureOp] = {}


def register_structure_op(name: str) -> Callable[[_StructureOp], _StructureOp]:
    """Register ``fn(model, op)`` that re-applies a recorded structural edit (shapes only).

    Methods that change a model's architecture (structured pruning, decomposition) record an
    op dict ``{"op": name, ...}`` with :func:`record_structure`; loading replays each op on a
    fresh model so that the saved weights fit it.
    """

    def deco(fn: _StructureOp) -> _StructureOp:
        _STRUCTURE_OPS[name] = fn
        return fn

    return deco


def record_structure(model: nn.Module, op: dict[str, Any]) -> None:
    if "op" not in op or op["op"] not in _STRUCTURE_OPS:
        raise ValueError(f"structure op {op!r} is not registered")
    model.__dict__.setdefault(_STRUCTURE_ATTR, []).append(json.loads(json.dumps(op)))


def model_fingerprint(model: nn.Module) -> str:
    """A hash of ``model``'s class, recorded structure, module tree and state dict: two models with
    the same fingerprint export to the same ONNX graph."""
    h = hashlib.sha1(type(model).__qualname__.encode())
    h.update(json.dumps(structure_of(model), sort_keys=True).encode())
    h.update(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        if not isinstance(t, torch.Tensor):  # e.g. a quantized layer's packed parameters
            h.update(repr(t).encode())
            continue
        t = t.detach().cpu()
        t = t.int_repr() if t.is_quantized else t.float() if t.dtype == torch.bfloat16 else t
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def forget_structure(model: nn.Module, layer: str) -> None:
    """Drop the recorded ops that replaced ``layer`` (``{"layer": layer}``): it was given back."""
    ops = model.__dict__.get(_STRUCTURE_ATTR, [])
    model.__dict__[_STRUCTURE_ATTR] = [op for op in ops if op.get("layer") != layer]


def structure_of(model: nn.Module) -> list[dict[str, Any]]:
    return list(model.__dict__.get(_STRUCTURE_ATTR, []))


def set_origin(model: nn.Module, spec: str | None, input_shape: Sequence[int], num_classes: int, *,
               vocab: int | None = None, pad: int | None = None) -> None:
    """Record what ``model`` was built from; ``vocab`` (and ``pad``) mark a model over token ids."""
    origin: dict[str, Any] = {"model": spec, "input_shape": list(input_shape), "num_classes": int(num_classes)}
    if vocab is not None:
        origin.update(vocab=int(vocab), input_dtype="int64")
        if pad is not None:
            origin["pad"] = int(pad)
    model.__dict__[_ORIGIN_ATTR] = origin


def origin_of(model: nn.Module) -> dict[str, Any]:
    return dict(model.__dict__.get(_ORIGIN_ATTR, {}))


def input_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype ``model`` takes: ``torch.int64`` for a model built or checked for token ids, else float32."""
    return torch.int64 if origin_of(model).get("input_dtype") == "int64" else torch.float32


def _replay(model: nn.Module, ops: list[dict[str, Any]], source: str) -> None:
    for op in ops:
        name = op.get("op")
        if name not in _STRUCTURE_OPS:
            _import_methods()
        if name not in _STRUCTURE_OPS:
            raise SlimkitError(
                f"{source} was saved after a structural change '{name}' that this slimkit does not know; "
                "upgrade slimkit to load it."
            )
        _STRUCTURE_OPS[name](model, op)
        record_structure(model, op)


def _import_methods() -> None:
    load_methods()  # the methods register their structure ops


# ----------------------------------------------------------------------------- building


def _parse_zoo(spec: str) -> tuple[str, dict[str, Any]]:
    body = spec[len("zoo:"):]
    # split on the commas outside brackets, so list values work: zoo:lenet300,hidden=[64,32]
    name, *args = [p.strip() for p in re.split(r",(?![^\[]*\])", body)]
    kwargs: dict[str, Any] = {}
    for a in args:
        key, sep, value = a.partition("=")
        if not sep or not key.isidentifier():
            raise SlimkitError(f"model spec '{spec}': '{a}' is not key=value (e.g. zoo:resnet,width=0.5).")
        kwargs[key] = yaml.safe_load(value)
    return name, kwargs


def _looks_like_file(spec: str) -> bool:
    p = Path(spec)
    return (p.suffix.lower() in PICKLE_SUFFIXES | PACKED_SUFFIXES or ("/" in spec and ":" not in spec)
            or p.is_file())


_FileLoader = Callable[[Path, bool], nn.Module]
_FILE_LOADERS: dict[str, _FileLoader] = {}


def register_model_file(suffix: str, loader: _FileLoader) -> _FileLoader:
    """Make ``--model FILE.suffix`` load with ``loader(path, trust_pickle)``, a model that
    carries its own architecture (e.g. the ``.slim`` packed format registers itself)."""
    _FILE_LOADERS[suffix.lower()] = loader
    return loader


def _file_loader(path: Path) -> _FileLoader | None:
    suffix = path.suffix.lower()
    if suffix in PACKED_SUFFIXES and suffix not in _FILE_LOADERS:
        _import_methods()  # the method that writes the format registers its loader
    return _FILE_LOADERS.get(suffix)


def build_model(spec: str, *, input_shape: Sequence[int], num_classes: int, trust_pickle: bool = False,
                vocab: int | None = None, pad: int | None = None) -> nn.Module:
    """Build the architecture a spec names (no weights loaded); ``vocab`` and ``pad``: the token data's
    vocabulary size and padding id, for factories that take them."""
    spec = (spec or "").strip()
    if spec.startswith("zoo:"):
        name, kwargs = _parse_zoo(spec)
        known = {k: v for k, v in (("vocab", vocab), ("pad", pad)) if k not in kwargs}  # the spec's own win
        model = create_model(name, input_shape=input_shape, num_classes=num_classes, **known, **kwargs)
    elif _looks_like_file(spec):
        loader = _file_loader(Path(spec))
        if loader is not None:
            return loader(Path(spec), trust_pickle)  # the file records its own origin
        model = _load_pickled_module(Path(spec), trust_pickle)
    elif ":" in spec:
        factory = import_object(spec, what="model factory")
        if not callable(factory):
            raise SlimkitError(f"'{spec}' is not callable; it must be a function returning an nn.Module.")
        params = inspect.signature(factory).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = {}
        if accepts_any or "input_shape" in params:
            kwargs["input_shape"] = tuple(input_shape)
        if accepts_any or "num_classes" in params:
            kwargs["num_classes"] = int(num_classes)
        for key, value in (("vocab", vocab), ("pad", pad)):  # named parameters only
            if value is not None and key in params:
                kwargs[key] = int(value)
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise SlimkitError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module.")
    else:
        raise SlimkitError(
            f"unknown model spec '{spec}'. Use zoo:NAME (one of {', '.join(zoo_names())}), "
            "package.module:function (your factory) or FILE.pt --trust-pickle (a pickled module)."
        )
    set_origin(model, spec, input_shape, num_classes, vocab=vocab, pad=pad)
    return model


def _load_pickled_module(path: Path, trust_pickle: bool) -> nn.Module:
    if not path.exists():
        raise SlimkitError(f"model file {path} does not exist.")
    if not trust_pickle:
        raise SlimkitError(
            f"refusing to load {path}: a fully pickled model is unpickled, and unpickling runs arbitrary code "
            "from the file. Only if you trust where this file came from, pass --trust-pickle "
            "(trust_pickle=True). Safer: save a state dict or .safetensors and load it with "
            "--model zoo:NAME or package.module:function plus --weights FILE."
        )

    def unpickle(p: Path) -> nn.Module:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:
            raise SlimkitError(f"cannot unpickle {p}: {_first_line(e)}; expected a whole model saved with "
                               "torch.save(model, FILE).") from None
        if not isinstance(obj, nn.Module):
            raise SlimkitError(
                f"{p} holds a {type(obj).__name__}, not a pickled nn.Module; if it is a state dict, "
                "pass it as --weights with a --model that builds the architecture."
            )
        return obj

    return _io.read_file(path, "model file", unpickle, expected="give a whole model saved with torch.save(model, FILE)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300].rstrip(". ") if text else type(e).__name__


# ----------------------------------------------------------------------------- weights


def read_metadata(path: str | Path) -> dict[str, Any]:
    """slimkit's metadata from a ``.safetensors`` file ({} for other files or foreign files)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return {}
    try:
        return json.loads(meta.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        return {}


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without ever unpickling code (behind the input-file guard)."""
    return _io.read_file(path, "weights file", _read_state_dict, expected=WEIGHTS_EXPECTED)


WEIGHTS_EXPECTED = ("give a .safetensors file or a PyTorch state dict (torch.save(model.state_dict(), FILE)), "
                    "e.g. the model.safetensors slimkit wrote")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise SlimkitError(f"weights file {path} is not a readable .safetensors file: {_first_line(e)}.") from None
    if path.suffix.lower() in PACKED_SUFFIXES:
        raise SlimkitError(f"{path} is a {path.suffix} packed model, which records its own architecture: pass it "
                           f"as --model {path} (without --weights).")
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and not (head[:1] == b"\x80" and head[1:2] in (b"\x01", b"\x02", b"\x03", b"\x04", b"\x05")):
        raise SlimkitError(f"weights file {path} is not a PyTorch weights file torch.load can read (neither the zip "
                           f"archive torch.save writes nor a pickle); {WEIGHTS_EXPECTED}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SlimkitError(
            f"{path} holds pickled Python objects, not only tensors, so it was not loaded: unpickling runs code. "
            "If it is a whole pickled model you trust, pass it as --model FILE --trust-pickle; otherwise save "
            f"its state_dict() or a .safetensors file. (torch said: {_first_line(e)})"
        ) from None
    except Exception as e:
        raise SlimkitError(f"weights file {path} is not a PyTorch weights file torch.load can read: "
                           f"{_first_line(e)}; {WEIGHTS_EXPECTED}.") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if (not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj)
            or not all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise SlimkitError(f"weights file {path} does not hold a state dict (a mapping of names to tensors); "
                           f"{WEIGHTS_EXPECTED}.")
    return obj


def module_versions(model: nn.Module) -> dict[str, int]:
    """Each submodule's state-dict version (``_version``), keyed by its prefix, as ``state_dict`` records them.

    A module may check it when it loads (torchvision's MNASNet does); a ``.safetensors`` file keeps
    only tensors, so :func:`save_model` stores these beside them and :func:`apply_weights` gives them back.
    """
    meta = getattr(model.state_dict(), "_metadata", None) or {}
    return {prefix: int(m["version"]) for prefix, m in meta.items() if isinstance(m, dict) and "version" in m}


def apply_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, spec: str | None,
                  versions: dict[str, int] | None = None) -> None:
    """Load ``state`` into ``model``, or explain exactly which keys or shapes do not match.

    ``versions``: the modules' state-dict versions when the weights were saved (see
    :func:`module_versions`); without them, a state dict that carries none is loaded as the
    current code's version (the file was written by the same code as the model).
    """
    own = model.state_dict()
    if own and state and not any(k in own for k in state) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first: {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first: {', '.join(unexpected[:3])}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), first: {'; '.join(shapes[:3])}")
        raise SlimkitError(
            f"the weights in {source} do not fit the model {spec or ''}: {'; '.join(parts)}. "
            "Check that --model builds the architecture these weights were trained for (same zoo "
            "arguments, same data shape and class count)."
        )
    if getattr(state, "_metadata", None) is None:
        recorded = versions if versions is not None else module_versions(model)
        state = collections.OrderedDict(state)
        state._metadata = collections.OrderedDict(  # type: ignore[attr-defined]
            (prefix, {"version": v}) for prefix, v in recorded.items())
    try:
        model.load_state_dict(state)
    except Exception as e:
        raise SlimkitError(f"the model {spec or type(model).__name__} refused the weights in {source} while loading "
                           f"them: {_first_line(e)}. Its own loading code checks something the file does not "
                           "hold; save the weights with slimkit (save_model) from the same model code.") from None


def load_model(
    spec: str | None = None,
    *,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    vocab: int | None = None,
    pad: int | None = None,
) -> nn.Module:
    """Build a model from its spec and load its weights, safely.

    With a ``.safetensors`` file saved by slimkit, ``spec``, ``input_shape`` and
    ``num_classes`` default to the ones stored in it and recorded structural changes are
    replayed, so a pruned or decomposed model loads as itself. The vocabulary (and padding id)
    a token model was built with are stored too, and win over ``vocab`` / ``pad`` (the
    weights' embedding has that size).
    """
    if spec and weights is None and str(spec).endswith(".safetensors"):
        spec, weights = None, spec  # a weights file given as the model: it names its own architecture
    meta = read_metadata(weights) if weights else {}
    spec = spec or meta.get("model")
    if not spec:
        raise SlimkitError(
            "no model given: pass --model zoo:NAME, package.module:function or FILE.pt --trust-pickle "
            + ("(the weights file does not say which architecture it belongs to)." if weights else ".")
        )
    input_shape = tuple(input_shape or meta.get("input_shape") or ())
    num_classes = num_classes or meta.get("num_classes")
    if not input_shape or not num_classes:
        raise SlimkitError("load_model needs input_shape and num_classes (from the data) to build the model.")
    if meta.get("vocab") is not None:
        vocab, pad = meta["vocab"], meta.get("pad")
    model = build_model(spec, input_shape=input_shape, num_classes=num_classes, trust_pickle=trust_pickle,
                        vocab=vocab, pad=pad)
    if weights:
        if meta.get("structure"):
            if meta.get("model") not in (None, spec):
                raise SlimkitError(
                    f"{weights} holds a compressed '{meta['model']}' model; it cannot be loaded into '{spec}'. "
                    f"Pass --model {meta['model']} or leave --model out."
                )
            _replay(model, meta["structure"], str(weights))
        apply_weights(model, load_weights(weights), str(weights), spec, versions=meta.get("versions"))
    return model.eval()


def save_model(model: nn.Module, path: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights to ``path`` (``.safetensors``) atomically, with what rebuilds it."""
    from safetensors.torch import save

    state: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        storage = t.untyped_storage()
        # safetensors refuses tensors that share memory: give each its own copy.
        if t.numel() and (storage.data_ptr() in storages or storage.nbytes() != t.numel() * t.element_size()):
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        state[k] = t
    meta = {**origin_of(model), "structure": structure_of(model), "format": FORMAT_VERSION,
            "versions": module_versions(model), **(extra or {})}
    data = save(state, metadata={METADATA_KEY: json.dumps(meta)})
    return _io.write_bytes(path, data)


def check_fits(model: nn.Module, input_shape: Sequence[int], num_classes: int, data_name: str,
               model_name: str = "the model", *, vocab: int | None = None) -> None:
    """Run one real-shaped batch through ``model``; explain if the data does not fit it.

    ``vocab``: the data holds integer token ids ``0..vocab-1``; the batch is int64 and holds the
    largest id, so an embedding too small for the data fails here.
    """
    if vocab is None:
        x = torch.zeros((2, *input_shape))
        kind = f"shaped {tuple(input_shape)}"
    else:
        x = torch.zeros((2, *input_shape), dtype=torch.int64)
        x[0] = int(vocab) - 1
        kind = f"integer token ids shaped {tuple(input_shape)} with ids up to {int(vocab) - 1}"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("Build the model for this data's input shape (zoo models adapt to it)." if vocab is None else
                f"A model over token ids starts with an embedding of at least {int(vocab)} rows and takes int64 "
                "input (zoo:transformer takes its vocabulary from the data); float-only models do not.")
        raise SlimkitError(f"{model_name} does not accept the examples of {data_name}, {kind}: {msg}. {hint}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        raise SlimkitError(
            f"{model_name} must return logits shaped (batch, classes); it returned "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}."
        )
    if out.shape[1] != num_classes:
        raise SlimkitError(
            f"{model_name} outputs {out.shape[1]} classes but {data_name} has {num_classes}; "
            "build it with num_classes from the data."
        )


@dataclass(frozen=True)
class ModelRef:
    """A model given by reference: a spec (``zoo:NAME``, ``package.module:function``, ``FILE.pt``),
    its weights, and whether a pickled file may be unpickled. A model slimkit saved needs only
    ``weights`` (its spec is inside).

    >>> ModelRef("zoo:lenet5", weights="runs/lenet5/model.safetensors").spec
    'zoo:lenet5'
    """

    spec: str | None = field(default=None, metadata={"flag": "--model", "short": "-m", "help":
                             "zoo:NAME[,key=value...], package.module:function, or FILE.pt with --trust-pickle."})
    weights: str | Path | None = field(default=None, metadata={"flag": "--weights", "short": "-w", "help":
                                       "Weights: .safetensors, or a state dict (loaded with weights_only=True)."})
    trust_pickle: bool = field(default=False, metadata={"flag": "--trust-pickle", "help":
                               "Allow --model FILE.pt, a fully pickled module. Unpickling runs code from the file: "
                               "only for files you trust."})

    @property
    def name(self) -> str | None:
        """What reports call the model: its spec, else its weights file."""
        return self.spec or (str(self.weights) if self.weights else None)


def resolve_model(
    model: nn.Module | str | ModelRef | None,
    data: DataBundle,
    *,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """A model object (weights applied if given), or the model a spec or a :class:`ModelRef`
    builds, checked against the data's input shape and class count.

    >>> from slimkit.data import load_data
    >>> net = resolve_model("zoo:lenet300", load_data("digits"))
    >>> type(net).__name__
    'LeNet300'
    """
    if isinstance(model, ModelRef):
        model, weights, trust_pickle = model.spec, model.weights, model.trust_pickle
    if isinstance(model, nn.Module):
        if weights:
            apply_weights(model, load_weights(weights), str(weights), type(model).__name__)
        m, name = model, type(model).__name__
    else:
        m = load_model(model, weights=weights, trust_pickle=trust_pickle, input_shape=data.input_shape,
                       num_classes=data.num_classes, vocab=data.vocab_size, pad=data.pad_id)
        name = origin_of(m).get("model") or "the model"
    check_fits(m, data.input_shape, data.num_classes, data.name, name, vocab=data.vocab_size)
    if data.is_tokens:  # measured and exported with int64 ids from now on
        m.__dict__.setdefault(_ORIGIN_ATTR, {})["input_dtype"] = "int64"
    return m
