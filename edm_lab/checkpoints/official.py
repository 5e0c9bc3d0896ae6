"""Safe import of the reference implementation's network snapshots (design-space.md, section 6).

The published files (`edm-cifar10-32x32-cond-vp.pkl`, `baseline-*.pkl`, and the
`network-snapshot-*.pkl` files of the reference training loop) are plain Python pickles of
`dict(ema=<network>, loss_fn=<loss>, augment_pipe=<augment pipe or None>, dataset_kwargs=<dict>)`.
Their classes are "persistent": every such object is pickled as the call
`torch_utils.persistence._reconstruct_persistent_obj(meta)` where `meta` is a dict
`{type: 'class', version, module_src, class_name, state}` and `module_src` is the full source
code of the module that defined the class. An ordinary `pickle.load` EXECUTES that source.

This module never does. It unpickles with `_RestrictedUnpickler`, whose `find_class` maps an
explicit allow-list of globals (`ALLOWED_GLOBALS`) to inert local stand-ins and refuses every
other global with `UnsafePickleError` before anything is called:

- the persistence reconstructor becomes `_PersistentRecord(class_name, version, state)`;
  `module_src` is dropped unread, and a `class_name` outside `KNOWN_CLASSES` is refused;
- tensors are rebuilt from their storages, whose embedded bytes are read with
  `torch.load(..., weights_only=True)` (torch's own restricted unpickler); a tensor's geometry
  (offset, size, stride) must lie inside the storage the file provides;
- `torch.nn.ModuleDict` becomes a record of its state; numpy scalars (the reference stores a
  few, e.g. `skip_scale = np.sqrt(0.5)`) are decoded with `struct`, without numpy.

Afterwards the records are converted: the `ema` preconditioner is rebuilt from this project's
classes (`edm_lab.nets.build_network` for the inner network, `edm_lab.design.precond` for the
preconditioner) using the reference's `init_kwargs`, and its tensors are loaded by their
state_dict names. The names and shapes are compared with those of the network the init_kwargs
describe on the meta device first (`edm_lab.nets.denoisers.check_spec_against`), so hostile
init_kwargs (huge channel counts) are refused before anything is allocated. Loss functions and
augment pipes become plain `{"class_name", "init_kwargs"}` dicts.
"""
from __future__ import annotations

import collections
import hashlib
import io
import math
import os
import pickle
import re
import struct
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.hub import download_url_to_file

from edm_lab.checkpoints.snapshot import as_sampling_model
from edm_lab.nets.denoisers import SpecError, build_denoiser, check_spec_against

__all__ = [
    "OfficialCheckpointError", "UnsafePickleError", "CheckpointFormatError",
    "ALLOWED_GLOBALS", "KNOWN_CLASSES", "load_official", "read_snapshot", "convert_snapshot", "cache_path_for_url",
]


# ----------------------------------------------------------------------------------------------
# Errors


class OfficialCheckpointError(Exception):
    """Base class of every error raised while importing a reference snapshot."""


class UnsafePickleError(OfficialCheckpointError):
    """The file asks for something outside the allow-list (a global, a class, an opcode use)."""

    def __init__(self, source: str, what: str, detail: str = "") -> None:
        self.source, self.what = source, what
        message = f"{source}: refused {what}"
        if detail:
            message += f" ({detail})"
        super().__init__(message + "; the file was not loaded and nothing in it was executed")


class CheckpointFormatError(OfficialCheckpointError, ValueError):
    """The file is not a readable reference snapshot (missing, truncated, wrong content)."""

    def __init__(self, source: str, detail: str) -> None:
        self.source = source
        super().__init__(f"{source}: {detail}")


# ----------------------------------------------------------------------------------------------
# What the reference's snapshots contain

PRECOND_CLASSES = ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond")
NETWORK_CLASSES = ("SongUNet", "DhariwalUNet")
LAYER_CLASSES = ("Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding")
LOSS_CLASSES = ("VPLoss", "VELoss", "EDMLoss")
AUGMENT_CLASSES = ("AugmentPipe",)
KNOWN_CLASSES = frozenset(PRECOND_CLASSES + NETWORK_CLASSES + LAYER_CLASSES + LOSS_CLASSES + AUGMENT_CLASSES)
"""Persistent class names (training/networks.py, loss.py, augment.py of the reference) we accept."""

