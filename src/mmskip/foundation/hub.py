"""Hub models by id and revision: fetched once where the hub is reachable, read offline everywhere else.

Compute nodes have no network, so loading never downloads. :func:`fetch` (the commands
``mmskip fetch_model`` and ``fetch_hub_dataset``, for a login node) fills a declared cache (Hugging Face's own layout,
``<cache>/models--<org>--<name>/snapshots/<commit>``) with ``huggingface_hub.snapshot_download``
and returns the commit the revision resolved to, which a config then pins. :func:`resolve` finds
the snapshot of an id and revision in that cache with ``local_files_only=True``, so a job whose
model is missing stops at once, naming the id, the revision, the cache and the command that
fetches it; the path it returns is loaded through ``from_pretrained`` like every local checkpoint
(``mmskip.models.load_llm`` and the others), so the tiny checkpoints of the embedded default and
the hub's models take one code path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from mmskip.params import LLM_SHAPE_KEYS

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class MissingModelError(FileNotFoundError):
    """A hub model that is not in the cache a job reads."""


class MissingDatasetError(MissingModelError):
    """A hub dataset that is not in the cache a job reads."""


# repo_type -> what it is called, the command that fetches it, the error when it is absent
KINDS = {"model": ("model", "fetch_model", MissingModelError),
         "dataset": ("dataset", "fetch_hub_dataset", MissingDatasetError)}


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id:
        raise ValueError(f"model id {repo_id!r}: allowed an 'organisation/name' hub id (letters, digits, . _ -)")
    return repo_id


def fetch_command(repo_id: str, revision: str, cache_dir: str | os.PathLike, repo_type: str = "model",
                  files: tuple[str, ...] = ()) -> str:
    patterns = "".join(f" --files '{f}'" for f in files)
    return f"mmskip {KINDS[repo_type][1]} --id {repo_id} --revision {revision} --cache {cache_dir}{patterns}"


def resolve(repo_id: str, revision: str, cache_dir: str | os.PathLike, repo_type: str = "model",
            files: tuple[str, ...] = ()) -> Path:
    """The local snapshot folder of ``repo_id`` (a model, or a dataset with ``repo_type="dataset"``) at
    ``revision`` (a commit, a branch or a tag the cache has seen) in ``cache_dir``, without any network;
    :class:`MissingModelError` (:class:`MissingDatasetError`) naming the command that fetches it (its
    ``files`` patterns) when absent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    check_repo_id(repo_id)
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache_dir,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        kind, _, error = KINDS[repo_type]
        raise error(
            f"{kind} {repo_id} at revision {revision} is not in the cache {cache_dir}; jobs run offline "
            f"(HF_HUB_OFFLINE=1). Fetch it where the hub is reachable (a login node) with:\n"
            f"  {fetch_command(repo_id, revision, cache_dir, repo_type, files)}") from None


# weights other frameworks load (TensorFlow, Flax, ONNX, ...): never read here
FOREIGN_WEIGHTS = ("*.h5", "*.msgpack", "*.ckpt", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "onnx/*",
                   "coreml/*", "openvino/*")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth")  # the same weights again where safetensors exist


def skipped_files(files: list[str]) -> list[str]:
    """Glob patterns of a model repository's files that ``from_pretrained`` does not read here: other
    frameworks' weights, and the pickled PyTorch weights where the repository has safetensors too (a 7B
    model's weights would otherwise be downloaded twice)."""
    skip = list(FOREIGN_WEIGHTS)
    if any(f.endswith(".safetensors") for f in files):
        skip += PICKLED_WEIGHTS
    return skip


