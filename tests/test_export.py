import onnx
import pytest
import torch
from torch import nn

from slimkit.errors import ExportError
from slimkit.export import export_onnx, fold_batchnorm, ort_predict, ort_session, parity


@pytest.mark.parametrize("name,kw", [("lenet300", {}), ("lenet5", {}), ("resnet", {"width": 0.5}), ("mobilenetv2", {"width": 0.5})])
def test_export_parity_on_real_data(trained, digits, tmp_path, name, kw):
    model, _ = trained(name, **kw)
    path = export_onnx(model, tmp_path / "m.onnx", digits.example(2))
    p = parity(model, path, digits.x_test)
    assert p["top1_agreement"] == 1.0 and p["max_abs_diff"] < 1e-3 and p["samples"] == len(digits.x_test)
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value  # dynamic batch
    sess = ort_session(path)
    assert ort_predict(sess, digits.x_test[:1]).shape == (1, 10)
    assert ort_predict(sess, digits.x_test[:33], batch=33).shape == (33, 10)


def test_fold_batchnorm_is_exact_and_leaves_input_alone(trained, digits):
    model, _ = trained("resnet", width=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model, digits.example(2))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(digits.x_test), model(digits.x_test), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_bn_used_after_a_shared_conv_output_is_not_folded(digits):
    class Tap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return (self.bn(y) + y).flatten(1)[:, :10]  # y is used twice: folding would change it

    m = Tap().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_()
        m.bn.running_var.uniform_(0.5, 2)
    folded = fold_batchnorm(m, digits.example(2))
    torch.testing.assert_close(folded(digits.x_test[:5]), m(digits.x_test[:5]))
    assert isinstance(folded.bn, nn.BatchNorm2d)


@torch.library.custom_op("slimkit_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class _Odd(nn.Module):
    def forward(self, x):
        return _mystery(x)


class _WithOddOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.block = nn.Sequential(nn.ReLU(), _Odd())

    def forward(self, x):
        return self.block(self.fc(x.flatten(1)))


def test_export_failure_names_module_and_op(digits, tmp_path):
    target = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as err:
        export_onnx(_WithOddOp().eval(), target, digits.example(2))
    assert err.value.module == "block.1" and "slimkit_test.mystery" in err.value.op
    assert "block.1" in str(err.value) and "_Odd" in str(err.value)
    assert not target.exists() and not list(tmp_path.iterdir())  # nothing half-written


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.inner = nn.Sequential(nn.Identity(), _Branchy())

    def forward(self, x):
        return self.inner(self.fc(x.flatten(1)))


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
            return x
        return -x


def test_untraceable_module_is_located(digits, tmp_path):
    with pytest.raises(ExportError) as err:
        export_onnx(_DataDependent().eval(), tmp_path / "m.onnx", digits.example(2))
    assert err.value.module == "inner.1"