# Constructor parameters of the reference classes, in order (to name positional init_args) and
# their defaults (the reference records only the arguments that were actually passed).
_PRECOND_SIGNATURES: dict[str, tuple[tuple[str, Any], ...]] = {
    "VPPrecond": (("beta_d", 19.9), ("beta_min", 0.1), ("M", 1000), ("epsilon_t", 1e-5), ("model_type", "SongUNet")),
    "VEPrecond": (("sigma_min", 0.02), ("sigma_max", 100.0), ("model_type", "SongUNet")),
    "iDDPMPrecond": (("C_1", 0.001), ("C_2", 0.008), ("M", 1000), ("model_type", "DhariwalUNet")),
    "EDMPrecond": (("sigma_min", 0.0), ("sigma_max", math.inf), ("sigma_data", 0.5), ("model_type", "DhariwalUNet")),
}
_PRECOND_COMMON = ("img_resolution", "img_channels", "label_dim", "use_fp16")
_OTHER_SIGNATURES: dict[str, tuple[str, ...]] = {
    "VPLoss": ("beta_d", "beta_min", "epsilon_t"),
    "VELoss": ("sigma_min", "sigma_max"),
    "EDMLoss": ("P_mean", "P_std", "sigma_data"),
    "AugmentPipe": ("p", "xflip", "yflip", "rotate_int", "translate_int", "translate_int_max", "scale",
                    "rotate_frac", "aniso", "translate_frac", "scale_std", "rotate_frac_max", "aniso_std",
                    "aniso_rotate_prob", "translate_frac_std", "brightness", "contrast", "lumaflip", "hue",
                    "saturation", "brightness_std", "contrast_std", "hue_max", "saturation_std"),
}


# ----------------------------------------------------------------------------------------------
# Inert stand-ins for the allowed globals


class _PersistentRecord:
    """What `_reconstruct_persistent_obj(meta)` yields here: the class name, version and state."""

    __slots__ = ("class_name", "version", "state")

    def __init__(self, class_name: str, version: Any, state: dict) -> None:
        self.class_name, self.version, self.state = class_name, version, state

    def __setstate__(self, state):  # BUILD on a record: never produced by the reference
        raise pickle.UnpicklingError("BUILD on a persistent object")

    def __repr__(self) -> str:
        return f"<persistent {self.class_name} (version {self.version})>"


class _ModuleDictRecord:
    """`torch.nn.ModuleDict` (used by SongUNet/DhariwalUNet for `enc`/`dec`): its pickled __dict__."""

    __slots__ = ("state",)

    def __setstate__(self, state) -> None:
        if getattr(self, "state", None) is not None or not isinstance(state, dict):
            raise pickle.UnpicklingError("unexpected state for torch.nn.ModuleDict")
        self.state = state

    class_name = "ModuleDict"


class _NumpyDType:
    """`numpy.dtype(spec, align, copy)` for the fixed-size numeric scalars the reference stores."""

    _CODES = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
              "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}
    __slots__ = ("spec", "byteorder")

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"unexpected numpy dtype state {state!r}")
        self.byteorder = state[1]

    def decode(self, data: bytes):
        code = self._CODES[self.spec]
        order = {"<": "<", ">": ">", "|": "<", "=": "="}[getattr(self, "byteorder", "=")]
        if struct.calcsize(order + code) != len(data):
            raise pickle.UnpicklingError(f"numpy scalar of dtype {self.spec} has {len(data)} bytes")
        value = struct.unpack(order + code, data)[0]
        return float(value) if self.spec[0] == "f" else value


