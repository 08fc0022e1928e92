"""Token ids kept compactly: text encoded a batch of pieces at a time into 1, 2 or 4 bytes a token, never
into one list of Python ints (that, and the tokenizer's per-token records, cost ~175 bytes a byte of text)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import numpy as np
import torch

# Text is encoded in pieces of about this many characters, a batch of pieces at a time (the tokenizers
# spread a batch over the cores): ids come back as small arrays, never as one list of Python ints.
ENCODE_PIECE_CHARS = 1 << 16
ENCODE_BATCH = 16
# A space after a character that is not whitespace starts a pre-token of GPT-2's byte-level split (the
# BPE's and tiktoken's): no pre-token spans it, so the pieces' ids joined are the whole text's ids.
PRETOKEN_BOUNDARY = re.compile(r"(?<=\S) ")


def pretoken_pieces(text: str, size: int = ENCODE_PIECE_CHARS) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, each cut at a pre-token boundary."""
    start = 0
    while start < len(text):
        boundary = PRETOKEN_BOUNDARY.search(text, start + size) if len(text) - start > size else None
        end = boundary.start() if boundary else len(text)
        yield text[start:end]
        start = end


def compact(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token ids in the smallest integer type that holds the vocabulary: 1, 2 or 4 bytes a token."""
    dtype = torch.uint8 if vocab_size <= 256 else torch.int16 if vocab_size <= 2**15 else torch.int32
    return ids.to(dtype)


def encode_compact(tokenizer, text: str) -> torch.Tensor:
    """``tokenizer.encode(text)`` as a compact tensor (see compact), encoded a batch of pieces at a time."""
    arrays = []
    pieces = pretoken_pieces(text, ENCODE_PIECE_CHARS)
    while batch := list(itertools.islice(pieces, ENCODE_BATCH)):
        arrays += tokenizer.encode_batch(batch)
    ids = torch.from_numpy(np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32))
    return compact(ids, tokenizer.size)
