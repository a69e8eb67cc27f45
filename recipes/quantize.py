"""The quantize stage as a command: reads an artifact, writes a new one (see conf/quantize.yaml)."""

import hydra
from omegaconf import DictConfig

from framework.cli import run_stage_recipe


@hydra.main(config_path="../conf", config_name="quantize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage_recipe("quantize", cfg)


if __name__ == "__main__":
    main()
