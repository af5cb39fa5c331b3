"""The module paths of earlier versions, kept importable under their old names: a model pickled by an earlier version
names its classes by those paths (atlas_fast.modules.AtlasLinear, atlas_fast.quant.QuantizedBlock, ...), and code
written against them keeps working. Each old path is the same module object as its new one."""
import importlib
import sys

MOVED = {
    "atlas_fast.checkpoints": "atlas_fast.io.checkpoints",
    "atlas_fast.compose": "atlas_fast.composer.compose",
    "atlas_fast.convert": "atlas_fast.io.hf_clip",
    "atlas_fast.fingerprint": "atlas_fast.bank.fingerprint",
    "atlas_fast.hashing": "atlas_fast.ops.hashing",
    "atlas_fast.lora": "atlas_fast.io.lora",
    "atlas_fast.lowrank": "atlas_fast.bank.lowrank",
    "atlas_fast.mapped": "atlas_fast.bank.mapped",
    "atlas_fast.modules": "atlas_fast.composer.modules",
    "atlas_fast.offload": "atlas_fast.composer.offload",
    "atlas_fast.ops_grouped": "atlas_fast.ops.grouped",
    "atlas_fast.ops_lowrank": "atlas_fast.ops.lowrank",
    "atlas_fast.quant": "atlas_fast.bank.quant",
    "atlas_fast.reference": "atlas_fast.ops.reference",
    "atlas_fast.stacked": "atlas_fast.bank.stacked",
    "atlas_fast.task_vectors": "atlas_fast.bank.task_vectors",
}


def register():
    """Make every old path an alias of its module (the import system finds an entry of sys.modules first)."""
    for old, new in MOVED.items():
        sys.modules.setdefault(old, importlib.import_module(new))
