"""Safe import of the reference's network snapshots (edm_lab.checkpoints.official).

The snapshots are built here in the reference's genuine pickle format: stand-in packages
`torch_utils.persistence` and `dnnlib.util` (written below, placed on sys.path for one test)
reproduce the persistence MECHANISM -- classes pickled as `_reconstruct_persistent_obj(meta)`
with `module_src`, `class_name` and `state` -- and `pickle.dump` writes
`dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...)` as the reference training
loop does. The module source carried by the files appends to a marker file when executed, so
the tests can see that loading never executes it (and, as a control, that plain pickle does).
"""
from __future__ import annotations

import copy
import io
import math
import os
import pickle
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import edm_lab.nets
from edm_lab.checkpoints import official
from edm_lab.checkpoints.official import (
    ALLOWED_GLOBALS,
    CheckpointFormatError,
    OfficialCheckpointError,
    UnsafePickleError,
    cache_path_for_url,
    load_official,
)
from edm_lab.design import precond as ours
from tests.conftest import load_reference, precond_class

try:
    import numpy
except ImportError:  # the stand-in network then stores Python floats instead of numpy scalars
    numpy = None

# ----------------------------------------------------------------------------------------------
# Stand-ins for the reference's packages (own code; the same pickle format)

PERSISTENCE_SRC = '''
"""Test stand-in for the reference's torch_utils.persistence: the same pickle format."""
import copy
import inspect
import sys
import types
import uuid

import dnnlib

_version = 6
_wrapped = set()
_src_of_module = {}
_module_of_src = {}


def persistent_class(cls):
    """Make instances pickle as _reconstruct_persistent_obj(meta), meta carrying the module source."""
    if cls in _wrapped:
        return cls
    module = sys.modules[cls.__module__]
    module_src = _src_of_module.get(module.__name__) or inspect.getsource(module)
    _module_of_src.setdefault(module_src, module)  # copies made in this process reuse the live module

    class Persistent(cls):
        _persistent_module_src = module_src
        _persistent_class_name = cls.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_kwargs(self):
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = super().__reduce__()
            state = fields[2] if len(fields) > 2 else None
            meta = dict(type="class", version=_version, module_src=self._persistent_module_src,
                        class_name=self._persistent_class_name, state=state)
            return (_reconstruct_persistent_obj, (meta,))

    Persistent.__name__ = Persistent.__qualname__ = cls.__name__
    Persistent.__module__ = cls.__module__
    _wrapped.add(Persistent)
    return Persistent


def _reconstruct_persistent_obj(meta):
    """What unpickling does in the reference: EXECUTE module_src, then rebuild the object."""
    meta = dnnlib.EasyDict(meta)
    module = _module_of_src.get(meta.module_src)
    if module is None:
        module = types.ModuleType("_imported_module_" + uuid.uuid4().hex)
        sys.modules[module.__name__] = module
        _src_of_module[module.__name__] = meta.module_src
        _module_of_src[meta.module_src] = module
        exec(meta.module_src, module.__dict__)
    cls = persistent_class(module.__dict__[meta.class_name])
    obj = cls.__new__(cls)
    if hasattr(obj, "__setstate__"):
        obj.__setstate__(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj
'''

DNNLIB_INIT_SRC = "from . import util\nfrom .util import EasyDict\n"

DNNLIB_UTIL_SRC = '''
class EasyDict(dict):
    """A dict with attribute access (stand-in for dnnlib.util.EasyDict)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]
'''

