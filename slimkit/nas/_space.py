"""Architecture families and their search spaces, declared as data.

A *family* is a zoo architecture whose searchable part is a sequence of stages of blocks
(MobileNetV2's inverted residuals, ResNet's basic blocks). Its *space* is plain data: the
width multipliers to try, and per stage the choices of each knob the family has::

    width: [0.5, 0.75, 1.0]
    stages:
      - {blocks: [1], kernel: [3, 5], expand: [1]}
      - {blocks: [1, 2], kernel: [3, 5], expand: [3, 6]}

An *architecture* is one choice per knob: ``{"width": 0.5, "stages": [{"blocks": 1,
"kernel": 3, "expand": 1}, {"blocks": 2, "kernel": 5, "expand": 6}]}``. A family turns it into
a zoo spec (``zoo:mobilenetv2,width=0.5,stages=[...]``), so every candidate is an ordinary
model that ``load_model`` / ``save_model`` rebuild. A new family registers itself with
:func:`register_family`; nothing else in the search names a family.

>>> fam = get_family("mobilenetv2")
>>> space = fam.space.narrowed({"width": [0.5]})
>>> arch = space.smallest()
>>> fam.spec(arch)
'zoo:mobilenetv2,width=0.5,blocks=[1,1,1,1,1],kernel=[3,3,3,3,3],expand=[1,3,3,3,3]'
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .. import _io
from ..errors import ConfigError, SlimkitError
from ..models.zoo import MBV2_STAGES, create_model

__all__ = ["Space", "Family", "register_family", "get_family", "family_names", "load_space", "arch_summary"]

Arch = dict[str, Any]  # {"width": float, "stages": [{knob: value, ...}, ...]}

# The allowed values of each knob (a space may only choose among these).
_KNOB_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "blocks": (lambda v: isinstance(v, int) and 1 <= v <= 8, "integers in 1..8"),
    "kernel": (lambda v: isinstance(v, int) and v in (1, 3, 5, 7), "odd kernel sizes 1, 3, 5 or 7"),
    "expand": (lambda v: isinstance(v, int) and 1 <= v <= 8, "integers in 1..8"),
}


@dataclass(frozen=True)
class Space:
    """The choices of one family: ``width`` multipliers and, per stage, the values of each knob.

    Declared as data (:meth:`from_data` / :meth:`to_data` round-trip through YAML); every
    list of choices is non-empty and sorted.
    """

    width: tuple[float, ...]
    stages: tuple[dict[str, tuple[int, ...]], ...]

    @classmethod
    def from_data(cls, data: Any, *, knobs: Sequence[str], where: str = "space") -> "Space":
        if not isinstance(data, dict):
            raise ConfigError("a space is a mapping with 'width' and 'stages'", where=where)
        unknown = set(data) - {"width", "stages", "family"}
        if unknown:
            raise ConfigError(f"unknown key(s) {_names(unknown)}; a space holds 'width' and 'stages'", where=where)
        width = data.get("width")
        if not isinstance(width, list) or not width or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w <= 4 for w in width):
            raise ConfigError(f"must be a non-empty list of multipliers in (0, 4], got {width!r}", field="width",
                              where=where)
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ConfigError(f"must be a non-empty list, one mapping of choices per stage, got {stages!r}",
                              field="stages", where=where)
        out = []
        for i, st in enumerate(stages):
            at = f"{where} stage {i}"
            if not isinstance(st, dict):
                raise ConfigError(f"must map each knob ({', '.join(knobs)}) to a list of choices, got {st!r}", where=at)
            extra = set(st) - set(knobs)
            if extra:
                raise ConfigError(f"unknown knob(s) {_names(extra)}; this family's knobs are {', '.join(knobs)}",
                                  where=at)
            choices = {}
            for knob in knobs:
                values = st.get(knob)
                if values is None:
                    raise ConfigError(f"missing; give a list of choices (e.g. {knob}: [1, 2])", field=knob, where=at)
                values = values if isinstance(values, list) else [values]
                ok, allowed = _KNOB_RULES[knob]
                if not values or not all(ok(v) for v in values):
                    raise ConfigError(f"got {values!r}; choose among {allowed}", field=knob, where=at)
                choices[knob] = tuple(sorted(set(int(v) for v in values)))
            out.append(choices)
        return cls(tuple(sorted(set(float(w) for w in width))), tuple(out))

    def to_data(self) -> dict[str, Any]:
        return {"width": list(self.width), "stages": [{k: list(v) for k, v in st.items()} for st in self.stages]}

    @property
    def knobs(self) -> tuple[str, ...]:
        return tuple(self.stages[0])

    def digest(self) -> str:
        """A short hash of the space (a latency table is only valid for the space it measured)."""
        return hashlib.sha256(json.dumps(self.to_data(), sort_keys=True).encode()).hexdigest()[:16]

    def size(self) -> int:
        """How many architectures the space holds."""
        return len(self.width) * math.prod(math.prod(len(v) for v in st.values()) for st in self.stages)

    def narrowed(self, data: dict[str, Any]) -> "Space":
        """A copy keeping only some choices: ``{"width": [0.5], "stages": [{"kernel": [3]}, ...]}``."""
        d = self.to_data()
        if "width" in data:
            d["width"] = list(data["width"])
        for i, st in enumerate(data.get("stages") or []):
            d["stages"][i].update(st)
        return Space.from_data(d, knobs=self.knobs)

    def contains(self, arch: Arch) -> bool:
        try:
            self.check(arch)
        except ConfigError:
            return False
        return True

    def check(self, arch: Arch, where: str = "architecture") -> None:
        """Raise :class:`ConfigError` unless ``arch`` is one of this space's architectures."""
        if not isinstance(arch, dict) or float(arch.get("width", -1)) not in self.width:
            raise ConfigError(f"width {arch.get('width') if isinstance(arch, dict) else arch!r} is not among the "
                              f"space's {list(self.width)}", where=where)
        stages = arch.get("stages")
        if not isinstance(stages, list) or len(stages) != len(self.stages):
            raise ConfigError(f"needs {len(self.stages)} stages, got {stages!r}", where=where)
        for i, (st, choices) in enumerate(zip(stages, self.stages)):
            for knob, values in choices.items():
                if st.get(knob) not in values:
                    raise ConfigError(f"stage {i} {knob}={st.get(knob)!r} is not among {list(values)}", where=where)

    def sample(self, trial: Any) -> Arch:
        """Draw an architecture with an ``optuna.Trial``'s ``suggest_categorical`` (``width``, ``s1.blocks``...)."""
        arch: Arch = {"width": float(trial.suggest_categorical("width", list(self.width))), "stages": []}
        for i, choices in enumerate(self.stages):
            arch["stages"].append({knob: int(trial.suggest_categorical(f"s{i}.{knob}", list(values)))
                                   for knob, values in choices.items()})
        return arch

    def smallest(self, width: float | None = None) -> Arch:
        """Every knob at its smallest choice (at ``width``, default the smallest)."""
        return {"width": self.width[0] if width is None else float(width),
                "stages": [{k: v[0] for k, v in st.items()} for st in self.stages]}

    def largest(self, width: float | None = None) -> Arch:
        return {"width": self.width[-1] if width is None else float(width),
                "stages": [{k: v[-1] for k, v in st.items()} for st in self.stages]}

    def stage_options(self, stage: int) -> list[dict[str, int]]:
        """Every combination of the knobs of one stage."""
        st = self.stages[stage]
        return [dict(zip(st, combo)) for combo in itertools.product(*st.values())]

    def random(self, rng: Any) -> Arch:
        """A uniformly random architecture (``rng``: a ``random.Random``)."""
        return {"width": rng.choice(self.width),
                "stages": [{k: rng.choice(v) for k, v in st.items()} for st in self.stages]}


