"""The GPT's tokenizers: one token per byte, a byte-level BPE trained on the training text, and the book's
GPT-2 encoding (tiktoken); each saves itself as a run's tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from toyaccel.errors import ToyaccelError


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
        """Trained from any iterable of text (a corpus streamed from disk: toyaccel.workloads.gpt.shards)."""
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