# Tiny classes named like the reference's (NOT its architecture): reference parameter naming,
# a None buffer, a non-persistent buffer, nested ModuleDicts and numpy scalars in the state.
NETWORKS_SRC = '''
"""Reference-named stand-in classes for the checkpoint import tests."""
import math

import torch
from torch.nn.functional import silu

from torch_utils import persistence

try:
    import numpy as np
except ImportError:
    np = None

MARKER = {marker!r}
if __name__.startswith("_imported_module_"):  # only when a loader executes the pickled source
    with open(MARKER, "a") as fh:
        fh.write(__name__ + "\\n")


def _sqrt(value):
    return np.sqrt(value) if np is not None else math.sqrt(value)


@persistence.persistent_class
class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_weight=1):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) * (init_weight / math.sqrt(in_features)))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(out_features)) if bias else None

    def forward(self, x):
        x = x @ self.weight.t()
        return x + self.bias if self.bias is not None else x


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel, bias=True):
        super().__init__()
        fan_in = in_channels * kernel * kernel
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel) / math.sqrt(fan_in))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(out_channels)) if bias else None
        self.register_buffer("resample_filter", None)

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=2, eps=1e-5):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(num_channels))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000):
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions

    def forward(self, x):
        half = self.num_channels // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=torch.float32) / half)
        x = x.ger(freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.ger(2 * math.pi * self.freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    pass  # only a name here (the golden test builds its module tree from a state_dict)


@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    pass  # only a name here


@persistence.persistent_class
class EvilNet(torch.nn.Module):
    pass  # a class the loader does not know


@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """A tiny network with reference names and signature (not the reference architecture)."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=8,
                 embedding_type="positional", dropout=0.1):
        super().__init__()
        c, res = model_channels, img_resolution
        self.skip_scale = _sqrt(0.5)
        self.map_noise = PositionalEmbedding(c) if embedding_type == "positional" else FourierEmbedding(c)
        self.map_label = Linear(label_dim, c) if label_dim else None
        self.map_augment = Linear(augment_dim, c, bias=False) if augment_dim else None
        self.map_layer0 = Linear(c, 2 * c, init_weight=_sqrt(1 / 3))
        self.enc = torch.nn.ModuleDict()
        self.enc[f"{{res}}x{{res}}_conv"] = Conv2d(in_channels, c, 3)
        self.dec = torch.nn.ModuleDict()
        self.dec[f"{{res}}x{{res}}_aux_norm"] = GroupNorm(c)
        self.dec[f"{{res}}x{{res}}_aux_conv"] = Conv2d(c, out_channels, 3)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        scale, shift = silu(self.map_layer0(emb)).unsqueeze(2).unsqueeze(3).chunk(2, dim=1)
        (conv,) = self.enc.values()
        norm, out = self.dec.values()
        return out(silu(norm(conv(x) * (1 + scale) + shift))) * float(self.skip_scale)


class _Precond(torch.nn.Module):
    def _make_model(self, img_resolution, img_channels, label_dim, use_fp16, model_type, out_channels,
                    model_kwargs):
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.use_fp16 = label_dim, use_fp16
        self.model = globals()[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                           out_channels=out_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model(c_in * x, c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x[:, :self.img_channels]


@persistence.persistent_class
class EDMPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", **model_kwargs):
        super().__init__()
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self._make_model(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)

    def coefficients(self, sigma):
        sd = self.sigma_data
        return (sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt(),
                1 / (sd ** 2 + sigma ** 2).sqrt(), sigma.log() / 4)


@persistence.persistent_class
class VPPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type="SongUNet", **model_kwargs):
        super().__init__()
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self._make_model(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)

    def coefficients(self, sigma):
        t = ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * t


@persistence.persistent_class
class VEPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type="SongUNet", **model_kwargs):
        super().__init__()
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self._make_model(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


@persistence.persistent_class
class iDDPMPrecond(_Precond):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                 model_type="DhariwalUNet", **model_kwargs):
        super().__init__()
        self.C_1, self.C_2, self.M = C_1, C_2, M
        self._make_model(img_resolution, img_channels, label_dim, use_fp16, model_type, 2 * img_channels,
                         model_kwargs)
        alpha_bar = lambda j: math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):
            u[j - 1] = ((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1).sqrt()
        self.register_buffer("u", u)

    def coefficients(self, sigma):
        index = (sigma.reshape(-1, 1) - self.u.reshape(1, -1)).abs().argmin(1).reshape(sigma.shape)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), self.M - 1 - index.to(torch.float32)


@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data


@persistence.persistent_class
class AugmentPipe:
    def __init__(self, p=1, xflip=0, yflip=0):
        self.p, self.xflip, self.yflip = float(p), float(xflip), float(yflip)
'''

