"""Every option of every config group composes and instantiates; bad input fails before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from edm_lab.data.datasets import ArrayDataset
from edm_lab.design.sampler import sample
from edm_lab.tasks.hydra_support import register_resolvers
from edm_lab.tasks.sample import AXES, ConfigError, run_sample
from tests.conftest import PROJECT_ROOT

CONF = PROJECT_ROOT / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(tmp_path: Path, *overrides: str):
    """The job config as run.py would see it, with every path under tmp_path."""
    register_resolvers()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root={tmp_path}", f"paths.output_dir={tmp_path}/out", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):  # a job's own config has no hydra node; HydraConfig keeps it
        del cfg["hydra"]
    return cfg


def test_groups_map_onto_the_axes():
    for group in ("schedule", "scaling", "discretization", "solver", "churn", "precond", "nfe", "data", "model",
                  "metric", "logger", "trainer", "experiment", "task"):
        assert group in GROUPS
    assert set(options("schedule")) == {"vp", "ve", "edm", "linear"}
    assert set(options("scaling")) == {"vp", "none"}
    assert set(options("discretization")) == {"vp", "ve", "iddpm", "edm", "optimized"}
    assert {"euler", "heun"} <= set(options("solver"))
    assert set(options("precond")) == {"vp", "ve", "iddpm", "edm"}


def learned_levels_file(directory) -> str:
    """A learned-steps file (edm_lab.design.discretizations.OptimizedDiscretization) holding 3 levels."""
    path = directory / "learned.json"
    path.write_text(json.dumps({"format": "edm_lab.learned_steps", "version": 1, "sigma_min": 0.002, "sigma_max": 80.0,
                                "steps": {"3": {"levels": [80.0, 1.5, 0.002]}}}))
    return str(path)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    small = "data.num_samples=64" if (group, option) == ("data", "toy2d") else "data.limit=64"
    needs_file = (group, option) in (("model", "checkpoint"), ("model", "official"), ("data", "image_folder"))
    if (group, option) == ("data", "image_folder"):
        small = "data.path=x"  # reading real files: tests/test_datasets.py
    # Training presets read a data set from disk; the digits stand in for it here.
    digits = ["data=digits"] if group == "experiment" else []
    if (group, option) == ("discretization", "optimized"):  # learned levels for the 3 steps sampled below
        small += f" discretization.path={learned_levels_file(tmp_path)}"
    cfg = compose_cfg(tmp_path, f"{group}={option}", *digits, *small.split(), *([f"{group}.path=x"] if needs_file else []))
    axes = {name: instantiate(cfg[name]) for name in AXES}
    if needs_file:  # loading real files: tests/test_checkpoints.py, test_official.py, test_datasets.py
        assert cfg[group].path == "x"
        return
    data = instantiate(cfg.data)
    assert isinstance(data, ArrayDataset)
    net = instantiate(cfg.model)(data, instantiate(cfg.precond, _partial_=True))
    latents = torch.randn(4, *data.sample_shape)
    result = sample(net, latents, 3, **axes)
    assert result.x.shape == latents.shape and torch.isfinite(result.x).all()
    assert callable(instantiate(cfg.metric.extractor))  # factories are partials: built at run time
    assert cfg.logger._target_.startswith("lightning.pytorch.loggers.")
    if cfg.trainer.accelerator == "cpu":
        instantiate(cfg.trainer)
    assert cfg.task.name in ("sample", "train", "report", "paper", "fid_ref", "learn_steps", "likelihood")


def test_wandb_logger_is_offline_by_default(tmp_path):
    cfg = compose_cfg(tmp_path)
    assert cfg.logger.offline is True


def test_experiment_presets_set_the_papers_samplers(tmp_path):
    expected = {
        "vp_original": ("VPSchedule", "VPScaling", "VPDiscretization", "Euler", "VPPrecond"),
        "ve_original": ("VESchedule", "NoScaling", "VEDiscretization", "Euler", "VEPrecond"),
        "iddpm_original": ("LinearSchedule", "NoScaling", "IDDPMDiscretization", "Euler", "IDDPMPrecond"),
        "edm": ("LinearSchedule", "NoScaling", "EDMDiscretization", "SecondOrder", "EDMPrecond"),
    }
    for name, classes in expected.items():
        cfg = compose_cfg(tmp_path, f"experiment={name}")
        got = tuple(cfg[k]._target_.rsplit(".", 1)[1] for k in ("schedule", "scaling", "discretization", "solver", "precond"))
        assert got == classes, name


def test_sweep_presets_compose(tmp_path, monkeypatch):
    """Every job of every preset composes: a misspelt value would otherwise fail only when its job starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    monkeypatch.chdir(PROJECT_ROOT)  # sweeps/ is found relative to the project root
    parser = OverridesParser.create()
    for preset in sorted((PROJECT_ROOT / "sweeps").glob("*.yaml")):
        compose_cfg(tmp_path, f"sweeps={preset.stem}")
        params = dict(HydraConfig.get().sweeper.params)
        assert params, preset.name
        for key, values in params.items():
            for value in parser.parse_override(f"{key}={values}").sweep_string_iterator():
                cfg = compose_cfg(tmp_path, f"sweeps={preset.stem}", f"{key}={value}")
                if "=" not in key and "." not in key:  # a group: its option is the one chosen
                    assert HydraConfig.get().runtime.choices[key] == value, (preset.name, key, value)
                else:
                    assert str(OmegaConf.select(cfg, key)) == value, (preset.name, key, value)


def test_unknown_axis_value_lists_the_options(tmp_path):
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as info:
        compose_cfg(tmp_path, "schedule=cosine")
    message = str(info.value)
    assert "schedule" in message and "Available options" in message
    for option in ("edm", "linear", "ve", "vp"):
        assert option in message


@pytest.mark.parametrize("override,key", [
    ("nfe.steps=[]", "nfe.steps"),
    ("nfe.steps=[0,4]", "nfe.steps"),
    ("discretization.rho=0", "discretization.rho"),
    ("discretization.sigma_min=1.0 discretization.sigma_max=0.5", "discretization.sigma_min"),
    ("solver=midpoint solver.alpha=1.5", "solver.alpha"),
    ("solver.alpha=0", "solver.alpha"),
    ("churn.S_churn=-1", "churn.S_churn"),
    ("churn.S_noise=-0.5", "churn.S_noise"),
    ("num_samples=1", "num_samples"),
])
def test_bad_values_fail_before_any_work(override, key, tmp_path, monkeypatch):
    cfg = compose_cfg(tmp_path, *override.split(), "logger=csv")
    monkeypatch.setattr("edm_lab.tasks.sample.instantiate", _guard_instantiate())
    with pytest.raises(Exception) as info:
        run_sample(cfg, choices={}, overrides=[])
    assert key in str(info.value)
    assert not (tmp_path / "results").exists() and not (tmp_path / "out").exists()


def _guard_instantiate():
    """Fail the test if anything past the axes (data, model, logger) is built before the error."""
    from hydra.utils import instantiate as real

    def guarded(config, *args, **kwargs):
        target = str(config.get("_target_", ""))
        if not target.startswith(("edm_lab.design.", "lightning.Trainer")):
            raise AssertionError(f"{target} was instantiated before the bad value was reported")
        return real(config, *args, **kwargs)

    return guarded


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
