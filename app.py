"""Gradio app of the defect response agent: composition and launch only (no model state of its own).

The Chat tab and ``/chat`` are :mod:`ui.chat`; the tool tabs (Inspect, Search, Manuals,
Gallery, Products, History) and their endpoints are :mod:`ui.tabs`; every handler calls the
use cases of ``services/`` (or the agent), and every analysis is stored in the history.

Two roles (:mod:`ui.common`):

* **private** (default on your own machine): one app at ``/`` with every tab and endpoint.
* **public** (``DRA_PUBLIC=1``, on by default on a Hugging Face Space): anonymous visitors get
  ``/``: chat, inspect, search, read the manuals and the gallery, and their own history; no
  event that writes is registered at all (not callable by name or ``fn_index``). The full app
  (register, relabel, delete, ingest, fit) is mounted at ``/operator`` behind a login
  (``DRA_OPERATOR_USER`` / ``DRA_OPERATOR_PASSWORD``, a Space secret); without a password it is
  not mounted.

Either way the app serves MCP (``/gradio_api/mcp``) with the read-only tools ``inspect``,
``search``, ``manual`` and ``chat``, serves no file of the state directory by URL (results
are copied to Gradio's cache), and listens where the host says (``GRADIO_SERVER_NAME``,
``PORT`` / ``GRADIO_SERVER_PORT``; ``DRA_HOST`` / ``DRA_PORT`` win).

``python app.py`` on a fresh clone builds what is missing (sample data, PatchCore banks,
gallery, manuals) in the background while the page shows a start-up notice with the
progress, then serves every tool (``DRA_BUILD_ON_START=0``: serve only what is there).

Named API endpoints (``gradio_client``)::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    result, overlay = client.predict(handle_file("part.png"), "what should I do?", "auto (infer)",
                                     api_name="/chat")
    banner = client.predict(api_name="/models")   # {"agent", "image_embedder", ...}

``demo`` (the role this process serves at ``/``) is built at import time (Spaces style).
"""

from __future__ import annotations

import logging
import threading
import time

from core.settings import apply_runtime_env, get_settings

apply_runtime_env()  # entry point: offline / no-telemetry environment before gradio and torch load

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from core.catalog import products  # noqa: E402
from services.build import build_state  # noqa: E402
from services.container import get_services  # noqa: E402
from services.lock import MODEL_LOCK  # noqa: E402
from stores.banks import BankNotFoundError  # noqa: E402
from ui import chat, tabs  # noqa: E402
from ui.chat import AUTO_PRODUCT, banner_markdown  # noqa: E402
from ui.common import OPERATOR, PUBLIC, STARTUP, Role  # noqa: E402
from ui.limits import limit_queue_per_session  # noqa: E402

log = logging.getLogger("dra.app")

CSS = """
#banner {padding: 4px 8px;}
#startup {padding: 6px 10px; background: #fff6d5; border-radius: 6px;}
#chat .message img {max-height: 320px;}
"""


def _choices(kind: str, prods: list[str]) -> list[str]:
    return {"auto": [AUTO_PRODUCT] + prods, "all": [tabs.ALL] + prods, "blank": [""] + prods}.get(kind, prods)


def build_app(role: Role = OPERATOR) -> gr.Blocks:
    """The Blocks app of one role: banner, start-up notice, Chat tab, the tool tabs, API endpoints.

    Per-session values live in ``gr.State`` only; queue slots are described in :mod:`ui.tabs`.
    """
    s = get_settings()
    title = "Defect response agent" + (" (operator)" if role.writes and s.is_public else "")
    with gr.Blocks(title=title, delete_cache=(3600, 3600)) as demo:
        banner = gr.Markdown(banner_markdown(), elem_id="banner")
        notice = gr.Markdown(STARTUP.notice(), elem_id="startup", visible=not STARTUP.ready)
        with gr.Tabs(elem_id="tabs"):
            chat_parts = chat.build_chat_tab(banner, writes=role.writes)
            inspect_parts = tabs.build_inspect_tab()
            search_parts = tabs.build_search_tab()
            manual_parts = tabs.build_manuals_tab(role)
            gallery_parts = tabs.build_gallery_tab(role)
            product_parts = tabs.build_products_tab(role)
            history_parts = tabs.build_history_tab(role)

        chat.register_chat_api()
        tabs.register_api(role)

        # product lists refresh on page load (products fitted since start-up appear)
        dropdowns = [(chat_parts["product"], "auto")]
        for parts in (inspect_parts, search_parts, manual_parts, gallery_parts, history_parts):
            dropdowns += parts["dropdowns"]

        def on_load():
            """Page load: start-up notice, banner, product lists, manuals, products."""
            prods = products()
            manual_rows, manual_choices = tabs._manual_updates() if STARTUP.ready else ([], gr.update())
            return (gr.update(value=STARTUP.notice(), visible=not STARTUP.ready), banner_markdown(),
                    *[gr.update(choices=_choices(kind, prods)) for _, kind in dropdowns],
                    manual_rows, manual_choices, tabs._product_rows() if STARTUP.ready else [])

        outputs = [notice, banner, *[c for c, _ in dropdowns], manual_parts["table"], manual_parts["to_delete"],
                   product_parts["table"]]
        demo.load(on_load, None, outputs, api_visibility="private", queue=False)
        # while a first-start build runs, the notice follows it; the timer stops itself once ready
        timer = gr.Timer(3.0)

        def tick():
            return (*on_load(), gr.Timer(active=not STARTUP.ready))

        timer.tick(tick, None, [*outputs, timer], api_visibility="private", queue=False)
    demo.queue(default_concurrency_limit=2, max_size=64)
    limit_queue_per_session(demo, s.session_queue_limit)
    return demo


