"""featuretree: harvest activations once, train a ladder of TopK dictionaries, link features into a tree.

The public API is the names in `__all__`; specialists stay in their modules (e.g.
`featuretree.compare.match`, `featuretree.eval.planted_hierarchy`, `featuretree.explore.write_explorer`).
Most names are imported on first use (PEP 562), so `import featuretree` does not load torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

from featuretree.config import Config, FeatureTreeError

# Imported eagerly, not lazily: nnsight patches a `save` method onto every object, modules included,
# which would shadow a lazy `featuretree.save` once nnsight is loaded. Neither module imports torch.
from featuretree.explore import sunburst
from featuretree.export import load, save, to_frame

# Eager too: the modules `find` and `refine` share their names with their functions, and importing a
# submodule sets the package attribute, which would shadow a lazy function. Neither imports torch at import.
from featuretree.find import find, search
from featuretree.refine import refine

try:
    __version__ = importlib.metadata.version("featuretree")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "collect": "harvest",
    "load_corpus": "corpus",
    "load_model": "model",
    "TopKSAE": "sae",
    "train_ladder": "train",
    "FeatureTree": "tree", "link": "tree",
    "build": "run",
    "effects": "effect",
    "upstream": "crosslayer",
    "load_ladder": "ladders",
}

__all__ = [
    "Config", "FeatureTree", "FeatureTreeError", "TopKSAE", "__version__", "build", "collect", "effects", "find", "link",
    "load", "load_corpus", "load_ladder", "load_model", "refine", "save", "search", "sunburst", "to_frame", "train_ladder",
    "upstream",
]

if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs; at run time they load on first use
    from featuretree.corpus import load_corpus  # noqa: F401
    from featuretree.crosslayer import upstream  # noqa: F401
    from featuretree.effect import effects  # noqa: F401
    from featuretree.harvest import collect  # noqa: F401
    from featuretree.ladders import load_ladder  # noqa: F401
    from featuretree.model import load_model  # noqa: F401
    from featuretree.run import build  # noqa: F401
    from featuretree.sae import TopKSAE  # noqa: F401
    from featuretree.train import train_ladder  # noqa: F401
    from featuretree.tree import FeatureTree, link  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'featuretree' has no attribute {name!r}: the public names are "
                             f"{', '.join(n for n in __all__ if not n.startswith('_'))}; specialist functions live "
                             "in their modules (featuretree.compare.match, featuretree.explore.write_explorer, ...)")
    value = getattr(importlib.import_module(f"featuretree.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
