"""umt5 text encoder and tokenizers against the official Wan2.1 reference (tiny random-weight model)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from wan_kernel.errors import InputError, WeightsError
from wan_kernel.interfaces import Quantizer
from wan_kernel.models.t5 import encode_prompts, load_t5
from wan_kernel.models.tokenizer import ByteTokenizer, clean_prompt, load_tokenizer
from wan_kernel.pipelines.plugin_setup import resolve_quantizer
from wan_kernel.plugins import get_plugin_manager
from wan_kernel.testing import REFERENCE_FIXTURES, read_reference_case

FIXTURES = REFERENCE_FIXTURES
CASE = FIXTURES / "t5"
pytestmark = pytest.mark.skipif(not CASE.is_dir(), reason=f"reference fixtures not found at {FIXTURES}")

# bf16 vs the float32 reference, over real (unpadded) tokens; measured: max 0.077, rel. rms 0.018
BF16_MAX_ABS = 0.25
BF16_REL_RMS = 0.05


@pytest.fixture(scope="module")
def case():
    return read_reference_case(CASE)


@pytest.fixture(scope="module")
def t5():
    return load_t5(CASE / "weights.safetensors")


def assert_close(actual, name, case):
    meta, tensors = case
    tol = meta["tolerance"]["per_output"][name]
    expected = tensors[name]
    assert actual.shape == expected.shape, name
    torch.testing.assert_close(actual.float(), expected, atol=tol["atol"], rtol=tol["rtol"], msg=name)


def test_config_read_off_the_weights(t5):
    cfg = t5.config
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads) == (
        256,
        32,
        8,
        64,
        2,
        4,
    )
    assert cfg.relative_attention_num_buckets == 32 and cfg.relative_attention_max_distance == 128
    assert cfg.dense_act_fn == "gelu_new" and cfg.is_gated_act
    # every block owns its relative position table (umt5, shared_pos=False)
    tables = [b.layer[0].SelfAttention.relative_attention_bias.weight for b in t5.encoder.block]
    assert len(tables) == 2 and not torch.equal(tables[0], tables[1])


def test_hidden_matches_official(t5, case):
    _, tensors = case
    out = t5(tensors["ids"], tensors["mask"])
    assert_close(out.last_hidden_state, "hidden", case)


class FixedTokenizer:
    """Returns the fixture's ids/mask, like the oracle's replaced tokenizer; records the call."""

    def __init__(self, ids, mask):
        self.ids, self.mask, self.calls = ids, mask, []

    def __call__(self, texts, **kwargs):
        self.calls.append((texts, kwargs))
        return {"input_ids": self.ids, "attention_mask": self.mask}


def test_context_via_encode_prompts(t5, case):
    _, tensors = case
    tok = FixedTokenizer(tensors["ids"], tensors["mask"])
    context = encode_prompts(t5, tok, ["a  cat\n sits", "dog"], "cpu", seq_len=16)
    assert tok.calls[0][0] == ["a cat sits", "dog"]
    assert tok.calls[0][1]["max_length"] == 16 and tok.calls[0][1]["padding"] == "max_length"
    assert [c.shape[0] for c in context] == [11, 6]
    assert_close(context[0], "context_0", case)
    assert_close(context[1], "context_1", case)


def official_bucket(rel_pos: torch.Tensor, num_buckets=32, max_dist=128) -> torch.Tensor:
    """Bidirectional bucket as case.json describes the official float32 computation."""
    half = num_buckets // 2
    exact = half // 2
    bucket = (rel_pos > 0).long() * half
    d = rel_pos.abs()
    large = exact + (torch.log(d.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    large = torch.clamp(large, max=half - 1)
    return bucket + torch.where(d < exact, d, large)


def test_relative_buckets_match_official_float32(t5):
    attn = t5.encoder.block[0].layer[0].SelfAttention
    rel = torch.arange(-1100, 1100)
    ours = attn._relative_position_bucket(rel)
    torch.testing.assert_close(ours, official_bucket(rel), rtol=0, atol=0)
    # the boundaries the notes call out: d = 16 -> 10 (after the query), 32, 64, and the cap at 128
    assert ours[1100 + 16].item() == 16 + 10 and ours[1100 - 16].item() == 10
    assert ours[1100 + 7].item() == 16 + 7 and ours[1100 + 8].item() == 16 + 8
    assert ours[1100 + 128].item() == 31 and ours[1100 - 1000].item() == 15


def _hf_state(t5) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in t5.state_dict().items()}
    state.pop("encoder.embed_tokens.weight")  # tied to shared.weight
    return state


def test_hf_layout_resave_loads_and_matches(t5, case, tmp_path):
    _, tensors = case
    state = _hf_state(t5)
    save_file(state, tmp_path / "hf.safetensors")
    # without the "encoder." prefix and with the embedding under embed_tokens, as some exports do
    bare = {
        ("embed_tokens.weight" if k == "shared.weight" else k.removeprefix("encoder.")): v
        for k, v in state.items()
    }
    save_file(bare, tmp_path / "bare.safetensors")
    # a full T5 with decoder tensors and an outer prefix: the decoder is ignored
    full = {f"text_encoder.{k}": v for k, v in state.items()}
    full["text_encoder.decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(32, 32)
    save_file(full, tmp_path / "full.safetensors")
    for name in ("hf", "bare", "full"):
        model = load_t5(tmp_path / f"{name}.safetensors")
        assert_close(model(tensors["ids"], tensors["mask"]).last_hidden_state, "hidden", case)


def test_official_pth_loads(case, tmp_path):
    _, tensors = case
    torch.save(load_file(CASE / "weights.safetensors"), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    model = load_t5(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    assert_close(model(tensors["ids"], tensors["mask"]).last_hidden_state, "hidden", case)


def test_comfyui_scaled_fp8_is_dequantized(t5, tmp_path):
    state = _hf_state(t5)
    stored = {}
    for key, value in state.items():
        if key.endswith(("q.weight", "wi_0.weight", "wo.weight")):
            scale = value.abs().max() / 448.0
            stored[key] = (value / scale).to(torch.float8_e4m3fn)
            stored[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            stored[key] = value
    stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(stored, tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    model = load_t5(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", dtype=torch.float32)
    key = "encoder.block.1.layer.0.SelfAttention.q.weight"
    expected = stored[key].float() * stored[key.removesuffix("weight") + "scale_weight"]
    torch.testing.assert_close(model.state_dict()[key], expected, rtol=0, atol=0)
    assert load_t5(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors").dtype == torch.bfloat16


def test_bf16_within_documented_bound(case):
    _, tensors = case
    model = load_t5(CASE / "weights.safetensors", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    hidden = model(tensors["ids"], tensors["mask"]).last_hidden_state.float()
    real = tensors["mask"].bool()
    err = (hidden - tensors["hidden"])[real]
    assert err.abs().max() < BF16_MAX_ABS
    assert err.pow(2).mean().sqrt() / tensors["hidden"][real].pow(2).mean().sqrt() < BF16_REL_RMS


# ---- the quantization seam ------------------------------------------------------------------


def _rel_err(hidden: torch.Tensor, tensors: dict) -> float:
    real = tensors["mask"].bool()
    err = (hidden.float() - tensors["hidden"])[real]
    return float(err.pow(2).mean().sqrt() / tensors["hidden"][real].pow(2).mean().sqrt())


def assert_tied(model) -> None:
    """One embedding Parameter under both names, as transformers ties them."""
    assert model.shared.weight is model.encoder.embed_tokens.weight


def test_loaded_embedding_is_tied():
    model = load_t5(CASE / "weights.safetensors", dtype=torch.bfloat16)
    assert_tied(model)
    model.half()  # converted once, and still one tensor (not one copy per name)
    assert_tied(model)
    assert model.encoder.embed_tokens.weight.dtype == torch.float16


class _Int8Linear(torch.nn.Module):
    """A toy weight-only int8 Linear (no bias, as in T5): ``weight`` int8, per-row ``scale``."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        out_f, in_f = linear.weight.shape
        self.register_buffer(
            "weight", torch.empty(out_f, in_f, dtype=torch.int8, device=linear.weight.device)
        )
        self.register_buffer("scale", torch.empty(out_f, 1, dtype=torch.float32, device=linear.weight.device))

    def forward(self, x):
        return x @ (self.weight.float() * self.scale).to(x.dtype).T


