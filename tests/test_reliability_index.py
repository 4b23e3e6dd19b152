"""Issue 26 items 4-8, 11, 12 and the index errors: non-finite rows, dimensions, atomic saves that check that their
files belong together, content digests, degenerate queries, named pipes, huge images, resumable builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trainer_bcls.retrieval.index as retrieval_index
from conftest import load_example
from test_retrieval_index import IMAGE_NAMES, _save_tiny_model, _write_images
from trainer_bcls.data.errors import InvalidDataError
from trainer_bcls.data.image_loading import ImageLoadError, load_image
from trainer_bcls.retrieval.image_sources import FolderSource
from trainer_bcls.retrieval.index import (
    METADATA_FILE,
    RetrievalIndex,
    RetrievalModel,
    build_index,
    faiss_available,
    stored_file,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save_tiny_model(tmp_path_factory.mktemp("model"), seed=0)


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    _write_images(folder, IMAGE_NAMES)
    return folder


def _retrieve(*argv) -> object:
    return load_example("retrieve").main([str(a) for a in argv])


def _unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# 4. non-finite embeddings; FAISS label -1


def test_a_model_with_nan_weights_cannot_build_an_index(model_dir, image_dir, tmp_path):
    from modeling_bcls import BCLSModel

    broken = tmp_path / "nan_model"
    shutil.copytree(model_dir, broken)
    model = BCLSModel.from_pretrained(broken)
    with torch.no_grad():
        model.visual_projection.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    with pytest.raises(SystemExit, match=r"7 of 7 embedding rows are not finite.*a\.png"):
        _retrieve("index", "--model", broken, "--images", image_dir, "--output", tmp_path / "idx", "--no_progress")
    assert not (tmp_path / "idx" / METADATA_FILE).exists()


def test_non_finite_rows_are_refused_at_load(tmp_path):
    index = RetrievalIndex(_unit(4, 8), list("abcd"), "m", "sha256:x")
    index.save(tmp_path / "idx")
    embeddings = index.embeddings.clone()
    embeddings[2, 3] = float("nan")
    from safetensors.torch import save_file

    path = stored_file(tmp_path / "idx", "embeddings")
    save_file({"embeddings": embeddings}, str(path))  # same shape, NaN row: the digest no longer matches
    with pytest.raises(InvalidDataError, match="does not match index.json"):
        RetrievalIndex.load(tmp_path / "idx")
    with pytest.raises(InvalidDataError, match=r"1 of 4 embedding rows are not finite.*e\.g\. c"):
        RetrievalIndex(embeddings, list("abcd"), "m", "sha256:x")


def test_faiss_label_minus_one_is_never_a_hit(monkeypatch):
    index = RetrievalIndex(_unit(3, 8), ["a", "b", "c"], "m", "sha256:x", use_faiss=False)

    class Padded:  # what FAISS returns when it has fewer hits than asked: label -1, score -FLT_MAX
        ntotal, d = 3, 8

        def search(self, queries, k):
            return (np.array([[0.9, -3.4e38, -3.4e38]], dtype=np.float32), np.array([[1, -1, -1]]))

    index.use_faiss, index._faiss_index = True, Padded()
    monkeypatch.setattr(index, "_faiss", lambda: index._faiss_index)
    hits = index.search(_unit(1, 8), top_k=3)[0]
    assert [h.path for h in hits] == ["b"]  # not "c" (paths[-1]) three times


def test_non_finite_queries_are_refused():
    index = RetrievalIndex(_unit(3, 8), ["a", "b", "c"], "m", "sha256:x", use_faiss=False)
    with pytest.raises(ValueError, match="not finite"):
        index.search(torch.full((1, 8), float("nan")))


# ---------------------------------------------------------------------------------------------------------------------
# 5. dimensions


def test_queries_of_another_dimension_are_refused():
    index = RetrievalIndex(_unit(5, 64), list("abcde"), "m", "sha256:x", use_faiss=False)
    with pytest.raises(ValueError, match=r"queries of shape \(1, 128\) do not fit an index of dim 64"):
        index.search(_unit(1, 128))
    with pytest.raises(ValueError, match="dim 64"):
        index.add(_unit(1, 128), ["f"])


# ---------------------------------------------------------------------------------------------------------------------
# 6. atomic save, files that belong together


def test_a_crash_during_save_leaves_the_previous_index_whole(tmp_path, monkeypatch):
    old = RetrievalIndex(_unit(4, 8, seed=1), list("abcd"), "m", "sha256:x")
    old.save(tmp_path / "idx")
    new = RetrievalIndex(_unit(5, 8, seed=2), list("abcde"), "m", "sha256:x")
    real_replace = os.replace

    def crash_at_manifest(src, dst):
        if Path(dst).name == METADATA_FILE:
            raise KeyboardInterrupt("killed between the data files and the manifest")
        return real_replace(src, dst)

    monkeypatch.setattr(retrieval_index.os, "replace", crash_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "idx")
    monkeypatch.setattr(retrieval_index.os, "replace", real_replace)
    loaded = RetrievalIndex.load(tmp_path / "idx")
    assert loaded.paths == list("abcd")
    torch.testing.assert_close(loaded.embeddings, old.embeddings)
    new.save(tmp_path / "idx")  # a re-run completes; leftovers of the crashed save are removed
    assert RetrievalIndex.load(tmp_path / "idx").paths == list("abcde")
    names = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert len(names) == (3 if faiss_available() else 2), names


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")
def test_a_stale_faiss_file_does_not_win_over_the_embeddings(tmp_path):
    index = RetrievalIndex(_unit(6, 8, seed=3), list("abcdef"), "m", "sha256:x", use_faiss=True)
    index.save(tmp_path / "idx")
    other = RetrievalIndex(_unit(6, 8, seed=4), list("abcdef"), "m", "sha256:x", use_faiss=True)
    other.save(tmp_path / "other")
    shutil.copy(stored_file(tmp_path / "other", "faiss"), stored_file(tmp_path / "idx", "faiss"))  # same size
    loaded = RetrievalIndex.load(tmp_path / "idx")
    query = index.embeddings[2:3]
    assert loaded.search(query, top_k=1)[0][0].path == "c"  # from the embeddings, not the foreign index.faiss


def test_version_one_folders_still_load(tmp_path):
    embeddings = _unit(3, 8)
    (tmp_path / "v1").mkdir()
    from safetensors.torch import save_file

    save_file({"embeddings": embeddings}, str(tmp_path / "v1" / "embeddings.safetensors"))
    (tmp_path / "v1" / METADATA_FILE).write_text(json.dumps({
        "format": "bcls-retrieval-index", "version": 1, "model": "m", "model_fingerprint": "sha256:x", "dim": 8,
        "normalized": True, "bf16": False, "count": 3, "paths": ["a", "b", "c"], "stamps": [None] * 3}))
    assert RetrievalIndex.load(tmp_path / "v1").paths == ["a", "b", "c"]


@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "not a bcls-retrieval-index file"),
    ({"format": "bcls-retrieval-index", "model": "m", "model_fingerprint": "x", "dim": 8, "paths": []}, "lacks count"),
])
def test_a_malformed_manifest_is_a_clear_error(tmp_path, content, message):
    RetrievalIndex(_unit(2, 8), ["a", "b"], "m", "sha256:x").save(tmp_path / "idx")
    (tmp_path / "idx" / METADATA_FILE).write_text(json.dumps(content))
    with pytest.raises(InvalidDataError, match=message):
        RetrievalIndex.load(tmp_path / "idx")


def test_counts_and_duplicate_paths_are_named(tmp_path):
    index = RetrievalIndex(_unit(10, 8), [f"p{i}" for i in range(10)], "m", "sha256:x")
    index.save(tmp_path / "idx")
    metadata = json.loads((tmp_path / "idx" / METADATA_FILE).read_text())
    metadata["paths"] = metadata["paths"][:9]
    (tmp_path / "idx" / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(InvalidDataError, match="holds 10 rows.*count 10, dim 8 and lists 9 paths"):
        RetrievalIndex.load(tmp_path / "idx")
    with pytest.raises(ValueError, match="duplicate path.*p3"):
        RetrievalIndex(_unit(3, 8), ["p1", "p3", "p3"], "m", "sha256:x")


# ---------------------------------------------------------------------------------------------------------------------
# 7. same size and mtime, other bytes


def test_a_replaced_file_with_the_same_size_and_mtime_is_reembedded(model_dir, image_dir, tmp_path):
    _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", tmp_path / "idx", "--no_progress")
    target = image_dir / "a.png"
    stat = target.stat()
    replacement = tmp_path / "other.png"
    Image.fromarray(np.ascontiguousarray(np.asarray(Image.open(target))[::-1])).save(replacement)  # flipped
    if replacement.stat().st_size != stat.st_size:
        pytest.skip("the flipped PNG has another size")
    shutil.copyfile(replacement, target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    summary = _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", tmp_path / "idx",
                        "--no_progress")
    assert summary["updated"] == 1
    fresh, _ = build_index(RetrievalModel.from_pretrained(str(model_dir), "cpu"), FolderSource(image_dir),
                           show_progress=False)
    torch.testing.assert_close(RetrievalIndex.load(tmp_path / "idx").embeddings, fresh.embeddings, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# 8. degenerate queries


@pytest.fixture
def built(model_dir, image_dir, tmp_path):
    _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", tmp_path / "idx", "--no_progress")
    return tmp_path / "idx"


@pytest.mark.parametrize("query", ["", "   ", "\t\n"])
def test_empty_query_is_an_error_naming_it(built, query):
    with pytest.raises(SystemExit, match="--query .* is empty") as err:
        _retrieve("search", "--index", built, "--query", query)
    assert err.value.code == 2


@pytest.mark.parametrize("top_k", ["0", "-5", "x"])
def test_top_k_below_one_is_an_error_naming_it(built, top_k, capsys):
    with pytest.raises(SystemExit) as err:
        _retrieve("search", "--index", built, "--query", "a red circle", "--top_k", top_k)
    assert err.value.code == 2 and "--top_k must be a positive integer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="top_k"):
        RetrievalIndex.load(built).search(torch.zeros(1, 16), top_k=int(top_k) if top_k != "x" else 0)


def test_search_output_is_valid_json(built, capsys):
    rows = _retrieve("search", "--index", built, "--query", "a red circle", "--top_k", "3")
    printed = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in printed] == rows and len(rows) == 3


# ---------------------------------------------------------------------------------------------------------------------
# unclear errors: the output folder, a vanished model folder, resumable builds, exit status 2


def test_output_that_is_a_file_is_refused_before_embedding(model_dir, image_dir, tmp_path, monkeypatch):
    (tmp_path / "out").write_text("not a folder")
    embedded = []
    monkeypatch.setattr(retrieval_index, "embed_image_source", lambda *a, **k: embedded.append(1))
    with pytest.raises(SystemExit, match="--output .*out is a file"):
        _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", tmp_path / "out", "--no_progress")
    assert not embedded


def test_a_deleted_model_folder_recorded_in_the_index_is_named(model_dir, image_dir, tmp_path):
    model_copy = tmp_path / "model_copy"
    shutil.copytree(model_dir, model_copy)
    _retrieve("index", "--model", model_copy, "--images", image_dir, "--output", tmp_path / "idx", "--no_progress")
    shutil.rmtree(model_copy)
    with pytest.raises(SystemExit, match=r"model the index was built with, .*model_copy, is gone.*--model"):
        _retrieve("search", "--index", tmp_path / "idx", "--query", "a red circle")
    rows = _retrieve("search", "--index", tmp_path / "idx", "--query", "a red circle", "--model", model_dir)
    assert len(rows) == len(IMAGE_NAMES)


def test_a_killed_build_resumes_where_it_stopped(model_dir, image_dir, tmp_path, monkeypatch):
    model = RetrievalModel.from_pretrained(str(model_dir), "cpu")
    source = FolderSource(image_dir)
    real_load, calls = FolderSource.load, []

    def killed_after_four(self, position):
        calls.append(position)
        if len(calls) > 4:
            raise KeyboardInterrupt("killed")
        return real_load(self, position)

    monkeypatch.setattr(FolderSource, "load", killed_after_four)
    with pytest.raises(KeyboardInterrupt):
        build_index(model, source, tmp_path / "idx", batch_size=2, show_progress=False, checkpoint_seconds=0)
    partial = len(RetrievalIndex.load(tmp_path / "idx"))
    assert partial in (2, 4)  # the first batch, and the second unless saving the first took longer than it
    monkeypatch.setattr(FolderSource, "load", real_load)
    index, report = build_index(model, source, tmp_path / "idx", batch_size=2, show_progress=False)
    assert (report.added, report.already_indexed, report.total) == (7 - partial, partial, 7)
    fresh, _ = build_index(model, source, None, show_progress=False)
    torch.testing.assert_close(RetrievalIndex.load(tmp_path / "idx").embeddings, fresh.embeddings, atol=1e-6, rtol=0)


def test_scripts_print_error_and_exit_2_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("BCLS_DEBUG", None)
    run = lambda *args, **kw: subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                                             env={**env, **kw}, cwd=ROOT, timeout=300)
    result = run(ROOT / "examples" / "retrieve.py", "search", "--index", tmp_path / "missing", "--query", "x")
    assert result.returncode == 2 and result.stderr.strip().startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr and "not a retrieval index" in result.stderr
    debug = run(ROOT / "examples" / "retrieve.py", "search", "--index", tmp_path / "missing", "--query", "x",
                BCLS_DEBUG="1")
    assert "Traceback" in debug.stderr
    result = run("-m", "trainer_bcls.towers.export_onnx", "--model", tmp_path / "missing", "--output", tmp_path / "o")
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# 11. named pipes; 12. huge images


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_named_pipe_in_the_folder_is_skipped_not_opened(model_dir, image_dir, tmp_path, caplog):
    os.mkfifo(image_dir / "pipe.png")
    source = FolderSource(image_dir)
    assert str((image_dir / "pipe.png").resolve()) not in source.keys and len(source) == len(IMAGE_NAMES)
    assert "not regular files" in caplog.text and "pipe.png" in caplog.text
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(str(image_dir / "pipe.png"))  # refused before open(), which would block


def test_decoded_pixels_are_bounded(tmp_path):
    big_png = tmp_path / "big.png"
    Image.new("L", (4000, 3000), 0).save(big_png)  # 12 M px in a few KB
    with pytest.raises(ImageLoadError, match=r"big\.png.*4000 x 3000 = 12000000 pixels exceeds .* 1000000"):
        load_image(str(big_png), max_pixels=1_000_000)
    big_jpeg = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(big_jpeg, quality=50)
    image = load_image(str(big_jpeg), max_pixels=1_000_000)  # draft mode: 1/4 scale
    assert image.size == (1000, 750) and image.getpixel((5, 5))[1] > 150
    assert load_image(str(big_png)).size == (4000, 3000)  # under the default bound


def test_index_skips_images_over_the_pixel_bound(model_dir, image_dir, tmp_path):
    Image.new("L", (3000, 3000), 0).save(image_dir / "huge.png")
    with pytest.raises(SystemExit, match="huge.png.*exceeds the decoding bound"):
        _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", tmp_path / "idx",
                  "--max_image_pixels", "4000000", "--no_progress")
    summary = _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", tmp_path / "idx",
                        "--max_image_pixels", "4000000", "--skip_invalid", "--no_progress")
    assert summary["skipped"] == 1 and summary["images"] == len(IMAGE_NAMES)
