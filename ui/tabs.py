"""Gradio tabs (Inspect, Search, Manuals, Gallery, Products, History) and the JSON API endpoints.

Each builder must be called inside an open ``gr.Blocks`` context and takes the app's
:class:`ui.common.Role`: the public app registers no event that writes (not merely hidden:
an anonymous client cannot call it by name or by ``fn_index``), and its History shows only
the caller's own runs. Handlers call the use cases of ``services/``; :func:`ui.common.guarded`
turns :class:`core.errors.InputError` into ``gr.Error`` and hides other errors' internals.
Results carry no absolute server paths (:func:`ui.common.public_json`); pictures go out as
Gradio file outputs (:func:`ui.common.servable`). No handler keeps state outside its
arguments: per-session values live in ``gr.State``.

Queue slots (``concurrency_id``): ``agent`` 1 (the single LLM), ``vision`` 2
(PatchCore / embedder calls: inspect, search, register), ``manual`` 2 (queries),
``write`` 1 (manual ingestion, product fitting), so a slow agent run never blocks
inspection calls.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from agent.hyde import PassageWriter
from core.catalog import defect_types, products
from core.errors import InputError
from core.uploads import check_upload
from services import history as history_uc
from services import manuals as manuals_uc
from services.container import get_services
from services import gallery as gallery_uc
from services import products as products_uc
from services.inspect import inspect_image
from services.search import MODES as SEARCH_MODES
from services.search import search_similar
from stores.history import ANY
from ui.common import OPERATOR, Role, guarded, not_an_mcp_tool, owner_of, public_json, servable

log = logging.getLogger("dra.app")

VISION = {"concurrency_id": "vision", "concurrency_limit": 2}
MANUAL = {"concurrency_id": "manual", "concurrency_limit": 2}
WRITE = {"concurrency_id": "write", "concurrency_limit": 1}
ALL = "all"
AUTO = "auto (infer)"
SECTION_CHOICES = [ALL, "cause", "action", "prevention", "general"]


def _image(value, what: str = "image"):
    """An uploaded file value -> its checked path (size limit), or None when empty."""
    return None if value in (None, "") else check_upload(value, what)


def do_inspect(image, product) -> dict:
    """``/inspect`` and the Inspect tab: :func:`services.inspect.inspect_image` as JSON (server paths;
    the endpoints pass it through :func:`ui.common.public_json`). Pictures at display resolution."""
    if image in (None, ""):
        raise InputError("no image was attached: upload a photo of the part")
    svc = get_services()
    return inspect_image(svc, _image(image), product, display_max_side=svc.settings.display_max_side).to_json()


def do_search(image=None, text=None, mode="auto", product=None, defect_type=None, k=5) -> dict:
    """``/search`` and the Search tab: :func:`services.search.search_similar` as JSON."""
    return search_similar(get_services(), _image(image), text, mode=mode or "auto", product=product,
                          defect_type=defect_type, k=int(k or 5)).to_json()


def do_manual(query, product=None, defect_type=None, section=None, k=4, previews=True) -> dict:
    """``/manual`` and the Manuals tab: :func:`services.manuals.query_manual` as JSON."""
    svc = get_services()
    writer = PassageWriter(svc.settings) if svc.settings.manual_hyde else None
    return manuals_uc.query_manual(svc, query, product, defect_type, section, int(k or 4),
                                   previews=previews, write_passage=writer).to_json()


def _progress_cb(progress):
    return lambda f, m: progress(max(0.0, min(1.0, float(f))), desc=str(m))


def product_choices(with_auto: bool = False, with_all: bool = False) -> list[str]:
    """Product dropdown choices (fitted products included)."""
    return ([AUTO] if with_auto else []) + ([ALL] if with_all else []) + products()


def defect_choices(with_all: bool = False) -> list[str]:
    return ([ALL] if with_all else []) + defect_types()


def _file(path: str | None) -> str | None:
    return servable(path)


# ============================================================================ Inspect
@guarded
def ui_inspect(image, product):
    r = do_inspect(image, product)
    regions = [[i + 1, *reg["bbox"], round(100 * reg["area_frac"], 2), round(reg["peak"], 3)]
               for i, reg in enumerate(r["regions"])]
    margin = f" · margin {r['margin']:+.1f} normal spreads" if r.get("margin") is not None else ""
    unsure = (" (uncertain: near the threshold; re-take the photo or check by eye)" if r.get("uncertain") else "")
    verdict = (f"### {'🔴 ANOMALOUS' if r['is_anomalous'] else '🟢 NORMAL'}{unsure}\n"
               f"**{r['product']}** ({r['product_source']}) · score **{r['score']}** vs threshold "
               f"**{r['threshold']}**{margin} · {len(r['regions'])} region(s) · {r['elapsed_ms']:.0f} ms · "
               f"`{r['model']}`")
    return (verdict, _file(r["overlay"]), _file(r["heatmap"]), _file(r["comparison"]), regions,
            public_json(r))


def build_inspect_tab() -> dict:
    """Inspect tab: PatchCore scoring of one photo with its pictures."""
    with gr.Tab("Inspect", id="inspect", elem_id="tab-inspect"):
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(label="Photo of the part", file_types=["image"], type="filepath",
                                elem_id="inspect-image")
                product = gr.Dropdown(product_choices(with_auto=True), value=AUTO, label="Product",
                                      elem_id="inspect-product")
                run = gr.Button("Inspect", variant="primary", elem_id="inspect-run")
                verdict = gr.Markdown(elem_id="inspect-verdict")
            with gr.Column(scale=2):
                with gr.Row():
                    overlay = gr.Image(label="Overlay (regions boxed)", type="filepath", interactive=False,
                                       elem_id="inspect-overlay", height=300)
                    heatmap = gr.Image(label="Anomaly heat map", type="filepath", interactive=False,
                                       elem_id="inspect-heatmap", height=300)
                comparison = gr.Image(label="Input | nearest normal | overlay", type="filepath",
                                      interactive=False, elem_id="inspect-comparison", height=260)
                regions = gr.Dataframe(headers=["#", "x0", "y0", "x1", "y1", "area %", "peak"],
                                       label="Regions", interactive=False, elem_id="inspect-regions")
                raw = gr.JSON(label="Result", open=False)
        run.click(ui_inspect, [image, product], [verdict, overlay, heatmap, comparison, regions, raw],
                  api_visibility="private", **VISION)
    return {"dropdowns": [(product, "auto")]}


# ============================================================================ Search
@guarded
def ui_search(image, text, mode, product, defect, k):
    r = do_search(image, text, mode, None if product == ALL else product, None if defect == ALL else defect, k)
    items = [(servable(h["image"]), f"{h['defect_type'] or 'normal'} · {h['product']} · {h['score']:.2f} "
                                    f"({h.get('matched')})")
             for h in r["results"] if h.get("image") and Path(h["image"]).is_file()]
    msg = r.get("message") or f"{len(r['results'])} hit(s) · mode {r['mode']} · {r['elapsed_ms']:.0f} ms"
    return items, msg, public_json(r)


def build_search_tab() -> dict:
    """Search tab: similar past defects by photo, text or both."""
    with gr.Tab("Search", id="search", elem_id="tab-search"):
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(label="Query image (optional)", file_types=["image"], type="filepath",
                                elem_id="search-image")
                text = gr.Textbox(label="Text query (optional)", placeholder="e.g. crack on brick",
                                  elem_id="search-text")
                mode = gr.Radio(list(SEARCH_MODES), value="auto", label="Mode")
                product = gr.Dropdown(product_choices(with_all=True), value=ALL, label="Product")
                defect = gr.Dropdown(defect_choices(with_all=True), value=ALL, label="Defect type")
                k = gr.Slider(1, 20, value=8, step=1, label="Hits")
                run = gr.Button("Search", variant="primary", elem_id="search-run")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="search-status")
                hits = gr.Gallery(label="Similar defects", columns=4, height=460, elem_id="search-hits")
                raw = gr.JSON(label="Result", open=False)
        for trigger in (run.click, text.submit):
            trigger(ui_search, [image, text, mode, product, defect, k], [hits, status, raw],
                    api_visibility="private", **VISION)
    return {"dropdowns": [(product, "all")]}


# ============================================================================ Manuals
def _manual_rows() -> list[list]:
    return [[d["source"], d.get("product") or "", d.get("lang") or "", d.get("pages") or 0, d["chunks"],
             d.get("title") or ""] for d in manuals_uc.list_manuals(get_services())]


def _manual_updates():
    rows = _manual_rows()
    return rows, gr.update(choices=[r[0] for r in rows], value=None)


@guarded
def ui_ingest(pdf, product, replace_shipped=False, progress=gr.Progress()):
    r = manuals_uc.ingest_manual(get_services(), check_upload(pdf, "PDF"),
                                 None if product in (None, "", AUTO) else product,
                                 name=Path(str(getattr(pdf, "path", pdf) or "")).name, progress=_progress_cb(progress),
                                 replace_shipped=bool(replace_shipped))
    msg = f"✅ Ingested **{r['source']}**: {r['pages']} pages, {r['chunks']} chunks, product `{r['product']}`"
    return (msg, *_manual_updates())


@guarded
def ui_delete_manual(source, replace_shipped=False):
    r = manuals_uc.delete_manual(get_services(), source, replace_shipped=bool(replace_shipped))
    return (f"🗑️ Deleted **{r['source']}** ({r['removed_chunks']} chunks)", *_manual_updates())


@guarded
def ui_manual_query(query, product, defect, section, k):
    r = do_manual(query, None if product == ALL else product, None if defect == ALL else defect,
                  None if section == ALL else section, k)
    previews = [(servable(h["preview"]), f"{h['source']} p.{h['page']} · {h['section']} · {h['score']:.2f}")
                for h in r["results"] if h.get("preview") and Path(h["preview"]).is_file()]
    md = "\n\n".join(f"**[{h['source']} p.{h['page']}]** · {h['section']} · score {h['score']:.2f}\n\n"
                     f"> {' '.join(h['text'].split())[:600]}" for h in r["results"]) or "_no passages found_"
    if r.get("hyde", {}).get("passage"):
        written = " ".join(str(r["hyde"]["passage"]).split())[:300]
        md = (f"_Ranked by the question and a search passage {r['hyde']['model']} wrote for it (HyDE; a query, "
              f"not a claim from any manual): “{written}”_\n\n" + md)
    return md, previews, r


def build_manuals_tab(role: Role = OPERATOR) -> dict:
    """Manuals tab: ask the manuals, the stored list; ingest / delete only for operators."""
    with gr.Tab("Manuals", id="manuals", elem_id="tab-manuals"):
        with gr.Row():
            with gr.Column(scale=1):
                if role.writes:
                    gr.Markdown("#### Add a manual (PDF with a text layer)")
                    pdf = gr.File(label="PDF", file_types=[".pdf"], type="filepath", elem_id="manual-pdf")
                    product = gr.Dropdown([AUTO] + products(), value=AUTO,
                                          label="Product (auto: from the PDF metadata)", allow_custom_value=True)
                    shipped = gr.Checkbox(False, label="Replace or delete a shipped manual of the same name",
                                          elem_id="manual-replace-shipped")
                    ingest = gr.Button("Ingest", variant="primary", elem_id="manual-ingest")
                status = gr.Markdown(elem_id="manual-status")
                gr.Markdown("#### Stored manuals")
                table = gr.Dataframe(headers=["source", "product", "lang", "pages", "chunks", "title"],
                                     interactive=False, elem_id="manual-list")
                with gr.Row(visible=role.writes):
                    to_delete = gr.Dropdown([], label="Manual", scale=3)
                    delete = gr.Button("Delete", variant="stop", scale=1, visible=role.writes)
            with gr.Column(scale=2):
                gr.Markdown("#### Ask the manuals")
                query = gr.Textbox(label="Query", placeholder="crack cause and immediate action",
                                   elem_id="manual-query")
                with gr.Row():
                    q_product = gr.Dropdown(product_choices(with_all=True), value=ALL, label="Product")
                    q_defect = gr.Dropdown(defect_choices(with_all=True), value=ALL, label="Defect type")
                    q_section = gr.Dropdown(SECTION_CHOICES, value=ALL, label="Section")
                    q_k = gr.Slider(1, 10, value=4, step=1, label="Passages")
                ask = gr.Button("Search manuals", variant="primary", elem_id="manual-ask")
                passages = gr.Markdown(elem_id="manual-passages")
                previews = gr.Gallery(label="Page previews", columns=2, height=520, elem_id="manual-previews")
                raw = gr.JSON(label="Result", open=False)
        if role.writes:
            ingest.click(ui_ingest, [pdf, product, shipped], [status, table, to_delete], api_visibility="private",
                         **WRITE)
            delete.click(ui_delete_manual, [to_delete, shipped], [status, table, to_delete], api_visibility="private",
                         **WRITE)
        for trigger in (ask.click, query.submit):
            trigger(ui_manual_query, [query, q_product, q_defect, q_section, q_k], [passages, previews, raw],
                    api_visibility="private", **MANUAL)
    return {"table": table, "to_delete": to_delete, "dropdowns": [(q_product, "all")]
            + ([(product, "auto")] if role.writes else [])}


# ============================================================================ Gallery
def _gallery_view(product, defect):
    rows = [r for r in gallery_uc.gallery_items(get_services(), None if product == ALL else product,
                                     None if defect == ALL else defect)
            if r.get("image") and Path(r["image"]).is_file()]  # thumbnails and rows stay index-aligned
    items = [(servable(r["image"]), f"{r['id']} · {r['defect_type'] or 'normal'} · {r['product']}") for r in rows]
    return items, [{"id": r["id"]} for r in rows]


@guarded
def ui_gallery(product, defect):
    items, rows = _gallery_view(product, defect)
    return items, rows, f"{len(rows)} item(s)" if rows else "The gallery is empty for these filters."


@guarded
def ui_register(image, product, defect, note, f_product, f_defect):
    r = gallery_uc.register_defect(get_services(), _image(image), product, defect, note)
    items, rows = _gallery_view(f_product, f_defect)
    dup = " (already in the gallery: unchanged)" if r.get("duplicate") else ""
    return f"✅ Registered `{r['id']}`{dup}: {r['defect_type']} · {r['product']}", items, rows, r["id"]


@guarded
def ui_relabel(item_id, product, defect, note, f_product, f_defect):
    r = gallery_uc.relabel_defect(get_services(), item_id, product or None, defect or None, note if note else None)
    items, rows = _gallery_view(f_product, f_defect)
    return f"✏️ `{r['id']}` is now {r['defect_type']} · {r['product']}", items, rows


@guarded
def ui_delete_item(item_id, f_product, f_defect):
    gallery_uc.delete_defect(get_services(), item_id)
    items, rows = _gallery_view(f_product, f_defect)
    return f"🗑️ Deleted `{item_id}`", items, rows, ""


def _select_item(rows, evt: gr.SelectData):
    if rows is None or evt is None or evt.index is None:
        return gr.update()
    i = evt.index if isinstance(evt.index, int) else evt.index[0]
    try:
        return rows[i]["id"]
    except (IndexError, KeyError, TypeError):
        return gr.update()


def build_gallery_tab(role: Role = OPERATOR) -> dict:
    """Gallery tab: browse the labelled gallery; register / relabel / delete only for operators."""
    dropdowns = []
    with gr.Tab("Gallery", id="gallery", elem_id="tab-gallery"):
        rows = gr.State([])  # per session: the rows behind the gallery thumbnails
        with gr.Row():
            if role.writes:
                with gr.Column(scale=1):
                    gr.Markdown("#### Register a defect image")
                    image = gr.File(label="Defect image", file_types=["image"], type="filepath",
                                    elem_id="gallery-image")
                    product = gr.Dropdown(products(), label="Product", elem_id="gallery-product")
                    defect = gr.Dropdown(defect_types(), label="Defect type", elem_id="gallery-defect")
                    note = gr.Textbox(label="Note", placeholder="line 3, shift B")
                    register = gr.Button("Register", variant="primary", elem_id="gallery-register")
                    gr.Markdown("#### Relabel / delete the selected item")
                    item_id = gr.Textbox(label="Item id (click a thumbnail)", elem_id="gallery-item")
                    with gr.Row():
                        new_product = gr.Dropdown([""] + products(), value="", label="New product")
                        new_defect = gr.Dropdown([""] + defect_types(), value="", label="New defect type")
                    new_note = gr.Textbox(label="New note (empty: unchanged)")
                    with gr.Row():
                        relabel = gr.Button("Relabel")
                        delete = gr.Button("Delete", variant="stop")
                    dropdowns += [(product, "plain"), (new_product, "blank")]
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="gallery-status")
                with gr.Row():
                    f_product = gr.Dropdown(product_choices(with_all=True), value=ALL, label="Product")
                    f_defect = gr.Dropdown(defect_choices(with_all=True), value=ALL, label="Defect type")
                    show = gr.Button("Show", elem_id="gallery-show")
                thumbs = gr.Gallery(label="Gallery", columns=6, height=560, elem_id="gallery-thumbs")
        dropdowns.append((f_product, "all"))
        show.click(ui_gallery, [f_product, f_defect], [thumbs, rows, status], api_visibility="private")
        if role.writes:
            thumbs.select(_select_item, [rows], [item_id], api_visibility="private", queue=False)
            register.click(ui_register, [image, product, defect, note, f_product, f_defect],
                           [status, thumbs, rows, item_id], api_visibility="private", **VISION)
            relabel.click(ui_relabel, [item_id, new_product, new_defect, new_note, f_product, f_defect],
                          [status, thumbs, rows], api_visibility="private", **VISION)
            delete.click(ui_delete_item, [item_id, f_product, f_defect], [status, thumbs, rows, item_id],
                         api_visibility="private", **VISION)
    return {"dropdowns": dropdowns}


def _yes(value) -> bool:
    """An API flag given as text: "yes" / "true" / "1" / "on" (any case) is True."""
    return str(value or "").strip().lower() in ("yes", "true", "1", "on")


def _scale(value) -> float | None:
    """A pixel scale from the UI or the API ("" / None / 0: the default); InputError when not a number."""
    if value in (None, ""):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"pixel scale must be a number, got {value!r}") from None
    return v or None


# ============================================================================ Products
def _product_rows() -> list[list]:
    return products_uc.product_rows(get_services())


@guarded
def ui_fit(name, files, symmetry, pixel_scale=1.0, replace_shipped=False, progress=gr.Progress()):
    r = products_uc.fit_product(get_services(), name, files, progress=_progress_cb(progress), symmetry=symmetry,
                                pixel_scale=_scale(pixel_scale), replace_shipped=bool(replace_shipped))
    skipped = f" · skipped {len(r['skipped'])} file(s): {'; '.join(r['skipped'][:3])}" if r["skipped"] else ""
    msg = (f"✅ **{r['product']}** fitted on {r['n_train']} images ({r['n_val']} for calibration): bank "
           f"{r['bank_size']} patches, {r['views']} view(s) per inspection, threshold {r['threshold']:.3f}, "
           f"{r['fit_s']:.1f} s{skipped}. "
           "It is now available in every product list and to the agent.")
    return msg, _product_rows(), r


def build_products_tab(role: Role = OPERATOR) -> dict:
    """Products tab: the fitted products; adding / refitting one only for operators."""
    with gr.Tab("Products", id="products", elem_id="tab-products"):
        with gr.Row():
            with gr.Column(scale=1, visible=role.writes):
                gr.Markdown("#### Add a product from normal (defect-free) images\n"
                            "Upload at least 4 images (more is better: ~20 % are kept for threshold "
                            "calibration), as files or one zip archive.")
                name = gr.Textbox(label="Product id", placeholder="e.g. tile-b", elem_id="product-name")
                files = gr.File(label="Normal images or zip", file_count="multiple", type="filepath",
                                file_types=["image", ".zip"], elem_id="product-files")
                symmetry = gr.Radio(
                    [("none: orientation matters", "none"), ("left-right mirror", "mirror"),
                     ("mirrors both ways (and 180° turn)", "flips"), ("any 90° turn or mirror (textures)", "turns")],
                    value="none", label="The part looks the same when ...", elem_id="product-symmetry",
                    info="Only real symmetries: the bank also holds those views of the normals and each "
                         "inspection averages them (more accurate; one backbone pass per view).")
                with gr.Row():
                    pixel_scale = gr.Number(1.0, label="Pixel scale", minimum=0.05, maximum=4, step=0.05,
                                            elem_id="product-pixel-scale",
                                            info="Model pixels per photo pixel: 1 scores photos at the camera's "
                                                 "native scale; 0.5 halves a high-resolution camera's photos. "
                                                 "Recorded with the product; use the same camera set-up.")
                    replace = gr.Checkbox(False, label="Replace a shipped product of the same id",
                                          elem_id="product-replace-shipped")
                fit = gr.Button("Fit PatchCore", variant="primary", elem_id="product-fit")
                status = gr.Markdown(elem_id="product-status")
            with gr.Column(scale=2):
                table = gr.Dataframe(headers=["product", "train images", "bank patches", "views", "threshold",
                                              "val image AUROC", "fitted at"], interactive=False,
                                     elem_id="product-list")
                raw = gr.JSON(label="Result", open=False)
        if role.writes:
            fit.click(ui_fit, [name, files, symmetry, pixel_scale, replace], [status, table, raw],
                      api_visibility="private", **WRITE)
    return {"table": table}


# ============================================================================ History
def _history_view(product, defect, verdict, text, owner):
    import pandas as pd

    r = history_uc.history_list(get_services(), None if product == ALL else product,
                                None if defect == ALL else defect, None if verdict == ALL else verdict, text,
                                owner=owner)
    rows = [[x["id"], x["created"], x["source"], x["product"], x["defect_type"], x["verdict"], x["score"],
             x["agent_model"], x["elapsed_s"], x["n_citations"]] for x in r["runs"]]
    pairs = r["stats"]["by_product_defect"]
    chart = pd.DataFrame(pairs if pairs else [], columns=["product", "defect_type", "runs"])
    by = r["stats"]
    md = (f"**{by['total']}** analyses · by product: " + ", ".join(f"{k} {v}" for k, v in by["by_product"].items())
          + " · by defect type: " + ", ".join(f"{k} {v}" for k, v in by["by_defect_type"].items())) \
        if by["total"] else "No analyses yet: run one in the Chat tab."
    ids = [x["id"] for x in r["runs"]]
    return rows, chart, md, gr.update(choices=ids, value=ids[0] if ids else None)


def build_history_tab(role: Role = OPERATOR) -> dict:
    """History tab: every run for operators; a public visitor sees only the runs of their own session."""

    @guarded
    def ui_history(product, defect, verdict, text, request: gr.Request):
        return _history_view(product, defect, verdict, text, _owner(request, role))

    @guarded
    def ui_history_show(run_id, request: gr.Request):
        svc = get_services()
        owner = _owner(request, role)
        row = history_uc.history_run(svc, run_id, owner)
        md_path = servable(history_uc.export_manual(svc, row["id"], "md", owner))
        pdf_path = servable(history_uc.export_manual(svc, row["id"], "pdf", owner))
        return history_uc.manual_markdown(row), public_json(row["tool_calls"]), md_path, pdf_path

    with gr.Tab("History", id="history", elem_id="tab-history") as tab:
        if role.own_history:
            gr.Markdown("Your analyses in this browser session (other visitors' runs are not shown).")
        with gr.Row():
            product = gr.Dropdown(product_choices(with_all=True), value=ALL, label="Product")
            defect = gr.Dropdown(defect_choices(with_all=True), value=ALL, label="Defect type")
            verdict = gr.Dropdown([ALL, "ANOMALOUS", "NORMAL"], value=ALL, label="Verdict")
            text = gr.Textbox(label="Text in question or manual")
            refresh = gr.Button("Refresh", elem_id="history-refresh")
        stats = gr.Markdown(elem_id="history-stats")
        chart = gr.BarPlot(x="product", y="runs", color="defect_type", title="Analyses by product and defect type",
                           height=260, elem_id="history-chart")
        table = gr.Dataframe(headers=["id", "created", "source", "product", "defect type", "verdict", "score",
                                      "agent", "seconds", "citations"], interactive=False, elem_id="history-table")
        with gr.Row():
            run_id = gr.Dropdown([], label="Analysis", allow_custom_value=True, scale=3, elem_id="history-run")
            show = gr.Button("Show manual", scale=1, elem_id="history-show")
            md_btn = gr.DownloadButton("Markdown", value=None, scale=1, elem_id="history-md")
            pdf_btn = gr.DownloadButton("PDF", value=None, scale=1, elem_id="history-pdf")
        manual = gr.Markdown(elem_id="history-manual")
        calls = gr.JSON(label="Tool calls", open=False)
        inputs = [product, defect, verdict, text]
        refresh.click(ui_history, inputs, [table, chart, stats, run_id], api_visibility="private", queue=False)
        tab.select(ui_history, inputs, [table, chart, stats, run_id], api_visibility="private", queue=False)
        show.click(ui_history_show, [run_id], [manual, calls, md_btn, pdf_btn], api_visibility="private")
    return {"dropdowns": [(product, "all")]}


def _owner(request: gr.Request | None, role: Role):
    """History owner filter of a caller: ANY (every run) for operators, the visitor's session for the public."""
    return owner_of(request, role) if role.own_history else ANY


