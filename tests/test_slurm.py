"""The pipeline on a real SLURM cluster: `snakemake --profile slurm reports/all.html`, typed as
in the README, submits every job through snakemake-executor-plugin-slurm to a single-node cluster
(munged, slurmctld and slurmd on 127.0.0.1, without accounting) that this module starts in a
temporary folder and stops again. A second run, up to the mappers, whose train_mapper job is cancelled
with scancel while it runs, is retried and ends with artifacts byte-identical to the uninterrupted run's.
The cluster and both runs start with the test session (tests/conftest.py): their jobs mostly wait for
the plugin's status polls, so they run beside the other tests, and the two tests that read them run last.

Needs Debian's slurm-wlm and munge: installed with apt-get when missing and running as root,
otherwise the module is skipped with the reason."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from test_pipeline_smoke import smoke_params
from workflow_utils import BIN, REPO, REPLICA_RULES, RULES, copy_workflow, is_measured, tool_env, write_params

pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

PROFILE = REPO / "workflow" / "profiles" / "slurm"
PROFILE_CONFIG = PROFILE / "config.v9+.yaml"
TARGET = "reports/all.html"
SBIN = ["/usr/sbin", "/sbin"]  # the daemons live here; a non-login PATH may lack them
DAEMONS = ["munged", "slurmctld", "slurmd"]
CLIENTS = ["munge", "sbatch", "squeue", "scancel", "sinfo", "scontrol", "srun"]
CPUS = 2  # the node; the rules ask for 1 or 2 threads
# The plugin polls job states `slurm-init-seconds-before-status-checks` (default 40 s) after a
# poll that saw a job end, and 10 s later each time after one that saw none; every stage of the
# DAG waits for such a poll, so on the 9-stage smoke DAG the default 40 s adds minutes to a run.
# Only this polling interval differs from the real profile.
STATUS_INTERVAL = ["--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2"]
# The rule whose job is cancelled while its command runs: the mapper's training.
CANCELLED_RULE = "train_mapper"
# Default locations of munged's and SLURM's files, all moved into the cluster's folder by flags
# and slurm.conf: the cluster must neither create nor change any of them.
DEFAULT_PATHS = ["/etc/munge/munge.key", "/run/munge", "/var/run/munge", "/var/lib/munge", "/var/log/munge",
                 "/etc/slurm/slurm.conf",
                 "/var/spool/slurmctld", "/var/spool/slurmd", "/var/spool/slurm", "/var/lib/slurm",
                 "/var/log/slurm", "/run/slurmctld.pid", "/run/slurmd.pid", "/run/slurm", "/var/run/slurm"]
# Artifacts that hold wall times differ between any two runs (workflow_utils.MEASURED); everything
# else under data/, models/ and results/ must be byte-identical. reports/summary.csv is compared row
# by row without these columns (wall times, from timing.json).
TIMED_SUMMARY_COLUMNS = ["decode_ms_per_token", "decode_time_fraction"]


# --- installing and running the cluster --------------------------------------------------------

def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def _missing() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if _which(name) is None]


def _ensure_slurm_installed() -> None:
    """Install slurm-wlm and munge with apt-get if any daemon or client is missing, else skip."""
    if os.geteuid() != 0:
        pytest.skip("the test cluster needs root: slurmd launches jobs as root, and slurm-wlm/munge may need "
                    "installing with apt-get")
    missing = _missing()
    if not missing:
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"SLURM/munge programs missing ({', '.join(missing)}) and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or _missing():
        pytest.skip(f"could not install slurm-wlm and munge ({' '.join(install)} exited {result.returncode}, "
                    f"still missing: {', '.join(_missing()) or 'nothing'}):\n{result.stderr[-2000:]}")


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (all bound at once, so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _real_memory_mb() -> int:
    """The node's memory as slurmd itself measures it (a larger RealMemory would drain the node)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"RealMemory=(\d+)", out)
    if match:
        return int(match.group(1))
    with open("/proc/meminfo", encoding="ascii") as f:
        return int(f.readline().split()[1]) // 1024


