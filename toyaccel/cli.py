"""Command lines: a thin shell over ``toyaccel.fit`` that turns ToyaccelError into exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toyaccel.config import OPTIONS, SECTIONS, TrainConfig, build_config, flag, parse_names, read_config_file
from toyaccel.engine.launch import launched_rank, launched_world_size
from toyaccel.errors import Interrupted, ToyaccelError
from toyaccel.options import option_types


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit code 2, like every other error,
    and no abbreviations: a typo like --epoch must not quietly mean --epochs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ToyaccelError(f"{message}{self.suggestion(message)} (see {self.prog} --help)")

    def suggestion(self, message: str) -> str:
        """'; did you mean --epochs?' for a mistyped flag such as --epcohs (or --epochs=3 typed --epoch=3)."""
        if not message.startswith("unrecognized arguments: "):
            return ""
        flags = [f for action in self._actions for f in action.option_strings if f.startswith("--")]
        typed = [word.split("=")[0] for word in message.split()[2:] if word.startswith("--")]
        close = [match for word in typed for match in difflib.get_close_matches(word, flags, n=1)]
        return f"; did you mean {' '.join(close)}?" if close else ""


def with_default(f: dataclasses.Field) -> str:
    """The option's help and its default, said once: not where the help already says it, nor for unset options."""
    help_text = f.metadata["help"]
    if f.default is None or f.default is False or "default" in help_text or "the book:" in help_text:
        return help_text
    if f.default == 0 and "(0 = " in help_text:
        return help_text
    if f.default is True:
        return f"{help_text} (default: on)"
    return f"{help_text} (default: {f.default})"


