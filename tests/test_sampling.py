"""Flow-matching samplers: official parity (UniPC fixtures, denoising loop with the DiT),
schedule properties, exactness on straight paths, convergence, diffusers agreement, CFG."""

from __future__ import annotations

import math

import pytest
import torch

from wan_kernel.errors import InputError
from wan_kernel.interfaces import CfgSchedule
from wan_kernel.sampling import (
    SOLVERS,
    DPMSolverPP,
    EulerSolver,
    UniPCSolver,
    combine_cfg,
    denoise,
    guided_velocity,
    make_cfg_velocity,
    make_schedule,
    make_solver,
)
from wan_kernel.testing import REFERENCE_FIXTURES, read_reference_case

FIXTURES = REFERENCE_FIXTURES


def _load_case(name: str):
    folder = FIXTURES / name
    if not folder.is_dir():
        pytest.skip(f"reference fixtures not found at {folder}")
    return read_reference_case(folder)


def _assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, case: dict) -> None:
    tol = case["tolerance"]["per_output"][name]
    assert actual.shape == expected.shape, name
    if tol.get("exact"):
        assert torch.equal(actual.to(expected.dtype), expected), f"{name}: {actual} != {expected}"
        return
    diff = (actual.double() - expected.double()).abs().max().item()
    assert torch.allclose(actual.double(), expected.double(), atol=tol["atol"], rtol=tol["rtol"]), (
        f"{name}: max |diff| {diff:.3g} exceeds atol {tol['atol']}"
    )


# ---------------------------------------------------------------------------------------------
# Official parity
# ---------------------------------------------------------------------------------------------


def test_unipc_matches_official_sampler_fixture():
    case, data = _load_case("sampler_unipc")
    const = case["constants"]
    schedule = make_schedule("unipc", const["steps"], const["shift"])
    _assert_close("timesteps", schedule.timesteps, data["timesteps"], case)
    assert torch.equal(schedule.sigmas, data["sigmas"])  # the table itself is exact

    outputs, latents, seen_t = [], [], []

    def stand_in(x, t):  # the analytic network of case.json
        seen_t.append(t.clone())
        v = torch.tanh(0.5 * x) * (float(t[0]) / 1000) + 0.1 * torch.cos(x)
        outputs.append(v[0])
        return v

    final = denoise(
        stand_in,
        data["x0"].unsqueeze(0),
        solver="unipc",
        steps=const["steps"],
        shift=const["shift"],
        callback=lambda i, n, t, x: latents.append(x[0]),
    )
    assert all(t.dtype == torch.float32 and t.shape == (1,) for t in seen_t)
    _assert_close("timesteps", torch.cat(seen_t), data["timesteps"], case)
    _assert_close("model_outputs", torch.stack(outputs), data["model_outputs"], case)
    _assert_close("latents", torch.stack(latents), data["latents"], case)
    _assert_close("final", final[0], data["final"], case)


@pytest.mark.parametrize("batched_cfg", [False, True], ids=["two-passes", "batched"])
def test_t2v_denoising_loop_matches_official(batched_cfg):
    dit_loading = pytest.importorskip("wan_kernel.models.dit_loading")
    case, data = _load_case("t2v_loop")
    const = case["constants"]
    dit = dit_loading.load_dit(FIXTURES / case["weights"]["model"]["path"])

    preds, latents = [], []

    def model_call(x, t, **kwargs):
        out = dit(x, t, **kwargs)
        preds.append(out)
        return out

    velocity = make_cfg_velocity(
        model_call,
        {"context": [data["context"]]},
        {"context": [data["context_null"]]},
        const["guide_scale"],
        None,
        const["steps"],
        batched_cfg=batched_cfg,
    )
    with torch.no_grad():
        final = denoise(
            velocity,
            data["noise"].unsqueeze(0),  # [1, 16, F, H, W]
            solver=const["solver"],
            steps=const["steps"],
            shift=const["shift"],
            callback=lambda i, n, t, x: latents.append(x[0]),
        )
    schedule = make_schedule(const["solver"], const["steps"], const["shift"])
    _assert_close("timesteps", schedule.timesteps, data["timesteps"], case)
    _assert_close("sigmas", schedule.sigmas, data["sigmas"], case)
    if batched_cfg:
        assert velocity.forwards == const["steps"]
        cond = torch.stack([p[0] for p in preds])
        uncond = torch.stack([p[1] for p in preds])
    else:
        assert velocity.forwards == 2 * const["steps"]
        cond = torch.stack([p[0] for p in preds[0::2]])
        uncond = torch.stack([p[0] for p in preds[1::2]])
    _assert_close("pred_cond", cond, data["pred_cond"], case)
    _assert_close("pred_uncond", uncond, data["pred_uncond"], case)
    _assert_close("latents", torch.stack(latents), data["latents"], case)
    _assert_close("final", final[0], data["final"], case)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 12.0])
