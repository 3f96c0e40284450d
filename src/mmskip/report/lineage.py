"""The report's lineage: where every result came from.

For every stage of ``dvc.yaml`` (the same stages as the Snakemake rules; a test keeps the two
graphs equal): its command, the values of the parameters it declares, and the content hash of
every artifact it reads and writes, plus the stages upstream of it. Hashes are computed the way
DVC computes them (``dvc_data``'s md5 build, honouring ``.dvcignore``), so they are the values
``dvc.lock`` holds; when ``dvc.lock`` is present every hash is checked against it.

Also the code version (git commit, and whether tracked or untracked files differ from it), the
versions of the tools that ran the pipeline, and the machine: what decides the float results
beyond code and params (the CPU kernels torch dispatches to, the GPU, thread counts, the math
libraries torch was built with). Same params on the same machine give the same bytes; on another
CPU or GPU the floats differ, and this block names why. Nothing here depends on the folder the
pipeline ran in: paths are relative to the repository root.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

log = logging.getLogger(__name__)

PACKAGES = ("mmskip", "torch", "transformers", "tokenizers", "snakemake", "dvc", "pycocoevalcap")
# Products of the pipeline itself, not of the code: a tree whose only changes are these is clean.
NOT_CODE = ("dvc.lock",)
MAX_DIRTY_LISTED = 20
# Every torch command of the pipeline gets its thread count as a literal `--threads N`.
THREADS_FLAG = re.compile(r"(?:^|\s)--threads[= ](\d+)(?=\s|$)")
CPUINFO = Path("/proc/cpuinfo")

# Status of an artifact's hash against dvc.lock.
MATCHES, DIFFERS, NOT_LOCKED, NO_LOCK, MISSING, BEING_WRITTEN = (
    "matches dvc.lock", "differs from dvc.lock", "not in dvc.lock", "no dvc.lock", "missing", "written by this stage")


@dataclass
class Artifact:
    path: str
    md5: str | None  # DVC's md5: of the bytes for a file, ".dir"-suffixed for a folder; None if absent
    size: int | None
    nfiles: int | None  # files in a folder; None for a file
    lock_md5: str | None
    status: str


@dataclass
class StageLineage:
    name: str  # dvc.yaml address, e.g. evaluate@vqa-baseline (= the Snakemake rule and wildcards)
    cmd: str
    params: dict[str, Any]  # dotted key -> value, as declared by the stage
    deps: list[Artifact]
    outs: list[Artifact]
    upstream: list[str] = field(default_factory=list)  # every stage whose outputs this one reads, transitively
    threads: int | None = None  # the command's `--threads N` (torch's intra-op threads); None: it passes none


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def code_version(root: Path) -> dict[str, Any]:
    """Git commit of ``root`` and whether its tree differs from it (``dvc.lock`` aside)."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "dirty": None, "dirty_paths": [], "note": "not a git checkout"}
    status = _git(root, "status", "--porcelain", "--untracked-files=normal", "--", ".",
                  *(f":(exclude){p}" for p in NOT_CODE)) or ""
    paths = sorted(line[3:] for line in status.splitlines() if line.strip())
    return {"git_commit": commit.strip(), "dirty": bool(paths), "dirty_paths": paths[:MAX_DIRTY_LISTED],
            "note": f"{len(paths)} paths differ from the commit" if paths else "clean"}


def tool_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def stage_threads(cmd: str | list[str]) -> int | None:
    """The ``--threads N`` of a stage's command: the last one, as argparse reads it; None when it
    passes none or 0 (``mmskip`` then leaves torch at its default, ``torch_threads_default``)."""
    found = THREADS_FLAG.findall(cmd if isinstance(cmd, str) else " ".join(cmd))
    return (int(found[-1]) or None) if found else None


def _processor() -> str | None:
    """The CPU's name: ``platform.processor()``, or on Linux (where that is often empty) the
    ``model name`` of /proc/cpuinfo."""
    if platform.processor():
        return platform.processor()
    try:
        lines = CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    names = [line.partition(":")[2].strip() for line in lines if line.partition(":")[0].strip() == "model name"]
    return names[0] if names else None


