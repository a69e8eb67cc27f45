"""Post-training and quantization-aware quantization of HF causal LMs with torchao, saved so that plain
`transformers.AutoModelForCausalLM.from_pretrained(dir)` loads them (torchao's safetensors format).

This is the only module of the framework that imports torchao: its API changes between releases, so
every use of it is kept here, behind a few functions. (The onnxruntime backend of the quantize stage
is framework.export.onnx.)

Layout produced by every method:
- the decoder's nn.Linear layers get the method's format: `weight_only` (int8, or 2-7-bit weights in
  groups of `group_size` along the input) or `dynamic` (the same weights, activations quantized to int8
  per token at run time);
- the input embedding and the lm_head (tied or not) get int8 weight-only, per row, whatever the bits.
  They hold a large share of a small model's parameters, so they must shrink for the artifact to;
  int8 keeps the logits (the most sensitive output) close to fp32, and one per-row int8 tensor serves
  both the embedding lookup and the lm_head matmul when the two are tied.

On a CPU this is an accuracy format, not a speed one: torchao's int8 kernels decode 2-10x slower than
fp32 in eager mode here, and 2-7-bit weights are stored one byte each (torchao's unpacked layout), so
they save no disk over 8 bits. torchao is fast on GPUs; on a CPU the quantize stage defaults to
onnxruntime (framework.export.onnx).
"""

import json
import os

import torch
from torch import nn
from torchao.quantization import (
    FqnToConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationIntxWeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    MappingType,
    PerAxis,
    PerGroup,
    quantize_,
)
from torchao.quantization.qat import (
    FakeQuantizedEmbedding,
    FakeQuantizedLinear,
    IntxFakeQuantizeConfig,
    QATConfig,
)

METHODS = ("weight_only", "dynamic")
BITS = tuple(range(2, 9))
QUANT_FILE = "quantization.json"  # marks a torchao model directory (framework.artifacts.FORMAT_MARKERS)


def _check(method: str, bits: int) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown quantization method {method!r}; expected one of {METHODS}")
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")


def linear_config(method: str, bits: int, group_size: int, cuda: bool = False, grouped: bool = True):
    """torchao's config for the decoder's linear layers; `grouped=False`: one scale per row instead of groups
    (for a layer whose input width is not a multiple of group_size)."""
    _check(method, bits)
    granularity = PerGroup(group_size) if grouped else PerAxis(0)
    dtype = getattr(torch, f"int{bits}")
    if method == "dynamic":
        if bits == 8:
            # Asymmetric per-token activations: the only per-token scheme torchao's QAT can fake-quantize,
            # so PTQ and QAT produce the same numerics.
            return Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC)
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)
    if bits == 8:
        return Int8WeightOnlyConfig()
    if bits == 4 and cuda and grouped:
        return Int4WeightOnlyConfig(group_size=group_size)  # torchao's packed int4 kernel (CUDA)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


def check_available(method: str, bits: int, group_size: int, cuda: bool) -> None:
    """Raise RuntimeError now, before any heavy work, if this machine cannot run the method."""
    config = linear_config(method, bits, group_size, cuda)
    if isinstance(config, Int4WeightOnlyConfig):
        probe = nn.Sequential(nn.Linear(256, 256, dtype=torch.bfloat16, device="cuda"))
        try:
            quantize_(probe, config)
        except ImportError as e:
            raise RuntimeError(f"int4 weight-only is not available on this machine: torchao's int4 kernel is missing ({e})") from e


def _embedding_modules(model: nn.Module) -> list[nn.Module]:
    """The input embedding and, if there is one, the lm_head."""
    emb_out = model.get_output_embeddings()
    return [model.get_input_embeddings()] + ([emb_out] if emb_out is not None else [])


def _is_tied(model: nn.Module) -> bool:
    emb_out = model.get_output_embeddings()
    return emb_out is not None and emb_out.weight is model.get_input_embeddings().weight


def _only(modules: list[nn.Module]):
    ids = {id(m) for m in modules}
    return lambda module, fqn: id(module) in ids


def _decoder_linears(model: nn.Module, group_size: int | None = None, grouped: bool = True):
    """Filter for quantize_: every nn.Linear except the lm_head; with `group_size`, only those whose input
    width is (grouped=True) or is not (grouped=False) a multiple of it."""
    skip = {id(model.get_output_embeddings())}

    def keep(module, fqn):
        if not isinstance(module, nn.Linear) or id(module) in skip:
            return False
        return group_size is None or (module.in_features % group_size == 0) == grouped

    return keep


