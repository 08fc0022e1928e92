"""toyaccel-export: a trained GPT run loads in transformers with the same logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from toyaccel import load_model
from toyaccel.cli import train_main
from toyaccel.export import main as export_main
from toyaccel.inference import generate_from_run
from toyaccel.workloads.gpt.text import synthetic_text

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

TINY = ("--model", "gpt", "--context-length", "16", "--emb-dim", "16", "--n-heads", "2", "--n-layers", "1",
        "--no-plot", "--no-progress", "--epochs", "1", "--batch-size", "4")  # fmt: skip


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    (folder / "text.txt").write_text(synthetic_text(6_000, 7))
    mp = pytest.MonkeyPatch()
    mp.setenv("TOYACCEL_CACHE_DIR", str(folder / "cache"))
    assert train_main([*TINY, "--data", str(folder / "text.txt"), "--vocab-size", "300",
                       "--output-dir", str(folder / "run")]) == 0  # fmt: skip
    mp.undo()
    return folder / "run"


@pytest.mark.slow
def test_an_exported_run_gives_transformers_the_same_logits_tokens_and_text(bpe_run, tmp_path, capsys):
    assert export_main([str(bpe_run), str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out == (
        f"wrote config.json, model.safetensors, tokenizer.json, tokenizer_config.json to {tmp_path / 'hf'}\n"
    )
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_model(bpe_run)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(ids), model(ids).logits, atol=1e-4, rtol=0)
    prompt = "abc de"
    expected = generate_from_run(bpe_run, prompt, max_new_tokens=10)
    encoded = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(encoded, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert tokenizer.decode(out[0]) == expected


def test_export_refuses_a_folder_that_holds_files_and_a_run_that_is_not_a_gpt(bpe_run, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert export_main([str(bpe_run), str(tmp_path / "busy")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'busy'} is not empty; pass --overwrite to replace its files, or choose another OUT_DIR\n"
    )
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert train_main(["--no-plot", "--no-progress", "--output-dir", str(tmp_path / "mlp")]) == 0
    capsys.readouterr()
    assert export_main([str(tmp_path / "mlp"), str(tmp_path / "out")]) == 2
    assert "holds a mlp run" in capsys.readouterr().err
