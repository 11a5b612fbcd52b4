"""examples/ run on a reduced setting (the embedded model and the bundled corpus)."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_writes_a_tree(tmp_path, monkeypatch, capsys):
    out = tmp_path / "quick"
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--n-tokens", "6000", "--widths", "32,128", "--k", "8",
                                      "--epochs", "1", "--out", str(out)])
    ns = runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="not_main")
    tree = ns["main"]()
    assert tree.rungs == ["w32", "w128"]
    assert (out / "tree.json").is_file() and (out / "sunburst.html").is_file()
    printed = capsys.readouterr().out
    assert "FVU" in printed and "most frequent root" in printed
