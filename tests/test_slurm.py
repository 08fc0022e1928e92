"""scripts/slurm/train.sbatch on a real Slurm (issue 14): a controller and a node on this host.

Needs Debian's `slurmd slurmctld slurm-client munge` (.ci/run installs them); skips without them.
The fixture starts `munged` (fresh key), `slurmctld` and `slurmd` from a generated slurm.conf, with
state, spool, sockets and logs in a temporary folder, and stops them afterwards. A job of 2 tasks on
the one node stands for 2 machines: each task is its own `accelerate launch` (machine rank 0 and 1).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import (
    BOOK_LOSSES,
    REPO,
    assert_weights_close,
    free_port,
    read_json,
    step_losses,
    subprocess_env,
    weights,
)

from toyaccel import fit

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
missing = [name for name in DAEMONS if shutil.which(name) is None]
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"no Slurm here ({', '.join(missing)} not found; .ci/run installs it)"
)

SBATCH_SCRIPT = REPO / "scripts" / "slurm" / "train.sbatch"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT = 180  # seconds; a toy job takes ~10 s on a quiet 2-core machine


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
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class Slurm:
    """A running single-host Slurm: client commands and jobs of scripts/slurm/train.sbatch."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []
        # munged wants every folder above its socket open to all, which pytest's tmp folders are not.
        self.munge = Path(tempfile.mkdtemp(prefix="toyaccel-munge-"))
        self.munge.chmod(0o755)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        # No GPU for these jobs even where there is one: the CPU runs are what is compared.
        return subprocess_env({"SLURM_CONF": str(self.conf), "PATH": path, "CUDA_VISIBLE_DEVICES": "", **(extra or {})})

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
        shutil.rmtree(self.munge, ignore_errors=True)

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

    def wait_until_done(self, job_id: str, log: Path, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["JobState"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout} s: {job_log(log)}")
            time.sleep(0.5)
        return job


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


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory) -> Path:
    """The book's run on one process (batch 2): what 2 machines x batch 1 must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    fit(plot=False, progress=False, log_every=1, output_dir=str(out))
    return out


@pytest.fixture(scope="module")
def two_machine_job(slurm, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The book's run as a job of 2 tasks on the node, 2 "machines" x 1 process x batch 1."""
    submit_dir = tmp_path_factory.mktemp("submit")
    job_id = slurm.submit(
        submit_dir, "--batch-size", "1", "--log-every", "1", "--no-plot", sbatch_args=("--ntasks-per-node=2",)
    )
    log = submit_dir / f"slurm-{job_id}.out"
    job = slurm.wait_until_done(job_id, log)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), job_log(log)
    return submit_dir / "runs" / f"slurm-{job_id}", {**job, "log": log.read_text()}


def test_two_tasks_form_one_world_equal_to_one_process(two_machine_job, one_process_reference):
    run, job = two_machine_job  # the run folder is named after the job id, in the submission directory
    results = read_json(run / "results.json")
    assert (results["world_size"], results["distributed_type"], results["global_batch"]) == (2, "MULTI_CPU", 2)
    assert [round(loss, 2) for loss in step_losses(run)] == BOOK_LOSSES
    assert_weights_close(weights(run), weights(one_process_reference), atol=1e-6)
    assert "2 machine(s) x 1 process(es)" in job["log"]
    assert job["Restarts"] == "0"  # a job that finished is not requeued
