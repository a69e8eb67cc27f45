"""The one train loop (with the hooks stages use), its LightningModules, callbacks and experiment tracking."""

from framework.training.loop import StageHooks, convert, extra_callbacks, train

__all__ = ["StageHooks", "convert", "extra_callbacks", "train"]
