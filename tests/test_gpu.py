"""Every guarantee, on a GPU: the book's numbers, exact resume, mixed precision, compile, the data path,
CPU <-> GPU portability of runs and checkpoints, FSDP, and the launch configs the README recommends.

Each test skips cleanly without CUDA (or with fewer GPUs than it needs), so CPU-only CI runs none of
them; scripts/gpu_check.sh runs this file on a bare GPU machine. Runs whose launcher is not what is
tested go in-process through ``toyaccel.fit`` (seconds each); the others are real launches.

Exactness checks pass --no-tf32: TF32 rounds matmul inputs to 10 bits, which moves the book's second
loss (0.64503) across the rounding edge to 0.64.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import (
    BOOK_LOSSES,
    accelerate_launch,
    accelerate_test_cmd,
    assert_weights_close,
    assert_weights_equal,
    check_ok,
    read_json,
    read_jsonl,
    run_concurrently,
    run_python,
    step_losses,
    weights,
)

from toyaccel import fit, load_model
from toyaccel.cli import train_main
from toyaccel.engine.checkpoint import checkpoint_dirs

pytestmark = pytest.mark.slow  # launches, and training on a GPU
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
needs_2_gpus = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")
# torch.compile's GPU backend (inductor, Triton) builds its kernel launchers with the machine's C compiler.
needs_c_compiler = pytest.mark.skipif(
    not any(shutil.which(cc) for cc in (os.environ.get("CC", "cc"), "gcc")), reason="torch.compile needs a C compiler"
)

# The book's NeuralNetwork(2, 2): Linear(2, 30), ReLU, Linear(30, 20), ReLU, Linear(20, 2).
BOOK_SHAPES = {
    "layers.0.weight": (30, 2), "layers.0.bias": (30,),
    "layers.2.weight": (20, 30), "layers.2.bias": (20,),
    "layers.4.weight": (2, 20), "layers.4.bias": (2,),
}  # fmt: skip

# GPU kernels, NCCL and the CPU sum in different orders: not bit-equal, but far closer than this.
GPU_ATOL = 1e-5
# Tens of SGD steps (lr 0.5) taken partly or wholly on the CPU against the GPU's: rounding differences
# grow a little, while another data order would move the weights by far more.
CPU_GPU_ATOL = 1e-4
# Every logged loss of the book's run under mixed precision, against fp32's (bf16 keeps 8 bits of
# mantissa, fp16 11; the CPU bf16 check uses the same 0.01).
LOSS_TOLERANCE = {"bf16": 0.01, "fp16": 0.005}
SYNTHETIC = ("--data", "synthetic", "--num-samples", "64", "--no-plot")
# The crash/resume run: 64 samples, batch 4, 2 epochs = 32 steps, checkpoints every 3 steps.
RESUME_RUN = ("--data", "synthetic", "--num-samples", "64", "--batch-size", "4", "--epochs", "2")
RESUME_RUN += ("--checkpoint-every", "3", "--log-every", "2", "--no-tf32", "--no-plot", "--no-progress")
KILL_AT = "step:10"  # mid-epoch, one step after checkpoint 9
HIDE_GPUS = {"CUDA_VISIBLE_DEVICES": ""}  # what a CPU-only machine looks like to torch


def fit_here(out: Path, **options):
    """One process on the GPU, in this interpreter."""
    return fit(output_dir=str(out), plot=False, progress=False, **options)


def logged_losses(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"]


def cuda_rng_state(checkpoint: Path) -> list[torch.Tensor]:
    """The CUDA generator states accelerate saved with a checkpoint (our own file holds the CPU one)."""
    states = torch.load(checkpoint / "random_states_0.pkl", weights_only=False)
    return [torch.as_tensor(s) for s in states["torch_cuda_manual_seed"]]


@pytest.fixture(scope="module")
def fp32_book(tmp_path_factory) -> Path:
    """The book's run on the GPU in exact fp32, the reference of the mixed-precision and compile checks."""
    out = tmp_path_factory.mktemp("fp32") / "run"
    fit_here(out, tf32=False)
    return out


