"""The report's lineage: DVC-identical hashes of every stage's artifacts, checked against dvc.lock,
the parameters each stage declares, the stages upstream of it, and the code version."""

from __future__ import annotations

import hashlib
import json
import subprocess
import textwrap

import pytest
import yaml

from mmskip.report.lineage import (BEING_WRITTEN, DIFFERS, MATCHES, MISSING, NO_LOCK, code_version, lineage,
                                   tool_versions)
from test_report import _make_inputs, _run_report
from workflow_utils import BIN, check, run

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DVC_YAML = textwrap.dedent("""\
    stages:
      make:
        cmd: python make.py ${make.n}
        deps:
          - make.py
        params:
          - make.n
        outs:
          - out/a.txt
          - out/dir
      use:
        cmd: python use.py
        deps:
          - use.py
          - out/a.txt
          - out/dir
        params:
          - use
        outs:
          - b.txt
      report:
        cmd: python use.py report
        deps:
          - b.txt
        outs:
          - r.txt
    """)
MAKE = textwrap.dedent("""\
    import pathlib, sys
    n = int(sys.argv[1])
    pathlib.Path("out/dir/sub").mkdir(parents=True, exist_ok=True)
    pathlib.Path("out/a.txt").write_text("a" * n)
    pathlib.Path("out/dir/x.bin").write_bytes(bytes(range(n)))
    pathlib.Path("out/dir/sub/y.txt").write_text("y")
    """)
USE = textwrap.dedent("""\
    import pathlib, sys
    if sys.argv[1:] == ["report"]:
        pathlib.Path("r.txt").write_text(pathlib.Path("b.txt").read_text() + "!")
    else:
        pathlib.Path("b.txt").write_text(pathlib.Path("out/a.txt").read_text().upper())
    """)


@pytest.fixture
def project(tmp_path):
    """A tiny DVC project (no SCM) reproduced once, so dvc.lock holds DVC's own hashes."""
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"make": {"n": 5, "unused": 1}, "use": {"k": "v", "m": [1]}}))
    (tmp_path / "make.py").write_text(MAKE)
    (tmp_path / "use.py").write_text(USE)
    check(run([BIN / "dvc", "init", "--no-scm", "--quiet"], cwd=tmp_path))
    check(run([BIN / "dvc", "repro", "--quiet"], cwd=tmp_path))
    return tmp_path


def _stage(result, name):
    (stage,) = [s for s in result["stages"] if s["name"] == name]
    return stage


def _artifact(stage, role, path):
    (artifact,) = [a for a in stage[role] if a["path"] == path]
    return artifact


def test_hashes_equal_dvc_lock_and_file_md5(project):
    result = lineage(project, current_stage="none")
    assert result["dvc_lock"] is True
    artifacts = [a for s in result["stages"] for a in (*s["deps"], *s["outs"])]
    assert len(artifacts) == 9 and {a["status"] for a in artifacts} == {MATCHES}
    a_txt = _artifact(_stage(result, "make"), "outs", "out/a.txt")
    assert a_txt["md5"] == hashlib.md5(b"aaaaa").hexdigest() and a_txt["size"] == 5 and a_txt["nfiles"] is None
    folder = _artifact(_stage(result, "make"), "outs", "out/dir")
    assert folder["md5"].endswith(".dir") and folder["nfiles"] == 2 and folder["size"] == 6
    # a folder hash is the one dvc.lock holds for it, and so DVC's own
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert folder["md5"] == [o for o in lock["stages"]["make"]["outs"] if o["path"] == "out/dir"][0]["md5"]


def test_params_upstream_and_the_stage_being_written(project):
    result = lineage(project, current_stage="report")
    assert _stage(result, "make")["params"] == {"make.n": 5}  # only what the stage declares
    assert _stage(result, "use")["params"] == {"use.k": "v", "use.m": [1]}
    assert _stage(result, "make")["upstream"] == []
    assert _stage(result, "use")["upstream"] == ["make"]
    assert _stage(result, "report")["upstream"] == ["make", "use"]
    (out,) = _stage(result, "report")["outs"]
    assert (out["status"], out["md5"]) == (BEING_WRITTEN, None)
    assert _stage(result, "make")["cmd"] == "python make.py 5"


def test_a_changed_artifact_differs_from_the_lock_and_a_removed_one_is_missing(project):
    (project / "out/a.txt").write_text("changed")
    (project / "b.txt").unlink()
    result = lineage(project, current_stage="none")
    for stage, role in (("make", "outs"), ("use", "deps")):
        changed = _artifact(_stage(result, stage), role, "out/a.txt")
        assert changed["status"] == DIFFERS and changed["md5"] == hashlib.md5(b"changed").hexdigest()
        assert changed["lock_md5"] == hashlib.md5(b"aaaaa").hexdigest()
    assert _artifact(_stage(result, "use"), "outs", "b.txt")["status"] == MISSING
    assert result["status_counts"] == {MATCHES: 5, DIFFERS: 2, MISSING: 2}
    (project / "dvc.lock").unlink()
    assert {a["status"] for s in lineage(project)["stages"] for a in s["deps"]} <= {NO_LOCK, MISSING}


def test_lineage_does_not_depend_on_the_folder(project, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere") / "copy"
    subprocess.run(["cp", "-a", str(project), str(other)], check=True)
    assert lineage(other) == lineage(project)


def test_no_dvc_yaml_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"dvc.yaml not found"):
        lineage(tmp_path)


def _git(path, *args):
    subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_code_version_names_commit_and_dirty_paths(tmp_path):
    assert code_version(tmp_path) == {"git_commit": None, "dirty": None, "dirty_paths": [],
                                      "note": "not a git checkout"}
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "c")
    commit = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # a product of the pipeline, not code
    assert code_version(tmp_path) == {"git_commit": commit, "dirty": False, "dirty_paths": [], "note": "clean"}
    (tmp_path / "code.py").write_text("x = 2\n")
    (tmp_path / "new.py").write_text("")
    version = code_version(tmp_path)
    assert version["dirty"] is True and version["dirty_paths"] == ["code.py", "new.py"]


def test_tool_versions_name_the_pipeline_tools():
    versions = tool_versions()
    assert {"python", "torch", "transformers", "snakemake", "dvc", "mmskip"} <= set(versions)
    assert all(versions[name] for name in ("torch", "transformers", "snakemake", "dvc"))


def test_report_writes_lineage_json_and_section(tmp_path, project):
    inputs = _make_inputs(tmp_path / "run")
    html, _ = _run_report(inputs, tmp_path / "out", lineage_root=project, lineage_path=tmp_path / "out/lineage.json")
    written = json.loads((tmp_path / "out/lineage.json").read_text())
    assert [s["name"] for s in written["stages"]] == ["make", "report", "use"]
    assert "11. Lineage" in html and "Every hash is checked against <code>dvc.lock</code>" in html
    folder = _artifact(_stage(written, "make"), "outs", "out/dir")
    assert folder["md5"] in html and "make.n = 5" in html and "Upstream stages: make, use." in html
    html_again, _ = _run_report(inputs, tmp_path / "again", lineage_root=project)
    assert html_again == html  # deterministic
    with pytest.raises(ValueError, match="needs lineage_root"):
        _run_report(inputs, tmp_path / "bad", lineage_path=tmp_path / "bad/lineage.json")
    assert not (tmp_path / "bad/all.html").exists()
