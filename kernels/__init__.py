"""Triton kernels of softtriple-triton (installed as ``softtriple_triton.kernels``).

forward.py     per-row loss (online log-sum-exp over class tiles) and the N x C logits
backward_x.py  dL/d(embeddings), recomputing tiles from the saved per-row state
backward_w.py  dL/d(centers) and dL/d(inverse column norms)
tiles.py       @triton.jit building blocks shared by the three
config.py      launch configuration, dtype rules and operand checks
"""
