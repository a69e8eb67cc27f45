"""Knowledge distillation: losses, vocabulary checks and Minitron-style student derivation.

Pure functions; the training loop (a LightningModule) lives elsewhere.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.initialization import no_init_weights

from framework.compression.pruning import transformer_blocks

LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) over the last dim from log-probabilities; 0·log 0 counts as 0 (no NaN)."""
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def _jsd(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Jensen–Shannon divergence with beta = 0.5, bounded by log 2."""
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)


def _soft_per_token(student: Tensor, teacher: Tensor, kind: str, temperature: float) -> Tensor:
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    if kind == "forward_kl":
        divergence = _kl(log_t, log_s)
    elif kind == "reverse_kl":
        divergence = _kl(log_s, log_t)
    else:
        divergence = _jsd(log_t, log_s)
    # T² keeps the soft gradients' scale independent of T (Hinton et al., 2015).
    return divergence * temperature**2


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    kind: str = "forward_kl",
    temperature: float = 2.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
) -> tuple[Tensor, dict]:
    """alpha * soft divergence + (1 - alpha) * cross-entropy, averaged over labelled tokens.

    Causal-LM convention: logits[:, :-1] predict labels[:, 1:]; positions whose label
    is `ignore_index` count in neither term. The teacher gets no gradient.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"Unknown distillation loss {kind!r}; expected one of {LOSS_KINDS}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"Student vocabulary size {student_logits.shape[-1]} != "
            f"teacher vocabulary size {teacher_logits.shape[-1]}"
        )
    targets = labels[:, 1:]
    keep = targets != ignore_index
    # Float32 so bf16 logits neither overflow nor lose the small probabilities.
    student = student_logits[:, :-1][keep].float()
    teacher = teacher_logits[:, :-1][keep].detach().float()
    targets = targets[keep]
    count = max(targets.numel(), 1)  # an all-ignored batch gives 0, not NaN

    soft = _soft_per_token(student, teacher, kind, temperature).sum() / count
    hard = F.cross_entropy(student, targets, reduction="sum") / count
    loss = alpha * soft + (1 - alpha) * hard
    return loss, {"soft": soft.detach(), "hard": hard.detach()}


def check_same_vocabulary(teacher_tokenizer, student_tokenizer) -> None:
    """Raise ValueError unless both tokenizers map the same tokens to the same ids."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab == student_vocab:
        return
    tokens = teacher_vocab.keys() | student_vocab.keys()
    differing = {t for t in tokens if teacher_vocab.get(t) != student_vocab.get(t)}
    examples = sorted(differing)[:3]
    raise ValueError(
        f"Teacher and student tokenizers differ (teacher {len(teacher_vocab)} tokens, student "
        f"{len(student_vocab)} tokens, {len(differing)} tokens differ, e.g. {examples}); "
        "logit distillation needs the same vocabulary"
    )


def check_vocab_sizes(teacher_config, student_config) -> None:
    """Raise ValueError when the two model configs have different vocabulary sizes."""
    if teacher_config.vocab_size != student_config.vocab_size:
        raise ValueError(
            f"Teacher vocab_size {teacher_config.vocab_size} != "
            f"student vocab_size {student_config.vocab_size}"
        )


def _kept_layers(num_teacher: int, num_layers: int | None, layer_ratio: float | None) -> list[int]:
    """`num_layers` indices evenly spaced over the teacher's, first and last included."""
    if num_layers is None:
        num_layers = num_teacher if layer_ratio is None else round(num_teacher * layer_ratio)
    if not min(2, num_teacher) <= num_layers <= num_teacher:
        raise ValueError(
            f"Student needs between {min(2, num_teacher)} and {num_teacher} layers, got {num_layers}"
        )
    if num_layers == 1:
        return [0]
    step = (num_teacher - 1) / (num_layers - 1)  # >= 1, so the rounded indices are distinct
    return [round(i * step) for i in range(num_layers)]


def _mlp_channels(mlp: nn.Module, width: int) -> Tensor:
    """Indices (ascending) of the `width` MLP channels with the largest weight-based importance."""
    with torch.no_grad():
        importance = (
            mlp.down_proj.weight.float().norm(dim=0)
            * mlp.up_proj.weight.float().norm(dim=1)
            * mlp.gate_proj.weight.float().norm(dim=1)
        )
    return importance.topk(width).indices.sort().values