# ============================================================================ API endpoints
def register_api(role: Role = OPERATOR) -> None:
    """Hidden components and the named JSON endpoints (call inside the Blocks context).

    Every endpoint is documented (clients know its defaults); only ``inspect``, ``search`` and
    ``manual`` (and ``chat``, :mod:`ui.chat`) are MCP tools when the app serves MCP. The write
    endpoints exist only in the operator app (``role.writes``).
    """

    @guarded
    def inspect(image: str, product: str = AUTO):
        """Score a photo of a part with PatchCore: anomaly score vs the product's calibrated threshold,
        verdict (ANOMALOUS / NORMAL) and defect regions (bounding boxes in pixels, area fraction).

        Args:
            image: the photo (PNG, JPEG, ...; at most DRA_MAX_IMAGE_PIXELS decoded pixels).
            product: product id (brick, gravel, grass, ...) or "auto (infer)" to infer it from similar images.

        Returns:
            the inspection as JSON (product, product_source, score, threshold, is_anomalous, verdict,
            regions, model, width, height, image_sha256, artifact names) and the overlay picture.
        """
        r = do_inspect(image, product)
        return public_json(r), _file(r["overlay"])

    @guarded
    def search(image: str | None = None, text: str = "", mode: str = "auto", product: str = "",
               defect_type: str = "", k: float = 5):
        """Find similar past defects in the labelled gallery by photo, by text, or both.

        Args:
            image: a query photo (optional).
            text: a text query such as "crack on brick" (optional).
            mode: auto, image, text or fused.
            product: restrict to this product ("" = any; inferred for photo queries).
            defect_type: restrict to a defect type: scratch, crack, hole, stain, contamination ("" = any).
            k: number of results (1-50).

        Returns:
            the hits as JSON (id, product, defect_type, score, matched, image name, note) and their pictures.
        """
        r = do_search(image, text, mode, product, defect_type, int(k or 5))
        files = [servable(h["image"]) for h in r["results"] if h.get("image")]
        return public_json(r), [f for f in files if f]

    @guarded
    def manual(query: str, product: str = "", defect_type: str = "", section: str = "", k: float = 4):
        """Search the product manuals (PDF) for passages that answer a question, with file and page.

        Args:
            query: the question, e.g. "crack cause and immediate action" (English or Korean).
            product: restrict to a product ("" = any).
            defect_type: restrict to a defect type ("" = any).
            section: cause, action, prevention or general ("" = any).
            k: number of passages (1-20).

        Returns:
            passages as JSON: text, source (PDF file name), page (1-based), section, score.
        """
        return public_json(do_manual(query, product, defect_type, section, int(k or 4), previews=False))

    @guarded
    def gallery(product: str = "", defect_type: str = ""):
        """The labelled gallery's items (id, product, defect type, note, image name)."""
        return public_json({"items": gallery_uc.gallery_items(get_services(), product, defect_type)})

    @guarded
    def manuals():
        """The stored manuals (source, product, lang, pages, chunks, title)."""
        return {"documents": manuals_uc.list_manuals(get_services())}

    @guarded
    def history(product: str = "", defect_type: str = "", verdict: str = "", text: str = "", limit: float = 100,
                request: gr.Request = None):
        """Past analyses and statistics (a public visitor: only their own)."""
        return public_json(history_uc.history_list(get_services(), product, defect_type, verdict, text,
                                                   int(limit or 100), owner=_owner(request, role)))

    @guarded
    def history_run(run_id: str, request: gr.Request = None):
        """One past analysis with its response manual and tool calls."""
        return public_json(history_uc.history_run(get_services(), run_id, _owner(request, role)))

    @guarded
    def export_manual(run_id: str, fmt: str = "pdf", request: gr.Request = None):
        """A past analysis's response manual as a Markdown or PDF file."""
        return servable(history_uc.export_manual(get_services(), run_id, (fmt or "pdf").strip().lower(),
                                                 _owner(request, role)))

    @guarded
    def register_defect(image: str, product: str, defect_type: str, note: str = ""):
        """Add a labelled defect photo to the gallery (operator)."""
        return public_json(gallery_uc.register_defect(get_services(), _image(image), product, defect_type, note))

    @guarded
    def relabel_defect(item_id: str, product: str = "", defect_type: str = "", note: str | None = None):
        """Change a gallery item's product, defect type or note (operator)."""
        return public_json(gallery_uc.relabel_defect(get_services(), item_id, product or None, defect_type or None,
                                                     note))

    @guarded
    def delete_defect(item_id: str):
        """Remove a gallery item (operator)."""
        return gallery_uc.delete_defect(get_services(), item_id)

    @guarded
    def ingest_manual(pdf: str, product: str = "", replace_shipped: str = "", progress=gr.Progress()):
        """Add a PDF manual (operator). replace_shipped: "yes" to replace a shipped manual of the same name."""
        res = manuals_uc.ingest_manual(get_services(), check_upload(pdf, "PDF"), product,
                                       name=Path(str(pdf or "")).name, progress=_progress_cb(progress),
                                       replace_shipped=_yes(replace_shipped))
        return {**res, "documents": manuals_uc.list_manuals(get_services())}

    @guarded
    def delete_manual(source: str, replace_shipped: str = ""):
        """Delete a stored manual (operator). replace_shipped: "yes" to delete a shipped manual."""
        return manuals_uc.delete_manual(get_services(), source, replace_shipped=_yes(replace_shipped))

    @guarded
    def fit_product(product: str, images: list[str], symmetry: str = "none", replace_shipped: str = "",
                    pixel_scale: str = "", progress=gr.Progress()):
        """Add a product from normal photos and fit its PatchCore bank (operator). replace_shipped: "yes" to
        refit a shipped product; pixel_scale: model pixels per photo pixel ("" = 1.0, the camera's native scale)."""
        return products_uc.fit_product(get_services(), product, images, progress=_progress_cb(progress),
                                       symmetry=symmetry, replace_shipped=_yes(replace_shipped),
                                       pixel_scale=_scale(pixel_scale))

    with gr.Group(visible=False):
        f_image = gr.File(label="image", type="filepath")
        t = [gr.Textbox(label=f"arg{i}", value="") for i in range(5)]  # "" = optional in clients
        n_k = gr.Number(label="k", value=5)
        n_limit = gr.Number(label="limit", value=100)
        out = gr.JSON(label="result")
        out_image = gr.Image(label="overlay", type="filepath")
        out_gallery = gr.Gallery(label="pictures", type="filepath")
        out_file = gr.File(label="file")
        btn = gr.Button("api")
        if role.writes:
            f_pdf = gr.File(label="pdf", type="filepath")
            f_images = gr.File(label="images", type="filepath", file_count="multiple")

    def ep(fn, inputs, outputs, mcp: bool = False, **kw):
        btn.click(fn if mcp else not_an_mcp_tool(fn), inputs, outputs, api_name=fn.__name__, **kw)

    ep(inspect, [f_image, t[0]], [out, out_image], mcp=True, **VISION)
    ep(search, [f_image, t[0], t[1], t[2], t[3], n_k], [out, out_gallery], mcp=True, **VISION)
    ep(manual, [t[0], t[1], t[2], t[3], n_k], out, mcp=True, **MANUAL)
    ep(gallery, [t[0], t[1]], out)
    ep(manuals, [], out)
    ep(history, [t[0], t[1], t[2], t[3], n_limit], out)
    ep(history_run, [t[0]], out)
    ep(export_manual, [t[0], t[1]], out_file)
    if role.writes:
        ep(register_defect, [f_image, t[0], t[1], t[2]], out, **VISION)
        ep(relabel_defect, [t[0], t[1], t[2], t[3]], out, **VISION)
        ep(delete_defect, [t[0]], out, **VISION)
        ep(ingest_manual, [f_pdf, t[0], t[1]], out, **WRITE)
        ep(delete_manual, [t[0], t[1]], out, **WRITE)
        ep(fit_product, [t[0], f_images, t[1], t[2], t[3]], out, **WRITE)
