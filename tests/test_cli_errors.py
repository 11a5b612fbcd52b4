"""Every row of docs/ERRORS.md: a bad input gives one line on stderr naming the problem and the fix, exit status 2,
no traceback, and leaves nothing behind that breaks the next (corrected) run."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import featuretree as ft
from featuretree import FeatureTreeError
from featuretree.__main__ import main
from featuretree.activations import Activations

TEXTS = ["the dog barked at the cat all night", "a small bird sang in the tall oak tree",
         "the doctor treated the patient for a fever", "the court ruled that the contract was void",
         "a computer program sorts the list of numbers", "the river flows into the sea near the town"] * 10
SMALL = ["--n-tokens", "600", "--widths", "8,32", "--k", "2", "--epochs", "1", "--batch-size", "128"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text("\n".join(f"{t} ({i})" for i, t in enumerate(TEXTS)) + "\n")
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["-q", "build", "--corpus", str(corpus), *SMALL, "--out", str(out)]) == 0
    return out


def fails(argv: list[str], capsys, *needles: str) -> str:
    """Run the CLI: exit status 2 and one line on stderr holding every needle (and no traceback)."""
    code = main(["-q", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featuretree: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def builds(argv_tail: list[str], out: Path, corpus: Path) -> None:
    """The corrected command works in the same --out afterwards: the mistake left nothing behind."""
    assert main(["-q", "build", "--corpus", str(corpus), *SMALL, *argv_tail, "--out", str(out)]) == 0
    assert (out / "tree.json").is_file()


# ---- model ------------------------------------------------------------------------------------------
def test_unknown_model_name_offline(tmp_path, corpus, capsys):
    fails(["build", "--model", "no-such-org/no-such-model", "--corpus", str(corpus), *SMALL, "--out",
           str(tmp_path / "r")], capsys, "no-such-model", "not available offline", "never downloads")
    assert not (tmp_path / "r" / "run.json").exists()
    builds([], tmp_path / "r", corpus)


def test_unknown_model_path(tmp_path, corpus, capsys):
    fails(["build", "--model", str(tmp_path / "nowhere"), "--corpus", str(corpus), "--out", str(tmp_path / "r")],
          capsys, "nowhere", "not a directory")


# ---- corpus -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, needle", [
    (b"", "has no texts"),
    (b"   \n\t\n  \n", "has no texts"),
    ("caf\u00e9 au lait\n".encode("latin-1"), "is not UTF-8 text"),
    (bytes(range(256)) * 400, "binary"),
])
def test_empty_whitespace_non_utf8_and_binary_corpora(tmp_path, corpus, capsys, content, needle):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    fails(["build", "--corpus", str(bad), *SMALL, "--out", str(tmp_path / "r")], capsys, str(bad), needle)
    builds([], tmp_path / "r", corpus)


def test_very_long_lines_are_truncated_not_fatal(tmp_path, corpus):
    long = tmp_path / "long.txt"
    long.write_text(("word " * 400_000) + "\n" + corpus.read_text())  # a 2 MB line, then ordinary ones
    assert main(["-q", "build", "--corpus", str(long), *SMALL, "--max-length", "64", "--out", str(tmp_path / "r")]) == 0
    acts = Activations(tmp_path / "r" / "acts")
    assert acts.tokens("all").groupby("doc_id").size().max() <= 64  # the tokenizer cut it at max_length


# ---- ladder settings --------------------------------------------------------------------------------
@pytest.mark.parametrize("widths, k, needle", [
    ("64,128", "64", "below the narrowest width"),
    ("0,64", "2", "width <= 0"),
    ("64,16", "2", "strictly increasing"),
    ("16,16", "2", "strictly increasing"),
])
def test_bad_widths_and_k(tmp_path, corpus, capsys, widths, k, needle):
    fails(["build", "--corpus", str(corpus), "--widths", widths, "--k", k, "--out", str(tmp_path / "r")], capsys,
          needle)
    assert not (tmp_path / "r").exists()  # the config is checked before anything is written


def test_bad_k_cap_and_planted_tokens(tmp_path, corpus, capsys):
    fails(["build", "--corpus", str(corpus), "--max-k-frac", "1.5", "--out", str(tmp_path / "r")], capsys,
          "max_k_frac=1.5", "(0, 1]")
    assert not (tmp_path / "r").exists()
    fails(["eval", "planted", "--n-train", "10"], capsys, "--n-train 10", ">= 1000")


def test_layer_out_of_range(tmp_path, corpus, capsys):
    fails(["build", "--corpus", str(corpus), *SMALL, "--layer", "9", "--out", str(tmp_path / "r")], capsys,
          "layer 9", "out of range")
    builds(["--layer", "3"], tmp_path / "r", corpus)  # no run record of layer 9 stands in the way


# ---- nodes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["refine", "{run}", "w8/999"],
    ["export", "{run}", "--html", "{tmp}/x.html", "--root", "w8/999"],
    ["search", "{run}", "dog", "--start", "w8/999"],
])
def test_unknown_node_id(run, tmp_path, capsys, argv):
    fails([a.format(run=run, tmp=tmp_path) for a in argv], capsys, "unknown node 'w8/999'")
    assert not (tmp_path / "x.html").exists()


# ---- activations ------------------------------------------------------------------------------------
def test_nan_or_inf_in_activations(run):
    x = torch.randn(500, 384)
    x[7, 3] = float("nan")
    with pytest.raises(FeatureTreeError, match="NaN or Inf"):
        ft.train_ladder(x, (8,), k=2, epochs=1, progress=False)
    tree = ft.load(run)
    x[7, 3] = float("inf")
    with pytest.raises(FeatureTreeError, match="NaN or Inf"):
        ft.link(tree.saes, x)


# ---- saved files ------------------------------------------------------------------------------------
def copy_of(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / name))


def test_truncated_or_corrupt_safetensors(run, tmp_path, capsys):
    bad = copy_of(run, tmp_path)
    w = bad / "saes" / "w8" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    fails(["info", str(bad)], capsys, "w8", "truncated or not a safetensors file")
    other = copy_of(run, tmp_path, "other")
    shard = other / "acts" / "shard_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    fails(["match", str(other), str(run)], capsys, "shard_00000", "truncated or damaged", "recompute")


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.pop("d_sae"), "missing or bad 'd_sae'"),
    (lambda c: c.update(k="many"), "missing or bad"),
    (lambda c: c.update(d_sae=33), "W_enc has shape (384, 32), expected (384, 33)"),
])
def test_cfg_json_missing_wrong_fields_or_shape_mismatch(run, tmp_path, capsys, edit, needle):
    bad = copy_of(run, tmp_path)
    cfg_path = bad / "saes" / "w32" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    fails(["info", str(bad)], capsys, "w32", needle)


def test_pickle_where_safetensors_is_expected_is_never_unpickled(run, tmp_path, capsys, monkeypatch):
    bad = copy_of(run, tmp_path)
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (bad / "saes" / "w8" / "sae_weights.safetensors").write_bytes(pickle.dumps(Payload()))
    fails(["info", str(bad)], capsys, "is a pickle file, not safetensors", "never unpickles")
    assert not marker.exists()


# ---- output directory -------------------------------------------------------------------------------
def test_unwritable_output_directory(run, tmp_path, corpus, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    fails(["build", "--corpus", str(corpus), *SMALL, "--out", str(a_file / "sub")], capsys, "file", "check --out")
    builds([], tmp_path / "r", corpus)
    if Path("/sys").is_dir():  # sysfs takes no new directories, not even from root
        line = fails(["export", str(run), "--csv", "/sys/featuretree-test/nodes.csv"], capsys, "featuretree-test")
        assert "choose a directory you can write to" in line or "check the path" in line


@pytest.mark.slow
def test_full_disk_leaves_the_old_file_and_no_temp_file(run, tmp_path):
    """RLIMIT_FSIZE makes writes past 200 kB fail as a full disk does (EFBIG), in a child process."""
    html = tmp_path / "tree.html"
    html.write_text("the previous export")
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
            "from featuretree.__main__ import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "-q", "export", str(run), "--html", str(html)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and f"cannot write {html}" in err[0] and "free some space" in err[0], done.stderr
    assert html.read_text() == "the previous export"  # untouched: the new one went to a temp file first
    assert not list(tmp_path.glob(".*.tmp"))  # ... which was removed


@pytest.mark.slow
def test_disk_full_mid_harvest_then_the_same_build_finishes(tmp_path, corpus):
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
            "from featuretree.__main__ import main; sys.exit(main(sys.argv[1:]))")
    argv = ["-q", "build", "--corpus", str(corpus), *SMALL, "--shard-size", "100", "--out", str(tmp_path / "r")]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot write" in done.stderr and "free some space" in done.stderr
    assert main(argv) == 0 and (tmp_path / "r" / "tree.json").is_file()  # space again: the same command finishes


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_device_where_there_is_none(tmp_path, corpus, capsys):
    out = tmp_path / "r"
    fails(["build", "--corpus", str(corpus), *SMALL, "--device", "cuda", "--out", str(out)], capsys,
          "device='cuda'", "sees no CUDA GPU", "--device cpu")
    builds(["--device", "cpu"], out, corpus)


# ---- serve ------------------------------------------------------------------------------------------
def test_serve_port_in_use_missing_run_and_bad_port(run, tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        fails(["serve", str(run), "--port", str(busy)], capsys, f"cannot listen on 127.0.0.1:{busy}", "--port")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    fails(["serve", str(tmp_path / "no-run"), "--port", str(free)], capsys, "no-run", "does not exist")
    fails(["serve", str(run), "--port", "70000"], capsys, "port 70000 is not a TCP port")


# ---- existing ladders (issue 18) ---------------------------------------------------------------------
def _saelens_dir(path: Path, arch: str, d: int, w: int, **cfg) -> Path:
    from featuretree.utils import save_tensors

    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps({"architecture": arch, "d_in": d, "d_sae": w, **cfg}))
    save_tensors(path / "sae_weights.safetensors", {"W_enc": torch.zeros(d, w), "b_enc": torch.zeros(w),
                                                    "W_dec": torch.zeros(w, d), "b_dec": torch.zeros(d),
                                                    "threshold": torch.zeros(w)})
    return path


def test_ladder_unknown_architecture_d_model_mismatch_and_missing_cache(tmp_path, corpus, capsys, monkeypatch):
    import featuretree.ladders as L

    out = tmp_path / "run"
    unknown = _saelens_dir(tmp_path / "crosscoder", "crosscoder", 384, 64)
    fails(["build", "--ladder", str(unknown), "--corpus", str(corpus), "--out", str(out)], capsys,
          "architecture 'crosscoder' is not one featuretree reads")
    transcoder = _saelens_dir(tmp_path / "transcoder", "transcoder", 384, 64)  # no hook_name_out
    fails(["build", "--ladder", str(transcoder), "--corpus", str(corpus), "--out", str(out)], capsys,
          "the transcoders name output hooks ['None']", "hook_name_out in its cfg.json")
    mlp = _saelens_dir(tmp_path / "mlp", "jumprelu", 384, 64, hook_name="blocks.3.hook_mlp_out")
    fails(["build", "--ladder", str(mlp), "--corpus", str(corpus), "--out", str(out)], capsys,
          "block 3 (BertLayer) has none of mlp, feed_forward, ffn for mlp_out", "pass --site")
    z = _saelens_dir(tmp_path / "z", "jumprelu", 384, 64, hook_name="blocks.3.attn.hook_z")
    fails(["build", "--ladder", str(z), "--corpus", str(corpus), "--out", str(out)], capsys,
          "the dictionaries read 'blocks.3.attn.hook_z': attention's per-head hook_z")
    fails(["build", "--site", "nope", "--corpus", str(corpus), "--out", str(out)], capsys,
          "block 3 (BertLayer) has no submodule 'nope'; its submodules are: attention, intermediate, output")
    small = _saelens_dir(tmp_path / "small", "jumprelu", 16, 64)
    fails(["build", "--ladder", str(small), "--corpus", str(corpus), "--out", str(out)], capsys,
          "the ladder reads d_model [16]", "have 384")
    assert not out.exists()  # refused before anything was written
    monkeypatch.setattr(L, "_release_table", lambda: {"org-scope-res": ("org/scope", {"layer_3/width_16k": "layer_3/width_16k"})})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    fails(["build", "--ladder", "org-scope-res", "--release-widths", "16k", "--corpus", str(corpus), "--out", str(out)],
          capsys, "--release-widths picks a release's dictionaries of one layer: pass --layer N")
    fails(["build", "--ladder", "org-scope-res", "--release-widths", "16k", "--layer", "3", "--corpus", str(corpus),
           "--out", str(out)],
          capsys, "not in the local Hugging Face cache", "huggingface-cli download org/scope --include 'layer_3/width_16k/*'")
