"""Structured pruning of HF Llama models: KV groups (with their query heads), MLP channels and
whole decoder layers; and of BERT-style encoders (BERT, MiniLM, RoBERTa): feed-forward channels and
whole layers.

The result is a genuinely smaller LlamaForCausalLM. The same number of KV groups and MLP channels
is removed from every layer so the config stays uniform and `save_pretrained` +
`AutoModelForCausalLM.from_pretrained` reload it.

Importance comes from calibration activations:
- KV group: squared norm of its query heads' contribution to the attention output (o_proj),
- MLP channel: mean |input of down_proj| times the norm of its down_proj column,
- layer: ShortGPT block influence (Men et al. 2024), 1 - cos(block input, block output);
  the layers that change their input least are dropped.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Importance:
    kv_groups: list[torch.Tensor]  # per layer, [num_key_value_heads]
    mlp_channels: list[torch.Tensor]  # per layer, [intermediate_size]
    block_influence: torch.Tensor  # [num_hidden_layers]


def _group_contributions(attn: nn.Module, x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Squared norm of each KV group's share of o_proj(x), summed over tokens."""
    heads = x.shape[-1] // attn.head_dim
    x_heads = x.reshape(-1, heads, attn.head_dim).float().unbind(1)
    w_heads = attn.o_proj.weight.float().view(-1, heads, attn.head_dim).unbind(1)
    per_head = torch.stack([(xh @ wh.T).pow(2).sum() for xh, wh in zip(x_heads, w_heads)])
    return per_head.view(num_groups, -1).sum(dim=1)  # query heads of a group are contiguous


