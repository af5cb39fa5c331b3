"""Training curves and the learned coefficients as a heatmap (matplotlib, Agg backend, atomic writes)."""
import os
import re

from ..io.atomic import atomic_write

_LAYER = re.compile(r"(?:^|\.)(resblocks|layers|blocks|layer|stages|h)\.(\d+)\.")


def layer_label(block_name):
    """The layer a block belongs to: "L3" for ...resblocks.3..., else the block's module path."""
    m = _LAYER.search(block_name)
    if m:
        return f"L{m.group(2)}"
    return block_name.rsplit(".", 1)[0] if "." in block_name else block_name


def _figure():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    plt = _figure()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_curves(history, task_names, path):
    """Train loss and per-task validation accuracy per epoch (epoch 0 is the initial model)."""
    plt = _figure()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    trained = [h for h in history if h.get("loss") is not None]
    ax_loss.plot([h["epoch"] for h in trained], [h["loss"] for h in trained], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training objective")
    for i, name in enumerate(task_names):
        ax_acc.plot([h["epoch"] for h in history], [100 * h["eval"][i]["accuracy"] for h in history],
                    marker="o", label=name)
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="accuracy (epoch 0: initial model)")
    ax_acc.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)


def plot_coefficients(coefficients, block_names, sources, path):
    """Heatmap of the coefficients, task vectors × blocks, blocks labelled by layer. Partitions are
    averaged per block; task-wise coefficients show as one column."""
    plt = _figure()
    c = coefficients.detach().float().cpu()
    if c.dim() == 3:
        c = c.mean(-1)
    if c.dim() == 1:
        c, labels = c[:, None], ["all blocks"]
        ticks = [0]
    else:
        labels, ticks = [], []
        for b, name in enumerate(block_names):
            lab = layer_label(name)
            if not labels or lab != labels[-1]:
                labels.append(lab)
                ticks.append(b)
    lim = max(c.abs().max().item(), 1e-6)
    fig, ax = plt.subplots(figsize=(min(2 + 0.08 * c.shape[1], 24), 1.2 + 0.35 * c.shape[0]))
    im = ax.imshow(c.numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_yticks(range(c.shape[0]), [_short(s) for s in sources], fontsize=7)
    ax.set_xticks(ticks, labels, rotation=90, fontsize=6, ha="left")
    for t in ticks[1:]:
        ax.axvline(t - 0.5, color="k", linewidth=0.4)
    ax.set_xlabel("parameter blocks, by layer")
    ax.set_title("learned coefficients")
    fig.colorbar(im, ax=ax, fraction=0.03)
    _save(fig, path)


def plot_running_accuracy(curves, path):
    """Online accuracy so far against images seen, one line per stream. curves: {stream: [(seen, accuracy)]}."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, points in curves.items():
        if points:
            ax.plot([n for n, _ in points], [100 * a for _, a in points], label=_short(name))
    ax.set(xlabel="images seen", ylabel="accuracy so far (%)", title="online accuracy (predicted before each update)")
    ax.grid(alpha=0.3)
    if len(curves) <= 20:
        ax.legend(fontsize=7)
    _save(fig, path)


def _short(source, width=28):
    s = os.path.basename(str(source))
    return s if len(s) <= width else s[:width - 1] + "…"


def coefficient_summary(coefficients):
    c = coefficients.detach().float()
    return {"mean": c.mean().item(), "min": c.min().item(), "max": c.max().item(),
            "per_task_mean": (c.flatten(1).mean(1) if c.dim() > 1 else c).tolist()}


__all__ = ["plot_curves", "plot_coefficients", "plot_running_accuracy", "layer_label", "coefficient_summary"]
