"""match and novel tell the truth: dictionaries trained on planted features share them (and pair them by the
planted feature they found), a permuted copy is recovered exactly even from another space or another model's
tokenizer, an untrained dictionary shares nothing; novel ranks first the features firing on an unseen word."""

import copy
import random

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import transformers
from _models import tiny_gpt2

import featuretree as ft
from featuretree import FeatureTreeError
from featuretree.__main__ import main
from featuretree.activations import Activations
from featuretree.compare import aligned_activations, assign, correlations, match, sparse_codes
from featuretree.eval import jaccard, planted_hierarchy
from featuretree.find import novel
from featuretree.firing import fire
from featuretree.tree import FeatureTree

WORDS = ("the a cat dog bird tree river mountain house small large red runs jumps sings grows of in on with "
         "photosynthesis chlorophyll enzyme violin symphony anthrax bacterium infection geology basalt").split()
NEW = "zebra"  # in the tokenizer's vocabulary, never in the corpus


def _index(ids):
    return np.array([int(n.rsplit("/", 1)[1]) for n in ids], dtype=np.int64)


def _planted_pair(depth, n_roots, width, k, seed=0):
    p = planted_hierarchy(n_roots=n_roots, branching=3, depth=depth, d_model=32, n_tokens=25_000, seed=seed)
    train, held = p.split(20_000)
    saes = [ft.train_ladder(train.acts, (width,), k=k, epochs=4, batch_size=512, seed=s, progress=False,
                            eval_acts=held.acts)[width] for s in (0, 1)]
    return held, saes


def _planted_feature(sae, held):
    """The planted feature each learned feature fires with (Jaccard of firing sets), and that Jaccard."""
    _, _, F = fire(sae, held.acts)
    J = jaccard(F, held.active)  # (width, n_true)
    return J.argmax(1), J.max(1)


def _permuted(sae, perm, M=None):
    """A copy of `sae` whose feature perm[j] is the original's feature j; with M (d, d') orthonormal rows,
    it reads activations x @ M of another space and gives the same codes."""
    M = torch.eye(sae.d_model) if M is None else M
    out = ft.TopKSAE(M.shape[1], sae.width, sae.k, seed=None)
    inv = torch.argsort(torch.as_tensor(perm))
    with torch.no_grad():
        out.W_enc.copy_((M.T @ sae.W_enc)[:, inv])
        out.b_enc.copy_(sae.b_enc[inv])
        out.W_dec.copy_((sae.W_dec @ M)[inv])
        out.b_dec.copy_(sae.b_dec @ M)
    return out


@pytest.fixture(scope="module")
def flat():
    return _planted_pair(depth=1, n_roots=32, width=32, k=4)


def test_match_two_seeds_share_the_planted_features(flat):
    held, (a, b) = flat
    m = match(a, b, held.acts, threshold=0.7)
    assert m.shared_fraction > 0.8, m
    assert list(m.pairs["corr"]) == sorted(m.pairs["corr"], reverse=True)
    assert m.pairs.a.is_unique and m.pairs.b.is_unique  # one-to-one
    # truth: a shared pair is one planted feature found twice
    s = m.pairs[m.pairs.shared]
    ta, ja = _planted_feature(a, held)
    tb, jb = _planted_feature(b, held)
    ia, ib = _index(s.a), _index(s.b)
    found = (ja[ia] >= 0.5) & (jb[ib] >= 0.5)
    assert found.mean() > 0.8
    assert (ta[ia] == tb[ib])[found].mean() > 0.95
    assert s.cos.median() > 0.8  # same space: the decoders agree too
    assert "shared" in str(m) and f"{m.n_shared} of" in m.summary()


