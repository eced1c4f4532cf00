import dataclasses

import pytest
import yaml

from slimkit.config import config_from_dict, config_to_dict
from slimkit.errors import ConfigError
from slimkit.pipeline import Recipe, get_step, step_names


@pytest.mark.parametrize("name", step_names())
def test_every_step_config_round_trips_through_yaml(name):
    spec = get_step(name)
    cfg = spec.config()
    text = yaml.safe_dump(config_to_dict(cfg))
    again = config_from_dict(spec.config, yaml.safe_load(text))
    assert again == cfg
    recipe = Recipe.from_data([{name: config_to_dict(cfg)}]) if not spec.requires else None
    if recipe is not None:
        assert Recipe.from_data(yaml.safe_load(recipe.to_yaml())) == recipe


def test_recipe_file_forms(tmp_path):
    (tmp_path / "a.yaml").write_text("steps:\n  - finetune: {epochs: 2, lr: 0.001}\n  - export\n")
    (tmp_path / "b.yaml").write_text("- finetune:\n    epochs: 2\n    lr: 0.001\n- export: {}\n")
    a, b = Recipe.load(tmp_path / "a.yaml"), Recipe.load(tmp_path / "b.yaml")
    assert a == b and [s.name for s in a.steps] == ["finetune", "export"] and a.steps[0].config.epochs == 2


@pytest.mark.parametrize("recipe,message", [
    ([{"prune_everything": {}}], r"step 1: unknown step 'prune_everything'; known steps: .*finetune"),
    ([{"finetune": {"epochz": 3}}], r"step 1 'finetune', field 'epochz': unknown field; Finetune takes: epochs"),
    ([{"finetune": {"epochs": "many"}}], r"step 1 'finetune', field 'epochs': got 'many'; expected an integer"),
    ([{"finetune": {"lr": -1}}], r"step 1 'finetune', field 'lr': must be in \(0, 10\)"),
    (["export", {"finetune": {}}], r"step 2 'finetune'.*cannot come after step 1 'export'.*exported to ONNX"),
    (["export", "export"], r"step 2 'export'.*cannot come after step 1 'export'"),
    ([], r"non-empty list of steps"),
    ({"stepz": []}, r"unknown top-level key"),
    ([["finetune"]], r"step 1: each step is a name or a one-key mapping"),
])
def test_bad_recipes_fail_before_work_naming_step_and_field(recipe, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_data(recipe)


def test_bad_yaml_file(tmp_path):
    from slimkit.errors import SlimkitError

    (tmp_path / "r.yaml").write_text("steps: [finetune: {epochs: 3}\n")
    with pytest.raises(SlimkitError, match="not valid YAML"):
        Recipe.load(tmp_path / "r.yaml")
    with pytest.raises(SlimkitError, match="does not exist"):
        Recipe.load(tmp_path / "none.yaml")


def test_config_coercion():
    @dataclasses.dataclass
    class C:
        ratio: float = 0.5
        layers: dict[str, float] = dataclasses.field(default_factory=dict)
        skip: list[str] = dataclasses.field(default_factory=list)
        rank: int | None = None

    c = config_from_dict(C, {"ratio": 1, "layers": {"fc1": 0.2}, "skip": ["fc3"], "rank": None})
    assert c == C(1.0, {"fc1": 0.2}, ["fc3"], None)
    with pytest.raises(ConfigError, match="field 'rank': got 1.5; expected int or null"):
        config_from_dict(C, {"rank": 1.5})
    with pytest.raises(ConfigError, match="field 'skip': got 'fc3'; expected a list"):
        config_from_dict(C, {"skip": "fc3"})
