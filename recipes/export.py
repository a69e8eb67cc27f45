"""Export an artifact for a serving engine (see conf/export.yaml and conf/export/):

    python recipes/export.py input=<stage dir> export=gguf export.outtype=Q8_0
    python recipes/export.py input=<stage dir> export=onnx export.bits=8
"""

from framework.app import hydra_main, run_stage_recipe


@hydra_main("export")
def main(cfg) -> None:
    run_stage_recipe("export", cfg)


if __name__ == "__main__":
    main()
