"""The compression stages from artifact to artifact, on a model trained for the purpose."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from framework.artifacts import read_metrics
from framework.errors import ConfigError
from framework.models import load_model_dir
from framework.stages import STAGES
from tests.conftest import COMMON, FAST, compose_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-layer Llama trained on the stdlib docs: the input of every stage below."""
    root = tmp_path_factory.mktemp("stages")
    cfg = compose_config("train", [*FAST, "model=llama_tiny", "trainer.max_steps=100", "optimizer.lr=3e-3"], run_dir=str(root / "trained"))
    STAGES["train"](cfg)
    return root


def run_stage(kind, root, name, *overrides):
    cfg = compose_config(kind, [*COMMON, f"input={root / 'trained'}", *overrides], run_dir=str(root / name))
    return STAGES[kind](cfg)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M as an artifact (no training: max_steps=0 evaluates and writes it)."""
    root = tmp_path_factory.mktemp("smollm2")
    cfg = compose_config("train", [*SMOLLM2, "trainer.max_steps=0"], run_dir=str(root / "trained"))
    STAGES["train"](cfg)
    return root


SMOLLM2_DATA = [*COMMON, "data.block_size=128", "data.max_val_blocks=4"]
SMOLLM2 = [*SMOLLM2_DATA, "model=smollm2_135m"]


def test_wanda_and_sparsegpt_beat_magnitude_at_half_sparsity(smollm2):
    # Outlier input features, which Wanda's and SparseGPT's activation-aware scores protect, appear in
    # real pretrained LMs, not in a few-step toy: hence SmolLM2 here.
    ppl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        cfg = compose_config("prune", [*SMOLLM2_DATA, f"input={smollm2 / 'trained'}", f"prune={method}", "prune.sparsity=0.5", *(["prune.calibration_samples=8"] if method != "magnitude" else [])], run_dir=str(smollm2 / method))
        metrics = STAGES["prune"](cfg)
        assert metrics["prunable_sparsity"] == 0.5  # exact, every layer
        assert all(layer["sparsity"] == 0.5 for layer in metrics["layers"].values())
        ppl[method] = metrics["val_ppl"]
    dense = read_metrics(str(smollm2 / "trained"))["val_ppl"]
    assert dense < ppl["sparsegpt"], ppl
    assert ppl["wanda"] < 0.8 * ppl["magnitude"], ppl
    assert ppl["sparsegpt"] < 0.8 * ppl["magnitude"], ppl
    assert ppl["sparsegpt"] <= ppl["wanda"] * 1.02, ppl
    # A pruned artifact is a plain HF model, zeros included.
    reloaded = AutoModelForCausalLM.from_pretrained(smollm2 / "wanda" / "model")
    weight = reloaded.model.layers[0].mlp.up_proj.weight
    assert torch.count_nonzero(weight) == weight.numel() // 2


def test_magnitude_threshold_zeroes_exactly_the_weights_under_it(trained):
    from framework.compression.pruning import prunable_linears, weight_matrix

    threshold = 0.02
    source = {name: weight_matrix(layer).clone() for name, layer in prunable_linears(load_model_dir(str(trained / "trained" / "model"))).items()}
    metrics = run_stage("prune", trained, "prune_threshold", "prune=magnitude_threshold", f"prune.threshold={threshold}")
    pruned = prunable_linears(load_model_dir(str(trained / "prune_threshold" / "model")))
    for name, weight in source.items():
        under = weight.abs() < threshold
        after = weight_matrix(pruned[name])
        assert torch.equal(after == 0, under | (weight == 0)), name  # exactly the weights under the threshold
        assert torch.equal(after[~under], weight[~under]), name  # and nothing else changed
    expected = sum(int((w.abs() < threshold).sum()) for w in source.values()) / sum(w.numel() for w in source.values())
    assert metrics["prunable_sparsity"] == pytest.approx(expected, abs=1e-12) and 0.05 < expected < 0.95


def test_two_four_pattern_holds_in_every_group(trained):
    metrics = run_stage("prune", trained, "prune_24", "prune=wanda_2of4")
    assert metrics["n_m_ok"] and metrics["prunable_sparsity"] == 0.5


def test_recovery_finetune_keeps_the_sparsity_and_lowers_perplexity(trained):
    one_shot = run_stage("prune", trained, "prune_oneshot", "prune=magnitude", "prune.sparsity=0.6")
    recovered = run_stage("prune", trained, "prune_recovered", "prune=magnitude", "prune.sparsity=0.6", "trainer.max_steps=20", "optimizer.lr=3e-4", "scheduler.warmup_steps=5")
    assert all(layer["params"] - layer["nonzero"] == round(0.6 * layer["params"]) for layer in recovered["layers"].values())
    assert recovered["val_ppl"] < one_shot["val_ppl"]


def test_gradual_pruning_reaches_the_target_exactly(trained):
    metrics = run_stage("prune", trained, "prune_gradual", "prune=gradual", "prune.sparsity=0.5", "prune.end_step=10", "prune.every_n_steps=2", "trainer.max_steps=15")
    assert metrics["prunable_sparsity"] == 0.5


def test_structured_pruning_writes_a_smaller_config_that_transformers_loads(trained):
    metrics = run_stage("prune", trained, "prune_structured", "prune=structured", "prune.heads_ratio=0.25", "prune.mlp_ratio=0.5", "prune.drop_layers=1")
    source = read_metrics(str(trained / "trained"))
    assert metrics["params_total"] < 0.8 * source["params_total"]
    config = json.loads((trained / "prune_structured" / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["intermediate_size"] == 344
    model = AutoModelForCausalLM.from_pretrained(trained / "prune_structured" / "model")
    assert sum(p.numel() for p in model.parameters()) == metrics["params_total"]


def test_lowrank_shrinks_the_model_and_reloads_through_the_framework(trained):
    metrics = run_stage("lowrank", trained, "lowrank", "lowrank.energy=null", "lowrank.rank=32")
    assert metrics["params_total"] < read_metrics(str(trained / "trained"))["params_total"]
    assert metrics["lowrank_layers"] == 12  # 3 MLP projections in 4 layers
    model = load_model_dir(str(trained / "lowrank" / "model")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    logits = model(ids).logits
    assert torch.isfinite(logits).all()


def test_sharing_pairs_halves_the_decoder_and_reloads_both_ways_with_equal_logits(trained):
    from framework.compression.sharing import ties_hold

    source = load_model_dir(str(trained / "trained" / "model"))
    decoder = sum(p.numel() for p in source.model.layers.parameters())
    metrics = run_stage("share", trained, "share", "share.group_size=2")
    assert metrics["params_total"] == sum(p.numel() for p in source.parameters()) - decoder // 2  # 4 layers, 2 unique
    assert metrics["ties_hold"] and metrics["layer_groups"] == [[0, 1], [2, 3]]
    assert metrics["size_bytes_unique"] < 0.75 * 4 * sum(p.numel() for p in source.parameters())

    plain = AutoModelForCausalLM.from_pretrained(trained / "share" / "model").eval()  # every layer's weights on disk
    ours = load_model_dir(str(trained / "share" / "model")).eval()  # ties restored
    assert ties_hold(ours) and not hasattr(plain, "layer_groups")
    assert sum(p.numel() for p in ours.parameters()) == metrics["params_total"]
    ids = torch.randint(0, plain.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_sharing_recovery_finetune_keeps_the_ties_and_lowers_perplexity(trained):
    one_shot = run_stage("share", trained, "share_pairs", "share.group_size=2")
    recovered = run_stage("share", trained, "share_recovered", "share.group_size=2", "trainer.max_steps=30", "optimizer.lr=1e-3")
    assert recovered["ties_hold"] and recovered["params_total"] == one_shot["params_total"]
    assert recovered["val_ppl"] < one_shot["val_ppl"]
    plain = AutoModelForCausalLM.from_pretrained(trained / "share_recovered" / "model")
    trained_layers = plain.model.layers
    for first, second in ((0, 1), (2, 3)):  # the tied tensors are identical after training
        for (name, a), (_, b) in zip(trained_layers[first].state_dict().items(), trained_layers[second].state_dict().items()):
            assert torch.equal(a, b), (first, name)
    assert not torch.equal(trained_layers[0].mlp.up_proj.weight, trained_layers[2].mlp.up_proj.weight)


def test_int8_artifact_is_small_and_keeps_perplexity(trained):
    """Both backends: torchao (weight-only, and dynamic when asked) and onnxruntime (int8_dynamic's CPU default)."""
    source = read_metrics(str(trained / "trained"))
    runs = {"ort": ["quantize=int8_dynamic", "quantize.backend=onnxruntime"], "ao_dynamic": ["quantize=int8_dynamic", "quantize.backend=torchao"], "ao_weight_only": ["quantize=int8_weight_only"]}
    for name, overrides in runs.items():
        metrics = run_stage("quantize", trained, f"quant_{name}", *overrides)
        model = trained / f"quant_{name}" / "model"
        # The onnxruntime artifact also holds a torchao copy for plain transformers: the ONNX files alone count here.
        runtime_bytes = sum(f.stat().st_size for f in model.glob("model.onnx*")) if name == "ort" else metrics["size_bytes"]
        assert runtime_bytes <= 0.35 * source["size_bytes"], name
        assert abs(metrics["val_ppl"] / source["val_ppl"] - 1) < 0.02, name
        assert metrics["runtime"] == ("onnxruntime" if name == "ort" else "torch eager"), name
    assert (trained / "quant_ort" / "model" / "model.onnx").is_file()
    for name in ("ort", "ao_dynamic", "ao_weight_only"):  # plain transformers loads torchao's safetensors
        reloaded = AutoModelForCausalLM.from_pretrained(trained / f"quant_{name}" / "model")
        assert type(reloaded.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
        assert reloaded(torch.randint(0, 100, (1, 8))).logits.shape[-1] == reloaded.config.vocab_size


def test_qat_beats_ptq_at_the_same_format(trained):
    ptq = run_stage("quantize", trained, "ptq", "quantize=int8_dynamic", "quantize.backend=torchao")
    qat = run_stage("quantize", trained, "qat", "quantize=qat_int8_dynamic", "trainer.max_steps=10", "optimizer.lr=1e-4")
    assert qat["backend"] == ptq["backend"] == "torchao"
    assert qat["val_ppl"] < ptq["val_ppl"]
    assert qat["size_bytes"] == pytest.approx(ptq["size_bytes"], rel=0.01)


def test_fewer_bits_in_both_backends(trained):
    """quantize.bits in torchao (intx weights in groups of 32, loadable by plain transformers) and onnxruntime
    (MatMulNBits: fewer bits, smaller file). That fewer bits cost accuracy is tested on logits in
    test_quantization.py: this model's perplexity hardly depends on its decoder weights (2 bits: within 1%)."""
    ao4 = run_stage("quantize", trained, "ao4", "quantize=int4_weight_only")
    assert ao4["quantization"] == "int4_weight_only" and ao4["backend"] == "torchao"
    assert type(AutoModelForCausalLM.from_pretrained(trained / "ao4" / "model").model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    ort = {bits: run_stage("quantize", trained, f"ort{bits}", "quantize=int8_dynamic", "quantize.backend=onnxruntime", f"quantize.bits={bits}") for bits in (2, 4, 8)}
    assert ort[2]["size_bytes"] < ort[4]["size_bytes"] < ort[8]["size_bytes"]
    assert all(m["runtime"] == "onnxruntime" and m["quantization"] == f"int{bits}_dynamic" for bits, m in ort.items())


def test_onnxruntime_backend_refuses_what_it_cannot_run(trained):
    for overrides, key in ((["quantize=int8_weight_only", "quantize.backend=onnxruntime"], "quantize.method"), (["quantize=int8_dynamic", "quantize.bits=3", "quantize.backend=onnxruntime"], "quantize.bits")):
        with pytest.raises(ConfigError, match=key):
            run_stage("quantize", trained, "refused", *overrides)
    assert not (trained / "refused").exists()


def test_distilled_student_beats_the_same_student_trained_alone(trained):
    cfg = compose_config(
        "distill",
        [*FAST, f"distill.teacher={trained / 'trained'}", "distill.num_layers=2", "trainer.max_steps=40", "optimizer.lr=2e-3"],
        run_dir=str(trained / "distill"),
    )
    metrics = STAGES["distill"](cfg)
    assert metrics["params_total"] < metrics["teacher_params"]
    assert metrics["val_ppl"] < metrics["baseline_val_ppl"]


def test_distilling_across_vocabularies_is_refused(trained, tmp_path):
    other = compose_config("train", [*FAST, "model.vocab_size=2048", "trainer.max_steps=1"], run_dir=str(tmp_path / "other"))
    STAGES["train"](other)  # a model with its own 2048-token tokenizer
    cfg = compose_config(
        "distill",
        [*FAST, f"distill.teacher={trained / 'trained'}", "distill.student=config", "model=hf", f"model.path={tmp_path / 'other' / 'model'}", "trainer.max_steps=2"],
        run_dir=str(tmp_path / "distill"),
    )
    with pytest.raises(ValueError, match="4096.*2048|2048.*4096"):
        STAGES["distill"](cfg)
