"""Locked and partially frozen towers (LiT; open_clip `--lock-image` / `--lock-image-unlocked-groups`; transformers
run_clip `--freeze_vision_model`).

**Layer groups.** A tower is cut into an ordered list of layer groups, from input to output:

    [embeddings] + [one group per element of the block list] + [final]

- the *block list* is the tower's `nn.ModuleList` (or, without one, `nn.Sequential`) holding the most parameters
  (ties: the one with more elements, then the shallower one): `layers` of ViT, `encoder.layer` of BERT,
  `encoder.layers` of CLIP's towers, `encoder.stages` of ResNet, `encoder.blocks` of EfficientNet;
- `embeddings` is every module registered before the block list (ViT/BERT/CLIP `embeddings`, CLIP vision's
  `pre_layrnorm`, ResNet's `embedder`, EfficientNet's `embeddings`), plus parameters held directly by the tower or
  by the containers on the path to the block list;
- `final` is every module registered after it (ViT `layernorm` + `pooler`, BERT `pooler`, CLIP `post_layernorm` /
  `final_layer_norm`, EfficientNet `encoder.top_conv` + `encoder.top_bn` + `pooler`).

A group without parameters (ResNet's average-pool `pooler`) is merged into the group before it. Registration
order is forward order in every transformers tower checked (ViT, BERT, CLIP, ResNet, EfficientNet);
`layer_groups(tower, blocks="...")` names the block list explicitly for a tower where the rule picks the wrong one.

**Freezing.** `freeze_tower(tower, unlocked_layers=N)` freezes every group but the last N (N = 0: the whole tower,
"locked"): their parameters get `requires_grad=False` and their modules are put in eval mode *and kept there* —
their `train()` is replaced by one that stays in eval — so that a Trainer's `model.train()` changes neither
BatchNorm running statistics nor dropout in frozen parts. The BCLS projections are outside the towers and always
train. `unfreeze_tower` undoes it. Frozen state is a training choice: it is not saved with the model.

With gradient checkpointing, freeze with the non-reentrant variant (`gradient_checkpointing_kwargs=
{"use_reentrant": False}`): reentrant checkpoints give no gradient to unlocked layers after a frozen embedding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerGroup:
    """One layer group of a tower: its name, the roots of its module subtrees and its parameter names."""

    name: str
    modules: tuple[str, ...]
    parameters: tuple[str, ...]


def find_block_list(tower: nn.Module) -> str:
    """Dotted name of the tower's block list (see the module docstring for the rule)."""
    candidates = []
    for name, module in tower.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
            num_parameters = sum(p.numel() for p in module.parameters())
            is_list = isinstance(module, nn.ModuleList)
            candidates.append((is_list, num_parameters, len(module), -name.count("."), name))
    if not candidates:
        raise ValueError(
            f"{type(tower).__name__} has no nn.ModuleList / nn.Sequential of layers to cut into layer groups; "
            "freeze it whole (unlocked_layers=0) or pass blocks='<dotted name of its layer list>'."
        )
    if any(c[0] for c in candidates):
        candidates = [c for c in candidates if c[0]]
    return max(candidates)[-1]


def _is_ancestor(name: str, of: str) -> bool:
    return name == "" or of.startswith(name + ".")