STANDIN_MODULE = "edm_reference_standin"


class Reference:
    """The stand-in reference packages, importable for the duration of one test."""

    def __init__(self, root: Path, marker: Path) -> None:
        self.root, self.marker = root, marker
        import dnnlib  # noqa: F401 - the stand-ins, from `root`
        from torch_utils import persistence
        self.persistence = persistence
        self.dnnlib = sys.modules["dnnlib"]
        self.nets = __import__(STANDIN_MODULE)

    def build_network(self, model_type: str, **kwargs) -> torch.nn.Module:
        """Stand-in for edm_lab.nets.build_network that builds the tiny reference-named network."""
        return getattr(self.nets, model_type)(**kwargs)

    def snapshot(self, ema, loss_fn=None, augment_pipe=None, dataset_kwargs=None) -> dict:
        """What the reference training loop pickles: modules deep-copied, eval, no grad, on CPU."""
        data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs or {}))
        for key, value in data.items():
            if isinstance(value, torch.nn.Module):
                data[key] = copy.deepcopy(value).eval().requires_grad_(False).cpu()
        return data

    def dump(self, data, path: Path, protocol: int | None = None) -> Path:
        with open(path, "wb") as fh:
            pickle.dump(data, fh, protocol=protocol)
        return path


@pytest.fixture
def reference(tmp_path, monkeypatch):
    root = tmp_path / "reference_src"
    marker = tmp_path / "module_src_was_executed.txt"
    files = {
        "torch_utils/__init__.py": "",
        "torch_utils/persistence.py": PERSISTENCE_SRC,
        "dnnlib/__init__.py": DNNLIB_INIT_SRC,
        "dnnlib/util.py": DNNLIB_UTIL_SRC,
        f"{STANDIN_MODULE}.py": NETWORKS_SRC.format(marker=str(marker)),
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    names = ("torch_utils", "dnnlib", STANDIN_MODULE)
    clash = [m for m in sys.modules if m.split(".")[0] in names]
    assert not clash, f"modules {clash} already imported: the stand-ins would not be used"
    monkeypatch.syspath_prepend(str(root))
    try:
        yield Reference(root, marker)
    finally:
        for m in list(sys.modules):
            if m.split(".")[0] in names or m.startswith("_imported_module_"):
                del sys.modules[m]


@pytest.fixture
def standin_nets(reference, monkeypatch):
    """edm_lab.nets.build_network replaced by the tiny reference-named network."""
    monkeypatch.setattr(edm_lab.nets, "build_network", reference.build_network)
    return reference


def _inputs(net, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    res, ch, label_dim = net.img_resolution, net.img_channels, net.label_dim
    x = torch.randn(batch, ch, res, res, generator=g)
    sigma = torch.tensor([0.003, 0.4, 2.5, 60.0][:batch])
    labels = torch.eye(label_dim)[torch.randint(label_dim, (batch,), generator=g)] if label_dim else None
    return x, sigma, labels


def _augment_labels(net, batch=4):
    dim = net.model.map_augment.in_features if net.model.map_augment is not None else 0
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(1)) if dim else None


PRECONDS = {
    # name: (reference class, our class, constructor kwargs as train.py would pass them)
    "edm": ("EDMPrecond", ours.EDMPrecond, dict(model_type="SongUNet", label_dim=0, sigma_data=0.5)),
    "vp": ("VPPrecond", ours.VPPrecond, dict(label_dim=3, augment_dim=5, embedding_type="fourier", dropout=0.13)),
    "ve": ("VEPrecond", ours.VEPrecond, dict(label_dim=0, sigma_max=80.0)),
    "iddpm": ("iDDPMPrecond", ours.IDDPMPrecond, dict(model_type="SongUNet", label_dim=2, M=1000)),
}


def _reference_net(reference, name, seed=0):
    ref_class, _, kwargs = PRECONDS[name]
    torch.manual_seed(seed)
    return getattr(reference.nets, ref_class)(img_resolution=8, img_channels=2, model_channels=8, **kwargs)


def _write_snapshot(reference, tmp_path, name="edm", filename="network-snapshot-000100.pkl", protocol=None, net=None):
    net = net if net is not None else _reference_net(reference, name)
    data = reference.snapshot(
        net, loss_fn=reference.nets.EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5),
        augment_pipe=reference.nets.AugmentPipe(p=0.12, xflip=1e8),
        dataset_kwargs=reference.dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                 path="datasets/tiny-8x8.zip", use_labels=False, xflip=False,
                                                 cache=True, resolution=8, max_size=16,
                                                 nested=reference.dnnlib.EasyDict(a=1)))
    return reference.dump(data, tmp_path / filename, protocol), data["ema"]


