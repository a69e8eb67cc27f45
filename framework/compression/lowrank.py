"""Low-rank factorization of linear layers by truncated SVD: W ≈ (U_r √S_r)(√S_r V_rᵀ).

`lowrank_factorize` returns a spec {module_name: rank}; `apply_lowrank_spec` rebuilds the same
structure on a fresh model so a state_dict saved from the factorized model loads into it.
"""

from collections.abc import Sequence

import torch
from torch import nn

from framework.compression.pruning import prunable_linears, weight_matrix


class LowRankLinear(nn.Module):
    """y = proj_out(proj_in(x)): in → rank (no bias) → out (with the original bias)."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.proj_in = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.proj_out = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


def _shrinks(rank: int, in_features: int, out_features: int) -> bool:
    return rank * (in_features + out_features) < in_features * out_features


def _rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose squared singular values hold at least `energy` of the total."""
    cumulative = singular_values.double().pow(2).cumsum(0)
    fraction = cumulative / cumulative[-1]
    # small tolerance so energy=1.0 is not defeated by rounding of the cumulative sum
    return min(int((fraction < energy - 1e-12).sum()) + 1, len(singular_values))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _empty_lowrank(layer: nn.Module, rank: int) -> LowRankLinear:
    out_features, in_features = weight_matrix(layer).shape
    return LowRankLinear(
        in_features, out_features, rank, bias=layer.bias is not None,
        device=layer.weight.device, dtype=layer.weight.dtype,
    )


@torch.no_grad()
def _factorize(
    layer: nn.Module, rank: int, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor
) -> LowRankLinear:
    new = _empty_lowrank(layer, rank)
    root = S[:rank].sqrt()
    new.proj_out.weight.copy_(U[:, :rank] * root)
    new.proj_in.weight.copy_(root[:, None] * Vh[:rank])
    if layer.bias is not None:
        new.proj_out.bias.copy_(layer.bias)
    return new


@torch.no_grad()
def lowrank_factorize(
    model: nn.Module,
    rank: int | None = None,
    energy: float | None = None,
    targets: Sequence[str] = ("mlp",),
) -> dict[str, int]:
    """Replace the prunable linears whose name contains any of `targets` by LowRankLinear.

    Give either a fixed `rank` or an `energy` fraction (per layer, the smallest rank keeping that
    share of the squared singular values). Layers that would not shrink stay dense.
    Returns the spec {module_name: rank} of the factorized layers.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    spec = {}
    for name, layer in prunable_linears(model).items():
        if not any(t in name for t in targets):
            continue
        W = weight_matrix(layer)
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        r = min(rank, len(S)) if rank is not None else _rank_for_energy(S, energy)
        if not _shrinks(r, W.shape[1], W.shape[0]):
            continue
        _set_module(model, name, _factorize(layer, r, U, S, Vh))
        spec[name] = r
    return spec


def apply_lowrank_spec(model: nn.Module, spec: dict[str, int]) -> nn.Module:
    """Give a fresh model the factorized structure of `spec` (weights uninitialised) so that the
    factorized model's state_dict loads into it. Returns the model."""
    for name, rank in spec.items():
        _set_module(model, name, _empty_lowrank(model.get_submodule(name), rank))
    return model


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Multiply every LowRankLinear's factors back into one nn.Linear (in place): the dense model a format
    without factors holds (GGUF), or a plain transformers model. Returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.proj_out.bias is not None, dtype=module.proj_in.weight.dtype)
            dense.weight.copy_(module.proj_out.weight @ module.proj_in.weight)
            if dense.bias is not None:
                dense.bias.copy_(module.proj_out.bias)
            _set_module(model, name, dense)
    if hasattr(model, "lowrank_spec"):
        del model.lowrank_spec
    return model
