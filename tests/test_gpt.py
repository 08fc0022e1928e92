"""The book's GPT as a second workload: same script, same guarantees as the MLP.

Every run is tiny (1 block, width 16-32, contexts of 16-32 characters of the synthetic text) so the
module stays fast. The subprocess runs start together in threads (their start-ups overlap); the
in-process runs go through the command line's own entry point with one thread, as the launched
processes have, so that a run killed in a subprocess and resumed here can be bit-equal.
"""

from __future__ import annotations

import json
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    accelerate_launch,
    assert_weights_equal,
    check_ok,
    read_json,
    read_jsonl,
    run_python,
    step_losses,
    weights,
)
from dropout_probe import STEPS, watching
from safetensors.torch import load_file

from toyaccel import fit, load_model
from toyaccel.cli import evaluate_main, generate_main, train_main
from toyaccel.engine.checkpoint import checkpoint_dirs
from toyaccel.engine.optim import own_random_stream
from toyaccel.engine.resume import verify_checkpoint
from toyaccel.inference import evaluate_run
from toyaccel.reference import GPTModel as BookGPTModel
from toyaccel.reference import generate_text_simple
from toyaccel.workloads.gpt.model import GPTModel
from toyaccel.workloads.gpt.text import synthetic_entropy, synthetic_text

TINY = ("--model", "gpt", "--context-length", "16", "--emb-dim", "16", "--n-heads", "2", "--n-layers", "1")
TINY += ("--no-plot", "--no-progress", "--lr", "0.003")
# 1200 characters: 1080 train (67 windows of 16), 120 validation (7 windows); global batch 6 -> 11 steps.
EQUIV = (*TINY, "--num-samples", "1200", "--epochs", "1", "--drop-rate", "0")
# Two epochs with dropout, checkpoints at 3, 6, 9, 11 (epoch end), 12, 15, 18, 21, 22.
DROPOUT = (*TINY, "--num-samples", "1200", "--epochs", "2", "--drop-rate", "0.2", "--checkpoint-every", "3")
DROPOUT += ("--keep-last", "0", "--log-every", "1")


