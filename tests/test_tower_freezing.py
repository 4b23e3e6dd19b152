"""Locked and partially frozen towers (issue 11, section 3): layer groups of every tower family, frozen parts that
stay in eval mode through `train()`, and frozen weights and buffers that do not move in real Trainer steps."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    EfficientNetConfig,
    EfficientNetModel,
    ResNetModel,
    ViTModel,
)

from trainer_bcls import (
    BCLSDataCollator,
    BCLSTrainer,
    BCLSTrainingArguments,
    RelevanceLabels,
    TfidfRelevance,
    build_tiny_model_and_processor,
    load_pairs,
)
from trainer_bcls.towers.tiny_towers import tiny_bert_config, tiny_resnet_config, tiny_vit_config
from trainer_bcls.training.tower_freezing import (
    freeze_tower,
    freeze_towers,
    is_kept_in_eval,
    is_tower_locked,
    layer_groups,
    unfreeze_tower,
)

CLIP_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


TOWERS = {
    "vit": lambda: ViTModel(tiny_vit_config()),
    "bert": lambda: BertModel(tiny_bert_config(100)),
    "bert_no_pooler": lambda: BertModel(tiny_bert_config(100), add_pooling_layer=False),
    "clip_vision": lambda: CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **CLIP_SIZES)),
    "clip_text": lambda: CLIPTextModel(CLIPTextConfig(vocab_size=99, bos_token_id=0, eos_token_id=2, **CLIP_SIZES)),
    "resnet": lambda: ResNetModel(tiny_resnet_config()),
    # transformers' EfficientNet with a small width/depth: blocks in encoder.blocks, then top_conv/top_bn
    "efficientnet": lambda: EfficientNetModel(
        EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.5, hidden_dim=64)
    ),
}


def build_tower(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return TOWERS[kind]()


EXPECTED_GROUPS = {
    "vit": (["embeddings", "layers.0", "layers.1", "final"], {"final": ("layernorm", "pooler")}),
    "bert": (["embeddings", "encoder.layer.0", "encoder.layer.1", "final"], {"final": ("pooler",)}),
    "bert_no_pooler": (["embeddings", "encoder.layer.0", "encoder.layer.1"], {}),
    "clip_vision": (
        ["embeddings", "encoder.layers.0", "encoder.layers.1", "final"],
        {"embeddings": ("embeddings", "pre_layrnorm"), "final": ("post_layernorm",)},
    ),
    "clip_text": (
        ["embeddings", "encoder.layers.0", "encoder.layers.1", "final"], {"final": ("final_layer_norm",)}
    ),
    # the parameterless average-pool pooler joins the last stage
    "resnet": (
        ["embeddings", "encoder.stages.0", "encoder.stages.1", "encoder.stages.2"],
        {"embeddings": ("embedder",), "encoder.stages.2": ("encoder.stages.2", "pooler")},
    ),
    "efficientnet": (
        ["embeddings"] + [f"encoder.blocks.{i}" for i in range(10)] + ["final"],
        {"final": ("encoder.top_conv", "encoder.top_bn", "encoder.top_activation", "pooler")},
    ),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_GROUPS))
def test_layer_groups_follow_the_documented_rule_and_partition_the_parameters(kind):
    tower = build_tower(kind)
    groups = layer_groups(tower)
    names, modules = EXPECTED_GROUPS[kind]
    assert [group.name for group in groups] == names
    for group in groups:
        if group.name in modules:
            assert group.modules == modules[group.name]
    grouped = [name for group in groups for name in group.parameters]
    assert sorted(grouped) == sorted(name for name, _ in tower.named_parameters())  # each parameter exactly once
    assert all(group.parameters for group in groups)


@pytest.mark.parametrize("kind", ["vit", "resnet", "efficientnet", "clip_text"])
@pytest.mark.parametrize("unlocked", [0, 1, 2])
def test_unlocked_layers_leave_exactly_the_last_groups_trainable(kind, unlocked):
    tower = build_tower(kind)
    groups = layer_groups(tower)
    frozen = freeze_tower(tower, unlocked_layers=unlocked)
    trainable = {name for name, p in tower.named_parameters() if p.requires_grad}
    expected = {name for group in groups[len(groups) - unlocked :] for name in group.parameters} if unlocked else set()
    assert trainable == expected
    assert len(frozen) == (1 if unlocked == 0 else len(groups) - unlocked)
    assert is_tower_locked(tower) == (unlocked == 0)
    # frozen subtrees are kept in eval mode, unlocked ones follow train()
    tower.train()
    modules = dict(tower.named_modules())
    for group in groups:
        is_frozen = unlocked == 0 or group in groups[: len(groups) - unlocked]
        for root in group.modules:
            assert all(not m.training for m in modules[root].modules()) == is_frozen, (group.name, root)


def test_unlocked_layers_out_of_range_and_without_freeze_are_errors():
    tower = build_tower("bert")
    with pytest.raises(ValueError, match=r"4 layer groups: \['embeddings', 'encoder.layer.0'"):
        freeze_tower(tower, unlocked_layers=5)
    with pytest.raises(ValueError, match=">= 0"):
        freeze_tower(tower, unlocked_layers=-1)
    model, _ = build_tiny_model_and_processor(["a red circle"], image_size=32)
    with pytest.raises(ValueError, match="text_unlocked_layers=1 needs freeze_text_model"):
        freeze_towers(model, text_unlocked_layers=1)


def test_frozen_dropout_and_batchnorm_stay_off_through_train_and_copies():
    torch.manual_seed(0)
    config = tiny_bert_config(100)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.5
    tower = BertModel(config)
    ids = torch.randint(5, 100, (3, 7))
    reference = tower.eval()(input_ids=ids).last_hidden_state
    freeze_tower(tower)
    tower.train()
    assert not any(m.training for m in tower.modules())
    torch.testing.assert_close(tower(input_ids=ids).last_hidden_state, reference, rtol=0, atol=0)
    twin = copy.deepcopy(tower)  # the kept-in-eval train() follows the copy, not the original
    assert is_kept_in_eval(twin) and twin.train.args[0] is twin
    twin.train()
    assert not twin.training
    unfreeze_tower(tower)
    tower.train()
    assert tower.training and all(p.requires_grad for p in tower.parameters())
    assert not torch.equal(tower(input_ids=ids).last_hidden_state, reference)  # dropout is back


@pytest.fixture(scope="module")
def splits(synthetic_dir):
    return load_pairs(str(synthetic_dir), "train"), load_pairs(str(synthetic_dir), "val")


def train_steps(splits, tmp_path, model, processor, steps=6, **overrides):
    train, _ = splits
    relevance = RelevanceLabels.build(train, TfidfRelevance())
    args = BCLSTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, learning_rate=1e-2, max_steps=steps,
        eval_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, seed=0, **overrides,
    )
    trainer = BCLSTrainer(
        model=model, args=args, train_dataset=train,
        data_collator=BCLSDataCollator(processor, relevance=relevance, max_length=32), processing_class=processor,
    )
    trainer.train()
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def test_locked_resnet_tower_weights_and_buffers_are_bit_identical_after_training(splits, tmp_path):
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(splits[0]["caption"], image_size=32, projection_dim=32)
    freeze_towers(model, freeze_vision_model=True)
    vision, text = snapshot(model.vision_model), snapshot(model.text_model)
    projection = snapshot(model.visual_projection)
    assert any(name.endswith("running_mean") for name in vision)  # the tower has BatchNorm statistics
    train_steps(splits, tmp_path, model, processor)
    after = snapshot(model.vision_model)
    assert after.keys() == vision.keys()
    for name, value in vision.items():
        assert torch.equal(after[name], value), name
    assert not model.vision_model.training  # the Trainer called model.train()
    assert any(not torch.equal(v, text[k]) for k, v in snapshot(model.text_model).items())
    assert not torch.equal(snapshot(model.visual_projection)["weight"], projection["weight"])


def test_partially_unlocked_resnet_trains_only_its_last_stage(splits, tmp_path):
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(splits[0]["caption"], image_size=32, projection_dim=32)
    freeze_towers(model, freeze_vision_model=True, vision_unlocked_layers=1)
    before = snapshot(model.vision_model)
    train_steps(splits, tmp_path, model, processor)
    after = snapshot(model.vision_model)
    unlocked = "encoder.stages.2."
    for name, value in before.items():
        changed = not torch.equal(after[name], value)
        if name.startswith(unlocked):
            # the unlocked stage trains, in train mode: its weights and BatchNorm statistics move
            if name.endswith(("weight", "running_mean", "running_var", "num_batches_tracked")):
                assert changed, name
        else:
            assert not changed, name


def test_train_script_freeze_flags(synthetic_dir, tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    from transformers import set_seed

    from modeling_bcls import BCLSModel

    path = Path(__file__).resolve().parents[1] / "examples" / "train.py"
    spec = importlib.util.spec_from_file_location("bcls_example_train_freeze", path)
    train = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train
    spec.loader.exec_module(train)
    train.main([
        "--data", str(synthetic_dir), "--output_dir", str(tmp_path / "run"), "--tiny_image_size", "32",
        "--max_steps", "3", "--per_device_train_batch_size", "16", "--eval_split", "", "--use_cpu", "true",
        "--disable_tqdm", "true", "--seed", "0", "--learning_rate", "1e-2",
        "--freeze_vision_model", "--vision_unlocked_layers", "1", "--freeze_text_model",
    ])
    set_seed(0)  # the script's initial model
    initial, _ = build_tiny_model_and_processor(
        load_pairs(str(synthetic_dir), "train")["caption"], image_size=32, projection_dim=128, max_length=64
    )
    trained = BCLSModel.from_pretrained(tmp_path / "run")
    before, after = initial.state_dict(), trained.state_dict()
    for name, value in before.items():
        moved = not torch.equal(after[name], value)
        if name.startswith(("vision_model.encoder.stages.2.", "visual_projection.", "text_projection.")):
            if name.endswith("weight"):
                assert moved, name
        else:
            assert not moved, name  # the text tower and the vision tower's first groups, buffers included
    with pytest.raises(ValueError, match="vision_unlocked_layers=1 needs freeze_vision_model"):
        train.main(["--data", str(synthetic_dir), "--output_dir", str(tmp_path / "x"), "--vision_unlocked_layers", "1",
                    "--max_steps", "1", "--eval_split", "", "--use_cpu", "true"])


def test_tower_learning_rate_groups_and_a_zero_tower_rate_leaves_unlocked_layers_unchanged(splits, tmp_path):
    from trainer_bcls.training.tower_learning_rate import is_tower_parameter

    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(splits[0]["caption"], image_size=32, projection_dim=32)
    freeze_towers(model, freeze_vision_model=True, vision_unlocked_layers=1)
    before = snapshot(model)
    trainer = train_steps(splits, tmp_path, model, processor, steps=3, tower_learning_rate=0.0, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = set(trainer.get_decay_parameter_names(model))
    grouped = [(names[id(p)], g["initial_lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups
               for p in g["params"]]
    # every trainable parameter exactly once; towers at the tower rate, the rest at learning_rate; HF's decay split
    assert sorted(n for n, _, _ in grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for name, lr, weight_decay in grouped:
        assert lr == (0.0 if is_tower_parameter(name) else 1e-2), name
        assert weight_decay == (0.1 if name in decay else 0.0), name
    assert any(is_tower_parameter(n) for n, _, _ in grouped) and any(not is_tower_parameter(n) for n, _, _ in grouped)
    after = snapshot(model)
    unlocked = [n for n in before if n.startswith("vision_model.encoder.stages.2.") and n.endswith("weight")]
    assert unlocked
    for name in unlocked:  # trainable, in train mode, but a rate of 0 (AdamW's decay is scaled by the rate too)
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["visual_projection.weight"], before["visual_projection.weight"])


def test_tower_learning_rate_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="tower_learning_rate"):
        BCLSTrainingArguments(output_dir=str(tmp_path), tower_learning_rate=-1.0, report_to=[])


def test_logs_show_the_heads_rate_as_learning_rate_and_the_towers_rate_beside_it(splits, tmp_path):
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(splits[0]["caption"], image_size=32, projection_dim=32)
    freeze_towers(model, freeze_vision_model=True, vision_unlocked_layers=1)
    trainer = train_steps(splits, tmp_path, model, processor, steps=4, tower_learning_rate=1e-4, logging_steps=1,
                          lr_scheduler_type="constant")
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4
    for entry in logged:  # --learning_rate 1e-2 for the projections, --tower_learning_rate 1e-4 for the towers
        assert entry["learning_rate"] == pytest.approx(1e-2) and entry["tower_learning_rate"] == pytest.approx(1e-4)
    plain = train_steps(splits, tmp_path / "plain", model, processor, steps=2, logging_steps=1)
    assert all("tower_learning_rate" not in e for e in plain.state.log_history)
