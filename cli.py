"""Command-line interface: the same services as the app, JSON out.

Contract (design.md): every command prints one JSON object with ``--json`` and
exits non-zero with ``{"error": ...}`` on bad input. ``inspect`` and
``search --image`` take several images (paths or globs) and then print
``{"results": [...]}`` with the models loaded once.

    python cli.py build [--force]
    python cli.py inspect IMAGE... [--product P] [--out DIR]
    python cli.py search (--image IMAGE... | --text TEXT) [--product P] [--defect D] [-k K]
    python cli.py ingest PDF... [--product P]
    python cli.py manual QUERY [--product P] [--defect D] [--section S] [-k K]
    python cli.py ask IMAGE [--product P] [--question Q]
    python cli.py eval anomaly [--product P]
    python cli.py eval retrieval
    python cli.py eval ask [--per-product N]
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import core.settings  # noqa: F401  (sets HF_HUB_OFFLINE etc. before heavy imports)
from core.settings import get_settings

log = logging.getLogger("dra.cli")


class CliError(Exception):
    """Bad input given on the command line (reported as ``{"error": ...}``)."""


class JsonArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as JSON when ``--json`` was given."""

    def error(self, message: str):  # noqa: D401
        if "--json" in sys.argv:
            print(json.dumps({"error": f"{self.prog}: {message}"}))
            sys.exit(2)
        super().error(message)


def _expand(patterns: list[str]) -> list[str]:
    out: list[str] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            matches = sorted(glob.glob(pat))
            if not matches:
                raise CliError(f"no file matches {pat!r}")
            out += matches
        else:
            out.append(pat)
    return out


def _load_images(paths: list[str]):
    from core.imageio import load_rgb

    return [load_rgb(p) for p in paths]


def _product_arg(value: str | None) -> str | None:
    from core.catalog import check_product

    return check_product(value)


# ---------------------------------------------------------------- commands
def cmd_build(args) -> dict:
    from services.build import build_state

    def progress(f: float, msg: str) -> None:
        print(f"[{f * 100:5.1f}%] {msg}", file=sys.stderr, flush=True)

    return build_state(force=args.force, progress=progress)


def cmd_inspect(args) -> dict:
    from models.patchcore.model import save_artifacts
    from services.container import get_services

    paths = _expand(args.images)
    images = _load_images(paths)
    product = _product_arg(args.product)
    services = get_services()
    run_dir = Path(args.out) if args.out else get_settings().runs_dir / time.strftime("inspect-%Y%m%d-%H%M%S")
    results = []
    for i, (path, rgb) in enumerate(zip(paths, images)):
        t0 = time.perf_counter()
        prod, source = product, "user"
        if prod is None:
            prod, _conf = services.infer_product(rgb)
            source = "inferred"
        res = services.patchcore.inspect(rgb, prod)
        files = save_artifacts(res, rgb, run_dir / f"{i:03d}_{Path(path).stem[:40]}")
        results.append({
            "image": path,
            "product": prod,
            "product_source": source,
            "score": round(float(res.score), 5),
            "threshold": round(float(res.threshold), 5),
            "is_anomalous": bool(res.is_anomalous),
            "anomaly_map": files["anomaly_map"],
            "mask": files["mask"],
            "overlay": files["overlay"],
            "heatmap": files.get("heatmap"),
            "comparison": files.get("comparison"),
            "regions": res.regions,
            "model": res.model,
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1),
        })
    return results[0] if len(results) == 1 else {"results": results}


