"""Multi-process embedding (issue 22 item 3): `accelerate launch` with 2 gloo processes builds the index a single
process builds (rows, ids, manifest), incremental runs included; a killed build's parts are resumed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_distributed import launch
from test_retrieval_index import IMAGE_NAMES, QUERIES, _retrieve, _save_tiny_model, _write_images
from trainer_bcls.retrieval.image_sources import FolderSource
from trainer_bcls.retrieval.index import METADATA_FILE, PARTS_FOLDER, RetrievalIndex, RetrievalModel, build_index
from trainer_bcls.retrieval.parallel_index import PartWriter

ROOT = Path(__file__).resolve().parents[1]
NAMES = IMAGE_NAMES + [f"more/{i:02d}.png" for i in range(9)]  # 16 images: uneven shares of 2 processes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save_tiny_model(tmp_path_factory.mktemp("model"), seed=0)


def _index(model_dir: Path, images: Path, output: Path, *extra: str, processes: int = 1, tmp: Path | None = None):
    args = ["index", "--model", str(model_dir), "--images", str(images), "--output", str(output), "--batch_size", "3",
            "--no_progress", "--device", "cpu", *extra]
    if processes == 1:
        return _retrieve(*args)
    proc = launch([str(ROOT / "examples/retrieve.py"), *args], tmp)
    summary = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rates = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith('{"process"')]
    assert len(summary) == 1, proc.stdout  # process 0 only; the others print their rate to stderr
    return summary[0], rates


def _manifest(folder: Path) -> dict:
    """The manifest without what differs by run (the digests name the same content only if the bytes match)."""
    manifest = json.loads((folder / METADATA_FILE).read_text())
    manifest.pop("files")
    return manifest


def assert_same_index(a: Path, b: Path) -> None:
    one, other = RetrievalIndex.load(a), RetrievalIndex.load(b)
    assert one.paths == other.paths and one.stamps == other.stamps
    np.testing.assert_array_equal(one.ids, other.ids)
    assert (one.embeddings - other.embeddings).abs().max().item() <= 1e-5
    assert _manifest(a) == _manifest(b)
    assert not (b / PARTS_FOLDER).exists()


@pytest.mark.multiprocess
def test_two_processes_build_the_one_process_index_and_update_it_alike(model_dir, tmp_path):
    images = tmp_path / "images"
    _write_images(images, NAMES[:11])
    single, double = tmp_path / "single", tmp_path / "double"
    _index(model_dir, images, single, "--index_type", "ivf", "--nlist", "2")
    summary, rates = _index(model_dir, images, double, "--index_type", "ivf", "--nlist", "2", processes=2,
                            tmp=tmp_path)
    assert (summary["processes"], summary["images"], summary["added"]) == (2, 11, 11)
    assert len(summary["images_per_s"]) == 2 and all(r > 0 for r in summary["images_per_s"])
    assert [(r["process"], r["images"]) for r in rates] == [(1, 5)]  # positions 1, 3, ..., 9
    assert_same_index(single, double)

    # incremental: 5 new images, one changed, one deleted, one unreadable; the 1- and 2-process updates agree
    _write_images(images, NAMES[11:], seed=1)
    Image.new("RGB", (30, 30), (0, 200, 0)).save(images / "sub" / "c.png")
    (images / "z.bmp").unlink()
    (images / "broken.png").write_bytes(b"not a png")
    one = _index(model_dir, images, single, "--skip_invalid")
    two, _ = _index(model_dir, images, double, "--skip_invalid", processes=2, tmp=tmp_path)
    assert (two["added"], two["updated"], two["removed"], two["already_indexed"], two["skipped"]) == (5, 1, 1, 9, 1)
    differ = ("index", "processes", "images_per_s")
    assert {k: v for k, v in two.items() if k not in differ} == {k: v for k, v in one.items() if k not in differ}
    assert_same_index(single, double)
    hits = _retrieve("search", "--index", double, "--query", QUERIES[0], "--top_k", "3")
    assert len(hits) == 3 and hits[0]["path"] in RetrievalIndex.load(single).paths


@pytest.mark.multiprocess
def test_two_processes_index_a_saved_dataset_like_one(model_dir, tmp_path):
    from datasets import Dataset, Image as ImageFeature

    _write_images(tmp_path / "images", NAMES)
    files = [str(tmp_path / "images" / n) for n in NAMES]
    Dataset.from_dict({"image": files}).cast_column("image", ImageFeature()).save_to_disk(tmp_path / "ds")
    _index(model_dir, tmp_path / "ds", tmp_path / "single")
    summary, _ = _index(model_dir, tmp_path / "ds", tmp_path / "double", processes=2, tmp=tmp_path)
    assert (summary["images"], summary["processes"]) == (len(NAMES), 2)
    assert_same_index(tmp_path / "single", tmp_path / "double")


@pytest.mark.multiprocess
def test_an_unreadable_image_in_one_process_stops_both_naming_it(model_dir, tmp_path):
    images = tmp_path / "images"
    _write_images(images, NAMES[:4])
    (images / "broken.png").write_bytes(b"not a png")
    with pytest.raises(AssertionError, match=r"error: .*broken\.png"):
        _index(model_dir, images, tmp_path / "idx", processes=2, tmp=tmp_path)
    assert not (tmp_path / "idx" / METADATA_FILE).exists()


def test_parts_of_a_killed_build_are_resumed(model_dir, tmp_path):
    """A killed multi-process build leaves part files; the next build adds them and embeds only the rest."""
    images = tmp_path / "images"
    _write_images(images, NAMES[:8])
    model = RetrievalModel.from_pretrained(str(model_dir), "cpu")
    source = FolderSource(images)
    fresh, _ = build_index(model, source, tmp_path / "fresh", show_progress=False)
    parts = tmp_path / "idx" / PARTS_FOLDER
    parts.mkdir(parents=True)
    done = [0, 2, 4]  # process 0 of 2 had embedded three of its images when it was killed
    PartWriter(parts, 0, model).write(done, [source.keys[p] for p in done], [source.stamp(p) for p in done],
                                      fresh.embeddings[done] + 0.0)
    (parts / "r00001-000000.json.tmp").write_text("{")  # a sidecar being written when the build was killed
    other = RetrievalModel(model.model, model.processor, model.name, "another-model", False)
    PartWriter(parts, 1, other).write([1], [source.keys[1]], [source.stamp(1)], torch.zeros(1, 16))  # ignored

    calls = []
    real_load = FolderSource.load
    FolderSource.load = lambda self, position: calls.append(position) or real_load(self, position)
    try:
        index, report = build_index(model, source, tmp_path / "idx", show_progress=False)
    finally:
        FolderSource.load = real_load
    assert sorted(calls) == [1, 3, 5, 6, 7] and (report.added, report.already_indexed) == (5, 3)
    assert not parts.exists()
    assert RetrievalIndex.load(tmp_path / "idx").paths == fresh.paths
    torch.testing.assert_close(RetrievalIndex.load(tmp_path / "idx").embeddings, fresh.embeddings, atol=1e-6, rtol=0)

