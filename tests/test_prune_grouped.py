"""Structured pruning of grouped convolutions (RegNet-style blocks): aligned group widths, valid
group counts, a model that exports, agrees with ONNX Runtime and reloads."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from slimkit.export import export_onnx
from slimkit.methods.prune import Structured, prune_
from slimkit.models import build_model, load_model, save_model


class Block(nn.Module):
    """RegNet's X block: 1x1 conv, grouped 3x3 conv (groups of ``width``), 1x1 conv, residual add."""

    def __init__(self, cin: int, cout: int, width: int, stride: int = 1):
        super().__init__()
        self.a, self.a_bn = nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.b = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, groups=cout // width, bias=False)
        self.b_bn = nn.BatchNorm2d(cout)
        self.c, self.c_bn = nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.a_bn(self.a(x)))
        y = torch.relu(self.b_bn(self.b(y)))
        y = self.c_bn(self.c(y))
        return torch.relu(y + (x if self.proj is None else self.proj(x)))


class TinyRegNet(nn.Module):
    def __init__(self, width: int, num_classes: int = 10):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.s1 = Block(32, 32, width)  # identity shortcut: the add ties s1.c to the stem
        self.s2 = Block(32, 64, width, stride=2)  # projection shortcut
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        return self.fc(self.s2(self.s1(x)).mean((2, 3)))


def regnet_w8(num_classes=10):
    """Groups of 8 channels: at round_to=8 no narrower aligned group width exists."""
    return TinyRegNet(8, num_classes)


def regnet_w16(num_classes=10):
    """Groups of 16 channels: pruned, each group keeps 8."""
    return TinyRegNet(16, num_classes)


def _model(width, digits):
    torch.manual_seed(0)
    model = build_model(f"tests.test_prune_grouped:regnet_w{width}", input_shape=digits.input_shape,
                        num_classes=digits.num_classes)
    for m in model.modules():  # batch norms with statistics of their own, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _convs(model):
    return {n: (m.in_channels, m.out_channels, m.groups) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _assert_aligned(before, after, round_to=8):
    for name, (cin, cout, groups) in after.items():
        cin0, cout0, groups0 = before[name]
        assert cout == cout0 or cout % round_to == 0, (name, cout)
        assert cin == cin0 or cin % round_to == 0, (name, cin)
        assert groups == groups0 and cin % groups == 0 and cout % groups == 0, (name, cin, cout, groups)
        if groups > 1:  # every group keeps the same width, a multiple of round_to (or its own)
            assert cout // groups in (cout0 // groups0,) or (cout // groups) % round_to == 0, (name, cout, groups)
            assert cin // groups in (cin0 // groups0,) or (cin // groups) % round_to == 0, (name, cin, groups)


@pytest.mark.parametrize("width,ratio", [(16, 0.3), (16, 0.5), (8, 0.3)])
def test_grouped_convs_keep_aligned_groups_export_and_reload(width, ratio, digits, tmp_path):
    model = _model(width, digits)
    before = _convs(model)
    r = prune_(model, Structured(ratio=ratio), example=digits.example(2))
    after = _convs(model)
    _assert_aligned(before, after)
    assert r["macs"] < r["macs_before"] and {"s1.c", "s2.c"} <= set(r["pruned_layers"])
    grouped = ("s1.b", "s2.b")
    if width == 16:  # 2 and 4 groups of 16 -> of 8 (nearest multiple of 8 to 11.2 and to 8 per group)
        assert [after[n] for n in grouped] == [(16, 16, 2), (32, 32, 4)]
        assert after["s1.a"][1] == 16 and after["s2.c"][0] == 32  # the layers feeding and fed by them follow
        assert not any("kept whole" in why for why in r["skipped"].values())
    else:  # groups of 8 cannot narrow to a multiple of 8: kept whole, with the layer feeding them, and named
        assert [after[n] for n in grouped] == [before[n] for n in grouped] and after["s1.a"][1] == 32
        for root, conv in [("s1.a", "s1.b"), ("s1.b", "s1.b"), ("s2.a", "s2.b"), ("s2.b", "s2.b")]:
            assert r["skipped"][root] == (f"kept whole: its channels meet the grouped convolution '{conv}' "
                                          f"({before[conv][2]} groups of 8), and no narrower group width is a "
                                          "multiple of round_to=8")
    x = digits.x_test[:64]
    with torch.no_grad():
        expected = model(x).numpy()
    path = export_onnx(model, tmp_path / "pruned.onnx", digits.example(2))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    again = load_model(weights=save_model(model, tmp_path / "pruned.safetensors"))
    assert _convs(again) == after
    with torch.no_grad():
        np.testing.assert_allclose(again.eval()(x).numpy(), expected, atol=1e-6)


def test_global_scope_rounds_group_widths_down_and_names_groups_it_keeps(digits):
    model = _model(16, digits)
    before = _convs(model)
    prune_(model, Structured(ratio=0.5, scope="global"), example=digits.example(2))
    _assert_aligned(before, _convs(model))
    model = _model(8, digits)
    before = _convs(model)
    r = prune_(model, Structured(ratio=0.5, scope="global"), example=digits.example(2))
    after = _convs(model)
    _assert_aligned(before, after)
    assert after["s1.b"] == before["s1.b"] and after["s2.b"] == before["s2.b"]
    assert {"s1.a", "s1.b", "s2.a", "s2.b"} <= {n for n, why in r["skipped"].items() if "kept whole" in why}


class UnevenGroups(nn.Module):
    """An add tying the outputs of convolutions with 4 and 6 groups: no pattern fits both."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 48, 3, padding=1)
        self.g4 = nn.Conv2d(48, 48, 3, padding=1, groups=4)
        self.g6 = nn.Conv2d(48, 48, 3, padding=1, groups=6)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.fc((self.g4(x) + self.g6(x)).mean((2, 3)))


def test_outputs_of_grouped_convs_out_of_step_are_kept_and_named(digits):
    torch.manual_seed(0)
    model = UnevenGroups().eval()
    x = digits.x_test[:16]
    with torch.no_grad():
        expected = model(x)
    r = prune_(model, Structured(ratio=0.5, round_to=1), example=digits.example(2))
    assert "out of step with its 4 groups" in r["skipped"]["g4"]
    assert (model.g4.out_channels, model.g6.out_channels, model.g4.groups, model.g6.groups) == (48, 48, 4, 6)
    with torch.no_grad():  # nothing scrambled: the kept layers compute what they did
        torch.testing.assert_close(model(x), expected)
