"""Gradio app of the defect response agent: composition and launch only (no model state of its own).

The Chat tab and ``/chat`` are :mod:`ui.chat`; the tool tabs (Inspect, Search, Manuals,
Gallery, Products, History) and their endpoints (``/inspect``, ``/search``, ``/manual``,
``/register_defect``, ``/relabel_defect``, ``/delete_defect``, ``/gallery``,
``/ingest_manual``, ``/manuals``, ``/delete_manual``, ``/fit_product``, ``/history``,
``/history_run``, ``/export_manual``) are :mod:`ui.tabs`; every handler calls the use cases
of ``services/`` (or the agent), and every analysis is stored in the SQLite history.

Named API endpoints (``gradio_client``)::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    result, overlay = client.predict(handle_file("part.png"), "what should I do?", "auto (infer)",
                                     api_name="/chat")
    banner = client.predict(api_name="/models")   # {"agent", "image_embedder", ...}

Bad input makes an endpoint raise a ``gr.Error`` whose message says what is wrong
(``gradio_client`` re-raises it as ``AppError``); the server keeps serving.

Run ``python app.py`` to serve on ``Settings.host:Settings.port`` (127.0.0.1:7860).
``demo`` is built at import time (Hugging Face Spaces style).
"""

from __future__ import annotations

import logging
import time

from core.settings import apply_runtime_env, get_settings

apply_runtime_env()  # entry point: offline / no-telemetry environment before gradio and torch load

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from core.catalog import products  # noqa: E402
from services.container import get_services  # noqa: E402
from services.lock import MODEL_LOCK  # noqa: E402
from ui import tabs  # noqa: E402
from ui import chat  # noqa: E402
from ui.chat import AUTO_PRODUCT, banner_markdown  # noqa: E402

log = logging.getLogger("dra.app")


CSS = """
#banner {padding: 4px 8px;}
#chat .message img {max-height: 320px;}
"""


def build_app() -> gr.Blocks:
    """The Blocks app: banner, Chat tab (agent), the tool tabs of :mod:`ui.tabs`, API endpoints.

    Per-session values live in ``gr.State`` only; queue slots are described in :mod:`ui.tabs`.
    """
    with gr.Blocks(title="Defect response agent", delete_cache=(3600, 3600)) as demo:
        banner = gr.Markdown(banner_markdown(), elem_id="banner")
        with gr.Tabs(elem_id="tabs"):
            chat_parts = chat.build_chat_tab(banner)
            inspect_parts = tabs.build_inspect_tab()
            search_parts = tabs.build_search_tab()
            manual_parts = tabs.build_manuals_tab()
            gallery_parts = tabs.build_gallery_tab()
            product_parts = tabs.build_products_tab()
            history_parts = tabs.build_history_tab()

        chat.register_chat_api()
        tabs.register_api()

        # product lists refresh on page load (products fitted since start-up appear)
        product_lists = [chat_parts["product"], inspect_parts["product"], search_parts["product"],
                         manual_parts["product"], gallery_parts["product"], gallery_parts["new_product"],
                         gallery_parts["f_product"], history_parts["product"]]
        demo.load(_on_load, None,
                  [banner, *product_lists, manual_parts["table"], manual_parts["to_delete"],
                   product_parts["table"]],
                  api_visibility="private", queue=False)
    demo.queue(default_concurrency_limit=2, max_size=64)
    return demo


def _on_load():
    """Page load: fresh banner, product lists (products fitted since start-up), manuals, products."""
    prods = products()
    manual_rows, manual_choices = tabs._manual_updates()
    return (banner_markdown(), gr.update(choices=[AUTO_PRODUCT] + prods),
            gr.update(choices=[AUTO_PRODUCT] + prods), gr.update(choices=[tabs.ALL] + prods),
            gr.update(choices=[tabs.ALL] + prods), gr.update(choices=prods), gr.update(choices=[""] + prods),
            gr.update(choices=[tabs.ALL] + prods), gr.update(choices=[tabs.ALL] + prods),
            manual_rows, manual_choices, tabs._product_rows())


def warm_up() -> dict:
    """Load every store and model the endpoints use before serving; returns ``{"products", "seconds"}``.

    Besides making the first request fast this is needed for correctness: building a
    PatchCore model traces its backbone with torch.fx (torchvision
    ``create_feature_extractor``), which patches ``torch.nn.Module.__call__`` for the whole
    process while it runs, so a bank loaded lazily in one request thread breaks a
    forward pass running in another. Loading all banks up front avoids that race.
    """
    t0 = time.perf_counter()
    svc = get_services()
    prods = svc.banks.products()
    for p in prods:
        svc.banks.get(p)  # loads (and traces) the bank's model
    if len(svc.image_index):
        with MODEL_LOCK.shared():
            svc.image_index.search(np.full((64, 64, 3), 128, np.uint8), k=1)
    svc.manuals.count()
    try:
        svc.manuals.query("warm up", k=1)
    except ValueError:
        pass
    svc.history.count()
    return {"products": prods, "seconds": round(time.perf_counter() - t0, 1)}


def launch_kwargs() -> dict:
    """Arguments for ``demo.launch``: state directory allowed, upload limit, no SSR, no analytics."""
    s = get_settings()
    return {
        "allowed_paths": [str(s.state_dir)],
        "max_file_size": f"{s.max_upload_mb:g}mb",
        "ssr_mode": False,
        "css": CSS,
        "footer_links": ["api"],
    }


demo = build_app()


def main() -> None:
    """Serve the app on ``Settings.host:Settings.port``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = get_settings()
    log.info("warm-up: %s", warm_up())
    demo.launch(server_name=s.host, server_port=s.port, **launch_kwargs())


if __name__ == "__main__":
    main()
