"""Out-of-core banks on a GPU: the fused modules' task vectors stay in host memory, and each module's blocks are
copied to the device just before it runs, the next module's on a side stream while it runs, forward and backward.

AtlasModel.offload_bank() moves every fused module's task-vector buffers (the tau_* buffers of the modules.py
modules: float task vectors, int8/int4 data and scales, low-rank factors) to host memory, page-locked unless
pin=False (pinning an mmap bank reads it into page-locked memory; pin=False keeps it mapped, and copies from it
do not overlap). The generically merged blocks (LayerNorms, embeddings, ...) are small and stay on the device.

Forward: a pre-hook on module i puts its device copies in place of its buffers (waiting for the side stream's
copy when one is in flight) and starts the copy of the module after it (in the order of the previous forward);
a forward hook puts the host tensors back. Backward: the ops save their task vectors for the backward; a
saved-tensor hook packs a device copy as its (module, buffer), and unpacking fetches the copy again and starts
the copy of the module the backward reaches next (the one before it in the forward). At most two modules'
blocks are on the device at once; the rest of the bank never is. A grouped call (AtlasModel.groups) runs under
torch.func.vmap, which takes no saved-tensor hooks: its backward keeps the copies of every module it used.
"""
import contextlib
from dataclasses import dataclass

import torch

from .modules import AtlasBlocks


@dataclass(frozen=True)
class _Packed:
    """A saved task-vector tensor, by name: module index and buffer name."""
    module: int
    name: str


def _key(t):
    return t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())


def _tau_buffers(module):
    return [n for n, t in module._buffers.items() if n.startswith("tau_") and t is not None]


def _once(copies, t, convert):
    """convert(t), once per tensor: the task vectors of a tied parameter, held by each fused module using it, stay
    one tensor."""
    if id(t) not in copies:
        copies[id(t)] = (t, convert(t))
    return copies[id(t)][1]


def _to_host(t, pin):
    t = t.detach().to("cpu")
    return t.pin_memory() if pin else t


class BankOffload:
    """The fused modules' task vectors of one composed model kept on the host and streamed to `device`."""

    def __init__(self, root, device, pin=True):
        self.device = torch.device(device)
        self.modules = [m for m in root.modules() if isinstance(m, AtlasBlocks) and _tau_buffers(m)]
        pin = pin and self.device.type == "cuda"
        self.host = []
        copies = {}
        for m in self.modules:
            host = {}
            for n in _tau_buffers(m):
                host[n] = m._buffers[n] = _once(copies, m._buffers[n], lambda t: _to_host(t, pin))
            self.host.append(host)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.cache = {}                          # module index -> [{name: device copy}, copy event or None]
        self.packed = {}                         # _key(device copy) -> _Packed
        self.order = list(range(len(self.modules)))   # forward order of the last complete forward
        self._seen = []
        self.peak_resident = 0                   # most modules on the device at once
        self._handles = []
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_pre_hook(self._pre_hook(i)))
            self._handles.append(m.register_forward_hook(self._post_hook(i), always_call=True))

    @property
    def host_bytes(self):
        unique = {id(t): t for host in self.host for t in host.values()}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def remove(self):
        """Take the hooks out and put every module's task vectors back on the device."""
        for h in self._handles:
            h.remove()
        copies = {}
        for m, host in zip(self.modules, self.host):
            for n, t in host.items():
                m._buffers[n] = _once(copies, t, lambda t: t.to(self.device))
        self.cache.clear()
        self.packed.clear()

    # -- the copies

    def _issue(self, i):
        """Start module i's copy to the device (on the side stream on a GPU) unless it is there or on its way."""
        if i is None or i in self.cache:
            return
        if self.stream is None:
            copies, event = {n: t.to(self.device, copy=True) for n, t in self.host[i].items()}, None
        else:
            with torch.cuda.stream(self.stream):   # the host tensors never change: no wait on other work
                copies = {n: t.to(self.device, non_blocking=True) for n, t in self.host[i].items()}
                event = torch.cuda.Event()
                event.record(self.stream)
        self.cache[i] = [copies, event]
        self.packed.update({_key(t): _Packed(i, n) for n, t in copies.items()})
        self.peak_resident = max(self.peak_resident, len(self.cache))

    def _ready(self, i):
        """Module i's device copies, usable on the current stream."""
        self._issue(i)
        entry = self.cache[i]
        if entry[1] is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(entry[1])
            for t in entry[0].values():
                t.record_stream(current)   # the allocator reuses their memory only after this stream's work
            entry[1] = None
        return entry[0]

    def _keep(self, *wanted):
        for i in [i for i in self.cache if i not in wanted]:
            for t in self.cache.pop(i)[0].values():
                self.packed.pop(_key(t), None)

    def _neighbour(self, i, step):
        if i not in self.order:
            return None
        j = self.order.index(i) + step
        return self.order[j] if 0 <= j < len(self.order) else None

    def _use(self, i, step):
        """Module i's copies, with only it and the module `step` away in the order kept, that one on its way."""
        nxt = self._neighbour(i, step)
        self._keep(i, nxt)
        copies = self._ready(i)
        self._issue(nxt)
        return copies

    # -- forward hooks

    def _pre_hook(self, i):
        def hook(module, args):
            if i not in self._seen:
                self._seen.append(i)
            module._buffers.update(self._use(i, +1))
        return hook

    def _post_hook(self, i):
        def hook(module, args, output):
            module._buffers.update(self.host[i])
        return hook

    # -- saved tensors

    def _pack(self, t):
        return self.packed.get(_key(t), t) if t.device == self.device else t

    def _unpack(self, saved):
        return self._use(saved.module, -1)[saved.name] if isinstance(saved, _Packed) else saved

    @contextlib.contextmanager
    def forward_context(self, grouped=False):
        """Around a forward of the composed model: the saved-tensor hooks (not under a grouped call's vmap), and
        the forward order recorded for the next forward's prefetching."""
        self._seen = []
        hooks = (contextlib.nullcontext() if grouped
                 else torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
        with hooks:
            yield
        if sorted(self._seen) == list(range(len(self.modules))):
            self.order = list(self._seen)
