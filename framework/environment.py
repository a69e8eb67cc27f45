"""Process-wide defaults: offline unless told otherwise, and quiet libraries."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """Offline by default, and keep the terminal for our own progress."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "transformers.modeling_utils", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