def fetch(repo_id: str, revision: str, cache_dir: str | os.PathLike, repo_type: str = "model",
          files: tuple[str, ...] = ()) -> tuple[Path, str]:
    """Download ``repo_id`` (a model, or a dataset) at ``revision`` into ``cache_dir``, only the files
    matching the glob patterns ``files`` (none: all a model's ``from_pretrained`` reads, see
    :func:`skipped_files`); resumable, hash-checked by ``huggingface_hub``. Returns the snapshot folder
    and the commit to pin in a config."""
    from huggingface_hub import HfApi, snapshot_download

    check_repo_id(repo_id)
    skip = None
    if repo_type == "model" and not files:
        skip = skipped_files(HfApi().list_repo_files(repo_id, revision=revision, repo_type=repo_type))
    path = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache_dir,
                                  allow_patterns=list(files) or None, ignore_patterns=skip))
    return path, path.name


# --- reference folders: a hub model where the pipeline expects a checkpoint folder ------------------

REFERENCE = "hub.json"  # the one file of a reference folder (models/llm at paper scale)
# params keys of an LLM section (mmskip.params.LLMConfig) -> the attribute names Hugging Face configs use
LLM_SHAPE = dict(zip(LLM_SHAPE_KEYS, (("num_hidden_layers",), ("hidden_size",), ("num_attention_heads",),
                                      ("ffn_dim", "intermediate_size"), ("max_position_embeddings",))))


def shape_problems(config: Mapping[str, Any], expected: Mapping[str, int]) -> list[str]:
    """Where a checkpoint's config.json differs from the shape its params section declares (the keys of
    ``LLM_SHAPE``), one line per key: the params checks (the skip grid fits the LLM, N:M patterns tile its
    widths) read those keys, so they must describe the model that runs."""
    problems = []
    for key, value in expected.items():
        name = next((n for n in LLM_SHAPE[key] if n in config), LLM_SHAPE[key][0])
        if config.get(name) != value:
            problems.append(f"{key} = {value} in params, but the checkpoint's {name} is {config.get(name)}")
    return problems


def language_config(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's config with the defaults its class fills in (config.json may leave them out, as
    llava-hf's does for its LLaMA); of a multimodal checkpoint (LLaVA), its language model's."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return getattr(config, "text_config", config).to_dict()


def link(repo_id: str, revision: str, cache_dir: str | os.PathLike, out: str | os.PathLike,
         expected: Mapping[str, int] | None = None, fetch_missing: bool = True) -> dict[str, str]:
    """Make ``out`` a reference folder: ``out/hub.json`` names ``repo_id`` at the commit ``revision`` resolved
    to in ``cache_dir``, which every job then loads offline through :func:`checkpoint`. The model is read
    from the cache, or fetched there first when it is absent and ``fetch_missing`` (the pipeline's
    fetch_model stage, on the host with network). ``expected``: the shape its params section declares
    (``LLM_SHAPE`` keys), checked against its config.json; a mismatch writes nothing."""
    from mmskip.io import atomic_dir, write_json

    try:
        path = resolve(repo_id, revision, cache_dir)
    except MissingModelError:
        if not fetch_missing:
            raise
        path, _ = fetch(repo_id, revision, cache_dir)
    problems = shape_problems(language_config(path), expected) if expected else []
    if problems:
        raise ValueError(f"model {repo_id} at {revision} ({path}) is not the shape params declare; set the section "
                         "to the checkpoint's:\n" + "\n".join(f"  - {p}" for p in problems))
    reference = {"id": repo_id, "revision": revision, "commit": path.name, "cache": str(cache_dir)}
    with atomic_dir(out) as tmp:
        write_json(tmp / REFERENCE, reference)
    return reference


def checkpoint(path: str | os.PathLike) -> Path | str:
    """The folder to give ``from_pretrained`` for ``path``: a reference folder's model, resolved offline in its
    cache at its commit (:class:`MissingModelError` with the fetch command when absent); any other path as is."""
    reference = Path(path) / REFERENCE
    if not reference.is_file():
        return path
    from mmskip.io import read_json

    ref = read_json(reference)
    return resolve(ref["id"], ref["commit"], ref["cache"])
