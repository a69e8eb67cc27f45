"""Run any model directory the framework writes, in the runtime that format targets, behind one interface:

    torch eager     dense, pruned, shared, low-rank and torchao-quantized models (framework.models.load_model_dir)
    onnxruntime     ONNX exports (model.onnx with its KV-cache inputs, framework.export.onnx); a classifier's
                    graph (logits of whole inputs) is called like a transformers model instead (OrtClassifier)
    GGUF            read back through transformers, which dequantizes it to fp32 and runs it in torch eager
                    (llama.cpp or Ollama run the file itself; transformers is how we check what it holds)

A runtime gives the logits of whole sequences (perplexity) and generates token by token: `prefill` runs the
prompt and keeps the KV cache, `decode` feeds one token per sequence. Perplexity, prefill latency, decode
speed (framework.evaluation) and text generation (framework.generate) use only these three calls, so every
format is measured the same way.
"""

from __future__ import annotations

import glob
import os
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import torch

from framework import artifacts
from framework.models import load_model_dir

GGUF_RUNTIME = "torch eager (GGUF dequantized to fp32 by transformers)"


class TorchRuntime:
    """A transformers model in torch eager mode, with its own DynamicCache per generation."""

    def __init__(self, model: torch.nn.Module, name: str = "torch eager"):
        self.model = model.eval()
        self.name = name

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits.float()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), cache

    @torch.no_grad()
    def decode(self, token_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=token_ids[:, None], cache=cache, use_cache=True)
        return out.logits[:, -1].float(), cache


class OrtRuntime:
    """An ONNX causal LM exported with its KV cache as inputs and outputs (framework.export.onnx), on the CPU.

    The cache stays in onnxruntime's own buffers between steps (IOBinding): each step's `present` outputs
    are bound as the next step's `past` inputs, without copying them through numpy.
    """

    name = "onnxruntime"

    def __init__(self, path: str, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()  # the same cores torch would use
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self.past_names = [i.name for i in inputs if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        _, self.kv_heads, _, self.head_dim = inputs[[i.name for i in inputs].index(self.past_names[0])].shape

    def _run(self, input_ids: torch.Tensor, past: list | None, past_length: int, keep: int):
        batch, length = input_ids.shape
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids.numpy(), dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((batch, past_length + length), np.int64))
        positions = np.arange(past_length, past_length + length, dtype=np.int64)
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(np.broadcast_to(positions, (batch, length))))
        binding.bind_cpu_input("num_logits_to_keep", np.array(keep, np.int64))
        if past is None:
            empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
            for name in self.past_names:
                binding.bind_cpu_input(name, empty)
        else:
            for name, value in zip(self.past_names, past):
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return torch.from_numpy(outputs[0].numpy()), outputs[1:]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run(input_ids, None, 0, input_ids.shape[1])[0]

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        logits, present = self._run(input_ids, None, 0, 1)
        return logits[:, -1], (present, input_ids.shape[1])

    def decode(self, token_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        past, length = cache
        logits, present = self._run(token_ids[:, None], past, length, 1)
        return logits[:, -1], (present, length + 1)


class OrtClassifier:
    """An ONNX sequence classifier (framework.export.onnx.export_classifier_onnx) called like a transformers
    model: `runtime(input_ids=..., attention_mask=...).logits`, with its `config`, so the classification
    metrics measure it as they measure torch."""

    name = "onnxruntime"

    def __init__(self, model_dir: str, threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoConfig

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.config = AutoConfig.from_pretrained(model_dir)

    def eval(self):
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None, **_):
        given = {"input_ids": input_ids, "attention_mask": attention_mask if attention_mask is not None else torch.ones_like(input_ids),
                 "token_type_ids": token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)}
        (logits,) = self.session.run(["logits"], {name: given[name].numpy().astype(np.int64) for name in self.input_names})
        return SimpleNamespace(logits=torch.from_numpy(logits))


def gguf_file(model_dir: str) -> str:
    """The GGUF file of a model directory (an export stage writes one)."""
    found = sorted(glob.glob(os.path.join(model_dir, "*.gguf")))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {model_dir}")
    return os.path.basename(found[0])


def load_gguf(model_dir: str) -> torch.nn.Module:
    """A GGUF file as transformers reads it: dequantized to an fp32 model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file(model_dir), dtype=torch.float32)
    model.hf_quantizer = None  # the GGUF marker; the weights are plain fp32 now
    model.config.__dict__.pop("quantization_config", None)
    return model


def open_runtime(model_dir: str, threads: int | None = None):
    """The runtime that runs `model_dir`'s format (framework.artifacts.model_format); `threads` sets
    onnxruntime's (torch's are the process's: torch.set_num_threads)."""
    found = artifacts.model_format(model_dir)
    if found == "onnx" and artifacts.is_classifier(model_dir):
        return OrtClassifier(model_dir, threads)
    if found == "onnx":
        return OrtRuntime(os.path.join(model_dir, "model.onnx"), threads)
    if found == "gguf":
        return TorchRuntime(load_gguf(model_dir), GGUF_RUNTIME)
    return TorchRuntime(load_model_dir(model_dir))


def generate_ids(runtime, input_ids: torch.Tensor, max_new_tokens: int, choose=None) -> Iterator[torch.Tensor]:
    """New tokens, one [batch] tensor per step: prefill the prompt, then decode. `choose(logits) -> ids`
    picks each token (default: greedy)."""
    choose = choose or (lambda logits: logits.argmax(-1))
    logits, cache = runtime.prefill(input_ids)
    for step in range(max_new_tokens):
        token = choose(logits)
        yield token
        if step + 1 < max_new_tokens:
            logits, cache = runtime.decode(token, cache)