def warm_up() -> dict:
    """Load every store and model the endpoints use before serving; returns ``{"products", "skipped", "seconds"}``.

    Besides making the first request fast this is needed for correctness: building a
    PatchCore model traces its backbone with torch.fx, which patches ``torch.nn.Module.__call__``
    for the whole process while it runs. A bank that cannot be read is skipped with a warning
    (``skipped``); the other products keep working.
    """
    t0 = time.perf_counter()
    svc = get_services()
    prods, skipped = [], {}
    for p in svc.banks.products():
        try:
            svc.banks.get(p)  # loads (and traces) the bank's model
            prods.append(p)
        except BankNotFoundError as exc:
            skipped[p] = str(exc)
            log.warning("skipping product %s: %s", p, exc)
    if len(svc.image_index):
        with MODEL_LOCK.shared():
            svc.image_index.search(np.full((64, 64, 3), 128, np.uint8), k=1)
    svc.manuals.count()
    try:
        svc.manuals.query("warm up", k=1)
    except ValueError:
        pass
    svc.history.count()
    return {"products": prods, "skipped": skipped, "seconds": round(time.perf_counter() - t0, 1)}


def state_is_built() -> bool:
    """True when the state directory has sample data, a bank per sample product and a gallery (the log says so)."""
    s = get_settings()
    if not (s.data_dir / "manifest.json").is_file() or not (s.index_dir / "items.json").is_file():
        return False
    return all((s.banks_dir / p / "meta.json").is_file() for p in ("brick", "gravel", "grass"))


def start_build() -> threading.Thread | None:
    """Bring the state up to date in a background thread, then warm up (progress in :data:`ui.common.STARTUP`).

    :func:`services.build.build_state` is idempotent: on a built state it only checks (seconds); on a
    fresh clone or Space it builds everything; with a shared Chroma server it ingests the sample
    manuals there once. Requests meanwhile answer "still starting (n %)".

    Returns the thread, or None with ``DRA_BUILD_ON_START=0`` (then nothing is built).
    """
    s = get_settings()
    if not s.build_on_start:
        return None
    built = state_is_built()
    log.info("state %s: %s", s.state_dir, "checking" if built else "building what is missing (first start)")
    STARTUP.begin()

    def progress(f: float, msg: str) -> None:
        STARTUP.update(f, msg)
        if not built:
            log.info("build %5.1f%% %s", 100 * f, msg)

    def run() -> None:
        try:
            summary = build_state(get_services(), progress=progress)
            log.info("build done in %s s", summary.get("elapsed_s"))
            log.info("warm-up: %s", warm_up())
            STARTUP.finish()
        except Exception as exc:  # noqa: BLE001 - the page shows it; the process keeps serving
            log.exception("the start-up build failed")
            STARTUP.finish(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=run, name="dra-build", daemon=True)
    thread.start()
    return thread


def launch_kwargs() -> dict:
    """Arguments shared by ``launch`` and ``mount_gradio_app``: no state files by URL, upload limit, no SSR."""
    s = get_settings()
    return {
        "allowed_paths": [],  # results are copied to Gradio's cache (ui.common.servable): no state file by URL
        "max_file_size": f"{s.max_upload_mb:g}mb",
        "ssr_mode": False,
        "footer_links": ["api"],
    }


def operator_auth() -> tuple[str, str] | None:
    """``(user, password)`` of the operator login, or None when no password is configured."""
    s = get_settings()
    return (s.operator_user, s.operator_password) if s.operator_password else None


def create_server(public: gr.Blocks | None = None):
    """The public deployment: a FastAPI app with the public Blocks at ``/`` (MCP on) and, when an operator
    password is set, the operator Blocks at ``/operator`` behind its login.

    Args:
        public: the public Blocks (default: a fresh :func:`build_app` of the public role).
    """
    from fastapi import FastAPI

    server = FastAPI(title="Defect response agent")
    auth = operator_auth()
    if auth is not None:
        server = gr.mount_gradio_app(server, build_app(OPERATOR), path="/operator", auth=auth,
                                     auth_message="Operator login (register, relabel, delete, ingest, fit)",
                                     css=CSS, **launch_kwargs())
    return gr.mount_gradio_app(server, public or build_app(PUBLIC), path="/", mcp_server=True, css=CSS,
                               **launch_kwargs())


demo = build_app(PUBLIC if get_settings().is_public else OPERATOR)


def main() -> None:
    """Serve the app where the environment says; build a missing state first (in the background)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = get_settings()
    log.info("state %s · %s mode · listening on %s:%s", s.state_dir, "public" if s.is_public else "private",
             s.host, s.port)
    if start_build() is None:
        log.info("warm-up: %s", warm_up())
    if s.is_public:
        import uvicorn

        uvicorn.run(create_server(demo), host=s.host, port=s.port, log_level="info", timeout_graceful_shutdown=10)
    else:
        demo.launch(server_name=s.host, server_port=s.port, mcp_server=True, css=CSS, **launch_kwargs())


if __name__ == "__main__":
    main()
