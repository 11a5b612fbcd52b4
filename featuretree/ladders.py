"""Ladders from dictionaries that already exist: directories of any architecture, a Matryoshka dictionary's
prefixes, and SAELens releases read from the local Hugging Face cache only (never downloaded).

    ladder = load_ladder(["saes/jumprelu-512", "saes/topk-2048"])            # a mixed ladder
    ladder = load_ladder("saes/matryoshka", prefixes=[128, 512, 2048])       # prefixes as rungs
    ladder = load_ladder("gemma-scope-2b-pt-res-canonical", layer=12, widths=["16k", "65k"])  # a release
    tree = ft.link(ladder, acts)                                             # no training

Every rung keeps its own firing rule (TopK's rank, JumpReLU's thresholds); linking needs only where each
feature fires and its decoder row, so mixed ladders link like trained ones.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from featuretree.config import FeatureTreeError
from featuretree.dictionaries import MAX_CODES, ThresholdSAE, load_dictionary
from featuretree.sae import TopKSAE

__all__ = ["hf_model_name", "hook_layer", "hook_site", "ladder_site", "load_ladder", "measure", "release_files", "to_jumprelu"]

log = logging.getLogger(__name__)


def _rung_names(saes: list[TopKSAE]) -> dict[str, TopKSAE]:
    """{"w<width>": dictionary}, narrow to wide; two of one width are an error (a rung is named by its width)."""
    saes = sorted(saes, key=lambda s: s.width)
    widths = [s.width for s in saes]
    if len(set(widths)) != len(widths):
        raise FeatureTreeError(f"the ladder has two dictionaries of one width ({widths}): a rung is named by its "
                               "width; keep one per width")
    d = {s.d_model for s in saes}
    if len(d) > 1:
        raise FeatureTreeError(f"the dictionaries read different d_model {sorted(d)}: a ladder is one layer's "
                               "dictionaries; load those of one layer")
    return {f"w{s.width}": s for s in saes}


def load_ladder(source, *, prefixes=None, layer: int | None = None, widths=None, sae_ids=None,
                repo_id: str | None = None, max_codes: int = MAX_CODES, cache_dir=None) -> dict[str, TopKSAE]:
    """A ladder {"w<width>": dictionary} from dictionaries that already exist, narrow to wide.

    `source` is one of:
    - a list of dictionary directories (any architecture `featuretree.dictionaries.load_dictionary` reads: TopK,
      JumpReLU, BatchTopK, ReLU in SAELens' layout, sparsify's TopK, Gemma Scope's params.npz) -> a mixed ladder;
    - one directory with `prefixes` (or a cfg.json listing `matryoshka_widths`) -> a Matryoshka
      dictionary's prefixes, each a rung;
    - a SAELens release name (resolved by `sae_lens` when installed) or, with `repo_id`, a Hugging Face repo
      whose `sae_ids` are folders in it: read from the local Hugging Face cache only. `layer` and `widths`
      pick a release's sae_ids (ids naming the layer, e.g. "layer_12/" or "blocks.12.", and one of the
      widths, e.g. "16k"). A file not in the cache is an error that names the command that fetches it.

    Parameters
    ----------
    source : list of paths, path, or str
        Directories, one Matryoshka directory, or a release name.
    prefixes : list of int, optional
        Widths of a Matryoshka dictionary's prefixes to take as rungs.
    layer : int, optional
        A release's layer.
    widths : list of str or int, optional
        A release's widths as its sae_ids spell them ("16k", 16384).
    sae_ids : list of str, optional
        A release's (or repo's) sae_ids, exactly; overrides layer / widths.
    repo_id : str, optional
        A Hugging Face repo to read `sae_ids` from without sae_lens.
    max_codes : int
        Codes per token kept by threshold dictionaries.
    cache_dir : path, optional
        The Hugging Face cache (default: HF_HUB_CACHE / ~/.cache/huggingface/hub).

    Example:
        >>> import tempfile
        >>> a, b = TopKSAE(8, 32, 2).save(tempfile.mkdtemp()), ThresholdSAE(8, 16, 0.2).save(tempfile.mkdtemp())
        >>> {r: type(s).__name__ for r, s in load_ladder([a, b]).items()}
        {'w16': 'ThresholdSAE', 'w32': 'TopKSAE'}
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise FeatureTreeError("no dictionaries given: pass their directories")
        return _rung_names([load_dictionary(p, max_codes=max_codes) for p in source])
    path = Path(str(source))
    if path.is_dir():
        sae = load_dictionary(path, max_codes=max_codes)
        if prefixes is None:
            prefixes = (sae.metadata or {}).get("matryoshka_widths")  # its cfg's, or dictionary_learning's groups
        if not prefixes:
            return _rung_names([sae])
        prefixes = sorted({int(p) for p in prefixes} | {sae.width})
        bad = [p for p in prefixes if not 1 < p <= sae.width]
        if bad:
            raise FeatureTreeError(f"prefixes {bad} do not fit a dictionary of {sae.width} features")
        return _rung_names([sae.prefix(p) if p < sae.width else sae for p in prefixes])
    if repo_id is None and (os.sep in str(source) or str(source).startswith(".")):
        raise FeatureTreeError(f"{source} is not a directory: pass a dictionary's directory, a list of them, or a "
                               "SAELens release name")
    repo, paths = release_files(str(source), layer=layer, widths=widths, sae_ids=sae_ids, repo_id=repo_id)
    saes = [load_dictionary(_cached(repo, p, cache_dir), max_codes=max_codes) for p in paths]
    model = None
    if repo_id is None:
        entry = _release_table()[str(source)]
        model = entry[2] if len(entry) > 2 else None
    for sae, p in zip(saes, paths):  # where it reads, when its files do not say (Gemma Scope's params.npz)
        sae.metadata.setdefault("release", str(source))
        sae.metadata.setdefault("release_path", p)
        if model and "model_name" not in sae.metadata:
            sae.metadata["model_name"] = model
        hook = _release_hook(str(source), p)
        if hook and "hook_name" not in sae.metadata:
            sae.metadata["hook_name"] = hook
        out = _release_transcoder(str(source), p)
        if out and "hook_name_out" not in sae.metadata:  # a transcoder: it writes the MLP's output
            sae.metadata.update(transcoder=True, hook_name_out=out)
    return _rung_names(saes)


