"""Hugging Face CLIP vision checkpoints as open_clip VisionTransformer state dicts.

A transformers CLIPVisionModel / CLIPVisionModelWithProjection / CLIPModel checkpoint (the form the FusionBench
model pools publish) maps one to one onto open_clip's VisionTransformer:

    embeddings.patch_embedding.weight          conv1.weight
    embeddings.class_embedding                 class_embedding
    embeddings.position_embedding.weight       positional_embedding
    pre_layrnorm.*                             ln_pre.*
    encoder.layers.i.layer_norm1.*             transformer.resblocks.i.ln_1.*
    encoder.layers.i.self_attn.{q,k,v}_proj.*  transformer.resblocks.i.attn.in_proj_{weight,bias} (q, k, v stacked)
    encoder.layers.i.self_attn.out_proj.*      transformer.resblocks.i.attn.out_proj.*
    encoder.layers.i.layer_norm2.*             transformer.resblocks.i.ln_2.*
    encoder.layers.i.mlp.fc1.*, fc2.*          transformer.resblocks.i.mlp.c_fc.*, c_proj.*
    post_layernorm.*                           ln_post.*
    visual_projection.weight (out, in)         proj (in, out)

Every map is a rename, a stack or a transpose, so it maps task vectors too (τ of the stacked in_proj is the
stack of the τs), and it maps back (hf_clip_vision_names: in_proj split into q, k, v; proj transposed), so a
merged tower is written as the Hugging Face folder its θ0 came in (save_hf_clip_vision). Tensors keep their
dtype.

read_checkpoint reads any checkpoint a command takes as θ0 or a fine-tuned model: an open_clip state dict in
whatever file checkpoints.read_state_dict reads, or a Hugging Face CLIP checkpoint (a folder, an .index.json,
or a file whose names are transformers'), the latter converted to open_clip names under "visual.".

Reading and converting weights needs only safetensors and torch; building the matching open_clip model reads
the checkpoint's config.json through transformers, an optional dependency: pip install atlas_fast[hf].
"""
import functools
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import torch

from ..bank.task_vectors import TaskVectors, read_state_dict
from .checkpoints import read_module_checkpoint

PATCH = "embeddings.patch_embedding.weight"
PROJECTION = "visual_projection.weight"
# Entries of CLIP checkpoints that are not the vision tower: skipped, by name (CLIPModel's text side, and the
# position ids that older transformers versions saved as a buffer).
_NOT_VISION = re.compile(r"^(text_model\..*|text_projection\.weight|logit_scale|.*embeddings\.position_ids)$")
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)$")
_BLOCK_MAP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_TOP_MAP = {"embeddings.patch_embedding.weight": "conv1.weight", "embeddings.class_embedding": "class_embedding",
            "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
            "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
            "post_layernorm.bias": "ln_post.bias"}
# The weights files of a saved folder, in the order transformers prefers them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def transformers_module():
    """transformers, or an ImportError that names the extra to install."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("reading Hugging Face CLIP configs needs transformers, an optional dependency of "
                          "atlas_fast: pip install atlas_fast[hf]") from e
    return transformers


def read_hf_checkpoint(path):
    """The state dict of a saved Hugging Face model: a folder (model.safetensors, pytorch_model.bin or their
    sharded .index.json forms) or one .safetensors / .bin file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise ValueError(f"{path}: a folder with none of {', '.join(WEIGHT_FILES)}")
        path = os.path.join(path, found[0])
    if path.endswith(".index.json"):
        return _read_sharded(path)
    return read_state_dict(path)


def _read_sharded(index_path):
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path}: not a sharded-checkpoint index with a weight_map ({e})") from e
    folder = os.path.dirname(index_path)
    out = {}
    for shard in dict.fromkeys(weight_map.values()):
        sd = read_state_dict(os.path.join(folder, shard))
        wanted = [k for k, s in weight_map.items() if s == shard]
        missing = [k for k in wanted if k not in sd]
        if missing:
            raise ValueError(f"{os.path.join(folder, shard)}: lacks {missing[:5]}, listed for it in {index_path}")
        out.update((k, sd[k]) for k in wanted)
    return out


def _vision_prefix(sd, source):
    found = [k[:-len(PATCH)] for k in sd if k.endswith(PATCH) and (k == PATCH or k.endswith("." + PATCH))]
    if len(found) != 1:
        what = "no entry" if not found else f"{len(found)} entries ({found})"
        raise ValueError(f"{source}: {what} ending in {PATCH!r}: not one Hugging Face CLIP vision tower")
    return found[0]


