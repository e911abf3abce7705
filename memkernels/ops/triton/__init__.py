"""The triton backend: the four entry points, same signatures as memkernels._C.
Imported only when triton is installed (memkernels.ops.backend.kernels)."""
from memkernels.ops.triton.read import read_bwd, read_fwd
from memkernels.ops.triton.write import write_bwd, write_fwd

__all__ = ["read_fwd", "read_bwd", "write_fwd", "write_bwd"]
