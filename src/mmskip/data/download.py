"""Downloads and archives of the paper-scale data: hash-checked, resumable, atomic, locked, safe.

:func:`fetch` gets one file through ``pooch.retrieve``, which checks the hash (``md5:...`` or
``sha256:...``) and moves the file to its name only when the hash matched; a file already
there is hashed again and kept when it matches. What pooch does not do, done here:

- **resume**: the bytes go to ``<name>.part``, which outlives an interrupted transfer; the next
  attempt (in the same call, up to ``retries`` times, or a later call) asks for the rest with an
  HTTP ``Range`` request and appends. A server that ignores the range (200 instead of 206)
  restarts it. A complete ``.part`` whose hash is wrong is removed (it cannot be resumed).
- **lock**: ``<name>.lock`` (``filelock``) around the whole fetch, so two jobs on a shared file
  system that ask for one file download it once; the second finds it present and hash-checked.
- **errors that say what happened**: a hash mismatch names the URL, the expected and the actual
  hash, and leaves nothing under the file's name.

:func:`extract` unpacks a zip, tar or 7z archive (Clotho's audio) into a folder after checking
every member: a member with an absolute path, a ``..`` component, a symbolic or hard link, or a
device or FIFO is refused by name before anything is written. A source that is a plain data file
(Clotho's caption CSVs) is placed in the folder as it is. The folder appears whole (written under
a temporary name, then renamed) or not at all.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

import pooch
import requests
from filelock import FileLock
from tqdm import tqdm

from mmskip.io import atomic_dir

log = logging.getLogger(__name__)

HASH_ALGORITHMS = ("md5", "sha1", "sha256", "sha512")
CHUNK = 1 << 16  # bytes read at a time: an interrupted read loses at most this much


class DownloadError(RuntimeError):
    """A download that did not give the expected file."""


def check_hash(known_hash: str | None) -> str | None:
    """``known_hash`` as ``alg:hex`` (sha256 when no algorithm is given), or a ValueError naming it."""
    if known_hash is None:
        return None
    alg, _, digest = known_hash.rpartition(":")
    alg = (alg or "sha256").lower()
    lengths = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
    if alg not in lengths:
        raise ValueError(f"hash {known_hash!r}: algorithm {alg!r} not allowed; allowed {list(HASH_ALGORITHMS)}")
    if len(digest) != lengths[alg] or any(c not in "0123456789abcdefABCDEF" for c in digest):
        raise ValueError(f"hash {known_hash!r}: a {alg} digest is {lengths[alg]} hexadecimal characters")
    return f"{alg}:{digest.lower()}"


class ResumingDownloader:
    """A pooch downloader that appends to ``part`` from where it stopped (HTTP ``Range``), retrying
    ``retries`` times after an interrupted transfer, then moves the whole file to pooch's
    temporary name (pooch checks its hash there)."""

    def __init__(self, part: Path, retries: int = 3, timeout: float = 60.0, progress: bool = True):
        self.part, self.retries, self.timeout, self.progress = part, retries, timeout, progress
        self.requests: list[dict] = []  # (range asked, status) of every request made, for the log and tests

    def _attempt(self, url: str) -> None:
        have = self.part.stat().st_size if self.part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as r:
            self.requests.append({"range": headers.get("Range"), "status": r.status_code})
            if r.status_code == 416 and have:  # nothing after what we have: the part is whole
                return
            r.raise_for_status()
            if have and r.status_code != 206:
                log.info("%s: the server ignored the range request, downloading from the start", url)
                have = 0
            elif have and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                raise DownloadError(f"{url}: asked for bytes {have}- and got Content-Range "
                                    f"{r.headers.get('Content-Range')!r}")
            length = r.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(self.part, "ab" if have else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, desc=self.part.name[:-5],
                    disable=not self.progress, mininterval=5) as bar:
                for chunk in r.iter_content(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            if total is not None and self.part.stat().st_size < total:
                raise requests.exceptions.ChunkedEncodingError(
                    f"{url}: the connection closed after {self.part.stat().st_size} of {total} bytes")

    def __call__(self, url: str, output_file, pooch_instance) -> None:
        for attempt in range(self.retries + 1):
            try:
                self._attempt(url)
                break
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError,
                    requests.exceptions.Timeout) as err:
                have = self.part.stat().st_size if self.part.exists() else 0
                if attempt == self.retries:
                    raise DownloadError(f"{url}: interrupted after {have} bytes ({err}); {self.part} is kept, "
                                        f"and the next fetch resumes from there") from err
                log.info("%s: interrupted after %d bytes (%s); resuming", url, have, err)
        os.replace(self.part, output_file)


def fetch(url: str, known_hash: str | None, dest: str | os.PathLike, retries: int = 3, timeout: float = 60.0,
          progress: bool = True) -> Path:
    """``url`` at ``dest``, hash-checked against ``known_hash`` (``md5:...``, ``sha256:...``;
    None: not checked, for the first download of a source with no published hash, whose sha256
    the caller then records). Resumes, locks and fails as the module says. Returns ``dest``."""
    known_hash = check_hash(known_hash)
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{dest}.lock"):
        if known_hash and dest.exists() and not pooch.hashes.hash_matches(str(dest), known_hash):
            log.warning("%s does not match %s: removed, downloading it again", dest, known_hash)
            dest.unlink()
        downloader = ResumingDownloader(dest.with_name(dest.name + ".part"), retries, timeout, progress)
        try:
            pooch.retrieve(url, known_hash, fname=dest.name, path=dest.parent, downloader=downloader,
                           progressbar=False)
        except ValueError as err:  # pooch: "... expected <alg:hex> but got <hex>. Deleted download ..."
            if " but got " not in str(err):
                raise
            alg, expected = known_hash.split(":")
            actual = str(err).split(" but got ")[1].split(".")[0]
            raise DownloadError(f"{url}: {alg} hash mismatch, expected {expected}, got {actual}; "
                                f"nothing was kept") from None
    return dest


def _member_problem(name: str, kind: str | None) -> str | None:
    """Why an archive member may not be extracted, or None."""
    if kind is not None:
        return kind
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "a '..' component"
    return None


def _tar_kind(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.isdev():
        return "a device or FIFO"
    if not (member.isfile() or member.isdir()):
        return "not a file or folder"
    return None


def _zip_kind(info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16  # Unix mode, when the archiver wrote one
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # no type bits: a plain member
        return "a device or FIFO"
    return None


def _7z_kind(member) -> str | None:
    """Why a 7z member (``py7zr``'s ``ArchiveFile``) is not a plain file or folder, or None."""
    if member.is_symlink:
        return "a symbolic link"
    if member.is_junction:
        return "a junction (a link)"
    mode = member.st_fmt  # the Unix type bits, when the archiver wrote them
    if member.is_socket or (mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))):
        return "a device, FIFO or socket"
    return None


