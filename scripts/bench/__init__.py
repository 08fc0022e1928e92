"""Training throughput of toyaccel against the book's loop and the bare-loop ceiling, in one run.

    python scripts/benchmark.py                          # everything: ~5 minutes on 2 cores
    python scripts/benchmark.py --parts ddp              # only the 1-vs-2-process rows
    python scripts/benchmark.py --quick --output b.json  # smoke run (the test suite runs it in-process)

On the same synthetic data (64k samples x 32 features x 4 classes) it times one epoch of:
  book      the book's loop: per-sample Dataset.__getitem__, default DataLoader(shuffle=True), plain PyTorch;
  toyaccel  toyaccel's own loop under Accelerate (toyaccel.engine.Trainer.train_epoch on what Trainer.prepare,
            train()'s own set-up, prepares);
  ceiling   the same model and SGD over pre-sliced batch tensors: no loader, no Accelerate;
for the book's MLP (hidden 30,20) and a large MLP (2048,2048; its epoch is the first 8k rows) whose
matrix products dominate, at batch sizes 32, 256, 1024. Every figure is the median samples/s of
several repeats after a warm-up epoch. The loops of one group take turns, so a busy neighbour slows
them all alike; CPU-time figures (in the JSON, and in brackets under "targets") leave out the time other
processes held the core. The large MLP also gets GFLOP/s against a square fp32 matrix product timed
between the same repeats, and 1 vs 2 processes (DDP over gloo, accelerate_configs/multi_cpu.yaml; the
launches alternate). Single-process CPU rows use one thread, like each DDP worker. With a GPU, the same
rows on it (and DDP with multi_gpu.yaml on 2+ GPUs), except that the large MLP runs under bf16
autocast at larger batches against a bf16 matrix product, and that the book MLP at batch 256 also
gets per-step host synchronisations, copies to the GPU and GPU-busy time. Beside the loops, `epoch` is
what a user pays for one epoch of toyaccel.fit: the same loop plus its epoch-end evaluation (a
validation set a quarter the size of the training set, and the training-set sample) and checkpoint.
The CSV reader (`--parts reader`) reads a 200k x 32 file with toyaccel's reader and with
numpy.loadtxt, taking turns, each also once in a fresh process for its peak memory. Last, the time
from starting `python scripts/train.py` (fresh output dir) to its first training step's log line.

The parts live in this package: common (what they share, and the one block that imports toyaccel),
loops, gpt, ddp, reader, startup, report (ratios and tables) and cli (options, the order of the parts).
"""
