"""Jane Austen's six completed novels as long, public-domain evaluation text.

The texts come from Debian's package ``r-cran-janeaustenr`` (the CRAN package janeaustenr), where
each novel is an R character vector (one element per line) in the lazy-load database
``data/Rdata.rdb`` + ``.rdx``. The package is fetched with ``apt-get download`` (no root needed),
read in Python (the ``.deb`` is an ``ar`` archive around a tarball; the R data is decoded by
:mod:`hybridgen.data.rdata`), and the novels are cached as UTF-8 ``.txt`` files under
``data_dir() / "austen"``; later calls read only the cache.

Offline, point ``$HYBRIDGEN_AUSTEN_DEB`` at an already-downloaded ``.deb`` of the package.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from . import assets, rdata

DEB_PACKAGE = "r-cran-janeaustenr"
DEB_ENV = "HYBRIDGEN_AUSTEN_DEB"
DATA_PREFIX = "usr/lib/R/site-library/janeaustenr/data/Rdata"

# (title, R variable name, cache file stem), in publication order, as the R package orders them.
NOVELS = (
    ("Sense & Sensibility", "sensesensibility", "sense_and_sensibility"),
    ("Pride & Prejudice", "prideprejudice", "pride_and_prejudice"),
    ("Mansfield Park", "mansfieldpark", "mansfield_park"),
    ("Emma", "emma", "emma"),
    ("Northanger Abbey", "northangerabbey", "northanger_abbey"),
    ("Persuasion", "persuasion", "persuasion"),
)


def cache_dir() -> Path:
    return assets.data_dir() / "austen"


def austen_novels() -> list[tuple[str, str]]:
    """``(title, text)`` of the six novels in publication order; lines joined with ``"\\n"``."""
    directory = cache_dir()
    paths = [directory / f"{stem}.txt" for _, _, stem in NOVELS]
    if not all(p.is_file() for p in paths):
        _build_cache(directory)
    # Bytes, not read_text(): keeps the text exactly as stored (no newline translation).
    return [(title, p.read_bytes().decode("utf-8")) for (title, _, _), p in zip(NOVELS, paths)]


def _build_cache(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    override = os.environ.get(DEB_ENV)
    print(f"hybridgen: fetching Jane Austen's novels (Debian package {DEB_PACKAGE}), once", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="fetch-", dir=directory))
    try:
        if override:
            deb = Path(override)
            if not deb.is_file():
                raise FileNotFoundError(f"${DEB_ENV} points at {deb}, which is not a file")
        else:
            deb = download_deb(work)
        texts = novels_from_deb(deb, work)
        for _, name, stem in NOVELS:
            partial = work / f"{stem}.txt"
            partial.write_bytes(texts[name].encode("utf-8"))
            os.replace(partial, directory / f"{stem}.txt")  # atomic: a cache file is whole or absent
    finally:
        shutil.rmtree(work, ignore_errors=True)  # also removes the downloaded .deb


def download_deb(dest: Path) -> Path:
    """Download the package's ``.deb`` into ``dest`` with ``apt-get download``; its path."""
    hint = (
        f"or download {DEB_PACKAGE}_*.deb (e.g. from https://packages.debian.org/{DEB_PACKAGE}) "
        f"and set ${DEB_ENV} to its path"
    )
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            f"apt-get not found: Jane Austen's novels are fetched from Debian's package "
            f"{DEB_PACKAGE} with apt-get (Debian/Ubuntu: install 'apt'), {hint}"
        )
    cmd = ["apt-get", "download", DEB_PACKAGE]
    try:
        result = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"`{' '.join(cmd)}` failed to run ({exc}); {hint}") from None
    found = sorted(Path(dest).glob(f"{DEB_PACKAGE}_*.deb"))
    if result.returncode != 0 or not found:
        detail = (result.stderr or result.stdout or "").strip()[-500:]
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}): {detail}\n"
            f"If the package is unknown, run `apt-get update` first; {hint}"
        )
    return found[0]


def novels_from_deb(deb: Path, work: Path) -> dict[str, str]:
    """``{R variable name: text}`` of the six novels inside the package file ``deb``.

    ``work`` is a scratch directory for the two database files.
    """
    wanted = {DATA_PREFIX + ".rdb", DATA_PREFIX + ".rdx"}
    tar_name, tar_bytes = _deb_data_tarball(deb)
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name in wanted and member.isfile():
                    (work / Path(name).name).write_bytes(tar.extractfile(member).read())
                    wanted.discard(name)
    except tarfile.TarError as exc:
        raise ValueError(f"{deb}: cannot read {tar_name}: {exc}") from None
    if wanted:
        raise ValueError(f"{deb} is not a {DEB_PACKAGE} package: {', '.join(sorted(wanted))} missing")
    db = rdata.LazyLoadDB(work / "Rdata")
    texts = {}
    for title, name, _ in NOVELS:
        lines = db[name]
        if getattr(lines, "rtype", None) != "STRSXP" or any(line is None for line in lines):
            raise ValueError(f"{deb}: {title} ({name}) is not a character vector without NA lines")
        texts[name] = "\n".join(lines)
    return texts


def _deb_data_tarball(deb: Path) -> tuple[str, bytes]:
    """Name and bytes of the ``data.tar.*`` member of a ``.deb`` (a Unix ``ar`` archive)."""
    raw = Path(deb).read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a .deb package (no ar archive header)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58])
        except ValueError:
            raise ValueError(f"{deb}: corrupt ar member header at offset {pos}") from None
        body = raw[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise ValueError(f"{deb}: {name} is zstd-compressed, which Python's tarfile cannot read")
            return name, body
        pos += 60 + size + (size & 1)  # members are padded to an even offset
    raise ValueError(f"{deb} has no data.tar member")
