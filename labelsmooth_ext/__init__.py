"""Label-smoothed cross-entropy for PyTorch, on hand-written CPU (OpenMP/SIMD) and CUDA kernels.

    import labelsmooth_ext
    loss = labelsmooth_ext.cross_entropy(logits, target, label_smoothing=0.1)  # PyTorch's signature and defaults
"""

from . import _backend, _functorch, _registration  # noqa: F401  (defines and registers the ops)
from . import distributed  # vocab_parallel_cross_entropy (torch.distributed is imported by torch already)
from ._backend import backend_info
from ._version import __version__
from .functional import cross_entropy
from .linear import LinearCrossEntropyLoss, linear_cross_entropy
from .modules import CrossEntropyLoss

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "backend_info", "cross_entropy", "distributed",
           "linear_cross_entropy", "__version__"]
