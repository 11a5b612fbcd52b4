"""WordNet purity: label_purity agrees with a direct count over firing tokens; the CLI prints it."""

from collections import Counter

import numpy as np
import pytest
import torch

import featuretree as ft
from featuretree.activations import Activations
from featuretree.eval import label_purity, purity_gain

pytestmark = pytest.mark.slow  # the quick loop (-m 'not slow') leaves it out


@pytest.fixture(scope="module")
def wordnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wn")
    tree = ft.build(ft.Config(n_tokens=5000, widths=(16, 64), k=4, epochs=2, batch_size=512), out=out,
                    progress=False)
    return out, tree, Activations(out / "acts"), ft.load_corpus("wordnet").labels


def _direct(tree, acts, labels, node, column):
    rung, j = node.rsplit("/", 1)
    sae, j = tree.saes[rung], int(j)
    x = acts.load("heldout")
    codes = sae.dense_codes(x)[:, j]  # (n,)
    on = codes[codes > 0]
    q90 = torch.quantile(on.double(), 0.9).item()  # same firing rule as link: >= 0.25 x 90th percentile
    fires = (codes >= 0.25 * q90) & (codes > 0)
    docs = acts.tokens("heldout")["doc_id"].to_numpy()[fires.numpy()]
    counts = Counter()
    for d in docs:
        v = labels.at[d, column]
        counts.update(v if isinstance(v, list) else [v])
    lab, c = counts.most_common(1)[0]
    return lab, c / len(docs), len(docs)


@pytest.mark.parametrize("column", ["lexname", "domains"])
def test_purity_matches_a_direct_count(wordnet_run, column):
    _, tree, acts, labels = wordnet_run
    pur = label_purity(tree, acts, labels, column=column, min_tokens=5)
    assert len(pur) > 10 and ((pur.purity >= 0) & (pur.purity <= 1)).all()
    assert (pur.top.isna() == (pur.purity == 0)).all()
    labelled = pur[pur.purity > 0]
    for node in labelled.sort_values("n_fire").node.iloc[:: max(1, len(labelled) // 6)]:
        lab, share, n = _direct(tree, acts, labels, node, column)
        assert pur.at[node, "n_fire"] == n
        assert np.isclose(pur.at[node, "purity"], share, atol=1e-6), (node, pur.loc[node].to_dict(), lab, share)
    gain = purity_gain(tree, pur)
    assert gain["n_edges"] > 0 and 0 <= gain["child_purer"] <= 1


def test_eval_wordnet_cli(wordnet_run, capsys):
    from featuretree.__main__ import main

    out, *_ = wordnet_run
    assert main(["-q", "eval", "wordnet", str(out)]) == 0
    text = capsys.readouterr().out
    assert "lexname" in text and "domains" in text and "child purer than parent" in text
    assert main(["-q", "eval", "wordnet"]) == 2


def test_refined_purity_counts_gated_tokens_and_the_cli_prints_it(wordnet_run, capsys):
    from featuretree.__main__ import main
    from featuretree.firing import node_mask

    out, tree, acts, labels = wordnet_run
    node = max(tree.roots(), key=lambda n: tree.graph.nodes[n]["freq"])
    deep = ft.refine(tree, node, width=8, k=1, min_tokens=50, stream_tokens=0, progress=False)
    pur = label_purity(deep, acts, labels, min_tokens=1)
    x = acts.load("heldout")
    kids = [c for c in deep.graph.successors(node) if deep.graph.nodes[c].get("refined")]
    measured = [c for c in kids if c in pur.index]
    assert measured
    for c in measured:  # a refined child's firing tokens are gated by its parent's
        assert pur.at[c, "n_fire"] == node_mask(deep, c, x).sum()
    assert main(["-q", "eval", "refine", str(out), "--nodes", node, "--widths", "8", "--ks", "1", "2",
                 "--stream-tokens", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["node", "width", "k", "parent_purity"] and len(lines) == 3
    assert main(["-q", "eval", "refine", str(out)]) == 2


def test_eval_find_cli_prints_purity_per_domain_and_level(wordnet_run, capsys, tmp_path):
    import pandas as pd

    from featuretree.__main__ import main

    out, *_ = wordnet_run
    assert main(["-q", "eval", "find", str(out), "--n-query", "5", "--n-pool", "600",
                 "--csv", str(tmp_path / "f.csv")]) == 0
    text = capsys.readouterr().out
    assert "lexname: purity of the top node given 5 glosses" in text and "mean purity: token" in text
    df = pd.read_csv(tmp_path / "f.csv")
    assert set(df.level) == {"token", "document"} and df.purity.between(0, 1).all()
    assert (df.groupby(["column", "domain"]).size() == 2).all() and "noun.animal" in set(df.domain)
    assert main(["-q", "eval", "find"]) == 2
