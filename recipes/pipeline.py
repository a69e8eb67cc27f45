"""Run a whole pipeline (pretrain → finetune → prune → quantize → distill) and print its report.

    python recipes/pipeline.py experiment=tiny_pipeline
    python recipes/pipeline.py experiment=tiny_pipeline pipeline.stages.prune.prune.sparsity=0.7
"""

from framework.app import hydra_main, run_function_recipe
from framework.pipeline import run_pipeline


@hydra_main("pipeline")
def main(cfg) -> None:
    run_function_recipe(run_pipeline, cfg, "pipeline")


if __name__ == "__main__":
    main()
