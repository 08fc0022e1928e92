"""Train with scripts/train.py's options while recording what each rank's dropout did.

Launched by tests/test_gpt.py with `accelerate launch` (and used in-process there through ``watching``).
The training is toyaccel's own loop, untouched; torch's global module hooks only watch it: for the first
STEPS training forward passes, the token ids the GPT was given and the mask every dropout layer drew
(the units it kept). Each rank writes ``dropout_rank<R>.pt`` into --output-dir.
"""

import contextlib
import sys
from pathlib import Path

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import toyaccel  # noqa: E402
from toyaccel.cli import parse_train_args, run_cli  # noqa: E402
from toyaccel.workloads.gpt.model import GPTModel  # noqa: E402

STEPS = 3  # training forward passes recorded


@contextlib.contextmanager
def watching():
    """{"rank": R, "inputs": [ids of pass 0, ...], "masks": [[kept units of each dropout call in pass 0], ...]}
    while the block runs; evaluation and the epoch-end sample run in eval mode and are left out."""
    from accelerate import PartialState

    record = {"rank": None, "inputs": [], "masks": []}
    recording = [False]  # inside one of the first STEPS training passes

    def before(module, args):
        if isinstance(module, GPTModel):
            recording[0] = module.training and len(record["inputs"]) < STEPS
            if recording[0]:
                record["rank"] = PartialState().process_index
                record["inputs"].append(args[0].detach().cpu().clone())
                record["masks"].append([])

    def after(module, args, output):
        if recording[0] and isinstance(module, torch.nn.Dropout) and module.training:
            record["masks"][-1].append((output != 0).cpu())

    handles = [register_module_forward_pre_hook(before), register_module_forward_hook(after)]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    config = parse_train_args(sys.argv[1:])
    with watching() as record:
        toyaccel.fit(config)
    torch.save(record, Path(config.output_dir, f"dropout_rank{record['rank']}.pt"))


if __name__ == "__main__":
    sys.exit(run_cli(main))
