"""The engine's data path, for any dataset with ``__len__`` and ``__getitems__``: the world-size-independent
epoch sampler, this process's training batches, and each process's share of an evaluation set."""

from __future__ import annotations

import functools
import itertools
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader

from toyaccel.engine.orphans import die_with_parent
from toyaccel.engine.placement import dataset_device
from toyaccel.errors import ToyaccelError

# Backends whose training loaders accelerate itself must wrap: they keep a DataLoader. accelerate's
# DistributedType is a str enum: its names compare equal to these, and predict need not import accelerate.
LOADER_BACKENDS = ("XLA", "DEEPSPEED", "MEGATRON_LM")


def keep_batch(batch):
    """``__getitems__`` already returns a collated (features, labels) batch."""
    return batch



def draw_epoch_seed() -> int:
    """One epoch's shuffle seed, drawn from the global RNG as the book's DataLoader does.

    A DataLoader draws its ``_base_seed`` and then ``RandomSampler`` draws the shuffle seed, both from
    the global RNG, when an epoch's iteration starts. We draw the same two numbers at the same moment
    and keep the second, so the default run reproduces the book's numbers exactly, while our loaders
    use private generators and evaluation between epochs cannot shift the stream.
    """
    torch.empty((), dtype=torch.int64).random_()
    return int(torch.empty((), dtype=torch.int64).random_().item())


@functools.cache
def _shuffler() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="toyaccel-shuffle")


class EpochBatchSampler:
    """Shuffled batches of one process's size, in an order that does not depend on the world size.

    Each epoch is one permutation of all samples (seeded by ``start_epoch``'s seed) cut into batches of
    ``batch_size``. Accelerate's BatchSamplerShard hands batch i to process i % N, so with N processes
    one optimizer step consumes N * batch_size * grad_accum consecutive samples of the permutation:
    exactly what one process with that whole global batch would see. We drop the incomplete global
    batch at the end (the book's drop_last) so no process ever repeats a sample. ``start`` skips the
    samples of a resumed epoch that were already trained on.
    """

    drop_last = True  # read by accelerate: never pad training batches with repeated samples

    def __init__(self, num_samples: int, batch_size: int, global_batch: int, device: torch.device | str = "cpu"):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.global_batch = global_batch
        self.device = torch.device(device)  # where the data is: batches are index tensors there
        self.epoch_seed: int | None = None
        self.start = 0
        self.next_epoch_seed: int | None = None
        self._shuffled: dict[int, Future] = {}  # epoch seed -> its order, being shuffled in the background

    # Not named set_epoch: accelerate calls a sampler's set_epoch(iteration) on its own.
    def start_epoch(self, epoch_seed: int, start: int = 0, next_epoch_seed: int | None = None) -> None:
        """Start an epoch; with ``next_epoch_seed``, the next epoch's order is shuffled in the background
        while this one trains."""
        self.epoch_seed, self.start, self.next_epoch_seed = epoch_seed, start, next_epoch_seed

    def _shuffle(self, seed: int) -> torch.Tensor:
        # Drawn on the CPU whatever the device, so the order is the same everywhere; pinned for a GPU,
        # so that its one copy per epoch does not block the host.
        # int32 halves the order of a large corpus (8 -> 4 bytes a window); randperm draws the same
        # permutation whatever its dtype.
        dtype = torch.int32 if self.num_samples < 2**31 else torch.int64
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        return order.pin_memory() if self.device.type == "cuda" else order

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in a whole epoch, over all processes."""
        return self.num_samples // self.global_batch

    def steps_in_epoch(self) -> int:
        return (self.num_samples - self.start) // self.global_batch

    def __len__(self) -> int:
        return self.steps_in_epoch() * (self.global_batch // self.batch_size)

    def __iter__(self):
        # A generator: nothing runs until the first batch is asked for. A DataLoader with workers calls
        # iter() once before forking them (and again after); the shuffle thread must not be busy then.
        if self.epoch_seed is None:
            raise RuntimeError("start_epoch() must be called before iterating")
        shuffled = self._shuffled.pop(self.epoch_seed, None)
        order = shuffled.result() if shuffled else self._shuffle(self.epoch_seed)
        order = order.to(self.device, non_blocking=True)  # one copy an epoch: no step waits for its indices
        # Submitted only now: a DataLoader with workers has forked them by the time it asks for a batch,
        # and the shuffle is done long before the next epoch's workers are forked.
        # A large corpus's next order is not made ahead: two orders at once would double the memory that
        # grows with the corpus, and one shuffle an epoch is nothing beside an epoch of millions of windows.
        ahead = self.next_epoch_seed is not None and self.num_samples <= SHUFFLE_AHEAD_MAX
        if ahead and self.next_epoch_seed not in self._shuffled:
            self._shuffled[self.next_epoch_seed] = _shuffler().submit(self._shuffle, self.next_epoch_seed)
        end = self.start + self.steps_in_epoch() * self.global_batch
        block = SPLIT_BATCHES * self.batch_size
        for low in range(self.start, end, block):
            yield from order[low : min(end, low + block)].split(self.batch_size)


def data_loader(dataset, batch_sampler, config, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``dataset`` in ``batch_sampler``'s batches, with --num-workers worker processes."""
    # A private generator: the DataLoader draws a base seed per iteration and must not take it from
    # the global RNG, which decides the model init and the epoch order (see draw_epoch_seed).
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=keep_batch,
        num_workers=config.num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(config.seed),
        worker_init_fn=functools.partial(die_with_parent, os.getpid()) if config.num_workers else None,
    )


