"""The paper's training presets: CIFAR-10 configs A-F (VP and VE columns) and the reference recipes."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.test_configs import compose_cfg

CIFAR10 = [f"cifar10_{c}_{col}" for col in ("vp", "ve") for c in "abcdef"]


def resolved(tmp_path, preset: str) -> dict:
    cfg = compose_cfg(tmp_path, f"experiment={preset}", "data.path=x")
    return OmegaConf.to_container(cfg, resolve=False)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed(a: dict, b: dict) -> set[str]:
    """Top-level groups or dotted keys that differ between two resolved configs."""
    fa, fb = flat(a), flat(b)
    keys = {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}
    # A group swapped for another (precond, noise, augment...) is reported once, by its name.
    return {k.split(".")[0] if k.split(".")[0] in ("precond", "noise", "weighting", "augment") else k for k in keys}


@pytest.mark.parametrize("column", ["vp", "ve"])
def test_cifar10_configs_change_one_design_step_at_a_time(tmp_path, column):
    cfgs = {c: resolved(tmp_path, f"cifar10_{c}_{column}") for c in "abcdef"}
    steps = {
        "b": {"net.dropout", "task.batch_size", "task.lr", "task.lr_rampup_kimg", "task.grad_clip",
              "task.ema_halflife_kimg"},
        "c": {"net.channel_mult"},
        "d": {"precond"},
        "e": {"noise", "weighting"},
        "f": {"augment", "task.xflip"},
    }
    for prev, cur in zip("abcde", "bcdef"):
        assert changed(cfgs[prev], cfgs[cur]) == steps[cur], f"{prev} -> {cur}"


def test_cifar10_baselines_are_song_et_al(tmp_path):
    vp, ve = resolved(tmp_path, "cifar10_a_vp"), resolved(tmp_path, "cifar10_a_ve")
    for cfg in (vp, ve):
        t = cfg["task"]
        assert (t["batch_size"], t["lr"], t["lr_rampup_kimg"], t["grad_clip"], t["xflip"]) == (128, 2e-4, 640, 1.0, True)
        assert cfg["net"]["channel_mult"] == [1, 2, 2, 2] and cfg["net"]["dropout"] == 0.1 and cfg["augment"] is None
    # EMA decay per 128-image step: 0.9999 (VP) and 0.999 (VE) as half-lives in images.
    assert 0.5 ** (128 / (vp["task"]["ema_halflife_kimg"] * 1000)) == pytest.approx(0.9999, abs=1e-9)
    assert 0.5 ** (128 / (ve["task"]["ema_halflife_kimg"] * 1000)) == pytest.approx(0.999, abs=1e-8)
    assert (vp["net"]["embedding_type"], vp["precond"]["_target_"].rsplit(".")[-1]) == ("positional", "VPPrecond")
    assert (ve["net"]["embedding_type"], ve["precond"]["_target_"].rsplit(".")[-1]) == ("fourier", "VEPrecond")


def test_cifar10_config_f_is_the_reference_recipe(tmp_path):
    """Config F = the reference train.py defaults (its pre-trained CIFAR-10 models), 55.7 M parameters."""
    for column, embedding in (("vp", "positional"), ("ve", "fourier")):
        cfg = resolved(tmp_path, f"cifar10_f_{column}")
        t = cfg["task"]
        assert (t["duration_kimg"], t["batch_size"], t["lr"], t["lr_rampup_kimg"], t["ema_halflife_kimg"],
                t["ema_rampup_ratio"], t["grad_clip"], t["xflip"]) == (200000, 512, 1e-3, 10000, 500, 0.05, None, False)
        assert cfg["augment"]["p"] == 0.12 and cfg["net"]["dropout"] == 0.13 and cfg["net"]["embedding_type"] == embedding
        assert [cfg[k]["_target_"].rsplit(".")[-1] for k in ("precond", "noise", "weighting")] == \
            ["EDMPrecond", "EDMNoise", "EDMWeighting"]
    # The reference's DDPM++ / NCSN++ exactly (their parameter counts: tests/test_networks.py).
    for column, net in (("vp", "ddpmpp_cifar10"), ("ve", "ncsnpp_cifar10")):
        preset_net = OmegaConf.to_container(compose_cfg(tmp_path, f"net={net}").net)
        assert resolved(tmp_path, f"cifar10_f_{column}")["net"] == preset_net


@pytest.mark.parametrize("preset,arch,dropout,batch,lr,p", [
    ("ffhq64_vp", "positional", 0.05, 256, 2e-4, 0.15), ("ffhq64_ve", "fourier", 0.05, 256, 2e-4, 0.15),
    ("afhqv2_64_vp", "positional", 0.25, 256, 2e-4, 0.15), ("afhqv2_64_ve", "fourier", 0.25, 256, 2e-4, 0.15)])
def test_ffhq_and_afhqv2_recipes(tmp_path, preset, arch, dropout, batch, lr, p):
    cfg = resolved(tmp_path, preset)
    assert cfg["net"]["embedding_type"] == arch and cfg["net"]["channel_mult"] == [1, 2, 2, 2]
    assert cfg["net"]["dropout"] == dropout and cfg["augment"]["p"] == p and cfg["data"]["resolution"] == 64
    assert (cfg["task"]["batch_size"], cfg["task"]["lr"], cfg["task"]["class_conditional"]) == (batch, lr, False)


def test_imagenet64_recipe(tmp_path):
    cfg = resolved(tmp_path, "imagenet64")
    t = cfg["task"]
    assert cfg["net"]["model_type"] == "DhariwalUNet" and cfg["net"]["channel_mult"] == [1, 2, 3, 4]
    assert cfg["augment"] is None and cfg["precond"]["precision"] == "fp16" and t["class_conditional"] is True
    assert (t["duration_kimg"], t["batch_size"], t["lr"], t["ema_halflife_kimg"], t["loss_scaling"], t["log_kimg"]) == \
        (2_500_000, 4096, 1e-4, 50_000, 100, 200)


@pytest.mark.parametrize("preset,recipe", [
    ("cifar10_a_ve", {"noise": "VENoise", "weighting": "InverseSquareWeighting", "clip": 1.0, "items": 128,
                      "lr": 2e-4, "halflife": 88.678, "augment_p": None}),
    ("cifar10_f_vp", {"noise": "EDMNoise", "weighting": "EDMWeighting", "clip": None, "items": 64, "lr": 1e-3,
                      "halflife": 500, "augment_p": 0.12})])
def test_paper_presets_train_end_to_end_on_digits(tmp_path, monkeypatch, preset, recipe):
    """The presets' recipe (clipping, x-flips, VE loss / augmentation pipe) reaches the training, on digits with a small net."""
    import lightning as L

    from edm_lab.checkpoints.snapshot import load_checkpoint
    from edm_lab.tasks.train import run_train

    seen = {}
    fit = L.Trainer.fit

    def spy(trainer, module, datamodule=None, ckpt_path=None, **kwargs):
        seen.update(clip=trainer.gradient_clip_val, items=len(datamodule.train_set), lr=module.lr,
                    halflife=module.ema_halflife_kimg, noise=type(module.loss.noise).__name__,
                    weighting=type(module.loss.weighting).__name__,
                    augment_p=module.augment_pipe.p if module.augment_pipe is not None else None,
                    start={k: v.clone() for k, v in module.net.state_dict().items()})
        return fit(trainer, module, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", spy)
    cfg = compose_cfg(tmp_path, f"experiment={preset}", "data=digits", "data.resolution=8", "data.limit=64",
                      "net=ddpmpp_small", "metric=raw", "logger=csv", "task.batch_size=16", "task.duration_kimg=0.032",
                      "task.snapshot_kimg=0.032", "task.eval_kimg=0", "task.num_workers=0",
                      "trainer.enable_progress_bar=false", f"paths.output_dir={tmp_path}/run")
    result = run_train(cfg, {"data": "digits", "net": "ddpmpp_small"})
    start = seen.pop("start")
    assert seen == recipe  # x-flips double config A's 64 images
    assert result["kimg"] == pytest.approx(0.032)
    ema = load_checkpoint(result["network"])
    assert ema.build_spec["network"]["kwargs"]["augment_dim"] == (9 if recipe["augment_p"] else 0)
    end = ema.state_dict()
    assert all(v.isfinite().all() for v in end.values())
    assert max((end[k] - start[k]).abs().max().item() for k in start) > 0  # two steps moved the EMA
