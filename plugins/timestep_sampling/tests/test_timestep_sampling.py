import math
import subprocess
import sys

import pytest
import torch

from wan_kernel.errors import InputError
from wan_kernel.interfaces import TimestepSampler, TimestepSamplingConfig
from wan_kernel.plugins import PluginManager
from wan_timestep_sampling import (
    SAMPLERS,
    flux_shift_mu,
    loss_weights,
    shift_timesteps,
    validate_config,
)

BY_NAME = {cls.name: cls() for cls in SAMPLERS}
NAMES = ["uniform", "sigmoid", "shift", "flux_shift", "logsnr", "sigma"]
LATENT = (2, 16, 5, 60, 104)  # [B, C, F, H, W] of an 832x480 video
N = 200_000  # draws for the distribution checks; ECDF standard error <= 0.0012


def draw(name, n=N, seed=0, latent_shape=LATENT, **config):
    generator = torch.Generator().manual_seed(seed)
    cfg = TimestepSamplingConfig(**config)
    return BY_NAME[name].sample(n, config=cfg, latent_shape=latent_shape, generator=generator)


def phi(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def logit(q):
    return math.log(q / (1.0 - q))


def ecdf(t, q):
    return (t <= q).double().mean().item()


# -- interface and reproducibility ----------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_range(name):
    t = draw(name, n=64)
    assert t.shape == (64,)
    assert t.dtype == torch.float32
    assert t.device.type == "cpu"
    assert bool(((t >= 0) & (t <= 1)).all())


@pytest.mark.parametrize("name", NAMES)
def test_seeded_reproducibility(name):
    a = draw(name, n=32, seed=123)
    b = draw(name, n=32, seed=123)
    c = draw(name, n=32, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_reproducible_with_preserve_and_limits(name):
    kwargs = dict(min_timestep=300, max_timestep=700, preserve_distribution_shape=True)
    assert torch.equal(draw(name, n=16, seed=5, **kwargs), draw(name, n=16, seed=5, **kwargs))


# -- distributions --------------------------------------------------------------------------


def test_uniform_moments():
    t = draw("uniform")
    assert abs(t.mean().item() - 0.5) < 0.005
    assert abs(t.var().item() - 1 / 12) < 0.002
    for q in (0.1, 0.37, 0.9):
        assert abs(ecdf(t, q) - q) < 0.005


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_sigmoid_distribution(scale):
    t = draw("sigmoid", sigmoid_scale=scale)
    assert abs(t.median().item() - 0.5) < 0.005
    # P(t <= q) = Phi(logit(q) / scale)
    for q in (0.1, 0.3, 0.8):
        assert abs(ecdf(t, q) - phi(logit(q) / scale)) < 0.005


@pytest.mark.parametrize("shift, scale", [(3.0, 1.0), (5.0, 1.0), (0.5, 1.0), (3.0, 2.0)])
def test_shift_distribution(shift, scale):
    t = draw("shift", discrete_flow_shift=shift, sigmoid_scale=scale)
    # the median 1/2 of the sigmoid draw maps to s / (1 + s)
    assert abs(t.median().item() - shift / (1 + shift)) < 0.005
    # logit(shifted t) = logit(t') + ln s, so P(t <= q) = Phi((logit(q) - ln s) / scale)
    for q in (0.2, 0.5, 0.9):
        assert abs(ecdf(t, q) - phi((logit(q) - math.log(shift)) / scale)) < 0.005


def test_shift_of_one_is_sigmoid():
    assert torch.allclose(draw("shift", n=1000, discrete_flow_shift=1.0), draw("sigmoid", n=1000))


def test_shift_formula_matches_flux_time_shift():
    t = torch.linspace(0.01, 0.99, 99)
    mu = 0.8
    time_shift = math.exp(mu) / (math.exp(mu) + (1 / t - 1))  # Flux's time_shift(mu, 1, t)
    assert torch.allclose(shift_timesteps(t, math.exp(mu)), time_shift, atol=1e-6)


def test_flux_shift_mu_line():
    assert flux_shift_mu(32, 32) == pytest.approx(0.5)  # 16 * 16 = 256 tokens
    assert flux_shift_mu(128, 128) == pytest.approx(1.15)  # 64 * 64 = 4096 tokens
    assert flux_shift_mu(33, 33) == pytest.approx(0.5)  # integer halving
    assert flux_shift_mu(60, 104) == pytest.approx(0.5 + 0.65 / 3840 * (30 * 52 - 256))
    assert flux_shift_mu(16, 16) == pytest.approx(0.5 - 0.65 / 3840 * 192)  # extrapolated below
    assert flux_shift_mu(256, 256) == pytest.approx(0.5 + 0.65 / 3840 * (128 * 128 - 256))


def test_flux_shift_grows_with_resolution():
    medians = []
    for h, w in [(32, 32), (60, 104), (90, 160), (128, 128)]:
        t = draw("flux_shift", n=50_000, latent_shape=(1, 16, 1, h, w))
        mu = flux_shift_mu(h, w)
        expected = math.exp(mu) / (1 + math.exp(mu))
        assert abs(t.median().item() - expected) < 0.01
        medians.append(t.median().item())
    assert medians == sorted(medians) and medians[0] < medians[-1] - 0.1


def test_flux_shift_uses_only_height_and_width():
    a = draw("flux_shift", n=64, latent_shape=(1, 16, 1, 60, 104))
    b = draw("flux_shift", n=64, latent_shape=(4, 16, 21, 60, 104))
    assert torch.equal(a, b)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (-1.0, 1.5), (1.5, 0.7)])
