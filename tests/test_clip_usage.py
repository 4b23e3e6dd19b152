"""Using a trained retriever like a CLIP (issue 12): the transformers 5 `get_*_features` contract, zero-shot
classification through the pipeline (package imported and remote code only), sentence-transformers loading, ONNX
export and the huggingface_hub model card."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import BaseModelOutputWithPooling

from blocked_import import run_without_package
from modeling_bcls import BCLSConfig, BCLSModel
from conftest import load_example

ROOT = Path(__file__).resolve().parents[1]
TINY_IMAGE_SIZE = 32  # conftest's tiny towers and tiny_processor
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


def _colour_images() -> tuple[list, list[str]]:
    """24 new scenes: one large shape of each colour x shape, random position and background (32 px)."""
    from trainer_bcls.data.synthetic import BACKGROUNDS, POSITIONS, SHAPES, _draw

    rng = random.Random(1)
    images, truth = [], []
    for colour in COLOURS:
        for shape in SHAPES:
            scene = (("large", colour, shape, rng.choice(sorted(POSITIONS))),)
            images.append(_draw(rng, rng.choice(sorted(BACKGROUNDS)), scene, TINY_IMAGE_SIZE))
            truth.append(colour)
    return images, truth


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """examples/train.py with the demo's tiny towers, briefly, on 400 synthetic scenes (32 px): a saved folder."""
    from trainer_bcls.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("demo")
    data = make_synthetic_dataset(root / "data", num_train_images=400, num_val_images=16, num_test_images=0,
                                  image_size=TINY_IMAGE_SIZE)
    output_dir = root / "model"
    metrics = load_example("train").main([
        "--data", str(data), "--output_dir", str(output_dir), "--tiny_image_size", str(TINY_IMAGE_SIZE),
        "--max_steps", "200", "--per_device_train_batch_size", "32", "--eval_strategy", "no",
        "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0", "--logging_steps", "100",
    ])
    return output_dir, metrics


# ---------------------------------------------------------------------------------------------------------------------
# 1. transformers 5 contract
# ---------------------------------------------------------------------------------------------------------------------
def test_get_features_return_projected_unnormalised_pooler_output(tiny_bcls_model):
    model = tiny_bcls_model
    pixel_values = torch.randn(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    input_ids = torch.randint(3, 1000, (2, 6))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixel_values)
        text = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        tower = model.vision_model(pixel_values=pixel_values)
        mean_tokens = model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean(1)
    assert isinstance(image, BaseModelOutputWithPooling) and isinstance(text, BaseModelOutputWithPooling)
    # pooler_output = W pool(tower), as CLIPModel: projected, not normalised; the tower's states are kept.
    torch.testing.assert_close(image.pooler_output, model.visual_projection(tower.pooler_output))
    torch.testing.assert_close(text.pooler_output, model.text_projection(mean_tokens))  # text_pooling="mean"
    torch.testing.assert_close(image.last_hidden_state, tower.last_hidden_state)
    assert image.pooler_output.shape == (3, 16) and text.pooler_output.shape == (2, 16)
    assert not torch.allclose(image.pooler_output.norm(dim=-1), torch.ones(3))
    # encode_* (the search call) = the normalised pooler_output; forward's embeddings are the same.
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixel_values), F.normalize(image.pooler_output, dim=-1))
        torch.testing.assert_close(model.encode_text(input_ids, attention_mask), F.normalize(text.pooler_output, dim=-1))
        as_tuple = model.get_image_features(pixel_values=pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], image.pooler_output)


