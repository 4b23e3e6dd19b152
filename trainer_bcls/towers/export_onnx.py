"""Export a saved BCLS model to ONNX: `vision.onnx` and `text.onnx`, each giving L2-normalised search embeddings.

    python -m trainer_bcls.towers.export_onnx --model outputs/demo --output outputs/demo-onnx

    vision.onnx:  pixel_values [batch, 3, H, W] (H, W: the processor's)  -> image_embeds [batch, D]
    text.onnx:    input_ids, attention_mask (+ token_type_ids) [batch, seq] -> text_embeds [batch, D]

Both outputs equal `BCLSModel.encode_image` / `encode_text` (float32, unit norm: the dot product is the retrieval
score); batch and sequence length are dynamic axes. The processor is saved next to the graphs, so clients
preprocess with `BCLSProcessor` / `AutoProcessor` (or the tokenizer.json and preprocessor config directly).
Uses the TorchScript exporter (`dynamo=False`), which needs only the `onnx` package; `--check` compares
onnxruntime's outputs with PyTorch's on random inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

VISION_FILE = "vision.onnx"
TEXT_FILE = "text.onnx"


class _VisionEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class _TextEncoder(nn.Module):
    def __init__(self, model, with_token_type_ids: bool):
        super().__init__()
        self.model = model
        self.with_token_type_ids = with_token_type_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids=None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if self.with_token_type_ids else {}
        return self.model.encode_text(input_ids, attention_mask, **extra)


def _text_input_names(model, processor=None) -> list[str]:
    """input_ids, attention_mask, and token_type_ids when the tokenizer produces them (BERT-like)."""
    names = ["input_ids", "attention_mask"]
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        wants_types = "token_type_ids" in tokenizer.model_input_names
    else:
        import inspect

        wants_types = "token_type_ids" in inspect.signature(model.text_model.forward).parameters
    return names + ["token_type_ids"] if wants_types else names


def image_size(model, processor=None) -> tuple[int, int]:
    """(height, width) the graph is traced at: what the image processor outputs, else the tower's `image_size`."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        size = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size
        size = dict(size or {})
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    size = getattr(model.config.vision_config, "image_size", 224)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def example_inputs(
    model, batch: int = 2, seq_len: int = 7, seed: int = 0, size: tuple[int, int] = (224, 224)
) -> tuple[torch.Tensor, dict]:
    """Random pixel_values of `size` and random token ids (padding in the last row)."""
    generator = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    channels = getattr(vision, "num_channels", 3)
    pixel_values = torch.randn(batch, channels, *size, generator=generator)
    vocab = model.config.text_config.vocab_size
    input_ids = torch.randint(3, vocab, (batch, seq_len), generator=generator)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    attention_mask[-1, seq_len // 2 :] = 0
    text = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}
    return pixel_values, text


def export_onnx(model, output_dir: str | os.PathLike, processor=None, opset: int = 17) -> dict[str, Path]:
    """Writes `vision.onnx` and `text.onnx` (and the processor, when given) to `output_dir`; returns the paths.

    The model is put (in place) in float32 eval mode; load it with `attn_implementation="eager"` when its towers
    have attention (the exporter traces eager attention into plain ONNX ops).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    model.fast_inference = False  # trace the tower itself (onnxruntime folds BatchNorm in its own graph passes)
    size = image_size(model, processor)
    pixel_values, text = example_inputs(model, size=size)
    text_names = _text_input_names(model, processor)
    paths = {"vision": output_dir / VISION_FILE, "text": output_dir / TEXT_FILE}
    with torch.no_grad():
        torch.onnx.export(
            _VisionEncoder(model).eval(),  # an exporter restores the wrapper's mode, recursively
            (pixel_values,),
            str(paths["vision"]),
            input_names=["pixel_values"],
            output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
        torch.onnx.export(
            _TextEncoder(model, "token_type_ids" in text_names).eval(),
            tuple(text[name] for name in text_names),
            str(paths["text"]),
            input_names=text_names,
            output_names=["text_embeds"],
            dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in text_names}, "text_embeds": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    if processor is not None:
        processor.save_pretrained(output_dir)
    (output_dir / "onnx_export.json").write_text(
        json.dumps(
            {"vision": {"inputs": ["pixel_values"], "output": "image_embeds", "image_size": list(size)},
             "text": {"inputs": text_names, "output": "text_embeds"},
             "projection_dim": model.config.projection_dim, "normalized": True, "opset": opset},
            indent=2,
        ),
        encoding="utf-8",
    )
    return paths


def onnx_max_abs_diff(model, output_dir: str | os.PathLike, batch: int = 3, seq_len: int = 9) -> dict[str, float]:
    """max |onnxruntime - PyTorch| of the image and text embeddings on random inputs of a batch size and length
    other than the export's (exercises the dynamic axes)."""
    import onnxruntime

    output_dir = Path(output_dir)
    vision = onnxruntime.InferenceSession(str(output_dir / VISION_FILE), providers=["CPUExecutionProvider"])
    size = tuple(vision.get_inputs()[0].shape[2:])  # traced at a fixed image size
    pixel_values, text = example_inputs(model, batch=batch, seq_len=seq_len, seed=1, size=size)
    diffs = {}
    with torch.no_grad():
        (image_embeds,) = vision.run(None, {"pixel_values": pixel_values.numpy()})
        expected = model.encode_image(pixel_values)
        diffs["vision"] = (torch.from_numpy(image_embeds) - expected).abs().max().item()

        session = onnxruntime.InferenceSession(str(output_dir / TEXT_FILE), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        (text_embeds,) = session.run(None, {name: text[name].numpy() for name in names})
        extra = {"token_type_ids": text["token_type_ids"]} if "token_type_ids" in names else {}
        expected = model.encode_text(text["input_ids"], text["attention_mask"], **extra)
        diffs["text"] = (torch.from_numpy(text_embeds) - expected).abs().max().item()
    return diffs


def main(argv: list[str] | None = None) -> dict[str, float] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A saved BCLS model folder (or Hub id).")
    parser.add_argument("--output", required=True, help="Folder for vision.onnx, text.onnx and the processor.")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--no_check", action="store_true", help="Skip the onnxruntime comparison.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    from modeling_bcls import BCLSModel, BCLSProcessor

    model = BCLSModel.from_pretrained(args.model, attn_implementation="eager").float().eval()
    try:
        processor = BCLSProcessor.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        logger.warning("no processor saved with %s (%s): exporting the graphs only", args.model, err)
        processor = None
    paths = export_onnx(model, args.output, processor=processor, opset=args.opset)
    logger.info("wrote %s and %s", paths["vision"], paths["text"])
    if args.no_check:
        return None
    diffs = onnx_max_abs_diff(model, args.output)
    print(json.dumps({"max_abs_diff": diffs}))
    return diffs


if __name__ == "__main__":
    import sys

    from ..cli import run_cli

    sys.exit(run_cli(main))
