"""Shared test setup.

Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors: TRITON_INTERPRET
must be set before triton is first imported, which is why it is set here, at collection time.
With a GPU, the same tests run the compiled kernels on CUDA tensors.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Device on which the Triton backend is tested: real kernels on CUDA, the interpreter on CPU.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
# Devices on which the torch backend is tested.
TORCH_DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# Tolerances against the fp64 oracle that sees exactly the rounded inputs, per input dtype:
# (rtol on the loss, max-abs gradient error relative to the gradient's max-abs value).
# fp64 is the exactness claim. For the others the error is dominated by one rounding of the normalised
# embeddings and of the returned gradients to the input dtype (fp16: 2^-11 = 4.9e-4, bf16: 2^-8 = 3.9e-3);
# measured (N=64, d=48, C=30, K=4): fp32 2.8e-9 / 6e-7, fp16 3.5e-5 / 5.6e-4, bf16 1.3e-4 / 4.7e-3.
TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (2e-4, 2e-3),
    torch.bfloat16: (1e-3, 1.5e-2),
}

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# The Triton backend's backward paths (softtriple_triton.set_triton_options); tests that take the fixture
# triton_path run once per path.
TRITON_PATHS = {"cached": dict(backward="auto"), "chunked": dict(backward="chunked"),
                "two_kernel": dict(backward="two_kernel")}


@pytest.fixture(params=list(TRITON_PATHS))
def triton_path(request):
    from softtriple_triton import fused

    old = fused.set_triton_options(**TRITON_PATHS[request.param])
    yield request.param
    fused.set_triton_options(**old)


def make_inputs(N, d, C, K, dtype=torch.float64, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, d, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    w = torch.randn(d, C * K, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randint(0, C, (N,), generator=g).to(device)
    return x, w, y


def rel_err(a, b):
    """max |a - b| / max |b| (computed in fp64)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def rows_from_similarities(s, y, K, la, gamma, margin):
    """The formula from the similarities s [N, C*K] on (an oracle independent of the package's reference):
    per-row losses [N] and the class logits z [N, C]."""
    N, C = s.shape[0], s.shape[1] // K
    s3 = s.view(N, C, K)
    S = (torch.softmax(s3 / gamma, dim=2) * s3).sum(2)
    z = la * (S - margin * torch.nn.functional.one_hot(y, C).to(s.dtype))
    return torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0], z


def loss_and_grads(fn, x, w, g=None):
    """Value and gradients of fn(x, w); with g (per-row weights) for reduction='none'."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = fn(x, w)
    (out if g is None else (out * g.to(out.dtype))).sum().backward()
    return out.detach(), x.grad, w.grad