def hf_clip_vision_state_dict(checkpoint, projection=None, source=None):
    """open_clip VisionTransformer names for a Hugging Face CLIP vision tower.

    checkpoint: a state dict, or a path read_hf_checkpoint reads. projection: None keeps visual_projection as
    `proj` when the checkpoint has one (CLIPVisionModelWithProjection, CLIPModel), True requires it, False leaves
    it out. CLIPModel's text side is skipped; any other entry the map does not know is an error. source: the
    name errors give a state dict (default "state dict")."""
    source = source or ("state dict" if isinstance(checkpoint, dict) else os.fspath(checkpoint))
    sd = checkpoint if isinstance(checkpoint, dict) else read_hf_checkpoint(checkpoint)
    vp = _vision_prefix(sd, source)
    root = vp[:-len("vision_model.")] if vp.endswith("vision_model.") else vp
    out, qkv, layers, unknown = {}, {}, set(), []
    for key, value in sd.items():
        if key == root + PROJECTION:
            continue
        rel = key[len(vp):] if key.startswith(vp) else None
        if rel is not None and rel in _TOP_MAP:
            out[_TOP_MAP[rel]] = value
            continue
        m = _LAYER.match(rel) if rel is not None else None
        if m:
            i, rest = int(m.group(1)), m.group(2)
            module, _, param = rest.rpartition(".")
            layers.add(i)
            if module in _BLOCK_MAP and param in ("weight", "bias"):
                out[f"transformer.resblocks.{i}.{_BLOCK_MAP[module]}.{param}"] = value
                continue
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") and param in ("weight", "bias"):
                qkv[(i, module[10], param)] = key
                continue
        if not _NOT_VISION.match(key[len(root):] if key.startswith(root) else key):
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: entries that are not part of a CLIP vision tower: {unknown[:8]}")
    if layers != set(range(len(layers))):
        raise ValueError(f"{source}: encoder layers {sorted(layers)} are not numbered 0..{len(layers) - 1}")
    for i in range(len(layers)):
        for param in ("weight", "bias"):
            names = [qkv.get((i, c, param)) for c in "qkv"]
            if None in names:
                lacking = [f"self_attn.{c}_proj.{param}" for c, n in zip("qkv", names) if n is None]
                raise ValueError(f"{source}: layer {i} lacks {lacking}")
            parts = [sd[n] for n in names]
            if len({(p.shape, p.dtype) for p in parts}) != 1:
                raise ValueError(f"{source}: {names} differ in shape or dtype: "
                                 f"{[(tuple(p.shape), str(p.dtype)) for p in parts]}")
            out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(parts)
    missing = [k for k in _TOP_MAP.values() if k not in out]
    missing += [f"transformer.resblocks.{i}.{m}.{p}" for i in range(len(layers)) for m in _BLOCK_MAP.values()
                for p in ("weight", "bias") if f"transformer.resblocks.{i}.{m}.{p}" not in out]
    if missing:
        raise ValueError(f"{source}: incomplete CLIP vision tower, no entry for open_clip's {missing[:8]}")
    has_proj = root + PROJECTION in sd
    if projection and not has_proj:
        raise ValueError(f"{source}: no {root + PROJECTION!r} (a CLIPVisionModel checkpoint has none), but "
                         f"projection=True or the pretrained checkpoint has one; projection=False leaves it out")
    if has_proj and projection is not False:
        out["proj"] = sd[root + PROJECTION].t().contiguous()
    return _open_clip_order(out, len(layers))


def _open_clip_order(out, num_layers):
    """The entries in VisionTransformer.named_parameters() order."""
    block = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
             "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias"]
    order = ["class_embedding", "positional_embedding", "proj", "conv1.weight", "ln_pre.weight", "ln_pre.bias"]
    order += [f"transformer.resblocks.{i}.{b}" for i in range(num_layers) for b in block]
    order += ["ln_post.weight", "ln_post.bias"]
    return {k: out[k] for k in order if k in out}


