"""`featuretree serve`'s API through FastAPI's TestClient: the layout it sends matches the static page's data,
children come largest first, search ranks as the page does, unknown nodes and paths outside the run are
refused, and a job runs the CLI's arguments in a subprocess, reports progress, and reloads the run."""

from __future__ import annotations

import json
import sys
import time

import networkx as nx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from featuretree.explore import explorer_data  # noqa: E402
from featuretree.export import save  # noqa: E402
from featuretree.serve import make_app  # noqa: E402
from featuretree.tree import FeatureTree  # noqa: E402

XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"


def planted(n_top: int = 4, n_kids: int = 5, n_grand: int = 3) -> nx.DiGraph:
    """A known hierarchy: top t fires at 0.2/(t+1); child c of t at (top freq)/(c+2); grandchildren in a refined rung."""
    g = nx.DiGraph(rungs=["w8", "w64"])
    for t in range(n_top):
        top = f"w8/{t}"
        g.add_node(top, rung="w8", width=8, index=t, freq=0.2 / (t + 1), label=f"topic {t}", top_words=[f"word{t}"],
                   context_acts=[[["a ", 0.0], [f"tok{t}", 2.0]]], act_hist=[2.0, [3, 1, 0, 1]])
        for c in range(n_kids):
            kid = f"w64/{t * n_kids + c}"
            g.add_node(kid, rung="w64", width=64, index=t * n_kids + c, freq=0.2 / (t + 1) / (c + 2),
                       label=f"topic {t} part {c}", top_words=[], words=["birds"] if c == 1 else [])
            g.add_edge(top, kid, coverage=0.9, reverse=0.3, cos=0.5, kind="split")
    for j in range(n_grand):
        n = f"w64/0/r4/{j}"
        g.add_node(n, rung="w64/0/r4", width=4, index=j, freq=0.01 / (j + 1), refined=True, label=f"refined {j}")
        g.add_edge("w64/0", n, coverage=1.0, reverse=0.4, cos=0.2, kind="split", refined=True)
    g.nodes["w64/3"]["label"] = XSS
    return g


@pytest.fixture
def run(tmp_path):
    path = save(FeatureTree(planted()), tmp_path / "run")
    (path / "notes.txt").write_text("inside the run")
    (tmp_path / "secret.txt").write_text("SECRET")
    return path


def test_layout_and_children_match_the_static_page(run):
    client = TestClient(make_app(run))
    meta = client.get("/api/meta").json()
    static = explorer_data(planted(), nodes=False)
    assert meta["n"] == len(static["ids"]) == 4 + 20 + 3
    assert [r["id"] for r in meta["tops"]] == ["w8/0", "w8/1", "w8/2", "w8/3"]  # largest first
    at = {n: i for i, n in enumerate(static["ids"])}
    for r in meta["tops"]:
        assert (r["v"], r["c"], r["col"], r["p"]) == (static["values"][at[r["id"]]], static["counts"][at[r["id"]]],
                                                      static["colors"][at[r["id"]]], "")
    assert meta["tops"][0]["nk"] == 5 and meta["tops"][0]["c"] == 1 + 5 + 3
    kids = client.post("/api/kids", json={"ids": ["w8/1", "w64/0"]}).json()["kids"]
    assert [r["id"] for r in kids["w8/1"]] == [f"w64/{5 + c}" for c in range(5)]  # freq falls with c
    assert [r["p"] for r in kids["w8/1"]] == ["w8/1"] * 5
    assert [r["id"] for r in kids["w64/0"]] == ["w64/0/r4/0", "w64/0/r4/1", "w64/0/r4/2"]
    assert kids["w64/0"][0]["f"]["rung"] == "w64/0/r4" and "contexts" not in kids["w64/0"][0]["f"]  # brief
    chain = client.get("/api/chain", params={"id": "w64/0/r4/2"}).json()["chain"]
    assert [r["id"] for r in chain] == ["w8/0", "w64/0", "w64/0/r4/2"]
    card = client.get("/api/card", params={"id": "w8/0"}).json()["facts"]
    assert card["contexts"] == [[["a ", 0.0], ["tok0", 2.0]]] and card["hist"] == [2.0, [3, 1, 0, 1]]
    assert client.get("/api/card", params={"id": "w64/3"}).json()["facts"]["label"] == XSS  # text, as JSON


