import pytest
import torch

from wan_attention_sdpa import SdpaAttention
from wan_kernel.plugins import PluginManager
from wan_kernel.testing.attention import AttentionCase, check_attention_backend


def test_sdpa_conforms_on_cpu():
    check_attention_backend(SdpaAttention(), device="cpu", dtypes=(torch.float32,))


def test_sdpa_bf16_on_cpu():
    cases = [AttentionCase("self", 2, 96, 96, 2, 128, (96, 40)), AttentionCase("cross", 1, 64, 512, 2, 128)]
    check_attention_backend(SdpaAttention(), device="cpu", dtypes=(torch.bfloat16,), cases=cases, check_backward=False)


@pytest.mark.cuda
def test_sdpa_conforms_on_cuda(cuda_device):
    check_attention_backend(SdpaAttention(), device=cuda_device, dtypes=(torch.bfloat16, torch.float16))


def test_registered_under_both_names():
    pm = PluginManager()
    assert isinstance(pm.get("attention", "sdpa"), SdpaAttention)
    assert pm.get("attention", "torch") is pm.get("attention", "sdpa")
