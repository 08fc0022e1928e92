"""The in-memory text's ids kept compactly: encoded piece by piece they are the whole text's ids, in 1, 2 or
4 bytes a token."""

from __future__ import annotations

import pytest
import torch

from toyaccel.text import BPETokenizer, ByteTokenizer, synthetic_text
from toyaccel.token_ids import encode_compact, pretoken_pieces

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
    monkeypatch.setattr("toyaccel.token_ids.ENCODE_PIECE_CHARS", 50)
    monkeypatch.setattr("toyaccel.token_ids.ENCODE_BATCH", 3)
    ids = encode_compact(tokenizer, TRICKY)
    assert ids.dtype == torch.int16 and ids.tolist() == tokenizer.encode(TRICKY)
    assert ByteTokenizer().size == 256 and encode_compact(ByteTokenizer(), "héllo").dtype == torch.uint8
    assert encode_compact(ByteTokenizer(), "héllo").tolist() == list("héllo".encode())
