"""Downloads from a loopback HTTP server the test starts: hash-checked, resumed, atomic, locked;
archives extracted only when every member is safe."""

import hashlib
import re
import io
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmskip.data.download import DownloadError, check_hash, extract, fetch

DATA = bytes(range(256)) * 4096  # 1 MiB
MD5 = "md5:" + hashlib.md5(DATA).hexdigest()
SHA256 = "sha256:" + hashlib.sha256(DATA).hexdigest()


class Server:
    """Serves ``files`` on 127.0.0.1 with HTTP Range support. ``cut[path] = [n, ...]``: the next
    responses for ``path`` send n bytes of their body each and close the connection; ``ignore_range``: paths
    answered whole (200) whatever the range; ``delay``: seconds before each body; ``log``: the
    (path, Range header) of every GET."""

    def __init__(self):
        self.files, self.cut, self.ignore_range, self.delay, self.log = {}, {}, set(), 0.0, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.log.append((self.path, self.headers.get("Range")))
                if self.path not in server.files:
                    self.send_error(404)
                    return
                body, status, start = server.files[self.path], 200, 0
                asked = self.headers.get("Range")
                if asked and self.path not in server.ignore_range:
                    start = int(asked.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    status = 206
                part = body[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(part)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                time.sleep(server.delay)
                cuts = server.cut.get(self.path) or [None]
                n = cuts.pop(0)
                if n is None:
                    self.wfile.write(part)
                    return
                self.wfile.write(part[:n])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    s = Server()
    s.files["/data.bin"] = DATA
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def leftovers(folder):
    """What a fetch left in ``folder`` besides the file and its lock."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_a_good_download_is_checked_and_kept(server, tmp_path):
    dest = fetch(server.url("/data.bin"), MD5, tmp_path / "d" / "data.bin", progress=False)
    assert dest.read_bytes() == DATA and leftovers(dest.parent) == ["data.bin"]
    assert fetch(server.url("/data.bin"), SHA256, dest, progress=False) == dest  # present and matching: no request
    assert len(server.log) == 1


def test_an_interrupted_download_resumes_where_it_stopped(server, tmp_path):
    server.cut["/data.bin"] = [300_000]
    dest = tmp_path / "data.bin"
    kept = 300_000 // 65536 * 65536  # whole chunks read before the connection closed
    with pytest.raises(DownloadError, match=f"interrupted after {kept} bytes.*the next fetch resumes"):
        fetch(server.url("/data.bin"), MD5, dest, retries=0, progress=False)
    assert not dest.exists() and (tmp_path / "data.bin.part").stat().st_size == kept
    fetch(server.url("/data.bin"), MD5, dest, retries=0, progress=False)
    assert server.log == [("/data.bin", None), ("/data.bin", f"bytes={kept}-")]
    assert dest.read_bytes() == DATA and leftovers(tmp_path) == ["data.bin"]


def test_a_download_cut_twice_resumes_within_one_call(server, tmp_path):
    server.cut["/data.bin"] = [3 * 65536 + 1000, 2 * 65536 + 1000]  # the resumed response is cut too
    dest = tmp_path / "data.bin"
    fetch(server.url("/data.bin"), MD5, dest, retries=3, progress=False)
    ranges = [r for _, r in server.log]
    assert ranges[0] is None and len(ranges) == 3 and all(r.startswith("bytes=") for r in ranges[1:])
    starts = [int(r[6:-1]) for r in ranges[1:]]
    assert starts == [3 * 65536, 5 * 65536]  # the whole chunks each response delivered
    assert dest.read_bytes() == DATA


def test_a_server_that_ignores_the_range_restarts_the_file(server, tmp_path):
    server.cut["/data.bin"] = [300_000]
    server.ignore_range.add("/data.bin")
    dest = fetch(server.url("/data.bin"), MD5, tmp_path / "data.bin", retries=1, progress=False)
    assert dest.read_bytes() == DATA


def test_a_wrong_hash_is_refused_with_url_expected_and_actual_and_nothing_kept(server, tmp_path):
    wrong = "md5:" + "0" * 32
    url = server.url("/data.bin")
    with pytest.raises(DownloadError) as err:
        fetch(url, wrong, tmp_path / "data.bin", progress=False)
    message = str(err.value)
    assert url in message and "0" * 32 in message and hashlib.md5(DATA).hexdigest() in message
    assert leftovers(tmp_path) == []


def test_a_file_that_does_not_match_is_downloaded_again(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"truncated")
    fetch(server.url("/data.bin"), SHA256, dest, progress=False)
    assert dest.read_bytes() == DATA and len(server.log) == 1


@pytest.mark.parametrize("bad, message", [
    ("md5:123", "a md5 digest is 32 hexadecimal characters"),
    ("crc32:" + "0" * 8, "algorithm 'crc32' not allowed; allowed ['md5', 'sha1', 'sha256', 'sha512']"),
    ("z" * 64, "a sha256 digest is 64 hexadecimal characters"),
])
def test_bad_hashes_are_refused_before_any_request(server, tmp_path, bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fetch(server.url("/data.bin"), bad, tmp_path / "data.bin", progress=False)
    assert server.log == [] and list(tmp_path.iterdir()) == []
    assert check_hash("MD5:" + "A" * 32) == "md5:" + "a" * 32


def test_two_jobs_asking_for_one_file_download_it_once(server, tmp_path):
    """Two processes (two jobs on a shared file system): one downloads, the other waits on the lock
    and finds the file there, hash-checked."""
    server.delay = 1.0
    code = ("import sys; from mmskip.data.download import fetch; "
            "print(fetch(sys.argv[1], sys.argv[2], sys.argv[3], progress=False))")
    jobs = [subprocess.Popen([sys.executable, "-c", code, server.url("/data.bin"), MD5, str(tmp_path / "data.bin")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [job.communicate(timeout=120) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outs
    assert len(server.log) == 1
    assert (tmp_path / "data.bin").read_bytes() == DATA


# --- archives ---------------------------------------------------------------------------------------

def make_zip(path, members):
    """``members``: (name, bytes, unix mode or None)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def make_tar(path, members):
    """``members``: TarInfo-building tuples (name, bytes, type, linkname)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return path


def test_good_archives_are_extracted_whole(tmp_path):
    z = make_zip(tmp_path / "a.zip", [("images/1.jpg", b"one", None), ("ann.json", b"{}", None)])
    out = extract(z, tmp_path / "zip")
    assert (out / "images" / "1.jpg").read_bytes() == b"one" and (out / "ann.json").read_bytes() == b"{}"
    t = make_tar(tmp_path / "a.tar.gz", [("clips/x.wav", b"RIFF", tarfile.REGTYPE, "")])
    assert (extract(t, tmp_path / "tar") / "clips" / "x.wav").read_bytes() == b"RIFF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "a.zip", "tar", "zip"]


@pytest.mark.parametrize("member, why", [
    (("../evil.txt", b"x", None), "'../evil.txt' is a '..' component"),
    (("/etc/evil.txt", b"x", None), "'/etc/evil.txt' is an absolute path"),
    (("a/../../evil.txt", b"x", None), "'a/../../evil.txt' is a '..' component"),
    (("link", b"/etc/passwd", 0o120777), "'link' is a symbolic link"),
    (("fifo", b"", 0o010644), "'fifo' is a device or FIFO"),
])
def test_unsafe_zip_members_are_refused_by_name(tmp_path, member, why):
    z = make_zip(tmp_path / "bad.zip", [("ok.txt", b"fine", None), member])
    with pytest.raises(ValueError, match=f"bad.zip: refusing to extract: {why}.*nothing was extracted"):
        extract(z, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


@pytest.mark.parametrize("member, why", [
    (("../evil.txt", b"x", tarfile.REGTYPE, ""), "'../evil.txt' is a '..' component"),
    (("/abs.txt", b"x", tarfile.REGTYPE, ""), "'/abs.txt' is an absolute path"),
    (("link", b"", tarfile.SYMTYPE, "/etc/passwd"), "'link' is a symbolic link \\(to '/etc/passwd'\\)"),
    (("hard", b"", tarfile.LNKTYPE, "ok.txt"), "'hard' is a hard link \\(to 'ok.txt'\\)"),
    (("dev", b"", tarfile.CHRTYPE, ""), "'dev' is a device or FIFO"),
])
def test_unsafe_tar_members_are_refused_by_name(tmp_path, member, why):
    t = make_tar(tmp_path / "bad.tar.gz", [("ok.txt", b"fine", tarfile.REGTYPE, ""), member])
    with pytest.raises(ValueError, match=f"bad.tar.gz: refusing to extract: {why}"):
        extract(t, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]


def make_7z(path, members, renamed=()):
    """``members``: (name, bytes) written with py7zr; a symbolic link is (name, ``os.readlink`` target, "link").
    py7zr refuses to write unsafe names, so ``renamed`` maps a written name to the unsafe one of the same length,
    patched into the archive's (unencoded) header with its CRCs recomputed."""
    import struct
    import zlib

    import py7zr

    staging = path.parent / f"{path.name}.members"
    staging.mkdir()
    with py7zr.SevenZipFile(path, "w") as sz:
        sz.set_encoded_header_mode(False)  # the header as plain bytes: names in UTF-16-LE, patchable
        for name, data, *kind in members:
            file = staging / name.replace("/", "_")
            if kind == ["link"]:
                file.symlink_to(data)
            else:
                file.write_bytes(data)
            sz.write(file, name)
    shutil.rmtree(staging)
    raw = bytearray(path.read_bytes())
    for written, unsafe in renamed:
        old, new = written.encode("utf-16-le"), unsafe.encode("utf-16-le")
        assert len(old) == len(new) and raw.count(old) == 1
        at = raw.index(old)
        raw[at:at + len(old)] = new
    offset, size = struct.unpack_from("<QQ", raw, 12)  # start header: next header's offset and size, then CRC
    struct.pack_into("<I", raw, 28, zlib.crc32(raw[32 + offset:32 + offset + size]))
    struct.pack_into("<I", raw, 8, zlib.crc32(raw[12:32]))
    path.write_bytes(raw)
    return path


def test_7z_archives_and_plain_files_are_extracted_whole(tmp_path):
    """Clotho's audio comes as 7z archives, its captions as plain CSV files."""
    s = make_7z(tmp_path / "clotho_audio_development.7z", [("development/a b.wav", b"RIFF1"),
                                                            ("development/c.wav", b"RIFF2")])
    out = extract(s, tmp_path / "audio")
    assert sorted(p.name for p in (out / "development").iterdir()) == ["a b.wav", "c.wav"]
    assert (out / "development" / "a b.wav").read_bytes() == b"RIFF1"
    (tmp_path / "captions.csv").write_text("file_name,caption_1\n", encoding="utf-8")
    assert [p.name for p in extract(tmp_path / "captions.csv", tmp_path / "csv").iterdir()] == ["captions.csv"]
    assert (tmp_path / "csv" / "captions.csv").read_text(encoding="utf-8") == "file_name,caption_1\n"


@pytest.mark.parametrize("member, renamed, why", [
    (("q./evil.wav", b"x"), ("q./evil.wav", "../evil.wav"), "'../evil.wav' is a '..' component"),
    (("xabs.wav", b"x"), ("xabs.wav", "/abs.wav"), "'/abs.wav' is an absolute path"),
    (("d/q./q./e.wav", b"x"), ("d/q./q./e.wav", "d/../../e.wav"), "'d/../../e.wav' is a '..' component"),
    (("link", "/etc/passwd", "link"), None, "'link' is a symbolic link"),
])
def test_unsafe_7z_members_are_refused_by_name(tmp_path, member, renamed, why):
    s = make_7z(tmp_path / "bad.7z", [("ok.wav", b"fine"), member], [renamed] if renamed else [])
    with pytest.raises(ValueError, match=f"bad.7z: refusing to extract: {why}.*nothing was extracted"):
        extract(s, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.7z"]


def test_a_file_that_is_no_archive_is_refused(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="x.zip: not a zip, tar or 7z archive"):
        extract(tmp_path / "x.zip", tmp_path / "out")


# --- named sources ------------------------------------------------------------------------------------

def test_every_named_source_has_a_file_name_and_a_well_formed_checksum():
    from mmskip.data.sources import SOURCES

    assert len({s.filename for s in SOURCES.values()}) == len(SOURCES)
    for source in SOURCES.values():
        assert source.url.startswith(("http://", "https://")) and source.filename
        if source.md5:
            check_hash("md5:" + source.md5)


def test_a_source_with_a_published_md5_is_fetched_through_a_mirror(server, tmp_path):
    from mmskip.data.sources import Source, fetch_source

    server.files["/files/data.bin"] = DATA
    sources = {"tiny": Source("https://example.org/files/data.bin", md5=MD5[4:])}
    path = fetch_source("tiny", tmp_path, mirror=server.url(""), checksums=tmp_path / "checksums.yaml",
                        sources=sources, progress=False)
    assert path == tmp_path / "downloads" / "data.bin" and path.read_bytes() == DATA
    assert not (tmp_path / "checksums.yaml").exists()  # a published checksum is never recorded


def test_a_source_without_a_checksum_records_one_and_then_holds_later_downloads_to_it(server, tmp_path):
    from mmskip.data.sources import Source, fetch_source, read_checksums

    server.files["/files/data.bin"] = DATA
    sources = {"tiny": Source("https://example.org/files/data.bin")}
    checksums = tmp_path / "checksums.yaml"
    kwargs = dict(mirror=server.url(""), checksums=checksums, sources=sources, progress=False)
    path = fetch_source("tiny", tmp_path / "a", **kwargs)
    assert read_checksums(checksums) == {"tiny": SHA256}
    server.files["/files/data.bin"] = DATA[::-1]  # the file changed upstream
    with pytest.raises(DownloadError, match="sha256 hash mismatch, expected " + SHA256[7:]):
        fetch_source("tiny", tmp_path / "b", **kwargs)
    assert not (tmp_path / "b" / "downloads" / "data.bin").exists() and path.read_bytes() == DATA


def test_unknown_sources_and_bad_mirrors_are_refused_before_any_request(server, tmp_path):
    from mmskip.data.sources import fetch_source

    with pytest.raises(ValueError, match=r"source 'coco2014': allowed \[.*'coco_val2014'"):
        fetch_source("coco2014", tmp_path)
    with pytest.raises(ValueError, match="mirror 'ftp://x': allowed an http"):
        fetch_source("coco_val2014", tmp_path, mirror="ftp://x")
    assert server.log == [] and list(tmp_path.iterdir()) == []


def test_a_catalog_replaces_sources_by_name_and_bad_entries_are_refused(server, tmp_path):
    """A site's own copies (params sources.catalog): its entries replace the built-in sources of those names."""
    from mmskip.data.sources import SOURCES, fetch_source, read_catalog

    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(f"karpathy_splits: {{url: '{server.url('/data.bin')}', md5: {MD5[4:]}}}\n")
    table = read_catalog(catalog)
    assert table["karpathy_splits"].url == server.url("/data.bin") and table["coco_val2014"] == SOURCES["coco_val2014"]
    assert read_catalog("") == SOURCES
    path = fetch_source("karpathy_splits", tmp_path / "root", sources=table, progress=False)
    assert path == tmp_path / "root" / "downloads" / "data.bin" and path.read_bytes() == DATA
    for text, message in [("- a\n", "expected a mapping of source names"),
                          ("x: {url: 'ftp://h/f.zip'}\n", "source 'x' url 'ftp://h/f.zip': allowed an http"),
                          ("x: {url: 'http://h/f.zip', md5: abc}\n", "source 'x' md5 'abc': allowed 32"),
                          ("x: {url: 'http://h/f.zip', sha: 1}\n", "source 'x' must be {url: ..., md5: ...}")]:
        catalog.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            read_catalog(catalog)