# ---------------------------------------------------------------------------------------------
# The book's run, TF32, and the data path


@needs_gpu
def test_single_gpu_reproduces_the_book(tmp_path):
    out = tmp_path / "run"
    proc = check_ok(accelerate_launch("single_gpu.yaml", "--no-tf32", "--output-dir", str(out)))
    assert "device cuda" in proc.stdout and "tf32 off" in proc.stdout  # toyaccel's start-up line
    assert "data on cuda:0" in proc.stdout  # the toy set lives on the GPU
    assert [round(loss, 2) for loss in step_losses(out)] == BOOK_LOSSES
    results = read_json(out / "results.json")
    assert (results["train_accuracy"], results["val_accuracy"], results["world_size"]) == (1.0, 1.0, 1)


@needs_gpu
def test_tf32_is_on_by_default_where_the_gpu_has_it(fp32_book, tmp_path, capsys):
    fit_here(tmp_path / "run")
    ampere = torch.cuda.get_device_capability(0)[0] >= 8
    assert ("tf32 on" if ampere else "tf32 n/a") in capsys.readouterr().out
    results = read_json(tmp_path / "run" / "results.json")
    assert (results["train_accuracy"], results["val_accuracy"]) == (1.0, 1.0)
    for (_, got), (_, exact) in zip(logged_losses(tmp_path / "run"), logged_losses(fp32_book), strict=True):
        assert abs(got - exact) < 0.01


@needs_gpu
def test_data_on_the_gpu_pinned_on_the_host_and_on_cpu_train_alike(tmp_path, capsys, monkeypatch):
    """Where the data lives changes no number: the epoch order is drawn on the CPU in every case."""
    options = dict(data="synthetic", num_samples=512, num_features=8, batch_size=16, epochs=2, val_fraction=0.25)
    fit_here(tmp_path / "device", data_placement="device", tf32=False, **options)
    assert "data on cuda:0" in capsys.readouterr().out
    fit_here(tmp_path / "host", data_placement="host", tf32=False, **options)
    assert "pinned, non-blocking copies" in capsys.readouterr().out
    assert_weights_equal(weights(tmp_path / "host"), weights(tmp_path / "device"))
    assert logged_losses(tmp_path / "host") == logged_losses(tmp_path / "device")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    fit_here(tmp_path / "cpu", **options)
    assert_weights_close(weights(tmp_path / "cpu"), weights(tmp_path / "device"), atol=CPU_GPU_ATOL)


@needs_gpu
def test_data_on_the_device_with_worker_processes_is_refused(tmp_path, capsys):
    argv = ["--data-placement", "device", "--num-workers", "2", "--output-dir", str(tmp_path / "run")]
    assert train_main(argv) == 2
    assert "--data-placement device needs --num-workers 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@needs_gpu
@pytest.mark.parametrize(("placement", "precision"), [("device", "no"), ("host", "no"), ("device", "bf16"),
                                                      ("device", "fp16")])  # fmt: skip
def test_training_steps_never_wait_for_the_host(tmp_path, placement, precision):
    """torch's sync debug mode reports every host synchronisation: over an epoch of 256 steps, only
    the log lines may read the loss back (and, under fp16, the GradScaler its inf flag each step)."""
    from test_benchmark import load_benchmark

    bench = load_benchmark()
    features, labels = bench.dataset(8192)
    with bench.device_accelerator("cuda", str(tmp_path), precision) as accelerator:
        loop = bench.ToyaccelLoop(features, labels, (30, 20), 32, accelerator, str(tmp_path / "loop"), placement)
        try:
            loop.epoch()  # warm-up: lazy initialisations synchronise once
            syncs, steps = bench.host_syncs_per_epoch(loop)
        finally:
            loop.close()
    assert steps == 256
    # 11 log lines and the epoch's order once, a few to spare; a sync per step would be 256 more.
    allowed = (steps if precision == "fp16" else 0) + 16
    assert syncs <= allowed, f"{syncs} host synchronisations in {steps} steps"


