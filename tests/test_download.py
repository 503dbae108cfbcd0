"""`python -m scse_jax.data download` against a real HTTP server on 127.0.0.1: a full download,
resumes, refused checksums and zip entries, HTTP errors and a full disk; every failure is one
`error:` line and leaves nothing that looks complete."""

import hashlib
import http.server
import io
import re
import stat
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scse_jax.data import download
from scse_jax.data.__main__ import main


@dataclass
class Behaviour:
    """What the loopback server does: its files, and the faults to inject."""

    files: dict = field(default_factory=dict)  # URL path -> bytes
    status: int | None = None  # answer every request with this error code
    honour_range: bool = True
    drops: int = 0  # this many requests are cut off after drop_after body bytes
    drop_after: int = 0
    requests: list = field(default_factory=list)  # (path, Range header or None)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        b = self.server.behaviour
        path = self.path.split("?", 1)[0]
        range_header = self.headers.get("Range")
        b.requests.append((path, range_header))
        if b.status is not None:
            self.send_error(b.status)
            return
        if path not in b.files:
            self.send_error(404)
            return
        data = b.files[path]
        start = 0
        if range_header and b.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header)[1])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if b.drops:
            b.drops -= 1
            body = body[: b.drop_after]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """(Behaviour, base URL) of a threaded HTTP server on 127.0.0.1, shut down afterwards."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.behaviour = Behaviour()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.behaviour, f"http://127.0.0.1:{httpd.server_address[1]}/files"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def train_zip(tmp_path_factory) -> bytes:
    """A CHAOS_Train_Sets.zip of the real layout (`Train_Sets/MR/...`): 2 synthetic patients, 32 px, 4 slices."""
    from scse_jax.data import synthetic

    tree = synthetic.write_synthetic_chaos(
        tmp_path_factory.mktemp("zip") / "tree", patients=2, size=32, slices=4, seed=1, modalities=("MR",)
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(tree.rglob("*")):
            archive.write(path, "Train_Sets/" + path.relative_to(tree).as_posix())
    return buffer.getvalue()


def serve(monkeypatch, behaviour: Behaviour, data: bytes, *, size=True, sha256=None) -> None:
    """Serves `data` as the training zip and makes the expected size and hash those of `data`."""
    behaviour.files["/files/CHAOS_Train_Sets.zip"] = data
    archive = download.Archive(
        "CHAOS_Train_Sets.zip", len(data) if size else None, sha256 or hashlib.sha256(data).hexdigest()
    )
    monkeypatch.setitem(download.ARCHIVES, "train", archive)
    monkeypatch.setattr(download, "RETRY_DELAY_S", 0.0)


def run(out: Path, url: str, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["download", str(out), "--sets", "train", "--url-base", url, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def assert_nothing_complete(out: Path) -> None:
    """No unpacked set, no zip without .part, no staging folder."""
    names = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert all(name.endswith(".part") for name in names), names


def test_full_download_verifies_unpacks_and_prints_summary(server, monkeypatch, capsys, tmp_path, train_zip):
    behaviour, url = server
    serve(monkeypatch, behaviour, train_zip)
    code, out, err = run(tmp_path / "chaos", url, capsys)
    assert code == 0, err
    root = tmp_path / "chaos" / "CHAOS_Train_Sets" / "Train_Sets"
    assert sorted(p.name for p in (tmp_path / "chaos").iterdir()) == ["CHAOS_Train_Sets"]  # zip deleted
    assert sorted(p.name for p in (root / "MR").iterdir()) == ["1", "2"]
    assert behaviour.requests == [("/files/CHAOS_Train_Sets.zip", None)]
    assert re.search(r"CHAOS_Train_Sets\.zip  100\.0% .* of .*/s  in 0:00:0\d", err)
    assert f"verified ({len(train_zip)} bytes, SHA-256 {hashlib.sha256(train_zip).hexdigest()})" in err
    assert f"train: {root}\n" in out
    assert "6 case(s)" in out and "T1DUAL_OutPhase" in out and "liver=" in out
    assert f"python launch.py --config configs/mr_scse_cpu.py --config.data.root={root}" in out
    # Run again: the unpacked set is kept, nothing is fetched.
    code, out, err = run(tmp_path / "chaos", url, capsys)
    assert code == 0 and "already there" in err and len(behaviour.requests) == 1


def test_connection_dropped_mid_file_resumes_with_range(server, monkeypatch, capsys, tmp_path, train_zip):
    behaviour, url = server
    serve(monkeypatch, behaviour, train_zip)
    behaviour.drops, behaviour.drop_after = 1, len(train_zip) // 3
    code, out, err = run(tmp_path, url, capsys)
    assert code == 0, err
    assert behaviour.requests == [
        ("/files/CHAOS_Train_Sets.zip", None),
        ("/files/CHAOS_Train_Sets.zip", f"bytes={len(train_zip) // 3}-"),
    ]
    assert f"resuming at byte {len(train_zip) // 3}" in err and "(resumed at " in err
    assert "6 case(s)" in out


def test_a_later_run_resumes_the_part_file(server, monkeypatch, capsys, tmp_path, train_zip):
    behaviour, url = server
    serve(monkeypatch, behaviour, train_zip)
    behaviour.drops, behaviour.drop_after = download.ATTEMPTS, 1000
    code, _, err = run(tmp_path, url, capsys)
    assert code == 1
    line = error_line(err)
    assert "connection closed after" in line and "the same command resumes" in line
    part = tmp_path / "CHAOS_Train_Sets.zip.part"
    assert part.stat().st_size == download.ATTEMPTS * 1000
    assert_nothing_complete(tmp_path)

    code, out, err = run(tmp_path, url, capsys)
    assert code == 0, err
    assert behaviour.requests[-1] == ("/files/CHAOS_Train_Sets.zip", f"bytes={download.ATTEMPTS * 1000}-")
    assert not part.exists() and "6 case(s)" in out


def test_server_ignoring_range_restarts_from_zero(server, monkeypatch, capsys, tmp_path, train_zip):
    behaviour, url = server
    serve(monkeypatch, behaviour, train_zip)
    behaviour.honour_range = False
    (tmp_path / "CHAOS_Train_Sets.zip.part").write_bytes(b"x" * 500)  # not even a prefix of the file
    code, _, err = run(tmp_path, url, capsys)
    assert code == 0, err
    assert behaviour.requests == [("/files/CHAOS_Train_Sets.zip", "bytes=500-")]
    assert "does not resume downloads; starting again from byte 0" in err


@pytest.mark.parametrize("size_known", [True, False], ids=["size-and-sha", "sha-only"])
def test_checksum_mismatch_is_refused(server, monkeypatch, capsys, tmp_path, train_zip, size_known):
    behaviour, url = server
    serve(monkeypatch, behaviour, train_zip, size=size_known, sha256="0" * 64)
    code, _, err = run(tmp_path, url, capsys)
    assert code == 1
    line = error_line(err)
    assert f"SHA-256 {hashlib.sha256(train_zip).hexdigest()}, expected {'0' * 64}" in line
    assert "the download was deleted" in line
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_offered_is_refused_before_downloading(server, monkeypatch, capsys, tmp_path, train_zip):
    behaviour, url = server
    serve(monkeypatch, behaviour, train_zip)
    monkeypatch.setitem(download.ARCHIVES, "train", download.Archive("CHAOS_Train_Sets.zip", 890_771_694, "0" * 64))
    code, _, err = run(tmp_path, url, capsys)
    assert code == 1
    assert f"the server offers {len(train_zip)} bytes, expected 890771694" in error_line(err)
    assert list(tmp_path.iterdir()) == []


def _evil_zip(name: str, symlink: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("Train_Sets/MR/1/T2SPIR/DICOM_anon/a.dcm", b"fine")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd" if symlink else b"escaped")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, symlink, reason",
    [
        ("Train_Sets/../../escaped.txt", False, "would land outside"),
        ("/tmp/escaped.txt", False, "would land outside"),
        ("..\\escaped.txt", False, "would land outside"),
        ("Train_Sets/link", True, "is a symbolic link"),
    ],
    ids=["dotdot", "absolute", "backslash-dotdot", "symlink"],
)
def test_zip_slip_entries_are_refused(server, monkeypatch, capsys, tmp_path, name, symlink, reason):
    behaviour, url = server
    serve(monkeypatch, behaviour, _evil_zip(name, symlink))
    out = tmp_path / "deep" / "chaos"
    code, _, err = run(out, url, capsys)
    assert code == 1
    line = error_line(err)
    assert repr(name) in line and reason in line and "refusing to unpack" in line
    assert sorted(p.name for p in out.iterdir()) == ["CHAOS_Train_Sets.zip"]  # verified, never unpacked
    assert not list(tmp_path.rglob("escaped.txt")) and not list(tmp_path.rglob("link"))


@pytest.mark.parametrize("status", [404, 500])
def test_http_errors_are_one_line(server, monkeypatch, capsys, tmp_path, train_zip, status):
    behaviour, url = server
    serve(monkeypatch, behaviour, train_zip)
    behaviour.status = status
    code, out, err = run(tmp_path, url, capsys)
    assert code == 1 and out == ""
    assert error_line(err) == f"error: {url}/CHAOS_Train_Sets.zip: HTTP {status} " + {
        404: "Not Found", 500: "Internal Server Error"
    }[status]
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_is_one_line(capsys, tmp_path):
    code, _, err = run(tmp_path, "http://127.0.0.1:9/files", capsys)
    assert code == 1 and "cannot connect" in error_line(err)


def test_full_disk_is_one_line(server, monkeypatch, capsys, tmp_path, train_zip):
    behaviour, url = server
    serve(monkeypatch, behaviour, train_zip)
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: download.shutil._ntuple_diskusage(10**9, 10**9, 10))
    code, _, err = run(tmp_path, url, capsys)
    assert code == 1
    needs = download.format_bytes(len(train_zip))
    assert f"downloading CHAOS_Train_Sets.zip needs {needs}, only 10 B free" in error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_unknown_set_is_a_usage_error(capsys, tmp_path):
    assert main(["download", str(tmp_path), "--sets", "train,validation"]) == 2
    assert "expected a comma-separated list of train, test" in error_line(capsys.readouterr().err)


def test_default_url_is_the_zenodo_record():
    assert download.archive_url(download.DEFAULT_URL_BASE, "CHAOS_Test_Sets.zip") == (
        "https://zenodo.org/records/3431873/files/CHAOS_Test_Sets.zip?download=1"
    )
    mirror = download.archive_url("http://mirror/chaos/", "CHAOS_Test_Sets.zip")
    assert mirror == "http://mirror/chaos/CHAOS_Test_Sets.zip"


def _rezip(data: bytes, prefix: str) -> bytes:
    """`data`'s entries under `prefix` instead of `Train_Sets/`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(buffer, "w") as target:
        for info in source.infolist():
            target.writestr(prefix + info.filename.removeprefix("Train_Sets/"), source.read(info))
    return buffer.getvalue()


