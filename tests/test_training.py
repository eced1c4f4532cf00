import pytest
import torch
import torch.nn.functional as F

from slimkit.errors import ConfigError
from slimkit.models import create_model
from slimkit.training import TrainConfig, distillation_loss, evaluate, fit


def _fresh(digits, name="lenet300", **kw):
    torch.manual_seed(0)
    return create_model(name, input_shape=digits.input_shape, num_classes=digits.num_classes, **kw)


def test_fit_learns_and_keeps_the_best_epoch(digits):
    model = _fresh(digits)
    before = evaluate(model, digits.x_val, digits.y_val)
    rep = fit(model, digits, TrainConfig(epochs=4, batch_size=32))
    assert rep["best_val_accuracy"] > before + 0.5
    assert evaluate(model, digits.x_val, digits.y_val) == pytest.approx(rep["best_val_accuracy"])
    assert rep["epochs_run"] == 4 and len(rep["history"]) == 4 and rep["seconds"] > 0


def test_early_stopping_on_validation_accuracy(digits):
    model = _fresh(digits)
    fit(model, digits, TrainConfig(epochs=6, batch_size=32))
    rep = fit(model, digits, TrainConfig(epochs=50, lr=1e-6, patience=2))
    assert rep["stopped_early"] and rep["epochs_run"] == 2


def test_optimizers_and_schedules_all_train(digits):
    for opt in ("adam", "adamw", "sgd"):
        for sched in ("cosine", "step", "constant"):
            model = _fresh(digits)
            lr = 0.05 if opt == "sgd" else 2e-3
            rep = fit(model, digits, TrainConfig(epochs=2, optimizer=opt, schedule=sched, lr=lr, batch_size=32))
            assert rep["best_val_accuracy"] > 0.5, (opt, sched)


def test_distillation_pulls_the_student_towards_the_teacher(trained, digits):
    teacher, _ = trained("lenet5")
    x = digits.x_train[:256]

    def soft_gap(student):
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(student(x) / 4, 1), F.softmax(teacher(x) / 4, 1), reduction="batchmean"))

    plain = _fresh(digits)
    fit(plain, digits, TrainConfig(epochs=3, batch_size=32))
    distilled = _fresh(digits)
    fit(distilled, digits, TrainConfig(epochs=3, batch_size=32, alpha=0.9, temperature=4.0), teacher=teacher)
    assert soft_gap(distilled) < soft_gap(plain)
    # the loss itself: matching the teacher exactly leaves only the hard-label part
    logits = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    assert distillation_loss(logits, logits, y, 4.0, 1.0).abs() < 1e-5
    assert distillation_loss(logits, logits, y, 4.0, 0.0) == pytest.approx(float(F.cross_entropy(logits, y)))


class _Recorder:
    def __init__(self):
        self.calls = {"begin": 0, "step": 0, "epoch": [], "end": 0}

    def on_train_begin(self, model, total):
        self.calls["begin"] += 1
        self.total = total

    def on_step_end(self, model, step, total):
        self.calls["step"] += 1
        with torch.no_grad():
            model.fc1.weight[:, :8] = 0  # a "mask" that must hold after every step

    def on_epoch_end(self, model, epoch, acc):
        self.calls["epoch"].append(epoch)

    def on_train_end(self, model):
        self.calls["end"] += 1


def test_hooks_run_at_every_step_and_epoch(digits):
    model = _fresh(digits)
    rec = _Recorder()
    fit(model, digits, TrainConfig(epochs=3, batch_size=64), hooks=[rec])
    assert rec.calls["begin"] == 1 and rec.calls["end"] == 1 and rec.calls["epoch"] == [1, 2, 3]
    assert rec.calls["step"] == rec.total == 3 * (len(digits.x_train) // 64 + 1)
    assert torch.count_nonzero(model.fc1.weight[:, :8]) == 0


def test_checkpoint_ok_controls_which_epoch_is_kept(digits):
    class OnlyLast:
        def checkpoint_ok(self, model, epoch):
            return epoch == 3

    model = _fresh(digits)
    rep = fit(model, digits, TrainConfig(epochs=3, batch_size=32), hooks=[OnlyLast()])
    assert rep["best_epoch"] == 3


def test_extra_loss_is_added(digits):
    class Pull:
        def extra_loss(self, model, x, logits):
            return 10.0 * model.fc1.weight.pow(2).sum()

    model = _fresh(digits)
    pulled = fit(model, digits, TrainConfig(epochs=2, batch_size=32), hooks=[Pull()])
    ref = _fresh(digits)
    plain = fit(ref, digits, TrainConfig(epochs=2, batch_size=32))
    assert pulled["history"][0]["loss"] > 10 * plain["history"][0]["loss"]  # the extra term is in the loss
    assert model.fc1.weight.norm() < 0.8 * ref.fc1.weight.norm()  # ... and it was minimised


@pytest.mark.parametrize("field,value", [("epochs", -1), ("lr", 0), ("optimizer", "rmsprop"), ("schedule", "warm"),
                                         ("batch_size", 0), ("alpha", 1.5), ("temperature", 0), ("patience", 0)])
def test_bad_train_config_names_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{field: value})
    assert err.value.field == field and field in str(err.value)
