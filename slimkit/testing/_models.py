"""Toy models with example inputs, for the conformance checks and for plugin authors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..data import DataBundle
from ..models import build_model, set_origin
from ..training import TrainConfig, fit

DEFAULT_MODEL = "zoo:lenet5"  # conv and linear layers: every built-in method has work to do on it
# The models a step without a STEP_CASES entry runs on in the suite. "slimkit.testing:tiny_cnn"
# (batch norms, a residual add) passes every built-in step too; adding it here doubles the run.
MODELS = (DEFAULT_MODEL,)


# ----------------------------------------------------------------------------- toy models


class TinyMLP(nn.Module):
    """Two linear layers: the smallest model a linear-layer method can work on.

    >>> model = TinyMLP((1, 8, 8), 10)
    >>> model(*model.example_inputs()).shape
    torch.Size([2, 10])
    """

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10, hidden: int = 32):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.fc1 = nn.Linear(math.prod(self.input_shape), hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x.flatten(1))))  # (N, C*H*W) -> (N, classes)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.randn(batch, *self.input_shape),)


class TinyCNN(nn.Module):
    """Conv-BN-ReLU, a residual block (two convs tied by an add), pooling, a linear classifier:
    the structures compression breaks most often (batch norms to fold, channels tied by an add).

    >>> model = TinyCNN((1, 8, 8), 10)
    >>> model(*model.example_inputs()).shape
    torch.Size([2, 10])
    """

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10, width: int = 16):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.conv1 = nn.Conv2d(self.input_shape[0], width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(x + self.bn2(self.conv2(x)))  # the residual add ties conv1's and conv2's channels
        return self.fc(self.pool(x).flatten(1))  # (N, width, 1, 1) -> (N, width) -> (N, classes)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.randn(batch, *self.input_shape),)


def tiny_mlp(input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10) -> TinyMLP:
    """The factory behind the model spec ``slimkit.testing:tiny_mlp``."""
    return TinyMLP(input_shape, num_classes)


def tiny_cnn(input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10) -> TinyCNN:
    """The factory behind the model spec ``slimkit.testing:tiny_cnn``."""
    return TinyCNN(input_shape, num_classes)


def train_model(spec: str, data: DataBundle, *, epochs: int = 8, seed: int = 0) -> nn.Module:
    """A model built from ``spec`` (``zoo:lenet5``, ``slimkit.testing:tiny_cnn``...) and trained on
    ``data``, remembering its spec so that a saved copy loads again."""

    torch.manual_seed(seed)
    model = build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes)
    set_origin(model, spec, data.input_shape, data.num_classes)
    fit(model, data, TrainConfig(epochs=epochs, batch_size=32, lr=2e-3, seed=seed))
    return model.eval()


