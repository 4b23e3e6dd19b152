"""Loaders → pair views, the image ↔ caption index, the synthetic dataset, and every kind of bad input."""

import csv
import hashlib
import json
import logging
from pathlib import Path

import PIL.Image
import pytest
from datasets import Dataset, DatasetDict, Features, Image, Value

from trainer_bcls.data.loaders import (
    PAIR_FEATURES,
    ImageCaptionIndex,
    InvalidDataError,
    densify_ids,
    load_hf_dataset,
    load_imagefolder,
    load_karpathy,
    load_pairs,
    validate_images,
    without_image_decoding,
)
from trainer_bcls.data.caption_index import pair_keys
from trainer_bcls.data.synthetic import default_synthetic_dir, make_synthetic_dataset


SMALL = dict(num_train_images=12, num_val_images=4, num_test_images=4, captions_per_image=3, image_size=32)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), **SMALL)


def write_image(path: Path, colour=(200, 30, 30), fmt="PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (8, 8), colour).save(path, format=fmt)


def write_karpathy(root: Path, images: list[dict], name="dataset_toy.json", make_files=True) -> Path:
    """images: dicts with filename, split, sentences (list of raw captions or dicts); image files are created."""
    entries, sentid = [], 0
    for imgid, e in enumerate(images):
        sentences = []
        for s in e.get("sentences", []):
            if isinstance(s, dict):
                sentences.append(s)
            else:
                sentences.append({"raw": s, "sentid": sentid, "imgid": imgid})
                sentid += 1
        entry = {"filename": e["filename"], "imgid": e.get("imgid", imgid), "split": e.get("split", "train"), "sentences": sentences}
        if "filepath" in e:
            entry["filepath"] = e["filepath"]
        entries.append(entry)
        if make_files:
            write_image(root / "images" / e.get("filepath", "") / e["filename"], colour=(20 * imgid % 255, 50, 90))
    (root / name).write_text(json.dumps({"images": entries}))
    return root


def toy_images(n=3, captions=2):
    return [{"filename": f"im{i}.png", "sentences": [f"caption {k} of image {i}" for k in range(captions)]} for i in range(n)]


def column(ds, name):
    return list(ds.select_columns([name]).with_format("arrow")[:].column(name).to_pylist())


# --------------------------------------------------------------------------------------------------------------
# synthetic data


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic(tmp_path):
    kwargs = dict(num_train_images=6, num_val_images=2, num_test_images=2, captions_per_image=3, image_size=32)
    a = _tree_digest(make_synthetic_dataset(tmp_path / "a", **kwargs))
    b = _tree_digest(make_synthetic_dataset(tmp_path / "b", **kwargs))
    c = _tree_digest(make_synthetic_dataset(tmp_path / "c", seed=1, **kwargs))
    assert a == b and len(a) == 11  # 10 images + json
    assert a["dataset_synthetic.json"] != c["dataset_synthetic.json"]


def test_synthetic_scenes_and_captions(synth_dir):
    data = json.loads((synth_dir / "dataset_synthetic.json").read_text())
    entries = data["images"]
    assert [sum(e["split"] == s for e in entries) for s in ("train", "val", "test")] == [12, 4, 4]
    scenes = {json.dumps(e["scene"], sort_keys=True) for e in entries}
    assert len(scenes) == len(entries)  # no duplicate scene
    words_per_image = []
    for e in entries:
        raws = [s["raw"] for s in e["sentences"]]
        assert len(raws) == 3 and len(set(raws)) == 3  # distinct paraphrases
        shapes = e["scene"]["shapes"]
        assert 1 <= len(shapes) <= 3
        for raw in raws:  # every caption names every shape's colour
            assert all(s["colour"] in raw for s in shapes)
        image = PIL.Image.open(synth_dir / "images" / e["filename"])
        assert image.size == (32, 32)
        words_per_image.append(set(" ".join(raws).split()))
    # graded relevance needs captions of different images that share attributes
    shared = [len(words_per_image[0] & w) for w in words_per_image[1:]]
    assert max(shared) > 3


def test_default_synthetic_dir_generates_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BCLS_CACHE", str(tmp_path / "cache"))
    kwargs = dict(num_train_images=3, num_val_images=1, num_test_images=1, image_size=16)
    first = default_synthetic_dir(**kwargs)
    assert first.parent == tmp_path / "cache" and first.name.startswith("synthetic-v1-seed0")
    stamp = (first / "dataset_synthetic.json").stat().st_mtime_ns
    assert default_synthetic_dir(**kwargs) == first
    assert (first / "dataset_synthetic.json").stat().st_mtime_ns == stamp  # not regenerated
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.name]  # no temp dir left
    assert len(load_pairs(first, "train")) == 15


