"""CLI end to end on the embedded model and a tiny corpus: build, export, info, errors as one line + exit 2."""

import json

import networkx as nx
import pytest

from featuretree import load, save
from featuretree.__main__ import main

TEXTS = [
    "the dog barked at the cat all night", "a small bird sang in the tall oak tree",
    "the doctor treated the patient for a fever", "the court ruled that the contract was void",
    "a computer program sorts the list of numbers", "the river flows into the sea near the town",
    "the farmer planted wheat and corn in spring", "an eagle is a large bird of prey",
    "the lawyer filed an appeal with the judge", "the nurse gave the child a vaccine",
] * 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(f"{t} ({i})" for i, t in enumerate(TEXTS)) + "\n")
    out = d / "run"
    code = main(["-q", "build", "--corpus", str(corpus), "--n-tokens", "700", "--widths", "16,64", "--k", "4",
                 "--epochs", "2", "--batch-size", "128", "--out", str(out)])
    assert code == 0
    return out


def test_build_writes_a_complete_run(run_dir):
    for name in ("config.json", "tree.json", "sunburst.html", "acts/meta.json", "saes/w16/cfg.json",
                 "saes/w64/sae_weights.safetensors", "saes/w64/cfg.json"):
        assert (run_dir / name).is_file(), name
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["widths"] == [16, 64] and cfg["k"] == 4
    html = (run_dir / "sunburst.html").read_text()
    assert "sunburst" in html and len(html) > 1_000_000  # plotly.js inlined: opens offline
    tree = load(run_dir)
    assert tree.rungs == ["w16", "w64"]
    labels = [d["label"] for _, d in tree.graph.nodes(data=True)]
    assert any(not lab.startswith("w") for lab in labels)  # real token labels, not ids
    contexts = [c for _, d in tree.graph.nodes(data=True) for c in d["top_contexts"]]
    assert contexts and all("«" in c and "»" in c for c in contexts)
    assert tree.graph.number_of_edges() > 0
    for _, _, e in tree.graph.edges(data=True):
        assert {"cos", "coverage", "kind"} <= set(e)
    for rung in tree.rungs:
        assert {"fvu", "l0", "dead_fraction"} <= set(tree.saes[rung].metrics)


def test_save_load_roundtrip_gives_equal_graph(run_dir, tmp_path):
    tree = load(run_dir)
    save(tree, tmp_path / "copy")
    back = load(tmp_path / "copy")
    assert nx.utils.graphs_equal(tree.graph, back.graph)
    assert dict(tree.graph.nodes(data=True)) == dict(back.graph.nodes(data=True))
    assert back.config == tree.config