def _influence(args: tuple, kwargs: dict, out, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A block's influence on its tokens (ShortGPT), summed: 1 - cos(block input, block output), over the tokens
    `mask` keeps (all when None)."""
    x = args[0] if args else kwargs["hidden_states"]
    y = out[0] if isinstance(out, tuple) else out
    change = 1 - nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
    return (change if mask is None else change * mask).sum().cpu()


@torch.no_grad()
def _importance(model: nn.Module, calib: list[torch.Tensor]) -> _Importance:
    layers = model.model.layers
    num_groups = model.config.num_key_value_heads
    kv = [torch.zeros(num_groups) for _ in layers]
    mlp_abs = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    influence = torch.zeros(len(layers))
    tokens = 0

    def on_o_proj(i):
        def hook(module, args):
            kv[i] += _group_contributions(layers[i].self_attn, args[0], num_groups).cpu()
        return hook

    def on_down_proj(i):
        def hook(module, args):
            mlp_abs[i] += args[0].reshape(-1, args[0].shape[-1]).float().abs().sum(dim=0).cpu()
        return hook

    def on_block(i):
        def hook(module, args, kwargs, out):
            influence[i] += _influence(args, kwargs, out)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
        handles.append(layer.register_forward_hook(on_block(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for ids in calib:
            model(ids.to(device), use_cache=False)
            tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    mlp = [
        a / tokens * layer.mlp.down_proj.weight.float().norm(dim=0).cpu() for a, layer in zip(mlp_abs, layers)
    ]
    return _Importance(kv, mlp, influence / tokens)


def _kv_groups_to_keep(num_groups: int, group_size: int, hidden_size: int, ratio: float) -> int:
    """How many KV groups to keep: the count closest to removing `ratio` of them for which
    hidden_size stays divisible by the number of attention heads (LlamaConfig validates this)."""
    target = num_groups - round(ratio * num_groups)
    valid = [k for k in range(1, num_groups + 1) if hidden_size % (k * group_size) == 0]
    return min(valid, key=lambda k: (abs(k - target), -k))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (keeps the original layout)."""
    return torch.topk(scores, k).indices.sort().values


def _units(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of the `size`-wide units (heads) at `indices`."""
    return (indices[:, None] * size + torch.arange(size)).flatten()


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping the output (dim=0) or input (dim=1) features at `index`."""
    index = index.to(linear.weight.device)
    weight = linear.weight.index_select(dim, index)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    new.weight = nn.Parameter(weight.clone())
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.clone() if dim == 1 else linear.bias[index].clone())
    return new


def _prune_attention(attn: nn.Module, groups: torch.Tensor, group_size: int) -> None:
    """Keep KV groups `groups` and their query heads; GQA ratio and head_dim are unchanged."""
    q_rows = _units(_units(groups, group_size), attn.head_dim)
    kv_rows = _units(groups, attn.head_dim)
    attn.q_proj = _slice_linear(attn.q_proj, q_rows, 0)
    attn.k_proj = _slice_linear(attn.k_proj, kv_rows, 0)
    attn.v_proj = _slice_linear(attn.v_proj, kv_rows, 0)
    attn.o_proj = _slice_linear(attn.o_proj, q_rows, 1)
    # transformers 5.x LlamaAttention only stores head_dim and num_key_value_groups (unchanged);
    # older versions also keep the head counts.
    if hasattr(attn, "num_heads"):
        attn.num_heads = len(groups) * group_size
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = len(groups)


def _prune_mlp(mlp: nn.Module, channels: torch.Tensor) -> None:
    mlp.gate_proj = _slice_linear(mlp.gate_proj, channels, 0)
    mlp.up_proj = _slice_linear(mlp.up_proj, channels, 0)
    mlp.down_proj = _slice_linear(mlp.down_proj, channels, 1)
    mlp.intermediate_size = len(channels)


def _keep_layers(model: nn.Module, kept: list[int]) -> None:
    """Keep only the decoder layers `kept`, renumbering layer_idx (it indexes the KV cache)."""
    model.model.layers = nn.ModuleList(model.model.layers[i] for i in kept)
    for new_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    model.config.num_hidden_layers = len(kept)


def is_bert_like(model: nn.Module) -> bool:
    """An encoder whose layers are BertLayer-shaped (attention, intermediate.dense, output.dense)."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    return layers is not None and hasattr(layers[0], "intermediate") and hasattr(layers[0].output, "dense")


@torch.no_grad()
def _encoder_importance(model: nn.Module, calib: list[dict]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per layer, each feed-forward channel's mean |input of output.dense| times its column norm; and each
    layer's block influence (1 - cos(input, output)), over the real (unpadded) tokens of the batches."""
    layers = model.base_model.encoder.layer
    channel_abs = [torch.zeros(layer.output.dense.in_features) for layer in layers]
    influence = torch.zeros(len(layers))
    state = {"mask": None, "tokens": 0}

    def on_ffn_out(i):
        def hook(module, args):
            x = args[0].float().abs() * state["mask"]
            channel_abs[i] += x.reshape(-1, x.shape[-1]).sum(dim=0).cpu()
        return hook

    def on_block(i):
        def hook(module, args, kwargs, out):
            influence[i] += _influence(args, kwargs, out, state["mask"][..., 0])
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.output.dense.register_forward_pre_hook(on_ffn_out(i)))
        handles.append(layer.register_forward_hook(on_block(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in calib:
            batch = {k: v.to(device) for k, v in batch.items()}
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
            state["mask"] = mask[..., None].float()
            state["tokens"] += int(mask.sum())
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    tokens = max(state["tokens"], 1)
    channels = [a / tokens * layer.output.dense.weight.float().norm(dim=0).cpu() for a, layer in zip(channel_abs, layers)]
    return channels, influence / tokens


@torch.no_grad()
def prune_encoder_structured(model: nn.Module, calib: list[dict], mlp_ratio: float = 0.0, drop_layers: int = 0) -> nn.Module:
    """Remove feed-forward channels (the same count in every layer, so the config stays uniform) and the
    `drop_layers` layers of least block influence from a BERT-style encoder, in place. The result is a
    smaller model of the same class that save_pretrained / from_pretrained round-trip."""
    cfg = model.config
    encoder = model.base_model.encoder
    if not 0 <= drop_layers < len(encoder.layer):
        raise ValueError(f"drop_layers must be in [0, {len(encoder.layer)}), got {drop_layers}")
    channels, influence = _encoder_importance(model, calib)
    kept_channels = max(1, cfg.intermediate_size - round(mlp_ratio * cfg.intermediate_size))
    if kept_channels < cfg.intermediate_size:
        for layer, scores in zip(encoder.layer, channels):
            keep = _top(scores, kept_channels)
            layer.intermediate.dense = _slice_linear(layer.intermediate.dense, keep, 0)
            layer.output.dense = _slice_linear(layer.output.dense, keep, 1)
        cfg.intermediate_size = kept_channels
    kept = _top(influence, len(encoder.layer) - drop_layers).tolist()
    encoder.layer = nn.ModuleList(encoder.layer[i] for i in kept)
    for new_idx, layer in enumerate(encoder.layer):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    cfg.num_hidden_layers = len(kept)
    return model


@torch.no_grad()
def prune_structured(
    model: nn.Module,
    calib: list[torch.Tensor],
    heads_ratio: float = 0.0,
    mlp_ratio: float = 0.0,
    drop_layers: int = 0,
) -> nn.Module:
    """Remove KV groups, MLP channels and whole layers from a LlamaForCausalLM, in place.

    heads_ratio: fraction of KV groups to remove per layer (with their query heads; rounded to a
    count that keeps hidden_size divisible by the head count), mlp_ratio: fraction of MLP channels,
    drop_layers: number of decoder layers to drop. Returns the (same, now smaller) model.
    """
    if is_bert_like(model):
        if heads_ratio:
            # BertConfig has one head size for every layer (hidden_size / num_attention_heads): fewer heads
            # at the same width is not a config transformers can load.
            raise ValueError("heads_ratio: an encoder's attention heads cannot be removed in a loadable config; use mlp_ratio or drop_layers")
        return prune_encoder_structured(model, calib, mlp_ratio=mlp_ratio, drop_layers=drop_layers)
    cfg = model.config
    layers = model.model.layers
    if not 0 <= drop_layers < len(layers):
        raise ValueError(f"drop_layers must be in [0, {len(layers)}), got {drop_layers}")
    importance = _importance(model, calib)
    group_size = cfg.num_attention_heads // cfg.num_key_value_heads
    head_dim = layers[0].self_attn.head_dim
    kept_groups = _kv_groups_to_keep(cfg.num_key_value_heads, group_size, cfg.hidden_size, heads_ratio)
    kept_channels = max(1, cfg.intermediate_size - round(mlp_ratio * cfg.intermediate_size))

    for i, layer in enumerate(layers):
        if kept_groups < cfg.num_key_value_heads:
            _prune_attention(layer.self_attn, _top(importance.kv_groups[i], kept_groups), group_size)
        if kept_channels < cfg.intermediate_size:
            _prune_mlp(layer.mlp, _top(importance.mlp_channels[i], kept_channels))
    _keep_layers(model, _top(importance.block_influence, len(layers) - drop_layers).tolist())

    cfg.head_dim = head_dim  # no longer hidden_size // num_attention_heads
    cfg.num_attention_heads = kept_groups * group_size
    cfg.num_key_value_heads = kept_groups
    cfg.intermediate_size = kept_channels
    return model