def test_test_set_of_unpublished_size_resumes_a_complete_part(server, monkeypatch, capsys, tmp_path, train_zip):
    behaviour, url = server
    data = _rezip(train_zip, "Test_Sets/")
    behaviour.files["/files/CHAOS_Test_Sets.zip"] = data
    monkeypatch.setitem(
        download.ARCHIVES, "test", download.Archive("CHAOS_Test_Sets.zip", None, hashlib.sha256(data).hexdigest())
    )
    (tmp_path / "CHAOS_Test_Sets.zip.part").write_bytes(data)  # complete, but never verified
    assert main(["download", str(tmp_path), "--sets", "test", "--url-base", url]) == 0
    out, err = capsys.readouterr()
    assert behaviour.requests == [("/files/CHAOS_Test_Sets.zip", f"bytes={len(data)}-")]  # answered 416
    assert "verified (size not published, SHA-256" in err
    root = tmp_path / "CHAOS_Test_Sets" / "Test_Sets"
    assert f"test: {root}\n" in out and "6 case(s)" in out
    assert f"python -m scse_jax.predict --checkpoint runs/mr_scse_cpu --input {root} --output submission" in out


def test_verified_zip_of_an_interrupted_unpack_is_reused(server, monkeypatch, capsys, tmp_path, train_zip):
    behaviour, url = server
    data = _rezip(train_zip, "CHAOS_Train_Sets/Train_Sets/")  # a top folder named like the set is not repeated
    serve(monkeypatch, behaviour, data)
    behaviour.status = 500
    (tmp_path / "CHAOS_Train_Sets.zip").write_bytes(data)
    (tmp_path / ".CHAOS_Train_Sets.partial-old").mkdir()  # what a killed unpack leaves
    code, out, err = run(tmp_path, url, capsys)
    assert code == 0, err
    assert behaviour.requests == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CHAOS_Train_Sets"]
    assert (tmp_path / "CHAOS_Train_Sets" / "Train_Sets" / "MR" / "2" / "T2SPIR").is_dir()
