"""The pipeline's stages, written once: Snakemake's rules and DVC's ``dvc.yaml`` are both made from ``stage_table``.

Each ``Stage`` holds what a Snakemake rule and a DVC stage share: the name (rule = stage =
``mmskip`` command), the command, the variables it runs over (Snakemake wildcards, DVC
``foreach``/``matrix``), the named inputs and outputs, the parameters it declares and the threads it
asks for. ``workflow/rules/stages.smk`` turns every entry into a rule; ``render_dvc_yaml`` writes
the same stages as ``dvc.yaml``. A command is written in Snakemake's shell syntax (``{input.llm}``,
``{output.metrics}``, ``{wildcards.task}``, ``{params.prompts}``) without the log redirection;
for DVC each placeholder becomes the path or the ``${...}`` it stands for, so both tools run the
identical command line.

Code dependencies are the import closure of each stage's command (``ImportGraph``): the handler of
``mmskip <command>`` in ``src/mmskip/cli.py`` and the functions of cli.py it and ``main`` call, the
imports of cli.py that run at module level, then every module of ``src/mmskip`` those import,
transitively (an import anywhere in a module counts, function-level ones too: they may run), with
the packages' ``__init__.py`` files that importing runs. Snakemake takes them as inputs (an edited
module makes its jobs out of date by modification time); DVC as file deps (by content hash).
Snakemake computes them when it parses the workflow; ``dvc.yaml`` holds them as generated, so:

Regenerate ``dvc.yaml`` after editing this table or any ``import`` under ``src/mmskip`` (one
command, from the repository root)::

    python -m mmskip.stages --dvc dvc.yaml

``python -m mmskip.stages --check dvc.yaml`` only compares (exit status 1 when the file is stale);
tests/test_stages.py fails while the committed ``dvc.yaml`` differs from the generated one.

Where the two tools cannot say the same thing, the table says both: DVC cannot expand a list from
params.yaml inside ``deps`` nor interpolate one into ``cmd``, so where Snakemake's report expands
files over ``skipping.modes`` / ``compression.mask_sets`` its DVC stage depends on the folder holding
them (``PerValue``), and the report reads those two lists from its ``--params`` file; DVC refuses
its own files as deps, so ``dvc.yaml`` is an input of the report rule only (``SnakemakeOnly``).

The table lives in the package, not under workflow/, so that the Snakefile, the tests and
``python -m`` import it by one name with no path set-up. It is workflow code all the same: it reads
no params.yaml (Snakemake hands it its config; DVC interpolates ``${...}``), only the source tree,
and imports no torch (standard library, PyYAML and mmskip's torch-free name modules).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

from mmskip.compression.names import METHODS as PRUNE_METHODS, TRAIN_VARIANTS
from mmskip.config import cli_args
from mmskip.evaluation import INPUTS
# sources.<name>: a hub id replaces the pipeline's own model; sources.llava: LLaVA alone, without training
from mmskip.params import DATASETS, ENCODERS, HUB_MODELS, LLAVA, LLM_SHAPE_KEYS, modalities
from mmskip.tasks import GENERATED_DATASETS, TASKS as TASK_REGISTRY, default_tasks, get_task, tasks_of

TASKS = default_tasks()  # the registered tasks of the run's own dataset: one mapper and one evaluation each
# Snakemake's order among ready jobs (Stage.priority, the rest 0). Snakemake picks the set of ready jobs with the
# largest sum of priorities that fits the cores, so each level is more than twice the next: a job of two threads is
# not passed over for two of one thread of the level below. Every mapper waits for the encoders, their features and
# the LLM, so the data and the short foundation jobs go first, two side by side (one thread each: the cores stay busy
# where a job of two would wait for both; a second thread gains the image ViT 8% and the VideoMAE a third), and the
# LLM (both cores, about a third of the embedded default's time) last among them: when it ends, every mapper can
# start, the longest training first, with the smaller LLM's mappers ready beside them; then the jobs that start the
# long chains after the mappers (Wanda's masks, training with compression); the evaluations fill the cores last, a
# task's whole skip grid or compression sets (the longest) before the others.
GENERATING, ENCODING, LLM_SMALL, LLM, MAPPERS, AFTER_MAPPERS, GRIDS = 250, 100, 40, 15, 5, 2, 0.5
LLMS = ("llm", "llm_small")  # params.yaml sections of the LLM and of the smaller LLM
STATIC_PRUNE_METHODS = tuple(m for m in PRUNE_METHODS if m != "wanda")  # data-free: no calibration inputs

PACKAGE = "mmskip"
CLI_MODULE = "mmskip.cli"
ENTRY_POINT = "main"  # pyproject.toml [project.scripts]: mmskip = "mmskip.cli:main"
LOG_REDIRECT = " > {log} 2>&1"


# --- the vocabulary of the table ---------------------------------------------------------------

@dataclass(frozen=True)
class Var:
    """A variable a stage runs over: a Snakemake wildcard, a DVC ``foreach``/``matrix`` key.

    ``values`` is a tuple of values, or the dotted params.yaml key of a list (``skipping.modes``):
    DVC then reads it as ``${skipping.modes}``. ``sections``: each value names a params.yaml
    section the command takes whole (``pretrain_llm`` over ``llm`` and ``llm_small``).
    """

    name: str
    values: tuple[str, ...] | str
    sections: bool = False

    def resolve(self, params: Mapping[str, Any]) -> list[str]:
        """The values, reading a params-driven list from ``params`` (params.yaml or Snakemake's config)."""
        if isinstance(self.values, str):
            return [str(v) for v in _dotted(params, self.values)]
        return list(self.values)


def combinations(variables: Sequence[Var], params: Mapping[str, Any]) -> list[dict[str, str]]:
    """Every combination of the variables' values (params lists resolved from ``params``), the first varying slowest."""
    combos: list[dict[str, str]] = [{}]
    for var in variables:
        combos = [{**c, var.name: v} for c in combos for v in var.resolve(params)]
    return combos


@dataclass(frozen=True)
class Param:
    """Parameters a command takes: ``{params.<name>}`` in the command.

    ``key`` is a params.yaml key: a scalar (``seed``, rendered as its value) or a section
    (rendered as ``--key value`` flags, DVC's ``${section}``); ``keys`` restricts a section to
    those keys (DVC declares them one by one, so other keys of the section do not make the stage
    stale); ``var`` instead names the stage variable whose value is the section (``${item}``).
    """

    key: str = ""
    keys: tuple[str, ...] = ()
    var: str = ""

    def dvc_params(self) -> list[str]:
        if self.var:
            return ["${key}"]
        return [f"{self.key}.{k}" for k in self.keys] if self.keys else [self.key]

    def dvc_text(self) -> str:
        if self.var:
            return "${item}"
        if self.keys:
            return " ".join(f"--{k} ${{{self.key}.{k}}}" for k in self.keys)
        return f"${{{self.key}}}"

    def value(self, params: Mapping[str, Any], wildcards: Any = None) -> str:
        """What Snakemake passes as ``{params.<name>}``: what DVC renders from params.yaml."""
        if self.var:
            return cli_args(params[getattr(wildcards, self.var)])
        value = _dotted(params, self.key)  # a section, a scalar, or one key of a section ("sources.llm")
        if self.keys:
            return cli_args({k: value[k] for k in self.keys})
        return cli_args(value) if isinstance(value, Mapping) else str(value)


@dataclass(frozen=True)
class PerValue:
    """Input files, one per combination of values, some from params lists (the report's skip grid).

    Snakemake expands ``pattern`` (its config gives the lists); DVC, which cannot expand a params
    list inside ``deps``, depends on ``folder``, which holds every one of them.
    """

    pattern: str
    folder: str
    values: Mapping[str, tuple[str, ...] | str]

    def expand(self, params: Mapping[str, Any]) -> list[str]:
        return [self.pattern.format(**c)
                for c in combinations([Var(name, values) for name, values in self.values.items()], params)]


@dataclass(frozen=True)
class SnakemakeOnly:
    """An input only Snakemake can declare: DVC refuses its own files as deps ("DVC file 'dvc.yaml'
    cannot be a dependency"); under DVC the path is still an argument of the command."""

    path: str


@dataclass(frozen=True)
class ByValue:
    """An input or a parameter that depends on the value of one of the stage's variables.

    ``options`` maps each value of ``var`` to a path (an input) or a ``Param``, or to None where
    that job has none. In the command, ``{input.<name>}`` of such an input renders as ``flag path``
    (nothing when None) and ``{params.<name>}`` as that job's flags. Snakemake gets functions of
    the wildcards. A DVC stage cannot vary its number of deps, params or flags between the items of
    a ``foreach``, so the stage is written as one item per job holding that job's own values:
    absent deps and params repeat one the job has (DVC accepts a repeated entry).
    """

    var: str
    options: Mapping[str, Any]
    flag: str = ""

    def choose(self, values: Mapping[str, str]) -> Any:
        return self.options[values[self.var]]


@dataclass(frozen=True)
class Priority:
    """Which of a stage's jobs Snakemake starts first when more are ready than cores are free (higher first):
    ``values`` maps values of the stage's variable ``var`` to a priority, ``default`` for the others.
    ``longest_first`` (a stage over tasks that trains their mappers) adds less than 1, growing with the task's
    mapper steps (params ``mapper``, ``step_shares``), so the longest training starts first. Ordering only:
    no artifact depends on it, and DVC, which runs its stages one by one, has no use for it."""

    var: str
    values: Mapping[str, float] = field(default_factory=dict)
    default: float = 0
    longest_first: bool = False

    def of(self, params: Mapping[str, Any], wildcards: Mapping[str, str]) -> float:
        value = self.values.get(wildcards[self.var], self.default)
        if self.longest_first:
            steps = get_task(wildcards[self.var]).steps(params["mapper"], params["step_shares"])
            value += steps / (steps + 1000)
        return value


@dataclass(frozen=True)
class Out:
    """A stage output. ``folder``: a directory; ``metric``: a DVC metric; ``cache=False``: DVC
    keeps it out of its cache (measured times); ``caption``: shown in ``snakemake --report``
    (path of the caption from the repository root)."""

    path: str
    folder: bool = False
    metric: bool = False
    cache: bool = True
    caption: str | None = None


def out(path: str, caption: str | None = None) -> Out:
    return Out(path, caption=caption)


def folder(path: str) -> Out:
    return Out(path, folder=True)


def metric(path: str) -> Out:
    return Out(path, metric=True, cache=False)


def uncached(path: str) -> Out:
    return Out(path, cache=False)


Input = Union[str, tuple, PerValue, SnakemakeOnly, ByValue]
PLACEHOLDER = re.compile(r"\{(input|output|wildcards|params)\.(\w+)\}")


@dataclass(frozen=True)
class Stage:
    """One rule / stage / ``mmskip`` command. Paths are relative to the repository root and may
    hold the stage's variables as ``{name}``; the log and benchmark files are
    ``logs/<name>/<log>.log`` and ``benchmarks/<name>/<log>.tsv``."""

    name: str
    cmd: str
    outputs: Mapping[str, Out]
    inputs: Mapping[str, Input] = field(default_factory=dict)
    params: Mapping[str, Param] = field(default_factory=dict)
    vars: tuple[Var, ...] = ()
    threads: int = 1
    mem_mb: int = 2000
    log: str = ""  # default: the variables' values joined by "-"
    # runs the LLM or the encoder: on params' runtime.device (its command takes {params.runtime}),
    # and asks SLURM for one GPU when that device is cuda
    gpu: bool = False
    # needs the network (downloads, the hub): runs on the host Snakemake runs on (a login node), never as
    # a cluster job (Snakemake's localrule)
    local: bool = False
    # Snakemake's order among ready jobs (higher first), per job where a Priority: the jobs every mapper waits for
    # go first, so the long chain behind them starts early and the jobs off it fill the cores later
    priority: float | Priority = 0
    # variables a job runs over itself: one job per combination of ``vars``, writing its outputs for every value of
    # ``each`` (the skip grid's modes), so the job starts, loads its models and runs METEOR's JVM once, not per
    # value. Its outputs name them as ``{name}``; both tools list those files as params have them (dvc.yaml is
    # regenerated when the list changes, as when ``tasks`` does)
    each: tuple[Var, ...] = ()

    def __post_init__(self) -> None:
        words = self.cmd.split()
        if words[:2] != [PACKAGE, self.name]:
            raise ValueError(f"stage {self.name}: its command must start with `{PACKAGE} {self.name}`: {self.cmd!r}")
        threads = re.findall(r"--threads (\d+)", self.cmd)
        if threads and threads != [str(self.threads)]:
            raise ValueError(f"stage {self.name}: the command's --threads {threads} differs from threads={self.threads}"
                             " (torch's results depend on it: the command gets the rule's count literally)")
        names = {"input": self.inputs, "output": self.outputs, "params": self.params,
                 "wildcards": {v.name: v for v in self.vars}}
        for kind, name in PLACEHOLDER.findall(self.cmd):
            if name not in names[kind]:
                raise ValueError(f"stage {self.name}: {{{kind}.{name}}} names no {kind} of the stage")
        known = {v.name for v in (*self.vars, *self.each)}
        for name, output in self.outputs.items():
            unknown = set(re.findall(r"\{(\w+)\}", output.path)) - known
            if unknown:
                raise ValueError(f"stage {self.name}: output {name} {output.path!r} names {sorted(unknown)}, not "
                                 f"variables of the stage (vars or each)")
            if output.folder and any(f"{{{v.name}}}" in output.path for v in self.each):
                raise ValueError(f"stage {self.name}: output {name} is a folder per value of `each`: list its files")
        if self.each and any(kind == "output" for kind, _ in PLACEHOLDER.findall(self.cmd)):
            raise ValueError(f"stage {self.name}: a command of a stage with `each` names the folder its files go in, "
                             "not {output.<name>} (a list of files)")
        leftover = PLACEHOLDER.sub("", self.cmd)
        if "{" in leftover or "}" in leftover:
            raise ValueError(f"stage {self.name}: a brace outside {{input|output|wildcards|params.<name>}}"
                             f" in {self.cmd!r}")
        if self.gpu != ("{params.runtime}" in self.cmd):
            raise ValueError(f"stage {self.name}: gpu={self.gpu} but its command "
                             f"{'lacks' if self.gpu else 'takes'} {{params.runtime}}: a stage runs on runtime.device "
                             "exactly when it asks for a GPU")
        if not self.vars and not self.log:
            raise ValueError(f"stage {self.name}: a stage without variables needs log= (its log file's name)")
        for name, value in [*self.inputs.items(), *self.params.items()]:
            if isinstance(value, ByValue):
                var = names["wildcards"].get(value.var)
                if var is None or isinstance(var.values, str) or set(value.options) != set(var.values):
                    raise ValueError(f"stage {self.name}: ByValue {name!r} must give an option for each value of "
                                     f"one of its variables with values written out")
        if isinstance(self.priority, Priority) and self.priority.var not in names["wildcards"]:
            raise ValueError(f"stage {self.name}: Priority(var={self.priority.var!r}) names no variable of the stage")
        for param in self.params.values():
            if isinstance(param, ByValue):
                continue
            if param.var and param.var not in names["wildcards"]:
                raise ValueError(f"stage {self.name}: Param(var={param.var!r}) names no variable of the stage")

    def expand_each(self, path: str, params: Mapping[str, Any]) -> list[str]:
        """``path`` once per combination of the ``each`` variables' values (params lists), the ``vars`` left as
        ``{name}``: the files one job writes."""
        kept = {v.name: f"{{{v.name}}}" for v in self.vars}
        return [path.format(**kept, **combo) for combo in combinations(self.each, params)] if self.each else [path]

    def resources(self, params: Mapping[str, Any]) -> dict[str, int]:
        """The rule's resources: its memory, and one GPU (``gpu``: sbatch ``--gpus=1`` through the SLURM
        executor) where the stage runs on ``runtime.device`` and that device is cuda."""
        resources = {"mem_mb": self.mem_mb}
        if self.gpu and str((params.get("runtime") or {}).get("device", "cpu")).startswith("cuda"):
            resources["gpu"] = 1
        return resources

    def snakemake_priority(self, params: Mapping[str, Any]) -> float | Any:
        """The rule's priority: a number, or a function of the wildcards (Snakemake calls it per job)."""
        if isinstance(self.priority, Priority):
            return lambda wildcards, priority=self.priority: priority.of(params, dict(wildcards.items()))
        return self.priority

    @property
    def command(self) -> str:
        """The ``mmskip`` subcommand the stage runs."""
        return self.cmd.split()[1]

    @property
    def log_path(self) -> str:
        return f"logs/{self.name}/{self._log_stem()}.log"

    @property
    def benchmark_path(self) -> str:
        return f"benchmarks/{self.name}/{self._log_stem()}.tsv"

    def _log_stem(self) -> str:
        return self.log or "-".join(f"{{{v.name}}}" for v in self.vars)

    def wildcard_constraints(self, params: Mapping[str, Any]) -> dict[str, str]:
        return {v.name: "|".join(re.escape(x) for x in v.resolve(params)) for v in self.vars}

    def render(self, params: Mapping[str, Any], wildcards: Mapping[str, str] | None = None) -> str:
        """The command of one job, as both tools run it (params: params.yaml or Snakemake's config)."""
        values = dict(wildcards or {})
        inputs = self.snakemake_inputs(params)

        def render(match: re.Match) -> str:
            kind, name = match.groups()
            if kind == "wildcards":
                return values[name]
            if kind == "params":
                param = self.params[name]
                if isinstance(param, ByValue):
                    param = param.choose(values)
                    return "" if param is None else param.value(params, argparse.Namespace(**values))
                return param.value(params, argparse.Namespace(**values))
            if kind == "input" and isinstance(self.inputs[name], ByValue):
                return self._by_value_arg(self.inputs[name], values)
            value = inputs[name] if kind == "input" else self.outputs[name].path
            return " ".join(p.format(**values) for p in ([value] if isinstance(value, str) else value))

        return PLACEHOLDER.sub(render, self.cmd)

    @staticmethod
    def _by_value_arg(value: ByValue, values: Mapping[str, str]) -> str:
        path = value.choose(values)
        return "" if path is None else f"{value.flag} {path.format(**values)}".strip()

    def snakemake_shell(self) -> str:
        """The command with the log redirection; a ByValue input's flag and path come from a param."""
        def render(match: re.Match) -> str:
            kind, name = match.groups()
            if kind == "input" and isinstance(self.inputs[name], ByValue):
                return f"{{params._input_{name}}}"
            return match.group(0)

        return PLACEHOLDER.sub(render, self.cmd) + LOG_REDIRECT

    def snakemake_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The rule's params: functions of the wildcards (so that Snakemake does not read
        ``{question}`` of a prompt as a wildcard), each rendering its params.yaml keys as DVC does."""
        def param_value(param: Param | ByValue, wildcards: Any) -> str:
            if isinstance(param, ByValue):
                param = param.choose(dict(wildcards.items()))
                if param is None:
                    return ""
            return param.value(params, wildcards)

        result: dict[str, Any] = {name: (lambda wildcards, param=param: param_value(param, wildcards))
                                  for name, param in self.params.items()}
        for name, value in self.inputs.items():
            if isinstance(value, ByValue):
                result[f"_input_{name}"] = lambda wildcards, value=value: self._by_value_arg(
                    value, dict(wildcards.items()))
        return result

    def snakemake_inputs(self, params: Mapping[str, Any]) -> dict[str, Any]:
        def paths(value: Input) -> Any:
            if isinstance(value, ByValue):  # a function of the wildcards; [] where the job has none
                return lambda wildcards, value=value: (
                    [] if value.choose(dict(wildcards.items())) is None
                    else value.choose(dict(wildcards.items())).format(**dict(wildcards.items())))
            if isinstance(value, PerValue):
                return value.expand(params)
            if isinstance(value, SnakemakeOnly):
                return value.path
            return list(value) if isinstance(value, tuple) else value

        return {name: paths(value) for name, value in self.inputs.items()}

    # -- DVC --
    def _by_value(self) -> bool:
        return any(isinstance(v, ByValue) for v in [*self.inputs.values(), *self.params.values()])

    def _dvc_vars(self) -> dict[str, str]:
        """Variable name -> how a dvc.yaml stage of this shape refers to its value."""
        if not self.vars:
            return {}
        if self._by_value():
            return {v.name: f"${{item.{v.name}}}" for v in self.vars}
        if self._foreach():
            return {self.vars[0].name: "${key}" if self.vars[0].sections else "${item}"}
        return {v.name: f"${{item.{v.name}}}" for v in self.vars}

    def _foreach(self) -> bool:
        """One variable with values written out (or params sections): ``foreach``, else ``matrix``."""
        return len(self.vars) == 1 and (self.vars[0].sections or not isinstance(self.vars[0].values, str))

    def _dvc_path(self, path: str) -> str:
        dvc_vars = self._dvc_vars()
        return re.sub(r"\{(\w+)\}", lambda m: dvc_vars[m.group(1)], path)

    def dvc_cmd(self) -> str:
        dvc_vars = self._dvc_vars()

        def render(match: re.Match) -> str:
            kind, name = match.groups()
            if kind == "wildcards":
                return dvc_vars[name]
            if kind == "params":
                param = self.params[name]
                return f"${{item.{name}}}" if isinstance(param, ByValue) else param.dvc_text()
            value = (self.inputs if kind == "input" else self.outputs)[name]
            if isinstance(value, ByValue):
                return f"${{item.{name}}}"
            if isinstance(value, (Out, SnakemakeOnly)):
                return self._dvc_path(value.path)
            if isinstance(value, str):
                return self._dvc_path(value)
            if isinstance(value, tuple):  # a list of paths (one per task): the command lists them all
                return " ".join(self._dvc_path(p) for p in value)
            raise ValueError(f"stage {self.name}: {{{kind}.{name}}} is not a path or a list of paths")

        return PLACEHOLDER.sub(render, self.cmd)

    def dvc_deps(self, code: Sequence[str]) -> list[str]:
        deps: list[str] = []
        for value in self.inputs.values():
            if isinstance(value, SnakemakeOnly):
                continue
            if isinstance(value, ByValue):
                continue  # after the others: ${item.<name>_dep}
            if isinstance(value, PerValue):
                deps.append(value.folder)
            elif isinstance(value, tuple):
                deps.extend(self._dvc_path(p) for p in value)
            else:
                deps.append(self._dvc_path(value))
        deps += [f"${{item.{name}_dep}}" for name, value in self.inputs.items() if isinstance(value, ByValue)]
        return [*dict.fromkeys(deps), *code]

    def _dvc_items(self, params: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
        """One foreach item per job (keyed like ``jobs``' names) with its variables' values, the
        command text and dep of each ByValue input, and the command text and declared params of
        each ByValue param (in numbered slots; a job with fewer repeats its first one). A variable
        over a params list (``skipping.modes``) is written out as ``params`` have it: dvc.yaml must be
        regenerated after changing it, as after changing ``tasks``."""
        combos = combinations(self.vars, params)
        fixed = [p for param in self.params.values() if not isinstance(param, ByValue) for p in param.dvc_params()]
        slots = {name: max(len(o.dvc_params()) if o is not None else 0 for o in param.options.values())
                 for name, param in self.params.items() if isinstance(param, ByValue)}
        items = {}
        for combo in combos:
            item: dict[str, Any] = dict(combo)
            chosen = [v.choose(combo) if isinstance(v, ByValue) else v for v in self.inputs.values()]
            first_dep = next((p.format(**combo) for p in chosen if isinstance(p, str)), None)  # one the job has
            for name, value in self.inputs.items():
                if isinstance(value, ByValue):
                    path = value.choose(combo)
                    item[name] = self._by_value_arg(value, combo)
                    item[f"{name}_dep"] = first_dep if path is None else path.format(**combo)
            for name, param in self.params.items():
                if isinstance(param, ByValue):
                    chosen = param.choose(combo)
                    item[name] = "" if chosen is None else chosen.dvc_text()
                    keys = [] if chosen is None else chosen.dvc_params()
                    keys = keys or fixed[:1]
                    for i in range(slots[name]):
                        item[f"{name}_{i}"] = keys[min(i, len(keys) - 1)]
            items["-".join(combo.values())] = item
        return items, slots

    def dvc_stage(self, code: Sequence[str], params: Mapping[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"cmd": self.dvc_cmd(), "deps": self.dvc_deps(code)}
        declared = [p for param in self.params.values() if not isinstance(param, ByValue)
                    for p in param.dvc_params()]
        items, slots = self._dvc_items(params) if self._by_value() else ({}, {})
        declared += [f"${{item.{name}_{i}}}" for name, n in slots.items() for i in range(n)]
        if declared:
            body["params"] = list(dict.fromkeys(declared))
        outs = [self._dvc_path(p) if o.cache else {self._dvc_path(p): {"cache": False}}
                for o in self.outputs.values() if not o.metric for p in self.expand_each(o.path, params)]
        metrics = [{self._dvc_path(p): {"cache": False}} for o in self.outputs.values() if o.metric
                   for p in self.expand_each(o.path, params)]
        if outs:
            body["outs"] = outs
        if metrics:
            body["metrics"] = metrics
        if not self.vars:
            return body
        if items:
            return {"foreach": items, "do": body}
        if self._foreach():
            (var,) = self.vars
            iterable = {v: f"${{{v}}}" for v in var.values} if var.sections else _Flow(var.values)
            return {"foreach": iterable, "do": body}
        matrix = {v.name: f"${{{v.values}}}" if isinstance(v.values, str) else _Flow(v.values) for v in self.vars}
        return {"matrix": matrix, **body}


def _dotted(params: Mapping[str, Any], key: str) -> Any:
    value: Any = params
    for part in key.split("."):
        value = value[part]
    return value


# --- the table ---------------------------------------------------------------------------------

DATA = {"scenes": "data/scenes", "features": "results/features", "llm": "models/llm"}  # what most stages read
# the generated datasets of the embedded video and audio tasks (mmskip.tasks.GENERATED_DATASETS) -> the encoder the
# pipeline pretrains on each (its params section and sources key, its folder models/{encoder}), of their modality
GENERATED_ENCODERS = {"clips": "video_encoder", "sounds": "audio_encoder"}
assert tuple(GENERATED_ENCODERS) == GENERATED_DATASETS
# params sources.data -> its folder, and the generated datasets'
DATASET_FOLDERS = {"scenes": "data/scenes", "coco": "data/coco", **{d: f"data/{d}" for d in GENERATED_DATASETS}}
# the stages that pretrain an encoder -> the encoder (a hub id in its sources key replaces the stage)
PRETRAINED = {"pretrain_encoder": "encoder", **{f"pretrain_{e}": e for e in GENERATED_ENCODERS.values()}}
FOUNDATION_LOGS = ("llm", "encoder", "llm_small", "video_encoder", "audio_encoder")  # what the pipeline can pretrain
SEED = Param("seed")
PROMPTS = Param("prompts")
STEP_SHARES = Param("step_shares")  # each modality's share of its tasks' training steps (the mappers' stages)
EXAMPLE_SHARES = Param("example_shares")  # each modality's share of the examples the grids evaluate
RUNTIME = Param("runtime")  # device and dtype of the stages that run the LLM or the encoder (gpu=True)

# The train_compressed keys each training variant reads: only these reach its command line (and so
# its rerun triggers), so changing the skipped variant's interval does not retrain the others.
TRAIN_COMPRESSED_KEYS = {
    "dense": ("init", "finetune_vqa_steps", "finetune_caption_steps"),
    "pruned": ("init", "finetune_vqa_steps", "finetune_caption_steps", "sparsity"),
    "skipped": ("init", "finetune_vqa_steps", "finetune_caption_steps", "interval", "start_layer",
                "semantics"),
    "small": ("small_vqa_steps", "small_caption_steps"),
}
CALIBRATION = Param("pruning", ("calibration",))  # which Wanda masks a command reads
# The evaluation keys a decode reads (split, batch size, each format's token limit): the baseline,
# the families compared with it and the benchmark take only these, so the keys of the Hugging Face
# evaluation alone (num_beams, spice) rerun `evaluate` and nothing else.
DECODING = Param("evaluation", ("split", "batch_size",
                                *sorted({task.format.max_new_tokens_key for task in TASK_REGISTRY.values()})))


def family_outputs(folder: str) -> dict[str, Out]:
    """The files of a family's job compared with the baseline: its metrics, its predictions and its
    measured timing (not cached: wall times differ run to run)."""
    return {"metrics": metric(f"{folder}/metrics.json"), "predictions": out(f"{folder}/predictions.json"),
            "timing": uncached(f"{folder}/timing.json")}


# the baseline decode of a task (stage baseline), which every family compared with it reads
BASELINE_INPUT = {"baseline": tuple(f"results/baseline/{{task}}/{name}.json"
                                    for name in ("metrics", "predictions", "batches", "timing"))}


# In pipeline order. Threads: the 2-core default machine runs the two pretraining jobs (and the
# benchmark, whose timings must not share cores) alone on both cores, everything else one core a job.
# Every torch command gets its thread count as a literal `--threads N` equal to `threads` (not
# Snakemake's `{threads}`, which `--cores` can lower): float results depend on it, so Snakemake,
# DVC and SLURM runs compute the same bytes whatever the scheduler grants.
def llms_of(variants: Sequence[str]) -> tuple[str, ...]:
    """The LLMs a pipeline training ``variants`` runs (params sections): the smaller LLM only for variant small."""
    return tuple(m for m in LLMS if m != "llm_small" or "small" in variants)


def variants_of(params: Mapping[str, Any]) -> tuple[str, ...]:
    """params' ``train_compressed.variants`` (all of TRAIN_VARIANTS where params have no such key)."""
    variants = tuple((params.get("train_compressed") or {}).get("variants") or TRAIN_VARIANTS)
    unknown = [v for v in variants if v not in TRAIN_VARIANTS]
    if unknown:
        raise ValueError(f"train_compressed.variants {unknown}: allowed {list(TRAIN_VARIANTS)}")
    return variants


def seeds_of(params: Mapping[str, Any]) -> tuple[int, ...]:
    """params' ``seeds`` after the first (the replicas' seeds: each retrains every task's mapper)."""
    return tuple(int(s) for s in (params.get("seeds") or ())[1:])


def trained_stages(tasks: Sequence[str], variants: Sequence[str] = TRAIN_VARIANTS,
                   replicas: Sequence[int] = ()) -> tuple[Stage, ...]:
    """The stages of a pipeline that trains its mappers, for params' ``tasks`` (task registry names),
    ``train_compressed.variants`` and the replicas' seeds (``seeds`` after the first): the embedded default's whole
    table; stage_table swaps in paper scale's data and hub models."""
    tasks = tuple(get_task(t).name for t in tasks)  # a name the registry lacks: ValueError naming its names
    variants = tuple(v for v in TRAIN_VARIANTS if v in variants)  # in TRAIN_VARIANTS' order, as params check them
    llms = llms_of(variants)
    per_task = Var("task", tasks)
    mappers = tuple(f"models/mapper/{t}" for t in tasks)
    # the α-SubNet combines the Wanda masks of two tasks or more (params refuse mask set subnet with one)
    subnet = len(tasks) > 1
    # the generated clips and sounds, where a video or audio task of the embedded default reads them: their stage,
    # their encoder's pretraining, and their texts in the tokenizer's and the LLM's corpus
    generated = [d for d in GENERATED_DATASETS if any(get_task(t).dataset == d for t in tasks)]
    texts = {d: DATASET_FOLDERS[d] for d in generated}
    texts_arg = "".join(f" --{d} {{input.{d}}}" for d in generated)
    return (
        Stage("make_scenes", "mmskip make_scenes --out {output.scenes} --seed {params.seed} {params.data}",
              outputs={"scenes": folder("data/scenes")},
              params={"seed": SEED, "data": Param("data")},
              log="scenes", priority=GENERATING),  # one core (PIL, numpy): the clips and sounds are made beside it
        *(Stage(f"make_{d}", f"mmskip make_{d} --out {{output.{d}}} --seed {{params.seed}} {{params.{d}}}",
                outputs={d: folder(DATASET_FOLDERS[d])},
                params={"seed": SEED, d: Param(d)},
                log=d, priority=GENERATING) for d in generated),
        Stage("train_tokenizer",
              "mmskip train_tokenizer --scenes {input.scenes}" + texts_arg + " --out {output.tokenizer}"
              " {params.prompts} {params.tokenizer}",
              inputs={"scenes": "data/scenes", **texts},
              outputs={"tokenizer": folder("models/tokenizer")},
              params={"prompts": PROMPTS, "tokenizer": Param("tokenizer")},
              log="tokenizer", priority=ENCODING),
        Stage("pretrain_llm",  # the LLM, and the smaller one of "train with a smaller LLM" (params llm_small)
              "mmskip pretrain_llm --threads 2 --scenes {input.scenes}" + texts_arg + " --tokenizer {input.tokenizer}"
              " --out {output.llm} --metrics {output.metrics} --seed {params.seed} {params.prompts} {params.args}",
              vars=(Var("llm", llms, sections=True),),
              inputs={"scenes": "data/scenes", **texts, "tokenizer": "models/tokenizer"},
              outputs={"llm": folder("models/{llm}"), "metrics": metric("results/foundation/{llm}.json")},
              params={"seed": SEED, "prompts": PROMPTS, "args": Param(var="llm")},
              threads=2, mem_mb=4000, priority=Priority("llm", {"llm": LLM, "llm_small": LLM_SMALL})),
        Stage("pretrain_encoder",
              "mmskip pretrain_encoder --threads 1 --scenes {input.scenes} --out {output.encoder}"
              " --metrics {output.metrics} --seed {params.seed} {params.encoder}",
              inputs={"scenes": "data/scenes"},
              outputs={"encoder": folder("models/encoder"), "metrics": metric("results/foundation/encoder.json")},
              params={"seed": SEED, "encoder": Param("encoder")},
              mem_mb=4000, log="encoder", priority=ENCODING),
        *(Stage(f"pretrain_{encoder}",
                f"mmskip pretrain_{encoder} --threads 1 --{d} {{input.{d}}} --out {{output.encoder}}"
                " --metrics {output.metrics} --seed {params.seed} {params.encoder}",
                inputs={d: DATASET_FOLDERS[d]},
                outputs={"encoder": folder(f"models/{encoder}"),
                         "metrics": metric(f"results/foundation/{encoder}.json")},
                params={"seed": SEED, "encoder": Param(encoder)},
                mem_mb=4000, log=encoder, priority=ENCODING)
          for d, encoder in GENERATED_ENCODERS.items() if d in generated),
        Stage("cache_features",  # with the encoders, before the LLM (ENCODING)
              "mmskip cache_features --threads 1 --scenes {input.scenes} --encoder {input.encoder}"
              " --out {output.features} {params.features} {params.runtime}",
              inputs={"scenes": "data/scenes", "encoder": "models/encoder"},
              outputs={"features": folder("results/features")},
              params={"features": Param("features"), "runtime": RUNTIME},
              mem_mb=4000, gpu=True, log="features", priority=ENCODING),
        Stage("train_mapper",  # one job per task, side by side; checkpoints outside the outputs (resumption)
              "mmskip train_mapper --threads 1 --task {wildcards.task} --scenes {input.scenes}"
              " --features {input.features} --llm {input.llm} --out {output.mapper} --metrics {output.metrics}"
              " --checkpoint_dir checkpoints/train_mapper/{wildcards.task} --seed {params.seed}"
              " {params.prompts} {params.mapper} {params.step_shares} {params.runtime}",
              vars=(per_task,), inputs=DATA,
              outputs={"mapper": folder("models/mapper/{task}"), "metrics": metric("results/mapper/{task}.json")},
              params={"seed": SEED, "prompts": PROMPTS, "mapper": Param("mapper"), "step_shares": STEP_SHARES,
                      "runtime": RUNTIME},
              mem_mb=4000, gpu=True, priority=Priority("task", default=MAPPERS, longest_first=True)),
        # The replicas (params seeds after the first): every task's mapper trained again with another seed, and its
        # baseline decoded, so the report measures each task's spread over seeds.
        *((Stage("train_mapper_seed",
                 "mmskip train_mapper_seed --threads 1 --task {wildcards.task} --scenes {input.scenes}"
                 " --features {input.features} --llm {input.llm} --out {output.mapper} --metrics {output.metrics}"
                 " --checkpoint_dir checkpoints/train_mapper_seed/{wildcards.seed}/{wildcards.task}"
                 " --seed {wildcards.seed} {params.prompts} {params.mapper} {params.step_shares} {params.runtime}",
                 vars=(Var("seed", tuple(str(s) for s in replicas)), per_task), inputs=DATA,
                 outputs={"mapper": folder("models/mapper_seeds/{seed}/{task}"),
                          "metrics": metric("results/mapper_seeds/{seed}/{task}.json")},
                 params={"prompts": PROMPTS, "mapper": Param("mapper"), "step_shares": STEP_SHARES,
                         "runtime": RUNTIME},
                 mem_mb=4000, gpu=True, priority=AFTER_MAPPERS),
           Stage("baseline_seed",
                 "mmskip baseline_seed --threads 1 --task {wildcards.task} --scenes {input.scenes}"
                 " --features {input.features} --llm {input.llm} --mapper {input.mapper}"
                 " --out results/seeds/{wildcards.seed}/{wildcards.task} {params.prompts} {params.evaluation}"
                 " {params.runtime}",
                 vars=(Var("seed", tuple(str(s) for s in replicas)), per_task),
                 inputs={**DATA, "mapper": "models/mapper_seeds/{seed}/{task}"},
                 outputs={"metrics": metric("results/seeds/{seed}/{task}/metrics.json"),
                          "predictions": out("results/seeds/{seed}/{task}/predictions.json"),
                          "batches": out("results/seeds/{seed}/{task}/batches.json"),
                          "timing": uncached("results/seeds/{seed}/{task}/timing.json")},
                 params={"prompts": PROMPTS, "evaluation": DECODING, "runtime": RUNTIME},
                 mem_mb=3000, gpu=True)) if replicas else ()),
        # one job per task decoding every input (a folder each), as the grids: one start, one METEOR JVM
        Stage("evaluate",
              "mmskip evaluate --threads 1 --task {wildcards.task}"
              " --scenes {input.scenes} --features {input.features} --llm {input.llm} --mapper {input.mapper}"
              " --out results/eval/{wildcards.task} {params.prompts} {params.evaluation} {params.runtime}",
              vars=(per_task,), each=(Var("input", INPUTS),),
              inputs={**DATA, "mapper": "models/mapper/{task}"},
              outputs={"predictions": out("results/eval/{task}/{input}/predictions.json"),
                       "metrics": metric("results/eval/{task}/{input}/metrics.json")},
              params={"prompts": PROMPTS, "evaluation": Param("evaluation"), "runtime": RUNTIME},
              mem_mb=3000, gpu=True),
        # The baseline, decoded once per task through the skip engine (empty plan) on the whole split:
        # every family below takes its baseline on its own first N examples from here.
        Stage("baseline",
              "mmskip baseline --threads 1 --task {wildcards.task} --scenes {input.scenes} --features {input.features}"
              " --llm {input.llm} --mapper {input.mapper} --out results/baseline/{wildcards.task} {params.prompts}"
              " {params.evaluation} {params.runtime}",
              vars=(per_task,),
              inputs={**DATA, "mapper": "models/mapper/{task}"},
              outputs={"metrics": metric("results/baseline/{task}/metrics.json"),
                       "predictions": out("results/baseline/{task}/predictions.json"),
                       "batches": out("results/baseline/{task}/batches.json"),
                       "timing": uncached("results/baseline/{task}/timing.json")},
              params={"prompts": PROMPTS, "evaluation": DECODING, "runtime": RUNTIME},
              mem_mb=3000, gpu=True),
        # The skip grid: one job per task, evaluating every grid point of every skip mode (a folder per mode)
        # with the trained mapper and cached features, after the baseline on the same examples. One job, not one per
        # mode: each job's start (imports, the LLM, the mapper, the examples, METEOR's JVM) costs seconds.
        Stage("evaluate_skip",
              "mmskip evaluate_skip --threads 1 --task {wildcards.task}"
              " --scenes {input.scenes} --features {input.features} --llm {input.llm} --mapper {input.mapper}"
              " --baseline results/baseline/{wildcards.task} --out results/skip/{wildcards.task}"
              " {params.prompts} {params.skipping} {params.evaluation} {params.example_shares} {params.runtime}",
              vars=(per_task,), each=(Var("mode", "skipping.modes"),),
              inputs={**DATA, "mapper": "models/mapper/{task}", **BASELINE_INPUT},
              outputs=family_outputs("results/skip/{task}/{mode}"),
              params={"prompts": PROMPTS, "skipping": Param("skipping"), "evaluation": DECODING,
                      "example_shares": EXAMPLE_SHARES, "runtime": RUNTIME},
              mem_mb=3000, gpu=True, priority=GRIDS),
        # The token-level grid: one job per task, every kind's points (a folder per kind) on the skip grid's
        # examples, after the baseline; early exit's thresholds calibrated on the validation split.
        Stage("evaluate_tokens",
              "mmskip evaluate_tokens --threads 1 --task {wildcards.task}"
              " --scenes {input.scenes} --features {input.features} --llm {input.llm} --mapper {input.mapper}"
              " --baseline results/baseline/{wildcards.task} --out results/tokens/{wildcards.task}"
              " {params.prompts} {params.skipping} {params.tokens} {params.evaluation} {params.example_shares}"
              " {params.runtime}",
              vars=(per_task,), each=(Var("kind", "token_skipping.kinds"),),
              inputs={**DATA, "mapper": "models/mapper/{task}", **BASELINE_INPUT},
              outputs=family_outputs("results/tokens/{task}/{kind}"),
              params={"prompts": PROMPTS, "skipping": Param("skipping", ("grid", "vqa_questions", "caption_images")),
                      "tokens": Param("token_skipping"), "evaluation": DECODING,
                      "example_shares": EXAMPLE_SHARES, "runtime": RUNTIME},
              mem_mb=3000, gpu=True, priority=GRIDS),
        Stage("bench_skip",  # alone on the 2-core machine, so its timings are not shared with other jobs
              "mmskip bench_skip --threads 2 --scenes {input.scenes} --features {input.features} --llm {input.llm}"
              " --mappers models/mapper --tasks " + " ".join(tasks) + " --out {output.bench} --seed {params.seed}"
              " {params.prompts} {params.bench} {params.evaluation}",
              inputs={**DATA, "mappers": mappers},
              outputs={"bench": metric("results/bench/skip.json")},
              params={"seed": SEED, "prompts": PROMPTS, "bench": Param("bench"), "evaluation": DECODING},
              threads=2, mem_mb=4000, log="skip"),
        # Compression of the frozen LLM: every mask is computed once under models/masks/{method} and
        # read by the evaluations that need it. Wanda calibrates on each task's multimodal inputs
        # through the trained mapper; the α-SubNet combines the tasks' Wanda masks into one.
        Stage("prune",
              "mmskip prune --threads 1 --method {wildcards.method} --llm {input.llm} --out {output.masks}"
              " --seed {params.seed} {params.pruning}",
              vars=(Var("method", STATIC_PRUNE_METHODS),),
              inputs={"llm": "models/llm"},
              outputs={"masks": folder("models/masks/{method}")},
              params={"seed": SEED, "pruning": Param("pruning")}),
        Stage("prune_wanda",
              "mmskip prune_wanda --threads 1 --llm {input.llm} --out {output.masks} --scenes {input.scenes}"
              " --features {input.features} --mappers models/mapper --tasks " + " ".join(tasks)
              + " --seed {params.seed} {params.prompts} {params.pruning} {params.runtime}",
              inputs={**DATA, "mappers": mappers},
              outputs={"masks": folder("models/masks/wanda")},
              params={"seed": SEED, "prompts": PROMPTS, "pruning": Param("pruning"), "runtime": RUNTIME},
              mem_mb=3000, gpu=True, log="wanda", priority=AFTER_MAPPERS),
        *((Stage("subnet",
                 "mmskip subnet --threads 1 --masks {input.wanda} --llm {input.llm} --out {output.masks}"
                 " {params.calibration} {params.subnet}",
                 inputs={"llm": "models/llm", "wanda": "models/masks/wanda"},
                 outputs={"masks": folder("models/masks/subnet")},
                 params={"calibration": CALIBRATION, "subnet": Param("subnet")},
                 log="subnet"),) if subnet else ()),
        Stage("evaluate_compressed",  # one job per task, every mask set's masks (a folder per set), as the skip grid
              "mmskip evaluate_compressed --threads 1 --task {wildcards.task} --masks models/masks"
              " --scenes {input.scenes} --features {input.features} --llm {input.llm}"
              " --mapper {input.mapper} --baseline results/baseline/{wildcards.task}"
              " --out results/compress/{wildcards.task}"
              " {params.prompts} {params.compression} {params.evaluation} {params.example_shares} {params.runtime}",
              vars=(per_task,), each=(Var("mask_set", "compression.mask_sets"),),
              inputs={**DATA, "mapper": "models/mapper/{task}",
                      "masks": PerValue("models/masks/{mask_set}", "models/masks",
                                        {"mask_set": "compression.mask_sets"}),
                      **BASELINE_INPUT},
              outputs=family_outputs("results/compress/{task}/{mask_set}"),
              params={"prompts": PROMPTS, "compression": Param("compression"), "evaluation": DECODING,
                      "example_shares": EXAMPLE_SHARES, "runtime": RUNTIME},
              mem_mb=3000, gpu=True, priority=GRIDS),
        # Training with compression: one mapper per task and variant (dense: the control, the same
        # training on the uncompressed LLM), then one evaluation per task comparing inference-only
        # compression with training under it (and the smaller LLM).
        Stage("train_compressed",
              "mmskip train_compressed --threads 1 --variant {wildcards.variant} --task {wildcards.task}"
              " --scenes {input.scenes} --features {input.features} {input.llm} {input.mapper} {input.masks}"
              " {params.calibration} --out {output.mapper} --metrics {output.metrics}"
              " --checkpoint_dir checkpoints/train_compressed/{wildcards.variant}/{wildcards.task}"
              " --seed {params.seed} {params.mapper} {params.prompts} {params.train} {params.step_shares}"
              " {params.runtime}",
              vars=(Var("variant", variants), per_task),
              inputs={"scenes": "data/scenes", "features": "results/features",
                      # the smaller LLM's mapper trains from scratch; the others start from the baseline mapper
                      "llm": ByValue("variant", {v: "models/llm_small" if v == "small" else "models/llm"
                                                 for v in variants}, "--llm"),
                      "mapper": ByValue("variant", {v: None if v == "small" else "models/mapper/{task}"
                                                    for v in variants}, "--mapper"),
                      "masks": ByValue("variant", {v: "models/masks/wanda" if v == "pruned" else None
                                                   for v in variants}, "--masks")},
              outputs={"mapper": folder("models/mapper_{variant}/{task}"),
                       "metrics": metric("results/mapper_{variant}/{task}.json")},
              params={"seed": SEED, "mapper": Param("mapper"), "prompts": PROMPTS,
                      "calibration": ByValue("variant", {v: CALIBRATION if v == "pruned" else None
                                                         for v in variants}),
                      "train": ByValue("variant", {v: Param("train_compressed", TRAIN_COMPRESSED_KEYS[v])
                                                   for v in variants}),
                      "step_shares": STEP_SHARES, "runtime": RUNTIME},
              mem_mb=3000, gpu=True, priority=AFTER_MAPPERS),
        # every variant's mappers of one task (the smaller LLM where small is one, the Wanda mask where pruned is)
        Stage("evaluate_trained",
              "mmskip evaluate_trained --threads 1 --task {wildcards.task} --scenes {input.scenes}"
              " --features {input.features} --llm {input.llm}"
              + (" --llm_small {input.llm_small}" if "small" in variants else "") + " --mapper {input.mapper}"
              " --trained_root models" + (" --masks {input.masks}" if "pruned" in variants else "")
              + " --baseline results/baseline/{wildcards.task} --out results/trained/{wildcards.task}"
              " --variants " + " ".join(variants) +  # written out, as the tasks are: dvc.yaml follows params
              " {params.calibration} {params.prompts} {params.compression} {params.train} {params.evaluation}"
              " {params.example_shares} {params.runtime}",
              vars=(per_task,),
              inputs={**DATA, **({"llm_small": "models/llm_small"} if "small" in variants else {}),
                      "mapper": "models/mapper/{task}",
                      "trained": tuple(f"models/mapper_{variant}/{{task}}" for variant in variants),
                      **({"masks": "models/masks/wanda"} if "pruned" in variants else {}), **BASELINE_INPUT},
              outputs={"metrics": metric("results/trained/{task}/metrics.json"),
                       "predictions": out("results/trained/{task}/predictions.json")},
              params={"calibration": CALIBRATION, "prompts": PROMPTS, "compression": Param("compression"),
                      "train": Param("train_compressed", ("init", "sparsity", "interval", "start_layer",
                                                          "semantics")),
                      "evaluation": DECODING, "example_shares": EXAMPLE_SHARES, "runtime": RUNTIME},
              mem_mb=3000, gpu=True),
        # The report reads the paths of its inputs and arguments, plus, when present: dvc.lock next to
        # dvc.yaml (no stage can depend on it: running a stage rewrites it), the git state of that folder,
        # the hashes of every artifact dvc.yaml names (the lineage), and Snakemake's benchmark files under
        # benchmarks/ (timings; absent under DVC).
        Stage("report",
              "mmskip report --params {input.params} --scenes {input.scenes} --eval "
              + " ".join(f"results/eval/{task}/{input}" for task in tasks for input in INPUTS)
              + " --foundation results/foundation --mapper_logs results/mapper --benchmarks benchmarks"
              " --baseline_root results/baseline --skip_root results/skip --tokens_root results/tokens"
              " --compress_root results/compress"
              + (" --subnet {input.subnet}/subnet.json" if subnet else "")
              + " --trained_root results/trained --bench {input.bench} --html {output.html} --csv {output.csv}"
              + (" --seeds_root results/seeds --seeds " + " ".join(map(str, replicas)) if replicas else "")
              + " --lineage {output.lineage} --dvc_yaml {input.dvc_yaml} --plots {output.plots} {params.report}",
              inputs={
                  "params": "params.yaml",  # every parameter is shown; skipping.modes and compression.mask_sets
                  "dvc_yaml": SnakemakeOnly("dvc.yaml"),  # the lineage: every stage's command, params, artifacts
                  "scenes": "data/scenes",
                  "metrics": tuple(f"results/eval/{t}/{i}/metrics.json" for t in tasks for i in INPUTS),
                  "predictions": tuple(f"results/eval/{t}/{i}/predictions.json" for t in tasks for i in INPUTS),
                  "foundation": tuple(f"results/foundation/{name}.json" for name in FOUNDATION_LOGS
                                      if (name not in GENERATED_ENCODERS.values()
                                          or name in {GENERATED_ENCODERS[d] for d in generated})
                                      and (name not in LLMS or name in llms)),
                  "mapper_logs": tuple(f"results/mapper/{task}.json" for task in tasks),
                  "baseline": tuple(f"results/baseline/{t}/predictions.json" for t in tasks),
                  **({"seeds": tuple(f"results/seeds/{s}/{t}/metrics.json" for s in replicas for t in tasks)}
                     if replicas else {}),
                  "skip": PerValue("results/skip/{task}/{mode}/{name}.json", "results/skip",
                                   {"task": tasks, "mode": "skipping.modes",
                                    "name": ("metrics", "predictions", "timing")}),
                  "tokens": PerValue("results/tokens/{task}/{kind}/{name}.json", "results/tokens",
                                     {"task": tasks, "kind": "token_skipping.kinds",
                                      "name": ("metrics", "predictions", "timing")}),
                  "compress": PerValue("results/compress/{task}/{mask_set}/{name}.json", "results/compress",
                                       {"task": tasks, "mask_set": "compression.mask_sets",
                                        "name": ("metrics", "predictions", "timing")}),
                  **({"subnet": "models/masks/subnet"} if subnet else {}),
                  "trained": tuple(f"results/trained/{t}/{name}.json" for t in tasks
                                   for name in ("metrics", "predictions")),
                  "bench": "results/bench/skip.json",
              },
              outputs={"html": out("reports/all.html", caption="workflow/report/all_html.rst"),
                       "csv": out("reports/summary.csv", caption="workflow/report/summary_csv.rst"),
                       "lineage": out("reports/lineage.json"),
                       "plots": folder("reports/plots")},
              params={"report": Param("report")},
              log="report"),
    )


STAGES = trained_stages(TASKS)  # the registered tasks' table (params.yaml's default tasks: the same two)
STAGE = {stage.name: stage for stage in STAGES}


# --- paper scale: the data and the foundation models from their publishers ----------------------

EXTERNAL = "data/external"  # fetch_data: downloads/ (the archives), {source}/ (each one extracted)
# what prepare_coco reads: Karpathy's split, COCO 2014's images, VQAv2's train and val (mmskip.data.sources)
COCO_SOURCES = ("karpathy_splits", "coco_train2014", "coco_val2014", "vqav2_questions_train", "vqav2_questions_val",
                "vqav2_annotations_train", "vqav2_annotations_val")
EMBEDDED_DATA = ("make_scenes",)  # the stage a downloaded dataset replaces
# At paper scale every dataset has its folder data/{name} and its feature cache results/features/{name}: the run's
# dataset (sources.data) and those of its own that tasks read (mmskip.tasks: Task.dataset), each made by a prepare
# stage from these sources (OK-VQA asks about COCO 2014's images).
PAPER_FEATURES = "results/features/{dataset}"
CLOTHO_PARTS = ("development", "validation", "evaluation")  # Clotho's published parts: train, val, test
OWN_DATASET_SOURCES = {
    "okvqa": ("coco_train2014", "coco_val2014", "okvqa_questions_train", "okvqa_annotations_train",
              "okvqa_questions_val", "okvqa_annotations_val"),
    "gqa": ("gqa_questions", "gqa_images"),
    "clotho": tuple(f"clotho_{kind}_{part}" for kind in ("captions", "audio") for part in CLOTHO_PARTS),
    "audiocaps": tuple(f"audiocaps_captions_{split}" for split in ("train", "val", "test")),
    "msrvtt": ("msrvtt",),
    "msrvtt_qa": ("msrvtt",),  # the videos; the questions are the user's
    "clotho_aqa": ("clotho_aqa_audio", *(f"clotho_aqa_questions_{split}" for split in ("train", "val", "test"))),
}


def needed_models(params: Mapping[str, Any]) -> tuple[str, ...]:
    """The foundation models the trained pipeline runs for params' tasks and training variants: the LLM (and the
    smaller one where variant small trains on it) and the encoder of each modality the tasks have (params ``sources``
    keys, ``mmskip.params.ENCODERS``)."""
    return (*llms_of(variants_of(params)), *(ENCODERS[m] for m in modalities(tasks_of(params))))


def hub_models(params: Mapping[str, Any]) -> tuple[str, ...]:
    """The foundation models that params' ``sources`` takes from the hub and the tasks use (the LLMs, then the
    encoders in ENCODERS' order), or LLaVA."""
    sources, needed = params.get("sources") or {}, needed_models(params)
    return tuple(m for m in (*LLMS, *ENCODERS.values(), LLAVA) if sources.get(m) and (m in needed or m == LLAVA))


def dataset(params: Mapping[str, Any]) -> str:
    return str((params.get("sources") or {}).get("data", "scenes"))


def fetch_data_stage(sources: tuple[str, ...]) -> Stage:
    return Stage(
        "fetch_data",  # on the login node: a download, hash-checked, resumable, locked, extracted whole
        "mmskip fetch_data --source {wildcards.source} --root " + EXTERNAL + " --extract {output.folder}"
        " {params.origin}",
        vars=(Var("source", sources),),
        outputs={"folder": folder(EXTERNAL + "/{source}")},
        params={"origin": Param("sources", ("mirror", "catalog"))},
        local=True)


PREPARE_COCO = Stage(
    "prepare_coco",
    "mmskip prepare_coco --karpathy {input.karpathy}/dataset_coco.json"
    " --questions {input.questions_train}/v2_OpenEnded_mscoco_train2014_questions.json"
    " {input.questions_val}/v2_OpenEnded_mscoco_val2014_questions.json"
    " --annotations {input.annotations_train}/v2_mscoco_train2014_annotations.json"
    " {input.annotations_val}/v2_mscoco_val2014_annotations.json"
    " --images {input.train2014}/train2014 {input.val2014}/val2014 --out {output.dataset}",
    inputs={"karpathy": f"{EXTERNAL}/karpathy_splits", "train2014": f"{EXTERNAL}/coco_train2014",
            "val2014": f"{EXTERNAL}/coco_val2014",
            "questions_train": f"{EXTERNAL}/vqav2_questions_train", "questions_val": f"{EXTERNAL}/vqav2_questions_val",
            "annotations_train": f"{EXTERNAL}/vqav2_annotations_train",
            "annotations_val": f"{EXTERNAL}/vqav2_annotations_val"},
    outputs={"dataset": folder(DATASET_FOLDERS["coco"])},
    log="coco")


# OK-VQA (the files of okvqa.allenai.org, in VQAv2's format): train as train, val as test, as the paper's code
PREPARE_OKVQA = Stage(
    "prepare_vqa",
    "mmskip prepare_vqa --train {input.questions_train}/OpenEnded_mscoco_train2014_questions.json"
    " {input.annotations_train}/mscoco_train2014_annotations.json"
    " --test {input.questions_val}/OpenEnded_mscoco_val2014_questions.json"
    " {input.annotations_val}/mscoco_val2014_annotations.json"
    " --images {input.train2014}/train2014 {input.val2014}/val2014 --out {output.dataset}",
    inputs={"train2014": f"{EXTERNAL}/coco_train2014", "val2014": f"{EXTERNAL}/coco_val2014",
            "questions_train": f"{EXTERNAL}/okvqa_questions_train", "questions_val": f"{EXTERNAL}/okvqa_questions_val",
            "annotations_train": f"{EXTERNAL}/okvqa_annotations_train",
            "annotations_val": f"{EXTERNAL}/okvqa_annotations_val"},
    outputs={"dataset": folder("data/okvqa")},
    log="okvqa")
# GQA's balanced questions (questions1.2.zip): train as train, val ("valid", which the paper's code evaluates on)
# as test; its images (images.zip) linked
PREPARE_GQA = Stage(
    "prepare_gqa",
    "mmskip prepare_gqa --train {input.questions}/train_balanced_questions.json"
    " --test {input.questions}/val_balanced_questions.json --images {input.images}/images --out {output.dataset}",
    inputs={"questions": f"{EXTERNAL}/gqa_questions", "images": f"{EXTERNAL}/gqa_images"},
    outputs={"dataset": folder("data/gqa")},
    log="gqa")
# Clotho v2.1 (Zenodo): the three caption CSVs and the three 7z archives of WAV clips; development as train,
# validation as val, evaluation as test (mmskip.data.clotho)
PREPARE_CLOTHO = Stage(
    "prepare_clotho",
    "mmskip prepare_clotho --captions"
    + "".join(f" {{input.captions_{p}}}/clotho_captions_{p}.csv" for p in CLOTHO_PARTS)
    + " --audio" + "".join(f" {{input.audio_{p}}}/{p}" for p in CLOTHO_PARTS)
    + " --out {output.dataset}",
    inputs={f"{kind}_{p}": f"{EXTERNAL}/clotho_{kind}_{p}" for kind in ("captions", "audio") for p in CLOTHO_PARTS},
    outputs={"dataset": folder("data/clotho")},
    log="clotho")
# AudioCaps: the three caption CSVs (GitHub) and the clips of the user's folder (params sources.audiocaps_audio, a
# param rather than a dep: DVC would hash every clip on every status), the missing ones listed
PREPARE_AUDIOCAPS = Stage(
    "prepare_audiocaps",
    "mmskip prepare_audiocaps --captions"
    + "".join(f" {{input.captions_{split}}}/{split}.csv" for split in ("train", "val", "test"))
    + " {params.clips} --out {output.dataset}",
    inputs={f"captions_{split}": f"{EXTERNAL}/audiocaps_captions_{split}" for split in ("train", "val", "test")},
    outputs={"dataset": folder("data/audiocaps")},
    params={"clips": Param("sources", ("audiocaps_audio", "audiocaps_clip_name"))},
    log="audiocaps")
# MSR-VTT (Frozen in Time's MSRVTT.zip: annotation, videos/all, the split lists), the split of params
# sources.msrvtt_split (mmskip.data.msrvtt)
PREPARE_MSRVTT = Stage(
    "prepare_msrvtt",
    "mmskip prepare_msrvtt --root {input.msrvtt}/MSRVTT {params.split} --out {output.dataset}",
    inputs={"msrvtt": f"{EXTERNAL}/msrvtt"},
    outputs={"dataset": folder("data/msrvtt")},
    params={"split": Param("sources", ("msrvtt_split",))},
    log="msrvtt")
# MSRVTT-QA: its question files from the user's folder (params sources.msrvtt_qa) on MSRVTT.zip's videos
PREPARE_MSRVTT_QA = Stage(
    "prepare_msrvtt_qa",
    "mmskip prepare_msrvtt_qa --root {input.msrvtt}/MSRVTT {params.qa} --out {output.dataset}",
    inputs={"msrvtt": f"{EXTERNAL}/msrvtt"},
    outputs={"dataset": folder("data/msrvtt_qa")},
    params={"qa": Param("sources", ("msrvtt_qa",))},
    log="msrvtt_qa")
# Clotho-AQA (Zenodo): its three question CSVs and audio_files.zip (mmskip.data.clotho)
PREPARE_CLOTHO_AQA = Stage(
    "prepare_clotho_aqa",
    "mmskip prepare_clotho_aqa --questions"
    + "".join(f" {{input.questions_{split}}}/clotho_aqa_{split}.csv" for split in ("train", "val", "test"))
    + " --audio {input.audio}/audio_files --out {output.dataset}",
    inputs={**{f"questions_{split}": f"{EXTERNAL}/clotho_aqa_questions_{split}" for split in ("train", "val", "test")},
            "audio": f"{EXTERNAL}/clotho_aqa_audio"},
    outputs={"dataset": folder("data/clotho_aqa")},
    log="clotho_aqa")
PREPARE_OWN = {"okvqa": PREPARE_OKVQA, "gqa": PREPARE_GQA, "msrvtt": PREPARE_MSRVTT, "msrvtt_qa": PREPARE_MSRVTT_QA,
               "clotho": PREPARE_CLOTHO, "clotho_aqa": PREPARE_CLOTHO_AQA, "audiocaps": PREPARE_AUDIOCAPS}


MULTI_TASK = ("prune_wanda", "bench_skip", "report")  # commands over several tasks: per-task --scenes/--features


def task_datasets(tasks: Sequence[str], data: str) -> dict[str, str]:
    """Task -> the dataset it reads: its own (Task.dataset), else the run's (params sources.data)."""
    return {task: get_task(task).dataset or data for task in tasks}


def _on_data(stage: Stage, tasks: Sequence[str], scenes: Mapping[str, str], features: Mapping[str, str],
             main: tuple[str, str]) -> Stage:
    """``stage`` reading each task's dataset folder (``scenes``) and feature cache (``features``) where the embedded
    default's table reads data/scenes and results/features: one path when every task reads the same; else a stage
    over the tasks chooses by task (``ByValue``), a stage over several tasks lists one per task in their order
    (its command's --scenes/--features), and a stage of no task reads the run's dataset (``main``)."""
    per_task = any(v.name == "task" for v in stage.vars)
    inputs = {}
    for name, value in stage.inputs.items():
        table = {DATA["scenes"]: scenes, DATA["features"]: features}.get(value) if isinstance(value, str) else None
        if table is None:
            inputs[name] = value
            continue
        paths = [table[t] for t in tasks]
        if len(set(paths)) == 1 and (per_task or stage.name in MULTI_TASK):
            inputs[name] = paths[0]
        elif per_task:
            inputs[name] = ByValue("task", dict(zip(tasks, paths, strict=True)))
        elif stage.name in MULTI_TASK:
            inputs[name] = tuple(paths)
        else:
            inputs[name] = main[0] if value == DATA["scenes"] else main[1]
    return replace(stage, inputs=inputs)


def fetch_model_stage(models: tuple[str, ...]) -> Stage:
    """The hub models of params' ``sources``: each becomes a reference folder ``models/{model}`` (its
    ``hub.json``), fetched into ``sources.hub_cache`` where absent; an LLM's shape (LLaVA's: its language
    model's) is checked against the section that describes it (LLaVA's: ``llm``)."""
    return Stage(
        "fetch_model",  # on the login node; jobs then load the reference offline (mmskip.foundation.hub.checkpoint)
        "mmskip fetch_model --id {params.id} --revision {params.revision} --cache {params.cache}"
        " --out {output.model} {params.shape}",
        vars=(Var("model", models),),
        outputs={"model": folder("models/{model}")},
        params={"id": ByValue("model", {m: Param(f"sources.{m}") for m in models}),
                "revision": ByValue("model", {m: Param(f"sources.{m}_revision") for m in models}),
                "cache": Param("sources.hub_cache"),
                "shape": ByValue("model", {m: _shape_section(m) for m in models})},
        local=True)


def _shape_section(model: str) -> Param | None:
    """The params section whose LLM_SHAPE_KEYS fetch_model checks a model's config against."""
    if model == LLAVA:
        return Param("llm", LLM_SHAPE_KEYS)  # the language model the skip grid runs on
    return Param(model, LLM_SHAPE_KEYS) if model in LLMS else None


def llava_stages(tasks: Sequence[str]) -> tuple[Stage, Stage]:
    """LLaVA-1.5 without training (params sources.llava): the skip grid of every mode per task on the dataset's
    images, the checkpoint's own vision tower and projector building each prompt (mmskip.evaluation.llava);
    and its report: the LLaVA section, the summary and the lineage (nothing was trained: no other section)."""
    evaluate = Stage(
        "evaluate_llava",
        "mmskip evaluate_llava --threads 1 --task {wildcards.task} --data {input.data} --model {input.model}"
        " --out {output.results} {params.prompts} {params.skipping} {params.evaluation} {params.runtime}",
        vars=(Var("task", tuple(tasks)),),
        inputs={"data": DATA["scenes"], "model": f"models/{LLAVA}"},
        outputs={"results": folder(f"results/{LLAVA}/{{task}}")},
        params={"prompts": PROMPTS, "skipping": Param("skipping"), "evaluation": DECODING, "runtime": RUNTIME},
        mem_mb=32000, gpu=True)
    report = replace(
        STAGE["report"],
        cmd="mmskip report --params {input.params} --scenes {input.scenes} --llava_root results/" + LLAVA
            + " --html {output.html} --csv {output.csv} --lineage {output.lineage} --dvc_yaml {input.dvc_yaml}"
            " --plots {output.plots} {params.report}",
        inputs={name: STAGE["report"].inputs[name] for name in ("params", "dvc_yaml", "scenes")}
        | {"llava": tuple(f"results/{LLAVA}/{task}" for task in tasks)})
    return evaluate, report


def _without_foundation_logs(stage: Stage, built: tuple[str, ...]) -> Stage:
    """The report reading the pretraining metrics of the models the pipeline built (none of a hub model)."""
    logs = tuple(f"results/foundation/{name}.json" for name in FOUNDATION_LOGS if name in built)
    return replace(stage, inputs={**stage.inputs, "foundation": logs})


def stage_table(params: Mapping[str, Any]) -> tuple[Stage, ...]:
    """The stages that params run, for params' ``tasks``: trained_stages for the embedded default; at paper
    scale (params ``sources``) fetch_data and the prepare stages of the datasets the tasks read (prepare_coco for
    the run's COCO, prepare_vqa for OK-VQA, prepare_gqa for GQA) in place of make_scenes, cache_features per
    dataset, fetch_model in place of each pretraining a hub id replaces (train_tokenizer goes with the last
    pretrained LLM), every other stage as it is, each task reading its dataset's folder and features. With
    ``sources.llava``: the data's stages, fetch_model, evaluate_llava and the report alone (nothing is trained).
    The embedded video and audio tasks read the generated clips and sounds (make_clips, make_sounds, in
    trained_stages): as at paper scale, each dataset then has its folder data/{name} and its feature cache
    results/features/{name}, by its modality's encoder (the clips' pretrained by pretrain_video_encoder, the
    sounds' by pretrain_audio_encoder)."""
    models, data, tasks = hub_models(params), dataset(params), tasks_of(params)
    built = tuple(m for m in HUB_MODELS if m in needed_models(params) and m not in models)  # pretrained here
    if data not in DATASETS:
        raise ValueError(f"sources.data = {data!r}: allowed {', '.join(DATASETS)}")
    stages = trained_stages(tasks, variants_of(params), seeds_of(params))
    of = task_datasets(tasks, data)
    generated = [d for d in dict.fromkeys(of.values()) if d in GENERATED_DATASETS]  # the video and audio tasks'
    if not models and data == "scenes" and not generated:
        return stages
    if data == "scenes" and not generated:  # hub models on the scenes: the default's data stages and paths
        scenes = {task: DATA["scenes"] for task in tasks}
        features = {task: DATA["features"] for task in tasks}
        main, datasets, own = (DATA["scenes"], DATA["features"]), (), []
    else:
        own = [d for d in dict.fromkeys(of.values()) if d != data]
        unknown = [d for d in own if d not in PREPARE_OWN and d not in GENERATED_DATASETS]
        if unknown:
            raise ValueError(f"tasks {[t for t in tasks if of[t] in unknown]} read dataset(s) {unknown}: no stage "
                             f"prepares them; allowed {sorted(PREPARE_OWN)}")
        scenes = {task: f"data/{of[task]}" for task in tasks}
        features = {task: PAPER_FEATURES.format(dataset=of[task]) for task in tasks}
        main = (DATASET_FOLDERS[data], PAPER_FEATURES.format(dataset=data))
        # the run's dataset where a task, or a pretraining (of no task), reads it
        reads_main = data in of.values() or (LLAVA not in models and bool(built))
        datasets = (*((data,) if reads_main else ()), *own)
    fetched = [d for d in datasets if d != "scenes" and d not in GENERATED_DATASETS]  # downloaded, then prepared
    table: list[Stage] = []
    if fetched:
        sources = [*(COCO_SOURCES if data in fetched else ()),
                   *(s for d in fetched if d != data for s in OWN_DATASET_SOURCES[d])]
        table += [fetch_data_stage(tuple(dict.fromkeys(sources))), *((PREPARE_COCO,) if data in fetched else ()),
                  *(PREPARE_OWN[d] for d in fetched if d != data)]
    if LLAVA in models:  # without training: the data, the model, its grid per task, the report
        if models != (LLAVA,):
            raise ValueError(f"sources.{LLAVA} runs LLaVA alone: sources {', '.join(models[:-1])} must be ''")
        return (*(table or [STAGE["make_scenes"]]), fetch_model_stage(models),
                *(_on_data(stage, tasks, scenes, features, main) for stage in llava_stages(tasks)))
    llms = tuple(m for m in LLMS if m in built)
    if models:  # (make_scenes, where the scenes are the data, comes with STAGES below)
        table.append(fetch_model_stage(models))
    for stage in stages:
        if stage.name in EMBEDDED_DATA and data != "scenes":
            continue
        if stage.name in ("train_tokenizer", "pretrain_llm") and not llms:
            continue
        if stage.name in PRETRAINED and PRETRAINED[stage.name] not in built:
            continue
        if stage.name == "pretrain_llm":
            stage = replace(stage, vars=(Var("llm", llms, sections=True),))
        if stage.name == "report":
            stage = _without_foundation_logs(stage, built)
        if stage.name == "cache_features" and datasets:  # one feature cache per dataset a task reads, by its encoder
            cached = tuple(d for d in datasets if d in of.values())
            encoders = {d: "models/" + ENCODERS[next(get_task(t).modality for t in tasks if of[t] == d)]
                        for d in cached}
            encoder = encoders[cached[0]] if len(set(encoders.values())) == 1 else ByValue("dataset", encoders)
            stage = replace(stage, vars=(Var("dataset", cached),), log="",
                            inputs={**stage.inputs, "scenes": "data/{dataset}", "encoder": encoder},
                            outputs={"features": folder(PAPER_FEATURES)})
        table.append(_on_data(stage, tasks, scenes, features, main))
    return tuple(table)


@dataclass(frozen=True)
class Job:
    """One job of a stage: a Snakemake job, a DVC stage instance (``evaluate@vqa-multimodal``)."""

    name: str
    stage: Stage
    wildcards: dict[str, str]
    params: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def outputs(self) -> list[Out]:
        return [Out(p.format(**self.wildcards), o.folder, o.metric, o.cache, o.caption)
                for o in self.stage.outputs.values() for p in self.stage.expand_each(o.path, self.params)]


def jobs(params: Mapping[str, Any]) -> list[Job]:
    """Every job the stages make with these params (params.yaml), named as DVC names them."""
    result = []
    for stage in stage_table(params):
        for wildcards in combinations(stage.vars, params):
            name = f"{stage.name}@{'-'.join(wildcards.values())}" if wildcards else stage.name
            result.append(Job(name, stage, wildcards, params))
    return result


# --- code dependencies: import closures --------------------------------------------------------

class ImportGraph:
    """Imports among the modules of ``<root>/src/mmskip``, parsed with ``ast`` (nothing is imported).

    Dynamic imports (``importlib.import_module``) are not seen; the package has none.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.src = self.root / "src"
        self._imports: dict[Path, set[Path]] = {}

    def module_file(self, module: str) -> Path | None:
        """The file of a module of the package (``mmskip.a.b`` -> src/mmskip/a/b.py or .../b/__init__.py)."""
        if module != PACKAGE and not module.startswith(PACKAGE + "."):
            return None
        base = self.src.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def _module_name(self, path: Path) -> str:
        parts = list(path.relative_to(self.src).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def _files(self, nodes: list[ast.AST], path: Path) -> set[Path]:
        """The package's files that the import statements among ``nodes`` (in ``path``) execute."""
        module = self._module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        names: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        files = set()
        for name in names:  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                found = self.module_file(".".join(parts[:i]))
                if found is not None:
                    files.add(found)
        return files

    def _parse(self, path: Path) -> ast.Module:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def imports(self, path: Path) -> set[Path]:
        """Files a module imports, at module level or inside any function."""
        if path not in self._imports:
            self._imports[path] = self._files(list(ast.walk(self._parse(path))), path)
        return self._imports[path]

    def closure_of(self, files: set[Path], expanded: set[Path] = frozenset()) -> set[Path]:
        """``files`` and every file they import, transitively; the imports of ``expanded`` (files
        whose relevant imports are among ``files`` already, i.e. cli.py) are not followed."""
        seen: set[Path] = set(expanded)
        todo = list(files - seen)
        while todo:
            path = todo.pop()
            if path not in seen:
                seen.add(path)
                todo.extend(self.imports(path) - seen)
        return seen

    def command_entry(self, command: str) -> set[Path]:
        """What ``mmskip <command>`` imports directly: cli.py's module-level imports, and those of the
        command's handler and of the cli.py functions it or ``main`` calls."""
        cli = self.module_file(CLI_MODULE)
        if cli is None:
            raise FileNotFoundError(f"{self.src}: no {CLI_MODULE} module")
        tree = self._parse(cli)
        functions = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        handler = _handler_name(tree, command) or (command if command in functions else None)
        if handler not in functions or ENTRY_POINT not in functions:
            raise ValueError(f"{cli}: no handler of command {command!r} (COMMANDS, or a function of that name)"
                             f" or no {ENTRY_POINT}()")
        reached, todo = set(), [ENTRY_POINT, handler]
        while todo:
            name = todo.pop()
            if name in reached:
                continue
            reached.add(name)
            todo.extend(call.func.id for call in ast.walk(functions[name])
                        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in functions)
        nodes = _module_level(tree) + [n for name in reached for n in ast.walk(functions[name])]
        return self._files(nodes, cli)

    def closure(self, command: str) -> list[str]:
        """The import closure of ``mmskip <command>``: sorted paths relative to the root (``src/mmskip/...``)."""
        cli = self.module_file(CLI_MODULE)
        files = self.closure_of(self.command_entry(command), expanded={cli}) | {cli}
        return sorted(path.relative_to(self.root).as_posix() for path in files)


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """The nodes of a module that run when it is imported: all but function bodies."""
    nodes: list[ast.AST] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        nodes.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return nodes


def _handler_name(tree: ast.Module, command: str) -> str | None:
    """The handler ``COMMANDS[command][0]`` of cli.py's ``COMMANDS = {"name": (handler, ...), ...}``."""
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == "COMMANDS" and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and key.value == command:
                    first = value.elts[0] if isinstance(value, (ast.Tuple, ast.List)) and value.elts else value
                    return first.id if isinstance(first, ast.Name) else None
    return None


# --- dvc.yaml ----------------------------------------------------------------------------------

class _Flow(tuple):
    """A list written in YAML flow style: ``[vqa, caption]``."""


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False):  # indent list items
        return super().increase_indent(flow, False)