# --------------------------------------------------------------------------------------------------------------
# loaders


def test_karpathy_pair_view(synth_dir):
    pairs = load_pairs(synth_dir, "train")
    assert pairs.features == Features({**PAIR_FEATURES, "source_caption_id": Value("string")})  # its sentids
    assert len(pairs) == 36
    assert column(pairs, "image_id") == [i for i in range(12) for _ in range(3)]
    assert column(pairs, "caption_id") == list(range(36))
    raw = pairs.select_columns(["image"]).with_format("arrow")[:].column("image").to_pylist()
    assert raw[0]["bytes"] is None and raw[0]["path"].endswith("train_00000.png")  # lazy: only the path is stored
    row = pairs[4]
    assert isinstance(row["image"], PIL.Image.Image) and row["filename"] == "train_00001.png"
    data = json.loads((synth_dir / "dataset_synthetic.json").read_text())
    assert row["caption"] == data["images"][1]["sentences"][1]["raw"]
    assert len(load_karpathy(synth_dir / "dataset_synthetic.json", "validation")) == 12  # alias of val


def test_image_caption_index(synth_dir):
    pairs = load_pairs(synth_dir, "val")
    index = ImageCaptionIndex.from_pairs(pairs.shuffle(seed=0))  # row order does not matter
    assert index.num_images == 4 and index.num_captions == 12
    assert index.caption_image_ids.tolist() == [i for i in range(4) for _ in range(3)]
    assert [ids.tolist() for ids in index.image_caption_ids] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert index.captions == column(pairs, "caption")
    shuffled = pairs.shuffle(seed=0)
    index = ImageCaptionIndex.from_pairs(shuffled)
    for image_id, row in enumerate(index.image_row):
        assert shuffled[int(row)]["image_id"] == image_id
    assert column(index.select_images(shuffled), "image_id") == [0, 1, 2, 3]
    assert index.filenames == [f"val_{i:05d}.png" for i in range(4)]


def test_karpathy_coco_filepath_and_split_list(tmp_path):
    images = [
        {"filename": "a.jpg", "filepath": "train2014", "split": "train", "sentences": ["a cat", "a small cat"]},
        {"filename": "b.jpg", "filepath": "val2014", "split": "restval", "sentences": ["a dog"]},
        {"filename": "c.jpg", "filepath": "val2014", "split": "val", "sentences": ["a bird"]},
    ]
    root = write_karpathy(tmp_path, images)
    pairs = load_pairs(root, ["train", "restval"])
    assert column(pairs, "filename") == ["train2014/a.jpg", "train2014/a.jpg", "val2014/b.jpg"]
    assert column(pairs, "image_id") == [0, 0, 1]
    assert pairs[2]["image"].size == (8, 8)
    with pytest.raises(ValueError, match=r"split 'test' not found.*\['restval', 'train', 'val'\]"):
        load_pairs(root, "test")


