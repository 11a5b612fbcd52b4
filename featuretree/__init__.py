"""featuretree: harvest activations once, train a ladder of TopK dictionaries, link features into a tree.

Most public names are imported on first use (PEP 562), so `import featuretree` does not load torch,
and importing `featuretree.export` never pulls in training code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from featuretree.config import Config, FeatureTreeError

# Imported eagerly, not lazily: nnsight patches a `save` method onto every object, modules included,
# which would shadow a lazy `featuretree.save` once nnsight is loaded. export does not import torch.
from featuretree.export import (
    from_frame,
    from_graphml,
    icicle,
    load,
    save,
    sunburst,
    to_frame,
    to_graphml,
    write_explorer,
    write_sunburst,
)

# Eager too: the modules `refine` and `find` share their names with their functions, and importing a
# submodule sets the package attribute, which would shadow a lazy function. Neither imports torch at import.
from featuretree.find import find
from featuretree.refine import refine, search

__version__ = "0.1.0"

_LAZY = {
    "Activations": "activations", "collect": "activations",
    "Corpus": "corpus", "load_corpus": "corpus",
    "load_model": "model",
    "TopKSAE": "sae",
    "train_ladder": "train",
    "FeatureTree": "tree", "link": "tree", "build": "run",
    "planted_hierarchy": "eval", "edge_scores": "eval",
    "label_tree": "label", "CausalLMLabeler": "label",
    "match": "compare", "novel": "compare",
}

__all__ = [
    "Activations", "CausalLMLabeler", "Config", "Corpus", "FeatureTree", "FeatureTreeError", "TopKSAE",
    "__version__", "build", "collect", "edge_scores", "find", "from_frame", "from_graphml", "icicle", "label_tree", "link",
    "load", "load_corpus", "load_model", "match", "novel", "planted_hierarchy", "refine", "save", "search",
    "sunburst", "to_frame", "to_graphml", "train_ladder", "write_explorer", "write_sunburst",
]

if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs; at run time they load on first use
    from featuretree.activations import Activations, collect  # noqa: F401
    from featuretree.compare import match, novel  # noqa: F401
    from featuretree.corpus import Corpus, load_corpus  # noqa: F401
    from featuretree.eval import edge_scores, planted_hierarchy  # noqa: F401
    from featuretree.label import CausalLMLabeler, label_tree  # noqa: F401
    from featuretree.model import load_model  # noqa: F401
    from featuretree.run import build  # noqa: F401
    from featuretree.sae import TopKSAE  # noqa: F401
    from featuretree.train import train_ladder  # noqa: F401
    from featuretree.tree import FeatureTree, link  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'featuretree' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"featuretree.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
