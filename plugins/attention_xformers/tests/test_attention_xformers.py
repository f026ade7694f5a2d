"""Tests of the xformers plugin.

On a CPU machine (no xformers) they prove the plugin installs, registers, explains what to
install, and that its block-diagonal packing of ``k_lens`` is exact: a stand-in kernel that
applies the reference attention block by block (what ``BlockDiagonalMask`` means) must reproduce
the reference on the padded batch. The ``cuda`` tests run the shared conformance suite on xformers.
"""

import subprocess
import sys

import pytest
import torch

from wan_attention_xformers import (
    XformersAttention,
    block_diagonal_attention,
    pack_block_diagonal,
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


def reference_block_diagonal_kernel(q, k, v, q_seqlen, kv_seqlen):
    """Stand-in for memory_efficient_attention with an optional BlockDiagonalMask."""
    if q_seqlen is None:
        assert kv_seqlen is None
        return reference_attention(q, k, v)
    assert q.shape[0] == 1 and k.shape[0] == 1, "block-diagonal masks take batch size 1"
    assert sum(q_seqlen) == q.shape[1] and sum(kv_seqlen) == k.shape[1] and len(q_seqlen) == len(kv_seqlen)
    blocks = [
        reference_attention(qb, kb, vb)
        for qb, kb, vb in zip(q.split(q_seqlen, dim=1), k.split(kv_seqlen, dim=1), v.split(kv_seqlen, dim=1))
    ]
    return torch.cat(blocks, dim=1)  # [1, sum(q_seqlen), H, D]


class BlockDiagonalOnCpu:
    """The plugin's packing path with the stand-in kernel, as a backend the suite can run."""

    name = "block-diagonal-packing"
    supports_backward = True

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, k_lens=None):
        def kernel(*args):
            self.calls.append(args[3:])
            return reference_block_diagonal_kernel(*args)

        return block_diagonal_attention(q, k, v, k_lens, kernel=kernel)


# -- packing logic on CPU -----------------------------------------------------------------------


def test_block_diagonal_packing_matches_reference_forward_and_backward():
    # every default case, and gradients: keys past k_lens must get exactly zero gradient
    check_attention_backend(
        BlockDiagonalOnCpu(), device="cpu", dtypes=(torch.float32,), cases=default_cases(long=False)
    )


def test_block_diagonal_packing_in_half_precision():
    cases = [AttentionCase("k_lens", 3, 40, 56, 2, 64, (56, 5, 31))]
    check_attention_backend(
        BlockDiagonalOnCpu(), device="cpu", dtypes=(torch.bfloat16, torch.float16), cases=cases,
        check_backward=False,
    )


def test_mask_only_when_keys_are_padded():
    backend = BlockDiagonalOnCpu()
    q, k, v, _ = AttentionCase("x", 2, 8, 12, 1, 16).make(torch.float32, "cpu")
    backend(q, k, v, k_lens=None)
    backend(q, k, v, k_lens=torch.tensor([12, 12]))
    backend(q, k, v, k_lens=torch.tensor([12, 5]))
    assert backend.calls == [(None, None), (None, None), ([8, 8], [12, 5])]


def test_pack_keeps_every_query_and_cuts_keys():
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 6, 1, 8), torch.randn(2, 6, 1, 8)
    q1, k1, v1, q_seqlen, kv_seqlen = pack_block_diagonal(q, k, v, [6, 2])
    assert q1.shape == (1, 8, 1, 8) and torch.equal(q1[0, 4:], q[1])
    assert torch.equal(k1[0], torch.cat([k[0], k[1, :2]]))
    assert torch.equal(v1[0], torch.cat([v[0], v[1, :2]]))
    assert (q_seqlen, kv_seqlen) == ([4, 4], [6, 2])


@pytest.mark.parametrize("bad", [[0, 3], [3, 7], [3]])
def test_bad_k_lens_are_rejected(bad):
    with pytest.raises(InputError, match="k_lens"):
        key_lengths(torch.tensor(bad), 2, 6)


def test_fp32_is_cast_to_bf16_and_half_kept():
    q = torch.randn(1, 2, 1, 8)
    assert {t.dtype for t in half_precision(q, q, q)} == {torch.bfloat16}
    assert {t.dtype for t in half_precision(q.half(), q, q)} == {torch.float16}


def test_cpu_tensors_get_a_clear_error():
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(InputError, match="CUDA tensors only.*sdpa"):
        XformersAttention()(q, q, q)


def test_mismatched_shapes_get_a_clear_error():
    with pytest.raises(InputError, match="batch, length, heads, head_dim"):
        XformersAttention()(torch.randn(4, 2, 64), torch.randn(4, 2, 64), torch.randn(4, 2, 64))
    with pytest.raises(InputError, match="must share"):
        XformersAttention()(torch.randn(1, 4, 2, 64), torch.randn(1, 4, 3, 64), torch.randn(1, 4, 3, 64))


# -- discovery and availability -----------------------------------------------------------------


def test_entry_module_imports_no_library():
    heavy = ("xformers", "torch")
    code = f"import sys, wan_attention_xformers; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_registered():
    entry = PluginManager().lookup("attention", "xformers")
    assert isinstance(entry.impl, XformersAttention)
    assert entry.distribution == "wan-attention-xformers"
    assert XformersAttention.supports_backward


def test_unavailable_here_says_what_to_install():
    verdict = XformersAttention().availability()
    if verdict.ok:
        pytest.skip("xformers and a CUDA GPU are present here")
    assert "pip install xformers" in verdict.reason or "CUDA GPU" in verdict.reason
    with pytest.raises(PluginUnavailableError) as caught:
        PluginManager().get("attention", "xformers")
    assert caught.value.distribution == "wan-attention-xformers"
    assert "xformers" in caught.value.reason


def test_verdicts_name_library_and_cuda():
    backend = XformersAttention()
    none = backend.judge(library_found=False, cuda_available=False)
    assert not none.ok and "pip install xformers" in none.reason and "CUDA GPU" in none.reason
    no_gpu = backend.judge(library_found=True, cuda_available=False)
    assert not no_gpu.ok and "pip install" not in no_gpu.reason
    assert backend.judge(library_found=True, cuda_available=True, capability=(7, 0)).ok


# -- the real kernel ----------------------------------------------------------------------------


def _ready():
    backend = XformersAttention()
    verdict = backend.availability()
    if not verdict.ok:
        pytest.skip(verdict.reason)
    return backend


@pytest.mark.cuda
def test_xformers_conforms_on_cuda(cuda_device):
    check_attention_backend(_ready(), device=cuda_device, dtypes=(torch.bfloat16, torch.float16))


@pytest.mark.cuda
def test_xformers_takes_fp32_and_returns_fp32(cuda_device):
    cases = [AttentionCase("k_lens", 2, 300, 512, 2, 128, (512, 7))]
    check_attention_backend(
        _ready(), device=cuda_device, dtypes=(torch.float32,), cases=cases, check_backward=False,
        tolerances={torch.float32: TOLERANCES[torch.bfloat16]},  # computed in bf16
    )
