"""Unstructured and N:M weight pruning: magnitude, Wanda and SparseGPT.

Every function works in place on an nn.Module and returns `sparsity_report(model)`.
Only the linear layers inside the transformer blocks are pruned (never embeddings or
lm_head). Masks are chosen with topk indices rather than thresholds, so the number of
zeros is exact even when scores tie.

Mask convention: a bool tensor with True = keep the weight.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# Where the list of transformer blocks lives: HF Llama-like, GPT-2, BERT-like encoders, and their bare base models.
_BLOCK_LISTS = ("model.layers", "transformer.h", "encoder.layer", "layers", "h", "layer")
_LINEAR_TYPES = (nn.Linear, Conv1D)


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and ModuleList of the model's transformer blocks (also inside wrappers such as
    PEFT models, whose module names gain a prefix)."""
    modules = list(model.named_modules())
    for suffix in _BLOCK_LISTS:
        for name, module in modules:
            if isinstance(module, nn.ModuleList) and (name == suffix or name.endswith("." + suffix)):
                return name, module
    raise ValueError(f"no transformer blocks found in {type(model).__name__} (looked for {_BLOCK_LISTS})")


def prunable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / GPT-2 Conv1D inside the transformer blocks, by module name."""
    prefix, _ = transformer_blocks(model)
    return {
        name: module
        for name, module in model.named_modules()
        if name.startswith(prefix + ".") and isinstance(module, _LINEAR_TYPES)
    }


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight data as [out, in]; a view, so in-place writes reach the layer.

    Conv1D stores its weight transposed, as [in, out].
    """
    return layer.weight.data.t() if isinstance(layer, Conv1D) else layer.weight.data


def sparsity_report(model: nn.Module) -> dict:
    """Parameter and non-zero counts of the prunable weights, per layer and in total."""
    layers = {}
    for name, layer in prunable_linears(model).items():
        params, nonzero = layer.weight.numel(), int(torch.count_nonzero(layer.weight))
        layers[name] = {"params": params, "nonzero": nonzero, "sparsity": 1.0 - nonzero / params}
    params = sum(layer["params"] for layer in layers.values())
    nonzero = sum(layer["nonzero"] for layer in layers.values())
    return {
        "layers": layers,
        "params": params,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
    }