def train_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="toyaccel-train",
        description="Train the book's MLP (--model mlp, on tables) or GPT (--model gpt, on text) with Accelerate "
        "on CPU, GPU or many processes.",
        epilog="Precedence: defaults < --config file < command-line options.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file with any of the options below")
    groups = {name: parser.add_argument_group(f"{name} options") for name in SECTIONS}
    types = option_types(TrainConfig)
    for f in OPTIONS.values():
        help_text = with_default(f)
        group = groups[f.metadata["section"]]
        kind = types[f.name][0]
        # SUPPRESS: only options the user typed override the config file.
        if kind is bool:
            group.add_argument(
                flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            group.add_argument(
                flag(f.name),
                type=kind if kind in (int, float) else str,
                choices=f.metadata.get("choices"),
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=None if f.metadata.get("choices") else f.name.upper(),
            )
    return parser


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(train_parser().parse_args(argv))
    file_values = read_config_file(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    return build_config(file_values, **args)


def run_cli(main: Callable[[], Any]) -> int:
    """Run ``main``; print a ToyaccelError as one line (once, from rank 0, in a launch) and return 2."""
    try:
        main()
    except ToyaccelError as e:
        if launched_rank() != 0:
            # Every process raises the same error, and the launcher kills the others as soon as one exits:
            # waiting lets rank 0 print it once (and end this process); an error only this rank hit still shows.
            # Nor is it told to the launcher before then: torchrun's report would show it once per process.
            time.sleep(10)
            if e.every_process:  # rank 0 has it for sure: a busy machine may just have been slow to print it
                return e.exit_code
        tell_the_launcher(f"error: {e}")
        # One write: print() writes the newline separately, and other processes share this stderr.
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        return e.exit_code
    except Interrupted as e:
        from toyaccel.engine.interrupts import ignore_stop_signals

        ignore_stop_signals()
        return e.exit_code  # the training loop saved a checkpoint, and its main process said where
    except KeyboardInterrupt:  # Ctrl-C before training started: said once, not by every process
        if launched_rank() == 0:
            print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not lost_a_peer(e):
            raise
        # The launcher reports the process that died (and torchrun restarts them all under elastic_cpu.yaml):
        # this one's ~45-line traceback through the collective would bury that report.
        sys.stderr.write(f"error: another process of the run stopped ({str(e).strip().splitlines()[0]})\n")
        sys.stderr.flush()
        return 1
    return 0


# How gloo and the TCP store word a peer that went away in the middle of a collective.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport")


def lost_a_peer(error: Exception) -> bool:
    """Whether ``error`` is a collective failing because another process of the run stopped."""
    if launched_world_size() <= 1 or not isinstance(error, RuntimeError):
        return False
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(error, getattr(dist, "DistNetworkError", ())):
        return True
    return any(words in str(error) for words in PEER_LOST)


def tell_the_launcher(line: str) -> None:
    """torchrun's failure report ends with its root cause's error file (torch.distributed.elastic.
    multiprocessing.errors); without one it says "To enable traceback see: <a link>". A plain message
    there is shown as it is, so the last thing a user reads is what to change."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))


def train_main(argv: list[str] | None = None) -> int:
    def main() -> None:
        config = parse_train_args(argv)
        from toyaccel.runner import fit  # imported late: `--help` and option errors need no torch start-up

        fit(config)

    return run_cli(main)


def _run_dir_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser for the tools that read a saved run (model.safetensors and config.json only)."""
    parser = _Parser(prog=prog, description=f"{description} (reads model.safetensors and config.json)")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --output-dir of a training run")
    return parser


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = _run_dir_parser(
        "toyaccel-evaluate",
        "Loss, accuracy and confusion matrix of a trained run; works under accelerate launch, with metrics "
        "over all processes",
    )
    parser.add_argument(
        "--data",
        help="'toy' (the book's test set) or a CSV file with the model's feature columns and a label column; "
        "for a gpt run, a UTF-8 text file (default: the run's own validation set, as in results.json)",
    )
    parser.add_argument("--label-column", help="CSV column holding the class (default: the one used in training)")
    parser.add_argument(
        "--batch-size", type=int, help="rows (mlp, default 4096) or windows (gpt, default 8) per process per batch"
    )
    parser.add_argument("--ignore-columns", default="", help="columns of --data to leave out, comma separated")

    def main() -> None:
        from toyaccel.inference import evaluate_run, format_evaluation

        args = parser.parse_args(argv)
        ignore = parse_names(args.ignore_columns)
        metrics = evaluate_run(args.run_dir, args.data, args.label_column, args.batch_size, ignore)
        if launched_rank() == 0:
            print(format_evaluation(metrics), flush=True)

    return run_cli(main)


def predict_main(argv: list[str] | None = None) -> int:
    parser = _run_dir_parser("toyaccel-predict", "Class probabilities from a trained run for every row of a CSV file")
    parser.add_argument(
        "--data",
        required=True,
        help="CSV file with the model's feature columns (other columns, a label among them, are ignored), or 'toy'",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="CSV file to write: the ignored columns (ids) as they were, predicted (the class), prob_<class> per class",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--ignore-columns",
        help="columns of --data to copy to --output before the predictions, comma separated (default: the training "
        "run's --ignore-columns that --data has)",
    )

    def main() -> None:
        from toyaccel.inference import predict_file

        args = parser.parse_args(argv)
        ignore = None if args.ignore_columns is None else parse_names(args.ignore_columns)
        rows = predict_file(args.run_dir, args.data, args.output, args.overwrite, ignore)
        print(f"wrote {rows} predictions to {args.output}", flush=True)

    return run_cli(main)


def generate_main(argv: list[str] | None = None) -> int:
    parser = _run_dir_parser(
        "toyaccel-generate", "Continue a prompt with a trained --model gpt run, as the book's generate does"
    )
    parser.add_argument("--prompt", default="Every effort moves you", help="text to continue (default: the book's)")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default: 50)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 picks the most likely token (greedy, default); >0 samples"
    )
    parser.add_argument("--top-k", type=int, help="sample only among the k most likely tokens (default: all)")
    parser.add_argument("--seed", type=int, default=123, help="seed of the sampling (default: 123)")
    parser.add_argument(
        "--context-length", type=int, help="tokens the model sees at each step (default: its context_length)"
    )

    def main() -> None:
        from toyaccel.inference import generate_from_run

        args = parser.parse_args(argv)
        text = generate_from_run(
            args.run_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, args.context_length
        )
        print(text, flush=True)

    return run_cli(main)


if __name__ == "__main__":
    sys.exit(train_main())
