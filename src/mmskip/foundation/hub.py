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


def fetch(repo_id: str, revision: str, cache_dir: str | os.PathLike, repo_type: str = "model",
          files: tuple[str, ...] = ()) -> tuple[Path, str]:
    """Download ``repo_id`` (a model, or a dataset) at ``revision`` into ``cache_dir``, only the files
    matching the glob patterns ``files`` (none: all); resumable, hash-checked by ``huggingface_hub``.
    Returns the snapshot folder and the commit to pin in a config."""
    from huggingface_hub import snapshot_download

    check_repo_id(repo_id)
    path = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache_dir,
                                  allow_patterns=list(files) or None))
    return path, path.name
