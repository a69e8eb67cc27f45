"""Benchmark tables, written to outputs/bench/<table>.json and .md; prints each table.

    python recipes/benchmark.py          # the full bench (about 4 minutes on an idle 2-core CPU)
    python recipes/benchmark.py --quick  # fewer steps: a smoke run, not numbers to quote
"""

import argparse
import logging
import warnings

from framework.cli import quiet_libraries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, to check that the bench runs")
    args = parser.parse_args()

    # Before the heavy imports, which log on import. Each of the four training runs would also print
    # Lightning's banners and advice and a save progress bar, burying the one progress line per run.
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "framework.training"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    from transformers.utils.logging import disable_progress_bar

    from framework.benchmark import QUICK_TRAIN_STEPS, TRAIN_STEPS, train_table

    disable_progress_bar()
    print(train_table(QUICK_TRAIN_STEPS if args.quick else TRAIN_STEPS))


if __name__ == "__main__":
    main()
