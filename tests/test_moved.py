"""Module paths of earlier versions: a model pickled by them names its classes by those paths, and must still load."""
import pickle
import subprocess
import sys

import pytest
import torch

import atlas_fast
from atlas_fast import moved
from atlas_fast.bank.quant import QuantizedBlock
from atlas_fast.composer.modules import AtlasCoefficients, AtlasLinear

# (old module, class) pairs as pickles of the earlier layout spell them, and the class each must resolve to.
OLD_GLOBALS = [("atlas_fast.modules", "AtlasLinear", AtlasLinear),
               ("atlas_fast.modules", "AtlasCoefficients", AtlasCoefficients),
               ("atlas_fast.quant", "QuantizedBlock", QuantizedBlock),
               ("atlas_fast.compose", "AtlasModel", atlas_fast.AtlasModel),
               ("atlas_fast.task_vectors", "TaskVectors", atlas_fast.TaskVectors)]


def _old_pickle(module, name):
    """The protocol-0 pickle of a global reference, as the earlier layout wrote it."""
    return f"c{module}\n{name}\n.".encode()


@pytest.mark.parametrize("module,name,cls", OLD_GLOBALS)
def test_old_paths_unpickle_to_the_moved_classes(module, name, cls):
    assert pickle.loads(_old_pickle(module, name)) is cls


def test_every_old_path_is_its_new_module():
    for old, new in moved.MOVED.items():
        assert sys.modules[old] is sys.modules[new], old


def test_old_paths_load_before_atlas_fast_is_imported():
    # A fresh interpreter: unpickling is the first thing that imports atlas_fast.
    code = ("import pickle, sys; cls = pickle.loads(sys.stdin.buffer.read()); "
            "print(cls.__module__ + '.' + cls.__qualname__)")
    out = subprocess.run([sys.executable, "-c", code], input=_old_pickle("atlas_fast.lowrank", "LowRankBlock"),
                         capture_output=True, check=True).stdout.decode().strip()
    assert out == "atlas_fast.bank.lowrank.LowRankBlock"


def test_a_composed_module_pickled_under_old_paths_loads(tmp_path):
    # A composed linear layer saved whole, its class references rewritten to the earlier module paths.
    layer = torch.nn.Sequential(torch.nn.Linear(5, 3))
    atlas = atlas_fast.compose(layer, atlas_fast.synthetic_task_vectors(layer, 2, seed=1), backend="torch")
    x = torch.randn(4, 5)
    expected = atlas(x)
    data = pickle.dumps(atlas, protocol=0)
    for old, new in moved.MOVED.items():
        data = data.replace(f"c{new}\n".encode(), f"c{old}\n".encode())
    assert b"catlas_fast.composer." not in data and b"catlas_fast.modules\n" in data
    torch.testing.assert_close(pickle.loads(data)(x), expected, rtol=0, atol=0)