def hf_clip_vision_config(path):
    """The CLIPVisionConfig of a saved CLIPVisionModel(WithProjection) or CLIPModel folder (transformers)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: no config.json: the architecture (heads, activation, eps) is read from it")
    return transformers_module().CLIPVisionConfig.from_pretrained(path)


_ACTIVATIONS = {"quick_gelu": "QuickGELU", "gelu": "GELU"}


def open_clip_vision_model(state_dict, heads, hidden_act="quick_gelu", layer_norm_eps=1e-5):
    """An open_clip VisionTransformer shaped like `state_dict` (open_clip names, from hf_clip_vision_state_dict),
    with `heads` attention heads and the checkpoint's activation and LayerNorm eps. Its weights are random;
    load_state_dict(state_dict) fills them. Without "proj" the model has proj=None and returns the pooled
    ln_post output, as CLIPVisionModel's pooler_output."""
    from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer
    if hidden_act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={hidden_act!r}: open_clip's VisionTransformer is built here with "
                         f"{sorted(_ACTIVATIONS)} only")
    act = QuickGELU if hidden_act == "quick_gelu" else torch.nn.GELU
    conv = state_dict["conv1.weight"]
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    if channels != 3 or conv.shape[-2] != patch:
        raise ValueError(f"conv1.weight of shape {tuple(conv.shape)}: open_clip's VisionTransformer takes 3-channel "
                         f"images and square patches")
    grid = round((state_dict["positional_embedding"].shape[0] - 1) ** 0.5)
    if grid * grid + 1 != state_dict["positional_embedding"].shape[0]:
        raise ValueError(f"positional_embedding of shape {tuple(state_dict['positional_embedding'].shape)}: not a "
                         f"square grid of patches plus the class token")
    layers = len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")})
    mlp_width = state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads={heads}")
    proj = state_dict.get("proj")
    model = VisionTransformer(image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=heads,
                              mlp_ratio=mlp_width / width, output_dim=proj.shape[1] if proj is not None else width,
                              act_layer=act, norm_layer=functools.partial(LayerNorm, eps=layer_norm_eps))
    if model.transformer.resblocks[0].mlp.c_fc.out_features != mlp_width:
        raise ValueError(f"mlp width {mlp_width} is not width {width} × a ratio open_clip reproduces")
    if proj is None:
        model.proj = None
    return model


def load_hf_clip_vision(path, projection=None):
    """An open_clip VisionTransformer holding a saved Hugging Face CLIP vision tower's weights (a folder with
    config.json; needs transformers for the config). projection: as in hf_clip_vision_state_dict."""
    config = hf_clip_vision_config(path)
    return hf_clip_vision_model(hf_clip_vision_state_dict(path, projection), config)


def hf_clip_vision_model(state_dict, config):
    """An open_clip VisionTransformer holding `state_dict` (open_clip names, from hf_clip_vision_state_dict),
    built as the CLIPVisionConfig `config` says (heads, activation, LayerNorm eps), in the state dict's dtype
    where it has one."""
    sd = state_dict
    model = open_clip_vision_model(sd, config.num_attention_heads, config.hidden_act, config.layer_norm_eps)
    dtypes = {v.dtype for v in sd.values()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    model.load_state_dict(sd, strict=True)
    return model


def hf_clip_task_vectors(pretrained, finetuned, dtype=torch.float32, projection=None):
    """A TaskVectors bank in open_clip VisionTransformer names (compose(clip.visual, bank)) from Hugging Face
    CLIP vision checkpoints (paths or state dicts), read one at a time. projection: as in
    hf_clip_vision_state_dict; pass False when the fine-tuned checkpoints are CLIPVisionModels without one."""
    finetuned = list(finetuned)
    sources = [f"finetuned[{t}]" if isinstance(p, dict) else os.fspath(p) for t, p in enumerate(finetuned)]
    base = hf_clip_vision_state_dict(pretrained, projection)
    return TaskVectors.from_state_dicts(base, (hf_clip_vision_state_dict(p, "proj" in base) for p in finetuned),
                                        dtype, sources=sources)


def is_hf_clip_vision(state_dict):
    """Whether a state dict holds a Hugging Face CLIP vision tower (transformers' names)."""
    return any(k == PATCH or k.endswith("." + PATCH) for k in state_dict)


def hf_clip_vision_names(state_dict, vision_prefix="vision_model.", root=""):
    """The inverse of hf_clip_vision_state_dict: transformers' names for an open_clip VisionTransformer state
    dict (in_proj split into q, k, v; proj transposed into root + visual_projection.weight)."""
    top = {v: k for k, v in _TOP_MAP.items()}
    block = {v: k for k, v in _BLOCK_MAP.items()}
    out = {}
    for key, value in state_dict.items():
        if key in top:
            out[vision_prefix + top[key]] = value
            continue
        if key == "proj":
            out[root + PROJECTION] = value.t().contiguous()
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m and m.group(2) in block:
            out[f"{vision_prefix}encoder.layers.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"] = value
            continue
        q = re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)
        if not q:
            raise ValueError(f"{key!r}: not an entry of an open_clip VisionTransformer that a Hugging Face CLIP "
                             f"vision tower has")
        for c, part in zip("qkv", value.chunk(3)):
            out[f"{vision_prefix}encoder.layers.{q.group(1)}.self_attn.{c}_proj.{q.group(2)}"] = part.contiguous()
    return out


