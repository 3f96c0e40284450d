"""Warm starts for the pipeline's local jobs: ``python -m mmskip.worker -- snakemake --cores all reports/all.html``.

Each job of the pipeline is a fresh ``mmskip <command>`` process, and each spends seconds importing torch and
transformers before it does any work (transformers 5 brings ``torch._dynamo`` and ``torch.distributed.tensor``
with it): 4 s a job on the 2-core reference machine, twice that at a busy hour, and the default runs 84 jobs.

The wrapper starts one server that imports those libraries once, then runs the given command with ``MMSKIP_WORKER``
naming the server's socket. An ``mmskip`` process that finds the variable passes its arguments, working directory,
environment, ``sys.path``, umask and standard streams to the server, which forks a child that runs the command as the
process would have, and answers with the child's exit status. So:

- each job is a fresh fork of a server that has imported libraries and run nothing else (no torch op, no thread
  pool started), so no state passes from one job to another; nothing of mmskip is imported ahead, so a job runs
  the code on disk when it starts, as a process of its own would;
- a job's outputs are the bytes it writes without the server: the smoke test runs Snakemake under the server and a
  `dvc repro` without it, and compares every artifact's hash (``tests/test_pipeline_smoke.py``);
- a job killed by Snakemake (or Ctrl-C) closes its connection, and the server then kills the child's process group;
  a child whose server dies is killed with it;
- METEOR's JVM (5 s of start-up and paraphrase tables in each caption-scoring job) is started once by the server
  and shared by its jobs, one score at a time under a file lock (``warm_meteor``;
  ``mmskip.evaluation.caption_metric``): each score is computed from its own sets alone, so the numbers are those
  of a JVM of the job's own, and a job that finds the JVM out of step (a job killed during a score) starts its own;
- where the server cannot run a job as the process would (another interpreter, or another value of an environment
  variable the imported libraries read when imported, such as ``HF_HUB_OFFLINE`` or ``OMP_NUM_THREADS``), it
  declines, and the ``mmskip`` process runs the command itself, saying so on stderr.

Snakemake gives each job OMP_NUM_THREADS and the like set to its thread count, which OpenMP and OpenBLAS read when
loaded: ``--threads 1`` (``make report``) serves the one-thread jobs, and the few of two threads (the LLMs'
pretraining, the benchmark) run alone. SLURM jobs and ``dvc repro`` run without the worker;
``python -m mmskip.worker -- dvc repro`` gives DVC the same warm starts (DVC sets no thread variables).
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SOCKET_ENV = "MMSKIP_WORKER"
# What the server imports before it serves: the libraries every job imports at its start (mmskip itself: never).
PRELOAD = ("numpy", "torch", "safetensors.torch", "tokenizers", "transformers", "transformers.modeling_utils",
           "transformers.generation.utils", "transformers.models.opt.modeling_opt",
           "transformers.models.llama.modeling_llama", "transformers.models.vit.modeling_vit",
           "transformers.models.videomae.modeling_videomae",
           "transformers.models.audio_spectrogram_transformer.modeling_audio_spectrogram_transformer",
           "transformers.models.audio_spectrogram_transformer.feature_extraction_audio_spectrogram_transformer",
           "tqdm", "yaml", "av", "soundfile", "pycocoevalcap.cider.cider", "pycocoevalcap.bleu.bleu")
# Environment variables that the preloaded libraries read when imported: a job whose value differs from the
# server's is declined (the process runs it itself).
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_", "OMP_", "MKL_", "KMP_",
                   "OPENBLAS_", "GOTO_", "VECLIB_", "NUMEXPR_", "TOKENIZERS_", "PYTHON", "LD_PRELOAD",
                   "LD_LIBRARY_PATH")
# What Snakemake sets in a job's environment to the job's thread count (snakemake/shell.py); OpenMP and OpenBLAS
# read theirs when loaded, so a server serves the jobs of one thread count (``--threads``), the others run alone.
THREAD_ENV = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
_HEADER = struct.Struct("!Q")
# METEOR's shared JVM in a job forked by the server (see warm_meteor); None elsewhere.
_WARM_METEOR: tuple | None = None
_STATUS = struct.Struct("!idd")  # exit status, peak RSS (MB), CPU seconds of the job and what it waited for
# The job's last log line under the server (Snakemake's benchmark of the job measures the client process only);
# mmskip.report.build.read_benchmarks takes the peak RSS from it.
USAGE_LINE = "mmskip.worker: the job ran in the worker: peak RSS {rss:.1f} MB, CPU {cpu:.1f} s"


def _import_env(env) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}


def _interpreter() -> list[str]:
    return [os.path.realpath(sys.executable), sys.prefix, sys.version]


# ----------------------------------------------------------------------------------------------------- client


def forward(argv: list[str], socket_path: str | None = None) -> int | None:
    """Run ``mmskip *argv`` in the server at ``socket_path`` (default: ``$MMSKIP_WORKER``) and return its exit
    status; None when no server takes it (then the caller runs the command itself)."""
    socket_path = socket_path or os.environ.get(SOCKET_ENV)
    if not socket_path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError as err:
        sock.close()
        print(f"mmskip: no worker at {SOCKET_ENV}={socket_path} ({err.strerror}); running here", file=sys.stderr)
        return None
    umask = os.umask(0)
    os.umask(umask)
    request = json.dumps({"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path,
                          "umask": umask, "interpreter": _interpreter()}).encode()
    with sock:
        try:
            socket.send_fds(sock, [_HEADER.pack(len(request))], [0, 1, 2])
            sock.sendall(request)
        except OSError as err:  # a closed standard stream, or the server gone: nothing ran
            print(f"mmskip: could not hand this job to the worker ({err}); running here", file=sys.stderr)
            return None
        reply = _recv_exactly(sock, 1)
        if reply == b"D":
            reason = sock.makefile("rb").read().decode(errors="replace")
            print(f"mmskip: the worker declined this job ({reason}); running here", file=sys.stderr)
            return None
        if reply != b"A":  # the server went away before taking the job: nothing ran
            print(f"mmskip: the worker at {socket_path} closed the connection; running here", file=sys.stderr)
            return None
        status = _recv_exactly(sock, _STATUS.size)
        if len(status) < _STATUS.size:
            print(f"mmskip: the worker at {socket_path} stopped while running this job", file=sys.stderr)
            return 1
        code, rss, cpu = _STATUS.unpack(status)
        print(USAGE_LINE.format(rss=rss, cpu=cpu), file=sys.stderr)
        return code


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def warm_meteor():
    """In a job run by the server: (pycocoevalcap ``Meteor`` whose JVM the server started, the path of the lock file
    that serialises its use, holding b"C" while the JVM is between scores); None in any other process."""
    return _WARM_METEOR


# ----------------------------------------------------------------------------------------------------- server


class Server:
    """One listening socket, one forked child per job; single-threaded, so forking is safe."""

    def __init__(self, socket_path: str, preload=PRELOAD, log=sys.stderr, meteor: bool = True):
        self.path = socket_path
        self.log = log
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(socket_path)  # bound before the imports: early jobs queue instead of running alone
        self.listener.listen(128)
        self.env = _import_env(os.environ)  # before the imports, which set some (TORCHINDUCTOR_CACHE_DIR)
        start = time.perf_counter()
        self.preloaded = []
        for name in preload:
            try:
                __import__(name)
            except ImportError:
                continue
            self.preloaded.append(name)
        self.import_seconds = time.perf_counter() - start
        self.meteor = _start_meteor() if meteor else None
        self.meteor_lock = Path(socket_path).with_name(Path(socket_path).name + ".meteor-lock")
        if self.meteor is not None:
            self.meteor_lock.write_bytes(b"C")
        self.interpreter = _interpreter()
        self.jobs: dict[int, socket.socket] = {}  # child pid -> its client's connection
        self.served = self.declined = 0
        self.stopping = False

    def serve(self) -> None:
        print(f"mmskip.worker: {len(self.preloaded)} libraries imported in {self.import_seconds:.1f} s; "
              f"serving {self.path}", file=self.log, flush=True)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through the wakeup fd
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self.stopping:
                for key, _ in self.selector.select(timeout=1.0):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        os.read(wake_r, 4096)
                    else:  # a client's connection: readable means closed, its job was killed
                        self._kill(key.data)
                self._reap()
        finally:
            for pid in list(self.jobs):
                self._kill(pid)
            deadline = time.monotonic() + 10
            while self.jobs and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.05)
            signal.set_wakeup_fd(-1)
            if self.meteor is not None:
                self.meteor.meteor_p.kill()
                self.meteor.meteor_p.wait()
            print(f"mmskip.worker: served {self.served} jobs, declined {self.declined}", file=self.log, flush=True)

    def _stop(self, *_):
        self.stopping = True

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(30)
        fds: list[int] = []
        try:
            header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
            if len(fds) != 3:
                raise ValueError(f"a request with {len(fds)} descriptors, not 3")
            header += _recv_exactly(conn, _HEADER.size - len(header))
            size = _HEADER.unpack(header)[0] if len(header) == _HEADER.size else -1
            body = _recv_exactly(conn, size) if size >= 0 else b""
            if len(body) != size:
                raise ValueError("a request cut short")
            request = json.loads(body)
            reason = self._refusal(request)
            if reason:
                self.declined += 1
                conn.sendall(b"D" + reason.encode())
        except (OSError, ValueError) as err:
            print(f"mmskip.worker: bad request: {err}", file=self.log, flush=True)
            reason = "bad request"
        if reason:  # the job is not taken: its streams and connection are closed here
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        self.log.flush()
        pid = os.fork()
        if pid == 0:
            self._child(request, fds, conn)  # never returns
        for fd in fds:
            os.close(fd)
        conn.settimeout(None)
        conn.sendall(b"A")
        self.jobs[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)
        self.served += 1

    def _refusal(self, request: dict) -> str:
        if request.get("interpreter") != self.interpreter:
            return f"another interpreter: {request.get('interpreter')}, the worker's {self.interpreter}"
        env = _import_env(request.get("env", {}))
        differ = sorted(k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k))
        if differ:
            return f"environment variables read at import differ from the worker's: {', '.join(differ)}"
        return ""

    def _child(self, request: dict, fds: list[int], conn: socket.socket) -> None:
        code = 1
        try:
            os.setpgid(0, 0)  # its own process group: the server kills the job with whatever it started
            _die_with_parent()
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            self.selector.close()
            self.listener.close()
            conn.close()
            for other in self.jobs.values():
                other.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=os.isatty(1))
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True,
                                          errors="backslashreplace")
            sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            os.umask(request["umask"])
            tempfile.tempdir = None  # found again from the job's TMPDIR (Snakemake sets it), not the server's
            sys.path[:] = request["path"]
            sys.argv = ["mmskip", *request["argv"]]
            from mmskip.cli import main
            import mmskip.worker

            if self.meteor is not None:
                mmskip.worker._WARM_METEOR = (self.meteor, self.meteor_lock)
            try:
                main(request["argv"])
                code = 0
            except SystemExit as exit_:
                code = _exit_code(exit_.code)
        except BaseException:  # noqa: BLE001 - reported on the job's stderr, as an uncaught exception would be
            traceback.print_exc()
            code = 1
        finally:
            try:
                atexit._run_exitfuncs()  # what interpreter shutdown runs (logging's flush among them)
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _kill(self, pid: int) -> None:
        """Its client is gone (or the server stops): the job's process group is terminated."""
        conn = self.jobs.get(pid)
        if conn is None:
            return
        try:
            self.selector.unregister(conn)  # once: a closed connection stays readable
        except KeyError:
            pass
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        while self.jobs:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.jobs.pop(pid, None)
            if conn is None:
                continue
            try:
                self.selector.unregister(conn)
            except KeyError:  # killed: unregistered then
                pass
            code = os.waitstatus_to_exitcode(status)
            try:
                conn.sendall(_STATUS.pack(code if code >= 0 else 128 - code,  # killed by signal N: 128 + N
                                          usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime))
            except OSError:
                pass
            conn.close()


