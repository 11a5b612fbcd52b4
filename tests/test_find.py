"""find: the node it ranks first really is specific to the query in the corpus; negatives and labels move scores."""

import random

import numpy as np
import pytest
import torch
from _models import tiny_gpt2

from featuretree import FeatureTreeError, collect, link, load_model, train_ladder
from featuretree.find import find
from featuretree.firing import fire, query_rates

WORDS = ("the a cat dog bird tree river mountain house small large red runs jumps sings grows of in on with "
         "photosynthesis chlorophyll enzyme violin symphony anthrax bacterium infection geology basalt").split()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(400)]
    model = load_model(tiny_gpt2(WORDS, n_layer=1))
    acts = collect(model, 0, texts, n_tokens=12_000, out=tmp_path_factory.mktemp("acts"), progress=False)
    torch.manual_seed(0)
    saes = train_ladder(acts, (16, 48), k=2, epochs=8, batch_size=256, progress=False)
    return model, acts, link(saes, acts)


def test_best_hit_fires_on_the_query_word_in_the_corpus(run):
    model, acts, tree = run
    hits = find(tree, "anthrax", model=model, layer=0)
    assert list(hits.score) == sorted(hits.score, reverse=True)
    best = hits.iloc[0]
    assert best.query_rate > 0 and best.score > 1.0
    # truth from the corpus, not from find: the best node fires far more on "anthrax" tokens than elsewhere
    rung, j = best.node.rsplit("/", 1)
    x = acts.load("heldout")
    toks = acts.tokens("heldout")
    _, _, F = fire(tree.saes[rung], x, tree.graph.graph["fire_rel"])
    on = np.asarray(F[:, int(j)].todense()).ravel() > 0
    is_q = np.array(acts.token_strings(toks["token_id"].tolist())) == "anthrax"
    assert on[is_q].mean() > 5 * max(on[~is_q].mean(), 1e-3)


def test_negatives_and_label_matches_move_scores(run):
    model, _, tree = run
    plain = find(tree, "anthrax", model=model, layer=0, top=None, label_weight=0.0).set_index("node")
    neg = find(tree, "anthrax", negatives=["anthrax anthrax"], model=model, layer=0, top=None,
               label_weight=0.0).set_index("node")
    best = plain.index[0]
    assert neg.loc[best, "score"] < plain.loc[best, "score"]  # it fires on the negatives too
    labelled = find(tree, "anthrax", model=model, layer=0, top=None, label_weight=2.0).set_index("node")
    diff = labelled.score - plain.score.reindex(labelled.index)
    assert np.allclose(diff, 2.0 * labelled.label_hits)
    rates = query_rates(tree, ["anthrax"], model=model, layer=0)
    assert rates["_n_tokens"] == 1.0 and rates[best] == 1.0


def test_rungs_limit_the_ranking(run):
    model, _, tree = run
    every = find(tree, "anthrax", model=model, layer=0, top=None)
    coarse = find(tree, "anthrax", rungs=["w16"], model=model, layer=0, top=None)
    assert coarse.node.str.startswith("w16/").all() and len(coarse) == every.node.str.startswith("w16/").sum()
    assert coarse.node.tolist() == every[every.node.str.startswith("w16/")].node.tolist()  # same order
    assert find(tree, "anthrax", rungs=48, model=model, layer=0, top=None).node.str.startswith("w48/").all()
    with pytest.raises(FeatureTreeError, match=r"rungs \['w99'\] are not in the tree"):
        find(tree, "anthrax", rungs=["w99"], model=model, layer=0)


def test_find_errors(run):
    model, _, tree = run
    with pytest.raises(FeatureTreeError, match="query is empty"):
        find(tree, "  ", model=model, layer=0)
    with pytest.raises(FeatureTreeError, match="no config"):
        find(tree, "anthrax")
    with pytest.raises(FeatureTreeError, match="no config"):
        find(tree, "anthrax", model=model)  # a model but no layer: say so, no AttributeError


def fires_on_word(tree, acts, node, word):
    """(rate on `word` tokens, rate elsewhere) of `node` on the store's tokens, gated like the tree fires."""
    from featuretree.firing import node_mask

    on = node_mask(tree, node, acts.load("all"))
    is_w = np.array(acts.token_strings(acts.tokens("all")["token_id"].tolist())) == word
    return on[is_w].mean(), on[~is_w].mean()


