"""The warm worker (mmskip.worker): a job forked by it writes the bytes it writes in a process of its own, passes
its exit status and errors through, is declined where the worker's imports could differ, and dies with its client.
The whole pipeline under the worker against a `dvc repro` without it: tests/test_pipeline_smoke.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mmskip.worker import SOCKET_ENV, THREAD_ENV
from workflow_utils import BIN, check, run

SCENES = ["--image_size", "24", "--num_train", "40", "--num_val", "8", "--num_test", "8", "--num_text_scenes", "8",
          "--min_objects", "1", "--max_objects", "2", "--questions_per_image", "2"]
ENCODER = ["--hidden_size", "16", "--num_layers", "1", "--num_heads", "2", "--mlp_dim", "32", "--steps", "4",
           "--batch_size", "8", "--warmup_steps", "1"]
USAGE = "mmskip.worker: the job ran in the worker: peak RSS"


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """A server on a socket of its own (its JVM for METEOR off: no caption is scored here): (socket, process)."""
    folder = tmp_path_factory.mktemp("worker")
    path = folder / "socket"
    log = open(folder / "worker.log", "w", encoding="utf-8")
    server = subprocess.Popen([BIN / "python", "-m", "mmskip.worker", "--serve", path, "--no-meteor"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            assert server.poll() is None and time.monotonic() < deadline, (folder / "worker.log").read_text()
            time.sleep(0.05)
        yield path, server
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _jobs(tmp: Path, socket_path: Path | None) -> list[subprocess.CompletedProcess]:
    """make_scenes, then pretrain_encoder on its scenes (torch: a model trained and saved), in ``tmp``."""
    env = {SOCKET_ENV: str(socket_path)} if socket_path else {}
    return [check(run([BIN / "mmskip", "make_scenes", "--out", "scenes", "--seed", "3", *SCENES], cwd=tmp, env=env)),
            check(run([BIN / "mmskip", "pretrain_encoder", "--threads", "1", "--scenes", "scenes", "--out", "encoder",
                       "--metrics", "encoder.json", "--seed", "3", *ENCODER], cwd=tmp, env=env))]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_job_in_the_worker_writes_the_bytes_of_a_process_of_its_own(worker, tmp_path):
    socket_path, _ = worker
    (tmp_path / "warm").mkdir()
    (tmp_path / "alone").mkdir()
    warm = _jobs(tmp_path / "warm", socket_path)
    alone = _jobs(tmp_path / "alone", None)
    for result in warm:
        assert USAGE in result.stderr and "running here" not in result.stderr, result.stderr
    for result in alone:
        assert USAGE not in result.stderr
    files = _files(tmp_path / "warm")
    assert "encoder/model.safetensors" in files and "scenes/scenes_train.json" in files
    assert files == _files(tmp_path / "alone")


def test_exit_status_and_errors_pass_through(worker, tmp_path):
    socket_path, _ = worker
    result = run([BIN / "mmskip", "train_mapper", "--task", "nope"], cwd=tmp_path, env={SOCKET_ENV: str(socket_path)})
    assert result.returncode == 2
    assert "argument --task: invalid choice: 'nope'" in result.stderr and USAGE in result.stderr
    result = run([BIN / "mmskip", "make_scenes", "--out", "x", "--seed", "0", "--num_train", "0"], cwd=tmp_path,
                 env={SOCKET_ENV: str(socket_path)})
    assert result.returncode != 0 and "num_train" in result.stderr and USAGE in result.stderr
    assert not (tmp_path / "x").exists()


def test_a_job_with_another_import_time_environment_runs_in_its_own_process(worker, tmp_path):
    socket_path, _ = worker
    result = check(run([BIN / "mmskip", "make_scenes", "--out", "s", "--seed", "0", *SCENES], cwd=tmp_path,
                       env={SOCKET_ENV: str(socket_path), "HF_HUB_OFFLINE": "maybe"}))
    assert ("the worker declined this job (environment variables read at import differ from the worker's: "
            "HF_HUB_OFFLINE); running here") in result.stderr
    assert USAGE not in result.stderr and (tmp_path / "s" / "scenes_train.json").is_file()


def test_without_a_worker_at_the_socket_the_job_runs_here(tmp_path):
    result = check(run([BIN / "mmskip", "make_scenes", "--out", "s", "--seed", "0", *SCENES], cwd=tmp_path,
                       env={SOCKET_ENV: str(tmp_path / "none")}))
    assert f"mmskip: no worker at {SOCKET_ENV}={tmp_path / 'none'}" in result.stderr and "running here" in result.stderr
    assert (tmp_path / "s" / "scenes_train.json").is_file()


def test_a_bad_request_is_refused_without_keeping_its_streams(worker, tmp_path):
    """A request that is not JSON: the server closes the streams it was handed and serves the next job."""
    import socket as socket_module
    import struct

    socket_path, server = worker
    open_fds = len(os.listdir(f"/proc/{server.pid}/fd"))
    with socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM) as sock:
        sock.connect(str(socket_path))
        socket_module.send_fds(sock, [struct.pack("!Q", 5)], [0, 1, 2])
        sock.sendall(b"{nope")
        assert sock.recv(1) == b""  # closed: no job taken
    deadline = time.monotonic() + 10
    while len(os.listdir(f"/proc/{server.pid}/fd")) != open_fds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(os.listdir(f"/proc/{server.pid}/fd")) == open_fds
    result = check(run([BIN / "mmskip", "make_scenes", "--out", "s", "--seed", "0", *SCENES], cwd=tmp_path,
                       env={SOCKET_ENV: str(socket_path)}))
    assert USAGE in result.stderr


def test_a_killed_client_takes_its_job_with_it(worker, tmp_path):
    socket_path, server = worker
    assert _children(server.pid) == []
    # a job of minutes: 100,000 scenes
    client = subprocess.Popen([BIN / "mmskip", "make_scenes", "--out", "big", "--seed", "0", "--num_train", "100000"],
                              cwd=tmp_path, env={**os.environ, SOCKET_ENV: str(socket_path)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not _children(server.pid):
        assert client.poll() is None and time.monotonic() < deadline, client.stderr.read()
        time.sleep(0.05)
    (job,) = _children(server.pid)
    client.send_signal(signal.SIGTERM)
    client.wait(timeout=10)
    deadline = time.monotonic() + 10
    while job in _children(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job not in _children(server.pid) and not Path(f"/proc/{job}").exists()
    assert not (tmp_path / "big").exists()  # nothing that looks complete


def test_the_wrapper_runs_the_command_with_a_worker_and_stops_it(tmp_path):
    script = ('test -S "$MMSKIP_WORKER" && echo "$MMSKIP_WORKER" > socket.txt && '
              f'mmskip make_scenes --out s --seed 0 {" ".join(SCENES)} && exit 7')
    result = run([BIN / "python", "-m", "mmskip.worker", "--", "bash", "-c", script], cwd=tmp_path)
    assert result.returncode == 7, result.stderr
    assert USAGE in result.stderr and "served 1 jobs, declined 0" in result.stderr
    socket_path = Path((tmp_path / "socket.txt").read_text().strip())
    assert not socket_path.parent.exists()  # the server stopped, its folder removed
    assert (tmp_path / "s" / "scenes_train.json").is_file()
    usage = run([BIN / "python", "-m", "mmskip.worker"], cwd=tmp_path)
    assert usage.returncode == 2 and "a command to run is required" in usage.stderr


def test_with_threads_the_worker_serves_the_jobs_snakemake_gives_that_many_threads(tmp_path):
    """Snakemake sets OMP_NUM_THREADS and the like to a job's thread count; `--threads 1` serves one-thread jobs, and
    a two-thread job runs alone."""
    one = " ".join(f"{k}=1" for k in THREAD_ENV)
    two = " ".join(f"{k}=2" for k in THREAD_ENV)
    script = (f"env {one} mmskip make_scenes --out one --seed 0 {' '.join(SCENES)} 2> one.log && "
              f"env {two} mmskip make_scenes --out two --seed 0 {' '.join(SCENES)} 2> two.log")
    check(run([BIN / "python", "-m", "mmskip.worker", "--threads", "1", "--", "bash", "-c", script], cwd=tmp_path))
    assert USAGE in (tmp_path / "one.log").read_text()
    two_log = (tmp_path / "two.log").read_text()
    assert "OMP_NUM_THREADS" in two_log and "running here" in two_log and USAGE not in two_log
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    bad = run([BIN / "python", "-m", "mmskip.worker", "--threads", "0", "--", "true"], cwd=tmp_path)
    assert bad.returncode == 2 and "--threads 0: a number of threads is at least 1" in bad.stderr
