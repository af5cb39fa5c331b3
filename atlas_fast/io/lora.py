"""LoRA adapters (peft's saved format) as task vectors of their base model.

An adapter folder holds adapter_model.safetensors (or adapter_model.bin) and adapter_config.json. Its entries:

    base_model.model.<module>.lora_A.weight            A, (r, in) — (r, in, kh, kw) for a Conv2d
    base_model.model.<module>.lora_B.weight            B, (out, r) — (out, r, 1, 1) for a Conv2d
    base_model.model.<module>.lora_B.bias              with lora_bias=True: τ of <module>.bias is scaling · bias
    base_model.model.<module>.lora_embedding_{A,B}     an nn.Embedding: A (r, num), B (dim, r), τ = scaling·(B A)ᵀ
    base_model.model.<module>.<param>                  modules_to_save and bias="all"/"lora_only": full tensors,
                                                       τ = saved − θ0 (a ".base_layer" inside the name is dropped)

The task vector of an adapted weight is τ = scaling · B A, in the weight's layout: transposed where the weight is
stored (in, out) (fan_in_fan_out, as GPT-2's Conv1D), reshaped to (out, in, kh, kw) for a Conv2d. scaling =
lora_alpha / r, or lora_alpha / √r with use_rslora, with rank_pattern / alpha_pattern overriding r and alpha per
module as peft matches them. The factors are kept too: τ = (U @ V).reshape(weight shape) with U = scaling · B and
V = A (for a transposed weight U = Aᵀ, V = scaling · Bᵀ), so a low-rank bank can take them without forming τ.
Factors and τ are float32 (a bfloat16 / float16 adapter is upcast exactly; the product is taken in float32).

That τ is the adapter's change of the base model only where making the adapter left the base weights alone:
peft's init_lora_weights True, False, "gaussian", and "orthogonal" / "mica" (B A = 0 at initialisation).
PiSSA, OLoRA, CorDA, LoRA-GA and LoftQ replace the base weight by a residual W − scaling · B₀ A₀ (LoftQ by a
quantised one), so the saved factors alone do not give τ: such adapters are refused, by init name, unless saved
converted (peft's save_pretrained(..., path_initial_model_for_weight_conversion=...)), which writes a plain LoRA
of twice the rank (init_lora_weights true) whose scaling · B A is the change against the original base.
Any init not known to keep the base weights (e.g. "eva", not checked here) is refused the same way.
"""
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from ..bank import lowrank
from ..bank.task_vectors import TaskVectors, read_state_dict

PEFT_PREFIX = "base_model.model."
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# peft's init_lora_weights values that leave the base weights as they were (B = 0 or B A = 0 at initialisation)
BASE_PRESERVING_INITS = (True, False, "gaussian", "orthogonal", "mica")
# A factor of a Linear / Conv2d (a module: .weight, lora_B may have a .bias) or of an Embedding (a bare
# parameter), with peft's in-memory adapter name (".default") where a state dict was not saved by peft.
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
_EMBEDDING_FACTOR = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?$")


@dataclass
class LoraAdapter:
    """One adapter read against its base model. factors: {weight name: (U, V)} with τ = (U @ V).reshape(shape);
    full: {parameter name: τ} for the tensors the adapter stores whole (modules_to_save, biases);
    scaling: {weight name: lora_alpha / r} as applied; shapes: {name: the base parameter's shape};
    skipped: {name: why} for saved entries that are no task vector (integer buffers)."""
    path: str
    factors: dict = field(default_factory=dict)
    full: dict = field(default_factory=dict)
    scaling: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    @property
    def names(self):
        return list(self.shapes)

    def delta(self, name):
        """τ of one parameter, float32, in the parameter's shape."""
        if name in self.full:
            return self.full[name]
        u, v = self.factors[name]
        return (u @ v).reshape(self.shapes[name])

    def task_vector(self):
        """{name: τ} for every parameter the adapter changes."""
        return {name: self.delta(name) for name in self.shapes}