def test_imagefolder_jsonl_csv_and_splits(tmp_path):
    jl = tmp_path / "jl"
    for name in ("x.png", "y.png"):
        write_image(jl / name)
    rows = [{"file_name": "x.png", "captions": ["one", "two"]}, {"file_name": "y.png", "captions": ["three"]}]
    (jl / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs = load_pairs(jl, "train")
    assert column(pairs, "caption") == ["one", "two", "three"] and column(pairs, "image_id") == [0, 0, 1]

    cs = tmp_path / "cs"
    for name in ("x.png", "sub/y.png"):
        write_image(cs / name)
    with open(cs / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption", "split"])
        w.writerow(["x.png", "a red square", "train"])
        w.writerow(["sub/y.png", '["a square", "a red box"]', "test"])
    assert column(load_pairs(cs, "train"), "caption") == ["a red square"]
    test = load_imagefolder(cs, "test")
    assert column(test, "caption") == ["a square", "a red box"] and column(test, "filename") == ["sub/y.png"] * 2

    sd = tmp_path / "sd"
    write_image(sd / "validation" / "z.png")
    (sd / "validation" / "metadata.jsonl").write_text(json.dumps({"file_name": "z.png", "caption": "zed"}))
    assert column(load_pairs(sd, "val"), "caption") == ["zed"]  # val → validation folder


def test_hf_dataset_columns_grouping_and_save_to_disk(tmp_path):
    paths = []
    for i in range(3):
        write_image(tmp_path / "img" / f"{i}.png", colour=(i * 80, 0, 0))
        paths.append(str(tmp_path / "img" / f"{i}.png"))
    ds = Dataset.from_dict(
        {"picture": paths, "c0": ["a", "b", "c"], "c1": ["aa", "bb", "cc"]},
        features=Features({"picture": Image(), "c0": Value("string"), "c1": Value("string")}),
    )
    pairs = load_pairs(ds, image_column="picture", caption_column=["c0", "c1"])
    assert pairs.features == PAIR_FEATURES
    assert column(pairs, "caption") == ["a", "aa", "b", "bb", "c", "cc"]
    assert column(pairs, "filename") == ["0.png", "0.png", "1.png", "1.png", "2.png", "2.png"]
    assert pairs[2]["image"].getpixel((0, 0)) == (80, 0, 0)

    # one row per caption + an image id column → rows are grouped into images
    per_caption = Dataset.from_dict(
        {"image": [paths[0], paths[1], paths[0]], "text": ["x", "y", "z"], "img": [7, 9, 7]},
        features=Features({"image": Image(), "text": Value("string"), "img": Value("int64")}),
    )
    grouped = load_hf_dataset(per_caption, image_id_column="img")
    assert column(grouped, "caption") == ["x", "z", "y"] and column(grouped, "image_id") == [0, 0, 1]

    # embedded bytes, saved to disk as a DatasetDict
    embedded = Dataset.from_dict(
        {"image": [{"bytes": Path(p).read_bytes(), "path": None} for p in paths], "captions": [["p", "q"], ["r"], ["s"]]},
        features=Features({"image": Image(), "captions": [Value("string")]}),
    )
    DatasetDict({"train": embedded}).save_to_disk(str(tmp_path / "saved"))
    saved = load_pairs(tmp_path / "saved", "train")
    assert column(saved, "caption") == ["p", "q", "r", "s"] and saved[3]["image"].getpixel((0, 0)) == (160, 0, 0)

    # an already built pair view round-trips through save_to_disk unchanged
    saved.save_to_disk(str(tmp_path / "pairview"))
    again = load_pairs(tmp_path / "pairview")
    assert column(again, "caption_id") == column(saved, "caption_id")


def test_folder_of_parquet_files(tmp_path):
    write_image(tmp_path / "x.png", colour=(1, 2, 3))
    ds = Dataset.from_dict(
        {"image": [{"bytes": (tmp_path / "x.png").read_bytes(), "path": "x.png"}], "sentences": [["one", "two"]]},
        features=Features({"image": Image(), "sentences": [Value("string")]}),
    )
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "train.parquet"))
    pairs = load_pairs(tmp_path / "data", "train", cache_dir=str(tmp_path / "hf_cache"))
    assert column(pairs, "caption") == ["one", "two"] and pairs[1]["image"].getpixel((0, 0)) == (1, 2, 3)


def test_load_pairs_unknown_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="data path not found"):
        load_pairs(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="unrecognised data folder"):
        load_pairs(tmp_path / "empty")


