"""Where documents come from: the offline corpora of every Python install, local files, hub datasets.

Each source is a stream of (key, text) pairs, read lazily. The key is what the train/val split hashes: a
stable name where the source has one (a topic, a module path), else the text itself, so that a document
repeated in a corpus always falls in the same split.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from typing import Iterable, Iterator

from omegaconf import DictConfig

from framework.corpus.files import file_documents
from framework.errors import ConfigError

Documents = Iterator[tuple[str, str]]


def stdlib_docs() -> Documents:
    """The Python documentation's topic pages (pydoc_data.topics), shipped with every Python."""
    from pydoc_data.topics import topics

    yield from sorted(topics.items())


def stdlib_modules() -> Documents:
    """The docstrings of the standard library's modules, read with `ast` (nothing is imported)."""
    root = sysconfig.get_paths()["stdlib"]
    for path in sorted(_stdlib_sources(root)):
        text = _docstrings(path)
        if len(text) >= 200:
            yield os.path.relpath(path, root), text


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


def files(key: str, paths: Iterable[str], text_field: str) -> Documents:
    """The documents of local files (checked by files.check_files), file after file."""
    for path in paths:
        yield from ((text, text) for text in file_documents(key, path, text_field))


# --- hub datasets ------------------------------------------------------------------------------------------------


def check_hub_dataset(data: DictConfig) -> None:
    """That the dataset can be loaded, from its builder alone (nothing is downloaded but its description)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(data.hf_name, data.hf_config)
    except Exception as err:  # datasets raises many kinds (ConnectionError offline, FileNotFoundError, ValueError...)
        raise _hub_error(data, err) from None
    splits = builder.info.splits
    if splits and data.hf_split not in splits:
        raise ConfigError("data.hf_split", f"'{data.hf_split}' is not a split of {data.hf_name} (splits: {', '.join(splits)})")


def _hub_error(data: DictConfig, err: Exception) -> ConfigError:
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if ("config" in message.lower() and "not found" in message.lower()) or "Config name is missing" in message:
        return ConfigError("data.hf_config", message)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE is set: set HF_HUB_OFFLINE=0 to download it, or give a local dataset directory)" if offline else ""
    return ConfigError("data.hf_name", f"cannot load '{data.hf_name}': {message}{hint}")


def hub_dataset(data: DictConfig) -> Documents:
    """The rows of a hub (or local) dataset; `data.streaming` reads them as they download instead of
    downloading the whole split first (which `datasets` stores memory-mapped on disk, not in memory)."""
    import datasets

    try:
        dataset = datasets.load_dataset(data.hf_name, data.hf_config, split=data.hf_split, streaming=data.streaming)
    except Exception as err:
        raise _hub_error(data, err) from None
    if dataset.column_names is not None and data.text_field not in dataset.column_names:
        raise ConfigError("data.text_field", f"'{data.text_field}' is not a column of {data.hf_name} (columns: {', '.join(dataset.column_names)})")
    for batch in dataset.iter(batch_size=1000):
        if data.text_field not in batch:  # a stream may not know its columns before its first rows
            raise ConfigError("data.text_field", f"'{data.text_field}' is not a column of {data.hf_name} (columns: {', '.join(batch)})")
        yield from ((text, text) for text in batch[data.text_field] if isinstance(text, str) and text.strip())


# --- a data config's corpus ------------------------------------------------------------------------------------


def corpus_documents(data: DictConfig) -> Documents:
    """The documents of `data.source` (for text_files, of `data.paths`), at most `data.max_chars` characters."""
    if data.source == "stdlib_docs":
        documents = stdlib_docs()
    elif data.source == "stdlib_modules":
        documents = stdlib_modules()
    elif data.source == "text_files":
        documents = files("data.paths", data.paths, data.text_field)
    else:
        documents = hub_dataset(data)
    return capped(documents, data.max_chars) if data.max_chars else documents


def capped(documents: Documents, max_chars: int) -> Documents:
    """The documents up to `max_chars` characters in all (the last one cut)."""
    total = 0
    for key, text in documents:
        if total >= max_chars:
            return
        text = text[: max_chars - total]
        total += len(text)
        yield key, text


def files_id(paths: Iterable[str]) -> list:
    """What identifies files' contents cheaply: path, size and modification time."""
    return [[p, os.path.getsize(p), os.path.getmtime(p)] if os.path.exists(p) else [p, None, None] for p in paths]


def corpus_id(data: DictConfig) -> str:
    """What identifies the text of `data.source` (for caching the tokenizers trained on it and its tokens)."""
    fields = {k: data[k] for k in ("source", "text_field", "hf_name", "hf_config", "hf_split", "max_chars")}
    fields["paths"] = files_id(data.paths or [])
    return json.dumps(fields, sort_keys=True, default=str)