def test_logsnr_moments(mean, std):
    t = draw("logsnr", logit_mean=mean, logit_std=std).double()
    logsnr = -2.0 * torch.log(t / (1 - t))  # -2 logit(t) = lambda
    assert abs(logsnr.mean().item() - mean) < 0.02
    assert abs(logsnr.std().item() - std) < 0.02


def sigma_closed_form(u, shift=1.0, lo=0.0, hi=1000.0, total=1000):
    """The sigma sampler's level for uniform numbers ``u``, written out in plain Python."""
    levels = [shift * (k / total) / (1 + (shift - 1) * (k / total)) for k in range(total, 0, -1)]
    levels = [v for v in levels if lo - 1e-9 <= v * total <= hi + 1e-9]
    return [levels[min(int(math.floor(x * len(levels))), len(levels) - 1)] for x in u]


def test_sigma_default_is_the_discrete_schedule():
    t = draw("sigma")
    steps = t.double() * 1000
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # on the grid 0.001 .. 1.000
    assert t.min().item() == pytest.approx(0.001) and t.max().item() == pytest.approx(1.0)
    assert abs(t.mean().item() - 0.5005) < 0.005  # mean of (1000 - i) / 1000, i uniform in 0..999


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_sigma_applies_the_shift(shift):
    u = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.77, 0.999], dtype=torch.float32)
    cfg = TimestepSamplingConfig(discrete_flow_shift=shift)
    t = BY_NAME["sigma"].sample(6, config=cfg, uniform=u)
    assert torch.allclose(t.double(), torch.tensor(sigma_closed_form(u.tolist(), shift), dtype=torch.float64))
    # the drawn distribution is the shifted one: median level shift(1/2) = s / (1 + s)
    drawn = draw("sigma", discrete_flow_shift=shift)
    assert abs(drawn.median().item() - shift / (1 + shift)) < 0.005


def test_sigma_logit_normal():
    t = draw("sigma", weighting_scheme="logit_normal", logit_mean=1.0, logit_std=1.0)
    # u = sigmoid(N(1, 1)), sigma = 1 - floor(1000 u) / 1000: median ~ 1 - sigmoid(1)
    assert abs(t.median().item() - (1 - 1 / (1 + math.exp(-1.0)))) < 0.005


