"""LoRA training (``wan_kernel.training``, ``wan run train``) on a tiny random DiT and tiny caches."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wan_kernel.errors import InputError
from wan_kernel.testing import reference_case, skip_without_fixtures
from wan_kernel.testing.training import write_tiny_caches, write_tiny_dit
from wan_kernel.training.config import TrainConfig
from wan_kernel.training.trainer import Trainer, TrainingStopped, train

REPO = Path(__file__).resolve().parents[1]
QUIET = lambda message: None


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run far faster on one thread (and CI has two cores shared by everything)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_tiny_dit(root / "dit.safetensors")
    write_tiny_dit(root / "i2v.safetensors", "i2v")
    write_tiny_caches(root / "cache", 5)
    write_tiny_caches(root / "cache_i2v", 2, image="i2v")
    (root / "img").mkdir()  # what the cache step read (the trainer reads only the caches)
    Image.new("RGB", (32, 32)).save(root / "img" / "item000.png")
    (root / "img" / "item000.txt").write_text("a caption")
    (root / "dataset.toml").write_text(
        f'[general]\nresolution = [32, 32]\nbatch_size = 2\ncaption_extension = ".txt"\n\n[[datasets]]\n'
        f'image_directory = "{root / "img"}"\n'
        f'cache_directory = "{root / "cache"}"\nnum_repeats = 1\n'
    )
    return root


def _config(files: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        dit=files / "dit.safetensors",
        cache_directories=[files / "cache"],
        batch_size=2,
        output_dir=out,
        output_name="t",
        network_dim=4,
        network_alpha=2.0,
        learning_rate=1e-2,
        max_train_steps=4,
        seed=3,
        timestep_sampling="shift",
        discrete_flow_shift=3.0,
        show_progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _setup(config: TrainConfig) -> Trainer:
    trainer = Trainer(config, log=QUIET)
    trainer.setup()
    return trainer


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


def test_one_step_loss_and_lora_gradients_match_a_hand_written_flow_matching_step(files, tmp_path):
    from wan_kernel.models import load_dit
    from wan_kernel.training.data import load_batch

    trainer = _setup(_config(files, tmp_path, weighting_scheme="cosmap", mixed_precision="no"))
    torch.manual_seed(0)
    for lora in trainer.network.loras.values():  # a non-zero LoRA, so both factors get gradients
        torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    batch = load_batch(trainer.data.all_items()[:2])
    loss = trainer.batch_loss(batch, torch.Generator().manual_seed(7))
    loss.backward()

    # by hand: the same draws, the LoRA merged into plain weights W + (alpha / r) up @ down
    g = torch.Generator().manual_seed(7)
    x0 = batch["latents"].float()
    noise = torch.randn(x0.shape, generator=g)
    t = trainer.sampler.sample(2, config=trainer.timestep_config, latent_shape=tuple(x0.shape), generator=g)
    x_t = (1 - t.view(2, 1, 1, 1, 1)) * x0 + t.view(2, 1, 1, 1, 1) * noise
    dit = load_dit(files / "dit.safetensors", dtype=torch.float32)
    params = {}
    weights = {name: p for name, p in dit.named_parameters()}
    factors = {}
    for name, path in trainer.network.module_paths.items():
        lora = trainer.network.loras[name]
        down = lora.lora_down.weight.detach().clone().requires_grad_(True)
        up = lora.lora_up.weight.detach().clone().requires_grad_(True)
        factors[name] = (down, up)
        params[f"{path}.weight"] = weights[f"{path}.weight"] + (2.0 / 4) * up @ down
    pred = torch.func.functional_call(dit, params, (x_t, 1000 * t, batch["t5"]))
    weight = 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    expected = (weight.view(2, 1, 1, 1, 1) * (pred - (noise - x0)) ** 2).mean()
    expected.backward()

    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for name, (down, up) in factors.items():
        lora = trainer.network.loras[name]
        torch.testing.assert_close(lora.lora_down.weight.grad, down.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(lora.lora_up.weight.grad, up.grad, rtol=1e-4, atol=1e-7)


def test_loss_falls_over_30_steps_on_a_tiny_cached_dataset(files, tmp_path):
    from wan_kernel.training.data import load_batch

    one = tmp_path / "one"
    write_tiny_caches(one, 1, seed=5)
    config = _config(
        files,
        tmp_path,
        cache_directories=[one],
        batch_size=1,
        learning_rate=3e-2,
        network_alpha=4.0,
        max_train_steps=30,
        timestep_sampling="uniform",
        min_timestep=0,
        max_timestep=200,
    )
    trainer = _setup(config)
    batch = load_batch(trainer.data.all_items())

    def held_out_loss() -> float:  # the same 8 noise/timestep draws before and after
        with torch.no_grad():
            return (
                sum(
                    float(trainer.batch_loss(batch, torch.Generator().manual_seed(1000 + i)))
                    for i in range(8)
                )
                / 8
            )

    before = held_out_loss()
    losses = trainer.run().losses
    after = held_out_loss()
    assert len(losses) == 30
    assert after < 0.9 * before
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_lora_network_names_targets_and_initialisation(files, tmp_path):
    trainer = _setup(_config(files, tmp_path, network_args=["exclude_patterns=[r'.*ffn.*']"]))
    names = sorted(trainer.network.loras)
    assert names[0] == "lora_unet_blocks_0_cross_attn_k"
    assert len(names) == 2 * 8  # q/k/v/o of both attentions, the FFN excluded
    lora = trainer.network.loras["lora_unet_blocks_1_self_attn_q"]
    assert torch.count_nonzero(lora.lora_up.weight) == 0 and lora.lora_down.weight.abs().sum() > 0
    assert lora.lora_down.weight.dtype == torch.float32 and lora.scale == 0.5

    i2v = _setup(
        _config(files, tmp_path / "i", dit=files / "i2v.safetensors", cache_directories=[files / "cache_i2v"])
    )
    assert len(i2v.network.loras) == 2 * 12 and "lora_unet_blocks_0_cross_attn_k_img" in i2v.network.loras


def test_loraplus_puts_up_weights_in_their_own_group(files, tmp_path):
    trainer = _setup(_config(files, tmp_path, network_args=["loraplus_lr_ratio=4"]))
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert lrs == [1e-2, 4e-2]


# --------------------------------------------------------------------------------------------
# Saving and resuming
# --------------------------------------------------------------------------------------------


def test_saved_lora_is_kohya_layout_with_metadata(files, tmp_path):
    result = train(_config(files, tmp_path, save_every_n_steps=2, save_precision="bf16"), log=QUIET)
    assert result.final_lora == tmp_path / "t.safetensors"
    assert (tmp_path / "t-step00000002.safetensors").exists()
    sd = load_file(result.final_lora)
    assert sd["lora_unet_blocks_0_self_attn_q.lora_down.weight"].shape == (4, 32)
    assert sd["lora_unet_blocks_0_ffn_2.lora_up.weight"].shape == (32, 4)
    assert sd["lora_unet_blocks_0_ffn_2.alpha"].item() == 2.0
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    with safe_open(str(result.final_lora), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora_wan" and meta["ss_network_dim"] == "4"
    assert meta["ss_steps"] == "4" and meta["ss_seed"] == "3"
    assert meta["modelspec.architecture"] == "wan2.1/lora" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert len(meta["sshs_model_hash"]) == 64
    effective = (tmp_path / "t_config.toml").read_text()
    assert "network_dim = 4" in effective and "seed = 3" in effective


# --------------------------------------------------------------------------------------------
# --num_timestep_buckets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, buckets", [(12, 4), (10, 4), (7, 2), (1, 5)])
def test_stratified_uniforms_fill_every_bucket_equally(n, buckets):
    from wan_kernel.training.timestep_buckets import stratified_uniforms

    u = stratified_uniforms(n, buckets, torch.Generator().manual_seed(0))
    assert u.dtype == torch.float32 and u.numel() == math.ceil(n / buckets) * buckets
    assert bool(((u >= 0) & (u < 1)).all())
    counts = torch.bincount((u.double() * buckets).floor().long(), minlength=buckets)
    assert counts.tolist() == [math.ceil(n / buckets)] * buckets
    assert not torch.equal(u, u.sort().values) or n == 1  # shuffled


def test_epoch_uniforms_are_sliced_per_batch_and_reproducible():
    from wan_kernel.training.timestep_buckets import epoch_uniforms

    sizes = [2, 3, 2, 1]
    a = epoch_uniforms(sizes, 4, seed=3, epoch=1)
    assert [len(x) for x in a] == sizes
    counts = torch.bincount((torch.cat(a).double() * 4).floor().long(), minlength=4)
    assert counts.tolist() == [2, 2, 2, 2]  # the 8 samples of the epoch, two per bucket
    assert all(torch.equal(x, y) for x, y in zip(a, epoch_uniforms(sizes, 4, seed=3, epoch=1)))
    assert not torch.equal(torch.cat(a), torch.cat(epoch_uniforms(sizes, 4, seed=3, epoch=2)))
    assert not torch.equal(torch.cat(a), torch.cat(epoch_uniforms(sizes, 4, seed=3, epoch=1, rank=1)))


def test_the_trainer_feeds_each_epochs_stratified_draws_to_the_sampler(files, tmp_path):
    # 5 cached items, batches of 2, 2, 1: with 5 buckets each epoch draws one t per fifth of [0, 1)
    # (independent uniform draws would do so in 2 epochs with probability (5! / 5^5)^2 ~ 0.15%)
    config = _config(
        files, tmp_path, timestep_sampling="uniform", num_timestep_buckets=5, max_train_steps=None,
        max_train_epochs=2,
    )
    trainer = _setup(config)
    drawn = []
    sampler = trainer.sampler

    class Spy:
        def sample(self, *args, **kwargs):
            drawn.append(sampler.sample(*args, **kwargs))
            return drawn[-1]

        def loss_weights(self, *args, **kwargs):
            return sampler.loss_weights(*args, **kwargs)

    trainer.sampler = Spy()
    trainer.run()
    assert trainer.data.num_items == 5
    t = torch.cat(drawn)  # [10], the 5 draws of each epoch
    for epoch in range(2):
        buckets = (t[epoch * 5 : (epoch + 1) * 5].double() * 5).floor().long()
        assert torch.bincount(buckets, minlength=5).tolist() == [1] * 5


@pytest.mark.parametrize("every", [3, 4])  # a state in the middle of an epoch, and at its end
def test_resume_equals_an_uninterrupted_run_to_the_bit(files, tmp_path, every):
    _check_resume_equals_uninterrupted(files, tmp_path, every)


def test_resume_with_timestep_buckets_equals_an_uninterrupted_run_to_the_bit(files, tmp_path):
    _check_resume_equals_uninterrupted(files, tmp_path, 3, num_timestep_buckets=3)


def _check_resume_equals_uninterrupted(files, tmp_path, every, **extra):
    base = dict(
        max_train_steps=7,
        gradient_accumulation_steps=2,
        network_dropout=0.1,
        network_args=["rank_dropout=0.2", "module_dropout=0.1"],
        lr_scheduler="cosine",
        lr_warmup_steps="2",
        **extra,
    )
    whole = train(_config(files, tmp_path / "whole", **base), log=QUIET)
    train(_config(files, tmp_path / "first", save_every_n_steps=every, save_state=True, **base), log=QUIET)
    lines = []
    state = tmp_path / "first" / f"t-step{every:08d}-state"
    resumed = train(_config(files, tmp_path / "resumed", resume=state, **base), log=lines.append)
    assert any(line.startswith(f"resumed at step {every} (epoch ") for line in lines)
    assert resumed.resumed_from == every and resumed.global_step == 7
    assert resumed.losses == whole.losses[every:]
    a, b = load_file(whole.final_lora), load_file(resumed.final_lora)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_last_n_steps_keeps_only_recent_checkpoints(files, tmp_path):
    train(
        _config(
            files,
            tmp_path,
            max_train_steps=7,
            save_every_n_steps=1,
            save_last_n_steps=2,
            save_state=True,
            save_last_n_steps_state=1,
        ),
        log=QUIET,
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "t-state",
        "t-step00000005.safetensors",
        "t-step00000006-state",
        "t-step00000006.safetensors",
        "t.safetensors",
        "t_config.toml",
    ]


KILL_SCRIPT = """
import os, sys, time, torch
torch.set_num_threads(1)
from pathlib import Path
import safetensors.torch
from wan_kernel.training.config import TrainConfig
from wan_kernel.training.trainer import train

