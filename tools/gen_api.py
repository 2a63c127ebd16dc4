"""Writes docs/api.md, the API reference, from the public objects' signatures and docstrings.

    python tools/gen_api.py   # rewrite docs/api.md (tests/test_docs.py checks that the committed file is current)

Public = the names in ``__all__`` of softtriple_triton, softtriple_triton.centers and softtriple_triton.distributed;
for classes, the methods defined in the class itself whose names do not start with "_" (nn.Module's own
methods and ``extra_repr`` are left out). Signatures are printed as written in the source.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "api.md")
MODULES = ("softtriple_triton", "softtriple_triton.centers", "softtriple_triton.distributed")
SKIP_METHODS = {"extra_repr"}


def _signature(obj: Any, drop_first: bool = False) -> str:
    sig = inspect.signature(obj)
    params = list(sig.parameters.values())[1 if drop_first else 0:]
    parts, seen_kw_only = [], False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not seen_kw_only:
            parts.append("*")
            seen_kw_only = True
        text = ("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "") + p.name
        if p.annotation is not p.empty:
            text += f": {p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
        parts.append(text)
    ret = sig.return_annotation
    tail = "" if ret is sig.empty else f" -> {ret if isinstance(ret, str) else inspect.formatannotation(ret)}"
    return f"({', '.join(parts)}){tail}"


def _doc(obj: Any) -> str:
    doc = inspect.getdoc(obj)
    return doc.strip() if doc else "(no docstring)"


def _block(doc: str) -> list[str]:
    # docstrings are plain text with code-ish layout: keep them verbatim
    return ["```text", doc, "```", ""]


def _methods(cls: type) -> list[tuple[str, Any, bool]]:
    out = []
    for name, raw in vars(cls).items():
        if name.startswith("_") or name in SKIP_METHODS:
            continue
        if isinstance(raw, (classmethod, staticmethod)):
            out.append((name, raw.__func__, isinstance(raw, classmethod)))
        elif inspect.isfunction(raw):
            out.append((name, raw, True))
    return out


def render() -> str:
    import importlib

    lines = ["# API reference", "",
             "Generated from the docstrings by `python tools/gen_api.py` (tests/test_docs.py checks it is current); "
             "edit the docstrings, not this file.", ""]
    for modname in MODULES:
        mod = importlib.import_module(modname)
        lines += [f"## `{modname}`", ""] + _block(_doc(mod))
        for name in mod.__all__:
            obj = getattr(mod, name)
            qual = f"{modname}.{name}"
            if inspect.isclass(obj):
                lines += [f"### class `{qual}{_signature(obj.__init__, drop_first=True)}`", ""] + _block(_doc(obj))
                for mname, fn, bound in _methods(obj):
                    lines += [f"#### `{name}.{mname}{_signature(fn, drop_first=bound)}`", ""] + _block(_doc(fn))
            elif callable(obj):
                lines += [f"### `{qual}{_signature(obj)}`", ""] + _block(_doc(obj))
            else:
                lines += [f"### `{qual} = {obj!r}`", ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.path.insert(0, ROOT)
    text = render()
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
