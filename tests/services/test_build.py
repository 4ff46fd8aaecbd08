"""The build use case refits a bank whose configuration is no longer the product's (services/build.py)."""

from __future__ import annotations

from dataclasses import replace

from core.settings import PRODUCTS
from data.build import load_manifest
from models.patchcore import config as pc_config


def test_a_bank_of_another_configuration_is_refitted(built_state, monkeypatch):
    from services.build import _bank_matches
    from services.container import get_services

    services = get_services()
    manifest = load_manifest(services.settings.data_dir)
    assert all(_bank_matches(services, p, manifest) for p in PRODUCTS)
    assert all(services.banks.read_meta(p).get("features", "lite0") == "lite0" for p in PRODUCTS)
    # the product's tuned entry changes (as after an upgrade): its bank no longer matches, the others still do
    monkeypatch.setitem(pc_config.PRODUCT_CONFIGS, "grass", replace(pc_config.PRODUCT_CONFIGS["grass"],
                                                                      features="texture"))
    assert not _bank_matches(services, "grass", manifest)
    assert _bank_matches(services, "brick", manifest) and _bank_matches(services, "gravel", manifest)