def test_search_descends_to_a_refined_node_specific_to_the_query(run):
    from featuretree import search

    model, acts, tree = run
    path = search(tree, "anthrax", model=model, layer=0, width=8, k=1, min_tokens=30, max_tokens=3000,
                  stream_tokens=0, max_depth=5, progress=False)
    deep = path.attrs["tree"]
    assert len(path) >= 1 and path.refined.any(), path
    chain = [n for passed, node in zip(path.passed, path.node) for n in [*filter(None, passed.split(" > ")), node]]
    for a, b in zip(chain, chain[1:]):  # each step is a child of the one before (through any node passed over)
        assert deep.graph.has_edge(a, b)
    assert (path.query_rate > 0).all() and (path.score > 0).all()
    on_word, elsewhere = fires_on_word(deep, acts, path.node.iloc[-1], "anthrax")
    assert on_word > 5 * max(elsewhere, 1e-3), (on_word, elsewhere)
    assert not any("/r8" in n for n in tree.graph)  # the input tree is untouched
    # from a given start: the path begins there and stays in its subtree
    start = path.node.iloc[0]
    under = search(tree, "anthrax", start=start, model=model, layer=0, refine_leaves=False, progress=False, min_lift=0)
    assert under.node.iloc[0] == start and under.step.tolist() == list(range(len(under)))
    assert all(tree.graph.has_edge(a, b) for a, b in zip(under.node, under.node[1:]))
    with pytest.raises(FeatureTreeError, match="unknown node"):
        search(tree, "anthrax", start="w16/999", model=model, layer=0, progress=False)


def test_search_passes_over_nodes_not_about_the_query(corpus_run):
    """min_lift=0 lists every node of the branch; a floor no node clears passes over all but the branch's best,
    which is the same end, reached through the same nodes (named in `passed`); a floor in between keeps the
    nodes whose concept precision clears it."""
    from featuretree import search

    model, _, tree, _ = corpus_run
    kw = dict(model=model, refine_leaves=False, progress=False)
    every = search(tree, "anthrax", min_lift=0, **kw)
    none = search(tree, "anthrax", min_lift=1e9, **kw)
    assert len(every) >= 2 and (every.passed == "").all(), every
    assert none.node.tolist() == [every.node.iloc[-1]] and none.passed.iloc[0] == " > ".join(every.node.iloc[:-1])
    mid = search(tree, "anthrax", min_lift=0.5, **kw)
    assert set(mid.node) <= set(every.node) and mid.node.iloc[-1] == every.node.iloc[-1]
    prec = dict(zip(every.node, every.precision))
    passed = [n for p in mid.passed for n in filter(None, p.split(" > "))]
    assert sorted([*passed, *mid.node], key=every.node.tolist().index) == every.node.tolist()
    kept = [n for n in mid.node.iloc[:-1]]  # the end is never passed over: its branch's best is itself
    if passed and kept:  # every node kept on the way is more specific to the query than every node passed over
        assert min(prec[n] for n in kept) > max(prec[n] for n in passed)
    with pytest.raises(FeatureTreeError, match="min_lift=-1"):
        search(tree, "anthrax", min_lift=-1, **kw)


def test_refine_streams_texts_beyond_the_store(run):
    from featuretree import refine

    model, acts, tree = run
    node = find(tree, "anthrax", model=model, layer=0).node.iloc[0]
    rng = random.Random(1)
    extra = [" ".join(rng.choice(WORDS) for _ in range(30)) + " anthrax bacterium infection" for _ in range(300)]
    deep = refine(tree, node, width=8, k=1, texts=extra, model=model, layer=0, min_tokens=50, max_tokens=20_000,
                  stream_tokens=5_000, progress=False)
    info = deep.graph.graph["refined"][f"{node}/r8"]
    assert info["n_scanned"] > len(acts)  # it read the whole store, then streamed the new texts
    kids = [c for c in deep.graph.successors(node) if deep.graph.nodes[c].get("refined")]
    assert kids and all(deep.graph.nodes[c]["top_tokens"] for c in kids)  # labelled from streamed contexts
    assert all(set(deep.graph.nodes[c]["top_tokens"]) <= set(WORDS) for c in kids)
    # a goal streaming cannot reach at the node's rate in the store fails at once, before any streaming
    with pytest.raises(FeatureTreeError, match="would add about"):
        refine(tree, node, width=8, k=1, texts=extra, model=model, layer=0, min_tokens=10**6, max_tokens=10**7,
               stream_tokens=5_000, progress=False)


