"""featuretree: harvest activations once, train a ladder of TopK dictionaries, link features into a tree."""

from featuretree.activations import Activations, collect
from featuretree.config import Config, FeatureTreeError
from featuretree.corpus import Corpus, load_corpus
from featuretree.export import from_graphml, load, save, sunburst, to_frame, to_graphml, write_sunburst
from featuretree.model import load_model
from featuretree.sae import TopKSAE
from featuretree.train import train_ladder
from featuretree.tree import FeatureTree, build, link

__version__ = "0.1.0"

__all__ = [
    "Activations", "Config", "Corpus", "FeatureTree", "FeatureTreeError", "TopKSAE", "__version__", "build",
    "collect", "from_graphml", "link", "load", "load_corpus", "load_model", "save", "sunburst", "to_frame",
    "to_graphml", "train_ladder", "write_sunburst",
]
