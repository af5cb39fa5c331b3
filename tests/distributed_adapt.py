"""A data-parallel adapt() run for tests/test_adapt_distributed.py, started by torchrun:
`python -m torch.distributed.run --standalone --nproc-per-node N tests/distributed_adapt.py SETTINGS_JSON`.

SETTINGS_JSON holds adapt()'s arguments plus "kill_at": a step after which every process raises, as a run
killed mid-epoch does."""
import json
import sys

import torch

from atlas_fast.adapt import adapt, distributed


def main():
    settings = json.loads(sys.argv[1])
    kill_at = settings.pop("kill_at", None)
    model, bank, data = settings.pop("model"), settings.pop("bank"), settings.pop("data")

    def on_step(step):
        if step == kill_at:
            raise SystemExit(f"killed at step {step}")
    torch.set_num_threads(1)
    try:
        adapt(model, bank, data, on_step=on_step, **settings)
    finally:
        distributed.finish()


if __name__ == "__main__":
    main()
