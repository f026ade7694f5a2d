"""The modes on the DiT, through ``load_dit(path, quant=...)``: accuracy, memory, files in and out.

Documented bounds (relative L2 error of the tiny DiT's output against float32, weights with
outlier rows and small q/k weights, see ``wan_quant_fp8.testing.randomize_``): fp8 < 4%,
fp8_scaled < 2%, fp8_fast (CPU: its up-cast path with per-channel scales) < 2.5%; fp8_scaled at
most 3/4 of plain fp8's error on the same weights. Measured: 1.7% / 0.9% / 1.0% (bf16 alone: 0.35%).
"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from wan_quant_fp8 import Fp8FastQuantizer, Fp8Quantizer, Fp8ScaledQuantizer
from wan_quant_fp8.checkpoint import read_quantization_tag, save_quantized
from wan_quant_fp8.linear import Fp8Linear
from wan_quant_fp8.scheme import FP8_MAX, is_quantized_layer
from wan_quant_fp8.tensors import FP8
from wan_quant_fp8.testing import relative_error, state_bytes

from wan_kernel.errors import PluginUnavailableError, WeightsError
from wan_kernel.models.dit import WanDiT
from wan_kernel.models.dit_config import PRESETS
from wan_kernel.models.dit_loading import load_dit
from wan_kernel.pipelines.plugin_setup import resolve_quantizer

BOUNDS = {"fp8": 0.04, "fp8_scaled": 0.02, "fp8_fast": 0.025}
QUANTIZERS = {"fp8": Fp8Quantizer(), "fp8_scaled": Fp8ScaledQuantizer(), "fp8_fast": Fp8FastQuantizer()}


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_mode_stays_close_to_float32_and_scaled_beats_plain(
    tiny_dit_file, tiny_dit_reference, dit_inputs, dtype
):
    errors = {}
    for mode, quantizer in QUANTIZERS.items():
        model = load_dit(tiny_dit_file, num_heads=2, dtype=dtype, quant=quantizer)
        assert isinstance(model.blocks[1].cross_attn.o, Fp8Linear)
        errors[mode] = relative_error(_run(model, dit_inputs), tiny_dit_reference)
    for mode, err in errors.items():
        assert err < BOUNDS[mode], (mode, errors)
    assert errors["fp8_scaled"] < 0.75 * errors["fp8"], errors


def test_kept_parts_stay_high_precision(tiny_dit_file):
    model = load_dit(tiny_dit_file, num_heads=2, dtype="bfloat16", quant=resolve_quantizer("fp8_scaled", target="dit"))
    for name, p in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        if leaf == "weight" and is_quantized_layer("dit", module_name):
            assert p.dtype == FP8, name
        elif leaf == "modulation":
            assert p.dtype == torch.float32, name
        else:
            assert p.dtype == torch.bfloat16, name  # embeddings, time MLPs, head, norms, biases
    assert model.compute_dtype == torch.bfloat16


def _meta_dit(preset):
    with torch.device("meta"):
        return WanDiT(PRESETS[preset], attention=lambda q, k, v, k_lens=None: q).to(torch.bfloat16)


def test_parameter_bytes_are_about_half_of_bf16(tiny_dit_file):
    # the released sizes, counted on the meta device (shapes and dtypes, no memory)
    for preset in ("t2v-1.3B", "i2v-14B"):
        bf16 = state_bytes(_meta_dit(preset))
        for mode, quantizer in QUANTIZERS.items():
            ratio = state_bytes(quantizer.convert_for_runtime(_meta_dit(preset), target="dit")) / bf16
            assert 0.5 <= ratio <= 0.56, (preset, mode, ratio)
    # the tiny model, loaded: its big Linears take (1 + 4/64) / 2 of their bf16 bytes
    plain = load_dit(tiny_dit_file, num_heads=2, dtype="bfloat16")
    scaled = load_dit(tiny_dit_file, num_heads=2, dtype="bfloat16", quant=resolve_quantizer("fp8_scaled", target="dit"))
    linears = [n for n, m in plain.named_modules() if is_quantized_layer("dit", n)]
    before = sum(state_bytes(plain.get_submodule(n)) for n in linears)
    after = sum(state_bytes(scaled.get_submodule(n)) for n in linears)
    weights = sum(plain.get_submodule(n).weight.numel() for n in linears)
    assert after == before - weights * 2 + weights * (1 + 4 / 64)
    assert state_bytes(scaled) < 0.75 * state_bytes(plain)


def test_float8_e4m3fn_files_load(tmp_path, tiny_dit_file, tiny_dit_reference, dit_inputs):
    """A file whose block Linears are stored as float8_e4m3fn (no scales), the rest bf16."""
    sd = load_file(str(tiny_dit_file))
    fp8_file = {
        k: (
            v.clamp(-FP8_MAX, FP8_MAX).to(FP8)
            if k.endswith(".weight") and is_quantized_layer("dit", k[:-7])
            else v.to(torch.bfloat16)
        )
        for k, v in sd.items()
    }
    path = tmp_path / "dit_fp8_e4m3fn.safetensors"
    save_file(fp8_file, str(path))
    from_fp8 = _run(load_dit(path, num_heads=2, dtype="float32", quant=resolve_quantizer("fp8", target="dit")), dit_inputs)
    assert relative_error(from_fp8, tiny_dit_reference) < BOUNDS["fp8"]
    # fp8_scaled takes the stored fp8 values with unit scales: the same numbers exactly
    scaled = load_dit(path, num_heads=2, dtype="float32", quant=resolve_quantizer("fp8_scaled", target="dit"))
    assert scaled.blocks[0].ffn[0].scale_weight.eq(1).all()
    assert torch.equal(_run(scaled, dit_inputs), from_fp8)
    # bf16 is the compute dtype such a file picks when none is given
    assert load_dit(path, num_heads=2, quant=resolve_quantizer("fp8", target="dit")).compute_dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["fp8", "fp8_scaled"])
def test_save_quantized_then_load_gives_identical_outputs(tmp_path, tiny_dit_file, dit_inputs, mode):
    model = load_dit(tiny_dit_file, num_heads=2, dtype="bfloat16", quant=resolve_quantizer(mode, target="dit"))
    first = _run(model, dit_inputs)
    path = save_quantized(model, tmp_path / f"tiny_{mode}.safetensors")
    assert read_quantization_tag(path) == mode
    stored = load_file(str(path))
    assert stored["blocks.0.self_attn.q.weight"].dtype == FP8
    assert ("blocks.0.self_attn.q.scale_weight" in stored) == (mode == "fp8_scaled")
    again = load_dit(path, num_heads=2, quant=resolve_quantizer(mode, target="dit"))
    assert again.compute_dtype == torch.bfloat16
    assert torch.equal(_run(again, dit_inputs), first)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key].view(torch.uint8), value.view(torch.uint8)), key


def test_save_quantized_keeps_every_view_of_one_tensor(tmp_path, tiny_dit_file, dit_inputs):
    """Biases that are views of one fused tensor (a fused-qkv file) are not tied weights: all are written."""
    model = load_dit(tiny_dit_file, num_heads=2, quant=resolve_quantizer("fp8_scaled", target="dit"))
    attn = model.blocks[0].self_attn
    fused = torch.cat([attn.q.bias, attn.k.bias, attn.v.bias])  # [3 * dim]
    for i, name in enumerate("qkv"):
        getattr(attn, name).bias = torch.nn.Parameter(fused[i * 128 : (i + 1) * 128], requires_grad=False)
    assert attn.k.bias.untyped_storage().data_ptr() == attn.q.bias.untyped_storage().data_ptr()
    path = save_quantized(model, tmp_path / "views.safetensors")
    stored = load_file(str(path))
    assert stored.keys() == model.state_dict().keys()
    for name in "qkv":
        assert torch.equal(stored[f"blocks.0.self_attn.{name}.bias"], getattr(attn, name).bias), name
    again = load_dit(path, num_heads=2, dtype="float32", quant=resolve_quantizer("fp8_scaled", target="dit"))
    assert torch.equal(_run(again, dit_inputs), _run(model, dit_inputs))


def test_save_quantized_refuses_a_model_without_fp8_layers(tmp_path, tiny_dit_file):
    from wan_kernel.errors import InputError

    with pytest.raises(InputError, match="no fp8 layers"):
        save_quantized(load_dit(tiny_dit_file, num_heads=2), tmp_path / "x.safetensors")


def test_comfyui_style_per_tensor_scaled_file_loads(tmp_path, tiny_dit_file, tiny_dit_reference, dit_inputs):
    sd = load_file(str(tiny_dit_file))
    out = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for k, v in sd.items():
        if k.endswith(".weight") and is_quantized_layer("dit", k[:-7]):
            scale = v.abs().max() / FP8_MAX
            out[k] = (v / scale).to(FP8)
            out[k[:-7] + ".scale_weight"] = scale.reshape(())
            out[k[:-7] + ".scale_input"] = torch.tensor(1.0)
        else:
            out[k] = v.to(torch.bfloat16)
    path = tmp_path / "comfy_scaled.safetensors"
    save_file(out, str(path))
    model = load_dit(path, num_heads=2, dtype="float32", quant=resolve_quantizer("fp8_scaled", target="dit"))
    assert model.blocks[0].self_attn.q.scale_weight.shape == (128, 2, 1)
    # per-tensor scales with outlier rows are coarse, but the values are kept exactly
    assert relative_error(_run(model, dit_inputs), tiny_dit_reference) < 0.1
    with pytest.raises(WeightsError, match="fp8_scaled"):
        load_dit(path, num_heads=2, quant=resolve_quantizer("fp8", target="dit"))


@pytest.mark.parametrize("case", ["dit_t2v", "dit_i2v"])
def test_official_fixture_under_fp8_scaled(fixtures_dir, case):
    data = load_file(str(fixtures_dir / case / "case.safetensors"))
    model = load_dit(
        fixtures_dir / case / "weights.safetensors", num_heads=2, dtype="float32", quant=resolve_quantizer("fp8_scaled", target="dit")
    )
    kwargs = {}
    if "clip_fea" in data:
        kwargs = {"clip_fea": data["clip_fea"], "y": data["y"]}
    with torch.no_grad():
        out = model(data["x"], data["t"], [data["context"][0]], seq_len=72, **kwargs)
    assert relative_error(out, data["out"]) < 0.03
    if case == "dit_i2v":
        assert isinstance(model.blocks[0].cross_attn.k_img, Fp8Linear)
        assert model.img_emb.proj[1].weight.dtype == torch.float32


def test_fp8_fast_is_refused_on_cpu_with_the_reason(tiny_dit_file):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(PluginUnavailableError, match="compute capability 8.9"):
        load_dit(tiny_dit_file, num_heads=2, quant=resolve_quantizer("fp8_fast", target="dit"))


@pytest.mark.cuda
def test_fp8_fast_dit_on_cuda(cuda_device, tiny_dit_file, tiny_dit_reference, dit_inputs):
    from wan_quant_fp8.scaled_mm import scaled_mm_unavailable_reason

    reason = scaled_mm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    model = load_dit(tiny_dit_file, num_heads=2, dtype="bfloat16", quant=resolve_quantizer("fp8_fast", target="dit"), device=cuda_device)
    assert model.blocks[0].ffn[0].weight.device.type == "cuda"
    x, t, context = dit_inputs
    with torch.no_grad():
        out = model(x.to(cuda_device), t.to(cuda_device), [c.to(cuda_device) for c in context]).cpu()
    assert relative_error(out, tiny_dit_reference) < 0.03


@pytest.mark.parametrize("mode", ["fp8", "fp8_scaled"])
def test_contract_loader_takes_the_plugin_name(tiny_dit_file, dit_inputs, mode):
    """CONTRACT.md: ``wan_kernel.models.load_dit(path, quant="fp8_scaled")`` resolves the name through
    the installed plugins and gives the model that loading with the resolved object gives."""
    from wan_kernel import models

    by_name = models.load_dit(tiny_dit_file, dtype="float32", quant=mode)
    by_object = load_dit(tiny_dit_file, dtype="float32", quant=QUANTIZERS[mode])
    assert any(isinstance(m, Fp8Linear) for m in by_name.modules())
    torch.testing.assert_close(_run(by_name, dit_inputs), _run(by_object, dit_inputs), rtol=0, atol=0)


def test_contract_loader_names_an_unknown_quantizer(tiny_dit_file):
    from wan_kernel import models
    from wan_kernel.errors import PluginError

    with pytest.raises(PluginError, match="fp9"):
        models.load_dit(tiny_dit_file, quant="fp9")
