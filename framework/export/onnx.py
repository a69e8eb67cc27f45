"""A causal LM as one ONNX graph with its KV cache as inputs and outputs, optionally with 8-, 4- or 2-bit
weights for onnxruntime's MatMulNBits kernel: the int8 format that decodes faster than torch on a CPU.

Graph: inputs input_ids, attention_mask, position_ids, num_logits_to_keep (a scalar: logits for that many
last positions) and past_key_values.<i>.key/.value ([batch, kv heads, past, head dim]; empty for a
prefill); outputs logits and present.<i>.key/.value. One graph serves perplexity, prefill and decode (framework.runtimes.OrtRuntime).

Route: torch.onnx.export with the TorchScript exporter (dynamo=False) on a wrapper that builds a
DynamicCache from the flat past tensors. The dynamo exporter works too with torch 2.13 and transformers
5.24, but takes ~5x longer (160 s for SmolLM2-135M against 35 s) and its graph decodes no faster once
onnxruntime has optimized it; optimum-onnx 0.1.0 does not import with transformers 5.24. The traced
graph is checked against torch at several batch, prompt and cache lengths (tests/test_export.py).

Quantization (bits=8|4|2): onnxruntime's MatMulNBitsQuantizer on every MatMul with a weight, symmetric,
blocks of `block_size` along the input dimension, accuracy_level=4: activations are quantized to int8 per
block at run time, so the matmuls run on int8 dot products (VNNI/AMX); accuracy level 1 (fp32 compute) is
~20x slower. The output projection keeps 8 bits whatever `bits` (as llama.cpp's Q4_0 does), and a tied
input embedding reads the output projection's int8 blocks instead of keeping its own fp32 table.
(quantize_dynamic's per-tensor activation scale costs SmolLM2 +60% perplexity: not used.)
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import torch

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
BITS = (2, 4, 8)  # what MatMulNBits holds

log = logging.getLogger(__name__)


class _WithCache(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, num_logits_to_keep, *past) -> (logits, *present), with
    past flat per layer (k, v) and logits for the last `num_logits_to_keep` positions (a prefill needs one)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, num_logits_to_keep, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])), config=self.model.config)
        length = input_ids.shape[1]
        keep = torch.arange(length - num_logits_to_keep, length)  # positions, as a tensor: traced, not a constant
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=keep)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a decoder config (Llama and GPT-2 name them differently)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def _trace(model, path: str) -> None:
    layers, kv_heads, head_dim = kv_shape(model.config)
    # Sample shapes other than 0 and 1 (which tracing could mistake for constants): batch 2, 3 new tokens, 5 cached.
    batch, new, cached = 2, 3, 5
    inputs = (
        torch.randint(0, model.config.vocab_size, (batch, new)),
        torch.ones(batch, cached + new, dtype=torch.long),
        torch.arange(cached, cached + new).expand(batch, new).contiguous(),
        torch.tensor(2),
        *(torch.zeros(batch, kv_heads, cached, head_dim) for _ in range(2 * layers)),
    )
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [name.replace("past_key_values", "present") for name in past]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"}, "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past"} for name in past})
    axes.update({name: {0: "batch", 2: "total"} for name in present})
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            _WithCache(model.eval()), inputs, path, dynamo=False, input_names=["input_ids", "attention_mask", "position_ids", "num_logits_to_keep", *past],
            output_names=["logits", *present], dynamic_axes=axes, opset_version=17,
        )


def export_onnx(model, directory: str, bits: int | None = None, block_size: int = 64) -> None:
    """Write `directory`/model.onnx (+ model.onnx.data) and config.json; `bits`: MatMulNBits weights. A sequence
    classifier is written as the graph of its logits (export_classifier_onnx)."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return export_classifier_onnx(model, directory, bits)
    import onnx

    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with tempfile.TemporaryDirectory(prefix="onnx-export-") as scratch:
        traced = os.path.join(scratch, MODEL_FILE)
        _trace(model, traced)
        graph = onnx.load(traced)
    if bits:
        graph = quantize_weights(graph, bits, block_size, model.config.vocab_size)
    if tied:
        share_embedding(graph, model.config.vocab_size)
    onnx.save(graph, os.path.join(directory, MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
    model.config.save_pretrained(directory)


def quantize_weights(graph, bits: int, block_size: int, vocab_size: int):
    """MatMulNBits at `bits` for every weight MatMul, the output projection (N = vocab) at 8 bits."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    widths = {init.name: init.dims[-1] for init in graph.graph.initializer if len(init.dims) == 2}
    output = [node.name for node in graph.graph.node if node.op_type == "MatMul" and widths.get(node.input[1]) == vocab_size]
    # The other weights at `bits` first, then what is left (the output projection) at 8 bits.
    for pass_bits, exclude in ((bits, output), (8, [])) if bits != 8 else ((8, []),):
        config = DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=True, accuracy_level=4, bits=pass_bits, op_types_to_quantize=("MatMul",),
            quant_format=QuantFormat.QOperator,
        )
        quantizer = MatMulNBitsQuantizer(graph, algo_config=config, nodes_to_exclude=exclude)
        quantizer.process()
        graph = quantizer.model.model
    return graph


def share_embedding(graph, vocab_size: int) -> None:
    """Make the token-embedding lookup read the output projection's weight (the two are tied), so the table
    is stored once: the traced graph holds it twice, as the lookup's table and as the projection's
    transposed matrix. fp32: gather columns of that matrix. Quantized: gather the rows' int8 blocks and
    scales of the MatMulNBits weight, then (q - 128) * scale (symmetric 8 bits; other widths keep the table)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, weights = graph.graph.node, {init.name: init for init in graph.graph.initializer}
    lookup = next(n for n in nodes if n.op_type == "Gather" and n.input[0] in weights and len(weights[n.input[0]].dims) == 2 and weights[n.input[0]].dims[0] == vocab_size)
    table, ids, hidden = weights[lookup.input[0]], lookup.input[1], weights[lookup.input[0]].dims[1]

    def constant(name, value):
        graph.graph.initializer.append(numpy_helper.from_array(np.asarray(value), f"embedding_{name}"))
        return f"embedding_{name}"

    quantized = next((n for n in nodes if n.op_type == "MatMulNBits" and _attribute(n, "N") == vocab_size), None)
    if quantized is None:
        projection = next(n for n in nodes if n.op_type == "MatMul" and n.input[1] in weights and list(weights[n.input[1]].dims) == [hidden, vocab_size])
        new = [
            helper.make_node("Gather", [projection.input[1], ids], ["embedding_columns"], axis=1),  # [hidden, batch, sequence]
            helper.make_node("Transpose", ["embedding_columns"], [lookup.output[0]], perm=[1, 2, 0]),
        ]
    elif _attribute(quantized, "bits") == 8 and not (len(quantized.input) > 3 and quantized.input[3]):
        block = _attribute(quantized, "block_size")
        blocks = -(-hidden // block)
        padded = blocks * block != hidden
        new = [
            helper.make_node("Gather", [quantized.input[1], ids], ["embedding_q"], axis=0),  # [batch, sequence, blocks, block] uint8
            helper.make_node("Reshape", [quantized.input[2], constant("scale_shape", np.array([vocab_size, blocks, 1], np.int64))], ["embedding_scales"]),
            helper.make_node("Gather", ["embedding_scales", ids], ["embedding_s"], axis=0),  # [batch, sequence, blocks, 1]
            helper.make_node("Cast", ["embedding_q"], ["embedding_f"], to=TensorProto.FLOAT),
            helper.make_node("Sub", ["embedding_f", constant("zero_point", np.array(128, np.float32))], ["embedding_c"]),
            helper.make_node("Mul", ["embedding_c", "embedding_s"], ["embedding_blocks"]),
            helper.make_node("Shape", [ids], ["embedding_ids_shape"]),
            helper.make_node("Concat", ["embedding_ids_shape", constant("minus_one", np.array([-1], np.int64))], ["embedding_shape"], axis=0),
            helper.make_node("Reshape", ["embedding_blocks", "embedding_shape"], ["embedding_padded" if padded else lookup.output[0]]),
        ]
        if padded:  # the last block of each row was padded to the block size
            ends = [constant("start", np.array([0], np.int64)), constant("end", np.array([hidden], np.int64)), constant("axis", np.array([-1], np.int64))]
            new.append(helper.make_node("Slice", ["embedding_padded", *ends], [lookup.output[0]]))
    else:
        return
    position = list(nodes).index(lookup)
    nodes.remove(lookup)
    for offset, node in enumerate(new):
        nodes.insert(position + offset, node)
    graph.graph.initializer.remove(table)


def _attribute(node, name: str):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


# --- sequence classifiers ---------------------------------------------------------------------------------------
#
# An encoder classifier (BERT, MiniLM, RoBERTa) as one graph: input_ids, attention_mask and, where the model has
# segments, token_type_ids ([batch, sequence]) -> logits [batch, labels]. int8 (bits=8) is onnxruntime's
# quantize_dynamic, the classic CPU route for BERT: int8 weights per output channel for every MatMul and the
# embedding tables, activations quantized per tensor at run time. Measured on the finetuned all-MiniLM-L6-v2
# (391 val examples, one thread): the same accuracy as torch, a quarter of the size, ~5x faster than torch eager
# and ~2.4x faster than fp32 onnxruntime. MatMulNBits (the LM route above) left the embeddings in fp32 (60 MB of
# 91) and ran no faster than fp32 here; per-tensor weights lost a point of accuracy.

CLASSIFIER_BITS = (8,)


def classifier_inputs(config) -> list[str]:
    """The graph's inputs: token_type_ids only for a model with segments (BERT's type_vocab_size > 1)."""
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if getattr(config, "type_vocab_size", 0) > 1 else [])


class _Logits(torch.nn.Module):
    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs))).logits


