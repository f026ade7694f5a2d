"""The generation pipeline on the tiny demo models: outputs, seeds, CFG schedules, plugins, modes."""

from __future__ import annotations

import types

import pytest
import torch

from wan_kernel import hookimpl
from wan_kernel.errors import InputError, UnknownPluginError
from wan_kernel.interfaces import AttentionBackend
from wan_kernel.pipelines.generate import GenerateConfig, GenerationPipeline, ModelInfo, ModelSource
from wan_kernel.pipelines.media import load_latent, read_png_settings, read_video
from wan_kernel.testing import plugin_or_skip, reference_case

SMALL = dict(video_size=(32, 32), video_length=5, infer_steps=2, seed=11, device="cpu")


class CountingDiT(torch.nn.Module):
    """Counts forwards and the contexts they saw; ``zero=True`` predicts zero velocity."""

    def __init__(self, dit, zero: bool = False):
        super().__init__()
        self.dit = dit
        self.zero = zero
        self.calls = 0

    @property
    def blocks(self):
        return self.dit.blocks

    def forward(self, x, t, **kwargs):
        self.calls += 1
        return torch.zeros_like(x) if self.zero else self.dit(x, t, **kwargs)


class SharedDemoModels(ModelSource):
    """The demo models built once per test module and handed out again (counting loads)."""

    def __init__(self, cache: dict, zero_dit: bool = False):
        from wan_kernel.demo import DemoModels

        self.inner = DemoModels()
        self.cache = cache
        self.zero_dit = zero_dit
        self.loads = {"dit": 0, "t5": 0, "vae": 0}
        self.dit: CountingDiT | None = None

    def dit_info(self) -> ModelInfo:
        return self.inner.dit_info()

    def _get(self, key, build):
        self.loads[key] += 1
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def load_dit(self, *, device, dtype, attention, quant):
        dit = self._get(
            "dit", lambda: self.inner.load_dit(device=device, dtype=dtype, attention=attention, quant=quant)
        )
        dit.set_attention(attention)
        self.dit = CountingDiT(dit, zero=self.zero_dit)
        return self.dit

    def load_vae(self, *, device, dtype, cache_device):
        return self._get(
            "vae", lambda: self.inner.load_vae(device=device, dtype=dtype, cache_device=cache_device)
        )

    def load_text_encoder(self, *, device, dtype, quant):
        return self._get("t5", lambda: self.inner.load_text_encoder(device=device, dtype=dtype, quant=quant))

    def load_clip(self, *, device, dtype, attention):
        return self.inner.load_clip(device=device, dtype=dtype, attention=attention)


@pytest.fixture(scope="module")
def model_cache():
    return {}


@pytest.fixture
def make(model_cache, tmp_path):
    """``make(**config) -> (pipeline, models, log)`` on the shared demo models."""

    def build(*, zero_dit=False, plugin_manager=None, keep_models=False, **overrides):
        options = {**SMALL, "prompt": "a red fox", "save_path": str(tmp_path / "out"), **overrides}
        models = SharedDemoModels(model_cache, zero_dit=zero_dit)
        log: list[str] = []
        pipeline = GenerationPipeline(
            GenerateConfig(**options),
            models=models,
            plugin_manager=plugin_manager,
            log=log.append,
            progress=False,
            keep_models=keep_models,
        )
        return pipeline, models, log

    return build


@pytest.mark.parametrize(
    "output_type, suffixes",
    [
        ("video", [".mp4"]),
        ("latent", [".safetensors"]),
        ("both", [".safetensors", ".mp4"]),
        ("images", [""]),
        ("latent_images", [".safetensors", ""]),
    ],
)
def test_output_types_write_what_they_name(make, output_type, suffixes):
    pipeline, _, _ = make(output_type=output_type)
    (result,) = pipeline.run()
    assert [p.suffix for p in result.outputs] == suffixes
    for path in result.outputs:
        if path.suffix == ".mp4":
            frames, fps, meta = read_video(path)
            assert frames.shape == (5, 32, 32, 3) and fps == 16 and meta["seed"] == 11
        elif path.suffix == ".safetensors":
            latent, meta = load_latent(path)
            assert latent.shape == (16, 2, 4, 4) and meta["prompt"] == "a red fox"
        else:
            assert sorted(p.name for p in path.iterdir()) == [f"frame_{i:05d}.png" for i in range(5)]
    assert (result.video is None) == (output_type == "latent")


