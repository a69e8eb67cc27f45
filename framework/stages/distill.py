"""The distill stage: train a smaller student on a frozen teacher's soft targets plus the hard labels, and
(distill.baseline) the same student without the teacher, so the report shows what the teacher bought."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from omegaconf import DictConfig, open_dict

from framework import artifacts
from framework.compression import distillation
from framework.config import in_range, one_of, positive
from framework.errors import ConfigError
from framework.models import load_model_dir
from framework.stages.base import Stage, artifact_config, num_layers
from framework.training import StageHooks, train
from framework.training.classification import ClassificationDistillationModule
from framework.training.modules import DistillationModule


@dataclass
class DistillConfig:
    teacher: Optional[str] = None  # the teacher's artifact directory (a pipeline names a stage instead)
    loss: str = "forward_kl"  # one of compression.distillation.LOSS_KINDS
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft (teacher) loss; 1 - alpha on hard-label cross-entropy
    student: str = "derive"  # derive: layers/width cut from the teacher (Minitron) | config: the `model` group
    num_layers: Optional[int] = None
    layer_ratio: Optional[float] = 0.5
    intermediate_ratio: float = 1.0
    baseline: bool = True  # also train the same student without a teacher, for comparison
    # Classifiers only (TinyBERT): match the teacher's hidden states (through a learned projection when the
    # widths differ) and attention maps, student layer i against the teacher layer it was cut from.
    hidden_weight: float = 0.0
    attention_weight: float = 0.0


class DistillStage(Stage):
    kind = "distill"
    section = "distill"
    section_schema = DistillConfig
    reads = ("dense", "shared")
    input_key = "distill.teacher"

    def use_input(self, cfg: DictConfig, source: str) -> None:
        if cfg.distill.student == "derive":
            super().use_input(cfg, source)
        else:  # logit distillation needs one vocabulary: the student takes the teacher's tokenizer
            with open_dict(cfg):
                cfg.model.tokenizer = os.path.join(source, artifacts.MODEL)

    def check(self, cfg: DictConfig) -> None:
        d = cfg.distill
        one_of("distill.loss", d.loss, distillation.LOSS_KINDS)
        one_of("distill.student", d.student, ("derive", "config"))
        positive("distill.temperature", d.temperature)
        in_range("distill.alpha", d.alpha, 0, 1)
        positive("trainer.max_steps", cfg.trainer.max_steps)
        in_range("distill.intermediate_ratio", d.intermediate_ratio, 0, 1, low_open=True)
        positive("distill.hidden_weight", d.hidden_weight, allow_zero=True)
        positive("distill.attention_weight", d.attention_weight, allow_zero=True)
        if cfg.task.name == "classification" and d.loss != "forward_kl":
            raise ConfigError("distill.loss", f"'{d.loss}' is for language models; a classifier distils with forward_kl (soft targets at a temperature)")
        if cfg.task.name != "classification" and (d.hidden_weight or d.attention_weight):
            key = "distill.hidden_weight" if d.hidden_weight else "distill.attention_weight"
            raise ConfigError(key, "hidden-state and attention transfer are for task=classification")
        if d.student == "config":
            return
        if d.num_layers is None and d.layer_ratio is None:
            raise ConfigError("distill.num_layers", "a derived student needs distill.num_layers or distill.layer_ratio")
        if d.layer_ratio is not None and d.num_layers is None:
            in_range("distill.layer_ratio", d.layer_ratio, 0, 1, low_open=True)
        teacher_layers = num_layers(artifact_config(d.teacher))
        if teacher_layers is not None:
            wanted = d.num_layers if d.num_layers is not None else round(teacher_layers * d.layer_ratio)
            key = "distill.num_layers" if d.num_layers is not None else "distill.layer_ratio"
            if not min(2, teacher_layers) <= wanted <= teacher_layers:
                raise ConfigError(key, f"the student would have {wanted} layers; the teacher has {teacher_layers}, so 2 to {teacher_layers}")

    def run(self, cfg: DictConfig, stage_dir: str | None = None, input_fingerprints: Sequence[str] = ()) -> dict:
        d = cfg.distill
        stage_dir = stage_dir or cfg.run_dir
        inputs = [*input_fingerprints, *self.input_fingerprints(cfg)]
        # Loaded when a run needs it, not before: a finished stage (or baseline) never reads the teacher.
        classify = cfg.task.name == "classification"
        teacher = functools.cache(lambda: _load_teacher(d, classify))
        prepare = _student_builder(d, teacher, classify)

        baseline = {}
        if d.baseline:
            alone = train(cfg, os.path.join(stage_dir, "baseline"), inputs, "distill-baseline", StageHooks(prepare_model=prepare))
            if alone:  # empty on ranks other than 0, which write nothing
                measures = ("val_loss", "val_accuracy", "val_macro_f1") if classify else ("val_loss", "val_ppl")
                baseline = {f"baseline_{m}": alone[m] for m in measures}

        def module(model, c):
            if classify:
                return ClassificationDistillationModule(
                    model, teacher(), c.optimizer, c.scheduler, c.trainer.max_steps, d.temperature, d.alpha, d.hidden_weight, d.attention_weight
                )
            return DistillationModule(model, teacher(), c.optimizer, c.scheduler, c.trainer.max_steps, d.loss, d.temperature, d.alpha)

        hooks = StageHooks(
            prepare_model=prepare,
            module_factory=module,
            extra_metrics=lambda model, _: {**baseline, "teacher_params": sum(p.numel() for p in teacher().parameters())},
        )
        return train(cfg, stage_dir, inputs, "distill", hooks)


def _load_teacher(d: DictConfig, classify: bool):
    teacher = load_model_dir(os.path.join(d.teacher, artifacts.MODEL)).eval()
    if classify and d.attention_weight > 0:
        teacher.set_attn_implementation("eager")  # fused attention kernels return no attention maps
    return teacher


def _student_builder(d: DictConfig, teacher, classify: bool):
    def prepare(model, datamodule):
        if classify:  # soft targets are distributions over one set of classes, in one order
            if teacher().config.id2label != model.config.id2label:
                raise ConfigError("distill.teacher", f"the teacher's classes {list(teacher().config.id2label.values())} are not the data's {list(model.config.id2label.values())}")
        else:
            try:  # logit distillation compares distributions over one shared vocabulary
                distillation.check_vocab_sizes(teacher().config, model.config)
            except ValueError as err:
                raise ConfigError("distill.student", str(err)) from None
        if d.student == "derive":
            model = distillation.derive_student(teacher(), num_layers=d.num_layers, layer_ratio=None if d.num_layers else d.layer_ratio, intermediate_ratio=d.intermediate_ratio)
        if classify and d.attention_weight > 0:
            model.set_attn_implementation("eager")
        return model

    return prepare


STAGE = DistillStage()