def test_schedule_properties(solver, steps, shift):
    s = make_schedule(solver, steps, shift)
    assert s.sigmas.dtype == torch.float32 and s.timesteps.dtype == torch.float32
    assert s.sigmas.shape == (steps + 1,) and s.timesteps.shape == (steps,)
    assert s.num_steps == steps and s.solver == solver
    assert s.sigmas[-1].item() == 0.0
    assert (s.sigmas[1:] < s.sigmas[:-1]).all()
    assert (s.timesteps[1:] <= s.timesteps[:-1]).all()
    if solver == "unipc":
        # training table at shift 1 starts at float32(0.999); the shift maps it a little higher
        s_max = float(torch.tensor(0.999, dtype=torch.float32))
        expected_first = shift * s_max / (1 + (shift - 1) * s_max)
        assert s.sigmas[0].item() == pytest.approx(expected_first, abs=1e-7)
        assert s.timesteps[0].item() == 999.0
    else:
        assert s.sigmas[0].item() == 1.0
        assert s.timesteps[0].item() == 1000.0
    if solver in ("unipc", "dpm++"):
        assert torch.equal(s.timesteps, s.timesteps.floor())  # int64 truncation of sigma * 1000
        assert ((s.sigmas[:-1].double() * 1000 - s.timesteps.double()).abs() < 1.0001).all()
    else:
        assert torch.equal(s.timesteps, s.sigmas[:-1] * 1000)