# a source that is one data file, not an archive: placed in the folder as it is
PLAIN_SUFFIXES = (".csv", ".json")


def extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Every member of the zip, tar or 7z ``archive`` under ``dest`` (replaced whole), after checking
    them all; a member that could write outside ``dest`` or is not a plain file or folder is
    refused, named, before anything is written. A plain data file (``.csv``, ``.json``) is copied
    into ``dest`` under its name."""
    archive, dest = Path(archive), Path(dest)
    if archive.suffix.lower() in PLAIN_SUFFIXES and archive.is_file():
        with atomic_dir(dest) as tmp:
            shutil.copyfile(archive, tmp / archive.name)
        return dest
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            bad = [(i.filename, _member_problem(i.filename, _zip_kind(i))) for i in zf.infolist()]
            _refuse(archive, bad)
            with atomic_dir(dest) as tmp:
                zf.extractall(tmp)
        return dest
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            bad = [(m.name, _member_problem(m.name, _tar_kind(m))) for m in members]
            _refuse(archive, bad)
            with atomic_dir(dest) as tmp:
                tf.extractall(tmp, members=members, filter="data")
        return dest
    import py7zr  # imported here: 0.6 s, for Clotho's audio alone

    if py7zr.is_7zfile(archive):
        with py7zr.SevenZipFile(archive) as sz:
            bad = [(m.filename, _member_problem(m.filename, _7z_kind(m))) for m in sz.files]
            _refuse(archive, bad)
            with atomic_dir(dest) as tmp:
                sz.extractall(path=tmp)
        return dest
    raise ValueError(f"{archive}: not a zip, tar or 7z archive; allowed: .zip, .tar, .tar.gz, .tgz, .tar.bz2, "
                     f".tar.xz, .7z, or a plain data file {', '.join(PLAIN_SUFFIXES)}")


def _refuse(archive: Path, problems: list[tuple[str, str | None]]) -> None:
    bad = [(name, why) for name, why in problems if why]
    if bad:
        listed = "; ".join(f"{name!r} is {why}" for name, why in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise ValueError(f"{archive}: refusing to extract: {listed}{more}; nothing was extracted")
