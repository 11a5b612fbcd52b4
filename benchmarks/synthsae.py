"""SynthSAEBench: featuretree's ladder and tree on SAELens' synthetic activations with a known feature hierarchy.

    bash benchmarks/setup_env.sh                           # once: benchmarks/.venv with eai-sparsify and sae-lens
    benchmarks/.venv/bin/python benchmarks/synthsae.py     # CPU size: 2048 true features, d 256, 3 seeds (~6 min)
    benchmarks/.venv/bin/python benchmarks/synthsae.py --seeds 0 --n-train 40000 --epochs 2   # a quick look
    benchmarks/.venv/bin/python benchmarks/synthsae.py --full --device cuda   # the 16k recipe, for a GPU machine

Data: SAELens' SynthSAEBench generator (`sae_lens.synthetic.SyntheticModel`), configured as the published
SynthSAEBench-16k model (Zipfian firing exponent 0.5 from p 0.4 to 5e-4, hierarchy of 128 roots x branching 4
x depth 3 with every sibling group mutually exclusive and probabilities compensated for the gating, low-rank
(25, scale 0.1) firing correlation, orthogonalised dictionary, magnitudes linear 5 -> 4 with folded-normal
std, bias of norm 1) and, by default, scaled down by 8 in features and 3 in d_model: 2048 features (16 roots
x 4 x 4 x 4 = 1360 of them in the forest, the rest flat), d_model 256. Nothing is downloaded: the world is
built from its config (seeded), not `from_pretrained`.

Per seed (the world and the ladder both use it): sample n_train + n_eval tokens, train featuretree's ladder
(`train_ladder` on the tensor), link it on the held-out tokens with `ft.link(labels=False)` and with the
decoder-cosine baseline (`featuretree.eval.link_by_cosine`), and score on the held-out tokens:

- parent edges (featuretree.eval.edge_scores): every latent is matched to the true feature whose firing set
  it best overlaps (Jaccard >= 0.5, featuretree's firing rule, `match_features`); a tree edge p -> c whose
  ends match different true features predicts (T(p), T(c)); precision = share of those pairs in which T(p)
  is T(c)'s DIRECT true parent; recall = share of true edges whose two ends were both matched that some tree
  edge predicts. "ancestor precision" also accepts T(p) being any true ancestor of T(c) (a ladder rung may
  skip a level the narrower rung never learned).
- SAELens' own metrics per rung: each rung is saved (`TopKSAE.save`, SAELens layout), loaded back with
  `sae_lens.SAE.load_from_disk` and evaluated with `sae_lens.synthetic.eval_sae_on_synthetic_data` on the
  same held-out tokens (replayed, not resampled): MCC (Hungarian matching of decoder rows to true feature
  vectors by |cos|), uniqueness, and mean per-latent precision / recall / F1 of "latent != 0" against its
  best-|cos| true feature firing; plus explained variance, L0, dead latents.
- hierarchy-conditioned absorption (SAELens issue #729): for a true edge parent -> child, the parent
  latent's recall on tokens where the true parent is active and the child is inactive vs active (needs
  >= --min-tokens held-out tokens in each case); absorption = recall(child inactive) - recall(child active).
  With every sibling group mutually exclusive and most parent tokens carrying some child, "child inactive"
  mostly means "a sibling active", so the mean of that drop over sibling edges cancels by construction;
  the share of edges dropping by > 0.1 (and rising by > 0.1) and the drop against "parent on with none of
  its children" (recall(parent alone) - recall(child active), parents with >= --min-tokens such tokens)
  are printed beside it.
  Per rung, the parent latent is the rung's best-|cos| decoder row for the parent (SAELens' matching; no
  threshold, so badly absorbed parents still count). For the ladder, it is the latent best matching the
  parent by firing Jaccard among those `match_features` maps to it, for edges whose child is matched too.
  For the trees, the parent is read as "that latent or any of its tree descendants fires": how much of the
  absorbed recall a tree gives back, and the precision it costs.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import tempfile
import time
from pathlib import Path

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch
from common import machine_info, markdown_table, print_info, set_threads

# SynthSAEBench-16k's published configuration (SAELens docs, "SynthSAEBench"), and this benchmark's CPU size.
RECIPES = {
    "cpu": dict(num_features=2048, hidden_dim=256, roots=16, branching=4, depth=3, widths=(128, 512, 2048),
                k=11, n_train=300_000, n_eval=50_000, epochs=5, batch_size=1024),
    "full": dict(num_features=16384, hidden_dim=768, roots=128, branching=4, depth=3, widths=(1024, 4096, 16384),
                 k=34, n_train=2_000_000, n_eval=200_000, epochs=5, batch_size=4096),
}


def synthetic_config(num_features: int, hidden_dim: int, roots: int, branching: int, depth: int, seed: int):
    """SyntheticModelConfig of the SynthSAEBench-16k recipe at the given size."""
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig,
        HierarchyConfig,
        LinearMagnitudeConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    return SyntheticModelConfig(
        num_features=num_features, hidden_dim=hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(total_root_nodes=roots, branching_factor=branching, max_depth=depth,
                                  mutually_exclusive_portion=1.0, compensate_probabilities=True),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        seed=seed)


def true_tree(hierarchy, n: int) -> tuple[np.ndarray, np.ndarray]:
    """parent[i] (-1 for roots and for features outside the forest) and level[i] (0 for both) of SAELens'
    `Hierarchy.roots`."""
    parent, level = np.full(n, -1), np.zeros(n, dtype=int)
    stack = [(r, 0) for r in hierarchy.roots]
    while stack:
        node, lvl = stack.pop()
        for c in node.children:
            parent[c.feature_index], level[c.feature_index] = node.feature_index, lvl + 1
            stack.append((c, lvl + 1))
    return parent, level


def sample(model, n: int, *, chunk: int = 16_384, keep_features: bool = False):
    """n hidden activations (CPU float32) and, with keep_features, the true feature activations as CSR."""
    xs, fs = [], []
    for start in range(0, n, chunk):
        h, f = model.sample_with_features(min(chunk, n - start))
        xs.append(h.float().cpu())
        if keep_features:
            fs.append(sp.csr_matrix(f.float().cpu().numpy()))
    return torch.cat(xs), (sp.vstack(fs).tocsr() if keep_features else None)


class Replay:
    """Duck-typed ActivationGenerator for eval_sae_on_synthetic_data: hands back the stored held-out feature
    activations in order, so SAELens' metrics are measured on exactly the tokens the tree is scored on."""

    def __init__(self, feats: sp.csr_matrix, device: str) -> None:
        self.feats, self.device, self.pos = feats, device, 0

    def sample(self, n: int) -> torch.Tensor:
        rows = self.feats[self.pos:self.pos + n]
        self.pos += n
        return torch.from_numpy(rows.toarray()).to(self.device)