def export_classifier_onnx(model, directory: str, bits: int | None = None) -> None:
    """Write `directory`/model.onnx (+ model.onnx.data) and config.json of a sequence classifier; bits=8: int8."""
    import warnings

    import onnx

    names = classifier_inputs(model.config)
    # Batch 2 of 7 tokens, the second padded: tracing sees a real mask, and no dimension of size 0 or 1.
    sample = {"input_ids": torch.randint(0, model.config.vocab_size, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3]), "token_type_ids": torch.zeros(2, 7, dtype=torch.long)}
    with tempfile.TemporaryDirectory(prefix="onnx-export-") as scratch:
        traced = os.path.join(scratch, MODEL_FILE)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                _Logits(model.eval(), names), tuple(sample[n] for n in names), traced, dynamo=False, input_names=names, output_names=["logits"],
                dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}}, opset_version=17,
            )
        if bits:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized, root = os.path.join(scratch, "int8.onnx"), logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # it logs a hint to the root logger ("consider pre-processing") on every call
            try:
                quantize_dynamic(traced, quantized, weight_type=QuantType.QInt8, per_channel=True)
            finally:
                root.setLevel(level)
            traced = quantized
        graph = onnx.load(traced)
    onnx.save(graph, os.path.join(directory, MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
    model.config.save_pretrained(directory)
