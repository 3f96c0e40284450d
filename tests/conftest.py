"""Session set-up: two pipeline runs go in the background for the whole session.

- ``elsewhere``: the smoke pipeline's clean `dvc repro` (tests/test_pipeline_smoke.py compares its artifacts
  with the Snakemake run's, byte for byte). DVC runs one stage at a time, so it leaves a core of this 2-core
  machine free.
- ``slurm_session``: the single-node SLURM cluster and its two `snakemake --profile slurm` runs
  (tests/test_slurm.py). Their jobs are short and wait for the plugin's status polls, so the node is mostly idle.

Each starts with the session's first test, when any collected test needs it, and runs beside the other
tests; the tests that wait for them are moved to the end of the session (marker ``waits_for_background``),
so that everything else runs before they wait.

`make test` runs the suite as two sessions side by side, one per core (``--shard 1`` and ``--shard 2``):
``SECOND_SHARD`` puts each test file in one, balanced by measured time, so each background run starts in the
one session that needs it. A plain `pytest` runs every file in one session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# One torch thread per test process, and sleeping, not spinning, OpenMP workers in every process the tests start
# (set before torch is imported, and inherited): each session has one core, beside the other session and the
# background runs. Two spinning threads on a shared core ran a test 2 to 10 times slower (the video encoder's
# learning check: 42 s alone, 131 s beside one busy process, 73 s there on one thread). Results do not change:
# every pipeline command sets its thread count with --threads, and the wait policy changes no arithmetic.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from workflow_utils import BIN, REPO, check, copy_workflow, git, run, tool_env, write_params, write_stages

BACKGROUND = ["slurm_session", "elsewhere"]  # the fixtures holding the background runs

# The files of `make test`'s second session (`--shard 2`); every other file runs in the first. Chosen by measured
# time: in a clean clone at stop 36's slow hour the first session took 55 min and the second 45 (the paper-mini run
# 18.5 min, the third-task run 12); with test_resume, test_lineage and test_report moved here, 54 and 52 min.
SECOND_SHARD = {
    "test_slurm.py", "test_paper_mini.py", "test_tasks.py", "test_skipping.py", "test_skipping_official.py",
    "test_skipping_llava.py", "test_llava_eval.py", "test_model_seam.py", "test_compression.py", "test_baseline.py",
    "test_download.py", "test_hub.py", "test_hub_datasets.py", "test_coco.py", "test_msrvtt.py", "test_clotho.py",
    "test_audiocaps.py", "test_resume.py", "test_lineage.py", "test_report.py",
}


def pytest_addoption(parser):
    parser.addoption("--shard", choices=["1", "2"], default=None,
                     help="run only this one of make test's two sessions (tests/conftest.py, SECOND_SHARD)")


def pytest_configure(config):
    config.addinivalue_line("markers", "waits_for_background: waits for a background run; runs after every other test")


def pytest_collection_modifyitems(session, config, items):
    shard = config.getoption("--shard")
    if shard:
        unknown = SECOND_SHARD - {item.path.name for item in items}
        if unknown and config.args_source is pytest.Config.ArgsSource.TESTPATHS:  # the whole suite was collected
            raise pytest.UsageError(f"SECOND_SHARD names files with no tests: {sorted(unknown)}")
        second = [item.path.name in SECOND_SHARD for item in items]
        config.hook.pytest_deselected(items=[item for item, s in zip(items, second) if s != (shard == "2")])
        items[:] = [item for item, s in zip(items, second) if s == (shard == "2")]
    waiting = [item for item in items if item.get_closest_marker("waits_for_background")]
    items[:] = [item for item in items if item not in waiting] + waiting


@pytest.fixture(scope="session", autouse=True)
def _start_background_runs(request):
    """Start the background runs at the session's first test, those a collected test needs."""
    needed = {name for item in request.session.items for name in item.fixturenames}
    for name in BACKGROUND:
        if name in needed:
            request.getfixturevalue(name)


@pytest.fixture(scope="session")
def elsewhere(tmp_path_factory):
    """A clean clone-like copy of the workflow with the smoke params (git and DVC initialised, committed)
    and its `dvc repro`, started now: (folder, process, log file). Killed at the session's end if it still
    runs (a failing test left it)."""
    from test_pipeline_smoke import smoke_params

    other = copy_workflow(tmp_path_factory.mktemp("dvc-clean"))
    write_params(other / "params.yaml", smoke_params())
    write_stages(other)  # for the smoke run's tasks
    shutil.copy(REPO / ".gitignore", other / ".gitignore")  # pipeline outputs stay out of git, as in a clone
    git(other, "init", "-q")  # a git repository: `dvc exp` needs one
    check(run([BIN / "dvc", "init", "--quiet"], cwd=other))
    shutil.copy(REPO / ".dvc" / "config", other / ".dvc" / "config")  # the project's settings, as a clone has them
    git(other, "add", "-A")
    git(other, "commit", "-qm", "clean clone")
    log = open(other.parent / "dvc-repro.log", "w", encoding="utf-8")
    repro = subprocess.Popen([str(BIN / "dvc"), "repro", "--quiet"], cwd=other, env=tool_env(), stdout=log,
                             stderr=subprocess.STDOUT)
    yield other, repro, Path(log.name)
    if repro.poll() is None:
        repro.kill()
        repro.wait()
    log.close()


@pytest.fixture(scope="session")
def slurm_session(tmp_path_factory):
    """The SLURM cluster and both its runs, started now (test_slurm.SlurmSession); stopped at the session's end."""
    from test_slurm import start_slurm_session

    with start_slurm_session(tmp_path_factory) as session:
        yield session
