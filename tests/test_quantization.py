import copy

import pytest
import torch
import transformers

from framework.artifacts import directory_size as model_size_bytes
from framework.compression.quantization import (
    BITS,
    METHODS,
    convert_qat,
    load_quantized,
    prepare_qat,
    quantize_ptq,
    save_quantized,
)

INT8_METHODS = ("weight_only", "dynamic")


def _config(vocab_size: int = 1536) -> transformers.LlamaConfig:
    # vocab 1536 x hidden 128: the tied embedding is ~21% of the parameters, like SmolLM2-135M.
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def fp32_model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_config()).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 1536, (2, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fp32_size(fp32_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fp32")
    fp32_model.save_pretrained(directory)
    return model_size_bytes(directory)


def _weight_formats(model) -> dict:
    """Per parameter: the tensor class and its activation-quantization settings."""
    return {
        name: (type(p).__name__, repr(getattr(p, "act_quant_kwargs", None)))
        for name, p in model.named_parameters(remove_duplicate=False)
    }


@pytest.mark.parametrize("method", INT8_METHODS)
def test_ptq_quantizes_every_linear_and_the_tied_embedding(fp32_model, method):
    model = quantize_ptq(copy.deepcopy(fp32_model), method)
    formats = _weight_formats(model)
    assert formats["model.layers.0.mlp.down_proj.weight"][0] == "Int8Tensor"
    assert formats["model.embed_tokens.weight"][0] == "Int8Tensor"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert formats["model.norm.weight"][0] == "Parameter"


@pytest.mark.parametrize("method", INT8_METHODS)
def test_ptq_logits_close_to_fp32(fp32_model, tokens, method):
    expected = _logits(fp32_model, tokens)
    actual = _logits(quantize_ptq(copy.deepcopy(fp32_model), method), tokens)
    assert _relative_error(actual, expected) < 0.05


@pytest.mark.parametrize("method", INT8_METHODS)
def test_save_load_is_small_and_exact(fp32_model, fp32_size, tokens, tmp_path, method):
    model = quantize_ptq(copy.deepcopy(fp32_model), method)
    save_quantized(model, str(tmp_path), method)
    assert model_size_bytes(str(tmp_path)) <= 0.35 * fp32_size

    reloaded = load_quantized(str(tmp_path))
    assert torch.equal(_logits(reloaded, tokens), _logits(model, tokens))
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert _weight_formats(reloaded) == _weight_formats(model)


def test_plain_transformers_loads_the_quantized_directory(fp32_model, tokens, tmp_path):
    """The artifact is transformers' own torchao format: AutoModelForCausalLM.from_pretrained, nothing of ours."""
    model = quantize_ptq(copy.deepcopy(fp32_model), "dynamic")
    save_quantized(model, str(tmp_path), "dynamic")
    assert not list(tmp_path.glob("*.pt"))  # safetensors, no pickles
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(plain.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    assert torch.equal(_logits(plain, tokens), _logits(model, tokens))


def test_bf16_untied_model_round_trips_exactly(tmp_path):
    config = _config(vocab_size=256)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    # Built in bf16 (not .to(bf16), which would also cast the RoPE buffers that from_pretrained keeps in fp32).
    model = quantize_ptq(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval(), "dynamic")
    assert type(model.lm_head.weight).__name__ == "Int8Tensor"
    assert type(model.model.embed_tokens.weight).__name__ == "Int8Tensor"
    save_quantized(model, str(tmp_path), "dynamic")
    tokens = torch.randint(0, 256, (1, 8))
    assert torch.equal(_logits(load_quantized(str(tmp_path)), tokens), _logits(model, tokens))


def test_unknown_method_or_bits_lists_the_choices(fp32_model, tmp_path):
    for call in (
        lambda: quantize_ptq(copy.deepcopy(fp32_model), "fp2"),
        lambda: prepare_qat(copy.deepcopy(fp32_model), "fp2"),
        lambda: save_quantized(fp32_model, str(tmp_path), "fp2"),
    ):
        with pytest.raises(ValueError, match="dynamic"):
            call()
    with pytest.raises(ValueError, match="bits"):
        quantize_ptq(copy.deepcopy(fp32_model), "weight_only", bits=1)


@pytest.mark.parametrize("bits", (2, 4, 6))
def test_fewer_bits_cost_more_accuracy_and_reload_exactly(fp32_model, tokens, tmp_path, bits):
    """b-bit weights in groups (torchao's intx): error grows as bits shrink; the layer whose input width is
    not a multiple of the group (down_proj: 344) gets one scale per row instead."""
    expected = _logits(fp32_model, tokens)
    model = quantize_ptq(copy.deepcopy(fp32_model), "weight_only", bits=bits, group_size=32)
    error = _relative_error(_logits(model, tokens), expected)
    eight = _relative_error(_logits(quantize_ptq(copy.deepcopy(fp32_model), "weight_only"), tokens), expected)
    assert eight < error < 1.0
    assert type(model.model.layers[0].mlp.down_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    save_quantized(model, str(tmp_path), "weight_only", bits=bits, group_size=32)
    assert torch.equal(_logits(load_quantized(str(tmp_path)), tokens), _logits(model, tokens))


@pytest.mark.parametrize("method", INT8_METHODS)
def test_qat_trains_then_converts_to_the_ptq_format(method):
    config = _config(vocab_size=256)
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    source = transformers.LlamaForCausalLM(config)
    tokens = torch.randint(0, 256, (2, 16))
    model = prepare_qat(copy.deepcopy(source), method)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "FakeQuantizedLinear"
    assert type(model.model.embed_tokens).__name__ == "FakeQuantizedEmbedding"
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    fake_quantized = _logits(model.eval(), tokens)
    converted = convert_qat(model, method)
    ptq = quantize_ptq(source, method)
    assert _weight_formats(converted) == _weight_formats(ptq)
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    assert _relative_error(_logits(converted, tokens), fake_quantized) < 1e-4


def test_methods_constant():
    assert METHODS == ("weight_only", "dynamic") and BITS == (2, 3, 4, 5, 6, 7, 8)


def test_auto_backend_is_onnxruntime_for_int8_compute_on_a_cpu_and_torchao_on_cuda():
    """torchao's int8 runs slower than fp32 on a CPU (eager); onnxruntime's int8 kernels run faster."""
    from omegaconf import OmegaConf

    from framework.stages.quantize import QuantizeConfig, resolve_backend

    def backend(cuda, task="causal_lm", **values):
        return resolve_backend(OmegaConf.structured(QuantizeConfig(**values)), cuda, task)

    assert backend(False) == "onnxruntime" and backend(True) == "torchao"
    assert backend(False, method="weight_only") == "torchao"  # weight-only: fp compute, nothing for onnxruntime to speed up
    assert backend(False, bits=3) == "torchao" and backend(False, qat=True) == "torchao"
    assert backend(False, backend="torchao") == "torchao"
    # A classifier's graph: onnxruntime's dynamic int8 (quantize_dynamic); other widths stay with torchao.
    assert backend(False, task="classification") == "onnxruntime" and backend(False, task="classification", bits=4) == "torchao"