def test_hierarchy_shares_less_but_pairs_stay_true():
    held, (a, b) = _planted_pair(depth=2, n_roots=8, width=32, k=3)
    m = match(a, b, held.acts)
    s = m.pairs[m.pairs.shared]
    ta, ja = _planted_feature(a, held)
    tb, jb = _planted_feature(b, held)
    ia, ib = _index(s.a), _index(s.b)
    found = (ja[ia] >= 0.5) & (jb[ib] >= 0.5)
    assert len(s) >= 8 and found.sum() >= 8
    same = ta[ia] == tb[ib]
    assert same[found].mean() > 0.75
    # the others pair a parent with its own child (one seed's latent absorbed the parent): still related
    related = same | (held.parent[ta[ia]] == tb[ib]) | (held.parent[tb[ib]] == ta[ia])
    assert related[found].all(), list(zip(ta[ia][found], tb[ib][found]))


def test_rare_features_take_no_part(flat):
    held, (a, b) = flat
    x = held.acts[:300]
    na, nb = sparse_codes(a, x).getnnz(0), sparse_codes(b, x).getnnz(0)
    m = match(a, b, x, min_tokens=25)
    assert len(m.pairs) and (na[_index(m.pairs.a)] >= 25).all() and (nb[_index(m.pairs.b)] >= 25).all()
    assert m.n_live_a == int((na >= 25).sum()) and m.n_live_b == int((nb >= 25).sum())
    assert match(a, b, x, min_tokens=1).n_live_a == int((na > 0).sum())


def test_untrained_dictionary_shares_little(flat):
    held, (a, _) = flat
    m = match(a, ft.TopKSAE(32, 32, 4, seed=5), held.acts)
    assert m.shared_fraction < 0.2, m


def test_permuted_copy_is_recovered_exactly_in_any_space(flat):
    held, (a, _) = flat
    perm = torch.randperm(a.width, generator=torch.Generator().manual_seed(3)).numpy()
    m = match(a, _permuted(a, perm), held.acts)
    p = m.pairs
    assert len(p) == m.n_live_a and m.shared_fraction == 1.0
    assert np.array_equal(perm[_index(p.a)], _index(p.b))
    assert np.allclose(p["corr"], 1.0, atol=1e-6) and np.allclose(p.cos, 1.0, atol=1e-5)
    # b in another, wider space (x @ M): same codes, so the same pairs; decoder cosines are undefined
    M = torch.linalg.qr(torch.randn(48, 32, generator=torch.Generator().manual_seed(4)))[0].T  # (32, 48)
    other = match({32: a}, {"w32": _permuted(a, perm, M)}, held.acts, acts_b=held.acts @ M)
    assert np.array_equal(perm[_index(other.pairs.a)], _index(other.pairs.b))
    assert other.pairs.cos.isna().all() and other.shared_fraction == 1.0


def test_correlations_and_both_assignment_paths_are_exact():
    rng = np.random.default_rng(0)
    dense_a = rng.random((300, 12)) * (rng.random((300, 12)) < 0.2)
    dense_b = np.concatenate([dense_a[:, ::-1] + 0.1 * rng.random((300, 12)) * (dense_a[:, ::-1] > 0),
                              rng.random((300, 4)) * (rng.random((300, 4)) < 0.2)], axis=1)
    C = correlations(sp.csr_matrix(dense_a), sp.csr_matrix(dense_b), block=5).toarray()
    truth = np.corrcoef(dense_a.T, dense_b.T)[:12, 12:]
    assert np.allclose(C, np.clip(truth, 0, None), atol=1e-9)
    d = assign(sp.coo_matrix(C))
    s = assign(sp.coo_matrix(C), dense_max=0)  # LAPJVsp on the sparse graph
    assert np.isclose(d[2].sum(), s[2].sum()) and np.array_equal(d[1], 11 - d[0])  # the reversed columns
    assert sparse_codes(ft.TopKSAE(8, 32, 2), torch.randn(5, 8)).getnnz(1).max() <= 2


