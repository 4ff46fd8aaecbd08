"""Manual retrieval on real PDF manuals nobody here wrote: dense vs BM25 vs hybrid, page hit@k.

    python bench/eval_manuals.py                      # report: both splits, every ranker, the chosen settings
    python bench/eval_manuals.py --grid               # tuning grid, on the tuning half only
    python bench/eval_manuals.py --split report --json
    python bench/eval_manuals.py --split held-out      # report + report2 (written after the settings were fixed)
    python bench/eval_manuals.py --split report3 --hyde # + ranker "hyde": the shipped HyDE path (agent's model)

The manuals are PDFs from Debian bookworm ``*-doc`` packages listed in
``bench/manual_eval/questions.json`` (package, version, path inside the package, sha256).
They are fetched with ``apt-get download PKG=VERSION`` and unpacked with ``dpkg -x`` into
``--cache`` (default ``/tmp/dra_manual_eval``; no root install); a missing package or a
sha256 mismatch ends the run with a clear message and exit code 0 ("skipped"), as when
offline. Each PDF is ingested into a fresh :class:`stores.manual_store.ManualStore`
(real Chroma, real embedder) under its own product id, and every question is asked
WITHOUT a product filter (all manuals in one store), ``k`` = 10.

Metrics per package and split: hit@1, hit@3 (an expected page among the first 1 / 3
results: same file, any listed page), MRR@10 and the distinct-page rate (share of
questions whose top 3 results are 3 different pages). Rankers: ``dense-chunks`` (the
store before issue 15: Chroma cosine top-k chunks, pages may repeat), ``dense``, ``bm25``
and ``hybrid`` (reciprocal rank fusion of both), each returning distinct pages; with ``--hyde`` also
``hyde``: what ``cli.py manual`` ships, i.e. with a product filter the agent's model
(:class:`agent.hyde.PassageWriter`) writes a passage and the store ranks by it
(``RetrievalConfig.passage_mode``), without one the plain hybrid ranking. Passages are cached in
``--cache``/hyde_shipped.json by prompt.

Chunk embeddings are cached on disk by text hash (``--cache``/emb) so that the grid and
reruns do not embed the same chunk twice; the cache returns exactly what the embedder
returned.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.settings import apply_runtime_env  # noqa: E402

apply_runtime_env()  # before torch / transformers load

import numpy as np  # noqa: E402

from core.settings import Settings  # noqa: E402
from models.embedders import embed_queries, get_text_embedder  # noqa: E402
from stores.manual_store import (DEFAULT_RETRIEVAL, MAX_CHUNK_CHARS, SECTION_TITLES, ManualStore,  # noqa: E402
                                 RetrievalConfig)

QUESTIONS = Path(__file__).resolve().parent / "manual_eval" / "questions.json"
RANKERS = ("dense-chunks", "dense", "bm25", "hybrid")
ALL_RANKERS = RANKERS + ("hyde",)
SCOPES = ("product", "all")
#: question splits no setting was chosen on: ``report`` (written with the tuning half) and ``report2``
#: (written after the settings were fixed, 2026-11-28). ``report3`` (20 more, sixth session) was read once for
#: the HyDE change (ninth session). ``report4`` (20 more, tenth session, committed before any run on it) is for
#: the next retrieval change.
HELD_OUT = ("report", "report2")


class CachedEmbedder:
    """A :class:`models.embedders.TextEmbedder` that stores each row it computes under ``sha1(text)``.

    Args:
        base: the real embedder (its ``name`` and ``dim`` are kept, so Chroma collections match).
        folder: where ``<sha1>.npy`` files go (one folder per embedder name).
    """

    def __init__(self, base, folder: Path):
        self.base, self.name, self.dim = base, base.name, base.dim
        self.folder = Path(folder) / base.name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.computed = 0

    def _cached(self, texts: list[str], fn, tag: str) -> np.ndarray:
        keys = [hashlib.sha1(f"{tag}\0{t}".encode()).hexdigest() for t in texts]
        out: list[np.ndarray | None] = []
        for k in keys:
            p = self.folder / f"{k}.npy"
            out.append(np.load(p) if p.is_file() else None)
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            rows = fn([texts[i] for i in todo])
            self.computed += len(todo)
            for i, row in zip(todo, rows):
                out[i] = np.asarray(row, np.float32)
                tmp = self.folder / f".{keys[i]}.{time.time_ns()}.npy"
                np.save(tmp, out[i])
                tmp.replace(self.folder / f"{keys[i]}.npy")
        return np.stack(out) if out else np.zeros((0, self.dim), np.float32)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Passage rows (cached)."""
        return self._cached(list(texts), self.base.embed, "p")

    def embed_query(self, texts: list[str]) -> np.ndarray:
        """Query rows (cached): the base's ``embed_query`` when it has one."""
        return self._cached(list(texts), lambda t: embed_queries(self.base, t), "q")


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Skip(Exception):
    """The evaluation cannot run here (offline, package gone, checksum changed)."""


