"""The Accelerator of a run: built as every command builds it, refused where it would not run as asked
(toyaccel.engine.launch says why), and released so a notebook can build another."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import accelerate
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration

from toyaccel.engine.launch import check_launch, launched_world_size
from toyaccel.errors import ToyaccelError


def build_accelerator(config) -> accelerate.Accelerator:
    """``config``: mixed_precision, grad_accum, compile, log_with and output_dir are read."""
    check_launch()
    # A multi-process launch on a machine without CUDA would otherwise give N processes that each
    # see DistributedType.NO and train alone; on CPU they form one gloo world instead.
    multi_process = launched_world_size() > 1
    project = ProjectConfiguration(project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / "logs"))
    try:
        # Looked up at call time, so tests/allreduce_probe.py can substitute its own Accelerator.
        accelerator = accelerate.Accelerator(
            cpu=multi_process and not torch.cuda.is_available(),
            dataloader_config=dataloader_configuration(),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
            dynamo_backend="inductor" if config.compile else None,
            log_with=config.log_with,
            project_config=project,
        )
    except (ValueError, ImportError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0]
        if "EADDRINUSE" in reason or "address already in use" in reason.lower():
            port = os.environ.get("MASTER_PORT", "")
            raise ToyaccelError(
                f"cannot set up Accelerate: port {port} is already in use (another run on this machine?); "
                "pass --main_process_port with a free port to accelerate launch"
            ) from None
        raise ToyaccelError(f"cannot set up Accelerate: {reason}") from None
    return accelerator


def dataloader_configuration() -> DataLoaderConfiguration:
    """Batches copied to the GPU with non_blocking=True: from pinned memory the copy overlaps the
    previous step instead of making the CPU wait for it. On CPU, and for data already on the GPU,
    there is no copy and this changes nothing."""
    return DataLoaderConfiguration(non_blocking=True)


def check_world(accelerator: accelerate.Accelerator) -> None:
    """Refuse setups that would run, but not as asked."""
    launched = launched_world_size()
    if accelerator.num_processes != launched:
        raise ToyaccelError(
            f"the launcher started {launched} processes but Accelerate sees a world of {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}): each process would train alone on all the data; "
            "use accelerate_configs/multi_cpu.yaml on a machine without GPUs",
            every_process=True,
        )
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if fsdp_asked and accelerator.distributed_type != DistributedType.FSDP:
        raise ToyaccelError(
            f"the accelerate config asks for FSDP but this run got {accelerator.distributed_type.value} "
            "(FSDP needs GPUs); use accelerate_configs/multi_cpu.yaml on CPU",
            every_process=True,
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ToyaccelError(
            "fp16 mixed precision does nothing on CPU; use bf16 (accelerate_configs/cpu_bf16.yaml) or no",
            every_process=True,
        )


def on_accelerator(config, job, *args):
    """``job(accelerator, *args)`` on this launch's Accelerator, refused as training refuses a launch that
    would not run as asked (check_world), and released afterwards whatever happens. What the job
    prepares is gone when it returns, before release() ends the process group."""
    accelerator = build_accelerator(config)
    try:
        check_world(accelerator)
        return job(accelerator, *args)
    finally:
        release(accelerator)


def release(accelerator: accelerate.Accelerator) -> None:
    """Drop everything prepared before the process group goes: gloo runs that exit with the DDP model
    alive abort one rank now and then (SIGABRT after all work is done). Resetting accelerate's
    shared state lets a notebook call ``fit`` again with other settings."""
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
