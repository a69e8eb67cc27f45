"""Generate text from an artifact, streamed (see conf/generate.yaml):

    python recipes/generate.py input=<stage dir> prompt="def fibonacci(n):" max_new_tokens=64 temperature=0.8 top_p=0.95 seed=0
"""

from framework.app import hydra_main, run_function_recipe
from framework.generate import generate


@hydra_main("generate")
def main(cfg) -> None:
    run_function_recipe(generate, cfg, "generate")


if __name__ == "__main__":
    main()