def test_rungs_of_trees_and_ladders(flat):
    held, (a, b) = flat
    ladder = ft.train_ladder(held.acts, (8, 16), k=2, epochs=1, batch_size=512, progress=False)
    tree = ft.link(ladder, held.acts, labels=False)
    m = match(tree, {32: a, 16: b.prefix(16)}, held.acts, rung_b="w16")
    assert m.rung_a == "w16" and m.rung_b == "w16" and m.pairs.a.str.startswith("w16/").all()
    assert match(tree, {32: a, 16: b.prefix(16)}, held.acts).rung_b == "w32"  # the widest by default
    assert match(tree, a, held.acts, rung_a=8).rung_a == "w8"
    with pytest.raises(FeatureTreeError, match="no rung 'w99'"):
        match(tree, a, held.acts, rung_a="w99")
    with pytest.raises(FeatureTreeError, match="pass acts="):
        match(a, b)
    with pytest.raises(FeatureTreeError, match="d_model 32"):
        match(a, b, held.acts, acts_b=torch.randn(len(held.acts), 7))
    with pytest.raises(FeatureTreeError, match="same tokens"):
        match(a, b, held.acts, acts_b=held.acts[:10])


# ---- across models: tokens aligned by character span ----------------------------------------------------
def _split_tokenizer(words):
    """Like _models.word_tokenizer but words in another id order and split on whitespace only ("runs." is one
    unknown token where word_tokenizer has "runs" and ".")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", unk_token="[UNK]")


def _corpus(n_docs, seed=0, words=WORDS):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 30))) for _ in range(n_docs)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny GPT-2 whose NEW word has a long embedding (its own direction at layer 0), and a tree built on a
    corpus where NEW is rare (one text in 25): the dictionaries learn a NEW feature that seldom fires."""
    mod, tok = tiny_gpt2([*WORDS, NEW], n_layer=1)
    with torch.no_grad():
        mod.wte.weight[tok.convert_tokens_to_ids(NEW)] *= 8
    model = ft.load_model((mod, tok))
    corpus = [t + (f" {NEW}" if i % 25 == 0 else "") for i, t in enumerate(_corpus(300))]
    acts = ft.collect(model, 0, corpus, n_tokens=8000, out=tmp_path_factory.mktemp("acts"), progress=False)
    torch.manual_seed(0)
    saes = ft.train_ladder(acts, (16, 48), k=2, epochs=6, batch_size=256, progress=False)
    tree = ft.link(saes, acts)
    tree.config = ft.Config(model="tiny-gpt2-a", layer=0, widths=(16, 48), k=2)
    return model, acts, tree


def test_trees_of_two_models_are_matched_on_span_aligned_tokens(tiny_run):
    model_a, _, tree_a = tiny_run
    # model B: the same network reading another tokenizer (other ids, embedding rows moved to match): its
    # activations equal A's exactly on every token both tokenize alike, so only a correct alignment gives corr 1
    mod_a, tok_a = model_a._module, model_a.tokenizer
    words = [*WORDS, NEW][::-1]
    tok_b = _split_tokenizer(words)
    mod_b = copy.deepcopy(mod_a)
    with torch.no_grad():
        for w in words:
            mod_b.wte.weight[tok_b.convert_tokens_to_ids(w)] = mod_a.wte.weight[tok_a.convert_tokens_to_ids(w)]
    perm = np.random.default_rng(1).permutation(48)
    tree_b = FeatureTree(nx.DiGraph(), {"w48": _permuted(tree_a.saes["w48"], perm)},
                         ft.Config(model="tiny-gpt2-b", layer=0, widths=(48,), k=2))
    texts = [t + ("." if i % 3 == 0 else "") for i, t in enumerate(_corpus(60, seed=7))]  # "word." ends a third
    x_a, x_b = aligned_activations(texts, (mod_a, tok_a), 0, (mod_b, tok_b), 0)
    n_words = sum(len(t.split()) for t in texts)
    assert x_a.shape[0] == n_words - 20  # every word but the 20 "word." ones
    assert torch.allclose(x_a, x_b, atol=1e-5)
    m = match(tree_a, tree_b, texts=texts, model_a=(mod_a, tok_a), model_b=(mod_b, tok_b))
    assert m.n_tokens == n_words - 20 and m.rung_a == "w48"
    assert np.array_equal(perm[_index(m.pairs.a)], _index(m.pairs.b))
    assert np.allclose(m.pairs["corr"], 1.0, atol=1e-5)
    assert (m.pairs.label_a != m.pairs.a).any()  # tree A's labels ride along
    with pytest.raises(FeatureTreeError, match="no config"):
        match(tree_a.saes["w48"], tree_b, texts=texts)


