"""Quantize an artifact (see conf/quantize.yaml and conf/quantize/):

    python recipes/quantize.py input=<stage dir> quantize=int8_dynamic
    python recipes/quantize.py input=<stage dir> quantize=qat_int8_dynamic trainer.max_steps=50
"""

from framework.app import hydra_main, run_stage_recipe


@hydra_main("quantize")
def main(cfg) -> None:
    run_stage_recipe("quantize", cfg)


if __name__ == "__main__":
    main()
