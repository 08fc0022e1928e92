"""What several processes decide together: one decides and all follow, and all stand at the same point."""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from toyaccel.engine.checkpoint import TrainerState
from toyaccel.errors import ToyaccelError


def on_main_process(accelerator: Accelerator, fn, *args):
    """Run ``fn`` on the main process only and return its result on every process; its error is
    raised on every process, so none waits forever."""
    message, result = None, None
    if accelerator.is_main_process:
        try:
            result = fn(*args)
        except ToyaccelError as e:
            message = str(e)
    message, result = broadcast_object_list([message, result])
    if message:
        raise ToyaccelError(message, every_process=True)
    return result


def check_processes_agree(accelerator, state: TrainerState) -> None:
    """Stop every process, in one line, if they do not all stand at the same point of the same run:
    a process that resumed elsewhere, read other data, or whose random stream drifted (the data
    order is drawn from it) would otherwise train silently wrong, or hang in a collective."""
    if accelerator.num_processes == 1:
        return
    mine = {"global step": state.global_step, "epoch seed": state.epoch_seed}
    mine["data fingerprint"] = state.data_fingerprint
    everyone = gather_object([mine])
    for rank, theirs in enumerate(everyone):
        for name, value in theirs.items():
            if value != everyone[0][name]:
                raise ToyaccelError(
                    f"rank {rank} disagrees with rank 0 on the {name} at the start of epoch {state.epoch + 1} "
                    f"({value} against {everyone[0][name]}): the processes are not running the same training; "
                    "check that every machine sees the same --output-dir and data",
                    every_process=True,
                )
