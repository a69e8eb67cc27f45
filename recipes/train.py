"""Train a causal LM (pretrain from scratch or finetune a pretrained model) and write its artifact.

    python recipes/train.py model=llama_tiny data=stdlib_docs optimizer.lr=1e-3
    python recipes/train.py model=smollm2_135m finetune=lora trainer.max_steps=20
    python recipes/train.py input=<artifact dir> data=stdlib_modules      # finetune an earlier stage's model
    python recipes/train.py model.share_layers=2                          # layers sharing weights in pairs
"""

from framework.app import hydra_main, run_stage_recipe


@hydra_main("train")
def main(cfg) -> None:
    run_stage_recipe("train", cfg)


if __name__ == "__main__":
    main()
