"""The in-memory text's ids kept compactly: encoded piece by piece they are the whole text's ids, in 1, 2 or
4 bytes a token."""

from __future__ import annotations

import pytest
import torch

from toyaccel.workloads.gpt.text import synthetic_text
from toyaccel.workloads.gpt.token_ids import encode_compact, pretoken_pieces
from toyaccel.workloads.gpt.tokenizers import BPETokenizer, ByteTokenizer

pytest.importorskip("tokenizers")

# Runs of spaces, newlines, tabs, a no-break space, contractions, digits and punctuation: where GPT-2's
# pre-tokenizer could join what a careless cut would separate.
TRICKY = "It's  3 o'clock.\n\n  Indented\tline  \u00a0nbsp  --  x' 'y 12 345!? \u3000wide  end \n" * 40


def test_pieces_cut_only_before_a_space_after_a_non_space_and_join_to_the_text():
    pieces = list(pretoken_pieces(TRICKY, size=50))
    assert "".join(pieces) == TRICKY and len(pieces) > 20
    for before, piece in zip(pieces, pieces[1:]):
        assert piece.startswith(" ") and not before[-1].isspace()


def test_ids_encoded_piece_by_piece_are_the_whole_texts_compactly(monkeypatch):
    tokenizer = BPETokenizer.train(TRICKY + synthetic_text(5_000, 3), 300)
    monkeypatch.setattr("toyaccel.workloads.gpt.token_ids.ENCODE_PIECE_CHARS", 50)
    monkeypatch.setattr("toyaccel.workloads.gpt.token_ids.ENCODE_BATCH", 3)
    ids = encode_compact(tokenizer, TRICKY)
    assert ids.dtype == torch.int16 and ids.tolist() == tokenizer.encode(TRICKY)
    assert ByteTokenizer().size == 256 and encode_compact(ByteTokenizer(), "héllo").dtype == torch.uint8
    assert encode_compact(ByteTokenizer(), "héllo").tolist() == list("héllo".encode())


def test_the_gpts_in_memory_text_keeps_its_ids_compactly(tmp_path, monkeypatch):
    from toyaccel.config import build_config
    from toyaccel.workloads.gpt.windows import load_text_data

    monkeypatch.setenv("TOYACCEL_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text(TRICKY + synthetic_text(5_000, 3))
    for tokenizer, dtype in (("bytes", torch.uint8), ("bpe", torch.int16)):
        config = build_config(None, model="gpt", data=str(tmp_path / "a.txt"), tokenizer=tokenizer,
                              context_length=16)  # fmt: skip
        for _ in range(2):  # tokenized, then read from the token cache
            data = load_text_data(config)
            assert data.train.tokens.dtype == data.val.tokens.dtype == dtype
            inputs, targets = data.train.__getitems__(torch.tensor([3, 0]))
            assert inputs.dtype == torch.int64 and torch.equal(inputs[1], data.train.tokens[:16].long())
