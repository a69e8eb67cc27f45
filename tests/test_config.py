"""Every config composes; every bad input is refused before heavy work with one line naming the key."""

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from framework.config import to_schema
from framework.errors import ConfigError
from framework.stages import STAGES
from tests.conftest import CONF_DIR, compose_config


def validate_train_config(cfg):
    return STAGES["train"].validate(cfg)

GROUP_NEEDS = {  # options that need a value the user must give
    ("model", "hf"): ["model.path={smol_dir}"],
    ("data", "text_files"): ["data.paths=[{text_file}]"],
    ("data", "hf_dataset"): ["data.hf_name=wikitext"],
    ("data", "labeled_files"): ["task=classification", "data.paths=[{csv_file}]"],
    **{option: ["task=classification"] for option in [("data", "default_classification"), ("data", "stdlib_topics"),
                                                       ("model", "minilm_l6"), ("model", "default_classification")]},
    ("logger", "mlflow"): ["logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"],  # its default is a server: none here
}
GPU_ONLY = {("precision", "16-mixed"), *(("strategy", s) for s in ("fsdp", "deepspeed", "deepspeed_zero3"))}


def config_options():
    for group in sorted(os.listdir(CONF_DIR)):
        folder = os.path.join(CONF_DIR, group)
        if os.path.isdir(folder) and group not in ("hydra", "experiment", "pipeline", "hparams_search", "launcher"):
            for name in sorted(os.listdir(folder)):
                yield group, name.removesuffix(".yaml")


@pytest.mark.parametrize("group,option", list(config_options()))
def test_every_config_option_composes_and_validates(group, option, tmp_path):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("hello world " * 100)
    smol_dir = tmp_path / "model"
    smol_dir.mkdir()
    (smol_dir / "config.json").write_text('{"max_position_embeddings": 2048}')
    csv_file = tmp_path / "labeled.csv"
    csv_file.write_text("text,label\nhello there,a\ngood bye,b\n")
    extra = [o.format(text_file=text_file, smol_dir=smol_dir, tmp_path=tmp_path, csv_file=csv_file) for o in GROUP_NEEDS.get((group, option), [])]
    if group in STAGES:  # a stage's own group: its section composes into the stage's (or its method's) dataclass
        stage = STAGES[group]
        # resolved where it sits (a section may read the task's defaults), as the stage's check reads it
        section = OmegaConf.create(OmegaConf.to_container(compose_config(group, [f"{group}={option}"])[group], resolve=True))
        typed = stage.typed_section(section) if stage.methods else to_schema(section, stage.section_schema, prefix=group)
        assert set(typed) >= set(section)
        return
    cfg = compose_config("train", [f"{group}={option}", *extra])
    assert cfg[group] is not None
    if (group, option) in GPU_ONLY:
        with pytest.raises(ConfigError, match="CUDA"):
            validate_train_config(cfg)
    elif (group, option) == ("data", "hf_dataset"):  # the tests run offline: the dataset cannot be reached
        with pytest.raises(ConfigError, match="cannot load 'wikitext'.*HF_HUB_OFFLINE") as error:
            validate_train_config(cfg)
        assert error.value.key == "data.hf_name"
    else:
        typed = validate_train_config(cfg)
        assert typed.precision.name != "auto"  # auto resolves to what this machine runs well


@pytest.mark.parametrize("name", sorted(n.removesuffix(".yaml") for n in os.listdir(os.path.join(CONF_DIR, "experiment"))))
def test_experiment_presets_compose_and_validate_every_stage(name, tmp_path):
    from framework.pipeline import plan

    cfg = compose_config("pipeline", [f"experiment={name}"], run_dir=str(tmp_path))
    planned = plan(cfg)
    assert [p.name for p in planned] == list(cfg.pipeline.stages)
    assert all(p.config.precision.name != "auto" for p in planned)  # validated: auto resolved for this machine
    assert not any(tmp_path.iterdir())  # planning writes nothing


@pytest.mark.parametrize("recipe", ["prune", "quantize", "lowrank", "distill", "share", "evaluate"])
def test_every_recipe_config_composes(recipe):
    assert compose_config(recipe, []).data.name


BAD_INPUTS = [
    (["optimizer.lr=-1"], "optimizer.lr", "must be > 0"),
    (["optimizer.lr=nan"], "optimizer.lr", "must be a finite number"),
    (["optimizer.betas=[0.9]"], "optimizer.betas", "two numbers"),
    (["scheduler.min_lr_ratio=-5"], "scheduler.min_lr_ratio", "must be in [0, 1]"),
    (["data.num_workers=-1"], "data.num_workers", "must be >= 0"),
    (["trainer.devices=0"], "trainer.devices", "must be a count >= 1"),
    (["trainer.num_nodes=0"], "trainer.num_nodes", "must be > 0"),
    (["optimizer.lr=0"], "optimizer.lr", "must be > 0"),
    (["optimizer.name=adagrad"], "optimizer.name", "not one of adamw, adam, sgd, rmsprop"),
    (["model.share_layers=8"], "model.share_layers", "more than the model's 4 layers"),
    (["data.block_size=1024", "model.max_position_embeddings=512"], "data.block_size", "larger than the model's 512"),
    (["data.batch_size=0"], "data.batch_size", "must be > 0"),
    (["precision=16-mixed"], "precision", "needs a CUDA GPU"),
    (["strategy=fsdp"], "strategy", "needs CUDA GPUs"),
    (["strategy=deepspeed"], "strategy", "needs CUDA GPUs"),
    (["data=text_files", "data.paths=[/no/such/file.txt]"], "data.paths", "does not exist"),
    (["model=hf", "model.path=/tmp"], "model.path", "holds no model"),
    (["model=hf", "model.path=/no/such/dir"], "model.path", "does not exist"),
    (["trainer.max_steps=-1"], "trainer.max_steps", "must be >= 0"),
    (["data.val_fraction=1.5"], "data.val_fraction", "must be in (0, 1)"),
]


