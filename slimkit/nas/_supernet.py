"""A weight-sharing supernet (Once-for-All style): train one network once, evaluate any
architecture of the space by inheriting its weights.

The supernet is the space's largest architecture (widest, deepest, largest kernels and
expansions). A sub-network takes, from each of its layers' tensors, the leading channels
(width, expansion) and the centre of the kernels (a 3x3 inside a 5x5), and the first blocks of
each stage (depth). That rule is the same for every family: a parameter of the sub-network is
the slice of the supernet's parameter of the same module that has its shape, so a family
needs nothing beyond what :class:`~slimkit.nas.Family` already declares.

Training follows the sandwich rule (BigNAS, OFA's progressive shrinking without its stages):
every step trains the largest, the smallest and two random sub-networks on the same batch,
distilled from the teacher when one is given (else from the labels). Batch norms always use the
batch's statistics while training; a sub-network taken out (:meth:`Supernet.extract`) has its
statistics re-estimated on training batches before it is evaluated. Simplifications against
OFA: no kernel transformation matrices, no channel sorting by importance, one training phase.

>>> sn = Supernet("mobilenetv2", space={"width": [0.5]}, input_shape=(1, 8, 8), num_classes=10)  # doctest: +SKIP
>>> report = train_supernet(sn, "digits", steps=50, train=TrainConfig(lr=2e-3))  # doctest: +SKIP
>>> evaluate_subnet(sn, sn.space.smallest(), "digits")  # doctest: +SKIP
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import _console
from ..data import DataBundle, resolve_data
from ..errors import SlimkitError
from ..models import set_origin
from ..training import TrainConfig, distillation_loss, evaluate
from ._hooks import recalibrate_bn
from ._space import Arch, Family, Space, get_family, load_space

__all__ = ["Supernet", "train_supernet", "evaluate_subnet", "inherit"]

# How a supernet trains by default: Adam at 2e-3, batches of 128, on the CPU.
SUPERNET_TRAIN = TrainConfig(lr=2e-3, batch_size=128)


def inherit(big: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The slice of ``big`` shaped ``shape``: leading entries of the first two dimensions
    (output / input channels), the centre of the others (kernels). A view: gradients flow back."""
    index = []
    for d, (have, want) in enumerate(zip(big.shape, shape)):
        if want > have:
            raise SlimkitError(f"a sub-network needs a tensor of shape {tuple(shape)}, larger than the supernet's "
                               f"{tuple(big.shape)}")
        start = (have - want) // 2 if d >= 2 else 0
        index.append(slice(start, start + want))
    return big[tuple(index)]


class Supernet(nn.Module):
    """The largest architecture of a family's space, whose weights every sub-network shares."""

    def __init__(self, family: str | Family, *, input_shape: Sequence[int], num_classes: int,
                 space: Space | dict[str, Any] | str | Path | None = None):
        super().__init__()
        self.family = family if isinstance(family, Family) else get_family(family)
        self.space = load_space(self.family, space)
        self.input_shape = tuple(input_shape)
        self.num_classes = int(num_classes)
        self.largest = self.space.largest()
        self.net = self.family.build(self.largest, self.input_shape, self.num_classes)
        self._skeletons: dict[str, tuple[nn.Module, dict[str, str]]] = {}
        # stage -> the supernet's block names in that stage
        big_blocks = [n for n, _ in self.family.blocks(self.net)]
        self._stage_blocks: list[list[str]] = []
        i = 0
        for st in self.largest["stages"]:
            self._stage_blocks.append(big_blocks[i:i + st["blocks"]])
            i += st["blocks"]

    def _skeleton(self, arch: Arch) -> tuple[nn.Module, dict[str, str]]:
        """The sub-network's module (its own weights unused) and, per parameter, the supernet's."""
        import json

        key = json.dumps(arch, sort_keys=True)
        if key not in self._skeletons:
            self.space.check(arch)
            sub = self.family.build(arch, self.input_shape, self.num_classes)
            names = {}
            sub_blocks = [n for n, _ in self.family.blocks(sub)]
            i = 0
            for s, st in enumerate(arch["stages"]):
                for j in range(st["blocks"]):
                    names[sub_blocks[i]] = self._stage_blocks[s][j]
                    i += 1
            mapping = {}
            big = dict(self.net.named_parameters())
            for pname, p in sub.named_parameters():
                target = pname
                for sub_b, big_b in names.items():
                    if pname.startswith(sub_b + "."):
                        target = big_b + pname[len(sub_b):]
                        break
                if target not in big or big[target].dim() != p.dim():
                    raise SlimkitError(f"family '{self.family.name}': the sub-network's parameter {pname} has no "
                                       f"counterpart in the supernet ({target}); its blocks cannot share weights "
                                       "(e.g. a stage whose expansion choices mix 1 and more).")
                mapping[pname] = target
            self._skeletons[key] = (sub.train(), mapping)
        return self._skeletons[key]

    def forward(self, x: torch.Tensor, arch: Arch | None = None) -> torch.Tensor:
        """The logits of the sub-network ``arch`` (default: the largest), with the shared weights."""
        from torch.func import functional_call

        sub, mapping = self._skeleton(arch or self.largest)
        big = dict(self.net.named_parameters())
        params = {n: inherit(big[mapping[n]], p.shape) for n, p in sub.named_parameters()}
        sub.to(x.device)
        buffers = {n: b.detach().clone() for n, b in sub.named_buffers()}  # batch statistics only
        return functional_call(sub, (params, buffers), (x,))

    def extract(self, arch: Arch) -> nn.Module:
        """A standalone model of ``arch`` holding copies of its inherited weights (batch-norm
        statistics not yet estimated: see :func:`evaluate_subnet`)."""
        sub, mapping = self._skeleton(arch)
        model = self.family.build(arch, self.input_shape, self.num_classes)
        big = dict(self.net.named_parameters())
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(inherit(big[mapping[name]], p.shape))
        set_origin(model, self.family.spec(arch), self.input_shape, self.num_classes)
        return model.eval()

    def sample(self, rng: random.Random) -> Arch:
        return self.space.random(rng)


