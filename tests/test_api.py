"""The user API: the module, its parameter layout, argument errors, dtype rules, determinism, compile."""

import math
import os

import pytest
import torch

import softtriple_triton as st
from conftest import HAS_CUDA, TORCH_DEVICES, TRITON_DEVICE, cuda_only, loss_and_grads, make_inputs, rel_err

ALL_BACKENDS = [("triton", TRITON_DEVICE), ("reference", "cpu")] + [("torch", d) for d in TORCH_DEVICES]


# --------------------------------------------------------------------------- module and parameter layout

def test_module_parameter_layout_and_init():
    torch.manual_seed(0)
    m = st.SoftTripleLoss(num_classes=7, embedding_size=16, centers_per_class=3)
    assert list(dict(m.named_parameters())) == ["fc"]
    assert m.fc.shape == (16, 21) and m.fc.dtype == torch.float32
    # kaiming_uniform_(a=sqrt(5)) on [d, C*K]: U(-b, b) with b = gain * sqrt(3 / fan_in), fan_in = C*K
    bound = math.sqrt(2.0 / (1 + 5)) * math.sqrt(3.0 / 21)
    assert m.fc.abs().max() <= bound and m.fc.abs().max() > 0.8 * bound


def test_module_column_layout_is_class_major():
    """Column c*K + k is center k of class c: moving one class's centers moves that class's logit."""
    m = st.SoftTripleLoss(4, 6, centers_per_class=2, backend="reference").double()
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        m.fc[:, 2 * 2] = x[0]  # class 2, center 0 := the first embedding
    S = m.get_logits(x)
    assert S[0].argmax().item() == 2


def test_state_dict_round_trip_with_the_official_layout():
    """A state dict {'fc': [d, C*K]} (official code and pytorch-metric-learning) loads unchanged."""
    official = {"fc": torch.randn(8, 5 * 4)}
    m = st.SoftTripleLoss(5, 8, 4)
    m.load_state_dict(official)
    assert torch.equal(m.fc.data, official["fc"])
    assert set(m.state_dict()) == {"fc"}


def test_pytorch_metric_learning_agrees_when_installed():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(0)
    theirs = pml.SoftTripleLoss(num_classes=6, embedding_size=10, centers_per_class=3, la=20, gamma=0.1,
                                margin=0.01)
    ours = st.SoftTripleLoss(6, 10, 3, la=20, gamma=0.1, tau=0.0, margin=0.01, backend="torch")
    ours.load_state_dict({"fc": theirs.fc.detach().clone()})
    x = torch.randn(12, 10)
    y = torch.randint(0, 6, (12,))
    assert rel_err(ours(x, y), theirs(x, y)) < 1e-5


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_module_forward_equals_functional_and_get_logits(backend, device):
    m = st.SoftTripleLoss(9, 12, 3, la=15.0, gamma=0.2, tau=0.3, margin=0.05, backend=backend).double().to(device)
    x, _, y = make_inputs(20, 12, 9, 3, device=device, seed=3)
    want = st.softtriple_loss(x, m.fc, y, 3, la=15.0, gamma=0.2, tau=0.3, margin=0.05, backend="reference")
    assert rel_err(m(x, y), want) <= 1e-12
    assert rel_err(m.get_logits(x), st.reference_logits(x, m.fc, 3, 0.2)) <= 1e-12
    assert rel_err(m.regularizer(), st.reference_regularizer(m.fc, 3)) <= 1e-12


def test_reduction_none_excludes_the_regularizer():
    x, w, y = make_inputs(10, 8, 4, 3)
    rows = st.softtriple_loss(x, w, y, 3, tau=0.5, reduction="none", backend="torch")
    mean = st.softtriple_loss(x, w, y, 3, tau=0.5, reduction="mean", backend="torch")
    assert rows.shape == (10,)
    assert rel_err(mean, rows.mean() + 0.5 * st.center_regularizer(w, 3)) <= 1e-13


# --------------------------------------------------------------------------- dtype rules

