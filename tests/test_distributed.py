"""Two real processes (gloo on CPU) through `accelerate launch`: the global-batch loss is exact (issue 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
]

pytestmark = pytest.mark.multiprocess


def launch(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    # ACCELERATE_USE_CPU: on a machine without GPUs, `--multi_gpu` then runs MULTI_CPU (gloo) processes.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "ACCELERATE_USE_CPU": "true", "ACCELERATE_CONFIG_FILE": str(tmp_path / "no-accelerate-config.yaml")}
    proc = subprocess.run(ACCELERATE + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_two_process_loss_and_gradients_equal_single_process(tmp_path, synthetic_dir):
    launch([str(ROOT / "tests/distributed/check_global_batch.py"), str(tmp_path), str(synthetic_dir)], tmp_path)
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["world"] == 2
        local_only = result["local_only"]
        assert local_only["loss"] == pytest.approx(local_only["reference"], abs=1e-6)
        assert local_only["loss"] != pytest.approx(local_only["global"], abs=1e-4)
        relevance = result["relevance_of_negatives"]
        # relevance-aware negatives: the thresholds leave some negatives out / down-weight some, not all
        assert any(r > 0.1 for r in relevance) and any(0.06 < r < 0.1 for r in relevance)
        assert any(0.04 < r <= 0.06 for r in relevance) and any(r <= 0.04 for r in relevance)
        assert result["triplet_sn_soft_false_negatives"]["reference_loss"] != result["triplet_sn"]["reference_loss"]
        assert result["vse_hard_false_negatives"]["reference_loss"] != result["vse"]["reference_loss"]
        # each binary term + Kendall, and relevance-aware negatives (soft and hard)
        # 12 mined, one of them a caption paired in the batch (dropped); one a positive of the last image's rows
        assert result["mined"]["extra_candidates"] == 11
        assert result["mined"]["extra_positives"] == result["mined"]["processes_hold_last_image"] >= 1
        for binary_loss in ("triplet_sn", "vse", "infonce", "triplet_sn_soft_false_negatives",
                            "vse_hard_false_negatives", "mined"):
            check = result[binary_loss]
            assert check["reference_kendall"] > 0  # the Kendall term is active in this batch
            assert check["global_loss_mean"] == pytest.approx(check["reference_loss"], abs=1e-6)
            assert check["cached_loss_mean"] == pytest.approx(check["reference_loss"], abs=1e-6)
            assert check["max_grad_diff"] <= 1e-5
            assert check["max_cached_grad_diff"] <= 1e-5


def test_train_script_runs_with_two_processes(tmp_path, synthetic_dir):
    output_dir = tmp_path / "run"
    proc = launch(
        [str(ROOT / "examples/train.py"), "--data", str(synthetic_dir), "--output_dir", str(output_dir),
         "--max_steps", "3", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
         "--tiny_image_size", "32", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
        ],
        tmp_path,
    )
    metrics = json.loads((output_dir / "all_results.json").read_text())
    assert metrics["eval_rsum"] > 0
    state = json.loads((output_dir / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logged) == 3 and all("loss_kendall" in entry for entry in logged), proc.stdout[-2000:]
    assert (output_dir / "model.safetensors").is_file()


def test_lock_boundary_caches_with_two_processes(tmp_path, synthetic_dir):
    launch([str(ROOT / "tests/distributed/check_locked_cache.py"), str(tmp_path), str(synthetic_dir)], tmp_path)
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["world"] == 2
        for name in ("locked", "lit"):
            run = result[name]
            # uncached, locked with GradCache: 6 steps x 2 chunks of 4 rows x 2 passes (embed, then replay)
            assert run["plain_calls_per_epoch"] == ([24, 24] if name == "locked" else [6, 6]), run
            # cached: each process embeds its 10 of the 20 images in one batch before training, then none
            assert run["cached_calls_per_epoch"] == [0, 0] and run["cached_calls_before_training"] == 1, run
            assert run["cache_entries"] == result["distinct_images"]  # both halves on every process
            assert run["text_cache"] == (None if name == "locked" else "boundary")
            assert run["num_losses"] == [12, 12] and run["max_loss_diff"] <= 1e-5, run
            assert run["weights_moved"] > 1e-3 and run["max_weight_diff"] <= 1e-5, run


def test_stream_split_and_streamed_labels_with_two_processes(tmp_path, synthetic_dir):
    """2 processes x 2 DataLoader workers read every sample of an epoch exactly once; the global-batch loss with
    streamed labels equals the single-process loss on the concatenated batch (issue 22)."""
    from trainer_bcls.data.shard_writer import karpathy_shard_samples, write_shards

    shard_dir = tmp_path / "shards"
    samples = karpathy_shard_samples(synthetic_dir / "dataset_synthetic.json", synthetic_dir / "images", "train")
    write_shards(samples, shard_dir, samples_per_shard=6)  # 64 samples: 11 shards, not divisible by 2 processes
    launch([str(ROOT / "tests/distributed/check_stream.py"), str(tmp_path), str(shard_dir)], tmp_path)
    results = [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in range(2)]
    keys = [key for result in results for key in result["keys"]]
    assert len(keys) == 64 and len(set(keys)) == 64  # none twice, none lost
    assert all(result["keys"] for result in results)  # both processes read
    for result in results:
        assert result["world"] == 2 and result["relevance_off_diagonal_positive"] == 1.0
        assert result["reference_kendall"] > 0
        assert result["global_loss_mean"] == pytest.approx(result["reference_loss"], abs=1e-6)
        assert result["max_grad_diff"] <= 1e-5
