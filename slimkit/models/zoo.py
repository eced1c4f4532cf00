"""The built-in model zoo, written here (no torchvision).

Every factory takes the data's ``input_shape`` (``(C, H, W)`` or ``(features,)``) and
``num_classes`` and adapts to them, so ``zoo:lenet5`` works on 8x8 digits and on 28x28
Fashion-MNIST alike; ``zoo:lstm`` reads an image row by row (``T = H`` steps of ``C * W``
features) or a float sequence ``(T, F)``; ``zoo:transformer`` reads integer token ids ``(T,)``,
its vocabulary taken from the data (``vocab``: the largest id + 1) unless the spec names one.

>>> from slimkit.models import create_model
>>> create_model("resnet", input_shape=(1, 8, 8), num_classes=10, width=0.5)  # doctest: +ELLIPSIS
ResNet(...
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SlimkitError

__all__ = [
    "register_model",
    "create_model",
    "zoo_names",
    "LeNet300",
    "LeNet5",
    "ResNet",
    "MobileNetV2",
    "MBV2_STAGES",
    "RecurrentClassifier",
    "RNN_CELLS",
    "TokenTransformer",
]

_ZOO: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a factory ``fn(input_shape, num_classes, **kwargs) -> nn.Module`` as ``zoo:name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _ZOO[name] = fn
        return fn

    return deco


def zoo_names() -> list[str]:
    return sorted(_ZOO)


def create_model(name: str, *, input_shape: Sequence[int], num_classes: int, vocab: int | None = None,
                 pad: int | None = None, **kwargs: Any) -> nn.Module:
    """Build the zoo model ``name`` for the given input shape and class count.

    What the data knows of token ids, ``vocab`` (ids are ``0..vocab-1``) and ``pad`` (the padding
    id), goes to the factories that take an argument of that name; the others ignore it.
    """
    if name not in _ZOO:
        raise SlimkitError(f"unknown zoo model '{name}'; the zoo has: {', '.join(zoo_names())}.")
    factory = _ZOO[name]
    accepted = inspect.signature(factory).parameters
    for key, value in (("vocab", vocab), ("pad", pad)):
        if value is not None and key in accepted:
            kwargs[key] = int(value)
    try:
        return factory(input_shape=tuple(input_shape), num_classes=int(num_classes), **kwargs)
    except TypeError as e:
        raise SlimkitError(f"zoo:{name} does not take these arguments {sorted(kwargs)}: {e}.") from None


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise SlimkitError(
            f"zoo:{name} is a convolutional network and needs image data shaped (C, H, W); "
            f"this data has examples of shape {input_shape}. Use zoo:lenet300 for flat features."
        )
    return input_shape  # type: ignore[return-value]


def _div8(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` (MobileNet's make_divisible)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


# --------------------------------------------------------------------------- LeNet-300-100


class LeNet300(nn.Module):
    """The 784-300-100-10 multilayer perceptron of LeCun et al. (Deep Compression's LeNet-300-100)."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: Sequence[int] = (300, 100)):
        super().__init__()
        h1, h2 = hidden
        self.fc1 = nn.Linear(in_features, h1)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(h1, h2)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (N, C*H*W)
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


@register_model("lenet300")
def lenet300(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, hidden: Sequence[int] = (300, 100)) -> LeNet300:
    return LeNet300(math.prod(input_shape), num_classes, tuple(hidden))


# --------------------------------------------------------------------------- LeNet-5 (Caffe)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 as used by Deep Compression: conv 20, pool, conv 50, pool, fc 500, relu, fc.

    Like the Caffe model there is no non-linearity after the convolutions. Inputs smaller
    than 16 pixels get padding 2 so the two 5x5 convolutions and pools still fit.
    """

    def __init__(self, in_channels: int = 1, image_hw: tuple[int, int] = (28, 28), num_classes: int = 10,
                 channels: Sequence[int] = (20, 50), hidden: int = 500):
        super().__init__()
        c1, c2 = channels
        pad = 2 if min(image_hw) < 16 else 0
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=pad)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=pad)
        self.pool2 = nn.MaxPool2d(2)
        h, w = image_hw
        for _ in range(2):
            h, w = (h + 2 * pad - 4) // 2, (w + 2 * pad - 4) // 2
        if h < 1 or w < 1:
            raise SlimkitError(f"zoo:lenet5 needs images of at least 8x8 pixels, got {image_hw}.")
        self.fc1 = nn.Linear(c2 * h * w, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(x.flatten(1))))  # (N, C*H*W) -> (N, classes)


@register_model("lenet5")
def lenet5(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
           channels: Sequence[int] = (20, 50), hidden: int = 500) -> LeNet5:
    c, h, w = _image_shape("lenet5", tuple(input_shape))
    return LeNet5(c, (h, w), num_classes, tuple(channels), hidden)


# --------------------------------------------------------------------------- ResNet-20 (CIFAR style)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, kernel: int = 3):
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel, 1, pad, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:  # option B: projection shortcut
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """He et al.'s CIFAR ResNet (3 stages of basic blocks, 16/32/64 channels times ``width``)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 blocks: Sequence[int] = (3, 3, 3), channels: Sequence[int] = (16, 32, 64),
                 kernel: int | Sequence[int] = 3):
        super().__init__()
        if width <= 0:
            raise SlimkitError(f"zoo:resnet width must be > 0, got {width}.")
        if len(blocks) != len(channels):
            raise SlimkitError(f"zoo:resnet needs one block count per stage: blocks={list(blocks)}, channels={list(channels)}.")
        kernels = [int(kernel)] * len(blocks) if isinstance(kernel, int) else [int(k) for k in kernel]
        if len(kernels) != len(blocks) or any(k < 1 or k % 2 == 0 for k in kernels):
            raise SlimkitError(f"zoo:resnet kernel must be one odd size or one per stage, got {kernel}.")
        chans = [max(4, int(round(c * width))) for c in channels]
        self.conv1 = nn.Conv2d(in_channels, chans[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        self.relu = nn.ReLU()
        in_ch = chans[0]
        for i, (n, c) in enumerate(zip(blocks, chans)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_ch, c, stride, kernels[i]))
                in_ch = c
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.pool(x).flatten(1))  # (N, C, 1, 1) -> (N, C) -> (N, classes)


