"""Catalog and settings."""

from __future__ import annotations

import os

import pytest


def test_taxonomy_has_five_types_with_korean_names():
    from core.catalog import defect_info, defect_types

    assert defect_types() == ["scratch", "crack", "hole", "stain", "contamination"]
    assert [defect_info(d)["ko"] for d in defect_types()] == ["스크래치", "균열", "구멍", "얼룩", "이물질"]


@pytest.mark.parametrize("name,expected", [("Crack", "crack"), ("균열", "crack"), ("scratches", "scratch"),
                                           ("이물질", "contamination"), ("dent", None), ("", None)])
def test_normalize_defect(name, expected):
    from core.catalog import normalize_defect

    assert normalize_defect(name) == expected


def test_check_product(tmp_path, monkeypatch):
    from core.catalog import UnknownProductError, check_product
    from core.settings import get_settings

    monkeypatch.setenv("DRA_STATE_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        assert check_product(" Brick ") == "brick"
        assert check_product(None) is None
        with pytest.raises(UnknownProductError, match="known products: brick, gravel, grass"):
            check_product("teapot")
        (tmp_path / "banks" / "pump").mkdir(parents=True)
        assert check_product("pump") == "pump"
    finally:
        get_settings.cache_clear()


def test_settings_from_env(monkeypatch, tmp_path):
    from core.settings import Settings

    monkeypatch.setenv("DRA_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("DRA_AGENT_MAX_STEPS", "3")
    s = Settings.from_env()
    assert s.state_dir == tmp_path.resolve() and s.agent_max_steps == 3
    assert s.banks_dir == tmp_path.resolve() / "banks"
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert s.as_dict()["state_dir"] == str(tmp_path.resolve())


def test_unsupported_profile_names_the_setting(monkeypatch):
    from core.settings import Settings

    monkeypatch.setenv("DRA_PROFILE", "cloud")  # offline / hub / auto exist (issue 3)
    with pytest.raises(ValueError, match="DRA_PROFILE"):
        Settings.from_env()
