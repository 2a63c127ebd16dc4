"""Inputs, providers (ours / eager / torch.compile / PML / GEMM floor), memory predictions and the
correctness guard of the benchmark. Imported by bench/run.py and bench/memory_worker.py."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import softtriple_triton as st
from softtriple_triton.reference import reference_softtriple_loss

LA, GAMMA, MARGIN = 20.0, 0.1, 0.01
PROVIDERS = ("ours", "eager", "compile", "pml", "floor")
LABELS = {
    "ours": "ours",
    "eager": "plain formula (eager)",
    "compile": "plain formula (torch.compile)",
    "pml": "pytorch-metric-learning",
    "floor": "GEMM floor",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class Case:
    sweep: str
    N: int
    d: int
    C: int
    K: int
    dtype: str = "fp32"
    tau: float = 0.0
    memory: bool = False  # also measure peak memory (in a subprocess)
    timing: bool = True   # time it (large-C memory-wall cases are memory only)

    @property
    def CK(self) -> int:
        return self.C * self.K

    @property
    def case_id(self) -> str:
        return f"N{self.N}_d{self.d}_C{self.C}_K{self.K}_{self.dtype}_tau{self.tau:g}"

    def as_dict(self) -> dict:
        return asdict(self)


def pml_available() -> bool:
    try:
        import pytorch_metric_learning  # noqa: F401
    except Exception:
        return False
    return True


def make_inputs(case: Case, device: str, seed: int = 0):
    """Identical inputs for every provider: x [N, d], fc [d, C*K] (both leaves with grad), labels [N]."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[case.dtype]
    x = torch.randn(case.N, case.d, generator=g).to(device=device, dtype=dt).requires_grad_()
    fc = torch.randn(case.d, case.CK, generator=g).to(device=device, dtype=dt).requires_grad_()
    y = torch.randint(0, case.C, (case.N,), generator=g).to(device)
    return x, fc, y