def saelens_metrics(sae, model, feats: sp.csr_matrix, device: str, tmp: Path) -> dict:
    """SAELens' eval_sae_on_synthetic_data on one rung, loaded from featuretree's saved files."""
    from sae_lens import SAE
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    theirs = SAE.load_from_disk(str(sae.save(tmp / f"w{sae.width}")), device=device)
    fd = model.feature_dict.to(device)
    r = eval_sae_on_synthetic_data(theirs, fd, Replay(feats, device), num_samples=feats.shape[0], batch_size=4096)
    return {"mcc": r.mcc, "uniq": r.uniqueness, "prec": r.classification.precision,
            "rec": r.classification.recall, "f1": r.classification.f1_score, "ev": r.explained_variance,
            "l0": r.sae_l0, "true_l0": r.true_l0, "dead": r.dead_latents / sae.width}


def conditional_recall(fired: np.ndarray, p_on: np.ndarray, c_on: np.ndarray, alone: np.ndarray, min_tokens: int):
    """(recall where the parent is on and the child off, where both are on, where the parent is on with none of
    its children), or None if one of the first two cases has fewer than min_tokens tokens; the third is NaN
    when it has fewer. All arguments are bool arrays over the held-out tokens (`alone`: parent on, no child)."""
    off, on = p_on & ~c_on, p_on & c_on
    if off.sum() < min_tokens or on.sum() < min_tokens:
        return None
    return (float(fired[off].mean()), float(fired[on].mean()),
            float(fired[alone].mean()) if alone.sum() >= min_tokens else float("nan"))