files, out = Path(sys.argv[1]), Path(sys.argv[2])
real_save_file = safetensors.torch.save_file
calls = []

def slow_save_file(tensors, filename, metadata=None):  # the second LoRA save stops half-way
    calls.append(filename)
    real_save_file(tensors, filename, metadata)
    if len(calls) == 2:
        os.truncate(filename, os.path.getsize(filename) // 2)
        print("WRITING", flush=True)
        time.sleep(60)

safetensors.torch.save_file = slow_save_file
train(TrainConfig(dit=files / "dit.safetensors", cache_directories=[files / "cache"], batch_size=2,
                  output_dir=out, output_name="t", network_dim=4, learning_rate=1e-2, max_train_steps=6,
                  seed=1, save_every_n_steps=2, show_progress=False), log=lambda m: None)
"""


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(files, tmp_path):
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(files), str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["t-step00000002.safetensors", "t_config.toml"]
    sd = load_file(out / "t-step00000002.safetensors")
    assert all(torch.isfinite(t).all() for t in sd.values())
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers and all("step00000004" in name for name in leftovers)  # only the unfinished save


def test_a_non_finite_loss_stops_with_the_step_and_saves_nothing(files, tmp_path):
    bad = tmp_path / "bad"
    write_tiny_caches(bad, 2)
    path = next(bad.glob("item001_*_wan.safetensors"))
    sd = load_file(path)
    key = next(iter(sd))
    sd[key][0, 0, 0, 0] = float("nan")
    save_file(sd, str(path), metadata={"architecture": "wan"})
    out = tmp_path / "out"
    with pytest.raises(TrainingStopped, match=r"training stopped at step \d+ \(epoch 1\): the loss is nan"):
        train(_config(files, out, cache_directories=[bad], batch_size=1, max_train_steps=4), log=QUIET)
    assert not list(out.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------
# Checks before the first step
# --------------------------------------------------------------------------------------------


def test_an_i2v_cache_with_a_t2v_dit_is_a_clear_error(files, tmp_path):
    with pytest.raises(InputError, match="image-to-video cache.*text-to-video DiT"):
        _setup(_config(files, tmp_path, cache_directories=[files / "cache_i2v"]))
    with pytest.raises(InputError, match="no image latents"):
        _setup(_config(files, tmp_path, dit=files / "i2v.safetensors"))


def test_a_text_width_that_does_not_match_is_a_clear_error(files, tmp_path):
    wide = tmp_path / "wide"
    write_tiny_caches(wide, 1, text_dim=48)
    with pytest.raises(InputError, match="text embeddings are 48 wide but the DiT"):
        _setup(_config(files, tmp_path, cache_directories=[wide]))


def test_i2v_training_runs_on_i2v_caches(files, tmp_path):
    result = train(
        _config(
            files,
            tmp_path,
            dit=files / "i2v.safetensors",
            cache_directories=[files / "cache_i2v"],
            max_train_steps=2,
        ),
        log=QUIET,
    )
    assert "lora_unet_blocks_1_cross_attn_v_img.lora_up.weight" in load_file(result.final_lora)


def test_block_swap_on_cpu_is_a_clear_error(files, tmp_path):
    with pytest.raises(InputError, match="CUDA"):
        _setup(_config(files, tmp_path, blocks_to_swap=1))


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def _run_cli(args, cwd: Path):
    from wan_cli.main import cli

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, ["run", "train", *args], catch_exceptions=False)
    finally:
        os.chdir(old)


SEED_COMMAND = (
    "--task t2v-1.3B --dit dit.safetensors --dataset_config dataset.toml --sdpa --mixed_precision bf16 "
    "--fp8_base --optimizer_type adamw8bit --learning_rate 2e-4 --gradient_checkpointing "
    "--max_data_loader_n_workers 2 --persistent_data_loader_workers --network_module networks.lora_wan "
    "--network_dim 32 --timestep_sampling shift --discrete_flow_shift 3.0 --max_train_epochs 16 "
    "--save_every_n_epochs 1 --seed 42 --output_dir out --output_name name-of-lora"
)


def test_every_option_of_the_seed_example_command_is_accepted(files):
    # the tiny DiT is not the 1.3B model: --task is checked against the weights, after all options parsed
    result = _run_cli(SEED_COMMAND.split(), files)
    assert result.exit_code == 1
    assert "the task t2v-1.3B needs dim 1536 with 30 layers" in result.output
    assert "note: --max_data_loader_n_workers has no effect here" in result.output

    args = SEED_COMMAND.replace("--task t2v-1.3B ", "").replace(
        "--max_train_epochs 16", "--max_train_epochs 2"
    )
    if importlib.util.find_spec("bitsandbytes") is None:
        refused = _run_cli(args.split(), files)
        assert refused.exit_code == 1 and "pip install bitsandbytes" in refused.output
        args = args.replace("adamw8bit", "adamw")
    result = _run_cli(args.split(), files)
    assert result.exit_code == 0, result.output
    out = files / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "name-of-lora-000001.safetensors",
        "name-of-lora.safetensors",
    ]


SEED_OPTIONS = """
task fp8_scaled t5 fp8_t5 clip vae_cache_cpu one_frame force_v2_1_time_embedding dit_high_noise
timestep_boundary offload_inactive_dit config_file dataset_config sdpa flash_attn sage_attn xformers flash3
split_attn compile compile_backend compile_mode compile_dynamic compile_fullgraph compile_cache_size_limit
cuda_allow_tf32 cuda_cudnn_benchmark dynamo_backend dynamo_mode dynamo_fullgraph dynamo_dynamic
max_train_steps max_train_epochs max_data_loader_n_workers persistent_data_loader_workers seed
gradient_checkpointing gradient_checkpointing_cpu_offload gradient_accumulation_steps mixed_precision
save_precision logging_dir log_with log_prefix log_tracker_name wandb_run_name log_tracker_config
wandb_api_key log_config ddp_timeout ddp_gradient_as_bucket_view ddp_static_graph sample_every_n_steps
sample_at_first sample_every_n_epochs sample_prompts optimizer_type optimizer_args learning_rate
max_grad_norm lr_scheduler lr_warmup_steps lr_decay_steps lr_scheduler_num_cycles lr_scheduler_power
lr_scheduler_timescale lr_scheduler_min_lr_ratio lr_scheduler_type lr_scheduler_args fp8_base blocks_to_swap
use_pinned_memory_for_block_swap block_swap_h2d_only block_swap_ring_size img_in_txt_in_offloading
disable_numpy_memmap guidance_scale timestep_sampling discrete_flow_shift sigmoid_scale weighting_scheme
logit_mean logit_std mode_scale min_timestep max_timestep preserve_distribution_shape num_timestep_buckets
show_timesteps no_metadata network_weights network_module network_dim network_alpha network_dropout
network_args training_comment dim_from_weights scale_weight_norms base_weights base_weights_multiplier
output_dir output_name resume save_every_n_epochs save_every_n_steps save_last_n_epochs
save_last_n_epochs_state save_last_n_steps save_last_n_steps_state save_state save_state_on_train_end
metadata_title metadata_author metadata_description metadata_license metadata_tags metadata_reso
metadata_arch huggingface_repo_id huggingface_repo_type huggingface_path_in_repo huggingface_token
huggingface_repo_visibility save_state_to_huggingface resume_from_huggingface async_upload dit vae vae_dtype
""".split()  # noqa: SIM905
"""Every option of the seed's ``wan_train_network.py`` (reference inventory section 1.2)."""


def test_every_seed_training_option_is_an_option_of_wan_run_train():
    from wan_cli.train import train as command

    ours = {p.name for p in command.params}
    assert not set(SEED_OPTIONS) - ours


def test_config_file_gives_defaults_and_the_command_line_wins(files, tmp_path):
    (tmp_path / "train.toml").write_text(
        f'[model]\ndit = "{files / "dit.safetensors"}"\n[training]\nnetwork_dim = 8\nmax_train_steps = 1\n'
        f'network_args = ["rank_dropout=0.1"]\nlearning_rate = 0.5\n'
    )
    args = [
        "--config_file",
        "train.toml",
        "--dataset_config",
        str(files / "dataset.toml"),
        "--output_dir",
        "o",
        "--output_name",
        "c",
        "--learning_rate",
        "0.001",
    ]
    result = _run_cli(args, tmp_path)
    assert result.exit_code == 0, result.output
    sd = load_file(tmp_path / "o" / "c.safetensors")
    assert sd["lora_unet_blocks_0_ffn_0.lora_down.weight"].shape[0] == 8
    effective = (tmp_path / "o" / "c_config.toml").read_text()
    assert "learning_rate = 0.001" in effective and 'network_args = ["rank_dropout=0.1"]' in effective

    again = _run_cli(["--config_file", "o/c_config.toml", "--output_name", "d"], tmp_path)  # the saved one
    assert again.exit_code == 0, again.output
    assert (tmp_path / "o" / "d.safetensors").exists()

    (tmp_path / "bad.toml").write_text("netwrk_dim = 8\n")
    bad = _run_cli(["--config_file", "bad.toml", *args[2:]], tmp_path)
    assert bad.exit_code == 2 and "unknown keys netwrk_dim" in bad.output


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--sage_attn"], "SageAttention has no backward"),
        (["--network_module", "networks.lokr"], "only networks.lora_wan"),
        (["--dit_high_noise", "x"], "Wan2.2"),
        (["--network_args", "conv_dim=4"], "no convolution inside its blocks"),
        (["--optimizer_type", "NoSuchOptimizer"], "unknown --optimizer_type"),
        (["--lr_scheduler", "rex"], "unknown --lr_scheduler 'rex'"),
        (["--fp8_scaled"], "--fp8_scaled needs --fp8_base"),
        (["--num_timestep_buckets", "4", "--preserve_distribution_shape"], "--preserve_distribution_shape"),
        (["--num_timestep_buckets", "-1"], "--num_timestep_buckets must be >= 0"),
    ],
)
def test_options_that_cannot_work_fail_with_a_message(files, tmp_path, extra, fragment):
    args = [
        "--dit",
        str(files / "dit.safetensors"),
        "--dataset_config",
        str(files / "dataset.toml"),
        "--output_dir",
        "o",
        "--output_name",
        "x",
        "--max_train_steps",
        "1",
        *extra,
    ]
    result = _run_cli(args, tmp_path)
    assert result.exit_code == 1, result.output
    assert fragment in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------
