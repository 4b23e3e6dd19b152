#!/usr/bin/env python
"""Retrieve with a BCLS model: embed a gallery once into an index, then search it by text or by image.

    python examples/retrieve.py index --model outputs/demo --images path/to/images --output gallery.idx
    python examples/retrieve.py search --index gallery.idx --query "a red circle" --top_k 5
    python examples/retrieve.py search --index gallery.idx --image photo.jpg --top_k 5
    python examples/retrieve.py serve --index gallery.idx --port 8000      # web page + JSON API (pip install bcls[serve])

`index` walks the folder recursively (or reads the image column of a `save_to_disk` folder / Hub dataset), embeds
in batches and saves `embeddings-<digest>.safetensors`, `index.faiss` (with faiss) and `index.json` in one step; run it again
to embed only new or changed images (deleted ones are dropped); `--index_type flat|ivf|hnsw|ivfpq|auto` chooses
the FAISS index (`auto`: by gallery size and `--max_index_memory`); under `accelerate launch --num_processes N`
each process embeds a share of the gallery and process 0 writes the one index (README, "Several processes"). `search` prints one JSON object per hit:
{"query", "rank", "path", "score"} (`--nprobe`, `--ef_search`, `--rescore` for approximate types). `serve` answers
`GET /search?q=...`, `POST /search` (an image) and `GET /` (a search page) on 127.0.0.1 unless `--host` says otherwise.

Without a sub-command, the one-off form embeds the folder for this call only:

    python examples/retrieve.py --model outputs/demo --images path/to/images --query "a red circle" --top_k 5
    python examples/retrieve.py --model outputs/demo --image photo.jpg --captions "a dog" "a cat" "a red circle"
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# `examples/evaluate.py` must not shadow the `evaluate` package: drop this folder from the import path, and add
# the repository root so that the scripts also run from a source checkout.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_bcls.cli import CliError, run_cli  # noqa: E402
from trainer_bcls.data.errors import InvalidDataError  # noqa: E402
from trainer_bcls.data.image_loading import MAX_IMAGE_PIXELS  # noqa: E402
from trainer_bcls.evaluation.split_evaluation import encode_texts  # noqa: E402
from trainer_bcls.retrieval import ann  # noqa: E402
from trainer_bcls.retrieval.image_sources import FolderSource, open_image_source  # noqa: E402
from trainer_bcls.retrieval.index import (  # noqa: E402
    RetrievalIndex,
    RetrievalModel,
    build_index,
    check_output_folder,
    embed_image_queries,
    embed_text_queries,
)

DEVICE_HELP = "cuda, mps, cpu, cuda:1, ... (default: cuda when available, else mps, else cpu)"


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--bf16", action="store_true", help="Run the model in bfloat16 (embeddings stay float32).")


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {value}")
        return value

    return parse


def _memory(text: str) -> int:
    try:
        return ann.parse_memory(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _check_queries(args: argparse.Namespace) -> None:
    for query in args.query:
        if not query.strip():
            raise CliError(f"--query {query!r} is empty: give the text to search for")


def _index_params(args: argparse.Namespace) -> dict[str, int]:
    given = {"nlist": args.nlist, "M": args.hnsw_m, "pq_m": args.pq_m}
    params = {key: value for key, value in given.items() if value is not None}
    if args.pq_m is not None and args.index_type not in ("ivfpq",):
        raise CliError(f"--pq_m applies to --index_type ivfpq, not {args.index_type or 'flat'}")
    if args.hnsw_m is not None and args.index_type != "hnsw":
        raise CliError(f"--hnsw_m applies to --index_type hnsw, not {args.index_type or 'flat'}")
    if args.nlist is not None and args.index_type not in ("ivf", "ivfpq"):
        raise CliError(f"--nlist applies to --index_type ivf or ivfpq, not {args.index_type or 'flat'}")
    if args.max_index_memory is not None and args.index_type != "auto":
        raise CliError(f"--max_index_memory applies to --index_type auto, not {args.index_type or 'flat'}")
    return params


def load_index_and_model(args: argparse.Namespace):
    """The index of `--index` (memory-mapped) and the model it was built with (or `--model`, checked)."""
    index = RetrievalIndex.load(args.index, mmap=True)
    try:
        model = RetrievalModel.from_pretrained(args.model or index.model_name, args.device, args.bf16)
    except FileNotFoundError as err:
        if args.model:
            raise
        raise CliError(f"the model the index was built with, {index.model_name}, is gone ({err}); pass --model "
                       "with the same weights") from err
    index.check_model(model.fingerprint, where=f"index {args.index}")
    return index, model


def _start_processes(device: str | None) -> tuple[int, int, str | None]:
    """Under `accelerate launch` with several processes: start the process group (Accelerate's `PartialState`),
    give each process cores / processes threads and its own device. Returns (rank, world, device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return 0, 1, device
    import torch
    from accelerate import PartialState

    from trainer_bcls.retrieval.parallel_index import threads_per_process

    # `cpu`: gloo processes (ACCELERATE_USE_CPU, `--device cpu` or no GPU), else one GPU per process (nccl)
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available() \
        or (device or "").startswith("cpu")
    state = PartialState(cpu=cpu)
    torch.set_num_threads(threads_per_process())
    return state.process_index, state.num_processes, device or str(state.device)


def index_command(args: argparse.Namespace) -> dict | None:
    check_output_folder(args.output)  # before the gallery is embedded, not after
    rank, world, device = _start_processes(args.device)
    source = open_image_source(args.images, args.split, args.image_column, max_pixels=args.max_image_pixels)
    model = RetrievalModel.from_pretrained(args.model, device, args.bf16)
    index, report = build_index(
        model, source, args.output, batch_size=args.batch_size, skip_invalid=args.skip_invalid,
        num_workers=args.num_workers, show_progress=not args.no_progress, index_type=args.index_type,
        index_params=_index_params(args), max_memory=args.max_index_memory,
    )  # fmt: skip
    own = report.rates[0] if rank else None
    if own is not None:  # process 0 prints the whole build's summary (stdout), with every process's rate
        line = json.dumps({"process": rank, "images": own.images, "seconds": round(own.seconds, 3),
                           "images_per_s": round(own.images_per_s, 2)})
        sys.stderr.write(line + "\n")  # one write: lines of several processes never interleave
        sys.stderr.flush()
        return None
    summary = {
        "index": str(args.output), "images": report.total, "added": report.added, "updated": report.updated,
        "removed": report.removed, "already_indexed": report.already_indexed, "skipped": len(report.skipped),
        "backend": index.backend, "index_type": index.index_type, "index_params": index.index_params,
        "processes": world, "images_per_s": [round(rate.images_per_s, 2) for rate in report.rates],
    }  # fmt: skip
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    return summary


def search_command(args: argparse.Namespace) -> list[dict]:
    if not args.query and not args.image:
        raise CliError("search needs --query TEXT and/or --image PATH")
    _check_queries(args)
    index, model = load_index_and_model(args)
    queries, labels = [], []
    if args.query:
        queries.append(embed_text_queries(model, args.query))
        labels += args.query
    if args.image:
        queries.append(embed_image_queries(model, args.image))
        labels += args.image
    import torch

    rows = []
    hit_lists = index.search(torch.cat(queries), args.top_k, nprobe=args.nprobe, ef_search=args.ef_search,
                             rescore=args.rescore)
    for label, hits in zip(labels, hit_lists):
        for hit in hits:
            row = {"query": label, "rank": hit.rank, "path": hit.path, "score": round(hit.score, 6)}
            print(json.dumps(row, ensure_ascii=False, allow_nan=False))
            rows.append(row)
    return rows


def one_off_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Embed the folder for this call only (no index saved) and/or rank captions for one image."""
    if not ((args.images and args.query) or args.image):
        parser.error("give --images with --query (text→image), or --image with --captions (image→text)")
    _check_queries(args)
    model = RetrievalModel.from_pretrained(args.model, args.device, args.bf16)
    output: dict = {}
    if args.images and args.query:
        index, report = build_index(model, FolderSource(args.images), None, skip_invalid=True, show_progress=False)
        if len(index) == 0:
            raise CliError(f"no readable images in {args.images}")
        if report.skipped:
            print(f"skipped {len(report.skipped)} unreadable file(s): {', '.join(k for k, _ in report.skipped)}",
                  file=sys.stderr)
        output["text_to_image"] = {}
        for query, hits in zip(args.query, index.search(embed_text_queries(model, args.query), args.top_k)):
            output["text_to_image"][query] = [(hit.path, hit.score) for hit in hits]
            print(f"\nquery: {query}")
            for hit in hits:
                print(f"  {hit.rank}. {hit.score:.4f}  {hit.path}")
    if args.image:
        captions = list(args.captions)
        if args.captions_file:
            captions += [line.strip() for line in Path(args.captions_file).read_text().splitlines() if line.strip()]
        if not captions:
            parser.error("--image needs --captions or --captions_file")
        image_embeds = embed_image_queries(model, [args.image])
        text_embeds = encode_texts(model.model, model.processor, captions, show_progress=False)
        scores = (image_embeds @ text_embeds.T)[0]
        order = scores.argsort(descending=True)[: args.top_k].tolist()
        output["image_to_text"] = [(captions[i], float(scores[i])) for i in order]
        print(f"\nimage: {args.image}")
        for rank, (caption, score) in enumerate(output["image_to_text"], 1):
            print(f"  {rank}. {score:.4f}  {caption}")
    return output


def _add_search_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nprobe", type=_positive("--nprobe"), default=None,
                        help="ivf/ivfpq: inverted lists scanned per query (default: the index's).")
    parser.add_argument("--ef_search", type=_positive("--ef_search"), default=None,
                        help="hnsw: breadth of the graph walk per query (default: the index's).")
    parser.add_argument("--rescore", action="store_true", help="Re-rank a wider approximate candidate list by the "
                        "exact scores of the stored embeddings.")


def serve_command(args: argparse.Namespace) -> None:
    if not (0 < args.port < 65536):
        raise CliError(f"--port must be in 1..65535, got {args.port}")
    if not args.max_upload_mb > 0:
        raise CliError(f"--max_upload_mb must be positive, got {args.max_upload_mb}")
    from trainer_bcls.retrieval.serve import create_app, run_server

    index, model = load_index_and_model(args)
    app = create_app(index, model, default_top_k=args.top_k, max_upload_bytes=int(args.max_upload_mb * 2**20),
                     nprobe=args.nprobe, ef_search=args.ef_search, rescore=args.rescore)
    print(json.dumps({"serving": str(args.index), "images": len(index), "backend": index.backend,
                      "url": f"http://{args.host}:{args.port}/"}), flush=True)
    run_server(app, args.host, args.port)


def build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="Embed a folder or dataset of images into an index folder.")
    index.add_argument("--model", required=True, help="A saved BCLS model folder (or Hub id).")
    index.add_argument("--images", required=True, help="A folder of images (recursive), webdataset shards "
                       "('shards/shard-{000000..000009}.tar', keyed by sample), a save_to_disk folder or a Hub dataset id.")
    index.add_argument("--output", required=True, help="Index folder (created, or extended with new images).")
    index.add_argument("--split", default=None, help="Dataset split (default: the only one, else train).")
    index.add_argument("--image_column", default=None, help="Dataset image column (default: image / first Image).")
    index.add_argument("--batch_size", type=_positive("--batch_size"), default=64)
    index.add_argument("--max_image_pixels", type=_positive("--max_image_pixels"), default=MAX_IMAGE_PIXELS,
                       help="Decode at most this many pixels per image (JPEGs at reduced scale, others refused); "
                       f"default {MAX_IMAGE_PIXELS}.")
    index.add_argument("--num_workers", type=int, default=0, help="DataLoader processes decoding images.")
    index.add_argument("--skip_invalid", action="store_true", help="Skip (and log) unreadable images, not fail.")
    index.add_argument("--no_progress", action="store_true", help="No progress bar.")
    index.add_argument("--index_type", choices=ann.REQUESTABLE_TYPES, default=None,
                       help="FAISS index: flat (exact), ivf, hnsw, ivfpq (approximate), auto (flat up to 50,000 "
                       "images, else ivf, or ivfpq to fit --max_index_memory). Default: the folder's, else flat.")
    index.add_argument("--max_index_memory", type=_memory, default=None,
                       help="Memory budget of the FAISS index for --index_type auto, e.g. 2G, 512M.")
    index.add_argument("--nlist", type=_positive("--nlist"), default=None, help="ivf/ivfpq lists (default ~2·√N).")
    index.add_argument("--hnsw_m", type=_positive("--hnsw_m"), default=None, help=f"hnsw links per node "
                       f"(default {ann.DEFAULT_HNSW_M}).")
    index.add_argument("--pq_m", type=_positive("--pq_m"), default=None, help="ivfpq bytes per vector (a divisor "
                       "of the dimension; default dim/4).")
    _add_device_args(index)

    search = commands.add_parser("search", help="Search an index by text and/or image; one JSON line per hit.")
    search.add_argument("--index", required=True)
    search.add_argument("--query", action="append", default=[], help="Text query (repeatable).")
    search.add_argument("--image", action="append", default=[], help="Image query file (repeatable).")
    search.add_argument("--top_k", type=_positive("--top_k"), default=10)
    search.add_argument("--model", default=None, help="Default: the model recorded in the index.")
    _add_search_args(search)
    _add_device_args(search)

    serve = commands.add_parser("serve", help="Serve an index: a search page (GET /) and a JSON API (/search).")
    serve.add_argument("--index", required=True)
    serve.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", default=None, help="Default: the model recorded in the index.")
    serve.add_argument("--top_k", type=_positive("--top_k"), default=12, help="Hits per query when not given.")
    serve.add_argument("--max_upload_mb", type=float, default=10.0, help="Largest accepted query image (MiB).")
    _add_search_args(serve)
    _add_device_args(serve)

    one_off = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    one_off.add_argument("--model", required=True)
    one_off.add_argument("--images", help="Folder of images to search (text→image; subfolders included).")
    one_off.add_argument("--query", action="append", default=[], help="Caption query (repeatable).")
    one_off.add_argument("--image", help="Image query (image→text).")
    one_off.add_argument("--captions", nargs="*", default=[], help="Candidate captions for --image.")
    one_off.add_argument("--captions_file", help="File with one candidate caption per line.")
    one_off.add_argument("--top_k", type=_positive("--top_k"), default=5)
    _add_device_args(one_off)
    return parser, one_off


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it picked
    parser, one_off = build_parsers()
    try:
        if argv and argv[0] in ("index", "search", "serve"):
            args = parser.parse_args(argv)
            commands = {"index": index_command, "search": search_command, "serve": serve_command}
            return commands[args.command](args)
        if argv and argv[0] in ("-h", "--help"):
            parser.print_help()
            raise SystemExit(0)
        return one_off_command(one_off.parse_args(argv), one_off)
    except (InvalidDataError, OSError, ValueError) as err:
        raise CliError(str(err)) from err


if __name__ == "__main__":
    sys.exit(run_cli(main))