@pytest.mark.parametrize("mode_scale", [0.0, 1.29])
def test_sigma_mode(mode_scale):
    t = draw("sigma", weighting_scheme="mode", mode_scale=mode_scale)

    def f(u):  # the mode density's transform, decreasing for these scales
        return 1 - u - mode_scale * (math.cos(math.pi * u / 2) ** 2 - 1 + u)

    # P(f(u) <= f(q)) = 1 - q and sigma ~= 1 - f(u) (to the 0.001 grid)
    for q in (0.1, 0.25, 0.6):
        assert abs((t >= 1 - f(q)).double().mean().item() - (1 - q)) < 0.006


@pytest.mark.parametrize("scheme", ["cosmap", "sigma_sqrt", "none"])
def test_sigma_loss_only_schemes_sample_uniformly(scheme):
    assert torch.equal(draw("sigma", n=1000, weighting_scheme=scheme), draw("sigma", n=1000))


# -- timestep limits ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["uniform", "sigmoid", "shift", "flux_shift", "logsnr"])
@pytest.mark.parametrize("preserve", [False, True])
def test_continuous_limits(name, preserve):
    t = draw(name, n=20_000, min_timestep=200, max_timestep=500, preserve_distribution_shape=preserve)
    lo, hi = torch.tensor(0.2), torch.tensor(0.5)  # the float32 bounds
    assert bool(((t >= lo) & (t <= hi)).all())
    assert t.max().item() - t.min().item() > 0.2  # the range is used, not collapsed


def test_rescale_squeezes_the_distribution():
    # default: t <- t * 0.3 + 0.2, so the sigmoid median 0.5 moves to 0.35
    t = draw("sigmoid", min_timestep=200, max_timestep=500)
    assert abs(t.median().item() - 0.35) < 0.005
    assert torch.allclose(t, draw("sigmoid") * 0.3 + 0.2, atol=1e-6)


def test_preserve_keeps_the_shape_inside_the_range():
    # rejection sampling: the truncated sigmoid law, not a squeezed one
    t = draw("sigmoid", min_timestep=200, max_timestep=500, preserve_distribution_shape=True)
    lo, hi = phi(logit(0.2)), phi(logit(0.5))
    for q in (0.25, 0.3, 0.4, 0.45):
        assert abs(ecdf(t, q) - (phi(logit(q)) - lo) / (hi - lo)) < 0.006


def test_preserve_only_min_or_max():
    t = draw("uniform", n=5000, min_timestep=900, preserve_distribution_shape=True)
    assert t.min().item() >= 0.9 - 1e-7
    t = draw("uniform", n=5000, max_timestep=100, preserve_distribution_shape=True)
    assert t.max().item() <= 0.1 + 1e-7


def test_preserve_with_an_impossible_range_is_input_error():
    with pytest.raises(InputError, match="preserve_distribution_shape"):
        draw("sigmoid", n=4, sigmoid_scale=0.01, min_timestep=900, max_timestep=1000,
             preserve_distribution_shape=True)


@pytest.mark.parametrize(
    "lo, hi, expected",
    [
        (0, 200, (0.001, 0.2)),  # not mirrored: low timesteps are low noise
        (100, 900, (0.1, 0.9)),
        (800, 1000, (0.8, 1.0)),
    ],
)
@pytest.mark.parametrize("preserve", [False, True])
def test_sigma_limits_are_not_mirrored(lo, hi, expected, preserve):
    t = draw("sigma", n=20_000, min_timestep=lo, max_timestep=hi, preserve_distribution_shape=preserve)
    assert t.min().item() == pytest.approx(expected[0], abs=1e-6)
    assert t.max().item() == pytest.approx(expected[1], abs=1e-6)


def test_sigma_limits_apply_after_the_shift():
    u = torch.linspace(0, 0.999, 50)
    cfg = TimestepSamplingConfig(discrete_flow_shift=3.0, min_timestep=300, max_timestep=600)
    t = BY_NAME["sigma"].sample(50, config=cfg, uniform=u)
    assert bool(((t >= 0.3 - 1e-6) & (t <= 0.6 + 1e-6)).all())
    expected = sigma_closed_form(u.tolist(), 3.0, 300, 600)
    assert torch.allclose(t.double(), torch.tensor(expected, dtype=torch.float64))


