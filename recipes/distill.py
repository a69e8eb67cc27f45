"""The distill stage as a command: reads an artifact, writes a new one (see conf/distill.yaml)."""

import hydra
from omegaconf import DictConfig

from framework import stages
from framework.cli import run_recipe


@hydra.main(config_path="../conf", config_name="distill", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_recipe(lambda: stages.STAGES["distill"](cfg), cfg, "distill")


if __name__ == "__main__":
    main()
