"""Checkpoints refused cheaply and clearly: our safetensors files, reference pickles, resume files.

A file may name a network far larger than itself; the loaders must compare its tensors with the
network on the meta device and refuse before allocating. Building a network off the meta
device before that comparison is what the `real_builds` spy below catches.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import pickle
import re
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save

import edm_lab.nets
from edm_lab.checkpoints.official import CheckpointFormatError, load_official, read_snapshot
from edm_lab.checkpoints.resume import ResumeCheckpointError, check_resume_checkpoint
from edm_lab.checkpoints.snapshot import FORMAT, METADATA_KEY, file_sha256, load_checkpoint, save_checkpoint
from edm_lab.design.precond import EDMPrecond, IDDPMPrecond
from edm_lab.nets.denoisers import build_denoiser, check_spec, check_spec_against, network_spec, spec_state_layout
from tests.conftest import NET_PRESETS, PROJECT_ROOT, net_preset
from tests.test_official import _Reduce, _reference_net, _write_snapshot, reference, standin_nets  # noqa: F401

SMALL_SPEC = network_spec(functools.partial(EDMPrecond), net_preset("ddpmpp_small"), 8, 1)


@pytest.fixture
def real_builds(monkeypatch):
    """Fails any network build off the meta device (an allocation) and records its kwargs."""
    built = []
    inner = edm_lab.nets.build_network

    def spy(model_type, **kwargs):
        if torch.get_default_device().type != "meta":
            built.append(kwargs)
            raise AssertionError(f"{model_type} was allocated before its tensors were checked")
        return inner(model_type, **kwargs)

    monkeypatch.setattr(edm_lab.nets, "build_network", spy)
    return built


def _network():
    torch.manual_seed(0)
    return build_denoiser(SMALL_SPEC)


def _spec_with(**network_kwargs) -> dict:
    spec = json.loads(json.dumps(SMALL_SPEC))
    spec["network"]["kwargs"].update(network_kwargs)
    return spec


def _write(path, tensors, **metadata):
    encoded = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    path.write_bytes(save(tensors, metadata=encoded))
    return path


# ----------------------------------------------------------------------------------------------
# Our own checkpoints: the spec is checked against the header before anything is allocated


@pytest.mark.parametrize("overrides,reason", [
    (dict(model_channels=1024), r"do not match.*missing 134 tensors.*unexpected 1 tensors \['w'\]"),
    (dict(model_channels=1_000_000), r"model_channels=1000000 is outside \[1, 8192\]"),
    (dict(num_blocks=1_000_000), r"num_blocks=1000000 is outside \[0, 16\]"),
    (dict(channel_mult=[1] * 10_000), r"len\(channel_mult\)=10000 is outside \[1, 8\]"),
])
def test_hostile_spec_is_refused_before_allocation(tmp_path, real_builds, overrides, reason):
    path = _write(tmp_path / "tiny.safetensors", {"w": torch.zeros(1)}, format=FORMAT, spec=_spec_with(**overrides))
    assert path.stat().st_size < 100_000
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + reason):
        load_checkpoint(path)
    assert real_builds == []


def test_hostile_spec_costs_little_memory(tmp_path):
    """The issue's case: a file of a few hundred bytes asking for 1024 channels cost 3.6 GB to refuse."""
    path = _write(tmp_path / "c1024.safetensors", {"w": torch.zeros(1)}, format=FORMAT,
                  spec=_spec_with(model_channels=1024))
    code = ("import resource, sys\nfrom edm_lab.checkpoints.snapshot import load_checkpoint\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    load_checkpoint(sys.argv[1])\nexcept ValueError as exc:\n    print('refused:', exc)\n"
            "print('growth_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert "refused:" in proc.stdout, proc.stdout + proc.stderr
    growth_mb = int(re.search(r"growth_kb (\d+)", proc.stdout).group(1)) / 1024
    assert growth_mb < 400, f"refusing the file grew the peak RSS by {growth_mb:.0f} MB"


def test_dtypes_must_match_the_network(tmp_path):
    good = save_checkpoint(_network(), tmp_path / "good.safetensors")
    state = load_checkpoint(good).state_dict()
    state["model.map_layer0.bias"] = state["model.map_layer0.bias"].to(torch.float64)
    path = _write(tmp_path / "f64.safetensors", {k: v.contiguous() for k, v in state.items()}, format=FORMAT,
                  spec=SMALL_SPEC)
    with pytest.raises(ValueError, match=r"f64\.safetensors.*1 dtypes differ: 'model\.map_layer0\.bias' is "
                                         r"torch\.float64 in the file, torch\.float32 in the network"):
        load_checkpoint(path)


@pytest.mark.parametrize("case,metadata,reason", [
    ("spec-not-json", {"format": FORMAT, "spec": "{not json"}, r"metadata 'spec' is not valid JSON"),
    ("no-spec", {"format": FORMAT}, r"has no network spec"),
    ("no-format", {"spec": json.dumps(SMALL_SPEC)}, r"has format None"),
    ("other-format", {"format": "other/3", "spec": json.dumps(SMALL_SPEC)}, r"has format 'other/3'"),
    ("spec-is-list", {"format": FORMAT, "spec": "[1, 2]"}, r"network spec is a list"),
    ("no-precond", {"format": FORMAT, "spec": json.dumps({"network": SMALL_SPEC["network"]})}, r"lacks 'precond'"),
    ("no-network", {"format": FORMAT, "spec": json.dumps({"precond": SMALL_SPEC["precond"]})}, r"lacks 'network'"),
    ("unknown-precond", {"format": FORMAT, "spec": json.dumps(SMALL_SPEC | {"precond": {"class": "os.system",
                                                                                        "kwargs": {}}})},
     r"unknown preconditioner 'os\.system'"),
    ("bad-kwargs", {"format": FORMAT, "spec": json.dumps(_spec_with(no_such_argument=1))},
     r"cannot build SongUNet.*no_such_argument"),
    ("extra-not-json", {"format": FORMAT, "spec": json.dumps(SMALL_SPEC), "extra": "{"},
     r"metadata 'extra' is not valid JSON"),
    ("record-not-json", {METADATA_KEY: "{"}, rf"metadata '{METADATA_KEY}' is not valid JSON"),
    ("record-not-object", {METADATA_KEY: "[]"}, rf"metadata '{METADATA_KEY}' is a list"),
    ("record-extra-not-object", {METADATA_KEY: json.dumps({"format": FORMAT, "spec": SMALL_SPEC, "extra": 3})},
     r"extra is not a JSON object \(got int\)"),
])
def test_malformed_metadata_is_a_value_error_naming_the_file(tmp_path, case, metadata, reason):
    path = _write(tmp_path / f"{case}.safetensors", {"w": torch.zeros(1)}, **metadata)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert type(info.value) is ValueError  # not a bare JSONDecodeError / KeyError
    assert re.search(re.escape(str(path)) + ".*" + reason, str(info.value)), str(info.value)


SAVE_TWICE = """
import functools, sys, torch
from edm_lab.checkpoints.snapshot import save_checkpoint
from edm_lab.design.precond import EDMPrecond
from edm_lab.nets.denoisers import build_denoiser, network_spec
from tests.conftest import net_preset
SMALL_SPEC = network_spec(functools.partial(EDMPrecond), net_preset("ddpmpp_small"), 8, 1)
for i in range(2):
    torch.manual_seed(0)
    save_checkpoint(build_denoiser(SMALL_SPEC), f"{sys.argv[1]}-{i}.safetensors", extra={"kimg": 1.5, "b": 1, "a": [2]})
"""


def test_same_weights_give_the_same_bytes_in_every_process(tmp_path):
    paths = []
    for i in range(3):
        paths.append(save_checkpoint(_network(), tmp_path / f"here-{i}.safetensors",
                                     extra={"kimg": 1.5, "b": 1, "a": [2]}))
    for name in ("first", "second"):
        subprocess.run([sys.executable, "-c", SAVE_TWICE, str(tmp_path / name)], cwd=PROJECT_ROOT, check=True,
                       timeout=300)
        paths += [tmp_path / f"{name}-0.safetensors", tmp_path / f"{name}-1.safetensors"]
    contents = {p.read_bytes() for p in paths}
    assert len(contents) == 1
    assert len({file_sha256(p) for p in paths}) == 1


def test_first_layout_files_still_load(tmp_path):
    original = _network()
    path = _write(tmp_path / "v1.safetensors", {k: v.contiguous() for k, v in original.state_dict().items()},
                  format=FORMAT, spec=SMALL_SPEC, extra={"kimg": 3})
    loaded = load_checkpoint(path)
    assert loaded.checkpoint_extra == {"kimg": 3}
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_spec_bounds_admit_the_paper_networks():
    """Every preset of conf/net/ at ImageNet-64 size (1000 classes, iDDPM's 2x outputs) passes SPEC_BOUNDS."""
    iddpm = functools.partial(IDDPMPrecond, M=1000)
    for name in NET_PRESETS:
        for precond in (functools.partial(EDMPrecond), iddpm):
            spec = network_spec(precond, net_preset(name), 64, 3, label_dim=1000)
            check_spec(spec)
    layout = spec_state_layout(network_spec(iddpm, net_preset("adm_imagenet64"), 64, 3, label_dim=1000))
    buffers = {"u"} | {k for k in layout if k.endswith("resample_filter")}
    assert sum(torch.Size(shape).numel() for k, (shape, _) in layout.items() if k not in buffers) == 295_904_454
    check_spec_against(network_spec(iddpm, net_preset("adm_imagenet64"), 64, 3, label_dim=1000),
                       {k: shape for k, (shape, _) in layout.items()})


# ----------------------------------------------------------------------------------------------
# Reference pickles: tensors must lie inside their storage; init_kwargs are checked on meta


def _tensor_pickle(path, storage_elements, offset, size, stride):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated, but it is what the pickles hold
        storage = torch.arange(float(storage_elements)).storage()
    tensor = _Reduce(torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, False, collections.OrderedDict()))
    path.write_bytes(pickle.dumps(dict(ema=tensor)))
    return path


