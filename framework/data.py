"""A data config's corpus → token ids on disk, prepared once (framework.corpus.prepare) → blocks for training.

Splits: `data.val_paths` names the validation files; without them, the corpus's documents are split by
the hash of each (`val_fraction` of them validate). `data.test_paths` are scored whole by evaluate.
Training reads fixed-length blocks from the memory-mapped train split in an order that is a pure
function of (seed, batch position), so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from typing import Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from framework.config import in_range, one_of, positive, short_hash
from framework.corpus import prepare as preparation
from framework.corpus.files import check_files
from framework.corpus.sources import capped, check_hub_dataset, corpus_documents, corpus_id, files, files_id
from framework.errors import ConfigError

DATA_SOURCES = ("stdlib_docs", "stdlib_modules", "text_files", "hf_dataset")
# A tokenizer trained on the corpus (from-scratch models) learns from its first characters only: enough
# for a good vocabulary, and bounded time and memory whatever the corpus's size.
TOKENIZER_SAMPLE_CHARS = 100_000_000

log = logging.getLogger(__name__)


def check_data_config(data: DictConfig, needs_corpus: bool = True) -> None:
    """The data section before any work: sizes, and a few KB of every named file (no corpus is read).

    `needs_corpus=False` (evaluate with `data.test_paths`) leaves out the training corpus's checks.
    """
    one_of("data.source", data.source, DATA_SOURCES)
    positive("data.block_size", data.block_size)
    positive("data.batch_size", data.batch_size)
    in_range("data.val_fraction", data.val_fraction, 0, 1, low_open=True, high_open=True)
    positive("data.num_workers", data.num_workers, allow_zero=True)
    for key in ("max_chars", "max_val_blocks", "num_proc"):
        if data[key] is not None:
            positive(f"data.{key}", data[key])
    if needs_corpus and data.source == "text_files":
        if OmegaConf.is_missing(data, "paths") or not data.paths:
            raise ConfigError("data.paths", "text_files needs at least one file: data.paths=[a.txt]")
        check_files("data.paths", data.paths, data.text_field)
    if needs_corpus and data.source == "hf_dataset":
        if not data.hf_name:
            raise ConfigError("data.hf_name", "hf_dataset needs a dataset name or local path")
        check_hub_dataset(data)
    training = {os.path.realpath(p) for p in data.paths} if needs_corpus and data.source == "text_files" else set()
    for key in ("val_paths", "test_paths"):
        if data[key]:
            check_files(f"data.{key}", data[key], data.text_field)
            for path in data[key]:
                if os.path.realpath(path) in training:
                    raise ConfigError(f"data.{key}", f"'{path}' is also in data.paths: its text would be trained on")


# --- preparing -------------------------------------------------------------------------------------------------


def encoder(tokenizer) -> preparation.Encoder:
    """The Rust tokenizer behind an HF tokenizer, without truncation or padding (documents are whole)."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("model.tokenizer", "preparing data needs a fast (Rust) tokenizer")
    if tokenizer.eos_token_id is None:
        raise ConfigError("model.tokenizer", "the tokenizer has no end-of-text token to separate documents with")
    backend = Tokenizer.from_str(backend.to_str())  # a copy: the settings below stay ours
    backend.no_truncation()
    backend.no_padding()
    return preparation.Encoder(backend, tokenizer.eos_token_id, len(tokenizer))


def tokenizer_id(enc: preparation.Encoder) -> str:
    """What identifies a tokenizer's ids: its whole definition (normalizer, pre-tokenizer, vocabulary, merges)."""
    return short_hash(enc.tokenizer.to_str())