def train_supernet(
    supernet: Supernet,
    data: DataBundle | str,
    *,
    steps: int = 500,
    teacher: nn.Module | None = None,
    random_subnets: int = 2,
    train: TrainConfig = SUPERNET_TRAIN,
) -> dict[str, Any]:
    """Train ``supernet`` in place for ``steps`` steps with the sandwich rule (see the module doc).

    Each step: the largest, the smallest and ``random_subnets`` random sub-networks, on the same
    batch; Adam with a cosine schedule. ``train`` gives the ``lr``, the ``batch_size``, the
    distillation's ``temperature`` and ``alpha``, the ``device`` and the ``seed`` (its epochs,
    optimizer and schedule do not apply: the steps count the training). Returns ``steps``,
    ``subnets_per_step``, ``seconds``, ``final_loss``.

    >>> sn = Supernet("mobilenetv2", space={"width": [0.35]}, input_shape=(1, 8, 8), num_classes=10)  # doctest: +SKIP
    >>> train_supernet(sn, "digits", steps=10, train=TrainConfig(lr=2e-3, batch_size=32))["steps"]  # doctest: +SKIP
    10
    """
    lr, batch_size, temperature, alpha = train.lr, train.batch_size, train.temperature, train.alpha
    device, seed = train.device, train.seed
    bundle = resolve_data(data, seed)
    if steps < 1:
        raise SlimkitError(f"supernet steps must be >= 1, got {steps}.")
    dev = torch.device(device)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    supernet.to(dev).train()
    if teacher is not None:
        teacher = teacher.to(dev).eval()
    opt = torch.optim.Adam(supernet.parameters(), lr=lr)
    x_all, y_all = bundle.x_train.to(dev), bundle.y_train.to(dev)
    gen = torch.Generator().manual_seed(seed)
    smallest = supernet.space.smallest()
    t0 = time.perf_counter()
    running = 0.0
    with _console.progress() as bar:
        task = bar.add_task("supernet", total=steps, info="")
        for step in range(steps):
            idx = torch.randint(0, len(x_all), (batch_size,), generator=gen).to(dev)
            x, y = x_all[idx], y_all[idx]
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi)).item())
            opt.zero_grad(set_to_none=True)
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
            total = 0.0
            for arch in [supernet.largest, smallest] + [supernet.sample(rng) for _ in range(random_subnets)]:
                logits = supernet(x, arch)
                loss = distillation_loss(logits, t_logits, y, temperature, alpha) if t_logits is not None \
                    else F.cross_entropy(logits, y)
                loss.backward()
                total += float(loss.detach())
            opt.step()
            running = 0.9 * running + 0.1 * total / (2 + random_subnets) if step else total / (2 + random_subnets)
            bar.update(task, advance=1, info=f"loss {running:.4f}")
    supernet.to("cpu")
    if teacher is not None:
        teacher.to("cpu")
    return {"steps": steps, "subnets_per_step": 2 + random_subnets, "seconds": time.perf_counter() - t0,
            "final_loss": running}


def evaluate_subnet(supernet: Supernet, arch: Arch, data: DataBundle | str, *, split: str = "val",
                    bn_batches: int = 8, seed: int = 0) -> tuple[float, nn.Module]:
    """Accuracy of ``arch`` with the supernet's weights (batch norm re-estimated on
    ``bn_batches`` training batches), and the extracted model."""
    bundle = resolve_data(data, seed)
    model = supernet.extract(arch)
    recalibrate_bn(model, bundle.x_train, batches=bn_batches, seed=seed)
    x, y = bundle.split(split)
    return evaluate(model.eval(), x, y), model
