"""Post-training and quantization-aware int8/int4 quantization of HF causal LMs.

This is the only module of the framework that imports torchao: its API changes
between releases, so every use of it is kept here, behind a few functions.

Layout produced by every method:
- the decoder's nn.Linear layers get the method's format (e.g. int8 weights with
  dynamic int8 activations);
- the input embedding and the lm_head (tied or not) get int8 weight-only, per row.
  They hold a large share of a small model's parameters, so they must shrink for
  the artifact to; weight-only keeps the logits (the most sensitive output) close
  to fp32, and one per-row int8 tensor serves both the embedding lookup and the
  lm_head matmul when the two are tied.
"""

import json
import os

import torch
from torch import nn
from torchao.quantization import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    MappingType,
    quantize_,
)
from torchao.quantization.qat import (
    FakeQuantizedEmbedding,
    FakeQuantizedLinear,
    IntxFakeQuantizeConfig,
    QATConfig,
)
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

METHODS = ("int8_weight_only", "int8_dynamic", "int4_weight_only")

_WEIGHTS_FILE = "quantized_weights.pt"
_QUANT_FILE = "quantization.json"


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown quantization method {method!r}; expected one of {METHODS}")


def _ptq_config(method: str, group_size: int):
    _check_method(method)
    if method == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if method == "int8_dynamic":
        # Asymmetric per-token activations: the only per-token scheme torchao's QAT
        # can fake-quantize, so PTQ and QAT produce the same numerics.
        return Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC)
    return Int4WeightOnlyConfig(group_size=group_size)


def check_available(method: str) -> None:
    """Raise RuntimeError now, before any heavy work, if this machine cannot run `method`."""
    _check_method(method)
    if method == "int4_weight_only":
        probe = nn.Sequential(nn.Linear(256, 256, dtype=torch.bfloat16))
        try:
            quantize_(probe, _ptq_config(method, 128))
        except ImportError as e:
            raise RuntimeError(f"{method} is not available on this machine: torchao's int4 kernel is missing ({e})") from e


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


def _decoder_linears(model: nn.Module):
    """Filter for quantize_: every nn.Linear except the lm_head."""
    skip = {id(model.get_output_embeddings())}
    return lambda module, fqn: isinstance(module, nn.Linear) and id(module) not in skip


def _quantize_embeddings(model: nn.Module) -> None:
    tied = _is_tied(model)
    # A tied lm_head is left out: it gets the embedding's quantized weight below.
    modules = _embedding_modules(model)[: 1 if tied else 2]
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=_only(modules))
    if tied:
        # quantize_ gave the embedding a new Parameter; share it with the lm_head again.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def quantize_ptq(model: nn.Module, method: str, group_size: int = 128) -> nn.Module:
    """Quantize `model` in place with torchao (see the module docstring for the layout)."""
    config = _ptq_config(method, group_size)
    try:
        quantize_(model, config, filter_fn=_decoder_linears(model))
    except ImportError as e:
        # torchao's int4 tensors need an optional kernel package (mslk); it raises before
        # touching any layer, so the model is left unquantized.
        raise RuntimeError(
            f"{method} is not available on this machine: torchao's int4 kernel is missing ({e})"
        ) from e
    _quantize_embeddings(model)
    return model


def _fake_quant_configs(method: str):
    """(activation, weight) fake-quant configs numerically matching the PTQ format."""
    _check_method(method)
    if method == "int4_weight_only":
        raise RuntimeError("QAT is implemented for int8 methods only, not int4_weight_only")
    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    if method == "int8_dynamic":
        return IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False), weight
    return None, weight


def prepare_qat(model: nn.Module, method: str) -> nn.Module:
    """Swap in fake-quantized Linear/Embedding modules (in place); the model stays trainable."""
    activation, weight = _fake_quant_configs(method)
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


def convert_qat(model: nn.Module, method: str) -> nn.Module:
    """Turn a model from `prepare_qat` into the real quantized format of `quantize_ptq(method)`."""
    _check_method(method)
    is_fake = lambda module, fqn: isinstance(module, (FakeQuantizedLinear, FakeQuantizedEmbedding))
    # Without a base config, convert only swaps back to plain nn.Linear / nn.Embedding
    # (sharing the trained Parameters, so ties survive); PTQ then gives the same format.
    quantize_(model, QATConfig(step="convert"), filter_fn=is_fake)
    return quantize_ptq(model, method)


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers missing from state_dict (e.g. RoPE inv_freq), whose dtype depends on how the
    model was built (`.to(bfloat16)` casts them, `from_pretrained(dtype=...)` does not)."""
    persistent = model.state_dict().keys()
    return {name: b for name, b in model.named_buffers() if name not in persistent}


def save_quantized(model: nn.Module, directory: str, method: str, group_size: int = 128) -> None:
    """Write config.json, quantization.json and the quantized weights to `directory`."""
    _check_method(method)
    os.makedirs(directory, exist_ok=True)
    model.config.save_pretrained(directory)
    with open(os.path.join(directory, _QUANT_FILE), "w") as f:
        json.dump({"method": method, "group_size": group_size}, f, indent=2)
    # torch.save keeps torchao tensor subclasses and stores a tied weight once.
    # The buffers are saved too, so that a reload reproduces the logits exactly.
    weights = {"state_dict": model.state_dict(), "buffers": _non_persistent_buffers(model)}
    torch.save(weights, os.path.join(directory, _WEIGHTS_FILE))


def load_quantized(directory: str) -> nn.Module:
    """Rebuild a model written by `save_quantized`."""
    with open(os.path.join(directory, _QUANT_FILE)) as f:
        _check_method(json.load(f)["method"])
    config = AutoConfig.from_pretrained(directory)
    # torchao registers its tensor classes as safe globals, so no arbitrary unpickling.
    weights = torch.load(os.path.join(directory, _WEIGHTS_FILE), weights_only=True, map_location="cpu")
    with no_init_weights():  # every weight is replaced below; skip the random init
        model = AutoModelForCausalLM.from_config(config)
    # The saved tensors carry their whole quantization format, so assigning them
    # rebuilds the quantized structure without re-running quantize_.
    model.load_state_dict(weights["state_dict"], assign=True)
    model.tie_weights()  # assign=True gave each tied name its own Parameter
    for name, buffer in weights["buffers"].items():
        module_name, _, buffer_name = name.rpartition(".")
        model.get_submodule(module_name).register_buffer(buffer_name, buffer, persistent=False)
    return model.eval()


def model_size_bytes(directory: str) -> int:
    """Total size of the files under `directory`."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(directory)
        for name in names
    )
