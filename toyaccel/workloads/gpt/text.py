"""Text for the GPT workload: reading it, and a synthetic text of known entropy."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from toyaccel.engine.files import require_regular_file
from toyaccel.errors import ToyaccelError
from toyaccel.limits import in_bytes, machine_memory

# The synthetic text's alphabet: a first-order Markov chain over these characters.
SYNTHETIC_ALPHABET = "abcdefghijklmno "


# ---------------------------------------------------------------------------------------------
# Reading text


def read_text(source: str) -> str:
    """A UTF-8 text file, or every ``*.txt`` file of a folder (sorted by name, joined by newlines)."""
    path = Path(source)
    if not path.exists():
        raise ToyaccelError(
            f"{source}: no such file (--data takes synthetic, a UTF-8 text file or a folder of .txt files)"
        )
    files = sorted(p for p in path.glob("*.txt") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise ToyaccelError(f"{source}: a folder without .txt files")
    texts = []
    # The bytes, their decoded text and the text joined: three copies at once. Reading at most what fits
    # stops a file that grows, or says less than it holds, as well as a large one.
    room = (machine_memory() or 2**63) // 3
    for f in files:
        require_regular_file(f)
        try:
            with open(f, "rb") as stream:
                fits = os.fstat(stream.fileno()).st_size <= room
                raw = stream.read(room + 1) if fits else b""
            room -= len(raw)
            if not fits or room < 0:
                raise ToyaccelError(
                    f"{f}: too large to read: the text of {source} would need more than this machine's "
                    f"{in_bytes(machine_memory() or 0)} of memory"
                )
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ToyaccelError(f"{f}: not UTF-8 text (byte {e.start} cannot be decoded)") from None
        except OSError as e:
            raise ToyaccelError(f"{f}: cannot read: {e.strerror or e}") from None
    text = "\n".join(texts)
    if not text.strip():
        raise ToyaccelError(f"{source}: no text (the file{'s are' if len(files) > 1 else ' is'} empty)")
    return text


def synthetic_chain(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The transition matrix of the synthetic text and its stationary distribution (float64)."""
    g = torch.Generator().manual_seed(seed)
    k = len(SYNTHETIC_ALPHABET)
    # Peaked rows: each character has a few likely successors, so a model must use the context.
    logits = torch.randn(k, k, generator=g, dtype=torch.float64) * 2.5
    transitions = torch.softmax(logits, dim=1)
    stationary = torch.full((k,), 1.0 / k, dtype=torch.float64)
    for _ in range(1000):
        stationary = stationary @ transitions
    return transitions, stationary


def synthetic_entropy(seed: int) -> float:
    """The synthetic text's entropy rate in nats per character: the lowest loss a model can reach."""
    transitions, stationary = synthetic_chain(seed)
    row_entropy = -(transitions * transitions.log()).sum(dim=1)
    return float(stationary @ row_entropy)


def best_possible_loss(config) -> float | None:
    """The lowest mean loss per token any model can reach, where it is known: the synthetic text read one
    character per token (its entropy rate). A run shows how close it got."""
    if config.data == "synthetic" and config.tokenizer == "bytes":
        return synthetic_entropy(config.seed)
    return None


def source_text(source: str, num_chars: int, seed: int) -> str:
    """The text a ``--data`` value names: the seeded synthetic text, or a file's."""
    return synthetic_text(num_chars, seed) if source == "synthetic" else read_text(source)


def synthetic_text(num_chars: int, seed: int) -> str:
    """``num_chars`` characters of a seeded Markov chain; its own generator leaves the global RNG alone."""
    transitions, stationary = synthetic_chain(seed)
    g = torch.Generator().manual_seed(seed + 1)
    uniforms = torch.rand(num_chars, generator=g, dtype=torch.float64).tolist()
    cumulative = transitions.cumsum(dim=1).tolist()
    state = int(torch.multinomial(stationary, 1, generator=g))
    out = []
    for u in uniforms:
        row = cumulative[state]
        state = next((i for i, c in enumerate(row) if u < c), len(row) - 1)
        out.append(SYNTHETIC_ALPHABET[state])
    return "".join(out)


def split_text(text: str, val_fraction: float) -> tuple[str, str | None]:
    """The book's split: the first part trains, the last ``val_fraction`` of the characters validates."""
    if not val_fraction:
        return text, None
    split_idx = int((1.0 - val_fraction) * len(text))
    return text[:split_idx], text[split_idx:]


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
