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
    guess_model_kind,
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