def _stat(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class SlurmCluster:
    """munged, slurmctld and slurmd of one node, in the foreground under Popen; stop() ends exactly
    these processes (by PID), after cancelling whatever jobs are still in the cluster."""

    def __init__(self, root: Path):
        self.root = root
        self.node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = {name: root / "log" / f"{name}.log" for name in DAEMONS}
        self.env = dict(tool_env(), SLURM_CONF=str(self.conf))
        self.env["PATH"] = os.pathsep.join([str(root / "bin"), self.env["PATH"], *SBIN])
        self._default_paths = {path: _stat(path) for path in DEFAULT_PATHS}

    def start(self) -> None:
        for sub in ("bin", "munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(mode=0o700)
        # Inside a job, snakemake-executor-plugin-slurm-jobstep starts the rule with `srun`, after
        # removing every SLURM_* variable but the job's ids from srun's environment, SLURM_CONF
        # too: on a real node srun reads /etc/slurm/slurm.conf, which this test must not write. So
        # the jobs' PATH finds this srun first: the real one, with SLURM_CONF put back.
        srun = self.root / "bin" / "srun"
        srun.write_text(f'#!/bin/sh\nexport SLURM_CONF={shlex.quote(str(self.conf))}\n'
                        f'exec {shlex.quote(_which("srun"))} "$@"\n', encoding="utf-8")
        srun.chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)  # munged refuses a key that others can read
        self._spawn("munged", [
            _which("munged"), "--foreground",
            # --force: munged wants every folder above its socket world-searchable (for other
            # users' clients); pytest's temp folders are 0700, and every client here is root.
            "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
            f"--pid-file={self.root / 'run' / 'munged.pid'}", f"--log-file={self.logs['munged']}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self._wait("munged answers on its socket", lambda: self.munge_socket.exists() and subprocess.run(
            [_which("munge"), "-n", "-S", str(self.munge_socket)], capture_output=True).returncode == 0)
        self.conf.write_text(self._slurm_conf(), encoding="utf-8")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld is up", lambda: "is UP" in self.run(["scontrol", "ping"]).stdout)
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(f"node {self.node} is idle",
                   lambda: self.run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"]).stdout.strip() == "idle")

    def _slurm_conf(self) -> str:
        r = self.root
        ctld_port, slurmd_port = _free_ports(2)  # not 6817/6818: a real cluster may run on this machine
        return "\n".join([
            "ClusterName=mmskiptest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",  # our munged, not the system's /run/munge
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs['slurmctld']}",
            f"SlurmdLogFile={self.logs['slurmd']}",
            "ProctrackType=proctrack/linuxproc",  # plain process tracking: no cgroup setup needed
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",  # jobs share the node by CPU and memory
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none",  # no slurmdbd: sacct cannot answer
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            # squeue reports a finished job's state for MinJobAge seconds: the plugin's status
            # source without accounting (SLURM's default is 300 s); an hour, so that the tests can
            # still read every job of both runs when they are over.
            "MinJobAge=3600",
            "ReturnToService=2",
            "SlurmctldTimeout=60",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "KillWait=5",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory={_real_memory_mb()} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.root / "log" / f"{name}.out", "w", encoding="utf-8") as out:
            self.procs[name] = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait(self, what: str, ready, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode} while waiting until {what}\n{self.log_tails()}")
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting until {what}\n{self.log_tails()}")

    def log_tails(self, chars: int = 3000) -> str:
        """The end of each daemon's output (in the foreground they log to stderr as well, startup errors too)."""
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}"
                         for path in sorted((self.root / "log").glob("*.out")))

    def run(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster (never raises on a non-zero exit)."""
        return subprocess.run([_which(args[0]), *args[1:]], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def jobs(self) -> list[dict]:
        """Every job slurmctld still knows (finished ones for MinJobAge), with the fields asserted on."""
        fields = {"id": "%i", "name": "%j", "comment": "%k", "state": "%T", "cpus": "%C", "time_limit": "%l"}
        out = self.run(["squeue", "--states=all", "--noheader", "--format=" + "|".join(fields.values())])
        assert out.returncode == 0, out.stderr
        return [dict(zip(fields, line.split("|"))) for line in out.stdout.splitlines() if line.strip()]

    def cancel_all_jobs(self, timeout: float = 60) -> None:
        """scancel every job of this cluster and wait until no job step is left on the node."""
        active = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
        ids = [j["id"] for j in self.jobs() if j["state"] in active]
        if not ids:
            return
        self.run(["scancel", *ids])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(j["state"] in active for j in self.jobs()):
            time.sleep(1)

    def stop(self) -> None:
        """Stop the daemons this object started, slurmd first: SIGTERM, then SIGKILL after 15 s."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.cancel_all_jobs()  # their slurmstepd processes are not children of slurmd
            except (AssertionError, subprocess.SubprocessError, OSError):
                pass  # the daemons are stopped below all the same
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)

    def changed_default_paths(self) -> list[str]:
        return [path for path, before in self._default_paths.items() if _stat(path) != before]