class Truth:
    """Bool firing columns of the true features (and of "parent on, no child on"), cached per feature."""

    def __init__(self, active: sp.csc_matrix, parent: np.ndarray) -> None:
        self.active, self.parent, self.cache, self.alone_cache = active, parent, {}, {}

    def on(self, t: int) -> np.ndarray:
        if t not in self.cache:
            self.cache[t] = column(self.active, t)
        return self.cache[t]

    def alone(self, p: int) -> np.ndarray:
        if p not in self.alone_cache:
            self.alone_cache[p] = self.on(p) & ~column(self.active, np.flatnonzero(self.parent == p))
        return self.alone_cache[p]


def column(F: sp.csc_matrix, j) -> np.ndarray:
    """Bool (n,) of tokens where any of the columns `j` of a CSC firing matrix fires."""
    return np.asarray(F[:, j].sum(1)).ravel() > 0


def absorption_by_cos(sae, F: sp.csc_matrix, directions: torch.Tensor, edges, truth: Truth,
                      min_tokens: int) -> list[tuple[float, float, float]]:
    """Per true edge: the conditional recalls of the rung's best-|cos| latent for the parent."""
    W = torch.nn.functional.normalize(sae.W_dec.detach().float().cpu(), dim=1)
    best = (torch.nn.functional.normalize(directions, dim=1) @ W.T).abs().argmax(1).numpy()
    out = []
    for p, c in edges:
        r = conditional_recall(column(F, best[p]), truth.on(p), truth.on(c), truth.alone(p), min_tokens)
        if r is not None:
            out.append(r)
    return out


def absorption_tree(trees: dict, fires: dict, jac: dict, m: dict, edges, truth: Truth, min_tokens: int) -> dict:
    """Conditional recalls of the firing-matched parent latent alone and of its subtree in each tree.

    For every true edge whose two ends are matched, the parent latent is the node with the highest Jaccard
    among those matched to the parent. Returns {row name: (list of (off, on) recalls, list of precisions)}.
    """
    best: dict[int, tuple[float, str]] = {}
    for node, t in m.items():
        rung, j = node.rsplit("/", 1)
        s = float(jac[rung][int(j), t])
        if t not in best or s > best[t][0]:
            best[t] = (s, node)
    rows: dict[str, tuple[list, list]] = {"latent": ([], [])}
    rows.update({name: ([], []) for name in trees})
    for p, c in edges:
        if p not in best or c not in best:
            continue
        node = best[p][1]
        p_on, c_on, alone = truth.on(p), truth.on(c), truth.alone(p)
        rung, j = node.rsplit("/", 1)
        reads = {"latent": column(fires[rung], int(j))}
        for name, tree in trees.items():
            sub = {node} | nx.descendants(tree.graph, node)
            by_rung: dict[str, list[int]] = {}
            for s in sub:
                r, i = s.rsplit("/", 1)
                by_rung.setdefault(r, []).append(int(i))
            reads[name] = np.logical_or.reduce([column(fires[r], ix) for r, ix in by_rung.items()])
        if conditional_recall(reads["latent"], p_on, c_on, alone, min_tokens) is None:
            continue
        for name, fired in reads.items():
            rows[name][0].append(conditional_recall(fired, p_on, c_on, alone, min_tokens))
            rows[name][1].append(float(p_on[fired].mean()) if fired.any() else 0.0)
    return rows


