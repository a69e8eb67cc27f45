"""MLflow tracking for a team: runs on a tracking server, nested the way the work is.

A pipeline, a grid sweep or an Optuna study is a *parent run* (`parent_run`, or `open_parent_run` and
`end_run` where no `with` block fits, as in Hydra's callbacks); every stage started inside it is a nested
run with its resolved config as params, its per-step and final metrics, tags naming its kind, fingerprint
and input stages, its files, and its model, registered as a version of a named model. A sweep job or
trial gets its state and objective afterwards (`record_job`).

Run ids are kept in `tracking.json` files (a stage's in its checkpoint directory, a parent's in its run
directory), so rerunning a command continues the same runs. Every call here is made by rank 0 only.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import glob
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from omegaconf import DictConfig

from framework import artifacts
from framework.distributed import is_rank_zero
from framework.errors import ConfigError, PreemptedError

log = logging.getLogger(__name__)

RECORD = "tracking.json"  # {"mlflow_run_id": ..., "wandb_run_id": ..., "fingerprint": ...}
CHECKPOINTS = "checkpoints"  # the train loop's checkpoint directory, which a stage's run record travels with
STATUS_OF_STATE = {"COMPLETE": "FINISHED", "COMPLETED": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED", "FAILED": "FAILED"}

# The run that stage runs (and parents opened inside it) nest under: a pipeline's, a sweep's, a study's.
_parent: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlflow_parent_run", default=None)


def enabled(logger_cfg: DictConfig | None) -> bool:
    return logger_cfg is not None and logger_cfg.get("name") == "mlflow"


def check_server(uri: str | None) -> None:
    """Refuse, before any work, a tracking URI where no server answers (the client would retry for minutes)."""
    if not uri:
        raise ConfigError("logger.tracking_uri", "is not set: the MLflow server's URL, e.g. http://127.0.0.1:5000 (`make tracking` starts one)")
    if not uri.startswith(("http://", "https://")):
        return  # a database or a directory: the client opens it itself
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except urllib.error.HTTPError:
        return  # something answers (a proxy that wants credentials, say): the client will say more
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(
            "logger.tracking_uri", f"no MLflow server answers at {uri} ({reason}); start one with `make tracking`, or give your team's server's URL"
        ) from None


@functools.lru_cache(maxsize=None)
def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _client(logger_cfg: DictConfig):
    return client(logger_cfg.tracking_uri)


def _experiment_id(logger_cfg: DictConfig) -> str:
    """The experiment named `logger.experiment`, created when missing (restored when deleted)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = _client(logger_cfg)
    experiment = mlflow_client.get_experiment_by_name(logger_cfg.experiment)
    if experiment is None:
        try:
            return mlflow_client.create_experiment(logger_cfg.experiment)
        except MlflowException:  # another process created it meanwhile
            experiment = mlflow_client.get_experiment_by_name(logger_cfg.experiment)
    if experiment.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """{"optimizer": {"lr": 0.001}} -> {"optimizer.lr": "0.001"}; values cut to MLflow's 6000 characters."""
    params = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = str(value)[:6000]
    return params


def _start_run(logger_cfg: DictConfig, name: str, parent: str | None, tags: dict[str, str]) -> str:
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    if parent:
        tags = {**tags, MLFLOW_PARENT_RUN_ID: parent}
    # resolve_tags adds who ran it, from which command and git commit (shown in the UI)
    return _client(logger_cfg).create_run(_experiment_id(logger_cfg), run_name=name, tags=resolve_tags(tags)).info.run_id


def _continue_run(logger_cfg: DictConfig, run_id: str | None) -> bool:
    """Set a recorded run running again; False when it is gone (deleted, on another server, in another experiment)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        run = _client(logger_cfg).get_run(run_id)
    except MlflowException:
        return False
    if run.info.lifecycle_stage != "active" or run.info.experiment_id != _experiment_id(logger_cfg):
        return False
    _client(logger_cfg).update_run(run_id, status="RUNNING")  # a killed process left it RUNNING, a failed one FAILED
    return True


def _log_new_params(logger_cfg: DictConfig, run_id: str, params: dict[str, str]) -> None:
    """Log the params the run does not hold yet: MLflow refuses to change one (a resumed run logs them again)."""
    from mlflow.entities import Param

    held = _client(logger_cfg).get_run(run_id).data.params
    new = [Param(key, value) for key, value in params.items() if key not in held]
    if new:
        _client(logger_cfg).log_batch(run_id, params=new)


def _set_tags(logger_cfg: DictConfig, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    if tags:
        _client(logger_cfg).log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def open_stage_run(logger_cfg: DictConfig, run_id: str | None, name: str, tags: dict[str, str], params: dict[str, str], parent: str | None = None) -> str:
    """A stage's run: `run_id` continued when it still exists, else a new run nested under `parent`
    (by default the current parent run). Returns its id."""
    if not _continue_run(logger_cfg, run_id):
        run_id = _start_run(logger_cfg, name, parent or _parent.get(), tags)
    _set_tags(logger_cfg, run_id, tags)
    _log_new_params(logger_cfg, run_id, params)
    return run_id


def logged_steps(logger_cfg: DictConfig, run_id: str) -> dict[str, int]:
    """The last step the run holds for each metric (a resumed stage logs only later ones)."""
    mlflow_client = _client(logger_cfg)
    keys = mlflow_client.get_run(run_id).data.metrics
    return {key: max(m.step for m in mlflow_client.get_metric_history(run_id, key)) for key in keys}


def end_run(logger_cfg: DictConfig, run_id: str | None, status: str) -> None:
    if run_id:
        _client(logger_cfg).set_terminated(run_id, status)


def status_of(error: BaseException | None) -> str:
    """The MLflow status a run ends with, from what stopped it."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, (KeyboardInterrupt, PreemptedError)) else "FAILED"


