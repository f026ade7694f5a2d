"""Tests of the flash2/flash3 plugin.

On a CPU machine (no flash-attn) they prove the plugin installs, registers, explains what to
install, and that its packing of ``k_lens`` into varlen form is exact: a stand-in kernel that runs
the reference attention segment by segment on the packed layout must reproduce the reference on
the padded layout. The ``cuda`` tests run the shared conformance suite on the real kernels.
"""

import subprocess
import sys

import pytest
import torch

from wan_attention_flash import (
    FlashAttention2,
    FlashAttention3,
    cu_seqlens,
    pack_varlen,
    varlen_attention,
)
from wan_kernel.attention_inputs import half_precision, key_lengths
from wan_kernel.errors import InputError, PluginUnavailableError
from wan_kernel.plugins import PluginManager
from wan_kernel.testing.attention import (
    TOLERANCES,
    AttentionCase,
    check_attention_backend,
    default_cases,
    reference_attention,
)


def reference_varlen_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Stand-in for flash_attn_varlen_func: checks its contract, then runs the reference per segment."""
    assert q.dim() == 3 and k.dim() == 3 and v.shape == k.shape
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert cu_seqlens_q.shape == cu_seqlens_k.shape
    assert int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0]
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    k_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    assert max_seqlen_q == max(q_lens) and max_seqlen_k == max(k_lens)
    outs = []
    q_starts, k_starts = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for qs, qe, ks, ke in zip(q_starts[:-1], q_starts[1:], k_starts[:-1], k_starts[1:]):
        outs.append(reference_attention(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke])[0])  # [Lq_i, H, D]
    return torch.cat(outs)


class VarlenOnCpu:
    """The plugin's packing path with the stand-in kernel, as a backend the suite can run."""

    name = "varlen-packing"
    supports_backward = True

    def __call__(self, q, k, v, k_lens=None):
        return varlen_attention(q, k, v, k_lens, kernel=reference_varlen_kernel)


def _flash2_ready() -> bool:
    return FlashAttention2().availability().ok


# -- packing logic on CPU -----------------------------------------------------------------------


def test_varlen_packing_matches_reference_forward_and_backward():
    # every default case (k_lens with padding, none, one key, odd lengths), and gradients: keys
    # past k_lens must get exactly zero gradient through the packing
    check_attention_backend(
        VarlenOnCpu(), device="cpu", dtypes=(torch.float32,), cases=default_cases(long=False)
    )


def test_varlen_packing_in_half_precision():
    cases = [AttentionCase("k_lens", 3, 40, 56, 2, 64, (56, 5, 31))]
    check_attention_backend(
        VarlenOnCpu(), device="cpu", dtypes=(torch.bfloat16, torch.float16), cases=cases, check_backward=False
    )


def test_cu_seqlens_are_int32_cumulative():
    got = cu_seqlens([5, 3, 7])
    assert got.dtype == torch.int32
    assert got.tolist() == [0, 5, 8, 15]


def test_pack_cuts_keys_to_k_lens_and_keeps_every_query():
    q = torch.randn(2, 4, 1, 8)
    k = torch.randn(2, 6, 1, 8)
    v = torch.randn(2, 6, 1, 8)
    batch = pack_varlen(q, k, v, [6, 2])
    assert batch.q.shape == (8, 1, 8)
    assert torch.equal(batch.k, torch.cat([k[0], k[1, :2]]))
    assert torch.equal(batch.v, torch.cat([v[0], v[1, :2]]))
    assert batch.cu_seqlens_q.tolist() == [0, 4, 8]
    assert batch.cu_seqlens_k.tolist() == [0, 6, 8]
    assert (batch.max_seqlen_q, batch.max_seqlen_k) == (4, 6)


def test_pack_without_padding_is_a_view():
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 6, 1, 8), torch.randn(2, 6, 1, 8)
    batch = pack_varlen(q, k, v, key_lengths(torch.tensor([6, 6]), 2, 6))
    assert batch.k.data_ptr() == k.data_ptr() and batch.k.shape == (12, 1, 8)
    assert batch.cu_seqlens_k.tolist() == [0, 6, 12]


@pytest.mark.parametrize("bad", [[0, 3], [3, 7], [3], [[3, 3]]])
def test_bad_k_lens_are_rejected(bad):
    with pytest.raises(InputError, match="k_lens"):
        key_lengths(torch.tensor(bad), 2, 6)


def test_float_k_lens_are_rejected():
    with pytest.raises(InputError, match="integer"):
        key_lengths(torch.tensor([3.0, 2.0]), 2, 6)


def test_fp32_is_cast_to_bf16_and_half_kept():
    q = torch.randn(1, 2, 1, 8)
    assert {t.dtype for t in half_precision(q, q, q)} == {torch.bfloat16}
    assert {t.dtype for t in half_precision(q.half(), q, q)} == {torch.float16}