def _width_pattern(w) -> re.Pattern:
    s = str(w).lower()
    return re.compile(rf"(?<![0-9]){re.escape(s)}(?![0-9a-z])")


def release_files(release: str, *, layer: int | None = None, widths=None, sae_ids=None,
                  repo_id: str | None = None) -> tuple[str, list[str]]:
    """(Hugging Face repo, the folders in it) of a SAELens release's dictionaries, picked by `sae_ids`, or by
    `layer` and `widths`; with `repo_id` the `sae_ids` are folders of that repo (no sae_lens needed).

    Parameters
    ----------
    release : str
        A SAELens release name (e.g. "gemma-scope-2b-pt-res-canonical"), or a label when `repo_id` is given.
    layer : int, optional
        Keep sae_ids that name this layer ("layer_12/", "blocks.12.", ".12.").
    widths : list, optional
        Keep sae_ids that name one of these widths ("16k").
    sae_ids : list of str, optional
        Exactly these.
    repo_id : str, optional
        The repo, when `sae_ids` are already paths in it.

    Example:
        >>> release_files("mine", repo_id="org/saes", sae_ids=["layer_3/width_512"])
        ('org/saes', ['layer_3/width_512'])
    """
    if repo_id is not None:
        if not sae_ids:
            raise FeatureTreeError("repo_id= needs sae_ids=: the folders inside the repo that hold the dictionaries")
        return repo_id, [str(s) for s in sae_ids]
    table = _release_table()
    if release not in table:
        near = sorted(r for r in table if release.split("-")[0] in r)[:8]
        raise FeatureTreeError(f"{release!r} is not a SAELens release{': near ones: ' + ', '.join(near) if near else ''}")
    repo, saes_map = table[release][:2]
    ids = list(saes_map)
    if sae_ids:
        unknown = [s for s in sae_ids if s not in saes_map]
        if unknown:
            raise FeatureTreeError(f"release {release!r} has no sae_id {unknown[:3]}; it has e.g. {ids[:4]}")
        ids = list(sae_ids)
    else:
        if layer is not None:
            pat = re.compile(rf"(layer_{int(layer)}(?![0-9])|blocks\.{int(layer)}\.|\.{int(layer)}\.|^{int(layer)}(?![0-9]))")
            ids = [s for s in ids if pat.search(s)]
        if widths:
            pats = [_width_pattern(w) for w in widths]
            ids = [s for s in ids if any(p.search(s.lower()) for p in pats)]
        if not ids:
            raise FeatureTreeError(f"release {release!r} has no sae_id for layer={layer} widths={widths}; its ids "
                                   f"look like {list(saes_map)[:4]}")
    return repo, [str(saes_map[s]) for s in ids]