def test_sigma_limits_without_a_level_are_input_error():
    with pytest.raises(InputError, match="no level"):
        draw("sigma", n=4, discrete_flow_shift=50.0, min_timestep=10, max_timestep=11)


def test_sigma_ignores_preserve():
    kwargs = dict(min_timestep=100, max_timestep=400)
    preserved = draw("sigma", n=256, preserve_distribution_shape=True, **kwargs)
    assert torch.equal(draw("sigma", n=256, **kwargs), preserved)


# -- given uniform numbers (--num_timestep_buckets) ----------------------------------------


def normal_of(u):
    return math.sqrt(2.0) * torch.special.erfinv(torch.tensor(2 * u - 1, dtype=torch.float64)).item()


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def shifted(s, x):
    return s * x / (1 + (s - 1) * x)


U = [0.03, 0.2, 0.47, 0.64, 0.91]  # away from the 1/1000 grid the float32 floor rounds on


@pytest.mark.parametrize(
    "name, config, closed_form",
    [
        ("uniform", {}, lambda u: u),
        ("sigmoid", dict(sigmoid_scale=1.7), lambda u: sigmoid(1.7 * normal_of(u))),
        ("shift", dict(discrete_flow_shift=3.0), lambda u: shifted(3.0, sigmoid(normal_of(u)))),
        ("flux_shift", {}, lambda u: shifted(math.exp(flux_shift_mu(60, 104)), sigmoid(normal_of(u)))),
        ("logsnr", dict(logit_mean=-1.0, logit_std=2.0), lambda u: sigmoid(-(normal_of(u) * 2.0 - 1.0) / 2)),
        ("uniform", dict(min_timestep=200, max_timestep=500), lambda u: u * 0.3 + 0.2),
        ("sigma", dict(discrete_flow_shift=2.0), lambda u: sigma_closed_form([u], 2.0)[0]),
        (
            "sigma",
            dict(weighting_scheme="logit_normal", logit_mean=0.5, logit_std=1.2),
            lambda u: sigma_closed_form([sigmoid(normal_of(u) * 1.2 + 0.5)])[0],
        ),
        (
            "sigma",
            dict(weighting_scheme="mode", mode_scale=1.29),
            lambda u: sigma_closed_form([1 - u - 1.29 * (math.cos(math.pi * u / 2) ** 2 - 1 + u)])[0],
        ),
    ],
)
def test_given_uniform_maps_by_the_closed_form(name, config, closed_form):
    u = torch.tensor(U, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    t = BY_NAME[name].sample(len(U), config=TimestepSamplingConfig(**config), latent_shape=LATENT,
                             uniform=u, generator=generator)
    expected = torch.tensor([closed_form(x) for x in u.tolist()], dtype=torch.float64)
    assert torch.allclose(t.double(), expected, atol=2e-6), (t, expected)
    # the generator is not used
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())


@pytest.mark.parametrize("name", NAMES)
def test_given_uniform_is_checked(name):
    sampler, cfg = BY_NAME[name], TimestepSamplingConfig()
    with pytest.raises(InputError, match="uniform"):
        sampler.sample(3, config=cfg, latent_shape=LATENT, uniform=torch.rand(4))
    with pytest.raises(InputError, match="uniform"):
        sampler.sample(2, config=cfg, latent_shape=LATENT, uniform=torch.tensor([0.5, 1.5]))