@dataclass(frozen=True)
class Family:
    """A searchable architecture family.

    ``space``: its default space (data). ``knobs``: the per-stage knobs it understands.
    ``build(arch, input_shape, num_classes)`` returns the model; ``spec(arch)`` the zoo spec
    that rebuilds it; ``blocks(model)`` the searchable blocks in forward order, as
    ``(module name, module)`` (what the latency table measures one by one). Everything else
    in the model (stem, head, classifier) is the fixed part, whose cost depends only on the
    architecture's ``width``.
    """

    name: str
    space: Space
    build: Callable[[Arch, Sequence[int], int], nn.Module]
    spec: Callable[[Arch], str]
    blocks: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    description: str = ""

    @property
    def knobs(self) -> tuple[str, ...]:
        return self.space.knobs


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make ``family`` searchable by name (``slimkit nas --family NAME``).

    >>> base = get_family("resnet")
    >>> fam = register_family(Family("resnet-k3", base.space.narrowed({"stages": [{"kernel": [3]}] * 3}),
    ...                              base.build, base.spec, base.blocks))
    >>> get_family("resnet-k3").space.stages[0]["kernel"]
    (3,)
    >>> _ = _FAMILIES.pop("resnet-k3")
    """
    _FAMILIES[family.name] = family
    return family


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise SlimkitError(f"unknown architecture family '{name}'; the families with a search space are: "
                           f"{', '.join(family_names())}. A new one registers with slimkit.nas.register_family.")
    return _FAMILIES[name]


def load_space(family: Family, space: Space | dict[str, Any] | str | Path | None) -> Space:
    """The family's space, or a user's: a :class:`Space`, or plain data / a YAML file whose keys
    replace the family's choices (``{"width": [0.5]}`` keeps every stage's choices)."""
    if space is None:
        return family.space
    if isinstance(space, Space):
        return space
    where = "space"
    if isinstance(space, (str, Path)):
        path = Path(space)
        space = _io.read_file(path, "space file", _read_yaml, expected=SPACE_EXPECTED)
        where = f"space file {path.name}"
    if not isinstance(space, dict):
        raise ConfigError("a space is a mapping with 'width' and 'stages'", where=where)
    if space.get("family") not in (None, family.name):
        raise ConfigError(f"is a space of family '{space['family']}', not '{family.name}'", where=where)
    unknown = set(space) - {"width", "stages", "family"}
    if unknown:
        raise ConfigError(f"unknown key(s) {_names(unknown)}; a space holds 'width' and 'stages'", where=where)
    # what the mapping gives replaces the family's choices; what it leaves out keeps them
    merged = family.space.to_data()
    if "width" in space:
        merged["width"] = space["width"]
    stages = space.get("stages")
    if stages is not None:
        if not isinstance(stages, list) or len(stages) != len(merged["stages"]):
            raise ConfigError(f"family '{family.name}' has {len(merged['stages'])} stages, the space gives "
                              f"{len(stages) if isinstance(stages, list) else stages!r}; give one mapping per stage "
                              "({} keeps the family's choices)", field="stages", where=where)
        for i, st in enumerate(stages):
            if not isinstance(st, dict):
                raise ConfigError(f"must map knobs to lists of choices, got {st!r}", where=f"{where} stage {i}")
            merged["stages"][i].update(st)
    return Space.from_data(merged, knobs=family.knobs, where=where)


SPACE_EXPECTED = "give a YAML mapping with 'width' and 'stages' (see slimkit nas --help)"


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SlimkitError(f"space file {path} is not valid YAML: {e}") from None


def _names(keys: Any) -> list[str]:
    """Keys of a user's mapping, sorted for a message (YAML keys need not be strings)."""
    return sorted(str(k) for k in keys)


