"""Fixtures of the fault tests: the fault-injection plugin, installed into real runs only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

INJECTION_DIR = Path(__file__).resolve().parent / "injection"


@pytest.fixture(scope="session")
def fault_injection_env(tmp_path_factory):
    """Environment variables that install ``injection/areal_fault_injection.py`` as an areal
    plugin (an entry point in ``areal.plugins``) in the processes of a run, and only there."""
    site = tmp_path_factory.mktemp("fault-injection-site")
    info = site / "areal_fault_injection-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: areal-fault-injection\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text("[areal.plugins]\nfault_injection = areal_fault_injection\n")
    path = os.pathsep.join(p for p in (str(site), str(INJECTION_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}