@register_model("resnet")
def resnet(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, width: float = 1.0,
           depth: int = 20, blocks: Sequence[int] | None = None, kernel: int | Sequence[int] = 3) -> ResNet:
    """ResNet-``depth`` (6n+2 layers; 20 by default) with a width multiplier; ``kernel``: one size, or one per stage."""
    c, _, _ = _image_shape("resnet", tuple(input_shape))
    if blocks is None:
        if (depth - 2) % 6 or depth < 8:
            raise SlimkitError(f"zoo:resnet depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}.")
        blocks = ((depth - 2) // 6,) * 3
    return ResNet(c, num_classes, width, tuple(blocks), kernel=kernel)


# --------------------------------------------------------------------------- MobileNetV2 (small)


# One dict per stage: expansion ratio, output channels (at width 1), blocks, first stride, kernel.
MBV2_STAGES: tuple[dict[str, int], ...] = (
    {"expand": 1, "channels": 16, "blocks": 1, "stride": 1, "kernel": 3},
    {"expand": 6, "channels": 24, "blocks": 2, "stride": 2, "kernel": 3},
    {"expand": 6, "channels": 32, "blocks": 3, "stride": 2, "kernel": 3},
    {"expand": 6, "channels": 64, "blocks": 2, "stride": 2, "kernel": 3},
    {"expand": 6, "channels": 96, "blocks": 1, "stride": 1, "kernel": 3},
)


def _conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, kxk depthwise, 1x1 linear projection, residual if shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, kernel: int = 3):
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(in_ch, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, kernel, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """A small MobileNetV2 (Sandler et al.) for small images, with a width multiplier.

    ``stages`` (see :data:`MBV2_STAGES`) sets expansion, channels, blocks, stride and kernel
    per stage; a stride-2 stage only downsamples while the feature map is at least 8 pixels.
    """

    def __init__(self, in_channels: int = 3, image_hw: tuple[int, int] = (32, 32), num_classes: int = 10,
                 width: float = 1.0, stages: Sequence[dict[str, int]] = MBV2_STAGES,
                 stem_channels: int = 32, last_channels: int = 320):
        super().__init__()
        if width <= 0:
            raise SlimkitError(f"zoo:mobilenetv2 width must be > 0, got {width}.")
        stem = _div8(stem_channels * width)
        self.stem = _conv_bn_relu6(in_channels, stem, 3, 1)
        size = min(image_hw)
        in_ch, blocks = stem, []
        for i, st in enumerate(stages):
            unknown = set(st) - {"expand", "channels", "blocks", "stride", "kernel"}
            if unknown:
                raise SlimkitError(f"zoo:mobilenetv2 stage {i}: unknown keys {sorted(unknown)}.")
            out_ch = _div8(st["channels"] * width)
            for j in range(int(st["blocks"])):
                stride = st.get("stride", 1) if j == 0 else 1
                if stride == 2 and size < 8:
                    stride = 1
                if stride == 2:
                    size = (size + 1) // 2
                blocks.append(InvertedResidual(in_ch, out_ch, stride, int(st["expand"]), int(st.get("kernel", 3))))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        last = _div8(last_channels * max(1.0, width))
        self.head = _conv_bn_relu6(in_ch, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.pool(x).flatten(1))  # (N, C, 1, 1) -> (N, C)


@register_model("mobilenetv2")
def mobilenetv2(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, width: float = 1.0,
                stages: Sequence[dict[str, int]] | None = None, last_channels: int = 320,
                blocks: Sequence[int] | None = None, kernel: int | Sequence[int] | None = None,
                expand: int | Sequence[int] | None = None) -> MobileNetV2:
    """``stages`` (default :data:`MBV2_STAGES`); ``blocks`` / ``kernel`` / ``expand``: one value
    (or one per stage) overriding the stages' own, e.g. ``zoo:mobilenetv2,blocks=[1,2,2,1,1],kernel=5``."""
    c, h, w = _image_shape("mobilenetv2", tuple(input_shape))
    stages = [dict(st) for st in (stages or MBV2_STAGES)]
    for key, value in (("blocks", blocks), ("kernel", kernel), ("expand", expand)):
        if value is None:
            continue
        values = [value] * len(stages) if isinstance(value, int) else list(value)
        if len(values) != len(stages):
            raise SlimkitError(f"zoo:mobilenetv2 {key} needs one value or one per stage ({len(stages)}), got {value}.")
        for st, v in zip(stages, values):
            st[key] = int(v)
    return MobileNetV2(c, (h, w), num_classes, width, tuple(stages), last_channels=last_channels)


# --------------------------------------------------------------------------- LSTM / GRU over sequences


RNN_CELLS: dict[str, Callable[..., nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}


def _sequence_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(steps, features)`` of a sequence ``(T, F)``, or of an image ``(C, H, W)`` read row by row."""
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    if len(input_shape) == 3:
        c, h, w = input_shape
        return h, c * w
    raise SlimkitError(
        f"zoo:{name} reads sequences shaped (T, F) or images (C, H, W) row by row; this data has examples "
        f"of shape {input_shape}. Use zoo:lenet300 for flat features."
    )


class RecurrentClassifier(nn.Module):
    """An LSTM (or GRU) over a sequence, classifying from the last hidden state of its top layer.

    The input is ``(N, T, F)``, or ``(N, C, H, W)`` read row by row as ``T = H`` steps of ``C * W``
    features (Fashion-MNIST: 28 steps of 28 features). ``bidirectional``: the top layer's last
    forward and backward states are concatenated.

    >>> net = RecurrentClassifier(features=8, num_classes=10, hidden=16)
    >>> net(torch.zeros(3, 1, 8, 8)).shape, net(torch.zeros(3, 8, 8)).shape
    (torch.Size([3, 10]), torch.Size([3, 10]))
    """

    def __init__(self, features: int, num_classes: int = 10, hidden: int = 64, layers: int = 1,
                 cell: str = "lstm", bidirectional: bool = False):
        super().__init__()
        if cell not in RNN_CELLS:
            raise SlimkitError(f"zoo:lstm cell must be one of {', '.join(RNN_CELLS)}, got '{cell}'.")
        if hidden < 1 or layers < 1:
            raise SlimkitError(f"zoo:lstm needs hidden >= 1 and layers >= 1, got hidden={hidden}, layers={layers}.")
        self.rnn = RNN_CELLS[cell](features, hidden, num_layers=layers, batch_first=True,
                                   bidirectional=bool(bidirectional))
        self.directions = 2 if bidirectional else 1
        self.fc = nn.Linear(hidden * self.directions, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # (N, C, H, W) -> (N, H, C*W): one step per image row
            x = x.permute(0, 2, 1, 3).flatten(2)
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state  # LSTM: (h_n, c_n); GRU: h_n
        last = h[-self.directions:]  # (directions, N, hidden): the top layer
        return self.fc(last.transpose(0, 1).flatten(1))  # (N, directions*hidden) -> (N, classes)


@register_model("lstm")
def lstm(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, hidden: int = 64, layers: int = 1,
         cell: str = "lstm", bidirectional: bool = False) -> RecurrentClassifier:
    """An LSTM classifier (``cell=gru`` for a GRU) over ``(T, F)`` sequences or images read row by row,
    e.g. ``zoo:lstm,hidden=128,layers=2`` or ``zoo:lstm,cell=gru``."""
    _, features = _sequence_shape("lstm", tuple(input_shape))
    return RecurrentClassifier(features, num_classes, int(hidden), int(layers), str(cell), bool(bidirectional))


# --------------------------------------------------------------------------- transformer encoder over tokens


class TokenTransformer(nn.Module):
    """A small encoder classifier over integer token ids ``(N, T)``: token + learned position
    embeddings, ``layers`` pre-norm ``nn.TransformerEncoderLayer`` (batch first, GELU), a final
    layer norm, then mean pooling over the non-padding tokens (``pool="mean"``) or the first token
    (``pool="first"``, a [CLS] token) and a linear classifier.

    ``pad``: the padding id; padded tokens are masked out of attention and pooling (``None``: no
    padding, every token counts). Sequences up to ``max_len`` tokens are accepted.

    >>> net = TokenTransformer(vocab=32, num_classes=2, dim=16, heads=2, layers=1, max_len=8, pad=0)
    >>> net(torch.randint(0, 32, (3, 8))).shape
    torch.Size([3, 2])
    """

    def __init__(self, vocab: int, num_classes: int = 2, dim: int = 64, heads: int = 4, layers: int = 2,
                 max_len: int = 128, ffn: int | None = None, dropout: float = 0.0, pool: str = "mean",
                 pad: int | None = None):
        super().__init__()
        if vocab < 1 or dim < 1 or heads < 1 or layers < 1 or max_len < 1:
            raise SlimkitError(f"zoo:transformer needs vocab, dim, heads, layers and max_len >= 1, got vocab={vocab}, "
                               f"dim={dim}, heads={heads}, layers={layers}, max_len={max_len}.")
        if dim % heads:
            raise SlimkitError(f"zoo:transformer dim ({dim}) must be a multiple of heads ({heads}).")
        if pool not in ("mean", "first"):
            raise SlimkitError(f"zoo:transformer pool must be 'mean' or 'first', got '{pool}'.")
        if pad is not None and not 0 <= pad < vocab:
            raise SlimkitError(f"zoo:transformer pad id {pad} is outside the vocabulary 0..{vocab - 1}.")
        self.pool, self.pad, self.max_len = pool, pad, int(max_len)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ffn or 4 * dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T) int64 token ids
        t = x.shape[1]
        torch._check(t <= self.max_len, lambda: f"zoo:transformer takes at most max_len={self.max_len} tokens")
        h = self.embed(x) + self.pos(torch.arange(t, device=x.device))  # (N, T, dim) + (T, dim)
        if self.pad is None:
            h = self.norm(self.encoder(h))
            return self.fc(h[:, 0] if self.pool == "first" else h.mean(1))  # (N, dim) -> (N, classes)
        padded = x == self.pad  # (N, T); a sequence of padding only attends to all of it (no NaN)
        padded = padded & ~padded.all(1, keepdim=True)
        h = self.norm(self.encoder(h, src_key_padding_mask=padded))
        if self.pool == "first":
            return self.fc(h[:, 0])
        keep = (~padded).unsqueeze(-1).to(h.dtype)  # (N, T, 1)
        return self.fc((h * keep).sum(1) / keep.sum(1).clamp_min(1.0))  # (N, dim) -> (N, classes)


@register_model("transformer")
def transformer(input_shape: Sequence[int] = (128,), num_classes: int = 2, vocab: int | None = None, dim: int = 64,
                heads: int = 4, layers: int = 2, max_len: int | None = None, ffn: int | None = None,
                dropout: float = 0.0, pool: str = "mean", pad: int | None = None) -> TokenTransformer:
    """A small transformer encoder over token ids ``(T,)``, e.g. ``zoo:transformer,dim=128,layers=4``.
    ``vocab`` defaults to the data's (the largest id + 1), ``max_len`` to its sequence length ``T``,
    ``pad`` to the data's padding id (from its ``attention_mask``; else no padding)."""
    shape = tuple(input_shape)
    if len(shape) != 1:
        raise SlimkitError(
            f"zoo:transformer reads integer token ids shaped (T,); this data has examples of shape {shape}. "
            "Give token ids as an integer array x of shape (N, T) (see the README, 'Token inputs')."
        )
    if vocab is None:
        raise SlimkitError(
            "zoo:transformer needs a vocabulary size: load integer token ids (the vocabulary is taken from them) "
            "or name it, e.g. zoo:transformer,vocab=30522."
        )
    return TokenTransformer(int(vocab), num_classes, int(dim), int(heads), int(layers),
                            int(max_len or shape[0]), None if ffn is None else int(ffn), float(dropout), str(pool),
                            None if pad is None else int(pad))
