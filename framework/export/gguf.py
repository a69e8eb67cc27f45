"""A Llama-architecture model and its byte-level BPE tokenizer as one GGUF file that llama.cpp and Ollama
run, written with the `gguf` package (gguf-py, from llama.cpp) the way llama.cpp's convert_hf_to_gguf.py
writes it: the same metadata keys, tensor names (blk.N.attn_q, ...), Q/K rows in llama.cpp's RoPE layout,
the tokenizer inside.

Outtypes: F16, BF16, Q8_0 and Q4_0 for the 2-D weights; norms stay F32. A weight whose rows are not a
multiple of the 32-value quant block is written F16 (llama_tiny's 688-wide MLP, say); with Q4_0 the output
matrix (the token embedding when tied) stays Q8_0, as llama-quantize keeps it.
"""

from __future__ import annotations

import json

import torch

OUTTYPES = ("F16", "BF16", "Q8_0", "Q4_0")


def unsupported(config, tokenizer=None) -> str | None:
    """Why this model cannot be written as a llama.cpp GGUF (None when it can)."""
    if config.model_type != "llama":
        return f"GGUF export writes Llama-architecture models; this one is '{config.model_type}'"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"RoPE scaling '{rope.get('rope_type')}' is not written (only the default RoPE)"
    if tokenizer is not None:
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        pre = backend.get("pre_tokenizer") or {}
        kinds = [p["type"] for p in pre.get("pretokenizers", [pre])]
        if backend["model"]["type"] != "BPE" or kinds != ["ByteLevel"]:
            return f"the tokenizer ({backend['model']['type']}, pre-tokenizers {kinds}) is not a byte-level BPE that llama.cpp reads as 'gpt2'"
    return None


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _llama_cpp_rope_layout(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Q/K rows from transformers' rotate-half RoPE pairs (i, i + d/2) to llama.cpp's interleaved (2i, 2i+1)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):  # one entry per embedding row, padded like convert_hf_to_gguf.py
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = backend["model"]["merges"]
    if merges and not isinstance(merges[0], str):  # newer tokenizers store pairs; llama.cpp reads "a b", with a space as U+0120
        merges = [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    # What the tokenizer does with add_special_tokens=True, so llama.cpp tokenizes prompts the same way.
    with_special, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(with_special[:1] != plain[:1])
    writer.add_add_eos_token(with_special[-1:] != plain[-1:])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model, tokenizer, path: str, outtype: str = "F16", name: str = "model") -> dict[str, str]:
    """Write `model` (a dense Llama) and `tokenizer` to `path`; returns {tensor name: its GGML type}."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    why = unsupported(model.config, tokenizer)
    if why:
        raise ValueError(why)
    tensor_type, file_type = {
        "F16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
        "BF16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
        "Q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
        "Q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    }[outtype]
    output_type = Q.Q8_0 if tensor_type == Q.Q4_0 else tensor_type
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tied = model.get_output_embeddings() is None or model.get_output_embeddings().weight is model.get_input_embeddings().weight

    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    written = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd when there is no output.weight
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name}")
        tensor = tensor.detach().float()
        if name.startswith("blk.") and ".attn_q." in name:
            tensor = _llama_cpp_rope_layout(tensor, heads)
        elif name.startswith("blk.") and ".attn_k." in name:
            tensor = _llama_cpp_rope_layout(tensor, kv_heads)
        data = tensor.contiguous().numpy()
        if data.ndim == 1 or name.endswith("_norm.weight"):
            kind = Q.F32
        elif name == "output.weight" or (tied and name == "token_embd.weight"):
            kind = output_type
        else:
            kind = tensor_type
        try:
            packed = gguf.quants.quantize(data, kind)
        except gguf.QuantError:  # rows not a multiple of the 32-value block
            kind = Q.F16
            packed = gguf.quants.quantize(data, kind)
        writer.add_tensor(name, packed, raw_dtype=kind)
        written[name] = kind.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
