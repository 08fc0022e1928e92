"""``toyaccel-export RUN_DIR OUT_DIR``: a GPT run as a Hugging Face GPT-2 folder.

    from transformers import GPT2LMHeadModel, AutoTokenizer
    model = GPT2LMHeadModel.from_pretrained("OUT_DIR")
    tokenizer = AutoTokenizer.from_pretrained("OUT_DIR")     # where the run's tokenizer could be written

OUT_DIR gets config.json and model.safetensors (the padded vocabulary cut back, zero q/k/v biases where
the book's model has none, the head as its own untied ``lm_head.weight``), and for a run with the BPE
tokenizer its tokenizer.json with a tokenizer_config.json naming GPT2TokenizerFast. A bytes or tiktoken
run's tokenizer has no such file: the folder then holds the model only, and the command says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from toyaccel.cli import _Parser, run_cli
from toyaccel.engine.run_dir import write_atomic
from toyaccel.errors import ToyaccelError
from toyaccel.inference import load_gpt_run
from toyaccel.workloads.gpt.hf_gpt2 import save_hf_gpt2


def export_run(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> list[str]:
    """Write ``out_dir``; return the names of the files written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ToyaccelError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ToyaccelError(f"{out} is not empty; pass --overwrite to replace its files, or choose another OUT_DIR")
    model, tokenizer, saved = load_gpt_run(run_dir)
    cfg = saved["model"]
    try:
        save_hf_gpt2(model.state_dict(), cfg, out, write_atomic)
        written = ["config.json", "model.safetensors"]
        if tokenizer.kind == "bpe":
            write_atomic(out / "tokenizer.json", lambda p: Path(p).write_text(tokenizer.to_json()))
            # AutoTokenizer reads the class from here; GPT-2's byte-level BPE is what the run trained.
            config = {"tokenizer_class": "GPT2TokenizerFast", "model_max_length": cfg["context_length"]}
            write_atomic(out / "tokenizer_config.json", lambda p: Path(p).write_text(json.dumps(config) + "\n"))
            written += ["tokenizer.json", "tokenizer_config.json"]
    except OSError as e:
        raise ToyaccelError(f"cannot write {out}: {e.strerror or e}") from None
    return written


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="toyaccel-export", description="Write a --model gpt run as a Hugging Face GPT-2 folder")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --output-dir of a --model gpt run")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the folder GPT2LMHeadModel.from_pretrained will read")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty OUT_DIR")

    def run() -> None:
        args = parser.parse_args(argv)
        written = export_run(args.run_dir, args.out_dir, args.overwrite)
        note = "" if "tokenizer.json" in written else " (the run's tokenizer has no Hugging Face form: model only)"
        print(f"wrote {', '.join(written)} to {args.out_dir}{note}", flush=True)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