def test_t2i_writes_one_png_with_its_settings(make, tmp_path):
    pipeline, _, _ = make(task="t2i-14B", video_length=1, save_path=str(tmp_path / "still.png"))
    (result,) = pipeline.run()
    assert result.outputs == [tmp_path / "still.png"]
    assert read_png_settings(result.outputs[0])["video_length"] == 1
    with pytest.raises(InputError, match="single images"):
        make(task="t2i-14B", video_length=5)[0].run()


def test_saved_latent_decodes_to_the_same_video(make, tmp_path):
    pipeline, _, _ = make(output_type="both", save_path=str(tmp_path / "clip.mp4"))
    (first,) = pipeline.run()
    latent_file = tmp_path / "clip.safetensors"
    assert latent_file in first.outputs
    decoder, models, _ = make(latent_path=str(latent_file), save_path=str(tmp_path / "decoded.mp4"))
    (again,) = decoder.run()
    assert models.loads == {"dit": 0, "t5": 0, "vae": 1}  # T5 and DiT never loaded
    assert torch.equal(again.video, first.video)
    frames, fps, meta = read_video(tmp_path / "decoded.mp4")
    assert frames.shape[0] == 5 and fps == 16 and meta["prompt"] == "a red fox"


def test_cfg_schedule_skips_unconditional_forwards(make):
    pipeline, models, _ = make(infer_steps=4, cfg_skip_mode="late", cfg_apply_ratio=0.5)
    (result,) = pipeline.run()
    assert result.cfg_pattern == "AASS"
    assert models.dit.calls == result.model_calls == 4 + 2
    pipeline, models, _ = make(infer_steps=4, guidance_scale=1.0)
    pipeline.run()
    assert models.dit.calls == 4  # no guidance: no unconditional pass at all


def test_noise_is_drawn_from_the_seed_like_the_official_code(make):
    # zero velocity + Euler leaves the sample untouched: the result is the initial noise itself
    pipeline, _, _ = make(zero_dit=True, sample_solver="euler", output_type="latent", seed=1234)
    (result,) = pipeline.run()
    expected = torch.randn(16, 2, 4, 4, generator=torch.Generator("cpu").manual_seed(1234))
    assert torch.equal(result.latent, expected)


def test_same_seed_same_latent_and_random_seed_is_reported(make):
    a = make(output_type="latent")[0].run()[0].latent
    b = make(output_type="latent")[0].run()[0].latent
    assert torch.equal(a, b)
    pipeline, _, log = make(output_type="latent", seed=None)
    (result,) = pipeline.run()
    seed = result.metadata["seed"]
    assert 0 <= seed < 2**32 and any(f"seed {seed}" in line for line in log)
    assert load_latent(result.outputs[0])[1]["seed"] == seed


def test_prompt_lines_override_settings_and_models_stay_loaded_when_asked(make):
    from wan_kernel.pipelines.prompts import parse_prompt_line

    pipeline, models, _ = make(keep_models=True)
    first = pipeline.run([parse_prompt_line("one --w 48 --h 32 --d 5", line_number=1)])
    second = pipeline.run([parse_prompt_line("two --f 9 --s 1", line_number=2)])
    assert first[0].video.shape == (3, 5, 32, 48) and first[0].request.seed == 5
    assert second[0].video.shape == (3, 9, 32, 32) and second[0].request.steps == 1
    assert models.loads == {"dit": 1, "t5": 1, "vae": 1}
    assert len({p.name for r in first + second for p in r.outputs}) == 2


def test_stage_summary_reports_time_and_memory(make):
    pipeline, _, _ = make()
    pipeline.run()
    assert [s.name for s in pipeline.stages] == ["text encoder", "denoise", "decode"]
    assert all(s.seconds > 0 and s.peak_bytes > 0 for s in pipeline.stages)
    assert "peak process memory" in pipeline.summary()


