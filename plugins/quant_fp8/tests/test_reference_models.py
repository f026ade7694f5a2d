"""The fp8 quantizers through the kernel's loaders, on the official reference models (the
golden tensors of ``wan_kernel.testing.REFERENCE_FIXTURES``): ``fp8_t5`` through ``load_t5``,
``save_quantized`` files read back by ``load_t5`` and ``load_dit``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from wan_quant_fp8 import quantize_model, read_quantization_tag, save_quantized
from wan_quant_fp8.linear import Fp8Linear
from wan_quant_fp8.tensors import dequantize_weight

from wan_kernel.models.dit_loading import load_dit
from wan_kernel.models.t5 import load_t5
from wan_kernel.pipelines.plugin_setup import resolve_quantizer
from wan_kernel.testing import read_reference_case, reference_case, skip_without_fixtures

pytestmark = skip_without_fixtures()

T5_WEIGHTS = reference_case("t5") / "weights.safetensors"
DIT_WEIGHTS = reference_case("dit_t2v") / "weights.safetensors"


@pytest.fixture(scope="module")
def case():
    return read_reference_case("t5")


def _rel_err(hidden: torch.Tensor, tensors: dict) -> float:
    real = tensors["mask"].bool()
    err = (hidden.float() - tensors["hidden"])[real]
    return float(err.pow(2).mean().sqrt() / tensors["hidden"][real].pow(2).mean().sqrt())


def assert_tied(model) -> None:
    """One embedding Parameter under both names, as transformers ties them."""
    assert model.shared.weight is model.encoder.embed_tokens.weight


def run(model, tensors: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(tensors["x"], tensors["t"], list(tensors["context"]))


def test_fp8_t5_plugin_through_load_t5(case):

    _, tensors = case
    model = load_t5(T5_WEIGHTS, quant=resolve_quantizer("fp8_t5", target="t5"))  # by name (entry point)
    q = model.encoder.block[1].layer[0].SelfAttention.q
    assert isinstance(q, Fp8Linear) and q.weight.dtype == torch.float8_e4m3fn and not q.weight.is_meta
    assert model.shared.weight.dtype == torch.float32  # embeddings, tables and norms stay high precision
    assert model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.dtype == torch.float32
    hidden = model(tensors["ids"], tensors["mask"]).last_hidden_state
    assert hidden.dtype == torch.float32
    # the same numbers as quantizing the loaded float32 encoder with the plugin's own helper
    by_hand = quantize_model(load_t5(T5_WEIGHTS), "fp8_t5", target="t5")
    torch.testing.assert_close(hidden, by_hand(tensors["ids"], tensors["mask"]).last_hidden_state)
    # measured 0.122: 2.5% rms rounding per weight, amplified by this tiny random encoder
    # (unscaled attention logits); bf16 alone gives 0.018
    assert 0.02 < _rel_err(hidden, tensors) < 0.2


def test_fp8_t5_save_quantized_round_trip_with_and_without_quant(case, tmp_path):
    """``save_quantized`` writes the tied embedding once; ``load_t5`` reads the file back, tied."""

    _, tensors = case
    quantized = quantize_model(load_t5(T5_WEIGHTS), "fp8_t5", target="t5")
    path = save_quantized(quantized, tmp_path / "umt5_fp8_t5.safetensors", mode="fp8_t5")
    assert read_quantization_tag(path) == "fp8_t5"
    stored = load_file(path)
    assert stored.keys() == quantized.state_dict().keys() - {"encoder.embed_tokens.weight"}
    assert torch.equal(stored["shared.weight"], quantized.shared.weight)
    wo = "encoder.block.0.layer.1.DenseReluDense.wo."
    assert stored[wo + "weight"].dtype == torch.float8_e4m3fn
    assert stored[wo + "scale_weight"].shape == (32, 1, 1)  # [out, in/64, 1]

    plain = load_t5(path, dtype=torch.float32)  # no quantizer: dequantized
    assert_tied(plain)
    want = dequantize_weight(stored[wo + "weight"], stored[wo + "scale_weight"])
    torch.testing.assert_close(plain.state_dict()[wo + "weight"], want, rtol=0, atol=0)
    torch.testing.assert_close(
        plain(tensors["ids"], tensors["mask"]).last_hidden_state,
        quantized(tensors["ids"], tensors["mask"]).last_hidden_state,
        rtol=1e-5,
        atol=1e-5,
    )

    # the stored fp8 values pass through
    again = load_t5(path, quant=resolve_quantizer("fp8_t5", target="t5"), dtype=torch.float32)
    assert_tied(again)
    for key, value in quantized.state_dict().items():
        assert torch.equal(again.state_dict()[key].float(), value.float()), key
    torch.testing.assert_close(
        again(tensors["ids"], tensors["mask"]).last_hidden_state,
        quantized(tensors["ids"], tensors["mask"]).last_hidden_state,
        rtol=1e-6,
        atol=1e-6,
    )


def test_fp8_scaled_plugin_file_loads_without_quant(tmp_path):
    """A file written by the quant plugin's ``save_quantized`` (musubi's block layout) loads dequantized."""
    model = quantize_model(load_dit(DIT_WEIGHTS), "fp8_scaled", target="dit")
    path = save_quantized(model, tmp_path / "dit_fp8_scaled.safetensors")
    stored = load_file(path)
    assert stored["blocks.1.ffn.2.scale_weight"].shape == (64, 2, 1)  # [out, in/64, 1]
    loaded = load_dit(path, num_heads=2, dtype=torch.float32)
    for prefix in ("blocks.1.ffn.2", "blocks.0.self_attn.k"):
        want = dequantize_weight(stored[prefix + ".weight"], stored[prefix + ".scale_weight"])
        assert torch.equal(loaded.state_dict()[prefix + ".weight"], want), prefix
    tensors = load_file(reference_case("dit_t2v") / "case.safetensors")
    out = run(loaded, tensors)
    assert (out - tensors["out"]).pow(2).mean().sqrt() < 0.05 * tensors["out"].pow(2).mean().sqrt()
