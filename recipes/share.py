"""Share weights across adjacent layers of an artifact (see conf/share.yaml and conf/share/):

    python recipes/share.py input=<stage dir> share.group_size=2
    python recipes/share.py input=<stage dir> share.group_size=2 trainer.max_steps=100   # with a recovery finetune
"""

from framework.app import hydra_main, run_stage_recipe


@hydra_main("share")
def main(cfg) -> None:
    run_stage_recipe("share", cfg)


if __name__ == "__main__":
    main()