def cmd_search(args) -> dict:
    from core.catalog import normalize_defect
    from services.container import get_services

    services = get_services()
    index = services.image_index
    product = _product_arg(args.product)
    defect = normalize_defect(args.defect) if args.defect else None
    if args.defect and defect is None:
        raise CliError(f"unknown defect type {args.defect!r}")
    if args.image is None and args.text is None:
        raise CliError("give --image and / or --text")
    if args.text is not None and not args.text.strip():
        raise CliError("--text must not be empty")
    mode = args.mode
    if mode == "auto":
        mode = "fused" if args.image and args.text else "image" if args.image else "text"
    if mode in ("image", "fused") and not args.image:
        raise CliError(f"--mode {mode} needs --image")
    if mode in ("text", "fused") and args.text is None:
        raise CliError(f"--mode {mode} needs --text")
    if mode == "text":
        t0 = time.perf_counter()
        hits = index.query(text=args.text, mode="text", k=args.k, product=product, defect_type=defect)
        return {"query": args.text, "mode": mode, "product": product, "results": hits, "model": index.model,
                "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)}
    paths = _expand(args.image)
    images = _load_images(paths)
    out = []
    for path, rgb in zip(paths, images):
        t0 = time.perf_counter()
        prod, source = product, "user"
        if prod is None:
            prod, _conf = services.infer_product(rgb)
            source = "inferred"
        hits = index.query(rgb, args.text if mode == "fused" else None, mode=mode, k=args.k, product=prod,
                           defect_type=defect, text_weight=args.text_weight)
        out.append({"image": path, "product": prod, "product_source": source, "mode": mode, "results": hits,
                    "model": index.model, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)})
    return out[0] if len(out) == 1 else {"results": out}


def cmd_register(args) -> dict:
    from services.container import get_services

    if not Path(args.image).is_file():
        raise CliError(f"file not found: {args.image}")
    t0 = time.perf_counter()
    row = get_services().image_index.register(args.image, args.product, args.defect, note=args.note or "")
    return {**row, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)}


def cmd_delete(args) -> dict:
    from services.container import get_services

    if not get_services().image_index.delete(args.id):
        raise KeyError(f"unknown item id {args.id!r}")
    return {"id": args.id, "deleted": True}


def cmd_relabel(args) -> dict:
    from services.container import get_services

    if args.product is None and args.defect is None and args.note is None:
        raise CliError("give --product, --defect and / or --note")
    index = get_services().image_index
    if index.get(args.id) is None:
        raise KeyError(f"unknown item id {args.id!r}")
    return index.relabel(args.id, product=args.product, defect_type=args.defect, note=args.note)


def cmd_ingest(args) -> dict:
    from services.container import get_services

    product = args.product.strip().lower() if args.product else None
    store = get_services().manuals
    t0 = time.perf_counter()
    docs, pages, chunks, files = 0, 0, 0, []
    for path in _expand(args.pdfs):
        if not Path(path).is_file():
            raise CliError(f"file not found: {path}")
        res = store.ingest_pdf(path, product=product)
        docs += res["documents"]
        pages += res["pages"]
        chunks += res["chunks"]
        files.append(res)
    return {"documents": docs, "pages": pages, "chunks": chunks, "files": files,
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)}


def cmd_manual(args) -> dict:
    from core.catalog import normalize_defect
    from services.container import get_services

    if not args.query.strip():
        raise CliError("QUERY must not be empty")
    defect = normalize_defect(args.defect) if args.defect else None
    if args.defect and defect is None:
        raise CliError(f"unknown defect type {args.defect!r}")
    store = get_services().manuals
    t0 = time.perf_counter()
    hits = store.query(args.query, product=_product_arg(args.product), defect=defect, section=args.section, k=args.k)
    return {"query": args.query, "results": hits, "model": getattr(store, "model", None),
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)}