def num_proc(data: DictConfig) -> int:
    """data.num_proc, else the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return data.num_proc or cores or 1


def prepared_splits(data: DictConfig, tokenizer, cache_dir: str) -> preparation.PreparedCorpus:
    """The corpus's train and val splits, tokenized into `<cache_dir>/data/` once (by the first process to ask)."""
    enc = encoder(tokenizer)
    val = files_id(data.val_paths) if data.val_paths else [data.val_fraction, data.seed]
    key = short_hash(json.dumps([preparation.FORMAT_VERSION, corpus_id(data), val, tokenizer_id(enc)]))

    def documents():  # (split, key, text); split None: by the hash of the key
        if not data.val_paths:
            return ((None, name, text) for name, text in corpus_documents(data))
        train = (("train", name, text) for name, text in corpus_documents(data))
        return itertools.chain(train, (("val", name, text) for name, text in files("data.val_paths", data.val_paths, data.text_field)))

    target = os.path.join(cache_dir, "data", f"{data.name}-{key}")
    val_fraction = 0.0 if data.val_paths else data.val_fraction  # 0: no document is split by hash
    return preparation.prepare(target, documents, enc, ("train", "val"), num_proc(data), val_fraction, data.seed, describe(data))


def prepared_test(data: DictConfig, tokenizer, cache_dir: str) -> preparation.PreparedCorpus:
    """The documents of `data.test_paths`, in order, as the split "test"."""
    enc = encoder(tokenizer)
    key = short_hash(json.dumps([preparation.FORMAT_VERSION, files_id(data.test_paths), data.text_field, tokenizer_id(enc)]))

    def documents():
        return (("test", name, text) for name, text in files("data.test_paths", data.test_paths, data.text_field))

    return preparation.prepare(
        os.path.join(cache_dir, "data", f"test-{key}"), documents, enc, ("test",), num_proc(data),
        description=f"test files {', '.join(data.test_paths)}",
    )


def describe(data: DictConfig) -> str:
    """The corpus, for messages: its name and where its text comes from."""
    if data.source == "text_files":
        return f"'{data.name}' ({', '.join(data.paths)})"
    return f"'{data.name}' ({data.hf_name if data.source == 'hf_dataset' else data.source})"


def training_texts(data: DictConfig) -> tuple:
    """(texts function, id) of the text a from-scratch tokenizer learns from: the corpus's first characters."""
    texts = lambda: (text for _, text in capped(corpus_documents(data), TOKENIZER_SAMPLE_CHARS))  # noqa: E731
    return texts, json.dumps([corpus_id(data), TOKENIZER_SAMPLE_CHARS])


# --- blocks ----------------------------------------------------------------------------------------------------


class TokenBlocks(Dataset):
    """Consecutive blocks of `block_size` tokens of a token file (the tail shorter than a block is left out),
    read from the memory-mapped file when indexed."""

    def __init__(self, path: str, dtype: np.dtype, block_size: int):
        self.path, self.dtype, self.block_size = path, np.dtype(dtype), block_size
        self.num_tokens = os.path.getsize(path) // self.dtype.itemsize
        self._tokens = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}  # a DataLoader worker maps the file itself

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = preparation.open_tokens(self.path, self.dtype)
        return self._tokens

    def __len__(self) -> int:
        return self.num_tokens // self.block_size

    def block(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.block_size
        return torch.from_numpy(self.tokens[start : start + self.block_size].astype(np.int64))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.block(index)}

    def stack(self, indices) -> torch.Tensor:
        """The blocks at `indices`, as one [len(indices), block_size] tensor."""
        if len(indices) == 0:
            return torch.empty(0, self.block_size, dtype=torch.long)
        return torch.stack([self.block(int(i)) for i in indices])

    def first(self, count: int) -> torch.Tensor:
        """The first `count` blocks (one read of consecutive tokens)."""
        count = min(count, len(self))
        return torch.from_numpy(self.tokens[: count * self.block_size].astype(np.int64)).view(count, self.block_size)


