"""The triton backend: the four entry points, same signatures as memkernels._C."""
from memkernels.triton_read import read_bwd, read_fwd
from memkernels.triton_write import write_bwd, write_fwd

__all__ = ["read_fwd", "read_bwd", "write_fwd", "write_bwd"]
