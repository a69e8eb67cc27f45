"""Hyperparameter search with Optuna.

`hparams_search=<name>` turns a recipe run into a worker of an Optuna study. The study lives in a
shared storage (a journal file by default, or an RDB URL), so any number of workers, on one machine
or many, run the same command and cooperate; rerunning an interrupted command resumes the study.

Each trial composes the recipe's config with the trial's overrides, exactly as the command line
would (so a parameter can be a config group, `optimizer: choice(adamw, sgd)`), and runs in this
process. That gives the trial object to the train loop: every validation reports its val loss, and
the pruner can stop a trial that lags. The objective is any key of the trial's metrics.json, or
`<stage>.<key>` in a pipeline, with optional constraints such as `quantize.size_bytes <= 2e6`.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import socket
import time
from typing import Any, Callable

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from framework import artifacts, report
from framework.compose import compose
from framework.errors import ConfigError
from framework.training import extra_callbacks
from framework.training.mlflow_tracking import parent_run, record_job

log = logging.getLogger(__name__)

SUMMARY_FILES = ("trials.md", "trials.csv", "best.yaml", "optimization_history.png", "param_importances.png")
CONSTRAINT = re.compile(r"^\s*([\w.]+)\s*(<=|>=)\s*(\S+)\s*$")


# --- the search space ------------------------------------------------------------------------------------------


def _flatten(params: Any, prefix: str = "") -> dict[str, str]:
    """{"optimizer": {"lr": "interval(..)"}} and {"optimizer.lr": "interval(..)"} alike: dotted keys."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, (dict, DictConfig)):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = str(value)
    return flat


def search_space(params: Any) -> tuple[dict, list[str]]:
    """Optuna distributions from Hydra's sweep syntax, plus the values that are fixed overrides.

    choice(a, b)                          categorical (values or config-group options)
    interval(lo, hi)                      float; tag(log, interval(..)) log-uniform, tag(int, interval(..)) integer
    range(start, stop, step)              int or float steps, stop excluded as in Python
    anything else                         a fixed override for every trial
    """
    import optuna.distributions as d
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    parser = OverridesParser.create()
    distributions, fixed = {}, []
    for key, text in _flatten(params).items():
        try:
            value = parser.parse_override(f"{key}={text}").value()
        except Exception as err:  # Hydra's grammar error, reduced to its first line
            raise ConfigError(f"hparams_search.params.{key}", f"'{text}': {str(err).splitlines()[0]}") from None
        if isinstance(value, ChoiceSweep):
            distributions[key] = d.CategoricalDistribution([_plain(v) for v in value.list])
        elif isinstance(value, IntervalSweep):
            log_scale = "log" in value.tags
            if "int" in value.tags:
                distributions[key] = d.IntDistribution(int(value.start), int(value.end), log=log_scale)
            else:
                distributions[key] = d.FloatDistribution(float(value.start), float(value.end), log=log_scale)
        elif isinstance(value, RangeSweep):
            steps = list(_range(value.start, value.stop, value.step))
            if not steps:
                raise ConfigError(f"hparams_search.params.{key}", f"'{text}' is an empty range")
            if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
                distributions[key] = d.IntDistribution(steps[0], steps[-1], step=value.step)
            else:
                distributions[key] = d.FloatDistribution(steps[0], steps[-1], step=value.step)
        else:
            fixed.append(f"{key}={text}")
    return distributions, fixed


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def _range(start, stop, step):
    value = start
    while (step > 0 and value < stop) or (step < 0 and value > stop):
        yield value
        value += step


def _override_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


# --- metrics ---------------------------------------------------------------------------------------------------


def read_metric(run_dir: str, key: str) -> float:
    """`key` from run_dir/metrics.json, or `<stage>.<key>` from run_dir/<stage>/metrics.json (a pipeline)."""
    candidates = [(run_dir, key)]
    if "." in key:
        stage, rest = key.split(".", 1)
        candidates.append((os.path.join(run_dir, stage), rest))
    for directory, name in candidates:
        path = os.path.join(directory, artifacts.METRICS)
        if os.path.isfile(path):
            metrics = artifacts.read_metrics(directory)
            if name in metrics:
                return float(metrics[name])
    raise KeyError(f"no metric '{key}' in {run_dir} (a metrics.json key, or <stage>.<key> in a pipeline)")


def parse_constraint(text: str) -> tuple[str, str, float]:
    match = CONSTRAINT.match(text)
    if not match:
        raise ConfigError("hparams_search.constraints", f"'{text}' is not '<metric> <= <number>' or '<metric> >= <number>'")
    return match[1], match[2], float(match[3])


# --- the study -------------------------------------------------------------------------------------------------


