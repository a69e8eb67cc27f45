"""Prune an artifact (see conf/prune.yaml and conf/prune/):

    python recipes/prune.py input=<stage dir> prune=wanda prune.sparsity=0.5
    python recipes/prune.py input=<stage dir> prune=magnitude_threshold prune.threshold=0.02
    python recipes/prune.py input=<stage dir> prune=structured prune.drop_layers=1 trainer.max_steps=50
"""

from framework.app import hydra_main, run_stage_recipe


@hydra_main("prune")
def main(cfg) -> None:
    run_stage_recipe("prune", cfg)


if __name__ == "__main__":
    main()
