"""Issue 13: inputs that used to give a wrong result or lose data without a word.

Each test fails on the code before its fix: a saved single ``Dataset`` and split names, Python-style list captions
and a UTF-8 BOM in ``metadata.csv``, 16-bit images, BCLS weights that do not load, batches without negatives, the
demo tokenizer and unicode, and ``--resume_from_checkpoint`` with half-written checkpoints.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from datasets import Dataset, Features, Image, Value

from trainer_bcls.data.loaders import InvalidDataError, load_hf_dataset, load_imagefolder, load_pairs
from conftest import load_example

ROOT = Path(__file__).resolve().parents[1]


def write_image(path: Path, colour=(200, 30, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (8, 8), colour).save(path, format="PNG")
    return str(path)


def image_dataset(tmp_path: Path, n: int = 4, **extra_columns) -> Dataset:
    paths = [write_image(tmp_path / "img" / f"{i}.png", (40 * i, 90, 20)) for i in range(n)]
    columns = {"image": paths, "caption": [f"caption of image {i}" for i in range(n)], **extra_columns}
    return Dataset.from_dict(columns).cast_column("image", Image())


# ------------------------------------------------------------------------------------------------------------
# 1. a single saved Dataset and split names


def test_single_dataset_rejects_unknown_split_and_lists_what_exists(tmp_path):
    ds = image_dataset(tmp_path)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert len(load_pairs(str(tmp_path / "saved"), "train")) == 4  # no split name: the "train" split
    for split in ("validation", "val", "test"):
        with pytest.raises(ValueError, match=r"split '\w+' not found.*available splits: \['train'\]"):
            load_pairs(str(tmp_path / "saved"), split)
    with pytest.raises(ValueError, match="available splits"):
        load_hf_dataset(ds, "val")  # in memory too


def test_single_dataset_keeps_its_split_name_and_split_column(tmp_path):
    ds = image_dataset(tmp_path, n=6)
    val = ds.select(range(2))
    val._split = "validation"  # as load_dataset(..., split="validation") names it
    val.save_to_disk(str(tmp_path / "val"))
    assert len(load_pairs(str(tmp_path / "val"), "val")) == 2  # alias of the saved name
    with pytest.raises(ValueError, match=r"available splits: \['validation'\]"):
        load_pairs(str(tmp_path / "val"), "train")

    with_column = image_dataset(tmp_path, n=6, split=["train"] * 4 + ["val"] * 2)
    train, held_out = load_hf_dataset(with_column, "train"), load_hf_dataset(with_column, "validation")
    assert train["caption"] == [f"caption of image {i}" for i in range(4)]
    assert held_out["caption"] == ["caption of image 4", "caption of image 5"]
    assert held_out["image_id"] == [0, 1] and held_out["caption_id"] == [0, 1]
    with pytest.raises(ValueError, match=r"available splits: \['train', 'val'\]"):
        load_hf_dataset(with_column, "test")


def test_train_script_refuses_to_evaluate_on_the_training_rows(tmp_path):
    image_dataset(tmp_path).save_to_disk(str(tmp_path / "saved"))
    train = load_example("train")
    common = ["--data", str(tmp_path / "saved"), "--output_dir", str(tmp_path / "out"), "--tiny_image_size", "32",
              "--max_steps", "1", "--per_device_train_batch_size", "4", "--use_cpu", "true", "--report_to", "none"]
    with pytest.raises(ValueError, match="available splits"):
        train.main(common)  # default --eval_split val does not exist
    with pytest.raises(ValueError, match="same rows"):
        train.main(common + ["--eval_split", "train"])
    metrics = train.main(common + ["--eval_split", "none"])
    assert not any(key.startswith("eval_") for key in metrics)


# ------------------------------------------------------------------------------------------------------------
# 2. metadata.csv: Python-style list captions, byte order mark


def write_csv(folder: Path, text: str, encoding: str = "utf-8") -> None:
    for name in ("a.png", "b.png"):
        write_image(folder / name)
    (folder / "metadata.csv").write_bytes(text.encode(encoding))


def test_csv_python_list_captions_are_parsed_like_json_lists(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"file_name": ["a.png", "b.png"], "captions": [["a dog", "it's a cat"], ['a "red" car']]})
    frame.to_csv(tmp_path / "metadata.csv", index=False)  # pandas writes the lists as Python reprs
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    pairs = load_imagefolder(tmp_path, "train")
    assert pairs["caption"] == ["a dog", "it's a cat", 'a "red" car']
    assert pairs["image_id"] == [0, 0, 1]


def test_csv_bracketed_text_that_is_no_list_stays_one_caption_and_code_is_not_run(tmp_path):
    write_csv(tmp_path, 'file_name,caption\na.png,"[sic] a dog [laughs]"\nb.png,"[__import__(\'os\').getcwd()]"\n')
    pairs = load_imagefolder(tmp_path, "train")
    assert pairs["caption"] == ["[sic] a dog [laughs]", "[__import__('os').getcwd()]"]


def test_csv_with_a_byte_order_mark(tmp_path):
    write_csv(tmp_path, "file_name,caption\na.png,a dog\nb.png,a cat\n", encoding="utf-8-sig")
    assert load_imagefolder(tmp_path, "train")["caption"] == ["a dog", "a cat"]
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").write_bytes('{"file_name": "a.png", "caption": "a dog"}\n'.encode("utf-8-sig"))
    assert load_imagefolder(tmp_path, "train")["caption"] == ["a dog"]


# ------------------------------------------------------------------------------------------------------------
# 3. 16-bit and float images


def gradient16() -> np.ndarray:
    return (np.arange(32 * 32, dtype=np.int64).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_images_are_rescaled_from_their_mode_range_not_clipped(mode):
    from trainer_bcls.data.image_loading import load_image, to_rgb

    values = gradient16()
    if mode == "I;16":
        image, expected = PIL.Image.fromarray(values), np.rint(values / 257.0)
    elif mode == "I":
        image, expected = PIL.Image.fromarray(values.astype(np.int32)), np.rint(values / 257.0)
    else:
        unit = values.astype(np.float32) / 65535.0
        image, expected = PIL.Image.fromarray(unit), np.rint(np.clip(unit, 0, 1) * 255.0)
    assert image.mode == mode
    for rgb in (to_rgb(image), load_image(image)):
        pixels = np.asarray(rgb)
        assert rgb.mode == "RGB" and pixels.dtype == np.uint8
        assert (pixels == expected.astype(np.uint8)[..., None]).all()
    clipped = np.asarray(image.convert("RGB"))  # what convert("RGB") alone did: white (I;16, I) or black (F)
    assert np.isin(clipped, (0, 255)).mean() > 0.9


def test_sixteen_bit_png_in_training_evaluation_and_retrieval(tmp_path, tiny_processor):
    from trainer_bcls.training.collator import BCLSDataCollator
    from trainer_bcls.evaluation.split_evaluation import _to_rgb
    from trainer_bcls.data.image_loading import load_image

    path = tmp_path / "deep.png"
    PIL.Image.fromarray(gradient16()).save(path)
    expected = np.rint(gradient16() / 257.0).astype(np.uint8)
    assert PIL.Image.open(path).mode in ("I;16", "I")
    assert (np.asarray(load_image(str(path)))[..., 0] == expected).all()  # training (collator) path
    decoded = Image().decode_example({"path": str(path), "bytes": None})  # datasets' decoding, evaluation path
    assert (np.asarray(_to_rgb(decoded))[..., 0] == expected).all()
    from trainer_bcls.retrieval.image_sources import FolderSource  # retrieve.py's gallery loader

    assert (np.asarray(FolderSource(tmp_path).load(0))[..., 0] == expected).all()
    batch = BCLSDataCollator(tiny_processor)([{"image": str(path), "caption": "a ramp", "image_id": 0, "caption_id": 0}])
    assert batch["pixel_values"].std() > 0.1  # not a flat white image


# ------------------------------------------------------------------------------------------------------------
# 4. BCLS weights that do not load; folders that are no BCLS model; truncated weights files


@pytest.fixture
def saved_model(tmp_path, tiny_bcls_model):
    tiny_bcls_model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def rewrite_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_or_unexpected_weights_are_an_error(saved_model, tiny_bcls_model):
    import torch
    from transformers import AutoModel

    from modeling_bcls import BCLSModel

    loaded = BCLSModel.from_pretrained(saved_model)  # a whole folder loads (and round-trips)
    assert torch.equal(loaded.visual_projection.weight, tiny_bcls_model.visual_projection.weight)
    rewrite_weights(saved_model, lambda state: state.pop("visual_projection.weight"))
    with pytest.raises(ValueError, match=r"missing: \['visual_projection.weight'\]"):
        BCLSModel.from_pretrained(saved_model)
    with pytest.raises(ValueError, match="visual_projection.weight"):
        AutoModel.from_pretrained(saved_model)  # the Auto class goes through the same check
    lenient = BCLSModel.from_pretrained(saved_model, strict=False)
    assert not torch.equal(lenient.visual_projection.weight, tiny_bcls_model.visual_projection.weight)
    rewrite_weights(saved_model, lambda state: state.update({"visual_projection.weight": torch.zeros(16, 32),
                                                             "extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected: \['extra.weight'\]"):
        BCLSModel.from_pretrained(saved_model)


def test_evaluate_script_fails_on_a_model_whose_weights_did_not_load(saved_model, tiny_processor, tmp_path):
    tiny_processor.save_pretrained(saved_model)
    rewrite_weights(saved_model, lambda state: state.pop("text_projection.weight"))
    with pytest.raises(ValueError, match="text_projection.weight"):
        load_example("evaluate").main(["--model", str(saved_model), "--output_dir", str(tmp_path / "eval")])
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_a_folder_of_another_model_type_says_what_it_is(tmp_path, tiny_bert_config):
    from transformers import BertModel

    from modeling_bcls import BCLSModel

    BertModel(tiny_bert_config).save_pretrained(tmp_path / "bert")
    with pytest.raises(TypeError, match=r"bert.* is a 'bert' model .*not a BCLS model.*from_vision_text_pretrained"):
        BCLSModel.from_pretrained(tmp_path / "bert")


@pytest.mark.parametrize("keep", [5, 100, -100])
def test_a_truncated_weights_file_is_named(saved_model, keep):
    from modeling_bcls import BCLSModel

    weights = saved_model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    with pytest.raises(OSError, match=r"model\.safetensors: .*(truncated|shorter)"):
        BCLSModel.from_pretrained(saved_model)


def test_from_vision_text_pretrained_still_makes_new_projections(tmp_path, tiny_vit_config, tiny_bert_config):
    from transformers import BertModel, ViTModel

    from modeling_bcls import BCLSModel

    ViTModel(tiny_vit_config).save_pretrained(tmp_path / "vit")
    BertModel(tiny_bert_config).save_pretrained(tmp_path / "bert")
    model = BCLSModel.from_vision_text_pretrained(str(tmp_path / "vit"), str(tmp_path / "bert"), projection_dim=8)
    model.save_pretrained(tmp_path / "bcls")
    assert BCLSModel.from_pretrained(tmp_path / "bcls").visual_projection.weight.shape == (8, 32)


# ------------------------------------------------------------------------------------------------------------
# 5. batches without negatives


def no_negative_trainer(synthetic_dir, tmp_path, pairs, **overrides):
    from trainer_bcls import BCLSDataCollator, BCLSTrainer, BCLSTrainingArguments, build_tiny_model_and_processor

    model, processor = build_tiny_model_and_processor(pairs["caption"], image_size=32, projection_dim=16)
    arguments = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=10,
                     learning_rate=1e-3, eval_strategy="no", save_strategy="no", disable_tqdm=True, use_cpu=True,
                     report_to="none", train_sampling_strategy="sequential", logging_steps=100)
    arguments.update(overrides)
    return BCLSTrainer(model=model, args=BCLSTrainingArguments(**arguments), train_dataset=pairs,
                       data_collator=BCLSDataCollator(processor, max_length=32), processing_class=processor)


def test_batches_without_negatives_are_counted_and_reported_once(synthetic_dir, tmp_path, caplog):
    pairs = load_pairs(str(synthetic_dir), "train").select(range(40))  # 8 images x 5 captions, in order
    image_ids = np.asarray(pairs["image_id"])
    expected = sum(len(set(image_ids[k : k + 4])) == 1 for k in range(0, 40, 4))  # brute force: batches of one image
    assert expected == 4
    trainer = no_negative_trainer(synthetic_dir, tmp_path, pairs)
    with caplog.at_level(logging.WARNING, logger="trainer_bcls.training.trainer"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "no negative" in r.getMessage()]
    assert warnings == [f"{expected} of 10 training batches had no negative (every pair of one image): their loss is "
                        "0 and they trained nothing. Use larger batches, or data with fewer captions per image."]


def test_batch_size_one_without_a_global_batch_refuses_to_start(synthetic_dir, tmp_path):
    pairs = load_pairs(str(synthetic_dir), "train").select(range(10))
    trainer = no_negative_trainer(synthetic_dir, tmp_path, pairs, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="per_device_train_batch_size=1 .*no negative"):
        trainer.train()
    assert trainer.state.global_step == 0


# ------------------------------------------------------------------------------------------------------------
# --resume_from_checkpoint True / last, half-written checkpoints


def fake_checkpoint(folder: Path, complete: bool = True) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, folder / "model.safetensors")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[1])}))
    return folder


def test_resolve_checkpoint_latest_skips_and_names_half_written_ones(tmp_path, caplog):
    from trainer_bcls.training.checkpoints import resolve_checkpoint

    fake_checkpoint(tmp_path / "checkpoint-2")
    fake_checkpoint(tmp_path / "checkpoint-10")
    fake_checkpoint(tmp_path / "checkpoint-12", complete=False)  # killed before trainer_state.json
    truncated = fake_checkpoint(tmp_path / "checkpoint-9")
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:-4])
    for value in (True, "True", "true", "last", "LATEST"):
        with caplog.at_level(logging.WARNING, logger="trainer_bcls.training.checkpoints"):
            caplog.clear()
            assert resolve_checkpoint(value, tmp_path) == str(tmp_path / "checkpoint-10")
        assert "checkpoint-12" in caplog.text and "half-written" in caplog.text
    for value in (None, False, "", "False", "none"):
        assert resolve_checkpoint(value, tmp_path) is None
    with pytest.raises(ValueError, match=r"checkpoint-12 is incomplete, left half-written.*trainer_state.json.*"
                                         r"newest complete one is checkpoint-10"):
        resolve_checkpoint(str(tmp_path / "checkpoint-12"), tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint-9 is incomplete.*model\.safetensors.*truncated"):
        resolve_checkpoint(str(tmp_path / "checkpoint-9"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint-"):
        resolve_checkpoint("last", tmp_path / "empty")


def test_trainer_resumes_from_last(synthetic_dir, tmp_path):
    pairs = load_pairs(str(synthetic_dir), "train").select(range(40))
    first = no_negative_trainer(synthetic_dir, tmp_path, pairs, max_steps=2, save_strategy="steps", save_steps=2,
                                per_device_train_batch_size=8, train_sampling_strategy="random")
    first.train()
    assert (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").is_file()
    second = no_negative_trainer(synthetic_dir, tmp_path, pairs, max_steps=3, save_strategy="no",
                                 per_device_train_batch_size=8, train_sampling_strategy="random")
    steps = []
    second.add_callback(type("Count", (__import__("transformers").TrainerCallback,),
                             {"on_step_end": lambda self, args, state, control, **kw: steps.append(state.global_step)}))
    second.train(resume_from_checkpoint="True")  # what --resume_from_checkpoint True gives
    assert steps == [3]


# ------------------------------------------------------------------------------------------------------------
# the demo tokenizer and unicode


def test_tiny_tokenizer_keeps_unicode_words(tmp_path):
    from transformers import AutoTokenizer

    from trainer_bcls.towers.tiny_towers import build_word_tokenizer

    captions = ["Un café noir", "一只狗 在公园", "a happy 😀 dog", "Ünïcode naïve façade"]
    tokenizer = build_word_tokenizer(captions)
    tokenizer.save_pretrained(tmp_path / "tok")
    for tok in (tokenizer, AutoTokenizer.from_pretrained(tmp_path / "tok")):
        for caption in captions:
            tokens = tok.tokenize(caption)
            assert "[UNK]" not in tokens, (caption, tokens)
        assert tok.tokenize("Un café noir") == ["un", "café", "noir"]
        assert tok.tokenize("一只狗") == ["一", "只", "狗"]
        assert tok.tokenize("a 😀 dog") == ["a", "😀", "dog"]
        assert tok.tokenize("a cafe") == ["a", "[UNK]"]  # accents are kept apart, not stripped


# ------------------------------------------------------------------------------------------------------------
# evaluate.py --skip_invalid


def test_evaluate_script_skip_invalid(synthetic_dir, tmp_path, caplog, capsys):
    import shutil

    from trainer_bcls import build_tiny_model_and_processor

    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    (data / "images" / "test_00003.png").unlink()
    model, processor = build_tiny_model_and_processor(["a red circle"], image_size=32, projection_dim=16)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--dataset", str(data), "--split", "test", "--relevance", "none",
            "--no_report", "--output_dir", str(tmp_path / "eval")]
    evaluate = load_example("evaluate")
    with pytest.raises(InvalidDataError, match="test_00003.png"):
        evaluate.main(args)
    with caplog.at_level(logging.WARNING):
        metrics = evaluate.main(args + ["--skip_invalid"])
    assert "skipped 1 x missing image file" in caplog.text
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics
    assert "[test]: 23 images, 115 captions" in capsys.readouterr().out  # 24 test images, one skipped
