"""Session set-up: two pipeline runs go in the background for the whole session.

- ``elsewhere``: the smoke pipeline's clean `dvc repro` (tests/test_pipeline_smoke.py compares its artifacts
  with the Snakemake run's, byte for byte). DVC runs one stage at a time, so it leaves a core of this 2-core
  machine free.
- ``slurm_session``: the single-node SLURM cluster and its two `snakemake --profile slurm` runs
  (tests/test_slurm.py). Their jobs are short and wait for the plugin's status polls, so the node is mostly idle.

Each starts with the session's first test, when any collected test needs it, and runs beside the other
tests; the tests that wait for them are moved to the end of the session (marker ``waits_for_background``),
so that everything else runs before they wait.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from workflow_utils import BIN, REPO, check, copy_workflow, git, run, tool_env, write_params, write_stages

BACKGROUND = ["slurm_session", "elsewhere"]  # the fixtures holding the background runs


def pytest_configure(config):
    config.addinivalue_line("markers", "waits_for_background: waits for a background run; runs after every other test")


def pytest_collection_modifyitems(session, config, items):
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
