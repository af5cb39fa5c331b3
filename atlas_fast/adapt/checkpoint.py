"""Atomic, resumable training checkpoints: coefficients, optimiser, schedule, RNG, step and history."""
import os
import random

import numpy as np
import torch

from ..task_vectors import atomic_write

FORMAT = "atlas_fast.adapt_checkpoint/1"
CHECKPOINT = "checkpoint.pt"


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def torch_save(path, obj):
    """torch.save to `path` atomically (through an open file: torch's writer rejects some temp names)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(path, write)


def save(path, state):
    """Write a checkpoint (a temporary file renamed over `path`: a crash leaves the previous one)."""
    state = {"format": FORMAT, **state, "rng": rng_state()}
    torch_save(path, state)


def load(path):
    """A checkpoint written by save(). Its RNG state is restored by the caller (set_rng_state)."""
    path = os.fspath(path)
    try:
        # Optimiser and RNG states hold plain Python and NumPy objects; the file is this package's own.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: unreadable training checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not an atlas_fast training checkpoint")
    return state