def test_densify_ids_after_filtering(synth_dir):
    pairs = load_pairs(synth_dir, "train")
    subset = pairs.select([3, 4, 10, 30, 31])
    with pytest.raises(InvalidDataError, match="must be dense.*densify_ids"):
        ImageCaptionIndex.from_pairs(subset)
    dense = densify_ids(subset)
    assert column(dense, "image_id") == [0, 0, 1, 2, 2] and column(dense, "caption_id") == [0, 1, 2, 3, 4]
    assert column(dense, "caption") == column(subset, "caption")
    assert ImageCaptionIndex.from_pairs(dense).num_images == 3


# --------------------------------------------------------------------------------------------------------------
# bad input: a clear error naming the file/row/column, or a counted, logged skip


def _corrupt(root: Path, name: str) -> None:
    (root / "images" / name).write_bytes(b"this is not a jpeg" * 10)


def _truncate(root: Path, name: str) -> None:
    path = root / "images" / name
    PIL.Image.effect_noise((64, 64), 50).convert("RGB").save(path, format="PNG")
    path.write_bytes(path.read_bytes()[:200])


BAD_KARPATHY = {
    # name: (how to break image 1 of 3, error message pattern, skip reason, pairs left after skipping)
    "missing file": (lambda root, imgs: (root / "images" / "im1.png").unlink(), r"images\[1\].*im1\.png.*not found", "missing image file", 4),
    "corrupt file": (lambda root, imgs: _corrupt(root, "im1.png"), r"images\[1\] \(im1\.png\).*cannot read image", "unreadable image", 4),
    "truncated file": (lambda root, imgs: _truncate(root, "im1.png"), r"images\[1\] \(im1\.png\).*cannot read image", "unreadable image", 4),
    "empty caption": (lambda root, imgs: imgs[1]["sentences"].__setitem__(0, "   "), r"images\[1\] \(im1\.png\): caption 0 is empty", "empty caption", 5),
    "non-string caption": (lambda root, imgs: imgs[1]["sentences"].__setitem__(1, {"raw": 42, "sentid": 99}), r"images\[1\] \(im1\.png\): caption 1 is int", "non-string caption", 5),
    "image with no caption": (lambda root, imgs: imgs[1].__setitem__("sentences", []), r"images\[1\] \(im1\.png\).*has no caption", "image with no caption", 4),
    "duplicate filename": (lambda root, imgs: imgs[2].__setitem__("filename", "im1.png"), r"images\[2\].*duplicate filename 'im1\.png'.*images\[1\]", "duplicate image", 4),
    "duplicate sentid": (lambda root, imgs: imgs[2]["sentences"].__setitem__(0, {"raw": "dup", "sentid": 0}), r"images\[2\].*duplicate sentid 0", "duplicate caption id", 5),
}


@pytest.mark.parametrize("kind", sorted(BAD_KARPATHY))
def test_karpathy_bad_input(tmp_path, caplog, kind):
    breaker, pattern, reason, left = BAD_KARPATHY[kind]
    images = toy_images()
    write_karpathy(tmp_path, images)
    breaker(tmp_path, images)
    write_karpathy(tmp_path, images, make_files=False)
    with pytest.raises(InvalidDataError, match=pattern):
        load_pairs(tmp_path, "train")
    with caplog.at_level(logging.WARNING, logger="trainer_bcls.data.loaders"):
        pairs = load_pairs(tmp_path, "train", skip_invalid=True)
    assert len(pairs) == left
    assert f"skipped 1 x {reason}" in caplog.text
    index = ImageCaptionIndex.from_pairs(pairs)  # still dense and consistent
    assert index.num_captions == left


