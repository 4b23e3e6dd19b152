"""BCLSDataCollator: model inputs + binary/continuous labels, bad rows, DataLoader workers, augmentation."""

import logging
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

from trainer_bcls.data.augmentation import RandomResizedCropFlip
from trainer_bcls.training.collator import BCLSDataCollator
from trainer_bcls.data.loaders import InvalidDataError, load_pairs, without_image_decoding
from trainer_bcls.data.image_loading import ImageLoadError
from trainer_bcls.labels.relevance import RelevanceLabels, TfidfRelevance
from trainer_bcls.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), num_train_images=10, num_val_images=2, num_test_images=2,
        captions_per_image=3, image_size=32,
    )


@pytest.fixture(scope="module")
def pairs(synth_root):
    return load_pairs(synth_root, "train")  # 10 images x 3 captions


@pytest.fixture(scope="module")
def labels(pairs):
    return RelevanceLabels.build(pairs, TfidfRelevance(), use_cache=False)


def stable_order(relevance):
    return torch.sort(relevance, dim=1, descending=True, stable=True).indices


def test_batch_keys_shapes_and_labels(pairs, labels, tiny_processor):
    rows = [pairs[i] for i in (0, 1, 4, 9, 2, 29)]  # image 0 three times, image 1, image 3, image 9
    batch = BCLSDataCollator(tiny_processor, labels, max_length=16)(rows)
    assert {"pixel_values", "input_ids", "attention_mask", "image_ids", "caption_ids", "relevance",
            "relevance_order_i2t", "relevance_order_t2i", "return_loss"} <= set(batch)
    assert batch["return_loss"] is True
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (6, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 6 and batch["input_ids"].shape[1] <= 16
    assert batch["image_ids"].tolist() == [0, 0, 1, 3, 0, 9] and batch["caption_ids"].tolist() == [0, 1, 4, 9, 2, 29]
    relevance = batch["relevance"]
    assert relevance.dtype == torch.float32 and relevance.shape == (6, 6)
    assert torch.equal(relevance, labels.batch_matrix([0, 0, 1, 3, 0, 9], [0, 1, 4, 9, 2, 29]))
    positives = batch["image_ids"][:, None] == batch["image_ids"][None, :]
    assert torch.all(relevance[positives] == 1) and torch.all(relevance[~positives] < 1)
    assert torch.equal(batch["relevance_order_i2t"], stable_order(relevance))
    assert torch.equal(batch["relevance_order_t2i"], stable_order(relevance.T))
    # the text side is exactly the processor's tokenisation of the captions
    expected = tiny_processor.tokenizer([r["caption"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])


def test_without_relevance_and_undecoded_rows(pairs, tiny_processor):
    collator = BCLSDataCollator(tiny_processor)
    decoded = collator([pairs[i] for i in range(4)])
    assert "relevance" not in decoded and "relevance_order_i2t" not in decoded and decoded["return_loss"] is True
    undecoded = without_image_decoding(pairs)
    raw = collator([undecoded[i] for i in range(4)])
    assert isinstance(undecoded[0]["image"], dict)
    assert torch.equal(raw["pixel_values"], decoded["pixel_values"])  # path dicts decode to the same pixels
    grey = dict(pairs[0], image=pairs[0]["image"].convert("L"))  # non-RGB → RGB
    assert collator([grey])["pixel_values"].shape == (1, 3, 32, 32)


def test_corrupt_image_in_batch(synth_root, tmp_path, pairs, labels, tiny_processor, caplog):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    undecoded = without_image_decoding(pairs)
    rows = [undecoded[i] for i in (0, 3, 6, 7)]
    rows[1] = dict(rows[1], image={"path": str(bad), "bytes": None})
    with pytest.raises(ImageLoadError, match=r"broken\.png \(batch row 1: image_id 1, caption_id 3, file train_00001\.png\)"):
        BCLSDataCollator(tiny_processor, labels)(rows)
    collator = BCLSDataCollator(tiny_processor, labels, skip_invalid=True)
    with caplog.at_level(logging.WARNING, logger="trainer_bcls.training.collator"):
        batch = collator(rows)
    assert collator.num_skipped == 1 and "1 skipped so far" in caplog.text
    assert batch["image_ids"].tolist() == [0, 2, 2] and batch["caption_ids"].tolist() == [0, 6, 7]
    assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0] == 3
    assert torch.equal(batch["relevance"], labels.batch_matrix([0, 2, 2], [0, 6, 7]))  # labels of the kept rows
    assert torch.equal(batch["relevance_order_i2t"], stable_order(batch["relevance"]))
    with pytest.raises(InvalidDataError, match="every row of a batch of 1 was invalid"):
        collator([rows[1]])


def test_bad_caption_and_missing_keys(pairs, tiny_processor):
    row = dict(pairs[5], caption="  ")
    with pytest.raises(InvalidDataError, match=r"batch row 0: image_id 1, caption_id 5.*non-empty string"):
        BCLSDataCollator(tiny_processor)([row])
    batch = BCLSDataCollator(tiny_processor, skip_invalid=True)([row, pairs[6], dict(pairs[7], caption=None)])
    assert batch["caption_ids"].tolist() == [6]
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        BCLSDataCollator(tiny_processor)([{"caption": "x", "image": pairs[0]["image"]}])


def test_dataloader_workers(pairs, labels, tiny_processor):
    collator = BCLSDataCollator(tiny_processor, labels, max_length=16)
    pickle.dumps(collator)  # picklable (spawn-started workers need it); serialisation only
    subset = pairs.select(range(24))
    serial = list(DataLoader(subset, batch_size=8, collate_fn=collator))
    parallel = list(DataLoader(subset, batch_size=8, collate_fn=collator, num_workers=2))
    assert len(parallel) == 3
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]


def test_random_resized_crop_flip():
    image = PIL.Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3))
    flip = RandomResizedCropFlip(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=1.0)
    assert np.array_equal(np.asarray(flip(image)), np.asarray(image)[:, ::-1])
    crop = RandomResizedCropFlip(size=8, scale=(0.3, 0.6))
    torch.manual_seed(0)
    first = np.asarray(crop(image))
    torch.manual_seed(0)
    assert first.shape == (8, 8, 3) and np.array_equal(first, np.asarray(crop(image)))
    assert RandomResizedCropFlip().flip_prob == 0.0  # flips would contradict left/right captions: off by default


def test_collator_with_augmentation(pairs, tiny_processor):
    collator = BCLSDataCollator(tiny_processor, image_transform=RandomResizedCropFlip(scale=(0.5, 0.9)))
    torch.manual_seed(0)
    augmented = collator([pairs[0], pairs[3]])["pixel_values"]
    plain = BCLSDataCollator(tiny_processor)([pairs[0], pairs[3]])["pixel_values"]
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
