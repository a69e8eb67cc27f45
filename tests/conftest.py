"""Shared test set-up: offline, configs composed as the recipes compose them, tiny and fast defaults."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from omegaconf import DictConfig

from framework.compose import compose, conf_dir

CONF_DIR = conf_dir()

# Small and quick: the nano model, short blocks, few validation blocks, no progress bar.
COMMON = [
    "data.block_size=64",
    "data.batch_size=8",
    "data.max_val_blocks=16",
    "trainer.enable_progress_bar=false",
    "trainer.val_check_interval=1000",
    "trainer.log_every_n_steps=1",
    "precision=32-true",
]
FAST = ["model=llama_nano", *COMMON]  # for the configs that pick a model (train, distill)


def compose_config(config_name: str, overrides: list[str], run_dir: str | None = None) -> DictConfig:
    return compose(config_name, [*overrides, f"run_dir={run_dir or 'outputs/test'}"])


@pytest.fixture
def train_config(tmp_path):
    """A composed train config with the FAST settings and a run_dir in tmp_path; pass more overrides."""

    def make(*overrides: str, run_dir=None) -> DictConfig:
        return compose_config("train", [*FAST, *overrides], run_dir=str(run_dir or tmp_path / "run"))

    return make


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real MLflow server on a free loopback port for all the tracking tests (its start takes ~30 s)."""
    from tests.mlflow_server import mlflow_server as running_server

    with running_server(str(tmp_path_factory.mktemp("mlflow"))) as url:
        yield url