def check_blocks(data: DictConfig, split: str, blocks: TokenBlocks, corpus: preparation.PreparedCorpus) -> None:
    """A split with less than one block, reported against what the user can change."""
    if len(blocks):
        return
    stats, size = corpus.meta["splits"], f"less than one block of data.block_size={data.block_size} tokens"
    documents = sum(s["documents"] for s in stats.values())
    if split == "val" and data.val_paths:
        raise ConfigError("data.val_paths", f"the validation files hold {blocks.num_tokens} tokens, {size}")
    if split == "val" and documents > 1:
        raise ConfigError(
            "data.val_fraction",
            f"the documents of {describe(data)} that fall in the val split (val_fraction={data.val_fraction}) hold "
            f"{blocks.num_tokens} tokens, {size}: raise data.val_fraction, or name validation files with data.val_paths",
        )
    corpus_chars = stats["train"]["chars"] + (0 if data.val_paths else stats["val"]["chars"])  # what max_chars caps
    if data.max_chars and corpus_chars >= data.max_chars:
        raise ConfigError("data.max_chars", f"the first {data.max_chars} characters of {describe(data)} leave {blocks.num_tokens} {split} tokens, {size}")
    key = {"text_files": "data.paths", "hf_dataset": "data.hf_name"}.get(data.source, "data.source")
    if split == "val":  # one document in all: it trains, nothing validates
        raise ConfigError(key, f"{describe(data)} is one document (text files are cut at blank lines) and the split is by document: name validation files with data.val_paths")
    raise ConfigError(key, f"{describe(data)} holds {blocks.num_tokens} {split} tokens, {size}")


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
        position, order_pass, order = self.start, None, None
        while True:
            data_pass, within = divmod(position, self.batches_per_pass)
            if data_pass != order_pass:  # one permutation per pass (of millions of blocks, on a large corpus)
                order_pass, order = data_pass, self._permutation(data_pass)
            begin = within * self.global_batch + self.rank * self.batch_size
            yield order[begin : begin + self.batch_size].tolist()
            position += 1


class LMDataModule(pl.LightningDataModule):
    """Blocks of a prepared corpus for causal-LM training; labels are the inputs (the model shifts them)."""

    def __init__(self, data_cfg: DictConfig, tokenizer, cache_dir: str, seed: int):
        super().__init__()
        self.cfg, self.tokenizer, self.cache_dir, self.seed = data_cfg, tokenizer, cache_dir, seed
        self.corpus = prepared_splits(data_cfg, tokenizer, cache_dir)
        self.train_set, self.val_set = (TokenBlocks(self.corpus.path(s), self.corpus.dtype, data_cfg.block_size) for s in ("train", "val"))
        check_blocks(data_cfg, "train", self.train_set, self.corpus)
        check_blocks(data_cfg, "val", self.val_set, self.corpus)
        log.info("data %s: %d train and %d val blocks of %d tokens", data_cfg.name, len(self.train_set), len(self.val_set), data_cfg.block_size)

    @property
    def train_tokens(self) -> int:
        return len(self.train_set) * self.cfg.block_size

    def _batches_consumed(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = ResumableBatchSampler(
            len(self.train_set),
            self.cfg.batch_size,
            self.seed,
            start=self._batches_consumed(),
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=self.cfg.num_workers)

    def _num_val_blocks(self) -> int:
        return min(len(self.val_set), self.cfg.max_val_blocks or len(self.val_set))

    def val_dataloader(self) -> DataLoader:
        val = Subset(self.val_set, range(self._num_val_blocks()))
        return DataLoader(val, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers)

    def val_blocks(self) -> torch.Tensor:
        """The val blocks (the first `data.max_val_blocks` of them), as one tensor."""
        return self.val_set.first(self._num_val_blocks())

    def calibration_batches(self, num_samples: int, batch_size: int = 8) -> list[torch.Tensor]:
        """Train-split blocks for calibrating pruning and quantization (never the val split)."""
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(len(self.train_set), generator=generator)[:num_samples]
        return list(self.train_set.stack(chosen.tolist()).split(batch_size))