def test_search_follows_the_branch_that_leads_to_the_best_score():
    """A weak broad feature above a very specific one beats a sibling that only scores well itself."""
    import networkx as nx
    import pandas as pd

    from featuretree.find import answering, branch_reach
    from featuretree.tree import FeatureTree

    g = nx.DiGraph([("w2/0", "w8/0"), ("w2/0", "w8/1"), ("w2/1", "w8/2"), ("w8/2", "w32/5")])
    scores = pd.DataFrame({"score": [1.0, 2.5, 0.4, -1.0, 0.8, 3.9], "query_rate": [0.9, 0.9, 0.3, 0.0, 0.5, 0.5]},
                          index=["w2/0", "w2/1", "w8/0", "w8/1", "w8/2", "w32/5"])
    reach = branch_reach(FeatureTree(g), scores)
    assert reach["w2/0"] == 1.0 and reach["w2/1"] == 3.9 and reach["w8/2"] == 3.9 and "w8/1" not in reach
    assert answering(["w8/0", "w8/1"], scores) == ["w8/0"]
    scores.loc["w8/2", "score"] = -0.5  # a branch through a node that does not answer does not count
    assert branch_reach(FeatureTree(g), scores)["w2/1"] == 2.5


def test_document_level_scoring_prefers_the_topical_feature_over_an_incidental_one():
    """Planted firing: A fires once in 16 of 20 examples (topical), B ten times in 3 (incidental, more tokens)."""
    import networkx as nx
    import scipy.sparse as sp

    from featuretree.find import node_scores
    from featuretree.firing import QueryFiring
    from featuretree.tree import FeatureTree

    g = nx.DiGraph()
    g.add_node("w2/0", rung="w2", index=0, freq=0.02, label="A")
    g.add_node("w2/1", rung="w2", index=1, freq=0.002, label="B")
    doc, col = [], []
    for d in range(20):  # every example has 8 tokens
        doc += [d] * 8
        col += [0 if d < 16 else -1] + ([1] * 7 if d >= 17 else [-1] * 7)
    rows = [i for i, c in enumerate(col) if c >= 0]
    F = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, [col[i] for i in rows])), shape=(len(col), 2))
    q = QueryFiring({"w2": F}, np.array(doc), 20)
    assert q.document_rates() == {"w2/0": 0.8, "w2/1": 0.15}
    assert q.token_rates()["w2/1"] > q.token_rates()["w2/0"]
    tree = FeatureTree(g)
    token = node_scores(tree, q, level="token", bg_rates={}, label_weight=0)
    doc_level = node_scores(tree, q, level="document", bg_rates={"w2/0": 0.1, "w2/1": 0.01}, label_weight=0)
    assert token.node.iloc[0] == "w2/1" and doc_level.node.iloc[0] == "w2/0"
    assert doc_level.set_index("node").loc["w2/0", "doc_rate"] == 0.8
    sub = q.subset([15, 17])  # one text where only A fires, one where only B does
    assert sub.n_docs == 2 and sub.document_rates() == {"w2/0": 0.5, "w2/1": 0.5}


def test_find_by_document_ranks_what_most_examples_share(run):
    model, acts, tree = run
    rng = random.Random(3)
    filler = [w for w in WORDS if w not in ("anthrax", "basalt")]

    def text(extra):
        return " ".join(rng.sample(filler, 6) + extra)

    examples = [text(["anthrax"]) for _ in range(10)] + [text(["basalt"] * 15) for _ in range(2)]
    background = [text([rng.choice(WORDS)]) for _ in range(200)]
    by_token = find(tree, examples, model=model, layer=0, level="token", label_weight=0, top=None)
    by_doc = find(tree, examples, model=model, layer=0, background=background, label_weight=0, top=None)
    assert by_doc.doc_rate.iloc[0] >= 0.8  # the auto level for example texts is by document
    best = by_doc.node.iloc[0]
    on_anthrax, elsewhere = fires_on_word(tree, acts, best, "anthrax")
    assert on_anthrax > 5 * max(elsewhere, 1e-3)
    on_basalt, _ = fires_on_word(tree, acts, by_token.node.iloc[0], "basalt")
    assert on_basalt > 0.5  # token rates reward the two texts that repeat "basalt"
    with pytest.raises(FeatureTreeError, match="needs background texts"):
        find(tree, examples, model=model, layer=0, level="document")
    with pytest.raises(FeatureTreeError, match="level='sentence' is not one of"):
        find(tree, examples, model=model, layer=0, level="sentence")


