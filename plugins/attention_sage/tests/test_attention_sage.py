"""Tests of the SageAttention plugin.

On a CPU machine (no sageattention) they prove the plugin installs, registers, explains what to
install, refuses training, and that its per-sample handling of ``k_lens`` is exact: a stand-in
mask-less kernel computing the reference attention must, through the plugin's loop, reproduce the
masked reference. The ``cuda`` tests run the shared conformance suite with the 8-bit tolerances.
"""

import subprocess
import sys

import pytest
import torch

from wan_attention_sage import (
    SageAttention,
    per_sample_attention,
)
from wan_kernel.attention_inputs import half_precision, key_lengths
from wan_kernel.errors import InputError, PluginUnavailableError
from wan_kernel.plugins import PluginManager
from wan_kernel.testing.attention import (
    EIGHT_BIT_TOLERANCES,
    AttentionCase,
    check_attention_backend,
    default_cases,
    reference_attention,
)


class LoopOnCpu:
    """The plugin's per-sample loop with a mask-less reference kernel, as a backend the suite can run."""

    name = "per-sample-loop"
    supports_backward = False

    def __init__(self):
        self.calls = []

    def kernel(self, q, k, v):
        self.calls.append((q.shape[0], k.shape[1]))
        return reference_attention(q, k, v)  # no k_lens: the kernel cannot mask

    def __call__(self, q, k, v, k_lens=None):
        return per_sample_attention(q, k, v, k_lens, kernel=self.kernel)


# -- masking by slicing on CPU ------------------------------------------------------------------


def test_per_sample_loop_matches_masked_reference():
    check_attention_backend(
        LoopOnCpu(), device="cpu", dtypes=(torch.float32,), cases=default_cases(long=False)
    )


def test_per_sample_loop_in_half_precision():
    cases = [AttentionCase("k_lens", 3, 40, 56, 2, 64, (56, 5, 31))]
    check_attention_backend(LoopOnCpu(), device="cpu", dtypes=(torch.bfloat16, torch.float16), cases=cases)


def test_batched_call_without_padding_and_sliced_calls_with_it():
    backend = LoopOnCpu()
    q, k, v, _ = AttentionCase("x", 3, 8, 12, 1, 64).make(torch.float32, "cpu")
    backend(q, k, v)
    backend(q, k, v, k_lens=torch.tensor([12, 12, 12]))
    assert backend.calls == [(3, 12), (3, 12)]
    backend.calls.clear()
    backend(q, k, v, k_lens=torch.tensor([12, 5, 1]))
    assert backend.calls == [(1, 12), (1, 5), (1, 1)]


@pytest.mark.parametrize("bad", [[0, 3], [3, 13], [3, 3, 3]])
def test_bad_k_lens_are_rejected(bad):
    with pytest.raises(InputError, match="k_lens"):
        key_lengths(torch.tensor(bad), 2, 12)


def test_fp32_is_cast_to_bf16_and_half_kept():
    q = torch.randn(1, 2, 1, 8)
    assert {t.dtype for t in half_precision(q, q, q)} == {torch.bfloat16}
    assert {t.dtype for t in half_precision(q.half(), q, q)} == {torch.float16}


@pytest.mark.parametrize("head_dim", [32, 80, 256])
def test_unsupported_head_dims_are_explained(head_dim):
    with pytest.raises(InputError, match="64, 96, 128"):
        SageAttention().check_head_dim(head_dim)


def test_training_is_refused_clearly():
    q = torch.randn(1, 4, 2, 64, requires_grad=True)
    k = torch.randn(1, 4, 2, 64)
    with pytest.raises(PluginUnavailableError, match="no backward pass.*training") as caught:
        SageAttention()(q, k, k)
    assert caught.value.distribution == "wan-attention-sage"
    assert SageAttention.supports_backward is False


def test_inference_under_no_grad_passes_the_training_check():
    q = torch.randn(1, 4, 2, 64, requires_grad=True)
    with torch.no_grad(), pytest.raises(InputError, match="CUDA tensors only"):
        SageAttention()(q, q, q)


def test_cpu_tensors_get_a_clear_error():
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(InputError, match="CUDA tensors only.*sdpa"):
        SageAttention()(q, q, q)


# -- discovery and availability -----------------------------------------------------------------


def test_entry_module_imports_no_library():
    heavy = ("sageattention", "triton", "torch")
    code = f"import sys, wan_attention_sage; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_registered():
    entry = PluginManager().lookup("attention", "sageattn")
    assert isinstance(entry.impl, SageAttention)
    assert entry.distribution == "wan-attention-sage"


def test_unavailable_here_says_what_to_install():
    verdict = SageAttention().availability()
    if verdict.ok:
        pytest.skip("sageattention and a supported GPU are present here")
    assert "pip install sageattention" in verdict.reason or "CUDA GPU" in verdict.reason
    with pytest.raises(PluginUnavailableError) as caught:
        PluginManager().get("attention", "sageattn")
    assert caught.value.distribution == "wan-attention-sage"


def test_verdicts_name_library_cuda_and_gpu():
    backend = SageAttention()
    none = backend.judge(library_found=False, cuda_available=False, capability=None)
    assert not none.ok and "pip install sageattention" in none.reason and "CUDA GPU" in none.reason
    turing = backend.judge(library_found=True, cuda_available=True, capability=(7, 5), version="1.0.6")
    assert not turing.ok and "8.0" in turing.reason and "sm75" in turing.reason
    assert backend.judge(library_found=True, cuda_available=True, capability=(8, 7), version="1.0.6").ok
    orin = backend.judge(library_found=True, cuda_available=True, capability=(8, 7), version="2.2.0")
    assert not orin.ok and "sm90" in orin.reason and "sm87" in orin.reason
    for capability in [(8, 0), (8, 6), (8, 9), (9, 0), (12, 0)]:
        assert backend.judge(library_found=True, cuda_available=True, capability=capability, version="2.2").ok


# -- the real kernel ----------------------------------------------------------------------------


def _ready():
    backend = SageAttention()
    verdict = backend.availability()
    if not verdict.ok:
        pytest.skip(verdict.reason)
    return backend


@pytest.mark.cuda
def test_sage_conforms_on_cuda_within_8bit_tolerances(cuda_device):
    # SageAttention quantizes Q/K to int8 (and P/V to fp8 on sm89+): see EIGHT_BIT_TOLERANCES
    check_attention_backend(
        _ready(), device=cuda_device, dtypes=(torch.bfloat16, torch.float16), tolerances=EIGHT_BIT_TOLERANCES
    )


@pytest.mark.cuda
def test_sage_takes_fp32_and_returns_fp32(cuda_device):
    cases = [AttentionCase("k_lens", 2, 300, 512, 2, 128, (512, 7))]
    check_attention_backend(
        _ready(), device=cuda_device, dtypes=(torch.float32,), cases=cases, tolerances=EIGHT_BIT_TOLERANCES
    )