# What the LoRA does elsewhere
# --------------------------------------------------------------------------------------------


def test_saved_lora_has_the_same_effect_in_the_generation_loader(files, tmp_path):
    from wan_kernel.lora import apply_loras
    from wan_kernel.models import load_dit
    from wan_kernel.training.data import load_batch

    trainer = _setup(_config(files, tmp_path, max_train_steps=3, learning_rate=5e-2))
    trainer.run()
    trainer.model.eval()
    batch = load_batch(trainer.data.all_items()[:1])
    x = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    with torch.no_grad():
        trained = trainer.model(x, t, batch["t5"])
        plain = load_dit(files / "dit.safetensors", dtype=torch.float32)
        merged = apply_loras(plain, [tmp_path / "t.safetensors"])
        generated = merged(x, t, batch["t5"])
        base = load_dit(files / "dit.safetensors", dtype=torch.float32)(x, t, batch["t5"])
    assert not torch.allclose(trained, base, atol=1e-4)  # the LoRA changes the output ...
    torch.testing.assert_close(generated, trained, rtol=1e-4, atol=1e-5)  # ... the same way in both


@pytest.mark.slow
def test_two_processes_train_one_lora(files, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "-m",
        "wan_cli.main",
        "run",
        "train",
        "--dit",
        str(files / "dit.safetensors"),
        "--dataset_config",
        str(files / "dataset.toml"),
        "--output_dir",
        str(tmp_path / "o"),
        "--output_name",
        "dp",
        "--network_dim",
        "4",
        "--max_train_steps",
        "3",
        "--seed",
        "1",
        "--learning_rate",
        "1e-2",
        "--save_state_on_train_end",
    ]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert result.stdout.count("saved ") == 2  # rank 0 alone reports (and writes) the LoRA and the state
    sd = load_file(tmp_path / "o" / "dp.safetensors")
    assert any(k.endswith("lora_up.weight") and t.abs().sum() > 0 for k, t in sd.items())
    state = tmp_path / "o" / "dp-state"
    assert json.loads((state / "train_state.json").read_text())["num_processes"] == 2
    assert sorted(p.name for p in state.glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]


