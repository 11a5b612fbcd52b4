"""Tests for featuretree.model: offline loading, tokenizer attachment, generic layer lookup."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may touch the network

import time  # noqa: E402

import nnsight  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from _models import tiny_gpt2 as _tiny_gpt2  # noqa: E402

from featuretree.config import FeatureTreeError  # noqa: E402
from featuretree.model import (  # noqa: E402
    check_layer,
    find_layers,
    get_tokenizer,
    layer_module,
    load_model,
    model_name,
    n_layers,
)

TINY_WORDS = "the a cat dog sat on mat and ran to house big small red blue . ,".split()


def tiny_gpt2(n_layer=2):
    return _tiny_gpt2(TINY_WORDS, n_layer)


@pytest.fixture(scope="module")
def minilm():
    return load_model()


def test_default_model_is_wrapped_and_has_its_tokenizer(minilm):
    assert isinstance(minilm, nnsight.NNsight)
    assert not minilm._module.training
    assert next(minilm._module.parameters()).dtype == torch.float32
    tok = get_tokenizer(minilm)
    assert tok is minilm.tokenizer
    assert get_tokenizer(minilm._module) is tok  # also reachable from the bare module
    assert tok("a cat")["input_ids"] == [101, 1037, 4937, 102]
    assert model_name(minilm) == "all-MiniLM-L6-v2"


def test_layer_lookup_on_an_encoder(minilm):
    path, blocks = find_layers(minilm)
    assert path == "encoder.layer" and len(blocks) == 6
    assert n_layers(minilm) == 6
    assert layer_module(minilm, 3).path == "model.encoder.layer.3"
    assert layer_module(minilm, -1).path == "model.encoder.layer.5"
    assert layer_module(minilm, -6)._module is blocks[0]
    assert check_layer(minilm, -2) == 4


@pytest.mark.parametrize("bad", [6, 9, -7])
def test_bad_layer_index_names_the_valid_range(minilm, bad):
    with pytest.raises(
        FeatureTreeError,
        match=rf"layer {bad} is out of range: this model has 6 layers, pass 0\.\.5 \(or -6\.\.-1\)",
    ):
        layer_module(minilm, bad)


def test_layer_module_traces_the_block_output(minilm):
    tok = get_tokenizer(minilm)
    batch = tok(["a cat sat on the mat"], return_tensors="pt")
    with torch.inference_mode():
        with minilm.trace(**batch) as tracer:
            h = layer_module(minilm, 3).output.save()
            tracer.stop()
        ref = minilm._module(**batch, output_hidden_states=True).hidden_states[4]
    h = h[0] if isinstance(h, tuple) else h
    torch.testing.assert_close(h, ref, atol=1e-5, rtol=0)


def test_embedded_aliases_resolve_offline():
    nm = load_model("sentence-transformers/all-MiniLM-L6-v2")
    assert n_layers(nm) == 6


def test_unknown_model_fails_fast_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # local_files_only alone must keep it offline
    t0 = time.perf_counter()
    with pytest.raises(FeatureTreeError, match=r"not available offline.*local path.*\(module, tokenizer\)"):
        load_model("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - t0 < 10


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FeatureTreeError, match="not a directory"):
        load_model(str(tmp_path / "missing"))


def test_decoder_tuple_gets_pad_token_and_layers():
    module, tok = tiny_gpt2()
    assert tok.pad_token is None
    nm = load_model((module, tok))
    assert get_tokenizer(nm).pad_token == "<|endoftext|>"
    assert find_layers(nm)[0] == "h" and n_layers(nm) == 2
    assert layer_module(nm, -1).path == "model.h.1"
    assert not module.training
    with pytest.raises(FeatureTreeError, match="pass 0..1"):
        layer_module(nm, 2)


def test_module_with_tokenizer_keyword_and_rewrap():
    module, tok = tiny_gpt2()
    nm = load_model(module, tokenizer=tok)
    assert get_tokenizer(nm) is tok
    assert load_model(nm) is nm  # an already wrapped model is returned as is
    with pytest.raises(FeatureTreeError, match="no tokenizer"):
        load_model(tiny_gpt2()[0])


def test_local_directory_of_a_decoder(tmp_path):
    module, tok = tiny_gpt2()
    module.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    nm = load_model(str(tmp_path))
    assert type(nm._module).__name__ == "GPT2Model"
    assert n_layers(nm) == 2 and get_tokenizer(nm).pad_token_id == 0
    torch.testing.assert_close(nm._module.wpe.weight, module.wpe.weight)


def test_longest_modulelist_fallback():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.short = torch.nn.ModuleList([torch.nn.Identity()])
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])

    nm = load_model(Net(), tokenizer=tiny_gpt2()[1])
    assert find_layers(nm)[0] == "blocks" and n_layers(nm) == 3


def test_remote_models_trace_remotely_on_the_same_code_path(tmp_path):
    """NDIF is out of reach here: a local model flagged remote must get `remote=True` on every trace, and
    the store must equal the local one (the same code path); a remote repo id offline is a clear error."""
    from featuretree.harvest import collect
    from featuretree.model import REMOTE_ATTR, is_remote

    texts = ["a cat sat on the mat", "the dog barked", "birds sing in the tall tree"] * 4
    local = collect(load_model(_tiny_gpt2(TINY_WORDS)), 0, texts, out=tmp_path / "local", progress=False)
    nm = load_model(_tiny_gpt2(TINY_WORDS))
    object.__setattr__(nm, REMOTE_ATTR, True)
    calls, trace = [], nm.trace

    def fake_remote_trace(*args, remote=False, **kwargs):
        calls.append(remote)
        return trace(*args, **kwargs)  # run it here instead of on NDIF

    object.__setattr__(nm, "trace", fake_remote_trace)
    assert is_remote(nm)
    remote = collect(nm, 0, texts, out=tmp_path / "remote", progress=False)
    assert calls and all(calls)  # every batch asked for remote execution
    assert torch.equal(remote.load("all"), local.load("all"))
    with pytest.raises(FeatureTreeError, match="remote=True needs network access"):
        load_model("no-such-org/no-such-model", remote=True)
    with pytest.raises(FeatureTreeError, match="repo id"):
        load_model(_tiny_gpt2(TINY_WORDS), remote=True)


def test_device_map_loads_with_accelerate_or_says_what_is_missing(tmp_path):
    import importlib.util

    module, tok = _tiny_gpt2(TINY_WORDS)
    module.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    if importlib.util.find_spec("accelerate") is None:
        with pytest.raises(FeatureTreeError, match="device_map='auto' needs accelerate: pip install accelerate"):
            load_model(str(tmp_path / "tiny"), device_map="auto")
    else:  # pragma: no cover - accelerate is not a dependency; benchmarks/.venv has it
        nm = load_model(str(tmp_path / "tiny"), device_map="auto")
        assert n_layers(nm) == 2