# ----------------------------------------------------------------------------------------------
# Genuine-format snapshots


@pytest.mark.parametrize("name", sorted(PRECONDS))
def test_snapshot_loads_as_our_modules_with_identical_outputs(standin_nets, tmp_path, name):
    path, original = _write_snapshot(standin_nets, tmp_path, name)
    loaded = load_official(path)

    ema = loaded["ema"]
    assert type(ema) is PRECONDS[name][1]
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    assert set(ema.state_dict()) == set(original.state_dict())  # non-persistent buffer excluded, None skipped
    x, sigma, labels = _inputs(original)
    kwargs = {} if _augment_labels(original) is None else dict(augment_labels=_augment_labels(original))
    with torch.no_grad():
        expected = original(x, sigma, class_labels=labels, **kwargs)
        got = ema(x, sigma, class_labels=labels, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert ema.sigma_min == pytest.approx(float(getattr(original, "sigma_min", ema.sigma_min)))

    assert loaded["loss_fn"] == {"class_name": "EDMLoss", "init_kwargs": dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)}
    assert loaded["augment_pipe"] == {"class_name": "AugmentPipe", "init_kwargs": dict(p=0.12, xflip=1e8)}
    assert loaded["dataset_kwargs"]["path"] == "datasets/tiny-8x8.zip"
    assert type(loaded["dataset_kwargs"]) is dict and type(loaded["dataset_kwargs"]["nested"]) is dict
    assert loaded["source"] == str(path)
    assert not standin_nets.marker.exists(), "load_official executed the pickled module_src"


def test_reference_noise_parameters_are_mapped(standin_nets, tmp_path):
    net = standin_nets.nets.VPPrecond(img_resolution=8, img_channels=1, beta_d=15.0, beta_min=0.2, M=500,
                                      epsilon_t=1e-3, model_channels=8)
    ema = load_official(_write_snapshot(standin_nets, tmp_path, net=net)[0])["ema"]
    assert (ema.beta_d, ema.beta_min, ema.M, ema.epsilon_t) == (15.0, 0.2, 500, 1e-3)
    net = standin_nets.nets.EDMPrecond(img_resolution=8, img_channels=1, sigma_min=0.002, sigma_max=80,
                                       sigma_data=0.6, model_type="SongUNet", model_channels=8)
    ema = load_official(_write_snapshot(standin_nets, tmp_path, net=net)[0])["ema"]
    assert (ema.sigma_min, ema.sigma_max, ema.sigma_data) == (0.002, 80, 0.6)
    net = standin_nets.nets.iDDPMPrecond(img_resolution=8, img_channels=1, C_1=0.002, C_2=0.01, M=200,
                                         model_type="SongUNet", model_channels=8)
    ema = load_official(_write_snapshot(standin_nets, tmp_path, net=net)[0])["ema"]
    assert (ema.C_1, ema.C_2, ema.M) == (0.002, 0.01, 200)
    torch.testing.assert_close(ema.u, net.u)  # the table is loaded (and agrees with ours)


def test_plain_pickle_would_execute_module_src(reference, tmp_path):
    """Control: the stand-in format is real -- plain pickle.load runs module_src (and works)."""
    path, original = _write_snapshot(reference, tmp_path, "vp")
    assert not reference.marker.exists()
    reference.persistence._module_of_src.clear()  # as in a fresh process, where no module has this source
    with open(path, "rb") as fh:
        data = pickle.load(fh)
    assert reference.marker.exists()
    x, sigma, labels = _inputs(original)
    with torch.no_grad():
        torch.testing.assert_close(data["ema"](x, sigma, class_labels=labels), original(x, sigma, class_labels=labels))