GATHER_BATCHES = 32
# Orders of at most this many samples (16 MB in int32) are shuffled in the background during the epoch before.
SHUFFLE_AHEAD_MAX = 2**22
# The epoch's batches are cut from its order this many at a time: split's views cost ~500 bytes each, and
# an epoch over a corpus of billions of tokens has millions of batches.
SPLIT_BATCHES = 1024


class TensorBatches:
    """This process's training batches straight from the tensors: what accelerate's prepared DataLoader
    yields here (batch i of the sampler to process i % N, as its BatchSamplerShard deals them out, moved to
    the device), without the DataLoader's per-batch machinery (profiler records, collation, nested device
    transfer): ~25 us a batch, a tenth of the book MLP's step at batch 256. ``accelerator.prepare``
    passes it through unchanged."""

    def __init__(self, dataset, batch_sampler: EpochBatchSampler, accelerator, pin_memory: bool = False):
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.process_index, self.num_processes = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        self.pin_memory = pin_memory  # host rows for a GPU: pinned, so the copy does not block the CPU

    def __len__(self) -> int:
        return len(self.batch_sampler) // self.num_processes

    def __iter__(self):
        mine = itertools.islice(self.batch_sampler, self.process_index, None, self.num_processes)
        # One gather for a run of batches, then views: index_select's fixed cost is paid once per
        # GATHER_BATCHES batches instead of per batch (~16 us of ~19 a batch), at the price of a copy of
        # that many batches' rows.
        while chunk := list(itertools.islice(mine, GATHER_BATCHES)):
            rows = self.dataset.__getitems__(torch.cat(chunk))
            if self.pin_memory:
                rows = tuple(t.pin_memory() for t in rows)
            features, labels = to_device(rows, self.device)
            sizes = [len(indices) for indices in chunk]
            # split makes all the views in one call: slicing costs ~2 us a view in Python.
            yield from zip(features.split(sizes), labels.split(sizes))


def to_device(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) on ``device``; a no-op for tensors already there."""
    features, labels = batch
    return features.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def build_train_loader(dataset, config, accelerator, pin_memory: bool = False) -> DataLoader | TensorBatches:
    """This process's training batches for ``accelerator``'s world: batches straight from the tensors, or a
    DataLoader where there are worker processes or the backend's loaders must be accelerate's own."""
    world_size = accelerator.num_processes
    global_batch = world_size * config.batch_size * config.grad_accum
    if len(dataset) < global_batch:
        raise ToyaccelError(
            f"the training set has {len(dataset)} samples but one optimizer step needs {global_batch} "
            f"({world_size} process{'es' if world_size > 1 else ''} x batch size {config.batch_size} "
            f"x grad_accum {config.grad_accum}): "
            "zero training batches; lower --batch-size or --grad-accum, or use fewer processes"
        )
    # The sampler's indices live where the data does (on a GPU when it fits there: toyaccel.engine.placement).
    sampler = EpochBatchSampler(len(dataset), config.batch_size, global_batch, dataset_device(dataset))
    if config.num_workers or accelerator.distributed_type in LOADER_BACKENDS:
        return data_loader(dataset, sampler, config, pin_memory)
    return TensorBatches(dataset, sampler, accelerator, pin_memory)


def eval_batches(dataset, batch_size: int, device: torch.device, process_index: int = 0,
                 num_processes: int = 1):  # fmt: skip
    """This process's share of an evaluation set, in batches that are views of the tensors (no sampler, no
    per-batch indexing or collation). Each process takes a contiguous block of rows, so every row is
    scored exactly once and metrics are one sum over processes: no padded rows to trim, no gather per
    batch. Every process yields the same number of batches (its last ones may be empty): a sharded
    model (FSDP) needs every process in each forward."""
    for low, high in eval_shares(len(dataset), batch_size, process_index, num_processes):
        yield to_device((dataset.features[low:high], dataset.labels[low:high]), device)


def eval_shares(num_samples: int, batch_size: int, process_index: int = 0, num_processes: int = 1):
    """The (start, end) rows of this process's evaluation batches (see eval_batches)."""
    n = num_samples
    start, end = n * process_index // num_processes, n * (process_index + 1) // num_processes
    rounds = math.ceil(math.ceil(n / num_processes) / batch_size)
    for r in range(rounds):
        low = min(end, start + r * batch_size)
        yield low, min(end, low + batch_size)