def arch_summary(arch: Arch) -> str:
    """``w0.5 [1x k3 e1; 2x k5 e6; ...]``: one architecture on one line (width, then per stage
    blocks, kernel and expansion)."""
    parts = []
    for st in arch["stages"]:
        text = f"{st.get('blocks', 1)}x k{st.get('kernel', 3)}"
        if "expand" in st:
            text += f" e{st['expand']}"
        parts.append(text)
    return f"w{arch['width']:g} [{'; '.join(parts)}]"


def _flow(data: Any) -> str:
    """Plain data in YAML flow style on one line (what a zoo spec's key=value takes)."""
    return yaml.safe_dump(data, default_flow_style=True, sort_keys=False, width=1 << 16).strip().replace(", ", ",")


# ----------------------------------------------------------------------------- MobileNetV2


def _mbv2_stages(arch: Arch) -> list[dict[str, int]]:
    if len(arch["stages"]) != len(MBV2_STAGES):
        raise ConfigError(f"mobilenetv2 has {len(MBV2_STAGES)} stages, got {len(arch['stages'])}", where="architecture")
    return [{"expand": int(st["expand"]), "channels": base["channels"], "blocks": int(st["blocks"]),
             "stride": base["stride"], "kernel": int(st["kernel"])} for st, base in zip(arch["stages"], MBV2_STAGES)]