class _Guarded:
    """A callable stand-in for an allowed global. BUILD on it is refused, so a file cannot set
    attributes (e.g. `__defaults__`) of the functions behind it."""

    __slots__ = ("_fn", "_name", "_source")

    def __init__(self, fn: Callable, name: str, source: str) -> None:
        self._fn, self._name, self._source = fn, name, source

    def __call__(self, *args):
        return self._fn(*args)

    def __setstate__(self, state):
        raise UnsafePickleError(self._source, f"setting state on global {self._name}")

    def __repr__(self) -> str:
        return f"<allowed global {self._name}>"


def _storage_from_bytes(source: str, data) -> torch.storage.TypedStorage:
    # The reference's torch pickles a storage as `torch.storage._load_from_bytes(bytes)`, whose
    # own implementation calls torch.load on the bytes with full unpickling; here the bytes
    # (a legacy torch.save stream) go through torch's restricted weights-only unpickler.
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("storage payload is not bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(source, "an embedded tensor storage", str(e).splitlines()[0][:300]) from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"embedded storage decodes to {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("tensor storage is not a storage")
    if not (isinstance(storage_offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(isinstance(v, int) for v in size + stride) and len(size) == len(stride)):
        raise pickle.UnpicklingError("malformed tensor geometry")
    if storage_offset < 0 or any(v < 0 for v in size + stride):
        raise pickle.UnpicklingError(f"tensor geometry with negative values (offset {storage_offset}, size {size}, "
                                     f"stride {stride})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage's deprecation: it is what the pickles hold
        available = storage.size()
        # Tensor.set_ silently GROWS a storage shorter than the geometry needs, which would load
        # uninitialised memory as weights: the extent must fit in the storage the file provides.
        # Overlapping geometries (stride 0) are refused too: a network's tensors never overlap, and
        # they would let a few stored values pass for a huge tensor.
        if 0 not in size:
            extent = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
            if extent > available or math.prod(size) > available:
                raise pickle.UnpicklingError(f"tensor of size {size} (offset {storage_offset}, stride {stride}) "
                                             f"needs {max(extent, math.prod(size))} elements, its storage has "
                                             f"{available}")
        tensor = torch.empty((0,), dtype=storage.dtype)
        tensor.set_(storage._untyped_storage, storage_offset, size, stride)
    # requires_grad, backward hooks (always empty when pickled) and metadata are not carried over:
    # the values are copied into freshly built modules anyway.
    return tensor


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter data is not a tensor")
    return nn.Parameter(data, requires_grad=False)


def _numpy_dtype(spec, align=False, copy=True):
    if not isinstance(spec, str) or spec not in _NumpyDType._CODES:
        raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not a plain numeric type")
    dtype = _NumpyDType()
    dtype.spec = spec
    return dtype


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("only numeric numpy scalars are supported")
    return dtype.decode(data)


ALLOWED_GLOBALS: dict[tuple[str, str], str] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"):
        "every persistent object (networks, layers, losses, augment pipe); mapped to an inert record",
    ("dnnlib.util", "EasyDict"): "attribute-dict of the reference's dnnlib; mapped to plain dict",
    ("collections", "OrderedDict"):
        "torch.nn.Module's _parameters/_buffers/_modules/hook tables, tensors' backward-hook argument",
    ("builtins", "set"): "Module._non_persistent_buffers_set in protocol-3 pickles (protocol 4+ has set opcodes)",
    ("torch._utils", "_rebuild_tensor_v2"): "every tensor (Tensor.__reduce_ex__); validated, rebuilt on CPU",
    ("torch._utils", "_rebuild_parameter"): "every nn.Parameter (Parameter.__reduce_ex__)",
    ("torch.storage", "_load_from_bytes"):
        "every tensor storage (TypedStorage.__reduce__); bytes read with torch.load(weights_only=True)",
    ("torch.nn.modules.container", "ModuleDict"): "the enc/dec containers of SongUNet/DhariwalUNet; inert record",
    ("numpy", "dtype"): "numpy scalars in module state (e.g. UNetBlock.skip_scale = np.sqrt(0.5)); numeric only",
    ("numpy.core.multiarray", "scalar"): "numpy scalars, numpy 1.x name; decoded with struct",
    ("numpy._core.multiarray", "scalar"): "numpy scalars, numpy 2.x name; decoded with struct",
}
"""Every global a snapshot may name, with the reason it is needed. Nothing else is resolved."""


class _RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only `ALLOWED_GLOBALS`, each to a local stand-in."""

    def __init__(self, file, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key not in ALLOWED_GLOBALS:
            raise UnsafePickleError(self.source, f"global {module}.{name}", "not on the allow-list of "
                                    "edm_lab.checkpoints.official.ALLOWED_GLOBALS")
        qualified = f"{module}.{name}"
        if key == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return _Guarded(self._reconstruct, qualified, self.source)
        if key == ("dnnlib.util", "EasyDict"):
            return dict
        if key == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if key == ("builtins", "set"):
            return set
        if key == ("torch.nn.modules.container", "ModuleDict"):
            return _ModuleDictRecord
        fn = {
            "_rebuild_tensor_v2": _rebuild_tensor,
            "_rebuild_parameter": _rebuild_parameter,
            "_load_from_bytes": lambda data: _storage_from_bytes(self.source, data),
            "dtype": _numpy_dtype,
            "scalar": _numpy_scalar,
        }[name]
        return _Guarded(fn, qualified, self.source)

    def persistent_load(self, pid):
        # Plain pickle.dump (what the reference uses) never writes persistent ids.
        raise UnsafePickleError(self.source, f"persistent id {str(pid)[:80]!r}",
                                "reference snapshots contain none; is this a torch.save file?")

    def _reconstruct(self, meta) -> _PersistentRecord:
        # The reference's reconstructor would exec(meta['module_src']); we never read it.
        if not isinstance(meta, dict):
            raise pickle.UnpicklingError("persistent object metadata is not a dict")
        class_name = meta.get("class_name")
        if meta.get("type") != "class" or not isinstance(class_name, str):
            raise UnsafePickleError(self.source, f"persistent object of type {meta.get('type')!r}",
                                    f"class_name {class_name!r}")
        if class_name not in KNOWN_CLASSES:
            raise UnsafePickleError(self.source, f"persistent class {class_name!r}",
                                    "not one of the reference's networks, layers, losses or augment pipe")
        state = meta.get("state")
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"state of persistent {class_name} is not a dict")
        return _PersistentRecord(class_name, meta.get("version"), state)


# ----------------------------------------------------------------------------------------------
# Reading a file


def read_snapshot(path: str | Path, source: str | None = None) -> dict:
    """Unpickle a snapshot with the restricted unpickler: a dict whose persistent objects are records.

    `source` names the file in error messages (defaults to `path`).
    """
    path = Path(path)
    source = str(source if source is not None else path)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file")
    if not path.is_file():
        raise CheckpointFormatError(source, "not a regular file")
    with open(path, "rb") as fh:
        head = fh.read(4)
        if not head:
            raise CheckpointFormatError(source, "the file is empty")
        if head.startswith(b"PK\x03\x04"):
            raise CheckpointFormatError(source, "a zip archive (a torch.save file?), not a reference snapshot pickle")
        fh.seek(0)
        try:
            data = _RestrictedUnpickler(fh, source).load()
        except UnsafePickleError:
            raise
        except (EOFError, pickle.UnpicklingError) as e:
            reason = str(e) or type(e).__name__
            if isinstance(e, EOFError) or "truncated" in reason:
                raise CheckpointFormatError(source, f"truncated or corrupt pickle ({reason})") from None
            raise CheckpointFormatError(source, f"not a readable reference snapshot pickle ({reason})") from None
        except RecursionError:
            raise CheckpointFormatError(source, "pickle nests too deeply") from None
        except Exception as e:  # noqa: BLE001 - garbage input raises anything from the pickle machine
            raise CheckpointFormatError(
                source, f"not a readable reference snapshot pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointFormatError(source, f"holds a {type(data).__name__}, expected the reference's "
                                            "dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...)")
    if data.get("ema") is None:
        raise CheckpointFormatError(source, f"has no 'ema' network (keys: {sorted(map(str, data))})")
    return data


# ----------------------------------------------------------------------------------------------
# Converting records


def _plain(value, source: str, where: str, depth: int = 0, copies: dict[int, Any] | None = None):
    """A copy of `value` made of plain Python containers and scalars only.

    A container the pickle references many times (its memo makes that cost a few bytes each) is
    copied once and shared, like its tensors, so the result is never larger than what was read.
    """
    if depth > 32:
        raise CheckpointFormatError(source, f"{where} nests too deeply")
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach()
    copies = {} if copies is None else copies
    if id(value) in copies:
        return copies[id(value)]
    if isinstance(value, dict):
        copy = {k: _plain(v, source, f"{where}[{k!r}]", depth + 1, copies) for k, v in value.items()}
    elif isinstance(value, (list, tuple, set)):
        items = [_plain(v, source, f"{where}[{i}]", depth + 1, copies) for i, v in enumerate(value)]
        copy = type(value)(items) if not isinstance(value, set) else set(items)
    else:
        kind = value.class_name if isinstance(value, (_PersistentRecord, _ModuleDictRecord)) else type(value).__name__
        raise CheckpointFormatError(source, f"{where} holds a {kind}, expected plain values")
    copies[id(value)] = copy
    return copy


def _init_kwargs(record: _PersistentRecord, param_names: tuple[str, ...], source: str) -> dict:
    """The constructor arguments the reference recorded, positional ones named by `param_names`."""
    kwargs = record.state.get("_init_kwargs", record.state.get("init_kwargs"))
    args = record.state.get("_init_args", record.state.get("init_args")) or ()
    if kwargs is None:
        raise CheckpointFormatError(source, f"the {record.class_name} carries no init_kwargs")
    if not isinstance(kwargs, dict) or not isinstance(args, (tuple, list)):
        raise CheckpointFormatError(source, f"malformed init arguments of {record.class_name}")
    if len(args) > len(param_names):
        raise CheckpointFormatError(source, f"{record.class_name} has {len(args)} positional init args")
    merged = dict(zip(param_names, args))
    merged.update(kwargs)
    return _plain(merged, source, f"{record.class_name}.init_kwargs")


def _plain_object(value, source: str, key: str, allowed: tuple[str, ...]):
    """Loss function / augment pipe -> {"class_name", "init_kwargs"} (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, _PersistentRecord) or value.class_name not in allowed:
        kind = getattr(value, "class_name", type(value).__name__)
        raise CheckpointFormatError(source, f"{key} is a {kind}, expected one of {', '.join(allowed)}")
    names = _OTHER_SIGNATURES[value.class_name]
    if value.state.get("_init_kwargs", value.state.get("init_kwargs")) is None:
        # Recording of init args switched off: the classes keep each argument as an attribute.
        kwargs = {name: value.state[name] for name in names if name in value.state}
        return {"class_name": value.class_name, "init_kwargs": _plain(kwargs, source, key)}
    return {"class_name": value.class_name, "init_kwargs": _init_kwargs(value, names, source)}


def _collect_tensors(node, prefix: str, out: dict[str, torch.Tensor], source: str, seen: set[int],
                     depth: int = 0) -> None:
    """Parameters and persistent buffers of a record tree, named as torch's state_dict names them."""
    where = prefix.rstrip(".") or "ema"
    if id(node) in seen or depth > 64:
        raise CheckpointFormatError(source, f"module tree is cyclic or too deep at {where}")
    seen.add(id(node))
    if isinstance(node, _PersistentRecord):
        if node.class_name not in PRECOND_CLASSES + NETWORK_CLASSES + LAYER_CLASSES:
            raise CheckpointFormatError(source, f"{where} is a {node.class_name}, not a network module")
    elif not isinstance(node, _ModuleDictRecord) or getattr(node, "state", None) is None:
        raise CheckpointFormatError(source, f"{where} is a {type(node).__name__}, not a network module")
    state = node.state
    skip = state.get("_non_persistent_buffers_set") or set()
    for table in ("_parameters", "_buffers"):
        entries = state.get(table)
        if not isinstance(entries, dict):
            raise CheckpointFormatError(source, f"{where} ({node.class_name}) has no {table} table")
        for name, tensor in entries.items():
            if tensor is None or (table == "_buffers" and name in skip):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointFormatError(source, f"{prefix}{name} is a {type(tensor).__name__}, not a tensor")
            out[prefix + name] = tensor
    children = state.get("_modules")
    if not isinstance(children, dict):
        raise CheckpointFormatError(source, f"{where} ({node.class_name}) has no _modules table")
    for name, child in children.items():
        if child is not None:
            _collect_tensors(child, f"{prefix}{name}.", out, source, seen, depth + 1)


# The reference's preconditioner classes and ours (see edm_lab.nets.denoisers.PRECONDS).
_OUR_PRECONDS = {"EDMPrecond": "EDMPrecond", "VPPrecond": "VPPrecond", "VEPrecond": "VEPrecond",
                 "iDDPMPrecond": "IDDPMPrecond"}


def _precond_spec(record: _PersistentRecord, source: str) -> dict[str, Any]:
    """The network spec (see `edm_lab.nets.denoisers`) of a reference preconditioner record."""
    signature = _PRECOND_SIGNATURES[record.class_name]
    kwargs = _init_kwargs(record, _PRECOND_COMMON + tuple(name for name, _ in signature), source)
    for required in ("img_resolution", "img_channels"):
        if required not in kwargs:
            raise CheckpointFormatError(source, f"the {record.class_name}'s init_kwargs lack {required}")
    img_resolution, img_channels = kwargs.pop("img_resolution"), kwargs.pop("img_channels")
    label_dim = kwargs.pop("label_dim", 0)
    use_fp16 = bool(kwargs.pop("use_fp16", False))
    noise = {name: kwargs.pop(name, default) for name, default in signature}
    model_type = noise.pop("model_type")
    model_kwargs = kwargs  # what is left goes to the network, as in the reference

    inner = record.state.get("_modules", {}).get("model")
    inner_name = getattr(inner, "class_name", None)
    if inner_name != model_type:
        raise CheckpointFormatError(source, f"the {record.class_name}'s model is a {inner_name}, "
                                            f"its init_kwargs say model_type={model_type!r}")
    out_channels = img_channels * (2 if record.class_name == "iDDPMPrecond" else 1)
    options = dict(noise, img_channels=img_channels, label_dim=label_dim)
    if use_fp16:  # only selects the compute dtype on CUDA; the stored weights are float32
        options["precision"] = "fp16"
    return {"precond": {"class": _OUR_PRECONDS[record.class_name], "kwargs": options},
            "network": {"model_type": model_type,
                        "kwargs": dict(img_resolution=img_resolution, in_channels=img_channels,
                                       out_channels=out_channels, label_dim=label_dim, **model_kwargs)}}


def convert_snapshot(data: dict, source: str) -> dict:
    """Records of `read_snapshot` -> our modules and plain dicts (see `load_official`)."""
    ema = data["ema"]
    if not isinstance(ema, _PersistentRecord) or ema.class_name not in PRECOND_CLASSES:
        kind = getattr(ema, "class_name", type(ema).__name__)
        raise CheckpointFormatError(source, f"'ema' is a {kind}, expected one of {', '.join(PRECOND_CLASSES)}")
    spec = _precond_spec(ema, source)
    tensors: dict[str, torch.Tensor] = {}
    _collect_tensors(ema, "", tensors, source, set())
    # Tensors may share a storage (pickle memoises it); all their values must be in the file, or a
    # few stored values could pass for a large network.
    stored = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    if needed > sum(stored.values()):
        raise CheckpointFormatError(source, f"the ema's tensors hold {needed:,} bytes of values but share storages "
                                            f"of {sum(stored.values()):,} bytes")
    # Compared on the meta device first: init_kwargs asking for a huge network allocate nothing.
    try:
        check_spec_against(spec, {name: tensor.shape for name, tensor in tensors.items()})
        module = build_denoiser(spec)
    except SpecError as e:
        raise CheckpointFormatError(source, f"the 'ema' {ema.class_name} (spec from its init_kwargs): {e}") from e
    module.load_state_dict({name: tensor.detach() for name, tensor in tensors.items()}, strict=True)
    module.eval().requires_grad_(False)
    dataset_kwargs = data.get("dataset_kwargs")
    return {
        "ema": module,
        "loss_fn": _plain_object(data.get("loss_fn"), source, "loss_fn", LOSS_CLASSES),
        "augment_pipe": _plain_object(data.get("augment_pipe"), source, "augment_pipe", AUGMENT_CLASSES),
        "dataset_kwargs": None if dataset_kwargs is None else _plain(dataset_kwargs, source, "dataset_kwargs"),
    }


# ----------------------------------------------------------------------------------------------
# Sources: local paths and (cached) URLs


def _default_cache_dir() -> Path:
    return Path(os.environ.get("EDM_LAB_CACHE_DIR", Path.home() / ".cache" / "edm_lab"))


def cache_path_for_url(url: str, cache_dir: str | Path | None = None) -> Path:
    """Where `url` is cached: `cache_dir/official/<sha256(url)[:16]>-<basename>`."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    basename = urllib.parse.unquote(Path(urllib.parse.urlparse(url).path).name) or "snapshot.pkl"
    basename = re.sub(r"[^A-Za-z0-9._-]", "_", basename).lstrip(".") or "snapshot.pkl"
    return Path(cache_dir if cache_dir is not None else _default_cache_dir()) / "official" / f"{digest}-{basename}"


def _fetch(url: str, cache_dir: str | Path | None) -> Path:
    """The cached copy of `url`, downloading it once (under a file lock).

    torch.hub downloads into a temporary file beside the cache entry and moves it there only once
    complete, so a failed or interrupted download leaves no entry behind.
    """
    from filelock import FileLock

    path = cache_path_for_url(url, cache_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():  # else another process finished it while we waited
            try:
                download_url_to_file(url, str(path), progress=True)
            except Exception as e:  # network errors come in many types
                raise OfficialCheckpointError(f"{url}: download failed ({type(e).__name__}: {e})") from e
    return path


def load_official(source: str | Path, cache_dir: str | Path | None = None) -> dict:
    """Load a reference EDM snapshot as this project's modules, without executing its code.

    `source` is a local path or an http(s) URL; a URL is downloaded once into
    `cache_dir/official/` (default `$EDM_LAB_CACHE_DIR` or `~/.cache/edm_lab`) and read from
    there afterwards. Returns `{"ema": <edm_lab.design.precond module, eval mode, no grad>,
    "loss_fn": {"class_name", "init_kwargs"} | None, "augment_pipe": same | None,
    "dataset_kwargs": dict | None, "source": str, "path": str (the local file read)}`.

    Raises `UnsafePickleError` for any global or persistent class outside the allow-list,
    `CheckpointFormatError` for unreadable / truncated / non-snapshot files and mismatched
    tensors, `FileNotFoundError` for a missing local file; every message names the file.
    """
    text = str(source)
    if urllib.parse.urlparse(text).scheme in ("http", "https"):
        path = _fetch(text, cache_dir)
        label = f"{text} (cached as {path})"
    else:
        path = Path(source).expanduser()
        label = str(path)
    data = read_snapshot(path, source=label)
    try:
        result = convert_snapshot(data, label)
    except OfficialCheckpointError:
        raise
    except Exception as e:  # a malformed record tree fails in many ways; name the file
        raise CheckpointFormatError(label, f"malformed snapshot ({type(e).__name__}: {e})") from e
    result["source"] = text
    result["path"] = str(path)
    return result


def official_denoiser(dataset, precond, path: str, cache_dir: str | Path | None = None,
                      precision: str | None = None) -> nn.Module:
    """Model factory for `model=official`: the snapshot's EMA network (its own preconditioner wins).

    `precision` (fp32 | fp16 | bf16) overrides the snapshot's use_fp16 on CUDA.
    """
    loaded = load_official(path, cache_dir)
    return as_sampling_model(loaded["ema"], dataset, f"snapshot {path}", path, loaded["path"], precision)