def test_model_saved_without_logit_scale_loads_with_the_default(tmp_path, tiny_bcls_model):
    tiny_bcls_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["logit_scale"]  # a folder saved before the field existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = BCLSModel.from_pretrained(tmp_path).eval()
    assert loaded.config.logit_scale == pytest.approx(1 / 0.07)
    inputs = {"pixel_values": torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
              "input_ids": torch.randint(3, 1000, (3, 5))}
    with torch.no_grad():
        out = loaded(**inputs)
    torch.testing.assert_close(out.logits_per_image, (out.image_embeds @ out.text_embeds.T) / 0.07)
    with pytest.raises(StrictDataclassClassValidationError, match="logit_scale must be > 0"):
        BCLSConfig(logit_scale=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Zero-shot classification
# ---------------------------------------------------------------------------------------------------------------------
def test_zero_shot_pipeline_classifies_colours_of_new_scenes(demo_model):
    from transformers import pipeline

    output_dir, _ = demo_model
    classifier = pipeline("zero-shot-image-classification", model=str(output_dir))
    assert isinstance(classifier.model, BCLSModel)
    images, truth = _colour_images()
    results = [classifier(image, candidate_labels=list(COLOURS), hypothesis_template="a {} shape") for image in images]
    top1 = sum(result[0]["label"] == colour for result, colour in zip(results, truth)) / len(truth)
    p_true = [next(r["score"] for r in result if r["label"] == colour) for result, colour in zip(results, truth)]
    uniform = 1 / len(COLOURS)
    assert top1 >= 0.6, top1
    assert sum(p_true) / len(p_true) >= 2 * uniform, p_true
    # The pipeline's scores are softmax(logit_scale * cosine) of the model's embeddings.
    model, tokenizer = classifier.model, classifier.tokenizer
    with torch.no_grad():
        image = model.encode_image(**classifier.image_processor(images=images[:1], return_tensors="pt"))
        text = model.encode_text(**tokenizer([f"a {c} shape" for c in COLOURS], padding=True, return_tensors="pt"))
    expected = (model.config.logit_scale * image @ text.T).softmax(-1)[0]
    got = torch.tensor([next(r["score"] for r in results[0] if r["label"] == c) for c in COLOURS])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


REMOTE_SCRIPT = """
import torch
from PIL import Image
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer
from transformers import pipeline

folder, image_path, out_path = sys.argv[1:4]
labels = ["red", "green", "blue", "yellow", "purple", "orange"]
classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
assert type(classifier.model).__module__.startswith("transformers_modules."), type(classifier.model).__module__
result = classifier(Image.open(image_path), candidate_labels=labels, hypothesis_template="a {} shape")
scores = torch.tensor([next(r["score"] for r in result if r["label"] == label) for label in labels])
st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
texts = st.encode(["a red shape", "a large blue circle on the left"], convert_to_tensor=True)
images = st.encode([Image.open(image_path)], convert_to_tensor=True)
assert not [m for m in sys.modules if m.split(".")[0] in ("modeling_bcls", "trainer_bcls")]
save_file({"scores": scores, "texts": texts.cpu(), "images": images.cpu()}, out_path)
print("REMOTE_OK")
"""


def test_zero_shot_pipeline_and_sentence_transformers_with_remote_code_only(demo_model, tmp_path):
    from transformers import pipeline

    output_dir, _ = demo_model
    images, _ = _colour_images()
    image_path = tmp_path / "scene.png"
    images[0].save(image_path)
    out_path = tmp_path / "remote.safetensors"
    stdout = run_without_package(REMOTE_SCRIPT, [str(output_dir), str(image_path), str(out_path)], tmp_path)
    assert "REMOTE_OK" in stdout
    remote = load_file(str(out_path))

    classifier = pipeline("zero-shot-image-classification", model=str(output_dir))
    result = classifier(str(image_path), candidate_labels=list(COLOURS), hypothesis_template="a {} shape")
    local = torch.tensor([next(r["score"] for r in result if r["label"] == c) for c in COLOURS])
    torch.testing.assert_close(remote["scores"], local, atol=1e-5, rtol=0)
    model, tokenizer = classifier.model, classifier.tokenizer
    with torch.no_grad():
        texts = model.encode_text(**tokenizer(["a red shape", "a large blue circle on the left"], padding=True,
                                              return_tensors="pt"))
        image = model.encode_image(**classifier.image_processor(images=[images[0]], return_tensors="pt"))
    torch.testing.assert_close(remote["texts"], texts, atol=1e-5, rtol=0)
    torch.testing.assert_close(remote["images"], image, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# 5. sentence-transformers
# ---------------------------------------------------------------------------------------------------------------------
def test_sentence_transformers_embeds_texts_and_images_like_encode(tmp_path, tiny_bcls_model, tiny_processor):
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    tiny_bcls_model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "modules.json").read_text())[1]["type"] == "sentence_transformers.models.Normalize"
    st = SentenceTransformer(str(tmp_path), device="cpu")
    texts = ["a dog runs on the beach", "two children play football in a park near a river", "hi"]
    images = [Image.new("RGB", (40 + 8 * i, 36), color=(40 * i, 100, 200 - 30 * i)) for i in range(3)]
    assert st.get_sentence_embedding_dimension() == tiny_bcls_model.config.projection_dim
    with torch.no_grad():
        expected_texts = tiny_bcls_model.encode_text(**tiny_processor(text=texts, return_tensors="pt"))
        expected_images = tiny_bcls_model.encode_image(**tiny_processor(images=images, return_tensors="pt"))
    got_texts = st.encode(texts, convert_to_tensor=True, batch_size=2)  # two batches: padding differs
    got_images = st.encode(images, convert_to_tensor=True)
    torch.testing.assert_close(got_texts, expected_texts, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_images, expected_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(st.similarity(got_images, got_texts), expected_images @ expected_texts.T,
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# 6. ONNX
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vision", ["vit", "resnet"])
def test_onnx_export_matches_pytorch(tmp_path, vision):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from trainer_bcls import build_tiny_model_and_processor
    from trainer_bcls.towers.export_onnx import main

    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(
        ["a red circle on the left", "two blue squares at the top"], image_size=TINY_IMAGE_SIZE, projection_dim=16,
        vision=vision,
    )
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    diffs = main(["--model", str(tmp_path / "model"), "--output", str(tmp_path / "onnx")])
    assert max(diffs.values()) <= 1e-4, diffs

    # Independent check: real processor inputs, a batch size other than the export's, unit-norm outputs.
    from PIL import Image

    reloaded = BCLSModel.from_pretrained(tmp_path / "model").eval()
    captions = ["a red circle", "two blue squares at the top", "a circle", "red"]
    batch = processor(images=[Image.new("RGB", (32, 32), (20 * i, 90, 30)) for i in range(5)], text=captions,
                      return_tensors="pt")
    vision_session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "vision.onnx"))
    text_session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "text.onnx"))
    text_inputs = {i.name: batch[i.name].numpy() for i in text_session.get_inputs()}
    (image_embeds,) = vision_session.run(None, {"pixel_values": batch["pixel_values"].numpy()})
    (text_embeds,) = text_session.run(None, text_inputs)
    with torch.no_grad():
        expected_image = reloaded.encode_image(batch["pixel_values"])
        expected_text = reloaded.encode_text(**{k: batch[k] for k in text_inputs})
    torch.testing.assert_close(torch.from_numpy(image_embeds), expected_image, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(text_embeds), expected_text, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(text_embeds).norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    assert {"tokenizer.json", "processor_config.json"} <= {p.name for p in (tmp_path / "onnx").iterdir()}


# ---------------------------------------------------------------------------------------------------------------------
# 7. Model card
# ---------------------------------------------------------------------------------------------------------------------
def test_model_card_metadata_names_towers_datasets_license_and_eval_split(tmp_path, tiny_bcls_model):
    from huggingface_hub import ModelCard

    from trainer_bcls.hub.model_card import write_model_card

    model = tiny_bcls_model
    model.config.vision_config._name_or_path = "google/vit-base-patch16-224-in21k"
    model.config.text_config._name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    log_history = [{"loss": 0.5, "step": 10, "epoch": 1.0},
                   {"eval_rsum": 321.5, "eval_i2t_r1": 40.25, "eval_kendall_tau_b": 0.31, "step": 10}]
    write_model_card(tmp_path, model, log_history=log_history, model_name="me/bcls-flickr", eval_split="test",
                     datasets=["nlphuji/flickr30k"], dataset="flickr30k (train split)", license="mit")
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert data.base_model == ["google/vit-base-patch16-224-in21k", "sentence-transformers/all-MiniLM-L6-v2"]
    assert data.datasets == ["nlphuji/flickr30k"] and data.license == "mit"
    assert data.pipeline_tag == "zero-shot-image-classification" and data.library_name == "transformers"
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"rsum", "i2t_r1", "kendall_tau_b"}
    assert results["rsum"].metric_value == pytest.approx(321.5)
    assert {r.dataset_split for r in data.eval_results} == {"test"}
    assert {r.dataset_type for r in data.eval_results} == {"nlphuji/flickr30k"}
    text = card.text
    assert text.lstrip().startswith("# me/bcls-flickr")
    assert "**test** split" in text and "flickr30k (train split)" in text
    for line in ("| `kendall_window_size` | 32 |", "| `margin` | 0.2 |", "| transformers |", "| torch |"):
        assert line in text, line
    assert "model.encode_image" in text and 'pipeline("zero-shot-image-classification"' in text


def test_model_card_leaves_local_and_scratch_towers_out_of_base_model(tmp_path, demo_model, tiny_bcls_model):
    from huggingface_hub import ModelCard

    from trainer_bcls.hub.model_card import write_model_card

    tiny_bcls_model.config.vision_config._name_or_path = str(tmp_path)  # a local folder: not a Hub id
    write_model_card(tmp_path, tiny_bcls_model, log_history=[])
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.base_model is None and data.eval_results is None and data.license == "apache-2.0"

    # The demo folder's card (written by examples/train.py): metrics measured on the val split, no Hub towers.
    output_dir, metrics = demo_model
    data = ModelCard.load(output_dir / "README.md").data
    assert data.base_model is None and data.eval_results
    assert {r.dataset_split for r in data.eval_results} == {"val"}
    rsum = next(r.metric_value for r in data.eval_results if r.metric_type == "rsum")
    assert rsum == pytest.approx(metrics["eval_rsum"], rel=1e-5)
