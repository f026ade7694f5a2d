"""The attention conformance suite: compare any backend to a float32 reference.

A plugin's test module can run the whole suite in two lines::

    from wan_kernel.testing.attention import check_attention_backend
    def test_conformance(): check_attention_backend(MyBackend(), device="cuda")

or use the ``attention_conformance`` fixture of the pytest plugin. Cases cover the shapes Wan
uses: head dim 128, self-attention over long video sequences (with and without ``k_lens``),
cross-attention over 512 text tokens and over 257 image tokens, batches with different key
lengths, and the dtypes a backend claims to support.
"""

from __future__ import annotations

import math
from typing import Iterable

import attrs
import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    # (atol, rtol) against the float64 reference, for unit-variance inputs
    torch.float32: (2e-5, 1e-4),
    torch.float16: (3e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
}

EIGHT_BIT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    # (atol, rtol) for backends that quantize Q and K to int8 and, on some GPUs, P and V to fp8 e4m3
    # (SageAttention). fp8 keeps 3 mantissa bits: a value is rounded by up to 2**-4 = 6.25 % of
    # itself, which a case whose only valid key is one row (k_lens 1) shows unaveraged; hence
    # rtol 0.1. The int8 logits move softmax weights by about 1 %, hence atol 5e-2.
    torch.float32: (5e-2, 1e-1),  # fp32 inputs run in bf16
    torch.float16: (5e-2, 1e-1),
    torch.bfloat16: (5e-2, 1e-1),
}


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain masked softmax attention in float64 math; ``[B, L, H, D]`` in and out (``q``'s dtype)."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    qf, kf, vf = (t.to(torch.float64).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    logits = qf @ kf.transpose(-1, -2) / math.sqrt(d)  # [B, H, Lq, Lk]
    if k_lens is not None:
        keep = torch.arange(lk, device=q.device)[None, :] < k_lens.to(q.device)[:, None]  # [B, Lk]
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = logits.softmax(dim=-1) @ vf  # [B, H, Lq, D]
    return out.transpose(1, 2).to(q.dtype)


@attrs.frozen
class AttentionCase:
    """One conformance case: shapes, dtype and key lengths."""

    name: str
    batch: int
    q_len: int
    k_len: int
    heads: int
    head_dim: int
    k_lens: tuple[int, ...] | None = None

    def make(self, dtype: torch.dtype, device: str | torch.device, seed: int = 0):
        g = torch.Generator("cpu").manual_seed(seed)
        shape_q = (self.batch, self.q_len, self.heads, self.head_dim)
        shape_k = (self.batch, self.k_len, self.heads, self.head_dim)
        q = torch.randn(shape_q, generator=g)
        k = torch.randn(shape_k, generator=g)
        v = torch.randn(shape_k, generator=g)
        k_lens = None if self.k_lens is None else torch.tensor(self.k_lens, dtype=torch.int32)
        q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
        if k_lens is not None:
            k_lens = k_lens.to(device)
        return q, k, v, k_lens


def default_cases(*, long: bool = True) -> list[AttentionCase]:
    """The Wan shapes, scaled so that a CPU run stays quick when ``long`` is False."""
    video = 4680 if long else 300  # 1.3B at 832x480x81 is 32,760 tokens; keep the suite fast
    return [
        AttentionCase("self", 1, video, video, 2, 128),
        AttentionCase("self_k_lens", 2, video, video, 2, 128, (video, video - 37)),
        AttentionCase("self_small_head", 2, 64, 64, 4, 64, (64, 9)),
        AttentionCase("cross_text_512", 2, video, 512, 2, 128),
        AttentionCase("cross_text_k_lens", 2, video // 2, 512, 2, 128, (512, 7)),
        AttentionCase("cross_image_257", 1, video, 257, 2, 128),
        AttentionCase("odd_lengths", 3, 77, 129, 3, 128, (129, 1, 64)),
    ]


@attrs.frozen
class ConformanceResult:
    case: str
    dtype: torch.dtype
    max_abs_error: float
    atol: float
    ok: bool


def run_attention_conformance(
    backend,
    *,
    device: str | torch.device = "cpu",
    dtypes: Iterable[torch.dtype] = (torch.float32, torch.bfloat16),
    cases: Iterable[AttentionCase] | None = None,
    tolerances: dict[torch.dtype, tuple[float, float]] | None = None,
    check_backward: bool | None = None,
) -> list[ConformanceResult]:
    """Run every case through ``backend`` and the reference; return one result per case and dtype."""
    tolerances = {**TOLERANCES, **(tolerances or {})}
    cases = list(cases) if cases is not None else default_cases(long=str(device).startswith("cuda"))
    results = []
    for dtype in dtypes:
        atol, rtol = tolerances[dtype]
        for case in cases:
            q, k, v, k_lens = case.make(dtype, device)
            out = backend(q, k, v, k_lens=k_lens)
            if out.shape != q.shape or out.dtype != q.dtype:
                raise AssertionError(
                    f"{case.name}/{dtype}: backend returned {tuple(out.shape)} {out.dtype}, "
                    f"expected {tuple(q.shape)} {q.dtype}"
                )
            expected = reference_attention(q.double(), k.double(), v.double(), k_lens)
            err = (out.double() - expected).abs()
            ok = bool((err <= atol + rtol * expected.abs()).all())
            results.append(ConformanceResult(case.name, dtype, float(err.max()), atol, ok))
    if check_backward is None:
        check_backward = bool(getattr(backend, "supports_backward", False))
    if check_backward:
        _check_backward(backend, device)
    return results


def _check_backward(backend, device) -> None:
    case = AttentionCase("backward", 2, 96, 80, 2, 64, (80, 33))
    dtype = torch.float32 if not str(device).startswith("cuda") else torch.bfloat16
    q, k, v, k_lens = case.make(dtype, device, seed=1)
    grads = []
    for fn in (backend, reference_attention):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        fn(qq, kk, vv, k_lens=k_lens).float().square().sum().backward()
        grads.append([t.grad.double() for t in (qq, kk, vv)])
    atol = 1e-3 if dtype == torch.float32 else 0.5
    for name, got, want in zip("qkv", *grads):
        err = float((got - want).abs().max())
        scale = float(want.abs().max())
        if err > atol * max(1.0, scale):
            raise AssertionError(f"backward: grad of {name} differs from the reference by {err:.3g}")
    # keys past k_lens must get no gradient
    if float(grads[0][1][1, case.k_lens[1] :].abs().max()) != 0.0:
        raise AssertionError("backward: masked keys received a gradient")


def check_attention_backend(backend, **kwargs) -> None:
    """Run the suite and raise ``AssertionError`` listing every case that is out of tolerance."""
    failures = [r for r in run_attention_conformance(backend, **kwargs) if not r.ok]
    if failures:
        lines = [f"  {r.case} [{r.dtype}]: max error {r.max_abs_error:.3g} > atol {r.atol:g}" for r in failures]
        raise AssertionError(f"attention backend {getattr(backend, 'name', backend)!r} fails conformance:\n" + "\n".join(lines))
