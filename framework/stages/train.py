"""The train stage: pretraining from scratch, or finetuning (full or LoRA) a pretrained model or an earlier
stage's artifact (`input`)."""

from __future__ import annotations

from typing import Sequence

from omegaconf import DictConfig

from framework.errors import ConfigError
from framework.stages.base import Stage
from framework.training import train


class TrainStage(Stage):
    kind = "train"
    reads = ("dense", "shared", "lowrank")
    input_required = False  # from scratch or a pretrained `model` without it

    def check(self, cfg: DictConfig) -> None:
        if cfg.model.share_layers > 1 and cfg.strategy.name == "model_parallel":
            raise ConfigError("strategy", "model_parallel shards each layer on its own; layers that share weights cannot be sharded apart (use ddp)")

    def output_format(self, cfg: DictConfig, input_format: str | None) -> str:
        if input_format is not None:
            return input_format  # finetuning keeps the model's form: its layer groups or its factors
        return "shared" if cfg.model.share_layers > 1 else "dense"

    def run(self, cfg: DictConfig, stage_dir: str | None = None, input_fingerprints: Sequence[str] = ()) -> dict:
        return train(cfg, stage_dir, [*input_fingerprints, *self.input_fingerprints(cfg)], "train")


STAGE = TrainStage()