def _base_entries(base):
    """{parameter name: tensor} and {module name: module} of a module, or a state dict and {}."""
    if isinstance(base, torch.nn.Module):
        return {k: v.detach() for k, v in base.state_dict().items()}, dict(base.named_modules())
    if isinstance(base, dict):
        return base, {}
    raise TypeError(f"base: an nn.Module or a state dict, not {type(base).__name__}")


def _adapter_files(path):
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [f for f in ADAPTER_FILES if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise ValueError(f"{path}: a folder with neither of {', '.join(ADAPTER_FILES)}")
        weights = os.path.join(path, found[0])
    else:
        weights = path
    config = os.path.join(os.path.dirname(os.path.abspath(weights)), "adapter_config.json")
    return weights, config if os.path.isfile(config) else None


def _read_config(config_path):
    if config_path is None:
        return {}
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path}: unreadable adapter config ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"{config_path}: peft_type={peft_type!r}; only LoRA adapters are read")
    if config.get("use_dora"):
        raise ValueError(f"{config_path}: a DoRA adapter (use_dora=true): its weight is rescaled by a learned "
                         f"magnitude, not shifted by scaling · B A, so it is no LoRA task vector")
    return config


def _setting(name, passed, config, config_path):
    """A value passed in, else the config's; both given and different is an error."""
    in_config = config.get(name)
    if passed is not None and in_config is not None and passed != in_config:
        raise ValueError(f"{config_path}: {name}={in_config!r} there, but {name}={passed!r} was passed")
    return passed if passed is not None else in_config


