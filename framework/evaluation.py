"""Measurements of a model: validation loss and perplexity, parameters, size on disk, latency."""

from __future__ import annotations

import math
import os
import time

import torch

from framework.models import count_parameters


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained model's ppl is only "huge"


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over all predicted tokens of the blocks."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in blocks.split(batch_size):
        loss = model(input_ids=batch, labels=batch).loss
        count = batch[:, 1:].numel()
        total += loss.float().item() * count
        tokens += count
    return total / tokens


@torch.no_grad()
def measure_latency(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = 8, repeats: int = 2) -> dict:
    """Greedy generation latency (ms per new token) and forward throughput (tokens/s) of one prompt."""
    model.eval()
    prompt = prompt[:1]
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    generate_s = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        model(input_ids=prompt)
    forward_s = (time.perf_counter() - start) / repeats
    return {"latency_ms_per_token": 1000 * generate_s / new_tokens, "tokens_per_s": prompt.numel() / forward_s}


def model_metrics(model: torch.nn.Module, val_blocks: torch.Tensor, batch_size: int = 8, latency: bool = True) -> dict:
    """The model half of metrics.json (size_bytes is added when the artifact is written)."""
    val_loss = evaluate_loss(model, val_blocks, batch_size)
    total, nonzero = count_parameters(model)
    metrics = {
        "val_loss": val_loss,
        "val_ppl": perplexity(val_loss),
        "params_total": total,
        "params_nonzero": nonzero,
        "sparsity": 1 - nonzero / total,
    }
    if latency:
        metrics.update(measure_latency(model, val_blocks[:1]))
    return metrics


# --- sequence classification -----------------------------------------------------------------------------------


def classification_scores(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 and Matthews correlation of predictions against labels (torchmetrics)."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score, multiclass_matthews_corrcoef

    predictions = logits.argmax(-1)
    return {
        "accuracy": float(multiclass_accuracy(predictions, labels, num_classes, average="micro")),
        "macro_f1": float(multiclass_f1_score(predictions, labels, num_classes, average="macro")),
        "mcc": float(multiclass_matthews_corrcoef(predictions, labels, num_classes)),
    }


@torch.no_grad()
def predict(model: torch.nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a classifier over batches of tokenized examples with their labels."""
    model.eval()
    logits, labels = [], []
    for batch in batches:
        labels.append(batch["labels"])
        logits.append(model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float())
    return torch.cat(logits), torch.cat(labels)


@torch.no_grad()
def latency_per_example(model: torch.nn.Module, examples: list[dict]) -> float:
    """Median milliseconds to classify one example at batch 1 (torch eager), over the examples, after a warm-up
    (the median resists the bursts of load of a shared machine)."""
    model.eval()
    inputs = [{k: torch.tensor([v]) for k, v in e.items() if k != "labels"} for e in examples]
    model(**inputs[0])
    times = []
    for one in inputs:
        start = time.perf_counter()
        model(**one)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def classification_metrics(model: torch.nn.Module, datamodule, latency: bool = True) -> dict:
    """The model half of a classifier's metrics.json: loss, accuracy, macro-F1, MCC, the confusion matrix
    (rows: true class, columns: predicted), parameters, and CPU latency per example."""
    logits, labels = predict(model, datamodule.val_dataloader())
    num_classes = model.config.num_labels
    scores = classification_scores(logits, labels, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, logits.argmax(-1)), torch.ones_like(labels), accumulate=True)
    total, nonzero = count_parameters(model)
    metrics = {
        "val_loss": float(torch.nn.functional.cross_entropy(logits, labels)),
        **{f"val_{name}": value for name, value in scores.items()},
        "val_examples": len(labels),
        "majority_accuracy": datamodule.majority_accuracy,
        "labels": list(datamodule.labels),
        "confusion_matrix": confusion.tolist(),
        "params_total": total,
        "params_nonzero": nonzero,
        "sparsity": 1 - nonzero / total,
    }
    if latency:
        metrics["latency_ms_per_example"] = latency_per_example(model, datamodule.val[:12])
    return metrics


def plot_confusion(path: str, matrix: list[list[int]], labels: list[str]) -> None:
    """The confusion matrix as a PNG (rows: true class, columns: predicted), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (val)")
    top = max(max(r) for r in matrix) or 1
    for i, r in enumerate(matrix):
        for j, count in enumerate(r):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black", fontsize=8)
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