@skip_without_fixtures()
def test_samples_during_training_equal_wan_run_generate_with_the_saved_lora(files, tmp_path):
    from wan_kernel.pipelines.config import GenerateConfig
    from wan_kernel.pipelines.generate import generate
    from wan_kernel.training.samples import SampleHook

    prompts = tmp_path / "prompts.toml"
    prompts.write_text(
        "[prompt]\nwidth = 32\nheight = 32\nsample_steps = 3\nguidance_scale = 4.0\n\n"
        '[[prompt.subset]]\nprompt = "a red fox"\nseed = 11\n\n[[prompt.subset]]\nprompt = "a cat"\n'
    )
    t5, vae = reference_case("t5") / "weights.safetensors", reference_case("vae") / "weights.safetensors"
    config = _config(
        files,
        tmp_path / "o",
        max_train_steps=2,
        save_every_n_steps=1,
        sample_every_n_steps=1,
        sample_prompts=prompts,
        t5=t5,
        vae=vae,
        t5_tokenizer="builtin:bytes",
        learning_rate=5e-2,
    )
    trainer = Trainer(config, log=QUIET)
    hook = SampleHook.from_config(config)
    made = []
    trainer.sample_hook = lambda tr, **kw: made.extend(hook(tr, **kw))
    trainer.setup()
    trainer.run()
    samples = sorted(p.name for p in (tmp_path / "o" / "sample").iterdir())
    assert samples[:2] == ["t_000001_00_11.png", "t_000001_01_4.png"]  # prompt 2: training seed + index

    reference = generate(
        GenerateConfig(
            prompt="a red fox",
            seed=11,
            video_size=(32, 32),
            video_length=1,
            infer_steps=3,
            guidance_scale=4.0,
            dit=str(files / "dit.safetensors"),
            vae=str(vae),
            t5=str(t5),
            t5_tokenizer="builtin:bytes",
            dit_dtype="float32",
            lora_weights=[str(tmp_path / "o" / "t-step00000001.safetensors")],
            save_path=str(tmp_path / "ref"),
            output_type="both",
        ),
        log=QUIET,
        progress=False,
    )[0]
    torch.testing.assert_close(made[0].latent, reference.latent, rtol=1e-4, atol=1e-4)
    assert (made[0].video - reference.video).abs().max() < 2e-3