class _RecordingUnpickler(official._RestrictedUnpickler):
    def __init__(self, fh, source):
        super().__init__(fh, source)
        self.names = set()

    def find_class(self, module, name):
        self.names.add((module, name))
        return super().find_class(module, name)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_snapshot_needs_exactly_the_allowed_globals(standin_nets, tmp_path, protocol):
    path, _ = _write_snapshot(standin_nets, tmp_path, "vp", protocol=protocol)
    with open(path, "rb") as fh:
        unpickler = _RecordingUnpickler(fh, str(path))
        unpickler.load()
    expected = set(ALLOWED_GLOBALS) - {("builtins", "set")} - {
        ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
    if protocol < 4:
        expected.add(("builtins", "set"))  # protocol 4 added opcodes for sets
    if numpy is not None:
        expected |= {("numpy", "dtype"), (numpy.float64(0).__reduce__()[0].__module__, "scalar")}
    assert unpickler.names == expected
    assert load_official(path)["ema"] is not None


def test_missing_or_extra_tensors_are_named(standin_nets, tmp_path):
    net = _reference_net(standin_nets, "edm")
    net.model.map_layer0.extra = torch.nn.Parameter(torch.zeros(2))
    path, _ = _write_snapshot(standin_nets, tmp_path, net=net, filename="extra.pkl")
    with pytest.raises(CheckpointFormatError, match=r"extra\.pkl.*'model\.map_layer0\.extra'"):
        load_official(path)
    net = _reference_net(standin_nets, "edm")
    net.model.map_layer0.bias = None
    path, _ = _write_snapshot(standin_nets, tmp_path, net=net, filename="missing.pkl")
    with pytest.raises(CheckpointFormatError, match=r"missing\.pkl.*'model\.map_layer0\.bias'"):
        load_official(path)


# ----------------------------------------------------------------------------------------------
# The golden reference networks, through a genuine-format pickle


def _reference_class_for(path: str, model_type: str, has_freqs: bool) -> str:
    """The reference class of the module at dotted `path` (inside a preconditioner), by its name."""
    name = path.rsplit(".", 1)[-1]
    if path == "model":
        return model_type
    if name in ("enc", "dec"):
        return "ModuleDict"
    if name == "map_noise":
        return "FourierEmbedding" if has_freqs else "PositionalEmbedding"
    if name.startswith("map_") or name == "affine":
        return "Linear"
    if name.startswith("norm") or name.endswith("_norm"):
        return "GroupNorm"
    if "aux" not in name and re.search(r"_(block\d+|down|up|in\d+)$", name):
        return "UNetBlock"
    return "Conv2d"


def _golden_tree(reference, case) -> torch.nn.Module:
    """A tree of reference-named persistent modules holding the golden state_dict's tensors."""
    kwargs = dict(case["network_kwargs"])
    model_type = kwargs.pop("model_type")
    precond_kwargs = dict(img_resolution=kwargs.pop("img_resolution"), img_channels=kwargs.pop("in_channels"),
                          label_dim=kwargs.pop("label_dim"), use_fp16=False, model_type=model_type)
    kwargs.pop("out_channels")
    has_freqs = "model.map_noise.freqs" in case["state_dict"]

    def shell(class_name, init_kwargs=None):
        if class_name == "ModuleDict":
            return torch.nn.ModuleDict()
        # A golden file may spell the reference's class iDDPMPrecond or IDDPMPrecond.
        cls = next(getattr(reference.nets, n) for n in dir(reference.nets) if n.lower() == class_name.lower())
        node = cls.__new__(cls)
        torch.nn.Module.__init__(node)
        node._init_args, node._init_kwargs = (), dict(init_kwargs or {})
        return node

    root = shell(case["precond_class"], precond_kwargs | kwargs)
    nodes = {"": root}
    state = dict(case["state_dict"])
    if not has_freqs:  # a parameter-free PositionalEmbedding is in the real files too
        state = {"model.map_noise.__none__": None} | state
    for key, tensor in state.items():
        module_path, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        parts = module_path.split(".") if module_path else []
        for i in range(len(parts)):
            sub = ".".join(parts[:i + 1])
            if sub not in nodes:
                nodes[sub] = shell(_reference_class_for(sub, model_type, has_freqs))
                nodes[".".join(parts[:i])].add_module(parts[i], nodes[sub])
        if tensor is None:
            continue
        if leaf in ("freqs", "resample_filter", "u"):
            nodes[module_path].register_buffer(leaf, tensor.clone())
        else:
            nodes[module_path].register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
    return root


def test_golden_reference_networks_load_and_reproduce_outputs(reference, tmp_path):
    golden = load_reference("network_cases.pt")
    for i, case in enumerate(golden["cases"]):
        tree = _golden_tree(reference, case)
        path = reference.dump(reference.snapshot(tree, loss_fn=reference.nets.EDMLoss(),
                                                 dataset_kwargs=dict(resolution=16)),
                              tmp_path / f"golden-{i}-{case['arch']}-{case['precond']}.pkl")
        loaded = load_official(path)
        ema = loaded["ema"]
        assert type(ema) is precond_class(case["precond_class"])
        assert set(ema.state_dict()) == set(case["state_dict"])
        model_kwargs = {} if case["augment_labels"] is None else dict(augment_labels=case["augment_labels"])
        with torch.no_grad():
            out = ema(case["x"], case["sigma"], class_labels=case["class_labels"], **model_kwargs)
        label = f"case {i} ({case['arch']}, {case['precond']})"
        torch.testing.assert_close(out, case["output"], atol=1e-5, rtol=1e-5, msg=lambda m, label=label: f"{label}: {m}")
    assert not reference.marker.exists()


# ----------------------------------------------------------------------------------------------
# Hostile and broken files


class _Reduce:
    """Pickles as an arbitrary call."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _hostile_cases(marker: Path):
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os-system": (_Reduce(os.system, (f"touch {marker}",)), os.system.__module__ + ".system"),
        "builtins-eval": (_Reduce(eval, (touch,)), "builtins.eval"),
        "subprocess-popen": (_Reduce(subprocess.Popen, (["touch", str(marker)],)), "subprocess.Popen"),
        "builtins-exec-in-ema": (dict(ema=_Reduce(exec, (touch,)), loss_fn=None), "builtins.exec"),
    }


@pytest.mark.parametrize("case", ["os-system", "builtins-eval", "subprocess-popen", "builtins-exec-in-ema"])
def test_hostile_globals_are_refused_before_anything_runs(tmp_path, case):
    marker = tmp_path / "pwned"
    payload, global_name = _hostile_cases(marker)[case]
    path = tmp_path / f"{case}.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafePickleError) as info:
        load_official(path)
    assert str(path) in str(info.value) and global_name in str(info.value)
    assert not marker.exists()


def test_hand_written_protocol0_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "proto0.pkl"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"proto0\.pkl.*os\.system"):
        load_official(path)
    assert not marker.exists()


def test_unknown_persistent_class_inside_a_valid_snapshot_is_refused(reference, tmp_path):
    net = _reference_net(reference, "edm")
    net.model.evil = reference.nets.EvilNet()
    path, _ = _write_snapshot(reference, tmp_path, net=net, filename="evil-inside.pkl")
    with pytest.raises(UnsafePickleError, match=r"evil-inside\.pkl.*'EvilNet'"):
        load_official(path)
    assert not reference.marker.exists()


def test_evil_payload_inside_a_tensor_storage_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(_Reduce(os.system, (f"touch {marker}",)), buffer, _use_new_zipfile_serialization=False)
    path = tmp_path / "evil-storage.pkl"
    path.write_bytes(pickle.dumps(dict(ema=_Reduce(torch.storage._load_from_bytes, (buffer.getvalue(),)))))
    with pytest.raises(UnsafePickleError, match=r"evil-storage\.pkl.*storage"):
        load_official(path)
    assert not marker.exists()


def test_state_cannot_be_set_on_allowed_functions(tmp_path):
    path = tmp_path / "build-on-global.pkl"
    path.write_bytes(b"ctorch._utils\n_rebuild_parameter\n(dS'__defaults__'\n(I1\ntsb.")
    with pytest.raises(UnsafePickleError, match=r"build-on-global\.pkl.*_rebuild_parameter"):
        load_official(path)


def test_persistent_ids_are_refused(tmp_path):
    path = tmp_path / "persid.pkl"
    path.write_bytes(b"\x80\x02X\x03\x00\x00\x00abcQ.")
    with pytest.raises(UnsafePickleError, match=r"persid\.pkl.*persistent id"):
        load_official(path)


def test_truncated_file(standin_nets, tmp_path):
    path, _ = _write_snapshot(standin_nets, tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError, match=re.escape(str(path)) + ".*truncated"):
        load_official(path)
    assert not standin_nets.marker.exists()


@pytest.mark.parametrize("prefix", [b"", b"\x80\x04"])
def test_random_bytes(tmp_path, prefix):
    path = tmp_path / "random.pkl"
    path.write_bytes(prefix + random.Random(0).randbytes(4096))
    with pytest.raises(OfficialCheckpointError, match=re.escape(str(path))):
        load_official(path)


def test_text_empty_zip_and_missing_files(tmp_path):
    text = tmp_path / "notes.pkl"
    text.write_text("this is not a pickle\n")
    with pytest.raises(OfficialCheckpointError, match=re.escape(str(text))):
        load_official(text)
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match=r"empty\.pkl.*empty"):
        load_official(empty)
    archive = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, archive)
    with pytest.raises(CheckpointFormatError, match=r"weights\.pt.*zip"):
        load_official(archive)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pkl"):
        load_official(tmp_path / "nowhere.pkl")


def test_pickles_without_an_ema_network(tmp_path):
    listing = tmp_path / "list.pkl"
    listing.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointFormatError, match=r"list\.pkl.*list"):
        load_official(listing)
    no_ema = tmp_path / "no-ema.pkl"
    no_ema.write_bytes(pickle.dumps(dict(loss_fn=None, dataset_kwargs={})))
    with pytest.raises(CheckpointFormatError, match=r"no-ema\.pkl.*'ema'"):
        load_official(no_ema)
    plain = tmp_path / "plain-ema.pkl"
    plain.write_bytes(pickle.dumps(dict(ema={"weight": 1.0})))
    with pytest.raises(CheckpointFormatError, match=r"plain-ema\.pkl.*'ema' is a dict"):
        load_official(plain)


# ----------------------------------------------------------------------------------------------
# URLs and the download cache

URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-test-8x8-uncond-vp.pkl"


def _no_network(*args, **kwargs):
    raise AssertionError("the network was used")


def test_cached_url_is_used_without_network(standin_nets, tmp_path, monkeypatch):
    cached = cache_path_for_url(URL, tmp_path / "cache")
    assert cached.parent == tmp_path / "cache" / "official"
    assert re.fullmatch(r"[0-9a-f]{16}-edm-test-8x8-uncond-vp\.pkl", cached.name)
    cached.parent.mkdir(parents=True)
    _write_snapshot(standin_nets, cached.parent, "vp", filename=cached.name)
    monkeypatch.setattr(official, "download_url_to_file", _no_network)
    loaded = load_official(URL, cache_dir=tmp_path / "cache")
    assert loaded["source"] == URL and loaded["path"] == str(cached)
    assert type(loaded["ema"]) is ours.VPPrecond


class _Served:
    """A fake `urlopen` for torch.hub: serves `body` for URL, optionally breaking off part-way.

    The real `torch.hub.download_url_to_file` runs on top of it, so the tests see its own
    temporary file and final move, not a stand-in's.
    """

    def __init__(self, body: bytes, final: Path, break_after: int | None = None) -> None:
        self.body, self.final, self.break_after = body, final, break_after
        self.requests: list[str] = []

    def __call__(self, request):
        import email.message

        self.requests.append(request.full_url)
        body, final, break_after = self.body, self.final, self.break_after
        headers = email.message.Message()
        headers["Content-Length"] = str(len(body))
        position = 0

        class Response:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def info(self):
                return headers

            def read(self, size):
                nonlocal position
                assert not final.exists(), "the cache entry appeared before the download completed"
                if break_after is not None and position >= break_after:
                    raise ConnectionResetError("connection reset by peer")
                chunk = body[position:position + min(size, 64)]
                position += len(chunk)
                return chunk

        return Response()


def _cache_entries(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir() if not p.name.endswith(".lock"))


def test_download_happens_once_and_atomically(standin_nets, tmp_path, monkeypatch):
    snapshot, original = _write_snapshot(standin_nets, tmp_path, "edm", filename="served.pkl")
    final = cache_path_for_url(URL, tmp_path / "cache")
    served = _Served(snapshot.read_bytes(), final)
    monkeypatch.setattr(torch.hub, "urlopen", served)
    first = load_official(URL, cache_dir=tmp_path / "cache")
    second = load_official(URL, cache_dir=tmp_path / "cache")
    assert served.requests == [URL]
    assert final.read_bytes() == snapshot.read_bytes()
    assert _cache_entries(final) == [final.name]  # no temporary file left beside it
    x, sigma, _ = _inputs(original)
    with torch.no_grad():
        torch.testing.assert_close(first["ema"](x, sigma), second["ema"](x, sigma))


def test_interrupted_download_leaves_no_cache_entry(standin_nets, tmp_path, monkeypatch):
    snapshot, _ = _write_snapshot(standin_nets, tmp_path, "edm", filename="served.pkl")
    final = cache_path_for_url(URL, tmp_path / "cache")
    monkeypatch.setattr(torch.hub, "urlopen", _Served(snapshot.read_bytes(), final, break_after=100))
    with pytest.raises(OfficialCheckpointError, match="download failed.*connection reset"):
        load_official(URL, cache_dir=tmp_path / "cache")
    assert _cache_entries(final) == []

    monkeypatch.setattr(torch.hub, "urlopen", _Served(snapshot.read_bytes(), final))
    assert type(load_official(URL, cache_dir=tmp_path / "cache")["ema"]) is ours.EDMPrecond
    assert _cache_entries(final) == [final.name]


def test_official_snapshot_samples_through_the_sample_task(reference, tmp_path):
    """model=official: a reference-format snapshot of a digits-sized DDPM++ lands rows naming the file."""
    import functools

    from edm_lab.data import digits
    from edm_lab.nets.denoisers import network_denoiser
    from edm_lab.tasks.sample import run_sample
    from tests.conftest import net_preset
    from tests.test_configs import compose_cfg

    ours_net = network_denoiser(digits(limit=8), functools.partial(ours.EDMPrecond), net_preset("ddpmpp_small"), seed=7)
    spec = ours_net.build_spec["network"]
    case = {"network_kwargs": {"model_type": spec["model_type"], **spec["kwargs"]}, "precond_class": "EDMPrecond",
            "state_dict": ours_net.state_dict()}
    path = reference.dump(reference.snapshot(_golden_tree(reference, case), loss_fn=reference.nets.EDMLoss()),
                          tmp_path / "edm-digits-8x8-uncond-ddpmpp.pkl")
    cfg = compose_cfg(tmp_path, "model=official", f"model.path={path}", "data.limit=128", "metric=raw",
                      "nfe.steps=[2,4]", "num_samples=16", "batch_size=8", "metric.reference_solver=heun", "metric.reference_steps=8", "logger=csv",
                      "trainer.enable_progress_bar=false")
    rows = run_sample(cfg, {"data": "digits", "model": "official", "precond": "vp"})
    assert [r["nfe"] for r in rows] == [3, 7]
    for r in rows:
        assert r["checkpoint"] == str(path) and r["network"] == "SongUNet" and r["precond"] == "edm"
        assert "official(edm-digits-8x8-uncond-ddpmpp.pkl)" in r["label"] and math.isfinite(r["fd_raw"])
    loaded = load_official(path)["ema"]
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 5.0])
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma), ours_net(x, sigma))
    assert not reference.marker.exists()
