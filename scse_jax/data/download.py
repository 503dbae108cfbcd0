"""Downloads the CHAOS challenge data, verifies it and unpacks it atomically.

    python -m scse_jax.data download DIR [--sets train,test] [--url-base URL]

Source: Zenodo record 3431873 (https://doi.org/10.5281/zenodo.3431873); cite Kavur et al.,
"CHAOS Challenge - combined (CT-MR) healthy abdominal organ segmentation", Medical Image
Analysis 69 (2021) 101950, https://doi.org/10.1016/j.media.2020.101950.

For each set, `DIR/<zip>.part` is fetched (resumed with an HTTP Range request where a previous
try left one; restarted where the server ignores Range), its size and SHA-256 are checked, it
is renamed to `DIR/<zip>`, unpacked into a hidden folder inside DIR, and that folder is renamed
to `DIR/<zip stem>` (e.g. `DIR/CHAOS_Train_Sets/Train_Sets/{CT,MR}`) only once complete; the
zip is then deleted. A set whose folder already exists is not downloaded again. Zip entries
that are absolute, contain `..` or are symbolic links are refused before anything is written.
Standard library only.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import shutil
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from scse_jax.errors import DataError

ZENODO_RECORD = "https://zenodo.org/records/3431873"
DEFAULT_URL_BASE = f"{ZENODO_RECORD}/files"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0
ATTEMPTS = 4  # tries per file in one command when the connection drops mid-transfer
RETRY_DELAY_S = 2.0


@dataclass(frozen=True)
class Archive:
    """One zip of the record: its file name, size in bytes (None: not published) and SHA-256."""

    name: str
    size: int | None
    sha256: str

    @property
    def stem(self) -> str:
        return self.name.removesuffix(".zip")


ARCHIVES = {
    "train": Archive(
        "CHAOS_Train_Sets.zip", 890_771_694, "535f7d3417a0e0f0d9133fb3d962423d2a9cf3f103e4f09a3d8a1daf87d5d2fc"
    ),
    "test": Archive("CHAOS_Test_Sets.zip", None, "80e9e4d4c4e363f142de4570e9b698e3f92dcb5140cc25a9c1cf4963e5ae7541"),
}


class _ConnectionLost(Exception):
    """The transfer stopped before the end; what arrived is kept in the .part file."""


def download(
    out_dir: Path | str,
    sets: Sequence[str] = ("train", "test"),
    *,
    url_base: str = DEFAULT_URL_BASE,
    log: TextIO | None = None,
) -> list[tuple[str, Path]]:
    """Downloads, verifies and unpacks each set into `out_dir`; returns (set, CHAOS tree folder) pairs."""
    log = log or sys.stderr
    out_dir = Path(out_dir)
    unknown = [name for name in sets if name not in ARCHIVES]
    if unknown:
        raise DataError(f"unknown set(s) {unknown} (expected some of {list(ARCHIVES)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    roots = []
    for set_name in sets:
        archive = ARCHIVES[set_name]
        dest = out_dir / archive.stem
        if dest.exists():
            print(f"{dest}: already there; not downloading {archive.name} again", file=log)
        else:
            zip_path = fetch(archive, archive_url(url_base, archive.name), out_dir, log)
            unpack(zip_path, dest)
            zip_path.unlink()
            print(f"{archive.name}: unpacked to {dest}", file=log)
        roots.append((set_name, tree_root(dest)))
    return roots


def archive_url(url_base: str, name: str) -> str:
    """Where `name` is: Zenodo serves the file itself only with `?download=1`."""
    url = f"{url_base.rstrip('/')}/{name}"
    return f"{url}?download=1" if url_base.rstrip("/") == DEFAULT_URL_BASE else url


# --------------------------------------------------------------------------- fetching


def fetch(archive: Archive, url: str, out_dir: Path, log: TextIO) -> Path:
    """`out_dir/<archive.name>`, downloaded (or resumed) and verified."""
    target = out_dir / archive.name
    if target.exists():
        problem = verification_problem(target, archive)
        if problem:
            raise DataError(f"{target}: {problem}; delete it and run the command again")
        return target
    part = out_dir / f"{archive.name}.part"
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _download(url, part, archive, log)
            break
        except _ConnectionLost as exc:
            kept = part.stat().st_size if part.exists() else 0
            if attempt == ATTEMPTS:
                raise DataError(
                    f"{archive.name}: {exc} ({ATTEMPTS} tries); {kept} bytes kept in {part}: "
                    "the same command resumes"
                ) from None
            print(f"{archive.name}: {exc}; resuming at byte {kept} (try {attempt + 1} of {ATTEMPTS})", file=log)
            time.sleep(RETRY_DELAY_S)
    _verify(part, archive, log)
    part.replace(target)
    return target


def _download(url: str, part: Path, archive: Archive, log: TextIO) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if archive.size is not None and offset > archive.size:
        part.unlink()  # longer than the file can be: not a prefix of it
        offset = 0
    if archive.size is not None and offset == archive.size:
        return
    response = _request(url, offset)
    if response is None:  # 416: the server's file ends at or before `offset`
        if archive.size is not None:
            raise DataError(f"{archive.name}: the server's file ends before byte {offset}, expected {archive.size} bytes")
        return  # the .part may be the whole file: the SHA-256 decides
    with response:
        start, total = _resume_point(response, offset)
        if start != offset:
            print(f"{archive.name}: the server does not resume downloads; starting again from byte 0", file=log)
        if archive.size is not None and total is not None and total != archive.size:
            raise DataError(
                f"{archive.name}: the server offers {total} bytes, expected {archive.size} "
                "(another file?); not downloaded"
            )
        if total is not None:
            check_free_space(part.parent, total - start, f"downloading {archive.name}")
        with _open_part(part, start) as handle:
            _copy_body(response, handle, part, Progress(archive.name, total, start, log), total)
    if archive.size is not None and part.stat().st_size < archive.size:
        raise _ConnectionLost(f"connection closed after {part.stat().st_size} of {archive.size} bytes")


def _request(url: str, offset: int) -> http.client.HTTPResponse | None:
    headers = {"User-Agent": "scse_jax-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            return None
        raise DataError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DataError(f"{url}: cannot connect ({exc.reason})") from None
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(f"{url}: cannot connect ({exc or type(exc).__name__})") from None


def _resume_point(response, offset: int) -> tuple[int, int | None]:
    """(byte the body starts at, whole file's size or None when the server does not say)."""
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if match and int(match[1]) == offset:
            return offset, int(match[3]) if match[3] != "*" else None
        raise DataError(f"{response.url}: unexpected Content-Range {response.headers.get('Content-Range')!r}")
    return 0, length


def _open_part(part: Path, start: int):
    try:
        handle = open(part, "r+b" if start else "wb")
        handle.seek(start)
        handle.truncate()
        return handle
    except OSError as exc:
        raise DataError(f"{part}: cannot write ({exc.strerror or exc})") from None


def _copy_body(response, handle, part: Path, progress: Progress, total: int | None) -> None:
    try:
        while chunk := _read(response):
            try:
                handle.write(chunk)
            except OSError as exc:
                raise DataError(
                    f"{part}: cannot write ({exc.strerror or exc}); make room and run the same command to resume"
                ) from None
            progress.advance(len(chunk))
    finally:
        progress.close()
    if total is not None and progress.done < total:
        raise _ConnectionLost(f"connection closed after {progress.done} of {total} bytes")


def _read(response) -> bytes:
    try:
        return response.read1(CHUNK_BYTES)  # what has arrived, so that progress moves on a slow link
    except (OSError, http.client.HTTPException) as exc:  # resets and timeouts are OSErrors
        raise _ConnectionLost(f"connection lost ({exc or type(exc).__name__})") from None


# --------------------------------------------------------------------------- verifying


def verification_problem(path: Path, archive: Archive) -> str | None:
    """What is wrong with `path` as `archive` (its size, then its SHA-256), or None."""
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        return f"{size} bytes, expected {archive.size}"
    digest = sha256_of(path)
    if digest != archive.sha256:
        return f"SHA-256 {digest}, expected {archive.sha256}"
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _verify(part: Path, archive: Archive, log: TextIO) -> None:
    problem = verification_problem(part, archive)
    if problem:
        part.unlink()
        raise DataError(f"{archive.name}: {problem}; the download was deleted, nothing unpacked")
    size = "size not published" if archive.size is None else f"{archive.size} bytes"
    print(f"{archive.name}: verified ({size}, SHA-256 {archive.sha256})", file=log)


def check_free_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DataError(f"{folder}: {what} needs {format_bytes(needed)}, only {format_bytes(free)} free")


# --------------------------------------------------------------------------- unpacking


def unpack(zip_path: Path, dest: Path) -> None:
    """Unpacks `zip_path` so that `dest` appears complete or not at all.

    A single top folder named like `dest` is not repeated inside it.
    """
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [(info, member_parts(info, zip_path, dest)) for info in archive.infolist()]
            check_free_space(dest.parent, sum(info.file_size for info, _ in members), f"unpacking {zip_path.name}")
            _remove_stale_staging(dest)
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
            try:
                for info, parts in members:
                    if parts:
                        _extract(archive, info, staging.joinpath(*parts))
                _publish(staging, dest)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except zipfile.BadZipFile as exc:
        raise DataError(f"{zip_path}: not a valid zip ({exc})") from None
    except OSError as exc:
        raise DataError(f"{dest.parent}: cannot unpack {zip_path.name} ({exc.strerror or exc})") from None


def member_parts(info: zipfile.ZipInfo, zip_path: Path, dest: Path) -> list[str]:
    """The path components of a zip entry, or DataError if it is a link or would leave `dest`."""
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataError(f"{zip_path.name}: entry {info.filename!r} is a symbolic link; refusing to unpack")
    name = info.filename.replace("\\", "/")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if name.startswith("/") or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise DataError(f"{zip_path.name}: entry {info.filename!r} would land outside {dest}; refusing to unpack")
    return parts


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(info) as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out, CHUNK_BYTES)


