"""Fault tests: `featuretree build` / `refine` killed with SIGKILL mid-harvest, mid-training, mid-refinement and at
random moments, then rerun with the same command, end with the same tree.json, byte for byte, as runs never
killed; damaged files are detected and recomputed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

_BUILD = ["-q", "build", "--n-tokens", "4000", "--widths", "16,64", "--k", "4", "--epochs", "6", "--batch-size", "64",
         "--shard-size", "400", "--checkpoint-every", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def featuretree(*args: str) -> list[str]:
    return [sys.executable, "-m", "featuretree", *args]


def run_to_end(cmd: list[str]) -> None:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_when(cmd: list[str], ready, what: str, timeout: float = 300, may_finish: bool = False) -> None:
    """Start `cmd`, SIGKILL its process group the moment `ready()` holds; fail if it ends first (unless
    `may_finish`)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return
            if proc.poll() is not None:
                if may_finish and proc.returncode == 0:
                    return
                pytest.fail(f"the run ended before it could be killed {what}: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.005)
        pytest.fail(f"never reached the point to kill it {what}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def stage(run: Path) -> str | None:
    try:
        return json.loads((run / "run.json").read_text())["stage"]
    except (OSError, ValueError, KeyError):
        return None


def n_shards_done(run: Path) -> int:
    try:
        return len(json.loads((run / "acts" / "progress.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def BUILD(tmp_path_factory) -> list[str]:
    """The build command, on 1,500 WordNet glosses in a text file (loads faster than the whole corpus)."""
    from featuretree.corpus import load_corpus

    corpus = tmp_path_factory.mktemp("corpus") / "glosses.txt"
    corpus.write_text("\n".join(load_corpus("wordnet", limit=1500).texts) + "\n", encoding="utf-8")
    return [*_BUILD, "--corpus", str(corpus)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, BUILD) -> Path:
    run = tmp_path_factory.mktemp("faults") / "never-killed"
    start = time.monotonic()
    run_to_end(featuretree(*BUILD, "--out", str(run)))
    DURATION.append(time.monotonic() - start)
    return run


DURATION: list[float] = []  # seconds the never-killed run took


@pytest.fixture(scope="module")
def reference(reference_run) -> bytes:
    return (reference_run / "tree.json").read_bytes()


def no_temp_files(run: Path) -> bool:
    return not [p for p in run.rglob(".*.tmp")]


def test_killed_mid_harvest_resumes_to_the_same_tree(BUILD, reference, tmp_path):
    """Also the determinism check: this second process harvests the rest, trains and links from scratch,
    and its tree.json must equal the first process's byte for byte (same seed, inputs and threads)."""
    run = tmp_path / "run"
    kill_when(featuretree(*BUILD, "--out", str(run)), lambda: n_shards_done(run) >= 3, "mid-harvest")
    assert stage(run) == "harvest" and not (run / "acts" / "meta.json").exists()
    run_to_end(featuretree(*BUILD, "--out", str(run)))
    assert (run / "tree.json").read_bytes() == reference
    assert no_temp_files(run)  # a write the kill cut short leaves a temp file; the next run clears it


def test_killed_mid_training_resumes_to_the_same_tree(BUILD, reference, tmp_path):
    run = tmp_path / "run"
    ckpt = run / "ckpt" / "train.safetensors"
    kill_when(featuretree(*BUILD, "--out", str(run)), lambda: ckpt.is_file() and stage(run) == "train", "mid-training")
    assert stage(run) == "train" and not (run / "tree.json").exists()
    from featuretree import FeatureTreeError, load

    with pytest.raises(FeatureTreeError, match="unfinished run .*stage 'train'.*rerun the same"):
        load(run)  # nothing half-made can be loaded
    run_to_end(featuretree(*BUILD, "--out", str(run)))
    assert (run / "tree.json").read_bytes() == reference
    assert not (run / "ckpt").exists()


def test_killed_at_random_moments_resumes_to_the_same_tree(BUILD, reference, tmp_path):
    run = tmp_path / "run"
    rng = random.Random(7)
    for _ in range(1):
        delay = rng.uniform(0.1, 0.95) * DURATION[0]  # anywhere in start-up, harvest, training, linking
        start = time.monotonic()
        kill_when(featuretree(*BUILD, "--out", str(run)), lambda d=delay, s=start: time.monotonic() - s > d,
                  f"after {delay:.1f} s", may_finish=True)
        if stage(run) == "done":
            break
    run_to_end(featuretree(*BUILD, "--out", str(run)))
    assert (run / "tree.json").read_bytes() == reference


def test_damaged_shard_and_dictionary_are_recomputed(BUILD, reference_run, reference, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    shard = run / "acts" / "shard_00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    info = json.loads((run / "run.json").read_text())
    info["stage"] = "link"  # as if killed after training: the saved ladder is reloaded ...
    (run / "run.json").write_text(json.dumps(info))
    weights = run / "saes" / "w64" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # ... and this one is damaged, so it is trained again
    (run / "tree.json").unlink()
    run_to_end(featuretree(*BUILD, "--out", str(run)))
    assert (run / "tree.json").read_bytes() == reference


REFINE = ["-q", "refine", "--width", "8", "--k", "1", "--depth", "2", "--min-tokens", "40", "--stream-tokens", "0"]


def _refine_target(run: Path) -> str:
    from featuretree import load

    tree = load(run)
    return max(tree.roots(), key=lambda n: tree.graph.nodes[n]["freq"])


def test_refine_killed_mid_way_resumes_to_the_same_tree(BUILD, reference_run, tmp_path):
    node = _refine_target(reference_run)
    once, killed = tmp_path / "once", tmp_path / "killed"
    run_to_end(featuretree(*REFINE, str(reference_run), node, "--out", str(once)))
    saes = killed / "ckpt" / "refine" / "saes"
    # killed once the region and the first local dictionaries are saved, before the refinement ends
    kill_when(featuretree(*REFINE, str(reference_run), node, "--out", str(killed)),
              lambda: saes.is_dir() and sum(1 for _ in saes.rglob("cfg.json")) >= 2, "mid-refinement")
    assert (killed / "ckpt" / "refine" / "region.safetensors").is_file() and not (killed / "tree.json").exists()
    run_to_end(featuretree(*REFINE, str(reference_run), node, "--out", str(killed)))
    assert (killed / "tree.json").read_bytes() == (once / "tree.json").read_bytes()
    assert not (killed / "ckpt" / "refine").exists()  # a finished refinement leaves no checkpoint to trip over
