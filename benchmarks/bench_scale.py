#!/usr/bin/env python
"""Peak memory and time of one BCLS training step against batch size, with and without gradient caching.

    python benchmarks/bench_scale.py [--batch_sizes 64 128 256 512] [--chunk 32]

Each configuration runs in a fresh subprocess (one step of `BCLSTrainer.compute_loss` + backward on random
images and captions with a BCLS loss incl. Kendall SW-HS), and reports the peak resident memory of that process
(`ru_maxrss`) minus its memory after building the model and batch, so the figure is the step's activations and
gradients. Towers: a ViT (64x64, 8x8 patches, hidden 256, 4 layers) and a BERT (hidden 256, 4 layers, 32 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_step(batch_size: int, chunk: int | None) -> dict:
    import torch
    from transformers import BertConfig, ViTConfig

    sys.path.insert(0, str(ROOT))
    from modeling_bcls import BCLSConfig, BCLSModel
    from trainer_bcls.training.global_loss import global_bcls_loss
    from trainer_bcls.training.gradcache import cached_embeddings

    torch.manual_seed(0)
    config = BCLSConfig.from_vision_text_configs(
        ViTConfig(image_size=64, patch_size=8, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=1024),
        BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                   intermediate_size=1024, max_position_embeddings=64, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0),  # no dropout: chunked and full losses must agree
        projection_dim=256, text_pooling="mean",
    )
    model = BCLSModel(config).train()
    features = {
        "pixel_values": torch.randn(batch_size, 3, 64, 64),
        "input_ids": torch.randint(5, 1000, (batch_size, 32)),
        "attention_mask": torch.ones(batch_size, 32, dtype=torch.long),
    }
    image_ids = torch.arange(batch_size) // 2  # two captions per image
    relevance = torch.rand(batch_size, batch_size)
    relevance[image_ids[:, None] == image_ids[None, :]] = 1.0
    labels = {"image_ids": image_ids, "relevance": relevance}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if chunk is None:
        out = model(**features, return_loss=False)
        loss = global_bcls_loss(config, out.image_embeds, out.text_embeds, labels)["loss"]
    else:
        loss, _, _ = cached_embeddings(
            model, features, chunk, lambda i, t: global_bcls_loss(config, i, t, labels)
        )
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - base) / 1024, "seconds": seconds, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        batch_size, chunk = int(args.child[0]), None if args.child[1] == "none" else int(args.child[1])
        print(json.dumps(one_step(batch_size, chunk)))
        return

    rows = []
    for batch_size in args.batch_sizes:
        results = {}
        for chunk in (None, args.chunk):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(batch_size), "none" if chunk is None else str(chunk)],
                capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            results[chunk] = json.loads(out.stdout.strip().splitlines()[-1])
        full, cached = results[None], results[args.chunk]
        rows.append((batch_size, full, cached))
        assert abs(full["loss"] - cached["loss"]) < 1e-4, (full, cached)

    print(f"\nOne BCLS training step (fwd+bwd), peak RSS increase of a fresh process; chunk = {args.chunk} rows\n")
    print("| batch | no chunks: peak MiB | no chunks: s | GradCache: peak MiB | GradCache: s | memory ratio | time ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch_size, full, cached in rows:
        print(f"| {batch_size} | {full['peak_mib']:.0f} | {full['seconds']:.2f} | {cached['peak_mib']:.0f} | "
              f"{cached['seconds']:.2f} | {cached['peak_mib'] / max(full['peak_mib'], 1e-9):.2f} | "
              f"{cached['seconds'] / full['seconds']:.2f} |")


if __name__ == "__main__":
    main()
