"""Issue 26 items 1-3: float knobs that are NaN or out of range, overrides on a saved model, resume with other
loss flags. Each case is refused at start with an error naming the flag."""

from __future__ import annotations

import json
import math

import pytest

from conftest import load_example


def _train_args(synthetic_dir, output_dir, *extra: str) -> list[str]:
    return [
        "--data", str(synthetic_dir), "--output_dir", str(output_dir), "--tiny_image_size", "32",
        "--max_train_pairs", "64", "--per_device_train_batch_size", "16", "--eval_split", "none",
        "--relevance", "tfidf", "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["margin", "kendall_weight", "kendall_label_gap", "soft_negative_temperature",
                                  "kendall_temperature", "infonce_temperature", "logit_scale"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_config_refuses_non_finite_float_knobs(name, value):
    from modeling_bcls import BCLSConfig

    with pytest.raises(Exception, match=rf"{name} must be a finite number"):
        BCLSConfig(**{name: value})


def test_overrides_set_on_a_loaded_config_are_checked_again():
    from modeling_bcls import BCLSConfig

    config = BCLSConfig()
    config.kendall_weight = -1.0  # what train.py does with --model_name_or_path: setattr skips @strict's checks
    with pytest.raises(ValueError, match="kendall_weight must be >= 0, got -1"):
        config.check_hyperparameters()


@pytest.mark.parametrize("flag, value", [("kendall_weight", "nan"), ("margin", "nan"), ("kendall_label_gap", "nan"),
                                         ("tower_learning_rate", "nan"), ("learning_rate", "inf"),
                                         ("kendall_weight", "-1"), ("false_negative_threshold", "nan"),
                                         ("false_negative_ramp", "-0.1"), ("false_negative_ramp", "inf")])
def test_train_script_refuses_bad_float_flags_before_training(synthetic_dir, tmp_path, flag, value):
    train = load_example("train")
    with pytest.raises(ValueError, match=rf"--{flag} must be"):
        train.main(_train_args(synthetic_dir, tmp_path / "run", "--max_steps", "1", f"--{flag}", value))
    assert not (tmp_path / "run" / "model.safetensors").exists()  # nothing saved


def test_train_script_refuses_false_negatives_without_relevance(synthetic_dir, tmp_path):
    train = load_example("train")
    args = _train_args(synthetic_dir, tmp_path / "run", "--max_steps", "1", "--false_negative_threshold", "0.5")
    args[args.index("tfidf")] = "none"
    with pytest.raises(ValueError, match="--false_negative_threshold .*--relevance"):
        train.main(args)


@pytest.fixture(scope="module")
def checkpointed_run(synthetic_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("flags") / "run"
    load_example("train").main(_train_args(synthetic_dir, output_dir, "--max_steps", "2", "--save_strategy", "steps",
                                           "--save_steps", "2", "--seed", "0"))
    return output_dir


def test_overrides_on_a_saved_model_are_range_checked(synthetic_dir, checkpointed_run, tmp_path):
    train = load_example("train")
    with pytest.raises(ValueError, match="--kendall_weight must be >= 0, got -1"):
        train.main(_train_args(synthetic_dir, tmp_path / "r", "--model_name_or_path", str(checkpointed_run),
                               "--max_steps", "1", "--kendall_weight", "-1"))
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").glob("checkpoint-*"))


def test_resume_with_other_loss_flags_is_refused_naming_them(synthetic_dir, checkpointed_run):
    train = load_example("train")
    args = _train_args(synthetic_dir, checkpointed_run, "--max_steps", "3", "--resume_from_checkpoint", "last")
    with pytest.raises(ValueError, match=r"binary_loss: checkpoint 'triplet_sn', now 'infonce'.*"
                                         r"kendall_weight: checkpoint 0.2, now 0.0"):
        train.main([*args, "--binary_loss", "infonce", "--kendall_weight", "0"])
    state = json.loads((checkpointed_run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    metrics = train.main(args)  # the same loss flags resume
    assert json.loads((checkpointed_run / "trainer_state.json").read_text())["global_step"] == 3
    assert metrics["train_loss"] == metrics["train_loss"]  # finite, not NaN
