"""The lowrank stage as a command: reads an artifact, writes a new one (see conf/lowrank.yaml)."""

import hydra
from omegaconf import DictConfig

from framework import stages
from framework.cli import run_recipe


@hydra.main(config_path="../conf", config_name="lowrank", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_recipe(lambda: stages.STAGES["lowrank"](cfg), cfg, "lowrank")


if __name__ == "__main__":
    main()
