"""The paper-style composition, for tests and benchmarks only.

Every forward rebuilds every parameter θ0 + Σ_t c τ_t in Python, one task vector at a time, and runs the
model with torch.func.functional_call: the merged model lives until the backward, which materialises a
model-sized weight gradient. Same coefficient layout and partition hash as compose().
"""
import torch.nn as nn
from torch.func import functional_call

from ..composer.modules import AtlasCoefficients
from ..ops.hashing import partition_index


class NaiveAtlas(nn.Module):
    def __init__(self, model, task_vectors, granularity="block", partitions=1, seed=0):
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        params = dict(model.named_parameters())
        self.block_names = [n for n in params if n in task_vectors]
        if not self.block_names:
            raise ValueError("NaiveAtlas: no parameter of the model has a task vector in the bank")
        self.atlas = AtlasCoefficients(len(task_vectors), len(self.block_names), granularity, partitions, seed)
        self._theta0 = [params[n] for n in self.block_names]
        self._tau = [task_vectors[n] for n in self.block_names]

    @property
    def coefficients(self):
        return self.atlas.coefficients

    def merged_parameters(self):
        merged = {}
        for b, (name, p0, tau) in enumerate(zip(self.block_names, self._theta0, self._tau)):
            c = self.atlas.block(b)
            K = c.shape[1]
            part = partition_index(p0.numel(), self.atlas.keys[b], K, p0.device).view(p0.shape) if K > 1 else None
            # As the paper's code does: all T scaled task vectors of the block, then their sum.
            delta = sum([(c[t][part] if K > 1 else c[t, 0]) * tau[t].to(p0.dtype) for t in range(tau.shape[0])])
            merged[name] = p0 + delta
        return merged

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.merged_parameters(), args, kwargs)
