"""The share stage: groups of `share.group_size` adjacent decoder layers come to share one set of weights
(ALBERT-style cross-layer sharing), initialised from the group's mean or its first layer; then
optionally a recovery finetune (trainer.max_steps > 0) in which the ties hold, since a group is one set
of Parameters. The model keeps its depth (compute per token is unchanged) with fewer unique weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from omegaconf import DictConfig

from framework.compression import sharing
from framework.config import one_of
from framework.errors import ConfigError
from framework.stages.base import Stage, artifact_config, num_layers
from framework.training import StageHooks, train


@dataclass
class ShareConfig:
    group_size: int = 2  # adjacent layers per group (the last group may be smaller)
    init: str = "mean"  # mean: the group's mean weights | first: the group's first layer


class ShareStage(Stage):
    kind = "share"
    section = "share"
    section_schema = ShareConfig
    reads = ("dense",)
    produces = "shared"

    def check(self, cfg: DictConfig) -> None:
        if cfg.share.group_size < 2:
            raise ConfigError("share.group_size", f"must be >= 2 (layers per shared group), got {cfg.share.group_size}")
        one_of("share.init", cfg.share.init, sharing.INITS)
        layers = num_layers(artifact_config(cfg.input))
        if layers is not None and cfg.share.group_size > layers:
            raise ConfigError("share.group_size", f"{cfg.share.group_size} is more than the model's {layers} layers")
        if cfg.strategy.name == "model_parallel":
            raise ConfigError("strategy", "model_parallel shards each layer on its own; layers that share weights cannot be sharded apart (use ddp)")

    def run(self, cfg: DictConfig, stage_dir: str | None = None, input_fingerprints: Sequence[str] = ()) -> dict:
        s = cfg.share

        def prepare(model, datamodule):
            num_layers = model.config.num_hidden_layers
            if s.group_size > num_layers:
                raise ConfigError("share.group_size", f"{s.group_size} is more than the model's {num_layers} layers")
            return sharing.share_layers(model, sharing.layer_groups(num_layers, s.group_size), init=s.init)

        def metrics(model, _):
            unique_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            # The artifact's files repeat each shared tensor (plain HF loaders need every layer's weights);
            # in memory, and in this stage's checkpoints, each is held once.
            return {"layer_groups": model.layer_groups, "ties_hold": sharing.ties_hold(model), "size_bytes_unique": unique_bytes}

        hooks = StageHooks(prepare_model=prepare, extra_metrics=metrics)
        return train(cfg, stage_dir, [*input_fingerprints, *self.input_fingerprints(cfg)], "share", hooks)


STAGE = ShareStage()
