"""Text from every kind of artifact (framework.generate), as a Python function and through recipes/generate.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from framework.artifacts import model_format
from framework.generate import generate_text, sampler
from framework.runtimes import generate_ids, open_runtime
from framework.stages import STAGES
from tests.cli_runner import RecipeRunner
from tests.conftest import COMMON, FAST, compose_config

PROMPT = "The list"

# name: (stage kind, overrides): every artifact kind the framework writes, each from the trained nano model
# (distill: its teacher), one-shot where the stage allows it.
KINDS = {
    "pruned": ("prune", ["prune=magnitude", "prune.sparsity=0.5"]),
    "structured": ("prune", ["prune=structured", "prune.heads_ratio=0.5", "prune.mlp_ratio=0.25"]),
    "lowrank": ("lowrank", ["lowrank.energy=null", "lowrank.rank=8"]),
    "shared": ("share", ["share.group_size=2"]),
    "quantized_torchao": ("quantize", ["quantize=int8_weight_only"]),
    "quantized_onnx": ("quantize", ["quantize=int8_dynamic", "quantize.backend=onnxruntime"]),
    "distilled": ("distill", ["distill.num_layers=2", "trainer.max_steps=3"]),
    "gguf": ("export", ["export=gguf", "export.outtype=Q8_0"]),
    "onnx": ("export", ["export=onnx", "export.bits=8"]),
}
EXPECTED_FORMAT = {"pruned": "dense", "structured": "dense", "distilled": "dense", "lowrank": "lowrank", "shared": "shared",
                   "quantized_torchao": "quantized", "quantized_onnx": "onnx", "gguf": "gguf", "onnx": "onnx"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{name: model directory} for the dense model and every kind made from it."""
    root = tmp_path_factory.mktemp("kinds")
    few = "data.max_val_blocks=2"  # the stages' own measurements are not what this file tests
    STAGES["train"](compose_config("train", [*FAST, few, "trainer.max_steps=20", "optimizer.lr=3e-3"], run_dir=str(root / "dense")))
    for name, (kind, overrides) in KINDS.items():
        source = "distill.teacher" if kind == "distill" else "input"
        STAGES[kind](compose_config(kind, [*COMMON, few, f"{source}={root / 'dense'}", *overrides], run_dir=str(root / name)))
    return {name: root / name / "model" for name in ["dense", *KINDS]}


@pytest.mark.parametrize("name", ["dense", *KINDS])
def test_generate_works_on_every_artifact_kind(made, name):
    assert model_format(str(made[name])) == EXPECTED_FORMAT.get(name, "dense")
    pieces = []
    result = generate_text(str(made[name]), PROMPT, max_new_tokens=6, temperature=0.8, top_p=0.95, seed=0, stream=pieces.append)
    assert 1 <= result["new_tokens"] <= 6
    assert "".join(pieces) == result["text"] and result["text"]  # streamed piece by piece, nothing lost
    assert result["runtime"] == {"gguf": "torch eager (GGUF dequantized to fp32 by transformers)", "onnx": "onnxruntime", "quantized_onnx": "onnxruntime"}.get(name, "torch eager")


def test_the_cpu_int8_artifact_also_loads_in_plain_transformers(made):
    """quantize=int8_dynamic on a CPU runs in onnxruntime; its directory holds the torchao copy too."""
    plain = AutoModelForCausalLM.from_pretrained(made["quantized_onnx"]).eval()
    assert type(plain.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    ids = AutoTokenizer.from_pretrained(made["quantized_onnx"])(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch_logits = plain(input_ids=ids).logits
    ort_logits = open_runtime(str(made["quantized_onnx"])).logits(ids)
    # Two int8 schemes of one model (torchao per row, MatMulNBits in blocks of 32): the same next token nearly everywhere.
    assert (torch_logits.argmax(-1) == ort_logits.argmax(-1)).float().mean() >= 0.8


def test_greedy_decoding_with_the_cache_matches_transformers_generate(made):
    """prefill + one-token decode steps through the KV cache give transformers' own greedy continuation."""
    model = AutoModelForCausalLM.from_pretrained(made["dense"]).eval()
    ids = AutoTokenizer.from_pretrained(made["dense"])(PROMPT, return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, ids.shape[1]:]
    ours = torch.cat(list(generate_ids(open_runtime(str(made["dense"])), ids, 10)))
    assert ours.tolist() == expected.tolist()


def test_a_seed_repeats_its_text_and_top_p_near_zero_is_greedy(made):
    directory = str(made["dense"])
    sampled = [generate_text(directory, PROMPT, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=seed)["text"] for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    greedy = generate_text(directory, PROMPT, max_new_tokens=12, temperature=0)["text"]
    assert generate_text(directory, PROMPT, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3)["text"] == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {sampler(1.0, 0.75, seed)(logits).item() for seed in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3: the first two tokens, never the others


def test_the_recipe_streams_the_prompt_and_its_continuation(made):
    runner = RecipeRunner()
    try:
        ok = runner.run("generate", f"input={made['onnx'].parent}", f"prompt={PROMPT}", "max_new_tokens=5", "temperature=0")
        bad = runner.run("generate", f"input={made['dense'].parent}", f"prompt={PROMPT}", "top_p=0")
    finally:
        runner.close()
    assert ok.returncode == 0, ok.stderr[-2000:]
    expected = generate_text(str(made["onnx"]), PROMPT, max_new_tokens=5, temperature=0)
    assert ok.stdout == PROMPT + expected["text"] + "\n"
    assert f"[{expected['new_tokens']} tokens in onnxruntime" in ok.stderr
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: top_p: ")
