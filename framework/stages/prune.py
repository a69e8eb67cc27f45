"""The prune stage: zero weights of an artifact's model (unstructured, N:M) or remove whole heads, channels
and layers (structured), then optionally finetune with the pruned weights held at zero.

Each method is a dataclass of its own knobs and its `apply` (the one-shot pruning, in place), registered
by name in `PruneStage.methods`; `prune=<option>` picks a file of conf/prune/, whose `method` picks the
dataclass. `trainer.max_steps` is the recovery finetune (0: one-shot);
for `gradual` it is the training during which the sparsity grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from omegaconf import DictConfig

from framework.compression import gradual, pruning, structured
from framework.config import in_range, one_of, positive
from framework.errors import ConfigError
from framework.stages.base import Stage, artifact_config, num_layers
from framework.training import StageHooks, train


@dataclass
class MagnitudeConfig:
    """Zero the smallest |w|: a share of each layer (or of all, scope=global), N:M, or all below a threshold."""

    method: str = "magnitude"
    sparsity: Optional[float] = 0.5
    threshold: Optional[float] = None  # zero every |w| < threshold instead of a fixed share (set sparsity=null)
    scope: str = "layer"
    n_m: Optional[list[int]] = None  # e.g. [2, 4]: semi-structured N:M instead of `sparsity`

    @staticmethod
    def apply(model, calibration, p: DictConfig) -> None:
        if p.threshold is not None:
            pruning.prune_threshold(model, p.threshold)
        else:
            pruning.prune_magnitude(model, p.sparsity, scope=p.scope, n_m=_n_m(p))


@dataclass
class WandaConfig:
    """Wanda: |W_ij| * ||X_j|| from calibration activations, per output row, no weight update."""

    method: str = "wanda"
    sparsity: float = 0.5
    n_m: Optional[list[int]] = None
    calibration_samples: int = 32  # train-split blocks of data.block_size tokens

    @staticmethod
    def apply(model, calibration, p: DictConfig) -> None:
        pruning.prune_wanda(model, calibration, p.sparsity, n_m=_n_m(p))


@dataclass
class SparseGPTConfig(WandaConfig):
    """SparseGPT: second-order mask selection with weight reconstruction, layer by layer."""

    method: str = "sparsegpt"
    block_size: int = 128  # columns processed together
    damp: float = 0.01  # Hessian dampening, relative to its mean diagonal

    @staticmethod
    def apply(model, calibration, p: DictConfig) -> None:
        pruning.prune_sparsegpt(model, calibration, p.sparsity, n_m=_n_m(p), block_size=p.block_size, damp=p.damp)


@dataclass
class StructuredConfig:
    """Remove KV groups (with their query heads), MLP channels and whole decoder layers: a smaller config."""

    method: str = "structured"
    heads_ratio: float = 0.0
    mlp_ratio: float = 0.0
    drop_layers: int = 0
    calibration_samples: int = 32

    @staticmethod
    def apply(model, calibration, p: DictConfig) -> None:
        structured.prune_structured(model, calibration, heads_ratio=p.heads_ratio, mlp_ratio=p.mlp_ratio, drop_layers=p.drop_layers)


@dataclass
class GradualConfig:
    """Magnitude pruning during training on a cubic schedule from start_step to end_step (Zhu & Gupta 2017)."""

    method: str = "gradual"
    sparsity: float = 0.5
    n_m: Optional[list[int]] = None
    start_step: int = 0
    end_step: int = 50
    every_n_steps: int = 10  # (no `apply`: it prunes during training, through a callback)


def _n_m(p: DictConfig) -> tuple[int, int] | None:
    return tuple(p.n_m) if p.get("n_m") else None


class PruneStage(Stage):
    kind = "prune"
    section = "prune"
    methods = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig, "structured": StructuredConfig, "gradual": GradualConfig}
    reads = ("dense",)

    def check(self, cfg: DictConfig) -> None:
        p = cfg.prune
        if "sparsity" in p and p.sparsity is not None:
            in_range("prune.sparsity", p.sparsity, 0, 1, high_open=True)
        if p.get("n_m") is not None and (len(p.n_m) != 2 or not 0 < p.n_m[0] < p.n_m[1]):
            raise ConfigError("prune.n_m", f"must be [N, M] with 0 < N < M, got {list(p.n_m)}")
        if "calibration_samples" in p:
            positive("prune.calibration_samples", p.calibration_samples)
        if p.method == "magnitude":
            one_of("prune.scope", p.scope, ("layer", "global"))
            if (p.sparsity is None) == (p.threshold is None) and p.n_m is None:
                raise ConfigError("prune.threshold", "set exactly one of prune.sparsity and prune.threshold (prune=magnitude_threshold sets a threshold)")
            if p.threshold is not None:
                positive("prune.threshold", p.threshold)
        if p.method == "sparsegpt":
            positive("prune.block_size", p.block_size)
            positive("prune.damp", p.damp, allow_zero=True)
        if p.method == "structured":
            in_range("prune.heads_ratio", p.heads_ratio, 0, 1, high_open=True)
            in_range("prune.mlp_ratio", p.mlp_ratio, 0, 1, high_open=True)
            positive("prune.drop_layers", p.drop_layers, allow_zero=True)
            layers = num_layers(artifact_config(cfg.input))
            if layers is not None and p.drop_layers >= layers:
                raise ConfigError("prune.drop_layers", f"{p.drop_layers} would leave no layer of the model's {layers} (at most {layers - 1})")
        if p.method == "gradual":
            positive("prune.every_n_steps", p.every_n_steps)
            if not 0 <= p.start_step <= p.end_step:
                raise ConfigError("prune.end_step", f"must be >= prune.start_step={p.start_step} >= 0, got {p.end_step}")
            if cfg.trainer.max_steps <= p.end_step:
                raise ConfigError("trainer.max_steps", f"gradual pruning needs more steps than prune.end_step={p.end_step}")

    def run(self, cfg: DictConfig, stage_dir: str | None = None, input_fingerprints: Sequence[str] = ()) -> dict:
        p = cfg.prune
        if p.method == "gradual":
            hooks = StageHooks(callbacks=[gradual.GradualPruning(p.sparsity, p.start_step, p.end_step, p.every_n_steps, n_m=_n_m(p))])
        else:
            # Recovery finetune (max_steps > 0): the pruned weights stay zero through every optimizer step.
            keep = [gradual.KeepZeros()] if cfg.trainer.max_steps > 0 and p.method != "structured" else []
            hooks = StageHooks(prepare_model=self._one_shot(self.methods[p.method].apply, p), callbacks=keep)
        hooks.extra_metrics = lambda model, _: _sparsity_metrics(model, _n_m(p))
        return train(cfg, stage_dir, [*input_fingerprints, *self.input_fingerprints(cfg)], "prune", hooks)

    @staticmethod
    def _one_shot(apply, p: DictConfig):
        def prepare(model, datamodule):
            calibration = datamodule.calibration_batches(p.calibration_samples) if "calibration_samples" in p else []
            try:
                apply(model, calibration, p)
            except ValueError as err:  # a setting the model cannot take (more layers to drop than it has)
                key = next((k for k in ("drop_layers", "heads_ratio") if str(err).startswith(k) or f"{k} must" in str(err)), "method")
                raise ConfigError(f"prune.{key}", str(err).removeprefix(f"{key}: ")) from None
            return model

        return prepare


def _sparsity_metrics(model, n_m) -> dict:
    report = pruning.sparsity_report(model)
    metrics = {
        "prunable_params": report["params"],
        "prunable_nonzero": report["nonzero"],
        "prunable_sparsity": report["sparsity"],
        "layers": report["layers"],
    }
    if n_m:
        metrics["n_m_ok"] = all(pruning.check_n_m(pruning.weight_matrix(m), *n_m) for m in pruning.prunable_linears(model).values())
    return metrics


STAGE = PruneStage()