def torch_build() -> dict[str, Any]:
    """The math libraries torch was built with, from ``torch.__config__.show()`` (its ``- ...`` lines,
    without the compiler flags of "Build settings"), its BLAS/LAPACK and its parallel backend."""
    import torch

    show = torch.__config__.show()
    lines = [line.strip()[2:] for line in show.splitlines() if line.strip().startswith("- ")]
    settings = dict(re.findall(r"\b(BLAS_INFO|LAPACK_INFO)=([^,\s]*)", show))
    backend = re.search(r"^ATen parallel backend: (.+)$", torch.__config__.parallel_info(), re.MULTILINE)
    return {"built_with": [line for line in lines if not line.startswith("Build settings")],
            "blas": settings.get("BLAS_INFO"), "lapack": settings.get("LAPACK_INFO"),
            "parallel_backend": backend.group(1).strip() if backend else None}


def machine() -> dict[str, Any]:
    """What decides float results besides code and params, as seen by this process.

    ``cpu_capability`` is the SIMD level torch's CPU kernels dispatch to (e.g. AVX2, AVX512);
    ``torch_threads_default`` the intra-op thread count a torch command without ``--threads`` gets;
    ``cuda`` is None without a usable CUDA device.
    """
    import torch

    cuda = None
    if torch.cuda.is_available():
        cuda = {"cuda_version": torch.version.cuda, "cudnn_version": torch.backends.cudnn.version(),
                "devices": [{"name": torch.cuda.get_device_name(i),
                             "capability": "{}.{}".format(*torch.cuda.get_device_capability(i))}
                            for i in range(torch.cuda.device_count())]}
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "processor": _processor(), "os": platform.platform(), "torch_threads_default": torch.get_num_threads(),
            "cuda": cuda, "torch_build": torch_build()}


def _lock_hashes(lock_path: Path) -> dict[str, dict[str, str]] | None:
    """stage -> {path: md5} from dvc.lock (deps and outs), or None without a lock file."""
    if not lock_path.is_file():
        return None
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    if not isinstance(lock, dict) or not isinstance(lock.get("stages", {}), dict):
        raise ValueError(f"{lock_path}: expected a dvc.lock with a 'stages' mapping")
    hashes = {}
    for name, stage in lock.get("stages", {}).items():
        entries = [*(stage.get("deps") or []), *(stage.get("outs") or [])]
        hashes[name] = {e["path"]: e["md5"] for e in entries if "md5" in e}
    return hashes


def _lock_outs(lock_path: Path) -> dict[str, str]:
    """path -> md5 of every stage output recorded in dvc.lock ({} without one)."""
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    return {o["path"]: o["md5"] for stage in (lock.get("stages") or {}).values() for o in (stage.get("outs") or [])
            if "md5" in o}


class _Hasher:
    """DVC's md5 of files and folders under ``root``, each path hashed once."""

    def __init__(self, root: Path, ignore) -> None:
        from dvc_data.hashfile.db import HashFileDB
        from dvc_objects.fs.local import LocalFileSystem
        from dvc_objects.fs.memory import MemoryFileSystem

        self.root, self.ignore, self.fs = root, ignore, LocalFileSystem()
        self.odb = HashFileDB(MemoryFileSystem(), "/lineage")  # dry run: nothing is stored
        self.cache: dict[str, tuple[str | None, int | None, int | None]] = {}

    def __call__(self, rel: str) -> tuple[str | None, int | None, int | None]:
        if rel not in self.cache:
            from dvc_data.hashfile.build import build

            path = self.root / rel
            if not path.exists():
                self.cache[rel] = (None, None, None)
            else:
                _, meta, obj = build(self.odb, str(path), self.fs, "md5", dry_run=True, ignore=self.ignore)
                self.cache[rel] = (obj.hash_info.value, meta.size, meta.nfiles if path.is_dir() else None)
        return self.cache[rel]


# what the lineage's stages are (its "config"): dvc.yaml with params.yaml; dvc.yaml's stages with the run's
# own parameters (Snakemake's --config or a --configfile that keeps the stages); or those of the dvc.yaml
# generated for the run's config (a --configfile with other stages: a paper config)
CONFIG_DVC_YAML = "dvc.yaml"
CONFIG_RUN_PARAMS = "dvc.yaml, with this run's parameters"
CONFIG_GENERATED = "generated for this run's config"


