"""Smoke tests of the training benchmarks (`benchmarks/studies/flickr8k.py`, `benchmarks/bench_train.py`) on tiny synthetic
data: each script runs end to end with a minuscule budget and writes what it promises."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    folder = ROOT / "benchmarks" if name.startswith("bench_") else ROOT / "benchmarks" / "studies"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def flickr8k():
    return _load("flickr8k")


@pytest.fixture
def one_thread():
    """One torch / BLAS thread while the test runs (as the scripts' default `--threads 1`), restored afterwards:
    on a busy shared machine two threads make these tiny steps many times slower."""
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_text_tower(tmp_path_factory):
    """A 1-layer BERT with the MiniLM tokenizer, saved to a folder: the scripts' `--text_model`, fast to load."""
    from conftest import minilm_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_text")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_lr_factor_and_sweep_settings(flickr8k):
    factors = [flickr8k.lr_factor(t / 20, "cosine", 0.1) for t in range(21)]
    assert factors[2] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b + 1e-12 for a, b in zip(factors[:3], factors[1:3]))  # warmup rises
    assert all(a >= b - 1e-12 for a, b in zip(factors[2:], factors[3:]))  # then decays
    assert flickr8k.lr_factor(0.5, "linear", 0.0) == pytest.approx(0.5)
    assert flickr8k.lr_factor(0.9, "constant", 0.1) == 1.0
    assert flickr8k.parse_setting("kendall_weight=0.5, kendall_window_size=none,kendall_surrogate=logistic") == {
        "kendall_weight": 0.5,
        "kendall_window_size": None,
        "kendall_surrogate": "logistic",
    }
    with pytest.raises(ValueError, match="unknown knob 'kendal_weight'"):
        flickr8k.parse_setting("kendal_weight=1")
    assert flickr8k.spread([1.0, 3.0], "halfrange") == 1.0
    assert "2.00 ± 1.00" in flickr8k.fmt([1.0, 3.0], "halfrange", 2)


def test_flickr8k_script_on_synthetic_data(flickr8k, tiny_text_tower, one_thread, tmp_path):
    from trainer_bcls import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_train_images=12, num_val_images=6, num_test_images=1)
    results = tmp_path / "RESULTS.md"
    common = [
        "--data", str(data), "--batch_size", "8",
        "--eval_batch_size", "16", "--image_size", "32", "--seeds", "0", "--threads", "0",
        "--max_train_images", "10", "--max_val_images", "5", "--relevance", "tfidf", "--text_model", tiny_text_tower,
        "--relevance_model", tiny_text_tower, "--freeze_text_layers", "1",
        "--results", str(results), "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    records = flickr8k.main([*common, "--max_steps", "2", "--budget_minutes", "5", "--methods", "bcls", "vse"])
    assert [r["method"] for r in records] == ["bcls", "vse"]
    for record in records:
        assert record["steps"] == 2
        assert 0 <= record["metrics"]["rsum"] <= 600
        assert math.isfinite(record["metrics"]["kendall_tau_b"])  # val relevance for every method
        assert record["trainable_text_parameters"] == 32 * 32 + 32  # only the pooler: --freeze_text_layers 1 froze
        # the embeddings and the one layer (all-MiniLM-L6-v2 has mean pooling and no pooler)
    saved = json.loads((tmp_path / "out" / flickr8k.slug(records[0]["label"]) / "seed0.json").read_text())
    assert saved["loss_config"]["binary_loss"] == "triplet_sn" and saved["loss_config"]["kendall_weight"] > 0 and saved["relevance"] == "tfidf"

    # a budget of ~6 ms stops training at the first step end (the wall-clock path, no --max_steps)
    setting = "kendall_weight=0.5,kendall_window_size=4"
    sweep = flickr8k.main([*common, "--budget_minutes", "0.0001", "--sweep", setting])
    assert len(sweep) == 1 and sweep[0]["steps"] == 1 and sweep[0]["loss_config"]["kendall_weight"] == 0.5
    assert sweep[0]["loss_config"]["kendall_window_size"] == 4
    text = results.read_text()
    assert text.count("## Flickr8k val") == 2 and "| BCLS (Triplet-SN + Kendall) | 1 | 2 |" in text
    assert "kendall_weight=0.5,kendall_window_size=4" in text and "- machine:" in text


def test_bench_train_script_runs(one_thread):
    rows = _load("bench_train").main(
        ["--steps", "2", "--warmup_steps", "1", "--rounds", "1", "--synthetic_images", "40", "--batch_size", "16",
         "--threads", "0"]
    )  # fmt: skip
    assert len(rows) == 3 and rows[0]["ratio"] == 1.0
    assert all(row["steps"] == 2 and row["s_per_step"] > 0 for row in rows)


def test_bench_locked_cache_script_runs(one_thread):
    result = _load("bench_locked_cache").main(
        ["--vision", "tiny", "--images", "8", "--batch_size", "10", "--epochs", "2", "--threads", "0"]
    )  # fmt: skip
    assert [row[0] for row in result["rows"]] == [1, 2] and all(row[1] > 0 and row[2] > 0 for row in result["rows"])
    assert result["entries"] == 8 and result["weight_diff"] <= 1e-5


def test_bench_stream_smoke(synthetic_dir, tmp_path, one_thread):
    """Shards vs the map-style pair view of the same images: the table's rows, with positive rates."""
    out = tmp_path / "stream.json"
    _load("bench_stream").main([
        "--data", str(synthetic_dir), "--images", "24", "--steps", "2", "--warmup", "2", "--rounds", "1",
        "--batch_size", "8", "--workers", "0", "--work_dir", str(tmp_path / "work"), "--json", str(out),
    ])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["labels"], r["workers"]) for r in rows] == [("none", 0), ("sentence (warm cache)", 0)]
    assert all(r["map"] > 0 and r["stream"] > 0 and r["ratio"] == pytest.approx(r["stream"] / r["map"]) for r in rows)