# ---------------------------------------------------------------------------------------------
# Exact resume, and GPU checkpoints on a CPU


@pytest.fixture(scope="module")
def gpu_reference(tmp_path_factory) -> Path:
    """The crash/resume run uninterrupted, every checkpoint kept."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train_main([*RESUME_RUN, "--keep-last", "0", "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def gpu_killed(tmp_path_factory) -> Path:
    """The same run SIGKILLed right after step 10, on the GPU."""
    out = tmp_path_factory.mktemp("killed") / "run"
    proc = run_python("scripts/train.py", *RESUME_RUN, "--output-dir", str(out), env={"TOYACCEL_FAULT": KILL_AT})
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert [p.name for p in checkpoint_dirs(out)][0] == "step_9"
    return out


@needs_gpu
def test_resume_after_sigkill_is_bit_exact_on_gpu(gpu_reference, gpu_killed, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(gpu_killed, out)
    assert train_main([*RESUME_RUN, "--resume", "latest", "--output-dir", str(out)]) == 0
    assert_weights_equal(weights(out), weights(gpu_reference))
    assert logged_losses(out) == logged_losses(gpu_reference)
    # The CUDA generators were restored and moved on as in the uninterrupted run (dropout draws from them).
    last = checkpoint_dirs(gpu_reference)[0].name
    expected = cuda_rng_state(gpu_reference / "checkpoints" / last)
    for got, want in zip(cuda_rng_state(out / "checkpoints" / last), expected, strict=True):
        assert torch.equal(got, want)


# The GPT with dropout: each step's masks come from the CUDA generator, seeded by own_random_stream from
# (seed, process, step). A vocabulary of 300 is padded to 320 inside the model, so the padded rows are
# trained and checkpointed too. 1080 training characters: 30 steps of 6 windows of 16 over 2 epochs.
GPT_RUN = ("--model", "gpt", "--data", "synthetic", "--num-samples", "1200", "--vocab-size", "300")
GPT_RUN += ("--context-length", "16", "--emb-dim", "16", "--n-heads", "2", "--n-layers", "1", "--drop-rate", "0.2")
GPT_RUN += ("--batch-size", "6", "--epochs", "2", "--checkpoint-every", "3", "--log-every", "1", "--lr", "0.003")
GPT_RUN += ("--no-tf32", "--no-plot", "--no-progress")


@needs_gpu
def test_gpt_with_dropout_resumes_bit_exact_on_gpu(tmp_path):
    """SIGKILLed after step 14 and resumed: the uninterrupted run's weights and every logged loss, through
    dropout on the GPU, scaled_dot_product_attention and fused AdamW."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert train_main([*GPT_RUN, "--output-dir", str(reference)]) == 0
    proc = run_python("scripts/train.py", *GPT_RUN, "--output-dir", str(run), env={"TOYACCEL_FAULT": "step:14"})
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "device cuda" in proc.stdout
    assert train_main([*GPT_RUN, "--resume", "latest", "--output-dir", str(run)]) == 0
    assert logged_losses(run) == logged_losses(reference)
    assert_weights_equal(weights(run), weights(reference))


@needs_gpu
def test_gpt_reports_its_mfu_on_a_known_gpu(tmp_path, capsys):
    """Step lines, metrics.jsonl and results.json carry the MFU beside tokens/s, a fraction of the peak."""
    from toyaccel.engine.placement import dense_bf16_peak

    if dense_bf16_peak(torch.device("cuda")) is None:
        pytest.skip(f"{torch.cuda.get_device_name()} is not in the table of known peaks: no MFU is claimed")
    run = tmp_path / "run"
    assert train_main([*GPT_RUN, "--epochs", "1", "--output-dir", str(run)]) == 0
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"]
    assert steps and all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in steps)
    assert 0 < read_json(run / "results.json")["mfu"] < 1
    assert re.search(r"tokens/s \| mfu \d+\.\d%", capsys.readouterr().out)