@pytest.mark.parametrize("head_dim", [4, 100, 264])
def test_unsupported_head_dims_are_explained(head_dim):
    with pytest.raises(InputError, match="multiples of 8 up to 256"):
        FlashAttention2().check_head_dim(head_dim)


def test_supported_head_dims_pass():
    for head_dim in (64, 128, 256):
        FlashAttention2().check_head_dim(head_dim)


def test_cpu_tensors_get_a_clear_error():
    q = torch.randn(1, 4, 2, 64)
    for backend in (FlashAttention2(), FlashAttention3()):
        with pytest.raises(InputError, match="CUDA tensors only.*sdpa"):
            backend(q, q, q)


# -- discovery and availability -----------------------------------------------------------------


def test_entry_module_imports_no_library():
    heavy = ("flash_attn", "flash_attn_interface", "torch")
    code = f"import sys, wan_attention_flash; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_registered_under_all_names():
    pm = PluginManager()
    assert isinstance(pm.lookup("attention", "flash2").impl, FlashAttention2)
    assert pm.lookup("attention", "flash").impl is pm.lookup("attention", "flash2").impl
    assert isinstance(pm.lookup("attention", "flash3").impl, FlashAttention3)
    assert pm.lookup("attention", "flash3").distribution == "wan-attention-flash"
    assert FlashAttention2.supports_backward and FlashAttention3.supports_backward


@pytest.mark.skipif(_flash2_ready(), reason="flash-attn and a suitable GPU are present here")
def test_unavailable_here_says_what_to_install():
    verdict = FlashAttention2().availability()
    assert not verdict.ok
    assert "pip install flash-attn" in verdict.reason or "CUDA GPU" in verdict.reason
    with pytest.raises(PluginUnavailableError) as caught:
        PluginManager().get("attention", "flash")
    assert caught.value.distribution == "wan-attention-flash"
    assert "flash-attn" in str(caught.value) or "CUDA" in str(caught.value)


def test_unavailable_flash3_says_how_to_build():
    if FlashAttention3().availability().ok:
        pytest.skip("FlashAttention-3 and a Hopper GPU are present here")
    with pytest.raises(PluginUnavailableError, match="flash3.*(hopper|Hopper|CUDA)"):
        PluginManager().get("attention", "flash3")


def test_verdicts_name_library_cuda_and_gpu():
    f2, f3 = FlashAttention2(), FlashAttention3()
    none = f2.judge(library_found=False, cuda_available=False, capability=None)
    assert not none.ok and "pip install flash-attn" in none.reason and "CUDA GPU" in none.reason
    no_fa3 = f3.judge(library_found=False, cuda_available=True, capability=(9, 0))
    assert "flash-attention/hopper" in no_fa3.reason
    turing = f2.judge(library_found=True, cuda_available=True, capability=(7, 5))
    assert not turing.ok and "8.0" in turing.reason and "sm75" in turing.reason
    assert f2.judge(library_found=True, cuda_available=True, capability=(8, 0)).ok
    assert f2.judge(library_found=True, cuda_available=True, capability=(12, 0)).ok
    ada = f3.judge(library_found=True, cuda_available=True, capability=(8, 9))
    assert not ada.ok and "Hopper" in ada.reason and "flash2" in ada.reason
    assert f3.judge(library_found=True, cuda_available=True, capability=(9, 0)).ok


def test_call_without_library_raises_unavailable(monkeypatch):
    # inputs pass the checks, so the missing kernel is what stops the call
    backend = FlashAttention2()
    if backend.availability().ok:
        pytest.skip("flash-attn is usable here")
    monkeypatch.setattr("wan_kernel.attention_kernels.check_attention_inputs", lambda *a, **k: None)
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(PluginUnavailableError, match="flash2"):
        backend(q, q, q)


# -- the real kernels ---------------------------------------------------------------------------


def _ready(backend):
    verdict = backend.availability()
    if not verdict.ok:
        pytest.skip(verdict.reason)
    return backend


@pytest.mark.cuda
@pytest.mark.parametrize("backend_cls", [FlashAttention2, FlashAttention3])
def test_flash_conforms_on_cuda(backend_cls, cuda_device):
    backend = _ready(backend_cls())
    check_attention_backend(backend, device=cuda_device, dtypes=(torch.bfloat16, torch.float16))


@pytest.mark.cuda
@pytest.mark.parametrize("backend_cls", [FlashAttention2, FlashAttention3])
def test_flash_takes_fp32_and_returns_fp32(backend_cls, cuda_device):
    backend = _ready(backend_cls())
    cases = [AttentionCase("k_lens", 2, 300, 512, 2, 128, (512, 7))]
    check_attention_backend(
        backend, device=cuda_device, dtypes=(torch.float32,), cases=cases, check_backward=False,
        tolerances={torch.float32: TOLERANCES[torch.bfloat16]},  # computed in bf16
    )
