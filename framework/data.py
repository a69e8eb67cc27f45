"""Text corpora → tokenized, packed fixed-length blocks, split deterministically, cached between runs."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sysconfig
from typing import Iterator

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler

from framework.artifacts import atomic_directory
from framework.config import in_range, one_of, positive, short_hash
from framework.errors import ConfigError

DATA_SOURCES = ("stdlib_docs", "stdlib_modules", "text_files", "hf_dataset")

log = logging.getLogger(__name__)


def check_data_config(data: DictConfig) -> None:
    """The data section before anything is read: sizes, fractions, and that named files exist."""
    one_of("data.source", data.source, DATA_SOURCES)
    positive("data.block_size", data.block_size)
    positive("data.batch_size", data.batch_size)
    in_range("data.val_fraction", data.val_fraction, 0, 1, low_open=True, high_open=True)
    positive("data.num_workers", data.num_workers, allow_zero=True)
    for key in ("max_chars", "max_val_blocks"):
        if data[key] is not None:
            positive(f"data.{key}", data[key])
    if data.source == "text_files":
        if not data.paths:
            raise ConfigError("data.paths", "text_files needs at least one file")
        for path in data.paths:
            if not os.path.exists(path):
                raise ConfigError("data.paths", f"'{path}' does not exist")
    if data.source == "hf_dataset" and not data.hf_name:
        raise ConfigError("data.hf_name", "hf_dataset needs a dataset name or local path")


# --- corpora: each returns a sorted list of (document id, text) ---------------------------------------------


def stdlib_docs() -> list[tuple[str, str]]:
    """The Python documentation's topic pages (pydoc_data.topics), shipped with every Python."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def stdlib_modules(max_chars: int | None = None) -> list[tuple[str, str]]:
    """The docstrings of the standard library's modules, read with `ast` (nothing is imported)."""
    root = sysconfig.get_paths()["stdlib"]
    documents, total = [], 0
    for path in sorted(_stdlib_sources(root)):
        text = _docstrings(path)
        if len(text) < 200:
            continue
        documents.append((os.path.relpath(path, root), text))
        total += len(text)
        if max_chars and total >= max_chars:
            break
    return documents


def _stdlib_sources(root: str) -> Iterator[str]:
    skip = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in skip and not d.startswith("."))
        yield from (os.path.join(directory, f) for f in files if f.endswith(".py"))


def _docstrings(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    docs = (ast.get_docstring(n) for n in nodes)
    return "\n\n".join(d for d in docs if d and len(d) > 40)


def load_documents(data_cfg: DictConfig) -> list[tuple[str, str]]:
    if data_cfg.source == "stdlib_docs":
        documents = stdlib_docs()
    elif data_cfg.source == "stdlib_modules":
        documents = stdlib_modules(data_cfg.max_chars)
    else:
        documents = _load_with_datasets(data_cfg)
    if data_cfg.max_chars:
        documents = _cap_chars(documents, data_cfg.max_chars)
    return documents


def _cap_chars(documents: list[tuple[str, str]], max_chars: int) -> list[tuple[str, str]]:
    kept, total = [], 0
    for doc_id, text in documents:
        if total >= max_chars:
            break
        kept.append((doc_id, text[: max_chars - total]))
        total += len(kept[-1][1])
    return kept


def _load_with_datasets(data_cfg: DictConfig) -> list[tuple[str, str]]:
    import datasets

    if data_cfg.source == "text_files":
        kind = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
        extensions = {os.path.splitext(p)[1] for p in data_cfg.paths}
        unknown = extensions - set(kind)
        if unknown or len({kind[e] for e in extensions}) != 1:
            raise ConfigError("data.paths", f"use files of one kind: .txt, .jsonl or .parquet (got {sorted(extensions)})")
        builder = kind[extensions.pop()]
        # One document per file for text files, so the split never cuts a file in two.
        options = {"sample_by": "document"} if builder == "text" else {}
        dataset = datasets.load_dataset(builder, data_files=list(data_cfg.paths), split="train", **options)
    else:
        dataset = datasets.load_dataset(data_cfg.hf_name, data_cfg.hf_config, split=data_cfg.hf_split)
    if data_cfg.text_field not in dataset.column_names:
        raise ConfigError("data.text_field", f"'{data_cfg.text_field}' is not a column (columns: {dataset.column_names})")
    texts = [t for t in dataset[data_cfg.text_field] if t and t.strip()]
    return [(f"{i:08d}", t) for i, t in enumerate(texts)]


def corpus_id(data_cfg: DictConfig) -> str:
    """What identifies the corpus's text (for caching tokenizers and tokenized data)."""
    fields = {k: data_cfg[k] for k in ("source", "paths", "text_field", "hf_name", "hf_config", "hf_split", "max_chars")}
    for path in data_cfg.paths or []:
        fields[f"mtime:{path}"] = os.path.getmtime(path) if os.path.exists(path) else None
    return json.dumps(fields, sort_keys=True, default=str)


# --- split, tokenize, pack -----------------------------------------------------------------------------------


def is_validation(doc_id: str, val_fraction: float, seed: int) -> bool:
    """A document-level split by hash: stable across runs and machines, no document in both splits."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_documents(documents, val_fraction: float, seed: int):
    train = [text for doc_id, text in documents if not is_validation(doc_id, val_fraction, seed)]
    val = [text for doc_id, text in documents if is_validation(doc_id, val_fraction, seed)]
    if not val and len(train) > 1:  # a tiny corpus: still hold one document out
        val = [train.pop()]
    return train, val


def pack(token_lists: list[list[int]], block_size: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents (separated by EOS) and cut into [num_blocks, block_size]; drop the tail."""
    stream = [token for tokens in token_lists for token in (*tokens, eos_id)]
    num_blocks = len(stream) // block_size
    return torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


def tokenize_and_pack(texts: list[str], tokenizer, block_size: int) -> torch.Tensor:
    import datasets

    if not texts:
        return torch.empty(0, block_size, dtype=torch.long)
    dataset = datasets.Dataset.from_dict({"text": texts})
    encoded = dataset.map(
        lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
        batched=True,
        remove_columns=["text"],
        desc="tokenizing",
    )
    return pack(encoded["ids"], block_size, tokenizer.eos_token_id)


def tokenizer_id(tokenizer) -> str:
    return short_hash(json.dumps(sorted(tokenizer.get_vocab().items())))


def packed_splits(data_cfg: DictConfig, tokenizer, cache_dir: str, documents=None) -> dict[str, torch.Tensor]:
    """{"train": blocks, "val": blocks}, tokenized once per (corpus, tokenizer, block size, split) and cached."""
    key = short_hash(
        json.dumps([corpus_id(data_cfg), tokenizer_id(tokenizer), data_cfg.block_size, data_cfg.val_fraction, data_cfg.seed])
    )
    target = os.path.join(cache_dir, "data", f"{data_cfg.name}-{key}")
    cached = os.path.join(target, "blocks.pt")
    if os.path.isfile(cached):
        return torch.load(cached)
    documents = documents if documents is not None else load_documents(data_cfg)
    train_texts, val_texts = split_documents(documents, data_cfg.val_fraction, data_cfg.seed)
    splits = {
        "train": tokenize_and_pack(train_texts, tokenizer, data_cfg.block_size),
        "val": tokenize_and_pack(val_texts, tokenizer, data_cfg.block_size),
    }
    for split, blocks in splits.items():
        if len(blocks) == 0:
            raise ConfigError(
                "data.block_size",
                f"the corpus '{data_cfg.name}' is smaller than one block of {data_cfg.block_size} tokens in its {split} split",
            )
    with atomic_directory(target) as tmp:
        torch.save(splits, os.path.join(tmp, "blocks.pt"))
    log.info("data %s: %d train and %d val blocks of %d tokens", data_cfg.name, len(splits["train"]), len(splits["val"]), data_cfg.block_size)
    return splits


# --- loading ---------------------------------------------------------------------------------------------------


class Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index]}