@pytest.mark.slow
def test_find_purity_finds_each_planted_topic(caplog):
    """Planted topics: every text has two words of its topic among ten filler words; given 20 texts of a topic,
    find's top node (by document) fires in texts of that topic only, far above the topic's base rate."""
    import pandas as pd

    from featuretree.corpus import Corpus
    from featuretree.eval import find_purity

    topics = {"bio": ["photosynthesis", "chlorophyll", "enzyme", "bacterium"], "music": ["violin", "symphony"],
              "geo": ["geology", "basalt"]}
    filler = "the a cat dog bird tree river mountain house small large red runs".split()
    rng = random.Random(5)
    texts, labels = [], []
    for i in range(1500):
        topic = ["bio", "music", "geo"][i % 3]
        words = rng.sample(filler, 10) + [rng.choice(topics[topic]) for _ in range(2)]
        texts.append(" ".join(rng.sample(words, len(words))))
        labels.append(topic)
    corpus = Corpus(texts=texts, labels=pd.DataFrame({"topic": labels}))
    model = load_model(tiny_gpt2(filler + [w for ws in topics.values() for w in ws], n_layer=1))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        acts = collect(model, 0, texts, n_tokens=30_000, out=tmp, progress=False)
        torch.manual_seed(0)
        tree = link(train_ladder(acts, (16, 48), k=2, epochs=12, batch_size=256, progress=False), acts)
    caplog.set_level("WARNING")
    caplog.clear()
    df = find_purity(tree, corpus, column="topic", n_query=20, n_pool=450, n_background=150, model=model, layer=0,
                     label_weight=0, progress=False)
    assert "collected them all" not in caplog.text  # a query's few texts are all there is: nothing to warn about
    assert set(df.domain) == {"bio", "geo", "music"} and len(df) == 6
    doc = df[df.level == "document"].set_index("domain")
    assert (doc.purity > 2 * doc.base_rate).all() and doc.purity.mean() > 0.85 and (doc.base_rate < 0.4).all(), doc
    assert (df.fires_in > 20).all()
    with pytest.raises(FeatureTreeError, match="no label column 'lexname'"):
        find_purity(tree, corpus, model=model, layer=0)


def test_concept_scoring_prefers_the_query_feature_then_its_topic_over_a_shared_subword(monkeypatch):
    """Planted firing on 4 contexts of "anthrax" (two pieces each) and 40 background texts: C fires on the
    whole word only, B on its second piece and in texts near it in meaning (disease), A on its first piece
    and in unrelated texts (ants), D everywhere. Concept scoring ranks C > B > D (no information) > A, which
    fires mostly where the query is not although it covers every occurrence."""
    import re

    import networkx as nx
    import pandas as pd
    import scipy.sparse as sp

    import featuretree.firing as firing
    from featuretree.find import ConceptQuery, Sample
    from featuretree.tree import FeatureTree

    texts_q = [f"ant hrax case {i}" for i in range(4)]  # the span "ant hrax": tokens 0 and 1 of each text
    tok_q = pd.DataFrame({"token_id": 0, "doc_id": np.repeat(np.arange(4), 3),
                          "start": np.tile([0, 4, 9], 4), "end": np.tile([3, 8, 13], 4)})
    kinds = ["ants"] * 20 + ["disease"] * 10 + ["other"] * 10
    tok_b = pd.DataFrame({"token_id": 0, "doc_id": np.repeat(np.arange(40), 3), "start": np.tile([0, 4, 9], 40),
                          "end": np.tile([3, 8, 13], 40)})
    e = np.eye(4, dtype=np.float32)
    near = (0.9 * e[0] + 0.44 * e[1]) / np.linalg.norm(0.9 * e[0] + 0.44 * e[1])
    emb_b = np.stack([e[2] if k == "ants" else near if k == "disease" else e[3] for k in kinds])
    query = Sample(texts_q, torch.zeros(12, 2), tok_q, np.tile(e[0], (4, 1)))
    background = Sample([f"{k} {i}" for i, k in enumerate(kinds)], torch.zeros(120, 2), tok_b, emb_b)
    cq = ConceptQuery("anthrax", query, background, re.compile("ant hrax"), n_query_docs=4, n_corpus=44)
    assert cq.n_occ == 4 and (cq.occ >= 0).sum() == 8

    F = np.zeros((132, 4), np.float32)
    F[0:12:3, 0] = 1                                  # A: first piece of every occurrence ...
    for d in range(20):
        F[12 + 3 * d: 12 + 3 * d + 2, 0] = 1          # ... and two tokens of every "ants" text
    F[[1, 4, 7], 1] = 1                               # B: second piece in 3 of 4 occurrences ...
    for d in range(20, 30):
        F[12 + 3 * d, 1] = 1                          # ... and one token of every "disease" text
    F[[0, 1, 3, 4, 6, 7, 9, 10], 2] = 1               # C: the whole word, nowhere else
    F[:, 3] = 1                                       # D: everything
    n_b = 120
    freq = [F[12:, j].sum() / n_b for j in range(3)] + [1.0]
    freq[2] = 8 / 132
    monkeypatch.setattr(firing, "fire_rungs", lambda tree, x, rungs=None: {"w4": sp.csr_matrix(F)})
    g = nx.DiGraph()
    for j, name in enumerate("ABCD"):
        g.add_node(f"w4/{j}", rung="w4", index=j, freq=float(freq[j]), label=name)
    s = cq.scores(FeatureTree(g), label_weight=0).set_index("label")
    assert list(s.index) == ["C", "B", "D", "A"]  # A fires mostly where the query is not: below chance
    assert s.loc["A", "coverage"] == 1.0 and s.loc["B", "coverage"] == 0.75 and s.loc["C", "coverage"] == 1.0
    assert s.loc["A", "precision"] < s.loc["B", "precision"] < s.loc["C", "precision"]
    assert abs(s.loc["D", "score"]) < 0.1 and s.loc["A", "score"] < 0 < s.loc["B", "score"]


