"""The built wheel is self-contained: it ships the bundled corpus, the C++ kernels and the PEP 561 marker,
and a non-editable install of it runs `featuretree build` on the defaults from outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("featuretree/data/wordnet.jsonl.gz", "featuretree/data/WORDNET_LICENSE", "featuretree/py.typed",
           "featuretree/_topk.cpp")
# Not needed to build the wheel, and some are large or are build outputs a stale copy of which could leak in
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".ruff_cache", "benchmarks", "docs", "examples", "tests")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the checkout, built from a copy of it (no build/ or egg-info left in the checkout)."""
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not a source checkout: no pyproject.toml to build")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    # no build isolation: the venv's setuptools (and wheel, from the dev extra) build it, offline
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", str(tmp / "dist")], timeout=300)
    (whl,) = (tmp / "dist").glob("featuretree-*.whl")
    return whl


def test_wheel_ships_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SHIPPED:
        assert name in names, f"{name} missing from {wheel.name}"
    assert not any(n.startswith(("data/", "tests/")) for n in names), "files outside the package in the wheel"
    with zipfile.ZipFile(wheel) as z:  # the corpus is the real file, not a Git LFS pointer or a stub
        assert z.read("featuretree/data/wordnet.jsonl.gz") == (ROOT / SHIPPED[0]).read_bytes()


@pytest.mark.slow
def test_installed_wheel_builds_the_defaults_outside_the_checkout(wheel, tmp_path):
    """pip install the wheel (non-editable) into a fresh venv, then `featuretree build` with the embedded
    MiniLM and the bundled WordNet from a cwd outside the checkout."""
    t0 = time.perf_counter()
    venv = tmp_path / "v"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], timeout=300)
    # The dependencies (torch, nnsight, the embedded model, ...) come from this venv, through a .pth line: a
    # directory named in a .pth file is put on sys.path, but the .pth files inside it are not processed, so
    # this venv's editable featuretree (an __editable__*.pth finder) stays off and the wheel is what imports.
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    parents = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_featuretree_test_deps.pth").write_text("".join(f"{p}\n" for p in parents))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "FEATURETREE_DATA")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    where = _run([str(py), "-c", "import featuretree, featuretree.corpus as c; "
                  "print(featuretree.__file__); print(c.data_dir()); print(featuretree.__version__)"],
                 cwd=tmp_path, env=env, timeout=120).stdout.split("\n")
    module, data, version = Path(where[0]), Path(where[1]), where[2]
    assert module.is_relative_to(site) and not module.is_relative_to(ROOT), module
    assert data == site / "featuretree" / "data" and (data / "wordnet.jsonl.gz").is_file(), data
    assert version != "0+unknown", version

    run = tmp_path / "run"
    _run([str(venv / "bin" / "featuretree"), "-q", "build", "--out", str(run), "--n-tokens", "3000",
          "--widths", "16,32", "--k", "4", "--epochs", "1"], cwd=tmp_path, env=env, timeout=600)
    assert (run / "tree.json").is_file() and (run / "sunburst.html").is_file()
    print(f"wheel install + default build: {time.perf_counter() - t0:.1f}s")  # noqa: T201
