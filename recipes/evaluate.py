"""Evaluate an artifact, or rebuild a pipeline run's report (see conf/evaluate.yaml)."""

import hydra
from omegaconf import DictConfig

from framework import stages
from framework.cli import run_recipe


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_recipe(stages.evaluate, cfg, "evaluate")


if __name__ == "__main__":
    main()
