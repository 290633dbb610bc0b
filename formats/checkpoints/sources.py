"""Where input bytes live: a local file or a URL, read by byte range.

`open_source(path_or_url)` gives an object with `name`, `size`, `pread(offset, length)` (exactly `length`
bytes or a one-line FormatError naming the file or URL) and `close()`. Local paths use os.pread; anything
with a scheme (s3://, gs://, https://, memory://, ...) goes through fsspec's ranged `cat_file`, which is an
optional dependency (`pip install 'tallzip[remote]'`); each backend beyond HTTP needs its own package
(s3fs, gcsfs, adlfs), which fsspec names when it is missing.

Sources only read. Outputs (archives, extracted checkpoints) are always written to local paths, where the
writers can make them appear atomically; `require_local_output` refuses a URL as a target in one line.

A source pickles as its path or URL plus options and reopens on first use in the receiving process, so a
job sent to another worker can carry one.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from tallzip.errors import MissingExtraError
from tallzip.formats.errors import FormatError, one_line

REMOTE_EXTRA_HINT = "pip install 'tallzip[remote]'"
# Linux moves at most 0x7ffff000 bytes per read call; stay under it and loop.
MAX_PREAD_BYTES = 1 << 30
# A scheme of two or more letters, so that a Windows drive ("C:\...") stays a path.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(path_or_url) -> bool:
    """True for 'scheme://...' strings other than file://, which are read as local paths."""
    text = os.fspath(path_or_url) if isinstance(path_or_url, os.PathLike) else path_or_url
    return isinstance(text, str) and bool(_URL_RE.match(text)) and not text.lower().startswith("file://")


def _local_path(path_or_url) -> Path:
    text = os.fspath(path_or_url)
    if isinstance(text, str) and text.lower().startswith("file://"):
        text = text[len("file://"):]
    return Path(text)


def require_local_output(target) -> Path:
    """The local path to write to; a URL is refused (outputs are written locally, then uploaded by the user)."""
    if is_url(target):
        raise FormatError(f"{target}: outputs are written to local paths only; write locally and upload it")
    return _local_path(target)


class RemotePath(str):
    """A URL where a Path would be: it prints as itself and has the .name and .suffix of its last part."""

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind("."):] if "." in name.lstrip(".") else ""

    def __truediv__(self, part) -> "RemotePath":
        return RemotePath(self.rstrip("/") + "/" + str(part))


class RemoteFile:
    """A small remote file where a Path would be (a side file of a remote checkpoint folder)."""

    def __init__(self, location: str, size: int | None = None, storage_options: dict | None = None):
        self.location, self._size, self.storage_options = RemotePath(location), size, storage_options
        self.name = self.location.name

    def stat(self):
        if self._size is None:
            with open_source(self.location, self.storage_options) as src:
                self._size = src.size
        return os.stat_result((0, 0, 0, 0, 0, 0, self._size, 0, 0, 0))

    def read_bytes(self) -> bytes:
        with open_source(self.location, self.storage_options) as src:
            return src.pread(0, src.size)

    def __str__(self):
        return str(self.location)


def location(path_or_url):
    """A local Path, or the URL as a RemotePath (Path("s3://b/k") would fold the '//')."""
    return RemotePath(str(path_or_url)) if is_url(path_or_url) else _local_path(path_or_url)


def _check_range(name: str, size: int, offset: int, length: int):
    if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
        raise FormatError(f"{name}: bad byte range (offset {offset!r}, length {length!r})")
    if offset + length > size:
        raise FormatError(f"{name}: range {offset}..{offset + length} lies past the end ({size} bytes)")


