"""A small reader for R's binary serialisation (XDR format), enough to load character data.

R packages ship data as serialised R objects: ``.rds`` files (one object, usually gzip-compressed)
and lazy-load databases (an ``.rdb`` file of compressed serialised blobs indexed by an ``.rdx``
file, itself an ``.rds``). Without R at hand, this module decodes the subset of the format that
such data needs:

* ``NULL``, symbols, pairlists (how attributes are stored),
* logical, integer, double and character vectors, and generic vectors (R lists).

Everything else (environments, closures, ALTREP-compact vectors, bytecode, ...) raises
``ValueError`` naming the type, rather than being skipped, so a caller never gets a silently
wrong value. Results are plain Python values:

* ``NULL`` -> ``None``; a symbol -> :class:`RSymbol` (a ``str``);
* a vector -> :class:`RVector` (a ``list`` with an ``attributes`` dict); NA elements -> ``None``
  (except in double vectors, where R's NA is a NaN and stays a float);
* a pairlist -> :class:`RPairlist`, a list of ``(tag, value)`` pairs (tag ``None`` when absent).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path

# SEXP type codes (R's Rinternals.h) and the pseudo-types used only in the serialised stream.
NILSXP, SYMSXP, LISTSXP = 0, 1, 2
CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP = 255, 254

TYPE_NAMES = {
    0: "NILSXP",
    1: "SYMSXP",
    2: "LISTSXP",
    3: "CLOSXP",
    4: "ENVSXP",
    5: "PROMSXP",
    6: "LANGSXP",
    7: "SPECIALSXP",
    8: "BUILTINSXP",
    9: "CHARSXP",
    10: "LGLSXP",
    13: "INTSXP",
    14: "REALSXP",
    15: "CPLXSXP",
    16: "STRSXP",
    17: "DOTSXP",
    19: "VECSXP",
    20: "EXPRSXP",
    21: "BCODESXP",
    22: "EXTPTRSXP",
    23: "WEAKREFSXP",
    24: "RAWSXP",
    25: "S4SXP",
    238: "ALTREP_SXP",
    239: "ATTRLISTSXP",
    240: "ATTRLANGSXP",
    241: "BASEENV_SXP",
    242: "EMPTYENV_SXP",
    243: "BCREPREF",
    244: "BCREPDEF",
    245: "GENERICREFSXP",
    246: "CLASSREFSXP",
    247: "PERSISTSXP",
    248: "PACKAGESXP",
    249: "NAMESPACESXP",
    250: "BASENAMESPACE_SXP",
    251: "MISSINGARG_SXP",
    252: "UNBOUNDVALUE_SXP",
    253: "GLOBALENV_SXP",
    254: "NILVALUE_SXP",
    255: "REFSXP",
}

# Bits of the 32-bit flags word that precedes every item.
HAS_ATTR_BIT = 1 << 9
HAS_TAG_BIT = 1 << 10
# CHARSXP encoding marks, in the "levels" field (flags >> 12).
LATIN1_MASK, UTF8_MASK, BYTES_MASK, ASCII_MASK = 1 << 2, 1 << 3, 1 << 1, 1 << 6

NA_INTEGER = -(2**31)


class RSymbol(str):
    """An R symbol (a name), e.g. an attribute tag."""


class RVector(list):
    """An R atomic or generic vector: its elements plus R attributes (``names``, ``class``, ...)."""

    def __init__(self, items=(), rtype: str = "VECSXP", attributes: dict | None = None):
        super().__init__(items)
        self.rtype = rtype
        self.attributes = dict(attributes or {})

    @property
    def names(self) -> list | None:
        return self.attributes.get("names")

    def as_dict(self) -> dict:
        """``{name: element}`` for a fully named vector (R's ``x[["name"]]`` access)."""
        names = self.names
        if names is None or len(names) != len(self) or any(n is None for n in names):
            raise ValueError(f"this {self.rtype} is not fully named, cannot index it by name")
        return dict(zip(names, self))


class RPairlist(list):
    """An R pairlist as ``(tag, value)`` pairs; ``tag`` is an :class:`RSymbol` or ``None``."""


class _Reader:
    """Cursor over one XDR-serialised stream; ``refs`` is R's table of back-referenceable items."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0
        self.refs: list = []
        self.native_encoding = "UTF-8"

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"R data truncated: wanted {n} bytes at offset {self.pos} of {len(self.data)}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more words, upper then lower half
            upper, lower = struct.unpack(">II", self.take(8))
            n = (upper << 32) | lower
        elif n < 0:
            raise ValueError(f"invalid R vector length {n} at offset {self.pos - 4}")
        return n

    def header(self) -> None:
        magic = bytes(self.take(2))
        if magic != b"X\n":
            kind = {b"A\n": "ASCII", b"B\n": "native binary"}.get(magic)
            raise ValueError(f"unsupported R serialisation format {kind or repr(magic)}: only XDR ('X\\n') is read")
        version = self.int()
        self.int()  # R version that wrote it
        self.int()  # oldest R version that can read it
        if version == 3:
            self.native_encoding = bytes(self.take(self.int())).decode("ascii")
        elif version != 2:
            raise ValueError(f"unsupported R serialisation version {version} (2 and 3 are read)")

    def item(self):
        flags = self.int()
        sxp = flags & 0xFF
        if sxp == NILVALUE_SXP:
            return None
        if sxp == REFSXP:
            index = (flags >> 8) or self.int()
            if not 1 <= index <= len(self.refs):
                raise ValueError(f"R back-reference {index} out of range (table has {len(self.refs)})")
            return self.refs[index - 1]
        if sxp == SYMSXP:
            symbol = RSymbol(self.charsxp(self.int()) or "")
            self.refs.append(symbol)
            return symbol
        if sxp == LISTSXP:
            return self.pairlist(flags)
        if sxp == CHARSXP:
            return self.charsxp(flags)
        if sxp in (LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP):
            vector = RVector(self.elements(sxp), TYPE_NAMES[sxp])
            if flags & HAS_ATTR_BIT:
                vector.attributes = self.attributes()
            return vector
        name = TYPE_NAMES.get(sxp, f"unknown type {sxp}")
        raise ValueError(
            f"unsupported R object {name} at offset {self.pos - 4}: only NULL, symbols, "
            "pairlists, logical/integer/double/character vectors and lists are read"
        )

    def elements(self, sxp: int) -> list:
        n = self.length()
        if sxp in (LGLSXP, INTSXP):
            values = struct.unpack(f">{n}i", self.take(4 * n))
            if sxp == LGLSXP:
                return [None if v == NA_INTEGER else bool(v) for v in values]
            return [None if v == NA_INTEGER else v for v in values]
        if sxp == REALSXP:
            return list(struct.unpack(f">{n}d", self.take(8 * n)))
        if sxp == STRSXP:
            out = []
            for _ in range(n):
                flags = self.int()
                if flags & 0xFF != CHARSXP:
                    raise ValueError(
                        f"character vector element of type {TYPE_NAMES.get(flags & 0xFF, flags & 0xFF)}, expected CHARSXP"
                    )
                out.append(self.charsxp(flags))
            return out
        return [self.item() for _ in range(n)]  # VECSXP

    def charsxp(self, flags: int) -> str | None:
        """One string (its flags word already read); ``None`` for NA_character_."""
        if flags & 0xFF != CHARSXP:
            raise ValueError(f"expected a CHARSXP, found {TYPE_NAMES.get(flags & 0xFF, flags & 0xFF)}")
        n = self.int()
        if n == -1:
            return None
        if n < 0:
            raise ValueError(f"invalid R string length {n}")
        raw = bytes(self.take(n))
        levels = flags >> 12
        if levels & BYTES_MASK:
            raise ValueError("R string marked as raw bytes (no encoding); cannot decode it as text")
        if levels & LATIN1_MASK:
            encoding = "latin-1"
        elif levels & (UTF8_MASK | ASCII_MASK):
            encoding = "utf-8"
        else:  # unmarked: the writer's native encoding
            encoding = self.native_encoding
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise ValueError(f"R string is not valid {encoding}: {exc}") from None

    def pairlist(self, flags: int) -> RPairlist:
        # Read node by node rather than recursing on the CDR, so long pairlists cannot overflow.
        out = RPairlist()
        while True:
            if flags & HAS_ATTR_BIT:
                self.attributes()  # attributes on a pairlist node carry nothing we use
            tag = self.item() if flags & HAS_TAG_BIT else None
            if tag is not None and not isinstance(tag, RSymbol):
                raise ValueError(f"pairlist tag is a {type(tag).__name__}, expected a symbol")
            out.append((tag, self.item()))
            flags = self.int()
            if flags & 0xFF == NILVALUE_SXP:
                return out
            if flags & 0xFF != LISTSXP:
                raise ValueError(f"pairlist ends in a {TYPE_NAMES.get(flags & 0xFF, flags & 0xFF)}, expected NULL")

    def attributes(self) -> dict:
        attrs = self.item()
        if not isinstance(attrs, RPairlist):
            raise ValueError(f"R attributes must be a pairlist, found {type(attrs).__name__}")
        if any(tag is None for tag, _ in attrs):
            raise ValueError("R attribute without a name")
        return {str(tag): value for tag, value in attrs}


def unserialize(data: bytes):
    """Decode one R object serialised in XDR format (what ``serialize()``/``saveRDS()`` write)."""
    reader = _Reader(data)
    reader.header()
    value = reader.item()
    if reader.pos != len(reader.data):
        raise ValueError(f"{len(reader.data) - reader.pos} trailing bytes after the R object")
    return value


def decompress_any(data: bytes) -> bytes:
    """Undo the gzip / bzip2 / xz wrapping an ``.rds`` file may have (or none)."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def read_rds(path: str | Path):
    """The object stored in an ``.rds`` file (``saveRDS``)."""
    return unserialize(decompress_any(Path(path).read_bytes()))


def _decompress_blob(blob: bytes, method: int) -> bytes:
    """One lazy-load database entry: a big-endian output length, then the compressed bytes.

    ``method`` is the database's ``compressed`` setting: 1 = zlib; 2 and 3 put a type byte after
    the length ('0' stored, '1' zlib, '2' bzip2, 'Z' xz).
    """
    if len(blob) < 4:
        raise ValueError("lazy-load entry shorter than its length header")
    expected = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    kind = b"1"
    if method in (2, 3):
        kind, body = body[:1], body[1:]
    elif method != 1:
        raise ValueError(f"unsupported lazy-load compression setting {method}")
    try:
        if kind == b"0":
            out = body
        elif kind == b"1":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"Z":
            out = lzma.decompress(body)
        else:
            raise ValueError(f"unknown lazy-load compression type {kind!r}")
    except (zlib.error, OSError, lzma.LZMAError) as exc:
        raise ValueError(f"corrupt lazy-load entry: {exc}") from None
    if len(out) != expected:
        raise ValueError(f"lazy-load entry decompressed to {len(out)} bytes, header says {expected}")
    return out


class LazyLoadDB:
    """An R lazy-load database (``name.rdb`` + ``name.rdx``), read one variable at a time."""

    def __init__(self, stem: str | Path):
        stem = Path(stem)
        self.rdb = stem.with_suffix(".rdb")
        rdx = stem.with_suffix(".rdx")
        for path in (self.rdb, rdx):
            if not path.is_file():
                raise FileNotFoundError(f"lazy-load database file missing: {path}")
        index = read_rds(rdx)
        if not isinstance(index, RVector):
            raise ValueError(f"{rdx} does not hold a lazy-load index (a named list)")
        index = index.as_dict()
        self.variables = {str(k): v for k, v in index["variables"].as_dict().items()}
        compressed = index.get("compressed", RVector([True]))
        flag = compressed[0] if len(compressed) == 1 else None
        if isinstance(flag, bool):
            flag = int(flag)
        elif isinstance(flag, float) and flag.is_integer():
            flag = int(flag)
        if not isinstance(flag, int):
            raise ValueError(f"{rdx}: unreadable 'compressed' entry {compressed!r}")
        self.compressed = flag

    def names(self) -> list[str]:
        return list(self.variables)

    def __getitem__(self, name: str):
        if name not in self.variables:
            raise KeyError(f"{name!r} not in {self.rdb} (has {', '.join(self.variables)})")
        entry = self.variables[name]
        if len(entry) != 2 or any(v is None for v in entry):
            raise ValueError(f"bad index entry for {name!r}: {entry!r}")
        offset, length = (int(v) for v in entry)
        with open(self.rdb, "rb") as fh:
            fh.seek(offset)
            blob = fh.read(length)
        if len(blob) != length:
            raise ValueError(f"{self.rdb} truncated: entry {name!r} needs bytes {offset}..{offset + length}")
        return unserialize(_decompress_blob(blob, self.compressed))