def _mbv2_build(arch: Arch, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    return create_model("mobilenetv2", input_shape=input_shape, num_classes=num_classes,
                        width=float(arch["width"]), stages=_mbv2_stages(arch))


def _mbv2_spec(arch: Arch) -> str:
    _mbv2_stages(arch)  # checks the stage count
    knobs = ",".join(f"{k}={_flow([int(st[k]) for st in arch['stages']])}" for k in ("blocks", "kernel", "expand"))
    return f"zoo:mobilenetv2,width={float(arch['width']):g},{knobs}"


def _mbv2_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    blocks = model.get_submodule("blocks")
    return [(f"blocks.{i}", m) for i, m in enumerate(blocks.children())]


# The default MobileNetV2 space: stage channels and strides stay the zoo's (MBV2_STAGES); the
# search chooses the width, and per stage the depth, the depthwise kernel and the expansion.
MOBILENETV2_SPACE = {
    "width": [0.35, 0.5, 0.75, 1.0],
    "stages": [
        {"blocks": [1], "kernel": [3, 5], "expand": [1]},
        {"blocks": [1, 2], "kernel": [3, 5], "expand": [3, 6]},
        {"blocks": [1, 2, 3], "kernel": [3, 5], "expand": [3, 6]},
        {"blocks": [1, 2], "kernel": [3, 5], "expand": [3, 6]},
        {"blocks": [1, 2], "kernel": [3, 5], "expand": [3, 6]},
    ],
}

register_family(Family(
    name="mobilenetv2",
    space=Space.from_data(MOBILENETV2_SPACE, knobs=("blocks", "kernel", "expand")),
    build=_mbv2_build,
    spec=_mbv2_spec,
    blocks=_mbv2_blocks,
    description="MobileNetV2 inverted residuals: width; per stage blocks, depthwise kernel, expansion",
))


# ----------------------------------------------------------------------------- ResNet


def _resnet_build(arch: Arch, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    return create_model("resnet", input_shape=input_shape, num_classes=num_classes, width=float(arch["width"]),
                        blocks=[int(s["blocks"]) for s in arch["stages"]],
                        kernel=[int(s["kernel"]) for s in arch["stages"]])


def _resnet_spec(arch: Arch) -> str:
    blocks = [int(s["blocks"]) for s in arch["stages"]]
    kernels = [int(s["kernel"]) for s in arch["stages"]]
    return f"zoo:resnet,width={float(arch['width']):g},blocks={_flow(blocks)},kernel={_flow(kernels)}"


def _resnet_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stages: Any = model.num_stages
    return [(f"layer{i + 1}.{j}", b) for i in range(int(stages))
            for j, b in enumerate(getattr(model, f"layer{i + 1}"))]


# The default ResNet space: basic blocks have no expansion, so the knobs are depth and kernel.
RESNET_SPACE = {
    "width": [0.25, 0.5, 0.75, 1.0],
    "stages": [
        {"blocks": [1, 2, 3], "kernel": [3, 5]},
        {"blocks": [1, 2, 3], "kernel": [3, 5]},
        {"blocks": [1, 2, 3], "kernel": [3, 5]},
    ],
}

register_family(Family(
    name="resnet",
    space=Space.from_data(RESNET_SPACE, knobs=("blocks", "kernel")),
    build=_resnet_build,
    spec=_resnet_spec,
    blocks=_resnet_blocks,
    description="CIFAR ResNet basic blocks: width; per stage blocks and kernel",
))
