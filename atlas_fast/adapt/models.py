"""Loading an open_clip model by architecture name or config file, with its checkpoint and preprocessing."""
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


def load_clip(model, pretrained=None, device="cpu"):
    """(clip, preprocess, tokenizer) for an open_clip architecture name or config .json.

    `pretrained` is a checkpoint file (any format open_clip.load_checkpoint reads) or None for the
    architecture's random initialisation (seeded by the caller). Nothing is downloaded.
    """
    import open_clip
    name = _resolve_name(model)
    clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    if pretrained is not None:
        pretrained = os.fspath(pretrained)
        if not os.path.isfile(pretrained):
            raise ModelSpecError(f"{pretrained}: no such checkpoint file")
        try:
            open_clip.load_checkpoint(clip, pretrained)
        except (RuntimeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelSpecError(f"{pretrained}: does not fit model {model!r} ({first})") from e
        except Exception as e:
            raise ModelSpecError(f"{pretrained}: unreadable checkpoint ({type(e).__name__}: {e})") from e
    tokenizer = open_clip.get_tokenizer(name)
    return clip.to(device).eval(), preprocess, tokenizer


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
