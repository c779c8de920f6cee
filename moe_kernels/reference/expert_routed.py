"""expert_routed: every local expert over its received rows (spec §2.7)."""
from __future__ import annotations

import torch

from ..numerics import bf16_rint
from ..types import ExpertWeights
from .ffn import swiglu_int8_ffn


def expert_routed(recv_x: torch.Tensor, recv_scale: torch.Tensor, recv_w: torch.Tensor,
                  recv_count: torch.Tensor, w: ExpertWeights,
                  swiglu_limit: float) -> torch.Tensor:
    """recv_x [NL,C,D] INT8, recv_scale / recv_w [NL,C] FP32, recv_count [NL] ->
    recv_y [NL,C,D] BF16.

    Rows s < recv_count[e] of expert e get bf16(FFN_e(x) · recv_w); rows beyond the count
    are masked to zero whatever the buffer holds there (the "dirty tail" of §2.7).
    The routing weight is applied after the w2 dequantisation.
    """
    nl, cap, d = recv_x.shape
    counts = [int(c) for c in recv_count.reshape(-1).tolist()]
    if len(counts) != nl:
        raise ValueError(f"recv_count must have {nl} entries, got {len(counts)}")
    for e, n in enumerate(counts):
        if not 0 <= n <= cap:
            raise ValueError(f"recv_count[{e}]={n} outside [0, capacity={cap}]")
    recv_y = torch.zeros(nl, cap, d, dtype=torch.bfloat16)
    for e, n in enumerate(counts):
        if n == 0:
            continue
        y = swiglu_int8_ffn(recv_x[e, :n], recv_scale[e, :n].reshape(n, 1),
                            *(t[e] for t in w),
                            swiglu_limit, row_weight=recv_w[e, :n].reshape(n, 1))
        recv_y[e, :n] = bf16_rint(y)
    return recv_y
