"""Train an embedding network with SoftTriple on several processes, centers sharded by class.

    torchrun --standalone --nproc_per_node=2 examples/torchrun_sharded.py            # sharded centers
    torchrun --standalone --nproc_per_node=2 examples/torchrun_sharded.py --mode dp  # replicated (DDP)
    python examples/torchrun_sharded.py                                              # one process

Synthetic data: ``--classes`` Gaussian clusters in a ``--din``-dimensional input space; the backbone is
a small MLP replicated on every rank with DistributedDataParallel. In ``--mode sharded`` each rank
owns a contiguous slice of the classes and only their centers (``ShardedSoftTripleLoss``); in
``--mode dp`` every rank holds all the centers and the loss is wrapped in DDP with the backbone.

``--check`` (on by default) compares, at the first step, the distributed loss and gradients with a
single-process computation on the gathered global batch (the full centers are gathered for that,
which a real large-C run would not do) and prints the largest differences.

gloo on CPU by default; ``--device cuda`` uses NCCL with one GPU per rank (LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from softtriple_triton import SoftTripleLoss, softtriple_loss
from softtriple_triton.distributed import ShardedSoftTripleLoss


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["sharded", "dp"], default="sharded")
    p.add_argument("--classes", type=int, default=101)
    p.add_argument("--centers-per-class", type=int, default=4)
    p.add_argument("--din", type=int, default=32)
    p.add_argument("--dim", type=int, default=16, help="embedding size")
    p.add_argument("--batch", type=int, default=64, help="per-rank batch size")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--backend", default="auto", help="softtriple backend: auto | torch | triton | reference")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def init_distributed(device_kind: str):
    if "RANK" not in os.environ:  # plain `python examples/torchrun_sharded.py`: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if device_kind == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def make_batch(means: torch.Tensor, n: int, seed: int, device, dtype):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, means.shape[0], (n,), generator=g)
    x = means[y] + 0.7 * torch.randn(n, means.shape[1], generator=g, dtype=means.dtype)
    return x.to(device, dtype), y.to(device)


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    a, b = a.detach().double(), b.detach().double()
    d = (a - b).abs().max().item()
    return f"abs {d:.2e} rel {d / max(b.abs().max().item(), 1e-300):.2e}"


def main():
    args = parse_args()
    device = init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    C, K = args.classes, args.centers_per_class
    hyper = dict(la=20.0, gamma=0.1, tau=0.2, margin=0.01)

    torch.manual_seed(args.seed)  # same backbone on every rank (DDP also broadcasts rank 0's)
    means = 2.0 * torch.randn(C, args.din, generator=torch.Generator().manual_seed(1234))
    backbone = nn.Sequential(nn.Linear(args.din, 64), nn.ReLU(), nn.Linear(64, args.dim)).to(device, dtype)

    if args.mode == "sharded":
        # DDP averages the backbone gradients over the ranks; the sharded loss already yields the
        # gradient of the global-mean loss on every rank's embeddings, hence the world-size factor.
        model = DDP(backbone)
        criterion = ShardedSoftTripleLoss(C, args.dim, centers_per_class=K, backend=args.backend,
                                          embedding_grad_scale=world, device=device, dtype=dtype, **hyper)
        params = list(model.parameters()) + list(criterion.parameters())

        def step_loss(x, y):
            return criterion(model(x), y)
    else:
        criterion = SoftTripleLoss(C, args.dim, centers_per_class=K, backend=args.backend, **hyper)
        criterion = criterion.to(device, dtype)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone, self.loss = backbone, criterion

            def forward(self, x, y):
                return self.loss(self.backbone(x), y)

        model = DDP(Net())  # replicated centers: DDP averages the gradients of the per-rank means
        params = list(model.parameters())

        def step_loss(x, y):
            return model(x, y)

    if rank == 0:
        where = (f"classes [{criterion.class_start}, {criterion.class_end}) of {C} on rank 0, "
                 f"fc {tuple(criterion.fc.shape)} per rank") if args.mode == "sharded" else \
            f"all {C} classes on every rank, fc {tuple(criterion.fc.shape)}"
        print(f"mode={args.mode} world_size={world} device={device} dtype={args.dtype} "
              f"global batch={args.batch * world}: {where}", flush=True)

    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = make_batch(means, args.batch, args.seed * 100003 + step * world + rank, device, dtype)
        opt.zero_grad(set_to_none=True)
        loss = step_loss(x, y)
        loss.backward()
        if args.mode == "dp":  # each rank's loss is its own batch's mean: report the global mean
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world

        if step == 0 and args.check:
            # single process, global batch, full centers: the numbers the distributed step must give
            xg, yg = gather_cat(x), gather_cat(y)
            bb = backbone if args.mode == "sharded" else model.module.backbone
            fc_full = criterion.gather_full_fc() if args.mode == "sharded" else criterion.fc.detach()
            ref_bb = nn.Sequential(nn.Linear(args.din, 64), nn.ReLU(), nn.Linear(64, args.dim)).to(device, dtype)
            ref_bb.load_state_dict(bb.state_dict())
            ref_fc = fc_full.clone().requires_grad_()
            ref_loss = softtriple_loss(ref_bb(xg), ref_fc, yg, K, backend=args.backend, **hyper)
            ref_loss.backward()
            gbb = torch.cat([p.grad.flatten() for p in bb.parameters()])
            gbb_ref = torch.cat([p.grad.flatten() for p in ref_bb.parameters()])
            if args.mode == "sharded":
                gfc = criterion.fc.grad
                gfc_ref = ref_fc.grad[:, criterion.local_columns]
            else:
                gfc, gfc_ref = criterion.fc.grad, ref_fc.grad
            lines = [f"[check rank {rank}] loss {max_diff(loss, ref_loss)} | backbone grad "
                     f"{max_diff(gbb, gbb_ref)} | local centers grad {max_diff(gfc, gfc_ref)}"]
            for r in range(world):
                dist.barrier()
                if r == rank:
                    print(lines[0], flush=True)
            dist.barrier()

        opt.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.5f}", flush=True)

    # nearest-class accuracy on fresh data, with the (gathered) centers: argmax_c S_ic
    with torch.no_grad():
        from softtriple_triton import softtriple_logits
        x, y = make_batch(means, 512, 987654321, device, dtype)
        fc_full = criterion.gather_full_fc() if args.mode == "sharded" else criterion.fc
        emb = (model.module if args.mode == "sharded" else model.module.backbone)(x)
        acc = (softtriple_logits(emb, fc_full, K, backend=args.backend).argmax(1) == y).double().mean().item()
    if rank == 0:
        print(f"done: {args.steps} steps in {time.perf_counter() - t0:.1f}s, "
              f"held-out nearest-class accuracy {acc:.3f} (chance {1 / C:.3f})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
