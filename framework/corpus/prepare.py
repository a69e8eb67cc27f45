"""Tokenize a stream of documents once, into flat files of token ids on disk that training reads memory-mapped.

A prepared corpus is a directory holding, per split, `<split>.bin`: the token ids of its documents in
order, each document followed by EOS, as uint16 (vocabularies up to 65,536 tokens) or uint32; and
`meta.json` (dtype, tokens and documents per split, what it took). The block size is applied when
reading, so one prepared corpus serves every block size.

It is written in one streaming pass: this thread reads documents and hands batches of them to
`num_proc` tokenizing threads (the Rust tokenizer releases the GIL, so they run in parallel), then writes
their ids in reading order. Memory holds a few batches, whatever the corpus's size, and the files do not
depend on the number of workers.

Every process that needs a corpus calls `prepare`: the first takes a lock beside the target directory
(a POSIX lock, which a shared filesystem such as NFS carries to other nodes) and builds it in a temporary
directory renamed into place when whole; the others wait on the lock, then read. A preparation cut by a
crash leaves only a temporary directory, which the next preparer deletes: a half-written corpus is never read.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from framework.artifacts import atomic_directory, file_lock

log = logging.getLogger(__name__)

META = "meta.json"
FORMAT_VERSION = 1
BATCH_CHARS = 1 << 16  # characters of text per tokenizing task: its encodings take ~25x that in memory
PROGRESS_EVERY_S = 30.0

# (split, key, text): split None means "train or val, as the document's key hashes" (is_validation).
TaggedDocuments = Iterable[tuple[Optional[str], str, str]]


@dataclass(frozen=True)
class Encoder:
    """What preparation needs of a tokenizer: the Rust tokenizer (`tokenizers.Tokenizer`), EOS, vocabulary size."""

    tokenizer: Any
    eos_id: int
    vocab_size: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)


def is_validation(key: str, val_fraction: float, seed: int) -> bool:
    """A document-level split by hash: stable across runs and machines, no document in both splits."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


# --- reading a prepared corpus ----------------------------------------------------------------------------------