def test_known_schedules():
    dpm = make_schedule("dpm++", 4, 5.0)
    # shift(s) = 5s / (1 + 4s) at s = 1, .75, .5, .25
    assert torch.allclose(dpm.sigmas, torch.tensor([1.0, 0.9375, 5 / 6, 0.625, 0.0]))
    assert dpm.timesteps.tolist() == [1000.0, 937.0, 833.0, 625.0]
    unipc = make_schedule("unipc", 4, 5.0)
    assert unipc.timesteps.tolist() == [999.0, 937.0, 833.0, 624.0]  # 0.999-based grid, truncated
    euler = make_schedule("euler", 4, 5.0)
    assert torch.allclose(euler.timesteps, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0]))
    flat = make_schedule("dpm++", 4, 1.0)
    assert torch.allclose(flat.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_solver_aliases_and_errors():
    assert make_schedule("vanilla", 3, 5.0).solver == "euler"
    assert make_schedule("UniPC", 3, 5.0).solver == "unipc"
    assert make_schedule("dpmpp", 3, 5.0).solver == "dpm++"
    with pytest.raises(InputError, match="unipc, dpm\\+\\+, euler"):
        make_schedule("ddim", 3, 5.0)
    with pytest.raises(InputError, match="steps"):
        make_schedule("unipc", 0, 5.0)
    with pytest.raises(InputError, match="steps"):
        make_schedule("unipc", 2.5, 5.0)
    with pytest.raises(InputError, match="steps is required"):
        make_schedule("unipc", None, 5.0)
    with pytest.raises(InputError, match="shift"):
        make_schedule("unipc", 3, -1.0)
    with pytest.raises(InputError, match="decreasing"):
        make_schedule("unipc", sigmas=[0.5, 0.8])
    with pytest.raises(InputError, match="either sigmas or timesteps"):
        make_schedule("unipc", sigmas=[0.5], timesteps=[500])
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        make_schedule("euler", sigmas=[1.5, 0.5])
    with pytest.raises(InputError, match="does not match"):
        make_schedule("euler", 3, sigmas=[0.9, 0.5])


def test_custom_sigmas_and_timesteps():
    s = make_schedule("dpm++", sigmas=[0.9555, 0.6, 0.2, 0.0])
    assert s.num_steps == 3
    assert torch.equal(s.sigmas, torch.tensor([0.9555, 0.6, 0.2, 0.0], dtype=torch.float32))
    assert s.timesteps.tolist() == [955.0, 600.0, 200.0]  # int64(955.5) truncates
    e = make_schedule("euler", sigmas=[0.9555, 0.6, 0.2])
    assert torch.allclose(e.timesteps, torch.tensor([955.5, 600.0, 200.0]))
    t = make_schedule("unipc", timesteps=[900, 500, 100])
    assert t.timesteps.tolist() == [900.0, 500.0, 100.0]
    assert torch.allclose(t.sigmas, torch.tensor([0.9, 0.5, 0.1, 0.0]))
    # denoise accepts the overrides and calls the model with those timesteps
    seen = []
    denoise(lambda x, tt: seen.append(tt[0].item()) or torch.zeros_like(x), torch.zeros(1, 3),
            solver="unipc", timesteps=[900, 500, 100])
    assert seen == [900.0, 500.0, 100.0]


# ---------------------------------------------------------------------------------------------
# Numerical behaviour
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_straight_path_is_solved_exactly(solver, order, steps):
    """For v = noise - x0 (constant), every solver lands on x0 from the path point at sigmas[0]."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 3, 5, generator=g)
    noise = torch.randn(2, 4, 3, 5, generator=g)
    sigma0 = make_schedule(solver, steps, 5.0).sigmas[0]
    start = (1 - sigma0) * x0 + sigma0 * noise
    out = denoise(lambda x, t: noise - x0, start, solver=solver, steps=steps, shift=5.0, order=order)
    assert (out - x0).abs().max().item() < 1e-5


def _gaussian_flow_error(solver: str, steps: int, shift: float) -> float:
    """Max error of the sampler on the exact probability-flow ODE of Gaussian data N(mu, c^2).

    x(sigma) = m(sigma) + s(sigma) z with m = (1 - sigma) mu, s = sqrt((1 - sigma)^2 c^2 + sigma^2);
    the velocity is dx/dsigma = -mu + s'(sigma) (x - m) / s, and the exact end point is mu + c z.
    """
    mu, c = 0.5, 0.8
    schedule = make_schedule(solver, steps, shift)
    sig = schedule.sigmas.double().tolist()

    def m(s):
        return (1 - s) * mu

    def sd(s):
        return math.sqrt((1 - s) ** 2 * c * c + s * s)

    calls = [0]

    def velocity(x, t):
        s = sig[calls[0]]  # the exact sigma of this step (t may be truncated)
        calls[0] += 1
        ds = (-(1 - s) * c * c + s) / sd(s)
        return (-mu + ds * (x.double() - m(s)) / sd(s)).float()

    z = torch.randn(1, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = (m(sig[0]) + sd(sig[0]) * z).float()
    out = denoise(velocity, start, solver=solver, steps=steps, shift=shift).double()
    exact = mu + c * (start.double() - m(sig[0])) / sd(sig[0])
    assert calls[0] == steps
    return (out - exact).abs().max().item()


@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_solvers_converge_and_multistep_beats_euler(shift):
    errors = {
        solver: [_gaussian_flow_error(solver, steps, shift) for steps in (10, 20, 40, 80)]
        for solver in SOLVERS
    }
    for solver, errs in errors.items():
        assert errs[-1] < 0.3 * errs[0], (solver, errs)
    # Euler is first order: each doubling of the steps about halves the error
    for coarse, fine in zip(errors["euler"], errors["euler"][1:]):
        assert 0.4 < fine / coarse < 0.6, errors["euler"]
    for solver in ("unipc", "dpm++"):
        assert errors[solver][-1] < 0.5 * errors["euler"][-1], errors
        assert errors[solver][-1] < 0.02, errors


def _field(x, t):
    return torch.tanh(0.5 * x) * (float(t) / 1000) + 0.1 * torch.cos(x) - 0.3 * x


def _assert_denoise_matches(ref, solver, steps, *, seed):
    """``denoise`` (shift 5) agrees with stepping the diffusers scheduler ``ref`` on ``_field``."""
    x = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
    expected = x.clone()
    for t in ref.timesteps:
        expected = ref.step(_field(expected, t), t, expected, return_dict=False)[0]
    got = denoise(lambda y, t: _field(y, t[0]), x, solver=solver, steps=steps, shift=5.0)
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers
@pytest.mark.parametrize("steps", [1, 4, 10])
def test_dpm_matches_diffusers_dpmsolver_multistep(steps):
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("dpm++", steps, 5.0)
    ref = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
        use_flow_sigmas=True, flow_shift=1.0, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero",
    )
    ref.set_timesteps(steps)
    ref.sigmas, ref.timesteps = schedule.sigmas.clone(), schedule.timesteps.to(torch.int64)
    _assert_denoise_matches(ref, "dpm++", steps, seed=3)


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_unipc_matches_diffusers_unipc_multistep(steps):
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("unipc", steps, 5.0)
    ref = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
        use_flow_sigmas=True, flow_shift=1.0, predict_x0=True, solver_type="bh2",
        lower_order_final=True, final_sigmas_type="zero",
    )
    ref.set_timesteps(steps)
    ref.sigmas, ref.timesteps = schedule.sigmas.clone(), schedule.timesteps.to(torch.int64)
    _assert_denoise_matches(ref, "unipc", steps, seed=4)


def test_euler_matches_diffusers_flow_match_euler_on_our_grid():
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("euler", 6, 5.0)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    ref.set_timesteps(sigmas=schedule.sigmas[:-1].numpy())
    assert torch.allclose(ref.sigmas, schedule.sigmas)
    _assert_denoise_matches(ref, "euler", 6, seed=5)


def test_euler_step_is_the_plain_update():
    schedule = make_schedule("euler", 3, 2.0)
    x, v = torch.randn(5), torch.randn(5)
    out = EulerSolver(schedule).step(0, x, v)
    assert torch.equal(out, x + v * (schedule.sigmas[1] - schedule.sigmas[0]))


# ---------------------------------------------------------------------------------------------
# denoise API
# ---------------------------------------------------------------------------------------------


def test_denoise_calls_and_callback():
    noise = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    calls, progress = [], []

    def velocity(x, t):
        calls.append((x.shape, x.dtype, t.shape, t.dtype, t[0].item()))
        assert torch.equal(t, t[0].expand(3))  # one timestep for the whole batch
        return torch.zeros_like(x)

    out = denoise(velocity, noise, solver="dpm++", steps=5, shift=3.0, generator=torch.Generator(),
                  callback=lambda i, n, t, x: progress.append((i, n, t[0].item(), x.shape)))
    expected_t = make_schedule("dpm++", 5, 3.0).timesteps.tolist()
    assert [c[4] for c in calls] == expected_t
    assert all(c[0] == (3, 2, 4) and c[1] == torch.float32 for c in calls)
    assert all(c[2] == (3,) and c[3] == torch.float32 for c in calls)
    assert [(p[0], p[1], p[2]) for p in progress] == [(i, 5, expected_t[i]) for i in range(5)]
    assert out.dtype == torch.float32 and out.shape == noise.shape
    # v = 0: the flow stands still (x0 prediction = x at every step), so the sample is unchanged
    assert torch.allclose(out, noise, atol=1e-6)


def test_denoise_input_errors():
    noise = torch.randn(1, 4)
    with pytest.raises(InputError, match="unknown solver"):
        denoise(lambda x, t: x, noise, solver="heun", steps=3, shift=5.0)
    with pytest.raises(InputError, match="returned"):
        denoise(lambda x, t: x[:, :2], noise, solver="euler", steps=3, shift=5.0)
    with pytest.raises(InputError, match="floating"):
        denoise(lambda x, t: x, torch.zeros(1, 4, dtype=torch.int64), solver="euler", steps=3, shift=5.0)
    with pytest.raises(InputError, match="order"):
        denoise(lambda x, t: x, noise, solver="unipc", steps=3, shift=5.0, order=4)
    with pytest.raises(InputError, match="sigma 1"):
        denoise(lambda x, t: x, noise, solver="unipc", sigmas=[1.0, 0.5, 0.2], order=3)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_custom_sigmas_from_one_stay_finite(solver, order):
    sigmas = [0.999 if solver == "unipc" and order == 3 else 1.0, 0.7, 0.4, 0.2, 0.1]
    out = denoise(lambda x, t: torch.tanh(x) - 0.3 * x, torch.randn(1, 8),
                  solver=solver, sigmas=sigmas, order=order)
    assert torch.isfinite(out).all()


def test_half_precision_noise_is_carried_in_float32():
    noise = torch.randn(1, 8).to(torch.bfloat16)
    out = denoise(lambda x, t: torch.ones_like(x), noise, solver="unipc", steps=3, shift=5.0)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("cls", [UniPCSolver, DPMSolverPP])
def test_multistep_solvers_refuse_out_of_order_steps(cls):
    solver = cls(make_schedule("unipc", 4, 5.0))
    x = torch.zeros(3)
    solver.step(0, x, x)
    with pytest.raises(RuntimeError, match="in order"):
        solver.step(2, x, x)


def test_make_solver_picks_the_class():
    assert isinstance(make_solver(make_schedule("unipc", 2, 5.0)), UniPCSolver)
    assert isinstance(make_solver(make_schedule("dpm++", 2, 5.0)), DPMSolverPP)
    assert isinstance(make_solver(make_schedule("euler", 2, 5.0)), EulerSolver)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------


class EveryOther(CfgSchedule):
    """Fake schedule: guidance on even steps only; records its calls."""

    name = "every_other_test"

    def __init__(self):
        self.calls = []

    def applies(self, step, num_steps, apply_ratio):
        self.calls.append((step, num_steps, apply_ratio))
        return step % 2 == 0


class FakeModel:
    """``v = x * scale_of(context) + t / 1000``, per sample; counts forwards and batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, *, context, y=None):
        self.batches.append(x.shape[0])
        assert len(context) == x.shape[0] and t.shape == (x.shape[0],)
        scale = torch.stack([c.sum() for c in context]).view(-1, *([1] * (x.dim() - 1)))
        out = x * scale + t.view(-1, *([1] * (x.dim() - 1))) / 1000
        if y is not None:
            out = out + y
        return out


