"""Pruning that really shrinks: unstructured masks, structured channels, their recipe steps."""

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError, SlimkitError
from slimkit.export import export_onnx, parity
from slimkit.measure import count_macs, count_params, graph_stats
from slimkit.pipeline import Finetune
from slimkit.methods.prune import (
    MaskHook,
    Structured,
    Unstructured,
    csr_bytes,
    finalize_,
    load_csr,
    masks_of,
    prune_,
    save_csr,
    sparse_onnx,
)
from slimkit.models import create_model, load_model, save_model
from slimkit.pipeline import Recipe
from slimkit.training import TrainConfig, evaluate, fit


def _weights(model, names):
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("make,field,message", [
    (lambda: Unstructured(sparsity=1.0), "sparsity", r"must be in \[0, 1\)"),
    (lambda: Unstructured(sparsity=-0.1), "sparsity", r"must be in \[0, 1\)"),
    (lambda: Unstructured(scope="model"), "scope", "choose one of layer, global"),
    (lambda: Unstructured(schedule="agp"), "finetune", "epochs >= 1"),
    (lambda: Unstructured(layers={"fc1": 1.2}), "layers", "'fc1' must be in"),
    (lambda: Structured(ratio=1.0), "ratio", r"must be in \[0, 1\)"),
    (lambda: Structured(importance="entropy"), "importance", "unknown importance 'entropy'; choose one of l1, l2, taylor, bn-scale"),
    (lambda: Structured(round_to=0), "round_to", ">= 1"),
])
def test_bad_configs_are_rejected_naming_the_field(make, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        make()
    assert err.value.field == field


def test_bad_recipe_fails_before_work_naming_step_and_field():
    with pytest.raises(ConfigError, match=r"step 1 'prune_unstructured', field 'sparsity': must be in \[0, 1\)"):
        Recipe.from_data([{"prune_unstructured": {"sparsity": 1.5}}])
    with pytest.raises(ConfigError, match=r"step 1 'prune_structured', field 'importance': unknown importance"):
        Recipe.from_data([{"prune_structured": {"importance": "random"}}])
    # channels cannot be removed under masks shaped for the old layers
    with pytest.raises(ConfigError, match=r"step 2 'prune_structured'.*cannot come after step 1 'prune_unstructured'"):
        Recipe.from_data(["prune_unstructured", "prune_structured"])
    with pytest.raises(ConfigError, match=r"step 1 'store_sparse'.*needs a step before it .* exported"):
        Recipe.from_data(["store_sparse"])


def test_unknown_layer_names_are_rejected(trained):
    model, _ = trained("lenet300")
    with pytest.raises(ConfigError, match=r"field 'layers': unknown layer name 'fc9'.*fc1, fc2, fc3"):
        prune_(model, Unstructured(layers={"fc9": 0.5}))
    with pytest.raises(ConfigError, match=r"field 'skip': no layer is named or matches 'conv\*'"):
        prune_(model, Unstructured(skip=["conv*"]))
    with pytest.raises(ConfigError, match=r"field 'layers': unknown layer name 'fc9'"):
        prune_(model, Structured(layers={"fc9": 0.5}), example=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="no batch norm"):
        prune_(model, Structured(importance="bn-scale"), example=torch.zeros(2, 1, 8, 8))
    assert not masks_of(model)  # nothing was done


# ----------------------------------------------------------------------------- unstructured


def test_layer_scope_prunes_each_layer_exactly_and_skips_by_name(trained):
    model, _ = trained("lenet300")
    before = _weights(model, ["fc1", "fc2", "fc3"])
    r = prune_(model, Unstructured(sparsity=0.7, scope="layer", skip=["fc3"]))
    for n in ("fc1", "fc2"):
        w = model.get_submodule(n).weight
        assert int(torch.count_nonzero(w)) == w.numel() - round(0.7 * w.numel())
        kept = w != 0  # the largest magnitudes survive, unchanged
        assert before[n].abs()[kept].min() >= before[n].abs()[~kept].max()
        assert torch.equal(w[kept], before[n][kept])
        assert r["layers"][n]["nonzero"] == int(torch.count_nonzero(w))
    assert torch.equal(model.fc3.weight, before["fc3"]) and r["skipped"] == {"fc3": "skipped by name"}
    assert set(masks_of(model)) == {"fc1", "fc2"}
    assert r["nonzero_params"] == count_params(model)["nonzero_params"]


def test_global_scope_uses_one_threshold(trained):
    model, _ = trained("lenet300")
    before = _weights(model, ["fc1", "fc2", "fc3"])
    r = prune_(model, Unstructured(sparsity=0.8, scope="global"))
    ws = [model.get_submodule(n).weight for n in ("fc1", "fc2", "fc3")]
    total = sum(w.numel() for w in ws)
    assert sum(int(torch.count_nonzero(w)) for w in ws) == total - round(0.8 * total)
    kept = torch.cat([(w != 0).flatten() for w in ws])
    mags = torch.cat([before[n].abs().flatten() for n in ("fc1", "fc2", "fc3")])
    assert mags[kept].min() >= mags[~kept].max()  # one threshold across layers
    per_layer = {n: v["sparsity"] for n, v in r["layers"].items()}
    assert len(set(per_layer.values())) == 3  # layers end up with different sparsities
    assert r["pruned_layers_sparsity"] == pytest.approx(0.8, abs=1e-5)


def test_filter_fn_and_per_layer_sparsity(trained):
    model, _ = trained("lenet300")
    r = prune_(model, Unstructured(sparsity=0.5, scope="layer", layers={"fc2": 0.9}),
               filter_fn=lambda mod, name: name != "fc3")
    assert r["layers"]["fc1"]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert r["layers"]["fc2"]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert "fc3" not in r["layers"] and r["skipped"]["fc3"] == "left out by filter_fn"


def test_masks_hold_through_fine_tuning_and_finalize_keeps_zeros(trained, digits):
    model, _ = trained("lenet300")
    prune_(model, Unstructured(sparsity=0.9))
    masks = {n: m.clone() for n, m in masks_of(model).items()}
    start = _weights(model, masks)
    fit(model, digits, TrainConfig(epochs=1, batch_size=64, lr=1e-3), hooks=[MaskHook.of(model)])
    for n, mask in masks.items():
        w = model.get_submodule(n).weight
        assert not w[~mask].any()  # every pruned weight is still zero
        assert not torch.equal(w[mask], start[n][mask])  # the kept ones did train
    r = finalize_(model)
    assert not masks_of(model) and r["pruned_layers_sparsity"] == pytest.approx(0.9, abs=1e-5)
    assert {n: v["nonzero"] for n, v in r["layers"].items()} == {n: int(m.sum()) for n, m in masks.items()}
    with pytest.raises(SlimkitError, match="holds no pruning masks"):
        MaskHook.of(model)


def test_agp_grows_sparsity_during_fine_tuning_and_reaches_target(trained, digits):
    model, _ = trained("lenet300")

    class Record:
        def __init__(self):
            self.nonzero, self.ok = [], []

        def on_step_end(self, m, step, total):
            self.nonzero.append(int(torch.count_nonzero(m.fc1.weight)))

        def checkpoint_ok(self, m, epoch):
            return True

    rec = Record()
    cfg = Unstructured(sparsity=0.85, scope="layer", schedule="agp", ramp=0.5,
                       finetune=Finetune(epochs=2, batch_size=64, distill=True))
    r = prune_(model, cfg, data=digits, hooks=[rec])
    nz = rec.nonzero
    assert nz == sorted(nz, reverse=True)  # only ever sparser
    assert nz[0] > nz[-1] and len(set(nz)) > 5  # gradual, in several steps
    final = model.fc1.weight.numel() - round(0.85 * model.fc1.weight.numel())
    half = len(nz) // 2
    assert nz[half] == final and nz[-1] == final  # the target is reached at half of the steps (ramp 0.5)
    assert r["finetune"]["distilled"] and r["finetune"]["best_epoch"] >= 1
    assert r["layers"]["fc2"]["sparsity"] == pytest.approx(0.85, abs=1e-4)
    assert evaluate(model, digits.x_test, digits.y_test) > 0.5


def test_sparse_encodings_are_real_and_load_back(trained, digits, tmp_path):
    model, _ = trained("lenet300")
    prune_(model, Unstructured(sparsity=0.9))
    dense = export_onnx(model, tmp_path / "dense.onnx", digits.example(2))
    r = sparse_onnx(dense, tmp_path / "sparse.onnx")
    assert set(r["sparse_initializers"]) >= {"fc1.weight", "fc2.weight"}
    assert r["sparse_bytes"] < 0.5 * r["dense_bytes"] == 0.5 * dense.stat().st_size
    onnx.checker.check_model(str(tmp_path / "sparse.onnx"))
    p = parity(model, tmp_path / "sparse.onnx", digits.x_test)  # ONNX Runtime runs the sparse file
    assert p["top1_agreement"] == 1.0 and p["max_abs_diff"] < 1e-5
    stats, dense_stats = graph_stats(tmp_path / "sparse.onnx"), graph_stats(dense)
    assert (stats["params"], stats["nonzero_params"], stats["macs"]) == \
        (dense_stats["params"], dense_stats["nonzero_params"], dense_stats["macs"])
    save_csr(model, tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").stat().st_size == csr_bytes(model) < 0.4 * 4 * count_params(model)["params"]
    back = load_csr(tmp_path / "w.safetensors")
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_unstructured_recipe_keeps_masks_through_finetune_and_stores_sparse(trained, digits):
    import slimkit

    model, weights = trained("lenet300")
    res = slimkit.apply([{"prune_unstructured": {"sparsity": 0.9}}, {"finetune": {"epochs": 1, "batch_size": 64}},
                         "export", "store_sparse"], slimkit.ModelRef("zoo:lenet300", weights=weights), digits, target=slimkit.Target(batch_sizes=(1,), max_seconds=0.05, layers=False))
    steps = {s["step"]: s for s in res.report["steps"]}
    masks = masks_of(res.model)
    assert set(masks) == {"fc1", "fc2", "fc3"}
    for n, mask in masks.items():
        assert not res.model.get_submodule(n).weight[~mask].any()  # still pruned after the finetune
    weight_params = sum(m.numel() for m in masks.values())
    res_stats = res.report["result"]
    assert res_stats["params"] == res.report["baseline"]["params"]
    assert res_stats["nonzero_params"] <= weight_params * 0.1 + 410  # plus the biases
    assert steps["store_sparse"]["sparse_bytes"] == res_stats["artifact_bytes"] < 0.45 * steps["store_sparse"]["dense_bytes"]
    assert steps["store_sparse"]["parity"]["top1_agreement"] == 1.0
    assert steps["store_sparse"]["dense_agreement"]["top1_agreement"] == 1.0
    assert steps["prune_unstructured"]["csr_safetensors_bytes"] < 0.4 * steps["prune_unstructured"]["dense_safetensors_bytes"]


# ----------------------------------------------------------------------------- structured


class Branchy(nn.Module):
    """A model no zoo has seen: a residual add, a concatenation and a grouped convolution."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.res = nn.Conv2d(16, 16, 3, padding=1)
        self.side = nn.Conv2d(16, 8, 1)
        self.mix = nn.Conv2d(24, 32, 1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.res(x))  # residual add
        x = torch.cat([x, torch.relu(self.side(x))], 1)  # concatenation
        x = torch.relu(self.mix(x))
        x = torch.relu(self.bn(self.grouped(x)))  # grouped convolution
        return self.head(x.mean((2, 3)))


class ConcatIntoGroups(nn.Module):
    """A concatenation feeding a grouped convolution: its branches do not line up with the groups."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 1)
        self.g = nn.Conv2d(24, 32, 3, padding=1, groups=4)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(self.g(torch.cat([x, self.b(x)], 1)))
        return self.fc(x.mean((2, 3)))


class HardCoded(nn.Module):
    """conv2's channels cannot go: forward reshapes to a fixed size the graph does not see."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.reshape(x.shape[0], 8 * 8 * 8))


def _cut(original, report, x):
    """The unpruned model with every removed channel cut off where it is consumed.

    Removing channels is exact surgery: the pruned model must compute what the original
    computes once the layers reading the removed channels ignore them. Torch-Pruning's
    dependency graph on the original says which input slices those are.
    """
    import torch_pruning as tp

    ref = copy.deepcopy(original).eval()
    dg = tp.DependencyGraph().build_dependency(ref, example_inputs=x[:2])
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for root, idxs in report["removed_channels"].items():
            mod = modules[root]
            group = dg.get_pruning_group(mod, dg.get_pruner_of_module(mod).prune_out_channels, idxs)
            for dep, ix in group:
                m = dep.target.module
                if not dg.is_in_channel_pruning_fn(dep.handler) or not isinstance(m, (nn.Linear, nn.Conv2d)):
                    continue  # batch norms and activations only carry the channels
                ix = [int(getattr(i, "idx", i)) for i in ix]
                if isinstance(m, nn.Linear) or getattr(m, "groups", 1) == 1:
                    m.weight[:, ix] = 0
                elif m.groups < m.in_channels:  # grouped: input c is position c % size of group c // size
                    size, out = m.in_channels // m.groups, m.out_channels // m.groups
                    for c in ix:
                        m.weight[(c // size) * out : (c // size + 1) * out, c % size] = 0
    return ref


def _check_structured(model, digits, tmp_path, cfg, min_macs_ratio=1.5):
    x = digits.x_test[:64]
    original = copy.deepcopy(model).eval()
    params0, macs0 = count_params(model)["params"], count_macs(model, digits.input_shape)
    r = prune_(model, cfg, data=digits)
    params1, macs1 = count_params(model)["params"], count_macs(model, digits.input_shape)
    assert (r["params_before"], r["params"], r["macs_before"], r["macs"]) == (params0, params1, macs0, macs1)
    assert macs0 / macs1 >= min_macs_ratio and params1 < params0
    cut = _cut(original, r, x)
    with torch.no_grad():
        got = model.eval()(x)
        assert got.shape == (64, 10)
        torch.testing.assert_close(got, cut(x), atol=1e-4, rtol=1e-4)
    path = export_onnx(model, tmp_path / "pruned.onnx", digits.example(2))
    p = parity(model, path, digits.x_test)
    assert p["top1_agreement"] >= 0.99 and p["max_abs_diff"] < 1e-3
    assert graph_stats(path)["macs"] < macs0
    return r


def _zoo(name, digits, **kwargs):
    torch.manual_seed(0)
    return create_model(name, input_shape=digits.input_shape, num_classes=digits.num_classes, **kwargs).eval()


@pytest.mark.parametrize("name,kwargs", [("lenet300", {}), ("lenet5", {}), ("resnet", {"width": 0.5}),
                                         ("mobilenetv2", {"width": 0.5})])
def test_structured_on_every_zoo_model(name, kwargs, trained, digits, tmp_path):
    model, _ = trained(name) if name.startswith("lenet") else (_zoo(name, digits, **kwargs), None)
    r = _check_structured(model, digits, tmp_path, Structured(ratio=0.5))
    head = {"lenet300": "fc3", "lenet5": "fc2", "resnet": "fc", "mobilenetv2": "classifier"}[name]
    assert r["skipped"] == {head: "the classifier (its outputs are the classes)"}
    assert r["channels"][head] == [10, 10] and r["pruned_layers"]
    assert all(r["channels"][n][1] % 8 == 0 for n in r["pruned_layers"])  # round_to=8 by default


def test_structured_on_an_unseen_model_with_add_concat_and_groups(digits, tmp_path):
    torch.manual_seed(0)
    model = Branchy()
    r = _check_structured(model, digits, tmp_path, Structured(ratio=0.5, importance="taylor", round_to=1),
                          min_macs_ratio=2)
    assert r["skipped"] == {"head": "the classifier (its outputs are the classes)"}
    assert model.stem.out_channels == model.res.out_channels == 8  # tied by the residual add
    assert model.mix.in_channels == model.stem.out_channels + model.side.out_channels == 12  # concatenated
    assert model.grouped.groups == 4 and model.grouped.in_channels == model.mix.out_channels == 16
    assert model.grouped.out_channels == 16


def test_channels_that_cannot_go_are_kept_and_named(digits, tmp_path):
    torch.manual_seed(0)
    model = ConcatIntoGroups()
    r = _check_structured(model, digits, tmp_path, Structured(ratio=0.5, round_to=1), min_macs_ratio=1.2)
    assert "out of step with its 4 groups" in r["skipped"]["a"] and "out of step" in r["skipped"]["b"]
    assert (model.a.out_channels, model.b.out_channels, model.g.out_channels) == (16, 8, 16)
    torch.manual_seed(0)
    model = HardCoded()
    r = prune_(model, Structured(ratio=0.5, round_to=1), example=digits.example(2))
    assert r["skipped"]["conv2"].startswith("cannot be pruned: shape")
    assert model.conv1.out_channels == 4 and model.conv2.out_channels == 8
    assert model(digits.x_test[:3]).shape == (3, 10)


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "bn-scale"])
def test_every_importance_shrinks_and_rounds(importance, digits):
    model = _zoo("resnet", digits, width=0.5)
    r = prune_(model, Structured(ratio=0.5, importance=importance, round_to=4), data=digits)
    assert r["macs_reduction"] > 2
    pruned = [n for n in r["pruned_layers"]]
    assert all(r["channels"][n][1] % 4 == 0 for n in pruned)  # rounded to multiples of 4


def test_per_layer_ratios_round_to_and_skip(trained, digits):
    model, _ = trained("lenet5")
    r = prune_(model, Structured(ratio=0.0, layers={"conv2": 0.5, "fc1": 0.3}, round_to=8, skip=["conv1"]),
               example=digits.example(2))
    assert r["channels"]["conv1"] == [20, 20] and r["skipped"]["conv1"] == "skipped by name"
    assert r["channels"]["conv2"] == [50, 24] and r["channels"]["fc1"] == [500, 352]  # nearest multiples of 8


def test_structured_finetunes_with_distillation(trained, digits):
    model, _ = trained("lenet5")
    pruned_only = copy.deepcopy(model)
    prune_(pruned_only, Structured(ratio=0.7), data=digits)
    r = prune_(model, Structured(ratio=0.7, finetune=Finetune(epochs=2, batch_size=64)), data=digits)
    assert r["finetune"]["distilled"] and r["finetune"]["epochs_run"] == 2
    assert evaluate(model, digits.x_val, digits.y_val) >= evaluate(pruned_only, digits.x_val, digits.y_val)


def test_apply_saves_a_pruned_model_that_loads_as_itself(cli, digits, tmp_path):
    torch.manual_seed(0)
    weights = save_model(load_model("zoo:resnet,width=0.5", input_shape=digits.input_shape, num_classes=10),
                         tmp_path / "resnet.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - prune_structured: {ratio: 0.5, round_to: 4, if_slower: keep}\n  - export\n")
    out = tmp_path / "run"
    r = cli("apply", recipe, "--model", "zoo:resnet,width=0.5", "--weights", weights, "--data", "digits",
            "--out", out, "--batch", "1", "--max-seconds", "0.05", "-q")
    assert r.code == 0, r
    res = json.loads((out / "result.json").read_text())
    assert res["result"]["macs"] * 2 < res["baseline"]["macs"] and res["result"]["params"] < res["baseline"]["params"]
    model = load_model(weights=out / "model.safetensors")  # no --model: the file rebuilds the pruned architecture
    assert model.conv1.out_channels < 8 and count_params(model)["params"] < res["baseline"]["params"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = digits.x_test[:32]
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), got, atol=1e-4)


def test_global_structured_ranks_channels_across_layers(digits):
    model = _zoo("resnet", digits, width=0.5)
    r = prune_(model, Structured(ratio=0.5, scope="global", round_to=1), example=digits.example(2))
    kept = {n: after / before for n, (before, after) in r["channels"].items() if n != "fc"}
    assert r["macs_reduction"] > 2 and len({round(k, 3) for k in kept.values()}) > 2  # uneven across layers
    assert min(kept.values()) >= 0.1 - 1e-9  # no layer loses more than 90% of its channels


def test_search_spaces_draw_valid_configs():
    import optuna

    from slimkit.pipeline import get_step

    on = {"prune_structured.on": True, "prune_structured.ratio": 0.3, "prune_structured.importance": "taylor"}
    assert get_step("prune_structured").space(optuna.trial.FixedTrial(on)) == Structured(0.3, importance="taylor")
    on = {"prune_unstructured.on": True, "prune_unstructured.sparsity": 0.8, "prune_unstructured.scope": "layer"}
    assert get_step("prune_unstructured").space(optuna.trial.FixedTrial(on)) == Unstructured(0.8, scope="layer")
    assert get_step("prune_unstructured").space(optuna.trial.FixedTrial({"prune_unstructured.on": False})) is None
    orders = [get_step(n).order for n in ("prune_structured", "prune_unstructured", "store_sparse")]
    assert orders == [30, 40, 85]


def test_channel_rounding_goes_to_the_nearest_multiple():
    from slimkit.methods._prune_structured import kept_channels

    assert [kept_channels(n, 0.35, 8) for n in (16, 32, 64, 320)] == [8, 24, 40, 208]
    assert kept_channels(8, 0.9, 8) == 8 and kept_channels(6, 0.5, 8) == 3  # at least one multiple; tiny layers unrounded
    assert kept_channels(50, 0.5, 1) == 25 and kept_channels(10, 0.99, 1) == 1


@pytest.mark.parametrize("name,kwargs", [("lenet300", {}), ("lenet5", {}), ("resnet", {"width": 0.25}),
                                         ("mobilenetv2", {"width": 0.25})])
def test_every_verb_runs_on_every_zoo_model(name, kwargs, digits):
    from slimkit.methods.prune import LotteryConfig, SensitivityConfig, lottery, sensitivity

    model = _zoo(name, digits, **kwargs)
    r = prune_(copy.deepcopy(model), Unstructured(sparsity=0.6, scope="layer"))
    assert all(v["nonzero"] == v["params"] - round(0.6 * v["params"]) for v in r["layers"].values())
    first = next(iter(r["layers"]))
    s = sensitivity(model, digits, SensitivityConfig("unstructured", [0.5], layers=[first]))
    assert list(s["layers"]) == [first] and len(s["layers"][first]["accuracy"]) == 1
    lt = lottery(model, digits, LotteryConfig(rounds=1, rewind_epoch=0),
                 train=TrainConfig(epochs=1, max_batches=2, batch_size=32))
    assert lt.report["rounds"][1]["remaining"] == pytest.approx(0.8, abs=1e-3)


def test_sparse_storage_of_a_qat_artifact_is_judged_against_the_dense_file(trained, digits, tmp_path):
    """An integer QAT artifact differs from torch's fake quantization by itself; sparse storage must not add to it."""
    import slimkit

    model, _ = trained("lenet5")
    res = slimkit.apply([{"prune_unstructured": {"sparsity": 0.6}}, {"qat": {"epochs": 1, "max_batches": 5}},
                         "export", "store_sparse"], model, digits, out=tmp_path / "q", budget=None, target=slimkit.Target("ort-cpu", threads=1, max_seconds=0.05, layers=False))
    step = next(s for s in res.report["steps"] if s["step"] == "store_sparse")
    assert step["dense_agreement"]["top1_agreement"] == 1.0 and step["dense_agreement"]["max_abs_diff"] < 1e-4
    assert step["sparse_bytes"] <= step["dense_bytes"]  # int8 values with int64 indices would not pay: kept dense