class PreparedCorpus:
    def __init__(self, directory: str):
        self.directory = directory
        with open(os.path.join(directory, META)) as f:
            self.meta = json.load(f)
        self.dtype = np.dtype(self.meta["dtype"])

    def path(self, split: str) -> str:
        return os.path.join(self.directory, f"{split}.bin")

    def num_tokens(self, split: str) -> int:
        return self.meta["splits"][split]["tokens"]

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped (read-only): nothing is read until it is indexed."""
        return open_tokens(self.path(split), self.dtype)


def open_tokens(path: str, dtype: np.dtype) -> np.ndarray:
    if os.path.getsize(path) == 0:  # numpy cannot map an empty file
        return np.empty(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# --- preparing one ----------------------------------------------------------------------------------------------


def prepare(
    target: str,
    documents: Callable[[], TaggedDocuments],
    encoder: Encoder,
    splits: tuple[str, ...],
    num_proc: int,
    val_fraction: float = 0.0,
    seed: int = 0,
    description: str = "",
) -> PreparedCorpus:
    """The prepared corpus at `target`, built first if no process has built it (see the module's docstring).

    `documents()` yields (split, key, text); `splits` are the files to write (a split no document falls
    in gets an empty file). When documents are split by hash (`val_fraction` > 0) and none falls in val,
    the last train document is moved there (a tiny corpus still has something to validate on).
    """
    if not os.path.isfile(os.path.join(target, META)):
        with file_lock(target + ".lock"):
            if not os.path.isfile(os.path.join(target, META)):  # else another process built it while we waited
                for stale in glob.glob(os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.*")):
                    shutil.rmtree(stale, ignore_errors=True)  # left by a preparation that crashed: we hold the lock
                with atomic_directory(target) as tmp:
                    _write(tmp, documents(), encoder, splits, num_proc, val_fraction, seed, description)
    return PreparedCorpus(target)


def _write(directory, documents, encoder, splits, num_proc, val_fraction, seed, description) -> None:
    started = last_report = time.perf_counter()
    stats = {split: {"tokens": 0, "documents": 0, "chars": 0} for split in splits}
    last_train_document = 0
    files = {split: open(os.path.join(directory, f"{split}.bin"), "wb") for split in splits}
    try:
        with ThreadPoolExecutor(num_proc, thread_name_prefix="tokenize") as pool:
            task = lambda batch: _tokenize(batch, encoder, val_fraction, seed)  # noqa: E731
            for result in _in_order(pool, task, _batches(documents), window=2 * num_proc):
                for split, (ids, count, chars, last) in result.items():
                    if split not in files:
                        raise ValueError(f"a document of split '{split}' in a corpus of splits {splits}")
                    ids.tofile(files[split])
                    stats[split]["tokens"] += len(ids)
                    stats[split]["documents"] += count
                    stats[split]["chars"] += chars
                    if split == "train":
                        last_train_document = last
                if time.perf_counter() - last_report > PROGRESS_EVERY_S:
                    last_report = time.perf_counter()
                    tokens, chars = (sum(s[k] for s in stats.values()) for k in ("tokens", "chars"))
                    log.info("preparing %s: %.1fM tokens from %.0fM characters (%.0f tokens/s)", description, tokens / 1e6, chars / 1e6, tokens / (last_report - started))
    finally:
        for f in files.values():
            f.close()
    if val_fraction > 0 and stats["val"]["documents"] == 0 and stats["train"]["documents"] > 1:
        _move_tail(directory, encoder.dtype, last_train_document, stats)
    seconds = time.perf_counter() - started
    tokens = sum(s["tokens"] for s in stats.values())
    meta = {
        "format": FORMAT_VERSION, "dtype": encoder.dtype.name, "eos_id": encoder.eos_id, "splits": stats,
        "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0,
        "num_proc": num_proc, "source": description,
    }
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f, indent=2)
    log.info("prepared %s: %s (%.0f tokens/s)", description, ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in stats.items()), meta["tokens_per_s"])


def _batches(documents: TaggedDocuments) -> Iterator[list]:
    batch, size = [], 0
    for document in documents:
        batch.append(document)
        size += len(document[2])
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _in_order(pool: ThreadPoolExecutor, task: Callable, batches: Iterator[list], window: int) -> Iterator[Any]:
    """task(batch) for each batch, in order, with at most `window` batches in flight (bounded memory)."""
    pending = collections.deque()
    for batch in batches:
        pending.append(pool.submit(task, batch))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _tokenize(batch: list, encoder: Encoder, val_fraction: float, seed: int) -> dict[str, tuple[np.ndarray, int, int, int]]:
    """{split: (ids of its documents, each followed by EOS; number of documents; characters; length of the last)}."""
    encodings = encoder.tokenizer.encode_batch_fast([text for _, _, text in batch], add_special_tokens=False)
    by_split, chars = collections.defaultdict(list), collections.Counter()
    for (split, key, text), encoding in zip(batch, encodings):
        split = split or ("val" if is_validation(key, val_fraction, seed) else "train")
        by_split[split].append(encoding.ids)
        chars[split] += len(text)
    result = {}
    for split, documents in by_split.items():
        lengths = np.array([len(d) + 1 for d in documents])
        ends = np.cumsum(lengths)
        ids = np.empty(int(ends[-1]), encoder.dtype)
        ids[ends - 1] = encoder.eos_id
        for document, end, length in zip(documents, ends, lengths):
            ids[end - length : end - 1] = document
        result[split] = (ids, len(documents), chars[split], int(lengths[-1]))
    return result


def _move_tail(directory: str, dtype: np.dtype, length: int, stats: dict) -> None:
    """Move the last `length` tokens (one document) of train.bin to the end of val.bin."""
    train = os.path.join(directory, "train.bin")
    keep = stats["train"]["tokens"] - length
    tail = np.fromfile(train, dtype=dtype, offset=keep * dtype.itemsize)
    with open(os.path.join(directory, "val.bin"), "ab") as f:
        tail.tofile(f)
    os.truncate(train, keep * dtype.itemsize)
    stats["train"]["tokens"], stats["val"]["tokens"] = keep, stats["val"]["tokens"] + length
    stats["train"]["documents"] -= 1
    stats["val"]["documents"] += 1