class ReportToTrial(pl.Callback):
    """Report the val loss of every validation to the trial; stop the trial when the pruner says so.

    Steps keep counting across the stages of a pipeline, so that each report has its own step.
    """

    def __init__(self, trial):
        self.trial, self.offset, self.last_step = trial, 0, -1

    def on_fit_start(self, trainer, pl_module):
        self.offset = self.last_step + 1

    def on_validation_end(self, trainer, pl_module):
        import optuna

        value = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or value is None:
            return
        self.last_step = self.offset + trainer.global_step
        self.trial.report(float(value), self.last_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"val loss {float(value):.4f} at step {self.last_step} lags the other trials")


def _storage(search: DictConfig):
    import optuna

    url = search.storage or os.path.join(search.sweep_dir, "study.journal")
    if "://" in url:
        return url  # an RDB URL: sqlite:///..., postgresql://..., mysql://...
    os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))


def _sampler(cfg: DictConfig, seed_offset: int):
    import optuna

    name = cfg.get("name", "tpe")
    seed = None if cfg.get("seed") is None else cfg.seed + seed_offset
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.get("n_startup_trials", 10), constraints_func=_constraint_values)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError("hparams_search.sampler.name", f"'{name}' is not one of tpe, random")


def _constraint_values(trial) -> list[float]:
    return trial.user_attrs.get("constraints", [])


def _pruner(cfg: DictConfig):
    import optuna

    name = cfg.get("name", "median")
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.get("n_startup_trials", 3), n_warmup_steps=cfg.get("n_warmup_steps", 0))
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.get("min_resource", "auto"), reduction_factor=cfg.get("reduction_factor", 3))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError("hparams_search.pruner.name", f"'{name}' is not one of median, successive_halving, none")


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _fail_dead_trials(study) -> None:
    """Trials left running by a killed worker of this machine are failed, so the study can go on."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        if worker.rsplit(":", 1)[0] == host and not _alive(int(worker.rsplit(":", 1)[1])):
            study._storage.set_trial_user_attr(trial._trial_id, "error", "its worker process died")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            log.warning("trial %d: its worker %s died; marked failed", trial.number, worker)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _task_overrides() -> tuple[str, list[str]]:
    """The running recipe's config name and its command-line overrides (the search's settings included)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    return hydra_cfg.job.config_name, [o for o in hydra_cfg.overrides.task if not o.startswith("run_dir=")]


def compose_trial(config_name: str, overrides: list[str], trial_dir: str) -> DictConfig:
    """The config a trial runs: the command line's plus the trial's values, and no search of its own.

    The search file's other settings (say, a shorter trainer.max_steps for every trial) stay.
    """
    cfg = compose(config_name, [*overrides, f"run_dir={trial_dir}"])
    cfg.hparams_search = None
    return cfg