# --------------------------------------------------------------------------------------------
# Options around the network, memory and optimizer
# --------------------------------------------------------------------------------------------


def test_network_weights_and_dim_from_weights_start_from_a_file(files, tmp_path):
    first = train(
        _config(files, tmp_path / "a", network_dim=8, network_alpha=3.0, max_train_steps=2), log=QUIET
    )
    start = load_file(first.final_lora)
    trainer = _setup(_config(files, tmp_path / "b", network_weights=first.final_lora, dim_from_weights=True))
    again = trainer.network.kohya_state_dict()
    assert again.keys() == start.keys() and all(torch.equal(again[k], start[k]) for k in start)
    with pytest.raises(InputError, match="--dim_from_weights"):
        _setup(_config(files, tmp_path / "c", network_weights=first.final_lora))  # rank 4 != 8


def test_the_frozen_dit_is_built_by_the_generation_stage_from_one_read(files, tmp_path, monkeypatch):
    from wan_kernel.models import dit_loading
    from wan_kernel.pipelines import dit_builder
    from wan_kernel.pipelines.model_sources import ReadDiT

    builds, reads = [], []
    real_build, real_read = dit_builder.build_dit, dit_loading.load_state_dict

    def recording_build(models, **options):
        builds.append((models, options))
        return real_build(models, **options)

    def counting_read(path, **kwargs):
        reads.append(path)
        return real_read(path, **kwargs)

    monkeypatch.setattr(dit_builder, "build_dit", recording_build)
    monkeypatch.setattr(dit_loading, "load_state_dict", counting_read)
    trainer = _setup(_config(files, tmp_path))
    ((models, options),) = builds
    assert isinstance(models, ReadDiT) and options["training"] is True
    assert len(reads) == 1  # checked against the caches, then loaded: one read
    assert trainer.dit.block_runner is None  # no --blocks_to_swap: no offloader