class CountingAttention(AttentionBackend):
    name = "counting_attention"
    description = "test backend: counts calls, computes with SDPA"

    def __init__(self):
        self.calls = 0

    def __call__(self, q, k, v, k_lens=None):
        self.calls += 1
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return out.transpose(1, 2).to(q.dtype)


def test_a_third_party_attention_plugin_selected_by_name_is_the_one_called(make):
    from wan_kernel.plugins import PluginManager

    backend = CountingAttention()
    plugin = types.ModuleType("fake_attention_plugin")

    @hookimpl
    def wan_register_attention(register):
        register(backend)

    plugin.wan_register_attention = wan_register_attention
    manager = PluginManager(extra_plugins=[("fake_attention_plugin", plugin)])
    pipeline, _, _ = make(attn="counting_attention", plugin_manager=manager, output_type="latent")
    pipeline.run()
    layers = 2 * 2  # 2 blocks x (self + cross attention)
    assert backend.calls == 1 + layers * 2 * 2  # the set-up probe, then x 2 steps x (cond + uncond)
    with pytest.raises(UnknownPluginError, match="counting_attention"):
        make(attn="counting_attention", output_type="latent")[0].setup()  # not in the default manager


def test_bad_requests_are_input_errors(make, tmp_path):
    cases = [
        (dict(video_size=(30, 32)), "multiples of 16"),
        (dict(video_length=6), "4n\\+1"),
        (dict(trim_tail_frames=5), "would remove all"),
        (dict(image_path=str(tmp_path / "x.png")), "need an image-to-video DiT"),
        (dict(cfg_apply_ratio=1.5), "cfg_apply_ratio"),
        (dict(blocks_to_swap=1), "needs a CUDA device"),
        (dict(prompt=None), "no prompt"),
    ]
    for overrides, message in cases:
        with pytest.raises(InputError, match=message):
            make(**overrides)[0].run()
    assert not (tmp_path / "out").exists()


FIXTURE_DIT = reference_case("dit_t2v") / "weights.safetensors"


@pytest.mark.skipif(not FIXTURE_DIT.is_file(), reason="reference fixtures not found")
@pytest.mark.parametrize("quant", [None, "fp8_scaled"])
def test_lora_weights_reach_the_dit_as_load_dit_merges_them(tmp_path, quant):
    """--lora_weight with the file models: the DiT the pipeline builds is load_dit(state_dict_transform=LoraMerge)
    (merged before the quantizer with --quant), and one summary line per LoRA is logged."""
    if quant is not None:
        plugin_or_skip("quantization", quant)
    from safetensors.torch import save_file

    from wan_kernel.lora import LoraMerge
    from wan_kernel.models.dit_loading import load_dit
    from wan_kernel.pipelines.plugin_setup import resolve_quantizer

    gen = torch.Generator().manual_seed(0)
    lora = {
        "lora_unet_blocks_1_ffn_0.lora_down.weight": torch.randn(4, 64, generator=gen) * 0.1,
        "lora_unet_blocks_1_ffn_0.lora_up.weight": torch.randn(128, 4, generator=gen) * 0.1,
    }
    save_file(lora, tmp_path / "lora.safetensors")
    lines: list[str] = []
    config = GenerateConfig(
        dit=str(FIXTURE_DIT), t5=str(FIXTURE_DIT), output_type="latent", device="cpu", quant=quant,
        dit_dtype="float32", lora_weights=[str(tmp_path / "lora.safetensors")], lora_multipliers=[0.5],
    )  # fmt: skip
    pipeline = GenerationPipeline(config, log=lines.append).setup()
    got = pipeline.build_dit().state_dict()
    specs = [{"path": tmp_path / "lora.safetensors", "multiplier": 0.5}]
    quantizer = resolve_quantizer(quant, target="dit")
    merge = LoraMerge(specs)
    want = load_dit(FIXTURE_DIT, dtype=torch.float32, quant=quantizer, state_dict_transform=merge).state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key].float(), want[key].float()), key
    assert sum("lora.safetensors" in line and "merged into 1 module" in line for line in lines) == 1
