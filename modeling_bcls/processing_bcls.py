# Licensed under the Apache License, Version 2.0.
"""BCLS processor: the vision tower's image processor + the text tower's tokenizer.

This file is copied next to saved processors (remote code): it imports only `transformers` and stdlib.
"""

from transformers import AutoImageProcessor, AutoTokenizer
from transformers.processing_utils import ProcessorMixin


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "trust_remote_code")


class BCLSProcessor(ProcessorMixin):
    r"""
    Wraps an image processor and a tokenizer into one processor:

    ```python
    >>> batch = processor(images=images, text=captions, max_length=64, return_tensors="pt")
    >>> # pixel_values [B, 3, H, W], input_ids / attention_mask [B, L] (+ token_type_ids for BERT-like tokenizers)
    ```

    Text is padded and truncated by default (`padding=True, truncation=True`; override per call). Without torchvision
    the PIL image-processor backends are used (e.g. `ViTImageProcessorPil`, `CLIPImageProcessorPil`).
    """

    text_kwargs = {"padding": True, "truncation": True}

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_name_or_path: str, text_name_or_path: str, **kwargs
    ) -> "BCLSProcessor":
        r"""
        `AutoImageProcessor.from_pretrained(vision_name_or_path)` + `AutoTokenizer.from_pretrained(text_name_or_path)`.
        `vision_<name>` / `text_<name>` kwargs go to the image processor / tokenizer (e.g. `vision_backend="pil"`,
        `text_model_max_length=64`); hub kwargs without a prefix (`cache_dir`, `revision`, `token`,
        `local_files_only`, ...) go to both.
        """
        vision_kwargs, text_kwargs = {}, {}
        for key, value in kwargs.items():
            if key in _HUB_KWARGS:
                vision_kwargs.setdefault(key, value)
                text_kwargs.setdefault(key, value)
            elif key.startswith("vision_"):
                vision_kwargs[key[len("vision_") :]] = value
            elif key.startswith("text_"):
                text_kwargs[key[len("text_") :]] = value
            else:
                raise TypeError(
                    f"BCLSProcessor.from_vision_text_pretrained() got an unexpected argument {key!r} "
                    "(prefix it with vision_ or text_)."
                )
        image_processor = AutoImageProcessor.from_pretrained(vision_name_or_path, **vision_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(text_name_or_path, **text_kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer)


__all__ = ["BCLSProcessor"]
