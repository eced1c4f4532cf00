import pickle

import pytest
import torch
from torch import nn

from slimkit.errors import SlimkitError
from slimkit.models import (
    check_fits, create_model, load_model, read_metadata, record_structure, register_structure_op, save_model,
    structure_of, zoo_names,
)

SHAPES = [((1, 8, 8), 10), ((1, 28, 28), 10), ((3, 32, 32), 7)]


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "resnet", "mobilenetv2"])
@pytest.mark.parametrize("shape,classes", SHAPES)
def test_zoo_adapts_to_input_shape_and_classes(name, shape, classes):
    model = create_model(name, input_shape=shape, num_classes=classes).eval()
    with torch.no_grad():
        out = model(torch.rand(3, *shape))
    assert out.shape == (3, classes)


def test_zoo_architectures_are_the_ones_named():
    l300 = create_model("lenet300", input_shape=(1, 28, 28), num_classes=10)
    assert [m.out_features for m in l300.modules() if isinstance(m, nn.Linear)] == [300, 100, 10]
    assert sum(p.numel() for p in l300.parameters()) == 266_610  # 784*300+300 + 300*100+100 + 100*10+10
    l5 = create_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    convs = [m for m in l5.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [20, 50] and l5.fc1.in_features == 800 and l5.fc1.out_features == 500
    assert sum(p.numel() for p in l5.parameters()) == 431_080  # Deep Compression's LeNet-5: 431K weights
    r20 = create_model("resnet", input_shape=(3, 32, 32), num_classes=10)
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in r20.modules()) == 19  # + fc = 20 layers
    assert 265_000 < sum(p.numel() for p in r20.parameters()) < 275_000  # He et al.: 0.27M
    half = create_model("resnet", input_shape=(3, 32, 32), num_classes=10, width=0.5)
    assert half.conv1.out_channels == 8
    mb = create_model("mobilenetv2", input_shape=(3, 32, 32), num_classes=10, width=0.5)
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in mb.modules())  # depthwise


def test_zoo_errors():
    with pytest.raises(SlimkitError, match="unknown zoo model 'vgg'.*lenet300"):
        load_model("zoo:vgg", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(SlimkitError, match="needs image data"):
        load_model("zoo:lenet5", input_shape=(64,), num_classes=10)
    with pytest.raises(SlimkitError, match="not key=value"):
        load_model("zoo:resnet,wide", input_shape=(1, 8, 8), num_classes=10)
    assert zoo_names() == sorted(zoo_names())
    assert {"lenet300", "lenet5", "lstm", "mobilenetv2", "resnet"} <= set(zoo_names())


def test_zoo_spec_arguments():
    m = load_model("zoo:resnet,width=0.25,depth=8", input_shape=(1, 8, 8), num_classes=10)
    assert m.conv1.out_channels == 4 and len(m.layer1) == 1


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "mynet.py").write_text(
        "import torch.nn as nn, math\n"
        "def build(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))\n"
        "def plain():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
        "def notamodel():\n"
        "    return 42\n"
    )
    monkeypatch.chdir(tmp_path)
    m = load_model("mynet:build", input_shape=(1, 8, 8), num_classes=3)
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    assert load_model("mynet:plain", input_shape=(1, 8, 8), num_classes=10)(torch.rand(1, 1, 8, 8)).shape == (1, 10)
    with pytest.raises(SlimkitError, match="not a torch.nn.Module"):
        load_model("mynet:notamodel", input_shape=(1, 8, 8), num_classes=10)


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(create_model("lenet300", input_shape=(1, 8, 8), num_classes=10), path)
    with pytest.raises(SlimkitError, match="unpickling runs arbitrary code.*--trust-pickle"):
        load_model(str(path), input_shape=(1, 8, 8), num_classes=10)
    m = load_model(str(path), trust_pickle=True, input_shape=(1, 8, 8), num_classes=10)
    assert isinstance(m, nn.Module)


