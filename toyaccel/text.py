"""Text for the GPT workload: reading it, a synthetic text of known entropy, tokenizers, and windows.

Training samples are chapter 5's: windows of ``context_length`` token ids taken every ``stride``
tokens, each with the window shifted by one token as its targets (the book's GPTDatasetV1).
Tokenizing happens once per machine: the first process to take a file lock tokenizes and caches the
ids; the others (and later runs on the same text) read the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from toyaccel.config import in_bytes, machine_memory, require_regular_file
from toyaccel.errors import ToyaccelError
from toyaccel.token_ids import compact, encode_compact

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


# ---------------------------------------------------------------------------------------------
# Tokenizers


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255). Remembers which bytes training saw: a prompt with others
    would start from embeddings that were never trained."""

    kind = "bytes"

    def __init__(self, seen: list[int] | None = None):
        self.seen = set(range(256)) if seen is None else set(seen)

    @property
    def size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def check_prompt(self, prompt: str) -> None:
        unknown = sorted({ch for ch in prompt if not set(ch.encode("utf-8")) <= self.seen})
        if unknown:
            raise ToyaccelError(
                f"the prompt has characters the model never saw in training: {''.join(unknown)!r} "
                "(its vocabulary is the bytes of the training text)"
            )

    def to_json(self) -> str:
        return json.dumps({"type": "bytes", "seen": sorted(self.seen)})


