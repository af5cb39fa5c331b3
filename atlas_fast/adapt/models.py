"""Loading θ0: an open_clip model by architecture name or config file with its checkpoint (any form
io.hf_clip.read_checkpoint reads, also without its text tower), or the open_clip image tower of a Hugging Face
CLIP vision checkpoint, built from its config.json; with preprocessing."""
import os

import torch


class ModelSpecError(ValueError):
    """A model name, config or checkpoint that cannot be used."""


def _resolve_name(model):
    import open_clip
    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise ModelSpecError(f"{model}: no such model config file")
        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    if model not in open_clip.list_models():
        raise ModelSpecError(f"model={model!r}: not an open_clip architecture (see open_clip.list_models()) "
                             "nor a config .json file")
    return model


def load_clip(model, pretrained=None, device="cpu", allow_pickle=False):
    """(clip, preprocess, tokenizer) for an open_clip architecture name or config .json.

    `pretrained` is a checkpoint file (any form io.hf_clip.read_checkpoint reads but a Hugging Face one;
    allow_pickle as there) or None for the architecture's random initialisation (seeded by the caller).
    Nothing is downloaded. A checkpoint without the text tower (saved as keep_lang=False saves it: no
    transformer.*) gives the CLIP without the parts it lacks, and tokenizer None.
    """
    ckpt = read_pretrained(pretrained, allow_pickle) if pretrained is not None else None
    if ckpt is not None and ckpt.hf:
        raise ModelSpecError(f"{ckpt.path}: a Hugging Face CLIP vision checkpoint; load_hf_encoder builds its "
                             f"image tower from its config.json")
    clip, preprocess, tokenizer, _ = open_clip_from_checkpoint(model, ckpt)
    return clip.to(device).eval(), preprocess, tokenizer


def open_clip_from_checkpoint(model, ckpt=None):
    """(clip, preprocess, tokenizer or None, removed parts) for an open_clip architecture and a Checkpoint from
    read_pretrained (None: random initialisation). tokenizer is None when the checkpoint lacks part of the
    text side (`removed` names the parts taken out of the CLIP)."""
    import open_clip
    name = _resolve_name(model)
    clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    if ckpt is not None:
        _check_activation(clip, ckpt, model)
    removed = fit_open_clip(clip, ckpt.state_dict, model, ckpt.path) if ckpt is not None else []
    return clip, preprocess, None if removed else open_clip.get_tokenizer(name), removed


def read_pretrained(pretrained, allow_pickle=False):
    """io.hf_clip.read_checkpoint, its errors as ModelSpecError."""
    from ..io.hf_clip import read_checkpoint
    pretrained = os.fspath(pretrained)
    if not os.path.exists(pretrained):
        raise ModelSpecError(f"{pretrained}: no such checkpoint file")
    try:
        return read_checkpoint(pretrained, allow_pickle)
    except ValueError as e:
        raise ModelSpecError(str(e)) from e


def fit_open_clip(clip, state_dict, model, source):
    """Load `state_dict` into `clip` (strict), as open_clip.load_checkpoint prepares it ("module." prefixes,
    third-party names, resized position embeddings). Top-level parts of the text side that the checkpoint has
    none of are removed from `clip`; returns their names (empty: the whole CLIP was loaded)."""
    from open_clip.factory import (
        convert_state_dict,
        convert_to_custom_text_state_dict,
        resize_pos_embed,
        resize_text_pos_embed,
    )
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    try:
        sd = convert_state_dict(clip, sd)
        if "positional_embedding" in sd and not hasattr(clip, "positional_embedding"):
            sd = convert_to_custom_text_state_dict(sd)
        for key in ("logit_scale", "logit_bias"):
            if key in sd and getattr(clip, key, None) is not None and clip.state_dict()[key].ndim != sd[key].ndim:
                sd[key] = sd[key].reshape(clip.state_dict()[key].shape)
        if "logit_bias" not in sd and getattr(clip, "logit_bias", None) is not None and "logit_scale" in sd:
            sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
        resize_pos_embed(sd, clip)
        if "positional_embedding" in sd:
            resize_text_pos_embed(sd, clip)
    except (RuntimeError, KeyError, ValueError, AttributeError) as e:
        raise ModelSpecError(f"{source}: does not fit model {model!r} ({_first_line(e)})") from e
    removed = _remove_absent_parts(clip, sd, model, source)
    try:
        clip.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelSpecError(f"{source}: does not fit model {model!r} ({_first_line(e)})") from e
    return removed