class ResumableBatchSampler(Sampler):
    """An endless stream of batches whose order is a pure function of (seed, batch position).

    Each pass over the data is a fresh permutation seeded by (seed, pass). A resumed run starts at the
    batch position it had reached, so it sees exactly the batches an uninterrupted run would. Under
    data parallelism each rank takes its slice of one global batch, so N ranks at batch B/N follow the
    same data as one process at batch B.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self.global_batch = batch_size * world_size
        if self.global_batch > num_samples:
            raise ConfigError("data.batch_size", f"a global batch of {self.global_batch} exceeds the {num_samples} train blocks")
        self.batches_per_pass = num_samples // self.global_batch

    def _permutation(self, data_pass: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + data_pass)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            data_pass, within = divmod(position, self.batches_per_pass)
            order = self._permutation(data_pass)
            begin = within * self.global_batch + self.rank * self.batch_size
            yield order[begin : begin + self.batch_size].tolist()
            position += 1


class LMDataModule(pl.LightningDataModule):
    """Packed blocks of a corpus for causal-LM training; labels are the inputs (the model shifts them)."""

    def __init__(self, data_cfg: DictConfig, tokenizer, cache_dir: str, seed: int, documents=None):
        super().__init__()
        self.cfg, self.tokenizer, self.cache_dir, self.seed = data_cfg, tokenizer, cache_dir, seed
        self.splits = packed_splits(data_cfg, tokenizer, cache_dir, documents)

    @property
    def train_tokens(self) -> int:
        return self.splits["train"].numel()

    def _batches_consumed(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = ResumableBatchSampler(
            len(self.splits["train"]),
            self.cfg.batch_size,
            self.seed,
            start=self._batches_consumed(),
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )
        return DataLoader(Blocks(self.splits["train"]), batch_sampler=sampler, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Blocks(self.val_blocks()), batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers)

    def val_blocks(self) -> torch.Tensor:
        blocks = self.splits["val"]
        return blocks[: self.cfg.max_val_blocks] if self.cfg.max_val_blocks else blocks

    def calibration_batches(self, num_samples: int, batch_size: int = 8) -> list[torch.Tensor]:
        """Train-split blocks for calibrating pruning and quantization (never the val split)."""
        generator = torch.Generator().manual_seed(self.seed)
        train = self.splits["train"]
        chosen = train[torch.randperm(len(train), generator=generator)[:num_samples]]
        return list(chosen.split(batch_size))
