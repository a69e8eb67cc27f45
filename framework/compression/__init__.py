"""Compression methods as pure functions on nn.Modules: pruning, low-rank, quantization, distillation."""
