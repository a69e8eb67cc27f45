"""The export stage: an artifact's model in a format serving engines run, measured in the runtime that runs it.

  gguf   one .gguf file for llama.cpp and Ollama (Llama-architecture models): export.outtype F16, BF16,
         Q8_0 or Q4_0; measured as transformers reads it back (dequantized to fp32, torch eager)
  onnx   model.onnx (+ .data) for onnxruntime, KV cache as inputs and outputs: fp32 weights, or
         export.bits 8/4/2 (MatMulNBits, int8 compute); measured in onnxruntime. A classifier (task=
         classification): logits of whole inputs, fp32 or export.bits=8 (onnxruntime's dynamic int8)

The model/ directory holds the file(s) and the tokenizer; metrics.json sits beside it as for every
artifact. The stage does not train (framework.training.convert). Low-rank models are multiplied back to
dense for GGUF (llama.cpp has no factor tensors) and keep their factors in ONNX; shared layers are
written out per layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from omegaconf import DictConfig

from framework import artifacts
from framework.compression.lowrank import densify
from framework.config import one_of, positive
from framework.errors import ConfigError
from framework.export import gguf, onnx
from framework.stages.base import Stage, artifact_config
from framework.training import convert


@dataclass
class GgufConfig:
    """llama.cpp's file format: weights as F16, BF16, Q8_0 (8-bit blocks of 32) or Q4_0 (4-bit)."""

    format: str = "gguf"
    outtype: str = "F16"

    @staticmethod
    def write(model, tokenizer, directory: str, e: DictConfig, name: str) -> None:
        model = densify(model)  # low-rank factors multiplied back (a no-op for other models)
        why = gguf.unsupported(model.config, tokenizer)
        if why:
            raise ConfigError("export.format", why)
        gguf.write_gguf(model, tokenizer, os.path.join(directory, "model.gguf"), e.outtype, name=name)


@dataclass
class OnnxConfig:
    """One ONNX graph with its KV cache for onnxruntime; bits: null (fp32 weights) or 8, 4, 2."""

    format: str = "onnx"
    bits: Optional[int] = None
    group_size: int = 32  # weights quantized in blocks of this many inputs (a power of 2 >= 16)

    @staticmethod
    def write(model, tokenizer, directory: str, e: DictConfig, name: str) -> None:
        onnx.export_onnx(model, directory, bits=e.bits, block_size=e.group_size)


class ExportStage(Stage):
    kind = "export"
    section = "export"
    methods = {"gguf": GgufConfig, "onnx": OnnxConfig}
    method_key = "format"
    reads = ("dense", "shared", "lowrank")

    def check_input_format(self, found: str, key: str, source: str) -> None:
        if found == "quantized":  # torchao tensors: quantizing again on the way out would compound the error
            raise ConfigError(key, f"'{source}' holds a quantized model; export the model before quantization and quantize on the way out (export=gguf export.outtype=Q8_0, or export=onnx export.bits=8)")
        super().check_input_format(found, key, source)

    def check(self, cfg: DictConfig) -> None:
        e = cfg.export
        if cfg.trainer.max_steps:
            raise ConfigError("trainer.max_steps", "the export stage does not train (0); finetune in an earlier stage")
        if cfg.task.name == "classification":
            if e.format != "onnx":
                raise ConfigError("export.format", f"{e.format} holds causal language models; export a classifier with export=onnx (onnxruntime)")
            if e.bits not in (None, *onnx.CLASSIFIER_BITS):
                raise ConfigError("export.bits", f"a classifier's ONNX graph takes null (fp32) or 8 (int8), got {e.bits}")
            return
        if e.format == "gguf":
            one_of("export.outtype", e.outtype, gguf.OUTTYPES)
            config = artifact_config(cfg.input)  # None while a pipeline plans: checked when the stage runs
            if config is not None:
                from transformers import AutoConfig, AutoTokenizer

                model_dir = os.path.join(cfg.input, artifacts.MODEL)
                why = gguf.unsupported(AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir))
                if why:
                    raise ConfigError("export.format", why)
        else:
            if e.bits is not None and e.bits not in onnx.BITS:
                raise ConfigError("export.bits", f"must be null (fp32) or one of {', '.join(map(str, onnx.BITS))} (onnxruntime's MatMulNBits), got {e.bits}")
            positive("export.group_size", e.group_size)
            if e.group_size < 16 or e.group_size & (e.group_size - 1):
                raise ConfigError("export.group_size", f"onnxruntime needs a power of 2 >= 16, got {e.group_size}")

    def output_format(self, cfg: DictConfig, input_format: str | None) -> str:
        return cfg.export.format

    def run(self, cfg: DictConfig, stage_dir: str | None = None, input_fingerprints: Sequence[str] = ()) -> dict:
        e = cfg.export
        name = os.path.basename(os.path.normpath(cfg.input))

        def write(model, tokenizer, directory):
            self.methods[e.format].write(model, tokenizer, directory, e, name)
            tokenizer.save_pretrained(directory)

        described = {"export_format": e.format, **({"outtype": e.outtype} if e.format == "gguf" else {"bits": e.bits})}
        return convert(cfg, stage_dir, [*input_fingerprints, *self.input_fingerprints(cfg)], "export", write, described)


STAGE = ExportStage()
