"""What a quantised and a low-rank block share: standing where a (T, *shape) tensor of task vectors stands.

A subclass keeps `shape` (T, rows, *rest), defines `nbytes` and `_with_shape(shape)` (the same storage seen with
another shape), and names itself in `_what` for error messages. `reshape` keeps T and the rows (the im2col view
of a conv weight): the storage of both kinds is per row.
"""
import math


class StackedBlock:
    __slots__ = ()
    _what = "task vectors"

    @property
    def requires_grad(self):
        return False

    @property
    def rows(self):
        return self.shape[1]

    @property
    def cols(self):
        return math.prod(self.shape[2:])

    @property
    def element_bytes(self):
        """Bytes per element of the dense block it stands for: what the cost model counts."""
        return self.nbytes / max(1, math.prod(self.shape))

    def dim(self):
        return len(self.shape)

    def numel(self):
        return math.prod(self.shape)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
        shape = list(shape)
        if -1 in shape:
            i = shape.index(-1)
            shape[i] = self.numel() // max(1, math.prod(s for j, s in enumerate(shape) if j != i))
        if math.prod(shape) != self.numel() or tuple(shape[:2]) != tuple(self.shape[:2]):
            raise ValueError(f"{self._what} {tuple(self.shape)} reshape only within a row (T and the rows stay), "
                             f"not to {tuple(shape)}")
        return self._with_shape(shape)
