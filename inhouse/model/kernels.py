"""Which native arithmetic this process runs, as one string for audit records.

Replay reproduces a record bit for bit only on the same arithmetic: the MXFP4 expert path and the
bf16 decode-projection path each sum in their own order (see mxfp4_kernel, dense_kernel). int8
weights meet rows rounded to int16 ("int8-a16", the same bits on every path; records made before
that rounding carry no such part and are refused). Decode attention runs our kernel ("attend-c":
fp32 sums in a fixed order, one rounding at the end) where it is built, and RMSNorm ("rows-c")
likewise."""

from __future__ import annotations

from inhouse.model import attend_kernel, dense_kernel, mxfp4_kernel, rows_kernel


def path_name() -> str:
    """e.g. "avx2-fused+dense-avx512+int8-a16+attend-c+rows-c"; "torch+dense-torch+torch+torch"
    where nothing was built."""
    dense = dense_kernel.path_name()
    int8 = "" if dense == "torch" else "+int8-a16"
    return (f"{mxfp4_kernel.path_name()}+dense-{dense}{int8}+{attend_kernel.path_name()}"
            f"+{rows_kernel.path_name()}")
