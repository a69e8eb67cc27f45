"""LightningModules for sequence classification: finetuning on labels, and distillation from a teacher
classifier (soft targets with temperature, and optionally TinyBERT's hidden-state and attention transfer)."""

from __future__ import annotations

import torch
from torch import nn

from framework.compression.distillation import attention_map_loss, classification_distillation_loss, hidden_state_loss, layer_map
from framework.evaluation import classification_scores
from framework.training.modules import StageModule


class ClassificationModule(StageModule):
    """Cross-entropy on the labels; every validation logs loss, accuracy, macro-F1 and MCC."""

    def __init__(self, model, optimizer_cfg, scheduler_cfg, max_steps: int):
        super().__init__(model, optimizer_cfg, scheduler_cfg, max_steps)
        self._logits, self._labels = [], []

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_validation_epoch_start(self):
        self._logits, self._labels = [], []

    def validation_step(self, batch, batch_idx):
        self._logits.append(self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float())
        self._labels.append(batch["labels"])

    def on_validation_epoch_end(self):
        logits, labels = torch.cat(self._logits), torch.cat(self._labels)
        scores = classification_scores(logits, labels, self.model.config.num_labels)
        self.log("val/loss", nn.functional.cross_entropy(logits, labels), prog_bar=True, sync_dist=True)
        self.log_dict({f"val/{name}": value for name, value in scores.items()}, sync_dist=True)
        self.log("val/accuracy_bar", scores["accuracy"], prog_bar=True, logger=False)


class ClassificationDistillationModule(ClassificationModule):
    """A student classifier learning from a frozen teacher classifier.

    The loss is alpha * T² KL(teacher ‖ student) + (1 - alpha) * cross-entropy, plus, when their weights are
    above zero, TinyBERT's transfers: hidden states (through a learned projection when the widths differ)
    and attention maps, student layer i against the teacher layer it was cut from (evenly spaced layers
    for a student built from the `model` group). The teacher is not trained or checkpointed (it is
    reloaded from its artifact on resume); the projection is trained with the student.
    """

    def __init__(self, student, teacher, optimizer_cfg, scheduler_cfg, max_steps: int, temperature: float, alpha: float,
                 hidden_weight: float = 0.0, attention_weight: float = 0.0):
        super().__init__(student, optimizer_cfg, scheduler_cfg, max_steps)
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        self.temperature, self.alpha = temperature, alpha
        self.hidden_weight, self.attention_weight = hidden_weight, attention_weight
        s_width, t_width = student.config.hidden_size, teacher.config.hidden_size
        self.projection = nn.Identity() if s_width == t_width else nn.Linear(s_width, t_width)
        kept = getattr(student, "kept_layers", None) or _evenly_spaced(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        self.pairs = layer_map(kept)

    def on_fit_start(self):
        self.teacher.to(self.device)

    def training_step(self, batch, batch_idx):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        transfer = self.hidden_weight > 0 or self.attention_weight > 0
        options = {"output_hidden_states": self.hidden_weight > 0, "output_attentions": self.attention_weight > 0} if transfer else {}
        with torch.no_grad():
            teacher = self.teacher(**inputs, **options)
        student = self.model(**inputs, **options)
        loss, parts = classification_distillation_loss(student.logits, teacher.logits, batch["labels"], self.temperature, self.alpha)
        mask = inputs.get("attention_mask")
        mask = mask.float() if mask is not None else None
        if self.hidden_weight > 0:
            parts["hidden"] = hidden_state_loss(student.hidden_states, teacher.hidden_states, self.projection, self.pairs, mask)
            loss = loss + self.hidden_weight * parts["hidden"]
        if self.attention_weight > 0:
            parts["attention"] = attention_map_loss(student.attentions, teacher.attentions, self.pairs, mask)
            loss = loss + self.attention_weight * parts["attention"]
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{name}_loss": value.detach() for name, value in parts.items()})
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss


def _evenly_spaced(student_layers: int, teacher_layers: int) -> list[int]:
    step = (teacher_layers - 1) / max(student_layers - 1, 1)
    return [round(i * step) for i in range(student_layers)]
