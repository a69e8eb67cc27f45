"""Data at scale: corpora stream from disk into memory-mapped token files, prepared once for every process;
the splits users name; one-file corpora; whole-file evaluation; bad files refused in one line."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from framework.corpus import files as corpus_files
from framework.corpus import prepare as preparation
from framework.data import LMDataModule, ResumableBatchSampler, encoder, prepared_splits
from framework.errors import ConfigError
from framework.models import train_bpe_tokenizer
from framework.stages import STAGES
from tests.conftest import FAST, compose_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def paragraphs() -> list[str]:
    """Real prose with no blank line inside a paragraph: the Python docs' topics, cut at blank lines."""
    from pydoc_data.topics import topics

    return [p.strip() for text in topics.values() for p in text.split("\n\n") if p.strip() and not any(line.isspace() for line in p.splitlines())]


def write_documents(path, documents) -> str:
    path.write_text("\n\n".join(documents) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(lambda: paragraphs()[:2000], 512, "tests-data", str(tmp_path_factory.mktemp("tokenizer")))


def expected_tokens(tokenizer, documents) -> np.ndarray:
    """What a split holds: each document as the HF tokenizer encodes it, followed by EOS."""
    ids = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    return np.array([token for doc in ids for token in (*doc, tokenizer.eos_token_id)])


def data_config(*overrides):
    return STAGES["train"].validate(compose_config("train", [*FAST, "data=text_files", *overrides])).data


# --- reading files --------------------------------------------------------------------------------------------


def test_a_text_file_is_cut_into_documents_at_blank_lines_and_nothing_is_lost(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond line\n\n\n  \nthird\n\nfourth")
    assert list(corpus_files.file_documents("data.paths", str(path), "text")) == ["first line\nsecond line\n", "third\n", "fourth"]

    monkeypatch.setattr(corpus_files, "MAX_DOCUMENT_CHARS", 100)  # a text with no blank line is cut into bounded pieces
    text = "".join(f"line {i} of a text that never pauses\n" for i in range(50))
    (tmp_path / "long.txt").write_text(text)
    documents = list(corpus_files.file_documents("data.paths", str(tmp_path / "long.txt"), "text"))
    assert len(documents) > 10 and max(map(len, documents)) < 200 and "".join(documents) == text


def test_jsonl_and_parquet_files_hold_one_document_per_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "one", "id": 1}, {"text": "  ", "id": 2}, {"text": None, "id": 3}, {"text": "two\n\nstill two", "id": 4}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.parquet"):  # blank and missing texts are skipped; a row is never cut
        assert list(corpus_files.file_documents("data.paths", str(tmp_path / name), "text")) == ["one", "two\n\nstill two"]


# --- preparing ------------------------------------------------------------------------------------------------


def test_splits_hold_every_document_once_in_order_whatever_the_number_of_workers(tokenizer, tmp_path):
    corpus = write_documents(tmp_path / "corpus.txt", paragraphs())
    documents = list(corpus_files.file_documents("data.paths", corpus, "text"))
    val = [d for d in documents if preparation.is_validation(d, 0.1, 0)]
    train = [d for d in documents if not preparation.is_validation(d, 0.1, 0)]
    assert 0.05 < len(val) / len(documents) < 0.15

    prepared = {}
    for workers in (1, 2):
        data = data_config(f"data.paths=[{corpus}]", f"data.num_proc={workers}")
        prepared[workers] = prepared_splits(data, tokenizer, str(tmp_path / f"cache{workers}"))
    for split, expected in (("train", train), ("val", val)):
        np.testing.assert_array_equal(prepared[1].tokens(split), expected_tokens(tokenizer, expected))
        np.testing.assert_array_equal(prepared[2].tokens(split), prepared[1].tokens(split))
    assert prepared[1].dtype == np.uint16  # a 512-token vocabulary: two bytes a token on disk


def test_val_paths_make_the_val_split_from_those_files_alone(tokenizer, tmp_path):
    texts = paragraphs()
    corpus = write_documents(tmp_path / "train.txt", texts[:1500])
    valid = write_documents(tmp_path / "valid.txt", texts[1500:1700])
    data = data_config(f"data.paths=[{corpus}]", f"data.val_paths=[{valid}]", f"paths.cache_dir={tmp_path / 'cache'}")
    datamodule = LMDataModule(data, tokenizer, str(tmp_path / "cache"), seed=0)

    read = lambda path: list(corpus_files.file_documents("data.paths", path, "text"))  # noqa: E731
    np.testing.assert_array_equal(datamodule.corpus.tokens("val"), expected_tokens(tokenizer, read(valid)))
    np.testing.assert_array_equal(datamodule.corpus.tokens("train"), expected_tokens(tokenizer, read(corpus)))
    blocks = datamodule.val_blocks()
    assert blocks.shape == (data.max_val_blocks, data.block_size)
    np.testing.assert_array_equal(blocks.flatten().numpy(), expected_tokens(tokenizer, read(valid))[: blocks.numel()])


def test_a_local_dataset_read_as_a_stream_prepares_the_same_tokens(tokenizer, tmp_path):
    """data=hf_dataset with streaming=true (here on a local dataset directory: the tests are offline)."""
    texts = paragraphs()[:600]
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepared = {}
    for streaming in (False, True):
        data = data_config("data=hf_dataset", f"data.hf_name={tmp_path / 'dataset'}", f"data.streaming={streaming}")
        prepared[streaming] = LMDataModule(data, tokenizer, str(tmp_path / f"cache-{streaming}"), seed=0)
    val = [t for t in texts if preparation.is_validation(t, 0.1, 0)]
    np.testing.assert_array_equal(prepared[True].corpus.tokens("val"), expected_tokens(tokenizer, val))
    for split in ("train", "val"):
        np.testing.assert_array_equal(prepared[True].corpus.tokens(split), prepared[False].corpus.tokens(split))


def test_blocks_read_in_dataloader_workers_are_the_blocks_read_here(tokenizer, tmp_path):
    corpus = write_documents(tmp_path / "corpus.txt", paragraphs()[:800])
    datamodule = LMDataModule(data_config(f"data.paths=[{corpus}]"), tokenizer, str(tmp_path / "cache"), seed=0)
    blocks = datamodule.train_set
    here = next(iter(torch.utils.data.DataLoader(blocks, batch_size=4)))["input_ids"]
    in_worker = next(iter(torch.utils.data.DataLoader(blocks, batch_size=4, num_workers=1)))["input_ids"]
    assert torch.equal(here, in_worker) and here.dtype == torch.long and here.shape == (4, 64)
    np.testing.assert_array_equal(here.flatten().numpy(), datamodule.corpus.tokens("train")[: 4 * 64])


def test_the_batch_order_is_a_function_of_the_position_so_a_resumed_sampler_continues_exactly():
    straight = ResumableBatchSampler(num_samples=50, batch_size=4, seed=3)
    resumed = ResumableBatchSampler(num_samples=50, batch_size=4, seed=3, start=17)  # past the first pass (12 batches)
    first = [batch for _, batch in zip(range(40), straight)]
    assert [batch for _, batch in zip(range(23), resumed)] == first[17:]
    assert sorted(i for batch in first[:12] for i in batch) == sorted(set(i for batch in first[:12] for i in batch))  # no repeat in a pass


# A process preparing a corpus with only framework.corpus loaded (no torch), reporting what it held.
PREPARE_SCRIPT = """
import json, logging, sys, time
from tokenizers import Tokenizer
from framework.corpus.prepare import Encoder, prepare
from framework.corpus.sources import files

def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

logging.basicConfig(level=logging.INFO)
tokenizer_file, eos, cache, corpus, warm_up, workers, slow = sys.argv[1:]
tokenizer = Tokenizer.from_file(tokenizer_file)
encoder = Encoder(tokenizer, int(eos), tokenizer.get_vocab_size())

def documents(path):
    for i, (key, text) in enumerate(files("data.paths", [path], "text")):
        if slow == "1" and i == 2000:
            time.sleep(600)  # hang mid-preparation, to be killed there
        yield None, key, text

def run(target, path):
    return prepare(target, lambda: documents(path), encoder, ("train", "val"), int(workers), 0.1, 0, path)

if warm_up != "-":  # threads started, tokenizer caches and lazy imports loaded: what stays is not the corpus's
    run(cache + "-warm-up", warm_up)
before = rss("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
print("ready", flush=True)
prepared = run(cache, corpus)
held = rss("VmHWM") - before  # before reading the result back, which maps it
digest = __import__("hashlib").sha256(prepared.tokens("train").tobytes()).hexdigest()
print(json.dumps({"held": held, "tokens": prepared.meta["splits"], "digest": digest, "torch": "torch" in sys.modules}))
"""


def prepare_in_subprocess(tokenizer, tmp_path, corpus, warm_up="-", workers=2, slow=False, **popen):
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer.backend_tokenizer.save(str(tokenizer_file))
    args = [sys.executable, "-c", PREPARE_SCRIPT, str(tokenizer_file), str(tokenizer.eos_token_id), str(tmp_path / "cache" / "corpus"), corpus, warm_up, str(workers), str(int(slow))]
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def repeated_corpus(path, size: int) -> str:
    """`size` characters of real prose: the docs' paragraphs, shuffled anew for each repetition."""
    import random

    texts, rng, written = paragraphs(), random.Random(0), 0
    with open(path, "w") as f:
        while written < size:
            rng.shuffle(texts)
            for text in texts:
                f.write(text + "\n\n")
                written += len(text) + 2
                if written >= size:
                    break
    return str(path)


@pytest.mark.slow
def test_preparing_a_corpus_four_times_larger_than_its_memory_budget(tokenizer, tmp_path):
    """What preparation holds is a few batches, whatever the corpus's size: measured as the rise of the preparing
    process's peak RSS (VmHWM, reset once the workers run) while it prepares 32 MB of text with 2 workers (it
    holds about 5 MB). Before the memory-mapped format the same preparation held about 175x the corpus."""
    budget = 8 * 2**20
    corpus = repeated_corpus(tmp_path / "corpus.txt", 4 * budget)
    warm_up = repeated_corpus(tmp_path / "warm_up.txt", 200_000)
    result = prepare_in_subprocess(tokenizer, tmp_path, corpus, warm_up=warm_up)
    out, err = result.communicate(timeout=600)
    assert result.returncode == 0, err[-3000:]
    report = json.loads(out.splitlines()[-1])
    assert not report["torch"]  # the preparing code needs no torch
    assert report["tokens"]["train"]["tokens"] > 4e6  # the whole corpus went through
    assert report["held"] < budget, f"preparation held {report['held'] / 2**20:.1f} MB"


@pytest.mark.slow
def test_two_processes_share_one_prepared_corpus_and_a_killed_preparation_is_never_read(tokenizer, tmp_path):
    corpus = repeated_corpus(tmp_path / "corpus.txt", 3_000_000)

    # A preparation killed half-way leaves a temporary directory, never the corpus.
    killed = prepare_in_subprocess(tokenizer, tmp_path, corpus, slow=True)
    assert killed.stdout.readline().strip() == "ready"
    data_dir = tmp_path / "cache"
    deadline = time.time() + 120
    while not any(p.name.startswith(".corpus.") and (p / "train.bin").exists() and (p / "train.bin").stat().st_size for p in data_dir.iterdir()):
        assert time.time() < deadline and killed.poll() is None
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (data_dir / "corpus").exists()

    # Two processes asking at once: one prepares (and deletes the half-written one), the other waits and reads it.
    both = [prepare_in_subprocess(tokenizer, tmp_path, corpus) for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in both]
    for process, (out, err) in zip(both, outputs):
        assert process.returncode == 0, err[-3000:]
    reports = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    logs = "".join(err for _, err in outputs)
    assert reports[0]["digest"] == reports[1]["digest"]
    assert logs.count("prepared ") == 1 and "waiting for another process" in logs
    assert sorted(p.name for p in data_dir.iterdir()) == ["corpus", "corpus.lock"]  # the killed one's files are gone
    expected = expected_tokens(tokenizer, [d for d in corpus_files.file_documents("data.paths", corpus, "text") if not preparation.is_validation(d, 0.1, 0)])
    assert reports[0]["digest"] == hashlib.sha256(expected.astype(np.uint16).tobytes()).hexdigest()


# --- training and evaluating on files ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ddp_ranks_prepare_one_cache_from_a_fresh_start(tmp_path):
    """The train recipe on 2 processes, with an empty cache: one tokenizer and one corpus are prepared, for both."""
    texts = paragraphs()
    corpus = write_documents(tmp_path / "notes.txt", texts[:2000])
    valid = write_documents(tmp_path / "valid.txt", texts[2000:2300])
    result = subprocess.run(
        [sys.executable, "recipes/train.py", *FAST, "trainer.max_steps=2", "strategy=ddp", "trainer.devices=2", "data.batch_size=4",
         "data=text_files", f"data.paths=[{corpus}]", f"data.val_paths=[{valid}]", f"run_dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "FRAMEWORK_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "COMPLETE").exists()
    output = result.stdout + result.stderr
    assert output.count("prepared 'text_files'") == 1 and output.count("training a 4096-token BPE tokenizer") == 1
    for kind in ("data", "tokenizers"):  # one of each (and its lock), no half-written directory left
        names = sorted(p.name for p in (tmp_path / "cache" / kind).iterdir())
        assert len(names) == 2 and names[1] == names[0] + ".lock", names



@pytest.mark.slow
def test_a_one_file_corpus_trains_and_evaluate_scores_every_token_of_a_test_file(tmp_path):
    texts = paragraphs()
    corpus = write_documents(tmp_path / "notes.txt", texts[:2400])  # one file, one corpus: split by paragraph
    test_file = write_documents(tmp_path / "test.txt", texts[2400:2440])
    cache = tmp_path / "cache"
    train_cfg = compose_config("train", [
        *FAST, "data=text_files", f"data.paths=[{corpus}]", "trainer.max_steps=60", "optimizer.lr=5e-3",
        f"paths.cache_dir={cache}",
    ], run_dir=str(tmp_path / "train"))
    metrics = STAGES["train"](train_cfg)
    assert metrics["val_loss"] < metrics["val_loss_start"] - 1.0

    from framework.evaluate import evaluate
    from framework.models import load_pretrained

    eval_cfg = compose_config("evaluate", [
        f"input={tmp_path / 'train'}", f"data.test_paths=[{test_file}]", "data.block_size=64", f"paths.cache_dir={cache}",
    ], run_dir=str(tmp_path / "evaluate"))
    result = evaluate(eval_cfg)
    assert json.loads((tmp_path / "evaluate" / "evaluation.json").read_text())["test_tokens"] == result["test_tokens"]

    model, tokenizer = load_pretrained(str(tmp_path / "train" / "model"))
    tokens = torch.from_numpy(expected_tokens(tokenizer, corpus_files.file_documents("data.paths", test_file, "text")))
    assert result["test_tokens"] == len(tokens) and len(tokens) % 64  # every token, the last block a short one
    total, predicted = 0.0, 0
    with torch.no_grad():
        for block in tokens.split(64):
            total += model(input_ids=block[None], labels=block[None]).loss.item() * (len(block) - 1)
            predicted += len(block) - 1
    assert math.isclose(result["test_loss"], total / predicted, rel_tol=1e-4)
    assert math.isclose(result["test_ppl"], math.exp(result["test_loss"]), rel_tol=1e-6)


# --- bad input: one line naming the key, before any work -----------------------------------------------------------


def bad_files(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n \n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "good.txt").write_text("some text\n")
    (tmp_path / "good.jsonl").write_text('{"text": "a row"}\n')
    (tmp_path / "body.jsonl").write_text('{"body": "a row"}\n')
    (tmp_path / "array.json").write_text('[{"text": "a"}]\n')
    pq.write_table(pa.table({"body": ["a row"]}), tmp_path / "body.parquet")
    (tmp_path / "fake.parquet").write_text("not parquet")


def with_files(overrides, tmp_path) -> list[str]:
    """The overrides with each @name made a path to the file of that name in tmp_path."""
    return [o.replace("@", f"{tmp_path}/") for o in overrides]


BAD_FILES = [
    (["data.paths=[@model.bin]"], "data.paths", "is binary"),
    (["data.paths=[@latin1.txt]"], "data.paths", "is not UTF-8 text"),
    (["data.paths=[@empty.txt]"], "data.paths", "is empty"),
    (["data.paths=[@blank.txt]"], "data.paths", "holds no text"),
    (["data.paths=[@folder]"], "data.paths", "is a directory"),
    (["data.paths=[@good.txt,@good.jsonl]"], "data.paths", "files of mixed kinds"),
    (["data.paths=[@body.jsonl]"], "data.text_field", "'text' is not a field"),
    (["data.paths=[@body.parquet]"], "data.text_field", "'text' is not a column"),
    (["data.paths=[@array.json]"], "data.paths", "not JSON Lines of objects"),
    (["data.paths=[@fake.parquet]"], "data.paths", "is not a Parquet file"),
    (["data.paths=[@good.txt]", "data.val_paths=[@model.bin]"], "data.val_paths", "is binary"),
    (["data.paths=[@good.txt]", "data.val_paths=[@good.txt]"], "data.val_paths", "also in data.paths"),
    (["data.paths=[@good.txt]", "data.test_paths=[@folder]"], "data.test_paths", "is a directory"),
    (["data.paths=[@good.txt]", "data.test_paths=[/no/such.txt]"], "data.test_paths", "does not exist"),
    (["data.paths=[@good.txt]", "data.max_chars=-1"], "data.max_chars", "must be > 0"),
    (["data.paths=[@good.txt]", "data.num_proc=0"], "data.num_proc", "must be > 0"),
]


@pytest.mark.parametrize("overrides,key,message", BAD_FILES)
def test_a_bad_data_file_is_refused_in_one_line_naming_its_key(overrides, key, message, tmp_path):
    bad_files(tmp_path)
    cfg = compose_config("train", ["data=text_files", *with_files(overrides, tmp_path)])
    with pytest.raises(ConfigError) as error:
        STAGES["train"].validate(cfg)
    assert (error.value.key, "\n" in str(error.value)) == (key, False)
    assert message in error.value.message


def test_an_unreadable_file_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("text")
    real_open = open

    def no_permission(name, *args, **kwargs):  # what a chmod 000 file gives a user who is not root
        if str(name) == str(path):
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(corpus_files, "open", no_permission, raising=False)
    with pytest.raises(ConfigError, match="cannot be read .Permission denied.") as error:
        STAGES["train"].validate(compose_config("train", ["data=text_files", f"data.paths=[{path}]"]))
    assert error.value.key == "data.paths"


def test_a_corpus_smaller_than_one_block_names_what_to_change(tokenizer, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words")
    corpus = write_documents(tmp_path / "corpus.txt", paragraphs()[:300])
    short_val = write_documents(tmp_path / "valid.txt", ["two words"])
    cases = [
        ([f"data.paths=[{tiny}]"], "data.paths", "train tokens, less than one block of data.block_size=64"),
        ([f"data.paths=[{corpus}]", "data.max_chars=100"], "data.max_chars", "the first 100 characters"),
        ([f"data.paths=[{corpus}]", f"data.val_paths=[{short_val}]"], "data.val_paths", "the validation files hold"),
        ([f"data.paths=[{corpus}]", "data.val_fraction=0.001"], "data.val_fraction", "raise data.val_fraction"),
    ]
    for overrides, key, message in cases:
        data = data_config(*overrides)
        with pytest.raises(ConfigError) as error:
            LMDataModule(data, tokenizer, str(tmp_path / "cache"), seed=0)
        assert error.value.key == key and message in error.value.message, error.value


@pytest.mark.parametrize("overrides,key,message", [
    (["data=text_files", "data.paths=[@model.bin]"], "data.paths", "is binary, not text"),
    (["data=hf_dataset", "data.hf_name=wikitext"], "data.hf_name", "cannot load 'wikitext'"),
])
def test_the_recipe_reports_a_bad_data_source_in_one_line_and_exits_2(overrides, key, message, tmp_path):
    bad_files(tmp_path)
    result = subprocess.run(
        [sys.executable, "recipes/train.py", *with_files(overrides, tmp_path), f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=REPO,
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith(f"error: {key}: ") and message in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_encoder_matches_the_hf_tokenizer_even_when_it_truncates(tokenizer):
    tokenizer.backend_tokenizer.enable_truncation(8)  # a saved tokenizer may carry a truncation setting
    try:
        text = paragraphs()[5]
        ids = encoder(tokenizer).tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids
        assert ids == tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"] and len(ids) > 8
    finally:
        tokenizer.backend_tokenizer.no_truncation()
