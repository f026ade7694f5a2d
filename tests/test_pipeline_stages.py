"""The generation stages as public functions: output naming, the DiT source for samples during
training, and the DiT file read once per run."""

from __future__ import annotations

import pytest
import torch

from wan_kernel.demo import DemoModels, build_demo_dit
from wan_kernel.errors import InputError
from wan_kernel.models.attention import sdpa_attention
from wan_kernel.pipelines.config import GenerateConfig
from wan_kernel.pipelines.generate import GenerationPipeline
from wan_kernel.pipelines.model_sources import FileModels, PrebuiltDiT
from wan_kernel.pipelines.outputs import output_base, write_outputs
from wan_kernel.testing import reference_case, skip_without_fixtures

SMALL = dict(video_size=(32, 32), video_length=5, infer_steps=2, seed=11, device="cpu")


# -- output naming ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "save_path, written",
    [
        ("sp/run.v2.mp4", "sp/run.v2.mp4"),
        ("sp/run.mp4", "sp/run.mp4"),
        ("sp/x1.0.mp4", "sp/x1.0.mp4"),
        ("sp/x1.5.MP4", "sp/x1.5.mp4"),
    ],
)
def test_a_named_save_path_keeps_every_dot_of_its_stem(tmp_path, save_path, written):
    base, named = output_base(str(tmp_path / save_path), index=0, seed=1, many=False)
    (path,) = write_outputs(
        base, latent=None, video=torch.zeros(3, 5, 16, 16), output_type="video", metadata=None, fps=16,
        named=named,
    )  # fmt: skip
    assert path == tmp_path / written and path.is_file()


def test_dotted_stems_do_not_overwrite_each_other(tmp_path):
    video = torch.zeros(3, 1, 16, 16)  # one frame: a PNG
    written = []
    for hint in ("x1.0", "x1.5"):
        base, named = output_base(str(tmp_path), index=0, seed=7, many=False, stem_hint=hint)
        written += write_outputs(
            base, latent=torch.zeros(16, 1, 2, 2), video=video, output_type="both", metadata=None, fps=16,
            named=named,
        )  # fmt: skip
    names = sorted(p.name.split("_", 2)[-1] for p in written)  # drop the timestamp and the seed
    assert names == ["x1.0.png", "x1.0_latent.safetensors", "x1.5.png", "x1.5_latent.safetensors"]
    assert len({p for p in written}) == 4 and all(p.is_file() for p in written)


def test_several_requests_get_numbered_names_after_the_dotted_stem(tmp_path):
    bases = [output_base(str(tmp_path / "run.v2.safetensors"), index=i, seed=1, many=True) for i in (0, 1)]
    assert [b.name for b, _ in bases] == ["run.v2_000", "run.v2_001"]
    assert {named for _, named in bases} == {".safetensors"}


# -- an already-built DiT (samples during training) -------------------------------------------


class CountingDemoModels(DemoModels):
    def __init__(self):
        self.dit_loads = 0

    def load_dit(self, **kwargs):
        self.dit_loads += 1
        return super().load_dit(**kwargs)


def test_a_prebuilt_dit_is_used_as_it_is_and_gives_what_the_loaded_one_gives(tmp_path):
    config = GenerateConfig(prompt="a red fox", output_type="latent", save_path=str(tmp_path), **SMALL)
    loaded = GenerationPipeline(config, models=DemoModels(), progress=False, log=lambda m: None).run()

    dit = build_demo_dit(sdpa_attention)
    others = CountingDemoModels()
    source = PrebuiltDiT(dit, others, description="the model being trained")
    pipeline = GenerationPipeline(config, models=source, progress=False, log=lambda m: None)
    (result,) = pipeline.run()
    assert others.dit_loads == 0  # the DiT came from the source, not from a file
    assert torch.equal(result.latent, loaded[0].latent)
    assert result.metadata["dit"] == "the model being trained"
    # the caller's module itself, not a copy; the pipeline drops its reference when done
    assert source.load_dit(device=torch.device("cpu"), dtype=None, attention=None, quant=None) is dit
    assert pipeline._loaded == {}


