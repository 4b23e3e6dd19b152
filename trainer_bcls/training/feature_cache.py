"""Lock-boundary caches: every image and caption of the training split goes through the frozen part of its tower once.

For a tower frozen with `freeze_tower`, ``tower = tail ∘ head`` with a fixed ``head`` (eval mode, no gradient):

- **locked tower** (no trainable group): the cache holds its pooled output ``pool(tower(x))`` per image / caption
  and a step feeds the model ``vision_pooled_output`` / ``text_pooled_output``; only the projections run;
- **partly unlocked** (`--vision_unlocked_layers N`, `--text_unlocked_layers N`): it holds the states at the lock
  boundary (`lock_boundary.LockBoundary`: token states of a caption without padding, a CNN feature map or ViT
  tokens of an image) and a step runs only the trainable tail on them, captions in chunks of similar length.

`BCLSTrainer.train` builds the caches before the first step (`build_feature_caches`): the unique images of the pair
view (by ``image_id``) and its captions (by ``caption_id``) are run through the heads in batches, on every process a
share (then all-gathered), and the collator stops decoding images / tokenising captions whose features are cached.
So the loss and every gradient are those of the uncached step (the frozen head is a fixed function; tested), and a
warm step costs what a training loop over precomputed features costs.

Keys (what decides that a cached row is still right): a row's identity — the image file's absolute path, size and
mtime, or a SHA-256 of the image bytes held in the dataset; the caption text — together with a *context*: the
tower's weights fingerprint, the boundary, the pooling, the image processor's configuration or the tokenizer and
``max_length``, and the precision. With `feature_cache_dir` every cache is persisted there (`feature_store`:
safetensors shards + a JSON manifest per context), so a second run, seed or setting only computes what is new; a
cache above `feature_cache_max_gb` is memory-mapped from disk instead of held in memory.

Not cached: images under random augmentation (the collator's `image_transform`: pixels differ every epoch), towers
whose trainable part includes the embeddings, partly unlocked towers under GradCache (`embedding_chunk_size`), and a
tower whose forward cannot be cut (the tail on captured states does not reproduce the full forward, e.g. CLIP's text
tower, which pools at the EOS token of ``input_ids``): each is logged once and runs its full forward every step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..data.errors import InvalidDataError
from ..data.image_loading import ImageLoadError, load_image
from ..distributed import gather_no_grad, is_distributed, process_sizes
from ..fingerprint import weights_fingerprint
from .feature_store import FeatureStore, PackedRows, ShardedRows
from .lock_boundary import LockBoundary
from .tower_freezing import is_tower_locked

logger = logging.getLogger(__name__)

CHECK_TOLERANCE = 1e-4  # relative to the output's scale; float rounding of a cut forward is ~1e-6
TEXT_TAIL_CHUNK = 32  # captions per tail call, sorted by length (less padding)


@dataclass
class TowerFeatureCache:
    """The cached rows of one tower: `mode` "pooled" (locked tower) or "boundary" (partly unlocked)."""

    kind: str
    mode: str
    rows: PackedRows | ShardedRows
    row_of_id: np.ndarray  # dense id (image_id / caption_id) -> row, -1 when not cached
    boundary: LockBoundary | None = None
    computed: int = 0
    loaded: int = 0
    location: str = "memory"
    seconds: float = 0.0  # spent computing rows (cold part)
    tower_seconds: float = 0.0  # of which in the image tower's forward

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def describe(self) -> str:
        what = "pooled outputs" if self.mode == "pooled" else f"lock-boundary states ({self.boundary.blocks}[{self.boundary.first_trainable}:] trains)"
        rate = f", {self.computed / self.seconds:,.1f}/s" if self.computed and self.seconds > 0 else ""
        return (f"{self.kind} {what}: {len(self.rows):,} rows, {self.nbytes / 2**20:,.1f} MiB {self.location} "
                f"({self.loaded:,} read from the cache folder, {self.computed:,} computed in {self.seconds:.1f} s{rate})")

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.from_numpy(self.row_of_id[ids.cpu().numpy()])
        if (rows < 0).any():
            raise KeyError(f"{self.kind} feature cache: ids {ids[rows < 0][:5].tolist()} were not cached")
        return rows


@dataclass
class FeatureCaches:
    """The caches of both towers (either may be None) and the ids the collator must skip (bad images)."""

    vision: TowerFeatureCache | None = None
    text: TowerFeatureCache | None = None
    invalid_image_ids: set[int] = field(default_factory=set)

    def __bool__(self) -> bool:
        return self.vision is not None or self.text is not None


# ---------------------------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------------------------
def image_identity(value: Any) -> str:
    """A string that changes when the image changes: file path + size + mtime, or a digest of the bytes."""
    path = value.get("path") if isinstance(value, dict) else (os.fspath(value) if isinstance(value, (str, os.PathLike)) else None)
    data = value.get("bytes") if isinstance(value, dict) else (value if isinstance(value, bytes) else None)
    if data is not None:
        return "sha256:" + hashlib.sha256(data).hexdigest()[:32]
    if path:
        stat = os.stat(path)
        return f"file:{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    if hasattr(value, "tobytes"):  # a decoded PIL image or an array
        return "pixels:" + hashlib.sha256(value.tobytes()).hexdigest()[:32]
    raise InvalidDataError(f"cannot identify image value of type {type(value).__name__}")


def _context_hash(context: dict) -> str:
    return hashlib.sha256(json.dumps(context, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------------------------------------------
# Computing rows
# ---------------------------------------------------------------------------------------------------------------------
def _pack_tokens(states: torch.Tensor, mask: torch.Tensor) -> PackedRows:
    lengths = mask.sum(dim=1).to(torch.int64)
    return PackedRows(states[mask.bool()].float().cpu(), lengths.cpu())


def _pack_fixed(values: torch.Tensor) -> PackedRows:
    return PackedRows(values.float().cpu().contiguous(), torch.ones(len(values), dtype=torch.int64))


def _text_inputs(processor, captions: list[str], max_length: int | None, device) -> dict[str, torch.Tensor]:
    tokens = processor(text=captions, padding=True, truncation=max_length is not None, max_length=max_length,
                       return_tensors="pt")
    return {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _image_batch(processor, values: list[Any], ids: list[int], skip_invalid: bool, invalid: set[int]):
    images, kept = [], []
    for value, image_id in zip(values, ids):
        try:
            images.append(load_image(value, where=f"image_id {image_id}"))
            kept.append(image_id)
        except ImageLoadError as error:
            if not skip_invalid:
                raise
            invalid.add(image_id)
            logger.warning("feature cache: skipping a bad image: %s", error)
    if not images:
        return None, kept
    return processor(images=images, return_tensors="pt")["pixel_values"].to(torch.float32), kept


class _Builder:
    """Computes the rows of one tower for a list of items (this process's share), in batches."""

    def __init__(self, model: nn.Module, kind: str, mode: str, boundary: LockBoundary | None, processor,
                 max_length: int | None, autocast: Callable, batch_size: int):
        self.model, self.kind, self.mode, self.boundary = model, kind, mode, boundary
        self.processor, self.max_length, self.autocast, self.batch_size = processor, max_length, autocast, batch_size
        self.device = next(model.parameters()).device

    tower_seconds = 0.0  # time spent in the tower's forward (the rest of a fill is decoding and preprocessing)

    @torch.no_grad()
    def vision_rows(self, pixel_values: torch.Tensor) -> PackedRows:
        pixel_values = pixel_values.to(self.device)
        start = time.perf_counter()
        with self.autocast():
            if self.mode == "pooled":
                rows = _pack_fixed(self.model._pool_image(pixel_values))
            else:
                rows = _pack_fixed(self.boundary.capture(self.model.vision_model, pixel_values=pixel_values))
        self.tower_seconds += time.perf_counter() - start
        return rows

    @torch.no_grad()
    def text_rows(self, captions: list[str]) -> PackedRows:
        inputs = _text_inputs(self.processor, captions, self.max_length, self.device)
        with self.autocast():
            if self.mode == "pooled":
                return _pack_fixed(self.model._text_tower(**inputs)[1])
            states = self.boundary.capture(self.model.text_model, **inputs)
        return _pack_tokens(states, inputs["attention_mask"])


# ---------------------------------------------------------------------------------------------------------------------
# Using rows
# ---------------------------------------------------------------------------------------------------------------------
def cached_vision_pooled(model: nn.Module, cache: TowerFeatureCache, image_ids: torch.Tensor, autocast: Callable) -> torch.Tensor:
    """The batch's pooled vision output [B, vision_embed_dim] from the cache (with the tail's graph in boundary mode)."""
    rows = cache.lookup(image_ids)
    device = image_ids.device
    values = cache.rows.stacked(rows).to(device)
    if cache.mode == "pooled":
        return values
    tower = model.vision_model
    with autocast(), cache.boundary.tail_only(tower):
        outputs = tower(pixel_values=values.to(next(tower.parameters()).dtype), return_dict=True)
        return model._pool(outputs, model.config.vision_pooling, None, "vision")


def cached_text_pooled(model: nn.Module, cache: TowerFeatureCache, caption_ids: torch.Tensor, autocast: Callable,
                       chunk: int = TEXT_TAIL_CHUNK) -> torch.Tensor:
    """The batch's pooled text output [B, text_embed_dim]; in boundary mode the tail runs on chunks of captions of
    similar length (each caption's output does not depend on the others' padding)."""
    rows = cache.lookup(caption_ids)
    device = caption_ids.device
    if cache.mode == "pooled":
        return cache.rows.stacked(rows).to(device)
    tower = model.text_model
    dtype = next(tower.parameters()).dtype
    order = torch.argsort(cache.rows.lengths[rows], stable=True)
    pooled = []
    with autocast(), cache.boundary.tail_only(tower):
        for part in order.split(chunk):
            states, mask = cache.rows.padded(rows[part])
            states, mask = states.to(device=device, dtype=dtype), mask.to(device)
            outputs = tower(inputs_embeds=states, attention_mask=mask, return_dict=True)
            pooled.append(model._pool(outputs, model.config.text_pooling, mask, "text"))
    return torch.cat(pooled)[torch.argsort(order)]


# ---------------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------------
def _tower_mode(tower: nn.Module, kind: str) -> tuple[str | None, LockBoundary | None, str]:
    if not any(p.requires_grad for p in tower.parameters()):
        if is_tower_locked(tower):
            return "pooled", None, ""
        return None, None, f"the {kind} tower has no trainable parameter but some module trains (dropout/BatchNorm)"
    try:
        boundary = LockBoundary.of(tower)
    except ValueError as error:
        return None, None, str(error)
    if boundary is None:
        return None, None, ""
    return "boundary", boundary, ""


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    flags = {m: m.training for m in module.modules()}
    for m in module.modules():
        nn.Module.train(m, False)
    try:
        yield
    finally:
        for m, flag in flags.items():
            nn.Module.train(m, flag)


def _check_boundary(model: nn.Module, kind: str, builder: _Builder, sample: Any, autocast: Callable) -> str:
    """'' when the tail on captured states reproduces the full forward on `sample` (eval mode), else why not."""
    tower = getattr(model, f"{kind}_model")
    try:
        with _eval_mode(tower), torch.no_grad(), autocast():
            if kind == "vision":
                full = model._pool_image(sample.to(builder.device))
                rows = builder.vision_rows(sample)
                cache = TowerFeatureCache(kind, "boundary", rows, np.arange(len(rows)), builder.boundary)
                cut = cached_vision_pooled(model, cache, torch.arange(len(rows)).to(builder.device), autocast)
            else:
                inputs = _text_inputs(builder.processor, sample, builder.max_length, builder.device)
                full = model._text_tower(**inputs)[1]
                rows = builder.text_rows(sample)
                cache = TowerFeatureCache(kind, "boundary", rows, np.arange(len(rows)), builder.boundary)
                cut = cached_text_pooled(model, cache, torch.arange(len(rows)).to(builder.device), autocast)
    except Exception as error:  # a forward that cannot be cut this way
        return f"{type(error).__name__}: {error}"
    scale = float(full.float().abs().max().clamp(min=1.0))
    difference = float((full.float() - cut.float()).abs().max())
    if difference > CHECK_TOLERANCE * scale:
        return f"the tail on captured states differs from the full forward by {difference:.3g}"
    return ""


def _share_and_compute(items: list[int], prepare: Callable, compute: Callable, batch_size: int, device,
                       show_progress: bool = False, description: str = "") -> tuple[list[int], PackedRows | None]:
    """Compute rows for `items` split over the processes (process r takes items[r::W]), all-gathered.
    `prepare(chunk)` builds a batch's inputs (image decoding, preprocessing: run one batch ahead in a thread, which
    PIL's decoding lets run beside the tower's forward); `compute(prepared)` returns (rows, the items they belong
    to, in row order) or None. Returns (the items in the gathered row order, their rows)."""
    from concurrent.futures import ThreadPoolExecutor

    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
    mine = items[rank::world]
    parts, kept = [], []
    chunks = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
    progress = None
    if show_progress and len(chunks) > 1:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(chunks), desc=description, unit="batch")
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            prepared = pending.result()
            pending = pool.submit(prepare, chunks[k + 1]) if k + 1 < len(chunks) else None
            result = compute(prepared)
            if progress is not None:
                progress.update()
            if result is None:
                continue
            rows, chunk_kept = result
            parts.append(rows)
            kept += chunk_kept
    if progress is not None:
        progress.close()
    local = PackedRows.concat(parts) if parts else None
    if world == 1:
        return kept, local
    # gather the kept items (ints), their lengths and values (first dims differ per process)
    all_items = gather_no_grad(torch.tensor(kept, dtype=torch.int64, device=device))
    lengths = local.lengths.to(device) if local is not None else torch.zeros(0, dtype=torch.int64, device=device)
    all_lengths = gather_no_grad(lengths)
    width = tuple(local.values.shape[1:]) if local is not None else None
    widths = [None] * world
    torch.distributed.all_gather_object(widths, width)
    width = next(w for w in widths if w is not None)
    values = local.values.to(device) if local is not None else torch.zeros((0, *width), device=device)
    all_values = gather_no_grad(values, process_sizes(values.shape[0], device))
    return all_items.cpu().tolist(), PackedRows(all_values.cpu(), all_lengths.cpu())


