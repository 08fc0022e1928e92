"""The book's chapters 4-5 workload: GPTModel pretrained on text (workload.py: GPTWorkload).

Its constants live here, light to import: toyaccel.config declares the options with them (a downward import)."""

TOKENIZERS = ("bpe", "bytes", "gpt2")
SYNTHETIC_CHARS = 50_000  # the synthetic text's length where --num-samples is not given
# The vocabulary each --tokenizer gives, where it is fixed (bpe learns at most vocab_size tokens).
TOKENIZER_SIZES = {"bytes": 256, "gpt2": 50257}
# The book's GPT_CONFIG_124M (chapter 4); a preset fills the model options the user left unset.
PRESETS = {
    "gpt2-124m": {
        "vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
        "drop_rate": 0.1, "qkv_bias": False,
    },
}  # fmt: skip