@pytest.fixture(scope="module")
def corpus_run(run, tmp_path_factory):
    """The tiny run with a corpus file in its config, so concept scoring finds the query's contexts."""
    from featuretree.config import Config
    from featuretree.tree import FeatureTree

    model, acts, tree = run
    path = tmp_path_factory.mktemp("corpus") / "texts.txt"
    texts = [t for _, t in sorted(acts.texts().items())]
    path.write_text("\n".join(texts) + "\n")
    return model, acts, FeatureTree(tree.graph, tree.saes, Config(corpus=str(path), layer=0)), texts


def test_concept_search_refines_on_the_query_and_records_its_choices(corpus_run):
    from featuretree import search

    model, acts, tree, _ = corpus_run
    path = search(tree, "anthrax", model=model, width=8, k=1, min_tokens=30, max_tokens=3000, stream_tokens=0,
                  max_depth=5, progress=False)
    deep = path.attrs.pop("tree")
    assert len(path) >= 2 and path.coverage.notna().all(), path
    end = path.node.iloc[-1]  # refined; stepped into a refined child only where one does better
    assert f"{end}/r8" in deep.saes or path.refined.any() or "/r8" in end, (path, list(deep.saes))
    on_word, elsewhere = fires_on_word(deep, acts, end, "anthrax")
    assert on_word > 5 * max(elsewhere, 1e-3), (on_word, elsewhere)
    assert path.coverage.iloc[-1] > 0.5 and path.precision.iloc[-1] > path.precision.iloc[0]
    cands = path.attrs["candidates"]
    assert cands[cands.chosen].node.tolist() == path.node.tolist()  # one chosen candidate per step
    assert ((path.confidence > 0) & (path.confidence <= 1)).all()
    for _, grp in cands.groupby("step"):  # the chosen one leads to the best branch score
        assert grp[grp.chosen].reach.iloc[0] == grp.reach.max()


def test_search_quality_judges_the_end_node_against_the_query_spans(corpus_run):
    import pandas as pd

    from featuretree.corpus import Corpus
    from featuretree.eval import search_quality

    model, _, tree, texts = corpus_run
    topic = {"anthrax": "noun.state", "violin": "noun.artifact"}
    lex = [next((topic[w] for w in topic if w in t.split()), "noun.other") for t in texts]
    corpus = Corpus(texts, pd.DataFrame({"lexname": lex, "domains": [[]] * len(texts)}))
    queries = pd.DataFrame({"word": ["anthrax", "violin"], "lexname": ["noun.state", "noun.artifact"],
                            "domains": [[], []]})
    df = search_quality(tree, corpus, queries, model=model, n_pool=150, n_background=100, progress=False,
                        refine=True, width=8, k=1, min_tokens=30, max_tokens=3000, stream_tokens=0)
    assert df.word.tolist() == ["anthrax", "violin"]
    n_tok = sum(len(t.split()) for t in texts)
    for r in df.itertuples():
        share = sum(t.split().count(r.word) for t in texts) / n_tok  # a node firing everywhere scores this
        assert r.recall > 0.5 and r.precision > 3 * share, r
        assert 0 <= r.coherent <= 1 and r.path.split(" > ")[-1] == r.end_node