class FakeT5Int8(Quantizer):
    """A quantizer object (no plugin): int8 feed-forward output projections of the T5."""

    name = "fake_t5_int8"
    supported_targets = ("t5",)

    def __init__(self):
        self.calls: list[tuple] = []

    def convert_for_runtime(self, model, *, target):
        self.calls.append(("convert", target, model.shared.weight.device.type, model.dtype))
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo = _Int8Linear(block.layer[1].DenseReluDense.wo)
        return model

    def quantize_state_dict(self, state_dict, *, target, device="cpu"):
        self.calls.append(("quantize", target, str(device)))
        for key in [k for k in state_dict if k.endswith("DenseReluDense.wo.weight")]:
            w = state_dict[key].float()
            scale = w.abs().amax(dim=1, keepdim=True) / 127
            state_dict[key] = torch.round(w / scale).to(torch.int8)
            state_dict[key.removesuffix("weight") + "scale"] = scale
        return state_dict


def test_quantizer_object_and_plugin_manager(case):
    import types

    from wan_kernel import hookimpl
    from wan_kernel.plugins import PluginManager

    _, tensors = case
    quantizer = FakeT5Int8()
    model = load_t5(CASE / "weights.safetensors", dtype=torch.bfloat16, quant=quantizer)
    assert quantizer.calls == [("convert", "t5", "meta", torch.bfloat16), ("quantize", "t5", "cpu")]
    wo = model.encoder.block[1].layer[1].DenseReluDense.wo
    assert isinstance(wo, _Int8Linear) and wo.weight.dtype == torch.int8 and wo.scale.dtype == torch.float32
    assert model.shared.weight.dtype == torch.bfloat16
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()  # still tied
    hidden = model(tensors["ids"], tensors["mask"]).last_hidden_state
    assert _rel_err(hidden, tensors) < BF16_REL_RMS

    module = types.ModuleType("fake_t5_quant_plugin")
    by_name = FakeT5Int8()

    @hookimpl
    def wan_register_quantization(register):
        register(by_name)

    module.wan_register_quantization = wan_register_quantization
    pm = PluginManager(load_entry_points=False, extra_plugins=[("fake", module)], environ={})
    load_t5(CASE / "weights.safetensors", quant=resolve_quantizer("fake_t5_int8", target="t5", manager=pm))
    assert [c[0] for c in by_name.calls] == ["convert", "quantize"]