def test_base_weights_are_merged_into_the_frozen_dit_before_training(files, tmp_path):
    from wan_kernel.lora import apply_loras
    from wan_kernel.models import load_dit
    from wan_kernel.training.data import load_batch

    first = train(_config(files, tmp_path / "a", max_train_steps=2, learning_rate=5e-2), log=QUIET)
    trainer = _setup(
        _config(files, tmp_path / "b", base_weights=[first.final_lora], base_weights_multiplier=[0.5])
    )
    batch = load_batch(trainer.data.all_items()[:1])
    x, t = torch.randn(batch["latents"].shape), torch.tensor([300.0])
    with torch.no_grad():
        expected = apply_loras(
            load_dit(files / "dit.safetensors", dtype=torch.float32),
            [{"path": first.final_lora, "multiplier": 0.5}],
        )(x, t, batch["t5"])
        torch.testing.assert_close(trainer.model(x, t, batch["t5"]), expected, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_and_its_cpu_offload_give_the_same_gradients(files, tmp_path):
    from wan_kernel.training.data import load_batch

    grads = []
    for extra in (
        {},
        {"gradient_checkpointing": True},
        {"gradient_checkpointing": True, "gradient_checkpointing_cpu_offload": True},
    ):
        trainer = _setup(_config(files, tmp_path / str(len(grads)), network_dropout=0.1, **extra))
        for lora in trainer.network.loras.values():
            torch.nn.init.constant_(lora.lora_up.weight, 0.01)
        torch.manual_seed(0)  # the dropout masks
        trainer.batch_loss(
            load_batch(trainer.data.all_items()[:2]), torch.Generator().manual_seed(1)
        ).backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.network.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-5, atol=1e-7)


