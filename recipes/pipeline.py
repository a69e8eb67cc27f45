"""Run a whole pipeline (pretrain → finetune → prune → quantize → distill) and print its report.

    python recipes/pipeline.py experiment=tiny_pipeline
    python recipes/pipeline.py experiment=tiny_pipeline pipeline.stages.prune.prune.sparsity=0.7
"""

import hydra
from omegaconf import DictConfig

from framework.cli import run_recipe
from framework.pipeline import run_pipeline


@hydra.main(config_path="../conf", config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_recipe(run_pipeline, cfg, "pipeline")


if __name__ == "__main__":
    main()
