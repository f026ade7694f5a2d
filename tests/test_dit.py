"""The Wan2.1 DiT module against the official code's golden tensors, diffusers, and itself.

bf16 bound (``test_bf16_close_to_float32_reference``): with the weights cast to bfloat16 (the
modulation tables stay float32) the output of the fixture models differs from the official
float32 output by at most ``BF16_RMS_REL`` = 1.2% of the output's RMS in RMS and ``BF16_MAX_REL``
= 2% of its largest magnitude at any element. Measured: 0.36% / 0.48% (t2v), 0.43% / 0.44% (i2v),
i.e. about one bfloat16 rounding step (2^-8 = 0.39%) of accumulated error.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from wan_kernel.errors import InputError
from wan_kernel.models.dit import WanDiT, rope_tables, sinusoidal_embedding
from wan_kernel.models.dit_config import PRESETS, DiTConfig, infer_dit_config
from wan_kernel.testing.attention import reference_attention
from wan_kernel.models.attention import sdpa_attention
from wan_kernel.testing import REFERENCE_FIXTURES, randomize_weights, read_reference_case

FIXTURES = REFERENCE_FIXTURES
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"reference fixtures not found at {FIXTURES}"
)

BF16_RMS_REL = 0.012
BF16_MAX_REL = 0.02

ATTENTIONS = {"sdpa": sdpa_attention, "reference": reference_attention}


def tiny_config(model_type: str = "t2v", **overrides) -> DiTConfig:
    base = {
        "model_type": model_type,
        "dim": 32,
        "ffn_dim": 48,
        "num_heads": 2,
        "num_layers": 2,
        "in_dim": 16 if model_type == "t2v" else 36,
        "text_dim": 24,
    }
    base.update(overrides)
    return DiTConfig(**base)


def load_case(name: str):
    case, tensors = read_reference_case(name)
    weights = load_file(FIXTURES / name / "weights.safetensors")
    config = infer_dit_config(weights, config_json=json.loads((FIXTURES / name / "config.json").read_text()))
    return case, tensors, weights, config


def fixture_model(name: str, attention=None) -> tuple[WanDiT, dict, dict]:
    case, tensors, weights, config = load_case(name)
    model = WanDiT(config, attention=attention or sdpa_attention)
    model.load_state_dict(weights, strict=True)
    return model.eval(), case, tensors


def assert_case_close(actual: torch.Tensor, expected: torch.Tensor, case: dict, output: str) -> None:
    tol = case["tolerance"]["per_output"][output]
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=tol["atol"], rtol=tol["rtol"]), (
        f"{output}: max |err| {err:.3g} > atol {tol['atol']}"
    )


def run_case(model: WanDiT, tensors: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(
            tensors["x"],
            tensors["t"],
            list(tensors["context"]),
            clip_fea=tensors.get("clip_fea"),
            y=tensors.get("y"),
            **kwargs,
        )


# --------------------------------------------------------------------------------------------
# parity with the official code
# --------------------------------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_t2v_matches_official(attention):
    model, case, tensors = fixture_model("dit_t2v", ATTENTIONS[attention])
    assert_case_close(run_case(model, tensors), tensors["out"], case, "out")
    # the official seq_len padding path: padded keys masked (k_lens), padded rows dropped
    assert_case_close(run_case(model, tensors, seq_len=80), tensors["out_padded"], case, "out_padded")


@needs_fixtures
@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_i2v_matches_official(attention):
    model, case, tensors = fixture_model("dit_i2v", ATTENTIONS[attention])
    assert_case_close(run_case(model, tensors), tensors["out"], case, "out")


@needs_fixtures
@pytest.mark.parametrize("name", ["dit_t2v", "dit_i2v"])
def test_bf16_close_to_float32_reference(name):
    from wan_kernel.models.dit_loading import load_dit

    model = load_dit(FIXTURES / name / "weights.safetensors", dtype=torch.bfloat16, attention=sdpa_attention)
    assert model.compute_dtype == torch.bfloat16 and model.blocks[0].modulation.dtype == torch.float32
    _, tensors = load_case(name)[:2]
    out = run_case(model, tensors)
    expected = tensors["out"]
    assert out.dtype == torch.float32
    err = out - expected
    rms_rel = err.pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    max_rel = err.abs().max() / expected.abs().max()
    assert rms_rel < BF16_RMS_REL, f"bf16 RMS error {rms_rel:.4f} of the output RMS"
    assert max_rel < BF16_MAX_REL, f"bf16 max error {max_rel:.4f} of the largest output"
    assert rms_rel > 1e-4  # it really ran in bfloat16


@needs_fixtures
def test_padded_context_tensor_equals_list():
    model, case, tensors = fixture_model("dit_t2v")
    ctx = tensors["context"]  # [1, 7, 48]
    padded = torch.cat([ctx, torch.zeros(1, 30, ctx.shape[-1])], dim=1)  # zero rows, like a padded batch
    with torch.no_grad():
        out = model(tensors["x"], tensors["t"], padded)
    assert_case_close(out, tensors["out"], case, "out")


# --------------------------------------------------------------------------------------------
# batching, diffusers parity, training
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_batch_of_two_equals_single_runs(model_type):
    torch.manual_seed(0)
    cfg = tiny_config(model_type)
    model = randomize_weights(WanDiT(cfg, attention=sdpa_attention)).eval()
    x = torch.randn(2, 16, 2, 4, 6)
    t = torch.tensor([999.0, 137.5])
    context = [torch.randn(5, cfg.text_dim), torch.randn(11, cfg.text_dim)]  # different lengths
    kw = {}
    if cfg.has_image_input:
        kw = {"clip_fea": torch.randn(2, 257, 1280), "y": torch.randn(2, 20, 2, 4, 6)}
    with torch.no_grad():
        both = model(x, t, context, **kw)
        singles = [
            model(x[i : i + 1], t[i : i + 1], [context[i]], **{k: v[i : i + 1] for k, v in kw.items()})
            for i in range(2)
        ]
    assert both.shape == (2, 16, 2, 4, 6)
    torch.testing.assert_close(both, torch.cat(singles), atol=2e-5, rtol=1e-5)
    assert not torch.allclose(singles[0], singles[1])


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "flf2v"])
def test_matches_diffusers(model_type):
    diffusers = pytest.importorskip("diffusers")
    from wan_kernel.models.dit_keys import diffusers_config, dit_state_dict_to

    cfg = tiny_config(model_type)
    ours = randomize_weights(WanDiT(cfg, attention=sdpa_attention), seed=3).eval()
    theirs = diffusers.WanTransformer3DModel(**diffusers_config(cfg)).eval()
    theirs.load_state_dict(dit_state_dict_to("diffusers", ours.state_dict()), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 4, 6, generator=g)
    t = torch.tensor([421.0])
    ctx = torch.randn(1, 9, cfg.text_dim, generator=g)
    kw, dkw = {}, {}
    y = torch.randn(1, 20, 3, 4, 6, generator=g)
    if model_type != "t2v":
        clip = torch.randn(2 if model_type == "flf2v" else 1, 257, 1280, generator=g)
        kw = {"clip_fea": clip, "y": y}
        dkw = {"encoder_hidden_states_image": clip}
    padded = torch.cat([ctx, torch.zeros(1, 512 - 9, cfg.text_dim)], dim=1)  # diffusers' pipelines pad
    with torch.no_grad():
        out = ours(x, t, [ctx[0]], **kw)
        ref = theirs(
            torch.cat([x, y], dim=1) if model_type != "t2v" else x, t, padded, return_dict=False, **dkw
        )[0]
    torch.testing.assert_close(out, ref.float(), atol=1e-4, rtol=1e-4)


def test_flf2v_runs_with_two_images_per_sample():
    cfg = tiny_config("flf2v")
    model = randomize_weights(WanDiT(cfg, attention=sdpa_attention)).eval()
    assert model.img_emb.emb_pos.shape == (1, 514, 1280)
    b = 2
    x = torch.randn(b, 16, 1, 4, 4)
    y = torch.randn(b, 20, 1, 4, 4)
    clip = torch.randn(2 * b, 257, 1280)  # first, last frame of sample 0, then of sample 1
    ctx = [torch.randn(3, cfg.text_dim)] * b
    with torch.no_grad():
        out = model(x, torch.tensor([500.0, 500.0]), ctx, clip_fea=clip, y=y)
        same = model(x, torch.tensor([500.0, 500.0]), ctx, clip_fea=clip.reshape(b, 514, 1280), y=y)
        swapped = model(x, torch.tensor([500.0, 500.0]), ctx, clip_fea=clip[[1, 0, 2, 3]], y=y)
    assert out.shape == (b, 16, 1, 4, 4) and torch.isfinite(out).all()
    torch.testing.assert_close(out, same)
    # emb_pos tells first from last frame: swapping them changes sample 0 only
    assert not torch.allclose(out[0], swapped[0])
    torch.testing.assert_close(out[1], swapped[1])
    with pytest.raises(InputError, match="2B, 257, 1280"):
        model(x, torch.tensor([500.0, 500.0]), ctx, clip_fea=torch.randn(b, 257, 1280), y=y)


def _grads(model: WanDiT, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.enable_gradient_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 36, 2, 4, 4, generator=g)
    y = x[:, 16:]
    x = x[:, :16].requires_grad_(True)
    ctx = [torch.randn(4, 24, generator=g), torch.randn(6, 24, generator=g)]
    out = model(x, torch.tensor([10.0, 900.0]), ctx, clip_fea=torch.randn(2, 257, 1280, generator=g), y=y)
    loss = (out - torch.randn(out.shape, generator=g)).pow(2).mean()
    loss.backward()
    return x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_backward_with_and_without_checkpointing():
    model = randomize_weights(WanDiT(tiny_config("i2v"), attention=sdpa_attention))
    x_grad, grads = _grads(model, checkpointing=False)
    x_grad_ckpt, grads_ckpt = _grads(model, checkpointing=True)
    assert torch.isfinite(x_grad).all() and x_grad.abs().sum() > 0
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(x_grad_ckpt, x_grad)


# --------------------------------------------------------------------------------------------
# seams: attention, block runner
# --------------------------------------------------------------------------------------------


def test_set_attention_and_k_lens_only_when_padding():
    model = randomize_weights(WanDiT(tiny_config(), attention=sdpa_attention)).eval()
    seen = []

    def spy(q, k, v, k_lens=None):
        seen.append(None if k_lens is None else k_lens.tolist())
        return reference_attention(q, k, v, k_lens)

    x, t, ctx = torch.randn(1, 16, 1, 4, 4), torch.tensor([3.0]), [torch.randn(2, 24)]
    with torch.no_grad():
        base = model(x, t, ctx)
        model.set_attention(spy)
        assert model.attention is spy
        again = model(x, t, ctx)
        assert seen == [None] * 4  # 2 blocks x (self + cross), no mask needed
        seen.clear()
        padded = model(x, t, ctx, seq_len=9)
    assert seen == [[4], None, [4], None]  # self-attention masks the 5 padded keys; cross never masked
    torch.testing.assert_close(again, base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, base, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError):
        model.set_attention("sdpa")


def test_block_runner_drives_the_loop():
    model = randomize_weights(WanDiT(tiny_config(), attention=sdpa_attention)).eval()

    class Runner:
        def __init__(self, blocks):
            self.blocks, self.visits = blocks, []

        def forward_blocks(self):
            for i, block in enumerate(self.blocks):
                self.visits.append(i)
                yield block

    x, t, ctx = torch.randn(1, 16, 1, 4, 4), torch.tensor([3.0]), [torch.randn(2, 24)]
    with torch.no_grad():
        base = model(x, t, ctx)
        runner = Runner(model.blocks)
        model.set_block_runner(runner)
        assert model.block_runner is runner
        out = model(x, t, ctx)
    assert runner.visits == [0, 1]
    torch.testing.assert_close(out, base)
    model.set_block_runner(None)
    with pytest.raises(InputError):
        model.set_block_runner(object())


def test_state_dict_has_official_names_and_no_rope_buffer():
    model = WanDiT(tiny_config("i2v"), attention=sdpa_attention)
    keys = set(model.state_dict())
    for key in [
        "patch_embedding.weight",
        "text_embedding.2.bias",
        "time_projection.1.weight",
        "blocks.1.self_attn.norm_q.weight",
        "blocks.0.cross_attn.norm_k_img.weight",
        "blocks.0.cross_attn.k_img.weight",
        "blocks.0.norm3.weight",
        "blocks.0.ffn.2.weight",
        "blocks.0.modulation",
        "head.modulation",
        "head.head.weight",
        "img_emb.proj.4.bias",
    ]:
        assert key in keys, key
    assert not any("freqs" in k or "norm1" in k or "norm2" in k for k in keys)


# --------------------------------------------------------------------------------------------
# pieces and checks
# --------------------------------------------------------------------------------------------


def test_presets():
    assert PRESETS["t2v-1.3B"].dim == 1536 and PRESETS["t2v-1.3B"].num_heads == 12
    assert PRESETS["t2v-1.3B"].num_layers == 30 and PRESETS["t2v-1.3B"].ffn_dim == 8960
    assert PRESETS["t2v-14B"].dim == 5120 and PRESETS["t2v-14B"].ffn_dim == 13824
    assert PRESETS["i2v-14B"].in_dim == 36 and PRESETS["i2v-14B"].model_type == "i2v"
    assert PRESETS["flf2v-14B"].image_tokens == 514
    assert PRESETS["t2i-14B"] == PRESETS["t2v-14B"]
    assert PRESETS["t2v-14B"].rope_dims == (44, 42, 42)
    assert DiTConfig.from_name("t2v-1.3B", num_layers=2).num_layers == 2
    with pytest.raises(InputError, match="unknown DiT preset"):
        DiTConfig.from_name("t2v-5B")


def test_sinusoid_and_rope_tables():
    emb = sinusoidal_embedding(256, torch.tensor([0.0, 1000.0]))
    assert emb.dtype == torch.float64 and emb.shape == (2, 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    cfg = tiny_config(dim=64, num_heads=2)  # head 32: 6/5/5 complex pairs for F/H/W
    cos, sin = rope_tables(cfg, (2, 3, 4), 30, torch.device("cpu"))
    assert cos.shape == (30, 1, 16) and cos.dtype == torch.float32
    # token (f=1, h=2, w=3) is row 1*12 + 2*4 + 3; its W pairs rotate by 3 * theta^(-2i/10)
    angles_w = 3.0 / 10000 ** (torch.arange(0, 10, 2, dtype=torch.float64) / 10)
    torch.testing.assert_close(sin[12 + 8 + 3, 0, 11:], torch.sin(angles_w).float())
    assert torch.equal(cos[24:], torch.ones(6, 1, 16)) and torch.equal(sin[24:], torch.zeros(6, 1, 16))


def test_input_errors():
    model = WanDiT(tiny_config("i2v"), attention=sdpa_attention)
    x, t, ctx = torch.randn(1, 16, 1, 4, 4), torch.tensor([1.0]), [torch.randn(2, 24)]
    y, clip = torch.randn(1, 20, 1, 4, 4), torch.randn(1, 257, 1280)
    with pytest.raises(InputError, match="needs y"):
        model(x, t, ctx, clip_fea=clip)
    with pytest.raises(InputError, match="needs clip_fea"):
        model(x, t, ctx, y=y)
    with pytest.raises(InputError, match="in_dim=36"):
        model(x, t, ctx, clip_fea=clip, y=y[:, :4])
    with pytest.raises(InputError, match="multiple of the patch size"):
        model(torch.randn(1, 16, 1, 5, 4), t, ctx, clip_fea=clip, y=torch.randn(1, 20, 1, 5, 4))
    with pytest.raises(InputError, match="text_len 512"):
        model(x, t, [torch.randn(513, 24)], clip_fea=clip, y=y)
    with pytest.raises(InputError, match="2 samples"):
        model(x, t, ctx * 2, clip_fea=clip, y=y)
    with pytest.raises(InputError, match="t must be"):
        model(x, torch.tensor([1.0, 2.0, 3.0]), ctx, clip_fea=clip, y=y)
    t2v = WanDiT(tiny_config(), attention=sdpa_attention)
    with pytest.raises(InputError, match="text-to-video"):
        t2v(x, t, ctx, clip_fea=clip)
    with pytest.raises(InputError, match="divisible"):
        tiny_config(num_heads=3)
