"""Streamed training: shards and parquet streams → pair rows (split by worker, epochs, caption choice), train.py end
to end from shards with --max_steps, resume at the stream position, and the streamed-data errors."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from conftest import load_example, minilm_path
from trainer_bcls.data.errors import InvalidDataError
from trainer_bcls.data.shard_writer import karpathy_shard_samples, write_shards
from trainer_bcls.data.streaming import StreamingPairs, hf_stream_samples, is_shard_pattern, shard_samples


def synthetic_shards(synthetic_dir: Path, folder: Path, per_shard: int = 10, caption_format: str = "json") -> list[str]:
    samples = karpathy_shard_samples(synthetic_dir / "dataset_synthetic.json", synthetic_dir / "images", "train")
    return write_shards(samples, folder, samples_per_shard=per_shard, caption_format=caption_format)


@pytest.fixture(scope="module")
def shards(synthetic_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return folder, synthetic_shards(synthetic_dir, folder)  # 64 train images: 7 shards (6 x 10 + 4)


def keys_of(pairs: StreamingPairs, num_workers: int) -> list[str]:
    loader = torch.utils.data.DataLoader(pairs, batch_size=4, num_workers=num_workers,
                                         collate_fn=lambda rows: [r["key"] for r in rows])
    return [key for batch in loader for key in batch]


def test_shard_pattern_detection():
    assert is_shard_pattern("data/shard-{000000..000099}.tar") and is_shard_pattern("s3://b/x-{0..3}.tar::y.tar")
    assert not is_shard_pattern("data/flickr8k") and not is_shard_pattern("dataset_flickr8k.json")


@pytest.mark.parametrize("per_shard, world_size", [(10, 1), (10, 2), (10, 3), (8, 2), (8, 4)])
def test_each_sample_once_per_epoch_across_processes_and_workers(synthetic_dir, tmp_path, per_shard, world_size):
    """7 shards (10 per shard) do not divide by 2 or 3 processes (datasets then splits by sample); 8 shards divide
    by 2 and 4 (whole shards per process); inside a process, 2 DataLoader workers split the shards."""
    synthetic_shards(synthetic_dir, tmp_path, per_shard=per_shard)
    counts = collections.Counter()
    for rank in range(world_size):
        pairs = StreamingPairs(shard_samples(str(tmp_path / "shard-*.tar")), epochs=1, rank=rank,
                               world_size=world_size, shuffle_buffer=16)
        keys = keys_of(pairs, num_workers=2)
        assert keys  # every process reads
        counts.update(keys)
    assert len(counts) == 64 and set(counts.values()) == {1}


def test_epochs_reshuffle_and_caption_choice(shards):
    folder, _ = shards
    pairs = StreamingPairs(shard_samples(str(folder)), epochs=2, shuffle_buffer=16, seed=3)
    rows = list(pairs)
    first, second = rows[:64], rows[64:]
    assert sorted(r["key"] for r in first) == sorted(r["key"] for r in second)  # each epoch: every sample once
    assert [r["key"] for r in first] != [r["key"] for r in second]  # reshuffled
    assert any(a["caption"] != b["caption"] for a, b in zip(sorted(first, key=lambda r: r["key"]),
                                                            sorted(second, key=lambda r: r["key"])))
    for row in rows:
        assert row["caption"] in row["captions"] and len(row["captions"]) == 5
    again = list(StreamingPairs(shard_samples(str(folder)), epochs=2, shuffle_buffer=16, seed=3))
    assert [(r["key"], r["caption"], r["image_id"]) for r in again] == [(r["key"], r["caption"], r["image_id"])
                                                                         for r in rows]  # reproducible
    ids = {r["key"]: r["image_id"] for r in rows}
    assert len(set(ids.values())) == 64  # one stable id per sample


def test_all_captions_mode(shards):
    folder, _ = shards
    rows = list(StreamingPairs(shard_samples(str(folder)), captions="all", epochs=1, shuffle_buffer=32))
    assert len(rows) == 64 * 5 and len({(r["key"], r["caption_id"]) for r in rows}) == 320
    by_key = collections.defaultdict(set)
    for r in rows:
        by_key[r["key"]].add(r["caption"])
    assert all(len(c) == 5 for c in by_key.values())


def test_parquet_stream(synthetic_dir, tmp_path):
    samples = list(karpathy_shard_samples(synthetic_dir / "dataset_synthetic.json", synthetic_dir / "images", "val"))
    table = Dataset.from_dict({"jpg": [Path(s["image"]).read_bytes() for s in samples],
                               "sentences": [s["captions"] for s in samples]})
    for part in range(2):
        table.shard(2, part).to_parquet(str(tmp_path / f"part-{part}.parquet"))
    stream = hf_stream_samples(str(tmp_path))
    got = list(StreamingPairs(stream, epochs=1, shuffle_buffer=0))
    assert len(got) == len(samples) and {len(r["captions"]) for r in got} == {5}
    assert sorted(r["image"] for r in got) == sorted(Path(s["image"]).read_bytes() for s in samples)


def test_empty_stream_is_an_error(tmp_path):
    import tarfile

    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(InvalidDataError, match="epoch 0 of the stream yielded no sample"):
        list(StreamingPairs(shard_samples(str(tmp_path / "empty.tar")), epochs=1))


TRAIN_FLAGS = ["--tiny_image_size", "32", "--per_device_train_batch_size", "8", "--logging_steps", "1",
               "--eval_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0",
               "--dataloader_num_workers", "0", "--learning_rate", "1e-3", "--warmup_steps", "0"]


def test_train_script_from_shards(shards, synthetic_dir, tmp_path):
    folder, paths = shards
    metrics = load_example("train").main([
        "--data", str(folder / "shard-{000000..000006}.tar"), "--eval_data", str(synthetic_dir),
        "--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--save_strategy", "no",
        "--relevance_model", minilm_path(), "--relevance_cache_dir", str(tmp_path / "captions"), *TRAIN_FLAGS,
    ])
    assert metrics["eval_rsum"] > 0 and "eval_kendall_tau_b" in metrics
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert len(logged) == 3 and all(e["loss_kendall"] > 0 for e in logged)  # streamed labels reach the loss
    assert list((tmp_path / "captions").glob("*/part-*.safetensors"))  # caption embeddings cached by text


def test_train_script_stream_errors(shards, tmp_path):
    folder, _ = shards
    train = load_example("train")
    with pytest.raises(ValueError, match="--relevance tfidf cannot label a stream"):
        train.main(["--data", str(folder / "shard-{000000..000006}.tar"), "--output_dir", str(tmp_path / "a"),
                    "--max_steps", "2", "--relevance", "tfidf", *TRAIN_FLAGS])
    with pytest.raises(ValueError, match="needs --max_steps"):
        train.main(["--data", str(folder / "shard-{000000..000006}.tar"), "--output_dir", str(tmp_path / "b"),
                    "--relevance", "none", *TRAIN_FLAGS])
    with pytest.raises(InvalidDataError, match="matches no local file"):
        train.main(["--data", str(folder / "other-{0..3}.tar"), "--output_dir", str(tmp_path / "c"),
                    "--max_steps", "2", *TRAIN_FLAGS])


def test_resume_restores_the_stream_position(shards, tmp_path):
    """10 steps straight (64 samples at batch 8: the run crosses into the stream's second epoch), or the same run
    resumed from its checkpoint-5: the resumed steps see the same batches, so the final weights are the same.
    (A resume that restarted the stream would train steps 6-10 on the first batches again.)"""
    import shutil

    folder, _ = shards
    train = load_example("train")
    common = ["--data", str(folder / "shard-{000000..000006}.tar"), "--max_steps", "10", "--relevance", "none",
              "--save_strategy", "steps", "--save_steps", "5", "--shuffle_buffer", "16", *TRAIN_FLAGS]
    straight = tmp_path / "straight"
    train.main([*common, "--output_dir", str(straight)])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-5", resumed / "checkpoint-5")
    train.main([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", str(resumed / "checkpoint-5")])
    weights = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert weights[0].keys() == weights[1].keys()
    diff = max((weights[0][k].float() - weights[1][k].float()).abs().max().item() for k in weights[0])
    assert diff <= 1e-6, diff

    def losses(run: Path) -> list[float]:
        history = json.loads((run / "trainer_state.json").read_text())["log_history"]
        return [e["loss"] for e in history if "loss" in e]

    assert losses(resumed)[-5:] == pytest.approx(losses(straight)[-5:], abs=1e-6)
    restarted = tmp_path / "restarted"  # --ignore_data_skip: the stream starts again at its first batch
    restarted.mkdir()
    shutil.copytree(straight / "checkpoint-5", restarted / "checkpoint-5")
    train.main([*common, "--output_dir", str(restarted), "--ignore_data_skip", "true",
                "--resume_from_checkpoint", str(restarted / "checkpoint-5")])
    assert losses(restarted)[-5:] != pytest.approx(losses(straight)[-5:], abs=1e-6)