def ensure_documents(spec: dict, cache: Path) -> dict[str, Path]:
    """Path of every manual of ``spec``, downloading / unpacking its Debian package when missing.

    Returns:
        ``{doc id: path of the verified PDF}``.

    Raises:
        Skip: ``apt-get download`` or ``dpkg -x`` failed (offline, version gone) or a sha256 differs.
    """
    out = {}
    for doc in spec["documents"]:
        root = cache / "x" / doc["package"]
        pdf = root / doc["path"]
        if not pdf.is_file():
            debs = cache / "debs"
            debs.mkdir(parents=True, exist_ok=True)
            want = f"{doc['package']}={doc['version']}"
            found = sorted(debs.glob(f"{doc['package']}_*.deb"))
            if not found:
                print(f"[eval] apt-get download {want}", file=sys.stderr)
                r = subprocess.run(["apt-get", "download", want], cwd=debs, capture_output=True, text=True)
                found = sorted(debs.glob(f"{doc['package']}_*.deb"))
                if r.returncode != 0 or not found:
                    raise Skip(f"cannot download Debian package {want} (offline, or no such version in the "
                               f"configured archive): {(r.stderr or r.stdout).strip()[-300:]}")
            root.mkdir(parents=True, exist_ok=True)
            r = subprocess.run(["dpkg", "-x", str(found[-1]), str(root)], capture_output=True, text=True)
            if r.returncode != 0 or not pdf.is_file():
                raise Skip(f"dpkg -x {found[-1].name} did not give {doc['path']}: {r.stderr.strip()[-300:]}")
        got = sha256(pdf)
        if got != doc["sha256"]:
            raise Skip(f"{doc['package']}:{doc['path']} has sha256 {got}, expected {doc['sha256']}")
        out[doc["id"]] = pdf
    return out


def build_store(pdfs: dict[str, Path], state: Path, embedder, chunk_chars: int,
                section_titles: bool) -> tuple[ManualStore, dict]:
    """A fresh store under ``state`` with every manual ingested under its doc id as product."""
    settings = dataclasses.replace(Settings.from_env(), state_dir=state)
    store = ManualStore(settings, embedder=embedder, chunk_chars=chunk_chars, section_titles=section_titles)
    info = {}
    for doc_id, pdf in pdfs.items():
        t0 = time.perf_counter()
        res = store.ingest_pdf(pdf, product=doc_id)
        info[doc_id] = {"pages": res["pages"], "chunks": res["chunks"], "ingest_s": round(time.perf_counter() - t0, 1)}
        print(f"[eval] {doc_id}: {res['pages']} pages, {res['chunks']} chunks, {info[doc_id]['ingest_s']} s",
              file=sys.stderr)
    return store, info


class CachedWriter:
    """A passage writer (``agent.hyde.PassageWriter``) whose passages are kept in a JSON file by prompt."""

    def __init__(self, path: Path):
        from agent.hyde import PassageWriter, hyde_prompt

        self.path, self.prompt, self.writer = path, hyde_prompt, PassageWriter()
        self.cache = json.loads(path.read_text()) if path.is_file() else {}
        self.written, self.seconds = 0, []

    def __call__(self, question: str, product: str | None) -> str:
        key = self.prompt(question, product)
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = self.writer(question, product)
            self.seconds.append(time.perf_counter() - t0)
            self.written += 1
            self.path.write_text(json.dumps(self.cache, indent=1, ensure_ascii=False))
        return self.cache[key]


