"""Run under `accelerate launch --multi_gpu --num_processes 2 ...`: streamed training data and labels.

1. `StreamingPairs` over the shards in argv[2] with 2 DataLoader workers per process, one epoch: each process writes
   the sample keys it read (the test checks every key exactly once over both processes).
2. The global-batch BCLS loss with streamed relevance labels (rebuilt across processes from the gathered caption
   embeddings the batches carry) equals the single-process loss on the concatenated batch, gradients too.
Writes `result-<rank>.json` into argv[1].
"""

from __future__ import annotations

import copy
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from trainer_bcls import BCLSDataCollator, build_tiny_model_and_processor
from trainer_bcls.data.streaming import StreamingPairs, shard_samples
from trainer_bcls.labels.caption_embedders import CaptionEmbedder, l2_normalize
from trainer_bcls.labels.streamed_relevance import StreamedRelevanceLabels
from trainer_bcls.training.global_loss import global_bcls_loss


class WordHashEmbedder(CaptionEmbedder):
    """Dense bag of hashed words: deterministic, no model."""

    @property
    def cache_key(self) -> str:
        return "word-hash-64"

    def embed(self, captions, show_progress_bar=True):
        out = np.zeros((len(captions), 64), dtype=np.float32)
        for i, caption in enumerate(captions):
            for word in caption.lower().split():
                out[i, zlib.crc32(word.encode()) % 64] += 1.0
        return l2_normalize(out)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main(out_dir: str, shard_dir: str) -> None:
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    result: dict = {"rank": rank, "world": world}

    pairs = StreamingPairs(shard_samples(str(Path(shard_dir) / "shard-*.tar")), epochs=1, shuffle_buffer=16)
    loader = torch.utils.data.DataLoader(pairs, batch_size=4, num_workers=2,
                                         collate_fn=lambda rows: [r["key"] for r in rows])
    result["keys"] = [key for batch in loader for key in batch]

    # 12 rows of one stream (a fixed order, whole samples with all their captions) split 6 / 6 over the processes
    rows = list(StreamingPairs(shard_samples(str(Path(shard_dir) / "shard-*.tar")), epochs=1, shuffle_buffer=0,
                               rank=0, world_size=1))[:12]
    rows[7] = {**rows[1], "caption": rows[1]["captions"][2], "caption_id": rows[1]["caption_id"] + 1}  # a cross-process positive
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor([c for r in rows for c in r["captions"]], image_size=32,
                                                      projection_dim=32, vision="vit")
    model.config.kendall_window_size = 3
    labels = StreamedRelevanceLabels(WordHashEmbedder(), use_cache=False)
    collator = BCLSDataCollator(processor, relevance=labels)
    full = collator(rows)
    local = collator(rows[rank * 6 : (rank + 1) * 6])
    reference = copy.deepcopy(model)
    ref_out = reference(**{k: v for k, v in full.items() if k not in ("reference_embeds", "reference_mask",
                                                                       "caption_embeds")})
    ref_out.loss.backward()
    ref_grads = grads_of(reference)
    ddp_model = accelerator.prepare(model)
    unwrapped = accelerator.unwrap_model(ddp_model)
    out = ddp_model(**{k: local[k] for k in ("pixel_values", "input_ids", "attention_mask")}, return_loss=False)
    loss = global_bcls_loss(unwrapped.config, out.image_embeds, out.text_embeds, local, labels)["loss"]
    loss.backward()
    grads = grads_of(unwrapped)
    result.update(
        reference_loss=ref_out.loss.item(),
        reference_kendall=ref_out.loss_kendall.item(),
        global_loss_mean=accelerator.reduce(loss.detach().clone(), reduction="mean").item(),
        max_grad_diff=max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads),
        relevance_off_diagonal_positive=float(full["relevance"][1, 7]),
    )
    Path(out_dir, f"result-{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
