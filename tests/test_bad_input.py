"""Every bad input a user is likely to type, through the real command line: one line naming the key, exit 2.

For each case: exit code 2, exactly one `error: <key>: ...` line (the last one), no traceback, no artifact
written, and the input artifacts unchanged. The commands run through tests/cli_runner.py (a fork of a process
that has imported the framework once), two at a time, so the ~110 cases take a few minutes on 2 cores.
"""

import os
import queue
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from framework.artifacts import COMPLETE, MODEL
from framework.stages import STAGES
from tests.cli_runner import RecipeRunner
from tests.conftest import COMMON, FAST, compose_config

pytestmark = pytest.mark.slow

QUICK = ["trainer.enable_progress_bar=false", "data.max_val_blocks=4", "data.block_size=64"]

# (recipe, arguments, the key the error must name, a fragment of its message). Placeholders: {artifact} a
# trained 2-layer Llama, {quantized} / {lowrank} / {shared} artifacts made from it, {damaged} a copy whose
# model.safetensors is truncated, {half} a copy without COMPLETE, {plain_dir} a directory that is no artifact,
# {empty_dir} an empty directory.
CASES = [
    # --- train: optimizer, scheduler ---
    ("train", ["optimizer.lr=-1"], "optimizer.lr", "must be > 0"),
    ("train", ["optimizer.lr=nan"], "optimizer.lr", "finite"),
    ("train", ["optimizer.lr=fast"], "optimizer.lr", "not a float"),
    ("train", ["optimizer.lrr=1e-3"], "optimizer.lrr", "did you mean 'lr'"),
    ("train", ["+optimizer.lrr=1e-3"], "optimizer.lrr", "did you mean 'lr'"),
    ("train", ["optimizer=adagrad"], "optimizer", "options: adam, adamw, rmsprop, sgd"),
    ("train", ["optimizer.betas=[0.9]"], "optimizer.betas", "two numbers"),
    ("train", ["optimizer.betas=[0.9,1.5]"], "optimizer.betas[1]", "[0, 1)"),
    ("train", ["optimizer.eps=0"], "optimizer.eps", "must be > 0"),
    ("train", ["optimizer.weight_decay=-0.1"], "optimizer.weight_decay", ">= 0"),
    ("train", ["optimizer=sgd", "optimizer.momentum=1.5"], "optimizer.momentum", "[0, 1)"),
    ("train", ["optimizer.lr=1e-4,1e-3"], "optimizer.lr", "-m"),
    ("train", ["scheduler.min_lr_ratio=-5"], "scheduler.min_lr_ratio", "[0, 1]"),
    ("train", ["scheduler.warmup_steps=-1"], "scheduler.warmup_steps", ">= 0"),
    ("train", ["scheduler=exponential"], "scheduler", "options: constant, cosine, linear"),
    # --- train: data ---
    ("train", ["data.num_workers=-1"], "data.num_workers", ">= 0"),
    ("train", ["data.batch_size=0"], "data.batch_size", "> 0"),
    ("train", ["data.block_size=0"], "data.block_size", "> 0"),
    ("train", ["data.block_size=1024"], "data.block_size", "512 positions"),
    ("train", ["data.val_fraction=1.5"], "data.val_fraction", "(0, 1)"),
    ("train", ["data.max_chars=-1"], "data.max_chars", "> 0"),
    ("train", ["data.max_val_blocks=0"], "data.max_val_blocks", "> 0"),
    ("train", ["data=text_files"], "data.paths", "at least one file"),
    ("train", ["data=text_files", "data.paths=[/no/such/file.txt]"], "data.paths", "does not exist"),
    ("train", ["data=wikipedia"], "data", "options:"),
    # --- train: trainer, machine ---
    ("train", ["trainer.devices=0"], "trainer.devices", ">= 1"),
    ("train", ["trainer.num_nodes=0"], "trainer.num_nodes", "> 0"),
    ("train", ["trainer.accelerator=gpu"], "trainer.accelerator", "no CUDA GPU"),
    ("train", ["trainer.accelerator=tpu"], "trainer.accelerator", "not one of"),
    ("train", ["trainer.max_steps=-1"], "trainer.max_steps", ">= 0"),
    ("train", ["trainer.val_check_interval=0"], "trainer.val_check_interval", "> 0"),
    ("train", ["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches", "> 0"),
    ("train", ["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val", "> 0"),
    ("train", ["trainer.checkpoint_every_n_steps=0"], "trainer.checkpoint_every_n_steps", "> 0"),
    ("train", ["precision=16-mixed"], "precision", "CUDA"),
    ("train", ["precision=fp8"], "precision", "options:"),
    ("train", ["strategy=fsdp"], "strategy", "CUDA"),
    ("train", ["strategy=deepspeed"], "strategy", "CUDA"),
    ("train", ["strategy=horovod"], "strategy", "options:"),
    # --- train: model, finetune, logger, inputs ---
    ("train", ["model=gpt5"], "model", "options:"),
    ("train", ["model.vocab_size=10"], "model.vocab_size", ">= 260"),
    ("train", ["model.hidden_size=130"], "model.hidden_size", "not divisible"),
    ("train", ["model.num_kv_heads=3"], "model.num_kv_heads", "must divide"),
    ("train", ["model.share_layers=0"], "model.share_layers", "> 0"),
    ("train", ["model.share_layers=5"], "model.share_layers", "2 layers"),
    ("train", ["model=hf"], "model.path", "local directory or a hub id"),
    ("train", ["model=hf", "model.path=/no/such/dir"], "model.path", "does not exist"),
    ("train", ["model=hf", "model.path={empty_dir}"], "model.path", "holds no model"),
    ("train", ["model=hf", "model.path=someorg/somemodel"], "model.path", "HF_HUB_OFFLINE"),
    ("train", ["finetune=lora", "finetune.r=0"], "finetune.r", "> 0"),
    ("train", ["finetune=qlora"], "finetune", "options: full, lora"),
    ("train", ["logger=comet"], "logger", "options:"),
    ("train", ["+foo=1"], "foo", "unknown key"),
    ("train", ["seed=abc"], "seed", "not an int"),
    ("train", ["input=/no/such/artifact"], "input", "does not exist"),
    ("train", ["input={plain_dir}"], "input", "not a complete artifact"),
    ("train", ["input={quantized}"], "input", "holds a quantized model"),
    ("train", ["input={damaged}"], "input", "damaged"),
    # --- prune ---
    ("prune", [], "input", "reads an artifact"),
    ("prune", ["input={half}"], "input", "not a complete artifact"),
    ("prune", ["input={damaged}"], "input", "model.safetensors has"),
    ("prune", ["input={quantized}"], "input", "reads dense models"),
    ("prune", ["input={lowrank}"], "input", "holds a lowrank model"),
    ("prune", ["input={shared}"], "input", "holds a shared model"),
    ("prune", ["input={artifact}", "prune.sparsity=1.5"], "prune.sparsity", "[0, 1)"),
    ("prune", ["input={artifact}", "prune.sparsity=-0.1"], "prune.sparsity", "[0, 1)"),
    ("prune", ["input={artifact}", "prune.n_m=[4,2]"], "prune.n_m", "0 < N < M"),
    ("prune", ["input={artifact}", "prune=structured", "prune.drop_layers=10"], "prune.drop_layers", "2"),
    ("prune", ["input={artifact}", "prune=structured", "prune.heads_ratio=1.0"], "prune.heads_ratio", "[0, 1)"),
    ("prune", ["input={artifact}", "prune=magnitude", "prune.threshold=0.01"], "prune.threshold", "exactly one"),
    ("prune", ["input={artifact}", "prune=magnitude_threshold", "prune.threshold=-1"], "prune.threshold", "> 0"),
    ("prune", ["input={artifact}", "prune=wanda", "+prune.damp=0.1"], "prune.damp", "unknown key"),
    ("prune", ["input={artifact}", "prune=gradual"], "trainer.max_steps", "end_step"),
    ("prune", ["input={artifact}", "prune=pruneall"], "prune", "options:"),
    ("prune", ["input={artifact}", "prune.calibration_samples=0"], "prune.calibration_samples", "> 0"),
    ("prune", ["input={artifact}", "prune=magnitude", "prune.scope=everywhere"], "prune.scope", "layer, global"),
    ("prune", ["input={artifact}", "model=llama_nano"], "model", "input"),
    ("prune", ["input={artifact}", "prune.method=lottery"], "prune.method", "not one of"),
    # --- quantize ---
    ("quantize", ["input={artifact}", "quantize=int9"], "quantize", "options:"),
    ("quantize", ["input={artifact}", "quantize.method=int3"], "quantize.method", "not one of"),
    ("quantize", ["input={artifact}", "quantize=qat_int8_dynamic"], "trainer.max_steps", "qat"),
    ("quantize", ["input={artifact}", "quantize.group_size=0"], "quantize.group_size", "> 0"),
    ("quantize", ["input={quantized}"], "input", "holds a quantized model"),
    # --- lowrank ---
    ("lowrank", ["input={artifact}", "lowrank.energy=1.5"], "lowrank.energy", "(0, 1]"),
    ("lowrank", ["input={artifact}", "lowrank.rank=-5", "lowrank.energy=null"], "lowrank.rank", "> 0"),
    ("lowrank", ["input={artifact}", "lowrank.rank=8"], "lowrank.rank", "exactly one"),
    ("lowrank", ["input={artifact}", "lowrank.targets=[]"], "lowrank.targets", "at least one"),
    ("lowrank", ["input={shared}"], "input", "holds a shared model"),
    # --- distill ---
    ("distill", [], "distill.teacher", "reads an artifact"),
    ("distill", ["distill.teacher=/no/such/dir"], "distill.teacher", "does not exist"),
    ("distill", ["distill.teacher={quantized}"], "distill.teacher", "holds a quantized model"),
    ("distill", ["distill.teacher={artifact}", "distill.num_layers=10"], "distill.num_layers", "the teacher has 2"),
    ("distill", ["distill.teacher={artifact}", "distill.layer_ratio=0"], "distill.layer_ratio", "(0, 1]"),
    ("distill", ["distill.teacher={artifact}", "distill.loss=mse"], "distill.loss", "not one of"),
    ("distill", ["distill.teacher={artifact}", "distill.temperature=0"], "distill.temperature", "> 0"),
    ("distill", ["distill.teacher={artifact}", "distill.alpha=2"], "distill.alpha", "[0, 1]"),
    ("distill", ["distill.teacher={artifact}", "distill.student=clone"], "distill.student", "derive, config"),
    # --- share ---
    ("share", ["input={artifact}", "share.group_size=1"], "share.group_size", ">= 2"),
    ("share", ["input={artifact}", "share.group_size=9"], "share.group_size", "2 layers"),
    ("share", ["input={artifact}", "share.init=median"], "share.init", "mean, first"),
    ("share", ["input={lowrank}"], "input", "holds a lowrank model"),
    # --- evaluate ---
    ("evaluate", [], "input", "input=<dir>"),
    ("evaluate", ["input={plain_dir}"], "input", "not a complete artifact"),
    ("evaluate", ["input={damaged}"], "input", "damaged"),
    ("evaluate", ["input={artifact}", "data.batch_size=0"], "data.batch_size", "> 0"),
    # --- pipeline: every stage is checked before the first one runs ---
    ("pipeline", ["pipeline.stages.prune.prune.sparsity=1.5"], "pipeline.stages.prune.prune.sparsity", "[0, 1)"),
    ("pipeline", ["pipeline.stages.finetune.input=finetune"], "pipeline.stages.finetune.input", "not an earlier stage"),
    ("pipeline", ["pipeline.stages.distill.teacher=quantize"], "pipeline.stages.distill.teacher", "quantized model"),
    ("pipeline", ["pipeline.stages.quantize.groups.quantize=int9"], "pipeline.stages.quantize.groups.quantize", "options:"),
    ("pipeline", ["+pipeline.stages.prune.prune.sparsty=0.7"], "pipeline.stages.prune.prune.sparsty", "sparsity"),
    ("pipeline", ["pipeline.stages.prune.kind=compress"], "pipeline.stages.prune.kind", "not one of"),
    ("pipeline", ["pipeline=nope"], "pipeline", "options:"),
    ("pipeline", ["experiment=nope"], "experiment", "options:"),
    ("pipeline", ["+common.optimizer.lr=-1"], "pipeline.stages.quantize.optimizer.lr", "> 0"),  # the first stage without its own lr
    ("pipeline", ["pipeline.stages.pretrain.optimizer.lr=-1"], "pipeline.stages.pretrain.optimizer.lr", "> 0"),
    ("pipeline", ["precision=16-mixed"], "pipeline.stages.pretrain.precision", "CUDA"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The artifacts the cases read, made once: a trained 2-layer Llama and what the stages make of it."""
    root = tmp_path_factory.mktemp("inputs")
    STAGES["train"](compose_config("train", [*FAST, "trainer.max_steps=2"], run_dir=str(root / "artifact")))
    for kind, extra in (("quantize", ["quantize=int8_weight_only"]), ("lowrank", ["lowrank.energy=null", "lowrank.rank=8"]), ("share", [])):
        STAGES[kind](compose_config(kind, [*COMMON, f"input={root / 'artifact'}", *extra], run_dir=str(root / {"quantize": "quantized", "lowrank": "lowrank", "share": "shared"}[kind])))
    shutil.copytree(root / "artifact", root / "damaged")
    weights = root / "damaged" / MODEL / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    shutil.copytree(root / "artifact", root / "half")
    os.unlink(root / "half" / COMPLETE)
    (root / "plain_dir").mkdir()
    (root / "plain_dir" / "notes.txt").write_text("not an artifact")
    (root / "empty_dir").mkdir()
    return root


def arguments_of(recipe: str, args: list[str], inputs, run_dir) -> list[str]:
    places = {name: str(inputs / name) for name in ("artifact", "quantized", "lowrank", "shared", "damaged", "half", "plain_dir", "empty_dir")}
    arguments = [arg.format(**places) for arg in args]
    if recipe == "pipeline":
        arguments = ["experiment=tiny_pipeline", *arguments]
    elif recipe in ("train", "distill"):  # a small model, unless the case picks one
        arguments = [*(COMMON if any(a.startswith("model=") for a in arguments) else FAST), *QUICK, *arguments]
    else:
        arguments = [*QUICK, *arguments]
    return [*arguments, f"run_dir={run_dir}"]


def tree_state(root) -> dict:
    return {path: (os.path.getsize(path), os.path.getmtime(path)) for path in (os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)}


@pytest.fixture(scope="module")
def outcomes(inputs, tmp_path_factory):
    """Every case run once, two at a time (a runner per core); the inputs' state before and after all of them."""
    runs = tmp_path_factory.mktemp("runs")
    idle = queue.Queue()
    for _ in range(2):
        idle.put(RecipeRunner())
    before = tree_state(inputs)

    def run(index: int):
        recipe, args, *_ = CASES[index]
        run_dir = runs / f"case{index:03d}"
        runner = idle.get()
        try:
            return run_dir, runner.run(recipe, *arguments_of(recipe, args, inputs, run_dir))
        finally:
            idle.put(runner)

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(run, range(len(CASES))))
    finally:
        while not idle.empty():
            idle.get().close()
    return results, before, tree_state(inputs)


def test_there_are_at_least_eighty_cases_across_every_recipe():
    assert len(CASES) >= 80
    assert {recipe for recipe, *_ in CASES} >= {"train", "prune", "quantize", "lowrank", "distill", "share", "evaluate", "pipeline"}


def test_no_case_changed_its_inputs(outcomes):
    _, before, after = outcomes
    assert after == before


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{r}:{' '.join(a) or '(none)'}" for r, a, *_ in CASES])
def test_bad_input_is_one_line_naming_the_key_and_exit_2(index, outcomes):
    recipe, args, key, fragment = CASES[index]
    run_dir, result = outcomes[0][index]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
    assert errors[0].startswith(f"error: {key}: "), errors[0]
    assert fragment in errors[0], errors[0]
    assert not (run_dir / COMPLETE).exists() and not (run_dir / MODEL).exists()
    assert not any((run_dir / stage / COMPLETE).exists() for stage in ("pretrain", "finetune", "prune", "quantize", "distill"))
