"""LightningModules: causal-LM training (pretrain and finetune)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig


def build_optimizer(params, cfg: DictConfig) -> torch.optim.Optimizer:
    # Biases and norm weights (1-D) are not decayed, as in GPT-2/Llama training.
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum)
    raise ValueError(f"optimizer.name: unknown optimizer '{cfg.name}'")


def lr_lambda(cfg: DictConfig, max_steps: int):
    """Multiplier of the base lr at each step: linear warmup, then cosine, linear or constant."""
    warmup = min(cfg.warmup_steps, max_steps)
    floor = getattr(cfg, "min_lr_ratio", 0.0)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if cfg.name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return multiplier


class CausalLMModule(pl.LightningModule):
    """Next-token prediction on packed blocks. The HF model lives at `self.model`."""

    def __init__(self, model: torch.nn.Module, optimizer_cfg: DictConfig, scheduler_cfg: DictConfig, max_steps: int):
        super().__init__()
        self.model = model
        self.optimizer_cfg, self.scheduler_cfg, self.max_steps = optimizer_cfg, scheduler_cfg, max_steps
        self._val_loss_sum = self._val_tokens = 0.0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def configure_model(self):
        """Under strategy=model_parallel: shard each decoder layer, then the rest, over the data-parallel mesh (FSDP2)."""
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        blocks = set(getattr(self.model, "_no_split_modules", None) or ())
        for module in self.model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        # Averaged over ranks: the logged loss is the global batch's, whatever the number of processes.
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_validation_epoch_start(self):
        self._val_loss_sum = self._val_tokens = 0.0

    def validation_step(self, batch, batch_idx):
        input_ids = batch["input_ids"]
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        tokens = input_ids[:, 1:].numel()
        self._val_loss_sum += loss.float() * tokens
        self._val_tokens += tokens

    def on_validation_epoch_end(self):
        val_loss = self._val_loss_sum / max(self._val_tokens, 1)
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(torch.as_tensor(val_loss)), sync_dist=True)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.parameters(), self.optimizer_cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.scheduler_cfg, self.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class DistillationModule(CausalLMModule):
    """A trainable student (`self.model`) learning from a frozen teacher's logits and the hard labels.

    The teacher is kept out of the module's state: it is not trained, not checkpointed (it is
    reloaded from its artifact on resume) and runs in eval mode without gradients.
    """

    def __init__(self, student, teacher, optimizer_cfg, scheduler_cfg, max_steps: int, loss: str, temperature: float, alpha: float):
        super().__init__(student, optimizer_cfg, scheduler_cfg, max_steps)
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        self.loss_kind, self.temperature, self.alpha = loss, temperature, alpha

    def on_fit_start(self):
        self.teacher.to(self.device)

    def training_step(self, batch, batch_idx):
        from framework.compression.distillation import distillation_loss

        input_ids = batch["input_ids"]
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids).logits
        student_logits = self.model(input_ids=input_ids).logits
        loss, parts = distillation_loss(student_logits, teacher_logits, input_ids, self.loss_kind, self.temperature, self.alpha)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/soft_loss": parts["soft"], "train/hard_loss": parts["hard"]})
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss
