"""scripts/slurm/train.sbatch on a real Slurm: a controller and a node on this host.

Needs Debian's `slurmd slurmctld slurm-client munge` (.ci/run installs them); skips without them.
The fixture starts `munged` (fresh key), `slurmctld` and `slurmd` from a generated slurm.conf, with
state, spool, sockets and logs in a temporary folder, and stops them afterwards. A job of 2 tasks on
the one node stands for 2 machines: each task is its own `accelerate launch` (machine rank 0 and 1).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import (
    BOOK_LOSSES,
    REPO,
    assert_weights_close,
    assert_weights_equal,
    free_port,
    logged,
    read_json,
    step_losses,
    subprocess_env,
    weights,
)

from toyaccel.engine.resume import verify_checkpoint

COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def why_no_slurm() -> str | None:
    missing = [name for name in COMMANDS if shutil.which(name) is None]
    if missing:
        return f"no Slurm here ({', '.join(missing)} not found; .ci/run installs it)"
    if os.geteuid() != 0:
        return "a Slurm node needs root (slurmd starts each job as its user)"
    try:
        socket.gethostbyname(socket.gethostname())
    except OSError:
        return f"this host's name ({socket.gethostname()}) does not resolve; Slurm and the jobs need it to"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(why_no_slurm() is not None, reason=str(why_no_slurm()))]

SBATCH_SCRIPT = REPO / "scripts" / "slurm" / "train.sbatch"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT = 300  # seconds; generous: the jobs share 2 cores with whatever else runs


def slurm_conf(root: Path, host: str, user: str, munge_socket: Path) -> str:
    return f"""\