class Source:
    """Random access to the bytes of one file. Counts what it reads (bytes_read, requests) for tests."""

    name: str = ""

    def __init__(self):
        self.bytes_read = 0
        self.requests = 0

    @property
    def size(self) -> int:
        raise NotImplementedError

    def pread(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


class LocalSource(Source):
    """A local file read with os.pread (no shared file position, so threads can read it at once)."""

    def __init__(self, path):
        super().__init__()
        self.path = _local_path(path)
        self.name = str(self.path)
        self._fd = None
        self._size = None
        self._open()

    def _open(self):
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise FormatError(f"{self.name}: no such file") from None
        except IsADirectoryError:
            raise FormatError(f"{self.name}: is a folder, not a file") from None
        except OSError as exc:
            raise FormatError(f"{self.name}: cannot open ({exc.strerror})") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise FormatError(f"{self.name}: not a regular file")
        self._fd, self._size = fd, info.st_size

    @property
    def size(self) -> int:
        if self._fd is None:
            self._open()
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        _check_range(self.name, self.size, offset, length)
        pieces, done = [], 0
        while done < length:
            try:
                piece = os.pread(self._fd, min(length - done, MAX_PREAD_BYTES), offset + done)
            except OSError as exc:
                raise FormatError(f"{self.name}: read failed at offset {offset + done} ({exc.strerror})") from None
            if not piece:  # the file shrank under us
                raise FormatError(f"{self.name}: short read at offset {offset + done} "
                                  f"(wanted {length} bytes at {offset})")
            pieces.append(piece)
            done += len(piece)
        self.bytes_read += length
        self.requests += 1
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        Source.__init__(self)
        self.path, self.name, self._fd, self._size = state["path"], str(state["path"]), None, None


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise MissingExtraError(f"reading URLs needs fsspec: {REMOTE_EXTRA_HINT}") from None
    return fsspec


def _url_to_fs(url: str, storage_options: dict | None):
    fsspec = _fsspec()
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:  # the protocol's backend package (s3fs, gcsfs...) is missing; fsspec names it
        raise MissingExtraError(f"{url}: {one_line(exc)}") from None
    except ValueError as exc:  # a protocol fsspec does not know
        raise FormatError(f"{url}: {one_line(exc)}") from None


class FsspecSource(Source):
    """A file behind a URL, read with ranged requests (fs.cat_file(path, start, end))."""

    def __init__(self, url: str, storage_options: dict | None = None):
        super().__init__()
        self.name = url
        self.storage_options = dict(storage_options or {})
        self._fs = self._path = self._size = None
        self._connect()

    def _connect(self):
        self._fs, self._path = _url_to_fs(self.name, self.storage_options)
        try:
            info = self._fs.info(self._path)
        except FileNotFoundError:
            raise FormatError(f"{self.name}: not found") from None
        except Exception as exc:  # network and permission errors differ per backend
            raise FormatError(f"{self.name}: cannot read ({one_line(exc)})") from None
        if info.get("type") == "directory":
            raise FormatError(f"{self.name}: is a folder, not a file")
        size = info.get("size")
        if not isinstance(size, int) or size < 0:
            raise FormatError(f"{self.name}: the server does not say the file's size")
        self._size = size

    @property
    def size(self) -> int:
        if self._fs is None:
            self._connect()
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        _check_range(self.name, self.size, offset, length)
        if length == 0:
            return b""
        try:
            data = self._fs.cat_file(self._path, start=offset, end=offset + length)
        except FileNotFoundError:
            raise FormatError(f"{self.name}: not found") from None
        except Exception as exc:
            raise FormatError(f"{self.name}: read of {length} bytes at {offset} failed ({one_line(exc)})") from None
        self.requests += 1
        self.bytes_read += len(data)
        if len(data) != length:
            # a short answer, or a server that ignored the Range header and sent the whole file
            raise FormatError(f"{self.name}: asked for {length} bytes at {offset}, got {len(data)}")
        return bytes(data)

    def __getstate__(self):
        return {"name": self.name, "storage_options": self.storage_options}

    def __setstate__(self, state):
        Source.__init__(self)
        self.name, self.storage_options = state["name"], state["storage_options"]
        self._fs = self._path = self._size = None


def open_source(path_or_url, storage_options: dict | None = None) -> Source:
    """A Source for a local path or a URL (storage_options go to fsspec, e.g. {"anon": True} for s3fs)."""
    if is_url(path_or_url):
        return FsspecSource(str(path_or_url), storage_options)
    if storage_options:
        raise FormatError(f"{path_or_url}: storage options apply to URLs only")
    return LocalSource(path_or_url)


@dataclass(frozen=True)
class Entry:
    """One item of a listed folder: its base name, the path or URL to open it, and its kind."""
    name: str
    location: str
    is_dir: bool
    size: int | None


def list_folder(path_or_url, storage_options: dict | None = None) -> list[Entry]:
    """The items of a local folder or of a remote "folder" (a prefix in object storage), sorted by name."""
    if not is_url(path_or_url):
        folder = _local_path(path_or_url)
        if not folder.is_dir():
            raise FormatError(f"{folder}: not a folder")
        entries = []
        for item in os.scandir(folder):
            is_dir = item.is_dir()
            entries.append(Entry(item.name, os.path.join(folder, item.name), is_dir,
                                 None if is_dir else item.stat().st_size))
        return sorted(entries, key=lambda e: e.name)
    url = str(path_or_url)
    fs, path = _url_to_fs(url, storage_options)
    try:
        if not fs.isdir(path):
            raise FormatError(f"{url}: not a folder")
        infos = fs.ls(path, detail=True)
    except FormatError:
        raise
    except FileNotFoundError:
        raise FormatError(f"{url}: not found") from None
    except Exception as exc:
        raise FormatError(f"{url}: cannot list ({one_line(exc)})") from None
    entries = []
    own = path.rstrip("/")
    for info in infos:
        item = info["name"].rstrip("/")
        if item == own:  # some backends list the folder itself
            continue
        is_dir = info.get("type") == "directory"
        entries.append(Entry(item.rsplit("/", 1)[-1], fs.unstrip_protocol(item), is_dir,
                             None if is_dir else info.get("size")))
    return sorted(entries, key=lambda e: e.name)
