"""Parity of the precomputed scheduler tables with diffusers' own schedulers."""

import ast
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ilf_deploy.core import schedulers
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.schedulers import (
    DIT_SCHEDULER_CONFIG,
    FLUX_DEV_SCHEDULER_CONFIG,
    FLUX_SCHNELL_SCHEDULER_CONFIG,
    PIXART_SCHEDULER_CONFIG,
    SANA_SCHEDULER_CONFIG,
    SD3_SCHEDULER_CONFIG,
    StepCoefficients,
    alphas_cumprod,
    flow_shift_depends_on_size,
    scheduler_coefficients,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PIX = PIXART_SCHEDULER_CONFIG
CONFIGS = {
    "pixart": PIX,
    "dpm_trailing_no_lof": {**PIX, "timestep_spacing": "trailing", "lower_order_final": False},
    "dpm_order1": {**PIX, "solver_order": 1},
    "dpm_heun_v_sigma_min": {
        **PIX,
        "solver_type": "heun",
        "prediction_type": "v_prediction",
        "final_sigmas_type": "sigma_min",
        "lower_order_final": False,
    },
    "dpm_leading_cosine_clipped": {
        **PIX,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "beta_schedule": "squaredcos_cap_v2",
        "lambda_min_clipped": -5.1,
    },
    "dpm_scaled_euler_at_final": {
        **PIX,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "euler_at_final": True,
        "final_sigmas_type": "sigma_min",
    },
    # flow DPM-Solver (Sana): flow sigmas, x0 = x - sigma * v
    "sana": SANA_SCHEDULER_CONFIG,
    "flow_dpm_heun_order1_shift6": {
        **SANA_SCHEDULER_CONFIG,
        "solver_type": "heun",
        "flow_shift": 6.0,
        "lower_order_final": False,
        "final_sigmas_type": "sigma_min",
    },
    "flow_dpm_order1_euler_at_final": {**SANA_SCHEDULER_CONFIG, "solver_order": 1, "euler_at_final": True},
    "ddim_dit": DIT_SCHEDULER_CONFIG,
    "ddim_leading_offset1": {**DIT_SCHEDULER_CONFIG, "steps_offset": 1, "set_alpha_to_one": False},
    "ddim_linspace_v": {
        **DIT_SCHEDULER_CONFIG,
        "timestep_spacing": "linspace",
        "prediction_type": "v_prediction",
    },
    "ddim_trailing": {**DIT_SCHEDULER_CONFIG, "timestep_spacing": "trailing"},
}


def _diffusers_scheduler(cfg: dict, num_steps: int):
    sched = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    sched.set_timesteps(num_steps)
    return sched


def _run_coefficients(steps, x, eps, x0_hist):
    """One step the way the deployed runtime does it."""
    x0 = steps.x0_x * x + steps.x0_eps * eps
    x_next = steps.x * x + steps.eps * eps + sum(h * x0_hist[-1 - j] for j, h in enumerate(steps.history))
    x0_hist.append(x0)
    return x_next


@pytest.mark.parametrize("num_steps", [10, 12, 20, 50])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_parity_with_diffusers(name: str, num_steps: int) -> None:
    cfg = CONFIGS[name]
    sched = _diffusers_scheduler(cfg, num_steps)
    steps = scheduler_coefficients(cfg, num_steps)
    assert [s.timestep for s in steps] == sched.timesteps.tolist()

    rng = np.random.default_rng(num_steps)
    x = rng.standard_normal((2, 4, 8, 8))
    x0_hist: list[np.ndarray] = []
    for c, t in zip(steps, sched.timesteps, strict=True):
        eps = rng.standard_normal(x.shape)
        ref = sched.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.double().numpy()
        ours = _run_coefficients(c, x, eps, x0_hist)
        err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        assert err <= 1e-6, f"{name} n={num_steps} t={int(t)}: rel err {err:.2e}"
        x = ref  # follow diffusers' trajectory


@pytest.mark.parametrize("num_steps", [1, 2, 14, 15, 100])
@pytest.mark.parametrize("name", ["pixart", "dpm_trailing_no_lof", "ddim_leading_offset1", "sana"])
def test_step_parity_edge_step_counts(name: str, num_steps: int) -> None:
    # around the lower_order_final switch (< 15 steps) and the degenerate 1-2 step schedules
    test_step_parity_with_diffusers(name, num_steps)


def test_solver_order_structure() -> None:
    # PixArt: first step first-order (no history), then second order, final step Euler (sigma -> 0)
    steps = scheduler_coefficients(PIX, 20)
    assert steps[0].history == () and steps[-1].history == ()
    assert all(len(s.history) == 1 for s in steps[1:-1])
    assert (steps[-1].x, steps[-1].eps) == (steps[-1].x0_x, steps[-1].x0_eps)  # lands on its x0
    assert [s.prev_timestep for s in steps[:-1]] == [s.timestep for s in steps[1:]]
    assert steps[-1].prev_timestep == 0.0
    # solver_order=1 and DDIM are first-order everywhere
    for cfg in (CONFIGS["dpm_order1"], DIT_SCHEDULER_CONFIG):
        assert all(s.history == () for s in scheduler_coefficients(cfg, 20))
    # DDIM: prev_timestep is diffusers' t - T // n
    ddim = scheduler_coefficients(DIT_SCHEDULER_CONFIG, 20)
    assert [s.prev_timestep for s in ddim] == [max(s.timestep - 50, 0.0) for s in ddim]


@pytest.mark.parametrize(
    "name",
    ["pixart", "dpm_leading_cosine_clipped", "dpm_scaled_euler_at_final", "ddim_leading_offset1", "sana"],
)
def test_alphas_cumprod_and_sigmas_match_diffusers(name: str) -> None:
    cfg = CONFIGS[name]
    sched = _diffusers_scheduler(cfg, 20)
    ours = alphas_cumprod(cfg)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, sched.alphas_cumprod.numpy())  # bit for bit
    if cfg["_class_name"] == "DPMSolverMultistepScheduler":
        ts, sigmas = schedulers._dpm_sigmas({**schedulers._DEFAULTS[cfg["_class_name"]], **cfg}, 20)
        np.testing.assert_array_equal(ts, sched.timesteps.numpy())
        # torch's float32 sqrt is not always correctly rounded: allow one ulp
        np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=2.4e-7, atol=0)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({**PIX, "use_karras_sigmas": True}, "use_karras_sigmas"),
        ({**PIX, "use_flow_sigmas": True}, "use_flow_sigmas"),  # epsilon on flow sigmas
        ({**SANA_SCHEDULER_CONFIG, "use_karras_sigmas": True}, "use_karras_sigmas"),
        ({**DIT_SCHEDULER_CONFIG, "prediction_type": "flow_prediction"}, "prediction_type"),
        ({**PIX, "thresholding": True}, "thresholding"),
        ({**PIX, "algorithm_type": "sde-dpmsolver++"}, "sde-dpmsolver"),
        ({**PIX, "solver_order": 3}, "solver_order"),
        ({**PIX, "variance_type": "learned_range"}, "learned_range"),
        ({**PIX, "prediction_type": "flow_prediction"}, "prediction_type"),
        ({**DIT_SCHEDULER_CONFIG, "clip_sample": True}, "clip_sample"),
        ({**DIT_SCHEDULER_CONFIG, "thresholding": True}, "thresholding"),
        (
            {k: v for k, v in DIT_SCHEDULER_CONFIG.items() if k != "clip_sample"},
            "clip_sample",
        ),  # default True
        ({**DIT_SCHEDULER_CONFIG, "_class_name": "EulerDiscreteScheduler"}, "DDIMScheduler"),
        ({"beta_start": 0.0001}, "unsupported scheduler"),
    ],
)
def test_unsupported_configs_raise(cfg: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        scheduler_coefficients(cfg, 20)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("num_steps", [0, -3, 1001, 2.5, True])
def test_bad_step_counts_raise(num_steps) -> None:
    with pytest.raises(ConfigError, match="num_steps"):
        scheduler_coefficients(PIX, num_steps)


def test_repeated_timesteps_raise() -> None:
    # 1000 "leading" steps put every timestep at 0: diffusers would divide by h = 0
    with pytest.raises(ConfigError, match="non-finite"):
        scheduler_coefficients({**PIX, "timestep_spacing": "leading"}, 1000)


def test_to_dict_round_trip() -> None:
    steps = scheduler_coefficients(PIX, 12)
    dumped = json.loads(json.dumps([s.to_dict() for s in steps]))
    restored = [StepCoefficients.from_dict(d) for d in dumped]
    assert restored == steps
    assert isinstance(restored[3].history, tuple) and len(restored[3].history) == 1
    assert set(dumped[0]) == {"timestep", "prev_timestep", "x", "eps", "x0_x", "x0_eps", "history"}
    with pytest.raises(ConfigError, match="bad scheduler step"):
        StepCoefficients.from_dict({"timestep": 1.0})


def test_shipped_configs_build_in_diffusers() -> None:
    pix = _diffusers_scheduler(PIX, 20)
    assert type(pix).__name__ == "DPMSolverMultistepScheduler" and pix.config.solver_order == 2
    assert math.isinf(pix.config.lambda_min_clipped)
    dit = _diffusers_scheduler(DIT_SCHEDULER_CONFIG, 50)
    assert type(dit).__name__ == "DDIMScheduler" and not dit.config.clip_sample
    assert dit.timesteps.tolist()[:2] == [980, 960]


def test_module_imports_numpy_only() -> None:
    tree = ast.parse(Path(schedulers.__file__).read_text())
    roots = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not roots & {"torch", "diffusers", "transformers"}
    assert roots <= {"__future__", "math", "dataclasses", "numbers", "typing", "numpy", "ilf_deploy"}


# ---- FlowMatchEulerDiscreteScheduler (SD3, Flux) ----------------------------------------------

SD3 = SD3_SCHEDULER_CONFIG
DEV = FLUX_DEV_SCHEDULER_CONFIG
# name: (config, pipeline, image_seq_len)
FLOW_CASES = {
    "sd3": (SD3, "sd3", None),
    "flux_dev_16": (DEV, "flux", 16),
    "flux_dev_64": (DEV, "flux", 64),
    "flux_dev_4096": (DEV, "flux", 4096),
    "flux_schnell": (FLUX_SCHNELL_SCHEDULER_CONFIG, "flux", None),
    # the options implemented beyond the shipped configs
    "sd3_dynamic_1024": ({**SD3, "use_dynamic_shifting": True}, "sd3", 1024),
    "sd3_shift_terminal": ({**SD3, "shift": 2.7, "shift_terminal": 0.1}, "sd3", None),
    "sd3_karras": ({**SD3, "use_karras_sigmas": True}, "sd3", None),
    "flux_dev_linear_exponential": (
        {**DEV, "time_shift_type": "linear", "use_exponential_sigmas": True},
        "flux",
        256,
    ),
    "flux_dev_karras_sigma_min": ({**DEV, "use_karras_sigmas": True, "sigma_min": 0.01}, "flux", 4096),
    "flux_flow_sigmas": ({**SD3, "use_flow_sigmas": True}, "flux", None),  # Flux then passes no sigmas
}


def _pipeline_scheduler(cfg: dict, num_steps: int, pipeline: str, image_seq_len: int | None):
    """The scheduler after the pipeline's own "5. Prepare timesteps" (diffusers 0.42), verbatim."""
    from diffusers.pipelines.flux import pipeline_flux
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as pipeline_sd3

    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
    if pipeline == "flux":  # FluxPipeline.__call__
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if hasattr(sched.config, "use_flow_sigmas") and sched.config.use_flow_sigmas:
            sigmas = None
        mu = pipeline_flux.calculate_shift(
            image_seq_len if image_seq_len is not None else 4096,  # unused without dynamic shifting
            sched.config.get("base_image_seq_len", 256),
            sched.config.get("max_image_seq_len", 4096),
            sched.config.get("base_shift", 0.5),
            sched.config.get("max_shift", 1.15),
        )
        pipeline_flux.retrieve_timesteps(sched, num_steps, "cpu", sigmas=sigmas, mu=mu)
        sched.set_begin_index(0)
    else:  # StableDiffusion3Pipeline.__call__ with sigmas=None, mu=None
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", None):
            kwargs["mu"] = pipeline_sd3.calculate_shift(
                image_seq_len,
                sched.config.get("base_image_seq_len", 256),
                sched.config.get("max_image_seq_len", 4096),
                sched.config.get("base_shift", 0.5),
                sched.config.get("max_shift", 1.16),
            )
        pipeline_sd3.retrieve_timesteps(sched, num_steps, "cpu", sigmas=None, **kwargs)
    return sched


def _velocity(x: np.ndarray, t: float) -> np.ndarray:
    """A fixed, deterministic stand-in for the transformer: depends on x and t."""
    return np.tanh(x) * (0.5 + t / 1000.0) - 0.3 * x + 0.1 * np.cos(3.0 * x + t / 100.0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("num_steps", [1, 2, 4, 10, 28])
@pytest.mark.parametrize("name", list(FLOW_CASES))
def test_flow_match_parity_with_diffusers(name: str, num_steps: int) -> None:
    cfg, pipeline, seq_len = FLOW_CASES[name]
    if name == "sd3_shift_terminal" and num_steps == 1:
        pytest.skip("one step stretched to shift_terminal is 0/0 in diffusers too (see below)")
    sched = _pipeline_scheduler(cfg, num_steps, pipeline, seq_len)
    steps = scheduler_coefficients(cfg, num_steps, seq_len, pipeline=pipeline)
    assert [s.timestep for s in steps] == sched.timesteps.tolist()  # float32 values, exactly
    assert [s.prev_timestep for s in steps] == [*sched.timesteps.tolist()[1:], 0.0]
    assert [-s.x0_eps for s in steps] == sched.sigmas.tolist()[:-1]
    assert all((s.x, s.x0_x, s.history) == (1.0, 1.0, ()) for s in steps)

    # two independent trajectories: diffusers' pipeline loop, and the float64 replay of the table
    noise = np.random.default_rng(num_steps).standard_normal((2, 16, 8, 8))
    ref, ours = torch.from_numpy(noise), noise.copy()
    for c, t in zip(steps, sched.timesteps, strict=True):
        v_ref = torch.from_numpy(_velocity(ref.numpy(), float(t)))
        ref = sched.step(v_ref, t, ref, return_dict=False)[0]
        assert ref.dtype == torch.float64
        v = _velocity(ours, c.timestep)
        x0 = c.x0_x * ours + c.x0_eps * v  # x0 = x - sigma * v
        ours = _run_coefficients(c, ours, v, [])
        err = np.linalg.norm(ours - ref.numpy()) / np.linalg.norm(ref.numpy())
        assert err <= 1e-6, f"{name} n={num_steps} t={float(t)}: rel err {err:.2e}"
    np.testing.assert_array_equal(x0, ours)  # the last step lands on its x0 (sigma_next = 0)


def test_flow_match_step_size_matches_diffusers_float32() -> None:
    sched = _pipeline_scheduler(DEV, 28, "flux", 4096)
    steps = scheduler_coefficients(DEV, 28, 4096, pipeline="flux")
    dt = (sched.sigmas[1:] - sched.sigmas[:-1]).tolist()  # step(): float32 sigma_next - sigma
    assert [s.eps for s in steps] == dt


def test_flow_match_mu_changes_with_image_size() -> None:
    sizes = (16, 64, 4096)
    ts = {n: [s.timestep for s in scheduler_coefficients(DEV, 10, n, pipeline="flux")] for n in sizes}
    assert ts[16] != ts[64] != ts[4096]
    assert ts[16][0] == ts[4096][0] == 1000.0  # sigma 1 is a fixed point of the shift
    assert ts[16][1] < ts[64][1] < ts[4096][1]  # larger images stay noisier longer


def test_flow_match_pipelines_prepare_different_sigmas() -> None:
    # why scheduler_coefficients takes pipeline=: the same config gives other schedules
    sd3 = [s.timestep for s in scheduler_coefficients(FLUX_SCHNELL_SCHEDULER_CONFIG, 4, pipeline="sd3")]
    flux = [s.timestep for s in scheduler_coefficients(FLUX_SCHNELL_SCHEDULER_CONFIG, 4, pipeline="flux")]
    assert flux == [1000.0, 750.0, 500.0, 250.0]
    assert sd3 == [1000.0, 667.0, 334.0, 1.0]
    sd3_last = scheduler_coefficients(SD3, 28, pipeline="sd3")[-1].x0_eps
    flux_last = scheduler_coefficients(SD3, 28, pipeline="flux")[-1].x0_eps
    assert abs(sd3_last - flux_last) > 0.09


def test_flow_shift_depends_on_size() -> None:
    assert flow_shift_depends_on_size(DEV)
    assert not flow_shift_depends_on_size(FLUX_SCHNELL_SCHEDULER_CONFIG)
    assert not flow_shift_depends_on_size(SD3)
    assert flow_shift_depends_on_size({**SD3, "use_dynamic_shifting": True})
    assert not flow_shift_depends_on_size(PIX)
    with pytest.raises(ConfigError, match="unsupported scheduler"):
        flow_shift_depends_on_size({})
    # sizes do not matter without dynamic shifting, and are not needed
    sized = scheduler_coefficients(SD3, 10, 4096, pipeline="sd3")
    assert scheduler_coefficients(SD3, 10, pipeline="sd3") == sized


@pytest.mark.parametrize(
    ("cfg", "kwargs", "match"),
    [
        (DEV, {"pipeline": "flux"}, "depends on the image size"),
        ({**SD3, "use_dynamic_shifting": True}, {"pipeline": "sd3"}, "depends on the image size"),
        (DEV, {"pipeline": "flux", "image_seq_len": 0}, "image_seq_len"),
        (DEV, {"pipeline": "flux", "image_seq_len": 64.0}, "image_seq_len"),
        ({**DEV, "max_shift": None}, {"pipeline": "flux", "image_seq_len": 64}, "numeric"),
        ({**DEV, "max_image_seq_len": 256}, {"pipeline": "flux", "image_seq_len": 64}, "max_image_seq_len"),
        (SD3, {}, "pipeline"),
        (SD3, {"pipeline": "pixart"}, "pipeline"),
        ({**SD3, "stochastic_sampling": True}, {"pipeline": "sd3"}, "stochastic_sampling"),
        ({**SD3, "invert_sigmas": True}, {"pipeline": "sd3"}, "invert_sigmas"),
        ({**SD3, "use_beta_sigmas": True}, {"pipeline": "sd3"}, "use_beta_sigmas"),
        (
            {**SD3, "use_karras_sigmas": True, "use_exponential_sigmas": True},
            {"pipeline": "sd3"},
            "exclude each other",
        ),
        ({**DEV, "time_shift_type": "cosine"}, {"pipeline": "flux", "image_seq_len": 64}, "time_shift_type"),
        ({**SD3, "num_train_timesteps": 0}, {"pipeline": "sd3"}, "num_train_timesteps"),
        ({**SD3, "shift_terminal": 0.1}, {"pipeline": "sd3", "num_steps": 1}, "non-finite"),
    ],
)
def test_flow_match_unsupported_raise(cfg: dict, kwargs: dict, match: str) -> None:
    kwargs = {"num_steps": 10, **kwargs}
    with pytest.raises(ConfigError, match=match) as info:
        scheduler_coefficients(cfg, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("num_steps", [0, -1, 2.5, True])
def test_flow_match_bad_step_counts_raise(num_steps) -> None:
    with pytest.raises(ConfigError, match="num_steps"):
        scheduler_coefficients(SD3, num_steps, pipeline="sd3")


def test_flow_match_has_no_alphas_cumprod() -> None:
    with pytest.raises(ConfigError, match="flow-matching"):
        alphas_cumprod(SD3)


def test_flow_match_to_dict_round_trip() -> None:
    steps = scheduler_coefficients(DEV, 28, 4096, pipeline="flux")
    dumped = json.loads(json.dumps([s.to_dict() for s in steps]))
    assert [StepCoefficients.from_dict(d) for d in dumped] == steps


def test_shipped_flow_configs_build_in_diffusers() -> None:
    init_keys = set(inspect.signature(diffusers.FlowMatchEulerDiscreteScheduler.__init__).parameters)
    shipped = ((DEV, 3.0, True), (FLUX_SCHNELL_SCHEDULER_CONFIG, 1.0, False), (SD3, 3.0, False))
    for cfg, shift, dynamic in shipped:
        assert set(cfg) - {"_class_name"} <= init_keys  # nothing diffusers would ignore
        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
        assert (sched.config.shift, sched.config.use_dynamic_shifting) == (shift, dynamic)
