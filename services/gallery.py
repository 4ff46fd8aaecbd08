"""Gallery use cases: register a labelled defect photo, relabel or delete an item, list items.

Writes: an operator's actions (the public app never registers them for anonymous visitors).
"""

from __future__ import annotations

from core.catalog import defect_types, parse_defect, parse_product
from core.errors import InputError
from core.imageio import load_rgb
from services.container import Services
from services.lock import MODEL_LOCK

MAX_NOTE = 500


def register_defect(services: Services, image, product: str, defect_type: str, note: str = "") -> dict:
    """Add a labelled defect photo to the similar-defect gallery (searchable at once, persisted).

    Returns:
        ``{"id", "duplicate", "product", "defect_type", "note", "image"}`` (``duplicate``:
        the same pixels were already indexed; nothing changed).

    Raises:
        InputError: bad image, missing / unknown product or defect type.
    """
    rgb = load_rgb(image)
    prod = parse_product(product)
    if prod is None:
        raise InputError("choose the product of the defect image")
    defect = parse_defect(defect_type)
    if defect is None:
        raise InputError(f"choose the defect type ({', '.join(defect_types())})")
    with MODEL_LOCK.shared():
        return dict(services.image_index.register(rgb, prod, defect, note=str(note or "").strip()[:MAX_NOTE]))


def relabel_defect(services: Services, item_id: str, product: str | None = None, defect_type: str | None = None,
                   note: str | None = None) -> dict:
    """Change a gallery item's product, defect type and / or note; returns its row.

    Raises:
        InputError: no change asked, unknown id, unknown product / defect type.
    """
    item_id = str(item_id or "").strip()
    if not item_id:
        raise InputError("choose a gallery item")
    prod, defect = parse_product(product), parse_defect(defect_type)
    if prod is None and defect is None and note is None:
        raise InputError("give a product, a defect type and / or a note")
    try:
        with MODEL_LOCK.shared():  # a new product re-embeds the item
            return dict(services.image_index.relabel(
                item_id, product=prod, defect_type=defect,
                note=None if note is None else str(note).strip()[:MAX_NOTE]))
    except KeyError:
        raise InputError(f"no gallery item {item_id!r}") from None


def delete_defect(services: Services, item_id: str) -> dict:
    """Remove a gallery item; ``{"id", "deleted": True}``.

    Raises:
        InputError: unknown id.
    """
    item_id = str(item_id or "").strip()
    if not item_id or not services.image_index.delete(item_id):
        raise InputError(f"no gallery item {item_id!r}")
    return {"id": item_id, "deleted": True}


def gallery_items(services: Services, product: str | None = None, defect_type: str | None = None,
                  limit: int = 200) -> list[dict]:
    """Gallery rows ``[{"id", "product", "defect_type", "note", "image", "source"}]``, exact filters, newest last."""
    prod, defect = parse_product(product), parse_defect(defect_type)
    rows = [r for r in services.image_index.items()
            if (prod is None or r["product"] == prod) and (defect is None or r["defect_type"] == defect)]
    return rows[-int(limit):]
