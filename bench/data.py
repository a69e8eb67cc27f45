"""The data table: a large one-file corpus prepared (tokens/s with 1 and 2 workers, peak memory), then trained on
(time to the first step, peak memory), and the prepared corpus's size on disk.

Every measurement runs in a fresh process, as a user's command would: `python -m bench.data <step> <spec>` prints
one JSON line; peak RSS is that process's own (getrusage ru_maxrss, i.e. VmHWM), torch and all included.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from typing import Sequence

from bench.common import BENCH_DIR, warn_if_busy, write_table
from framework.hardware import describe_machine

log = logging.getLogger(__name__)

DATA_SIZE = 2 * 10**9  # bytes of text: the scale (hours on 2 busy cores; see the caption for the time)
QUICK_DATA_SIZE = 4 * 10**6
TRAIN_STEPS = 20
MODEL = "llama_nano"  # the bench is about data: the smallest model keeps the training side's memory honest

DATA_COLUMNS = {
    "run": "step",
    "seconds": "seconds (median)",
    "spread_s": "spread (min-max s)",
    "tokens_per_s": "tokens/s",
    "vs_one_worker": "ratio to 1 worker",
    "tokens_per_cpu_s": "tokens per CPU s",
    "first_step_s": "first step after (s)",
    "peak_rss_mb": "peak RSS (MB)",
}


# --- the corpus ---------------------------------------------------------------------------------------------------


def base_documents() -> list[str]:
    """Every paragraph of the standard library's sources and of the Python docs' topics (offline on any machine)."""
    from pydoc_data.topics import topics

    texts = list(topics.values())
    root = sysconfig.get_paths()["stdlib"]
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__"))
        for name in sorted(n for n in names if n.endswith(".py")):
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    texts.append(f.read())
            except (UnicodeDecodeError, OSError):
                continue
    return [p for text in texts for p in text.split("\n\n") if p.strip()]


def build_corpus(path: str, size: int, seed: int = 0) -> str:
    """A text file of at least `size` bytes: the base paragraphs, shuffled anew for each repetition (kept for reruns)."""
    if os.path.isfile(path) and os.path.getsize(path) >= size:
        return path
    documents, rng, written = base_documents(), random.Random(seed), 0
    tmp = f"{path}.partial"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            rng.shuffle(documents)
            for document in documents:
                written += f.write(document + "\n\n")
                if written >= size:
                    break
    os.replace(tmp, path)
    return path


# --- the measured processes ------------------------------------------------------------------------------------------


def overrides(spec: dict) -> list[str]:
    return [
        f"model={MODEL}", "data=text_files", f"data.paths=[{spec['corpus']}]", f"paths.cache_dir={spec['cache']}",
        "precision=32-true", "trainer.enable_progress_bar=false", "data.max_val_blocks=8",
        f"trainer.max_steps={spec['steps']}", f"trainer.val_check_interval={spec['steps'] + 1}",
        f"trainer.checkpoint_every_n_steps={spec['steps'] + 1}", f"run_dir={spec['run_dir']}",
    ]


def child(step: str, spec: dict) -> dict:
    """One measured step (tokenizer, prepare or train) in this fresh process: its seconds and peak RSS."""
    from framework.compose import compose
    from framework.data import TOKENIZER_SAMPLE_CHARS, LMDataModule, prepared_splits, training_texts
    from framework.models import build_model_and_tokenizer
    from framework.stages import STAGES

    cfg = STAGES["train"].validate(compose("train", overrides(spec)))
    cached = glob.glob(os.path.join(cfg.paths.cache_dir, "tokenizers", "*", "tokenizer.json"))
    result = {"cached": bool(cached), "sample_chars": TOKENIZER_SAMPLE_CHARS}
    started = time.perf_counter()
    _, tokenizer = build_model_and_tokenizer(cfg.model, cfg.paths.cache_dir, corpus=training_texts(cfg.data))
    result["seconds"] = time.perf_counter() - started
    if step == "prepare":
        cfg.data.num_proc = spec["workers"]
        started, cpu = time.perf_counter(), cpu_seconds()
        corpus = prepared_splits(cfg.data, tokenizer, spec["data_cache"])
        splits = corpus.meta["splits"]
        result.update(
            seconds=time.perf_counter() - started, cpu_s=cpu_seconds() - cpu, tokens=sum(s["tokens"] for s in splits.values()),
            splits=splits, directory=corpus.directory,
        )
    elif step == "train":
        started = time.perf_counter()
        LMDataModule(cfg.data, tokenizer, cfg.paths.cache_dir, cfg.seed)  # what the stage does with its data before training
        result["data_open_s"] = time.perf_counter() - started
        result.update(train_until_first_step(cfg))
    return {**result, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cpu_seconds() -> float:
    """CPU time of this process, all its threads: unlike wall time, barely moved by other jobs on the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_until_first_step(cfg) -> dict:
    """The train stage, as the recipe runs it, noting when its first step ends."""
    import lightning.pytorch as pl

    from framework.stages import STAGES
    from framework.training import extra_callbacks

    class FirstStep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not hasattr(self, "at"):
                self.at, self.wall = time.perf_counter(), time.time()

    first, started = FirstStep(), time.perf_counter()
    with extra_callbacks([first]):
        metrics = STAGES["train"].run(cfg)
    return {
        "seconds": time.perf_counter() - started, "first_step_s": first.at - started, "first_step_wall": first.wall,
        "tokens_per_s": metrics["train_tokens_per_s"],
    }


def measure(step: str, spec: dict) -> dict:
    """Run `child(step, spec)` in a fresh Python process; its JSON result, with the process's start time."""
    started = time.time()
    process = subprocess.run([sys.executable, "-m", "bench.data", step, json.dumps(spec)], capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"bench.data {step} failed:\n{process.stderr[-4000:]}")
    return {**json.loads(process.stdout.strip().splitlines()[-1]), "process_started": started}