def layer_groups(tower: nn.Module, blocks: str | None = None) -> list[LayerGroup]:
    """The tower's layer groups, input to output: `embeddings`, `<blocks>.0`, `<blocks>.1`, ..., `final`.

    Args:
        tower: a vision or text tower (`PreTrainedModel` or any `nn.Module`).
        blocks: dotted name of the block list; default: `find_block_list(tower)`.
    """
    blocks = blocks if blocks is not None else find_block_list(tower)
    modules = dict(tower.named_modules())
    if not isinstance(modules.get(blocks), (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"{type(tower).__name__} has no nn.ModuleList / nn.Sequential named {blocks!r}.")
    order = {name: index for index, name in enumerate(modules)}
    block_names = [f"{blocks}.{child}" for child, _ in modules[blocks].named_children()]
    roots: dict[str, list[str]] = {"embeddings": [], **{name: [] for name in block_names}, "final": []}
    for name in modules:
        if _is_ancestor(name, blocks) or name == blocks or name.startswith(blocks + "."):
            continue
        parent = name.rpartition(".")[0]
        if not _is_ancestor(parent, blocks):  # inside a subtree that is already a root
            continue
        roots["embeddings" if order[name] < order[blocks] else "final"].append(name)
    for name in block_names:
        roots[name].append(name)

    def owner(parameter: str) -> str:
        if parameter.startswith(blocks + "."):
            return ".".join(parameter.split(".")[: blocks.count(".") + 2])
        for group, group_roots in roots.items():
            if any(parameter.startswith(root + ".") for root in group_roots):
                return group
        return "embeddings"  # held directly by the tower or a container on the path to the block list

    parameters: dict[str, list[str]] = {group: [] for group in roots}
    for name, _ in tower.named_parameters():
        parameters[owner(name)].append(name)

    # A group without parameters joins the group before it (the one after it for a parameterless stem).
    groups: list[LayerGroup] = []
    pending: tuple[str, ...] = ()
    for group, group_roots in roots.items():
        if not parameters[group]:
            if groups:
                previous = groups.pop()
                groups.append(LayerGroup(previous.name, previous.modules + tuple(group_roots), previous.parameters))
            else:
                pending += tuple(group_roots)
            continue
        groups.append(LayerGroup(group, pending + tuple(group_roots), tuple(parameters[group])))
        pending = ()
    return groups


def _train_stays_eval(module: nn.Module, subtree: tuple[nn.Module, ...], mode: bool = True) -> nn.Module:
    """`train()` of a frozen module: eval mode whatever `mode` says, for its whole (frozen) subtree, set in one pass
    over the subtree listed at freezing time (the Trainer calls `model.train()` every step)."""
    for child in subtree:
        child.__dict__["training"] = False
    return module


def _lock_in_eval(module: nn.Module) -> None:
    module.eval()
    # An instance attribute shadows nn.Module.train, so a parent's train() (the Trainer's model.train()) keeps the
    # module in eval mode. A partial (not a bound method) copies and pickles with the module. Every module of the
    # subtree is frozen too (freeze_tower locks whole subtrees), so one pass over it replaces the recursion.
    module.train = partial(_train_stays_eval, module, tuple(module.modules()))


def _unlock(module: nn.Module) -> None:
    if is_kept_in_eval(module):
        del module.__dict__["train"]


def is_kept_in_eval(module: nn.Module) -> bool:
    """Whether `module.train()` was replaced by `freeze_tower` (the module stays in eval mode)."""
    train = module.__dict__.get("train")
    return isinstance(train, partial) and train.func is _train_stays_eval


def freeze_tower(tower: nn.Module, unlocked_layers: int = 0, blocks: str | None = None) -> list[LayerGroup]:
    """Freeze every layer group of `tower` except the last `unlocked_layers` (0: lock the whole tower).

    Frozen groups: `requires_grad=False` and eval mode kept through later `train()` calls (module docstring).
    Returns the frozen groups (one group named `tower` when the whole tower is locked). Raises `ValueError` when
    `unlocked_layers` is negative or exceeds the number of groups (the message lists them).
    """
    if unlocked_layers < 0:
        raise ValueError(f"unlocked_layers must be >= 0, got {unlocked_layers}")
    if unlocked_layers == 0:  # locked: no need for layer groups, the whole tree is frozen
        for parameter in tower.parameters():
            parameter.requires_grad_(False)
        for module in tower.modules():
            _lock_in_eval(module)
        return [LayerGroup("tower", ("",), tuple(name for name, _ in tower.named_parameters()))]
    groups = layer_groups(tower, blocks)
    if unlocked_layers > len(groups):
        raise ValueError(
            f"unlocked_layers={unlocked_layers} but the {type(tower).__name__} tower has {len(groups)} layer groups: "
            f"{[group.name for group in groups]}"
        )
    frozen = groups[: len(groups) - unlocked_layers]
    parameters = dict(tower.named_parameters())
    modules = dict(tower.named_modules())
    for group in frozen:
        for name in group.parameters:
            parameters[name].requires_grad_(False)
        for name in group.modules:
            for module in modules[name].modules():
                _lock_in_eval(module)
    return frozen


def unfreeze_tower(tower: nn.Module) -> None:
    """Undo `freeze_tower`: every parameter trainable, every module follows `train()` again (left in eval now)."""
    for parameter in tower.parameters():
        parameter.requires_grad_(True)
    for module in tower.modules():
        _unlock(module)


def is_tower_locked(tower: nn.Module) -> bool:
    """True when no parameter of `tower` requires a gradient and every module is in eval mode: its output is then a
    fixed function of its input (what the locked-image feature cache relies on)."""
    return not any(p.requires_grad for p in tower.parameters()) and not any(m.training for m in tower.modules())


def freeze_towers(
    model: nn.Module,
    freeze_vision_model: bool = False,
    vision_unlocked_layers: int = 0,
    freeze_text_model: bool = False,
    text_unlocked_layers: int = 0,
) -> dict[str, list[str]]:
    """Freeze the vision and/or text tower of a [`BCLSModel`] (the projections always train).

    `*_unlocked_layers` is the number of last layer groups that stay trainable; it needs the matching
    `freeze_*_model`. Returns `{"vision": [frozen group names], "text": [...]}` and logs a summary.
    """
    frozen: dict[str, list[str]] = {}
    for kind, freeze, unlocked in (
        ("vision", freeze_vision_model, vision_unlocked_layers),
        ("text", freeze_text_model, text_unlocked_layers),
    ):
        if unlocked and not freeze:
            raise ValueError(f"{kind}_unlocked_layers={unlocked} needs freeze_{kind}_model=True.")
        if not freeze:
            continue
        tower = getattr(model, f"{kind}_model")
        groups = freeze_tower(tower, unlocked_layers=unlocked)
        frozen[kind] = [group.name for group in groups]
        trainable = sum(p.numel() for p in tower.parameters() if p.requires_grad)
        total = sum(p.numel() for p in tower.parameters())
        logger.info(
            "%s tower %s: %d of %d parameters trainable (frozen groups: %s)",
            kind, "locked" if trainable == 0 else f"frozen but the last {unlocked} layer groups", trainable, total,
            ", ".join(frozen[kind]),
        )
    return frozen


__all__ = [
    "LayerGroup",
    "find_block_list",
    "freeze_tower",
    "freeze_towers",
    "is_kept_in_eval",
    "is_tower_locked",
    "layer_groups",
    "unfreeze_tower",
]
