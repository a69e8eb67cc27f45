"""Labeled text for sequence classification: examples from files (CSV, TSV, JSONL, Parquet), a hub dataset,
or the standard library's own docstrings labeled by their package; label names from the training split;
batches of similar lengths padded only to their longest example, in an order that resumes exactly."""

from __future__ import annotations

import ast
import logging
import os
import sysconfig
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from framework.config import in_range, one_of, positive
from framework.corpus.prepare import is_validation
from framework.data import ResumableBatchSampler
from framework.errors import ConfigError

log = logging.getLogger(__name__)

LABELED_SOURCES = ("stdlib_topics", "labeled_files", "hf_dataset")
FILE_KINDS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Example:
    text: str
    pair: str | None
    label: str
    group: str  # examples of one group stay in one split (a source file; one row of a user's file)


def check_labeled_config(data: DictConfig) -> None:
    """The data section of a classification stage, before anything is read."""
    one_of("data.source", data.source, LABELED_SOURCES)
    positive("data.block_size", data.block_size)
    positive("data.batch_size", data.batch_size)
    in_range("data.val_fraction", data.val_fraction, 0, 1, low_open=True, high_open=True)
    positive("data.num_workers", data.num_workers, allow_zero=True)
    if data.source == "stdlib_topics":
        root = sysconfig.get_paths()["stdlib"]
        if len(data.topics) < 2:
            raise ConfigError("data.topics", "name at least two standard-library packages to tell apart")
        missing = [t for t in data.topics if not os.path.isfile(os.path.join(root, t, "__init__.py"))]
        if missing:
            raise ConfigError("data.topics", f"'{missing[0]}' is not a package of this Python's standard library ({root})")
    if data.source == "labeled_files":
        for key in ("paths", "val_paths"):
            for path in data[key]:
                if not os.path.isfile(path):
                    raise ConfigError(f"data.{key}", f"'{path}' does not exist" if not os.path.exists(path) else f"'{path}' is not a file")
        if not data.paths:
            raise ConfigError("data.paths", "labeled_files needs at least one file")
    if data.source == "hf_dataset" and not data.hf_name:
        raise ConfigError("data.hf_name", "hf_dataset needs a dataset name or local path")


# --- sources -----------------------------------------------------------------------------------------------


def stdlib_topics(topics) -> list[Example]:
    """The first paragraph of every docstring (40+ characters) of the standard library packages in `topics`,
    labeled by package: a topic-classification task that ships with every Python. Duplicates are dropped;
    a source file's docstrings stay in one split, so the model cannot learn a file's phrasing."""
    root = sysconfig.get_paths()["stdlib"]
    examples, seen = [], set()
    for topic in topics:
        package = os.path.join(root, topic)
        for directory, subdirs, files in os.walk(package):
            subdirs[:] = sorted(d for d in subdirs if d not in ("test", "tests", "__pycache__"))
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(directory, name)
                for text in _docstring_paragraphs(path):
                    if text not in seen:
                        seen.add(text)
                        examples.append(Example(text, None, topic, os.path.relpath(path, root)))
    return examples


