"""Training the GPT from prepared shards (--data SHARD_FOLDER): the same weights as the in-memory text,
several shards trained by N processes as by one and resumed exactly, nanoGPT's files, and bad folders."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch
from conftest import accelerate_launch, assert_weights_close, assert_weights_equal, check_ok, read_json

from toyaccel.cli import generate_main, train_main
from toyaccel.engine.checkpoint import checkpoint_dirs
from toyaccel.errors import ToyaccelError
from toyaccel.inference import evaluate_run
from toyaccel.prepare import prepare
from toyaccel.workloads.gpt.shard_data import ShardBundle
from toyaccel.workloads.gpt.shards import ShardWindows, read_manifest, split_shards
from toyaccel.workloads.gpt.text import synthetic_text

TINY = ("--model", "gpt", "--context-length", "16", "--emb-dim", "16", "--n-heads", "2", "--n-layers", "1",
        "--epochs", "1", "--no-progress", "--keep-last", "0")  # fmt: skip
TIMEOUT = 600


@pytest.fixture(autouse=True)
def one_thread():
    """One thread here, as in the launched processes: a resumed run continues a subprocess's exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_here(out: Path, *args: str) -> int:
    return train_main([*TINY, *args, "--output-dir", str(out)])


def several_shards(root: Path) -> Path:
    """Five documents of 3000 bytes: four training shards and one validation shard."""
    docs = root / "docs"
    docs.mkdir()
    for i in range(5):
        (docs / f"doc{i}.txt").write_text(synthetic_text(3_000, 10 + i))
    manifest = prepare(str(docs), str(root / "shards"), "bytes", val_fraction=0.2, shard_tokens=2_000,
                       progress_bar=False)  # fmt: skip
    assert len(manifest["train"]) == 4 and len(manifest["val"]) == 1
    return root / "shards"