def ancestor_precision(tree, m: dict, parent: np.ndarray) -> float:
    """Share of predicted pairs (T(p), T(c)) where T(p) is any true ancestor of T(c)."""
    def ancestors(t):
        out = set()
        while parent[t] >= 0:
            t = int(parent[t])
            out.add(t)
        return out

    pred = {(m[p], m[c]) for p, c in tree.graph.edges if p in m and c in m and m[p] != m[c]}
    return sum(tp in ancestors(tc) for tp, tc in pred) / len(pred) if pred else 0.0


def run_seed(seed: int, cfg: dict, args) -> dict:
    from sae_lens.synthetic import SyntheticModel

    import featuretree as ft
    from featuretree.eval import Planted, edge_scores, jaccard, link_by_cosine, match_features
    from featuretree.firing import fire_rungs
    from featuretree.train import train_ladder

    t0 = time.perf_counter()
    model = SyntheticModel(synthetic_config(cfg["num_features"], cfg["hidden_dim"], cfg["roots"], cfg["branching"],
                                            cfg["depth"], seed), device=args.device)
    torch.manual_seed(seed)
    x_train, _ = sample(model, cfg["n_train"])
    x_eval, feats = sample(model, cfg["n_eval"], keep_features=True)
    parent, level = true_tree(model.hierarchy, cfg["num_features"])
    directions = model.feature_dict.feature_vectors.detach().float().cpu()
    active = (feats > 0).astype(bool).tocsr()
    planted = Planted(x_eval, directions, parent, level, active)
    t_gen = time.perf_counter() - t0

    t0 = time.perf_counter()
    saes = train_ladder(x_train, tuple(cfg["widths"]), k=cfg["k"], epochs=cfg["epochs"],
                        batch_size=cfg["batch_size"], seed=seed, device=args.device, eval_acts=x_eval,
                        progress=False)
    saes = {w: s.to("cpu") for w, s in saes.items()}
    t_train = time.perf_counter() - t0
    del x_train

    t0 = time.perf_counter()
    trees = {"featuretree link": ft.link(saes, x_eval, labels=False), "decoder cosine": link_by_cosine(saes, x_eval)}
    t_link = time.perf_counter() - t0

    t0 = time.perf_counter()
    edges = sorted((int(p), int(c)) for c, p in enumerate(parent) if p >= 0)
    active_c = active.tocsc()
    tree = trees["featuretree link"]
    fires = {r: F.tocsc() for r, F in fire_rungs(tree, x_eval).items()}
    jac = {r: jaccard(F.tocsr(), active) for r, F in fires.items()}
    m = match_features(tree, planted)
    out: dict = {"rules": {}, "rungs": {}, "seconds": {}}
    for name, tr in trees.items():
        s = edge_scores(tr, planted)
        s["ancestor_precision"] = ancestor_precision(tr, m, parent)
        out["rules"][name] = s
    truth = Truth(active_c, parent)
    out["absorption"] = absorption_tree(trees, fires, jac, m, edges, truth, args.min_tokens)
    with tempfile.TemporaryDirectory(prefix="featuretree-synthsae-") as tmp:
        for w, sae in saes.items():
            r = f"w{w}"
            row = saelens_metrics(sae, model, feats, args.device, Path(tmp))
            row["fvu"] = sae.metrics["fvu"]
            row["matched"] = sum(1 for node in m if node.startswith(r + "/"))
            row["features"] = len({t for node, t in m.items() if node.startswith(r + "/")})
            row["absorption"] = absorption_by_cos(sae, fires[r], directions, edges, truth, args.min_tokens)
            out["rungs"][r] = row
    t_score = time.perf_counter() - t0
    out["seconds"] = {"generate": t_gen, "train": t_train, "link": t_link, "score": t_score}
    out["truth"] = {"edges": len(edges), "in_forest": int((parent >= 0).sum() + len(model.hierarchy.roots)),
                    "true_l0": float(np.diff(active.indptr).mean()),
                    "recovered": len(set(m.values())) / cfg["num_features"]}
    return out


def mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def f3(v: float) -> str:
    return "n/a" if v != v else f"{v:.3f}"


def report(results: list[dict], cfg: dict, seeds) -> None:
    rungs = list(results[0]["rungs"])
    rules = list(results[0]["rules"])

    def absorb(pairs_of_seeds):  # [(off, on, alone), ...] per seed -> formatted seed means
        offs = [mean(p[0] for p in ps) for ps in pairs_of_seeds]
        ons = [mean(p[1] for p in ps) for ps in pairs_of_seeds]
        big = mean(mean(p[0] - p[1] > 0.1 for p in ps) for ps in pairs_of_seeds)
        neg = mean(mean(p[0] - p[1] < -0.1 for p in ps) for ps in pairs_of_seeds)
        with_alone = [[p for p in ps if p[2] == p[2]] for ps in pairs_of_seeds]
        alone = mean(mean(p[2] for p in ps) for ps in with_alone)
        alone_gap = mean(mean(p[2] - p[1] for p in ps) for ps in with_alone)
        return (f3(mean(offs)), f3(mean(ons)), f3(mean(o - n for o, n in zip(offs, ons))), f"{f3(big)} / {f3(neg)}",
                f3(alone), f3(alone_gap), f"{mean(len(ps) for ps in pairs_of_seeds):.0f} / "
                f"{mean(len(ps) for ps in with_alone):.0f}")

    print(f"## Summary (mean over seeds {', '.join(map(str, seeds))})\n")
    header = ["dictionary / tree", "MCC (SAELens)", "F1 (SAELens)", "parent-edge precision", "parent-edge recall",
              "parent recall, child off", "parent recall, child on", "absorption (drop)", "share of edges: drop > 0.1 / < -0.1",
              "parent recall, parent alone", "drop vs parent alone", "edges scored / with parent alone"]
    rows = []
    for r in rungs:
        a = absorb([res["rungs"][r]["absorption"] for res in results])
        rows.append([f"{r} (parent = its best-cos latent)", f3(mean(res["rungs"][r]["mcc"] for res in results)),
                     f3(mean(res["rungs"][r]["f1"] for res in results)), "", "", *a])
    a = absorb([res["absorption"]["latent"][0] for res in results])
    rows.append(["ladder (parent = its firing-matched latent)", "", "", "", "", *a])
    for rule in rules:
        a = absorb([res["absorption"][rule][0] for res in results])
        rows.append([f"tree: {rule} (parent = that latent + its descendants)", "", "",
                     f3(mean(res["rules"][rule]["precision"] for res in results)),
                     f3(mean(res["rules"][rule]["recall"] for res in results)), *a])
    print(markdown_table(header, rows))

    print("\n## Parent edges against the true hierarchy (seed means)\n")
    header = ["rule", "precision (direct parent)", "precision (any ancestor)", "recall (both ends matched)",
              "recall (all true edges)", "predicted pairs", "true edges with both ends matched",
              "subtree read: precision for the parent"]
    rows = [[rule, *(f3(mean(res["rules"][rule][key] for res in results))
                     for key in ("precision", "ancestor_precision", "recall", "recall_all")),
             f"{mean(res['rules'][rule]['n_predicted'] for res in results):.0f}",
             f"{mean(res['rules'][rule]['n_reachable'] for res in results):.0f}",
             f3(mean(mean(res["absorption"][rule][1]) for res in results))] for rule in rules]
    rows.append(["(parent latent alone)", "", "", "", "", "", "",
                 f3(mean(mean(res["absorption"]["latent"][1]) for res in results))])
    print(markdown_table(header, rows))

    print("\n## Per rung: featuretree FVU and SAELens' eval_sae_on_synthetic_data (seed means)\n")
    header = ["rung", "FVU", "explained var.", "L0", "dead", "MCC", "uniqueness", "precision", "recall", "F1",
              "latents matched (Jaccard >= 0.5)", "true features matched"]
    rows = [[r, *(f3(mean(res["rungs"][r][key] for res in results))
                  for key in ("fvu", "ev", "l0", "dead", "mcc", "uniq", "prec", "rec", "f1")),
             f"{mean(res['rungs'][r]['matched'] for res in results):.0f}",
             f"{mean(res['rungs'][r]['features'] for res in results):.0f}"] for r in rungs]
    print(markdown_table(header, rows))

    print("\n## Per seed\n")
    header = ["seed", "true L0", "true features matched", *(f"{rule}: precision / recall" for rule in rules),
              *(f"{r} MCC / F1" for r in rungs), "seconds: generate / train / link / score"]
    rows = []
    for seed, res in zip(seeds, results):
        rows.append([seed, f"{res['truth']['true_l0']:.1f}", f3(res["truth"]["recovered"]),
                     *(f"{f3(res['rules'][rule]['precision'])} / {f3(res['rules'][rule]['recall'])}" for rule in rules),
                     *(f"{f3(res['rungs'][r]['mcc'])} / {f3(res['rungs'][r]['f1'])}" for r in rungs),
                     " / ".join(f"{v:.0f}" for v in res["seconds"].values())])
    print(markdown_table(header, rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="SynthSAEBench-16k size (16384 features, d 768), for a GPU")
    p.add_argument("--device", default="cpu", help="generation, training (train_ladder) and SAELens eval device")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--features", type=int, help="true features (default: the recipe's)")
    p.add_argument("--d-model", type=int, help="hidden dimension")
    p.add_argument("--roots", type=int, help="hierarchy roots (branching 4, depth 3)")
    p.add_argument("--widths", type=int, nargs="+", help="ladder widths")
    p.add_argument("--k", type=int, help="TopK k of every rung")
    p.add_argument("--n-train", type=int, help="training tokens")
    p.add_argument("--n-eval", type=int, help="held-out tokens (linking and every score)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--min-tokens", type=int, default=10,
                   help="absorption: least held-out tokens with the child on, and with it off, for an edge to count")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    set_threads(args.threads)
    cfg = dict(RECIPES["full" if args.full else "cpu"])
    for key, val in (("num_features", args.features), ("hidden_dim", args.d_model), ("roots", args.roots),
                     ("widths", args.widths), ("k", args.k), ("n_train", args.n_train), ("n_eval", args.n_eval),
                     ("epochs", args.epochs), ("batch_size", args.batch_size)):
        if val is not None:
            cfg[key] = val

    print("# SynthSAEBench: featuretree ladder + tree on SAELens' synthetic hierarchy\n")
    info = machine_info()
    info["sae-lens"] = md.version("sae-lens")
    info["device"] = args.device
    print_info(info)
    forest = cfg["roots"] * sum(cfg["branching"] ** i for i in range(cfg["depth"] + 1))
    print(f"- world: {cfg['num_features']} true features ({forest} in a forest of {cfg['roots']} roots x branching "
          f"{cfg['branching']} x depth {cfg['depth']}, siblings mutually exclusive), d_model {cfg['hidden_dim']}")
    print(f"- ladder: widths {tuple(cfg['widths'])}, k {cfg['k']}, {cfg['n_train']} training tokens x "
          f"{cfg['epochs']} epochs, batch {cfg['batch_size']}; {cfg['n_eval']} held-out tokens for linking and "
          f"scores; absorption needs >= {args.min_tokens} tokens per case\n")

    t0 = time.perf_counter()
    results = []
    for seed in args.seeds:
        res = run_seed(seed, cfg, args)
        results.append(res)
        s = res["seconds"]
        print(f"seed {seed}: generate {s['generate']:.0f} s, train {s['train']:.0f} s, link {s['link']:.0f} s, "
              f"score {s['score']:.0f} s; true L0 {res['truth']['true_l0']:.1f}, {res['truth']['edges']} true edges",
              flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n")
    report(results, cfg, args.seeds)


if __name__ == "__main__":
    main()