def _run_agent(path: str, product: str | None, question: str | None) -> dict:
    from agent.agents import get_default_agent
    from tools import RunContext

    ctx = RunContext.from_path(path, product=product, question=question)
    result = get_default_agent().run(ctx)
    history_id = None
    try:  # every analysis goes to the SQLite history (stores/history.py), like the app's
        from stores.history import get_history

        history_id = get_history().record_run(result, ctx, source="cli")
    except Exception as exc:  # noqa: BLE001 - a history failure must not lose the answer
        print(f"warning: could not record the run in the history: {exc}", file=sys.stderr)
    return {
        "image": path,
        "history_id": history_id,
        "product": result.product or ctx.product,
        "product_source": ctx.product_source,
        "defect_type": result.defect_type or ctx.defect_type,
        "steps": [{"tool": s.tool, "arguments": s.arguments, "observation": s.observation,
                   "duration_s": round(s.duration_s, 2), **({"error": s.error} if s.error else {})}
                  for s in result.steps],
        "answer": result.answer,
        "citations": result.citations,
        "fallback": result.fallback,
        "fallback_reason": result.fallback_reason,
        "inspection": ctx.inspection,
        "model": result.model,
        # every role's model and why it was chosen (profile, auto, per-role override)
        "models": get_settings().model_resolution.summary(),
        "elapsed_s": round(result.elapsed_s, 2),
    }


def cmd_ask(args) -> dict:
    return _run_agent(args.image, _product_arg(args.product), args.question)


