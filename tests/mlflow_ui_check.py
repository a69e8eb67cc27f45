"""The MLflow UI, checked once in a real browser (`make tracking-screenshot`; not part of `make test`).

Starts a server on a free loopback port, runs the tiny pipeline for a few steps with logger=mlflow, then
headless Chromium opens the experiment's runs page: its rendered text must name the pipeline's parent run
and every stage's run, and two screenshots are written to outputs/tracking/ (the runs as a flat list sorted
by name, and as the UI shows them by default: the stages folded under the pipeline's run).

    python tests/mlflow_ui_check.py [OUTPUT_DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.mlflow_server import mlflow_server  # noqa: E402

EXPERIMENT = "ui-check"
STAGES = ["pretrain", "finetune", "prune", "quantize", "distill"]
PIPELINE = [
    "experiment=tiny_pipeline", "+common.trainer.enable_progress_bar=false", "+common.trainer.log_every_n_steps=1",
    "+common.data.max_val_blocks=8", "+common.data.max_chars=120000", "+common.precision.name=32-true",
    "pipeline.stages.pretrain.groups.model=llama_nano", "pipeline.stages.pretrain.trainer.max_steps=20",
    "pipeline.stages.finetune.trainer.max_steps=10", "pipeline.stages.prune.trainer.max_steps=5",
    "+pipeline.stages.prune.prune.calibration_samples=8", "pipeline.stages.distill.trainer.max_steps=10",
]


def chromium(*args: str) -> str:
    """Headless Chromium; `--virtual-time-budget` lets the single-page app fetch and render before it stops."""
    with tempfile.TemporaryDirectory() as profile:
        command = [
            shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=20000", *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout


def main(output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with mlflow_server(os.path.join(output_dir, "mlflow")) as url:
        run_dir = os.path.join(output_dir, "pipeline")
        logger = ["logger=mlflow", f"logger.tracking_uri={url}", f"logger.experiment={EXPERIMENT}"]
        subprocess.run([sys.executable, "recipes/pipeline.py", *PIPELINE, *logger, f"run_dir={run_dir}"], check=True)
        query = urllib.parse.urlencode({"experiment_name": EXPERIMENT})
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?{query}") as response:
            experiment_id = json.load(response)["experiment"]["experiment_id"]
        runs_page = f"{url}/#/experiments/{experiment_id}/runs"
        # Sorted by anything but start time, the UI lists child runs flat instead of folded under their parent.
        by_name = runs_page + "?" + urllib.parse.urlencode({"orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"})
        page = chromium("--dump-dom", by_name)
        missing = [name for name in ["tiny", *STAGES, "distill-baseline"] if f">{name}<" not in page]
        if missing:
            raise SystemExit(f"the runs page at {by_name} does not show the runs {missing}")
        chromium(f"--screenshot={os.path.join(output_dir, 'mlflow_runs.png')}", by_name)
        chromium(f"--screenshot={os.path.join(output_dir, 'mlflow_runs_nested.png')}", runs_page)
        print(f"the runs page shows the pipeline's run and its stages' runs: {output_dir}/mlflow_runs.png, mlflow_runs_nested.png")


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "outputs/tracking"))
