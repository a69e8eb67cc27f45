"""What a stage kind is: a config schema (the common sections plus its own), the checks that run before
any work, the artifact formats its input may have, and the run that writes its artifact.

A stage module (framework/stages/<kind>.py) subclasses `Stage` and sets:
  kind            the name used by recipes, pipelines and the registry (framework.stages.STAGES)
  section         its own config section (conf/<kind>/ holds its options), with `section_schema` a
                  dataclass, or `methods`: {method name: dataclass}, the section's `method` (or
                  `method_key`) picking one
  reads           the model formats its input may have (framework.artifacts.FORMAT_MARKERS)
  check(cfg)      its own checks, after the common ones
  run(cfg, ...)   the work, on a validated config; usually `training.train` with the stage's hooks
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import field, make_dataclass
from typing import Any, ClassVar, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from framework import artifacts
from framework.config import ModelConfig, StageConfig, one_of, to_schema, unknown_key_message
from framework.data import check_data_config
from framework.labeled import LABELED_SOURCES, check_labeled_config
from framework.errors import ConfigError
from framework.hardware import check_machine
from framework.models import check_model_config, model_max_positions
from framework.training.modules import check_training_config
from framework.training.tasks import TASKS
from framework.training.tracking import check_logger_config


def check_common(cfg: DictConfig) -> None:
    """The checks of the sections every stage has: model, data, optimization, logging, machine."""
    one_of("task", cfg.task.name, TASKS)
    check_model_config(cfg.model)
    if cfg.task.name == "causal_lm" and cfg.data.source in LABELED_SOURCES[:2]:
        raise ConfigError("data", f"'{cfg.data.name}' is labeled text for classification: add task=classification")
    (check_labeled_config if cfg.task.name == "classification" else check_data_config)(cfg.data)
    if cfg.eval_data is not None:
        try:
            check_data_config(cfg.eval_data)
        except ConfigError as err:  # the checks name data.<key>
            raise ConfigError("eval_data" + err.key.removeprefix("data"), err.message) from None
    check_training_config(cfg)
    check_logger_config(cfg.logger)
    check_machine(cfg)
    if cfg.task.name == "classification" and cfg.model.arch in ("llama", "gpt2"):
        raise ConfigError("model", f"classification starts from a pretrained model (model=minilm_l6, or model=hf model.path=...), not a from-scratch {cfg.model.arch}")
    max_positions = model_max_positions(cfg.model)
    if max_positions is not None and cfg.data.block_size > max_positions:
        raise ConfigError("data.block_size", f"{cfg.data.block_size} is larger than the model's {max_positions} positions")


def artifact_model(source: str) -> DictConfig:
    """The model section of an artifact's model: what a stage reading it (or evaluate) builds."""
    name = os.path.basename(os.path.normpath(source))
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": name, "arch": "artifact", "path": source, "tokenizer": "pretrained"})


def artifact_config(source: str | None) -> dict | None:
    """The HF config.json of an artifact's model, when the artifact exists already (not in a pipeline's plan)."""
    path = os.path.join(source, artifacts.MODEL, "config.json") if source else ""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def num_layers(config: dict | None) -> int | None:
    return (config.get("num_hidden_layers") or config.get("n_layer")) if config else None