def _start_meteor():
    """pycocoevalcap's METEOR scorer (its JVM loads while the first jobs run), or None without it or java."""
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        return None
    return Meteor() if shutil.which("java") else None


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _die_with_parent() -> None:
    """Linux: the child is killed when the server dies, so no job outlives the run that started it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------------- wrapper


def run(command: list[str], threads: int | None = None, log=sys.stderr) -> int:
    """Run ``command`` with a server for its ``mmskip`` jobs; the server is stopped (by PID) when it ends.

    ``threads``: the server imports its libraries in the environment Snakemake gives a job of that many threads
    (``THREAD_ENV``), so it serves those jobs; None: in this environment (``dvc repro``, which sets none)."""
    with tempfile.TemporaryDirectory(prefix="mmskip-worker-") as folder:
        path = str(Path(folder) / "socket")
        env = dict(os.environ) if threads is None else {**os.environ, **{k: str(threads) for k in THREAD_ENV}}
        server = subprocess.Popen([sys.executable, "-m", "mmskip.worker", "--serve", path], stdin=subprocess.DEVNULL,
                                  env=env, start_new_session=True)  # Ctrl-C reaches the command, not the server
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(path):
                if server.poll() is not None or time.monotonic() > deadline:
                    print(f"mmskip.worker: the server did not start (exit {server.poll()}); running without it",
                          file=log, flush=True)
                    return subprocess.call(command)
                time.sleep(0.02)
            return subprocess.call(command, env={**os.environ, SOCKET_ENV: path})
        except KeyboardInterrupt:
            return 130
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmskip.worker", description=__doc__.splitlines()[0],
                                     usage="python -m mmskip.worker -- COMMAND [ARGS...]")
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)  # the server (started by the wrapper)
    parser.add_argument("--no-meteor", action="store_true", help=argparse.SUPPRESS)  # the server without METEOR
    parser.add_argument("--threads", type=int, default=None,
                        help="serve the jobs Snakemake runs with this many threads (it sets OMP_NUM_THREADS and the "
                             "like to a job's count, and the libraries read them when imported; jobs of other counts "
                             "run alone). Default: jobs whose environment is this one's, as `dvc repro` runs them")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run with warm starts")
    args = parser.parse_args(argv)
    if args.serve:
        Server(args.serve, meteor=not args.no_meteor).serve()
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command to run is required, e.g. python -m mmskip.worker -- snakemake --cores all")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: a number of threads is at least 1")
    return run(command, threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())