def cmd_eval(args) -> dict:
    from services.container import get_services

    services = get_services()
    if args.what == "anomaly":
        # per product: image / pixel AUROC, per-defect-type image AUROC, F1 and FPR at the calibrated threshold
        if args.product or args.products:
            products = [_product_arg(p) for p in ([args.product] if args.product else []) + (args.products or [])]
        else:
            products = services.patchcore.products()
        limit = args.small if args.small and args.small > 0 else None
        rows = {p: services.patchcore.evaluate(p, limit=limit) for p in products}
        keys = ("image_auroc", "pixel_auroc", "f1", "fpr")
        mean = {k: round(statistics.mean(r[k] for r in rows.values()), 4) for k in keys
                if rows and all(r.get(k) is not None for r in rows.values())}
        return {"products": rows, "mean": mean, "limit_per_class": limit}
    if args.what == "retrieval":
        return services.image_index.evaluate()
    if args.what == "ask":
        from data.build import load_manifest

        settings = get_settings()
        manifest = load_manifest(settings.data_dir)
        picked: list[dict] = []
        for product in services.patchcore.products():
            items = [it for it in manifest["items"]
                     if it["product"] == product and it["split"] == "val" and it["label"] == "defect"]
            # spread the picks over the defect types
            by_type: dict[str, list[dict]] = {}
            for it in items:
                by_type.setdefault(it["defect_type"], []).append(it)
            order = [v[i] for i in range(max(map(len, by_type.values()), default=0))
                     for v in by_type.values() if i < len(v)]
            picked += order[: args.per_product]
        runs = []
        for it in picked:
            res = _run_agent(str(settings.data_dir / it["image"]), None, None)
            tools_called = {s["tool"] for s in res["steps"]}
            runs.append({"image": it["image"], "true_product": it["product"], "true_defect": it["defect_type"],
                         "product": res["product"], "defect_type": res["defect_type"],
                         "fallback": res["fallback"], "elapsed_s": res["elapsed_s"],
                         "all_tools": {"anomaly_scoring", "similar_defect_search", "manual_retrieval"} <= tools_called,
                         "citations": len(res["citations"])})
        n = len(runs) or 1
        times = [r["elapsed_s"] for r in runs]
        return {
            "n": len(runs),
            "product_accuracy": round(sum(r["product"] == r["true_product"] for r in runs) / n, 3),
            "defect_type_accuracy": round(sum(r["defect_type"] == r["true_defect"] for r in runs) / n, 3),
            "all_tools_rate": round(sum(r["all_tools"] for r in runs) / n, 3),
            "fallback_rate": round(sum(r["fallback"] for r in runs) / n, 3),
            "elapsed_s_p50": round(statistics.median(times), 1) if times else None,
            "elapsed_s_max": round(max(times), 1) if times else None,
            "runs": runs,
        }
    raise CliError(f"unknown evaluation {args.what!r}")


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = JsonArgumentParser(prog="cli.py", description="Defect response agent: services from a shell, JSON out.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=JsonArgumentParser)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--json", action="store_true", help="print one compact JSON object")
        return sp

    sp = add("build", "build sample data, gallery index, PatchCore banks, manual store")
    sp.add_argument("--force", action="store_true", help="rebuild even when present")
    sp.set_defaults(func=cmd_build)

    sp = add("inspect", "PatchCore anomaly scoring of one or more images")
    sp.add_argument("images", nargs="+", help="image paths or globs")
    sp.add_argument("--product", help="product id (default: inferred from the nearest gallery images)")
    sp.add_argument("--out", help="folder for artifacts (default: state/runs/inspect-<time>)")
    sp.set_defaults(func=cmd_inspect)

    sp = add("search", "similar-defect search by image(s) and / or text")
    sp.add_argument("--image", nargs="+", help="query image paths or globs")
    sp.add_argument("--text", help="text query")
    sp.add_argument("--mode", choices=["auto", "image", "text", "fused"], default="auto",
                    help="auto: fused with --image and --text, else whichever is given")
    sp.add_argument("--text-weight", type=float, default=None,
                    help="fused: weight of the caption score, 0..1 (default DRA_SEARCH_TEXT_WEIGHT)")
    sp.add_argument("--product")
    sp.add_argument("--defect", help="restrict to a defect type")
    sp.add_argument("-k", type=int, default=5)
    sp.set_defaults(func=cmd_search)

    sp = add("register", "add a labelled defect image to the similar-defect gallery")
    sp.add_argument("image")
    sp.add_argument("--product", required=True)
    sp.add_argument("--defect", required=True, help="defect type id (or its English / Korean name)")
    sp.add_argument("--note", default="")
    sp.set_defaults(func=cmd_register)

    sp = add("delete", "remove a gallery item by id")
    sp.add_argument("id")
    sp.set_defaults(func=cmd_delete)

    sp = add("relabel", "change a gallery item's product, defect type and / or note")
    sp.add_argument("id")
    sp.add_argument("--product")
    sp.add_argument("--defect")
    sp.add_argument("--note")
    sp.set_defaults(func=cmd_relabel)

    sp = add("ingest", "add PDF manuals to the manual store")
    sp.add_argument("pdfs", nargs="+")
    sp.add_argument("--product")
    sp.set_defaults(func=cmd_ingest)

    sp = add("manual", "query the manual store")
    sp.add_argument("query")
    sp.add_argument("--product")
    sp.add_argument("--defect")
    sp.add_argument("--section", choices=["cause", "action", "prevention", "general"])
    sp.add_argument("-k", type=int, default=4)
    sp.set_defaults(func=cmd_manual)

    sp = add("ask", "run the agent on one photo and print the response manual")
    sp.add_argument("image")
    sp.add_argument("--product")
    sp.add_argument("--question")
    sp.set_defaults(func=cmd_ask)

    sp = add("eval", "evaluations on the project's own validation split")
    sp.add_argument("what", choices=["anomaly", "retrieval", "ask"])
    sp.add_argument("--product")
    sp.add_argument("--per-product", type=int, default=2, help="eval ask: photos per product")
    sp.add_argument("--products", nargs="+", help="eval anomaly: only these products")
    sp.add_argument("--small", type=int, default=0, metavar="N",
                    help="eval anomaly: only the first N normal and N per defect type val images (fast CI mode)")
    sp.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "k", None) is not None and args.k < 1:
        print(json.dumps({"error": "-k must be >= 1"}))
        return 2
    from core.catalog import UnknownProductError
    from core.imageio import InvalidImageError

    try:
        out = args.func(args)
    except (CliError, InvalidImageError, UnknownProductError, FileNotFoundError, ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(json.dumps({"error": str(msg), "type": type(exc).__name__}))
        return 2
    except RuntimeError as exc:
        print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        return 1
    if args.json:
        print(json.dumps(out, default=str, ensure_ascii=False))
    else:
        if args.command == "ask":
            print(out["answer"])
            print(f"\n[model: {out['model']}; {out['elapsed_s']} s; fallback: {out['fallback']}]")
        else:
            print(json.dumps(out, default=str, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
