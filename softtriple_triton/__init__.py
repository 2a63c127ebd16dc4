"""softtriple-triton: exact, memory-bounded SoftTriple loss with fused Triton kernels and a fast CPU path."""

from ._version import __version__ as __version__
from .cpu import set_memory_budget
from .functional import softtriple_logits, softtriple_loss
from .fused import set_triton_options
from .module import SoftTripleLoss
from .reference import reference_logits, reference_regularizer, reference_softtriple_loss
from .regularizer import center_regularizer

__all__ = [
    "SoftTripleLoss",
    "softtriple_loss",
    "softtriple_logits",
    "center_regularizer",
    "set_memory_budget",
    "set_triton_options",
    "reference_softtriple_loss",
    "reference_logits",
    "reference_regularizer",
]