# Keys of a saved image processor's config that say how to load it, not how it makes pixels (`save_pretrained` adds
# `auto_map` for remote code): a model reloaded from its folder must find the caches its training run filled.
PROCESSOR_LOADING_KEYS = ("auto_map", "processor_class", "_processor_class")


def _tokenizer_identity(tokenizer) -> list:
    """The tokenizer by what it does (class, vocabulary digest, lower-casing), not by the folder it was loaded from:
    a model reloaded from its saved folder must find the text caches its training run filled."""
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    digest = hashlib.sha256(vocabulary.encode()).hexdigest()[:16]
    return [type(tokenizer).__name__, digest, len(tokenizer), tokenizer.init_kwargs.get("do_lower_case")]


def _pixel_config(image_processor) -> dict:
    return _jsonable({k: v for k, v in image_processor.to_dict().items() if k not in PROCESSOR_LOADING_KEYS})


def build_feature_caches(
    model: nn.Module,
    dataset,
    processor,
    *,
    max_length: int | None,
    cache_images: bool,
    cache_text: bool,
    gradcache: bool,
    autocast: Callable = contextlib.nullcontext,
    precision: str = "no",
    cache_dir: str | os.PathLike | None = None,
    max_gb: float = 8.0,
    skip_invalid: bool = False,
    batch_size: int = 64,
    is_main_process: bool = True,
    fallback_dir: str | os.PathLike | None = None,
    show_progress: bool = False,
) -> FeatureCaches:
    """The lock-boundary caches of `model`'s frozen towers over the pair view `dataset` (module docstring)."""
    caches = FeatureCaches()
    columns = dataset.column_names
    device = next(model.parameters()).device
    if not {"image_id", "caption_id", "image", "caption"} <= set(columns):
        return caches
    image_ids = np.asarray(dataset["image_id"], dtype=np.int64)
    caption_ids = np.asarray(dataset["caption_id"], dtype=np.int64)
    for kind, wanted in (("vision", cache_images), ("text", cache_text)):
        if not wanted:
            continue
        tower = getattr(model, f"{kind}_model")
        mode, boundary, why = _tower_mode(tower, kind)
        if mode is None:
            if why:
                logger.info("%s tower: no lock-boundary cache (%s)", kind, why)
            continue
        if mode == "boundary" and gradcache:
            logger.info("%s tower: partly unlocked under GradCache (embedding_chunk_size): no lock-boundary cache, "
                        "the full forward runs every step", kind)
            continue
        ids = image_ids if kind == "vision" else caption_ids
        unique, first = np.unique(ids, return_index=True)
        builder = _Builder(model, kind, mode, boundary, processor, max_length, autocast, batch_size)
        if kind == "vision":
            values = dataset.select(first.tolist())["image"]
            keys = [image_identity(v) for v in values]
            context = {"kind": kind, "mode": mode, "fingerprint": weights_fingerprint(tower),
                       "pooling": model.config.vision_pooling,
                       "boundary": [boundary.blocks, boundary.first_trainable] if boundary else None,
                       "processor": _pixel_config(processor.image_processor), "precision": precision}
        else:
            texts = dataset.select(first.tolist())["caption"]
            keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
            unique, first, values = unique[keep], first[keep], [texts[i] for i in keep]
            keys = ["text:" + t for t in values]
            tokenizer = processor.tokenizer
            context = {"kind": kind, "mode": mode, "fingerprint": weights_fingerprint(tower),
                       "pooling": model.config.text_pooling,
                       "boundary": [boundary.blocks, boundary.first_trainable] if boundary else None,
                       "tokenizer": _tokenizer_identity(tokenizer),
                       "max_length": max_length, "precision": precision}
        if mode == "boundary":
            sample = values[:4]
            if kind == "vision":
                loaded_sample, _ = _image_batch(processor, sample, unique[:4].tolist(), True, set())
                sample = loaded_sample
            problem = _check_boundary(model, kind, builder, sample, autocast) if sample is not None else "no sample"
            if problem:
                logger.info("%s tower: cannot be cut at its lock boundary (%s); the full forward runs every step",
                            kind, problem)
                continue

        folder = Path(cache_dir) / f"{kind}-{_context_hash(context)}" if cache_dir else None
        store = FeatureStore.open(folder, context) if folder else None
        known = {key: row for row, key in enumerate(store.keys)} if store else {}
        missing = [i for i, key in enumerate(keys) if key not in known]

        def prepare(chunk: list[int]):
            if kind == "vision":
                pixel_values, kept = _image_batch(processor, [values[i] for i in chunk], [int(unique[i]) for i in chunk],
                                                  skip_invalid, caches.invalid_image_ids)
                kept = set(kept)
                return pixel_values, [i for i in chunk if int(unique[i]) in kept]
            order = sorted(chunk, key=lambda i: len(values[i]))
            return [values[i] for i in order], order

        def compute(prepared):
            inputs, kept_items = prepared
            if inputs is None:
                return None
            rows = builder.vision_rows(inputs) if kind == "vision" else builder.text_rows(inputs)
            return rows, kept_items

        if kind == "text":  # batches of similar length: less padding in the head's forward
            missing.sort(key=lambda i: len(values[i]))
        started = time.perf_counter()
        computed_items, new_rows = _share_and_compute(
            missing, prepare, compute, batch_size, device, show_progress, f"lock-boundary cache: {kind} {mode}")
        seconds = time.perf_counter() - started
        if is_distributed():  # bad images found on any process
            found = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(found, sorted(caches.invalid_image_ids))
            caches.invalid_image_ids = {i for part in found for i in part}

        # memory-mapped first: its size is known without reading it, and a store above the limit is never read whole
        stored = store.load(memory_map=True) if store and store.keys else None
        total_bytes = (stored.nbytes if stored is not None else 0) + (new_rows.nbytes if new_rows is not None else 0)
        location = "in memory"
        if store is not None and new_rows is not None and is_main_process:
            store.append([keys[i] for i in computed_items], new_rows)
        if is_distributed():
            torch.distributed.barrier()
        if total_bytes > max_gb * 2**30:
            if store is None:
                folder = Path(fallback_dir or ".") / "feature_cache" / f"{kind}-{_context_hash(context)}"
                store = FeatureStore.open(folder, context)
                if is_main_process and new_rows is not None:
                    store.append([keys[i] for i in computed_items], new_rows)
                if is_distributed():
                    torch.distributed.barrier()
                store = FeatureStore.open(folder, context)
            else:
                store = FeatureStore.open(store.folder, context)
            table = store.load(memory_map=True)
            row_of_key = {key: row for row, key in enumerate(store.keys)}
            location = f"memory-mapped from {store.folder}"
        else:
            parts = [p for p in (stored.to_torch() if stored is not None else None, new_rows) if p is not None]
            table = ShardedRows(parts) if len(parts) > 1 else (parts[0] if parts else PackedRows(torch.zeros(0), torch.zeros(0)))
            order_keys = (list(store.keys[: len(stored)]) if stored is not None else []) + [keys[i] for i in computed_items]
            row_of_key = {key: row for row, key in enumerate(order_keys)}
        row_of_id = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=np.int64)
        for i, key in enumerate(keys):
            row = row_of_key.get(key)
            if row is not None:
                row_of_id[int(unique[i])] = row
        cache = TowerFeatureCache(kind, mode, table, row_of_id, boundary, computed=len(computed_items),
                                  loaded=len(keys) - len(missing), location=location, seconds=seconds,
                                  tower_seconds=builder.tower_seconds)
        setattr(caches, kind, cache)
        if is_main_process:
            logger.info("feature cache: %s", cache.describe())
    return caches


__all__ = [
    "FeatureCaches",
    "TowerFeatureCache",
    "build_feature_caches",
    "cached_text_pooled",
    "cached_vision_pooled",
    "image_identity",
]