class SlurmSession:
    """The cluster and both runs of this module, started with the test session (tests/conftest.py,
    fixture ``slurm_session``): their jobs mostly wait for the plugin's status polls, so they run beside
    the other tests. ``skipped`` holds why the cluster cannot run here, ``error`` what went wrong starting it."""

    def __init__(self, skipped: str | None = None, error: BaseException | None = None,
                 cluster: SlurmCluster | None = None, runs: BackgroundRuns | None = None):
        self.skipped, self.error, self.cluster, self.runs = skipped, error, cluster, runs

    def check(self) -> None:
        """Skip or fail the test asking for the cluster, as starting it did."""
        if self.skipped:
            pytest.skip(self.skipped)
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def start_slurm_session(tmp_path_factory):
    """Start the cluster and both runs; at the end, stop them and check that the cluster left the
    machine's default SLURM and munge paths alone. Nothing raised here reaches the session's other tests."""
    try:
        _ensure_slurm_installed()
        if (os.cpu_count() or 1) < CPUS:
            pytest.skip(f"the SLURM node is configured with {CPUS} CPUs; this machine has {os.cpu_count()}")
    except pytest.skip.Exception as skipped:
        yield SlurmSession(skipped=str(skipped.msg))
        return
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        with contextlib.ExitStack() as stack:
            try:
                slurm.start()
                runs = stack.enter_context(BackgroundRuns(slurm, tmp_path_factory))
            except Exception as error:  # noqa: BLE001 - reported by the tests that ask for the cluster
                session = SlurmSession(error=error)
            else:
                session = SlurmSession(cluster=slurm, runs=runs)
            yield session
    finally:
        slurm.stop()
    changed = slurm.changed_default_paths()
    assert not changed, f"the test cluster created or changed files outside its folder: {changed}"


@pytest.fixture(scope="session")
def cluster(slurm_session) -> SlurmCluster:
    slurm_session.check()
    return slurm_session.cluster


# --- running the pipeline ----------------------------------------------------------------------

# One task, one skip mode, one mask set: every kind of job, each once per task (the smoke run has both tasks).
SLURM_TASKS = ["vqa"]


def _slurm_params() -> dict:
    """The smoke params, with one task (so no α-SubNet), one skip mode and one mask set: fewer jobs."""
    params = smoke_params()
    params["tasks"] = SLURM_TASKS
    params["skipping"]["modes"] = ["skip_block"]
    params["compression"]["mask_sets"] = ["wanda"]
    return params


def _workflow_copy(path: Path) -> Path:
    """A fresh copy of the workflow with the smoke params and the repository's `slurm` symlink."""
    copy_workflow(path)
    write_params(path / "params.yaml", _slurm_params())
    (path / "slurm").symlink_to(os.readlink(REPO / "slurm"))
    return path


# As typed in the README (with the venv's tools first on PATH and SLURM_CONF naming the cluster).
SNAKEMAKE = [str(BIN / "snakemake"), "--profile", "slurm", *STATUS_INTERVAL]
# The interrupted run goes as far as the cancelled rule's jobs (the mappers): everything it writes is compared
# with the uninterrupted run's, which builds the whole report; the rest of the DAG would only repeat it.
INTERRUPTED_TARGETS = [f"models/mapper/{task}" for task in SLURM_TASKS]
# Both runs side by side take about 6 minutes on 2 idle cores, mostly waiting for status polls; they run
# beside the session's other tests (slurm_session), which slows their jobs; 17 minutes were measured on this
# machine while another full pipeline ran on it.
RUN_TIMEOUT = 1800


