"""The package's layers: imports go one way (function-local and TYPE_CHECKING imports included), no cycle,
no private name used outside its module, every module declares `__all__`, and loading a tree does not
import training code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "featuretree"

# Each module may import only modules listed before it. README.md's "Layout and development" shows the same.
LAYERS = [
    "config",       # settings: small dataclasses per operation, composed into Config; FeatureTreeError
    "utils",        # atomic writes, safetensors, rung order
    "corpus",       # load_corpus: WordNet (bundled) or any texts
    "model",        # load_model: name / path / (module, tokenizer), nnsight-wrapped; layers
    "checkpoint",   # the one resume scheme: fingerprints, atomic state files, finished markers
    "activations",  # the on-disk store and every way to stream it (or a plain Tensor)
    "harvest",      # collect: one layer's activations through nnsight into a store
    "native",       # compiled CPU kernels (top-k, int8 ranking) with a torch fallback
    "sae",          # TopKSAE, SAELens / sparsify formats; the weight checks every loader shares
    "dictionaries", # ThresholdSAE (JumpReLU, BatchTopK, ReLU), GatedSAE, load_dictionary: every other format
    "train",        # train_ladder and the local dictionaries of a refinement
    "ladders",      # load_ladder: existing dictionaries (any architecture, Matryoshka prefixes, releases)
    "faithful",     # loss recovered and KL of each rung spliced into a causal LM
    "firing",       # the one firing rule, gated firing of refined rungs, query rates
    "label",        # labels from top tokens, contexts and distinctive words; LM labelers
    "tree",         # FeatureTree and link
    "region",       # the tokens where a node fires (store, then streamed corpus)
    "refine",       # depth-first local dictionaries
    "find",         # find / search / novel: one scorer
    "effect",       # effects: what a feature does to a causal LM: ablation, promoted tokens, steering
    "compare",      # match (universality)
    "crosslayer",   # features of one layer linked to a later layer's (same / split / merge)
    "eval",         # planted hierarchies, edge scores, corpus purity
    "senses",       # sense splitting of polysemous WordNet nouns, rung by rung
    "explore",      # figures and the explorer page
    "export",       # save / load / tables / GraphML
    "run",          # build: the run directory's life cycle
    "scale",        # Ray and torch.distributed on top of train / refine / build
    "serve",        # featuretree serve: the explorer as a local web app (FastAPI), jobs run through the CLI
    "__main__",     # the CLI
]
FACADE = "__init__"  # re-exports the public names lazily; it may import any module


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PKG.glob("*.py"))}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, featuretree module) for every import anywhere in the file: module level, in functions, in
    TYPE_CHECKING blocks."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "featuretree" or a.name.startswith("featuretree."):
                    out.append((node.lineno, a.name.split(".")[1] if "." in a.name else FACADE))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "featuretree":
                for a in node.names:  # `from featuretree import native` is a module; any other name is the facade
                    out.append((node.lineno, a.name if (PKG / f"{a.name}.py").is_file() else FACADE))
            elif node.module.startswith("featuretree."):
                out.append((node.lineno, node.module.split(".")[1]))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            out.append((node.lineno, node.module.split(".")[0] if node.module else FACADE))
    return out


def test_every_module_has_a_layer():
    missing = sorted(set(_modules()) - set(LAYERS) - {FACADE})
    assert not missing, f"modules without a place in LAYERS (add them where they belong): {missing}"
    gone = sorted(set(LAYERS) - set(_modules()))
    assert not gone, f"LAYERS names modules that do not exist: {gone}"


def test_imports_go_one_way():
    rank = {m: i for i, m in enumerate(LAYERS)}
    bad = []
    for name, path in _modules().items():
        if name == FACADE:
            continue
        for line, target in _imports(path):
            if target == name:
                continue
            if target == FACADE or target not in rank or rank[target] >= rank[name]:
                bad.append(f"featuretree/{name}.py:{line} imports {target}")
    assert not bad, "imports against the layer order (a module may import only those above it):\n" + "\n".join(bad)


def test_imported_names_exist():
    """Every `from featuretree.x import name` (function-local ones too) names something x defines."""
    import importlib

    bad = []
    for path in [*_modules().values(), *sorted(Path(__file__).parent.glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                    node.module == "featuretree" or node.module.startswith("featuretree.")):
                module = importlib.import_module(node.module)
                bad += [f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                        if not hasattr(module, a.name) and not (PKG / f"{a.name}.py").is_file()]
    assert not bad, "imports of names that do not exist:\n" + "\n".join(bad)


def test_no_cycles():
    import networkx as nx

    g = nx.DiGraph()
    for name, path in _modules().items():
        for _, target in _imports(path):
            if target != name and name != FACADE:
                g.add_edge(name, target)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_crosses_modules():
    bad = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featuretree"):
                bad += [f"{name}.py:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
            elif isinstance(node, ast.keyword) and node.arg and node.arg.startswith("_"):
                bad.append(f"{name}.py:{node.lineno} passes the private keyword {node.arg}=")
    assert not bad, "private names used outside their module:\n" + "\n".join(bad)


def test_tests_use_no_private_names_of_the_package():
    bad = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featuretree"):
                bad += [f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "tests import private names (test the public behaviour instead):\n" + "\n".join(bad)


@pytest.mark.parametrize("name", sorted(set(LAYERS) - {"__main__"}))
def test_every_module_declares_all(name):
    tree = ast.parse((PKG / f"{name}.py").read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), f"featuretree/{name}.py has no module docstring saying its job"
    names = [t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
             for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]
    assert "__all__" in names, f"featuretree/{name}.py has no __all__"
    module = __import__(f"featuretree.{name}", fromlist=["__all__"])
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"featuretree.{name}.__all__ names what it does not define: {missing}"


def test_public_api_is_small_and_documented():
    import inspect

    import featuretree as ft

    assert 12 <= len(ft.__all__) <= 22, ft.__all__  # load_ladder (issue 18) made it 21
    for name in ft.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(ft, name)
        doc = inspect.getdoc(obj) or ""
        assert "Example" in doc or ">>>" in doc, f"ft.{name} has no example in its docstring"


def test_public_callables_document_their_parameters_with_an_example():
    """Every callable a module exports (named in its `__all__` and defined there) has an example ("Example" or
    a doctest) and documents each parameter: names it as a whole word (`\\bname\\b`, as a numpy-style
    "Parameters" section's `name : type` line does; a substring such as "path" in "filepath" does not count)
    or (dataclass fields) has a docstring right under its field, as config.py writes them."""
    import dataclasses
    import importlib
    import inspect
    import re

    from featuretree.config import field_docs

    no_example, no_params = [], []
    for name in sorted(set(_modules()) - {FACADE}):
        module = importlib.import_module(f"featuretree.{name}")
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            if getattr(obj, "__module__", None) != module.__name__ or not callable(obj):
                continue
            doc = inspect.getdoc(obj) or ""
            if "Example" not in doc and ">>>" not in doc:
                no_example.append(f"{name}.{attr}")
            try:
                params = [p for p in inspect.signature(obj).parameters
                          if p not in ("self", "args", "kwargs", "overrides")]
            except (TypeError, ValueError):  # no signature to read (some builtins)
                params = []
            fields = field_docs(obj) if inspect.isclass(obj) and dataclasses.is_dataclass(obj) else {}
            missing = [p for p in params if p not in fields and not re.search(rf"\b{re.escape(p)}\b", doc)]
            if missing:
                no_params.append(f"{name}.{attr} ({', '.join(missing)})")
    assert not no_example and not no_params, (
        f"public callables without an example in their docstring: {no_example}\n"
        f"public callables whose docstring does not name these parameters as whole words: {no_params}")


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=PKG.parent).stdout


def test_import_is_light():
    out = _fresh("import sys, featuretree\nprint('torch' in sys.modules)")
    assert out.strip() == "False", "import featuretree must not import torch"


def test_load_does_not_import_training_code(tmp_path):
    import networkx as nx

    from featuretree.config import Config
    from featuretree.export import save
    from featuretree.sae import TopKSAE
    from featuretree.tree import FeatureTree

    g = nx.DiGraph()
    g.add_node("w8/0", rung="w8", width=8, index=0, freq=0.1, label="x")
    save(FeatureTree(g, {"w8": TopKSAE(4, 8, 2)}, Config(widths=(8,), k=2)), tmp_path / "run")
    code = (f"import sys, featuretree as ft\nt = ft.load({str(tmp_path / 'run')!r})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'featuretree'))")
    loaded = set(eval(_fresh(code)))
    for heavy in ("featuretree.train", "featuretree.harvest", "featuretree.region", "featuretree.scale"):
        assert heavy not in loaded, f"ft.load imported {heavy}: {sorted(loaded)}"