def _docstring_paragraphs(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    docs = (ast.get_docstring(n) for n in nodes)
    return [p for p in (d.split("\n\n")[0].strip() for d in docs if d) if len(p) >= 40]


def labeled_files(paths, data: DictConfig, key: str) -> list[Example]:
    """Rows of CSV/TSV/JSONL/Parquet files with a text column, an optional second text, and a label."""
    import datasets

    kinds = {FILE_KINDS.get(os.path.splitext(p)[1].lower()) for p in paths}
    if None in kinds or len(kinds) != 1:
        raise ConfigError(key, f"use files of one kind: {', '.join(FILE_KINDS)} (got {', '.join(sorted(os.path.basename(p) for p in paths))})")
    kind = kinds.pop()
    options = {"delimiter": "\t"} if all(p.lower().endswith(".tsv") for p in paths) else {}
    try:
        table = datasets.load_dataset(kind, data_files=list(paths), split="train", **options)
    except Exception as err:  # a file datasets cannot parse: name it, in one line
        raise ConfigError(key, f"cannot read {', '.join(paths)} as {kind}: {str(err).splitlines()[0]}") from None
    return _examples(table, data, key, group_prefix=",".join(sorted(paths)))


def hf_labeled(data: DictConfig, split: str) -> list[Example]:
    import datasets

    table = datasets.load_dataset(data.hf_name, data.hf_config, split=split)
    return _examples(table, data, "data.hf_name", group_prefix=f"{data.hf_name}/{split}")


def _examples(table, data: DictConfig, key: str, group_prefix: str) -> list[Example]:
    columns = table.column_names
    for field in ("text_field", "label_field", "text_pair_field"):
        if data[field] is not None and data[field] not in columns:
            raise ConfigError(f"data.{field}", f"'{data[field]}' is not a column of {key.split('.')[-1]} (columns: {', '.join(columns)})")
    names = table.features[data.label_field].names if hasattr(table.features[data.label_field], "names") else None
    examples = []
    for row, record in enumerate(table):
        text, pair = record[data.text_field], record[data.text_pair_field] if data.text_pair_field else None
        for field, value in (("text_field", text), ("text_pair_field", pair)):
            if field == "text_field" or data.text_pair_field:
                if not isinstance(value, str) or not value.strip():
                    raise ConfigError(f"data.{field}", f"row {row} has an empty {data[field]!r} ({group_prefix})")
        label = record[data.label_field]
        if label is None or (isinstance(label, str) and not label.strip()):
            raise ConfigError("data.label_field", f"row {row} has no {data.label_field!r} ({group_prefix})")
        examples.append(Example(text, pair, names[label] if names else str(label), f"{group_prefix}#{row}"))
    return examples


# --- splits and labels -------------------------------------------------------------------------------------


def load_splits(data: DictConfig) -> tuple[list[Example], list[Example]]:
    """(train, val) examples: from data.val_paths when given, else a split by group hash."""
    if data.source == "stdlib_topics":
        examples = stdlib_topics(data.topics)
    elif data.source == "labeled_files":
        examples = labeled_files(data.paths, data, "data.paths")
    else:
        if data.val_paths:
            return hf_labeled(data, data.hf_split), hf_labeled(data, data.val_paths[0])
        examples = hf_labeled(data, data.hf_split)
    if data.val_paths and data.source == "labeled_files":
        return examples, labeled_files(data.val_paths, data, "data.val_paths")
    train = [e for e in examples if not is_validation(e.group, data.val_fraction, data.seed)]
    val = [e for e in examples if is_validation(e.group, data.val_fraction, data.seed)]
    return train, val


def label_names(train: list[Example], val: list[Example], val_key: str) -> list[str]:
    """The classes, named by the training split (sorted); refuses what training cannot learn."""
    names = sorted({e.label for e in train})
    if len(names) < 2:
        raise ConfigError("data.label_field", f"the training data has {'one class' if names else 'no examples'}{f' ({names[0]!r})' if names else ''}: nothing to classify")
    unseen = sorted({e.label for e in val} - set(names))
    if unseen:
        raise ConfigError(val_key, f"label {unseen[0]!r} appears in validation but never in training (training has {', '.join(names)})")
    return names


def majority_accuracy(train: list[Example], val: list[Example]) -> float:
    """The accuracy of always answering the training split's most frequent class: the floor to beat."""
    labels = [e.label for e in train]
    majority = max(set(labels), key=labels.count)
    return sum(e.label == majority for e in val) / len(val)


# --- batches -----------------------------------------------------------------------------------------------


class BucketedBatchSampler(ResumableBatchSampler):
    """ResumableBatchSampler whose global batches hold examples of similar length, so padding to the longest
    wastes little: each pass's permutation is cut into windows, sorted by length within each, and the
    batches are shuffled again. Still a pure function of (seed, pass): resuming gives the same batches."""

    WINDOW = 32  # global batches per sorting window: big enough to match lengths, small enough to stay random

    def __init__(self, lengths: list[int], batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(len(lengths), batch_size, seed, start, rank, world_size)
        self.lengths = torch.tensor(lengths)

    def _permutation(self, data_pass: int) -> torch.Tensor:
        order = super()._permutation(data_pass)
        windows = [chunk[self.lengths[chunk].argsort(stable=True)] for chunk in order.split(self.global_batch * self.WINDOW)]
        batches = torch.cat(windows)[: self.batches_per_pass * self.global_batch].view(-1, self.global_batch)
        shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(self.seed * 7919 + data_pass))
        return batches[shuffle].flatten()


class LabeledDataModule(pl.LightningDataModule):
    """Tokenized examples (truncated to data.block_size tokens) with their class index."""

    def __init__(self, data: DictConfig, tokenizer, seed: int, labels: list[str] | None = None):
        super().__init__()
        self.cfg, self.tokenizer, self.seed = data, tokenizer, seed
        train, val = load_splits(data)
        val_key = "data.val_paths" if data.val_paths else "data.label_field"
        self.labels = labels or label_names(train, val, val_key)
        if not val:
            raise ConfigError("data.val_fraction", f"no validation example: {len(train)} examples in all; raise data.val_fraction or give data.val_paths")
        if labels is not None:  # a model trained before knows its classes: the data must not have others
            unknown = sorted({e.label for e in (*train, *val)} - set(labels))
            if unknown:
                raise ConfigError("data.label_field", f"label {unknown[0]!r} is not one of the model's classes ({', '.join(labels)})")
        self.majority_accuracy = majority_accuracy(train, val)
        self.train = self._encode(train)
        self.val = self._encode(val)
        log.info("data %s: %d train and %d val examples, %d classes (answering the training split's most frequent "
                 "class scores %.1f%% on val)", data.name, len(train), len(val), len(self.labels), 100 * self.majority_accuracy)

    def _encode(self, examples: list[Example]) -> list[dict]:
        texts = [e.text for e in examples]
        pairs = [e.pair for e in examples] if examples and examples[0].pair is not None else None
        encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.cfg.block_size)
        index = {name: i for i, name in enumerate(self.labels)}
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        return [{**{k: encoded[k][i] for k in keys}, "labels": index[e.label]} for i, e in enumerate(examples)]

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer.pad(features, return_tensors="pt"))  # a plain dict: BatchEncoding is not one

    @property
    def train_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.train)

    def _batches_consumed(self) -> int:
        trainer = self.trainer
        return 0 if trainer is None else trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = BucketedBatchSampler(
            [len(e["input_ids"]) for e in self.train], self.cfg.batch_size, self.seed, start=self._batches_consumed(),
            rank=trainer.global_rank if trainer else 0, world_size=trainer.world_size if trainer else 1,
        )
        return DataLoader(self.train, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        # Sorted by length: fewer pad tokens, and the same batches every time.
        ordered = sorted(self.val, key=lambda e: len(e["input_ids"]))
        return DataLoader(ordered, batch_size=self.cfg.batch_size, collate_fn=self.collate, num_workers=self.cfg.num_workers)

    def calibration_batches(self, num_samples: int, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
        """Train-split examples for calibrating pruning (never the val split), padded per batch."""
        generator = torch.Generator().manual_seed(self.seed)
        chosen = [self.train[i] for i in torch.randperm(len(self.train), generator=generator)[:num_samples].tolist()]
        return [self.collate([{k: v for k, v in e.items() if k != "labels"} for e in chosen[i : i + batch_size]]) for i in range(0, len(chosen), batch_size)]
