"""All the conformance checks on one step, as a plugin author runs them."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import config_from_dict
from ..data import DataBundle
from ..pipeline import StepSpec
from ._cases import StepCase, _spec, step_case
from ._checks import check_artifact, check_config_yaml, check_reload, check_space, run_case
from ._figures import check_report_figures

# ----------------------------------------------------------------------------- all of it


def check_step(step: str | StepSpec, model: nn.Module, data: DataBundle, workdir: str | Path,
               case: StepCase | None = None) -> list[str]:
    """Every conformance check on one step, with ``model`` (trained on ``data``) as the input;
    ``workdir`` must not exist or be empty. Returns the report figures checked."""
    spec = _spec(step)
    case = case or step_case(spec)
    workdir = Path(workdir)
    check_config_yaml(spec, config_from_dict(spec.config, case.config))
    if spec.space is not None:
        check_space(spec, model=model)
    run = run_case(spec, model, data, workdir / "run", case)
    check_artifact(run, data)
    check_reload(run, data, workdir / "reloaded.safetensors")
    return check_report_figures(run, data)
