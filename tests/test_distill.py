"""Knowledge distillation: logits, feature pairs with adapters, a different student, the step and the CLI."""

import json

import optuna
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import ConfigError, SlimkitError
from slimkit.export import export_onnx
from slimkit.measure import count_params, graph_stats
from slimkit.methods.distill import Distill, Distillation, FeatureDistillation, distill, teacher_gap
from slimkit.models import create_model, load_model
from slimkit.pipeline import Context, Recipe, get_step
from slimkit.training import TrainConfig, fit


class SmallNet(nn.Module):
    """A student defined here: one 3x3 conv (6 channels) and a linear classifier."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6 * 16, num_classes)

    def forward(self, x):
        x = F.max_pool2d(self.act(self.conv(x)), 2)  # (N, 6, 4, 4)
        return self.fc(x.flatten(1))


def small_net(input_shape=(1, 8, 8), num_classes=10):
    """A user factory for --student (tests/test_distill.py:small_net)."""
    return SmallNet(num_classes)


def _student(seed=0):
    torch.manual_seed(seed)
    return SmallNet()


def test_logit_distillation_pulls_the_student_to_the_teacher(trained, digits):
    teacher, _ = trained("lenet5")
    student = _student()
    cfg = Distillation(epochs=6, lr=3e-3, batch_size=32, temperature=4.0, alpha=0.9)
    rep = distill(student, teacher, digits, cfg)
    assert rep["teacher_gap_after"] < 0.5 * rep["teacher_gap_before"]
    assert rep["teacher_gap_after"] == pytest.approx(teacher_gap(student, teacher, digits.x_val, 4.0), rel=1e-5)
    # the same student trained on the labels alone ends up further from the teacher
    plain = _student()
    fit(plain, digits, TrainConfig(epochs=6, lr=3e-3, batch_size=32))
    assert teacher_gap(student, teacher, digits.x_val) < teacher_gap(plain, teacher, digits.x_val)
    assert "features" not in rep and rep["epochs_run"] == 6


def test_feature_pairs_train_adapters_that_never_join_the_student(trained, digits, tmp_path):
    teacher, _ = trained("lenet5")
    student = _student()
    keys = sorted(student.state_dict())
    cfg = Distillation(epochs=2, lr=3e-3, batch_size=64, features={"conv": "conv1", "fc": "fc1"}, feature_weight=0.5)
    rep = distill(student, teacher, digits, cfg)
    # conv: 6 channels at 8x8 vs the teacher's 20 at 8x8; fc: 10 logits vs the teacher's 500 hidden units
    assert rep["adapters"] == {"conv": "Conv2d(6 -> 20, 1x1)", "fc": "Linear(10 -> 500)"}
    assert rep["feature_loss_after"] < rep["feature_loss_before"]
    assert sorted(student.state_dict()) == keys  # adapters are not part of the student
    for m in (*student.modules(), *teacher.modules()):
        assert not m._forward_hooks and not m._forward_pre_hooks  # every hook removed
    path = export_onnx(student, tmp_path / "s.onnx", digits.example(2))
    assert graph_stats(path)["params"] == count_params(student)["params"]


def test_adapter_pools_space_and_flattens_vectors(trained, digits):
    teacher, _ = trained("lenet5")
    student = _student()
    # student conv output (6, 8, 8) vs teacher pool2 (50, 2, 2): 1x1 conv to 50, then pooled to 2x2
    hook = FeatureDistillation(student, teacher, {"conv": "pool2", "act": "fc1"}, example=digits.example(2))
    try:
        student(digits.x_val[:5]), teacher(digits.x_val[:5])
        s, t = hook.adapters["conv"](hook._s["conv"], hook._t["pool2"])
        assert s.shape == t.shape == (5, 50, 2, 2)
        s, t = hook.adapters["act"](hook._s["act"], hook._t["fc1"])  # (5, 6, 8, 8) averaged -> (5, 6) -> (5, 500)
        assert s.shape == t.shape == (5, 500)
        assert hook.loss().requires_grad and hook.measure(digits.x_val) > 0
    finally:
        hook.close()
    assert not student.conv._forward_hooks and not teacher._forward_pre_hooks


def test_missing_feature_layers_and_bad_configs(trained, digits):
    teacher, _ = trained("lenet5")
    with pytest.raises(ConfigError, match=r"field 'features': the student has no layer 'conv9'; its layers include: conv, act, fc"):
        distill(_student(), teacher, digits, Distillation(epochs=1, features={"conv9": "conv1"}))
    with pytest.raises(ConfigError, match=r"the teacher has no layer 'layer3'; its layers include: conv1, pool1"):
        distill(_student(), teacher, digits, Distillation(epochs=1, features={"conv": "layer3"}))
    with pytest.raises(ConfigError, match=r"field 'feature_weight': must be >= 0"):
        Distillation(feature_weight=-1)
    with pytest.raises(ConfigError, match=r"field 'alpha': must be in \[0, 1\]"):
        Distillation(alpha=1.5)
    with pytest.raises(ConfigError, match=r"field 'student': unknown zoo model 'lenet7'"):
        Distill(student="zoo:lenet7")
    with pytest.raises(ConfigError, match=r"field 'student': got 'model.pt'"):
        Distill(student="model.pt")
    with pytest.raises(ConfigError, match=r"field 'student_weights': needs 'student'"):
        Distill(student_weights="w.safetensors")
    with pytest.raises(SlimkitError, match="the same module"):
        distill(teacher, teacher, digits, Distillation(epochs=1))


def test_distill_step_trains_a_smaller_student_and_it_reloads(trained, digits, tmp_path):
    import slimkit

    teacher, weights = trained("lenet5")
    recipe = [{"distill": {"student": "zoo:lenet300,hidden=[32,16]", "epochs": 6, "lr": 3e-3, "batch_size": 32,
                           "features": {"relu1": "relu"}, "feature_weight": 0.1}}, "export"]
    res = slimkit.apply(recipe, slimkit.ModelRef("zoo:lenet5", weights=weights), digits, out=tmp_path / "run", target=slimkit.Target(batch_sizes=(1,), threads=1, max_seconds=0.1))
    step = res.report["steps"][0]
    assert step["student"] == "zoo:lenet300,hidden=[32,16]" and step["adapters"] == {"relu1": "Linear(32 -> 500)"}
    assert type(res.model).__name__ == "LeNet300" and res.model.fc1.out_features == 32
    assert res.report["result"]["params"] == count_params(res.model)["params"] == 64 * 32 + 32 + 32 * 16 + 16 + 170
    assert res.report["result"]["accuracy"] > 0.5 and step["teacher_gap_after"] < step["teacher_gap_before"]
    again = load_model(weights=tmp_path / "run" / "model.safetensors")
    assert torch.equal(again(digits.x_test[:8]), res.model(digits.x_test[:8]))


def test_student_cannot_follow_steps_with_training_hooks(digits, tmp_path):
    model = create_model("lenet300", input_shape=digits.input_shape, num_classes=10)
    ctx = Context(model=model, data=digits, workdir=tmp_path, teacher=model, hooks=[object()])
    with pytest.raises(SlimkitError, match="cannot follow a step that keeps training hooks"):
        get_step("distill").handler(ctx, Distill(student="zoo:lenet300"))
    with pytest.raises(ConfigError, match=r"step 2 'distill'.*cannot come after step 1 'export'"):
        Recipe.from_data(["export", "distill"])


def test_distill_command(cli, trained, tmp_path):
    _, weights = trained("lenet5")
    out = tmp_path / "d"
    r = cli("distill", "--teacher", "zoo:lenet5", "--teacher-weights", weights, "--student", "tests.test_distill:small_net",
            "--epochs", "2", "--batch-size", "64", "--feature", "conv=conv1", "--out", out, "--batch", "1",
            "--max-seconds", "0.1")
    res = json.loads((out / "result.json").read_text())
    # the accuracy guard: a 2-epoch student may fall past 1 point below its teacher; then exit 3, files written
    acc = res["accuracy"]
    assert acc["before"] == res["baseline"]["accuracy"] and acc["after"] == res["result"]["accuracy"]
    assert res["within_budget"] == (acc["before"] - acc["after"] <= 0.01 + 1e-9)
    assert r.code == (0 if res["within_budget"] else 3), r
    assert res["recipe"]["steps"][0]["distill"]["student"] == "tests.test_distill:small_net"
    assert res["result"]["params"] == count_params(SmallNet())["params"] < res["baseline"]["params"]
    assert "KL to the teacher" in r.out
    assert type(load_model(weights=out / "model.safetensors")).__name__ == "SmallNet"
    bad = cli("distill", "--teacher", "zoo:lenet5", "--teacher-weights", weights, "--student", "zoo:lenet300",
              "--feature", "fc1", "--out", tmp_path / "e")
    assert bad.code == 2 and "STUDENT_LAYER=TEACHER_LAYER" in bad.err
    bad = cli("distill", "--teacher", "zoo:lenet5", "--student", "zoo:nope", "--out", tmp_path / "e")
    assert bad.code == 2 and "unknown zoo model 'nope'" in bad.err


def test_search_space_draws_a_valid_config():
    spec = get_step("distill")
    assert spec.order == 60
    cfg = spec.space(optuna.trial.FixedTrial({"distill.on": True, "distill.epochs": 2, "distill.temperature": 8.0,
                                              "distill.alpha": 0.8}))
    assert cfg == Distill(epochs=2, temperature=8.0, alpha=0.8)
    assert spec.space(optuna.trial.FixedTrial({"distill.on": False})) is None