def same_class_pairs(C: int, K: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column indices of the pairs (c*K+k, c*K+k'), k < k', i.e. the official code's mask (built
    once, as the official SoftTriple module does in its constructor)."""
    i, j = torch.triu_indices(K, K, offset=1)
    base = (torch.arange(C) * K)[:, None]
    return (base + i[None]).reshape(-1).to(device), (base + j[None]).reshape(-1).to(device)


def plain_softtriple(x, fc, labels, rows, cols, C: int, K: int, tau: float, la: float = LA, gamma: float = GAMMA,
                     margin: float = MARGIN):
    """The paper's / official implementation's formula written the obvious way: N x C*K similarity,
    inner softmax, margin, cross-entropy, and the (C*K)^2 Gram-matrix regulariser. Same math as
    softtriple_triton.reference (which rebuilds its mask with a Python loop on every call; here the
    pair indices are precomputed once, like the official module)."""
    xn = F.normalize(x, p=2, dim=1)
    w = F.normalize(fc, p=2, dim=0)
    sim = xn.matmul(w).reshape(x.shape[0], C, K)
    prob = F.softmax(sim / gamma, dim=2)
    S = (prob * sim).sum(dim=2)
    margin_m = torch.zeros_like(S)
    margin_m[torch.arange(S.shape[0], device=S.device), labels] = margin
    loss = F.cross_entropy(la * (S - margin_m), labels)
    if tau > 0 and K > 1:
        gram = w.t().matmul(w)
        reg = torch.sqrt(2.0 + 1e-5 - 2.0 * gram[rows, cols]).sum() / (C * K * (K - 1.0))
        loss = loss + tau * reg
    return loss


_compiled = {}


def compiled_plain(case: Case):
    """A fresh torch.compile of the plain formula for each case, specialised to its shapes (what a user with
    fixed shapes gets). Reusing one compiled function across cases would hit dynamo's recompile limit (8) and
    silently fall back to eager for the later cases."""
    if _compiled.get("case") != case.case_id:
        torch._dynamo.reset()
        _compiled["case"] = case.case_id
        _compiled["fn"] = torch.compile(plain_softtriple, dynamic=False)
    return _compiled["fn"]


def ours_backend(device: str) -> str:
    return "triton" if device.startswith("cuda") else "torch"


def build(provider: str, case: Case, x, fc, y, device: str):
    """Returns (step, params): step() -> scalar loss (graph built, ready for .backward()), params =
    the leaves whose .grad the backward fills. Raises on failure. Not for 'floor'."""
    C, K, tau = case.C, case.K, case.tau
    if provider == "ours":
        be = ours_backend(device)
        return (lambda: st.softtriple_loss(x, fc, y, K, la=LA, gamma=GAMMA, tau=tau, margin=MARGIN, backend=be)), [x, fc]
    if provider in ("eager", "compile"):
        rows, cols = same_class_pairs(C, K, x.device) if (tau > 0 and K > 1) else (None, None)
        fn = plain_softtriple if provider == "eager" else compiled_plain(case)
        return (lambda: fn(x, fc, y, rows, cols, C, K, tau)), [x, fc]
    if provider == "pml":
        from pytorch_metric_learning import losses, regularizers
        kw = {}
        if tau > 0 and K > 1:
            # SparseCentersRegularizer == the official regulariser on normalised centers; weight = tau
            kw = dict(weight_regularizer=regularizers.SparseCentersRegularizer(C, K), weight_reg_weight=tau)
        m = losses.SoftTripleLoss(C, case.d, centers_per_class=K, la=LA, gamma=GAMMA, margin=MARGIN, **kw).to(x.device)
        if tau > 0 and K > 1:
            m.weight_regularizer.same_class_mask = m.weight_regularizer.same_class_mask.to(x.device)
        m.fc = torch.nn.Parameter(fc.detach().clone())  # same values; its own leaf (PML owns its centers)
        return (lambda: m(x, y)), [x, m.fc]
    raise ValueError(provider)


def floor_ops(case: Case, x, fc, device: str):
    """The three matrix products no implementation can avoid: s = X@W (forward), G@W^T and X^T@G (backward)."""
    X = x.detach()
    W = fc.detach()
    G = torch.randn(case.N, case.CK, device=device).to(X.dtype)
    return (lambda: torch.matmul(X, W)), (lambda: torch.matmul(G, W.t())), (lambda: torch.matmul(X.t(), G))


def predicted_bytes(provider: str, case: Case) -> float:
    """Rough peak-memory prediction (bytes above the inputs), used to skip runs that cannot fit."""
    isz = torch.finfo(DTYPES[case.dtype]).bits // 8
    nck = case.N * case.CK * isz
    gram = case.CK ** 2 * isz if (case.tau > 0 and case.K > 1) else 0
    if provider == "ours":
        return 0.0  # bounded by the backend's chunk/cache budget
    if provider == "floor":
        return 2.0 * nck
    if provider in ("eager", "compile"):
        return 6.0 * nck + 3.0 * gram
    if provider == "pml":
        masks = 2 * case.CK ** 2 if gram else 0  # two (C*K)^2 bool masks built in its constructor
        return 6.0 * nck + 3.0 * gram + masks
    raise ValueError(provider)


def predicted_flops(provider: str, case: Case) -> float:
    """fwd+bwd flops of the matrix products (3 GEMMs; the naive regulariser adds 3 (C*K)^2 d GEMMs)."""
    base = 3 * 2.0 * case.N * case.d * case.CK
    if provider in ("eager", "compile", "pml") and case.tau > 0 and case.K > 1:
        base += 3 * 2.0 * case.CK ** 2 * case.d
    return base


def reference_rows_check(case: Case, x, fc, y, device: str, max_rows: int = 64) -> float:
    """Max relative error of our per-sample losses vs the plain reference formula (in fp64) on up to
    max_rows rows (rows are independent, so a subset checks the math at any C*K), plus the
    regulariser vs the reference one when (C*K)^2 is small."""
    be = ours_backend(device)
    if case.CK > 200_000:
        max_rows = min(max_rows, 16)
    idx = torch.arange(min(case.N, max_rows), device=x.device)
    with torch.no_grad():
        ours = st.softtriple_loss(x[idx], fc, y[idx], case.K, la=LA, gamma=GAMMA, tau=0.0, margin=MARGIN,
                                  reduction="none", backend=be).double()
        ref = reference_softtriple_loss(x[idx].double(), fc.double(), y[idx], case.K, la=LA, gamma=GAMMA, tau=0.0,
                                        margin=MARGIN, reduction="none")
        err = ((ours - ref).abs() / ref.abs().clamp_min(1e-3)).max().item()
        if case.tau > 0 and case.K > 1 and case.CK <= 4096:
            a = st.center_regularizer(fc, case.K).double()
            b = st.reference_regularizer(fc.double(), case.K)
            err = max(err, (abs(a - b) / max(abs(b), 1e-3)).item())
    return err


def tolerance(case: Case) -> float:
    return {"fp32": 1e-4, "fp64": 1e-9, "bf16": 3e-2, "fp16": 1e-2}[case.dtype]


def rel_err(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    return abs(a - b) / max(abs(b), 1e-6)
