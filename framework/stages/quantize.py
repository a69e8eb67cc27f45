"""The quantize stage: int8 (or int4) weights, and optionally int8 activations, through torchao; post-training
(trainer.max_steps=0) or quantization-aware training (quantize.qat, for trainer.max_steps steps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from omegaconf import DictConfig

from framework.compression import quantization
from framework.config import one_of, positive
from framework.errors import ConfigError
from framework.stages.base import Stage
from framework.training import StageHooks, train


@dataclass
class QuantizeConfig:
    method: str = "int8_dynamic"  # one of compression.quantization.METHODS
    group_size: int = 128  # int4
    qat: bool = False  # fake-quantized finetune for trainer.max_steps, then conversion


class QuantizeStage(Stage):
    kind = "quantize"
    section = "quantize"
    section_schema = QuantizeConfig
    reads = ("dense",)
    produces = "quantized"

    def check(self, cfg: DictConfig) -> None:
        q = cfg.quantize
        one_of("quantize.method", q.method, quantization.METHODS)
        positive("quantize.group_size", q.group_size)
        if q.qat and cfg.trainer.max_steps == 0:
            raise ConfigError("trainer.max_steps", "quantize.qat=true needs training steps (> 0)")
        try:  # the machine may lack the kernel: say so now, not after loading and evaluating the model
            quantization.check_available(q.method)
        except RuntimeError as err:
            raise ConfigError("quantize.method", str(err).splitlines()[0]) from None

    def run(self, cfg: DictConfig, stage_dir: str | None = None, input_fingerprints: Sequence[str] = ()) -> dict:
        q = cfg.quantize
        if q.qat:
            hooks = StageHooks(
                prepare_model=lambda model, _: quantization.prepare_qat(model, q.method),
                finalize=lambda model: quantization.convert_qat(model, q.method),
            )
        else:
            hooks = StageHooks(finalize=lambda model: quantization.quantize_ptq(model, q.method, q.group_size))
        hooks.save_model = lambda model, tokenizer, directory: self.save(model, tokenizer, directory, q)
        hooks.extra_metrics = lambda model, _: {"quantization": q.method, "qat": q.qat}
        return train(cfg, stage_dir, [*input_fingerprints, *self.input_fingerprints(cfg)], "quantize", hooks)

    @staticmethod
    def save(model, tokenizer, directory: str, q: DictConfig) -> None:
        quantization.save_quantized(model, directory, q.method, q.group_size)
        tokenizer.save_pretrained(directory)


STAGE = QuantizeStage()