@pytest.mark.parametrize("case,geometry,reason", [
    ("longer", (0, (1000,), (1,)), r"needs 1000 elements, its storage has 2"),
    ("offset", (2, (1,), (1,)), r"needs 3 elements, its storage has 2"),
    ("strided", (0, (2, 2), (2, 1)), r"needs 4 elements, its storage has 2"),
    ("expanded", (0, (1_000_000,), (0,)), r"needs 1000000 elements, its storage has 2"),
    ("negative-stride", (1, (2,), (-1,)), r"negative values"),
    ("negative-offset", (-1, (1,), (1,)), r"negative values"),
])
def test_tensor_geometry_must_lie_inside_its_storage(tmp_path, case, geometry, reason):
    path = _tensor_pickle(tmp_path / f"{case}.pkl", 2, *geometry)
    with pytest.raises(CheckpointFormatError, match=re.escape(str(path)) + ".*" + reason):
        read_snapshot(path)


def test_tensor_geometry_inside_its_storage_is_kept(tmp_path):
    path = _tensor_pickle(tmp_path / "view.pkl", 6, 1, (2, 2), (1, 2))
    assert read_snapshot(path)["ema"].tolist() == [[1.0, 3.0], [2.0, 4.0]]
    empty = _tensor_pickle(tmp_path / "empty.pkl", 0, 0, (0, 5), (5, 1))
    assert read_snapshot(empty)["ema"].shape == (0, 5)


