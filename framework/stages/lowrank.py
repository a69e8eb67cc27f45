"""The lowrank stage: replace linear layers of an artifact's model by two thinner ones (truncated SVD),
then optionally finetune the factors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from omegaconf import DictConfig

from framework.compression import lowrank
from framework.config import in_range, positive
from framework.errors import ConfigError
from framework.stages.base import Stage
from framework.training import StageHooks, train


@dataclass
class LowRankConfig:
    rank: Optional[int] = None  # one rank for every factorized layer, or:
    energy: Optional[float] = 0.9  # per layer, the smallest rank keeping this share of the squared singular values
    targets: list[str] = field(default_factory=lambda: ["mlp"])  # layers whose name contains one of these


class LowRankStage(Stage):
    kind = "lowrank"
    section = "lowrank"
    section_schema = LowRankConfig
    reads = ("dense",)
    produces = "lowrank"

    def check(self, cfg: DictConfig) -> None:
        r = cfg.lowrank
        if (r.rank is None) == (r.energy is None):
            raise ConfigError("lowrank.rank", "set exactly one of lowrank.rank and lowrank.energy (the other to null)")
        if r.rank is not None:
            positive("lowrank.rank", r.rank)
        if r.energy is not None:
            in_range("lowrank.energy", r.energy, 0, 1, low_open=True)
        if not r.targets:
            raise ConfigError("lowrank.targets", "name at least one kind of layer to factorize (mlp, self_attn)")

    def run(self, cfg: DictConfig, stage_dir: str | None = None, input_fingerprints: Sequence[str] = ()) -> dict:
        r = cfg.lowrank

        def prepare(model, datamodule):
            model.lowrank_spec = lowrank.lowrank_factorize(model, rank=r.rank, energy=r.energy, targets=list(r.targets))
            if not model.lowrank_spec:
                raise ConfigError("lowrank.energy" if r.energy is not None else "lowrank.rank", "no layer would shrink at this setting: nothing to factorize")
            return model

        hooks = StageHooks(
            prepare_model=prepare,
            extra_metrics=lambda model, _: {"lowrank_layers": len(model.lowrank_spec), "ranks": model.lowrank_spec},
        )
        return train(cfg, stage_dir, [*input_fingerprints, *self.input_fingerprints(cfg)], "lowrank", hooks)


STAGE = LowRankStage()