@pytest.mark.parametrize("overrides,key,message", BAD_INPUTS)
def test_bad_input_gives_one_line_error_naming_the_key(overrides, key, message):
    cfg = compose_config("train", overrides)
    with pytest.raises(ConfigError) as error:
        validate_train_config(cfg)
    assert error.value.key == key
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("optimizer.lr=fast", "optimizer.lr: 'fast' is not a float"),
        ("optimizer.learning_rate=1e-3", "optimizer.learning_rate: unknown key (allowed: name, lr,"),
        ("optimizer=adagrad", "optimizer: 'adagrad' is not an option (options: adam, adamw, rmsprop, sgd)"),
    ],
)
def test_wrong_type_unknown_key_or_option_is_refused_when_composing(override, message):
    # The schemas are part of the composed config, so composition checks overrides against them and says so in one line.
    with pytest.raises(ConfigError) as error:
        compose_config("train", [override])
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_several_devices_without_a_strategy_run_our_ddp_launch():
    """strategy=auto with 2 devices would be Lightning's own DDP launcher, which re-runs the command line in each
    child (a -m sweep in every child, Lightning #11300); it becomes strategy=ddp, whose ranks we start."""
    assert validate_train_config(compose_config("train", ["trainer.devices=2"])).strategy.name == "ddp"
    assert validate_train_config(compose_config("train", [])).strategy.name == "auto"


def test_corpus_smaller_than_one_block_is_refused(train_config, tmp_path):
    train = STAGES["train"]
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words")
    cfg = train_config("data=text_files", f"data.paths=[{tiny}]", f"paths.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match="less than one block") as error:
        train(cfg)
    assert error.value.key == "data.paths"  # the corpus is too small, not the block size


def test_recipe_prints_the_error_as_one_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "recipes/train.py", "optimizer.lr=-0.1", f"run_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: optimizer.lr: must be > 0, got -0.1"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launchers_take_nodes_and_tasks_from_the_trainer(launcher, target):
    from framework.compose import compose

    cfg = compose("train", [f"launcher={launcher}", "trainer.devices=4", "trainer.num_nodes=2"], return_hydra_config=True)
    settings = cfg.hydra.launcher
    assert settings._target_.endswith(target)
    assert cfg.hydra.mode.name == "MULTIRUN"  # launchers run multiruns: no -m needed
    if launcher == "slurm":
        assert (settings.nodes, settings.tasks_per_node, settings.gpus_per_node) == (2, 4, 4)
        assert settings.signal_delay_s > 0 and settings.max_num_timeout > 0  # SIGUSR1 before the limit, requeues


# The three mistakes that used to be found only when their stage started, after minutes of training.
LATE_FAILURES = [
    ("pipeline.stages.prune.prune.sparsity=1.5", "pipeline.stages.prune.prune.sparsity", "must be in [0, 1)"),
    ("pipeline.stages.finetune.input=finetune", "pipeline.stages.finetune.input", "'finetune' is not an earlier stage"),
    ("pipeline.stages.distill.teacher=quantize", "pipeline.stages.distill.teacher", "'quantize' holds a quantized model"),
]


@pytest.mark.parametrize("override,key,message", LATE_FAILURES)
def test_pipeline_refuses_a_bad_stage_before_any_work(override, key, message, tmp_path):
    """No stage starts: nothing is trained or written (how long the refusal takes is in the README, not asserted)."""
    result = subprocess.run(
        [sys.executable, "recipes/pipeline.py", "experiment=tiny_pipeline", override, f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "stage pretrain" not in result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {key}: ") and message in last, last
    assert "Traceback" not in result.stderr
    assert {p.name for p in (tmp_path / "run").iterdir()} <= {".hydra", "pipeline.log"}  # Hydra's record, no stage


def test_import_layers_hold_and_an_upward_import_breaks_them(tmp_path):
    """`lint-imports` (run by make test) keeps the layers; a copy of the package with one upward import fails it."""
    import shutil

    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    assert subprocess.run([lint], capture_output=True, text=True).returncode == 0
    for name in ("framework", "bench", "pyproject.toml"):
        copy = shutil.copytree if os.path.isdir(name) else shutil.copy
        copy(name, tmp_path / name)
    with open(tmp_path / "framework" / "config.py", "a") as f:
        f.write("\nfrom framework import pipeline  # upward: schema importing orchestration\n")
    result = subprocess.run([lint], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0 and "framework.config -> framework.pipeline" in result.stdout
