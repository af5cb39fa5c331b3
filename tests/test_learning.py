"""Coefficient learning end to end: a composed model recovers the task-vector combination that produced
its targets (the task-arithmetic use of aTLAS, on a small open_clip ViT)."""
import copy

import torch
from open_clip.transformer import VisionTransformer

import atlas_fast


def test_recovers_the_teacher_coefficients():
    # The torch backend; the others are held to its outputs and gradients in their own tests.
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, width=48, layers=2, heads=4, mlp_ratio=2.0,
                            output_dim=24).eval()
    bank = atlas_fast.synthetic_task_vectors(vit, 3, rel_scale=0.2, seed=1)
    target = torch.tensor([0.7, -0.4, 0.2])
    teacher = atlas_fast.compose(copy.deepcopy(vit), bank, granularity="task", backend="torch")
    with torch.no_grad():
        teacher.coefficients.copy_(target)
    student = atlas_fast.compose(copy.deepcopy(vit), bank, granularity="task", backend="torch")
    opt = torch.optim.Adam([student.coefficients], lr=0.05)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(120):
        images = torch.randn(8, 3, 32, 32, generator=gen)
        with torch.no_grad():
            wanted = teacher(images)
        loss = (student(images) - wanted).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-2 * losses[0], f"loss {losses[0]:.3e} -> {losses[-1]:.3e}"
    err = (student.coefficients.detach() - target).abs().max().item()
    assert err < 0.05, f"learned {student.coefficients.detach().tolist()}, teacher {target.tolist()}"