@pytest.mark.parametrize("backend,device", [("torch", "cpu"), ("triton", TRITON_DEVICE)])
def test_loss_never_changes_fc_dtype(backend, device):
    m = st.SoftTripleLoss(5, 8, 2, backend=backend).to(device)
    x = torch.randn(6, 8, device=device).to(torch.bfloat16)
    y = torch.randint(0, 5, (6,), device=device)
    loss = m(x, y)
    loss.backward()
    assert m.fc.dtype == torch.float32 and m.fc.grad.dtype == torch.float32
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("backend,device", [("torch", "cpu")])
def test_autocast_keeps_fp32_math(backend, device):
    """The torch backend disables autocast inside the loss: fp32 math. (The Triton backend multiplies in the
    autocast dtype: test_dtype_policy.py.)"""
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 8).to(device)
    m = st.SoftTripleLoss(5, 8, 3, backend=backend).to(device)
    x = torch.randn(12, 16, device=device)
    y = torch.randint(0, 5, (12,), device=device)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        emb = net(x)
        loss = m(emb, y)
    assert emb.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert m.fc.grad.dtype == torch.float32
    want = st.softtriple_loss(emb.detach().double(), m.fc.detach().double(), y, 3, backend="reference")
    assert rel_err(loss, want) < 1e-5


# --------------------------------------------------------------------------- argument errors

def _good():
    x, w, y = make_inputs(6, 8, 4, 2, dtype=torch.float32)
    return x, w, y


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(la=0.0), ValueError, "la must be"),
    (dict(la=float("nan")), ValueError, "la must be"),
    (dict(gamma=-0.1), ValueError, "gamma must be"),
    (dict(gamma=0), ValueError, "gamma must be"),
    (dict(tau=-1.0), ValueError, "tau must be"),
    (dict(margin=float("inf")), ValueError, "margin must be"),
    (dict(margin=-0.1), ValueError, "margin must be"),
    (dict(reduction="avg"), ValueError, "reduction must be"),
    (dict(backend="cuda"), ValueError, "backend must be"),
    (dict(normalize_embeddings="yes"), ValueError, "normalize_embeddings must be"),
    (dict(la=True), ValueError, "la must be"),
])
def test_bad_hyper_parameters(kwargs, exc, pattern):
    x, w, y = _good()
    with pytest.raises(exc, match=pattern):
        st.softtriple_loss(x, w, y, 2, **kwargs)


@pytest.mark.parametrize("case,exc,pattern", [
    ("labels_out_of_range", ValueError, r"labels must be in \[0, 4\).*found 4"),
    ("labels_negative", ValueError, r"labels must be in \[0, 4\).*found -1"),
    ("labels_float", TypeError, "labels must be an integer tensor"),
    ("labels_bool", TypeError, "labels must be an integer tensor"),
    ("labels_2d", ValueError, r"labels must have shape \(6,\)"),
    ("labels_short", ValueError, r"labels must have shape \(6,\)"),
    ("embeddings_1d", ValueError, "embeddings must be 2-D"),
    ("embeddings_int", TypeError, "embeddings must be fp16"),
    ("embeddings_empty", ValueError, "0 rows"),
    ("width_mismatch", ValueError, "embeddings width 7 does not match fc height 8"),
    ("not_divisible", ValueError, "not a positive multiple of centers_per_class=3"),
    ("k_zero", ValueError, "centers_per_class must be a positive integer"),
    ("k_float", ValueError, "centers_per_class must be a positive integer"),
    ("fc_3d", ValueError, "fc must be 2-D"),
    ("labels_list", TypeError, "labels must be a torch.Tensor"),
])
def test_bad_tensors(case, exc, pattern):
    x, w, y = _good()
    K = 2
    if case == "labels_out_of_range":
        y = y.clone()
        y[3] = 4
    elif case == "labels_negative":
        y = y.clone()
        y[0] = -1
    elif case == "labels_float":
        y = y.float()
    elif case == "labels_bool":
        y = y > 0
    elif case == "labels_2d":
        y = y[:, None]
    elif case == "labels_short":
        y = y[:5]
    elif case == "embeddings_1d":
        x = x[0]
    elif case == "embeddings_int":
        x = x.long()
    elif case == "embeddings_empty":
        x, y = x[:0], y[:0]
    elif case == "width_mismatch":
        x = x[:, :7]
    elif case == "not_divisible":
        K = 3
    elif case == "k_zero":
        K = 0
    elif case == "k_float":
        K = 2.0
    elif case == "fc_3d":
        w = w[None]
    elif case == "labels_list":
        y = y.tolist()
    for backend in ("torch", "reference"):
        with pytest.raises(exc, match=pattern):
            st.softtriple_loss(x, w, y, K, backend=backend)