def lineage(root: Path, current_stage: str = "report", params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The lineage of every stage of ``root/dvc.yaml``; ``current_stage``'s outputs are being written.

    ``params``: the config the run used, when it may differ from ``root/params.yaml`` (Snakemake's
    ``--configfile``). Where its stage table is not the one dvc.yaml holds (a paper config), the stages,
    commands and parameters are those of the dvc.yaml generated for it (``mmskip.stages.render_dvc_yaml``),
    read beside that config in a temporary folder; the artifacts are hashed under ``root`` as ever, and
    dvc.lock, which locks other stages, is not compared. Where only parameters differ, the stages are
    dvc.yaml's, their parameters the run's (``config`` in the result says which)."""
    import tempfile

    from mmskip.stages import render_dvc_yaml

    root = Path(root).resolve()
    if not (root / "dvc.yaml").is_file():
        raise ValueError(f"{root / 'dvc.yaml'} not found: lineage reads the stage definitions from it")
    if params is not None and (root / "params.yaml").is_file() \
            and yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) == params:
        params = None  # the run's config is params.yaml's: dvc.yaml describes it
    if not (root / "src" / "mmskip" / "stages.py").is_file():
        params = None  # no stage table to generate another dvc.yaml from: dvc.yaml as it is
    if params is None:
        return {**_lineage(root, root, current_stage, use_lock=True), "config": CONFIG_DVC_YAML}
    text = render_dvc_yaml(root, params)
    same_stages = text == (root / "dvc.yaml").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="mmskip-lineage-") as tmp:  # the stages, beside this run's params
        (Path(tmp) / "dvc.yaml").write_text(text, encoding="utf-8")
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False), encoding="utf-8")
        return {**_lineage(Path(tmp), root, current_stage, use_lock=same_stages),
                "config": CONFIG_RUN_PARAMS if same_stages else CONFIG_GENERATED}


def _lineage(definitions: Path, root: Path, current_stage: str, use_lock: bool) -> dict[str, Any]:
    """The lineage of the stages of ``definitions/dvc.yaml`` over the artifacts under ``root``."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    from mmskip.report.build import _flatten  # here: build imports this module

    locked, locked_outs = (_lock_hashes(root / "dvc.lock"), _lock_outs(root / "dvc.lock")) if use_lock else (None, {})
    stages = []
    with Repo(str(root), uninitialized=True) as root_repo:
        ignore = root_repo.dvcignore
    with Repo(str(definitions), uninitialized=True) as repo:
        hasher = _Hasher(root, ignore)
        index = repo.index
        graph = index.graph  # edges: stage -> the stages it depends on
        import networkx as nx

        for stage in sorted(index.stages, key=lambda s: s.name):
            name = stage.name  # not .addressing: that is prefixed with dvc.yaml's path outside the cwd
            lock = None if locked is None else locked.get(name, {})
            params: dict[str, Any] = {}
            deps, outs = [], []
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    values = dep.read_params()
                    params.update(_flatten({k: values.get(k) for k in dep.params}))
                    continue
                # A stage that has not been locked yet (the one running now) is checked against the
                # lock entry of the stage that wrote the artifact.
                if lock is not None and dep.def_path not in lock and dep.def_path in locked_outs:
                    deps.append(_artifact(dep.def_path, hasher, {dep.def_path: locked_outs[dep.def_path]}))
                else:
                    deps.append(_artifact(dep.def_path, hasher, lock))
            for out in stage.outs:
                if name == current_stage:
                    outs.append(Artifact(out.def_path, None, None, None, None, BEING_WRITTEN))
                else:
                    outs.append(_artifact(out.def_path, hasher, lock))
            upstream = sorted(s.name for s in nx.descendants(graph, stage))
            stages.append(StageLineage(name, stage.cmd, params, deps, outs, upstream, stage_threads(stage.cmd)))
    artifacts = [a for s in stages for a in (*s.deps, *s.outs)]
    counts = {status: sum(a.status == status for a in artifacts)
              for status in (MATCHES, DIFFERS, NOT_LOCKED, NO_LOCK, MISSING, BEING_WRITTEN)}
    return {"code": code_version(root), "versions": tool_versions(), "machine": machine(),
            "dvc_lock": locked is not None,
            "status_counts": {k: v for k, v in counts.items() if v},
            "stages": [asdict(s) for s in stages]}


def _artifact(path: str, hasher: _Hasher, lock: dict[str, str] | None) -> Artifact:
    md5, size, nfiles = hasher(path)
    lock_md5 = None if lock is None else lock.get(path)
    if md5 is None:
        status = MISSING
    elif lock is None:
        status = NO_LOCK
    elif lock_md5 is None:
        status = NOT_LOCKED
    else:
        status = MATCHES if lock_md5 == md5 else DIFFERS
    return Artifact(path, md5, size, nfiles, lock_md5, status)