def _pattern_value(patterns, module, default):
    """peft's per-module override: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for p, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({p})$", module):
            return value
    return default


def read_lora(path, base, lora_alpha=None, r=None):
    """Read a peft LoRA adapter (a folder, or its .safetensors / .bin file with adapter_config.json beside it)
    against `base` (the base model, or its state dict): task vectors under the base model's parameter names.

    lora_alpha, r: needed where there is no adapter_config.json (r defaults to each pair's rank); if the config
    has them too they must agree. Raises ValueError naming the file and entry for a rank that disagrees with the
    config, a name the base model lacks, shapes that do not fit, and entries that are no LoRA factors."""
    weights, config_path = _adapter_files(path)
    config = _read_config(config_path)
    where = config_path or weights
    init = config.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in BASE_PRESERVING_INITS):
        raise ValueError(f"{weights}: init_lora_weights={init!r} (in {config_path}) rewrites the base model's weights "
                         f"when the adapter is made, so scaling · B A is not its task vector; save it converted "
                         f"(peft: save_pretrained(..., path_initial_model_for_weight_conversion=...)) to read it")
    alpha = _setting("lora_alpha", lora_alpha, config, where)
    r = _setting("r", r, config, where)
    sd = read_state_dict(weights)
    params, modules = _base_entries(base)
    strip = PEFT_PREFIX if any(k.startswith(PEFT_PREFIX) for k in sd) else ""
    pairs, full = {}, {}
    adapters = set()
    for key, value in sd.items():
        if strip and not key.startswith(strip):
            raise ValueError(f"{weights}: entry {key!r} lacks the {strip!r} prefix its other entries have")
        name = key[len(strip):]
        if ".lora_magnitude_vector" in name:
            raise ValueError(f"{weights}: entry {key!r} is a DoRA magnitude: not a LoRA task vector")
        m = _FACTOR.match(name) or _EMBEDDING_FACTOR.match(name)
        if m:
            adapters.add(m.group("adapter") or "")
            if len(adapters) > 1:
                raise ValueError(f"{weights}: holds the factors of several adapters ({sorted(adapters)}, '' for "
                                 f"entries without an adapter name); save them one per file")
            pair = pairs.setdefault(m.group("module"), {"embedding": m.re is _EMBEDDING_FACTOR})
            if pair["embedding"] != (m.re is _EMBEDDING_FACTOR):
                raise ValueError(f"{weights}: entry {key!r} mixes lora_embedding_* and lora_* factors on one module")
            slot = (m.group("part"), m.groupdict().get("param") or "weight")
            if slot in pair:
                raise ValueError(f"{weights}: entries {pair[slot][0]!r} and {key!r} are the same factor")
            pair[slot] = (key, value)
            continue
        if ".lora_" in name:
            raise ValueError(f"{weights}: entry {key!r} is no LoRA factor this reader knows (lora_A / lora_B / "
                             f"lora_embedding_A / lora_embedding_B)")
        if ".original_module." in name:
            continue                              # peft's copy of the base module, unchanged
        name = _base_name(name, params)
        if name in full and not torch.equal(full[name][1], value):
            raise ValueError(f"{weights}: entries {full[name][0]!r} and {key!r} both give {name!r}, with other values")
        full[name] = (key, value)

    out = LoraAdapter(path=os.fspath(path))
    for module, factors in pairs.items():
        _add_pair(out, module, factors, params, modules.get(module), config, alpha, r, weights, where)
    for name, (key, value) in full.items():
        if name in out.shapes:
            raise ValueError(f"{weights}: entry {key!r} gives {name!r} whole, and LoRA factors change it too")
        p0 = _base_param(params, name, key, weights)
        if not p0.is_floating_point():
            out.skipped[name] = f"not floating ({p0.dtype})"
            continue
        if value.shape != p0.shape:
            raise ValueError(f"{weights}: entry {key!r} has shape {tuple(value.shape)}, the base model's {name!r} "
                             f"{tuple(p0.shape)}")
        out.full[name] = value.float() - p0.float()
        out.shapes[name] = p0.shape
    if not out.shapes:
        raise ValueError(f"{weights}: no LoRA factors or saved tensors")
    return out


def _base_name(name, params):
    """The base model's name of a saved full tensor: without the ".base_layer" of a wrapped layer, and without
    ".modules_to_save" and the adapter name after it if there is one (in-memory names keep it)."""
    name = name.replace(".base_layer.", ".")
    if ".modules_to_save." not in name:
        return name
    plain = name.replace(".modules_to_save.", ".", 1)
    if plain in params:
        return plain
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name, count=1)


def _base_param(params, name, key, weights):
    if name not in params:
        raise ValueError(f"{weights}: entry {key!r} names {name!r}, which the base model lacks")
    return params[name]


def _add_pair(out, module, factors, params, base_module, config, alpha, r, weights, where):
    embedding = factors["embedding"]
    for part in ("A", "B"):
        if (part, "weight") not in factors:
            other = factors.get(("B" if part == "A" else "A", "weight"), ("?",))[0]
            raise ValueError(f"{weights}: entry {other!r} has no lora_{part} partner for module {module!r}")
    (key_a, a), (key_b, b) = factors[("A", "weight")], factors[("B", "weight")]
    name = f"{module}.weight"
    w0 = _base_param(params, name, key_a, weights)
    rank = a.shape[0]
    if b.ndim < 2 or b.shape[1] != rank:
        raise ValueError(f"{weights}: rank mismatch in {module!r}: {key_a!r} has shape {tuple(a.shape)} (rank "
                         f"{rank}), {key_b!r} has shape {tuple(b.shape)}")
    module_r = _pattern_value(config.get("rank_pattern"), module, r)
    module_alpha = _pattern_value(config.get("alpha_pattern"), module, alpha)
    if module_r is not None and module_r != rank:
        raise ValueError(f"{weights}: rank mismatch in {module!r}: {key_a!r} has rank {rank}, {where} says "
                         f"r={module_r}")
    if module_alpha is None:
        raise ValueError(f"{weights}: no lora_alpha (no adapter_config.json gives one): pass lora_alpha=")
    scaling = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    a32, b32 = a.float(), b.float()
    if embedding or _transposed(w0, a, b, base_module, config):
        u, v = a32.reshape(rank, -1).t(), scaling * b32.reshape(-1, rank).t()
    else:
        if b.ndim == 4 and b.shape[2:] != (1, 1):
            raise ValueError(f"{weights}: {key_b!r} has shape {tuple(b.shape)}: a Conv2d lora_B is 1×1")
        u, v = scaling * b32.reshape(b.shape[0], rank), a32.reshape(rank, -1)
    if u.shape[0] * v.shape[1] != w0.numel() or (w0.ndim == 2 and (u.shape[0], v.shape[1]) != tuple(w0.shape)):
        raise ValueError(f"{weights}: {key_b!r} {tuple(b.shape)} · {key_a!r} {tuple(a.shape)} does not fit the base "
                         f"model's {name!r} of shape {tuple(w0.shape)}")
    if w0.ndim == 4 and (u.shape[0], *a.shape[1:]) != tuple(w0.shape):
        raise ValueError(f"{weights}: {key_a!r} {tuple(a.shape)} does not fit the base model's {name!r} of shape "
                         f"{tuple(w0.shape)}")
    out.factors[name] = (u.contiguous(), v.contiguous())
    out.scaling[name] = scaling
    out.shapes[name] = w0.shape
    if ("B", "bias") in factors:
        key, bias = factors[("B", "bias")]
        b0 = _base_param(params, f"{module}.bias", key, weights)
        if bias.shape != b0.shape:
            raise ValueError(f"{weights}: entry {key!r} has shape {tuple(bias.shape)}, the base model's "
                             f"{module}.bias {tuple(b0.shape)}")
        out.full[f"{module}.bias"] = scaling * bias.float()
        out.shapes[f"{module}.bias"] = b0.shape


def _transposed(w0, a, b, base_module, config):
    """Whether the weight is stored (in, out): peft transposes B A for such layers (fan_in_fan_out). Told by
    the layer's type when the base is a module (nn.Linear never is), else by the shapes, and for a square weight
    by the config."""
    if w0.ndim != 2:
        return False
    if isinstance(base_module, torch.nn.Linear):
        return False
    out_in, in_out = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
    if out_in == in_out:
        return bool(config.get("fan_in_fan_out", False)) or (base_module is not None and
                                                             type(base_module).__name__ == "Conv1D")
    return tuple(w0.shape) == in_out


def lora_task_vectors(base, adapters, dtype=torch.float32, lora_alpha=None, r=None, low_rank=False):
    """A TaskVectors bank from LoRA adapters (paths, or LoraAdapters read against `base`): one task vector per
    adapter over every parameter any of them changes, zero where an adapter leaves a parameter alone. The
    parameters no adapter changes are not in the bank: compose(model, bank, strict=False) keeps them at θ0.
    low_rank=True keeps the adapters' factors as a low-rank bank (lowrank.LowRankBlock, float32; ranks padded to
    the largest with zero factors) instead of multiplying them out; a parameter that some adapter stores whole
    (modules_to_save) stays dense."""
    adapters = [a if isinstance(a, LoraAdapter) else read_lora(a, base, lora_alpha, r) for a in adapters]
    if not adapters:
        raise ValueError("lora_task_vectors: no adapters")
    if low_rank and dtype != torch.float32:
        raise ValueError(f"lora_task_vectors(low_rank=True): the factors are float32; dtype={dtype} cannot be "
                         f"combined")
    params, _ = _base_entries(base)
    touched = set().union(*(a.shapes for a in adapters))
    names = [n for n in params if n in touched]
    vectors, factored = {}, {}
    for n in names:
        shape = params[n].shape
        if low_rank and lowrank.factorable(shape) and not any(n in a.full for a in adapters):
            vectors[n] = lowrank.stack([a.factors.get(n) for a in adapters], shape)
            factored[n] = 1.0   # the factors are the adapters' own: all of τ is kept
            continue
        vectors[n] = torch.stack([a.delta(n).to(dtype) if n in a.shapes else torch.zeros(shape, dtype=dtype)
                                  for a in adapters])
    skipped = {n: why for a in adapters for n, why in a.skipped.items()}
    return TaskVectors(vectors, sources=[a.path for a in adapters], skipped=skipped, lowrank_energy=factored)
