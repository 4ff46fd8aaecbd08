"""Catalog: products and the fixed defect taxonomy (``data/taxonomy.json``).

The taxonomy file holds the five defect-type ids with English and Korean names;
products are the three sample products plus any product that has a fitted
PatchCore memory bank under the state directory (added later from the UI).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from core.errors import InputError
from core.settings import REPO_ROOT, get_settings

TAXONOMY_PATH = REPO_ROOT / "data" / "taxonomy.json"


class UnknownProductError(InputError):
    """A product id that has neither sample data nor a fitted memory bank."""


@lru_cache(maxsize=1)
def taxonomy() -> dict:
    """The parsed taxonomy file: ``{"defect_types": [...], "products": [...]}``."""
    return json.loads(Path(TAXONOMY_PATH).read_text(encoding="utf-8"))


def defect_types() -> list[str]:
    """Defect-type ids in taxonomy order: scratch, crack, hole, stain, contamination."""
    return [d["id"] for d in taxonomy()["defect_types"]]


def defect_info(defect_id: str) -> dict:
    """Taxonomy entry (id, en, ko, description) for a defect id; KeyError if unknown."""
    for d in taxonomy()["defect_types"]:
        if d["id"] == defect_id:
            return d
    raise KeyError(defect_id)


def normalize_defect(name: str | None) -> str | None:
    """Map an English or Korean defect name (any case, plural) to its id, or None."""
    if not name:
        return None
    key = name.strip().lower()
    for d in taxonomy()["defect_types"]:
        if key in (d["id"], d["en"].lower(), d["ko"], d["id"] + "s", d["id"] + "es"):
            return d["id"]
    return None


def product_info(product_id: str) -> dict:
    """Catalog entry for a product (sample products carry en/ko names and a description)."""
    for p in taxonomy()["products"]:
        if p["id"] == product_id:
            return p
    return {"id": product_id, "en": product_id, "ko": product_id, "description": "user-added product"}


def products() -> list[str]:
    """Known product ids: the sample products, then products with a fitted bank (sorted)."""
    ids = [p["id"] for p in taxonomy()["products"]]
    banks = get_settings().banks_dir
    if banks.is_dir():
        ids += sorted(p.name for p in banks.iterdir() if p.is_dir() and p.name not in ids and not p.name.startswith("."))
    return ids


def check_product(product_id: str | None) -> str | None:
    """Return the product id unchanged if known (None passes through).

    Raises:
        UnknownProductError: with the list of known products.
    """
    if product_id is None or product_id == "":
        return None
    pid = product_id.strip().lower()
    known = products()
    if pid not in known:
        raise UnknownProductError(f"unknown product {product_id!r}; known products: {', '.join(known)}")
    return pid


#: dropdown / API values that mean "no product given: infer it" (or "no filter")
NO_PRODUCT = ("", "auto", "auto (infer)", "none", "all", "any")


def parse_product(value: str | None) -> str | None:
    """A product argument from any edge (CLI flag, dropdown, API, tool call) -> product id or None.

    Empty, ``auto``, ``auto (infer)``, ``none``, ``all`` and ``any`` (any case) mean "not
    given" (None: infer it, or no filter).

    Raises:
        UnknownProductError: an id that is not in :func:`products`, with the known ones.
    """
    if value is None:
        return None
    v = str(value).strip()
    if v.lower() in NO_PRODUCT:
        return None
    return check_product(v)


def parse_defect(value: str | None) -> str | None:
    """A defect-type argument (id, English or Korean name) -> taxonomy id, or None when empty / ``all``.

    Raises:
        InputError: an unknown defect type, with the known ids.
    """
    if value is None:
        return None
    v = str(value).strip()
    if v.lower() in ("", "all", "any", "none", "auto", "auto (infer)"):
        return None
    d = normalize_defect(v)
    if d is None:
        raise InputError(f"unknown defect type {value!r}; one of {', '.join(defect_types())}")
    return d