def rank_pages(store: ManualStore, question: str, ranker: str, config: RetrievalConfig, k: int = 10,
               product: str | None = None, writer=None) -> list[tuple]:
    """``[(source, page)]`` of the store's answer to one question under one ranker (optionally product-filtered).

    ``hyde`` needs ``writer``: with a product it writes the passage the store ranks by (the shipped path)."""
    passage = None
    if ranker == "dense-chunks":
        cfg = dataclasses.replace(config, mode="dense", distinct_pages=False)
    elif ranker == "hyde":
        cfg = config
        passage = writer(question, product) if product else None
    else:
        cfg = dataclasses.replace(config, mode=ranker)
    rows = store.query(question, product=product, k=k, retrieval=cfg, passage=passage)
    return [(r["source"], r["page"]) for r in rows]


def metrics(ranked: list[list[tuple]], expected: list[tuple[str, set]]) -> dict:
    """hit@1, hit@3, MRR@k and distinct-page rate (top 3) over questions."""
    h1 = h3 = rr = distinct = 0.0
    for got, (source, pages) in zip(ranked, expected):
        ranks = [i for i, (s, p) in enumerate(got) if s == source and p in pages]
        first = ranks[0] if ranks else None
        h1 += first is not None and first < 1
        h3 += first is not None and first < 3
        rr += 1.0 / (first + 1) if first is not None else 0.0
        distinct += len(set(got[:3])) == len(got[:3])
    n = max(1, len(ranked))
    return {"n": len(ranked), "hit@1": h1 / n, "hit@3": h3 / n, "mrr": rr / n, "distinct": distinct / n}


def evaluate(store: ManualStore, spec: dict, sources: dict[str, str], rankers, config: RetrievalConfig,
             splits=("tune", "report"), scopes=SCOPES, writer=None) -> dict:
    """``{(doc or "all", split, scope, ranker): metrics}``; scope ``product`` filters by the manual's product
    (what ``cli.py manual Q --product P`` does), ``all`` asks the whole store."""
    out = {}
    for scope in scopes:
        for ranker in rankers:
            per: dict[tuple, list] = {}
            for q in spec["questions"]:
                if q["split"] not in splits:
                    continue
                got = rank_pages(store, q["question"], ranker, config, product=q["doc"] if scope == "product" else None,
                                 writer=writer)
                exp = (sources[q["doc"]], set(q["pages"]))
                keys = [(q["doc"], q["split"]), ("all", q["split"])]
                if q["split"] in HELD_OUT and set(HELD_OUT) <= set(splits):
                    keys.append(("all", "held-out"))  # every question no setting was chosen on
                for key in keys:
                    per.setdefault(key, ([], []))
                    per[key][0].append(got)
                    per[key][1].append(exp)
            for (doc, split), (got, exp) in per.items():
                out[(doc, split, scope, ranker)] = metrics(got, exp)
    return out


