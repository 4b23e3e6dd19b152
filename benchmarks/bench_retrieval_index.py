#!/usr/bin/env python
"""Embed once and search an index vs re-embedding the folder for every query (the old `retrieve.py`).

    python benchmarks/bench_retrieval_index.py                      # 10,000 synthetic 64 px JPEGs, one thread
    python benchmarks/bench_retrieval_index.py --num_images 50000 --threads 2

Writes small synthetic JPEGs (coloured shapes, in 10 subfolders) to a temporary folder, saves a tiny random BCLS
model (ViT 64 px / patch 8 / hidden 64 / 2 layers + BERT hidden 64 / 2 layers, projection 128), then times:
the index build (walk + decode + embed + save), an incremental run adding `--add` new files, loading the index,
and per-query latency (embed the text + search, exact torch and FAISS), against the baseline of decoding and
embedding the whole folder for one query, and the peak memory increase of each in a fresh process. Prints a
markdown table; all ratios are against the baseline measured in the same process.

Then (issue 23) the index types at scale: `--ann_rows` (500,000) unit vectors of dim `--ann_dim` (256) drawn around
`--ann_centres` (2,000) random centres (real embeddings cluster; uniform random vectors model them badly), indexed as
flat / ivf / hnsw / ivfpq (+ exact rescoring): build time and peak RSS increase while building, recall@10 against
the exact index, median single-query latency over `--ann_queries` queries (one thread), and the peak RSS increase of
a fresh process that loads the saved index memory-mapped and searches it. And `serve` on the image index: the median
latency of `--serve_requests` text queries (GET /search) from a client in this process, over one keep-alive connection
to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE_WORDS = ["red", "green", "blue", "yellow", "circle", "square", "box", "triangle", "big", "small", "left", "right"]


def write_jpegs(folder: Path, start: int, count: int, size: int, seed: int) -> None:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        sub = folder / f"part{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(2):
            x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
            x1, y1 = x0 + int(rng.integers(8, size // 2)), y0 + int(rng.integers(8, size // 2))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
        image.save(sub / f"img{i:06d}.jpg", quality=90)


def reembed_folder_per_query(retrieval_model, folder: Path, query: str, top_k: int, batch_size: int):
    """The old retrieve.py: decode every image into memory, embed them all, score the query, top k."""
    import torch
    from PIL import Image

    from trainer_bcls.evaluation.split_evaluation import encode_images, encode_texts
    from trainer_bcls.retrieval.image_sources import IMAGE_SUFFIXES

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    model, processor = retrieval_model.model, retrieval_model.processor
    image_embeds = encode_images(model, processor, images, batch_size=batch_size, show_progress=False)
    text_embeds = encode_texts(model, processor, [query], show_progress=False)
    top = torch.topk((text_embeds @ image_embeds.T)[0], k=top_k)
    return [str(paths[i]) for i in top.indices]


def peak_rss_mib(kind: str, images: Path, model: Path, batch_size: int, threads: int) -> float:
    """Peak resident memory of a fresh process that runs only the baseline or only the index build."""
    import subprocess

    output = subprocess.run(
        [sys.executable, __file__, "--_memory_probe", kind, str(images), str(model), str(batch_size), str(threads)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return float(output.strip().splitlines()[-1])


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_probe(kind: str, images: str, model: str, batch_size: str, threads: str) -> None:
    """Peak RSS increase (sampled every 5 ms, Linux) while running only `kind`; printed in MiB."""
    import threading

    import torch

    from trainer_bcls.retrieval.image_sources import FolderSource
    from trainer_bcls.retrieval.index import RetrievalModel, build_index, faiss_available

    torch.set_num_threads(int(threads))
    retrieval_model = RetrievalModel.from_pretrained(model, device="cpu")
    faiss_available()  # libraries loaded and one batch run before measuring: the increase is the data's
    with torch.no_grad():
        size = retrieval_model.model.config.vision_config.image_size
        retrieval_model.model.encode_image(torch.zeros(int(batch_size), 3, size, size))
    start, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if kind == "baseline":
        reembed_folder_per_query(retrieval_model, Path(images), "a red circle", 10, int(batch_size))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build_index(retrieval_model, FolderSource(images), tmp, batch_size=int(batch_size), show_progress=False)
    done.set()
    sampler.join()
    print(max(peak[0], _rss_mib()) - start)


def clustered_vectors(rows: int, dim: int, centres: int, seed: int) -> np.ndarray:
    """Unit vectors around `centres` random unit centres; cosine to their centre about 0.7 (like image embeddings
    of one subject), to their nearest neighbour about 0.5."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    out = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 65536):
        n = min(65536, rows - start)
        block = c[rng.integers(0, centres, n)] + rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
        out[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def _anon_mib() -> float:
    """Anonymous resident memory (MiB): what must fit in RAM; mapped file pages (RssFile) can be dropped and reread."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024


class PeakRss:
    """Peak RSS increase (MiB, `mib`) and peak anonymous-memory increase (`anon_mib`) while the `with` block runs,
    sampled every 5 ms (Linux)."""

    def __enter__(self):
        import threading

        self.start, self.peak, self._done = _rss_mib(), _rss_mib(), threading.Event()
        self.anon_start = self.anon_peak = _anon_mib()

        def sample() -> None:
            while not self._done.wait(0.005):
                self.peak = max(self.peak, _rss_mib())
                self.anon_peak = max(self.anon_peak, _anon_mib())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.mib = max(self.peak, _rss_mib()) - self.start
        self.anon_mib = max(self.anon_peak, _anon_mib()) - self.anon_start


def search_probe(folder: str, queries_file: str, top_k: str, rescore: str) -> None:
    """Fresh process: load `folder` memory-mapped, search the saved queries one at a time; peak RSS increase (MiB)."""
    import faiss

    from trainer_bcls.retrieval.index import RetrievalIndex

    faiss.omp_set_num_threads(1)
    queries = np.load(queries_file)
    with PeakRss() as peak:
        index = RetrievalIndex.load(folder, mmap=True)
        for q in queries:
            index.search(q[None], int(top_k), rescore=rescore == "1")
    print(peak.anon_mib, peak.mib)


def ann_table(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Index types on `--ann_rows` clustered vectors: build, recall@10 vs flat, latency, memory."""
    import subprocess

    import faiss
    import torch

    from trainer_bcls.retrieval import ann
    from trainer_bcls.retrieval.index import RetrievalIndex

    data = clustered_vectors(args.ann_rows + args.ann_queries, args.ann_dim, args.ann_centres, seed=7)
    x, queries = torch.from_numpy(data[: args.ann_rows]), data[args.ann_rows :]
    np.save(tmp / "ann_queries.npy", queries)
    paths = [f"vec{i:07d}" for i in range(args.ann_rows)]
    rows, truth = [], None
    for kind, rescore in (("flat", False), ("ivf", False), ("hnsw", False), ("ivfpq", False), ("ivfpq", True)):
        if not rescore:  # the rescore row searches the ivfpq index just built
            index = RetrievalIndex(x, paths, "m", "sha256:bench", index_type=kind)
            faiss.omp_set_num_threads(args.ann_build_threads)
            with PeakRss() as build_peak:
                started = time.perf_counter()
                index._faiss()
                build = time.perf_counter() - started
        faiss.omp_set_num_threads(1)
        index.search(queries[:1], args.top_k)  # warm-up
        latencies, found = [], []
        for q in queries:
            started = time.perf_counter()
            hits = index.search(q[None], args.top_k, rescore=rescore)[0]
            latencies.append(time.perf_counter() - started)
            found.append({h.path for h in hits})
        truth = found if kind == "flat" else truth
        recall = float(np.mean([len(f & t) / args.top_k for f, t in zip(found, truth)]))
        folder = tmp / f"ann_{kind}"
        if not folder.exists():
            index.save(folder)
        search_peak = None if args.no_memory else [float(v) for v in subprocess.run(
            [sys.executable, __file__, "--_search_probe", str(folder), str(tmp / "ann_queries.npy"), str(args.top_k),
             "1" if rescore else "0"], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            .split()]
        faiss_file = next(folder.glob("index-*.faiss"), None)
        rows.append({"type": kind + (" + rescore" if rescore else ""), "params": dict(index.index_params,
                     **ann.default_search(index.index_type, index.index_params), **index.search_defaults) or "", "build_s": build,
                     "build_peak_mib": build_peak.mib, "recall": recall,
                     "latency_ms": statistics.median(latencies) * 1e3, "search_peak_mib": search_peak,
                     "faiss_mib": faiss_file.stat().st_size / 2**20 if faiss_file else 0.0})
    del index
    flat_ms = rows[0]["latency_ms"]
    print(f"\nIndex types: {args.ann_rows} unit vectors of dim {args.ann_dim} around {args.ann_centres} centres, "
          f"{args.ann_queries} queries from the same distribution, top {args.top_k}; builds on "
          f"{args.ann_build_threads} FAISS thread(s), queries on 1")
    print("\n| type | parameters (search) | build | build peak RSS | FAISS file | recall@10 vs flat | query latency "
          "| vs flat | search peak memory (mmap, fresh process): anonymous / RSS with mapped pages |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        row["speedup"] = flat_ms / row["latency_ms"]
        search_peak = "" if row["search_peak_mib"] is None else \
            f"{row['search_peak_mib'][0]:.0f} / {row['search_peak_mib'][1]:.0f} MiB"
        print(f"| {row['type']} | {row['params']} | {row['build_s']:.1f} s | {row['build_peak_mib']:.0f} MiB | "
              f"{row['faiss_mib']:.0f} MiB | {row['recall']:.3f} | {row['latency_ms']:.2f} ms | {row['speedup']:.0f}× | "
              f"{search_peak} |")
    return rows


def serve_latency(args: argparse.Namespace, index_folder: Path, retrieval_model, queries: list[str]) -> float:
    """Median milliseconds of `--serve_requests` GET /search text queries against `serve` on 127.0.0.1."""
    import http.client
    import json
    import urllib.parse

    from trainer_bcls.retrieval.index import RetrievalIndex
    from trainer_bcls.retrieval.serve import create_app, running_server

    index = RetrievalIndex.load(index_folder, mmap=True)
    app = create_app(index, retrieval_model, default_top_k=args.top_k)
    latencies = []
    with running_server(app, "127.0.0.1") as url:
        port = int(url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for i in range(args.serve_requests + 5):
                query = urllib.parse.quote(queries[i % len(queries)])
                started = time.perf_counter()
                connection.request("GET", f"/search?q={query}&top_k={args.top_k}")
                response = connection.getresponse()
                body = json.loads(response.read())
                elapsed = time.perf_counter() - started
                assert response.status == 200 and len(body["hits"]) == args.top_k, body
                if i >= 5:  # the first few warm up
                    latencies.append(elapsed)
        finally:
            connection.close()
    return statistics.median(latencies) * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_memory_probe":
        return memory_probe(*argv[1:])
    if argv and argv[0] == "--_search_probe":
        return search_probe(*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=10_000)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--add", type=int, default=100, help="New files for the incremental run.")
    parser.add_argument("--num_queries", type=int, default=20)
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="Alternated baseline / build runs (minimum kept).")
    parser.add_argument("--no_memory", action="store_true", help="Skip the peak-memory runs (fresh processes).")
    parser.add_argument("--ann_rows", type=int, default=500_000, help="Vectors for the index-type table (0: skip).")
    parser.add_argument("--ann_dim", type=int, default=256)
    parser.add_argument("--ann_centres", type=int, default=2_000)
    parser.add_argument("--ann_queries", type=int, default=300)
    parser.add_argument("--ann_build_threads", type=int, default=2, help="FAISS threads while building.")
    parser.add_argument("--serve_requests", type=int, default=200, help="Text queries sent to serve (0: skip).")
    args = parser.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, threadpool_limits)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, threadpool_limits) -> list[dict]:
    import torch

    from trainer_bcls.retrieval.image_sources import FolderSource
    from trainer_bcls.retrieval.index import (
        RetrievalIndex,
        RetrievalModel,
        build_index,
        embed_text_queries,
        faiss_available,
    )
    from trainer_bcls.towers.tiny_towers import build_tiny_model_and_processor

    rows: list[dict] = []
    with threadpool_limits(limits=args.threads), tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        write_jpegs(tmp / "images", 0, args.num_images, args.image_size, seed=0)
        generated = time.perf_counter() - started
        torch.manual_seed(0)
        model, processor = build_tiny_model_and_processor(SHAPE_WORDS, image_size=64, projection_dim=128, vision="vit")
        num_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / "model")
        retrieval_model = RetrievalModel.from_pretrained(str(tmp / "model"), device="cpu")
        rng = np.random.default_rng(1)
        queries = [" ".join(rng.choice(SHAPE_WORDS, size=3)) for _ in range(args.num_queries)]
        print(f"{args.num_images} JPEGs of {args.image_size} px written in {generated:.1f} s; model "
              f"{num_params / 1e6:.2f} M parameters; {args.threads} thread(s); faiss: {faiss_available()}")

        # baseline (re-embed the whole folder for one query) and the one-shot build, alternated `--repeats` times;
        # the minimum of each is kept (the machine may be shared)
        baselines, builds = [], []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            baseline_hits = reembed_folder_per_query(retrieval_model, tmp / "images", queries[0], args.top_k,
                                                     args.batch_size)
            baselines.append(time.perf_counter() - started)
            shutil.rmtree(tmp / "idx", ignore_errors=True)
            started = time.perf_counter()
            _, report = build_index(retrieval_model, FolderSource(tmp / "images"), tmp / "idx",
                                    batch_size=args.batch_size, show_progress=False)
            builds.append(time.perf_counter() - started)
        baseline, build = min(baselines), min(builds)
        print(f"re-embedding runs: {', '.join(f'{t:.1f}' for t in baselines)} s; "
              f"builds: {', '.join(f'{t:.1f}' for t in builds)} s")
        assert report.added == args.num_images
        index = RetrievalIndex.load(tmp / "idx")
        hits = [h.path for h in index.search(embed_text_queries(retrieval_model, queries[:1]), args.top_k)[0]]
        print(f"top-{args.top_k} of the index equal to the re-embedding baseline's: "
              f"{hits == [str(Path(p).resolve()) for p in baseline_hits]}")

        write_jpegs(tmp / "images", args.num_images, args.add, args.image_size, seed=1)
        started = time.perf_counter()
        _, report = build_index(retrieval_model, FolderSource(tmp / "images"), tmp / "idx",
                                batch_size=args.batch_size, show_progress=False)
        incremental = time.perf_counter() - started
        assert report.added == args.add and report.already_indexed == args.num_images

        memory = {} if args.no_memory else {
            kind: peak_rss_mib(kind, tmp / "images", tmp / "model", args.batch_size, args.threads)
            for kind in ("baseline", "build")
        }

        backends = ["exact"] + (["faiss"] if faiss_available() else [])
        load_times, query_times, search_times = {}, {}, {}
        for backend in backends:
            started = time.perf_counter()
            index = RetrievalIndex.load(tmp / "idx", use_faiss=backend == "faiss")
            load_times[backend] = time.perf_counter() - started
            index.search(embed_text_queries(retrieval_model, queries[:1]), args.top_k)  # warm-up
            per_query, per_search = [], []
            for query in queries:
                started = time.perf_counter()
                embeds = embed_text_queries(retrieval_model, [query])
                middle = time.perf_counter()
                hits = index.search(embeds, args.top_k)
                per_query.append(time.perf_counter() - started)
                per_search.append(time.perf_counter() - middle)
            query_times[backend], search_times[backend] = statistics.median(per_query), statistics.median(per_search)
        serve_ms = serve_latency(args, tmp / "idx", retrieval_model, queries) if args.serve_requests else None
        ann_rows = ann_table(args, tmp) if args.ann_rows else []

    n, total = args.num_images, args.num_images + args.add
    rows.append({"step": f"re-embed the folder per query (old retrieve.py), {n} images", "seconds": baseline,
                 "per_query_ms": baseline * 1e3, "ratio": 1.0, **({"peak_mib": memory["baseline"]} if memory else {})})
    rows.append({"step": f"build index, {n} images (walk + decode + embed + save)", "seconds": build,
                 **({"peak_mib": memory["build"]} if memory else {})})
    rows.append({"step": f"incremental run: +{args.add} new files ({total} walked)", "seconds": incremental})
    for backend in backends:
        rows.append({"step": f"load index ({total} rows, {backend})", "seconds": load_times[backend]})
        rows.append({"step": f"query: embed text + {backend} search, top {args.top_k}", "seconds": None,
                     "per_query_ms": query_times[backend] * 1e3, "ratio": baseline / query_times[backend],
                     "search_ms": search_times[backend] * 1e3})
    print("\n| step | time | per query | speed-up vs re-embedding | peak memory increase |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        seconds = row.get("seconds")
        seconds = "" if seconds is None else (f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms")
        per_query = f"{row['per_query_ms']:.1f} ms" if "per_query_ms" in row else ""
        if "search_ms" in row:
            per_query += f" (search {row['search_ms']:.2f} ms)"
        ratio = f"{row['ratio']:.0f}×" if "ratio" in row else ""
        peak = f"{row['peak_mib']:.0f} MiB" if "peak_mib" in row else ""
        print(f"| {row['step']} | {seconds} | {per_query} | {ratio} | {peak} |")
    print(f"\nThe index pays for itself after {build / baseline:.2f} queries' worth of re-embedding.")
    if serve_ms is not None:
        print(f"\nserve: median latency of a text query (GET /search, top {args.top_k}, {total} images, "
              f"{args.serve_requests} requests over one keep-alive connection to 127.0.0.1): {serve_ms:.1f} ms")
        rows.append({"step": "serve text query", "serve_median_ms": serve_ms})
    return rows + [{"step": f"index type {row['type']}", **row} for row in ann_rows]


if __name__ == "__main__":
    main()