# The small files of a saved folder that describe the model (copied beside a merged tower).
_FOLDER_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "vocab.json", "merges.txt", "special_tokens_map.json")


def hf_folder(path):
    """The folder of a Hugging Face checkpoint (the folder itself, or the one holding a weights file)."""
    path = os.fspath(path)
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def save_hf_clip_vision(out, state_dict, pretrained):
    """Write an open_clip VisionTransformer state dict (a merged tower) as a Hugging Face folder in the form of
    θ0 `pretrained` (a folder or weights file of a CLIPVisionModel, ...WithProjection or CLIPModel): θ0's entries
    with the vision tower's replaced (a CLIPModel keeps its text side), each in θ0's dtype, as model.safetensors,
    beside θ0's config.json (and preprocessor / tokenizer files). `from_pretrained(out)` loads it. The folder is
    built beside `out` and renamed onto it; an existing `out` is replaced only if it is empty or a model folder
    (has a config.json). Returns out."""
    from safetensors.torch import save_file
    out, source = os.fspath(out), os.fspath(pretrained)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out}: a file; the merged Hugging Face model is a folder (config.json + "
                         f"model.safetensors): give a folder path")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "config.json")):
        raise ValueError(f"{out}: a folder with other files and no config.json; not replaced by the merged model")
    base = read_hf_checkpoint(source)
    vp = _vision_prefix(base, source)
    root = vp[:-len("vision_model.")] if vp.endswith("vision_model.") else vp
    replaced = hf_clip_vision_names(state_dict, vp, root)
    expected = set(hf_clip_vision_state_dict(base, source=source))
    if set(state_dict) != expected:
        raise ValueError(f"{source}: the merged tower's entries {sorted(set(state_dict) ^ expected)[:8]} differ "
                         f"from θ0's vision tower")
    for k, v in replaced.items():
        if v.shape != base[k].shape:
            raise ValueError(f"{k}: merged shape {tuple(v.shape)}, θ0's {tuple(base[k].shape)} in {source}")
    merged = {k: replaced[k].to(v.dtype).contiguous().clone() if k in replaced else v.contiguous().clone()
              for k, v in base.items()}
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        save_file(merged, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name in _FOLDER_FILES:
            if os.path.isfile(os.path.join(hf_folder(source), name)):
                shutil.copyfile(os.path.join(hf_folder(source), name), os.path.join(tmp, name))
        if not os.path.isdir(out):
            os.rename(tmp, out)
            return out
        old = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        os.rename(out, os.path.join(old, "previous"))
        os.rename(tmp, out)
        shutil.rmtree(old)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        raise
    return out


@dataclass
class Checkpoint:
    """A checkpoint read for a command: state_dict in open_clip names (a CLIP's, or a tower's under "visual."),
    hf: whether it was a Hugging Face CLIP checkpoint (its vision tower, converted); classes: the class names
    of a pickled module's tree (checkpoints.read_module_checkpoint), else empty."""
    path: str
    state_dict: dict
    hf: bool = False
    classes: frozenset = frozenset()


def read_checkpoint(path, allow_pickle=False):
    """A Checkpoint from any file read_state_dict reads (allow_pickle: as there), or from a Hugging Face CLIP
    checkpoint: a saved folder, its .index.json, or a weights file with transformers' names (converted to
    open_clip's, under "visual."; visual_projection becomes visual.proj)."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(".index.json"):
        sd = read_hf_checkpoint(path)
    else:
        sd, classes = read_module_checkpoint(path, allow_pickle)
        if not is_hf_clip_vision(sd):
            return Checkpoint(path, sd, classes=frozenset(classes))
    return Checkpoint(path, {"visual." + k: v for k, v in hf_clip_vision_state_dict(sd, source=path).items()}, True)
