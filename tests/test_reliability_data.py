"""Issue 26 items 9-10: image paths that leave the dataset folder, duplicate images and captions, relevance labels
without signal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import PIL.Image
import pytest

from trainer_bcls.data.errors import InvalidDataError
from trainer_bcls.data.loaders import load_pairs


def write_image(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (8, 8), colour).save(path, format="PNG")


def metadata_folder(root: Path, rows: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


# ---------------------------------------------------------------------------------------------------------------------
# 9. paths outside the dataset folder


@pytest.mark.parametrize("kind", ["parent", "absolute"])
def test_metadata_file_name_outside_the_folder_is_refused(tmp_path, kind):
    write_image(tmp_path / "outside.png")
    write_image(tmp_path / "data" / "in.png", (10, 10, 200))
    name = "../outside.png" if kind == "parent" else str(tmp_path / "outside.png")
    folder = metadata_folder(tmp_path / "data", [{"file_name": "in.png", "caption": "a blue square"},
                                                 {"file_name": name, "caption": "a red square"}])
    with pytest.raises(InvalidDataError, match=r"metadata.jsonl line 2 .*: image path .*outside.png is outside the "
                                               r"dataset folder .*--allow_outside_paths"):
        load_pairs(folder, "train")
    assert len(load_pairs(folder, "train", skip_invalid=True)) == 1  # counted skip
    assert len(load_pairs(folder, "train", allow_outside_paths=True)) == 2  # the explicit opt-in


def test_karpathy_filepath_outside_the_folder_is_refused_before_opening(tmp_path, monkeypatch):
    write_image(tmp_path / "secret.png")
    write_image(tmp_path / "ds" / "images" / "a.png")
    entries = [{"filename": "a.png", "split": "train", "sentences": [{"raw": "a red square"}]},
               {"filename": "secret.png", "filepath": "../..", "split": "train", "sentences": [{"raw": "x"}]},
               {"filename": "/etc/hostname", "split": "train", "sentences": [{"raw": "y"}]}]
    (tmp_path / "ds" / "dataset_toy.json").write_text(json.dumps({"images": entries}))
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: (opened.append(str(fp)), real_open(fp, *a, **k))[1])
    with pytest.raises(InvalidDataError, match=r"images\[1\] \(\.\./\.\./secret\.png\): image path .* is outside"):
        load_pairs(tmp_path / "ds", "train")
    assert not any("secret" in path or "hostname" in path for path in opened)
    pairs = load_pairs(tmp_path / "ds", "train", skip_invalid=True)
    assert pairs["caption"] == ["a red square"]
    assert not any("secret" in path or "hostname" in path for path in opened)


def test_symlinked_image_folder_inside_the_dataset_still_loads(tmp_path):
    write_image(tmp_path / "store" / "a.png")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "images").symlink_to(tmp_path / "store")
    entries = [{"filename": "a.png", "split": "train", "sentences": [{"raw": "a red square"}]}]
    (tmp_path / "ds" / "dataset_toy.json").write_text(json.dumps({"images": entries}))
    assert len(load_pairs(tmp_path / "ds", "train")) == 1


# ---------------------------------------------------------------------------------------------------------------------
# 10. duplicates and labels without signal


def test_byte_identical_images_are_reported_and_can_be_merged(tmp_path, caplog):
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / "data" / name)  # a, b and c: the same bytes
    write_image(tmp_path / "data" / "d.png", (0, 0, 255))
    folder = metadata_folder(tmp_path / "data", [{"file_name": f"{n}.png", "caption": f"picture {n}"} for n in "abcd"])
    with caplog.at_level(logging.WARNING, logger="trainer_bcls.data.loaders"):
        pairs = load_pairs(folder, "train")
    assert sorted(set(pairs["image_id"])) == [0, 1, 2, 3]
    assert "2 image(s) are byte-identical copies of another (1 group(s), e.g. a.png = b.png = c.png)" in caplog.text
    merged = load_pairs(folder, "train", merge_duplicate_images=True)
    assert merged["image_id"] == [0, 0, 0, 1] and merged["caption"] == ["picture a", "picture b", "picture c",
                                                                        "picture d"]
    assert merged["filename"][:3] == ["a.png"] * 3


def test_identical_captions_and_flat_relevance_are_reported(tmp_path, caplog):
    from trainer_bcls.labels.relevance import build_relevance_labels

    rows = []
    for i in range(40):
        write_image(tmp_path / "data" / f"{i}.png", (i * 6, 255 - i * 6, 7))
        rows.append({"file_name": f"{i}.png", "caption": "a shape"})
    folder = metadata_folder(tmp_path / "data", rows)
    with caplog.at_level(logging.WARNING):
        pairs = load_pairs(folder, "train")
        assert "1 caption text(s) describe several images (e.g. 'a shape' x 40 images)" in caplog.text
        caplog.clear()
        build_relevance_labels(pairs, "tfidf", cache_dir=tmp_path / "cache")
    assert "the relevance labels carry no signal" in caplog.text


def test_varied_captions_give_no_relevance_warning(tmp_path, caplog):
    from trainer_bcls.labels.relevance import build_relevance_labels

    rows = []
    for i, caption in enumerate(["a red circle", "a blue square", "two green triangles", "a red square"]):
        write_image(tmp_path / "data" / f"{i}.png", (i * 50, 20, 20))
        rows.append({"file_name": f"{i}.png", "caption": caption})
    pairs = load_pairs(metadata_folder(tmp_path / "data", rows), "train")
    with caplog.at_level(logging.WARNING):
        build_relevance_labels(pairs, "tfidf", cache_dir=tmp_path / "cache")
    assert "no signal" not in caplog.text
