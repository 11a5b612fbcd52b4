"""featuretree: harvest activations once, train a ladder of TopK dictionaries, link features into a tree."""

from featuretree.config import Config, FeatureTreeError

__version__ = "0.1.0"

__all__ = ["Config", "FeatureTreeError", "__version__"]
