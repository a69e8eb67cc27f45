"""Faults on disk never corrupt work: a damaged artifact is found and redone, a damaged checkpoint is
skipped for an intact one, a write that fails names its real cause, and artifacts can be shared."""

import contextlib
import logging
import os
import stat
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch

from framework.artifacts import damaged, is_complete
from framework.errors import StorageError
from framework.stages import STAGES
from framework.training import extra_callbacks
from tests.test_train import CaptureModel, InterruptAt


@contextlib.contextmanager
def immutable(path):
    """The directory refuses every write, even root's (chattr +i; ext4 and most Linux filesystems)."""
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_truncated_model_file_is_found_and_the_stage_is_run_again(train_config, tmp_path, caplog):
    cfg = train_config("trainer.max_steps=3")
    first = STAGES["train"](cfg)
    weights = tmp_path / "run" / "model" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 3)
    assert "model/model.safetensors has" in damaged(str(tmp_path / "run"))

    caplog.set_level(logging.WARNING, logger="framework.training.loop")
    again = STAGES["train"](cfg)
    assert "is damaged" in caplog.text and "running the stage again" in caplog.text
    assert damaged(str(tmp_path / "run")) is None and is_complete(str(tmp_path / "run"))
    assert again["size_bytes"] == first["size_bytes"] and again["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)


def test_garbage_in_last_ckpt_falls_back_to_the_newest_intact_checkpoint(train_config, tmp_path, caplog):
    overrides = ("trainer.max_steps=8", "trainer.checkpoint_every_n_steps=4", "optimizer.lr=3e-3")
    straight = CaptureModel()
    with extra_callbacks([straight]):
        STAGES["train"](train_config(*overrides, run_dir=tmp_path / "straight"))

    cfg = train_config(*overrides)
    with pytest.raises(SystemExit), extra_callbacks([InterruptAt(6)]):  # last.ckpt at step 6, step000004.ckpt beside it
        STAGES["train"](cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "step000004.ckpt").exists()
    (checkpoints / "last.ckpt").write_bytes(os.urandom(4096))

    caplog.set_level(logging.INFO, logger="framework.training.loop")
    resumed = CaptureModel()
    with extra_callbacks([resumed]):
        metrics = STAGES["train"](cfg)
    assert "last.ckpt is damaged" in caplog.text and "step000004.ckpt" in caplog.text
    assert metrics["train_steps"] == 8
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_checkpoint_directory_that_becomes_unwritable_names_the_cause(train_config, tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"

    class LockAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                subprocess.run(["chattr", "+i", str(checkpoints)], check=True)

    try:
        with pytest.raises(StorageError) as error, extra_callbacks([LockAt()]):
            STAGES["train"](train_config("trainer.max_steps=6", "trainer.checkpoint_every_n_steps=3"))
    finally:
        subprocess.run(["chattr", "-i", str(checkpoints)], check=False)
    message = str(error.value)
    assert "\n" not in message and str(checkpoints) in message and "Operation not permitted" in message
    assert not is_complete(str(tmp_path / "run"))


def test_a_run_dir_under_an_unwritable_parent_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    with immutable(locked):
        result = subprocess.run(
            [sys.executable, "recipes/train.py", "model=llama_nano", f"run_dir={locked / 'run'}"],
            capture_output=True, text=True, timeout=300,
        )
    assert result.returncode == 5, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(locked / "run") in last and "Operation not permitted" in last


def test_artifacts_have_ordinary_shareable_permissions(train_config, tmp_path):
    old = os.umask(0o022)
    try:
        STAGES["train"](train_config("trainer.max_steps=1"))
    finally:
        os.umask(old)
    model = tmp_path / "run" / "model"
    assert stat.S_IMODE(model.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in model.iterdir()} == {0o644}
    assert stat.S_IMODE((tmp_path / "run" / "metrics.json").stat().st_mode) == 0o644
