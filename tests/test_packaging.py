"""Every subpackage ships: pyproject lists packages explicitly (kernels/ is mapped), so a new
folder that is not listed would work in an editable install and be missing from a wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"advface_fast." + ".".join(p.parent.relative_to(REPO / "advface_fast").parts)
             for p in (REPO / "advface_fast").rglob("__init__.py")}
    found = {name.rstrip(".") for name in found} | {"advface_fast.kernels"}
    assert found - listed == set(), f"subpackages missing from pyproject's packages list: {sorted(found - listed)}"
    assert listed - found == set(), f"pyproject lists packages that do not exist: {sorted(listed - found)}"
