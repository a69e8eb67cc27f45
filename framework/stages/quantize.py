"""The quantize stage: weights to `bits` bits (2 to 8), and with `method=dynamic` activations to int8 at run
time, through the backend that makes them pay off where the model will run:

  onnxruntime  (quantize.backend=auto on a CPU) an ONNX model whose MatMuls run int8 x int`bits` dot
               products (MatMulNBits, 2, 4 or 8 bits): smaller and faster than fp32 torch on a CPU; at 8 bits
               (quantize.hf_copy) the directory also holds the torchao int8 model, for plain transformers.
               A classifier: onnxruntime's dynamic int8 (quantize_dynamic, 8 bits), the classic BERT route
  torchao      (auto on CUDA, for weight-only and QAT, or when asked) torchao tensors that plain
               transformers loads; fast on GPUs, slower than fp32 on a CPU (an accuracy format there)

Post-training (trainer.max_steps=0) or quantization-aware training (quantize.qat, torchao, 8 bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from omegaconf import DictConfig

from framework.compression import quantization
from framework.config import one_of, positive
from framework.errors import ConfigError
from framework.export.onnx import BITS as ONNX_BITS
from framework.export.onnx import CLASSIFIER_BITS, export_onnx
from framework.hardware import uses_gpu
from framework.stages.base import Stage
from framework.training import StageHooks, convert, train

BACKENDS = ("auto", "torchao", "onnxruntime")


@dataclass
class QuantizeConfig:
    method: str = "dynamic"  # weight_only | dynamic (activations quantized to int8 at run time)
    bits: int = 8  # weight bits, 2 to 8
    group_size: int = 32  # weights quantized in groups of this many inputs (torchao below 8 bits; onnxruntime always)
    backend: str = "auto"  # auto: onnxruntime on a CPU for dynamic 2/4/8 bits, else torchao | torchao | onnxruntime
    qat: bool = False  # fake-quantized finetune for trainer.max_steps, then conversion (torchao)
    # onnxruntime backend, 8 bits: also write the same int8 model as torchao safetensors beside the ONNX graph, so
    # that plain `AutoModelForCausalLM.from_pretrained(dir)` loads the artifact too (about doubles its size).
    hf_copy: bool = True


def onnx_bits(task: str) -> tuple[int, ...]:
    """The weight widths the ONNX graph of the task holds: MatMulNBits for a causal LM, int8 for a classifier."""
    return ONNX_BITS if task == "causal_lm" else CLASSIFIER_BITS


def resolve_backend(q: DictConfig, cuda: bool, task: str) -> str:
    """auto: onnxruntime where it runs the method faster than fp32 (a CPU, int8 compute, the bits its graph
    holds), else torchao."""
    if q.backend != "auto":
        return q.backend
    return "onnxruntime" if not cuda and q.method == "dynamic" and q.bits in onnx_bits(task) and not q.qat else "torchao"


class QuantizeStage(Stage):
    kind = "quantize"
    section = "quantize"
    section_schema = QuantizeConfig
    reads = ("dense",)
    produces = "quantized"

    def check(self, cfg: DictConfig) -> None:
        q = cfg.quantize
        one_of("quantize.method", q.method, quantization.METHODS)
        one_of("quantize.backend", q.backend, BACKENDS)
        if q.bits not in quantization.BITS:
            raise ConfigError("quantize.bits", f"must be an integer from 2 to 8, got {q.bits}")
        positive("quantize.group_size", q.group_size)
        cuda = uses_gpu(cfg.trainer.accelerator)
        q.backend = resolve_backend(q, cuda, cfg.task.name)
        if q.qat and cfg.trainer.max_steps == 0:
            raise ConfigError("trainer.max_steps", "quantize.qat=true needs training steps (> 0)")
        if q.qat and q.bits != 8:
            raise ConfigError("quantize.bits", f"quantization-aware training is implemented for 8 bits, got {q.bits}")
        if q.backend == "onnxruntime":
            self._check_onnxruntime(cfg, cuda)
            return
        try:  # the machine may lack the kernel: say so now, not after loading and evaluating the model
            quantization.check_available(q.method, q.bits, q.group_size, cuda)
        except RuntimeError as err:
            raise ConfigError("quantize.bits", str(err).splitlines()[0]) from None

    @staticmethod
    def _check_onnxruntime(cfg: DictConfig, cuda: bool) -> None:
        q = cfg.quantize
        if q.method != "dynamic":
            raise ConfigError("quantize.method", "onnxruntime runs quantized weights fast only with int8 compute (quantize.method=dynamic); weight-only is slower than fp32 there (use quantize.backend=torchao)")
        if q.bits not in onnx_bits(cfg.task.name):
            held = "8 bits for a classifier" if cfg.task.name != "causal_lm" else f"{', '.join(map(str, ONNX_BITS))} bits (MatMulNBits)"
            raise ConfigError("quantize.bits", f"the onnxruntime backend writes {held}, got {q.bits} (quantize.backend=torchao takes 2 to 8)")
        if q.qat:
            raise ConfigError("quantize.qat", "quantization-aware training runs with quantize.backend=torchao")
        if q.group_size < 16 or q.group_size & (q.group_size - 1):
            raise ConfigError("quantize.group_size", f"onnxruntime needs a power of 2 >= 16, got {q.group_size}")
        if cuda:
            raise ConfigError("quantize.backend", "the onnxruntime backend writes a CPU model; on CUDA use quantize.backend=torchao")
        if cfg.trainer.max_steps:
            raise ConfigError("trainer.max_steps", "the onnxruntime backend quantizes after training (0); finetune in an earlier stage")

    def output_format(self, cfg: DictConfig, input_format: str | None) -> str:
        return "onnx" if cfg.quantize.backend == "onnxruntime" else "quantized"

    def run(self, cfg: DictConfig, stage_dir: str | None = None, input_fingerprints: Sequence[str] = ()) -> dict:
        q = cfg.quantize
        inputs = [*input_fingerprints, *self.input_fingerprints(cfg)]
        label = {"quantization": f"int{q.bits}_{q.method}", "backend": q.backend, "qat": q.qat}
        if q.backend == "onnxruntime":
            def write(model, tokenizer, directory):
                export_onnx(model, directory, bits=q.bits, block_size=q.group_size)
                if q.hf_copy and q.bits == 8:  # after the export, which traced the fp32 model
                    self.save(quantization.quantize_ptq(model, "dynamic", 8), tokenizer, directory, q)
                tokenizer.save_pretrained(directory)

            return convert(cfg, stage_dir, inputs, "quantize", write, label)
        if q.qat:
            hooks = StageHooks(
                prepare_model=lambda model, _: quantization.prepare_qat(model, q.method, q.bits),
                finalize=lambda model: quantization.convert_qat(model, q.method, q.bits),
            )
        else:
            hooks = StageHooks(finalize=lambda model: quantization.quantize_ptq(model, q.method, q.bits, q.group_size))
        hooks.save_model = lambda model, tokenizer, directory: self.save(model, tokenizer, directory, q)
        hooks.extra_metrics = lambda model, _: label
        return train(cfg, stage_dir, inputs, "quantize", hooks)

    @staticmethod
    def save(model, tokenizer, directory: str, q: DictConfig) -> None:
        quantization.save_quantized(model, directory, q.method, q.bits, q.group_size)
        tokenizer.save_pretrained(directory)


STAGE = QuantizeStage()
