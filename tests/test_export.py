"""The export stage: GGUF (read back with transformers' GGUF loader) and ONNX (run in onnxruntime), what each
keeps of the source model, and the artifact kinds a format cannot hold, refused before any work."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from framework.artifacts import read_metrics
from framework.errors import ConfigError
from framework.models import load_model_dir
from framework.runtimes import generate_ids, load_gguf, open_runtime
from framework.stages import STAGES
from tests.conftest import COMMON, FAST, compose_config

TEXT = "The built-in function len() returns the number of items of a list."


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A 2-layer Llama trained enough that perplexity means something, and a low-rank artifact made from it."""
    root = tmp_path_factory.mktemp("export")
    STAGES["train"](compose_config("train", [*FAST, "trainer.max_steps=80", "optimizer.lr=3e-3"], run_dir=str(root / "trained")))
    STAGES["lowrank"](compose_config("lowrank", [*COMMON, f"input={root / 'trained'}", "lowrank.energy=null", "lowrank.rank=16"], run_dir=str(root / "lowrank")))
    return root


def export(root, name, *overrides, source="trained"):
    cfg = compose_config("export", [*COMMON, f"input={root / source}", *overrides], run_dir=str(root / name))
    return STAGES["export"](cfg)


def source_logits(root, source="trained"):
    model = load_model_dir(str(root / source / "model")).eval()
    ids = AutoTokenizer.from_pretrained(root / source / "model")(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return ids, model(input_ids=ids).logits


@pytest.mark.parametrize("source", ["trained", "lowrank"])
def test_gguf_f16_read_back_by_transformers_gives_the_source_logits(root, source):
    metrics = export(root, f"gguf_f16_{source}", "export=gguf", "export.outtype=F16", source=source)
    ids, expected = source_logits(root, source)
    with torch.no_grad():
        actual = load_gguf(str(root / f"gguf_f16_{source}" / "model"))(input_ids=ids).logits
    # F16 weights: every logit within 0.5% of the source's logit range (measured: ~0.03%); the argmax is kept.
    assert (actual - expected).abs().max() <= 5e-3 * (expected.max() - expected.min())
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))
    assert metrics["runtime"].startswith("torch eager (GGUF") and metrics["outtype"] == "F16"


@pytest.mark.parametrize("outtype, margin", [("Q8_0", 0.02), ("Q4_0", 0.10)])
def test_gguf_quantized_perplexity_within_its_margin(root, outtype, margin):
    metrics = export(root, f"gguf_{outtype}", "export=gguf", f"export.outtype={outtype}")
    source = read_metrics(str(root / "trained"))
    assert abs(metrics["val_ppl"] / source["val_ppl"] - 1) < margin, (metrics["val_ppl"], source["val_ppl"])
    assert metrics["size_bytes"] < 0.5 * source["size_bytes"]


def test_gguf_file_holds_llama_cpp_names_types_and_the_tokenizer(root):
    import gguf

    export(root, "gguf_Q8_0", "export=gguf", "export.outtype=Q8_0")  # (made by the test above when it ran first)
    path = next((root / "gguf_Q8_0" / "model").glob("*.gguf"))
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["blk.0.ffn_down.weight"] == "F16"  # 344 inputs per row: not a multiple of Q8_0's 32-value blocks
    field = reader.fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "gpt2"
    # transformers rebuilds the tokenizer from the file alone: the same ids, the same text back
    ours = AutoTokenizer.from_pretrained(root / "trained" / "model")
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert theirs(TEXT)["input_ids"] == ours(TEXT)["input_ids"]
    assert theirs.decode(ours(TEXT)["input_ids"], skip_special_tokens=True) == TEXT


def test_onnx_fp32_decodes_as_torch_does(root):
    """The exported graph with its KV cache: the same logits as torch, and the same greedy tokens step by step."""
    export(root, "onnx_fp32", "export=onnx")
    ids, expected = source_logits(root)
    runtime = open_runtime(str(root / "onnx_fp32" / "model"))
    torch.testing.assert_close(runtime.logits(ids), expected, rtol=1e-4, atol=1e-4)
    torch_tokens = torch.cat(list(generate_ids(open_runtime(str(root / "trained" / "model")), ids.expand(3, -1), 12)))
    ort_tokens = torch.cat(list(generate_ids(runtime, ids.expand(3, -1), 12)))
    assert torch.equal(ort_tokens, torch_tokens)


@pytest.mark.parametrize("source", ["trained", "lowrank"])
def test_onnx_int8_perplexity_within_2_percent_at_a_third_of_the_size(root, source):
    metrics = export(root, f"onnx_int8_{source}", "export=onnx", "export.bits=8", source=source)
    reference = read_metrics(str(root / source))
    assert metrics["runtime"] == "onnxruntime" and metrics["bits"] == 8
    assert abs(metrics["val_ppl"] / reference["val_ppl"] - 1) < 0.02, (metrics["val_ppl"], reference["val_ppl"])
    assert metrics["size_bytes"] < 0.4 * reference["size_bytes"]
    graph = json.dumps([n.op_type for n in __import__("onnx").load(str(root / f"onnx_int8_{source}" / "model" / "model.onnx"), load_external_data=False).graph.node])
    assert "MatMulNBits" in graph


def test_what_a_format_cannot_hold_is_refused_before_any_work(root, tmp_path):
    quantized = tmp_path / "quantized"
    STAGES["quantize"](compose_config("quantize", [*COMMON, f"input={root / 'trained'}", "quantize=int8_weight_only", "data.max_val_blocks=2"], run_dir=str(quantized)))
    gpt2 = tmp_path / "gpt2"
    STAGES["train"](compose_config("train", [*COMMON, "model=gpt2_tiny", "model.num_layers=1", "trainer.max_steps=0", "data.max_val_blocks=2"], run_dir=str(gpt2)))
    cases = [
        (quantized, ["export=gguf"], "input", "holds a quantized model"),
        (quantized, ["export=onnx"], "input", "holds a quantized model"),
        (gpt2, ["export=gguf"], "export.format", "Llama-architecture"),
    ]
    for source, overrides, key, fragment in cases:
        cfg = compose_config("export", [*COMMON, f"input={source}", *overrides], run_dir=str(tmp_path / "refused"))
        with pytest.raises(ConfigError) as error:
            STAGES["export"].validate(cfg)
        assert error.value.key == key and fragment in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "refused").exists()