def test_search_ranks_like_the_page_and_bad_requests_are_refused(run):
    client = TestClient(make_app(run))
    hits = [h["id"] for h in client.get("/api/search", params={"q": "topic 1 part"}).json()["hits"]]
    assert hits[:5] == [f"w64/{5 + c}" for c in range(5)]  # the phrase in the label; most frequent first
    assert "w64/1" in hits[5:]  # "topic 0 part 1": every word, not the phrase
    hits = [h["id"] for h in client.get("/api/search", params={"q": "birds"}).json()["hits"]]
    assert hits == [f"w64/{t * 5 + 1}" for t in range(4)]  # in the words only
    assert client.get("/api/search", params={"q": "w8/2"}).json()["hits"][0]["id"] == "w8/2"  # the id first
    assert client.get("/api/search", params={"q": "x"}).json()["hits"] == []
    for url in ("/api/card?id=w999/1", "/api/chain?id=nope"):
        r = client.get(url)
        assert r.status_code == 400 and "unknown node" in r.json()["detail"]
    assert client.post("/api/kids", json={"ids": ["w8/0", "w9/9"]}).status_code == 400
    assert client.get("/run/notes.txt").text == "inside the run"
    for bad in ("/run/../secret.txt", "/run/%2e%2e/secret.txt", "/run/..%2fsecret.txt", "/run//etc/passwd"):
        r = client.get(bad)
        assert r.status_code in (403, 404) and "SECRET" not in r.text, (bad, r.status_code)
    assert client.get("/run/%2e%2e/secret.txt").status_code == 403
    assert client.get("/run/nothing.txt").status_code == 404
    assert client.post("/api/jobs", json={"kind": "rm"}).status_code == 400
    assert client.post("/api/jobs", json={"kind": "find", "query": "  "}).status_code == 400
    assert client.post("/api/jobs", json={"kind": "refine", "node": "w1/1"}).status_code == 400
    assert client.post("/api/jobs", json={"kind": "search", "query": "a", "width": "64; rm"}).status_code == 400
    page = client.get("/").text
    assert "featuretreeServed = true" in page and XSS not in page  # the page carries no node text at all


STUB = r'''
import json, sys, time
args = sys.argv[1:]
kind, rest = args[0], args[1:]
dash = rest.index("--")
opts, (run, what) = rest[:dash], rest[dash + 1:]
for i in range(3):
    sys.stderr.write(f"\r{kind} step {i + 1}/3"); sys.stderr.flush(); time.sleep(0.05)
sys.stderr.write("\n")
if what == "fail":
    sys.stderr.write("featuretree: error: nothing fires on 'fail'\n"); sys.exit(2)
if kind == "find":
    json.dump({"hits": [{"node": "w64/6", "score": 2.5, "label": "topic 1 part 1"}]}, open(opts[1], "w"))
elif kind == "search":
    # what a real search saves: a refined child under the last node of the path
    from featuretree.export import load, save
    tree = load(run); g = tree.graph
    g.add_node("w64/6/r4/0", rung="w64/6/r4", width=4, index=0, freq=0.001, refined=True, label="found it")
    g.add_edge("w64/6", "w64/6/r4/0", coverage=1.0, reverse=0.2, cos=0.1, kind="split", refined=True)
    save(tree, run)
    json.dump({"path": [{"node": n} for n in ("w8/1", "w64/6", "w64/6/r4/0")], "saved": run}, open(opts[1], "w"))
'''


def _wait(client, jid, timeout=30.0):
    end = time.monotonic() + timeout
    while True:
        j = client.get(f"/api/jobs/{jid}").json()
        if j["state"] != "running" or time.monotonic() > end:
            return j
        time.sleep(0.05)


def test_jobs_run_the_cli_arguments_report_progress_and_reload_the_run(run, tmp_path):
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    seen = []

    def command(args):
        seen.append(args)
        return [sys.executable, str(stub), *args]

    app = make_app(run, command=command)
    client = TestClient(app)
    j = client.post("/api/jobs", json={"kind": "find", "query": "-rf birds"}).json()
    assert seen[-1][:2] == ["find", "--json"] and seen[-1][-3:] == ["--", str(run.resolve()), "-rf birds"]
    busy = client.post("/api/jobs", json={"kind": "find", "query": "other"})
    done = _wait(client, j["id"])
    assert busy.status_code in (200, 409)  # 409 while the first still runs (it may already have finished)
    assert done["state"] == "done" and done["result"][0]["node"] == "w64/6", done
    assert "find step 3/3" in done["lines"]
    failed = _wait(client, client.post("/api/jobs", json={"kind": "find", "query": "fail"}).json()["id"])
    assert failed["state"] == "failed" and failed["error"] == "featuretree: error: nothing fires on 'fail'"

    version = client.get("/api/meta").json()["version"]
    s = _wait(client, client.post("/api/jobs", json={"kind": "search", "query": "birds", "start": "w8/1",
                                                     "width": 4}).json()["id"])
    assert s["state"] == "done" and s["select"] == "w64/6/r4/0", s
    assert ["--start", "w8/1"] == seen[-1][seen[-1].index("--start"):seen[-1].index("--start") + 2]
    meta = client.get("/api/meta").json()
    assert meta["version"] == version + 1 and meta["marked"] == ["w8/1", "w64/6", "w64/6/r4/0"]
    assert [r["id"] for r in client.post("/api/kids", json={"ids": ["w64/6"]}).json()["kids"]["w64/6"]] == ["w64/6/r4/0"]
    assert json.loads((run / "tree.json").read_text())["nodes"]  # the run itself holds the new node