@needs_gpu
def test_gpu_checkpoint_resumes_on_a_cpu_machine(gpu_reference, gpu_killed, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(gpu_killed, out)
    proc = check_ok(
        run_python("scripts/train.py", *RESUME_RUN, "--resume", "latest", "--output-dir", str(out), env=HIDE_GPUS)
    )
    assert "device cpu" in proc.stdout and "resumed from" in proc.stdout
    assert_weights_close(weights(out), weights(gpu_reference), atol=CPU_GPU_ATOL)


# ---------------------------------------------------------------------------------------------
# Mixed precision and compile


@needs_gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_stays_within_tolerance_of_fp32(fp32_book, tmp_path, precision):
    out = tmp_path / "run"
    fit_here(out, mixed_precision=precision, tf32=False)
    results = read_json(out / "results.json")
    assert (results["train_accuracy"], results["val_accuracy"]) == (1.0, 1.0)
    for (_, got), (_, exact) in zip(logged_losses(out), logged_losses(fp32_book), strict=True):
        assert abs(got - exact) <= LOSS_TOLERANCE[precision]
    if precision == "fp16":  # the gradient scaler stepped the optimizer, and its state is checkpointed
        assert (checkpoint_dirs(out)[0] / "scaler.pt").is_file()


@needs_gpu
@needs_c_compiler
def test_compile_equals_eager_on_gpu(fp32_book, tmp_path):
    out = tmp_path / "run"
    fit_here(out, compile=True, tf32=False)
    for (_, got), (_, exact) in zip(logged_losses(out), logged_losses(fp32_book), strict=True):
        assert abs(got - exact) < 1e-5
    assert_weights_close(weights(out), weights(fp32_book), atol=GPU_ATOL)  # plain keys, no _orig_mod.


# ---------------------------------------------------------------------------------------------
# Runs move between GPU and CPU


@needs_gpu
def test_gpu_run_evaluates_and_predicts_on_cpu_and_back(tmp_path, monkeypatch):
    from toyaccel.inference import evaluate_run, predict_file

    options = dict(data="synthetic", num_samples=256, val_fraction=0.25, tf32=False)
    gpu_run = fit_here(tmp_path / "gpu", **options)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    cpu_run = fit_here(tmp_path / "cpu", **options)
    on_cpu = evaluate_run(tmp_path / "gpu")  # still ACCELERATE_USE_CPU
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    on_gpu = evaluate_run(tmp_path / "cpu")
    for run, metrics in ((gpu_run, on_cpu), (cpu_run, on_gpu)):
        assert metrics["accuracy"] == run.val_accuracy
        assert metrics["loss"] == pytest.approx(run.val_loss, rel=1e-5)
    # Prediction runs on the CPU; the GPU-trained model gives the same probabilities on the GPU.
    predict_file(tmp_path / "gpu", "toy", tmp_path / "predictions.csv")
    rows = [line.split(",") for line in (tmp_path / "predictions.csv").read_text().splitlines()[1:]]
    on_cpu_probabilities = torch.tensor([[float(p) for p in row[1:]] for row in rows], dtype=torch.float64)
    model = load_model(tmp_path / "gpu").cuda()
    with torch.no_grad():
        on_gpu_probabilities = torch.softmax(model(torch.tensor([[-0.8, 2.8], [2.6, -1.6]]).cuda()).double(), 1)
    assert torch.allclose(on_gpu_probabilities.cpu(), on_cpu_probabilities, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# FSDP


@needs_gpu
@pytest.mark.parametrize("state_dict_type", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_fsdp_saves_resumes_and_writes_the_full_weights(tmp_path, state_dict_type):
    # fsdp.yaml asks for 2 GPUs; on a 1-GPU machine FSDP still runs (and saves) with one process.
    processes = min(GPUS, 2)
    run_args = (*SYNTHETIC, "--epochs", "2", "--checkpoint-every", "5", "--keep-last", "0", "--no-tf32")
    launch_args = ("--fsdp_state_dict_type", state_dict_type)
    out = tmp_path / "run"
    check_ok(accelerate_launch("fsdp.yaml", *run_args, "--output-dir", str(out), num_processes=processes,
                               launch_args=launch_args))  # fmt: skip
    results = read_json(out / "results.json")
    assert (results["distributed_type"], results["world_size"]) == ("FSDP", processes)
    checkpoint = out / "checkpoints" / "step_20"
    sharded = [p.name for p in checkpoint.iterdir() if p.is_dir()]  # distributed-checkpoint folders
    assert bool(sharded) == (state_dict_type == "SHARDED_STATE_DICT"), sharded
    saved = weights(out)
    assert {k: tuple(v.shape) for k, v in saved.items()} == BOOK_SHAPES
    load_model(out)
    # Resume from a mid-run checkpoint: the same weights as the uninterrupted run, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    check_ok(accelerate_launch("fsdp.yaml", *run_args, "--output-dir", str(resumed), "--resume",
                               str(resumed / "checkpoints" / "step_20"), num_processes=processes,
                               launch_args=launch_args))  # fmt: skip
    assert_weights_equal(weights(resumed), saved)
    if state_dict_type == "FULL_STATE_DICT":
        # Sharding changes where the numbers live, not what they are: the same run on one GPU, unsharded.
        reference = tmp_path / "reference"
        fit_here(reference, data="synthetic", num_samples=64, epochs=2, batch_size=2 * processes, tf32=False)
        assert_weights_close(saved, weights(reference), atol=GPU_ATOL)


# ---------------------------------------------------------------------------------------------
# The launch configs, and several GPUs


@pytest.mark.parametrize(
    "config, distributed_type, gpus",
    [
        pytest.param("single_gpu.yaml", "NO", 1, marks=needs_gpu),
        pytest.param("multi_gpu.yaml", "MULTI_GPU", 2, marks=needs_2_gpus),
        pytest.param("fsdp.yaml", "FSDP", 2, marks=needs_2_gpus),
    ],
)
def test_accelerate_test_passes_for_every_gpu_config(config, distributed_type, gpus, tmp_path):
    """Accelerate's own check, exactly as printed; the world each process saw is checked too, since N
    independent copies would pass as well (multi_node.yaml needs two machines: not run here)."""
    proc = check_ok(run_concurrently({config: (accelerate_test_cmd(config), {})}, tmp_path)[config])
    assert "Test is a success" in proc.stdout
    # Python 3.11 prints the enum as DistributedType.NO, earlier Pythons as NO.
    worlds = re.findall(r"Distributed environment: (?:DistributedType\.)?(\w+)", proc.stdout)
    assert worlds == [distributed_type] * gpus
    assert proc.stdout.count("Num processes: ") == proc.stdout.count(f"Num processes: {gpus}\n") == gpus


@needs_2_gpus
def test_two_gpus_equal_one_gpu_with_double_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    check_ok(
        accelerate_launch("single_gpu.yaml", *SYNTHETIC, "--batch-size", "4", "--no-tf32", "--output-dir", str(one))
    )
    proc = check_ok(
        accelerate_launch("multi_gpu.yaml", *SYNTHETIC, "--batch-size", "2", "--no-tf32", "--output-dir", str(two))
    )
    assert "backend nccl" in proc.stdout
    results = read_json(two / "results.json")
    assert (results["world_size"], results["distributed_type"], results["global_batch"]) == (2, "MULTI_GPU", 4)
    assert_weights_close(weights(two), weights(one), atol=GPU_ATOL)