def _release_table() -> dict[str, tuple]:
    """{release: (repo_id, {sae_id: path in the repo}, model)} from sae_lens' pretrained_saes.yaml."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError as e:
        raise FeatureTreeError(f"naming a release needs sae_lens ({e}): pip install sae-lens, or pass repo_id= and "
                               "sae_ids= (the folders in the Hugging Face repo)") from e
    return {name: (lookup.repo_id, dict(lookup.saes_map), lookup.model)
            for name, lookup in get_pretrained_saes_directory().items()}


def _cached(repo: str, folder: str, cache_dir) -> Path:
    """The local copy of `folder` in Hugging Face repo `repo`, from the cache only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        root = snapshot_download(repo, allow_patterns=[f"{folder}/*"], local_files_only=True, cache_dir=cache_dir)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        raise FeatureTreeError(
            f"{repo}/{folder} is not in the local Hugging Face cache and featuretree never downloads: where the "
            f"network is allowed run  huggingface-cli download {repo} --include '{folder}/*'  (then copy the cache "
            f"here, or set HF_HUB_CACHE) [{type(e).__name__}]") from e
    d = Path(root) / folder
    if not d.is_dir() or not any(d.iterdir()):
        raise FeatureTreeError(f"{repo}/{folder} is not in the local Hugging Face cache (the snapshot has no such "
                               f"folder): run  huggingface-cli download {repo} --include '{folder}/*'  where the "
                               "network is allowed")
    return d


def _release_hook(release: str, path: str) -> str | None:
    """The TransformerLens hook a release's folder reads, where its name says: a folder naming its hook
    ("gemma_2b_blocks.12.hook_resid_post_16384"), or Gemma Scope's "layer_N/..." in a "-res" / "-mlp" / "-att" /
    "-transcoders" release."""
    m = re.search(r"blocks\.\d+\.(?:attn\.)?hook_(?:resid_pre|resid_post|resid_mid|mlp_out|attn_out|z)(?![a-z])", path)
    if m:
        return m.group(0)
    m = re.match(r"layer_(\d+)/", path)
    hooks = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z",
             "transcoders": "ln2.hook_normalized"}  # Gemma Scope's kinds; its transcoders read the MLP's input
    kind = re.search(r"-(res|mlp|att|transcoders)(-|$)", release)
    if m and kind:
        return f"blocks.{m.group(1)}.{hooks[kind.group(1)]}"
    return None


def _release_transcoder(release: str, path: str) -> str | None:
    """A Gemma Scope transcoders release's output hook for a folder (its params.npz does not say), else None."""
    m = re.match(r"layer_(\d+)/", path)
    return f"blocks.{m.group(1)}.hook_mlp_out" if m and re.search(r"-transcoders(-|$)", release) else None


_BLOCK_OUTPUT = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)(?:\.([A-Za-z_][\w.]*))?$")  # model.layers.12[.mlp]
_TL_SITES = {"hook_resid_post": "resid_post", "hook_mlp_out": "mlp_out", "hook_attn_out": "attn_out"}


def hook_site(hook_name: str) -> dict:
    """Where a dictionary's hook reads, as featuretree harvests it: {"layer", "kind", "path"}. TransformerLens'
    `blocks.L.hook_resid_post` is block L's output, `blocks.L.hook_resid_pre` block L-1's, `blocks.L.hook_mlp_out`
    / `hook_attn_out` the MLP's / attention's output in block L (kind "mlp_out" / "attn_out": the module is
    found per architecture by `featuretree.model.site_of`), `blocks.L.ln2.hook_normalized` the MLP's input
    after its norm with the gain taken out ("mlp_in", where transcoders read). An HF module path (`model.layers.12`,
    `transformer.h.6.mlp`, sparsify's `layers.12`) is that block, and its submodule `path` when it names one;
    dictionary_learning's `resid_post_layer_L` is block L. The embeddings, hook_resid_mid and attention's hook_z
    (per head, before the output projection) are errors naming why.

    Parameters
    ----------
    hook_name : str
        The hook or module path, as the dictionary's config names it.

    Example:
        >>> hook_site("blocks.12.hook_resid_pre"), hook_site("blocks.5.hook_mlp_out")["kind"]
        ({'layer': 11, 'kind': 'resid_post', 'path': None}, 'mlp_out')
    """
    name = str(hook_name)
    m = re.fullmatch(r"blocks\.(\d+)\.(hook_[a-z_]+)", name)
    if m and m.group(2) == "hook_resid_pre":
        if int(m.group(1)) == 0:
            raise FeatureTreeError(f"{name} reads the embeddings (the input of block 0); featuretree harvests module "
                                   "outputs inside the blocks: use dictionaries of a later layer")
        return {"layer": int(m.group(1)) - 1, "kind": "resid_post", "path": None}
    if m and m.group(2) in _TL_SITES:
        return {"layer": int(m.group(1)), "kind": _TL_SITES[m.group(2)], "path": None}
    m_in = re.fullmatch(r"blocks\.(\d+)\.ln2\.hook_normalized", name)
    if m_in:  # the MLP's input after its norm, gain folded out (what transcoders read)
        return {"layer": int(m_in.group(1)), "kind": "mlp_in", "path": None}
    tl = "hook_" in name  # a TransformerLens name; anything else may be an HF module path
    m2 = None if tl else (_BLOCK_OUTPUT.search(name) or re.fullmatch(r"resid_post_layer_(\d+)()", name))
    if m2:
        return {"layer": int(m2.group(1)), "kind": "resid_post" if not m2.group(2) else "path", "path": m2.group(2) or None}
    why = ("attention's per-head hook_z (before the output projection, not a module's output)" if "hook_z" in name
           else "not a module's output featuretree harvests")
    raise FeatureTreeError(f"the dictionaries read {name!r}: {why}; featuretree harvests block outputs "
                           "(hook_resid_post / hook_resid_pre), MLP outputs (hook_mlp_out), attention outputs "
                           "(hook_attn_out) and the MLP's normalised input (ln2.hook_normalized): use dictionaries "
                           "of one of those")