def test_block_swap_training_gives_the_same_gradients_as_resident_blocks(files, tmp_path):
    """The LoRA hooks through the blockswap plugin's training runner (run on the CPU test path)."""
    from wan_kernel.errors import UnknownPluginError
    from wan_kernel.plugins import get_plugin_manager
    from wan_kernel.training.data import load_batch

    try:  # looked up without the availability check: its CPU test path runs without CUDA
        offloader = get_plugin_manager().lookup("offload", "blockswap").impl
    except UnknownPluginError:
        pytest.skip("the blockswap offload plugin is not installed")

    grads = []
    for swap in (0, 1):
        trainer = _setup(_config(files, tmp_path / str(swap), gradient_checkpointing=bool(swap)))
        for lora in trainer.network.loras.values():
            torch.nn.init.constant_(lora.lora_up.weight, 0.01)
        if swap:
            runner = offloader.attach(
                trainer.dit.blocks,
                device="cpu",
                blocks_to_swap=1,
                training=True,
                pin_memory=False,
                _allow_cpu_for_tests=True,
            )
            trainer.dit.set_block_runner(runner)
            runner.prepare()
        trainer.batch_loss(
            load_batch(trainer.data.all_items()[:2]), torch.Generator().manual_seed(1)
        ).backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.network.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "optimizer, extra",
    [
        ("AdaFactor", {"lr_scheduler": "adafactor"}),
        (
            "AdaFactor",
            {"optimizer_args": ["relative_step=False", "scale_parameter=False", "warmup_init=False"]},
        ),
        (
            "torch.optim.SGD",
            {"optimizer_args": ["momentum=0.9"], "lr_scheduler": "linear", "lr_warmup_steps": "50%"},
        ),
        ("AdamW8bit", {}),
    ],
)
def test_optimizers_by_the_seed_names(files, tmp_path, optimizer, extra):
    if optimizer == "AdamW8bit" and importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(InputError, match="pip install bitsandbytes"):
            _setup(_config(files, tmp_path, optimizer_type=optimizer))
        return
    result = train(_config(files, tmp_path, optimizer_type=optimizer, max_train_steps=2, **extra), log=QUIET)
    sd = load_file(result.final_lora)
    assert any(k.endswith("lora_up.weight") and t.abs().sum() > 0 for k, t in sd.items())


def test_tensorboard_logs_loss_and_learning_rate(files, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_config(files, tmp_path / "o", logging_dir=tmp_path / "logs", max_train_steps=3), log=QUIET)
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events
    scalars = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"loss/current", "loss/average", "lr/group0"} <= set(scalars)


