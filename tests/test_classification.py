"""task=classification: the default encoder (all-MiniLM-L6-v2) on the default labeled corpus (standard-library
docstrings labeled by package), sentence pairs from a user's file, distillation into a smaller student, loading
the artifact in plain transformers, and bad labeled data refused in one line."""

import csv
import json
import os

import pytest
import torch

from framework import artifacts
from framework.errors import ConfigError
from framework.labeled import stdlib_topics
from framework.stages import STAGES

FAST = ["task=classification", "precision=32-true", "trainer.enable_progress_bar=false", "trainer.checkpoint_every_n_steps=1000"]


@pytest.fixture
def classify_config(tmp_path):
    """A composed train config for task=classification; pass more overrides."""
    from tests.conftest import compose_config

    def make(*overrides: str, run_dir=None):
        return compose_config("train", [*FAST, *overrides], run_dir=str(run_dir or tmp_path / "run"))

    return make


def metrics_of(stage_dir) -> dict:
    return json.loads((stage_dir / "metrics.json").read_text())


def most_frequent_share(metrics: dict) -> float:
    """The accuracy of always answering the most frequent class *of the val split* (the stricter baseline)."""
    rows = [sum(r) for r in metrics["confusion_matrix"]]
    return max(rows) / sum(rows)


# experiment=classify_compress, shortened: finetune → prune (structured) → distill (3 layers) → quantize (int8) → export.
PIPELINE = [
    "experiment=classify_compress",
    "+common.trainer.enable_progress_bar=false",
    "+common.precision.name=32-true",
    # The teacher and the students train their full preset steps (150 and 100): a shorter teacher is no better
    # than what its student learns alone, and then its soft targets cannot help (README: Text classification).
    "pipeline.stages.finetune.trainer.val_check_interval=150",
    "pipeline.stages.prune.trainer.max_steps=0",
    "+pipeline.stages.prune.prune.calibration_samples=16",
    "pipeline.stages.distill.trainer.val_check_interval=100",
]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    from framework.pipeline import run_pipeline
    from tests.conftest import compose_config

    run_dir = tmp_path_factory.mktemp("classify_compress")
    rows = run_pipeline(compose_config("pipeline", PIPELINE, run_dir=str(run_dir)))
    return run_dir, {r["stage"]: r for r in rows}


@pytest.mark.slow
def test_finetuned_encoder_beats_the_majority_class_by_a_wide_margin(pipeline_run):
    run_dir, _ = pipeline_run
    metrics = metrics_of(run_dir / "finetune")
    # 9 packages; the majority class of training is 6% of val, the most frequent val class about 22%.
    assert metrics["val_accuracy"] >= most_frequent_share(metrics) + 0.2
    assert metrics["val_accuracy"] >= metrics["majority_accuracy"] + 0.2
    assert metrics["val_accuracy"] > metrics["val_accuracy_start"] + 0.2
    assert 0 < metrics["val_macro_f1"] <= 1 and -1 <= metrics["val_mcc"] <= 1
    assert (run_dir / "finetune" / "confusion.png").stat().st_size > 0
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["val_examples"]
    with open(run_dir / "finetune" / "logs" / "metrics.csv") as f:  # logged at every validation, not only at the end
        accuracies = [r["val/accuracy"] for r in csv.DictReader(f) if r.get("val/accuracy")]
    assert len(accuracies) >= 2


