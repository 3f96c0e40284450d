"""The conda environment of cluster nodes (envs/mmskip.yaml) pins what the Python package pins.

pyproject.toml lists the direct dependencies, requirements.txt the full lock that `make venv`
installs, and envs/mmskip.yaml (every rule's `conda:`) the direct dependencies again for
`--sdm conda`: the three must name the same versions, so a cluster node runs what CI tested.
"""

from __future__ import annotations

import re
import sys
import tomllib

import yaml

from workflow_utils import REPO

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503 normalisation


def _pins(lines, source: str) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", "-")):  # comments, pip options such as --index-url
            continue
        match = PIN.match(line)
        assert match, f"{source}: {line!r} is not pinned as name==version"
        assert _name(match.group(1)) not in pins, f"{source}: {match.group(1)} pinned twice"
        pins[_name(match.group(1))] = match.group(2)
    return pins


def _conda_env() -> dict:
    return yaml.safe_load((REPO / "envs/mmskip.yaml").read_text(encoding="utf-8"))


def test_conda_env_pins_exactly_the_direct_dependencies_of_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    direct = _pins(project["dependencies"], "pyproject.toml")
    (pip,) = [d["pip"] for d in _conda_env()["dependencies"] if isinstance(d, dict)]
    assert _pins(pip, "envs/mmskip.yaml") == direct


def test_every_direct_pin_is_the_version_of_the_lock():
    lock = _pins((REPO / "requirements.txt").read_text(encoding="utf-8").splitlines(), "requirements.txt")
    (pip,) = [d["pip"] for d in _conda_env()["dependencies"] if isinstance(d, dict)]
    for name, version in _pins(pip, "envs/mmskip.yaml").items():
        assert name in lock, f"envs/mmskip.yaml pins {name}=={version}; requirements.txt lacks it"
        assert lock[name] == version, f"{name}: envs/mmskip.yaml {version}, requirements.txt {lock[name]}"


def test_conda_python_is_the_python_of_the_tested_venv():
    (python,) = [d for d in _conda_env()["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert python == f"python={sys.version_info.major}.{sys.version_info.minor}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["requires-python"] == f">={sys.version_info.major}.{sys.version_info.minor}"


def test_every_rule_uses_the_pinned_environment():
    """Every rule definition (named, or the table's loop ``rule:``) names envs/mmskip.yaml."""
    rules = sorted((REPO / "workflow/rules").glob("*.smk"))
    assert rules
    total = 0
    for path in rules:
        text = path.read_text(encoding="utf-8")
        num_rules = len(re.findall(r"^\s*rule(\s+\w+)?:", text, re.M))
        num_conda = len(re.findall(r'^\s*conda:\s*\n\s*"\.\./\.\./envs/mmskip\.yaml"', text, re.M))
        assert num_conda == num_rules, path.name
        total += num_rules
    assert total >= 1, "no rule definition found under workflow/rules"
