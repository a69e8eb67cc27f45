"""Benchmark tables, written to outputs/bench/<table>.json and .md; prints each table.

    python -m bench                              # every table, full size: SmolLM2-135M, ~25 min on an idle 2-core CPU
    python -m bench --tables pruning,quantization
    python -m bench --quick                      # tiny model, few blocks and steps: a smoke run, not numbers to quote
    python -m bench --tables data --data-size 200MB   # the data table on a smaller corpus than its 2 GB default

The data table builds a 2 GB text file and prepares it twice (1 and 2 workers): about an hour on an idle
2-core CPU; its corpus and cache stay in outputs/bench/data/ for reruns.

The compression tables keep their stage artifacts under outputs/bench/runs/, so a rerun reuses every finished stage.
"""

import argparse
import logging
import warnings

from framework.environment import quiet_libraries

TABLES = ("train", "scaling", "pruning", "structure", "quantization", "distillation", "deployment", "classification", "data")


def parse_tables(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(TABLES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown table(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(TABLES)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the bench runs")
    parser.add_argument("--tables", type=parse_tables, default=list(TABLES), help=f"comma-separated, from {','.join(TABLES)} (default: all)")
    parser.add_argument("--data-size", default=None, help="the data table's corpus size, e.g. 2GB (default), 200MB; --quick: 4MB")
    args = parser.parse_args()

    # Before the heavy imports, which log on import. Each training run would also print Lightning's
    # banners and advice and a save progress bar, burying the one progress line per run.
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "framework.training.loop"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    from transformers.utils.logging import disable_progress_bar

    from bench import classification, compression, data, deployment, training

    disable_progress_bar()
    size = compression.QUICK_SIZE if args.quick else compression.FULL_SIZE
    for table in args.tables:
        if table == "train":
            print(training.train_table(training.QUICK_TRAIN_STEPS if args.quick else training.TRAIN_STEPS))
        elif table == "scaling":
            print(training.scaling_table(steps=(2, 5) if args.quick else training.SCALING_STEPS))
        elif table == "deployment":
            print(deployment.deployment_table(size, rounds=2 if args.quick else deployment.ROUNDS))
        elif table == "classification":
            print(classification.classification_table(quick=args.quick, rounds=2 if args.quick else classification.ROUNDS))
        elif table == "data":
            data_size = data.parse_size(args.data_size) if args.data_size else data.QUICK_DATA_SIZE if args.quick else data.DATA_SIZE
            print(data.data_table(data_size, steps=5 if args.quick else data.TRAIN_STEPS))
        else:
            print(getattr(compression, f"{table}_table")(size))


if __name__ == "__main__":
    main()
