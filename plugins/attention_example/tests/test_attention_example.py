"""The example backend against the kernel's attention conformance suite, and found by name."""

import pytest

pytest.importorskip("wan_attention_example", reason="install the plugin first: pip install -e <its folder>")

import torch  # noqa: E402

from wan_attention_example import ExampleAttention  # noqa: E402
from wan_kernel.plugins import PluginManager  # noqa: E402


def test_conformance_on_cpu(attention_conformance):
    attention_conformance(ExampleAttention(), device="cpu", dtypes=(torch.float32,))


@pytest.mark.cuda
def test_conformance_on_cuda(attention_conformance, cuda_device):
    attention_conformance(ExampleAttention(), device=cuda_device, dtypes=(torch.bfloat16, torch.float16))


def test_selectable_by_name():
    manager = PluginManager()
    assert isinstance(manager.get("attention", "example"), ExampleAttention)
    assert manager.get("attention", "example_math") is manager.get("attention", "example")
