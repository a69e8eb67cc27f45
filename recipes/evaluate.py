"""Evaluate an artifact, or rebuild a pipeline run's report (see conf/evaluate.yaml).

    python recipes/evaluate.py input=<stage dir> data=stdlib_modules
    python recipes/evaluate.py input=<stage dir> data.test_paths=[wiki.test.txt]     # every token of these files
    python recipes/evaluate.py input=outputs/pipeline/tiny
"""

from framework.app import hydra_main, run_function_recipe
from framework.evaluate import evaluate


@hydra_main("evaluate")
def main(cfg) -> None:
    run_function_recipe(evaluate, cfg, "evaluate")


if __name__ == "__main__":
    main()
