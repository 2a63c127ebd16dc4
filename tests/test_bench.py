"""The benchmark harness runs end to end in its --smoke mode and writes what it promises.

Times nothing: it only checks the files and the CSV schema (one tiny case, 1 repeat)."""

import os
import subprocess
import sys

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = {"device", "device_name", "device_tag", "torch", "triton", "date", "case", "N", "d", "C", "K", "CK",
           "dtype", "tau", "provider", "mode", "metric", "value", "p20", "p80", "n_repeats", "status", "check",
           "check_rel_err", "predicted_bytes"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--smoke", "--device", "cpu",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out, r.stdout


def test_csv_schema_and_rows(smoke):
    out, _ = smoke
    df = pd.read_csv(out / "results.csv")
    assert COLUMNS <= set(df.columns), COLUMNS - set(df.columns)
    assert (df["device"] == "cpu").all()
    assert df["device_tag"].iloc[0].startswith("cpu-")
    t = df[df["metric"] == "time_s"]
    for prov in ("ours", "eager", "floor"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            s = t[(t["provider"] == prov) & (t["mode"] == mode)]
            assert len(s) == 1, (prov, mode)
            assert s["status"].iloc[0] == "ok" and s["value"].iloc[0] > 0, s.to_dict("records")
    # the correctness guard ran and passed: ours vs the reference, eager vs ours
    assert (df[(df["metric"] == "check")]["check"] == "ok").all()
    assert (t[t["provider"] == "eager"]["check"] == "ok").all()
    # memory was measured in a subprocess (tiny case: may be 0 bytes, never negative or missing)
    m = df[(df["metric"] == "peak_bytes") & (df["provider"] == "ours") & (df["mode"] == "fwd+bwd")]
    assert len(m) == 1 and m["status"].iloc[0] == "ok" and m["value"].iloc[0] >= 0


def test_plots_and_summary_written(smoke):
    out, stdout = smoke
    for name in ("speedup.png", "memory.png", "gemm_floor_fraction.png", "times.png"):
        p = out / name
        assert p.exists() and p.stat().st_size > 1000, name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "| target | measured | verdict |" in summary
    assert "not measured: no GPU" in summary
    assert "[1/1" in stdout  # per-case progress line


def test_baselines_compute_the_reference_loss():
    """The benchmark's eager baseline (precomputed pair indices) and its PML wiring (+ SparseCentersRegularizer,
    weight tau) compute the same loss as softtriple_triton.reference, with and without the regulariser."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import providers as P
    from softtriple_triton.reference import reference_softtriple_loss

    for K, tau in ((1, 0.0), (3, 0.0), (3, 0.2), (10, 0.2)):
        case = P.Case("t", 24, 16, 7, K, dtype="fp64", tau=tau)
        x, fc, y = P.make_inputs(case, "cpu", seed=K)
        ref = reference_softtriple_loss(x, fc, y, K, la=P.LA, gamma=P.GAMMA, tau=tau, margin=P.MARGIN)
        provs = ["ours", "eager"] + (["pml"] if P.pml_available() else [])
        for prov in provs:
            step, params = P.build(prov, case, x, fc, y, "cpu")
            v = step()
            assert abs(v.item() - ref.item()) <= 1e-6 * abs(ref.item()), (prov, K, tau, v.item(), ref.item())
            v.backward()
            assert all(p.grad is not None for p in params), prov
            x.grad = None