# --- the table ---------------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'2GB', '200MB', '4e6' -> bytes (decimal units)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(float(text))


def data_rows(size: int, work_dir: str, workers: Sequence[int] = (1, 2), repeats: int = 1, steps: int = TRAIN_STEPS) -> tuple[list[dict], dict]:
    """Rows of the data table and what the caption states (corpus, tokens, cache size)."""
    corpus = build_corpus(os.path.join(work_dir, f"corpus-{size}.txt"), size)
    cache = os.path.join(work_dir, f"cache-{size}")
    spec = {"corpus": corpus, "cache": cache, "steps": steps, "run_dir": os.path.join(work_dir, "run")}

    tokenizer = measure("tokenizer", spec)  # trained on the corpus's first characters, once: a rerun finds it cached
    label = "cached" if tokenizer["cached"] else f"trained on the first {min(size, tokenizer['sample_chars']) / 1e6:,.0f}M characters"
    rows = [{"run": f"BPE tokenizer ({label})", "seconds": tokenizer["seconds"], "peak_rss_mb": tokenizer["peak_rss_mb"]}]

    # Interleaved: 1, 2, 1, 2 workers, ... each into a fresh directory; the last one stays for training.
    timings = {n: [] for n in workers}
    prepared = None
    for repeat in range(repeats):
        for n in workers:
            last = repeat == repeats - 1 and n == workers[-1]
            data_cache = cache if last else os.path.join(work_dir, f"prepare-{n}-{repeat}")
            shutil.rmtree(os.path.join(data_cache, "data"), ignore_errors=True)
            result = measure("prepare", {**spec, "workers": n, "data_cache": data_cache})
            log.info("prepare, %d worker(s): %.0f s, %.0f tokens/s, peak RSS %.0f MB", n, result["seconds"], result["tokens"] / result["seconds"], result["peak_rss_mb"])
            timings[n].append(result)
            if last:
                prepared = result
            else:
                shutil.rmtree(data_cache, ignore_errors=True)
    for n in workers:
        seconds = [r["seconds"] for r in timings[n]]
        rows.append({
            "run": f"prepare, {n} worker{'s' if n > 1 else ''}", "seconds": statistics.median(seconds),
            "spread_s": f"{min(seconds):.0f}-{max(seconds):.0f}" if repeats > 1 else None,
            "tokens_per_s": prepared["tokens"] / statistics.median(seconds),
            "tokens_per_cpu_s": prepared["tokens"] / statistics.median(r["cpu_s"] for r in timings[n]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in timings[n]),
        })
    for row in rows[1:]:
        row["vs_one_worker"] = row["tokens_per_s"] / rows[1]["tokens_per_s"]

    shutil.rmtree(spec["run_dir"], ignore_errors=True)
    train = measure("train", spec)
    rows.append({
        "run": f"train {MODEL}, {steps} steps on the prepared corpus", "seconds": train["seconds"], "first_step_s": train["first_step_s"],
        "tokens_per_s": train["tokens_per_s"], "peak_rss_mb": train["peak_rss_mb"],
    })
    cache_bytes = sum(os.path.getsize(os.path.join(prepared["directory"], name)) for name in os.listdir(prepared["directory"]))
    facts = {
        "corpus_bytes": os.path.getsize(corpus), "tokens": prepared["tokens"], "splits": prepared["splits"],
        "cache_bytes": cache_bytes, "first_step_from_process_start_s": train["first_step_wall"] - train["process_started"],
        "data_open_s": train["data_open_s"],
    }
    return rows, facts


def data_table(size: int = DATA_SIZE, out_dir: str = BENCH_DIR, workers: Sequence[int] = (1, 2), repeats: int = 1, steps: int = TRAIN_STEPS) -> str:
    """Measure the data table and write it as <out_dir>/data.json and data.md; returns the Markdown."""
    load_before = warn_if_busy()
    rows, facts = data_rows(size, os.path.join(out_dir, "data"), workers, repeats, steps)
    caption = (
        f"Data at scale: one text file of {facts['corpus_bytes'] / 1e6:,.0f} MB (the standard library's sources and the "
        f"Python docs' topics, cut into paragraphs and repeated, shuffled anew each time) prepared as `data=text_files` "
        f"does: tokenized once ({MODEL}'s BPE tokenizer) into {facts['tokens']:,} token ids on disk, "
        f"{facts['cache_bytes'] / 1e6:,.0f} MB ({facts['cache_bytes'] / facts['corpus_bytes']:.2f} bytes per byte of text), "
        f"memory-mapped by training. Each step runs in a fresh process; peak RSS is that process's (torch included). "
        f"Preparation repeated {repeats}x, interleaved; tokens/s over the whole pass (reading, tokenizing, writing); "
        f"tokens per CPU second (all threads) is what other jobs on the machine barely change. "
        f"The first training step ends {rows[-1]['first_step_s']:.1f} s after the train stage starts (its data opens in "
        f"{facts['data_open_s']:.2f} s; the rest is the model, the start's val loss on 8 blocks, Lightning and the step), "
        f"{facts['first_step_from_process_start_s']:.1f} s after the process starts (imports included). "
        f"Machine: {describe_machine()}; load average {load_before:.1f} before."
    )
    meta = {**facts, "repeats": repeats, "workers": list(workers), "steps": steps, "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0]}
    return write_table("data", rows, DATA_COLUMNS, caption, meta, out_dir)


if __name__ == "__main__":
    from framework.environment import quiet_libraries

    quiet_libraries()
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(child(sys.argv[1], json.loads(sys.argv[2]))))