def _publish(staging: Path, dest: Path) -> None:
    entries = list(staging.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name == dest.name:
        entries[0].rename(dest)
        staging.rmdir()
    else:
        staging.rename(dest)


def _remove_stale_staging(dest: Path) -> None:
    """Drops what an interrupted unpack of the same set left behind (gigabytes for the real set)."""
    for stale in dest.parent.glob(f".{dest.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def tree_root(folder: Path) -> Path:
    """The folder holding `CT/` and/or `MR/` inside an unpacked set (e.g. `.../Train_Sets`)."""
    path = folder
    while not ((path / "CT").is_dir() or (path / "MR").is_dir()):
        subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
        if len(subdirs) != 1:
            return folder
        path = subdirs[0]
    return path


# --------------------------------------------------------------------------- progress


def format_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One line on `stream`: bytes so far, percentage, rate and ETA.

    Redrawn in place at most every 0.25 s on a terminal, written as a new line at most every
    10 s elsewhere (logs), and always once more at the end.
    """

    def __init__(
        self, label: str, total: int | None, done: int = 0, stream: TextIO | None = None, clock=time.monotonic
    ):
        self.label, self.total, self.done, self.resumed_at = label, total, done, done
        self.stream = stream or sys.stderr
        self.clock = clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.25 if self.tty else 10.0
        self.started = self.last_drawn = clock()
        self.width = 0

    def advance(self, count: int) -> None:
        self.done += count
        now = self.clock()
        if now - self.last_drawn >= self.interval:
            self._draw(self.line(now))
            self.last_drawn = now

    def close(self) -> None:
        self._draw(self.line(self.clock(), final=True), end="\n")

    def line(self, now: float, final: bool = False) -> str:
        elapsed = max(now - self.started, 1e-6)
        rate = (self.done - self.resumed_at) / elapsed
        size = format_bytes(self.done) + (f" of {format_bytes(self.total)}" if self.total else "")
        percent = f"{100 * self.done / self.total:5.1f}% " if self.total else ""
        text = f"{self.label}  {percent}{size}  {format_bytes(rate)}/s"
        if final:
            text += f"  in {format_duration(elapsed)}"
            if self.resumed_at:
                text += f" (resumed at {format_bytes(self.resumed_at)})"
        elif self.total and rate > 0:
            text += f"  ETA {format_duration((self.total - self.done) / rate)}"
        return text

    def _draw(self, text: str, end: str = "") -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width) + end)
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