@pytest.fixture(scope="module", autouse=True)
def token_cache(tmp_path_factory):
    """A private token cache, and one thread in this process as in the launched ones."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TOYACCEL_CACHE_DIR", str(tmp_path_factory.mktemp("token_cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


def train_here(out: Path, *args: str) -> int:
    return train_main([*args, "--output-dir", str(out)])


PROBE = REPO / "tests" / "dropout_probe.py"
# Generous: these launches start together, and a shared 2-core machine may be busy with other suites.
TIMEOUT = 600


def launch(config: str, out: Path, *args: str, num_processes: int | None = None, env=None, **kwargs):
    return accelerate_launch(
        config, *args, "--output-dir", str(out), num_processes=num_processes, env=env, timeout=TIMEOUT, **kwargs
    )


def train_killed(out: Path, fault: str, *args: str):
    proc = run_python(
        "scripts/train.py", *args, "--output-dir", str(out), env={"TOYACCEL_FAULT": fault}, timeout=TIMEOUT
    )
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def background(tmp_path_factory, token_cache):
    """The subprocess runs, started together; the in-process reference runs meanwhile."""
    root = tmp_path_factory.mktemp("gpt_runs")
    with ThreadPoolExecutor(max_workers=4) as pool:
        jobs = {
            "two_x_3": pool.submit(launch, "multi_cpu.yaml", root / "two_x_3", *EQUIV, "--batch-size", "3"),
            "three_x_2": pool.submit(
                launch, "multi_cpu.yaml", root / "three_x_2", *EQUIV, "--batch-size", "2", num_processes=3
            ),
            # Trained as by scripts/train.py, with each rank's dropout masks recorded (tests/dropout_probe.py).
            "dropout_two_x_3": pool.submit(
                launch, "multi_cpu.yaml", root / "dropout_two", *DROPOUT, "--batch-size", "3", script=PROBE
            ),
            "killed": pool.submit(train_killed, root / "killed", "step:14", *DROPOUT, "--batch-size", "6"),
        }
        assert train_here(root / "one_x_6", *EQUIV, "--batch-size", "6") == 0
        with watching() as dropout_one:
            assert train_here(root / "dropout_one", *DROPOUT, "--batch-size", "6") == 0
        torch.save(dropout_one, root / "dropout_one" / "dropout_rank0.pt")
        results = {name: job.result() for name, job in jobs.items()}
    for name in ("two_x_3", "three_x_2", "dropout_two_x_3"):
        check_ok(results[name])
    return root


@pytest.fixture(scope="module")
def learned(tmp_path_factory, token_cache) -> Path:
    """A run long enough to learn the synthetic text (about 140 AdamW steps), with dropout off."""
    out = tmp_path_factory.mktemp("learned") / "run"
    args = ("--model", "gpt", "--context-length", "32", "--emb-dim", "32", "--n-heads", "2", "--n-layers", "1")
    args += ("--num-samples", "20000", "--batch-size", "16", "--epochs", "4", "--lr", "0.01", "--drop-rate", "0")
    args += ("--no-progress",)
    assert train_here(out, *args) == 0
    return out


# ---------------------------------------------------------------------------------------------
# Outputs a reader of the book can use


def test_the_books_gpt_loads_the_saved_weights_and_gives_the_same_logits(learned):
    cfg = read_json(learned / "config.json")["model"]
    assert set(cfg) == {"vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias"}
    book = BookGPTModel(cfg)
    missing, unexpected = book.load_state_dict(load_file(str(learned / "model.safetensors")), strict=False)
    assert unexpected == []
    assert missing == [f"trf_blocks.{i}.att.mask" for i in range(cfg["n_layers"])]
    ids = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]), generator=torch.Generator().manual_seed(0))
    ours = load_model(learned)
    assert isinstance(ours, GPTModel)
    with torch.no_grad():
        assert torch.allclose(ours(ids), book.eval()(ids), atol=1e-5, rtol=0)


def test_same_seed_same_initial_weights_as_the_books_code():
    cfg = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.1,
           "qkv_bias": True}  # fmt: skip
    torch.manual_seed(123)
    book = BookGPTModel(cfg).state_dict()
    torch.manual_seed(123)
    ours = GPTModel(cfg).state_dict()
    assert_weights_equal(ours, {k: v for k, v in book.items() if not k.endswith(".att.mask")})


def test_val_loss_approaches_the_known_entropy_of_the_synthetic_text(learned):
    results = read_json(learned / "results.json")
    entropy = synthetic_entropy(123)  # nats per character: no model can do better on average
    assert results["best_possible_loss"] == entropy  # what the run reports it against
    assert entropy - 0.05 < results["val_loss"] < entropy + 0.1, (results["val_loss"], entropy)
    assert results["val_perplexity"] == pytest.approx(torch.tensor(results["val_loss"]).exp().item(), rel=1e-6)
    assert {"val_loss", "val_perplexity", "train_loss", "tokens_per_s", "world_size", "global_step"} <= set(results)
    assert results["tokens_per_s"] > 0 and results["world_size"] == 1
    records = read_jsonl(learned / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    context = read_json(learned / "config.json")["config"]["context_length"]
    assert steps and all(r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * context) for r in steps)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 4 and all(r["sample"] and r["val_ppl"] > 1 for r in epochs)
    assert (learned / "loss.png").stat().st_size > 0 and (learned / "tokenizer.json").exists()


def test_generate_is_the_books_greedy_generation_and_seeded_sampling(learned, capsys):
    assert generate_main([str(learned), "--prompt", "abc", "--max-new-tokens", "12"]) == 0
    greedy = capsys.readouterr().out.strip()
    book = BookGPTModel(read_json(learned / "config.json")["model"])
    book.load_state_dict(load_file(str(learned / "model.safetensors")), strict=False)
    book_ids = generate_text_simple(book.eval(), torch.tensor([list(b"abc")]), 12, 32)
    assert greedy == bytes(book_ids[0].tolist()).decode()
    sampled = []
    for _ in range(2):
        assert generate_main([str(learned), "--prompt", "abc", "--max-new-tokens", "20", "--temperature", "1.5",
                              "--top-k", "5", "--seed", "7"]) == 0  # fmt: skip
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] and sampled[0].strip() != greedy


def test_evaluate_reports_the_runs_validation_loss_and_a_text_file(learned, tmp_path, capsys):
    results = read_json(learned / "results.json")
    assert evaluate_run(learned)["loss"] == results["val_loss"]
    text = tmp_path / "other.txt"
    text.write_text(synthetic_text(2000, seed=5))
    assert evaluate_main([str(learned), "--data", str(text)]) == 0
    out = capsys.readouterr().out
    assert "loss " in out and "perplexity " in out and "62 windows, 1984 tokens" in out


# ---------------------------------------------------------------------------------------------
# Distributed guarantees


@pytest.mark.slow
def test_n_processes_equal_one_process_with_the_whole_batch(background):
    one = weights(background / "one_x_6")
    for name in ("two_x_3", "three_x_2"):
        other = weights(background / name)
        # After 11 AdamW steps: 6e-8 (N=2) and 2.4e-7 (N=3) measured; step losses within 1e-6.
        for k in one:
            assert torch.allclose(one[k], other[k], atol=1e-6, rtol=0), f"{name} {k}: {(one[k] - other[k]).abs().max()}"
        assert step_losses(background / name) == pytest.approx(step_losses(background / "one_x_6"), abs=2e-6)
        # Every process generates the epoch-end sample (under FSDP its forwards need them all); main logs it once.
        epochs = [r for r in read_jsonl(background / name / "metrics.jsonl") if r["kind"] == "epoch"]
        assert len(epochs) == 1 and len(epochs[0]["sample"]) > 50  # 50 generated characters after the start


@pytest.mark.slow
def test_validation_loss_is_the_same_for_any_number_of_processes(background):
    """Each run evaluated its final weights over its processes; one process on the same weights agrees."""
    for name in ("one_x_6", "two_x_3", "three_x_2"):
        results, here = read_json(background / name / "results.json"), evaluate_run(background / name)
        assert (here["loss"], here["tokens"]) == (results["val_loss"], 7 * 16), name


@pytest.mark.slow
def test_dropout_has_its_own_stream_per_process_and_leaves_the_data_order_alone(background):
    before = torch.get_rng_state()
    masks = {}
    for rank in (0, 1):
        with own_random_stream(123, rank, 5, 0):
            masks[rank] = torch.nn.functional.dropout(torch.ones(1000), 0.5)
    with own_random_stream(123, 0, 5, 0):
        again = torch.nn.functional.dropout(torch.ones(1000), 0.5)
    assert torch.equal(masks[0], again) and not torch.equal(masks[0], masks[1])
    assert torch.equal(torch.get_rng_state(), before)
    # With dropout on, 2 processes x 3 shuffle epoch 2 exactly as 1 process x 6 does.
    seeds = [
        verify_checkpoint(background / run / "checkpoints" / "step_21").epoch_seed
        for run in ("dropout_one", "dropout_two")
    ]
    assert seeds[0] is not None and seeds[0] == seeds[1]


@pytest.mark.slow
def test_each_process_draws_its_own_dropout_masks_on_the_one_process_data_order(background):
    """Watched inside the training loop (tests/dropout_probe.py): at each of the first steps the two ranks
    dropped different units, and together they trained on the windows one process with the whole batch did."""
    ranks = [torch.load(background / "dropout_two" / f"dropout_rank{rank}.pt") for rank in (0, 1)]
    one = torch.load(background / "dropout_one" / "dropout_rank0.pt")
    assert [r["rank"] for r in ranks] == [0, 1] and len(one["inputs"]) == STEPS
    for step in range(STEPS):
        assert torch.equal(torch.cat([r["inputs"][step] for r in ranks]), one["inputs"][step]), step
        masks = [r["masks"][step] for r in ranks]
        # drop_emb, then the block's drop_shortcut twice (attention's dropout is inside its fused kernel).
        assert len(masks[0]) == len(masks[1]) == 3
        for mine, theirs in zip(*masks):
            assert mine.shape == theirs.shape == (3, 16, 16) and not torch.equal(mine, theirs), step
            assert 0.1 < 1 - mine.float().mean() < 0.3  # --drop-rate 0.2 of the units dropped


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_is_bitwise_equal_with_dropout(background):
    killed = background / "killed"
    assert [p.name for p in checkpoint_dirs(killed)][0] == "step_12" and not (killed / "model.safetensors").exists()
    assert train_here(killed, *DROPOUT, "--batch-size", "6", "--resume", "latest") == 0
    assert_weights_equal(weights(killed), weights(background / "dropout_one"))
    assert step_losses(killed) == step_losses(background / "dropout_one")
    assert (
        read_json(killed / "results.json")["val_loss"]
        == read_json(background / "dropout_one" / "results.json")["val_loss"]
    )


# ---------------------------------------------------------------------------------------------
# Text sources and tokenizers


def test_bpe_on_a_folder_of_text_files(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(2):  # no third-party text: the synthetic letters, cut into words
        (folder / f"part{i}.txt").write_text(synthetic_text(3000, seed=i).replace("o", "\n"))
    out = tmp_path / "run"
    assert train_here(out, *TINY, "--data", str(folder), "--vocab-size", "300", "--epochs", "1") == 0
    saved = read_json(out / "config.json")
    assert saved["tokenizer"]["type"] == "bpe" and 256 < saved["tokenizer"]["size"] <= 300
    capsys.readouterr()
    assert generate_main([str(out), "--max-new-tokens", "5"]) == 0  # any text encodes in a byte-level BPE
    assert capsys.readouterr().out.startswith("Every effort moves you")


def test_gpt2_tokenizer_is_the_books_where_tiktoken_has_its_files():
    from toyaccel.errors import ToyaccelError
    from toyaccel.workloads.gpt.tokenizers import GPT2Tokenizer

    try:
        tokenizer = GPT2Tokenizer()
    except ToyaccelError as e:
        pytest.skip(f"tiktoken's gpt2 files cannot be had here: {e}")
    assert tokenizer.encode("Every effort moves you") == [6109, 3626, 6100, 345] and tokenizer.size == 50257


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def bad_text_files(tmp_path: Path) -> dict[str, Path]:
    files = {"empty": tmp_path / "empty.txt", "latin1": tmp_path / "latin1.txt", "short": tmp_path / "short.txt"}
    files["empty"].write_text("")
    files["latin1"].write_bytes("caf\xe9 au lait".encode("latin-1"))
    files["short"].write_text("far too short for a window\n")
    return files


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "no text"),
        ("latin1", "not UTF-8 text"),
        ("short", "too short for one window"),
        ("tokenizer", "argument --tokenizer: invalid choice: 'wordpiece'"),
        ("gpt_option", "--emb-dim is an option of --model gpt, not of --model mlp"),
        ("eval_train", "--eval-train is an option of --model mlp, not of --model gpt"),
        ("hidden", "--hidden is an option of --model mlp, not of --model gpt"),
    ],
)
def test_bad_training_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, message):
    files = bad_text_files(tmp_path)
    args = {
        "tokenizer": ("--model", "gpt", "--tokenizer", "wordpiece"),
        "gpt_option": ("--emb-dim", "16"),
        # The MLP's options, given to the GPT, are refused rather than silently ignored.
        "eval_train": ("--model", "gpt", "--eval-train", "full"),
        "hidden": ("--model", "gpt", "--hidden", "64,64"),
    }.get(case, ("--model", "gpt", "--data", str(files.get(case)), "--context-length", "64"))
    out = tmp_path / "run"
    assert train_main([*args, "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--context-length", "33"), "beyond the model's position table of 32 tokens"),
        (("--prompt", "Every effort"), "characters the model never saw in training: 'Ertvy'"),
        (("--top-k", "0"), "--top-k must be at least 1"),
    ],
)
def test_bad_generate_input_is_one_line(learned, capsys, args, message):
    assert generate_main([str(learned), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_config_file_sections(tmp_path):
    from toyaccel.cli import parse_train_args

    (tmp_path / "gpt.yaml").write_text(
        json.dumps({"model": {"model": "gpt", "n_layers": 2}, "optimizer": {"lr": 0.001}})
    )
    config = parse_train_args(["--config", str(tmp_path / "gpt.yaml"), "--lr", "0.002"])
    assert (config.model, config.n_layers, config.lr, config.optimizer, config.weight_decay) == (
        "gpt",
        2,
        0.002,
        "adamw",
        0.1,
    )
    preset = parse_train_args(["--model", "gpt", "--preset", "gpt2-124m", "--context-length", "256"])
    assert (preset.vocab_size, preset.emb_dim, preset.n_layers, preset.context_length, preset.stride) == (
        50257,
        768,
        12,
        256,
        256,
    )


def test_vocab_padding_stays_inside_the_model():
    """The vocabulary rows are padded to a multiple of 64 (for GPU matrix products); the saved weights keep the
    book's."""
    cfg = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0,
           "qkv_bias": False}  # fmt: skip
    torch.manual_seed(0)
    plain = GPTModel(cfg)
    torch.manual_seed(0)
    padded = GPTModel(cfg, pad_vocab_to=64)
    assert padded.out_head.weight.shape[0] == 64
    assert_weights_equal(padded.state_dict(), plain.state_dict())
    reloaded = GPTModel(cfg, pad_vocab_to=64)
    reloaded.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 50, (2, 8))
    assert torch.equal(reloaded(ids), padded(ids)) and torch.allclose(padded(ids), plain(ids), atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_run_keeps_the_books_vocabulary_rows(tmp_path):
    """On a GPU: bf16, fused AdamW, flash attention and the vocabulary padded inside the model."""
    out = tmp_path / "run"
    check_ok(launch("single_gpu.yaml", out, *TINY, "--num-samples", "3000", "--mixed-precision", "bf16",
                    "--tokenizer", "bpe", "--data", str(_write_text(tmp_path)), "--vocab-size", "300"))  # fmt: skip
    saved = weights(out)
    assert saved["tok_emb.weight"].shape[0] == saved["out_head.weight"].shape[0] == 300
    assert read_json(out / "results.json")["val_loss"] < 6


def _write_text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(synthetic_text(4000, seed=3).replace("o", "\n"))
    return path


def test_a_padded_vocabulary_checkpoints_and_resumes_exactly(tmp_path):
    """The vocabulary is padded on CPU as on a GPU, so the optimizer state a checkpoint holds (AdamW's
    moments of the padded rows) fits the model wherever the run resumes: a 300-token vocabulary trains
    320 rows, model.safetensors keeps the book's 300, and a run resumed from a mid-run checkpoint ends
    with the same weights."""
    out, again = tmp_path / "run", tmp_path / "again"
    shape = {"context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 1}
    options = dict(model="gpt", data="synthetic", num_samples=3000, tokenizer="bytes", vocab_size=300, **shape,
                   batch_size=4, epochs=1, checkpoint_every=5, keep_last=0, progress=False, plot=False)  # fmt: skip
    fit(output_dir=str(out), **options)
    first = checkpoint_dirs(out)[-1]
    optimizer = torch.load(first / "optimizer.bin", weights_only=True)
    rows = sorted({s["exp_avg"].shape[0] for s in optimizer["state"].values() if s["exp_avg"].dim() == 2})
    assert 320 in rows and 300 not in rows, rows
    assert weights(out)["out_head.weight"].shape[0] == 300
    shutil.copytree(out, again)
    fit(output_dir=str(again), resume=str(again / "checkpoints" / first.name), **options)
    assert_weights_equal(weights(again), weights(out))


def test_every_kind_of_text_run_evaluates_from_any_directory(tmp_path, monkeypatch, capsys):
    """Issue 21: a run on a text file saves no num_samples, and its evaluation read it (KeyError). A run on a
    file, a folder of .txt files, and with --val-data, each given by a path relative to where it was trained:
    evaluated from another directory, with no --data it reproduces results.json's val_loss, and any text file
    evaluates it. (The synthetic run's: test_evaluate_reports_the_runs_validation_loss_and_a_text_file.)"""
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(2):
        (texts / f"part{i}.txt").write_text(synthetic_text(1500, seed=i).replace("o", "\n"))
    (tmp_path / "val.txt").write_text(synthetic_text(600, seed=7))
    (tmp_path / "other.txt").write_text(synthetic_text(600, seed=8))
    tiny = (*TINY, "--vocab-size", "300", "--epochs", "1", "--batch-size", "8")
    sources = {"file": ("--data", "texts/part0.txt"), "folder": ("--data", "texts"),
               "val_data": ("--data", "texts/part1.txt", "--val-data", "val.txt")}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for name, args in sources.items():
        assert train_here(tmp_path / "runs" / name, *tiny, *args) == 0, name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    for name in sources:
        run = tmp_path / "runs" / name
        assert evaluate_run(run)["loss"] == read_json(run / "results.json")["val_loss"], name
        assert evaluate_main([str(run)]) == 0 and evaluate_main([str(run), "--data", str(tmp_path / "other.txt")]) == 0
        out = capsys.readouterr().out
        assert out.count("perplexity ") == 2 and f"evaluated on {tmp_path / 'other.txt'} (" in out, out
