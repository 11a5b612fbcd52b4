#!/usr/bin/env python3
"""Build featuretree/data/wordnet.jsonl.gz: one JSON record per WordNet 3.0 synset, parsed from the data.* files.

Standalone and stdlib only (no nltk). The output is deterministic, so rebuilding on any machine with the
same WordNet files gives a byte-identical file: records sorted by (pos n, v, a, r; then offset), JSON with
sorted keys, gzip with mtime=0 and no file name in the header.

    python data/build_wordnet.py                       # finds WordNet via dpkg or /usr/share/wordnet;
                                                       # writes featuretree/data/ (the package data)
    python data/build_wordnet.py --wordnet-dir ~/WordNet-3.0/dict --out /tmp/wordnet.jsonl.gz

Record fields: id ("n02084071"), pos (n/v/a/r; adjective satellites "s" are folded into "a"), lemmas,
gloss, examples, text, lexname ("noun.animal"), domains (topic domains, direct plus inherited through
hypernyms), domains_direct, hypernym_path (first lemmas from the root down, following the first hypernym).
The file format is described in wndb(5WN); the license is written beside the output as WORDNET_LICENSE.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The corpus is package data: it lives inside the package so that a built wheel ships it.
PACKAGE_DATA = HERE.parent / "featuretree" / "data"

# Data files in output order; the pos letter of each is the one used in ids.
DATA_FILES = (("n", "data.noun"), ("v", "data.verb"), ("a", "data.adj"), ("r", "data.adv"))

# lexnames(5WN) of WordNet 3.0. Debian's wordnet-base does not ship the `lexnames` file, so this table is the
# fallback; a `lexnames` file in --wordnet-dir, when present, wins.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()

HYPERNYM = {"@", "@i"}  # hypernym and instance hypernym
DOMAIN_TOPIC = ";c"  # "member of this domain - TOPIC" (semantic or lexical pointer)
ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")  # syntactic markers on adjectives, e.g. "galore(ip)"


def default_wordnet_dir() -> Path:
    """The directory holding data.noun: $WNSEARCHDIR, else wordnet-base's files per dpkg, else /usr/share/wordnet."""
    if os.environ.get("WNSEARCHDIR"):
        return Path(os.environ["WNSEARCHDIR"])
    try:
        out = subprocess.run(
            ["dpkg", "-L", "wordnet-base"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        for line in out.splitlines():
            if line.endswith("/data.noun"):
                return Path(line).parent
    except (OSError, subprocess.SubprocessError):
        pass
    return Path("/usr/share/wordnet")


def read_lexnames(wn_dir: Path) -> list[str]:
    """lex_filenum -> lexicographer file name, from `lexnames` if present, else the WordNet 3.0 table."""
    path = wn_dir / "lexnames"
    if not path.exists():
        return list(LEXNAMES)
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            names[int(parts[0])] = parts[1]
    return [names[i] for i in range(max(names) + 1)]


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a WordNet gloss into its definition and its quoted example sentences.

    >>> split_gloss('a member of the genus Canis; "the dog barked all night"')
    ('a member of the genus Canis', ['the dog barked all night'])
    """
    m = re.search(r'(?:^|;\s*)"', gloss)  # examples start at the first quote that opens a "; ..." part
    if m is None:
        return gloss.strip(" ;"), []
    definition, rest = gloss[: m.start()].strip(" ;"), gloss[m.start() :]
    examples = [e.strip() for e in re.findall(r'"([^"]*)"', rest)]
    if not examples:  # an unbalanced quote: keep the remainder as one example rather than lose it
        examples = [rest.strip(' ;"')]
    return definition, [e for e in examples if any(ch.isalnum() for ch in e)]  # drop stray ";" fragments


def parse_line(line: str, pos: str, lexnames: list[str]) -> dict:
    """Parse one synset line of a data.* file (wndb(5WN)) into a raw record with pointer lists."""
    body, _, gloss = line.partition(" | ")
    f = body.split()
    offset, lex_filenum = f[0], int(f[1])
    w_cnt = int(f[3], 16)
    lemmas = []
    for i in range(w_cnt):
        word = ADJ_MARKER.sub("", f[4 + 2 * i])
        if word not in lemmas:  # the same lemma can repeat with another lex_id
            lemmas.append(word)
    j = 4 + 2 * w_cnt
    p_cnt = int(f[j])
    hypernyms, domains = [], []
    for k in range(p_cnt):
        symbol, target, tpos = f[j + 1 + 4 * k], f[j + 2 + 4 * k], f[j + 3 + 4 * k]
        key = ("a" if tpos == "s" else tpos) + target
        if symbol in HYPERNYM:
            hypernyms.append(key)
        elif symbol == DOMAIN_TOPIC and key not in domains:
            domains.append(key)
    definition, examples = split_gloss(gloss.strip())
    return {
        "id": pos + offset,
        "pos": pos,
        "lemmas": lemmas,
        "gloss": definition,
        "examples": examples,
        "lexname": lexnames[lex_filenum],
        "_hypernyms": hypernyms,
        "_domains": domains,
    }


def read_synsets(wn_dir: Path) -> dict[str, dict]:
    """All synsets of the four data files, keyed by id, in output order (pos n, v, a, r; then offset)."""
    lexnames = read_lexnames(wn_dir)
    synsets: dict[str, dict] = {}
    for pos, name in DATA_FILES:
        path = wn_dir / name
        if not path.exists():
            sys.exit(
                f"error: {path} not found: install WordNet 3.0 (apt-get install wordnet-base) or pass --wordnet-dir"
            )
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("  "):  # the license header lines start with two spaces
                    continue
                rec = parse_line(line.rstrip("\n"), pos, lexnames)
                synsets[rec["id"]] = rec
    return dict(sorted(synsets.items(), key=lambda kv: ("nvar".index(kv[0][0]), kv[0][1:])))


def add_derived(synsets: dict[str, dict]) -> None:
    """Fill domains, domains_direct, hypernym_path and text on every record (in place)."""

    def name(key: str) -> str:
        return synsets[key]["lemmas"][0]

    inherited: dict[str, frozenset[str]] = {}

    def domains_of(key: str, seen: frozenset[str] = frozenset()) -> frozenset[str]:
        # Direct topic domains plus those of every hypernym ancestor (all "@"/"@i" branches), memoised.
        if key in inherited:
            return inherited[key]
        rec = synsets[key]
        out = {name(d) for d in rec["_domains"]}
        for h in rec["_hypernyms"]:
            if (
                h not in seen
            ):  # WordNet's hypernym graph is acyclic; the guard only protects against bad input
                out |= domains_of(h, seen | {key})
        inherited[key] = frozenset(out)
        return inherited[key]

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for key, rec in synsets.items():
        rec["domains_direct"] = sorted({name(d) for d in rec["_domains"]})
        rec["domains"] = sorted(domains_of(key))
        path, cur = [name(key)], key
        while synsets[cur]["_hypernyms"] and len(path) < 100:
            cur = synsets[cur]["_hypernyms"][0]
            path.append(name(cur))
        rec["hypernym_path"] = path[::-1]
        text = ", ".join(w.replace("_", " ") for w in rec["lemmas"]) + ": " + rec["gloss"]
        if rec["examples"]:
            text += "; " + "; ".join(f'"{e}"' for e in rec["examples"])
        rec["text"] = text
    for rec in synsets.values():
        del rec["_hypernyms"], rec["_domains"]


def write_jsonl_gz(records: list[dict], out: Path) -> int:
    """Write records as gzip'd JSON lines, deterministically (mtime=0, no name in the header); return bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for rec in records:
            gz.write((json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)
    return len(buf.getvalue())


def license_text(wn_dir: Path) -> str:
    """The Princeton WordNet 3.0 license, from Debian's copyright file, else from data.noun's header."""
    copyright_file = Path("/usr/share/doc/wordnet-base/copyright")
    if copyright_file.exists():
        m = re.search(
            r"^License: WordNet3\.0\n((?: .*\n?)+)", copyright_file.read_text(encoding="utf-8"), re.M
        )
        if m:
            lines = [ln[1:] for ln in m.group(1).splitlines()]
            return "\n".join("" if ln == "." else ln.rstrip() for ln in lines).strip() + "\n"
    header = []
    with open(wn_dir / "data.noun", encoding="utf-8") as fh:
        for line in fh:
            if not line.startswith("  "):
                break
            header.append(line.split(" ", 3)[3].rstrip() if len(line.split(" ", 3)) > 3 else "")
    return "\n".join(header).strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wordnet-dir",
        type=Path,
        default=None,
        help="directory with data.noun etc. (default: via dpkg -L wordnet-base, else /usr/share/wordnet)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=PACKAGE_DATA / "wordnet.jsonl.gz",
        help="output .jsonl.gz (default: featuretree/data/wordnet.jsonl.gz)",
    )
    parser.add_argument(
        "--license-out",
        type=Path,
        default=None,
        help="where to write the WordNet license (default: WORDNET_LICENSE beside --out)",
    )
    args = parser.parse_args(argv)
    wn_dir = args.wordnet_dir or default_wordnet_dir()

    synsets = read_synsets(wn_dir)
    add_derived(synsets)
    records = list(synsets.values())
    size = write_jsonl_gz(records, args.out)
    license_out = args.license_out or args.out.parent / "WORDNET_LICENSE"
    license_out.write_text(license_text(wn_dir), encoding="utf-8")

    n_words = sum(len(r["text"].split()) for r in records)
    print(
        f"{len(records)} synsets, ~{n_words} words (~{round(n_words * 1.3)} tokens), "
        f"{size / 1e6:.2f} MB -> {args.out} (license -> {license_out})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
