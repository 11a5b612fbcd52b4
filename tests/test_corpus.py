"""Tests for featuretree.corpus and the bundled WordNet file (featuretree/data/, built by data/build_wordnet.py)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from featuretree.config import FeatureTreeError
from featuretree.corpus import Corpus, data_dir, load_corpus

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "featuretree" / "data" / "wordnet.jsonl.gz"


@pytest.fixture(scope="module")
def wordnet() -> Corpus:
    return load_corpus("wordnet")


def test_wordnet_size_and_lexnames(wordnet):
    assert len(wordnet) > 100_000 and len(wordnet.labels) == len(wordnet)
    assert list(wordnet) == wordnet.texts and all(t.strip() for t in wordnet.texts)
    for col in ("id", "pos", "lexname", "domains", "domains_direct", "hypernym_path", "lemmas"):
        assert col in wordnet.labels.columns
    lexnames = set(wordnet.labels.lexname)
    assert {"noun.animal", "noun.plant", "noun.body"} <= lexnames
    assert set(wordnet.labels.pos) == {"n", "v", "a", "r"}
    assert wordnet.labels.id.is_unique


def test_wordnet_records_are_sound(wordnet):
    lab = wordnet.labels.set_index("id")
    dog = wordnet.texts[wordnet.labels.id.tolist().index("n02084071")]
    assert dog.startswith("dog, domestic dog") and '"the dog barked all night"' in dog
    assert lab.loc["n02084071", "lexname"] == "noun.animal"
    path = lab.loc["n02084071", "hypernym_path"]
    assert path[0] == "entity" and path[-1] == "dog" and "mammal" in path


def test_wordnet_domains(wordnet):
    lab = wordnet.labels
    direct = lab.domains_direct.map(set)
    inherited = lab.domains.map(set)
    assert all(d <= i for d, i in zip(direct, inherited, strict=True))
    for name in ("biology", "medicine", "law"):
        n_direct = sum(name in d for d in direct)
        n_all = sum(name in i for i in inherited)
        assert n_direct > 0 and n_all >= n_direct, name
    # inheritance through hypernyms adds many members, e.g. taxonomic groups under biology's categories
    assert sum("biology" in i for i in inherited) > 10 * sum("biology" in d for d in direct)


def test_txt_source(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first line\n\n   \nsecond\x00 line\r\nthird\n", encoding="utf-8")
    c = load_corpus(p)
    assert c.texts == ["first line", "second line", "third"]
    assert list(c.labels.index) == [0, 3, 4] and c.labels.shape[1] == 0
    assert load_corpus(str(p)).texts == c.texts


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_source(tmp_path, gz):
    lines = [
        {"text": "a cat", "label": "animal"},
        {"text": "  ", "label": "x"},
        {"text": "an oak", "label": "plant"},
    ]
    data = ("\n".join(json.dumps(r) for r in lines) + "\n\n").encode()
    p = tmp_path / ("c.jsonl.gz" if gz else "c.jsonl")
    p.write_bytes(gzip.compress(data) if gz else data)
    c = load_corpus(p)
    assert c.texts == ["a cat", "an oak"]
    assert c.labels.label.tolist() == ["animal", "plant"]


def test_list_source():
    c = load_corpus(("x", "", "y\x00z"))
    assert c.texts == ["x", "yz"] and list(c.labels.index) == [0, 2] and len(c.labels.columns) == 0
    assert len(c) == 2 and list(c) == ["x", "yz"]


@pytest.mark.slow
def test_limit_is_deterministic(wordnet):
    a = load_corpus("wordnet", limit=500, seed=3)
    b = load_corpus("wordnet", limit=500, seed=3)
    assert a.texts == b.texts and len(a) == 500 and a.labels.equals(b.labels)
    assert list(a.labels.index) == sorted(a.labels.index)  # original order kept
    assert a.texts == [wordnet.texts[i] for i in a.labels.index]
    items = [f"text {i}" for i in range(1000)]
    assert load_corpus(items, limit=50, seed=3).texts != load_corpus(items, limit=50, seed=4).texts
    assert load_corpus(["a", "b"], limit=10).texts == ["a", "b"]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "missing.txt", "not found"),
        (lambda d: "no-such-source", "unknown corpus source"),
        (lambda d: [], "no texts"),
        (lambda d: ["", " \n\t"], "no texts"),
        (lambda d: _write(d / "blank.txt", b"\n  \n\n"), "no texts"),
        (lambda d: _write(d / "bin.txt", bytes(range(256)) * 40), "not UTF-8"),
        (lambda d: _write(d / "utf16.txt", "hello world\n".encode("utf-16-le") * 10000), "binary"),
        (lambda d: _write(d / "bad.jsonl", b'{"text": "ok"}\n{"label": 1}\n'), 'line 2 has no "text"'),
        (lambda d: _write(d / "bad2.jsonl", b"not json\n"), "not valid JSON"),
        (lambda d: _write(d / "fake.jsonl.gz", b'{"text": "plain"}\n'), "not a valid gzip"),
        (lambda d: _write(d / "c.csv", b"a,b\n"), "unsupported extension"),
        (lambda d: [1, 2], "not str"),
        (lambda d: 42, "not supported"),
    ],
)
def test_errors(tmp_path, make, match):
    with pytest.raises(FeatureTreeError, match=match):
        load_corpus(make(tmp_path))


def test_bad_limit_and_missing_wordnet(tmp_path, monkeypatch):
    with pytest.raises(FeatureTreeError, match="limit"):
        load_corpus(["a"], limit=0)
    monkeypatch.setenv("FEATURETREE_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(FeatureTreeError, match="FEATURETREE_DATA"):
        load_corpus("wordnet")


def test_bundled_data_is_package_data(monkeypatch):
    """The corpus lives inside the package (so the wheel ships it) and the build script writes it there."""
    monkeypatch.delenv("FEATURETREE_DATA", raising=False)
    import featuretree

    assert data_dir() == Path(featuretree.__file__).parent / "data" == SHIPPED.parent
    assert (data_dir() / "WORDNET_LICENSE").is_file()
    assert not (ROOT / "data" / "wordnet.jsonl.gz").exists(), "a stale copy of the corpus outside the package"
    out = subprocess.run([sys.executable, str(ROOT / "data" / "build_wordnet.py"), "--help"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert "featuretree/data/wordnet.jsonl.gz" in out


def test_featuretree_data_overrides(tmp_path, monkeypatch):
    with gzip.open(SHIPPED, "rt", encoding="utf-8") as fh:
        head = [next(fh) for _ in range(20)]
    (tmp_path / "wordnet.jsonl.gz").write_bytes(gzip.compress("".join(head).encode()))
    monkeypatch.setenv("FEATURETREE_DATA", str(tmp_path))
    c = load_corpus("wordnet", limit=7)
    assert len(c) == 7 and c.labels.id.iloc[0].startswith("n")


@pytest.mark.slow
def test_build_is_reproducible(tmp_path):
    """Rebuilding from the system's WordNet 3.0 gives the shipped file byte for byte."""
    try:
        installed = subprocess.run(["dpkg", "-s", "wordnet-base"], capture_output=True).returncode == 0
    except OSError:
        installed = False
    if not installed:
        pytest.skip("wordnet-base is not installed (apt-get install wordnet-base); cannot rebuild WordNet")
    out = tmp_path / "wordnet.jsonl.gz"
    subprocess.run(
        [sys.executable, str(ROOT / "data" / "build_wordnet.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # compare the records first, so a failure says whether the content or only the compression differs
    assert gzip.decompress(out.read_bytes()) == gzip.decompress(SHIPPED.read_bytes()), "records differ"
    assert out.read_bytes() == SHIPPED.read_bytes(), "same records, different gzip bytes (zlib version?)"
    assert (tmp_path / "WORDNET_LICENSE").read_text() == (SHIPPED.parent / "WORDNET_LICENSE").read_text()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
