"""Jane Austen's novels from Debian's r-cran-janeaustenr: the texts themselves, the cache, the error
paths, and the R deserialiser on hand-built byte strings."""

import gzip
import lzma
import struct
import subprocess
import zlib

import pytest

from hybridgen.data import austen, rdata

TITLES = ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma", "Northanger Abbey", "Persuasion"]
OPENINGS = {
    "Sense & Sensibility": "The family of Dashwood had long been settled in Sussex.",
    "Pride & Prejudice": "It is a truth universally acknowledged, that a single man in possession",
    "Mansfield Park": "About thirty years ago Miss Maria Ward, of Huntingdon, with only seven",
    "Emma": "Emma Woodhouse, handsome, clever, and rich, with a comfortable home",
    "Northanger Abbey": "No one who had ever seen Catherine Morland in her infancy would have",
    "Persuasion": "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who,",
}
# janeaustenr's austen_books() data frame has one row per line: 73,422 rows in version 1.0.0.
TOTAL_LINES = 73422


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    """The package file, downloaded once for this module."""
    return austen.download_deb(tmp_path_factory.mktemp("deb"))


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDGEN_DATA", str(tmp_path))
    monkeypatch.delenv(austen.DEB_ENV, raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def novels(deb, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYBRIDGEN_DATA", str(tmp_path_factory.mktemp("data")))
        mp.setenv(austen.DEB_ENV, str(deb))
        return austen.austen_novels()


def test_six_novels_in_publication_order(novels):
    assert [title for title, _ in novels] == TITLES
    assert all(len(text) >= 100_000 for _, text in novels)
    assert sum(text.count("\n") + 1 for _, text in novels) == TOTAL_LINES


@pytest.mark.parametrize("title", TITLES)
def test_opening_lines(novels, title):
    text = dict(novels)[title]
    head = text.split("\n")[:40]
    assert any(line.startswith(OPENINGS[title]) for line in head), "the first sentence is near the start"
    assert text.count(OPENINGS[title]) == 1


def test_text_is_clean(novels):
    for title, text in novels:
        assert "\x00" not in text and "\r" not in text and "\ufffd" not in text, title
        assert all(line.isprintable() for line in text.split("\n")), title
        assert not text.startswith("\n") and "Jane Austen" in text[:200], title


def test_cache_is_used_on_second_call(data_dir, deb, monkeypatch, capsys):
    monkeypatch.setenv(austen.DEB_ENV, str(deb))
    first = austen.austen_novels()
    assert "fetching" in capsys.readouterr().err
    cached = sorted(p.name for p in (data_dir / "austen").iterdir())
    assert cached == sorted(f"{stem}.txt" for _, _, stem in austen.NOVELS), "no temporary files left"
    assert deb.is_file(), "a user-supplied .deb is not deleted"

    def no_network(*args, **kwargs):
        raise AssertionError("the cache should make fetching unnecessary")

    monkeypatch.delenv(austen.DEB_ENV)
    monkeypatch.setattr(subprocess, "run", no_network)
    monkeypatch.setattr(austen, "novels_from_deb", no_network)
    assert austen.austen_novels() == first
    assert capsys.readouterr().err == ""


def test_missing_cache_file_triggers_a_refetch(data_dir, deb, monkeypatch):
    monkeypatch.setenv(austen.DEB_ENV, str(deb))
    want = austen.austen_novels()
    (data_dir / "austen" / "emma.txt").unlink()
    assert austen.austen_novels() == want


def test_missing_apt_get_says_what_to_do(data_dir, monkeypatch):
    monkeypatch.setattr(austen.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get not found.*HYBRIDGEN_AUSTEN_DEB"):
        austen.austen_novels()
    assert list((data_dir / "austen").iterdir()) == [], "the temporary download folder is removed"


def test_failed_download_names_the_command(data_dir, monkeypatch):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package r-cran-janeaustenr")

    monkeypatch.setattr(austen.subprocess, "run", failing)
    with pytest.raises(RuntimeError, match=r"apt-get download r-cran-janeaustenr.*exit 100.*Unable to locate"):
        austen.austen_novels()


def test_bad_override_paths(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(austen.DEB_ENV, str(tmp_path / "nope.deb"))
    with pytest.raises(FileNotFoundError, match="HYBRIDGEN_AUSTEN_DEB"):
        austen.austen_novels()
    not_a_deb = tmp_path / "fake.deb"
    not_a_deb.write_bytes(b"hello")
    monkeypatch.setenv(austen.DEB_ENV, str(not_a_deb))
    with pytest.raises(ValueError, match="not a .deb"):
        austen.austen_novels()


# --- the R deserialiser on hand-built streams -------------------------------------------------
# A writer independent of the reader: each helper emits one item as R's serialize() does (XDR).


def i32(*values):
    return struct.pack(f">{len(values)}i", *values)


def flags(sxp, levels=0, attr=False, tag=False):
    return i32(sxp | (attr << 9) | (tag << 10) | (levels << 12))


def charsxp(s, levels=64):
    if s is None:
        return flags(9) + i32(-1)
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return flags(9, levels) + i32(len(raw)) + raw


def strsxp(*items, attr=b""):
    body = b"".join(charsxp(s) if not isinstance(s, bytes) else s for s in items)
    return flags(16, attr=bool(attr)) + i32(len(items)) + body + attr


def symbol(name):
    return flags(1) + charsxp(name)


def header(version=3):
    out = b"X\n" + i32(version, 0x040201, 0x030500)
    if version == 3:
        out += i32(5) + b"UTF-8"
    return out


NIL = i32(254)


def test_character_vector_with_na():
    assert rdata.unserialize(header() + strsxp("a", None, "")) == ["a", None, ""]
    assert rdata.unserialize(header(2) + strsxp("x")) == ["x"]


def test_utf8_and_latin1_strings():
    utf8 = "Mrs. Cl\u00e9ment paid \u00a3200 \u2014 \u201cquite so\u201d"
    latin1 = charsxp("caf\u00e9".encode("latin-1"), levels=4)
    got = rdata.unserialize(header() + strsxp(charsxp(utf8, levels=8), latin1))
    assert got == [utf8, "caf\u00e9"]
    with pytest.raises(ValueError, match="not valid utf-8"):
        rdata.unserialize(header() + strsxp(charsxp(b"\xff\xfe", levels=8)))


def test_named_list_with_attributes_and_symbol_back_reference():
    inner = strsxp("p", attr=flags(2, tag=True) + symbol("names") + strsxp("k") + NIL)
    ints = flags(13) + i32(2, 7, -(2**31))
    # The list's own "names" tag is a back-reference (REFSXP, index 1) to the symbol read above.
    names = flags(2, tag=True) + i32(255 | (1 << 8)) + strsxp("lines", "n") + NIL
    got = rdata.unserialize(header() + flags(19, attr=True) + i32(2) + inner + ints + names)
    assert got.rtype == "VECSXP" and got.names == ["lines", "n"]
    assert got.as_dict() == {"lines": ["p"], "n": [7, None]}
    assert got[0].attributes == {"names": ["k"]} and got[1].rtype == "INTSXP"


def test_unsupported_and_malformed_input_raise_value_error():
    with pytest.raises(ValueError, match="ENVSXP"):
        rdata.unserialize(header() + flags(4) + i32(0))
    with pytest.raises(ValueError, match="CLOSXP"):
        rdata.unserialize(header() + flags(3))
    with pytest.raises(ValueError, match="only XDR"):
        rdata.unserialize(b"A\n" + b"3\n")
    with pytest.raises(ValueError, match="truncated"):
        rdata.unserialize((header() + strsxp("abcdef"))[:-2])
    with pytest.raises(ValueError, match="trailing"):
        rdata.unserialize(header() + strsxp("a") + b"\x00")
    with pytest.raises(ValueError, match="version 4"):
        rdata.unserialize(b"X\n" + i32(4, 0, 0))
    with pytest.raises(ValueError, match="expected CHARSXP"):
        rdata.unserialize(header() + flags(16) + i32(1) + symbol("s"))
    with pytest.raises(ValueError, match="back-reference"):
        rdata.unserialize(header() + i32(255 | (3 << 8)))


@pytest.mark.parametrize("method", [1, 3])
def test_lazy_load_database(tmp_path, method):
    values = {"first": header() + strsxp("one", "two"), "second": header() + strsxp(None)}
    blobs, index = b"", []
    for name, payload in values.items():
        size = struct.pack(">I", len(payload))
        blob = size + zlib.compress(payload) if method == 1 else size + b"Z" + lzma.compress(payload)
        index.append((name, len(blobs), len(blob)))
        blobs += blob
    (tmp_path / "db.rdb").write_bytes(blobs)

    def named(items, names):
        return (
            flags(19, attr=True)
            + i32(len(items))
            + b"".join(items)
            + flags(2, tag=True)
            + symbol("names")
            + strsxp(*names)
            + NIL
        )

    variables = named([flags(13) + i32(2, off, n) for _, off, n in index], [name for name, _, _ in index])
    compressed = flags(10) + i32(1, 1) if method == 1 else flags(13) + i32(1, 3)
    rdx = header() + named([variables, NIL, compressed], ["variables", "references", "compressed"])
    (tmp_path / "db.rdx").write_bytes(gzip.compress(rdx))

    db = rdata.LazyLoadDB(tmp_path / "db")
    assert db.names() == ["first", "second"] and db.compressed == method
    assert db["first"] == ["one", "two"] and db["second"] == [None]
    with pytest.raises(KeyError, match="third"):
        db["third"]