ClusterName=toyaccel-test
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again after this many seconds (default 120)
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
# No cgroups in a container: processes are tracked through their parents, tasks are not bound
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
SchedulerType=sched/builtin
# Look at pending jobs every second, so a requeued job starts as soon as it may
SchedulerParameters=sched_interval=1
ReturnToService=2
KillWait=30
NodeName={host} CPUs=2 State=UNKNOWN
# Up to 8 jobs that ask for it (sbatch --oversubscribe) may share a CPU
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES:8
"""


class Slurm:
    """A running single-host Slurm: client commands and jobs of scripts/slurm/train.sbatch."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []
        self._daemon_logs: list = []
        # munged wants every folder above its socket open to all, which pytest's tmp folders are not.
        self.munge = Path(tempfile.mkdtemp(prefix="toyaccel-munge-"))
        self.munge.chmod(0o755)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        # No GPU for these jobs even where there is one: the CPU runs are what is compared.
        return subprocess_env({"SLURM_CONF": str(self.conf), "CUDA_VISIBLE_DEVICES": "", **(extra or {})})

    def command(self, *args: str) -> str:
        proc = subprocess.run(args, env=self.env(), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{' '.join(args)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    def start(self) -> None:
        munge = self.munge
        key = munge / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        socket_path = munge / "munge.socket"
        (self.root / "plugstack.conf").write_text("")
        self.conf.write_text(slurm_conf(self.root, socket.gethostname(), getpass.getuser(), socket_path))
        self._spawn(
            "munged", "--foreground", f"--key-file={key}", f"--socket={socket_path}",
            f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log", f"--seed-file={munge}/seed",
        )  # fmt: skip
        self._wait_for(lambda: socket_path.exists(), "munged to open its socket")
        self._spawn("slurmctld", "-D", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-f", str(self.conf))
        self._wait_for(lambda: self._node_state() == "idle", "the node to come up idle")

    def _spawn(self, *cmd: str) -> None:
        log = open(self.root / f"{cmd[0]}.out", "w")  # noqa: SIM115 (closed with the daemon, in stop)
        self._daemon_logs.append(log)
        self.daemons.append(subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT))

    def _node_state(self) -> str:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env(), capture_output=True, text=True, timeout=10)
        return proc.stdout.strip()

    def _wait_for(self, condition, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for daemon in self.daemons:
                assert daemon.poll() is None, f"{daemon.args[0]} exited {daemon.returncode}: {self.logs()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.logs()}"
            time.sleep(0.2)

    def logs(self) -> str:
        logs = [*sorted(self.root.glob("*.log")), *sorted(self.root.glob("*.out")), self.munge / "munged.log"]
        return "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())

    def stop(self) -> None:
        """Cancel what is left, let the jobs' processes end, then stop the daemons (newest first)."""
        if self.daemons and all(d.poll() is None for d in self.daemons):
            jobs = self.command("squeue", "-h", "-o", "%i").split()
            if jobs:
                subprocess.run(["scancel", *jobs], env=self.env(), timeout=30)
                self._wait_for(lambda: not self.command("squeue", "-h", "-o", "%i").strip(), "jobs to end", 60)
        for daemon in reversed(self.daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        for log in self._daemon_logs:
            log.close()
        shutil.rmtree(self.munge, ignore_errors=True)

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this cluster's jobs still alive (each job's environment names our slurm.conf)."""
        return processes_with("SLURM_CONF", str(self.conf))

    # --- jobs ---------------------------------------------------------------------------------

    def submit(self, submit_dir: Path, *train_args: str, sbatch_args: tuple[str, ...] = (), env=None) -> str:
        """`sbatch [sbatch_args] scripts/slurm/train.sbatch [train_args]` from ``submit_dir``; the job id."""
        submit_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["sbatch", "--parsable", *sbatch_args, str(SBATCH_SCRIPT), *train_args]
        env = self.env({"TOYACCEL_DIR": str(REPO), **(env or {})})
        proc = subprocess.run(cmd, cwd=submit_dir, env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"sbatch: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`, as a dict (JobState, Restarts, ExitCode, ...)."""
        fields = self.command("scontrol", "-o", "show", "job", job_id).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def state(self, job_id: str) -> str:
        """The job's state as squeue shows it: COMPLETING until every process of the job has ended."""
        return self.command("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T").strip()

    def wait_until_done(self, job_id: str, log: Path, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (state := self.state(job_id)) not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {state} after {timeout} s: {job_log(log)}")
            time.sleep(0.5)
        return self.job(job_id)


def processes_with(variable: str, value: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(variable) == value:
                found.append(proc)
    return found


def job_log(path: Path) -> str:
    return f"\n--- {path}\n{path.read_text()[-6000:] if path.exists() else '(no log)'}"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
    assert cluster.leftovers() == [], "processes of the test jobs outlived the cluster"


# The jobs share the node's 2 CPUs (--oversubscribe), so that one's waits are the others' running time.
SHARED = ("--oversubscribe",)
# 2 tasks on the one node stand for 2 machines of 1 process each.
TWO_MACHINES = ("--ntasks-per-node=2", *SHARED)
# The book's run: 2 machines x batch 1 is the book's global batch of 2.
BOOK_RUN = ("--batch-size", "1", "--log-every", "1", "--no-plot")
STEPS_PER_EPOCH = 2
# Both processes wait after optimizer step K until they are signalled, so that the signal lands
# where the test wants it however slow the machine is (toyaccel/faults.py): after step 1 is
# mid-epoch 1; after step 3, once the end of epoch 1 (step 2) has been checkpointed.
STALL_1, STALL_3 = {"TOYACCEL_FAULT": "stall:1"}, {"TOYACCEL_FAULT": "stall:3"}


@dataclass
class Job:
    id: str
    submit_dir: Path
    info: dict[str, str] = field(default_factory=dict)  # `scontrol show job` once it has ended
    processes_while_running: int = 0

    @property
    def log(self) -> Path:
        return self.submit_dir / f"slurm-{self.id}.out"

    @property
    def run(self) -> Path:
        """The default --output-dir: named after the job id, in the submission directory."""
        return self.submit_dir / "runs" / f"slurm-{self.id}"

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def job_processes(job_id: str) -> list[psutil.Process]:
    """The job's processes on this host: Slurm gives each its SLURM_JOB_ID."""
    return processes_with("SLURM_JOB_ID", job_id)


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory) -> dict[str, Job]:
    """Four jobs at once, all the book's run: as the README submits it (1 machine); on 2 machines;
    on 2 machines, sent the warning signal mid-epoch; and on 2 machines, cancelled outright."""

    def submit(name: str, *train_args: str, env=None, sbatch_args=TWO_MACHINES) -> Job:
        submit_dir = tmp_path_factory.mktemp(name)
        return Job(slurm.submit(submit_dir, *train_args, sbatch_args=sbatch_args, env=env), submit_dir)

    jobs = {
        "default": submit("default", "--no-plot", "--log-every", "1", sbatch_args=SHARED),
        "book": submit("book", *BOOK_RUN),
        "preempted": submit("preempted", *BOOK_RUN, env=STALL_1),
        "cancelled": submit("cancelled", *BOOK_RUN, env=STALL_3),
    }
    signals = {
        # What Slurm does for `#SBATCH --signal=B:USR1@120` ahead of the time limit: USR1 to the batch shell.
        "preempted": (("scancel", "--signal=USR1", "--batch"), "stalled after step 1"),
        "cancelled": (("scancel",), "stalled after step 3"),
    }
    deadline = time.monotonic() + JOB_TIMEOUT
    while signals:
        for name, (command, stalled) in list(signals.items()):
            job = jobs[name]
            if job.text().count(stalled) == 2:  # both machines wait
                job.processes_while_running = len(job_processes(job.id))
                slurm.command(*command, job.id)
                del signals[name]
            elif "Traceback" in job.text() or "error:" in job.text():
                raise AssertionError(f"job {job.id} failed before {stalled!r}: {job_log(job.log)}")
        assert time.monotonic() < deadline, "".join(f"no stall in {job_log(jobs[n].log)}" for n in signals)
        time.sleep(0.2)
    for job in jobs.values():
        job.info = slurm.wait_until_done(job.id, job.log)
    return jobs


def assert_book_run(job: Job, machines: int, distributed_type: str) -> None:
    assert (job.info["JobState"], job.info["ExitCode"]) == ("COMPLETED", "0:0"), job_log(job.log)
    assert job.info["Restarts"] == "0"  # a job that finished is not requeued
    assert f"{machines} machine(s) x 1 process(es)" in job.text()
    # One log for the whole job: each line once, however many machines print into it.
    assert job.text().count("saved the run in") == job.text().count(f"toyaccel: {machines} process(es)") == 1
    results = read_json(job.run / "results.json")
    assert (results["world_size"], results["distributed_type"], results["global_batch"]) == (
        machines, distributed_type, 2,
    )  # fmt: skip
    assert [round(loss, 2) for loss in step_losses(job.run)] == BOOK_LOSSES


def test_the_readme_command_runs_the_book_on_one_machine(jobs):
    assert_book_run(jobs["default"], 1, "NO")


def test_two_tasks_form_one_world_equal_to_one_process(jobs):
    assert_book_run(jobs["book"], 2, "MULTI_CPU")
    assert_weights_close(weights(jobs["book"].run), weights(jobs["default"].run), atol=1e-6)


def logged_steps(run: Path) -> list[tuple[str, int]]:
    return logged(run, "kind", "step")


def test_warning_signal_checkpoints_requeues_and_resumes_to_the_same_weights(jobs):
    job, uninterrupted = jobs["preempted"], jobs["book"]
    assert (job.info["JobState"], job.info["ExitCode"], job.info["Restarts"]) == ("COMPLETED", "0:0", "1"), job_log(
        job.log
    )
    text = job.text()
    # The first attempt stopped mid-epoch on every process, after the same step, and checkpointed it.
    stopped = re.search(r"interrupted by SIGTERM: saved checkpoint (\S+/step_(\d+)) ", text)
    assert stopped and int(stopped[2]) % STEPS_PER_EPOCH != 0, job_log(job.log)
    assert f"requeueing job {job.id}" in text and f"job {job.id} (restart 1)" in text
    assert f"resumed from {stopped[1]} " in text
    assert_weights_equal(weights(job.run), weights(uninterrupted.run))
    # metrics.jsonl: every step and epoch once, in order, with the uninterrupted run's losses.
    assert logged_steps(job.run) == logged_steps(uninterrupted.run)
    assert step_losses(job.run) == step_losses(uninterrupted.run)


def test_a_cancelled_job_leaves_whole_checkpoints_and_no_processes(jobs):
    job = jobs["cancelled"]
    assert (job.info["JobState"], job.info["Restarts"]) == ("CANCELLED", "0"), job_log(job.log)  # not requeued
    # The batch shell, srun, and per machine `accelerate launch` and its worker; none is left.
    assert job.processes_while_running >= 6
    assert job_processes(job.id) == []
    # step_2 from the end of epoch 1, and the step the processes stopped after, written after the
    # cancellation: every process had the time to finish it.
    checkpoints = sorted((job.run / "checkpoints").iterdir())
    assert [p.name for p in checkpoints][0] == "step_2" and len(checkpoints) == 2, job_log(job.log)
    for path in checkpoints:
        assert verify_checkpoint(path).global_step == int(path.name.removeprefix("step_"))
    assert f"interrupted by SIGTERM: saved checkpoint {checkpoints[1]} " in job.text()
