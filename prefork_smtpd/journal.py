"""The store's write-ahead journal: the record format, free of I/O.

Why a journal: making a Maildir delivery durable takes two device flushes
in a row (the files' data, then their names in ``new/``), and a flush waits
for everything the device holds in its cache, a neighbour's writes too.
Beside a process writing to the same disk each flush took tens of
milliseconds, so a mail waited for two of them. With the journal, a batch
of mails is appended to one file and that file alone is flushed
(``fdatasync``): one flush, and the mail is acknowledged. The Maildir
files are written and renamed into ``new/`` at once too (readers see the
mail as before), but made durable later, for many batches at a time; only
then is the journal dropped. After a crash the journal puts back any copy
that did not reach the disk (``delivery.replay_journals``).

A record holds one batch: for each copy, its folder (relative to
``mail_dir``), its file name in ``new/``, and its content, as the trace
header it has of its own and the index of a body shared by the copies of
one mail (a mail to twenty recipients is written once, not twenty times).

Layout, little-endian::

    head:    magic "PSJ1", file id (8 bytes), payload length (u32), CRC-32 of the payload (u32)
    payload: bodies (u16), then per body its length (u32) and octets;
             copies (u32), then per copy: folder (u16 length + UTF-8),
             name (u16 + UTF-8), header (u32 + octets), body index (u16)

The file id is in the journal file's name and in every record: a record
from another file (a block reused after a crash) is never taken for one
of this file's. A record whose head, length or CRC does not hold ends the
reading: that is the tail a crash cut short, whose mails were never
acknowledged (a batch is acknowledged only once its record is flushed).

A record also has the shape the store gives it, or ends the reading the
same way: every copy of one body bears that mail's name, and no body is
larger than the store journals. A crafted record can thus make the replay
write no more than a delivery of the same mails could have: one copy per
folder and mail, never one body copied over and over under new names.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

MAGIC = b"PSJ1"
HEAD = struct.Struct("<4s8sII")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
FILE_ID_SIZE = 8


@dataclass(frozen=True)
class JournalCopy:
    """One file a record puts into a folder's ``new/``."""

    folder: str
    name: str
    content: bytes


def encode_record(
    file_id: bytes, bodies: Sequence[Sequence[bytes | bytearray]], copies: Iterable[tuple[str, str, bytes, int]],
) -> list[bytes | bytearray]:
    """The pieces of one record, for writev: the bodies are not joined or copied.

    ``copies``: (folder, name, header, index of its body in ``bodies``).
    """
    assert len(file_id) == FILE_ID_SIZE
    pieces: list[bytes | bytearray] = [b"", _U16.pack(len(bodies))]  # pieces[0]: the head, once the CRC is known
    for body in bodies:
        pieces.append(_U32.pack(sum(len(piece) for piece in body)))
        pieces.extend(piece for piece in body if piece)
    table = bytearray()
    count = 0
    for folder, name, header, body_index in copies:
        folder_octets = folder.encode("utf-8", "surrogateescape")
        name_octets = name.encode("utf-8", "surrogateescape")
        table += _U16.pack(len(folder_octets)) + folder_octets + _U16.pack(len(name_octets)) + name_octets
        table += _U32.pack(len(header)) + header + _U16.pack(body_index)
        count += 1
    pieces.append(_U32.pack(count) + table)
    crc = 0
    length = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
        length += len(piece)
    pieces[0] = HEAD.pack(MAGIC, file_id, length, crc)
    return pieces


class _Reader:
    """Reads the payload of one record; IndexError or ValueError when it does not hold together."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.at = 0

    def take(self, size: int) -> memoryview:
        if self.at + size > len(self.data):
            raise IndexError("past the record's end")
        piece = self.data[self.at : self.at + size]
        self.at += size
        return piece

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def text(self) -> str:
        return bytes(self.take(self.u16())).decode("utf-8", "surrogateescape")


def decode_records(data: bytes, file_id: bytes) -> tuple[list[list[JournalCopy]], int]:
    """The whole records at the start of ``data``, and where they end.

    Reading stops at the first record that is cut short, damaged or from
    another file: nothing after it is trusted.
    """
    stream = memoryview(data)
    records: list[list[JournalCopy]] = []
    end = 0

    def read(size: int) -> bytes:
        nonlocal stream
        piece, stream = stream[:size], stream[size:]
        return bytes(piece)

    for parts, end in iter_records(read, file_id):
        records.append([JournalCopy(folder, name, header + body) for folder, name, header, body in parts])
    return records, end


# A copy as the replay takes it: (folder, name, header, body); the body is
# one object shared by the copies of a mail, never joined to each header.
CopyParts = tuple[str, str, bytes, bytes]


def iter_records(
    read: Callable[[int], bytes], file_id: bytes, max_body: int | None = None,
) -> Iterator[tuple[list[CopyParts], int]]:
    """Each whole record read from ``read`` (a file's read), with the offset
    where it ends: one record in memory at a time, never the whole file.

    ``max_body``: a body larger than this ends the reading (no store wrote it).
    """
    at = 0
    while True:
        head = read(HEAD.size)
        if len(head) < HEAD.size:
            return
        magic, record_id, length, crc = HEAD.unpack(head)
        if magic != MAGIC or record_id != file_id:
            return
        payload = read(length)  # at most what the file holds
        if len(payload) < length or zlib.crc32(payload) != crc:
            return
        try:
            parts = _decode_payload(memoryview(payload), max_body)
        except (IndexError, ValueError):
            return  # a CRC that holds over a payload that does not: trust nothing after it
        at += HEAD.size + length
        yield parts, at


def _decode_payload(payload: memoryview, max_body: int | None) -> list[CopyParts]:
    reader = _Reader(payload)
    bodies = []
    for _ in range(reader.u16()):
        size = reader.u32()
        if max_body is not None and size > max_body:
            raise ValueError("a body larger than the store journals")
        bodies.append(bytes(reader.take(size)))
    names: list[str | None] = [None] * len(bodies)  # the mail's name each body bears
    copies = []
    for _ in range(reader.u32()):
        folder = reader.text()
        name = reader.text()
        header = bytes(reader.take(reader.u32()))
        body = reader.u16()
        if body >= len(bodies):
            raise ValueError("a copy names a body the record does not hold")
        if names[body] is None:
            names[body] = name
        elif names[body] != name:
            raise ValueError("copies of one body under different names")
        copies.append((folder, name, header, bodies[body]))
    if reader.at != len(payload):
        raise ValueError("octets after the last copy")
    return copies
