"""Predictions and accuracy of a classifier over a ViewData: what training, selection, the objectives and the
evaluate job measure with."""
import torch
import torch.nn.functional as F

from .data import eval_loader


@torch.no_grad()
def predict(fn, data, cfg):
    """Softmax probabilities of fn(images) over a ViewData with one view, in data order (CPU)."""
    out = []
    for x, *_ in eval_loader(data, cfg.eval_batch_size, cfg.workers):
        out.append(torch.softmax(fn(x).float(), -1).cpu())
    return torch.cat(out)


@torch.no_grad()
def classification_metrics(fn, data, cfg, ranks=None):
    """{"accuracy", "loss", "n"} of fn on a labelled ViewData, loss the mean cross-entropy; with `ranks` (a
    data-parallel run), `data` is this process's share and the counts are summed over the processes."""
    correct, loss, n = 0, 0.0, 0
    for x, y, _ in eval_loader(data, cfg.eval_batch_size, cfg.workers):
        logits = fn(x).float()
        y = y.to(logits.device)
        correct += (logits.argmax(-1) == y).sum().item()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
    if ranks is not None and ranks.world > 1:
        totals = ranks.sum_(torch.tensor([correct, loss, n], dtype=torch.float64, device=ranks.device))
        correct, loss, n = int(totals[0].item()), totals[1].item(), int(totals[2].item())
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "n": n}