def test_a_prebuilt_dit_refuses_what_would_change_it(tmp_path):
    dit = build_demo_dit(sdpa_attention)
    for option in (dict(compile=True), dict(lora_weights=[str(tmp_path / "x.safetensors")])):
        config = GenerateConfig(prompt="a fox", save_path=str(tmp_path), **SMALL, **option)
        with pytest.raises(InputError, match="already-built DiT"):
            GenerationPipeline(config, models=PrebuiltDiT(dit, DemoModels()), log=lambda m: None).setup()


# -- the DiT file is read once ----------------------------------------------------------------


@skip_without_fixtures()
def test_file_models_read_the_dit_file_once(monkeypatch):
    from wan_kernel.models import dit_loading

    reads = []
    real = dit_loading.load_state_dict

    def counting(path, **kwargs):
        reads.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(dit_loading, "load_state_dict", counting)
    path = reference_case("dit_t2v") / "weights.safetensors"
    models = FileModels(GenerateConfig(dit=str(path)))
    info = models.dit_info()
    dit = models.load_dit(device=torch.device("cpu"), dtype=torch.float32, attention=None, quant=None)
    assert len(reads) == 1
    assert (info.model_type, info.dim) == (dit.config.model_type, dit.config.dim)
    assert torch.equal(dit.state_dict()["head.head.weight"], dit_loading.load_dit(path).head.head.weight)


# -- the DiT stage, for generation and for training -------------------------------------------


class InOrder:
    """A block runner that runs the blocks where they are, recording that it was prepared."""

    def __init__(self, blocks):
        self.blocks, self.prepared = blocks, False

    def forward_blocks(self):
        yield from self.blocks

    def prepare(self):
        self.prepared = True


class RecordingOffloader:
    def __init__(self):
        self.calls = []

    def attach(self, blocks, **options):
        self.calls.append(options)
        self.runner = InOrder(blocks)
        return self.runner


@pytest.mark.parametrize("training, pin_memory", [(False, True), (True, False)])
def test_build_dit_tells_the_offloader_whether_the_dit_will_be_trained(training, pin_memory):
    from wan_kernel.pipelines.dit_builder import build_dit

    offloader = RecordingOffloader()
    dit = build_dit(
        DemoModels(), device=torch.device("cpu"), dtype=torch.float32, attention=sdpa_attention,
        offloader=offloader, blocks_to_swap=1, training=training, pin_memory=pin_memory,
    )  # fmt: skip
    assert offloader.calls == [
        dict(device=torch.device("cpu"), blocks_to_swap=1, training=training, pin_memory=pin_memory)
    ]
    assert dit.block_runner is offloader.runner and offloader.runner.prepared


@skip_without_fixtures()
def test_a_read_dit_file_is_loaded_once_and_checked_against_its_task(monkeypatch):
    from wan_kernel.errors import WeightsError
    from wan_kernel.models import dit_loading
    from wan_kernel.pipelines.dit_builder import build_dit
    from wan_kernel.pipelines.model_sources import ReadDiT

    reads = []
    real = dit_loading.load_state_dict

    def counting(path, **kwargs):
        reads.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(dit_loading, "load_state_dict", counting)
    path = reference_case("dit_t2v") / "weights.safetensors"
    dit_file = dit_loading.read_dit(path)
    dit = build_dit(ReadDiT(dit_file), device=torch.device("cpu"), dtype=torch.float32, attention=None)
    assert len(reads) == 1
    assert torch.equal(dit.state_dict()["head.head.weight"], dit_loading.load_dit(path).head.head.weight)
    with pytest.raises(WeightsError, match="task i2v-14B needs a image-to-video DiT"):
        build_dit(
            ReadDiT(dit_loading.read_dit(path), task="i2v-14B"),
            device=torch.device("cpu"), dtype=torch.float32, attention=None,
        )  # fmt: skip
