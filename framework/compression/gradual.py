"""Gradual magnitude pruning during training (Zhu & Gupta 2017, "To prune, or not to prune")."""

import torch
from lightning.pytorch import Callback

from framework.compression.pruning import apply_masks, magnitude_masks, prunable_linears, weight_matrix


def cubic_sparsity(
    step: int, start_step: int, end_step: int, final_sparsity: float, initial_sparsity: float = 0.0
) -> float:
    """s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0))^3, clamped to [t_0, t_end]."""
    if end_step <= start_step:
        return final_sparsity if step >= start_step else initial_sparsity
    progress = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


class GradualPruning(Callback):
    """Prunes the prunable linears of `pl_module.model` by magnitude on a cubic schedule.

    Masks are recomputed every `every_n_steps` optimizer steps from `start_step` to `end_step`
    (end_step always included) and re-applied after every training batch, so weights pruned
    before an optimizer step stay zero after it. With n_m=(n, m), each recomputation chooses
    an n:m mask instead (the schedule and final_sparsity are then not used).
    """

    def __init__(
        self,
        final_sparsity: float,
        start_step: int = 0,
        end_step: int = 100,
        every_n_steps: int = 10,
        n_m: tuple[int, int] | None = None,
    ):
        self.final_sparsity = final_sparsity
        self.start_step, self.end_step, self.every_n_steps = start_step, end_step, every_n_steps
        self.n_m = n_m
        self.masks: dict[str, torch.Tensor] = {}
        self.last_pruned_step = -1

    def _is_scheduled(self, step: int) -> bool:
        if not self.start_step <= step <= self.end_step or step == self.last_pruned_step:
            return False
        return (step - self.start_step) % self.every_n_steps == 0 or step == self.end_step

    def on_train_start(self, trainer, pl_module) -> None:
        # After resuming, the pruned weights must stay zero from the first step. A checkpoint
        # saved after on_train_end holds no masks: the zeros of the restored weights are the mask.
        if not self.masks and self.last_pruned_step >= 0:
            layers = prunable_linears(pl_module.model)
            self.masks = {name: weight_matrix(layer) != 0 for name, layer in layers.items()}
        apply_masks(pl_module.model, self.masks)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._is_scheduled(step):
            sparsity = cubic_sparsity(step, self.start_step, self.end_step, self.final_sparsity)
            # pruned weights are zero, hence the smallest: masks only ever grow
            self.masks = magnitude_masks(pl_module.model, sparsity, n_m=self.n_m)
            self.last_pruned_step = step
            apply_masks(pl_module.model, self.masks)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the optimizer step has updated pruned weights (momentum, weight decay): zero them again
        apply_masks(pl_module.model, self.masks)

    def on_train_end(self, trainer, pl_module) -> None:
        apply_masks(pl_module.model, self.masks)
        self.masks = {}

    def state_dict(self) -> dict:
        return {"masks": {name: mask.cpu() for name, mask in self.masks.items()},
                "last_pruned_step": self.last_pruned_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.masks = dict(state_dict["masks"])
        self.last_pruned_step = state_dict["last_pruned_step"]


class KeepZeros(Callback):
    """Keeps already-pruned weights at zero while training (a recovery finetune after one-shot pruning).

    The mask is the pattern of zeros when training starts, also after a resume from a checkpoint,
    since the pruned weights were saved as zeros.
    """

    def __init__(self):
        self.masks: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        layers = prunable_linears(pl_module.model)
        self.masks = {name: weight_matrix(layer) != 0 for name, layer in layers.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        apply_masks(pl_module.model, self.masks)
