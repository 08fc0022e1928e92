"""Keeping a GPU busy: where the training data lives, TF32 matmuls, and non-blocking batch copies.

On CPU nothing here changes anything: the data stays where it is and no flag is touched, so CPU runs
keep their exact numbers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from toyaccel.errors import ToyaccelError

# Data goes onto the GPU when all of it takes at most this share of the GPU's free memory: the rest
# is left for the model, its gradients, optimizer state and activations. The toy and synthetic sets
# and any CSV file a person would read by hand are far below it (1M rows x 32 features: 132 MB).
DEVICE_DATA_FRACTION = 0.25
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of the GPUs MFU is reported against; others get none.
DENSE_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def dataset_tensors(dataset) -> dict[str, torch.Tensor]:
    """A dataset's tensor attributes (features and labels; token ids and window starts): what moves
    when the dataset is kept on a GPU."""
    return {name: value for name, value in vars(dataset).items() if isinstance(value, torch.Tensor)}


def dataset_device(dataset) -> torch.device:
    return next((t.device for t in dataset_tensors(dataset).values()), torch.device("cpu"))


@dataclass
class DataPlacement:
    """Where the training and evaluation tensors live. On the GPU a batch is an index_select there
    (no copy, no host synchronisation); on the host each batch is gathered into pinned memory and
    copied without blocking, so the CPU can queue the next step while the copy runs."""

    device: torch.device  # where the datasets' tensors are kept
    pin_memory: bool  # the loaders pin host batches (data on the host, training on a GPU)
    description: str  # for the start-up line

    def place(self, dataset):
        """A copy of ``dataset`` with its tensors where they should live (the CPU original is kept, for
        fingerprints); None stays None."""
        if dataset is None or dataset_device(dataset) == self.device:
            return dataset
        placed = copy.copy(dataset)
        for name, tensor in dataset_tensors(dataset).items():
            setattr(placed, name, tensor.to(self.device))
        return placed


def dataset_bytes(*datasets) -> int:
    return sum(t.nbytes for ds in datasets if ds is not None for t in dataset_tensors(ds).values())


def choose_placement(datasets: list, device: torch.device, num_workers: int, policy: str = "auto") -> DataPlacement:
    """``policy``: auto (on the GPU when the data fits, see DEVICE_DATA_FRACTION), device or host.

    Only CUDA devices get either GPU path; anything else keeps the plain host loaders."""
    host = torch.device("cpu")
    if device.type != "cuda":
        return DataPlacement(host, False, "data on the host")
    if policy == "device" and num_workers:
        raise ToyaccelError(
            "--data-placement device needs --num-workers 0: DataLoader worker processes cannot index CUDA tensors"
        )
    if device.index is None:  # accelerate's single-GPU device is plain "cuda"; tensors report cuda:N
        device = torch.device("cuda", torch.cuda.current_device())
    nbytes = dataset_bytes(*datasets)
    if policy == "device" or (policy == "auto" and not num_workers and fits_on_device(nbytes, device)):
        return DataPlacement(device, False, f"data on {device} ({nbytes / 2**20:.1f} MiB)")
    return DataPlacement(host, True, f"data on the host ({nbytes / 2**20:.1f} MiB), pinned, non-blocking copies")


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_DATA_FRACTION * free


def tf32_supported(device: torch.device) -> bool:
    """TF32 tensor cores exist from Ampere (compute capability 8.0) on."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def apply_tf32(wanted: bool, device: torch.device) -> bool:
    """Let cuBLAS use TF32 for float32 matmuls when ``wanted`` and the GPU has it; return whether it is on.

    Set after the Accelerator is built: accelerate turns TF32 on by itself for fp32 runs with a dynamo
    backend (--compile), and --no-tf32 must win over that. CPU runs touch no flag.
    """
    if device.type != "cuda":
        return False
    enabled = wanted and tf32_supported(device)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    return enabled


def gpu_description(device: torch.device, tf32: bool, placement: DataPlacement, backend: str | None = None) -> str:
    """What the start-up line adds on a GPU (nothing on CPU): TF32, where the data lives, and the
    process group's backend (nccl) when there is more than one process."""
    if device.type != "cuda":
        return ""
    tf32_state = "on" if tf32 else "off" if tf32_supported(device) else "n/a (GPU older than Ampere)"
    return f", tf32 {tf32_state}, {placement.description}" + (f", backend {backend}" if backend else "")


def dense_bf16_peak(device: torch.device) -> float | None:
    """FLOP/s of ``device``'s dense bf16 peak where it is a GPU of DENSE_BF16_TFLOPS, else None."""
    return peak_of_gpu(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_of_gpu(name: str) -> float | None:
    """FLOP/s of the dense bf16 peak of the GPU called ``name`` (as CUDA names it), None where it is unknown."""
    return next((tflops * 1e12 for gpu, tflops in DENSE_BF16_TFLOPS.items() if gpu in name), None)


def utilization(samples_per_s: float, sample_flops: float | None, peak_flops: float | None) -> dict[str, float]:
    """``{"mfu": ...}``, the model FLOPs done over the peak, where both are known; empty otherwise (a CPU, an
    unknown GPU, a workload that does not count its FLOPs): nothing is claimed."""
    if not (sample_flops and peak_flops):
        return {}
    return {"mfu": samples_per_s * sample_flops / peak_flops}


def world_bf16_peak(accelerator) -> float | None:
    """The dense bf16 peak of all the run's processes together (one GPU each, all alike), or None: what a
    global throughput's MFU is taken against."""
    peak = dense_bf16_peak(accelerator.device)
    return peak * accelerator.num_processes if peak else None
