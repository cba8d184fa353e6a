"""Which native arithmetic this process runs, as one string for audit records.

Replay reproduces a record bit for bit only on the same arithmetic: the MXFP4 expert path and the
bf16 decode-projection path each sum in their own order (see mxfp4_kernel, dense_kernel). int8
weights meet rows rounded to int16 ("int8-a16", the same bits on every path; records made before
that rounding carry no such part and are refused)."""

from __future__ import annotations

from inhouse.model import dense_kernel, mxfp4_kernel


def path_name() -> str:
    """e.g. "avx2-fused+dense-avx512+int8-a16"; "torch+dense-torch" where nothing was built."""
    dense = dense_kernel.path_name()
    return f"{mxfp4_kernel.path_name()}+dense-{dense}" + ("" if dense == "torch" else "+int8-a16")