# --- parent runs: a pipeline, a sweep, a study ---------------------------------------------------------------


def read_record(directory: str) -> dict:
    path = os.path.join(directory, RECORD)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def open_parent_run(logger_cfg: DictConfig, name: str, run_dir: str, kind: str) -> str | None:
    """The parent run recorded in `run_dir` (running again), or a new one nested under the current parent."""
    if not enabled(logger_cfg) or not is_rank_zero():
        return None
    check_server(logger_cfg.tracking_uri)  # opened before the stages' checks run: a wrong URI fails here, at once
    record = read_record(run_dir)
    run_id = record.get("mlflow_run_id")
    if not _continue_run(logger_cfg, run_id):
        run_id = _start_run(logger_cfg, name, _parent.get(), {"kind": kind})
        artifacts.atomic_write_json(os.path.join(run_dir, RECORD), {**record, "mlflow_run_id": run_id})
    return run_id


def nest_under(run_id: str | None) -> contextvars.Token:
    """Make the stage runs started from now on (in this context) children of `run_id`."""
    return _parent.set(run_id)


@dataclass
class ParentRun:
    logger_cfg: DictConfig | None
    run_id: str | None  # None when MLflow is not the tracker (or on ranks other than 0): nothing is logged

    def log_files(self, paths: Iterable[str]) -> None:
        """Attach files (a pipeline's report, a study's summary) to the parent run."""
        for path in paths:
            if self.run_id and os.path.isfile(path):
                _client(self.logger_cfg).log_artifact(self.run_id, path)


@contextlib.contextmanager
def parent_run(logger_cfg: DictConfig, name: str, run_dir: str, kind: str) -> Iterator[ParentRun]:
    """Inside the block, every stage run nests under this run; it ends FINISHED, or FAILED / KILLED."""
    run_id = open_parent_run(logger_cfg, name, run_dir, kind)
    token = nest_under(run_id) if run_id else None
    error = None
    try:
        yield ParentRun(logger_cfg, run_id)
    except BaseException as err:
        error = err
        raise
    finally:
        if token is not None:
            _parent.reset(token)
        if run_id:
            end_run(logger_cfg, run_id, status_of(error))


def record_job(logger_cfg: DictConfig, job_dir: str, name: str, state: str, params: dict[str, Any], metrics: dict[str, float], error: str = "") -> None:
    """Give a sweep job's or trial's run its name, params, metrics and state (a job that failed before its
    stage opened a run gets a run of its own, so every job shows)."""
    from mlflow.entities import Metric

    if not enabled(logger_cfg) or not is_rank_zero():
        return
    recorded = [read_record(d).get("mlflow_run_id") for d in (job_dir, os.path.join(job_dir, CHECKPOINTS))]  # a pipeline's, a stage's
    run_id = next((r for r in recorded if r and _continue_run(logger_cfg, r)), None) or _start_run(logger_cfg, name, _parent.get(), {"kind": "job"})
    _client(logger_cfg).update_run(run_id, name=name)  # a pipeline's run is named after the pipeline: here, after the trial
    _set_tags(logger_cfg, run_id, {"state": state, **({"error": error[:5000]} if error else {})})
    _log_new_params(logger_cfg, run_id, {key: str(value)[:6000] for key, value in params.items()})
    now = int(time.time() * 1000)
    finite = [Metric(key, float(value), now, 0) for key, value in metrics.items() if isinstance(value, (int, float))]
    if finite:
        _client(logger_cfg).log_batch(run_id, metrics=finite)
    end_run(logger_cfg, run_id, STATUS_OF_STATE.get(state, "FINISHED"))


# --- a stage's files and model -------------------------------------------------------------------------------


def log_stage_files(logger_cfg: DictConfig, run_id: str, stage_dir: str, model_name: str | None, tags: dict[str, str]) -> None:
    """metrics.json, config.yaml and the stage's PNGs; then model/, registered as a version of `model_name`
    (so a team picks it as models:/<name>/<version>; None: no model)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = _client(logger_cfg)
    for path in [os.path.join(stage_dir, artifacts.METRICS), os.path.join(stage_dir, artifacts.CONFIG), *sorted(glob.glob(os.path.join(stage_dir, "*.png")))]:
        if os.path.isfile(path):
            mlflow_client.log_artifact(run_id, path)
    if not logger_cfg.log_model or model_name is None:
        return
    mlflow_client.log_artifacts(run_id, os.path.join(stage_dir, artifacts.MODEL), artifacts.MODEL)
    try:
        mlflow_client.create_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # A plain directory (HF files, or torchao tensors) has no MLmodel file, which register_model() needs;
    # a model version can point at any artifact directory.
    source = f"{mlflow_client.get_run(run_id).info.artifact_uri}/{artifacts.MODEL}"
    version = mlflow_client.create_model_version(model_name, source=source, run_id=run_id, tags=tags)
    _set_tags(logger_cfg, run_id, {"registered_model": f"{model_name}/{version.version}"})
    log.info("model registered as models:/%s/%s", model_name, version.version)