def test_corrupt_image_found_later_by_validate_images(tmp_path, caplog):
    write_karpathy(tmp_path, toy_images(n=4))
    _corrupt(tmp_path, "im2.png")
    pairs = load_pairs(tmp_path, "train", check_images=False)  # existence only
    assert len(pairs) == 8
    with pytest.raises(InvalidDataError, match=r"row 4 \(image_id 2, im2\.png\)"):
        validate_images(pairs)
    with caplog.at_level(logging.WARNING, logger="trainer_bcls.data.loaders"):
        valid = validate_images(pairs, skip_invalid=True)
    assert "skipped 1 x unreadable image" in caplog.text
    assert column(valid, "filename") == ["im0.png", "im0.png", "im1.png", "im1.png", "im3.png", "im3.png"]
    assert column(valid, "image_id") == [0, 0, 1, 1, 2, 2] and column(valid, "caption_id") == list(range(6))
    undecoded = without_image_decoding(valid)
    assert isinstance(undecoded[0]["image"], dict)


def test_unknown_columns_are_named(tmp_path):
    write_image(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "description": "a"}))
    with pytest.raises(ValueError, match=r"no caption column.*available columns: \['file_name', 'description'\]"):
        load_pairs(tmp_path)
    with pytest.raises(ValueError, match=r"caption column\(s\) \['nope'\] not found.*\['file_name', 'description'\]"):
        load_pairs(tmp_path, caption_column="nope")
    assert column(load_pairs(tmp_path, caption_column="description"), "caption") == ["a"]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"path": "x.png", "caption": "a"}))
    with pytest.raises(ValueError, match=r"no 'file_name' column; available columns: \['path', 'caption'\]"):
        load_pairs(tmp_path)

    ds = Dataset.from_dict({"image": [str(tmp_path / "x.png")], "caption": ["a"]}, features=Features({"image": Image(), "caption": Value("string")}))
    with pytest.raises(ValueError, match=r"image column 'img' not found.*\['image', 'caption'\]"):
        load_pairs(ds, image_column="img")
    with pytest.raises(ValueError, match=r"caption column\(s\) \['text'\] not found.*\['image', 'caption'\]"):
        load_pairs(ds, caption_column="text")


def test_imagefolder_duplicates_and_bad_rows(tmp_path, caplog):
    for name in ("x.png", "y.png"):
        write_image(tmp_path / name)
    rows = [
        {"file_name": "x.png", "caption": "first"},
        {"file_name": "y.png", "caption": ""},
        {"file_name": "./x.png", "caption": "again"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]))
    with pytest.raises(InvalidDataError, match=r"line 2 \(y\.png\): caption 0 is empty"):
        load_pairs(tmp_path)
    rows[1]["caption"] = "fine"
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(InvalidDataError, match=r"line 3 \(\./x\.png\): duplicate file_name .*also line 1"):
        load_pairs(tmp_path)
    with caplog.at_level(logging.WARNING, logger="trainer_bcls.data.loaders"):
        pairs = load_pairs(tmp_path, skip_invalid=True)
    assert column(pairs, "caption") == ["first", "fine"] and "skipped 1 x duplicate image" in caplog.text


def test_hf_dataset_bad_captions_and_missing_files(tmp_path, caplog):
    write_image(tmp_path / "x.png")
    ds = Dataset.from_dict(
        {"image": [str(tmp_path / "x.png"), str(tmp_path / "gone.png"), str(tmp_path / "x2.png")], "captions": [["ok"], ["fine"], []]},
        features=Features({"image": Value("string"), "captions": [Value("string")]}),
    )
    with pytest.raises(InvalidDataError, match=r"row 1: image file not found: .*gone\.png"):
        load_pairs(ds)
    with caplog.at_level(logging.WARNING, logger="trainer_bcls.data.loaders"):
        pairs = load_pairs(ds, skip_invalid=True)
    assert column(pairs, "caption") == ["ok"]
    assert "skipped 1 x missing image file" in caplog.text and "skipped 1 x image with no caption" in caplog.text


