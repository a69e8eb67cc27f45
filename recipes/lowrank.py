"""Factorize the linear layers of an artifact by truncated SVD (see conf/lowrank.yaml and conf/lowrank/):

    python recipes/lowrank.py input=<stage dir> lowrank.energy=0.9
    python recipes/lowrank.py input=<stage dir> lowrank=rank64 trainer.max_steps=50
"""

from framework.app import hydra_main, run_stage_recipe


@hydra_main("lowrank")
def main(cfg) -> None:
    run_stage_recipe("lowrank", cfg)


if __name__ == "__main__":
    main()
