"""Prepared token shards: the same tokens and windows as the in-memory text path, several shards, JSON
Lines, a prepare killed mid-shard and run again, nanoGPT's files, and damaged folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_python

from toyaccel.errors import ToyaccelError
from toyaccel.prepare import main as prepare_main
from toyaccel.prepare import prepare
from toyaccel.workloads.gpt.shards import ShardWindows, read_manifest, split_shards, verify_shards
from toyaccel.workloads.gpt.text import split_text, synthetic_text
from toyaccel.workloads.gpt.tokenizers import BPETokenizer
from toyaccel.workloads.gpt.windows import TextWindows

pytest.importorskip("tokenizers")


def windows(folder: Path, split: str = "train", context: int = 16, stride: int = 16) -> ShardWindows:
    manifest = read_manifest(folder)
    return ShardWindows(split_shards(folder, manifest, split), manifest["dtype"], context, stride)


def all_tokens(ds: ShardWindows) -> torch.Tensor:
    return torch.cat([torch.from_numpy(np.asarray(m, dtype=np.int64)) for m in ds.maps])


def test_a_prepared_text_file_holds_the_in_memory_paths_tokens_and_windows(tmp_path):
    text = synthetic_text(20_000, 5)
    (tmp_path / "a.txt").write_text(text)
    manifest = prepare(str(tmp_path / "a.txt"), str(tmp_path / "out"), "bpe", 300, 0.1, progress_bar=False)
    train_text, val_text = split_text(text, 0.1)  # the book's split, as --data a.txt trains
    tokenizer = BPETokenizer.train(train_text, 300)
    assert (tmp_path / "out/tokenizer.json").read_text() == tokenizer.to_json()
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 300
    in_memory = TextWindows(torch.tensor(tokenizer.encode(train_text)), 16, 8)
    shards = windows(tmp_path / "out", stride=8)
    assert torch.equal(all_tokens(shards), in_memory.tokens)
    assert len(shards) == len(in_memory)
    picks = torch.tensor([0, 7, len(in_memory) - 1, 3])
    for ours, theirs in zip(shards.__getitems__(picks), in_memory.__getitems__(picks)):
        assert torch.equal(ours, theirs)
    assert torch.equal(all_tokens(windows(tmp_path / "out", "val")), torch.tensor(tokenizer.encode(val_text)))


def corpus_folder(folder: Path, files: int = 5) -> Path:
    folder.mkdir()
    for i in range(files):
        (folder / f"doc{i}.txt").write_text(synthetic_text(3_000, 10 + i))
    return folder


def test_a_folder_becomes_several_shards_split_between_documents(tmp_path):
    source = corpus_folder(tmp_path / "docs")
    manifest = prepare(str(source), str(tmp_path / "out"), "bytes", val_fraction=0.2, shard_tokens=2_000,
                       progress_bar=False)  # fmt: skip
    counts = [s["tokens"] for s in manifest["train"]]
    assert len(counts) == 4 and sum(counts) == 12_000  # four whole documents, one byte per character
    assert sum(s["tokens"] for s in manifest["val"]) == 3_000
    ds = windows(tmp_path / "out")
    assert len(ds) == 4 * len(range(0, 3_000 - 16, 16))  # the book's windows, inside each shard
    first_of_second = ds.__getitems__(torch.tensor([int(ds.first[1])]))[0][0]
    assert bytes(first_of_second.tolist()) == (source / "doc1.txt").read_bytes()[:16]
    verify_shards(tmp_path / "out")


def test_json_lines_records_are_documents_with_end_of_text_between(tmp_path):
    records = [{"text": f"record {i}: " + synthetic_text(400, i)} for i in range(6)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = prepare(str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "bpe", 300, 0.0, progress_bar=False)
    eot = manifest["tokenizer"]["end_of_text"]
    ids = all_tokens(windows(tmp_path / "out"))
    assert eot is not None and int((ids == eot).sum()) == 6
    tokenizer = BPETokenizer.from_str((tmp_path / "out/tokenizer.json").read_text())
    assert tokenizer.decode(ids[: int((ids == eot).nonzero()[0])].tolist()) == records[0]["text"]


@pytest.mark.slow
def test_a_prepare_killed_with_a_shard_half_written_continues_to_the_same_shards(tmp_path):
    source = corpus_folder(tmp_path / "docs")
    whole = prepare(str(source), str(tmp_path / "whole"), "bytes", val_fraction=0.2, shard_tokens=2_000,
                    progress_bar=False)  # fmt: skip
    cmd = ("-c", "import sys; from toyaccel.prepare import main; sys.exit(main(sys.argv[1:]))", str(source),
           str(tmp_path / "out"), "--tokenizer", "bytes", "--val-fraction", "0.2", "--shard-tokens", "2000")
    killed = run_python(*cmd, env={"TOYACCEL_FAULT": "prepare:2", "PYTHONPATH": str(Path.cwd())})
    assert killed.returncode == -9
    assert not (tmp_path / "out/manifest.json").exists()  # nothing a training run would read
    with pytest.raises(ToyaccelError, match="a prepare that did not finish: run it again"):
        read_manifest(tmp_path / "out")
    assert json.loads((tmp_path / "out/progress.json").read_text())["blocks_done"] == 2
    again = prepare(str(source), str(tmp_path / "out"), "bytes", val_fraction=0.2, shard_tokens=2_000,
                    progress_bar=False)  # fmt: skip
    assert again["train"] == whole["train"] and again["val"] == whole["val"]
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_nanogpt_train_and_val_bin_are_read_as_shards(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) % 50257
    ids.tofile(tmp_path / "train.bin")
    ids[:100].tofile(tmp_path / "val.bin")
    ds = windows(tmp_path, context=10, stride=10)
    assert len(ds) == 99
    inputs, targets = ds.__getitems__(torch.tensor([3]))
    assert inputs.tolist() == [list(range(30, 40))] and targets.tolist() == [list(range(31, 41))]
    assert len(windows(tmp_path, "val", 10, 10)) == 9


def test_damaged_shard_folders_are_one_line_naming_the_file(tmp_path, capsys):
    source = corpus_folder(tmp_path / "docs", files=2)
    out = tmp_path / "out"
    prepare(str(source), str(out), "bytes", val_fraction=0.0, shard_tokens=2_000, progress_bar=False)
    shard = out / "train_000001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(ToyaccelError, match=r"train_000001.bin: 5998 bytes, manifest.json says 6000 \(truncated\?\)"):
        windows(out)
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit off: only the checksum sees it
    windows(out)
    with pytest.raises(ToyaccelError, match="train_000001.bin: damaged \\(checksum differs from manifest.json\\)"):
        verify_shards(out)
    shard.unlink()
    with pytest.raises(ToyaccelError, match=r"train_000001.bin: missing \(listed in manifest.json\)"):
        windows(out)
    assert prepare_main([str(source), str(out), "--tokenizer", "bytes"]) == 2
    assert capsys.readouterr().err == f"error: {out} already holds prepared shards; pass --overwrite to replace them\n"
    assert prepare_main([str(tmp_path / "nothing.txt"), str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nothing.txt'}: no such file\n"