_Dumper.add_representer(_Flow, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", list(data), flow_style=True))

DVC_HEADER = """\
# GENERATED from src/mmskip/stages.py (the stage table Snakemake's rules are made from too):
# do not edit; regenerate with `python -m mmskip.stages --dvc dvc.yaml` after changing the table
# or any import under src/mmskip (a stage's code deps are its command's import closure).
# A stage name is its rule name; instances are `train_mapper@<task>`, `evaluate@<task>-<input>`.
# `${section}` unpacks a params.yaml section into `--key value` flags, as `cli_args` does for
# Snakemake; .dvc/config sets `parsing.bool: boolean_optional` and `parsing.list: nargs`.
"""

# `dvc plots show`: the skip grid's and the pruning masks' headline score against compute and
# sparsity (tables written by the report stage).
DVC_PLOTS = [
    {"Skipping, score vs decode FLOPs": {"template": "scatter", "x": "decode_flops_fraction",
                                         "y": {"reports/plots/skipping.csv": "pct_of_baseline"}}},
    {"Compression, score vs sparsity": {"template": "scatter", "x": "sparsity",
                                        "y": {"reports/plots/compression.csv": "pct_of_baseline"}}},
]


def render_dvc_yaml(root: Path | str, params: Mapping[str, Any] | None = None) -> str:
    """The text of ``dvc.yaml`` for the code under ``root/src/mmskip`` and the stage table of ``params``
    (default: ``root/params.yaml``; its ``sources`` choose the embedded default's stages or paper scale's)."""
    graph = ImportGraph(root)
    if params is None:
        params = yaml.safe_load((Path(root) / "params.yaml").read_text(encoding="utf-8"))
    stages = {stage.name: stage.dvc_stage(graph.closure(stage.command), params) for stage in stage_table(params)}
    parts = [DVC_HEADER, "stages:\n"]
    for name, body in stages.items():
        text = yaml.dump({name: body}, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
        parts.append("".join(f"  {line}\n" if line else "\n" for line in text.splitlines()) + "\n")
    parts.append("# `dvc plots show`: the skip grid's and the pruning masks' headline score against compute and\n"
                 "# sparsity (tables written by the report stage).\n")
    parts.append(yaml.dump({"plots": DVC_PLOTS}, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True))
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmskip.stages", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--dvc", type=Path, help="write dvc.yaml here (its folder holds src/mmskip)")
    action.add_argument("--check", type=Path, help="exit 1 if this dvc.yaml differs from the generated one")
    args = parser.parse_args(argv)
    path = args.dvc or args.check
    text = render_dvc_yaml(path.resolve().parent)
    if args.check:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            print(f"{path} is stale: regenerate it with `python -m mmskip.stages --dvc {path}`", file=sys.stderr)
            return 1
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