def test_export_and_info(run_dir, tmp_path, capsys):
    html, gml, csv = tmp_path / "t.html", tmp_path / "t.graphml", tmp_path / "t.csv"
    assert main(["-q", "export", str(run_dir), "--html", str(html), "--graphml", str(gml), "--csv", str(csv)]) == 0
    assert html.stat().st_size > 1_000_000 and gml.is_file() and csv.read_text().startswith("node,")
    assert main(["-q", "info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "w16" in out and "FVU" in out


def test_rebuild_reuses_harvest_only_for_the_same_recipe(run_dir, capsys):
    corpus = str(run_dir.parent / "corpus.txt")
    meta = run_dir / "acts" / "meta.json"
    before = meta.stat().st_mtime_ns
    other = ["-q", "build", "--corpus", corpus, "--n-tokens", "700", "--widths", "16,32", "--k", "4",
             "--epochs", "1", "--batch-size", "128", "--out", str(run_dir)]
    assert main(other) == 2  # a run of other settings is not replaced by mistake
    assert "holds a run with other settings (widths [16, 64] -> [16, 32], epochs 2 -> 1)" in capsys.readouterr().err
    assert main([*other, "--force"]) == 0
    assert meta.stat().st_mtime_ns == before  # same harvest recipe: the store is reused
    assert load(run_dir).rungs == ["w16", "w32"]
    assert main(["-q", "build", "--corpus", corpus, "--layer", "2", "--n-tokens", "700", "--widths", "16,32",
                 "--k", "4", "--epochs", "1", "--batch-size", "128", "--out", str(run_dir), "--force"]) == 0
    assert meta.stat().st_mtime_ns != before  # another layer: harvested again
    assert json.loads(meta.read_text())["layer"] == 2
    same = ["-q", "build", "--corpus", corpus, "--layer", "2", "--n-tokens", "700", "--widths", "16,32", "--k", "4",
            "--epochs", "1", "--batch-size", "128", "--out", str(run_dir)]
    tree_file = run_dir / "tree.json"
    done = tree_file.stat().st_mtime_ns
    assert main(same) == 0 and tree_file.stat().st_mtime_ns == done  # the same settings: the finished run is loaded
    assert main([*same, "--force"]) == 0 and tree_file.stat().st_mtime_ns != done  # --force trains anew


@pytest.mark.parametrize("argv, needle", [
    (["build", "--widths", "64,16", "--out", "{tmp}/a"], "strictly increasing"),
    (["build", "--k", "32", "--widths", "16,64", "--out", "{tmp}/b"], "below the narrowest"),
    (["build", "--layer", "9", "--corpus", "{corpus}", "--out", "{tmp}/c"], "out of range"),
    (["build", "--model", "no-such-org/no-such-model", "--corpus", "{corpus}", "--out", "{tmp}/d"], "no-such-model"),
    (["build", "--corpus", "{tmp}/missing.txt", "--out", "{tmp}/e"], "missing.txt"),
    (["export", "{tmp}/no-run", "--html", "{tmp}/x.html"], "no-run"),
    (["info", "{tmp}/no-run"], "no-run"),
])
def test_user_mistakes_are_one_line_exit_2(argv, needle, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("one short line\nanother short line\n")
    argv = [a.format(tmp=tmp_path, corpus=corpus) for a in argv]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("featuretree: error:") and "\n" not in err and needle in err, err
    assert "Traceback" not in err


def test_help_is_useful(capsys):
    with pytest.raises(SystemExit) as e:
        main(["build", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--layer", "--corpus", "--widths", "--k", "--n-tokens", "--out"):
        assert flag in out
    assert main([]) == 2


def test_find_cli_ranks_nodes_and_looks_phrases_up_in_the_corpus(run_dir, capsys):
    from featuretree.find import find

    assert main(["-q", "find", str(run_dir), "cat", "--top", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["node", "score", "query_rate"] and len(lines) == 6
    hits = find(load(run_dir), "cat", top=None)
    assert hits.iloc[0].query_rate > hits.iloc[0].freq  # the best node fires more on "cat" than usual
    assert lines[1].split()[0] == hits.iloc[0].node
    assert main(["-q", "find", "/no/such/run", "cat"]) == 2


def test_refine_search_and_explorer_from_the_cli(run_dir, tmp_path, capsys):
    tree = load(run_dir)
    node = max(tree.roots(), key=lambda n: tree.graph.nodes[n]["freq"])
    out, page = tmp_path / "refined", tmp_path / "refined.html"
    small = ["--width", "8", "--k", "1", "--min-tokens", "10", "--stream-tokens", "0"]
    assert main(["-q", "refine", str(run_dir), node, *small, "--out", str(out), "--html", str(page)]) == 0
    printed = capsys.readouterr().out
    deep = load(out)
    kids = [c for c in deep.graph.successors(node) if deep.graph.nodes[c].get("refined")]
    assert kids and all(c in printed for c in kids) and f"saved {out}/" in printed
    assert (out / "sunburst.html").is_file() and "ft-panel" in page.read_text(encoding="utf-8")
    from featuretree.explore import read_explorer_data

    saved = read_explorer_data(out / "sunburst.html")  # the refined run's page is the explorer, refined nodes in it
    assert set(kids) <= set(saved["ids"]) and saved["run"] == str(out)
    assert not any("/r8" in r for r in load(run_dir).saes)  # with --out the run itself is untouched
    assert main(["-q", "info", str(out)]) == 0
    assert f"+ 1 refined dictionaries under 1 nodes ({len(kids)} refined features)" in capsys.readouterr().out

    explorer = tmp_path / "explorer.html"
    assert main(["-q", "export", str(out), "--explorer", str(explorer), "--kind", "icicle", "--root", node]) == 0
    from featuretree.explore import read_explorer_data

    assert read_explorer_data(explorer)["kind"] == "icicle"
    capsys.readouterr()

    assert main(["-q", "search", str(run_dir), "bird", *small, "--max-depth", "3", "--out", str(tmp_path / "s")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = lines[0].split()
    assert header[:7] == ["step", "node", "score", "coverage", "precision", "confidence", "label"], lines
    assert header[7:] in ([], ["passed"]), lines  # the nodes passed over on the way, when there are any
    assert len(lines) >= 2
    assert main(["-q", "refine", str(run_dir), "w16/999"]) == 2
    assert "unknown node 'w16/999'" in capsys.readouterr().err


# List flags take "a,b,c", "a b c" or a mix (parsed only: nothing is built)


def _config(argv):
    from featuretree import Config
    from featuretree.__main__ import make_parser

    return Config.from_args(make_parser().parse_args(argv))


@pytest.mark.parametrize("widths", [["16", "32", "64"], ["16,32", "64"], ["16", "32,64"], ["16, 32,", "64"]])
def test_list_flags_take_spaces_commas_or_both(widths):
    comma = _config(["build", "--widths", "16,32,64", "--k", "4", "--out", "x"])
    spaced = _config(["build", "--widths", *widths, "--k", "4", "--out", "x"])
    assert spaced == comma and spaced.widths == (16, 32, 64)
    assert _config(["build", "--k", "4", "--widths", *widths]) == comma  # the last flag: nothing follows it


def test_list_flags_leave_positionals_alone(capsys):
    from featuretree.__main__ import make_parser

    p = make_parser()
    args = p.parse_args(["train", "store", "--widths", "16", "32", "--out", "o"])  # positional before the list
    assert args.store == "store" and tuple(args.widths) == (16, 32)
    args = p.parse_args(["train", "--out", "o", "--widths", "16", "32", "--", "store"])  # -- ends the list
    assert args.store == "store" and tuple(args.widths) == (16, 32)
    args = p.parse_args(["search", "run", "big", "cat", "--max-depth", "2"])  # nargs="+" positionals as before
    assert args.run == "run" and args.query == ["big", "cat"]
    for widths in (["16", "32"], ["16,32"]):  # a list flag takes every word up to the next flag, so it
        with pytest.raises(SystemExit) as e:  # swallows a positional after it: the message says what to do
            p.parse_args(["train", "--widths", *widths, "store", "--out", "o"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "'store' is not an integer" in err and "put positional arguments before it" in err


def test_hand_written_list_flags_take_both_forms():
    from featuretree.__main__ import make_parser

    p = make_parser()
    a = p.parse_args(["eval", "refine", "run", "--nodes", "w512/1,w128/2", "w16/3", "--widths", "8", "16",
                      "--ks", "1,2", "--seeds", "3"])
    assert list(a.nodes) == ["w512/1", "w128/2", "w16/3"] and list(a.widths) == [8, 16]
    assert list(a.ks) == [1, 2] and list(a.seeds) == [3] and a.run == ["run"]  # nargs="*": `eval senses` takes several runs
    b = p.parse_args(["eval", "planted", "--configs", "wide-8x5x2", "forest-12x3x3", "--seeds", "0,1", "2"])
    assert list(b.configs) == ["wide-8x5x2", "forest-12x3x3"] and list(b.seeds) == [0, 1, 2]
    d = p.parse_args(["eval", "planted"])
    assert d.configs is None and list(d.seeds) == [0, 1, 2] and list(d.widths) == [32, 64]


def test_build_layers_harvests_once_and_builds_a_run_per_layer(run_dir, tmp_path, capsys):
    """--layers 1 3: one harvest pass, two runs whose stores equal single-layer harvests; `layers` links them."""
    corpus = str(run_dir.parent / "corpus.txt")
    base = ["-q", "build", "--corpus", corpus, "--n-tokens", "700", "--widths", "16,32", "--k", "4", "--epochs", "1",
            "--batch-size", "128"]
    assert main([*base, "--layers", "1", "3", "--out", str(tmp_path / "multi")]) == 0
    assert "featuretree layers" in capsys.readouterr().out
    single = tmp_path / "single"
    assert main([*base, "--layer", "3", "--out", str(single)]) == 0
    info = [json.loads((d / "acts" / "meta.json").read_text())["shard_info"] for d in (tmp_path / "multi" / "L3", single)]
    assert info[0] == info[1]  # the same bytes as a harvest of layer 3 alone
    assert load(tmp_path / "multi" / "L1").config.layer == 1
    assert main(["layers", str(tmp_path / "multi" / "L1"), str(tmp_path / "multi" / "L3")]) == 0
    assert "L1 -> L3:" in capsys.readouterr().out
    for bad, needle in ((["3", "1"], "strictly increasing"), (["2", "9"], "out of range")):
        assert main([*base, "--layers", *bad, "--out", str(tmp_path / "bad")]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "bad" / "L3").exists()  # nothing written for a mistake
    import shutil as _shutil
    from unittest import mock

    tiny = _shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30 - 2**20, 2**20)  # 1 MiB free
    with mock.patch("featuretree.run.shutil.disk_usage", return_value=tiny):
        assert main([*base, "--layers", "1", "3", "--out", str(tmp_path / "full" / "x")]) == 2
    err = capsys.readouterr().err
    assert "2 layers of 700 tokens x" in err and "GiB free" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "full").exists()  # refused before anything was written


def test_serve_runs_real_find_and_refine_jobs_and_saves_into_the_run(run_dir, tmp_path):
    """The server's jobs are the CLI itself (`python -m featuretree ...` in a subprocess): find's JSON ranking equals
    ft.find's, and a refine saves its local dictionary into the run, which the server then reloads."""
    import shutil
    import time

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from featuretree.find import find
    from featuretree.serve import make_app

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    client = TestClient(make_app(run))

    def wait(job):
        end = time.monotonic() + 240
        while job["state"] == "running" and time.monotonic() < end:
            time.sleep(0.2)
            job = client.get(f"/api/jobs/{job['id']}").json()
        return job

    found = wait(client.post("/api/jobs", json={"kind": "find", "query": "cat"}).json())
    assert found["state"] == "done", found
    assert [r["node"] for r in found["result"]] == list(find(load(run), "cat").node)
    node = max(load(run).roots(), key=lambda n: load(run).graph.nodes[n]["freq"])
    before = client.get("/api/meta").json()["version"]
    refined = wait(client.post("/api/jobs", json={"kind": "refine", "node": node, "width": 8, "k": 1,
                                                      "min_tokens": 10}).json())
    assert refined["state"] == "done", refined["error"]
    assert any("refine" in line for line in refined["lines"])  # its log / progress reached the job
    kids = client.post("/api/kids", json={"ids": [node]}).json()["kids"][node]
    assert client.get("/api/meta").json()["version"] == before + 1
    assert kids and all(k["id"].startswith(f"{node}/r8/") for k in kids), kids  # the refined features, from disk
    assert any(r.startswith(f"{node}/r8") for r in load(run).saes)



def test_build_links_an_existing_mixed_ladder_without_training(run_dir, tmp_path, capsys):
    """`build --ladder`: a JumpReLU rung (the run's narrowest, with its firing thresholds) and its widest TopK are
    measured and linked, saved as they are, and load back with their architectures; nothing is trained."""
    import numpy as np
    import torch

    from featuretree.ladders import to_jumprelu

    tree = load(run_dir)  # (an earlier test may have rebuilt run_dir with other widths or another layer)
    narrow, wide = (lambda rs: (rs[0], rs[-1]))([r for r in tree.rungs if "/" not in r])
    sae = tree.saes[narrow]
    at = np.full(sae.width, 1e6, dtype=np.float32)
    for _, d in tree.graph.nodes(data=True):
        if d.get("rung") == narrow and d.get("fire_at") is not None:
            at[int(d["index"])] = d["fire_at"]
    jump = to_jumprelu(sae, torch.from_numpy(at)).save(tmp_path / "jump")
    out = tmp_path / "mixed"
    corpus = run_dir.parent / "corpus.txt"
    other = (tree.config.layer + 1) % 3
    assert main(["-q", "build", "--ladder", str(jump), str(run_dir / "saes" / wide), "--corpus", str(corpus),
                 "--layer", str(other), "--n-tokens", "700", "--out", str(out)]) == 2
    assert f"--layer {other}, but the dictionaries read" in capsys.readouterr().err and not out.exists()
    # no --layer: the dictionaries' own files say which block they read (their hook_name)
    assert main(["-q", "build", "--ladder", str(jump), str(run_dir / "saes" / wide), "--corpus", str(corpus),
                 "--n-tokens", "700", "--out", str(out)]) == 0
    mixed = load(out)
    assert mixed.config.layer == tree.config.layer
    assert {r: type(s).__name__ for r, s in mixed.saes.items()} == {narrow: "ThresholdSAE", wide: "TopKSAE"}
    assert torch.equal(mixed.saes[wide].W_dec, tree.saes[wide].W_dec)  # not retrained
    assert mixed.saes[narrow].metrics["l0"] > 0 and 0 < mixed.saes[wide].metrics["fvu"] < 1
    assert any(mixed.graph.nodes[c]["rung"] == wide and p.startswith(f"{narrow}/") for p, c in mixed.graph.edges)
    assert not (out / "ckpt").exists()
    capsys.readouterr()
    assert main(["-q", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert f"{narrow:<10} FVU" in info and "(jumprelu)" in info and f"layer {tree.config.layer})" in info
    # find and refine under a JumpReLU node: the local dictionary (TopK) trains on where the JumpReLU feature fires
    import featuretree as ft

    node = max((n for n, d in mixed.graph.nodes(data=True) if d.get("rung") == narrow), key=lambda n: mixed.graph.nodes[n]["freq"])
    deep = ft.refine(mixed, node, width=8, depth=1, k=2, min_tokens=20)
    kids = [c for c in deep.graph.successors(node) if c.startswith(f"{node}/r8/")]
    assert kids and type(deep.saes[f"{node}/r8"]).__name__ == "TopKSAE"
    hits = ft.find(deep, mixed.graph.nodes[node]["label"].split(" ")[0])
    assert len(hits) and hits.node.iloc[0] in deep.graph
