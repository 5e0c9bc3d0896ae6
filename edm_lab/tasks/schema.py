"""Every config key's type and range, declared once and checked when the config is composed.

Checked before torch, Lightning or W&B are imported and before Hydra writes a job folder (see
`edm_lab.tasks.hydra_support.Preflight`), so a bad value costs about a second and one line:

    seed=1.5: expected an integer in [0, 4294967295]

Rules are keyed by the `_target_` a node instantiates (a `discretization` node's keys depend on
which discretization it is) or, for plain nodes, by the key's dotted path. A numeric key with no
rule is still refused when it is NaN or infinite; `tests/test_validation.py` checks that every key
of every option in `conf/` has a rule. The math modules keep their own guards for direct callers.
Besides single values this checks the relations between keys (sigma_min < sigma_max, seeds that
fit in 32 bits) and the work a sampling job asks for (`limits`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from edm_lab.bounds import SPEC_BOUNDS

SEED_RANGE = 2 ** 32  # numpy/torch generators take 32-bit seeds; the reference wraps seeds there


class ConfigError(CompactHydraException, ValueError):
    """A config value that cannot work, found before any work starts (Hydra prints it as one line)."""


# ------------------------------------------------------------------------------------------------
# Rules: each says what it allows, and whether a value is allowed.

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """Base rule: `allows(value)` and the text of what is allowed."""

    null: bool = False  # null (None) is allowed too

    def allows(self, value: Any) -> bool:
        return value is None if self.null else False

    def text(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return self.text() + (", or null" if self.null else "")


def _num(x: float) -> str:
    return str(x) if _is_int(x) else f"{x:g}"


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {_num(hi)}"
    return ""


@dataclass(frozen=True)
class Int(Rule):
    """An integer in [lo, hi] (bounds optional); booleans and whole floats such as 2.0 are refused."""

    lo: int | None = None
    hi: int | None = None

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.null
        return (_is_int(value) and (self.lo is None or value >= self.lo)
                and (self.hi is None or value <= self.hi))

    def text(self) -> str:
        return "an integer" + _interval(self.lo, self.hi, False, False)


@dataclass(frozen=True)
class Real(Rule):
    """A number in an interval; NaN never, infinity only with `inf=True` (and only where the bounds allow)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    inf: bool = False

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.null
        if not _is_number(value) or math.isnan(value) or (math.isinf(value) and not self.inf):
            return False
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def text(self) -> str:
        lo = self.gt if self.gt is not None else self.ge
        hi = self.lt if self.lt is not None else self.le
        kind = "a number" if self.inf else "a finite number"
        return kind + _interval(lo, hi, self.gt is not None, self.lt is not None) + (" (inf allowed)" if self.inf else "")


