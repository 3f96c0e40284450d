"""The report's lineage: DVC-identical hashes of every stage's artifacts, checked against dvc.lock,
the parameters each stage declares, the stages upstream of it, the code version, and the machine
(what decides float results: CPU kernels, GPU, threads, math libraries)."""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import textwrap

import pytest
import torch
import yaml

from mmskip.report import lineage as lineage_module
from mmskip.report.build import _machine_rows
from mmskip.report.lineage import (BEING_WRITTEN, DIFFERS, MATCHES, MISSING, NO_LOCK, code_version, lineage, machine,
                                   stage_threads, tool_versions)
from test_report import _make_inputs, _run_report
from workflow_utils import BIN, REPO, check, run

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
        cmd: python use.py --threads 2
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
    assert (_stage(result, "make")["threads"], _stage(result, "use")["threads"]) == (None, 2)


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
    assert "14. Lineage" in html and "Every hash is checked against <code>dvc.lock</code>" in html
    folder = _artifact(_stage(written, "make"), "outs", "out/dir")
    assert folder["md5"] in html and "make.n = 5" in html and "Upstream stages: make, use." in html
    assert written["machine"] == machine()
    assert (f"<tr><th>torch CPU kernels (CPU capability)</th><td>{torch.backends.cpu.get_cpu_capability()}</td></tr>"
            in html)
    assert (f"<tr><th>torch threads</th><td>default {torch.get_num_threads()} (stages without --threads: make, "
            "report); --threads 2: 1 stage</td></tr>") in html
    assert f"<tr><th>operating system</th><td>{platform.platform()}</td></tr>" in html
    html_again, _ = _run_report(inputs, tmp_path / "again", lineage_root=project)
    assert html_again == html  # deterministic
    with pytest.raises(ValueError, match="needs lineage_root"):
        _run_report(inputs, tmp_path / "bad", lineage_path=tmp_path / "bad/lineage.json")
    assert not (tmp_path / "bad/all.html").exists()


def _cpuinfo_model() -> str | None:
    """The first "model name" of /proc/cpuinfo, read here independently of the lineage module."""
    try:
        match = re.search(r"^model name\s*:\s*(.*)$", open("/proc/cpuinfo", encoding="utf-8").read(), re.MULTILINE)
    except OSError:
        return None
    return match.group(1).strip() if match else None


def test_machine_block_equals_what_torch_and_platform_report(project):
    block = lineage(project)["machine"]
    assert set(block) == {"cpu_capability", "machine", "processor", "os", "torch_threads_default", "cuda",
                          "torch_build"}
    assert block["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(block["cpu_capability"], str) and block["cpu_capability"]
    assert block["torch_threads_default"] == torch.get_num_threads() >= 1
    assert (block["machine"], block["os"]) == (platform.machine(), platform.platform())
    assert block["processor"] == (platform.processor() or _cpuinfo_model())
    assert (block["cuda"] is None) == (not torch.cuda.is_available())
    show = torch.__config__.show()
    build = block["torch_build"]
    assert set(build) == {"built_with", "blas", "lapack", "parallel_backend"}
    assert build["blas"] == re.search(r"BLAS_INFO=(\w+)", show).group(1)
    assert build["lapack"] == re.search(r"LAPACK_INFO=(\w+)", show).group(1)
    assert build["parallel_backend"] == re.search(r"ATen parallel backend: (\w+)",
                                                  torch.__config__.parallel_info()).group(1)
    # every "built with" line of torch's config, in its order, without the compiler flags
    assert build["built_with"] == [line.strip()[2:] for line in show.splitlines()
                                   if line.startswith("  - ") and "Build settings" not in line]
    assert build["built_with"] and not any("CXX_FLAGS" in line for line in build["built_with"])
    json.dumps(block)  # JSON as it is: lineage.json holds it
    assert lineage(project)["machine"] == block  # deterministic


def test_cuda_devices_are_named_with_their_capability(monkeypatch):
    names, capabilities = ["NVIDIA H200", "NVIDIA A100-SXM4-80GB"], [(9, 0), (8, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: names[i])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    block = machine()
    assert block["cuda"] == {"cuda_version": "12.4", "cudnn_version": 90100,
                             "devices": [{"name": "NVIDIA H200", "capability": "9.0"},
                                         {"name": "NVIDIA A100-SXM4-80GB", "capability": "8.0"}]}
    rows = dict(_machine_rows(block, [{"name": "a", "threads": 1}, {"name": "b", "threads": 1},
                                      {"name": "c", "threads": 4}]))
    assert rows["GPU"] == ("NVIDIA H200 (compute capability 9.0); NVIDIA A100-SXM4-80GB (compute capability 8.0); "
                           "CUDA 12.4, cuDNN 90100")
    assert rows["torch threads"] == f"default {torch.get_num_threads()}; --threads 1: 2 stages; --threads 4: 1 stage"


def test_processor_falls_back_to_cpuinfo_model_name(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: Test\nmodel name\t: Test CPU 9000 @ 3.0GHz\n\n"
                       "processor\t: 1\nmodel name\t: Test CPU 9000 @ 3.0GHz\n")
    monkeypatch.setattr(lineage_module, "CPUINFO", cpuinfo)
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert machine()["processor"] == "Test CPU 9000 @ 3.0GHz"
    cpuinfo.unlink()
    assert machine()["processor"] is None
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert machine()["processor"] == "arm"


@pytest.mark.parametrize(("cmd", "threads"), [
    ("mmskip evaluate --threads 1 --task vqa", 1),
    ("mmskip bench_skip --threads 2", 2),
    ("mmskip x --threads=3 --y z", 3),
    ("mmskip x --threads 1 --threads 4", 4),  # argparse keeps the last
    ("mmskip x --threads 0", None),  # 0: mmskip leaves torch at its default
    ("mmskip report --params params.yaml", None),
    ("mmskip x --threadsx 2", None),
    (["mmskip", "x", "--threads", "2"], 2),
])
def test_stage_threads_read_from_the_command(cmd, threads):
    assert stage_threads(cmd) == threads


def test_every_torch_stage_of_the_pipeline_states_its_threads():
    """dvc.yaml as written: only the stages that never run torch leave the thread count to torch."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    commands = {name: (stage.get("do") or stage)["cmd"] for name, stage in stages.items()}
    assert {name for name, cmd in commands.items() if stage_threads(cmd) is None} == {
        "make_scenes", "make_clips", "make_sounds", "train_tokenizer", "report"}  # the data stages run no torch
    assert {stage_threads(cmd) for cmd in commands.values()} == {None, 1, 2}
