"""Embed-once index and search (`trainer_bcls.retrieval.index`, `examples/retrieve.py index|search`), devices and bf16
for `retrieve.py` / `evaluate.py` (issue 12 items 3-4), and retrieve.py's bad-input cases (issue 13)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_example
from trainer_bcls.data.image_loading import load_image
from trainer_bcls.retrieval.image_sources import FolderSource, open_image_source
from trainer_bcls.retrieval.inference_device import prepare_for_inference, resolve_device
from trainer_bcls.retrieval.index import (
    EMBEDDINGS_FILE,
    FAISS_FILE,
    METADATA_FILE,
    RetrievalIndex,
    RetrievalModel,
    build_index,
    faiss_available,
    model_fingerprint,
    stored_file,
)

ROOT = Path(__file__).resolve().parents[1]


QUERIES = ["a red circle", "a small blue square on the left", "green"]


def _save_tiny_model(folder: Path, seed: int) -> Path:
    from trainer_bcls.towers.tiny_towers import build_tiny_model_and_processor

    torch.manual_seed(seed)
    model, processor = build_tiny_model_and_processor(
        QUERIES + ["a big yellow triangle"], image_size=32, projection_dim=16, vision="vit"
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save_tiny_model(tmp_path_factory.mktemp("model"), seed=0)


def _write_images(folder: Path, names: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(24 + 4 * len(name) % 20, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)


IMAGE_NAMES = ["a.png", "b.jpg", "sub/c.png", "sub/d.jpeg", "sub/deeper/e.png", "sub/deeper/f.webp", "z.bmp"]


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    _write_images(folder, IMAGE_NAMES)
    (folder / "notes.txt").write_text("not an image")
    _write_images(folder, [".hidden/g.png", ".h.png"])  # hidden: not indexed
    return folder


def _retrieve(*argv: str):
    return load_example("retrieve").main([str(a) for a in argv])


def _brute_force(model_dir: Path, paths: list[Path], queries: list[str]) -> torch.Tensor:
    """Cosine scores [Q, N] from the model itself, one image at a time, no index involved."""
    from modeling_bcls import BCLSModel, BCLSProcessor

    model, processor = BCLSModel.from_pretrained(model_dir).eval(), BCLSProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        images = torch.cat([
            model.encode_image(processor(images=[load_image(p)], return_tensors="pt")["pixel_values"]) for p in paths
        ])  # fmt: skip
        tokens = processor(text=queries, padding=True, return_tensors="pt")
        texts = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    return texts @ images.T


# ---------------------------------------------------------------------------------------------------------------------
# index + search


def test_index_and_search_equal_brute_force_over_model_embeddings(model_dir, image_dir, tmp_path, capsys):
    summary = _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", tmp_path / "idx",
                        "--batch_size", "3", "--num_workers", "2", "--device", "cpu", "--no_progress")
    assert summary["images"] == summary["added"] == len(IMAGE_NAMES) and summary["skipped"] == 0
    metadata = json.loads((tmp_path / "idx" / METADATA_FILE).read_text())
    expected_paths = sorted(str((image_dir / n).resolve()) for n in IMAGE_NAMES)
    assert metadata["paths"] == expected_paths  # subfolders walked, hidden files and non-images left out
    assert metadata["dim"] == 16 and metadata["normalized"] is True and metadata["model"] == str(model_dir.resolve())
    capsys.readouterr()

    rows = _retrieve("search", "--index", tmp_path / "idx", "--top_k", "4", *sum([["--query", q] for q in QUERIES], []))
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == rows and len(rows) == 4 * len(QUERIES)
    assert set(rows[0]) == {"query", "rank", "path", "score"}

    scores = _brute_force(model_dir, [Path(p) for p in expected_paths], QUERIES)
    for q, query in enumerate(QUERIES):
        hits = [r for r in rows if r["query"] == query]
        order = torch.argsort(scores[q], descending=True)[:4]
        assert [h["rank"] for h in hits] == [1, 2, 3, 4]
        assert [h["path"] for h in hits] == [expected_paths[i] for i in order]
        np.testing.assert_allclose([h["score"] for h in hits], scores[q, order].numpy(), atol=1e-5)


def test_image_query_finds_itself_first(model_dir, image_dir, tmp_path):
    _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", tmp_path / "idx", "--no_progress")
    query = image_dir / "sub" / "c.png"
    rows = _retrieve("search", "--index", tmp_path / "idx", "--image", query, "--top_k", "2")
    assert rows[0]["path"] == str(query.resolve()) and rows[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert rows[1]["score"] < rows[0]["score"]


def test_incremental_add_equals_one_shot_build_and_embeds_only_new_images(model_dir, image_dir, tmp_path):
    one_shot, _ = build_index(RetrievalModel.from_pretrained(str(model_dir), "cpu"), FolderSource(image_dir),
                              tmp_path / "one_shot", batch_size=4, show_progress=False)
    live = tmp_path / "live"
    shutil.copytree(image_dir, live)
    for name in IMAGE_NAMES[1::2]:
        (live / name).unlink()
    index_dir = tmp_path / "incremental"
    first = _retrieve("index", "--model", model_dir, "--images", live, "--output", index_dir, "--no_progress")
    assert first["added"] == len(IMAGE_NAMES[::2])
    for name in IMAGE_NAMES[1::2]:  # the other files arrive
        shutil.copy2(image_dir / name, live / name)
    second = _retrieve("index", "--model", model_dir, "--images", live, "--output", index_dir, "--no_progress")
    assert (second["added"], second["already_indexed"], second["images"]) == (
        len(IMAGE_NAMES[1::2]), len(IMAGE_NAMES[::2]), len(IMAGE_NAMES))
    again = _retrieve("index", "--model", model_dir, "--images", live, "--output", index_dir, "--no_progress")
    assert (again["added"], again["updated"], again["already_indexed"]) == (0, 0, len(IMAGE_NAMES))

    incremental = RetrievalIndex.load(index_dir)
    relative = [str(Path(p).relative_to(live.resolve())) for p in incremental.paths]
    assert relative == [str(Path(p).relative_to(image_dir.resolve())) for p in one_shot.paths]
    torch.testing.assert_close(incremental.embeddings, one_shot.embeddings, atol=1e-6, rtol=0)


def test_reindexing_reembeds_changed_files_and_drops_deleted_ones(model_dir, image_dir, tmp_path):
    index_dir = tmp_path / "idx"
    _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", index_dir, "--no_progress")
    before = RetrievalIndex.load(index_dir)
    changed, deleted = image_dir / "sub" / "c.png", image_dir / "z.bmp"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(changed)
    deleted.unlink()
    summary = _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", index_dir, "--no_progress")
    assert (summary["added"], summary["updated"], summary["removed"]) == (0, 1, 1)
    after = RetrievalIndex.load(index_dir)
    assert str(deleted.resolve()) not in after.paths and len(after) == len(IMAGE_NAMES) - 1
    fresh, _ = build_index(RetrievalModel.from_pretrained(str(model_dir), "cpu"), FolderSource(image_dir),
                           show_progress=False)
    assert after.paths == fresh.paths
    torch.testing.assert_close(after.embeddings, fresh.embeddings, atol=1e-6, rtol=0)
    row = after.paths.index(str(changed.resolve()))
    assert not torch.allclose(after.embeddings[row], before.embeddings[before.paths.index(after.paths[row])])


def test_indexing_refuses_a_different_model_or_precision(model_dir, image_dir, tmp_path):
    other = _save_tiny_model(tmp_path / "other_model", seed=1)
    _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", tmp_path / "idx", "--no_progress")
    with pytest.raises(SystemExit, match="different weights"):
        _retrieve("index", "--model", other, "--images", image_dir, "--output", tmp_path / "idx", "--no_progress")
    with pytest.raises(SystemExit, match="bf16"):
        _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", tmp_path / "idx", "--bf16",
                  "--no_progress")
    with pytest.raises(SystemExit, match="different weights"):
        _retrieve("search", "--index", tmp_path / "idx", "--model", other, "--query", "red")


def test_fingerprint_changes_with_any_weight(model_dir):
    from modeling_bcls import BCLSModel

    model = BCLSModel.from_pretrained(model_dir)
    before = model_fingerprint(model)
    assert model_fingerprint(BCLSModel.from_pretrained(model_dir)) == before
    with torch.no_grad():
        model.text_projection.weight[0, 0] += 1e-3
    assert model_fingerprint(model) != before


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")
def test_faiss_and_exact_search_agree(tmp_path):
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(500, 32, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(20, 32, generator=generator), dim=1)
    paths = [f"img{i:04d}.jpg" for i in range(500)]
    faiss_index = RetrievalIndex(embeddings, paths, "m", "sha256:x", use_faiss=True)
    exact = RetrievalIndex(embeddings, paths, "m", "sha256:x", use_faiss=False)
    faiss_index.save(tmp_path / "idx")
    assert stored_file(tmp_path / "idx", "faiss").is_file()
    reloaded = RetrievalIndex.load(tmp_path / "idx")
    assert reloaded.backend == "faiss" and reloaded._faiss_index is not None  # read from index.faiss
    brute = queries @ embeddings.T
    for index in (faiss_index, exact, reloaded):
        hits = index.search(queries, top_k=10)
        for q, row in enumerate(hits):
            order = torch.argsort(brute[q], descending=True)[:10]
            assert [h.path for h in row] == [paths[i] for i in order]
            np.testing.assert_allclose([h.score for h in row], brute[q, order].numpy(), atol=1e-5)
    assert len(exact.search(queries[:1], top_k=1000)[0]) == 500  # k clipped to the index size


def test_index_without_faiss_drops_a_stale_faiss_file(tmp_path, monkeypatch):
    import trainer_bcls.retrieval.index as retrieval_index

    embeddings = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    index = RetrievalIndex(embeddings, list("abcde"), "m", "sha256:x", use_faiss=False)
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / FAISS_FILE).write_bytes(b"old")
    monkeypatch.setattr(retrieval_index, "faiss_available", lambda: False)
    index.save(tmp_path / "idx")
    assert not (tmp_path / "idx" / FAISS_FILE).exists()
    assert RetrievalIndex.load(tmp_path / "idx").backend == "exact"


def test_damaged_index_is_a_clear_error(tmp_path):
    index = RetrievalIndex(torch.nn.functional.normalize(torch.randn(5, 8), dim=1), list("abcde"), "m", "sha256:x")
    index.save(tmp_path / "idx")
    embeddings_file = stored_file(tmp_path / "idx", "embeddings")
    data = embeddings_file.read_bytes()
    embeddings_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=embeddings_file.name):
        RetrievalIndex.load(tmp_path / "idx")
    with pytest.raises(FileNotFoundError, match="not a retrieval index"):
        RetrievalIndex.load(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def test_unreadable_image_while_indexing_is_an_error_or_a_counted_skip(model_dir, image_dir, tmp_path, caplog):
    broken = image_dir / "sub" / "broken.jpg"
    data = (image_dir / "b.jpg").read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # truncated JPEG
    with pytest.raises(SystemExit, match="broken.jpg"):
        _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", tmp_path / "idx", "--no_progress")
    assert not (tmp_path / "idx" / METADATA_FILE).exists()
    summary = _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", tmp_path / "idx",
                        "--skip_invalid", "--no_progress")
    assert summary["skipped"] == 1 and summary["images"] == len(IMAGE_NAMES)
    assert str(broken) in caplog.text
    assert str(broken.resolve()) not in RetrievalIndex.load(tmp_path / "idx").paths


def test_truncated_query_image_is_a_clear_error(model_dir, image_dir, tmp_path):
    truncated = tmp_path / "query.png"
    data = (image_dir / "a.png").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _retrieve("index", "--model", model_dir, "--images", image_dir, "--output", tmp_path / "idx", "--no_progress")
    with pytest.raises(SystemExit, match="query.png"):
        _retrieve("search", "--index", tmp_path / "idx", "--image", truncated)
    with pytest.raises(SystemExit, match="query.png"):
        _retrieve("--model", model_dir, "--image", truncated, "--captions", "a red circle")


def test_one_off_form_searches_subfolders(model_dir, image_dir):
    output = _retrieve("--model", model_dir, "--images", image_dir, "--query", "a red circle", "--top_k", "100")
    paths = {Path(p).resolve() for p, _ in output["text_to_image"]["a red circle"]}
    assert paths == {(image_dir / n).resolve() for n in IMAGE_NAMES}


def test_empty_or_missing_folder_is_a_clear_error(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images found"):
        _retrieve("index", "--model", model_dir, "--images", tmp_path / "empty", "--output", tmp_path / "idx")
    with pytest.raises(SystemExit, match="image folder not found"):
        _retrieve("index", "--model", model_dir, "--images", tmp_path / "nope", "--output", tmp_path / "idx")
    with pytest.raises(SystemExit, match="not a folder, and loading it as a Hub dataset failed"):
        _retrieve("index", "--model", model_dir, "--images", "no-such-dataset-xyz", "--output", tmp_path / "idx")


# ---------------------------------------------------------------------------------------------------------------------
# datasets as the gallery


def test_saved_dataset_is_indexed_row_by_row_like_the_files(model_dir, image_dir, tmp_path):
    from datasets import Dataset, DatasetDict, Image as ImageFeature

    files = [str(image_dir / n) for n in IMAGE_NAMES]
    dataset = Dataset.from_dict({"picture": files, "caption": ["x"] * len(files)}).cast_column("picture",
                                                                                             ImageFeature())
    DatasetDict({"test": dataset, "train": dataset.select([0, 1])}).save_to_disk(tmp_path / "ds")
    summary = _retrieve("index", "--model", model_dir, "--images", tmp_path / "ds", "--split", "test",
                        "--output", tmp_path / "idx", "--no_progress")
    assert summary["images"] == len(files)
    from_dataset = RetrievalIndex.load(tmp_path / "idx")
    name = str((tmp_path / "ds").resolve())
    assert from_dataset.paths == sorted(f"{name}:test:{row}" for row in range(len(files)))

    from_files, _ = build_index(RetrievalModel.from_pretrained(str(model_dir), "cpu"), FolderSource(image_dir),
                                show_progress=False)
    by_row = {int(p.rsplit(":", 1)[1]): e for p, e in zip(from_dataset.paths, from_dataset.embeddings)}
    by_file = dict(zip(from_files.paths, from_files.embeddings))
    for row, file in enumerate(files):
        torch.testing.assert_close(by_row[row], by_file[str(Path(file).resolve())], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="available splits"):
        open_image_source(tmp_path / "ds", split="validation")
    with pytest.raises(ValueError, match="image column 'nope' not found"):
        open_image_source(tmp_path / "ds", split="test", image_column="nope")


# ---------------------------------------------------------------------------------------------------------------------
# devices and bf16


def test_default_device_and_unavailable_device():
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_bf16_index_on_cpu_is_close_to_fp32(model_dir, image_dir, tmp_path):
    common = ["--model", model_dir, "--images", image_dir, "--device", "cpu", "--no_progress"]
    _retrieve("index", *common, "--output", tmp_path / "fp32")
    _retrieve("index", *common, "--output", tmp_path / "bf16", "--bf16")
    fp32, bf16 = RetrievalIndex.load(tmp_path / "fp32"), RetrievalIndex.load(tmp_path / "bf16")
    assert bf16.bf16 and not fp32.bf16 and bf16.paths == fp32.paths
    assert bf16.embeddings.dtype == torch.float32
    difference = (bf16.embeddings - fp32.embeddings).abs().max().item()
    assert 0 < difference < 0.05  # really ran in bf16, and close
    cosine = (bf16.embeddings * fp32.embeddings).sum(dim=1)
    assert cosine.min().item() > 0.995


def test_evaluate_with_bf16_on_cpu_is_close_to_fp32(model_dir, synthetic_dir, tmp_path):
    from modeling_bcls import BCLSModel, BCLSProcessor
    from trainer_bcls import encode_split, load_pairs

    pairs = load_pairs(str(synthetic_dir), "test")
    processor = BCLSProcessor.from_pretrained(model_dir)
    encoded = {}
    for bf16 in (False, True):
        model = prepare_for_inference(BCLSModel.from_pretrained(model_dir), "cpu", bf16)
        assert model.dtype == (torch.bfloat16 if bf16 else torch.float32) and model.device.type == "cpu"
        encoded[bf16] = encode_split(model, pairs, processor, batch_size=16, show_progress=False)
    for kind in ("image_embeds", "text_embeds"):
        fp32, bf16 = getattr(encoded[False], kind), getattr(encoded[True], kind)
        assert bf16.dtype == torch.float32 and 0 < (bf16 - fp32).abs().max().item() < 0.05

    evaluate = load_example("evaluate")
    common = ["--model", str(model_dir), "--dataset", str(synthetic_dir), "--split", "test", "--device", "cpu",
              "--no_report", "--relevance", "tfidf"]
    fp32 = evaluate.main(common + ["--output_dir", str(tmp_path / "fp32")])
    bf16 = evaluate.main(common + ["--output_dir", str(tmp_path / "bf16"), "--bf16"])
    assert fp32.keys() == bf16.keys()
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert abs(fp32[key] - bf16[key]) <= 10.0, key  # recall in percent: a few near-tied ranks may swap
    assert abs(fp32["kendall_tau_b"] - bf16["kendall_tau_b"]) < 0.02


def test_benchmark_script_runs_on_a_few_images(capsys):
    path = ROOT / "benchmarks" / "bench_retrieval_index.py"
    spec = importlib.util.spec_from_file_location("bench_retrieval_index", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--num_images", "24", "--add", "4", "--num_queries", "2", "--repeats", "1",
                        "--no_memory", "--ann_rows", "3000", "--ann_dim", "32", "--ann_centres", "30",
                        "--ann_queries", "20", "--serve_requests", "5"])
    out = capsys.readouterr().out
    assert "equal to the re-embedding baseline's: True" in out and "| build index, 24 images" in out
    assert "serve: median latency" in out and "| hnsw |" in out
    ann = {row["type"]: row for row in rows if "recall" in row}
    assert ann["flat"]["recall"] == 1.0 and ann["ivf"]["recall"] > 0.8 and ann["hnsw"]["recall"] > 0.8
    assert all(row["ratio"] > 0 for row in rows if "ratio" in row)