@pytest.mark.slow
def test_artifact_loads_in_plain_transformers_and_predicts_the_same_labels(pipeline_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from framework.models import load_model_dir

    run_dir, _ = pipeline_run
    for stage in ("finetune", "prune", "distill"):
        model_dir = str(run_dir / stage / artifacts.MODEL)
        plain = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        assert list(plain.config.id2label.values()) == metrics_of(run_dir / stage)["labels"]
        texts = [e.text for e in stdlib_topics(["json", "logging", "xml"])[:24]]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        ours = load_model_dir(model_dir).eval()
        with torch.no_grad():
            assert torch.equal(plain(**batch).logits.argmax(-1), ours(**batch).logits.argmax(-1)), stage


@pytest.mark.slow
def test_structured_pruning_removes_layers_and_channels_and_keeps_most_accuracy(pipeline_run):
    run_dir, _ = pipeline_run
    teacher, pruned = metrics_of(run_dir / "finetune"), metrics_of(run_dir / "prune")
    config = json.loads((run_dir / "prune" / artifacts.MODEL / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (4, 1152)  # 6 - 2 layers, 1536 * 0.75
    assert pruned["params_total"] < 0.85 * teacher["params_total"]
    assert pruned["val_accuracy"] >= teacher["val_accuracy"] - 0.1


@pytest.mark.slow
def test_distilled_student_is_smaller_and_beats_the_same_student_without_a_teacher(pipeline_run):
    run_dir, rows = pipeline_run
    metrics = metrics_of(run_dir / "distill")
    student = json.loads((run_dir / "distill" / artifacts.MODEL / "config.json").read_text())
    assert student["num_hidden_layers"] == 3 and metrics["params_total"] < metrics["teacher_params"]
    assert {"baseline_val_accuracy", "baseline_val_macro_f1"} <= set(metrics)
    assert min(metrics["val_accuracy"], metrics["baseline_val_accuracy"]) >= most_frequent_share(metrics) + 0.15
    # The teacher's soft targets beat the labels alone for the same student, data and steps.
    assert metrics["val_accuracy"] > metrics["baseline_val_accuracy"] or metrics["val_macro_f1"] > metrics["baseline_val_macro_f1"]
    assert rows["distill"]["baseline_val_accuracy"] == metrics["baseline_val_accuracy"]  # in the report


@pytest.mark.slow
def test_int8_keeps_the_accuracy_runs_in_onnxruntime_and_the_report_shows_accuracy(pipeline_run):
    run_dir, rows = pipeline_run
    source, quantized, exported = (metrics_of(run_dir / name) for name in ("distill", "quantize", "export"))
    assert quantized["runtime"] == exported["runtime"] == "onnxruntime" and quantized["backend"] == "onnxruntime"
    assert abs(quantized["val_accuracy"] - source["val_accuracy"]) <= 0.01
    assert abs(exported["val_accuracy"] - source["val_accuracy"]) <= 0.005  # the fp32 graph computes what torch does
    onnx_bytes = {name: sum(f.stat().st_size for f in (run_dir / name / "model").glob("model.onnx*")) for name in ("quantize", "export")}
    assert onnx_bytes["quantize"] < 0.35 * onnx_bytes["export"]  # int8 weights and embedding tables
    assert {"latency_ms_per_example", "params_total"} <= set(quantized)
    report = (run_dir / "report.md").read_text()
    assert "val acc" in report and "val ppl" not in report
    assert "without a teacher reaches val accuracy" in report


@pytest.mark.slow
def test_int8_onnx_loads_in_plain_onnxruntime_and_agrees_with_its_torch_source(pipeline_run, docstrings):
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, _ = pipeline_run
    model_dir = run_dir / "quantize" / "model"
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer([d.text for d in docstrings[:48]], padding=True, truncation=True, max_length=128, return_tensors="np")
    (logits,) = session.run(["logits"], {i.name: encoded[i.name].astype(np.int64) for i in session.get_inputs()})
    source = AutoModelForSequenceClassification.from_pretrained(run_dir / "distill" / "model").eval()
    with torch.no_grad():
        expected = source(**{k: torch.from_numpy(v) for k, v in encoded.items()}).logits.argmax(-1).numpy()
    assert (logits.argmax(-1) == expected).mean() >= 0.9


def write_csv(path, rows, header):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def docstrings():
    return stdlib_topics(["json", "logging", "xml", "email"])


@pytest.mark.slow
def test_sentence_pairs_from_a_csv_file_train(classify_config, tmp_path, docstrings):
    """Is the second text a shortened copy of the first (half the pairs) or another docstring? A pair
    relation, not a property of either text alone: token_type_ids mark the two segments."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i, example in enumerate(docstrings[:400]):
        if i % 2:
            words = example.text.split()
            second, relation = " ".join(words[len(words) // 4:]), "same"
        else:
            other = (i + 1 + int(torch.randint(len(docstrings) - 1, (1,), generator=generator))) % len(docstrings)
            second, relation = docstrings[other].text, "different"
        rows.append((example.text, second, relation))
    path = write_csv(tmp_path / "pairs.csv", rows, ["first", "second", "relation"])
    cfg = classify_config("data=labeled_files", f"data.paths=[{path}]", "data.text_field=first", "data.text_pair_field=second",
                       "data.label_field=relation", "trainer.max_steps=40", "trainer.val_check_interval=40", run_dir=str(tmp_path / "pairs"))
    STAGES["train"](cfg)
    metrics = metrics_of(tmp_path / "pairs")
    assert metrics["labels"] == ["different", "same"]
    assert metrics["val_loss"] < metrics["val_loss_start"] and metrics["val_accuracy"] >= 0.9


def test_pairs_are_encoded_as_two_segments(tmp_path):
    from omegaconf import OmegaConf

    from framework.labeled import LabeledDataModule
    from framework.models import classifier_tokenizer
    from tests.conftest import compose_config

    path = write_csv(tmp_path / "pairs.csv", [(f"first text {i}", f"second text {i}", "ab"[i % 2]) for i in range(40)], ["a", "b", "y"])
    cfg = compose_config("train", ["task=classification", "data=labeled_files", f"data.paths=[{path}]", "data.text_field=a",
                                   "data.text_pair_field=b", "data.label_field=y", "data.val_fraction=0.3"])
    data = LabeledDataModule(cfg.data, classifier_tokenizer(cfg.model, cfg.paths.cache_dir), seed=0)
    example = data.train[0]
    assert set(example["token_type_ids"]) == {0, 1}
    batch = data.collate(data.train[:4])
    assert batch["input_ids"].shape[1] == max(len(e["input_ids"]) for e in data.train[:4])  # padded to the longest, not block_size
    assert OmegaConf.select(cfg, "data.text_pair_field") == "b"


def test_batches_are_bucketed_by_length_and_resume_exactly():
    from framework.labeled import BucketedBatchSampler

    lengths = [int(x) for x in torch.randint(5, 200, (2000,), generator=torch.Generator().manual_seed(1))]
    sampler = BucketedBatchSampler(lengths, batch_size=16, seed=3)
    batches = [b for _, b in zip(range(60), iter(sampler))]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 40  # random batches of 16 from 5..200 would spread over ~170 tokens
    resumed = BucketedBatchSampler(lengths, batch_size=16, seed=3, start=25)
    assert [b for _, b in zip(range(35), iter(resumed))] == batches[25:]


BAD_LABELED = {
    "missing label column": ([("some text here", "a"), ("other text", "b")] * 10, ["text", "category"], [], "data.label_field", "'label' is not a column"),
    "one class": ([(f"text {i}", "a") for i in range(20)], ["text", "label"], [], "data.label_field", "one class"),
    "empty text": ([("fine", "a"), ("  ", "b")] * 10, ["text", "label"], [], "data.text_field", "empty"),
    "label unseen in training": (
        [(f"text {i}", "ab"[i % 2]) for i in range(20)], ["text", "label"], [("x", "a"), ("y", "c")], "data.val_paths", "'c' appears in validation but never in training"
    ),
}


@pytest.mark.parametrize("case", BAD_LABELED)
def test_bad_labeled_data_is_refused_in_one_line_naming_the_key(case, classify_config, tmp_path):
    rows, header, val_rows, key, message = BAD_LABELED[case]
    path = write_csv(tmp_path / "train.csv", rows, header)
    extra = [f"data.val_paths=[{write_csv(tmp_path / 'val.csv', val_rows, header)}]"] if val_rows else []
    cfg = classify_config("data=labeled_files", f"data.paths=[{path}]", "trainer.max_steps=1", *extra, run_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError) as error:
        STAGES["train"](cfg)
    assert error.value.key == key
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "run" / artifacts.MODEL)


def test_labeled_data_under_the_language_model_task_is_refused(train_config):
    # train_config is the language-model task's
    with pytest.raises(ConfigError, match="add task=classification") as error:
        STAGES["train"].validate(train_config("data=stdlib_topics"))
    assert error.value.key == "data"


def test_classifier_distillation_refuses_language_model_losses(tmp_path):
    from tests.conftest import compose_config

    cfg = compose_config("distill", ["task=classification", f"distill.teacher={tmp_path}", "distill.loss=reverse_kl"])
    with pytest.raises(ConfigError, match="a classifier distils with forward_kl") as error:
        STAGES["distill"].check(cfg)
    assert error.value.key == "distill.loss"


def test_the_task_sets_distillations_defaults_and_the_command_line_still_wins(tmp_path):
    from tests.conftest import compose_config

    def soft_targets(*overrides):
        d = compose_config("distill", [f"distill.teacher={tmp_path}", *overrides]).distill
        return d.temperature, d.alpha

    assert soft_targets("task=classification") == (8.0, 1.0)  # soft targets alone, at a high temperature
    assert soft_targets("task=causal_lm") == (2.0, 0.5)
    assert soft_targets("task=classification", "distill.temperature=3", "task.distill_alpha=0.7") == (3.0, 0.7)