_ACTIVATIONS = ("QuickGELU", "GELU")


def _check_activation(clip, ckpt, model):
    """A pickled CLIP records its activation's class: QuickGELU (OpenAI's weights, the aTLAS release) and GELU
    weigh the same tensors, so an architecture of the other activation would load them and compute wrongly."""
    from ..io.checkpoints import module_class_names
    theirs = [a for a in _ACTIVATIONS if a in ckpt.classes]
    ours = [a for a in _ACTIVATIONS if a in module_class_names(clip.visual)]
    if len(theirs) == 1 and len(ours) == 1 and theirs != ours:
        if theirs == ["QuickGELU"]:
            hint = "a config with \"quick_gelu\": true" if model.endswith(".json") else f"{model}-quickgelu"
        else:
            hint = "a config without quick_gelu" if model.endswith(".json") else "an architecture without -quickgelu"
        raise ModelSpecError(f"{ckpt.path}: its model was built with {theirs[0]}, model {model!r} uses {ours[0]}: "
                             f"pass --model {hint} (model=)")


def _first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _remove_absent_parts(clip, sd, model, source):
    """Delete the top-level parts outside the image tower of which `sd` holds no entry (as keep_lang=False
    deletes `transformer`); a part it holds only some entries of, or a missing image tower, stays an error."""
    if not any(k.startswith("visual.") for k in sd):
        raise ModelSpecError(f"{source}: does not fit model {model!r} (no visual.* entries: no image tower)")
    parts = {}
    for key in clip.state_dict():
        parts.setdefault(key.split(".")[0], []).append(key)
    removed = [part for part, keys in parts.items() if part != "visual" and not any(k in sd for k in keys)]
    for part in removed:
        delattr(clip, part)
    return removed


def load_hf_encoder(ckpt, model=None):
    """(image tower, preprocess) of a Hugging Face CLIP checkpoint read by read_pretrained: an open_clip
    VisionTransformer built as its config.json says. `model`, an open_clip architecture, if given must have an
    image tower of the same entries and shapes (the checkpoint's config decides activation and eps)."""
    import open_clip

    from ..io.hf_clip import hf_clip_vision_config, hf_clip_vision_model, hf_folder
    try:
        config = hf_clip_vision_config(hf_folder(ckpt.path))
        encoder = hf_clip_vision_model({k[len("visual."):]: v for k, v in ckpt.state_dict.items()}, config)
    except ValueError as e:
        raise ModelSpecError(f"{ckpt.path}: {e}") from e
    if model is not None:
        _check_same_tower(model, encoder, ckpt.path)
    mean, std = _hf_normalisation(hf_folder(ckpt.path))
    return encoder, open_clip.image_transform(encoder.image_size, is_train=False, mean=mean, std=std)


def _check_same_tower(model, encoder, source):
    import open_clip
    theirs = {k: tuple(v.shape) for k, v in open_clip.create_model(_resolve_name(model)).visual.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    if "proj" not in ours:
        theirs.pop("proj", None)     # a CLIPVisionModel has no projection
    if theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ModelSpecError(f"model={model!r}: its image tower differs from the Hugging Face checkpoint {source} "
                             f"(e.g. {diff[0]}: {theirs.get(diff[0])} vs {ours.get(diff[0])}); leave --model out: "
                             f"the tower is built from the checkpoint's config.json")


def _hf_normalisation(folder):
    """(mean, std) of a Hugging Face folder's preprocessor_config.json, or (None, None): open_clip's (OpenAI's)."""
    import json
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"{path}: unreadable preprocessor config ({e})") from e
    return cfg.get("image_mean"), cfg.get("image_std")


def clip_state_without_visual(clip):
    """The CLIP state dict minus its visual tower (cloned), to be completed with a merged tower on export."""
    return {k: v.detach().clone() for k, v in clip.state_dict().items() if not k.startswith("visual.")}


def model_fingerprint(module):
    """A hash of a module's tensors, identifying the weights a cached text head was computed with."""
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()
