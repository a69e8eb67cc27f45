"""Cross-layer parameter sharing (ALBERT-style): groups of adjacent decoder layers use one set of weights.

`share_layers` ties the layers of each group to the group's first layer, whose weights become the
group's mean (or stay the first layer's). A tied group is one set of Parameters used by several
layers: the optimizer sees it once, its gradient sums the uses, and the ties hold through every step,
checkpoint and resume because there is nothing else to update.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.compression.pruning import transformer_blocks

INITS = ("mean", "first")


def layer_groups(num_layers: int, group_size: int) -> list[list[int]]:
    """Adjacent layers in groups of `group_size` (the last group may be smaller)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return [list(range(start, min(start + group_size, num_layers))) for start in range(0, num_layers, group_size)]


@torch.no_grad()
def share_layers(model: nn.Module, groups: list[list[int]], init: str = "mean") -> nn.Module:
    """Tie every layer of each group to the group's first layer, in place; returns the model.

    init="mean" sets the shared weights to the mean of the group's layers (every parameter and
    buffer of the same name), "first" keeps the first layer's.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    _, blocks = transformer_blocks(model)
    for group in groups:
        first = blocks[group[0]]
        if init == "mean" and len(group) > 1:
            for name, param in first.named_parameters():
                param.copy_(torch.stack([blocks[i].get_parameter(name) for i in group]).mean(dim=0))
        for index in group[1:]:
            _tie_module(blocks[index], first)
    model.layer_groups = [list(g) for g in groups]
    return model


def _tie_module(target: nn.Module, source: nn.Module) -> None:
    """Point every parameter of `target` at the Parameter of the same name in `source`."""
    for name, _ in list(target.named_parameters()):
        owner_name, _, param_name = name.rpartition(".")
        owner = target.get_submodule(owner_name) if owner_name else target
        source_owner = source.get_submodule(owner_name) if owner_name else source
        setattr(owner, param_name, getattr(source_owner, param_name))


def ties_hold(model: nn.Module) -> bool:
    """True when every layer of every group uses the very Parameters of its group's first layer."""
    _, blocks = transformer_blocks(model)
    for group in getattr(model, "layer_groups", []):
        first = dict(blocks[group[0]].named_parameters())
        for index in group[1:]:
            if any(param is not first[name] for name, param in blocks[index].named_parameters()):
                return False
    return True


def repeated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every shared tensor stored under each of its names (what plain HF loaders expect)."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        state[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return state