class Stage:
    kind: ClassVar[str] = ""
    section: ClassVar[str | None] = None
    section_schema: ClassVar[type | None] = None
    methods: ClassVar[dict[str, type]] = {}
    method_key: ClassVar[str] = "method"  # the section's key that picks one of `methods`
    reads: ClassVar[tuple[str, ...]] = ()
    input_key: ClassVar[str] = "input"
    input_required: ClassVar[bool] = True
    produces: ClassVar[str] = "dense"

    # --- the schema ------------------------------------------------------------------------------------------

    @functools.cached_property
    def schema(self) -> type:
        """StageConfig plus the stage's section: typed by its dataclass, or left open when a method picks it."""
        if self.section is None:
            return StageConfig
        if self.section_schema is not None:
            extra = (self.section, self.section_schema, field(default_factory=self.section_schema))
        else:
            extra = (self.section, Any, field(default=None))
        return make_dataclass(f"{self.kind.title()}StageConfig", [extra], bases=(StageConfig,))

    def typed_section(self, section: DictConfig) -> DictConfig:
        """The section merged into its method's dataclass, so each method takes its own knobs and no others."""
        method = section.get(self.method_key) if section is not None else None
        one_of(f"{self.section}.{self.method_key}", method, self.methods)
        return to_schema(section, self.methods[method], prefix=self.section)

    # --- validation ------------------------------------------------------------------------------------------

    def validate(self, cfg: DictConfig, planned_inputs: dict[str, str] | None = None) -> DictConfig:
        """The typed, fully checked config; nothing heavy is loaded. Raises ConfigError naming the key.

        `planned_inputs` ({input key: model format}) stands for input artifacts a pipeline has not yet
        written; without it the input artifact must exist and is checked.
        """
        keys = list(self.schema.__dataclass_fields__)
        unknown = [k for k in cfg if k not in keys]
        if unknown:  # `+foo=1` on the command line: Hydra adds it, nothing would read it
            raise ConfigError(unknown[0], unknown_key_message(unknown[0], keys))
        # Plain values, not the composed nodes: a key added with `+` to a typed node would pass the merge.
        typed = to_schema(OmegaConf.create({k: OmegaConf.to_container(cfg, resolve=True)[k] for k in keys if k in cfg}), self.schema)
        if self.methods:
            with open_dict(typed):
                typed[self.section] = self.typed_section(typed[self.section])
        self._resolve_input(typed, planned_inputs)
        missing = sorted(OmegaConf.missing_keys(typed))
        if missing:
            raise ConfigError(missing[0], f"is required: set it on the command line ({missing[0]}=<value>)")
        check_common(typed)
        self.check(typed)
        return typed

    def check(self, cfg: DictConfig) -> None:
        """The stage's own checks (ranges of its section, what it needs from the model or machine)."""

    def _resolve_input(self, cfg: DictConfig, planned: dict[str, str] | None) -> None:
        source = OmegaConf.select(cfg, self.input_key, throw_on_missing=False)
        if not source:
            if self.reads and self.input_required:
                raise ConfigError(self.input_key, f"the {self.kind} stage reads an artifact: set {self.input_key}=<stage directory>")
            return
        found = planned[self.input_key] if planned is not None else artifacts.check_artifact(source, self.input_key)
        self.check_input_format(found, self.input_key, source)
        if cfg.task.name == "causal_lm" and artifacts.holds_classifier(source):
            raise ConfigError("task", f"'{source}' holds a sequence classifier: add task=classification")
        self.use_input(cfg, source)

    def check_input_format(self, found: str, key: str, source: str) -> None:
        if found not in self.reads:
            raise ConfigError(key, f"'{source}' holds a {found} model; the {self.kind} stage reads {' or '.join(self.reads)} models")

    def use_input(self, cfg: DictConfig, source: str) -> None:
        """Make the input artifact's model the stage's model (distill's student may come from `model` instead)."""
        with open_dict(cfg):
            cfg.model = artifact_model(source)

    def output_format(self, cfg: DictConfig, input_format: str | None) -> str:
        """The model format of the artifact this stage will write (what a later stage may read)."""
        return self.produces

    # --- running ---------------------------------------------------------------------------------------------

    def run(self, cfg: DictConfig, stage_dir: str | None = None, input_fingerprints: Sequence[str] = ()) -> dict:
        raise NotImplementedError

    def __call__(self, cfg: DictConfig, stage_dir: str | None = None, input_fingerprints: Sequence[str] = ()) -> dict:
        """Validate, then run in this process: the stage as a plain Python function."""
        return self.run(self.validate(cfg), stage_dir, input_fingerprints)

    def input_fingerprints(self, cfg: DictConfig) -> list[str]:
        source = OmegaConf.select(cfg, self.input_key, throw_on_missing=False)
        return [artifacts.read_fingerprint(source) or ""] if source else []