def check_n_m(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every m consecutive input weights of each row hold at most n non-zeros.

    `weight` is [out, in] (nn.Linear layout; pass `conv1d.weight.t()` for a Conv1D).
    """
    if weight.shape[-1] % m:
        raise ValueError(f"input size {weight.shape[-1]} is not a multiple of m={m}")
    groups = weight.reshape(weight.shape[0], -1, m)
    return bool(((groups != 0).sum(dim=-1) <= n).all())


# ---------------------------------------------------------------------------------------
# Mask selection


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning exactly the k lowest scores along the last dim (ties by index)."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(-1, torch.topk(scores, k, dim=-1, largest=False).indices, False)
    return mask


def _n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the n highest scores of every m consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"input size {cols} is not a multiple of m={m}")
    return _prune_lowest(scores.reshape(rows, cols // m, m), m - n).reshape(rows, cols)


def _row_mask(scores: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None) -> torch.Tensor:
    """Per-row comparison group (Wanda, SparseGPT): int(sparsity * in) zeros in each row, or N:M."""
    if n_m:
        return _n_m_mask(scores, *n_m)
    return _prune_lowest(scores, int(sparsity * scores.shape[1]))


def magnitude_masks(
    model: nn.Module, sparsity: float, scope: str = "layer", n_m: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Keep-masks of the largest |w|, per layer, across all layers ("global"), or N:M."""
    scores = {name: weight_matrix(layer).abs().float() for name, layer in prunable_linears(model).items()}
    if n_m:
        return {name: _n_m_mask(s, *n_m) for name, s in scores.items()}
    if scope == "layer":
        return {
            name: _prune_lowest(s.flatten(), round(sparsity * s.numel())).view_as(s)
            for name, s in scores.items()
        }
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        keep = _prune_lowest(flat, round(sparsity * flat.numel())).split([s.numel() for s in scores.values()])
        return {name: k.view_as(s) for (name, s), k in zip(scores.items(), keep)}
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the weights whose mask entry is False (masks are [out, in])."""
    layers = prunable_linears(model)
    for name, mask in masks.items():
        weight = weight_matrix(layers[name])
        weight.mul_(mask.to(weight.device))


def prune_magnitude(
    model: nn.Module, sparsity: float, scope: str = "layer", n_m: tuple[int, int] | None = None
) -> dict:
    """Zero the smallest-magnitude weights: round(sparsity * numel) per layer or across all
    layers (scope="global"); with n_m=(n, m) keep the n largest of every m inputs (sparsity ignored)."""
    apply_masks(model, magnitude_masks(model, sparsity, scope, n_m))
    return sparsity_report(model)


@torch.no_grad()
def prune_threshold(model: nn.Module, threshold: float) -> dict:
    """Zero every prunable weight with |w| < threshold; the sparsity reached is whatever that gives."""
    for layer in prunable_linears(model).values():
        weight = weight_matrix(layer)
        weight.mul_(weight.abs() >= threshold)
    return sparsity_report(model)


# ---------------------------------------------------------------------------------------
# Calibration-based pruning, block by block


class _StopForward(Exception):
    """Raised by a hook to stop the forward pass once the first block's inputs are captured."""


def _capture_block_inputs(model: nn.Module, block: nn.Module, calib: list) -> list[tuple]:
    """The (args, kwargs) the model passes to `block` for each calibration batch: token ids (a language model)
    or a dict of tensors (a classifier's padded batch: input_ids, attention_mask, ...)."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib:
            try:
                if isinstance(batch, dict):
                    model(**{k: v.to(device) for k, v in batch.items()})
                else:
                    model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _InputNorms:
    """Accumulates the squared L2 norm of each input feature over all tokens (Wanda)."""

    def __init__(self, layer: nn.Module):
        self.sq = torch.zeros(weight_matrix(layer).shape[1], dtype=torch.float64, device=layer.weight.device)

    def add(self, x: torch.Tensor) -> None:
        self.sq += x.reshape(-1, x.shape[-1]).double().pow(2).sum(dim=0)


class _Hessian:
    """Accumulates H = 2 X Xᵀ / tokens of the layer inputs (SparseGPT)."""

    def __init__(self, layer: nn.Module):
        cols = weight_matrix(layer).shape[1]
        self.xxt = torch.zeros(cols, cols, dtype=torch.float64, device=layer.weight.device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.xxt += x.T @ x
        self.tokens += x.shape[0]

    def value(self) -> torch.Tensor:
        return 2 * self.xxt / max(self.tokens, 1)


@torch.no_grad()
def _prune_sequentially(
    model: nn.Module,
    calib: list[torch.Tensor],
    make_stats: Callable[[nn.Module], object],
    prune_layer: Callable[[nn.Module, object], None],
) -> None:
    """Prune the blocks in order; block i's statistics come from the outputs of the
    already-pruned blocks 0..i-1, so later blocks compensate for earlier errors."""
    was_training = model.training
    model.eval()
    _, blocks = transformer_blocks(model)
    inputs = _capture_block_inputs(model, blocks[0], calib)
    for block in blocks:
        layers = [m for m in block.modules() if isinstance(m, _LINEAR_TYPES)]
        stats = [make_stats(layer) for layer in layers]
        handles = [
            layer.register_forward_hook(lambda module, args, out, s=s: s.add(args[0]))
            for layer, s in zip(layers, stats)
        ]
        for args, kwargs in inputs:
            _run_block(block, args, kwargs)
        for handle in handles:
            handle.remove()
        for layer, s in zip(layers, stats):
            prune_layer(layer, s)
        inputs = [((_run_block(block, args, kwargs), *args[1:]), kwargs) for args, kwargs in inputs]
    model.train(was_training)


def prune_wanda(
    model: nn.Module, calib: list[torch.Tensor], sparsity: float, n_m: tuple[int, int] | None = None
) -> dict:
    """Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2 within each output row, no update."""

    def prune_layer(layer: nn.Module, norms: _InputNorms) -> None:
        weight = weight_matrix(layer)
        scores = weight.abs().double() * norms.sq.sqrt()
        weight.mul_(_row_mask(scores, sparsity, n_m))

    _prune_sequentially(model, calib, _InputNorms, prune_layer)
    return sparsity_report(model)


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened H⁻¹; its rows give the OBS updates."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


@torch.no_grad()
def sparsegpt_prune_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT on one [out, in] weight given the input Hessian H [in, in]; returns the new weight.

    Columns are processed left to right in blocks; each pruned weight's error is spread over
    the not-yet-processed columns (optimal brain surgeon update with the Cholesky rows of H⁻¹).
    Per row, exactly int(sparsity * in) weights are zeroed (or the N:M pattern).
    """
    if n_m and block_size % n_m[1]:
        raise ValueError(f"block_size {block_size} must be a multiple of m={n_m[1]}")
    W = W.float().clone()
    H = H.double().clone()
    dead = H.diagonal() == 0  # inputs that are always zero: their weights are irrelevant
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _inverse_hessian_cholesky(H, damp).float()
    cols = W.shape[1]
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
        d = Hinv1.diagonal()
        err = torch.zeros_like(W1)
        if n_m:
            keep = torch.ones_like(W1, dtype=torch.bool)
        else:
            # Cumulative counts make each row's total exactly int(sparsity * cols).
            keep = _prune_lowest(W1**2 / d**2, int(sparsity * end) - int(sparsity * start))
        for i in range(end - start):
            if n_m and i % n_m[1] == 0:
                group = slice(i, i + n_m[1])
                keep[:, group] = _n_m_mask(W1[:, group] ** 2 / d[group] ** 2, *n_m)
            w = W1[:, i]
            err[:, i] = w * ~keep[:, i] / d[i]
            W1[:, i:] -= err[:, i : i + 1] @ Hinv1[i : i + 1, i:]
        W[:, start:end] = W1 * keep  # pruned entries are ~0 after the update; make them exact
        W[:, end:] -= err @ Hinv[start:end, end:]
    return W


def prune_sparsegpt(
    model: nn.Module,
    calib: list[torch.Tensor],
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> dict:
    """SparseGPT (Frantar & Alistarh 2023): mask selection and weight reconstruction per layer,
    blocks processed sequentially on the outputs of the already-pruned blocks."""

    def prune_layer(layer: nn.Module, hessian: _Hessian) -> None:
        weight = weight_matrix(layer)
        weight.copy_(sparsegpt_prune_weight(weight, hessian.value(), sparsity, n_m, block_size, damp))

    _prune_sequentially(model, calib, _Hessian, prune_layer)
    return sparsity_report(model)