@pytest.mark.slow
def test_shards_train_the_same_weights_as_the_text_they_hold(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text(synthetic_text(20_000, 5))
    prepare(str(text), str(tmp_path / "shards"), "bytes", val_fraction=0.1, progress_bar=False)
    args = ("--tokenizer", "bytes", "--batch-size", "8")
    assert train_here(tmp_path / "from_shards", "--data", str(tmp_path / "shards"), *args) == 0
    assert train_here(tmp_path / "from_text", "--data", str(text), *args) == 0
    assert_weights_equal(conftest.weights(tmp_path / "from_shards"), conftest.weights(tmp_path / "from_text"))
    ours, theirs = (read_json(tmp_path / run / "results.json") for run in ("from_shards", "from_text"))
    assert ours["val_loss"] == theirs["val_loss"]
    # The run folder works with the other tools: evaluate reads the shards' validation split.
    assert evaluate_run(tmp_path / "from_shards")["loss"] == ours["val_loss"]
    capsys.readouterr()
    assert generate_main([str(tmp_path / "from_shards"), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("Every effort moves you")
    config = read_json(tmp_path / "from_shards" / "config.json")
    assert config["tokenizer"]["type"] == "bytes" and config["model"]["vocab_size"] == 256


@pytest.mark.slow
def test_several_shards_n_processes_equal_one_and_a_killed_run_resumes_exactly(tmp_path):
    data = several_shards(tmp_path)
    # Checkpoints mid-epoch, the kill comes in the second epoch; no dropout, so that N processes draw alike.
    args = (*TINY, "--data", str(data), "--epochs", "2", "--drop-rate", "0", "--checkpoint-every", "40")
    with ThreadPoolExecutor(max_workers=2) as pool:
        two = pool.submit(accelerate_launch, "multi_cpu.yaml", *args, "--batch-size", "3",
                          "--output-dir", str(tmp_path / "two_x_3"), timeout=TIMEOUT)  # fmt: skip
        killed = pool.submit(conftest.run_python, "scripts/train.py", *args, "--batch-size", "6", "--output-dir",
                             str(tmp_path / "killed"), env={"TOYACCEL_FAULT": "step:170"}, timeout=TIMEOUT)  # fmt: skip
        assert train_main([*args, "--batch-size", "6", "--output-dir", str(tmp_path / "one_x_6")]) == 0
        check_ok(two.result())
        assert killed.result().returncode == -signal.SIGKILL, killed.result().stderr[-3000:]
    one = tmp_path / "one_x_6"
    # 4 shards of 187 windows each (windows never span two shards): 124 steps an epoch.
    assert read_json(one / "config.json")["data"]["train_tokens"] == 12_000
    assert len(conftest.step_losses(one)) > 0
    assert_weights_close(conftest.weights(tmp_path / "two_x_3"), conftest.weights(one))
    assert conftest.step_losses(tmp_path / "two_x_3") == pytest.approx(conftest.step_losses(one), abs=2e-6)
    assert [p.name for p in checkpoint_dirs(tmp_path / "killed")][0] == "step_160"  # 36 steps into epoch 2
    assert train_main([*args, "--batch-size", "6", "--output-dir", str(tmp_path / "killed"), "--resume",
                       "latest"]) == 0  # fmt: skip
    assert_weights_equal(conftest.weights(tmp_path / "killed"), conftest.weights(one))
    assert conftest.step_losses(tmp_path / "killed") == conftest.step_losses(one)


def bundle(folder: Path) -> ShardBundle:
    manifest = read_manifest(folder)
    windows = ShardWindows(split_shards(folder, manifest, "train"), manifest["dtype"], 16, 16)
    return ShardBundle(windows, None, None, str(folder), manifest)


def test_the_fingerprint_comes_from_the_manifest_not_the_tokens(tmp_path):
    data = several_shards(tmp_path)
    before = bundle(data).fingerprint()
    shard = data / "train_000001.bin"
    shard.write_bytes(bytes(shard.stat().st_size))  # same size, other tokens: found by --verify-data only
    assert bundle(data).fingerprint() == before
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["train"][1]["sha256"] = "0" * 64  # a prepare that gave other tokens writes another checksum
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert bundle(data).fingerprint() != before


def nanogpt_folder(root: Path, top_id: int) -> Path:
    folder = root / "nanogpt"
    folder.mkdir()
    ids = np.arange(3_000, dtype=np.uint16) % 200
    ids[2_500] = top_id
    ids.tofile(folder / "train.bin")
    ids[:600].tofile(folder / "val.bin")
    return folder


def test_nanogpts_files_are_read_and_each_batch_checked_against_the_vocabulary(tmp_path):
    folder = nanogpt_folder(tmp_path, 60_000)
    manifest = read_manifest(folder)
    windows = ShardWindows(split_shards(folder, manifest, "train"), manifest["dtype"], 16, 16, check_below=50_257)
    assert len(windows) == 187 and windows.num_tokens == 3_000
    inputs, targets = windows.__getitems__(torch.tensor([1, 0]))
    assert inputs[1].tolist() == list(range(16)) and targets[0].tolist() == list(range(17, 33))
    with pytest.raises(ToyaccelError, match=r"train\.bin: token id 60000 is beyond the model's vocab_size of 50257"):
        windows.__getitems__(torch.tensor([2_500 // 16]))


def corrupt(folder: Path, case: str) -> list[str]:
    """Damage ``folder`` as ``case`` says; the extra options of the run."""
    shard = folder / "train_000002.bin"
    if case == "missing":
        shard.unlink()
    elif case == "truncated":
        shard.write_bytes(shard.read_bytes()[:-2])
    elif case == "checksum":
        shard.write_bytes(bytes(shard.stat().st_size))
        return ["--verify-data"]
    elif case == "vocab":
        return ["--vocab-size", "100"]  # the bytes of the synthetic text reach 111
    elif case == "tokenizer":
        return ["--tokenizer", "bpe"]
    elif case == "val_fraction":
        return ["--val-fraction", "0.3"]
    return []


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "train_000002.bin: missing (listed in manifest.json)"),
        ("truncated", "train_000002.bin: 5998 bytes, manifest.json says 6000 (truncated?)"),
        ("checksum", "train_000002.bin: damaged (checksum differs from manifest.json)"),
        ("vocab", "train_000000.bin: token id 111 is beyond the model's vocab_size of 100"),
        ("tokenizer", "manifest.json: prepared with the bytes tokenizer, not --tokenizer bpe"),
        ("val_fraction", "manifest.json: a shard folder holds its own validation split; drop --val-fraction"),
    ],
)
def test_a_bad_shard_folder_is_one_line_naming_the_file_and_writes_nothing(tmp_path, capsys, case, message):
    data = several_shards(tmp_path)
    extra = corrupt(data, case)
    out = tmp_path / "run"
    assert train_main([*TINY, "--data", str(data), *extra, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_large_epochs_order_is_the_same_permutation_cut_block_by_block():
    """The sampler keeps a large corpus's order in int32 and cuts it into batches a block at a time: the
    batches are still randperm's (int64) order, resumed mid-epoch too."""
    from toyaccel.engine.batches import SPLIT_BATCHES, EpochBatchSampler

    num_windows, batch = 3 * SPLIT_BATCHES * 4 + 50, 4
    sampler = EpochBatchSampler(num_windows, batch, 2 * batch)
    order = torch.randperm(num_windows, generator=torch.Generator().manual_seed(7))
    for start in (0, 5 * 2 * batch):
        sampler.start_epoch(7, start)
        got = list(sampler)
        end = start + (num_windows - start) // (2 * batch) * 2 * batch
        assert len(got) == len(sampler) == (end - start) // batch
        assert torch.equal(torch.cat(got).long(), order[start:end]) and {len(b) for b in got} == {batch}