@dataclass(frozen=True)
class Bool(Rule):
    """true or false."""

    def allows(self, value: Any) -> bool:
        return isinstance(value, bool) or super().allows(value)

    def text(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class OneOf(Rule):
    """One of a fixed set of strings."""

    choices: tuple[str, ...] = ()

    def allows(self, value: Any) -> bool:
        return value in self.choices if value is not None else self.null

    def text(self) -> str:
        return "one of " + ", ".join(self.choices)


@dataclass(frozen=True)
class Text(Rule):
    """A non-empty string."""

    def allows(self, value: Any) -> bool:
        return (isinstance(value, str) and bool(value.strip())) or super().allows(value)

    def text(self) -> str:
        return "a non-empty string"


@dataclass(frozen=True)
class IntList(Rule):
    """A list of integers, each in [lo, hi], with a length in [min_len, max_len]."""

    lo: int | None = None
    hi: int | None = None
    min_len: int = 0
    max_len: int | None = None
    example: str = ""

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.null
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        item = Int(lo=self.lo, hi=self.hi)
        return (self.min_len <= len(value) <= (self.max_len if self.max_len is not None else len(value))
                and all(item.allows(v) for v in value))

    def text(self) -> str:
        if self.max_len is not None:
            size = f"{self.min_len}" if self.min_len == self.max_len else f"{self.min_len} to {self.max_len}"
        else:
            size = f"at least {self.min_len}" if self.min_len else ""
        hint = f", e.g. {self.example}" if self.example else ""
        return f"a list of {size + ' ' if size else ''}integers{_interval(self.lo, self.hi, False, False)}{hint}"


@dataclass(frozen=True)
class RealList(Rule):
    """A list of `length` numbers, each allowed by `item`."""

    item: Real = Real()
    length: int = 1

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.null
        return (isinstance(value, (list, tuple, ListConfig)) and len(value) == self.length
                and all(self.item.allows(v) for v in value))

    def text(self) -> str:
        return f"a list of {self.length} numbers, each {self.item.text()}"


@dataclass(frozen=True)
class ExistingPath(Rule):
    """A path to an existing file (or folder, with `folder=True`); with `url=True` also an http(s) URL."""

    folder: bool = False
    url: bool = False

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.null
        if not isinstance(value, str) or not value.strip():
            return False
        if self.url and value.startswith(("http://", "https://")):
            return True
        path = Path(value).expanduser()
        return path.exists() if self.folder else path.is_file()

    def text(self) -> str:
        what = "an existing file or folder" if self.folder else "an existing file"
        return what + (" or an http(s) URL" if self.url else "")


@dataclass(frozen=True)
class Node(Rule):
    """A sub-config checked under its own path (e.g. `model.net` is `${net}`)."""

    def allows(self, value: Any) -> bool:
        return True

    def text(self) -> str:
        return "a config node"


# ------------------------------------------------------------------------------------------------
# The schema. Shared pieces first.

PRECISION = OneOf(choices=("fp32", "fp16", "bf16"))
SEED = Int(lo=0, hi=SEED_RANGE - 1)
COUNT = Int(lo=1)
POSITIVE = Real(gt=0)
NON_NEGATIVE = Real(ge=0)
UNIT_OPEN = Real(gt=0, lt=1)
NOISE_RANGE = {"sigma_min": Real(gt=0, null=True), "sigma_max": Real(gt=0, null=True)}


def _bounded(name: str) -> Int:
    """An integer within the bounds a network spec allows (the checkpoint loaders check the same)."""
    lo, hi = SPEC_BOUNDS[name]
    return Int(lo=lo, hi=hi)


def _bounded_list(name: str, item: tuple[int, int] | None = None) -> IntList:
    lo, hi = SPEC_BOUNDS.get(f"{name}[i]", item or (1, None))
    min_len, max_len = SPEC_BOUNDS[f"len({name})"]
    return IntList(lo=lo, hi=hi, min_len=min_len, max_len=max_len)


RESOLUTION = SPEC_BOUNDS["img_resolution"]
IDDPM_TABLE = {"C_1": POSITIVE, "C_2": NON_NEGATIVE, "M": _bounded("M")}
VP_PARAMS = {"beta_d": POSITIVE, "beta_min": NON_NEGATIVE}

TARGETS: dict[str, dict[str, Rule]] = {
    # sampling axes
    "edm_lab.design.schedules.VPSchedule": {"epsilon_s": UNIT_OPEN},
    "edm_lab.design.schedules.VESchedule": {},
    "edm_lab.design.schedules.LinearSchedule": {},
    "edm_lab.design.schedules.VPScaling": {},
    "edm_lab.design.schedules.NoScaling": {},
    "edm_lab.design.discretizations.EDMDiscretization": {**NOISE_RANGE, "rho": POSITIVE},
    "edm_lab.design.discretizations.VPDiscretization": {**NOISE_RANGE, "epsilon_s": UNIT_OPEN},
    "edm_lab.design.discretizations.VEDiscretization": {**NOISE_RANGE},
    "edm_lab.design.discretizations.IDDPMDiscretization": {**NOISE_RANGE, **IDDPM_TABLE},
    "edm_lab.design.solvers.Euler": {},
    "edm_lab.design.solvers.SecondOrder": {"alpha": Real(gt=0, le=1)},
    "edm_lab.design.solvers.EulerMaruyama": {},
    "edm_lab.design.solvers.PredictorCorrector": {"snr": POSITIVE, "corrector_steps": Int(lo=0, hi=100)},
    "edm_lab.design.solvers.Ancestral": {},
    "edm_lab.design.solvers.RK45": {"rtol": POSITIVE, "atol": POSITIVE},
    "edm_lab.design.solvers.EulerAncestral": {"eta": Real(ge=0, le=1)},
    "edm_lab.design.solvers.DPMSolverPP": {"order": Int(lo=1, hi=3), "lower_order_final": Bool()},
    "edm_lab.design.solvers.DPMSolverPP2S": {"eta": Real(ge=0, le=1)},
    "edm_lab.design.solvers.DPMSolverPP2MSDE": {"eta": NON_NEGATIVE},
    "edm_lab.design.solvers.UniPC": {"order": Int(lo=1, hi=3), "variant": OneOf(choices=("bh1", "bh2")),
                                     "corrector": Bool(), "lower_order_final": Bool()},
    "edm_lab.design.solvers.IPNDM": {"order": Int(lo=1, hi=4)},
    "edm_lab.design.solvers.DEIS": {"order": Int(lo=1, hi=4)},
    "edm_lab.design.solvers.LMS": {"order": Int(lo=1, hi=4)},
    "edm_lab.design.discretizations.OptimizedDiscretization": {"path": ExistingPath()},
    "edm_lab.design.guidance.ClassifierFreeGuidance": {"weight": Real()},
    "edm_lab.design.guidance.Autoguidance": {"weight": Real(), "guide.path": ExistingPath(),
                                             "guide.precision": OneOf(choices=PRECISION.choices, null=True)},
    "edm_lab.design.churn.Churn": {"S_churn": NON_NEGATIVE, "S_min": NON_NEGATIVE,
                                   "S_max": Real(ge=0, inf=True), "S_noise": NON_NEGATIVE},
    # preconditioning
    "edm_lab.design.precond.EDMPrecond": {"sigma_min": NON_NEGATIVE, "sigma_max": Real(gt=0, inf=True),
                                          "sigma_data": POSITIVE, "precision": PRECISION},
    "edm_lab.design.precond.VPPrecond": {**VP_PARAMS, "M": _bounded("M"), "epsilon_t": UNIT_OPEN,
                                         "precision": PRECISION},
    "edm_lab.design.precond.VEPrecond": {"sigma_min": POSITIVE, "sigma_max": POSITIVE, "precision": PRECISION},
    "edm_lab.design.precond.IDDPMPrecond": {**IDDPM_TABLE, "precision": PRECISION},
    # training axes
    "edm_lab.design.losses.EDMNoise": {"P_mean": Real(), "P_std": POSITIVE},
    "edm_lab.design.losses.VPNoise": {**VP_PARAMS, "epsilon_t": UNIT_OPEN},
    "edm_lab.design.losses.VENoise": {"sigma_min": POSITIVE, "sigma_max": POSITIVE},
    "edm_lab.design.losses.IDDPMNoise": {**IDDPM_TABLE},
    "edm_lab.design.losses.EDMWeighting": {"sigma_data": POSITIVE},
    "edm_lab.design.losses.InverseSquareWeighting": {},
    "edm_lab.design.losses.UniformWeighting": {},
    "edm_lab.train.augment.AugmentPipe": {"p": Real(ge=0, le=1), **{k: NON_NEGATIVE for k in (
        "xflip", "yflip", "rotate_int", "translate_int", "translate_int_max", "scale", "rotate_frac", "aniso",
        "translate_frac", "scale_std", "rotate_frac_max", "aniso_std", "aniso_rotate_prob", "translate_frac_std",
        "brightness", "contrast", "lumaflip", "hue", "saturation", "brightness_std", "contrast_std", "hue_max",
        "saturation_std")}},
    # data sets
    "edm_lab.data.datasets.digits": {"resolution": _bounded("img_resolution"),
                                     "resize": OneOf(choices=("pad", "resize")),
                                     "limit": Int(lo=2, null=True)},
    "edm_lab.data.datasets.toy2d": {"num_samples": Int(lo=2), "num_modes": COUNT, "radius": NON_NEGATIVE,
                                    "std": POSITIVE, "seed": SEED},
    "edm_lab.data.image_folder.image_folder": {"path": ExistingPath(folder=True), "use_labels": Bool(),
                                               "resolution": Int(lo=RESOLUTION[0], hi=RESOLUTION[1], null=True),
                                               "max_size": Int(lo=1, null=True)},
    # models
    "edm_lab.nets.ideal.ideal_denoiser": {"chunk_size": COUNT},
    "edm_lab.nets.denoisers.network_denoiser": {"net": Node(), "seed": SEED, "class_conditional": Bool()},
    "edm_lab.checkpoints.snapshot.checkpoint_denoiser": {"path": ExistingPath(),
                                                         "precision": OneOf(choices=PRECISION.choices, null=True)},
    "edm_lab.checkpoints.official.official_denoiser": {"path": ExistingPath(url=True), "cache_dir": Text(),
                                                       "precision": OneOf(choices=PRECISION.choices, null=True)},
    # feature extractors (metric.extractor)
    "edm_lab.evaluate.features.classifier_features": {"feature_dim": Int(lo=1, hi=65536), "seed": SEED},
    "edm_lab.evaluate.features.inception_features": {"weights_path": ExistingPath(null=True), "download": Bool(),
                                                     "antialias": Bool()},
    "edm_lab.evaluate.features.raw_features": {},
}
"""Rules of the nodes that Hydra instantiates, by `_target_` (keys `_target_`/`_partial_` aside)."""

INSTANTIATED = ("schedule", "scaling", "discretization", "solver", "churn", "guidance", "precond", "noise",
                "weighting", "augment", "data", "model", "metric.extractor")
"""The nodes whose rules come from TARGETS."""

PATHS: dict[str, Rule] = {
    "seed": SEED,
    "num_samples": Int(lo=2),  # a Frechet distance needs a covariance
    "repeats": COUNT,
    "batch_size": COUNT,
    "force": Bool(),
    "export_images": Text(null=True),
    "seed_noise": OneOf(choices=("generators", "counter")),
    "fast.compile": Bool(),
    "fast.mode": OneOf(choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")),
    "fast.channels_last": Bool(),
    "fast.tf32": Bool(),
    "nfe.steps": IntList(lo=1, min_len=1, example="[9,18]"),
    "nfe.max_nfe": Int(lo=1, null=True),
    "limits.memory_gb": Real(gt=0, null=True),
    "limits.max_evaluations": Real(gt=0, null=True),
    "metric.name": Text(),
    "metric.reference": ExistingPath(null=True),
    "metric.batch_size": COUNT,
    "metric.sampler_error": Bool(),
    "metric.reference_steps": Int(lo=2),
    "metric.reference_solver": OneOf(choices=("rk45", "heun")),
    "metric.reference_tolerance": Real(gt=0),
    "metric.extractor": Node(),
    "metric.kid": Node(),  # null: off
    "metric.kid.subsets": COUNT,
    "metric.kid.subset_size": Int(lo=2),
    "task.name": OneOf(choices=("sample", "train", "fid_ref", "report", "paper", "learn_steps", "likelihood")),
    "task.num_images": COUNT,
    "task.dequantize": Bool(),
    "task.sigma_min": POSITIVE,
    "task.sigma_max": POSITIVE,
    "task.divergence": OneOf(choices=("auto", "exact", "hutchinson")),
    "task.probes": COUNT,
    "task.rtol": POSITIVE,
    "task.atol": POSITIVE,
    "task.train_seeds": COUNT,
    "task.heldout_seeds": COUNT,
    "task.iterations": COUNT,
    "task.gradient": OneOf(choices=("autograd", "smoothed")),
    "task.dest": Text(),
    "task.metrics": Node(),
    "task.sweep": Text(),
    "task.where": Text(null=True),
    "task.batch_size": COUNT,
    "task.batch_gpu": Int(lo=1, null=True),
    "task.duration_kimg": POSITIVE,
    "task.lr": POSITIVE,
    "task.betas": RealList(item=Real(ge=0, lt=1), length=2),
    "task.eps": POSITIVE,
    "task.grad_clip": Real(gt=0, null=True),
    "task.loss_scaling": POSITIVE,
    "task.lr_rampup_kimg": NON_NEGATIVE,
    "task.ema_halflife_kimg": POSITIVE,
    "task.ema_rampup_ratio": Real(gt=0, null=True),
    "task.log_kimg": POSITIVE,
    "task.snapshot_kimg": POSITIVE,
    "task.eval_kimg": NON_NEGATIVE,
    "task.eval_steps": COUNT,
    "task.class_conditional": Bool(),
    "task.xflip": Bool(),
    "task.num_workers": Int(lo=0),
    "task.resume": ExistingPath(null=True),
    "task.loss_profile": Bool(),
    "task.loss_profile_sigmas": Int(lo=2, hi=1000),
    "task.loss_profile_images": Int(lo=1),
    # network presets (conf/net), within the bounds a checkpoint's spec must keep (edm_lab/bounds.py)
    "net.model_type": OneOf(choices=("SongUNet", "DhariwalUNet")),
    "net.embedding_type": OneOf(choices=("positional", "fourier")),
    "net.encoder_type": OneOf(choices=("standard", "skip", "residual")),
    "net.decoder_type": OneOf(choices=("standard", "skip")),
    "net.channel_mult_noise": _bounded("channel_mult_noise"),
    "net.resample_filter": _bounded_list("resample_filter"),
    "net.model_channels": _bounded("model_channels"),
    "net.channel_mult": _bounded_list("channel_mult"),
    "net.channel_mult_emb": _bounded("channel_mult_emb"),
    "net.num_blocks": _bounded("num_blocks"),
    "net.attn_resolutions": _bounded_list("attn_resolutions", item=RESOLUTION),
    "net.augment_dim": _bounded("augment_dim"),
    "net.dropout": Real(ge=0, lt=1),
    "net.label_dropout": Real(ge=0, lt=1),  # not in the presets: +net.label_dropout=0.1 trains for classifier-free guidance
}
"""Rules of the plain keys, by dotted path; a key absent from the composed config is not checked."""

UNCHECKED = ("hydra", "paths", "trainer", "logger", "sweeps")
"""Nodes checked by their own libraries (Hydra, Lightning, W&B) or holding only paths and names."""


# ------------------------------------------------------------------------------------------------
# Checking.

def _show(value: Any) -> str:
    """A value as it would be typed on the command line."""
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return repr(value)


def _leaves(node: Any, prefix: str) -> Iterator[str]:
    """Dotted paths of the leaf keys under `node` (interpolations not followed into other nodes)."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}.{key}" if prefix else str(key)
            if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
                yield path
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                yield from _leaves(child, path)
            else:
                yield path


def _value(cfg: DictConfig, path: str) -> tuple[str, Any]:
    """('ok', value) | ('absent', None) | ('missing', None) for ???, | ('error', message) for a dotted path."""
    parent, _, key = path.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or key not in node.keys():  # `in node` is False for ??? values
        return "absent", None
    if OmegaConf.is_missing(node, key):
        return "missing", None
    try:
        value = node[key]
    except Exception as exc:  # noqa: BLE001 - an interpolation that cannot resolve
        return "error", str(exc).splitlines()[0]
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return "ok", value


def _rule_for(cfg: DictConfig, path: str) -> Rule | None:
    if path in PATHS:
        return PATHS[path]
    for node_path in INSTANTIATED:
        if path.startswith(node_path + "."):
            key = path[len(node_path) + 1:]
            target = OmegaConf.select(cfg, node_path + "._target_")
            return TARGETS.get(str(target), {}).get(key)
    return None


def _choice(cfg: DictConfig, group: str) -> str:
    choices = OmegaConf.select(cfg, "hydra.runtime.choices") if "hydra" in cfg else None
    chosen = choices.get(group) if choices is not None else None
    return f" ({group}={chosen})" if chosen else ""


def _paths(cfg: DictConfig, roots: list[str]) -> Iterator[str]:
    """The dotted paths of the values under `roots` (a scalar root is its own path), `_target_`s aside."""
    for root in roots:
        if isinstance(cfg._get_node(root), DictConfig) and not OmegaConf.is_interpolation(cfg, root):
            yield from (p for p in _leaves(cfg[root], root) if p.rsplit(".", 1)[-1] not in ("_target_", "_partial_"))
        else:
            yield root


def value_problems(cfg: DictConfig) -> list[str]:
    """One line per key whose value is not allowed (missing required values included)."""
    out = []
    for path in _paths(cfg, [k for k in cfg.keys() if k not in UNCHECKED]):
        status, value = _value(cfg, path)
        if status == "absent":
            continue
        if status == "missing":
            group = path.split(".")[0]
            out.append(f"{path} is required{_choice(cfg, group)}: set {path}=...")
            continue
        if status == "error":
            out.append(f"{path} cannot be resolved: {value}")
            continue
        rule = _rule_for(cfg, path)
        if rule is None:  # undeclared: at least no NaN or infinity
            rule = Real(null=True) if _is_number(value) else None
        if rule is not None and not rule.allows(value):
            out.append(f"{path}={_show(value)}: expected {rule.describe()}")
    return out


def _number(cfg: DictConfig, path: str) -> Any:
    status, value = _value(cfg, path)
    return value if status == "ok" else None


def relation_problems(cfg: DictConfig) -> list[str]:
    """Checks between keys: noise ranges ordered, churn only where it applies, one step count for an adaptive
    solver, fid_ref's destination, every sample seed below 2^32."""
    out = []
    for node in ("discretization", "precond", "noise"):
        lo, hi = _number(cfg, f"{node}.sigma_min"), _number(cfg, f"{node}.sigma_max")
        if _is_number(lo) and _is_number(hi) and not lo < hi:
            out.append(f"{node}.sigma_min={_show(lo)}: expected < {node}.sigma_max={_show(hi)}")
    churn, solver, noisy = _number(cfg, "churn.S_churn"), _solver(cfg), _solver_noisy(cfg)
    if (noisy or solver.adaptive or not solver.churn) and _is_number(churn) and churn > 0:
        kind = ("an adaptive" if solver.adaptive else "a stochastic" if noisy
                else "an exponential-integrator or multistep")
        out.append(f"churn.S_churn={_show(churn)}: expected 0 with {kind} solver{_choice(cfg, 'solver')}; "
                   "churn is Algorithm 2's, for the paper's Runge-Kutta ODE solvers (euler, heun, midpoint, "
                   "ralston): use churn=none")
    steps = _number(cfg, "nfe.steps")
    cap = _number(cfg, "nfe.max_nfe")
    if _is_number(cap) and isinstance(steps, list) and all(isinstance(n, int) for n in steps) and not any(
            nfe_estimate(cfg, n) <= cap for n in steps):
        out.append(f"nfe.max_nfe={_show(cap)}: no step count of nfe.steps={_show(steps)} fits within it with "
                   f"solver{_choice(cfg, 'solver')} ({_show([nfe_estimate(cfg, n) for n in steps])} evaluations)")
    if solver.adaptive and isinstance(steps, list) and len(set(steps)) > 1 and _number(cfg, "task.name") == "sample":
        out.append(f"nfe.steps={_show(steps)}: expected one step count with solver=rk45, which takes the steps its "
                   "tolerance asks for (the discretization fixes only where it starts and stops): e.g. nfe.steps=[18]")
    lo, hi = _number(cfg, "churn.S_min"), _number(cfg, "churn.S_max")
    if _is_number(lo) and _is_number(hi) and not lo <= hi:
        out.append(f"churn.S_min={_show(lo)}: expected <= churn.S_max={_show(hi)}")
    if _number(cfg, "task.name") == "fid_ref":
        dest = Path(str(_number(cfg, "task.dest"))).expanduser()
        if dest.suffix != ".npz" or dest.is_dir():
            out.append(f"task.dest={dest}: expected the path of a .npz file to write")
        if _number(cfg, "metric.reference") is not None:  # it would copy that file, not extract the data's
            out.append(f"metric.reference={_number(cfg, 'metric.reference')}: expected null with task=fid_ref "
                       "(it extracts the data set's own statistics)")
    seed, num_samples = _number(cfg, "seed"), _number(cfg, "num_samples")
    repeats = _number(cfg, "repeats") if _number(cfg, "task.name") == "sample" else 1
    if all(_is_int(v) for v in (seed, num_samples, repeats)) and seed + repeats * num_samples > SEED_RANGE:
        out.append(f"seed={seed}, num_samples={num_samples}, repeats={repeats}: the last sample's seed would be "
                   f"{seed + repeats * num_samples - 1}, over {SEED_RANGE - 1} (generator seeds are 32-bit)")
    return out


# ------------------------------------------------------------------------------------------------
# The work a sampling job asks for.

BYTES_PER_STEP = 64  # the sampler's noise-level grids and per-step temporaries (float64)
PAPER_SCALE = 3.3e8  # denoiser evaluations of the paper's largest sampling job (Figure 2 range, 50k x 3, Heun)


def machine_memory_bytes() -> int | None:
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _sample_elements(cfg: DictConfig) -> int:
    """Numbers per sample, from the data config alone (a lower bound where the files decide)."""
    target = str(OmegaConf.select(cfg, "data._target_"))
    resolution = _number(cfg, "data.resolution")
    if target.endswith(".toy2d"):
        return 2
    if target.endswith((".digits", ".image_folder")) and _is_int(resolution):
        return resolution ** 2  # one channel at least: an image folder's channels are known once it is read
    return 1


def _feature_dim(cfg: DictConfig, sample_elements: int) -> int:
    target = str(OmegaConf.select(cfg, "metric.extractor._target_"))
    if target.endswith(".classifier_features"):
        return int(_number(cfg, "metric.extractor.feature_dim") or 1)
    if target.endswith(".inception_features"):
        return 2048
    return sample_elements


@dataclass(frozen=True)
class SolverKind:
    """What the schema knows of a solver (edm_lab/design/solvers.py) before it runs."""

    evaluations: Any  # (N, solver config) -> denoiser evaluations per sample; an adaptive one's: a generous bound
    # Adds noise itself: no ODE solution to compare with, no churn. A bool, or (solver config) -> bool for a
    # solver whose noise a key turns off (eta = 0).
    stochastic: Any = False
    adaptive: bool = False  # takes its own steps: one step count, no churn
    churn: bool = True  # takes Algorithm 2's churn (the paper's Runge-Kutta solvers); the later samplers step
    # between the discretization's own levels, their history and stages sitting there

    def adds_noise(self, solver: Any) -> bool:
        """Whether the solver configured as `solver` (its config node) adds noise."""
        return bool(self.stochastic(solver if solver is not None else {})) if callable(self.stochastic) \
            else self.stochastic


def _eta(default: float) -> Any:
    """(solver config) -> whether its eta (`default` when unset) adds noise; a bad eta is the range check's."""
    def noisy(solver: Any) -> bool:
        eta = solver.get("eta", default)
        return not _is_number(eta) or eta != 0
    return noisy


SOLVERS: dict[str, SolverKind] = {
    "edm_lab.design.solvers.Euler": SolverKind(lambda n, solver: n),
    "edm_lab.design.solvers.SecondOrder": SolverKind(lambda n, solver: 2 * n - 1),
    "edm_lab.design.solvers.EulerMaruyama": SolverKind(lambda n, solver: n, stochastic=True),
    "edm_lab.design.solvers.PredictorCorrector": SolverKind(
        lambda n, solver: n * (solver.get("corrector_steps", 1) + 1), stochastic=True),
    "edm_lab.design.solvers.Ancestral": SolverKind(lambda n, solver: n, stochastic=True),
    # Unknown before it runs, and independent of N: a generous bound per sample, 1000 evaluations at tolerances
    # down to 1e-5 (the ODE's difficulty, not the tolerance, sets most of the cost there: up to 488 measured on
    # Gaussian, toy2d and digits data with the ideal denoiser under EDM, VP and VE axes, at 1e-3 as at 1e-5),
    # growing below as a 5th-order method's step count, tol^(-1/5), with tol = min(rtol, atol).
    "edm_lab.design.solvers.RK45": SolverKind(lambda n, solver: math.ceil(1000 * max(1.0, (1e-5 / min(
        solver.get("rtol", 1e-5), solver.get("atol", 1e-5))) ** 0.2)), adaptive=True),
    # The samplers after the paper: one evaluation per step (2S: two, but one for the last step, to sigma = 0).
    "edm_lab.design.solvers.EulerAncestral": SolverKind(lambda n, solver: n, stochastic=_eta(1.0), churn=False),
    "edm_lab.design.solvers.DPMSolverPP": SolverKind(lambda n, solver: n, churn=False),
    "edm_lab.design.solvers.DPMSolverPP2S": SolverKind(lambda n, solver: 2 * n - 1, stochastic=_eta(0.0), churn=False),
    "edm_lab.design.solvers.DPMSolverPP2MSDE": SolverKind(lambda n, solver: n, stochastic=_eta(1.0), churn=False),
    "edm_lab.design.solvers.UniPC": SolverKind(lambda n, solver: n, churn=False),
    "edm_lab.design.solvers.IPNDM": SolverKind(lambda n, solver: n, churn=False),
    "edm_lab.design.solvers.DEIS": SolverKind(lambda n, solver: n, churn=False),
    "edm_lab.design.solvers.LMS": SolverKind(lambda n, solver: n, churn=False),
}


def _solver(cfg: DictConfig) -> SolverKind:
    """What is known of the configured solver; an unknown one counts 2N and is taken as a fixed-step ODE solver."""
    return SOLVERS.get(str(OmegaConf.select(cfg, "solver._target_")), SolverKind(lambda n, solver: 2 * n))


def nfe_estimate(cfg: DictConfig, steps: int) -> int:
    """Denoiser evaluations of one sample at `steps` steps (an adaptive solver's: a generous bound); a guided
    denoiser evaluates two networks per call unless its weight leaves one alone (0 or 1)."""
    return _solver(cfg).evaluations(steps, _number(cfg, "solver") or {}) * guidance_factor(cfg)


def guidance_factor(cfg: DictConfig) -> int:
    """Network evaluations per denoiser call under the configured guidance (edm_lab/design/guidance.py)."""
    if not _number(cfg, "guidance._target_"):
        return 1
    return 1 if _number(cfg, "guidance.weight") in (0, 1) else 2


def stochastic(cfg: DictConfig) -> bool:
    """Whether the configured sampler adds fresh noise (its solver, or churn)."""
    return _solver_noisy(cfg) or (_number(cfg, "churn.S_churn") or 0) > 0


def _solver_noisy(cfg: DictConfig) -> bool:
    """Whether the configured solver adds noise itself."""
    return _solver(cfg).adds_noise(_number(cfg, "solver"))


# RK45's evaluations per sample for the reference solution at rtol = atol = 1e-5, from sigma = 80 to 0.002,
# measured: 236 with the digits' ideal denoiser, 223 and 695 with trained small DDPM++ networks of
# configs F (VP) and A (VE) on 8x8 digits. Other tolerances scale as a 5th-order method's step count,
# tol^(-1/5). A planning estimate (the progress bar's and the job's workload), not a bound.
RK45_REFERENCE_EVALUATIONS = 250.0


def reference_evaluations(cfg: DictConfig) -> float:
    """Denoiser evaluations of one sample's reference solution (of the guided denoiser, when guided): Heun's
    2N - 1 or RK45's estimate."""
    if (_number(cfg, "metric.reference_solver") or "heun") == "rk45":
        calls = RK45_REFERENCE_EVALUATIONS * (1e-5 / float(_number(cfg, "metric.reference_tolerance"))) ** 0.2
    else:
        calls = 2.0 * int(_number(cfg, "metric.reference_steps")) - 1
    return calls * guidance_factor(cfg)


@dataclass(frozen=True)
class Workload:
    """What a sampling job would cost: denoiser evaluations and peak host memory."""

    evaluations: float
    memory_bytes: float


def workload(cfg: DictConfig) -> Workload:
    """The denoiser evaluations and the host memory a sampling job needs (estimates from the config alone).

    Memory per sample: its features, its reference solution and the samples gathered for it
    (float64); per step: the noise-level grids.
    """
    steps = _steps_within(cfg)
    num_samples, repeats = int(_number(cfg, "num_samples")), int(_number(cfg, "repeats"))
    reference = reference_evaluations(cfg) if _number(cfg, "metric.sampler_error") and not stochastic(cfg) else 0
    evaluations = float(repeats) * num_samples * (sum(nfe_estimate(cfg, s) for s in steps) + reference)
    elements = _sample_elements(cfg)
    memory = 8.0 * num_samples * (_feature_dim(cfg, elements) + 3 * elements) + BYTES_PER_STEP * max(steps, default=0)
    return Workload(evaluations, memory)


def workload_problems(cfg: DictConfig) -> list[str]:
    """A sampling job larger than `limits` allows, with the estimate (only once its values are valid)."""
    if _number(cfg, "task.name") != "sample":
        return []
    work = workload(cfg)
    keys = f"num_samples={_number(cfg, 'num_samples')}, nfe.steps={_show(_number(cfg, 'nfe.steps'))}"
    out = []
    max_evaluations = _number(cfg, "limits.max_evaluations")
    if max_evaluations is not None and work.evaluations > max_evaluations:
        out.append(f"{keys}, repeats={_number(cfg, 'repeats')}: the job needs about {work.evaluations:.3g} denoiser "
                   f"evaluations (the paper's largest sampling job: {PAPER_SCALE:.2g}), over "
                   f"limits.max_evaluations={max_evaluations:g}; raise it on purpose to run this")
    limit_gb = _number(cfg, "limits.memory_gb")
    limit = limit_gb * 2 ** 30 if limit_gb is not None else machine_memory_bytes()
    if limit is not None and work.memory_bytes > limit:
        where = f"limits.memory_gb={limit_gb:g}" if limit_gb is not None else \
            f"this machine's {limit / 2 ** 30:.1f} GiB (limits.memory_gb=null)"
        out.append(f"{keys}: the job needs at least {work.memory_bytes / 2 ** 30:.3g} GiB of memory, over {where}; "
                   "set limits.memory_gb on purpose to run this")
    return out


def check(cfg: DictConfig, job: str = "") -> None:
    """Raise ConfigError listing every problem of `cfg` (values, then relations, then workload), one per line.

    `job` prefixes each line (the overrides of one job of a sweep).
    """
    problems = value_problems(cfg) or relation_problems(cfg) + workload_problems(cfg)
    if problems:
        prefix = f"{job}: " if job else ""
        raise ConfigError("\n".join(prefix + p for p in problems))


SAMPLING_NODES = ("data", "model", "precond", "schedule", "scaling", "discretization", "solver", "churn", "metric")
"""The nodes a sampling row's config hash covers (with num_samples and seed: edm_lab.tasks.sample.HASHED)."""


def normalize(cfg: DictConfig) -> None:
    """Whole numbers typed for real-valued keys of the sampling nodes become floats (`churn.S_churn=30` is the
    preset's 30.0), so a sampler hashes the same however its numbers were typed. Call after `check`.

    Limited to the nodes a sampling row's hash covers, whose shipped values are floats already; the
    training recipe's (task.*, augment.*) keep their typed form, so existing run hashes stay."""
    for path in _paths(cfg, [k for k in SAMPLING_NODES if k in cfg]):
        parent, _, key = path.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if OmegaConf.is_interpolation(node, key):
            continue
        status, value = _value(cfg, path)
        if status == "ok" and _is_int(value) and isinstance(_rule_for(cfg, path), Real):
            with open_dict(node), read_write(node):
                node[key] = float(value)


def steps(cfg: DictConfig) -> list[int]:
    """The sorted, de-duplicated step counts of `nfe.steps` whose NFE is within `nfe.max_nfe` (after `check`)."""
    return _steps_within(cfg)


def _steps_within(cfg: DictConfig) -> list[int]:
    cap = _number(cfg, "nfe.max_nfe")
    return sorted(set(int(s) for s in _number(cfg, "nfe.steps") if cap is None or nfe_estimate(cfg, int(s)) <= cap))