def hook_layer(hook_name: str) -> int:
    """The block a dictionary's hook reads (`hook_site`'s layer): `blocks.L.hook_resid_post` is L,
    `blocks.L.hook_resid_pre` is L-1, `model.layers.3` is 3.

    Parameters
    ----------
    hook_name : str
        The hook or module path.

    Example:
        >>> hook_layer("blocks.12.hook_resid_post"), hook_layer("blocks.12.hook_resid_pre"), hook_layer("model.layers.3")
        (12, 11, 3)
    """
    return hook_site(hook_name)["layer"]


def ladder_site(ladder: dict) -> dict:
    """Where a loaded ladder's dictionaries read, from their own files: {"hook_name", "layer", "kind", "path",
    "model_name", "out"}, None where no dictionary says (kind "resid_post", a block's output, when none does);
    "out" is where transcoders write ({"hook_name", "layer", "kind", "path"}; None for SAEs). Dictionaries that
    disagree, or a ladder of transcoders and SAEs, are an error (a ladder is one site's).

    Parameters
    ----------
    ladder : dict
        {rung: dictionary}, as `load_ladder` returns.

    Example:
        >>> ladder_site({"w32": TopKSAE(8, 32, 2, metadata={"hook_name": "blocks.4.hook_mlp_out"})})["kind"]
        'mlp_out'
    """
    out = {}
    for key in ("hook_name", "model_name"):
        said = {(s.metadata or {}).get(key) for s in ladder.values()} - {None}
        if len(said) > 1:
            raise FeatureTreeError(f"the ladder's dictionaries name different {key}s {sorted(said)}: a ladder is one "
                                   "layer of one model's dictionaries; load those that share it")
        out[key] = next(iter(said), None)
    site = hook_site(out["hook_name"]) if out["hook_name"] else {"layer": None, "kind": "resid_post", "path": None}
    kinds = {bool((s.metadata or {}).get("transcoder")) for s in ladder.values()}
    if len(kinds) > 1:
        raise FeatureTreeError("the ladder mixes transcoders and SAEs: their decoders write different modules, so "
                               "their directions cannot be compared; load one kind")
    result = {"hook_name": out["hook_name"], **site, "model_name": out["model_name"], "out": None}
    if kinds == {True}:
        outs = {(s.metadata or {}).get("hook_name_out") for s in ladder.values()}
        if len(outs) != 1 or None in outs:
            raise FeatureTreeError(f"the transcoders name output hooks {sorted(map(str, outs))}: each must name one, "
                                   "the same (hook_name_out in its cfg.json)")
        hook_out = next(iter(outs))
        result["out"] = {"hook_name": hook_out, **hook_site(hook_out)}
    return result


_HF_ORGS = (("gemma-", "google/"), ("pythia-", "EleutherAI/"), ("gpt-neo", "EleutherAI/"), ("gpt-j", "EleutherAI/"),
            ("Qwen", "Qwen/"), ("SmolLM", "HuggingFaceTB/"), ("Llama-", "meta-llama/"), ("Meta-Llama-", "meta-llama/"),
            ("Mistral-", "mistralai/"))