def test_combine_and_guided_velocity():
    c, u = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(combine_cfg(c, u, 5.0), torch.tensor([6.0, 1.0]))
    assert combine_cfg(c.half(), u.half(), 2.0).dtype == torch.float32
    called = []
    out = guided_velocity(lambda: c, lambda: called.append(1) or u, 5.0, apply=False)
    assert torch.equal(out, c) and called == []
    assert torch.equal(guided_velocity(lambda: c, lambda: u, 3.0, apply=True), u + 3.0 * (c - u))


@pytest.mark.parametrize("batched_cfg", [False, True])
def test_cfg_velocity_counts_forwards_with_schedule(batched_cfg):
    model, schedule = FakeModel(), EveryOther()
    ctx, ctx_null = [torch.full((3, 4), 0.1)], [torch.full((2, 4), -0.05)]
    velocity = make_cfg_velocity(model, {"context": ctx}, {"context": ctx_null}, 4.0, schedule, 5,
                                 apply_ratio=0.7, batched_cfg=batched_cfg)
    noise = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(0))
    out = denoise(velocity, noise, solver="euler", steps=5, shift=5.0)

    assert schedule.calls == [(i, 5, 0.7) for i in range(5)]
    assert velocity.applied == [True, False, True, False, True]
    if batched_cfg:
        assert velocity.forwards == 5 and model.batches == [2, 1, 2, 1, 2]
    else:
        assert velocity.forwards == 8 and model.batches == [1] * 8

    # same result as a hand-written loop
    sched = make_schedule("euler", 5, 5.0)
    x = noise.clone()
    for i in range(5):
        t = sched.timesteps[i].expand(1)
        c = model(x, t, context=ctx)
        v = model(x, t, context=ctx_null) + 4.0 * (c - model(x, t, context=ctx_null)) if i % 2 == 0 else c
        x = x + v * (sched.sigmas[i + 1] - sched.sigmas[i])
    assert torch.allclose(out, x, atol=1e-6)