class Run:
    """`snakemake --profile slurm reports/all.html` in the background, in its own process group,
    its output in a file outside the workflow copy; leaving the `with` block ends it if it still runs."""

    def __init__(self, cluster: SlurmCluster, path: Path, log: Path, targets: list[str]):
        self.cluster, self.path, self.log = cluster, path, log
        with open(log, "w", encoding="utf-8") as out:
            self.proc = subprocess.Popen([*SNAKEMAKE, *targets], cwd=path, env=cluster.env, stdout=out,
                                         stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:  # SIGTERM: Snakemake scancels its jobs, then exits
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait(self, deadline: float) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"snakemake in {self.path} still running after its timeout\n{self.describe()}")

    def run_id(self) -> str | None:
        """The plugin's run id, which is also the SLURM job name of every job of this run."""
        match = re.search(r"SLURM run ID: (\S+)", self.output())
        return match.group(1) if match else None

    def describe(self) -> str:
        return f"--- snakemake output ({self.log})\n{self.output()[-12000:]}\n{self.cluster.log_tails()}"


def _wait_until_running(cluster: SlurmCluster, run: Run, rule: str, deadline: float) -> dict:
    """The first job of ``rule`` in ``run`` that SLURM runs and whose command has started (its log exists)."""
    while time.monotonic() < deadline:
        if run.proc.poll() is not None:
            raise AssertionError(f"snakemake ended before a {rule} job ran\n{run.describe()}")
        run_id = run.run_id()
        for job in cluster.jobs() if run_id else []:
            match = re.fullmatch(rf"rule_{rule}_wildcards_(\w+)", job["comment"])
            if job["name"] == run_id and match and job["state"] == "RUNNING" and (
                    run.path / "logs" / rule / f"{match.group(1)}.log").exists():
                return job
        time.sleep(0.5)
    raise AssertionError(f"no {rule} job was RUNNING before the timeout\n{run.describe()}")


