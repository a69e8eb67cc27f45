"""LightningModules (causal-LM training, distillation), the optimizer and schedule they use, and the checks
of the optimizer, scheduler, trainer and finetune sections."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from framework.config import finite, in_range, one_of, positive
from framework.errors import ConfigError

OPTIMIZERS = {
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps),
    "adam": lambda groups, c: torch.optim.Adam(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps),
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0),
    "rmsprop": lambda groups, c: torch.optim.RMSprop(groups, lr=c.lr, alpha=c.alpha, eps=c.eps, momentum=c.momentum),
}
SCHEDULERS = ("cosine", "linear", "constant")
FINETUNE_METHODS = ("full", "lora")


def check_training_config(cfg: DictConfig) -> None:
    """The optimizer, scheduler, trainer and finetune sections: names, ranges, finiteness."""
    opt = cfg.optimizer
    one_of("optimizer.name", opt.name, OPTIMIZERS)
    positive("optimizer.lr", opt.lr)
    positive("optimizer.weight_decay", opt.weight_decay, allow_zero=True)
    positive("optimizer.eps", opt.eps)
    in_range("optimizer.momentum", opt.momentum, 0, 1, high_open=True)
    in_range("optimizer.alpha", opt.alpha, 0, 1, low_open=True, high_open=True)
    if len(opt.betas) != 2:
        raise ConfigError("optimizer.betas", f"must be two numbers [beta1, beta2], got {list(opt.betas)}")
    for i, beta in enumerate(opt.betas):
        in_range(f"optimizer.betas[{i}]", beta, 0, 1, high_open=True)
    sched = cfg.scheduler
    one_of("scheduler.name", sched.name, SCHEDULERS)
    positive("scheduler.warmup_steps", sched.warmup_steps, allow_zero=True)
    in_range("scheduler.min_lr_ratio", sched.min_lr_ratio, 0, 1)
    t = cfg.trainer
    positive("trainer.max_steps", t.max_steps, allow_zero=True)  # 0: evaluate and save only
    for key in ("val_check_interval", "accumulate_grad_batches", "checkpoint_every_n_steps", "log_every_n_steps", "num_nodes"):
        positive(f"trainer.{key}", t[key])
    if t.gradient_clip_val is not None:
        positive("trainer.gradient_clip_val", t.gradient_clip_val)
    if t.limit_val_batches is not None:
        positive("trainer.limit_val_batches", t.limit_val_batches)
    if t.peak_flops is not None:
        positive("trainer.peak_flops", t.peak_flops)
    if t.devices not in ("auto", -1) and not (isinstance(t.devices, int) and not isinstance(t.devices, bool) and t.devices >= 1):
        raise ConfigError("trainer.devices", f"must be a count >= 1, -1 or auto, got {t.devices}")
    ft = cfg.finetune
    one_of("finetune.method", ft.method, FINETUNE_METHODS)
    if ft.method == "lora":
        positive("finetune.r", ft.r)
        positive("finetune.alpha", ft.alpha)
        in_range("finetune.dropout", ft.dropout, 0, 1, high_open=True)
    finite("seed", cfg.seed)


def build_optimizer(params, cfg: DictConfig) -> torch.optim.Optimizer:
    # Biases and norm weights (1-D) are not decayed, as in GPT-2/Llama training.
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return OPTIMIZERS[cfg.name](groups, cfg)


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


class StageModule(pl.LightningModule):
    """What every stage's LightningModule shares: the HF model at `self.model`, its optimizer and schedule,
    and FSDP2 sharding under strategy=model_parallel. Subclasses say what a step computes."""

    def __init__(self, model: torch.nn.Module, optimizer_cfg: DictConfig, scheduler_cfg: DictConfig, max_steps: int):
        super().__init__()
        self.model = model
        self.optimizer_cfg, self.scheduler_cfg, self.max_steps = optimizer_cfg, scheduler_cfg, max_steps

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

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's FSDP precision plugin refuses clipping by norm; FSDP's own clip_grad_norm_ takes the norm
        # over every rank's shards, which is the norm of the whole model's gradient.
        wrapped = self.trainer.strategy.model
        if gradient_clip_val and hasattr(wrapped, "clip_grad_norm_"):
            wrapped.clip_grad_norm_(gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.parameters(), self.optimizer_cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.scheduler_cfg, self.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CausalLMModule(StageModule):
    """Next-token prediction on packed blocks."""

    def __init__(self, model: torch.nn.Module, optimizer_cfg: DictConfig, scheduler_cfg: DictConfig, max_steps: int):
        super().__init__(model, optimizer_cfg, scheduler_cfg, max_steps)
        self._val_loss_sum = self._val_tokens = 0.0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

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
