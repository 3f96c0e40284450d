"""The paper's data sources by name, each with its published checksum or one recorded here.

``mmskip fetch_data --source NAME --root DIR`` downloads a source into ``DIR/downloads`` through
:func:`mmskip.data.download.fetch`. A source with a published md5 is checked against it. For one
without (most of them: see the table), the first download's sha256 is written to
``workflow/checksums.yaml`` in the repository (commit it): later downloads, on any machine, must
match it, and a changed file upstream is refused rather than silently used. ``--mirror`` replaces
a source's scheme and host (a site mirror, or the tests' loopback server).

URLs and md5s are from the publishers' pages as gathered in ``PAPER-SCALE-FACTS.md``; those
marked ``verified=False`` come from one third-party source and are confirmed by the first download.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from mmskip.data.download import fetch
from mmskip.io import atomic_path

log = logging.getLogger(__name__)

CHECKSUMS = Path("workflow/checksums.yaml")  # sha256 of the sources with no published checksum


@dataclass(frozen=True)
class Source:
    url: str
    md5: str | None = None  # published by the source itself
    verified: bool = True  # False: the URL or checksum comes from a single third-party page

    @property
    def filename(self) -> str:
        return Path(urlsplit(self.url).path).name


_ZENODO_CLOTHO = "https://zenodo.org/records/4783391/files/"
_ZENODO_CLOTHO_AQA = "https://zenodo.org/records/6473207/files/"
_VQA = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/"
SOURCES = {
    "coco_train2014": Source("http://images.cocodataset.org/zips/train2014.zip", "0da8c0bd3d6becc4dcb32757491aca88"),
    "coco_val2014": Source("http://images.cocodataset.org/zips/val2014.zip", "a3d79f5ed8d289b7a7554ce06a5782b3"),
    "karpathy_splits": Source("https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"),
    "vqav2_questions_train": Source(_VQA + "v2_Questions_Train_mscoco.zip"),
    "vqav2_questions_val": Source(_VQA + "v2_Questions_Val_mscoco.zip"),
    "vqav2_annotations_train": Source(_VQA + "v2_Annotations_Train_mscoco.zip"),
    "vqav2_annotations_val": Source(_VQA + "v2_Annotations_Val_mscoco.zip"),
    "okvqa_questions_train": Source("https://okvqa.allenai.org/static/data/OpenEnded_mscoco_train2014_questions.json.zip",
                                    verified=False),
    "okvqa_questions_val": Source("https://okvqa.allenai.org/static/data/OpenEnded_mscoco_val2014_questions.json.zip",
                                  verified=False),
    "okvqa_annotations_train": Source("https://okvqa.allenai.org/static/data/mscoco_train2014_annotations.json.zip",
                                      verified=False),
    "okvqa_annotations_val": Source("https://okvqa.allenai.org/static/data/mscoco_val2014_annotations.json.zip",
                                    verified=False),
    # GQA (Hudson & Manning 2019): balanced question files, and the images as images/{imageId}.jpg
    "gqa_questions": Source("https://downloads.cs.stanford.edu/nlp/data/gqa/questions1.2.zip", verified=False),
    "gqa_images": Source("https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip", verified=False),
    # AudioCaps' caption CSVs (Kim et al. 2019); its clips are on YouTube only: the user's folder
    **{f"audiocaps_captions_{split}": Source(f"https://raw.githubusercontent.com/cdjkim/audiocaps/master/dataset/"
                                             f"{split}.csv", verified=False) for split in ("train", "val", "test")},
    "msrvtt": Source("https://www.robots.ox.ac.uk/~maxbain/frozen-in-time/data/MSRVTT.zip", verified=False),
    "clotho_audio_development": Source(_ZENODO_CLOTHO + "clotho_audio_development.7z",
                                       "c8b05bc7acdb13895bb3c6a29608667e"),
    "clotho_audio_validation": Source(_ZENODO_CLOTHO + "clotho_audio_validation.7z", "7dba730be08bada48bd15dc4e668df59"),
    "clotho_audio_evaluation": Source(_ZENODO_CLOTHO + "clotho_audio_evaluation.7z", "4569624ccadf96223f19cb59fe4f849f"),
    "clotho_captions_development": Source(_ZENODO_CLOTHO + "clotho_captions_development.csv",
                                          "d4090b39ce9f2491908eebf4d5b09bae"),
    "clotho_captions_validation": Source(_ZENODO_CLOTHO + "clotho_captions_validation.csv",
                                         "5879e023032b22a2c930aaa0528bead4"),
    "clotho_captions_evaluation": Source(_ZENODO_CLOTHO + "clotho_captions_evaluation.csv",
                                         "1b16b9e57cf7bdb7f13a13802aeb57e2"),
    # Clotho-AQA (Lipping et al. 2022; Zenodo record 6473207, no published checksums): the clips and the three
    # question CSVs, as ESPnet's recipe reads them (audio_files/, clotho_aqa_{split}.csv)
    "clotho_aqa_audio": Source(_ZENODO_CLOTHO_AQA + "audio_files.zip", verified=False),
    **{f"clotho_aqa_questions_{split}": Source(_ZENODO_CLOTHO_AQA + f"clotho_aqa_{split}.csv", verified=False)
       for split in ("train", "val", "test")},
}


def read_catalog(path: str | Path | None) -> dict[str, Source]:
    """The built-in sources with those of a catalog file in their place: a YAML mapping of source names to
    ``{url: ..., md5: <32 hex digits>}`` (a site's own copies, repackaged; the md5 may be left out, and is
    then recorded on first download like any source without one). ``None`` or "": the built-in ones."""
    if not path:
        return dict(SOURCES)
    entries = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(entries, dict):
        raise ValueError(f"catalog {path}: expected a mapping of source names to {{url, md5}}")
    table = dict(SOURCES)
    for name, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) - {"url", "md5"} or "url" not in entry:
            raise ValueError(f"catalog {path}: source {name!r} must be {{url: ..., md5: ...}} (md5 optional), "
                             f"got {entry!r}")
        url, md5 = str(entry["url"]), entry.get("md5")
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"catalog {path}: source {name!r} url {url!r}: allowed an http(s) URL")
        if md5 is not None and not (isinstance(md5, str) and len(md5) == 32
                                    and all(c in "0123456789abcdef" for c in md5)):
            raise ValueError(f"catalog {path}: source {name!r} md5 {md5!r}: allowed 32 lower-case hex digits")
        table[str(name)] = Source(url, md5)
    return table


def get_source(name: str, sources: dict[str, Source] | None = None) -> Source:
    sources = SOURCES if sources is None else sources
    if name not in sources:
        raise ValueError(f"source {name!r}: allowed {sorted(sources)}")
    return sources[name]


def _mirrored(url: str, mirror: str | None) -> str:
    if not mirror:  # None or "" (params sources.mirror): the publisher
        return url
    m, u = urlsplit(mirror), urlsplit(url)
    if m.scheme not in ("http", "https") or not m.netloc:
        raise ValueError(f"mirror {mirror!r}: allowed an http(s)://host[:port] URL")
    return urlunsplit((m.scheme, m.netloc, m.path.rstrip("/") + u.path, u.query, ""))


def read_checksums(path: Path = CHECKSUMS) -> dict[str, str]:
    if not Path(path).exists():
        return {}
    return yaml.safe_load(Path(path).read_text()) or {}


def fetch_source(name: str, root: str | Path, mirror: str | None = None, checksums: Path = CHECKSUMS,
                 sources: dict[str, Source] | None = None, retries: int = 3, progress: bool = True) -> Path:
    """Source ``name`` at ``root/downloads/<its file name>``, checked against its published md5,
    else the sha256 recorded in ``checksums``, else recorded there now. Returns the file."""
    source = get_source(name, sources)
    recorded = read_checksums(checksums).get(name)
    known = f"md5:{source.md5}" if source.md5 else recorded
    dest = Path(root) / "downloads" / source.filename
    fetch(_mirrored(source.url, mirror), known, dest, retries=retries, progress=progress)
    if known is None:
        import pooch

        from filelock import FileLock

        digest = "sha256:" + pooch.file_hash(str(dest), alg="sha256")
        with FileLock(f"{checksums}.lock"):  # pipeline jobs fetching sources side by side: no lost update
            table = read_checksums(checksums)
            table[name] = digest
            with atomic_path(checksums) as tmp:
                tmp.write_text(yaml.safe_dump(dict(sorted(table.items())), sort_keys=False))
        log.warning("%s has no published checksum: recorded %s in %s (commit it)", name, digest, checksums)
    return dest
