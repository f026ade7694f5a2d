"""fp8_t5 on transformers' UMT5EncoderModel (the names the kernel's T5 loader uses)."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from wan_quant_fp8 import Fp8T5Quantizer, quantize_model, save_quantized
from wan_quant_fp8.linear import Fp8DenseFFN, Fp8Linear
from wan_quant_fp8.tensors import FP8
from wan_quant_fp8.testing import relative_error

from wan_kernel.errors import InputError
from wan_kernel.pipelines.plugin_setup import resolve_quantizer

transformers = pytest.importorskip("transformers")


def _tiny_umt5(seed=0):
    config = transformers.UMT5Config(
        vocab_size=256,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return transformers.UMT5EncoderModel(config).eval()


def _encode(model):
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_t5_quantizes_linears_and_keeps_embeddings_and_norms(dtype):
    reference = _tiny_umt5()
    expected = _encode(reference)
    model = quantize_model(copy.deepcopy(reference).to(dtype), Fp8T5Quantizer().scheme, target="t5")
    ffn = model.encoder.block[0].layer[1].DenseReluDense
    assert isinstance(ffn, Fp8DenseFFN) and isinstance(ffn.wo, Fp8Linear)
    for name, p in model.named_parameters():
        is_linear = any(f".{n}.weight" in name for n in ("q", "k", "v", "o", "wi_0", "wi_1", "wo"))
        assert p.dtype == (FP8 if is_linear else dtype), name
    assert set(model.state_dict()) - set(reference.state_dict()) == {
        n for n in model.state_dict() if n.endswith(".scale_weight")
    }
    out = _encode(model)
    assert out.dtype == dtype
    # measured 4.8% (2 layers, transformers' init); the fp8 rounding of 7 Linears per layer
    assert relative_error(out, expected) < 0.08


def test_fp8_t5_through_the_quantizer_protocol_on_meta():
    reference = _tiny_umt5()
    sd = reference.state_dict()
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(reference.config)
    q = Fp8T5Quantizer()
    model = q.convert_for_runtime(model, target="t5")
    stored = q.quantize_state_dict(sd, target="t5")
    model.load_state_dict(stored, strict=True, assign=True)
    assert relative_error(_encode(model.eval()), _encode(reference)) < 0.08


def test_save_quantized_writes_the_tied_embedding_once(tmp_path):
    """UMT5 holds one embedding as ``shared.weight`` and ``encoder.embed_tokens.weight``: written once."""
    from wan_kernel.models.t5 import load_t5

    model = quantize_model(_tiny_umt5(), "fp8_t5", target="t5")
    path = save_quantized(model, tmp_path / "umt5_fp8_t5.safetensors", mode="fp8_t5")
    stored = load_file(str(path))
    assert stored.keys() == model.state_dict().keys() - {"encoder.embed_tokens.weight"}
    assert torch.equal(stored["shared.weight"], model.shared.weight)
    again = load_t5(path, quant=resolve_quantizer("fp8_t5", target="t5"), dtype=torch.float32)
    assert again.shared.weight is again.encoder.embed_tokens.weight  # tied again
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key].float(), value.float()), key
    assert torch.equal(_encode(again), _encode(model))


def test_targets_are_checked():
    with pytest.raises(InputError, match="fp8, fp8_scaled or fp8_fast"):
        Fp8T5Quantizer().convert_for_runtime(torch.nn.Linear(2, 2), target="dit")
    from wan_quant_fp8 import Fp8ScaledQuantizer

    with pytest.raises(InputError, match="use fp8_t5"):
        Fp8ScaledQuantizer().quantize_state_dict({}, target="t5")
    with pytest.raises(InputError, match="unknown quantization target"):
        Fp8ScaledQuantizer().quantize_state_dict({}, target="vae")


def test_save_quantized_replaces_atomically_and_a_full_disk_is_an_output_error(tmp_path, monkeypatch):
    """Written through wan_kernel.files: replaces the file in one step; a full disk keeps the old one."""
    import errno

    import safetensors.torch

    from wan_kernel.errors import OutputError
    from wan_kernel.testing.bad_input import killed_run_temporary, leftover_temporaries

    model = quantize_model(_tiny_umt5(), "fp8_t5", target="t5")
    path = tmp_path / "umt5_fp8_t5.safetensors"
    path.write_bytes(b"old")
    stale = killed_run_temporary(path)
    assert save_quantized(model, path, mode="fp8_t5") == path
    assert torch.equal(load_file(str(path))["shared.weight"], model.shared.weight)
    assert not stale.exists()
    kept = path.read_bytes()

    def full_disk(tensors, name, metadata=None):
        open(name, "wb").write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OutputError, match="disk is full") as info:
        save_quantized(model, path, mode="fp8_t5")
    assert str(path) in str(info.value)
    assert path.read_bytes() == kept
    assert not leftover_temporaries(tmp_path)
