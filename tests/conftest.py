"""Shared fixtures: the reference golden vectors and a tiny Hydra config composer.

Golden files come from ../shared/reference (or $EDM_LAB_REFERENCE_DIR). Every golden test reads them
through `load_reference` / `reference_cases`, so that a missing file skips with its reason locally and
fails under CI, and a regenerated file with other cases yields other tests rather than wrong failures.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE_DIR = PROJECT_ROOT.parent / "shared" / "reference"
REFERENCE_DIR_ENV = "EDM_LAB_REFERENCE_DIR"

T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "golden: compares against a golden file of the reference implementation")


def reference_dir() -> Path:
    """The golden folder: $EDM_LAB_REFERENCE_DIR when set, else ../shared/reference beside the project."""
    override = os.environ.get(REFERENCE_DIR_ENV, "").strip()
    return Path(override) if override else DEFAULT_REFERENCE_DIR


def in_ci() -> bool:
    """Whether $CI asks for strictness (set, non-empty, and not 0/false/no/off)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def golden_unavailable(path: Path, reason: str) -> NoReturn:
    """Skip the test for a golden file that cannot be used, or fail it under CI (goldens are required there)."""
    message = f"golden vectors missing ({path}): {reason}"
    if in_ci():
        pytest.fail(f"{message} (CI is set, so the golden vectors are required)", pytrace=False)
    pytest.skip(message)


def _absence_reason(path: Path) -> str | None:
    if not path.parent.is_dir():
        return (f"the reference folder {path.parent} does not exist (check out shared/reference beside the project "
                f"or point ${REFERENCE_DIR_ENV} at it)")
    if not path.is_file():
        return f"{path.name} is not in the reference folder {path.parent}"
    return None


def load_reference(name: str, directory: Path | str | None = None) -> dict:
    """The golden file `name` of `directory` (default: `reference_dir()`); skips, or fails under CI, if absent."""
    path = Path(directory or reference_dir()) / name
    reason = _absence_reason(path)
    if reason is not None:
        golden_unavailable(path, reason)
    return torch.load(path, weights_only=True)


@dataclass(frozen=True)
class GoldenCase:
    """One case of a golden file, as a test parameter; `key` is None for the placeholder of an unusable file."""

    file: str
    key: int | str | None
    directory: Path
    problem: str | None = None  # why the file gave no cases at collection time

    @property
    def path(self) -> Path:
        return self.directory / self.file

    def load(self) -> tuple[dict, Any]:
        """(the whole golden file, this case), read afresh; skips or fails (under CI) when unusable."""
        if self.key is None:
            golden_unavailable(self.path, self.problem or "it gave no cases when the tests were collected")
        ref = load_reference(self.file, self.directory)
        cases = ref.get("cases")
        try:
            return ref, cases[self.key]
        except (KeyError, IndexError, TypeError):
            pytest.fail(f"case {self.key!r} of {self.path} vanished since collection: the file changed under the run",
                        pytrace=False)


def _compact(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def case_label(key: int | str, case: Any) -> str:
    """A readable test id: a dict key as is, else the case's config, else its string fields, else its index."""
    if isinstance(key, str):
        return key
    if isinstance(case, Mapping):
        config = case.get("config")
        if isinstance(config, Mapping) and config:
            # Named choices by value, numbers with their key ('heun-edm-linear-none-S_churn=40-num_steps=5').
            return "-".join(str(v) if isinstance(v, str) else f"{k}={_compact(v)}" for k, v in config.items())
        words = [v for v in case.values() if isinstance(v, str)]
        if words:
            return "-".join(words)
    return f"case{key}"


def reference_cases(name: str, ident: Callable[[int | str, Any], str] | None = None,
                    directory: Path | str | None = None) -> list:
    """One pytest.param (a GoldenCase, marked `golden`) per case of golden file `name`, read at collection.

    `ident(key, case)` names each test (default `case_label`; ids are made unique). A file that is absent
    or unreadable at collection gives one placeholder param, which skips (fails under CI) when run.
    """
    folder = Path(directory or reference_dir())
    path = folder / name
    problem = _absence_reason(path)
    if problem is None:
        try:
            cases = torch.load(path, weights_only=True)["cases"]
            keys = list(cases) if isinstance(cases, Mapping) else list(range(len(cases)))
        except Exception as err:  # noqa: BLE001 -- reported by the placeholder test, not as a collection error
            problem = f"it could not be read as a dict with 'cases': {type(err).__name__}: {err}"
        else:
            if not keys:
                problem = "it holds no cases"
    if problem is not None:
        return [pytest.param(GoldenCase(name, None, folder, problem), id=f"{Path(name).stem}-missing",
                             marks=pytest.mark.golden)]
    params, seen = [], set()
    for key in keys:
        try:
            label = (ident or case_label)(key, cases[key])
        except Exception:  # noqa: BLE001 -- an id is cosmetic: a case of unexpected shape must still become a test
            label = case_label(key, cases[key])
        if label in seen:
            label = f"{label}-{key}"
        seen.add(label)
        params.append(pytest.param(GoldenCase(name, key, folder), id=label, marks=pytest.mark.golden))
    return params


def counterpart(name: str, table: Mapping[str, T], kind: str, suffix: str = "") -> T:
    """table's entry for a name a golden file uses, matched case-insensitively without `suffix`.

    So 'iDDPMPrecond', 'IDDPMPrecond' and 'iddpm' are one preconditioner. A name with no counterpart
    fails the test naming it, rather than raising a bare KeyError.
    """
    normalised = name.lower()
    if suffix and normalised.endswith(suffix.lower()) and normalised != suffix.lower():
        normalised = normalised[:-len(suffix)]
    for key, value in table.items():
        if key.lower() == normalised:
            return value
    pytest.fail(f"the golden case's {kind} {name!r} has no counterpart in this project "
                f"(known: {', '.join(sorted(table))})", pytrace=False)


def precond_class(name: str) -> type:
    """This project's preconditioner class for a reference name ('EDMPrecond', 'iDDPMPrecond', 'vp', ...)."""
    from edm_lab.design.precond import EDMPrecond, IDDPMPrecond, VEPrecond, VPPrecond

    table = {"vp": VPPrecond, "ve": VEPrecond, "iddpm": IDDPMPrecond, "edm": EDMPrecond}
    return counterpart(name, table, "preconditioner", suffix="precond")


def net_preset(name: str) -> dict:
    """A network preset of conf/net/ (the single source of the paper's and the small sizes)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "net" / f"{name}.yaml"))


NET_PRESETS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "net").glob("*.yaml"))
