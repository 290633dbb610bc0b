"""The zip container of torch.save checkpoints, read defensively: bounded, CRC-checked, by offset.

torch does not check the CRCs of the zip members it reads, so a damaged `.pt` loads as a wrong
model; and a zip's directory can promise members far bigger than the file (a zip bomb), which a
reader then allocates. TorchZip reads the central directory (with zipfile), refuses one that does
not fit the file before anything is allocated, checks a member's CRC before its bytes are trusted,
and reads stored (uncompressed, as torch writes them) members by offset with os.pread, so a caller
can hold one tensor, or a range of one, at a time.
"""
from __future__ import annotations

import os
import struct
import threading
import zipfile
from typing import NamedTuple

from tallzip.formats.errors import FormatError

try:  # ISA-L's CRC-32 is the same function, about 3x faster than zlib 1.2's (measured here)
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32

MAX_MEMBERS = 1 << 20                 # torch writes ~2 records per tensor plus 6
MAX_CENTRAL_DIRECTORY = 32 << 20      # bytes; zipfile turns each ~50-byte entry into a Python object
MAX_EXPANSION = 8                     # compressed members may expand to 8x the file's size...
EXPANSION_SLACK = 256 << 20           # ...plus this (zero-filled tensors deflate ~1000:1)
READ_CHUNK = 16 << 20                 # streamed CRC reads; keeps each pread far below Linux's 2 GiB cap
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version..sizes), name length, extra length


class CheckpointFormatError(FormatError):
    """The file is not a readable PyTorch checkpoint."""


class DamagedZipError(CheckpointFormatError):
    """A zip checkpoint whose directory, headers or member bytes are not what the zip says."""


def is_zip(path) -> bool:
    """True for a zip, including one so damaged that zipfile's own test raises."""
    try:
        return zipfile.is_zipfile(path)
    except Exception:
        return True


class Member(NamedTuple):
    name: str              # the record's name without the archive's folder: "data.pkl", "data/0"
    data_offset: int       # where the member's (stored or compressed) bytes start in the file
    size: int              # uncompressed size
    compressed_size: int
    crc: int
    stored: bool
    info: zipfile.ZipInfo


