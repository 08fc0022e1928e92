"""``--init-from DIR``: a GPT run that starts from a Hugging Face GPT-2 folder, checked against transformers.

The GPT-2 is tiny and random, built with transformers inside the test (no download), with a small byte-level
BPE (the tokenizers library) saved beside it; the module skips where transformers is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import read_jsonl
from safetensors.torch import load_file, save_file

from toyaccel import fit, load_model
from toyaccel.cli import train_main
from toyaccel.config import build_config
from toyaccel.export import export_run
from toyaccel.inference import generate_from_run
from toyaccel.workloads import get_workload
from toyaccel.workloads.gpt.windows import TextWindows

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CONFLICT = "config.json: options conflict with its model: "
VOCAB, CONTEXT = 300, 16  # 300 rows: GPTModel pads them to 320 inside
WORDS = "every effort moves you forward while the quiet river keeps its own slow time near old stone walls".split()


def sample_text(words: int = 1500) -> str:
    g = torch.Generator().manual_seed(5)
    picks = torch.randint(0, len(WORDS), (words,), generator=g).tolist()
    return " ".join(WORDS[i] + ("." if i % 7 == 0 else "") for i in picks) + "\n"


def gpt2_folder(folder: Path, tokenizer_form: str | None = "tokenizer.json", seed: int = 0, **overrides) -> Path:
    """A random GPT-2 written by save_pretrained, and (unless ``tokenizer_form`` is None) its byte-level BPE."""
    torch.manual_seed(seed)
    shape = {"vocab_size": VOCAB, "n_positions": CONTEXT, "n_embd": 16, "n_layer": 2, "n_head": 2, **overrides}
    config = transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    if tokenizer_form is not None:
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=VOCAB, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator([sample_text()], trainer)
        if tokenizer_form == "tokenizer.json":
            tok.save(str(folder / "tokenizer.json"))
        else:  # GPT-2's own pair of files
            tok.model.save(str(folder))
    return folder


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOYACCEL_CACHE_DIR", str(tmp_path / "token_cache"))


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(sample_text())
    return path


def test_the_loaded_model_gives_transformers_logits(tmp_path, text_file):
    folder = gpt2_folder(tmp_path / "gpt2")
    reference = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    config = build_config(model="gpt", data=str(text_file), init_from=str(folder))
    assert (config.vocab_size, config.context_length, config.emb_dim, config.n_heads, config.n_layers) == (
        VOCAB, CONTEXT, 16, 2, 2)  # fmt: skip
    assert config.qkv_bias is True and config.tokenizer == "bpe"
    model = get_workload("gpt").build_model(config, None).eval()
    ids = torch.randint(0, VOCAB, (3, CONTEXT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(ids), reference(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer_form", ["tokenizer.json", "vocab.json+merges.txt"])
def test_fine_tuning_starts_at_transformers_loss_with_the_folders_tokenizer_and_exports(
    tmp_path, text_file, tokenizer_form
):
    folder = gpt2_folder(tmp_path / "gpt2", tokenizer_form)
    own = transformers.AutoTokenizer.from_pretrained(folder) if tokenizer_form != "tokenizer.json" else None
    folder_tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")) if own is None else None
    ids = torch.tensor(own(text_file.read_text())["input_ids"] if own else folder_tok.encode(text_file.read_text()).ids)
    windows = TextWindows(ids, CONTEXT, CONTEXT)
    inputs, targets = windows.__getitems__(list(range(len(windows))))
    reference = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        first_loss = F.cross_entropy(reference(inputs).logits.flatten(0, 1), targets.flatten()).item()

    # One batch holds every window: the first step's loss is the mean over all of them, in any order.
    run = tmp_path / "run"
    fit(model="gpt", data=str(text_file), init_from=str(folder), val_fraction=0.0, drop_rate=0.0, epochs=2,
        batch_size=len(windows), log_every=1, output_dir=str(run), progress=False, plot=False)  # fmt: skip
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"]
    assert steps[0]["loss"] == pytest.approx(first_loss, abs=1e-5)
    assert steps[1]["loss"] < steps[0]["loss"]  # it trained from there
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["init_from"] == str(folder) and saved["tokenizer"]["type"] == "bpe"

    # The run's tokenizer is the folder's: the exported folder encodes the text as the folder does, and its
    # model gives the trained run's logits in transformers.
    export_run(run, tmp_path / "export")
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    exported_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert exported_tok(text_file.read_text())["input_ids"] == ids.tolist()
    with torch.no_grad():
        assert torch.allclose(load_model(run).eval()(inputs[:4]), exported(inputs[:4]).logits, atol=1e-4, rtol=0)
        prompt = exported_tok("every effort moves you", return_tensors="pt")["input_ids"]
        theirs = exported.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist()
    # toyaccel-generate reads the same tokenizer from the run folder: the same greedy continuation.
    run_tok = tokenizers.Tokenizer.from_file(str(run / "tokenizer.json"))
    assert generate_from_run(run, "every effort moves you", max_new_tokens=6) == run_tok.decode(theirs)


@pytest.mark.slow
def test_a_folder_without_tokenizer_files_takes_the_tokenizer_option(tmp_path, text_file):
    folder = gpt2_folder(tmp_path / "gpt2", tokenizer_form=None)
    result = fit(model="gpt", data=str(text_file), init_from=str(folder), tokenizer="bytes", epochs=1, batch_size=8,
                 output_dir=str(tmp_path / "run"), progress=False, plot=False)  # fmt: skip
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert saved["tokenizer"] == {"type": "bytes", "size": 256} and saved["model"]["vocab_size"] == VOCAB
    assert result.global_step > 0


@pytest.mark.slow
def test_the_folder_is_part_of_the_runs_identity(tmp_path, text_file, capsys):
    """A resume from another folder (same shape, other weights) is refused, naming init_from."""
    first, other = gpt2_folder(tmp_path / "gpt2"), gpt2_folder(tmp_path / "other", seed=1)
    args = ["--model", "gpt", "--data", str(text_file), "--epochs", "1", "--batch-size", "64", "--no-progress",
            "--no-plot", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    assert train_main([*args, "--init-from", str(first)]) == 0
    capsys.readouterr()
    assert train_main([*args, "--init-from", str(other), "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume, this run differs from it: init_from: checkpoint '{first}', now '{other}'" in err


def drop_tensor(folder: Path, name: str) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != name}, str(folder / "model.safetensors"))


def set_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "damage, options, message",
    [
        (lambda d: set_config(d, model_type="llama"), (), "config.json: model_type is 'llama', not 'gpt2'"),
        (lambda d: drop_tensor(d, "transformer.h.1.attn.c_attn.weight"), (),
         "model.safetensors: missing tensor transformer.h.1.attn.c_attn.weight"),
        (lambda d: set_config(d, n_embd=32), (),
         "model.safetensors: transformer.wte.weight has shape [300, 16], its config.json says [300, 32]"),
        (lambda d: None, ("--emb-dim", "64", "--n-layers", "3"),
         CONFLICT + "--emb-dim 64 against n_embd 16; --n-layers 3 against n_layer 2"),
        (lambda d: None, ("--preset", "gpt2-124m"),
         CONFLICT + "--preset gpt2-124m (the model's shape is the folder's)"),
        (lambda d: None, ("--tokenizer", "gpt2"),
         CONFLICT + "--tokenizer gpt2 (the folder has its own: tokenizer.json)"),
        (lambda d: (d / "tokenizer.json").unlink(), ("--tokenizer", "gpt2"),
         CONFLICT + "--tokenizer gpt2 gives 50257 tokens, beyond vocab_size 300"),
        (lambda d: gpt2_folder(d, vocab_size=280), (),
         "tokenizer.json: the tokenizer has 300 tokens, beyond the model's vocab_size 280"),
    ],
    ids=["not-gpt2", "missing-tensor", "shape", "options", "preset", "tokenizer", "tokenizer-size", "vocab"],
)  # fmt: skip
def test_a_bad_folder_or_conflicting_options_is_one_line_and_exit_2_with_nothing_written(
    tmp_path, text_file, capsys, damage, options, message
):
    folder = gpt2_folder(tmp_path / "gpt2")
    damage(folder)
    capsys.readouterr()  # transformers' own progress bars while writing the folder
    run = tmp_path / "run"
    code = train_main(["--model", "gpt", "--data", str(text_file), "--init-from", str(folder), *options,
                       "--output-dir", str(run), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and not run.exists()
    assert err.startswith("error: ") and "\n" not in err and str(folder) in err
    assert message in err