def test_diffusers_wan_lora_loader_reads_the_saved_lora_with_the_same_effect(files, tmp_path):
    """diffusers' ``WanLoraLoaderMixin.lora_state_dict`` converts our file (kohya layout) to its
    PEFT names; that delta merged into diffusers' transformer gives our trained model's output."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders import WanLoraLoaderMixin

    from wan_kernel.models import load_dit
    from wan_kernel.models.dit_keys import diffusers_config, dit_state_dict_to
    from wan_kernel.training.data import load_batch

    trainer = _setup(_config(files, tmp_path, max_train_steps=3, learning_rate=5e-2))
    trainer.run()
    trainer.model.eval()
    converted = WanLoraLoaderMixin.lora_state_dict(str(tmp_path / "t.safetensors"))
    plain = load_dit(files / "dit.safetensors", dtype=torch.float32)
    theirs = diffusers.WanTransformer3DModel(**diffusers_config(plain.config)).eval()
    sd = dit_state_dict_to("diffusers", plain.state_dict())
    merged = 0
    for key, down in converted.items():
        if key.endswith(".lora_A.weight"):
            target = key.removeprefix("transformer.").replace(".lora_A.weight", ".weight")
            up = converted[key.replace(".lora_A.", ".lora_B.")]
            sd[target] = sd[target] + up.float() @ down.float()  # diffusers folds alpha/rank into A and B
            merged += 1
    assert merged == len(trainer.network.loras)
    theirs.load_state_dict(sd, strict=True)
    batch = load_batch(trainer.data.all_items()[:1])
    x, t = torch.randn(batch["latents"].shape), torch.tensor([421.0])
    ctx = batch["t5"][0].float()
    padded = torch.cat([ctx, torch.zeros(512 - ctx.shape[0], ctx.shape[1])])[None]
    with torch.no_grad():
        ours = trainer.model(x, t, [ctx])
        ref = theirs(x, t, padded, return_dict=False)[0]
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=1e-4)


def test_sample_prompts_without_the_models_fail_before_training(files, tmp_path):
    (tmp_path / "p.txt").write_text("a fox --w 32 --h 32\n")
    args = ["--dit", str(files / "dit.safetensors"), "--dataset_config", str(files / "dataset.toml")]
    result = _run_cli(
        [*args, "--output_dir", "o", "--output_name", "x", "--sample_prompts", "p.txt"], tmp_path
    )
    assert result.exit_code == 1 and "--sample_prompts needs --vae and --t5" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.cuda
@pytest.mark.parametrize("quant", [{}, {"fp8_base": True, "fp8_scaled": True}])
def test_on_cuda_block_swap_training_matches_resident_blocks(files, tmp_path, cuda_device, quant):
    """bf16 on the GPU, with and without the scaled-fp8 base: the LoRA gradients of one step with 1 of
    2 blocks swapped equal those with both blocks resident."""
    from wan_kernel.training.data import load_batch

    grads = []
    for swap in (None, 1):
        trainer = _setup(
            _config(
                files,
                tmp_path / str(swap),
                mixed_precision="bf16",
                gradient_checkpointing=True,
                blocks_to_swap=swap,
                **quant,
            )
        )
        assert trainer.device.type == "cuda"
        for lora in trainer.network.loras.values():
            torch.nn.init.constant_(lora.lora_up.weight, 0.01)
        with trainer.accelerator.autocast():
            loss = trainer.batch_loss(
                load_batch(trainer.data.all_items()[:2]), torch.Generator().manual_seed(1)
            )
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.network.parameters()]).float().cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)


@skip_without_fixtures()
def test_wan_run_cache_then_wan_run_train(tmp_path):
    """The whole chain on tiny models: images -> `wan run cache` -> `wan run train` -> a LoRA."""
    from wan_cli.main import cli

    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), (60 * i, 100, 200)).save(tmp_path / "img" / f"p{i}.png")
        (tmp_path / "img" / f"p{i}.txt").write_text(f"picture {i}")
    (tmp_path / "ds.toml").write_text(
        '[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\nbatch_size = 1\n\n'
        f'[[datasets]]\nimage_directory = "{tmp_path / "img"}"\ncache_directory = "{tmp_path / "cache"}"\n'
    )
    write_tiny_dit(tmp_path / "dit.safetensors")
    t5, vae = reference_case("t5") / "weights.safetensors", reference_case("vae") / "weights.safetensors"
    runner = CliRunner()
    cached = runner.invoke(
        cli,
        ["run", "cache", "--dataset_config", str(tmp_path / "ds.toml"), "--vae", str(vae), "--t5", str(t5),
         "--t5_tokenizer", "builtin:bytes"],
    )  # fmt: skip
    assert cached.exit_code == 0, cached.output
    trained = runner.invoke(
        cli,
        ["run", "train", "--dit", str(tmp_path / "dit.safetensors"),
         "--dataset_config", str(tmp_path / "ds.toml"),
         "--output_dir", str(tmp_path / "out"), "--output_name", "e2e", "--max_train_steps", "3",
         "--learning_rate", "1e-2", "--seed", "0"],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert "3 items" in trained.output
    sd = load_file(tmp_path / "out" / "e2e.safetensors")
    assert any(k.endswith("lora_up.weight") and t.abs().sum() > 0 for k, t in sd.items())