def test_batched_cfg_matches_two_passes_with_tensor_args():
    ctx = [torch.full((3, 4), 0.1), torch.full((5, 4), 0.2)]
    ctx_null = [torch.full((2, 4), -0.05), torch.full((2, 4), 0.0)]
    y = torch.randn(2, 3)
    results = []
    for batched in (False, True):
        model = FakeModel()
        velocity = make_cfg_velocity(model, {"context": ctx, "y": y}, {"context": ctx_null, "y": y}, 5.0,
                                     None, 4, batched_cfg=batched)
        results.append(denoise(velocity, torch.ones(2, 3), solver="unipc", steps=4, shift=5.0))
        assert velocity.forwards == (4 if batched else 8)
        assert model.batches == ([4] * 4 if batched else [2] * 8)
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_cfg_velocity_without_guidance_runs_one_forward():
    model = FakeModel()
    ctx = [torch.full((3, 4), 0.1)]
    velocity = make_cfg_velocity(model, {"context": ctx}, {"context": ctx}, 1.0, None, 3)
    denoise(velocity, torch.ones(1, 3), solver="dpm++", steps=3, shift=5.0)
    assert velocity.forwards == 3
    model2 = FakeModel()
    no_neg = make_cfg_velocity(model2, {"context": ctx}, None, 5.0, None, 3)
    denoise(no_neg, torch.ones(1, 3), solver="dpm++", steps=3, shift=5.0)
    assert no_neg.forwards == 3


