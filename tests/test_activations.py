"""Tests for featuretree.activations: harvest correctness against a plain HF forward, and the shard stream."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may touch the network

import json  # noqa: E402
import random  # noqa: E402
from collections import Counter  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from _models import tiny_gpt2 as _tiny_gpt2  # noqa: E402

from featuretree.activations import Activations
from featuretree.config import FeatureTreeError  # noqa: E402
from featuretree.harvest import collect  # noqa: E402
from featuretree.model import get_tokenizer, load_model  # noqa: E402

LAYER, N_TOKENS, MAX_LENGTH, SHARD, HELDOUT = 3, 2000, 48, 300, 5

WORDS = (
    "the a cat dog bird tree river mountain house small large red quickly slowly runs jumps sings grows "
    "flows of in on with under photosynthesis chlorophyll enzyme violin symphony harmony anthrax bacterium "
    "infection geology sediment basalt, . ; unbelievably"
).split()


def make_texts(n=60, seed=1):
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60))) for _ in range(n)]
    texts[7] = "a [SEP] inside the text and a café"  # a literal special token must not be harvested
    return texts


def tiny_gpt2():
    return _tiny_gpt2(WORDS)


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def texts():
    return make_texts()


@pytest.fixture(scope="module")
def store(model, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("acts")
    return collect(
        model,
        LAYER,
        texts,
        n_tokens=N_TOKENS,
        out=out,
        batch_size=8,
        max_length=MAX_LENGTH,
        shard_size=SHARD,
        heldout_every=HELDOUT,
        progress=False,
    )


def test_store_layout_and_meta(store, texts):
    assert isinstance(store, Activations)
    assert len(store) == store.n_tokens == N_TOKENS and store.d_model == 384
    meta = json.loads((store.path / "meta.json").read_text())
    sizes = meta["shard_sizes"]  # shards end at a batch boundary once SHARD rows have gathered
    assert sum(sizes) == N_TOKENS and all(SHARD <= n < SHARD + 8 * MAX_LENGTH for n in sizes[:-1])
    assert 0 < sizes[-1] < SHARD + 8 * MAX_LENGTH and meta["n_shards"] == len(sizes) >= 5
    info = meta["shard_info"]  # each shard's batch range, size and checksum: what resume checks
    assert [i["rows"] for i in info] == sizes and info[0]["batches"][0] == 0
    assert all(a["batches"][1] == b["batches"][0] for a, b in zip(info, info[1:]))
    assert all(len(i["sha256"]) == 64 and i["bytes"] == (store.path / i["name"]).stat().st_size for i in info)
    assert not (store.path / "progress.json").exists()
    assert (meta["layer"], meta["max_length"], meta["heldout_every"], meta["model"]) == (
        LAYER,
        MAX_LENGTH,
        HELDOUT,
        "all-MiniLM-L6-v2",
    )
    assert sorted(p.name for p in store.path.glob("shard_*")) == [
        f"shard_{i:05d}.safetensors" for i in range(len(sizes))
    ]
    from safetensors.torch import load_file

    shard = load_file(str(store.path / "shard_00000.safetensors"))
    assert shard["acts"].shape == (sizes[0], 384) and shard["acts"].dtype == torch.float32
    for name in ("token_ids", "doc_ids", "positions", "starts", "ends"):
        assert shard[name].shape == (sizes[0],) and shard[name].dtype == torch.int64
    reopened = Activations(store.path)
    torch.testing.assert_close(reopened.load("all"), store.load("all"))
    assert len(json.loads((store.path / "vocab.json").read_text())) == 30522


def test_only_real_tokens_consistent_with_retokenizing(store, model, texts):
    tok = get_tokenizer(model)
    df = store.tokens("all")
    assert len(df) == N_TOKENS
    assert not set(df.token_id) & set(tok.all_special_ids)
    docs = store.texts()
    assert all(docs[d] == texts[d] for d in docs) and set(df.doc_id) == set(docs)
    for doc_id, rows in df.groupby("doc_id", sort=False):
        enc = tok(texts[doc_id], truncation=True, max_length=MAX_LENGTH, return_offsets_mapping=True)
        pos = rows.position.tolist()
        assert [enc["input_ids"][p] for p in pos] == rows.token_id.tolist()
        assert [tuple(enc["offset_mapping"][p]) for p in pos] == list(zip(rows.start, rows.end, strict=True))
        real = [p for p, i in enumerate(enc["input_ids"]) if i not in tok.all_special_ids]
        assert rows.position.tolist() == real[: len(rows)]  # all real tokens, in order (last doc may be cut)
    seven = df[df.doc_id == 7]
    if len(seven):
        assert "[SEP]" not in store.token_strings(seven.token_id)
    pieces = store.token_strings(df.token_id[:20])
    assert all(isinstance(s, str) for s in pieces)


def test_activations_equal_a_plain_hf_forward(store, model, texts):
    tok = get_tokenizer(model)
    df = store.tokens("all")
    acts = store.load("all")  # (n, d_model)
    for doc_id in list(dict.fromkeys(df.doc_id))[:12]:
        idx = (df.doc_id == doc_id).to_numpy().nonzero()[0]
        enc = tok(texts[doc_id], truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        with torch.inference_mode():
            hs = model._module(**enc, output_hidden_states=True).hidden_states[LAYER + 1][0]  # (seq, d_model)
        torch.testing.assert_close(
            acts[idx], hs[torch.tensor(df.position.to_numpy()[idx])], atol=1e-4, rtol=0
        )


def test_later_layers_never_run(model, texts, tmp_path):
    calls = []
    hook = model._module.encoder.layer[LAYER + 1].register_forward_hook(lambda *a: calls.append(1))
    try:
        collect(model, LAYER, texts[:10], n_tokens=50, out=tmp_path, progress=False)
    finally:
        hook.remove()
    assert calls == []


def test_unshuffled_stream_is_the_store_in_order(store):
    batches = list(store.batches(64, split="all", shuffle=False))
    assert all(len(b) == 64 for b in batches[:-1]) and 0 < len(batches[-1]) <= 64
    torch.testing.assert_close(torch.cat(batches), store.load("all"), atol=0, rtol=0)


def rows(x):
    return Counter(r.numpy().tobytes() for r in x)


def test_shuffled_epochs_are_permutations(store):
    full = store.load("all")
    one = list(store.batches(128, split="all", seed=3))
    assert all(len(b) == 128 for b in one[:-1]) and sum(map(len, one)) == N_TOKENS
    assert rows(torch.cat(one)) == rows(full)
    assert not torch.equal(torch.cat(one), full)
    again = torch.cat(list(store.batches(128, split="all", seed=3)))
    torch.testing.assert_close(again, torch.cat(one), atol=0, rtol=0)  # seeded: reproducible
    two = torch.cat(list(store.batches(128, split="all", seed=3, epochs=2)))
    assert len(two) == 2 * N_TOKENS and not torch.equal(two[:N_TOKENS], two[N_TOKENS:])
    assert rows(two[N_TOKENS:]) == rows(full)


def test_train_and_heldout_partition_by_document(store):
    train, held = store.tokens("train"), store.tokens("heldout")
    assert len(train) + len(held) == N_TOKENS and len(held) > 0 and len(train) > 0
    assert (held.doc_id % HELDOUT == 0).all() and not (train.doc_id % HELDOUT == 0).any()
    assert store.is_heldout(torch.tensor([0, 1, 5, 12])).tolist() == [True, False, True, False]
    x_train, x_held = store.load("train"), store.load("heldout")
    assert (len(x_train), len(x_held)) == (len(train), len(held))
    streamed = torch.cat(list(store.batches(100, split="train")))
    assert rows(streamed) == rows(x_train)
    assert rows(torch.cat(list(store.batches(100, split="heldout", shuffle=False)))) == rows(x_held)
    assert len(store.load("train", max_tokens=500)) == 500 == len(store.tokens("train", max_tokens=500))
    torch.testing.assert_close(store.load("train", max_tokens=500), x_train[:500], atol=0, rtol=0)
    with pytest.raises(FeatureTreeError, match="split"):
        store.load("test")


def test_stream_reads_chunks_across_shards_within_a_bounded_buffer(store, monkeypatch):
    from safetensors.torch import load_file

    expected = sorted(map(tuple, store.load("all").tolist()))
    shard_of = {r.numpy().tobytes(): i for i, name in enumerate(store.meta["shards"])
                for r in load_file(str(store.path / name))["acts"]}
    reads, whole = [], []
    original = Activations._slice
    monkeypatch.setattr(Activations, "_slice", lambda self, i, a, b, split: reads.append((i, a)) or
                        original(self, i, a, b, split))
    monkeypatch.setattr(Activations, "_read", lambda *a, **k: whole.append(a) or pytest.fail("a whole shard was read"))
    # a buffer smaller than one shard: a shard never has to fit in memory
    it = store.batches(50, split="all", buffer_rows=SHARD // 2, chunk_rows=50, seed=1)
    first = next(it)
    got = [min(50, store.meta["shard_sizes"][i] - a) for i, a in reads]
    assert sum(got[:-1]) < SHARD // 2 <= sum(got)  # the first batch waited for one buffer's worth of chunks only
    assert len({i for i, _ in reads}) > 1  # ... drawn from several shards
    rows = [first, *it]
    n_chunks = sum(-(-n // 50) for n in store.meta["shard_sizes"])
    assert len(reads) == n_chunks and not whole
    assert sorted(map(tuple, torch.cat(rows).tolist())) == expected  # every row once per epoch
    assert len({shard_of[r.numpy().tobytes()] for r in first}) > 1  # one batch mixes shards


def test_half_precision_store_halves_the_shards(model, texts, store, tmp_path):
    kw = dict(n_tokens=N_TOKENS, batch_size=8, max_length=MAX_LENGTH, shard_size=SHARD, heldout_every=HELDOUT,
              progress=False)
    half = collect(model, LAYER, texts, out=tmp_path, dtype="bfloat16", **kw)
    size = lambda acts: sum(i["bytes"] for i in acts.meta["shard_info"])  # noqa: E731
    acts_bytes = N_TOKENS * 384 * 4
    assert size(store) - size(half) == pytest.approx(acts_bytes / 2, rel=0.01)  # the activations take half
    x, ref = half.load("all"), store.load("all")
    assert x.dtype == torch.float32 and torch.equal(x, ref.to(torch.bfloat16).float())  # bf16 of the same numbers
    assert next(half.batches(64)).dtype == torch.float32 and half.meta["dtype"] == "bfloat16"
    with pytest.raises(FeatureTreeError, match="not a store dtype"):
        collect(model, LAYER, texts, out=tmp_path / "x", dtype="int8", **kw)


def test_decoder_model_collects(tmp_path):
    module, tok = tiny_gpt2()
    nm = load_model((module, tok))
    texts = ["the cat sat on the mat .", "a dog ran to the big red house", "zebra unknown words here"]
    acts = collect(nm, 0, texts, n_tokens=1000, out=tmp_path / "l0", progress=False)
    n_words = sum(len(t.split()) for t in texts)  # one token per word ([UNK] kept), no <|endoftext|>
    assert len(acts) == n_words and acts.d_model == 32
    df = acts.tokens()
    assert 0 not in set(df.token_id) and (df.position >= 1).all()
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        hs = module(**enc, output_hidden_states=True).hidden_states[1]  # (3, seq, 32)
    torch.testing.assert_close(
        acts.load("all"), hs[torch.tensor(df.doc_id), torch.tensor(df.position)], atol=1e-5, rtol=0
    )
    last = collect(nm, -1, texts, out=tmp_path / "l1", progress=False)  # last block: before ln_f
    assert last.meta["layer"] == 1 and len(last) == n_words


def test_short_corpus_collects_everything_and_warns(model, tmp_path, caplog):
    acts = collect(model, 0, ["A cat.", "Dogs bark."], n_tokens=1000, out=tmp_path, progress=False)
    assert len(acts) == 6 and "only 6 real tokens" in caplog.text
    again = collect(model, 0, ["A cat."], out=tmp_path, progress=False)  # overwrites the old store
    assert len(again) == 3 and len(list(tmp_path.glob("shard_*"))) == 1


def test_errors(model, tmp_path):
    with pytest.raises(FeatureTreeError, match="empty"):
        collect(model, 0, [], out=tmp_path)
    with pytest.raises(FeatureTreeError, match="single string"):
        collect(model, 0, "just one text", out=tmp_path)
    with pytest.raises(FeatureTreeError, match="pass 0..5"):
        collect(model, 6, ["a"], out=tmp_path)
    with pytest.raises(FeatureTreeError, match="no tokens"):
        collect(model, 0, ["", ""], out=tmp_path, progress=False)
    with pytest.raises(FeatureTreeError, match="not a complete activation store; rerun collect"):
        Activations(tmp_path / "nowhere")


def test_texts_object_and_nan_guard(model, tmp_path):
    class Corpus:
        texts = ["A cat.", "Dogs bark."]

    assert len(collect(model, 1, Corpus(), out=tmp_path / "ok", progress=False)) == 6
    # nnsight's .output is the value *before* a module's own torch forward hooks apply, so poison the
    # block before and harvest block 1, whose input is then NaN.
    hook = model._module.encoder.layer[0].register_forward_hook(
        lambda m, i, o: (o[0] * float("nan"),) + tuple(o[1:]) if isinstance(o, tuple) else o * float("nan")
    )
    try:
        with pytest.raises(FeatureTreeError, match="NaN"):
            collect(model, 1, Corpus(), out=tmp_path / "bad", progress=False)
    finally:
        hook.remove()
    assert not (tmp_path / "bad" / "meta.json").exists()


# ---- resume: a killed harvest continues, a damaged shard is recomputed, bit for bit --------------------
def _store_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard_*.safetensors"))}


def test_killed_harvest_resumes_to_the_same_store(store, model, texts, tmp_path, monkeypatch):
    import featuretree.harvest as A

    kw = dict(n_tokens=N_TOKENS, batch_size=8, max_length=MAX_LENGTH, shard_size=SHARD, heldout_every=HELDOUT,
              progress=False)
    original, calls = A.write_shard, []

    def dies_at_the_third_shard(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed while writing shard 2 (it is never renamed into place)
        return original(*args)

    monkeypatch.setattr(A, "write_shard", dies_at_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        collect(model, LAYER, texts, out=tmp_path, **kw)
    monkeypatch.setattr(A, "write_shard", original)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert len(progress["shards"]) == 2 and not (tmp_path / "meta.json").exists()
    with pytest.raises(FeatureTreeError, match="no meta.json"):
        Activations(tmp_path)  # an unfinished store cannot be opened by mistake
    resumed = collect(model, LAYER, texts, out=tmp_path, resume=True, **kw)
    assert _store_bytes(tmp_path) == _store_bytes(store.path)
    assert json.loads((tmp_path / "meta.json").read_text())["shard_info"] == store.meta["shard_info"]
    assert (tmp_path / "docs.jsonl").read_bytes() == (store.path / "docs.jsonl").read_bytes()
    assert resumed.verify() == [] and not (tmp_path / "progress.json").exists()
    with pytest.raises(FeatureTreeError, match=r"other settings \(n_tokens 2000 -> 1000\)"):
        collect(model, LAYER, texts, out=tmp_path, resume=True, **{**kw, "n_tokens": 1000})


def test_damaged_shard_is_detected_and_recomputed(store, model, texts, tmp_path):
    import shutil

    kw = dict(n_tokens=N_TOKENS, batch_size=8, max_length=MAX_LENGTH, shard_size=SHARD, heldout_every=HELDOUT,
              progress=False)
    copy = tmp_path / "acts"
    shutil.copytree(store.path, copy)
    target = copy / "shard_00001.safetensors"
    target.write_bytes(target.read_bytes()[:-100])  # truncated
    with pytest.raises(FeatureTreeError, match="truncated or damaged"):
        Activations(copy)
    flipped = copy / "shard_00003.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte of activations changed
    flipped.write_bytes(bytes(data))
    mtime = (copy / "shard_00000.safetensors").stat().st_mtime_ns
    fixed = collect(model, LAYER, texts, out=copy, resume=True, **kw)
    assert fixed.verify() == [] and _store_bytes(copy) == _store_bytes(store.path)
    assert (copy / "shard_00000.safetensors").stat().st_mtime_ns == mtime  # good shards are left alone


def test_special_ids_drop_a_byte_level_unk_and_added_specials_but_keep_a_wordpiece_unk(model):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from featuretree.harvest import special_ids

    tk = Tokenizer(models.BPE(unk_token="<|endoftext|>"))  # SmolLM2's tokenizer: byte-level, unk = a control token
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(["herons wade in the shallows"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<|endoftext|>", bos_token="<|im_start|>")
    tok.add_tokens(["<file_sep>"], special_tokens=True)  # an added special token outside all_special_ids
    ids = special_ids(tok)
    sep, unk = tok.convert_tokens_to_ids("<file_sep>"), tok.unk_token_id
    assert sep not in tok.all_special_ids and sep in ids and unk in ids
    kept = set(tok("a heron<|endoftext|> <file_sep> waded")["input_ids"]) - set(ids)
    assert kept and not kept & {sep, unk}
    bert = get_tokenizer(model)  # WordPiece writes [UNK] for what it cannot spell: that is text, kept
    assert bert.unk_token_id not in special_ids(bert) and bert.cls_token_id in special_ids(bert)


def test_collect_layers_writes_what_single_layer_harvests_write(model, texts, tmp_path):
    """Two layers in one pass: each store equals, shard for shard (sha256), the store `collect` writes for that
    layer alone; a killed multi-layer harvest (one store a shard behind) resumes to the same stores."""
    from featuretree.harvest import collect_layers

    kw = dict(n_tokens=3000, batch_size=8, max_length=MAX_LENGTH, shard_size=700, heldout_every=HELDOUT,
              progress=False)
    both = collect_layers(model, [1, LAYER], texts, outs={1: tmp_path / "m1", LAYER: tmp_path / "m3"}, **kw)
    for layer, store in both.items():
        alone = collect(model, layer, texts, out=tmp_path / f"s{layer}", **kw)
        assert json.loads((alone.path / "meta.json").read_text())["shard_info"] == \
            json.loads((store.path / "meta.json").read_text())["shard_info"]
        assert torch.equal(alone.load("all"), store.load("all"))
    # a kill: layer 1's store lost its last shard and meta; layer 3's is complete
    m1 = tmp_path / "m1"
    info = json.loads((m1 / "meta.json").read_text())["shard_info"]
    (m1 / "meta.json").unlink()
    (m1 / info[-1]["name"]).unlink()
    from featuretree.checkpoint import Checkpoint
    from featuretree.harvest import PROGRESS_FILE

    recipe = json.loads((tmp_path / "m3" / "meta.json").read_text())["recipe"] | {"layer": 1}
    Checkpoint(m1 / PROGRESS_FILE, recipe, "an unfinished harvest", "").save(
        {"shards": info[:-1], "next_batch": info[-2]["batches"][1], "n_done": sum(i["rows"] for i in info[:-1])})
    again = collect_layers(model, [1, LAYER], texts, outs={1: m1, LAYER: tmp_path / "m3"}, resume=True, **kw)
    assert json.loads((again[1].path / "meta.json").read_text())["shard_info"] == info
    with pytest.raises(FeatureTreeError, match="distinct"):
        collect_layers(model, [3, -3], texts, **kw)
