"""Corpora as streams of documents, and their tokenized form on disk.

Light on purpose (numpy, tokenizers, pyarrow; no torch): framework.data builds training data on it.
"""
