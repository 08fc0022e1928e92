"""Train with scripts/train.py's options while recording when DDP all-reduces gradients.

Launched by tests/test_scale_out.py with `accelerate launch`. The training is toyaccel's own loop,
untouched; we only watch it: a forward pre-hook numbers the training micro-steps, and a DDP comm
hook (DDP's default all-reduce, plus a note of the micro-step it ran in) records every gradient
all-reduce. Each rank writes ``allreduce_rank<R>.json`` into --output-dir.
"""

import json
import os
import sys
from pathlib import Path

import accelerate
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import toyaccel  # noqa: E402
from toyaccel.cli import parse_train_args, run_cli  # noqa: E402

micro_steps = 0  # training forward passes so far on this rank
allreduce_at: list[int] = []  # the micro-step each gradient bucket was all-reduced in


def count_micro_step(module, inputs) -> None:
    global micro_steps
    if module.training:  # evaluation passes between epochs are not micro-steps
        micro_steps += 1


def recording_allreduce(state, bucket):
    allreduce_at.append(micro_steps)
    return allreduce_hook(state, bucket)


class WatchedAccelerator(accelerate.Accelerator):
    def prepare_model(self, model, *args, **kwargs):
        model = super().prepare_model(model, *args, **kwargs)
        if isinstance(model, DistributedDataParallel):
            model.module.register_forward_pre_hook(count_micro_step)
            model.register_comm_hook(state=None, hook=recording_allreduce)
        return model


def main() -> None:
    config = parse_train_args(sys.argv[1:])
    accelerate.Accelerator = WatchedAccelerator  # build_accelerator looks the class up at call time
    toyaccel.fit(config)
    record = {"micro_steps": micro_steps, "allreduce_at": allreduce_at}
    Path(config.output_dir, f"allreduce_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    sys.exit(run_cli(main))
