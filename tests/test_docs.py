"""The conventions: docs/api.md is what the docstrings give, one version, the py.typed marker."""

import importlib.metadata
import os
import sys

import softtriple_triton as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_reference_is_current():
    """docs/api.md is generated from the docstrings; after editing one, run `python tools/gen_api.py`."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import gen_api
    finally:
        sys.path.pop(0)
    with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == gen_api.render(), "docs/api.md is out of date: run python tools/gen_api.py"
    for name in ("SoftTripleLoss.from_pml", "SoftTripleLoss.prune_centers", "centers.effective_centers"):
        assert name in committed


def test_one_version_and_typed_marker():
    assert importlib.metadata.version("softtriple-triton") == st.__version__
    with open(os.path.join(ROOT, "softtriple_triton", "_version.py"), encoding="utf-8") as f:
        assert f'__version__ = "{st.__version__}"' in f.read()
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        pyproject = f.read()
    assert 'dynamic = ["version"]' in pyproject and "\nversion =" not in pyproject.split("[project.optional")[0]
    assert os.path.isfile(os.path.join(os.path.dirname(st.__file__), "py.typed"))