def test_cfg_velocity_errors():
    model = FakeModel()
    ctx = [torch.ones(1, 4)]
    velocity = make_cfg_velocity(model, {"context": ctx}, {"context": ctx}, 5.0, None, 2)
    denoise(velocity, torch.ones(1, 3), solver="euler", steps=2, shift=5.0)
    with pytest.raises(InputError, match="built for 2 steps"):
        velocity(torch.ones(1, 3), torch.zeros(1))
    velocity.reset()
    velocity(torch.ones(1, 3), torch.zeros(1))
    assert velocity.forwards == 2
    schedule = EveryOther()
    passthrough = make_cfg_velocity(model, {"context": ctx}, {"context": ctx}, 5.0, schedule, 2, apply_ratio=None)
    passthrough(torch.ones(1, 3), torch.zeros(1))
    assert schedule.calls == [(0, 2, None)]
    with pytest.raises(InputError, match="apply_ratio"):
        make_cfg_velocity(model, {"context": ctx}, {"context": ctx}, 5.0, None, 2, apply_ratio=1.5)
    with pytest.raises(InputError, match="num_steps"):
        make_cfg_velocity(model, {"context": ctx}, {"context": ctx}, 5.0, None, 0)
    with pytest.raises(InputError, match="applies"):
        make_cfg_velocity(model, {"context": ctx}, {"context": ctx}, 5.0, object(), 2)
    with pytest.raises(InputError, match="same argument names"):
        make_cfg_velocity(model, {"context": ctx, "y": None}, {"context": ctx}, 5.0, None, 2,
                          batched_cfg=True)


def test_cfg_velocity_follows_an_installed_cfg_schedule_plugin():
    from wan_kernel.errors import PluginError
    from wan_kernel.plugins import resolve

    try:
        schedule = resolve("cfg_schedule", "late")
    except PluginError as error:
        pytest.skip(f"no 'late' CFG schedule installed: {error}")
    model = FakeModel()
    ctx = [torch.full((3, 4), 0.1)]
    velocity = make_cfg_velocity(model, {"context": ctx}, {"context": [torch.zeros(2, 4)]}, 5.0, schedule, 10,
                                 apply_ratio=0.3)
    denoise(velocity, torch.ones(1, 3), solver="unipc", steps=10, shift=5.0)
    pattern = schedule.pattern(10, 0.3)
    assert "".join("A" if a else "S" for a in velocity.applied) == pattern
    assert velocity.forwards == 10 + pattern.count("A")