_TL_NAMES = {"gpt2-small": "gpt2", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl",
             "tiny-stories-1M": "roneneldan/TinyStories-1M", "tiny-stories-33M": "roneneldan/TinyStories-33M"}


def hf_model_name(name: str) -> str:
    """The Hugging Face repo id of a model as SAELens releases name it (TransformerLens' names: "gpt2-small",
    "gemma-2-2b", "pythia-70m-deduped"): transformer_lens' own table when it is installed, else featuretree's
    (the common families). A repo id with an org, a path and featuretree's embedded models are returned as they are.

    Parameters
    ----------
    name : str
        The release's model name.

    Example:
        >>> hf_model_name("gemma-2-2b"), hf_model_name("gpt2-small"), hf_model_name("org/model")
        ('google/gemma-2-2b', 'gpt2', 'org/model')
    """
    from featuretree.model import EMBEDDED_NAMES, SMOLLM2_NAMES

    name = str(name)
    if "/" in name or os.sep in name or name in EMBEDDED_NAMES or name.lower() in SMOLLM2_NAMES or name.endswith(".gguf"):
        return name  # a repo id, a path, or a model featuretree embeds
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        return get_official_model_name(name)
    except Exception:  # not installed, or a name it does not know: featuretree's table below
        pass
    if name in _TL_NAMES:
        return _TL_NAMES[name]
    for prefix, org in _HF_ORGS:
        if name.lower().startswith(prefix.lower()):
            return org + name
    return name


@torch.no_grad()
def to_jumprelu(sae: TopKSAE, threshold) -> ThresholdSAE:
    """A JumpReLU dictionary with `sae`'s weights and the given per-feature thresholds (e.g. a tree's `fire_at`):
    what SAELens does to a BatchTopK SAE for inference, here for any TopK one.

    Parameters
    ----------
    sae : TopKSAE
        The weights.
    threshold : float or Tensor (width,)
        Where each feature starts to fire.

    Example:
        >>> j = to_jumprelu(TopKSAE(8, 32, 2), 0.5)
        >>> j.architecture, float(j.threshold[0])
        ('jumprelu', 0.5)
    """
    out = ThresholdSAE(sae.d_model, sae.width, torch.as_tensor(threshold, dtype=torch.float32),
                       architecture="jumprelu", max_codes=MAX_CODES,
                       metadata={**sae.metadata, "converted_from": "topk", "topk_k": sae.k})
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        getattr(out, name).copy_(getattr(sae, name))
    return out


def measure(ladder: dict, acts, *, split: str = "heldout", targets=None) -> dict:
    """Held-out FVU, L0 and dead fraction of each rung of a loaded ladder, stored in its `.metrics` (what
    `featuretree info` prints for trained rungs); returns {rung: metrics}.

    Parameters
    ----------
    ladder : dict
        {rung: dictionary}, as `load_ladder` returns.
    acts : Activations or Tensor [n, d_model]
        The layer's activations (a store's `split` is read).
    split : str
        Which split of a store.
    targets : Activations or Tensor, optional
        Transcoders: what the reconstruction is scored against (the output module's activations on the same
        tokens, row for row); default `acts` itself.

    Example:
        >>> m = measure({"w32": TopKSAE(8, 32, 2)}, torch.randn(64, 8))
        >>> sorted(m["w32"])
        ['dead_fraction', 'fvu', 'l0', 'n_tokens']
    """
    from featuretree.activations import d_model_of, is_store, iter_batches, n_rows
    from featuretree.train import evaluate_many

    d = {s.d_model for s in ladder.values()}
    width = d_model_of(acts)
    if d != {width}:
        raise FeatureTreeError(f"the ladder reads d_model {sorted(d)} but the layer's activations have {width}: "
                               "choose the layer (and model) the dictionaries were trained on")
    def rows(a):
        if is_store(a) and n_rows(a, split) > 0:
            return iter_batches(a, 8192, split=split, shuffle=False)
        return iter_batches(a, 8192, shuffle=False)

    batches = rows(acts)
    if targets is not None:
        if n_rows(targets, split if is_store(targets) else "all") != n_rows(acts, split if is_store(acts) else "all"):
            raise FeatureTreeError("targets must hold the same tokens as acts, row for row (one harvest of the same "
                                   "texts at the output module)")
        batches = zip(batches, rows(targets))
    out = {}
    for (rung, sae), m in zip(ladder.items(), evaluate_many(list(ladder.values()), batches)):
        sae.metrics = {**sae.metrics, **m}
        out[rung] = m
    return out
