"""The train stage: it learns, resumes exactly, writes a reloadable artifact, and scales to 2 processes."""

import json
import math
import os

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from framework.artifacts import is_complete, read_metrics
from framework.stages import STAGES
from framework.training import extra_callbacks


def train(cfg, callbacks=()):
    """The train stage as a user calls it from Python, with test callbacks added to its trainer."""
    with extra_callbacks(callbacks):
        return STAGES["train"](cfg)


class CaptureModel(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        self.model = pl_module.model


class InterruptAt(pl.Callback):
    """Simulates Ctrl-C after `step` optimizer steps."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_pretraining_lowers_val_loss_well_below_its_start(train_config):
    metrics = train(train_config("trainer.max_steps=100", "optimizer.lr=5e-3", "scheduler.warmup_steps=5"))
    # A random 4096-token model starts near ln(4096) = 8.3 nats; 100 steps of real text take off at least 2.
    assert metrics["val_loss_start"] > 7.5
    assert metrics["val_loss"] < metrics["val_loss_start"] - 2.0
    assert metrics["train_steps"] == 100
    assert metrics["train_tokens"] == 100 * 8 * 64
    assert metrics["train_tokens_per_s"] > 0


def test_artifact_reloads_in_transformers_with_identical_logits(train_config, tmp_path):
    capture = CaptureModel()
    train(train_config("trainer.max_steps=3"), callbacks=[capture])
    stage_dir = tmp_path / "run"
    assert is_complete(str(stage_dir))
    assert {"model", "metrics.json", "config.yaml", "fingerprint", "COMPLETE", "checkpoints"} <= set(os.listdir(stage_dir))
    metrics = read_metrics(str(stage_dir))
    for key in ("val_loss", "val_ppl", "params_total", "params_nonzero", "sparsity", "size_bytes", "runtime", "prefill_ms", "decode_tokens_per_s_b1", "decode_tokens_per_s_b8", "train_tokens_per_s", "wall_time_s"):
        assert key in metrics, key
    reloaded = AutoModelForCausalLM.from_pretrained(stage_dir / "model").eval()
    in_memory = capture.model.float().eval()
    ids = torch.randint(0, reloaded.config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, in_memory(ids).logits, rtol=0, atol=1e-6)


def test_rerunning_a_finished_run_does_no_training(train_config):
    cfg = train_config("trainer.max_steps=2")
    first = train(cfg)
    again = train(cfg, callbacks=[InterruptAt(0)])  # would raise if training started
    assert again == first


def test_interrupted_run_resumes_and_ends_where_an_uninterrupted_run_ends(train_config, tmp_path):
    overrides = ("trainer.max_steps=12", "trainer.checkpoint_every_n_steps=4", "optimizer.lr=3e-3")
    straight = CaptureModel()
    train(train_config(*overrides, run_dir=tmp_path / "straight"), callbacks=[straight])

    cut_cfg = train_config(*overrides, run_dir=tmp_path / "cut")
    with pytest.raises(SystemExit):  # Lightning turns Ctrl-C into a graceful exit after saving last.ckpt
        train(cut_cfg, callbacks=[InterruptAt(7)])
    assert not is_complete(str(tmp_path / "cut"))
    resumed = CaptureModel()
    train(cut_cfg, callbacks=[resumed])  # the same command again

    assert read_metrics(str(tmp_path / "cut"))["train_steps"] == 12
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    straight_loss = read_metrics(str(tmp_path / "straight"))["val_loss"]
    assert math.isclose(read_metrics(str(tmp_path / "cut"))["val_loss"], straight_loss, rel_tol=1e-5)


def test_checkpoints_of_another_config_are_set_aside_not_resumed(train_config, tmp_path):
    with pytest.raises(SystemExit):
        train(train_config("trainer.max_steps=6", "trainer.checkpoint_every_n_steps=2"), callbacks=[InterruptAt(3)])
    capture = CaptureModel()
    metrics = train(train_config("trainer.max_steps=6", "optimizer.lr=1e-2"), callbacks=[capture])
    assert metrics["train_tokens"] == 6 * 8 * 64  # all six steps trained here: nothing was resumed
    stale = [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoints.stale-")]
    assert len(stale) == 1 and (tmp_path / "run" / stale[0] / "last.ckpt").exists()


def test_non_finite_loss_stops_with_a_clear_message(train_config):
    from framework.errors import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf|-inf) at step"):
        train(train_config("trainer.max_steps=20", "optimizer.lr=1e30", "optimizer=sgd", "trainer.gradient_clip_val=null"))


def test_csv_log_has_loss_lr_and_throughput_every_step(train_config, tmp_path):
    train(train_config("trainer.max_steps=4", "trainer.val_check_interval=2"))
    header, *rows = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()
    for column in ("train/loss", "train/lr", "train/tokens_per_s", "train/mfu", "val/loss", "val/ppl"):
        assert column in header
    assert len([r for r in rows if r.split(",")[header.split(",").index("train/loss")]]) == 4


def test_measuring_peak_flops_leaves_the_global_random_stream_alone():
    # Measured once per process (cached): drawing its matrices from the global generator shifted the dropout
    # masks of whichever run measured first, so a distill stage's baseline and student trained differently.
    from framework.training.callbacks import measure_peak_flops

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    measure_peak_flops(torch.float32, "cpu", size=32, seconds=0.01)
    assert torch.equal(torch.rand(3), expected)


def test_a_fresh_run_prints_no_misleading_checkpoint_warning(train_config):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(train_config("trainer.max_steps=2"))
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]


def test_gpt2_and_optimizer_choices_train(train_config, tmp_path):
    for i, choice in enumerate(["model=gpt2_tiny optimizer=sgd scheduler=linear", "optimizer=rmsprop scheduler=constant"]):
        metrics = train(train_config(*choice.split(), "trainer.max_steps=3", "optimizer.lr=1e-3", run_dir=tmp_path / str(i)))
        assert math.isfinite(metrics["val_loss"])


def test_layers_sharing_weights_from_scratch_stay_tied_through_training(train_config, tmp_path):
    from framework.compression.sharing import ties_hold
    from framework.models import load_model_dir

    capture = CaptureModel()
    shared = train(train_config("model=llama_tiny", "model.share_layers=2", "trainer.max_steps=8", "optimizer.lr=3e-3"), callbacks=[capture])
    plain = train(train_config("model=llama_tiny", "trainer.max_steps=1", run_dir=tmp_path / "plain"))
    layers = capture.model.model.layers
    decoder = sum(p.numel() for layer in layers for p in layer.parameters())  # each layer counts its own (shared) weights
    assert shared["params_total"] == plain["params_total"] - decoder // 2
    assert ties_hold(capture.model) and shared["val_loss"] < shared["val_loss_start"]
    reloaded = load_model_dir(str(tmp_path / "run" / "model"))
    assert ties_hold(reloaded) and reloaded.layer_groups == [[0, 1], [2, 3]]


@pytest.mark.slow
def test_ddp_spawn_on_two_cpu_processes_writes_one_artifact_and_one_log(train_config, tmp_path):
    metrics = train(train_config("strategy=ddp_spawn", "trainer.devices=2", "trainer.max_steps=4", "data.batch_size=4"))
    run = tmp_path / "run"
    assert is_complete(str(run)) and metrics["train_steps"] == 4
    assert metrics["train_tokens"] == 4 * 2 * 4 * 64  # both ranks' tokens
    assert set(os.listdir(run / "logs")) <= {"metrics.csv", "hparams.yaml"}
    assert not [p for p in os.listdir(run) if p.startswith(("lightning_logs", "version_"))]


@pytest.mark.slow
@pytest.mark.parametrize("method,lr", [("lora", "2e-3"), ("full", "3e-5")])
def test_smollm2_finetune_lowers_val_perplexity(train_config, tmp_path, method, lr):
    metrics = train(
        train_config(
            "model=smollm2_135m", f"finetune={method}", f"optimizer.lr={lr}", "trainer.max_steps=6",
            "scheduler.warmup_steps=0", "data.batch_size=4", "data.block_size=128", "data.max_val_blocks=8",
            "trainer.checkpoint_every_n_steps=1000",
        )
    )
    assert metrics["val_ppl"] < metrics["val_ppl_start"]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 30  # LoRA merged back into a plain Llama