def _student_state(teacher: nn.Module, prefix: str, blocks: nn.ModuleList, kept: list[int], width: int | None) -> dict[str, Tensor]:
    """Teacher weights renamed to the student's layer numbering; gated MLPs sliced to `width` when given."""
    state = {name: tensor for name, tensor in teacher.state_dict().items() if not name.startswith(prefix + ".")}
    for new_index, old_index in enumerate(kept):
        layer = blocks[old_index]
        channels = _mlp_channels(layer.mlp, width) if width is not None else None
        for name, tensor in layer.state_dict().items():
            if channels is not None and name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                tensor = tensor[channels]
            elif channels is not None and name == "mlp.down_proj.weight":
                tensor = tensor[:, channels]
            state[f"{prefix}.{new_index}.{name}"] = tensor
    return state


def derive_student(
    teacher: nn.Module,
    num_layers: int | None = None,
    layer_ratio: float | None = None,
    intermediate_ratio: float = 1.0,
) -> nn.Module:
    """A smaller model of the teacher's class initialised from it (Minitron-style depth and MLP-width pruning).

    Keeps `num_layers` (or `layer_ratio` of the) transformer blocks, evenly spaced with the first and last
    always kept (every other one for half the depth), and, for gated MLPs (the Llama family), the
    `intermediate_ratio` most important MLP channels. Works for causal LMs and for sequence classifiers
    (BERT-style encoders, Llama with a classification head): heads and embeddings are copied as they are.
    """
    prefix, blocks = transformer_blocks(teacher)
    config = copy.deepcopy(teacher.config)
    kept = _kept_layers(len(blocks), num_layers, layer_ratio)
    width = None
    if intermediate_ratio != 1.0:
        if not hasattr(blocks[0], "mlp") or not hasattr(blocks[0].mlp, "gate_proj"):
            raise ValueError("intermediate_ratio below 1 needs a gated MLP (the Llama family); keep it at 1 for this model")
        if not 0 < intermediate_ratio <= 1:
            raise ValueError(f"intermediate_ratio must be in (0, 1], got {intermediate_ratio}")
        width = max(1, round(config.intermediate_size * intermediate_ratio))
        config.intermediate_size = width
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]

    with no_init_weights():  # every weight is overwritten from the teacher
        # A fresh model numbers its attention modules' layer_idx 0..n-1 (KV cache slots).
        student = type(teacher)(config)
    student.tie_weights()  # normally done by the init that no_init_weights skipped
    student.load_state_dict(_student_state(teacher, prefix, blocks, kept, width))
    student.kept_layers = kept  # which teacher layer each student layer started from (layer-to-layer transfer)
    return student.to(teacher.dtype)


# --- sequence classifiers ---------------------------------------------------------------------------------------


def classification_distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 2.0, alpha: float = 0.5
) -> tuple[Tensor, dict]:
    """alpha * T² · KL(teacher ‖ student) at temperature T + (1 - alpha) * cross-entropy on the labels.

    Logits are [batch, classes]; T² keeps the soft gradients' scale independent of T (Hinton et al., 2015).
    """
    student = student_logits.float()
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    soft = _kl(log_t, log_s).mean() * temperature**2
    hard = F.cross_entropy(student, labels)
    return alpha * soft + (1 - alpha) * hard, {"soft": soft.detach(), "hard": hard.detach()}


def layer_map(kept: list[int]) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices to match: the embeddings' output, then each student layer's
    output against the output of the teacher layer it was cut from (TinyBERT's uniform mapping)."""
    return [(0, 0), *((i + 1, k + 1) for i, k in enumerate(kept))]


def hidden_state_loss(student_hidden, teacher_hidden, projection: nn.Module, pairs: list[tuple[int, int]], mask: Tensor | None) -> Tensor:
    """TinyBERT's hidden-state transfer: MSE between each matched pair, the student's states mapped to the
    teacher's width by a learned `projection` (identity when the widths are equal), padding masked out."""
    total = student_hidden[0].new_zeros(())
    for s, t in pairs:
        diff = (projection(student_hidden[s].float()) - teacher_hidden[t].detach().float()).pow(2).mean(-1)
        total = total + (diff * mask).sum() / mask.sum() if mask is not None else total + diff.mean()
    return total / len(pairs)


def attention_map_loss(student_attentions, teacher_attentions, pairs: list[tuple[int, int]], mask: Tensor | None) -> Tensor:
    """TinyBERT's attention transfer: MSE between the attention maps of matched layers (averaged over heads,
    so a student with fewer heads can learn too), padded query rows masked out. Layer indices are 1-based,
    as in `layer_map` (0, the embeddings, has no attention)."""
    total = student_attentions[0].new_zeros(())
    pairs = [(s, t) for s, t in pairs if s > 0]
    for s, t in pairs:
        student = student_attentions[s - 1].float().mean(1)  # [batch, query, key]
        teacher = teacher_attentions[t - 1].detach().float().mean(1)
        diff = (student - teacher).pow(2).sum(-1)  # per query row
        total = total + ((diff * mask).sum() / mask.sum() if mask is not None else diff.mean())
    return total / max(len(pairs), 1)