@pytest.mark.parametrize("channels,reason", [
    (16, r"do not match.*'model\.map_layer0\.weight' is \(16, 8\) in the file, \(32, 16\) in the network"),
    (1_000_000, r"model_channels=1000000 is outside \[1, 8192\]"),
])
def test_hostile_init_kwargs_are_refused_before_allocation(standin_nets, tmp_path, real_builds, channels, reason):  # noqa: F811
    net = _reference_net(standin_nets, "edm")
    net._init_kwargs["model_channels"] = channels
    path, _ = _write_snapshot(standin_nets, tmp_path, net=net, filename="hostile-kwargs.pkl")
    with pytest.raises(CheckpointFormatError, match=r"hostile-kwargs\.pkl.*" + reason):
        load_official(path)
    assert real_builds == []
    assert not standin_nets.marker.exists()


def test_tensors_sharing_one_short_storage_are_refused(standin_nets, tmp_path):  # noqa: F811
    """A hand-made pickle can point every parameter at one memoised storage: few bytes, many values."""
    data = standin_nets.snapshot(_reference_net(standin_nets, "edm"))
    params = [(m, name, p) for m in data["ema"].modules() for name, p in m._parameters.items() if p is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated, but it is what the pickles hold
        storage = torch.zeros(max(p.numel() for _, _, p in params)).storage()
    for module, name, p in params:
        module._parameters[name] = _Reduce(torch._utils._rebuild_tensor_v2, (storage, 0, tuple(p.shape), p.stride(),
                                                                             False, collections.OrderedDict()))
    path = standin_nets.dump(data, tmp_path / "shared.pkl")
    storage_bytes = storage.nbytes()
    with pytest.raises(CheckpointFormatError, match=rf"shared\.pkl.*share storages of {storage_bytes:,} bytes"):
        load_official(path)


def test_plain_values_referenced_many_times_are_copied_once(standin_nets, tmp_path):  # noqa: F811
    """The pickle memo makes each further reference to a list cost a few bytes; copies must not multiply."""
    shared = list(range(1000))
    data = standin_nets.snapshot(_reference_net(standin_nets, "edm"), dataset_kwargs={"refs": [shared] * 1000})
    path = standin_nets.dump(data, tmp_path / "shared-lists.pkl")
    assert path.stat().st_size < 200_000
    refs = load_official(path)["dataset_kwargs"]["refs"]
    assert len(refs) == 1000 and refs[0] == shared
    assert len({id(ref) for ref in refs}) == 1


# ----------------------------------------------------------------------------------------------
# Resume files: weights-only, our message, our checkpoints only


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A checkpoint written by the training task (tiny: one step)."""
    from tests.test_train import train

    tmp_path = tmp_path_factory.mktemp("train")
    _, run_dir = train(tmp_path, "run", "task.duration_kimg=0.032", "task.snapshot_kimg=0.032",
                       "task.eval_kimg=0.032", "num_samples=16", "batch_size=16")
    (path,) = sorted((run_dir / "checkpoints").glob("snapshot-*.ckpt"))
    return path


def test_training_checkpoints_pass(training_checkpoint, tmp_path):
    check_resume_checkpoint(training_checkpoint)
    check_resume_checkpoint(str(training_checkpoint))
    legacy = tmp_path / "legacy.ckpt"  # torch.save's pre-zip format cannot be memory-mapped: read whole
    torch.save(torch.load(training_checkpoint, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    check_resume_checkpoint(legacy)


def _hostile(marker):
    return {
        "zip-os-system": lambda p: torch.save(_Reduce(os.system, (f"touch {marker}",)), p),
        "zip-print": lambda p: torch.save(_Reduce(print, ("PWNED",)), p),
        "legacy-print": lambda p: torch.save(_Reduce(print, ("PWNED",)), p, _use_new_zipfile_serialization=False),
        "pickle-os-system": lambda p: p.write_bytes(pickle.dumps(_Reduce(os.system, (f"touch {marker}",)), protocol=2)),
    }


@pytest.mark.parametrize("case,reason", [
    ("zip-os-system", rf"unsupported GLOBAL {os.system.__module__}\.system whose module "
                      rf"{os.system.__module__} is blocked"),
    ("zip-print", r"Unsupported global: GLOBAL print"),
    ("legacy-print", r"Unsupported global: GLOBAL print"),
    ("pickle-os-system", rf"unsupported GLOBAL {os.system.__module__}\.system whose module "
                         rf"{os.system.__module__} is blocked"),
])
def test_hostile_resume_files_are_refused_with_our_message(tmp_path, capfd, case, reason):
    marker = tmp_path / "pwned"
    path = tmp_path / f"{case}.ckpt"
    _hostile(marker)[case](path)
    with pytest.raises(ResumeCheckpointError) as info:
        check_resume_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and re.search(reason, message), message
    assert "weights-only allow-list" in message and "Nothing in it was executed" in message
    assert "weights_only" not in message and "safe_globals" not in message
    assert not marker.exists() and "PWNED" not in capfd.readouterr().out


def test_files_that_are_not_training_checkpoints_are_refused(training_checkpoint, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, weights)
    with pytest.raises(ResumeCheckpointError, match=r"weights\.pt is not a training checkpoint.*lacks \['state_dict', "
                                                    r"'optimizer_states', 'loops', 'cur_nimg'\]"):
        check_resume_checkpoint(weights)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(ResumeCheckpointError, match=r"tensor\.pt holds a Tensor"):
        check_resume_checkpoint(tensor)
    checkpoint = torch.load(training_checkpoint, weights_only=True)
    del checkpoint["cur_nimg"]  # a Lightning checkpoint of some other module
    foreign = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, foreign)
    with pytest.raises(ResumeCheckpointError,
                       match=r"foreign\.ckpt is not a training checkpoint.*lacks \['cur_nimg'\]"):
        check_resume_checkpoint(foreign)


def test_missing_and_unreadable_resume_files_are_refused(training_checkpoint, tmp_path):
    with pytest.raises(ResumeCheckpointError, match=r"nowhere\.ckpt does not exist"):
        check_resume_checkpoint(tmp_path / "nowhere.ckpt")
    with pytest.raises(ResumeCheckpointError, match=re.escape(str(tmp_path)) + " does not exist or is not a regular"):
        check_resume_checkpoint(tmp_path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(training_checkpoint.read_bytes()[:4096])
    with pytest.raises(ResumeCheckpointError, match=r"truncated\.ckpt was refused.*failed reading zip archive"):
        check_resume_checkpoint(truncated)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ResumeCheckpointError, match=r"notes\.ckpt was refused"):
        check_resume_checkpoint(text)
