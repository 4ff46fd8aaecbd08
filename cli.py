"""Command-line interface: the same services as the app, JSON out.

Contract (design.md): every command prints one JSON object with ``--json`` and
exits non-zero with ``{"error": ...}`` on bad input. ``inspect`` and
``search --image`` take several images (paths or globs) and then print
``{"results": [...]}`` with the models loaded once.

    python cli.py build [--force]
    python cli.py inspect IMAGE... [--product P] [--out DIR]
    python cli.py search (--image IMAGE... | --text TEXT) [--product P] [--defect D] [-k K]
    python cli.py ingest PDF... [--product P]
    python cli.py manual QUERY [--product P] [--defect D] [--section S] [-k K] [--no-hyde]
    python cli.py ask [IMAGE] [--question Q] [--session ID] [--product P]
    python cli.py register IMAGE --product P --defect D [--note N]
    python cli.py relabel ID [--product P] [--defect D] [--note N]
    python cli.py delete ID
    python cli.py eval anomaly [--product P] [--split val|unseen]
    python cli.py eval retrieval [--split val|unseen]
    python cli.py eval ask [--per-product N] [--split val|unseen]
    python cli.py eval chat [--half dev|report|all] [--only ID...]
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

from core.settings import apply_runtime_env, get_settings

apply_runtime_env()  # entry point: offline / no-telemetry environment before torch, transformers, gradio load

from agent.ask import ask, ask_json, open_conversation, start_turn  # noqa: E402
from agent.evaluate import evaluate_ask, evaluate_chat  # noqa: E402
from agent.hyde import PassageWriter  # noqa: E402
from core.catalog import parse_product  # noqa: E402
from core.imageio import load_rgb  # noqa: E402
from services.build import build_state  # noqa: E402
from services.container import get_services  # noqa: E402
from services.evaluate import evaluate_anomaly, evaluate_retrieval  # noqa: E402
from services.gallery import delete_defect, register_defect, relabel_defect  # noqa: E402
from services.inspect import inspect_images  # noqa: E402
from services.manuals import ingest_manual, query_manual  # noqa: E402
from services.search import search_similar  # noqa: E402

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


def _services():
    return get_services()


def _one_or_many(results: list[dict]) -> dict:
    return results[0] if len(results) == 1 else {"results": results}


# ---------------------------------------------------------------- commands
def cmd_build(args) -> dict:
    def progress(f: float, msg: str) -> None:
        print(f"[{f * 100:5.1f}%] {msg}", file=sys.stderr, flush=True)

    return build_state(_services(), force=args.force, progress=progress)


def cmd_inspect(args) -> dict:
    paths = _expand(args.images)
    images = [load_rgb(p) for p in paths]  # every file is checked before any is scored
    run_dir = Path(args.out) if args.out else get_settings().runs_dir / time.strftime("inspect-%Y%m%d-%H%M%S")
    reports = inspect_images(_services(), images, args.product, out_dir=run_dir, names=paths)
    return _one_or_many([{"image": p, **r.to_json()} for p, r in zip(paths, reports)])


def cmd_search(args) -> dict:
    if args.image is None and args.text is None:
        raise CliError("give --image and / or --text")
    if args.text is not None and not args.text.strip():
        raise CliError("--text must not be empty")
    if args.mode in ("image", "fused") and not args.image:
        raise CliError(f"--mode {args.mode} needs --image")
    if args.mode in ("text", "fused") and args.text is None:
        raise CliError(f"--mode {args.mode} needs --text")
    kw = dict(mode=args.mode, product=args.product, defect_type=args.defect, k=args.k, text_weight=args.text_weight)
    if not args.image:
        return search_similar(_services(), None, args.text, **kw).to_json()
    paths = _expand(args.image)
    images = [load_rgb(p) for p in paths]
    return _one_or_many([{"image": p, **search_similar(_services(), rgb, args.text, **kw).to_json()}
                         for p, rgb in zip(paths, images)])


def cmd_register(args) -> dict:
    if not Path(args.image).is_file():
        raise CliError(f"file not found: {args.image}")
    t0 = time.perf_counter()
    row = register_defect(_services(), args.image, args.product, args.defect, note=args.note or "")
    return {**row, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)}


def cmd_delete(args) -> dict:
    return delete_defect(_services(), args.id)


def cmd_relabel(args) -> dict:
    return relabel_defect(_services(), args.id, product=args.product, defect_type=args.defect, note=args.note)


def cmd_ingest(args) -> dict:
    t0 = time.perf_counter()
    docs, pages, chunks, files = 0, 0, 0, []
    for path in _expand(args.pdfs):
        if not Path(path).is_file():
            raise CliError(f"file not found: {path}")
        res = ingest_manual(_services(), path, product=args.product, replace_shipped=args.replace_shipped)
        docs += res["documents"]
        pages += res["pages"]
        chunks += res["chunks"]
        files.append(res)
    return {"documents": docs, "pages": pages, "chunks": chunks, "files": files,
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)}


def cmd_manual(args) -> dict:
    svc = _services()
    writer = PassageWriter(svc.settings) if svc.settings.manual_hyde and not args.no_hyde else None
    return query_manual(svc, args.query, product=args.product, defect_type=args.defect,
                        section=args.section, k=args.k, write_passage=writer).to_json()


CLI_OWNER = "cli"


def cmd_ask(args) -> dict:
    """One turn of a conversation: ``--session ID`` continues (or starts) that conversation; without it, a new one
    (an earlier call's turns never leak into an unrelated question)."""
    services = _services()
    if not args.image and not (args.question or "").strip() and not args.session:
        raise CliError("give an IMAGE, a --question, or both")
    conv = open_conversation(services, args.session, CLI_OWNER, new=not args.session)
    ctx = start_turn(conv, args.image, args.question, args.product, writes=True)
    models = get_settings().model_resolution.summary()
    result, history_id = ask(services, conv, ctx, source="cli", models=models, owner=CLI_OWNER)
    turn = conv.session.get("n_turns", 1) - 1
    return {"image": args.image, **ask_json(result, ctx, history_id, models, session=conv.id, turn=turn)}


def cmd_eval(args) -> dict:
    services = _services()
    if args.what == "anomaly":
        # per product: image / pixel AUROC, per-defect-type image AUROC, F1 and FPR at the calibrated threshold
        if args.product or args.products:
            products = [parse_product(p) for p in ([args.product] if args.product else []) + (args.products or [])]
        else:
            products = services.banks.products()
        limit = args.small if args.small and args.small > 0 else None
        try:
            rows = {p: evaluate_anomaly(services, p, limit=limit, split=args.split) for p in products}
        except ValueError as exc:
            raise CliError(str(exc)) from None
        keys = ("image_auroc", "pixel_auroc", "f1", "fpr", "recall", "uncertain_rate")
        mean = {k: round(statistics.mean(r[k] for r in rows.values()), 4) for k in keys
                if rows and all(r.get(k) is not None for r in rows.values())}
        types = sorted({t for r in rows.values() for t in r["per_type_image_auroc"]})
        per_type = {t: round(statistics.mean(r["per_type_image_auroc"][t] for r in rows.values()
                                             if r["per_type_image_auroc"].get(t) is not None), 4)
                    for t in types if any(r["per_type_image_auroc"].get(t) is not None for r in rows.values())}
        return {"split": args.split, "products": rows, "mean": mean, "per_type_mean": per_type,
                "limit_per_class": limit}
    if args.what == "retrieval":
        try:
            return evaluate_retrieval(services, split=args.split)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if args.what == "ask":
        try:
            return evaluate_ask(services, per_product=args.per_product, split=args.split)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if args.what == "chat":
        return evaluate_chat(services, half=args.half, only=args.only)
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
    sp.add_argument("--replace-shipped", action="store_true",
                    help="replace a shipped manual of the same file name (refused without it)")
    sp.set_defaults(func=cmd_ingest)

    sp = add("manual", "query the manual store")
    sp.add_argument("query")
    sp.add_argument("--product")
    sp.add_argument("--defect")
    sp.add_argument("--section", choices=["cause", "action", "prevention", "general"])
    sp.add_argument("-k", type=int, default=4)
    sp.add_argument("--no-hyde", action="store_true",
                    help="rank by the question alone (default with --product: the agent's model first writes a "
                         "passage answering it, ~5 s; DRA_MANUAL_HYDE=0 turns it off everywhere)")
    sp.set_defaults(func=cmd_manual)

    sp = add("ask", "one turn of a conversation with the agent (a photo, a question, or both)")
    sp.add_argument("image", nargs="?", help="photo of the part (optional when a question is given or the "
                                              "session has a photo)")
    sp.add_argument("--question", help="the message (English or Korean)")
    sp.add_argument("--session", help="conversation id: continues it (created when new); default: a new one")
    sp.add_argument("--product", help="product id (default: inferred from the nearest gallery images)")
    sp.set_defaults(func=cmd_ask)

    sp = add("eval", "evaluations on the tuning split (val) or the unseen split")
    sp.add_argument("what", choices=["anomaly", "retrieval", "ask", "chat"])
    sp.add_argument("--split", choices=["val", "unseen"], default="val",
                    help="eval anomaly / retrieval / ask: val = the tuning split (settings are chosen here); unseen = "
                         "kept out of every fit, bank, gallery, metric and threshold, a second defect generator")
    sp.add_argument("--product")
    sp.add_argument("--per-product", type=int, default=2, help="eval ask: photos per product")
    sp.add_argument("--products", nargs="+", help="eval anomaly: only these products")
    sp.add_argument("--small", type=int, default=0, metavar="N",
                    help="eval anomaly: only the first N normal and N per defect type val images (fast CI mode)")
    sp.add_argument("--half", choices=["dev", "report", "all"], default="all",
                    help="eval chat: which half of the scenario set (agent/scenarios/chat.yaml)")
    sp.add_argument("--only", nargs="+", help="eval chat: only these scenario ids")
    sp.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 2 bad input, 1 a failure)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "k", None) is not None and args.k < 1:
        print(json.dumps({"error": "-k must be >= 1"}))
        return 2
    try:
        out = args.func(args)
    except (CliError, FileNotFoundError, ValueError, KeyError) as exc:  # InputError is a ValueError
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