@pytest.mark.parametrize("name", ["uniform", "sigmoid", "shift", "flux_shift", "logsnr"])
def test_given_uniform_with_preserve_is_input_error(name):
    cfg = TimestepSamplingConfig(min_timestep=100, preserve_distribution_shape=True)
    with pytest.raises(InputError, match="preserve_distribution_shape"):
        BY_NAME[name].sample(2, config=cfg, latent_shape=LATENT, uniform=torch.tensor([0.1, 0.6]))


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(weighting_scheme="cosine"), "weighting_scheme"),
        (dict(min_timestep=500, max_timestep=500), "smaller"),
        (dict(min_timestep=600, max_timestep=100), "smaller"),
        (dict(min_timestep=-1), "min_timestep"),
        (dict(max_timestep=1001), "max_timestep"),
        (dict(min_timestep=1000), "smaller"),
        (dict(max_timestep=0), "smaller"),
        (dict(min_timestep=float("nan")), "min_timestep"),
        (dict(discrete_flow_shift=0.0), "discrete_flow_shift"),
        (dict(discrete_flow_shift=-3.0), "discrete_flow_shift"),
        (dict(logit_std=-1.0), "logit_std"),
        (dict(sigmoid_scale=float("inf")), "sigmoid_scale"),
        (dict(num_train_timesteps=0), "num_train_timesteps"),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_invalid_config_is_input_error(name, config, match):
    with pytest.raises(InputError, match=match):
        draw(name, n=4, **config)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True])
def test_bad_batch_size_is_input_error(name, batch_size):
    with pytest.raises(InputError, match="batch_size"):
        BY_NAME[name].sample(batch_size, config=TimestepSamplingConfig(), latent_shape=LATENT)


@pytest.mark.parametrize("latent_shape", [None, (16,), (1, 16, 1, 0, 104)])
def test_flux_shift_needs_a_latent_shape(latent_shape):
    with pytest.raises(InputError, match="latent"):
        draw("flux_shift", n=4, latent_shape=latent_shape)


def test_validate_config_returns_limits():
    assert validate_config(TimestepSamplingConfig()) == (0.0, 1000.0)
    assert validate_config(TimestepSamplingConfig(min_timestep=100)) == (100.0, 1000.0)
    assert validate_config(TimestepSamplingConfig(max_timestep=875)) == (0.0, 875.0)


# -- loss weights ---------------------------------------------------------------------------


def test_loss_weights():
    sigmas = torch.tensor([[0.25], [0.5], [1.0]], dtype=torch.bfloat16)
    assert torch.allclose(loss_weights(sigmas, "sigma_sqrt"), torch.tensor([[16.0], [4.0], [1.0]]))
    cosmap = loss_weights(sigmas, "cosmap")
    expected = torch.tensor([[2 / (math.pi * (1 - 0.5 + 0.125))], [4 / math.pi], [2 / math.pi]])
    assert torch.allclose(cosmap, expected)
    for scheme in ("none", "logit_normal", "mode"):
        w = loss_weights(sigmas, scheme)
        assert w.dtype == torch.float32 and w.shape == sigmas.shape and bool((w == 1).all())
    assert loss_weights(sigmas, "cosmap").dtype == torch.float32
    with pytest.raises(InputError, match="weighting_scheme"):
        loss_weights(sigmas, "sigma")


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_every_sampler_gives_its_loss_weights_through_the_interface(name):
    """The trainer asks the sampler (``TimestepSampler.loss_weights``), never this module."""
    sampler = BY_NAME[name]
    sigmas = sampler.sample(6, config=TimestepSamplingConfig(), latent_shape=(6, 16, 3, 8, 8))
    for scheme in ("sigma_sqrt", "cosmap", "none", "logit_normal", "mode"):
        config = TimestepSamplingConfig(weighting_scheme=scheme)
        weights = sampler.loss_weights(sigmas, config=config)
        assert weights.dtype == torch.float32 and weights.shape == sigmas.shape
        assert torch.equal(weights, loss_weights(sigmas, scheme)), scheme
    ones = sampler.loss_weights(sigmas, config=TimestepSamplingConfig(weighting_scheme="logit_normal"))
    assert bool((ones == 1).all())


# -- registration and import cost -----------------------------------------------------------


def test_registration_through_plugin_manager():
    pm = PluginManager()
    assert set(NAMES) <= set(pm.names("timestep_sampling"))
    for name in NAMES:
        assert pm.lookup("timestep_sampling", name).distribution == "wan-timestep-sampling"
        sampler = pm.get("timestep_sampling", name)
        assert isinstance(sampler, TimestepSampler) and sampler.name == name


def test_entry_module_imports_no_torch():
    code = "import sys, wan_timestep_sampling; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