def test_pair_view_duplicate_ids_are_named():
    base = {"image": ["a.png", "b.png", "c.png"], "caption": ["x", "y", "z"], "image_id": [0, 1, 1], "filename": ["a.png", "b.png", "c.png"]}
    with pytest.raises(InvalidDataError, match="duplicate caption_id 1 at rows 1 and 2"):
        ImageCaptionIndex.from_pairs(Dataset.from_dict({**base, "caption_id": [0, 1, 1]}))
    with pytest.raises(InvalidDataError, match=r"image_id 1 has two filenames: 'b\.png' \(row 1\) and 'c\.png' \(row 2\)"):
        ImageCaptionIndex.from_pairs(Dataset.from_dict({**base, "caption_id": [0, 1, 2]}))
    same_file = {**base, "image_id": [0, 1, 2], "filename": ["a.png", "b.png", "a.png"], "caption_id": [0, 1, 2]}
    with pytest.raises(InvalidDataError, match=r"duplicate image: filename 'a\.png' has image_id 0 .*image_id 2 \(row 2\)"):
        ImageCaptionIndex.from_pairs(Dataset.from_dict(same_file))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['caption_id'\]"):
        ImageCaptionIndex.from_pairs(Dataset.from_dict(base))


# --------------------------------------------------------------------------------------------------------------
# original ids (issue 21): the keys of extended-positive files


def test_karpathy_coco_ids_are_kept(tmp_path):
    """A tiny Karpathy COCO file: cocoid and sentids (COCO caption ids) survive as source ids and name the pairs."""
    images = [
        {"filename": "COCO_val2014_000000391895.jpg", "filepath": "val2014", "split": "test", "cocoid": 391895,
         "sentids": [770337, 771687], "sentences": [{"raw": "a man on a bike", "sentid": 770337},
                                                    {"raw": "a cyclist", "sentid": 771687}]},
        {"filename": "COCO_val2014_000000522418.jpg", "filepath": "val2014", "split": "test", "cocoid": 522418,
         "sentids": [681330, 686718, 688839], "sentences": [{"raw": "a woman"}, {"raw": " "}, {"raw": "a kitchen"}]},  # ids from sentids
        {"filename": "COCO_train2014_000000000009.jpg", "filepath": "train2014", "split": "train", "cocoid": 9,
         "sentids": [1], "sentences": [{"raw": "food", "sentid": 1}]},
    ]
    write_karpathy(tmp_path, images, name="dataset_coco.json")
    data = json.loads((tmp_path / "dataset_coco.json").read_text())
    for entry, source in zip(data["images"], images):
        entry["cocoid"], entry["sentids"] = source["cocoid"], source["sentids"]
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    pairs = load_pairs(tmp_path, "test", skip_invalid=True)  # the blank caption is skipped: ids stay aligned
    assert column(pairs, "source_image_id") == ["391895", "391895", "522418", "522418"]
    assert column(pairs, "source_caption_id") == ["770337", "771687", "681330", "688839"]
    assert column(pairs, "caption") == ["a man on a bike", "a cyclist", "a woman", "a kitchen"]
    assert pair_keys(pairs) == (["391895", "522418"], ["770337", "771687", "681330", "688839"])
    # without original ids: file names and file#k
    plain = load_pairs(write_karpathy(tmp_path / "plain", [{"filename": "a.png", "sentences": [{"raw": "x"}, {"raw": "y"}]}]),
                       "train")
    assert "source_image_id" not in plain.column_names and "source_caption_id" not in plain.column_names
    assert pair_keys(plain) == (["a.png"], ["a.png#0", "a.png#1"])


def test_metadata_image_and_caption_ids_are_kept(tmp_path):
    write_image(tmp_path / "x.png")
    write_image(tmp_path / "y.png", colour=(0, 0, 200))
    rows = [{"file_name": "x.png", "image_id": 17, "captions": ["a", "b"], "caption_id": [170, 171]},
            {"file_name": "y.png", "image_id": 18, "captions": ["c"], "caption_id": 180}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs = load_pairs(tmp_path, "train")
    assert pair_keys(pairs) == (["17", "18"], ["170", "171", "180"])
    rows[0]["caption_id"] = [170]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(InvalidDataError, match=r"metadata\.jsonl line 1.*1 caption_id value\(s\) for 2 caption"):
        load_pairs(tmp_path, "train")
    rows[0]["caption_id"], rows[1]["image_id"] = [170, 171], 17
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(InvalidDataError, match=r"two images share the key '17'"):
        pair_keys(load_pairs(tmp_path, "train"))
