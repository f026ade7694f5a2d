"""Shared material: a tiny Wan2.1 DiT with random weights whose rows span very different magnitudes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from wan_quant_fp8.testing import randomize_

from wan_kernel.models.attention import sdpa_attention
from wan_kernel.models.dit import WanDiT
from wan_kernel.models.dit_config import DiTConfig
from wan_kernel.testing import REFERENCE_FIXTURES

FIXTURES = REFERENCE_FIXTURES
TINY = DiTConfig(
    model_type="t2v", dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=32, in_dim=16, out_dim=16
)


def _build(config: DiTConfig = TINY, seed: int = 0, spread_rows: bool = True) -> WanDiT:
    return randomize_(WanDiT(config, attention=sdpa_attention), seed, spread_rows=spread_rows).eval()


def _inputs(config: DiTConfig = TINY, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, config.in_dim, 2, 4, 6, generator=g)  # [B, C, F, H, W]: 2*2*3 = 12 tokens
    t = torch.tensor([700.0])
    context = [torch.randn(5, config.text_dim, generator=g)]
    return x, t, context


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def build_tiny_dit():
    """``build_tiny_dit(config=TINY, seed=0, spread_rows=True)`` -> a random-weight float32 WanDiT."""
    return _build


@pytest.fixture(scope="session")
def dit_inputs():
    """``(x [1, 16, 2, 4, 6], t [1], context [[5, 32]])`` for the tiny DiT."""
    return _inputs()


@pytest.fixture(scope="session")
def tiny_dit_file(tmp_path_factory) -> Path:
    """A float32 official-layout safetensors file of the tiny DiT (2 heads: pass num_heads=2)."""
    path = tmp_path_factory.mktemp("dit") / "tiny_dit.safetensors"
    save_file({k: v.contiguous() for k, v in _build().state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_dit_reference(tiny_dit_file) -> torch.Tensor:
    """float32 output of the unquantized tiny DiT on the tiny inputs."""
    from wan_kernel.models.dit_loading import load_dit

    model = load_dit(tiny_dit_file, num_heads=2, dtype="float32")
    with torch.no_grad():
        return model(*_inputs())
