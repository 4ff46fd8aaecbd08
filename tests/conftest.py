"""Shared pytest fixtures.

``built_state`` builds the real sample data and every store (image index,
PatchCore banks, manual store) once per test session into a temporary state
directory, with the same code ``python cli.py build`` runs. Tests that only read
use it directly; tests that write copy it first (``writable_state``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.settings import apply_runtime_env  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
apply_runtime_env()  # before torch, transformers and gradio are imported by any test module

import pytest  # noqa: E402


def _use_state(path: Path) -> None:
    os.environ["DRA_STATE_DIR"] = str(path)
    from core.settings import get_settings

    get_settings.cache_clear()


@pytest.fixture(scope="session")
def built_state(tmp_path_factory) -> Path:
    """Path of a fully built state directory (sample data + all stores)."""
    root = tmp_path_factory.mktemp("state")
    seed = os.environ.get("DRA_TEST_SEED_STATE")
    if seed:
        # start from a copy of an already built state directory instead of building one
        # (run.sh test points it at the state its set-up step just built from scratch);
        # build_state() still fills in anything missing
        shutil.copytree(seed, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("models", "runs", "uploads"))
    _use_state(root)
    from services.build import build_state
    from services.container import get_services

    build_state(get_services())
    return root


@pytest.fixture()
def writable_state(built_state, tmp_path) -> Path:
    """A private copy of ``built_state`` that a test may modify."""
    dst = tmp_path / "state"
    shutil.copytree(built_state, dst)
    _use_state(dst)
    yield dst
    _use_state(built_state)
