"""requirements/lock.txt: `make` installs exactly the versions the suite was last green with.

Under `make test`/`make check` (MLMKIT_LOCKED=1) every package of the lock is installed at its
locked version and torch at the Makefile's TORCH_SPEC; `make test-latest` (MLMKIT_LOCKED=0) runs
the suite on the newest versions instead, where only the lock's own consistency is checked.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"


def locked() -> dict[str, str]:
    """name -> version of every pin in the lock."""
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)", LOCK.read_text(), flags=re.M)
    return {canonicalize_name(name): v for name, v in pins}


def declared() -> list[Requirement]:
    """Every requirement pyproject.toml declares, the extras' included (not mlmkit's own)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values()
                                         for r in extra)]
    return [Requirement(r) for r in reqs if canonicalize_name(Requirement(r).name) != "mlmkit"]


def test_the_lock_pins_every_dependency_within_pyprojects_ranges():
    pins = locked()
    assert "torch" not in pins  # its build differs by machine: TORCH_SPEC installs it
    for req in declared():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req.name} is declared but not locked: run `make lock`"
        assert Version(pins[name]) in req.specifier, \
            f"the lock's {req.name}=={pins[name]} is outside pyproject's {req}"
    hashed = LOCK.read_text().count("--hash=sha256:")
    assert hashed >= len(pins)  # hash-checked installs: every pin has its hashes


@pytest.mark.skipif(os.environ.get("MLMKIT_LOCKED") != "1",
                    reason="runs under `make test`/`make check`, which install the lock "
                           "(MLMKIT_LOCKED=1); `make test-latest` tests the newest versions")
def test_the_environment_is_the_lock():
    pins = locked()
    wrong = {}
    for name, want in pins.items():
        try:
            got = version(name)
        except PackageNotFoundError:
            got = None
        if got is None or canonicalize_name(got) != canonicalize_name(want):
            wrong[name] = (want, got)
    assert not wrong, f"installed versions differ from the lock (want, got): {wrong}"
    spec = Requirement(os.environ.get("MLMKIT_TORCH_SPEC") or re.search(
        r"^TORCH_SPEC\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), flags=re.M)[1])
    assert Version(version("torch")).base_version in spec.specifier, (version("torch"), spec)