class TorchZip:
    """The records of one torch zip checkpoint; every method raises DamagedZipError naming the file."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.members = self._read_directory()
        except BaseException:
            self.close()
            raise
        self.all_stored = all(m.stored for m in self.members.values())
        self._verified: set[str] = set()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def _damaged(self, what: str) -> DamagedZipError:
        return DamagedZipError(f"{self.path}: damaged zip checkpoint: {what}")

    def _read_directory(self) -> dict[str, Member]:
        file_size = os.fstat(self._fd).st_size
        with open(self.path, "rb") as fh:
            try:
                end_record = zipfile._EndRecData(fh)  # zipfile's own end-of-directory reader
            except AttributeError:
                end_record = None
            except Exception as error:
                raise self._damaged(f"{type(error).__name__}: {error}") from None
            if end_record and end_record[zipfile._ECD_SIZE] > min(MAX_CENTRAL_DIRECTORY, file_size):
                raise self._damaged(f"central directory of {end_record[zipfile._ECD_SIZE]} bytes")
            try:
                with zipfile.ZipFile(fh) as archive:
                    infos, directory_start = archive.infolist(), archive.start_dir
            except Exception as error:  # zipfile meets garbage with BadZipFile, NotImplementedError...
                raise self._damaged(f"{type(error).__name__}: {error}") from None
        if not infos:
            raise self._damaged("no records")
        if len(infos) > MAX_MEMBERS:
            raise self._damaged(f"{len(infos)} records (at most {MAX_MEMBERS} are read)")
        prefix = infos[0].filename.split("/", 1)[0] + "/"
        if "/" not in infos[0].filename:
            raise CheckpointFormatError(f"{self.path}: a zip, but not a torch checkpoint (no archive folder)")
        members, spans, expanded = {}, [], 0
        for info in infos:
            if not info.filename.startswith(prefix) or len(info.filename) == len(prefix):
                raise self._damaged(f"record {info.filename!r} is outside the archive's folder {prefix!r}")
            name = info.filename[len(prefix):]
            if name in members:
                raise self._damaged(f"record {name!r} appears twice")
            if info.flag_bits & 0x1:
                raise self._damaged(f"record {name!r} is encrypted")
            stored = info.compress_type == zipfile.ZIP_STORED
            if stored and info.compress_size != info.file_size:
                raise self._damaged(f"record {name!r} is stored but its two sizes differ")
            if not stored:
                expanded += info.file_size
            data_offset = self._data_offset(info, name, file_size)
            end = data_offset + info.compress_size
            if end > directory_start:
                raise self._damaged(f"record {name!r} runs past the end of the data")
            spans.append((info.header_offset, end, name))
            members[name] = Member(name, data_offset, info.file_size, info.compress_size, info.CRC, stored, info)
        spans.sort()
        for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
            if end > start:  # overlapping records: the classic way to make a small zip expand hugely
                raise self._damaged(f"records {name!r} and {other!r} overlap")
        if expanded > MAX_EXPANSION * file_size + EXPANSION_SLACK:
            raise self._damaged(f"compressed records would expand to {expanded} bytes "
                                f"(more than {MAX_EXPANSION}x the file)")
        return members

    def _data_offset(self, info: zipfile.ZipInfo, name: str, file_size: int) -> int:
        """Where a member's bytes start: after its local header, whose own lengths say how long it is
        (torch reads the same way, so a damaged length moves the bytes read and the CRC catches it)."""
        if info.header_offset + _LOCAL_HEADER.size > file_size:
            raise self._damaged(f"record {name!r} starts past the end of the file")
        header = os.pread(self._fd, _LOCAL_HEADER.size, info.header_offset)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if signature != b"PK\x03\x04":
            raise self._damaged(f"record {name!r} has no local header where the directory says")
        local_name = os.pread(self._fd, name_length, info.header_offset + _LOCAL_HEADER.size)
        if local_name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace"):
            raise self._damaged(f"record {name!r} is named differently in its local header")
        return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length

    # --- reading ----------------------------------------------------------------------------------

    def member(self, name: str) -> Member | None:
        return self.members.get(name)

    def read(self, name: str) -> bytes:
        """A whole record, CRC-checked (for the small ones: data.pkl, byteorder)."""
        member = self.members[name]
        if member.stored:
            data = bytearray(member.size)
            self.read_member_into(member, memoryview(data))
            return bytes(data)
        with open(self.path, "rb") as fh, zipfile.ZipFile(fh) as archive:
            try:
                return archive.read(member.info)  # zipfile checks the CRC at the end
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
                raise self._damaged(f"record {name!r}: {error}") from None

    def read_member_into(self, member: Member, buffer: memoryview):
        """Read a whole stored member into `buffer`, checking its CRC on the way (one read, no second pass)."""
        if len(buffer) != member.size:
            raise ValueError("buffer size differs from the member's")
        self._check_stored(member, buffer)

    def verify(self, member: Member):
        """Check one member's CRC, once: a streamed read in READ_CHUNK pieces (memory stays small)."""
        if member.name in self._verified:
            return
        with self._locks_lock:
            lock = self._locks.setdefault(member.name, threading.Lock())
        with lock:
            if member.name in self._verified:
                return
            if member.stored:
                self._check_stored(member, None)
                return
            with open(self.path, "rb") as fh, zipfile.ZipFile(fh) as archive:
                try:
                    with archive.open(member.info) as stream:
                        while stream.read(READ_CHUNK):
                            pass  # zipfile raises BadZipFile at the end on a CRC mismatch
                except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
                    raise self._damaged(f"record {member.name!r}: {error}") from None
            self._verified.add(member.name)

    def _check_stored(self, member: Member, into: memoryview | None):
        """CRC of a stored member, read piece by piece into `into` (kept) or a scratch buffer."""
        scratch = memoryview(bytearray(min(READ_CHUNK, member.size))) if into is None else None
        crc, done = 0, 0
        while done < member.size:
            length = min(READ_CHUNK, member.size - done)
            piece = scratch[:length] if into is None else into[done:done + length]
            self.pread_into(piece, member.data_offset + done)
            crc = crc32(piece, crc)
            done += length
        if crc & 0xFFFFFFFF != member.crc:
            raise self._damaged(f"record {member.name!r} fails its CRC check")
        self._verified.add(member.name)

    def is_verified(self, member: Member) -> bool:
        return member.name in self._verified

    def verify_all(self):
        for member in self.members.values():
            self.verify(member)

    def pread_into(self, buffer: memoryview, offset: int):
        """Fill `buffer` from the file at `offset`, in pieces (one pread returns at most ~2 GiB on
        Linux, and may return less than asked)."""
        done = 0
        while done < len(buffer):
            got = os.preadv(self._fd, [buffer[done:done + READ_CHUNK]], offset + done)
            if got == 0:
                raise self._damaged("truncated")
            done += got

    def will_need(self, offset: int, length: int):
        if length > 0 and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()