def print_table(results: dict) -> None:
    """One Markdown table per filter scope: rows manual x split, one column per ranker
    (``hit@1 / hit@3 / MRR@10``, then the distinct-page rate of the top 3)."""
    rankers = [r for r in ALL_RANKERS if any(key[3] == r for key in results)]
    for scope in SCOPES:
        keys = sorted({(d, s) for (d, s, f, _) in results if f == scope}, key=lambda ds: (ds[0] == "all", ds[0], ds[1]))
        if not keys:
            continue
        label = "`--product` of the manual" if scope == "product" else "no product filter (all five manuals)"
        print(f"\nfilter: {label}; cells: hit@1 / hit@3 / MRR@10 (distinct pages in the top 3)\n")
        print("| manual | split | n | " + " | ".join(rankers) + " |")
        print("|---|---|---|" + "---|" * len(rankers))
        for doc, split in keys:
            cells = []
            for r in rankers:
                m = results[(doc, split, scope, r)]
                cells.append(f"{m['hit@1']:.2f} / {m['hit@3']:.2f} / {m['mrr']:.2f} ({m['distinct']:.2f})")
            name = f"**{doc}**" if doc == "all" else doc
            print(f"| {name} | {split} | {results[(doc, split, scope, rankers[0])]['n']} | " + " | ".join(cells) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dra_manual_eval")
    ap.add_argument("--grid", action="store_true", help="tuning grid on the tuning half")
    ap.add_argument("--chunk-chars", type=int, nargs="*", default=None, help="grid: chunk sizes (default 500 900 1400)")
    ap.add_argument("--titles", type=int, nargs="*", default=[0, 1], help="grid: section titles off (0) / on (1)")
    ap.add_argument("--split", choices=("tune", "report", "report2", "report3", "report4", "both", "held-out", "all"),
                    default="both",
                    help="both: tune + report; held-out: report + report2; all: the three; report3: 20 questions "
                         "written 2026-11-28, read once for the HyDE change (ninth session); report4: 20 questions "
                         "written 2026-11-29 (tenth session) for the next retrieval change, not yet read")
    ap.add_argument("--hyde", action="store_true", help="also the shipped HyDE ranking (loads the agent's model)")
    ap.add_argument("--json", action="store_true", help="print the JSON report instead of the tables")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report to this file")
    args = ap.parse_args()
    spec = json.loads(QUESTIONS.read_text())
    try:
        pdfs = ensure_documents(spec, args.cache)
    except Skip as exc:
        print(f"[eval] skipped: {exc}")
        return 0
    sources = {d: p.name for d, p in pdfs.items()}
    embedder = CachedEmbedder(get_text_embedder(), args.cache / "emb")
    if args.grid:
        for chunk, titles in [(c, t) for c in args.chunk_chars or [500, 900, 1400] for t in args.titles]:
            state = args.cache / f"grid-{chunk}{'-titles' if titles else ''}"
            if (state / "complete").is_file():  # ingested by an earlier grid run
                settings = dataclasses.replace(Settings.from_env(), state_dir=state)
                store = ManualStore(settings, embedder=embedder, chunk_chars=chunk, section_titles=titles)
            else:
                shutil.rmtree(state, ignore_errors=True)
                store, _ = build_store(pdfs, state, embedder, chunk, titles)
                (state / "complete").write_text("1")
            configs = [dataclasses.replace(DEFAULT_RETRIEVAL, mode=m) for m in ("dense", "bm25")]
            configs += [dataclasses.replace(DEFAULT_RETRIEVAL, dense_k=dk, bm25_k=bk, bm25_weight=w, rrf_k=rk)
                        for dk in (20, 50) for bk in (20, 50) for w in (0.5, 1.0, 2.0) for rk in (10, 60)]
            for cfg in configs:
                res = evaluate(store, spec, sources, (cfg.mode,), cfg, splits=("tune",))
                row = {"chunk_chars": chunk, "section_titles": titles, **{k: v for k, v in dataclasses.asdict(cfg).items()
                                                if k != "distinct_pages"}}
                for scope in SCOPES:
                    m = res[("all", "tune", scope, cfg.mode)]
                    row.update({f"{scope}:hit@1": round(m["hit@1"], 3), f"{scope}:hit@3": round(m["hit@3"], 3),
                                f"{scope}:mrr": round(m["mrr"], 3)})
                print(json.dumps(row), flush=True)
        return 0
    splits = {"both": ("tune", "report"), "held-out": HELD_OUT, "all": ("tune",) + HELD_OUT}.get(args.split,
                                                                                               (args.split,))
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        t0 = time.perf_counter()
        store, info = build_store(pdfs, Path(tmp) / "state", embedder, MAX_CHUNK_CHARS, SECTION_TITLES)
        ingest_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rankers = ALL_RANKERS if args.hyde else RANKERS
        writer = CachedWriter(args.cache / "hyde_shipped.json") if args.hyde else None
        results = evaluate(store, spec, sources, rankers, DEFAULT_RETRIEVAL, splits=splits, writer=writer)
        n_q = sum(q["split"] in splits for q in spec["questions"]) * len(rankers) * len(SCOPES)
        query_ms = (time.perf_counter() - t0) * 1000 / max(1, n_q)
    report = {"documents": info, "settings": dataclasses.asdict(DEFAULT_RETRIEVAL), "chunk_chars": MAX_CHUNK_CHARS,
              "section_titles": SECTION_TITLES, "ingest_s": round(ingest_s, 1), "query_ms_mean": round(query_ms, 1),
              "embedded_now": embedder.computed,
              "hyde": None if writer is None else {
                  "model": writer.writer.name, "written_now": writer.written,
                  "seconds_p50": round(float(np.median(writer.seconds)), 2) if writer.seconds else None},
              "results": [{"manual": d, "split": s, "filter": f, "ranker": r, **m}
                          for (d, s, f, r), m in results.items()]}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"settings: {DEFAULT_RETRIEVAL}, chunk_chars={MAX_CHUNK_CHARS}, section_titles={SECTION_TITLES}; "
              f"documents: {info}")
        print(f"ingestion {ingest_s:.0f} s (chunks newly embedded: {embedder.computed}); "
              f"mean query {query_ms:.0f} ms")
        if writer is not None:
            print(f"hyde: {report['hyde']}")
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
