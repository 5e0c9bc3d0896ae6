"""Our own checkpoints (safetensors + spec), random networks as models, and sampling from both."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save

from edm_lab.checkpoints.snapshot import FORMAT, load_checkpoint, read_checkpoint, save_checkpoint
from edm_lab.data import digits
from edm_lab.design.precond import EDMPrecond, IDDPMPrecond, VEPrecond, VPPrecond
from edm_lab.nets.denoisers import network_denoiser
from edm_lab.tasks.sample import run_sample
from edm_lab.track.store import ResultsStore
from tests.conftest import PROJECT_ROOT, net_preset
from tests.test_configs import compose_cfg

PRECONDS = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond, "iddpm": IDDPMPrecond}
DATA = digits(limit=64)


def random_denoiser(net: str = "ddpmpp_small", precond: str = "edm", seed: int = 0, conditional: bool = False):
    import functools

    return network_denoiser(DATA, functools.partial(PRECONDS[precond]), net_preset(net), seed=seed,
                            class_conditional=conditional)


def outputs(denoiser, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, 8, 8, generator=g)
    sigma = torch.tensor([0.01, 0.5, 3.0, 70.0])
    labels = torch.eye(10)[torch.randint(10, (4,), generator=g)] if denoiser.label_dim else None
    with torch.no_grad():
        return denoiser(x, sigma, class_labels=labels)


@pytest.mark.parametrize("net,precond,conditional", [
    ("ddpmpp_small", "edm", False), ("ncsnpp_small", "vp", True), ("adm_small", "iddpm", True),
    ("ddpmpp_small", "ve", False)])
def test_round_trip_is_bit_identical(net, precond, conditional, tmp_path):
    original = random_denoiser(net, precond, seed=3, conditional=conditional)
    path = save_checkpoint(original, tmp_path / "net.safetensors", extra={"kimg": 12})
    loaded = load_checkpoint(path)
    assert type(loaded) is type(original) and loaded.label_dim == original.label_dim
    assert torch.equal(outputs(loaded), outputs(original))
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    spec, extra = read_checkpoint(path)
    assert spec == original.build_spec and extra == {"kimg": 12}


def test_random_networks_are_seeded_and_sized_for_the_data():
    a, b, c = random_denoiser(seed=0), random_denoiser(seed=0), random_denoiser(seed=1)
    assert torch.equal(outputs(a), outputs(b)) and not torch.equal(outputs(a), outputs(c))
    assert (a.img_channels, a.img_resolution, a.label_dim) == (1, 8, 0)
    assert random_denoiser(conditional=True).label_dim == 10
    iddpm = random_denoiser("adm_small", "iddpm")
    assert iddpm.model.out_channels == 2 and outputs(iddpm).shape == (4, 1, 8, 8)


def test_bad_checkpoint_files_are_named(tmp_path):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(FileNotFoundError, match="none.safetensors"):
        load_checkpoint(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(save({"w": torch.zeros(2)}, metadata={"format": "something-else"}))
    with pytest.raises(ValueError, match="foreign.safetensors.*format"):
        load_checkpoint(foreign)


def test_spec_cannot_name_arbitrary_classes(tmp_path):
    good = save_checkpoint(random_denoiser(), tmp_path / "good.safetensors")
    spec, _ = read_checkpoint(good)
    for where, value in (("precond", "os.system"), ("network", "subprocess.Popen")):
        bad = json.loads(json.dumps(spec))
        if where == "precond":
            bad["precond"]["class"] = value
        else:
            bad["network"]["model_type"] = value
        path = tmp_path / f"bad-{where}.safetensors"
        path.write_bytes(save({"w": torch.zeros(1)}, metadata={"format": FORMAT, "spec": json.dumps(bad)}))
        with pytest.raises(ValueError, match=rf"bad-{where}\.safetensors.*{value}"):
            load_checkpoint(path)


def test_tensors_must_match_the_network(tmp_path):
    original = random_denoiser()
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    state.pop(next(iter(state)))
    path = tmp_path / "short.safetensors"
    path.write_bytes(save(state, metadata={"format": FORMAT, "spec": json.dumps(original.build_spec)}))
    with pytest.raises(ValueError, match="short.safetensors.*missing"):
        load_checkpoint(path)
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    key = "model.map_layer0.bias"
    state[key] = torch.zeros(state[key].numel() + 1)
    path = tmp_path / "misshaped.safetensors"
    path.write_bytes(save(state, metadata={"format": FORMAT, "spec": json.dumps(original.build_spec)}))
    with pytest.raises(ValueError, match=r"misshaped\.safetensors.*do not match.*'model\.map_layer0\.bias' is \(97,\) "
                                         r"in the file, \(96,\) in the network"):
        load_checkpoint(path)


TINY = ["data.limit=128", "metric=raw", "nfe.steps=[2,3]", "num_samples=16", "batch_size=8",
        "metric.reference_solver=heun", "metric.reference_steps=8", "logger=csv", "trainer.enable_progress_bar=false"]


def test_checkpoint_model_samples_and_rows_name_the_checkpoint(tmp_path):
    path = save_checkpoint(random_denoiser("ncsnpp_small", "vp", seed=5, conditional=True), tmp_path / "my.safetensors")
    cfg = compose_cfg(tmp_path, *TINY, "model=checkpoint", f"model.path={path}")
    rows = run_sample(cfg, {"data": "digits", "model": "checkpoint", "precond": "edm", "schedule": "edm"})
    assert [r["nfe"] for r in rows] == [3, 5]
    for r in rows:
        assert r["checkpoint"] == str(path) and r["network"] == "SongUNet" and r["precond"] == "vp"
        assert len(r["checkpoint_sha256"]) == 64 and r["parameters"] > 100_000
        assert "checkpoint(my.safetensors)" in r["label"] and math.isfinite(r["fd_raw"])
    # Same path, new content: a different configuration, never a stale reuse.
    save_checkpoint(random_denoiser("ncsnpp_small", "vp", seed=6, conditional=True), path)
    again = run_sample(cfg, {"data": "digits", "model": "checkpoint", "precond": "edm"})
    assert again[0]["config_hash"] != rows[0]["config_hash"]
    # ...and its sampler error is measured against the new network's own reference solution.
    assert len(list((tmp_path / ".cache" / "references").glob("*.pt"))) == 2


def test_checkpoint_shape_must_match_the_data(tmp_path):
    path = save_checkpoint(random_denoiser(), tmp_path / "eight.safetensors")
    cfg = compose_cfg(tmp_path, *TINY, "model=checkpoint", f"model.path={path}", "data.resolution=16")
    with pytest.raises(ValueError, match="eight.safetensors.*data.resolution"):
        run_sample(cfg, {"data": "digits", "model": "checkpoint"})


def test_two_solver_sweep_on_a_random_ddpmpp_through_run_py(tmp_path):
    cmd = [sys.executable, "run.py", "-m", "solver=heun,euler", "model=network", "net=ddpmpp_small", *TINY,
           "trainer.enable_progress_bar=false", f"paths.root={tmp_path}", f"hydra.sweep.dir={tmp_path}/multirun"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    frame = ResultsStore(tmp_path / "results").load()
    assert sorted(zip(frame.solver, frame.nfe)) == [("euler", 2), ("euler", 3), ("heun", 3), ("heun", 5)]
    assert set(frame.network) == {"SongUNet"} and set(frame.model) == {"network"}
    assert frame.label.str.contains("network(ddpmpp_small)", regex=False).all()
    assert frame.parameters.nunique() == 1 and frame.parameters.iloc[0] > 100_000
    text = (tmp_path / "reports" / "report.md").read_text()  # shared by both lines: said once, above the tables
    assert "Shared by every configuration below: `data=digits` `model=network(ddpmpp_small)`" in text


def test_precision_override_of_a_loaded_network(tmp_path):
    from edm_lab.checkpoints.snapshot import checkpoint_denoiser

    path = save_checkpoint(random_denoiser(), tmp_path / "p.safetensors")
    assert checkpoint_denoiser(DATA, None, str(path)).precision == "fp32"
    assert checkpoint_denoiser(DATA, None, str(path), precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="model.precision"):
        checkpoint_denoiser(DATA, None, str(path), precision="fp8")
    # On the CPU the network still runs in float32, so the outputs are unchanged.
    assert torch.equal(outputs(checkpoint_denoiser(DATA, None, str(path), precision="fp16")),
                       outputs(load_checkpoint(path)))
