"""Bitwise comparison helpers shared by the EP and kernel tests."""
import torch

from moe_kernels.layer import STAGE_KEYS


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe, -0 != +0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(width), b.contiguous().view(width))
    return torch.equal(a, b)


def assert_same_result(a, b, layouts: bool = False) -> None:
    """x_next and every stage tensor bit for bit; with `layouts`, the EP layouts and
    dropped counts too."""
    assert same_bytes(a.x_next, b.x_next)
    for k in STAGE_KEYS:
        assert same_bytes(a.stages[k], b.stages[k]), k
    if layouts:
        la, lb = a.layout.to_dump(), b.layout.to_dump()
        for k in la:
            assert torch.equal(la[k], lb[k]), k
        assert torch.equal(a.dropped, b.dropped)


def assert_gate_matches(out, ref) -> None:
    """The pypto gate against the reference: RMSNorm -> BF16, Q8 and the routing indices
    exact (no ties in these inputs); weights within a few FP32 ulp (the kernel's softplus
    tail is FP32, the reference's FP64)."""
    for name in ref._fields:
        assert getattr(out, name).dtype == getattr(ref, name).dtype, name
        assert getattr(out, name).shape == getattr(ref, name).shape, name
    assert torch.equal(out.x_norm, ref.x_norm)
    assert torch.equal(out.x_norm_i8, ref.x_norm_i8)
    assert torch.equal(out.x_norm_scale, ref.x_norm_scale)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.weights, ref.weights, rtol=1e-6, atol=1e-6)
