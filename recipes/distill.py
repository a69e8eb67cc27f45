"""Distill a teacher artifact into a smaller student (see conf/distill.yaml and conf/distill/):

    python recipes/distill.py distill.teacher=<stage dir> distill.num_layers=2
    python recipes/distill.py distill.teacher=<stage dir> distill.student=config model=llama_nano
"""

from framework.app import hydra_main, run_stage_recipe


@hydra_main("distill")
def main(cfg) -> None:
    run_stage_recipe("distill", cfg)


if __name__ == "__main__":
    main()
