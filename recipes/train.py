"""Train a causal LM (pretrain from scratch or finetune a pretrained model) and write its artifact.

    python recipes/train.py model=llama_tiny data=stdlib_docs optimizer.lr=1e-3
    python recipes/train.py model=smollm2_135m finetune=lora trainer.max_steps=20
    python recipes/train.py input=<artifact dir> data=stdlib_modules      # finetune an earlier stage's model
"""

import hydra
from omegaconf import DictConfig

from framework.cli import run_stage_recipe


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage_recipe("train", cfg)


if __name__ == "__main__":
    main()