def run_study(cfg: DictConfig, work: Callable[[DictConfig], object]) -> dict:
    """Run trials of the study until it holds `n_trials` (counting every worker's), then write the summary."""
    import optuna
    from optuna.trial import TrialState

    search = cfg.hparams_search
    distributions, fixed = search_space(search.params)
    if not distributions:
        raise ConfigError("hparams_search.params", "no parameter to search (use choice(...), interval(...) or range(...))")
    constraints = [parse_constraint(c) for c in search.constraints]
    if search.direction not in ("minimize", "maximize"):
        raise ConfigError("hparams_search.direction", f"'{search.direction}' is not minimize or maximize")
    config_name, base_overrides = _task_overrides()
    storage = _storage(search)
    study = optuna.create_study(study_name=search.study_name, storage=storage, direction=search.direction, pruner=_pruner(search.pruner), load_if_exists=True)
    study.sampler = _sampler(search.sampler, len(study.trials))  # seeded by the trials so far: a joining worker samples afresh
    _fail_dead_trials(study)
    log.info("study %s: %d trials so far, %d wanted", search.study_name, len(study.trials), search.n_trials)
    # With logger=mlflow the study is one parent run (its workers share it), and each trial a run nested under it.
    with parent_run(cfg.logger, search.study_name, search.sweep_dir, kind="study") as tracked:
        while len(study.get_trials(deepcopy=False)) < search.n_trials:
            trial = study.ask(distributions)
            trial.set_user_attr("worker", _worker_id())
            overrides = [*fixed, *(f"{k}={_override_value(v)}" for k, v in trial.params.items())]
            trial.set_user_attr("overrides", overrides)
            trial_dir = os.path.join(search.sweep_dir, f"trial_{trial.number:03d}")
            started, state, value = time.perf_counter(), TrialState.FAIL, None
            try:
                trial_cfg = compose_trial(config_name, [*base_overrides, *overrides], trial_dir)
                artifacts.atomic_write_text(os.path.join(trial_dir, "trial_config.yaml"), OmegaConf.to_yaml(trial_cfg))
                with extra_callbacks([ReportToTrial(trial)]):
                    work(trial_cfg)
                value = read_metric(trial_dir, search.objective)
                trial.set_user_attr("constraints", [_violation(read_metric(trial_dir, key), op, bound) for key, op, bound in constraints])
                state = TrialState.COMPLETE
                log.info("trial %d: %s = %.4f (%s)", trial.number, search.objective, value, " ".join(overrides))
            except optuna.TrialPruned as pruned:
                state = TrialState.PRUNED
                log.info("trial %d pruned: %s", trial.number, pruned)
            except KeyboardInterrupt:
                trial.set_user_attr("error", "interrupted")
                study.tell(trial, state=TrialState.FAIL)
                raise
            except Exception as err:  # a failed trial is recorded and the study goes on
                trial.set_user_attr("error", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                log.warning("trial %d failed: %s", trial.number, err)
            trial.set_user_attr("seconds", time.perf_counter() - started)
            study.tell(trial, value, state=state)
            objective = {"objective": value} if value is not None else {}
            record_job(cfg.logger, trial_dir, f"trial_{trial.number:03d}", state.name, trial.params, objective, trial.user_attrs.get("error", ""))
        summary = write_summary(study, search)
        tracked.log_files(os.path.join(search.sweep_dir, name) for name in SUMMARY_FILES)
    return summary


def _violation(value: float, op: str, bound: float) -> float:
    """Optuna's convention: <= 0 is feasible."""
    return value - bound if op == "<=" else bound - value


# --- the summary -----------------------------------------------------------------------------------------------


def _feasible(trial) -> bool:
    return all(v <= 0 for v in trial.user_attrs.get("constraints", []))


def best_trial(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if _feasible(t)]
    if not done:
        return None
    pick = min if study.direction.name == "MINIMIZE" else max
    return pick(done, key=lambda t: t.value)


def trial_rows(study) -> list[dict]:
    names = sorted({name for t in study.trials for name in t.params})
    rows = []
    for t in study.trials:
        row = {"trial": t.number, "state": t.state.name, "value": t.value}
        row.update({name: t.params.get(name) for name in names})
        row.update(feasible=_feasible(t) if t.state.name == "COMPLETE" else None, seconds=t.user_attrs.get("seconds"), worker=t.user_attrs.get("worker"), error=t.user_attrs.get("error", ""))
        rows.append(row)
    return rows


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def write_summary(study, search: DictConfig) -> dict:
    """trials.md/.csv, best.yaml (value, params, the trial's full config) and the two Optuna plots."""
    sweep_dir = search.sweep_dir
    rows = trial_rows(study)
    best = best_trial(study)
    counts = {state: sum(r["state"] == state for r in rows) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    header = f"# Study {search.study_name}: {search.direction} {search.objective}\n\n" + ", ".join(f"{n} {s.lower()}" for s, n in counts.items()) + "\n\n"
    artifacts.atomic_write_text(os.path.join(sweep_dir, "trials.md"), header + report.markdown_table(rows))
    artifacts.atomic_write_text(os.path.join(sweep_dir, "trials.csv"), _csv(rows))
    summary = {"study": search.study_name, "objective": search.objective, "trials": counts, "best": None}
    if best is not None:
        trial_dir = os.path.join(sweep_dir, f"trial_{best.number:03d}")
        summary["best"] = {
            "trial": best.number,
            "value": best.value,
            "params": best.params,
            "overrides": best.user_attrs.get("overrides", []),
            "trial_dir": trial_dir,
        }
        best_config = os.path.join(trial_dir, "trial_config.yaml")
        document = OmegaConf.create({**summary["best"], "config": OmegaConf.load(best_config) if os.path.isfile(best_config) else None})
        artifacts.atomic_write_text(os.path.join(sweep_dir, "best.yaml"), OmegaConf.to_yaml(document))
    _plots(study, sweep_dir)
    artifacts.atomic_write_json(os.path.join(sweep_dir, "summary.json"), summary)
    print(header + report.markdown_table(rows))
    if best is not None:
        print(f"best: trial {best.number}, {search.objective} = {best.value:.4f}, {best.params}")
    return summary


def _plots(study, sweep_dir: str) -> None:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    for name, plot in (("optimization_history", optuna_plots.plot_optimization_history), ("param_importances", optuna_plots.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = plot(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            tmp = os.path.join(sweep_dir, f".{name}.tmp.png")
            figure.savefig(tmp, dpi=100)
            plt.close(figure)
            os.replace(tmp, os.path.join(sweep_dir, f"{name}.png"))
        except (ValueError, RuntimeError) as err:  # e.g. importances need two finished trials
            log.warning("no %s plot: %s", name, err)