class BPETokenizer:
    """A byte-level BPE (Hugging Face ``tokenizers``), trained on the training text: any text encodes."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        return cls.train_from_lines(text.splitlines(keepends=True), vocab_size)

    @classmethod
    def train_from_lines(cls, lines, vocab_size: int, special_tokens: tuple[str, ...] = ()) -> BPETokenizer:
        """Trained from any iterable of text (a corpus streamed from disk: toyaccel.shards)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
            special_tokens=list(special_tokens),
        )
        tokenizer.train_from_iterator(lines, trainer)
        return cls(tokenizer)

    @classmethod
    def from_str(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    @property
    def size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tokenizer.encode_batch_fast(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def check_prompt(self, prompt: str) -> None:
        """Byte-level: every text has tokens."""

    def to_json(self) -> str:
        return self.tokenizer.to_str()


class GPT2Tokenizer:
    """The book's tokenizer: tiktoken's "gpt2" encoding (its files are downloaded at first use)."""

    kind = "gpt2"

    def __init__(self):
        try:
            import tiktoken

            self.encoding = tiktoken.get_encoding("gpt2")
        except ImportError:
            raise ToyaccelError("--tokenizer gpt2 needs tiktoken: pip install tiktoken") from None
        except Exception as e:  # noqa: BLE001 - no network, no cache: one line saying so
            raise ToyaccelError(
                "--tokenizer gpt2: tiktoken cannot load the gpt2 encoding (it downloads it at first use; "
                f"offline, set TIKTOKEN_CACHE_DIR to a folder that holds it, or use --tokenizer bpe): "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            ) from None

    @property
    def size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special={"<|endoftext|>"})

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.encoding.encode_batch(texts, allowed_special={"<|endoftext|>"})
        return [np.asarray(i, dtype=np.int32) for i in ids]

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def check_prompt(self, prompt: str) -> None:
        """Byte-level: every text has tokens."""

    def to_json(self) -> str:
        return json.dumps({"type": "gpt2"})


def load_tokenizer(description: dict[str, Any], run_dir: Path):
    """The tokenizer a run saved: config.json's ``tokenizer`` section and the run's tokenizer.json."""
    kind = description.get("type")
    if kind == "gpt2":
        return GPT2Tokenizer()
    path = run_dir / "tokenizer.json"
    try:
        text = path.read_text()
        if kind == "bytes":
            return ByteTokenizer(json.loads(text)["seen"])
        if kind == "bpe":
            return BPETokenizer.from_str(text)
    except FileNotFoundError:
        raise ToyaccelError(f"{path}: no such file (the run's tokenizer)") from None
    except Exception as e:  # noqa: BLE001 - a damaged file: one line naming it
        raise ToyaccelError(f"{path}: cannot load the tokenizer: {str(e).splitlines()[0]}") from None
    raise ToyaccelError(f"{run_dir / 'config.json'}: unknown tokenizer {kind!r}")


# ---------------------------------------------------------------------------------------------
# Tokenizing once, with a cache


def cache_dir() -> Path:
    root = (
        os.environ.get("TOYACCEL_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "toyaccel"
    )
    return Path(root) / "tokens"


@contextlib.contextmanager
def file_lock(path: Path):
    """One process at a time per machine (the others wait), released even if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tokenize(kind: str, vocab_size: int, train_text: str, val_text: str | None):
    """The tokenizer and the ids of both texts, computed by the first process and cached for the rest."""
    if kind == "bytes":  # nothing to learn and nothing slow: no cache
        train = torch.frombuffer(bytearray(train_text.encode("utf-8")), dtype=torch.uint8)
        val = torch.frombuffer(bytearray(val_text.encode("utf-8")), dtype=torch.uint8) if val_text else None
        return ByteTokenizer(torch.bincount(train, minlength=256).nonzero().flatten().tolist()), train, val
    h = hashlib.sha256(f"{kind}\0{vocab_size}\0{len(train_text)}\0".encode())
    h.update(train_text.encode("utf-8"))
    h.update(b"\0" + (val_text or "").encode("utf-8"))
    folder = cache_dir() / h.hexdigest()[:32]
    try:
        with file_lock(folder.with_suffix(".lock")):
            if not (folder / "tokens.safetensors").exists():
                write_cache(folder, kind, vocab_size, train_text, val_text)
            tokens = load_file(str(folder / "tokens.safetensors"))
            tokenizer = (
                GPT2Tokenizer() if kind == "gpt2" else BPETokenizer.from_str((folder / "tokenizer.json").read_text())
            )
    except OSError as e:
        raise ToyaccelError(
            f"cannot use the token cache {folder} (set TOYACCEL_CACHE_DIR): {e.strerror or e}"
        ) from None
    # A cache written before tokens were kept compactly holds int64.
    return tokenizer, *(compact(tokens[k], tokenizer.size) if k in tokens else None for k in ("train", "val"))


def write_cache(folder: Path, kind: str, vocab_size: int, train_text: str, val_text: str | None) -> None:
    tokenizer = GPT2Tokenizer() if kind == "gpt2" else BPETokenizer.train(train_text, vocab_size)
    tokens = {"train": encode_compact(tokenizer, train_text)}
    if val_text:
        tokens["val"] = encode_compact(tokenizer, val_text)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process that died here
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.json").write_text(tokenizer.to_json())
    save_file(tokens, str(tmp / "tokens.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# ---------------------------------------------------------------------------------------------
# Windows


class TextWindows:
    """The book's GPTDatasetV1 over a token tensor: window i is ids[s:s+L], its targets ids[s+1:s+L+1],
    s = i * stride. ``__getitems__`` gathers a whole batch with one index (see data.ToyDataset)."""

    def __init__(self, tokens: torch.Tensor, context_length: int, stride: int):
        self.tokens = tokens
        self.context_length = context_length
        # The book's range(0, len(ids) - max_length, stride): every window has its next-token targets.
        self.starts = torch.arange(0, max(0, tokens.numel() - context_length), stride)
        self.offsets = torch.arange(context_length + 1)

    def __len__(self) -> int:
        return self.starts.numel()

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def __getitem__(self, index):
        inputs, targets = self.__getitems__([index])
        return inputs[0], targets[0]

    def __getitems__(self, indices):
        # The sampler's indices are already where the tokens are (on a GPU: toyaccel.engine.placement); lists move.
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.starts.device)
        rows = self.tokens[self.starts[indices].unsqueeze(1) + self.offsets].long()  # kept compactly, read as int64
        return rows[:, :-1], rows[:, 1:]


@dataclass
class TextBundle:
    train: TextWindows
    val: TextWindows | None
    tokenizer: Any
    source: str
    best_loss: float | None = None  # see best_possible_loss

    def fingerprint(self) -> str:
        """Changes when any training or validation token, or the tokenizer, changes."""
        h = hashlib.sha256(self.tokenizer.to_json().encode())
        for ds in (self.train, self.val):
            if ds is not None:
                for part in ds.tokens.split(1 << 22):  # as int64, as before tokens were kept compactly
                    h.update(part.long().numpy().tobytes())
                h.update(f"{ds.context_length}:{ds.starts[1:2].tolist()}".encode())
        return h.hexdigest()[:16]


def split_text(text: str, val_fraction: float) -> tuple[str, str | None]:
    """The book's split: the first part trains, the last ``val_fraction`` of the characters validates."""
    if not val_fraction:
        return text, None
    split_idx = int((1.0 - val_fraction) * len(text))
    return text[:split_idx], text[split_idx:]


def load_text_data(config) -> TextBundle:
    """Training and validation windows for a ``--model gpt`` config; ToyaccelError on any bad input."""
    text = source_text(config.data, config.num_samples, config.seed)
    source = "the synthetic text" if config.data == "synthetic" else config.data
    train_text, val_text = split_text(text, config.val_fraction)
    if config.val_data:
        val_text = read_text(config.val_data)
    tokenizer, train_ids, val_ids = tokenize(config.tokenizer, config.vocab_size, train_text, val_text)
    largest = max(int(ids.max()) for ids in (train_ids, val_ids) if ids is not None and ids.numel())
    if largest >= config.vocab_size:
        raise ToyaccelError(
            f"the {tokenizer.kind} tokenizer gives token id {largest}, beyond the model's vocab_size of "
            f"{config.vocab_size}; raise --vocab-size"
        )
    train = windows(train_ids, config, f"{source} (training part)")
    val = windows(val_ids, config, f"{config.val_data or source} (validation part)") if val_ids is not None else None
    return TextBundle(train, val, tokenizer, source, best_possible_loss(config))


def windows(ids: torch.Tensor, config, what: str) -> TextWindows:
    ds = TextWindows(ids, config.context_length, config.stride)
    if len(ds) == 0:
        raise ToyaccelError(
            f"{what} is {ids.numel()} tokens, too short for one window of context_length {config.context_length} "
            f"plus its next-token target; give more text or lower --context-length"
        )
    return ds


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
