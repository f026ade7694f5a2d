"""The shared weight-file reader: formats, memory mapping, and a clear error for every bad file."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from wan_kernel.errors import WeightsError
from wan_kernel.models.weights import (
    config_beside,
    dequantize_fp8_weight,
    fold_fp8_scales,
    fp8_weight_scale,
    float_elements_by_dtype,
    guess_model_kind,
    key_mismatch,
    load_pth,
    load_safetensors,
    load_state_dict,
    read_safetensors_metadata,
    strip_prefix,
)


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, generator=g).half(),
        "d.fp8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
        "e.int": torch.arange(3),
    }


def assert_same(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key].float(), want[key].float()), key


def test_safetensors_round_trip_every_dtype_and_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tensors(), path, metadata={"format": "pt", "note": "hi"})
    assert_same(load_safetensors(path), tensors())
    assert_same(load_safetensors(path, mmap=False), tensors())
    assert read_safetensors_metadata(path)["note"] == "hi"


def test_safetensors_tensors_are_views_of_one_mapping(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tensors(), path)
    loaded = load_safetensors(path)
    storages = {t.untyped_storage().data_ptr() for t in loaded.values() if t.numel()}
    assert len(storages) == 1  # no per-tensor copies


def test_truncated_safetensors_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(WeightsError, match="truncated"):
        load_state_dict(path)


@pytest.mark.parametrize("content", [b"", b"1234", b"\xff" * 64, (20).to_bytes(8, "little") + b"{not json" + b" " * 20])
def test_garbage_is_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="safetensors"):
        load_state_dict(path)


def test_pth_loads_plain_and_nested_state_dicts(tmp_path):
    plain, nested = tmp_path / "plain.pth", tmp_path / "nested.pt"
    torch.save(tensors(), plain)
    torch.save({"state_dict": tensors(), "epoch": 3}, nested)
    assert_same(load_state_dict(plain), tensors())
    assert_same(load_pth(nested), tensors())


class RunsCode:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": RunsCode()}, path)
    with pytest.raises(WeightsError, match="refused to load"):
        load_state_dict(path)
    assert "this pickle runs code" not in capsys.readouterr().out


def test_pth_without_tensors_and_corrupt_pth(tmp_path):
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(WeightsError, match="no tensors"):
        load_state_dict(empty)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(pickle.dumps([1, 2])[:3])
    with pytest.raises(WeightsError, match="corrupt.pth"):
        load_state_dict(corrupt)


def test_sharded_folder_with_and_without_index(tmp_path):
    t = tensors()
    first = {k: t[k] for k in ("a.weight", "b.bias")}
    second = {k: t[k] for k in ("c.half", "d.fp8", "e.int")}
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    assert_same(load_state_dict(tmp_path), t)
    index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in first},
                            **{k: "model-00002-of-00002.safetensors" for k in second}}}  # fmt: skip
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same(load_state_dict(tmp_path), t)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing: model-00002-of-00002"):
        load_state_dict(tmp_path)


def test_a_tensor_in_two_shards_is_an_error(tmp_path):
    save_file({"x": torch.zeros(1)}, tmp_path / "a.safetensors")
    save_file({"x": torch.ones(1)}, tmp_path / "b.safetensors")
    with pytest.raises(WeightsError, match="also present in another shard: x"):
        load_state_dict(tmp_path)


def test_missing_paths_empty_folders_and_odd_suffixes(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict(tmp_path / "nope.safetensors", what="DiT")
    with pytest.raises(WeightsError, match="holds no .safetensors"):
        load_state_dict(tmp_path)
    odd = tmp_path / "model.gguf"
    odd.write_bytes(b"GGUF")
    with pytest.raises(WeightsError, match="unsupported weight file type"):
        load_state_dict(odd)


def test_strip_prefix_and_config_beside(tmp_path):
    state = {"model.diffusion_model.a": 1, "model.diffusion_model.b": 2}
    assert strip_prefix(state, ("model.diffusion_model.", "diffusion_model.")) == {"a": 1, "b": 2}
    assert strip_prefix({"a": 1}, ("x.",)) == {"a": 1}
    weights = tmp_path / "w.safetensors"
    assert config_beside(weights) is None
    (tmp_path / "config.json").write_text('{"num_heads": 12}')
    assert config_beside(weights) == {"num_heads": 12}
    assert config_beside(tmp_path) == {"num_heads": 12}
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(WeightsError, match="not valid JSON"):
        config_beside(weights)


@pytest.mark.parametrize(
    "keys, kind",
    [
        (["blocks.0.self_attn.q.weight"], "a Wan DiT"),
        (["encoder.conv1.weight", "decoder.conv1.weight"], "a Wan VAE"),
        (["token_embedding.weight", "blocks.0.attn.q.weight"], "a T5 text encoder"),
        (["visual.patch_embedding.weight"], "a CLIP model"),
        (["lora_unet_blocks_0_self_attn_q.lora_down.weight"], "a LoRA file"),
        (["something.else"], "an unrecognised model"),
    ],
)
def test_guess_model_kind(keys, kind):
    assert guess_model_kind(keys) == kind


def test_key_mismatch_and_float_elements_by_dtype():
    expected = {"a.weight": 0, "b.weight": 0, "c.bias": 0}
    assert key_mismatch(expected, ["a.weight", "b.weight", "c.bias"]) == ""
    assert key_mismatch(expected, ["a.weight", "z.extra"]) == "missing b.weight, c.bias; unexpected z.extra"
    assert key_mismatch(expected, ["a.weight", "z.extra"], missing_only=True) == "missing b.weight, c.bias"
    assert key_mismatch(expected, [*expected, "z.extra"], missing_only=True) == ""
    assert float_elements_by_dtype(tensors()) == {
        torch.float32: 12,
        torch.bfloat16: 5,
        torch.float16: 4,
        torch.float8_e4m3fn: 8,
    }


# ---- scaled fp8 -----------------------------------------------------------------------------


def _fp8_weight() -> torch.Tensor:
    """A [6, 8] fp8 weight whose rows and 4-input blocks differ (so a mixed-up layout shows)."""
    g = torch.Generator().manual_seed(1)
    return (torch.randn(6, 8, generator=g) * 100).to(torch.float8_e4m3fn)


@pytest.mark.parametrize(
    "layout, scale",
    [
        ("scalar", torch.tensor(0.5)),
        ("tensor", torch.tensor([0.25])),
        ("channel", torch.arange(1, 7, dtype=torch.float32).reshape(6, 1) / 8),
        ("channel_1d", torch.arange(1, 7, dtype=torch.float32) / 8),
        ("block", torch.arange(1, 13, dtype=torch.float32).reshape(6, 2, 1) / 16),
        ("block_flat", torch.arange(1, 13, dtype=torch.float32).reshape(6, 2) / 16),
    ],
)
def test_dequantize_fp8_weight_every_scale_layout(layout, scale):
    q = _fp8_weight()
    w = q.float()
    if scale.numel() == 12:  # one scale per 4 inputs of a row: element [o, i] uses scale[o, i // 4]
        by_hand = w * scale.reshape(6, 2).repeat_interleave(4, dim=1)
    elif scale.numel() == 6:
        by_hand = w * scale.reshape(6, 1)
    else:
        by_hand = w * scale.item()
    got = dequantize_fp8_weight(q, scale, dtype=torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, by_hand)
    assert torch.equal(dequantize_fp8_weight(q, scale, dtype=torch.bfloat16), by_hand.to(torch.bfloat16))


def test_dequantize_fp8_weight_without_scale_and_per_channel_conv():
    q = _fp8_weight()
    assert torch.equal(dequantize_fp8_weight(q, None, dtype=torch.float32), q.float())
    conv = q.reshape(6, 2, 2, 2)  # [out, in, kh, kw]: per output channel only
    scale = torch.arange(1, 7, dtype=torch.float32).reshape(6, 1, 1, 1)
    assert torch.equal(dequantize_fp8_weight(conv, scale, dtype=torch.float32), conv.float() * scale)


def test_dequantize_fp8_weight_refuses_a_scale_that_does_not_fit():
    with pytest.raises(WeightsError, match=r"^layer\.weight: its scale_weight of shape \[6, 3, 1\]"):
        dequantize_fp8_weight(_fp8_weight(), torch.ones(6, 3, 1), dtype=torch.float32, name="layer.weight")
    with pytest.raises(WeightsError, match=r"scale_weight of shape \[4\]"):
        dequantize_fp8_weight(_fp8_weight(), torch.ones(4), dtype=torch.float32)


def test_two_level_scale_and_fold():
    """musubi's ``scale_weight_tensor`` multiplies the block scales; ComfyUI's extra keys are dropped."""
    q = _fp8_weight()
    block = torch.rand(6, 2, 1, generator=torch.Generator().manual_seed(2)) + 0.5
    sd = {
        "a.weight": q,
        "a.scale_weight": block,
        "a.scale_weight_tensor": torch.tensor([0.125]),
        "b.weight": q,
        "b.scale_weight": torch.tensor(2.0),
        "b.scale_input": torch.tensor(1.0),
        "b.bias": torch.ones(6),
        "c.weight": q,  # fp8 without a scale: left as it is
        "scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn),
    }
    total = fp8_weight_scale(sd, "a")
    assert torch.equal(total, block * 0.125)
    assert fp8_weight_scale(sd, "c") is None and torch.equal(fp8_weight_scale(sd, "b"), sd["b.scale_weight"])
    folded = fold_fp8_scales(sd, {"b.weight": torch.float16}, torch.float32)
    assert folded.keys() == {"a.weight", "b.weight", "b.bias", "c.weight"}
    assert torch.equal(folded["a.weight"], dequantize_fp8_weight(q, block * 0.125, dtype=torch.float32))
    assert folded["b.weight"].dtype == torch.float16
    assert torch.equal(folded["b.weight"], (q.float() * 2).half())
    assert folded["c.weight"] is q and folded["b.bias"] is sd["b.bias"]
    assert sd["a.weight"] is q and "a.scale_weight" in sd  # the input is not modified
    with pytest.raises(WeightsError, match=r"a\.scale_weight_tensor has shape \[2\]; expected one value"):
        fp8_weight_scale({**sd, "a.scale_weight_tensor": torch.ones(2)}, "a")
