"""featuretree.scale: Ray fan-out gives the serial results: a ladder's rungs as tasks, sibling refinements as tasks (local cluster)."""

import pytest
import torch

ray = pytest.importorskip("ray", reason="needs Ray: pip install 'featuretree[ray]'")

import featuretree as ft  # noqa: E402
from featuretree import scale  # noqa: E402
from featuretree.checkpoint import Resume  # noqa: E402
from featuretree.eval import planted_hierarchy  # noqa: E402

pytestmark = pytest.mark.slow  # the quick loop (-m 'not slow') leaves it out


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())) and a.metrics == b.metrics


@pytest.fixture(scope="module")
def planted():
    return planted_hierarchy(n_roots=6, branching=3, depth=2, d_model=32, n_tokens=20_000, p_root=0.08,
                             p_child=0.9, child_cos=0.5, seed=3)


def test_ray_ladder_equals_the_serial_ladder(planted, tmp_path):
    kw = dict(k=2, epochs=2, batch_size=256, seed=5, progress=False)
    serial = ft.train_ladder(planted.acts, (8, 24, 64), **kw)
    fanned = scale.train_ladder(planted.acts, (8, 24, 64), executor="ray", **kw)
    assert sorted(fanned) == [8, 24, 64] and all(same(serial[w], fanned[w]) for w in serial)
    # per-rung checkpoints, and the trees linked from both ladders are the same tree
    again = scale.train_ladder(planted.acts, (8, 24, 64), executor="ray",
                               checkpoint=Resume(tmp_path / "train.safetensors", every=0), **kw)
    assert all(same(serial[w], again[w]) for w in serial) and not list(tmp_path.iterdir())
    a, b = ft.link(serial, planted.acts, labels=False), ft.link(fanned, planted.acts, labels=False)
    assert dict(a.graph.nodes(data=True)) == dict(b.graph.nodes(data=True)) and set(a.graph.edges) == set(b.graph.edges)


def test_ray_store_ladder_and_refinement_equal_serial(tmp_path):
    texts = ["the dog barked at the cat all night", "a small bird sang in the tall oak tree",
             "the doctor treated the patient for a fever", "the court ruled that the contract was void"] * 30
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"{t} ({i})" for i, t in enumerate(texts)))
    cfg = ft.Config(corpus=str(corpus), n_tokens=1500, widths=(8, 32), k=2, epochs=2, batch_size=128)
    serial = ft.build(cfg, out=tmp_path / "serial", progress=False)
    fanned = scale.build(cfg, out=tmp_path / "ray", executor="ray", progress=False)
    assert (tmp_path / "serial" / "tree.json").read_bytes() == (tmp_path / "ray" / "tree.json").read_bytes()
    node = max(serial.roots(), key=lambda n: serial.graph.nodes[n]["freq"])
    kw = dict(width=6, k=1, depth=2, min_tokens=20, stream_tokens=0, progress=False)
    a = ft.refine(serial, node, **kw)
    b = scale.refine(fanned, node, executor="ray", **kw)
    assert sum(1 for r in b.saes if "/r6" in r) >= 2  # siblings were refined (in parallel)
    assert list(a.graph.nodes) == list(b.graph.nodes)  # the same depth-first order
    assert dict(a.graph.nodes(data=True)) == dict(b.graph.nodes(data=True))
    assert all(same(a.saes[r], b.saes[r]) for r in a.saes)
