"""The quantize stage as a command: reads an artifact, writes a new one (see conf/quantize.yaml)."""

import hydra
from omegaconf import DictConfig

from framework import stages
from framework.cli import run_recipe


@hydra.main(config_path="../conf", config_name="quantize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_recipe(lambda: stages.STAGES["quantize"](cfg), cfg, "quantize")


if __name__ == "__main__":
    main()
