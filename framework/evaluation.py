"""Measurements of a model in the runtime that runs it (framework.runtimes): held-out loss and perplexity,
parameters, one short generated sample, and speed as serving engineers measure it: the prefill latency
of a stated prompt length, and decode tokens/s at batch 1 and at batch 8, each the median of repeats
after a warm-up, with the runtime named."""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

from framework.models import count_parameters
from framework.runtimes import TorchRuntime, generate_ids

PROMPT_TOKENS = 128  # the prefill's prompt (at most the evaluation blocks' length)
NEW_TOKENS = 8  # decode steps per timed repeat
REPEATS = 3
BATCH_SIZES = (1, 8)
# One thread, for torch and onnxruntime alike: on a shared machine a second thread waiting for a busy core
# made a small model's decode 50x slower; one thread per model is the figure that repeats.
SPEED_THREADS = 1
SAMPLE_PROMPT = "In Python, a list"
SAMPLE_TOKENS = 24


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained model's ppl is only "huge"


def as_runtime(model):
    """A runtime as is; an nn.Module in torch eager."""
    return TorchRuntime(model) if isinstance(model, torch.nn.Module) else model


def evaluate_loss(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over all predicted tokens of the blocks (a model or a runtime)."""
    runtime = as_runtime(model)
    total, tokens = 0.0, 0
    for batch in blocks.split(batch_size):
        logits = runtime.logits(batch)
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        tokens += batch[:, 1:].numel()
    return total / tokens


def measure_speed(runtime, prompt: torch.Tensor, new_tokens: int = NEW_TOKENS, repeats: int = REPEATS, batch_sizes=BATCH_SIZES) -> dict:
    """Prefill latency of `prompt` (1-D token ids) at batch 1, and decode tokens/s (all sequences together)
    at each batch size after that prompt: each the median of `repeats` timings after one warm-up. Torch
    runs on SPEED_THREADS threads for the duration; open an onnxruntime runtime with as many."""
    threads = torch.get_num_threads()
    torch.set_num_threads(SPEED_THREADS)
    try:
        return {**_timings(runtime, prompt[None], new_tokens, repeats, batch_sizes), "threads": SPEED_THREADS}
    finally:
        torch.set_num_threads(threads)


def _timings(runtime, prompt: torch.Tensor, new_tokens: int, repeats: int, batch_sizes) -> dict:
    runtime.prefill(prompt)  # warm-up
    prefill_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        runtime.prefill(prompt)
        prefill_s.append(time.perf_counter() - start)
    metrics = {"runtime": runtime.name, "prefill_tokens": prompt.shape[1], "prefill_ms": 1000 * statistics.median(prefill_s), "decode_new_tokens": new_tokens}
    for batch in batch_sizes:
        logits, cache = runtime.prefill(prompt.expand(batch, -1))
        logits, cache = runtime.decode(logits.argmax(-1), cache)  # warm-up step
        rates = []
        for _ in range(repeats):  # one cache throughout: each repeat decodes the next `new_tokens` steps
            start = time.perf_counter()
            for _ in range(new_tokens):
                logits, cache = runtime.decode(logits.argmax(-1), cache)
            rates.append(batch * new_tokens / (time.perf_counter() - start))
        metrics[f"decode_tokens_per_s_b{batch}"] = statistics.median(rates)
    return metrics


def sample_text(runtime, tokenizer, prompt: str = SAMPLE_PROMPT, new_tokens: int = SAMPLE_TOKENS) -> str:
    """The prompt and its greedy continuation, to eyeball what a model has become."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    generated = []
    for token in generate_ids(runtime, ids, new_tokens):
        if token.item() == tokenizer.eos_token_id:
            break
        generated.append(token.item())
    return tokenizer.decode([*ids[0].tolist(), *generated], skip_special_tokens=True)


def model_metrics(model, val_blocks: torch.Tensor, batch_size: int = 8, tokenizer=None, speed: bool = True) -> dict:
    """The model half of metrics.json (size_bytes is added when the artifact is written), for a torch model
    or a runtime; parameters are counted where there is a torch model to count."""
    runtime = as_runtime(model)
    val_loss = evaluate_loss(runtime, val_blocks, batch_size)
    metrics = {"val_loss": val_loss, "val_ppl": perplexity(val_loss), "eval_blocks": len(val_blocks), "eval_block_tokens": val_blocks.shape[1]}
    if getattr(runtime, "model", None) is not None:
        total, nonzero = count_parameters(runtime.model)
        metrics.update(params_total=total, params_nonzero=nonzero, sparsity=1 - nonzero / total)
    if speed:
        metrics.update(measure_speed(runtime, val_blocks[0, :PROMPT_TOKENS]))
    if tokenizer is not None:
        metrics["sample"] = sample_text(runtime, tokenizer)
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
def latency_per_example(model, examples: list[dict]) -> float:
    """Median milliseconds to classify one example at batch 1, over the examples, after a warm-up, on
    SPEED_THREADS threads as every speed figure here (the median resists the bursts of a shared machine)."""
    model.eval()
    inputs = [{k: torch.tensor([v]) for k, v in e.items() if k != "labels"} for e in examples]
    threads = torch.get_num_threads()
    torch.set_num_threads(SPEED_THREADS)
    try:
        model(**inputs[0])
        times = []
        for one in inputs:
            start = time.perf_counter()
            model(**one)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 1000 * statistics.median(times)


def classification_metrics(model, datamodule, latency: bool = True) -> dict:
    """The model half of a classifier's metrics.json: loss, accuracy, macro-F1, MCC, the confusion matrix
    (rows: true class, columns: predicted), parameters, and CPU latency per example. `model`: a transformers
    classifier, or a runtime called like one (framework.runtimes.OrtClassifier)."""
    logits, labels = predict(model, datamodule.val_dataloader())
    num_classes = model.config.num_labels
    scores = classification_scores(logits, labels, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, logits.argmax(-1)), torch.ones_like(labels), accumulate=True)
    metrics = {
        "runtime": getattr(model, "name", "torch eager"),
        "val_loss": float(torch.nn.functional.cross_entropy(logits, labels)),
        **{f"val_{name}": value for name, value in scores.items()},
        "val_examples": len(labels),
        "majority_accuracy": datamodule.majority_accuracy,
        "labels": list(datamodule.labels),
        "confusion_matrix": confusion.tolist(),
    }
    if isinstance(model, torch.nn.Module):  # a runtime (onnxruntime) does not expose its parameters
        total, nonzero = count_parameters(model)
        metrics.update(params_total=total, params_nonzero=nonzero, sparsity=1 - nonzero / total)
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
