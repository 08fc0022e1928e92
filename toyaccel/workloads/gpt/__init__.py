"""The book's chapters 4-5 workload: GPTModel pretrained on text (workload.py: GPTWorkload).

Its constants live here, light to import: toyaccel.config declares the options with them (a downward import)."""

TOKENIZERS = ("bpe", "bytes", "gpt2")
SYNTHETIC_CHARS = 50_000  # the synthetic text's length where --num-samples is not given