def _quantize_embeddings(model: nn.Module) -> None:
    tied = _is_tied(model)
    # A tied lm_head is left out: it gets the embedding's quantized weight below.
    modules = _embedding_modules(model)[: 1 if tied else 2]
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=_only(modules))
    if tied:
        # quantize_ gave the embedding a new Parameter; share it with the lm_head again.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def quantize_ptq(model: nn.Module, method: str, bits: int = 8, group_size: int = 32) -> nn.Module:
    """Quantize `model` in place with torchao (see the module docstring for the layout)."""
    cuda = next(model.parameters()).is_cuda
    if bits == 8:  # per row: groups play no part
        quantize_(model, linear_config(method, bits, group_size, cuda), filter_fn=_decoder_linears(model))
    else:
        for grouped in (True, False):
            config = linear_config(method, bits, group_size, cuda, grouped)
            quantize_(model, config, filter_fn=_decoder_linears(model, group_size, grouped))
    _quantize_embeddings(model)
    return model


def _fake_quant_configs(method: str, bits: int):
    """(activation, weight) fake-quant configs numerically matching the PTQ format."""
    _check(method, bits)
    if bits != 8:
        raise RuntimeError("QAT is implemented for 8 bits only")
    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    if method == "dynamic":
        return IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False), weight
    return None, weight


def prepare_qat(model: nn.Module, method: str, bits: int = 8) -> nn.Module:
    """Swap in fake-quantized Linear/Embedding modules (in place); the model stays trainable."""
    activation, weight = _fake_quant_configs(method, bits)
    embeddings = _embedding_modules(model)
    quantize_(
        model,
        QATConfig(activation_config=activation, weight_config=weight, step="prepare"),
        filter_fn=_decoder_linears(model),
    )
    # The embedding and lm_head become int8 weight-only, so only their weights are
    # fake-quantized; a tied weight is fake-quantized in both of its uses.
    quantize_(model, QATConfig(weight_config=weight, step="prepare"), filter_fn=_only(embeddings))
    return model


def convert_qat(model: nn.Module, method: str, bits: int = 8) -> nn.Module:
    """Turn a model from `prepare_qat` into the real quantized format of `quantize_ptq(method)`."""
    _fake_quant_configs(method, bits)
    is_fake = lambda module, fqn: isinstance(module, (FakeQuantizedLinear, FakeQuantizedEmbedding))
    # Without a base config, convert only swaps back to plain nn.Linear / nn.Embedding
    # (sharing the trained Parameters, so ties survive); PTQ then gives the same format.
    quantize_(model, QATConfig(step="convert"), filter_fn=is_fake)
    return quantize_ptq(model, method, bits)


def save_quantized(model: nn.Module, directory: str, method: str, bits: int = 8, group_size: int = 32) -> None:
    """Write config.json (with transformers' TorchAoConfig), model.safetensors (torchao's tensors, flattened
    with their metadata) and quantization.json, so that AutoModelForCausalLM.from_pretrained(directory) loads it."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from transformers import TorchAoConfig

    _check(method, bits)
    os.makedirs(directory, exist_ok=True)
    # What from_pretrained needs to know to rebuild the quantized tensors (their own metadata says the rest).
    layout = {"_default": linear_config(method, bits, group_size), "model.embed_tokens": Int8WeightOnlyConfig()}
    if not _is_tied(model) and model.get_output_embeddings() is not None:
        layout["lm_head"] = Int8WeightOnlyConfig()
    # The dtype of the plain parameters (norms): from_pretrained builds the model in it, so a bf16 model
    # reloads as bf16 (the quantized tensors remember their own).
    plain = next(p for p in model.parameters() if type(p.data) is torch.Tensor)
    dtype, model.config.dtype = model.config.dtype, plain.dtype
    model.config.quantization_config = TorchAoConfig(FqnToConfig(layout), include_input_output_embeddings=True)
    try:
        model.config.save_pretrained(directory)
    finally:  # the model in memory stays as it was
        del model.config.quantization_config
        model.config.dtype = dtype
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    if _is_tied(model):
        state.pop("lm_head.weight", None)  # transformers ties it to the embedding again on load
    tensors, metadata = flatten_tensor_state_dict(state)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, "model.safetensors"), metadata={**metadata, "format": "pt"})
    with open(os.path.join(directory, QUANT_FILE), "w") as f:
        json.dump({"backend": "torchao", "method": method, "bits": bits, "group_size": group_size}, f, indent=2)


def load_quantized(directory: str) -> nn.Module:
    """A model written by `save_quantized`, through transformers' own torchao loader."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval()
