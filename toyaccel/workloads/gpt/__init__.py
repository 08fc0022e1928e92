"""The book's chapters 4-5 workload: GPTModel pretrained on text (workload.py: GPTWorkload)."""