def test_weights_safetensors_and_state_dict(tmp_path, trained, digits):
    model, st = trained("lenet5")
    ref = model(digits.x_test[:8])
    loaded = load_model("zoo:lenet5", weights=st, input_shape=digits.input_shape, num_classes=10)
    assert torch.equal(loaded(digits.x_test[:8]), ref)
    # the metadata alone says which model it is
    assert load_model(weights=st)(digits.x_test[:8]).allclose(ref)
    assert read_metadata(st)["model"] == "zoo:lenet5"
    pt = tmp_path / "sd.pt"
    torch.save(model.state_dict(), pt)
    assert torch.equal(load_model("zoo:lenet5", weights=pt, input_shape=(1, 8, 8), num_classes=10)(digits.x_test[:8]), ref)
    ck = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, ck)
    assert torch.equal(load_model("zoo:lenet5", weights=ck, input_shape=(1, 8, 8), num_classes=10)(digits.x_test[:8]), ref)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_weights_never_unpickle_code(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"fc1.weight": _Evil()}, f)
    with pytest.raises(SlimkitError, match="pickled Python objects.*--trust-pickle"):
        load_model("zoo:lenet300", weights=path, input_shape=(1, 8, 8), num_classes=10)
    assert "pwned" not in capsys.readouterr().out


def test_weights_that_do_not_fit_are_named(tmp_path, trained):
    model, st = trained("lenet5")
    with pytest.raises(SlimkitError, match=r"missing key\(s\), first: fc3.weight.*unexpected key\(s\), first: conv1"):
        load_model("zoo:lenet300", weights=st, input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(SlimkitError, match=r"shape mismatch.*fc2.weight: file \(10, 500\) vs model \(3, 500\)"):
        load_model("zoo:lenet5", weights=st, input_shape=(1, 8, 8), num_classes=3)
    with pytest.raises(SlimkitError, match="does not exist"):
        load_model("zoo:lenet5", weights=tmp_path / "nope.safetensors", input_shape=(1, 8, 8), num_classes=10)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(SlimkitError, match="not a readable .safetensors"):
        load_model("zoo:lenet5", weights=tmp_path / "bad.safetensors", input_shape=(1, 8, 8), num_classes=10)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(SlimkitError, match="weights file torch.load can read|pickled Python"):
        load_model("zoo:lenet5", weights=tmp_path / "bad.pt", input_shape=(1, 8, 8), num_classes=10)


def test_check_fits_explains_shape_and_class_mismatch():
    model = create_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(SlimkitError, match=r"does not accept the examples of digits, shaped \(1, 8, 8\)"):
        check_fits(model, (1, 8, 8), 10, "digits")
    with pytest.raises(SlimkitError, match="outputs 10 classes but digits has 4"):
        check_fits(model, (1, 28, 28), 4, "digits")


@register_structure_op("test_widen_fc3")
def _widen(model, op):
    model.fc3 = nn.Linear(model.fc3.in_features, op["classes"])


def test_structure_ops_replay_on_load(tmp_path):
    model = load_model("zoo:lenet300", input_shape=(1, 8, 8), num_classes=10)
    _widen(model, {"classes": 12})
    record_structure(model, {"op": "test_widen_fc3", "classes": 12})
    save_model(model, tmp_path / "m.safetensors")
    again = load_model(weights=tmp_path / "m.safetensors")
    assert again.fc3.out_features == 12 and structure_of(again) == [{"op": "test_widen_fc3", "classes": 12}]
    assert torch.equal(again.fc3.weight, model.fc3.weight)
    with pytest.raises(SlimkitError, match="cannot be loaded into 'zoo:lenet5'"):
        load_model("zoo:lenet5", weights=tmp_path / "m.safetensors", input_shape=(1, 8, 8), num_classes=10)


class _Versioned(torch.nn.Module):
    """Checks its state-dict version on load, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self, input_shape=(8, 8), num_classes=10):
        super().__init__()
        self.fc = torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError(f"expected state-dict version 2, got {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def versioned(input_shape, num_classes):
    return _Versioned(input_shape, num_classes)


def test_a_module_that_checks_its_version_on_load_reloads(tmp_path, digits):
    """Issue 12, item 7: save_model keeps the modules' state-dict versions and loading gives them back."""
    from slimkit.models import build_model, module_versions

    model = build_model("tests.test_models:versioned", input_shape=digits.input_shape, num_classes=10)
    assert module_versions(model)[""] == 2
    path = save_model(model, tmp_path / "v.safetensors")
    again = load_model(weights=path)
    x = digits.x_test[:8]
    assert torch.equal(again(x), model(x))
    # a plain state dict without versions loads as the current code's version
    torch.save(dict(model.state_dict()), tmp_path / "plain.pt")
    assert torch.equal(load_model("tests.test_models:versioned", weights=tmp_path / "plain.pt",
                                  input_shape=digits.input_shape, num_classes=10)(x), model(x))
