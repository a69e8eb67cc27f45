"""What depends on the task (causal_lm or classification): the model, tokenizer and data a stage starts
from, the LightningModule that trains it, and the numbers that measure it. The train loop asks the task
and stays the same for both."""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from framework.data import LMDataModule, training_texts
from framework.evaluation import (
    classification_metrics, classification_scores, evaluate_loss, model_metrics, perplexity, plot_confusion, predict,
)
from framework.labeled import LabeledDataModule
from framework.models import build_classifier, build_model_and_tokenizer, classifier_tokenizer, model_labels
from framework.training.classification import ClassificationModule
from framework.training.modules import CausalLMModule


class CausalLMTask:
    name = "causal_lm"
    measure = "val_ppl"  # the headline number: perplexity on the val split, lower is better

    def build(self, cfg: DictConfig):
        model, tokenizer = build_model_and_tokenizer(cfg.model, cfg.paths.cache_dir, corpus=training_texts(cfg.data))
        return model, tokenizer, LMDataModule(cfg.data, tokenizer, cfg.paths.cache_dir, cfg.seed)

    def module(self, model, cfg: DictConfig):
        return CausalLMModule(model, cfg.optimizer, cfg.scheduler, cfg.trainer.max_steps)

    def start(self, model, datamodule, cfg: DictConfig) -> dict:
        loss = evaluate_loss(model, evaluation_blocks(cfg, datamodule), cfg.data.batch_size)
        return {"val_loss_start": loss, "val_ppl_start": perplexity(loss)}

    def evaluate(self, model, datamodule, cfg: DictConfig) -> dict:
        metrics = model_metrics(model, evaluation_blocks(cfg, datamodule), cfg.data.batch_size, datamodule.tokenizer)
        return {**metrics, "eval_data": (cfg.get("eval_data") or cfg.data).name}

    def after_artifact(self, stage_dir: str, metrics: dict) -> None:
        pass


class ClassificationTask:
    name = "classification"
    measure = "val_accuracy"

    def build(self, cfg: DictConfig):
        tokenizer = classifier_tokenizer(cfg.model, cfg.paths.cache_dir)
        # A classifier made by an earlier stage knows its classes; otherwise the training data names them.
        datamodule = LabeledDataModule(cfg.data, tokenizer, cfg.seed, labels=model_labels(cfg.model))
        return build_classifier(cfg.model, cfg.paths.cache_dir, datamodule.labels, tokenizer), tokenizer, datamodule

    def module(self, model, cfg: DictConfig):
        return ClassificationModule(model, cfg.optimizer, cfg.scheduler, cfg.trainer.max_steps)

    def start(self, model, datamodule, cfg: DictConfig) -> dict:
        logits, labels = predict(model, datamodule.val_dataloader())
        return {
            "val_loss_start": float(torch.nn.functional.cross_entropy(logits, labels)),
            "val_accuracy_start": classification_scores(logits, labels, model.config.num_labels)["accuracy"],
        }

    def evaluate(self, model, datamodule, cfg: DictConfig) -> dict:
        return classification_metrics(model, datamodule)

    def after_artifact(self, stage_dir: str, metrics: dict) -> None:
        plot_confusion(os.path.join(stage_dir, "confusion.png"), metrics["confusion_matrix"], metrics["labels"])


def evaluation_blocks(cfg: DictConfig, datamodule: LMDataModule):
    """The held-out blocks a language model's final metrics are measured on: the val split of `eval_data` (a
    pipeline's evaluation set, the same for every stage) or, without it, of the stage's own data."""
    if cfg.get("eval_data") is None:
        return datamodule.val_blocks()
    return LMDataModule(cfg.eval_data, datamodule.tokenizer, cfg.paths.cache_dir, cfg.seed).val_blocks()


TASKS = {task.name: task for task in (CausalLMTask(), ClassificationTask())}
