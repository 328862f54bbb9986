"""Sealed table files read and written as streams (FORMAT.md §15.2), in pieces of 1 MiB.

Why: a check table of a 4 TiB disk is 1 GiB.  Opening its envelope whole would
hold the sealed bytes, the opened bytes and then the table itself -- three times
its size, where issue 19 allows 200 MiB plus one table.  AES-GCM is a stream
cipher with one tag at the end, so the envelope of :mod:`.sealed` (unchanged:
header, ciphertext, tag) is decrypted here piece by piece into the table reader,
and written piece by piece from the table writer.

The catch of decrypting a stream is that bytes reach the reader before the tag
is checked.  That is safe here because nothing is *done* with them before the
end: the reader only builds a table, the tag is checked when the last byte is
read (:meth:`OpenedTable.finish` insists on it), and a reader that stops early
on damage has the rest checked first, so a changed byte is always reported as
the authentication failure it is, never as whatever the reader made of it.
"""
from __future__ import annotations

import io
import os
from typing import IO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..errors import CorruptFileError
from .sealed import ENVELOPE_HEADER_SIZE, TAG_SIZE, SealingKey, envelope_header, read_header

__all__ = ["CHUNK", "OpenedTable", "SealingWriter"]

CHUNK = 1 << 20


class OpenedTable(io.RawIOBase):
    """The plain bytes of a sealed file, read in order (what the table readers take).

    ``seek`` only answers the readers' length probe (to the end and back); reading
    is strictly sequential.  ``name`` is the file's path, for the readers' messages.
    """

    def __init__(self, fobj: IO[bytes], key: SealingKey, where: str, path: str) -> None:
        super().__init__()
        self.name = path
        self._f = fobj
        size = os.fstat(fobj.fileno()).st_size
        if size < ENVELOPE_HEADER_SIZE + TAG_SIZE:
            raise CorruptFileError(path, "not a sealed record (too short or no VSBSEAL magic)")
        header = fobj.read(ENVELOPE_HEADER_SIZE)
        nonce = read_header(header, key, path)
        fobj.seek(size - TAG_SIZE)
        tag = fobj.read(TAG_SIZE)
        fobj.seek(ENVELOPE_HEADER_SIZE)
        self._dec = Cipher(algorithms.AES(key.key), modes.GCM(nonce, tag)).decryptor()
        self._dec.authenticate_additional_data(header + where.encode("utf-8"))
        self._length = size - ENVELOPE_HEADER_SIZE - TAG_SIZE
        self._done = 0          # plain bytes decrypted so far
        self._pos = 0           # where the reader believes it is
        self._checked = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: memoryview) -> int:   # type: ignore[override]
        if self._pos != self._done:
            raise io.UnsupportedOperation("a sealed table is read in order, from its start")
        out = memoryview(buffer).cast("B")
        n = 0
        while n < len(out) and self._done < self._length:
            want = min(len(out) - n, CHUNK, self._length - self._done)
            data = self._f.read(want)
            if len(data) != want:
                raise CorruptFileError(self.name, "sealed file shrank while it was read")
            plain = self._dec.update(data)
            out[n:n + len(plain)] = plain
            n += len(plain)
            self._done += len(plain)
            if self._done == self._length:
                self._check_tag()
        self._pos = self._done
        return n

    def _check_tag(self) -> None:
        try:
            self._dec.finalize()
        except InvalidTag:
            raise CorruptFileError(self.name, "authentication failed: the sealed record was "
                                   "changed or belongs to another file") from None
        self._checked = True

    def finish(self) -> None:
        """Check the rest (read and dropped) and the tag: after a reader stopped early,
        or to confirm the reader read it all.  CorruptFileError when it fails."""
        while not self._checked:
            self._pos = self._done
            if not self.readinto(memoryview(bytearray(min(CHUNK, self._length - self._done)))):
                self._check_tag()


class SealingWriter(io.RawIOBase):
    """Seals what the table writers write into ``fobj``: the envelope header now,
    the ciphertext as it comes, the tag at :meth:`close_seal`."""

    def __init__(self, fobj: IO[bytes], key: SealingKey, where: str) -> None:
        super().__init__()
        header, nonce = envelope_header(key)
        self._f = fobj
        self._enc = Cipher(algorithms.AES(key.key), modes.GCM(nonce)).encryptor()
        self._enc.authenticate_additional_data(header + where.encode("utf-8"))
        fobj.write(header)

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:   # type: ignore[override]
        view = memoryview(data).cast("B")
        for pos in range(0, len(view), CHUNK):
            self._f.write(self._enc.update(view[pos:pos + CHUNK]))
        return len(view)

    def close_seal(self) -> None:
        self._f.write(self._enc.finalize())
        self._f.write(self._enc.tag)