# ---- novel -----------------------------------------------------------------------------------------------
def test_novel_ranks_the_unseen_word_features_first(tiny_run):
    model, _, tree = tiny_run
    texts = _corpus(20, seed=10, words=[*WORDS, *[NEW] * 6])  # the corpus's words, and NEW on ~1 token in 6
    df = novel(tree, texts, model=model, layer=0, top=None)
    assert list(df.log_ratio) == sorted(df.log_ratio, reverse=True)
    assert set(df.direction) == {"up", "down"} and ((df.log_ratio > 0) == (df.direction == "up")).all()
    assert "root" not in set(df.node)
    best = df.iloc[0]
    assert best.direction == "up" and best.rate > 5 * best.freq
    # truth, measured apart from novel: the best node fires on the unseen word, hardly on the other words
    acts = ft.collect(model, 0, texts, out=None, progress=False)
    rung, j = best.node.rsplit("/", 1)
    _, _, F = fire(tree.saes[rung], acts.load("all"), tree.graph.graph["fire_rel"])
    on = np.asarray(F[:, int(j)].todense()).ravel() > 0
    is_new = np.array(acts.token_strings(acts.tokens("all")["token_id"].tolist())) == NEW
    assert on[is_new].mean() > 0.5 and on[is_new].mean() > 5 * max(on[~is_new].mean(), 1e-3)
    assert len(novel(tree, texts, model=model, layer=0, top=3)) == 3


# ---- CLI -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("match-cli")
    corpus = d / "corpus.txt"
    texts = ["the dog barked at the cat all night", "a small bird sang in the tall oak tree",
             "the doctor treated the patient for a fever", "the court ruled that the contract was void",
             "the river flows into the sea near the town", "an eagle is a large bird of prey"] * 12
    corpus.write_text("\n".join(f"{t} ({i})" for i, t in enumerate(texts)) + "\n")
    cfg = ft.Config(corpus=str(corpus), n_tokens=1200, widths=(16, 32), k=4, epochs=2, batch_size=128)
    tree = ft.build(cfg, out=d / "a", progress=False)
    acts = Activations(d / "a" / "acts")
    other = ft.link(ft.train_ladder(acts, cfg.widths, k=cfg.k, epochs=2, batch_size=128, seed=1, progress=False),
                    acts)
    other.config = tree.config
    ft.save(other, d / "b")
    return d


def test_match_and_novel_cli(two_runs, capsys):
    a, b = two_runs / "a", two_runs / "b"
    assert main(["-q", "match", str(a), str(b), "--rung-a", "w16", "--threshold", "0.5", "--top", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("w16 vs w32:") and "live features shared (corr >= 0.50)" in lines[0]
    assert lines[1].split()[:4] == ["a", "b", "corr", "cos"] and 3 <= len(lines) <= 7
    texts = two_runs / "new.txt"
    texts.write_text("the eagle and the hawk hunt mice\n\na whale sang in the deep sea\n")
    assert main(["-q", "novel", str(a), str(texts), "--top", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["node", "log_ratio", "direction"] and len(lines) == 5
    assert main(["-q", "match", str(a), str(two_runs / "nope")]) == 2
    assert main(["-q", "novel", str(a), str(two_runs / "missing.txt")]) == 2
    err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("featuretree: error:")]
    assert len(err) == 2 and "nope" in err[0] and "missing.txt" in err[1]