def _final_state(cluster: SlurmCluster, job_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = next(j["state"] for j in cluster.jobs() if j["id"] == job_id)
        if state not in ("RUNNING", "COMPLETING", "PENDING"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"SLURM job {job_id} did not end within {timeout:.0f} s after scancel")


class BackgroundRuns:
    """Two fresh copies of the workflow running `snakemake --profile slurm`: to reports/all.html, and to the
    mappers (INTERRUPTED_TARGETS), both started at once; leaving the `with` block ends them if they still run.

    The runs go side by side: while one run waits for the plugin's next status poll, the other's jobs use
    the node, so together they take little longer than one. In the second, a train_mapper job is cancelled
    with scancel while its command runs (a thread watches for it); Snakemake resubmits it (the profile's
    restart-times). Should the run fail all the same, ``result`` starts it once more, as a user would.
    """

    def __init__(self, cluster: SlurmCluster, tmp_path_factory):
        self.cluster = cluster
        logs = tmp_path_factory.mktemp("slurm_logs")
        self.plain = _workflow_copy(tmp_path_factory.mktemp("slurm_uninterrupted"))
        self.interrupted = _workflow_copy(tmp_path_factory.mktemp("slurm_interrupted"))
        self.deadline = time.monotonic() + RUN_TIMEOUT
        self._stack = contextlib.ExitStack()
        self.first = self._stack.enter_context(Run(cluster, self.plain, logs / "uninterrupted.log", [TARGET]))
        self.second = self._stack.enter_context(
            Run(cluster, self.interrupted, logs / "interrupted.log", INTERRUPTED_TARGETS))
        self.cancelled: dict = {}
        self._cancel_error: BaseException | None = None
        self._canceller = threading.Thread(target=self._cancel, name="scancel train_mapper", daemon=True)
        self._canceller.start()

    def _cancel(self) -> None:
        try:
            cancelled = _wait_until_running(self.cluster, self.second, CANCELLED_RULE, self.deadline)
            cancelled["scancel"] = self.cluster.run(["scancel", cancelled["id"]]).stderr  # empty unless over
            cancelled["final_state"] = _final_state(self.cluster, cancelled["id"])
            self.cancelled = cancelled
        except BaseException as error:  # noqa: BLE001 - raised again in the test thread by result()
            self._cancel_error = error

    def __enter__(self) -> BackgroundRuns:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._canceller.join(timeout=120)

    def result(self) -> dict:
        """Wait for both runs (and the cancellation); what the tests read of them."""
        self._canceller.join(timeout=max(1.0, self.deadline - time.monotonic()))
        if self._cancel_error is not None:
            raise self._cancel_error
        assert self.first.wait(self.deadline) == 0, self.first.describe()
        second_code = self.second.wait(self.deadline)
        output = self.second.output()
        if second_code != 0:
            again = subprocess.run([*SNAKEMAKE, *INTERRUPTED_TARGETS], cwd=self.interrupted, env=self.cluster.env,
                                   capture_output=True, text=True, timeout=RUN_TIMEOUT)
            assert again.returncode == 0, (f"{again.stdout[-6000:]}\n{again.stderr[-12000:]}\n"
                                           f"{self.cluster.log_tails()}")
            output += again.stdout + again.stderr
        return {"plain": self.plain, "plain_output": self.first.output(), "interrupted": self.interrupted,
                "interrupted_output": output, "interrupted_exit": second_code, "cancelled": self.cancelled}


@pytest.fixture(scope="session")
def runs(slurm_session) -> dict:
    """Both runs, once they are over (a failure is reported to each test that asks)."""
    slurm_session.check()
    return slurm_session.runs.result()


def _submitted(output: str) -> dict[str, str]:
    """SLURM job id -> Snakemake job id, from Snakemake's output."""
    return {slurm: job for job, slurm in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", output)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _artifact_hashes(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under data/, models/ and results/, but the measured wall
    times (``workflow_utils.MEASURED``)."""
    files = (f for top in ("data", "models", "results") for f in sorted((path / top).rglob("*")) if f.is_file())
    return {str(f.relative_to(path)): _sha256(f) for f in files if not is_measured(str(f.relative_to(path)))}


def _why_different(a: Path, b: Path) -> str:
    """What differs between two versions of an artifact, for the failure message."""
    if a.suffix != ".safetensors":
        return "contents differ"

    def header_and_data(path: Path) -> tuple[dict, bytes]:
        raw = path.read_bytes()
        size = int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, JSON header, tensor bytes
        return json.loads(raw[8:8 + size]), raw[8 + size:]

    (header_a, data_a), (header_b, data_b) = header_and_data(a), header_and_data(b)
    if data_a != data_b:
        return "tensor data differ"
    if header_a == header_b:
        return "same tensors and metadata, header keys in another order (safetensors writes metadata in hash order)"
    return "same tensor data, different header"


def _summary_without_timings(path: Path) -> list[dict]:
    with open(path / "reports" / "summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(c in rows[0] for c in TIMED_SUMMARY_COLUMNS), "summary.csv lacks its timing columns"
    return [{k: v for k, v in row.items() if k not in TIMED_SUMMARY_COLUMNS} for row in rows]


def _local_jobs(path: Path) -> list[tuple[str, int]]:
    """(rule, threads) of every job of a local run with `--cores 2`, from a dry run's job list."""
    out = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", str(CPUS), "--forceall", TARGET], cwd=path,
                         env=tool_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    jobs = []
    for block in re.split(r"\n(?=rule \w+:\n)", out.stdout + out.stderr):  # `localrule all:` does not match
        header = re.match(r"rule (\w+):\n", block)
        if header:
            found = re.search(r"^\s+threads: (\d+)$", block, re.M)
            jobs.append((header.group(1), int(found.group(1)) if found else 1))
    return jobs


def _minutes(limit: str) -> int:
    """squeue's time limit (`30:00`, `1:00:00`, `1-00:00:00`) in whole minutes."""
    days, _, clock = limit.rpartition("-")
    hours, minutes, seconds = ([0, 0] + [int(p) for p in clock.split(":")])[-3:]
    return (int(days or 0) * 24 + hours) * 60 + minutes + (seconds > 0)


# --- tests -------------------------------------------------------------------------------------

def test_profile_is_found_from_the_repository_root_and_names_real_rules():
    link = REPO / "slurm"
    assert link.is_symlink() and link.resolve() == PROFILE.resolve(), "the top-level `slurm` symlink is missing"
    profile = yaml.safe_load(PROFILE_CONFIG.read_text(encoding="utf-8"))
    assert profile["executor"] == "slurm"
    assert profile["slurm-status-command"] == "squeue"  # works without slurmdbd
    assert profile["restart-times"] >= 1
    assert set(profile["set-resources"]) == set(RULES + REPLICA_RULES), \
        "set-resources should list every rule, and only rules"
    for rule, resources in profile["set-resources"].items():
        assert isinstance(resources.get("runtime"), int), f"{rule}: runtime in minutes"


@pytest.mark.waits_for_background
def test_pipeline_runs_through_slurm(cluster, runs):
    path, output = runs["plain"], runs["plain_output"]
    assert "Using profile slurm" in output
    assert "<html" in (path / "reports" / "all.html").read_text(encoding="utf-8").lower()
    assert _summary_without_timings(path)

    # Every job of the DAG went through sbatch, and slurmctld ran each to COMPLETED.
    submitted = _submitted(output)
    jobs = {j["id"]: j for j in cluster.jobs()}
    assert submitted and set(submitted) <= set(jobs), (submitted, jobs)
    ran = [jobs[i] for i in submitted]
    assert all(j["state"] == "COMPLETED" for j in ran), ran
    assert len({j["name"] for j in ran}) == 1, "one run, one SLURM job name (the plugin's run id)"
    rules = [re.fullmatch(r"rule_(\w+?)(?:_wildcards_.*)?", j["comment"]).group(1) for j in ran]
    local = _local_jobs(path)
    assert Counter(rules) == Counter(rule for rule, _ in local), "one SLURM job per job of the DAG"
    threads = dict(local)

    # Each job got its rule's threads as CPUs (as `--cores 2` gives locally: torch's results depend
    # on its thread count) and the profile's runtime as its time limit...
    profile = yaml.safe_load(PROFILE_CONFIG.read_text(encoding="utf-8"))
    for rule, job in zip(rules, ran):
        assert int(job["cpus"]) == threads[rule], (rule, job)
        assert _minutes(job["time_limit"]) == profile["set-resources"][rule]["runtime"], (rule, job)
    # ... and torch inside the jobs used exactly that many threads.
    for task in SLURM_TASKS:
        timing = json.loads((path / f"results/skip/{task}/skip_block/timing.json").read_text(encoding="utf-8"))
        assert timing["threads"] == threads["evaluate_skip"]
        timing = json.loads((path / f"results/baseline/{task}/timing.json").read_text(encoding="utf-8"))
        assert timing["threads"] == threads["baseline"]
    bench = json.loads((path / "results/bench/skip.json").read_text(encoding="utf-8"))
    assert bench["machine"]["threads"] == threads["bench_skip"]


@pytest.mark.waits_for_background
def test_cancelled_job_is_resubmitted_and_artifacts_are_identical(cluster, runs):
    cancelled, output = runs["cancelled"], runs["interrupted_output"]
    assert cancelled["final_state"] == "CANCELLED", (
        f"{CANCELLED_RULE} job {cancelled['id']} ended {cancelled['final_state']} before scancel reached it "
        f"({cancelled['scancel']})")
    # The plugin saw the cancellation through squeue, and Snakemake submitted the job again.
    assert f"SLURM-job '{cancelled['id']}' failed, SLURM status is: 'CANCELLED'" in output, output[-8000:]
    assert "Trying to restart job" in output  # restart-times, without a second `snakemake` from the user
    retried = [j for j in cluster.jobs() if j["comment"] == cancelled["comment"] and j["id"] != cancelled["id"]]
    assert any(j["state"] == "COMPLETED" for j in retried), retried

    # every file the interrupted run wrote (its DAG up to the mappers) equals the uninterrupted run's
    plain, interrupted = runs["plain"], runs["interrupted"]
    expected, got = _artifact_hashes(plain), _artifact_hashes(interrupted)
    assert {f"{target}/model.safetensors" for target in INTERRUPTED_TARGETS} <= set(got), sorted(got)
    assert set(got) <= set(expected), sorted(set(got) - set(expected))
    differ = {name: _why_different(plain / name, interrupted / name) for name in sorted(got)
              if got[name] != expected[name]}
    assert not differ, "artifacts differ between the uninterrupted and the interrupted run:\n" + "\n".join(
        f"  {name}: {why}" for name, why in differ.items())