def test_module_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        st.SoftTripleLoss(0, 8)
    with pytest.raises(ValueError, match="embedding_size must be a positive integer"):
        st.SoftTripleLoss(3, -1)
    with pytest.raises(ValueError, match="gamma must be"):
        st.SoftTripleLoss(3, 8, gamma=0)


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, y = _good()
    with pytest.raises(RuntimeError, match="backend='torch' on CPU"):
        st.softtriple_loss(x, w, y, 2, backend="triton")


def test_triton_backend_refuses_too_many_centers_per_class():
    x, w, y = make_inputs(4, 8, 1, 2048, dtype=torch.float32)
    with pytest.raises(ValueError, match="centers_per_class <= 1024"):
        st.softtriple_loss(x, w, y, 2048, backend="triton")


@cuda_only
def test_tensors_on_different_devices():
    x, w, y = _good()
    with pytest.raises(ValueError, match="fc is on cpu"):
        st.softtriple_loss(x.cuda(), w, y.cuda(), 2)
    with pytest.raises(ValueError, match="labels is on cpu"):
        st.softtriple_loss(x.cuda(), w.cuda(), y, 2)


# --------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("backend,device", [("triton", TRITON_DEVICE)] + [("torch", d) for d in TORCH_DEVICES])
def test_bitwise_deterministic(backend, device):
    x, w, y = make_inputs(70, 40, 33, 3, dtype=torch.float32, device=device, seed=8)
    runs = [loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, 3, backend=backend), x, w) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bitwise_deterministic_every_triton_backward(triton_path):
    x, w, y = make_inputs(70, 40, 33, 10, dtype=torch.float32, device=TRITON_DEVICE, seed=9)
    runs = [loss_and_grads(lambda a, b: st.softtriple_loss(a, b, y, 10, backend="triton"), x, w) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- torch.compile

def _compiled_matches_eager(backend, device, compile_backend):
    torch.manual_seed(0)
    net = torch.nn.Linear(12, 8).double().to(device)
    loss = st.SoftTripleLoss(5, 8, 3, backend=backend).double().to(device)
    x = torch.randn(16, 12, dtype=torch.float64, device=device)
    y = torch.randint(0, 5, (16,), device=device)

    def step(a, b):
        return loss(net(a), b)

    out = []
    for fn in (torch.compile(step, fullgraph=True, backend=compile_backend), step):
        value = fn(x, y)
        value.backward()
        out.append((value.detach(), loss.fc.grad.clone(), net.weight.grad.clone()))
        loss.zero_grad()
        net.zero_grad()
    for a, b in zip(*out):
        assert rel_err(a, b) <= 1e-12


def test_compile_fullgraph_torch_backend_inductor():
    torch._dynamo.reset()
    _compiled_matches_eager("torch", "cpu", "inductor")


def test_compile_fullgraph_triton_op_traces_without_graph_breaks():
    torch._dynamo.reset()
    _compiled_matches_eager("triton", TRITON_DEVICE, "aot_eager")


@cuda_only
@pytest.mark.cuda
def test_compile_fullgraph_triton_cuda_inductor():
    torch._dynamo.reset()
    _compiled_matches_eager("triton", "cuda", "inductor")


def test_interpreter_is_on_without_a_gpu():
    """Guards the suite itself: without CUDA, the Triton tests above really ran through the interpreter."""
    if not HAS_CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1"
        from softtriple_triton.kernels.config import interpreting
        assert interpreting()


def test_package_works_without_triton():
    """CPU users need only torch: with triton unimportable, the torch backend runs and backend='triton' says why."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, softtriple_triton as st\n"
        "x = torch.randn(6, 8); y = torch.randint(0, 3, (6,)); m = st.SoftTripleLoss(3, 8, 2)\n"
        "m(x, y).backward(); assert m.fc.grad is not None\n"
        "try:\n"
        "    st.softtriple_loss(x, m.fc, y, 2, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e); print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