def test_quantizer_for_the_dit_is_refused():
    dit_only = FakeT5Int8()
    dit_only.supported_targets = ("dit",)
    with pytest.raises(InputError, match="not the T5 text encoder; use fp8_t5 for the text encoder"):
        load_t5(CASE / "weights.safetensors", quant=dit_only)
    assert dit_only.calls == []  # refused before anything was read or built
    with pytest.raises(InputError, match="quant must be"):
        load_t5(CASE / "weights.safetensors", quant=42)
    if "fp8_scaled" in get_plugin_manager().names("quantization"):
        with pytest.raises(InputError, match="use fp8_t5"):
            resolve_quantizer("fp8_scaled", target="t5")  # refused when resolved, before any load


def test_wrong_file_says_what_it_looks_like():
    with pytest.raises(WeightsError, match="not a umt5 text encoder.*Wan DiT"):
        load_t5(FIXTURES / "dit_t2v" / "weights.safetensors")
    with pytest.raises(WeightsError, match="CLIP"):
        load_t5(FIXTURES / "clip_visual" / "weights.safetensors")
    with pytest.raises(WeightsError, match="not found"):
        load_t5(CASE / "missing.safetensors")


def test_t5_v11_layout_is_refused(t5, tmp_path):
    state = _hf_state(t5)
    state.pop("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight")
    save_file(state, tmp_path / "t5v11.safetensors")
    with pytest.raises(WeightsError, match="T5 v1.1"):
        load_t5(tmp_path / "t5v11.safetensors")


# ---- tokenizers -------------------------------------------------------------------------------


def test_builtin_tokenizer_pads_and_truncates_with_eos():
    tok = load_tokenizer("builtin:bytes")
    assert isinstance(tok, ByteTokenizer) and (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    batch = tok(["ab", "x" * 20], padding="max_length", truncation=True, max_length=6, return_tensors="pt")
    assert batch.input_ids.tolist() == [[ord("a") + 2, ord("b") + 2, 1, 0, 0, 0], [ord("x") + 2] * 5 + [1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch.input_ids.dtype == torch.int64
    assert tok.decode(tok("héllo")["input_ids"][0]) == "héllo"


def test_encode_prompts_with_builtin_tokenizer(t5):
    tok = load_tokenizer("builtin:bytes")
    context = encode_prompts(t5, tok, ["a red fox", "sky"], seq_len=16)
    assert [c.shape for c in context] == [torch.Size([10, 32]), torch.Size([4, 32])]
    long = encode_prompts(t5, tok, "z" * 40, seq_len=16)
    assert long[0].shape == (16, 32)
    bad = FixedTokenizer(torch.tensor([[300, 1, 0, 0]]), torch.tensor([[1, 1, 0, 0]]))
    with pytest.raises(InputError, match="token embeddings"):
        encode_prompts(t5, bad, "x", seq_len=4)
    with pytest.raises(InputError):
        encode_prompts(t5, tok, [], seq_len=16)


def test_clean_prompt_matches_official_whitespace_cleaning():
    assert clean_prompt("  a&amp;amp;b \n\t c  ") == "a&b c"


def test_offline_tokenizer_failure_gives_guidance(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="--t5_tokenizer") as info:
        load_tokenizer("wan-tests/no-such-tokenizer-in-cache")
    assert "offline" in str(info.value)
    with pytest.raises(WeightsError, match="not found"):
        load_tokenizer("./no/such/folder")
    with pytest.raises(InputError, match="builtin:bytes"):
        load_tokenizer("builtin:nope")


def test_local_tokenizer_folder_loads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    batch = tok(["a cat"], padding="max_length", truncation=True, max_length=5, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[3, 4, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0]]


@pytest.mark.cuda
def test_cuda_float32_and_bf16(case):
    _, tensors = case
    ids, mask = tensors["ids"].cuda(), tensors["mask"].cuda()
    real = tensors["mask"].bool()
    model = load_t5(CASE / "weights.safetensors", device="cuda")
    hidden = model(ids, mask).last_hidden_state.cpu()
    torch.testing.assert_close(hidden, tensors["hidden"], atol=1e-3, rtol=1e-3)  # other kernels, same math
    model = load_t5(CASE / "weights.safetensors", device="cuda", dtype=torch.bfloat16)
    err = (model(ids, mask).last_hidden_state.float().cpu() - tensors["hidden"])[real]
    assert err.abs().max() < BF16_MAX_ABS
