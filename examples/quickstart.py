"""Quickstart: train a small embedding network with SoftTripleLoss on synthetic multi-modal classes.

Each class is a mixture of 3 Gaussian blobs (the "several local clusters per class" SoftTriple is built for).
Runs on CPU in a few seconds (backend "auto": the fused Triton kernels on CUDA, the chunked torch path on CPU).

    python examples/quickstart.py
"""

import torch

from softtriple_triton import SoftTripleLoss

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
num_classes, modes, dim_in, dim_emb = 20, 3, 32, 16
centers = torch.randn(num_classes, modes, dim_in) * 3.0


def batch(n=256):
    y = torch.randint(0, num_classes, (n,))
    x = centers[y, torch.randint(0, modes, (n,))] + torch.randn(n, dim_in)
    return x.to(device), y.to(device)


model = torch.nn.Sequential(torch.nn.Linear(dim_in, 64), torch.nn.ReLU(), torch.nn.Linear(64, dim_emb)).to(device)
loss_fn = SoftTripleLoss(num_classes, dim_emb, centers_per_class=modes, la=20.0, gamma=0.1, tau=0.2,
                         margin=0.01).to(device)
opt = torch.optim.Adam([{"params": model.parameters()}, {"params": loss_fn.parameters(), "lr": 1e-2}], lr=1e-3)

for step in range(301):
    x, y = batch()
    loss = loss_fn(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0:
        print(f"step {step:3d}  loss {loss.item():.3f}")

with torch.no_grad():
    x, y = batch(2000)
    acc = (loss_fn.get_logits(model(x)).argmax(dim=1) == y).float().mean().item()
print(f"held-out accuracy (nearest class by relaxed similarity): {acc:.3f}  (chance {1 / num_classes:.3f})")
