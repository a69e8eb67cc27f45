"""A declarative framework for training and compressing language models."""

__version__ = "0.1.0"
