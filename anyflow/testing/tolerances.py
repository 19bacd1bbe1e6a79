"""Tolerance rules of the project (conventions.md), written once.

1. Kernel vs reference: ``max|out - ref32| <= 2 * max|ref_low - ref32| + 1e-6`` where ``ref32`` is the
   reference in fp32 and ``ref_low`` the reference in the kernel's dtype, plus a per-dtype backstop
   (fp32 rtol 1e-5 / atol 1e-6; bf16 rtol 1.6e-2 / atol 1e-3).
2. fp32 end to end: relative L2 error <= 1e-5 per forward, <= 1e-4 for latents after up to 8 steps.
3. bf16 pipelines: SQNR >= 30 dB after 4 steps.
NaN / Inf never pass. Bitwise equality is not a goal.
"""

from __future__ import annotations

import torch

BACKSTOP = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-3), torch.float16: (1e-3, 1e-5)}


def _finite(name, x):
    if not torch.isfinite(x).all():
        raise AssertionError(f"{name} has NaN or Inf")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sqnr_db(signal_ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of ``test`` against ``signal_ref`` in dB."""
    ref, test = signal_ref.double(), test.double()
    return (20 * torch.log10(ref.norm() / (ref - test).norm().clamp_min(1e-30))).item()


def assert_kernel_close(out: torch.Tensor, ref32: torch.Tensor, ref_low: torch.Tensor | None = None) -> None:
    """Rule 1. ``ref_low`` may be omitted when ``out`` is fp32 (then the fp32 backstop applies)."""
    _finite("output", out)
    err = (out.double() - ref32.double()).abs().max().item()
    if ref_low is not None:
        bound = 2 * (ref_low.double() - ref32.double()).abs().max().item() + 1e-6
        if err <= bound:
            return
    rtol, atol = BACKSTOP[out.dtype]
    torch.testing.assert_close(out.double(), ref32.double(), rtol=rtol, atol=atol)


def assert_rel_l2(out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Rule 2: relative L2 error at most ``tol``; returns the error."""
    _finite("output", out)
    err = rel_l2(out, ref)
    if not err <= tol:
        raise AssertionError(f"relative L2 error {err:.3e} exceeds {tol:.1e}")
    return err
