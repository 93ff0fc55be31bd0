"""Parity of the precomputed scheduler tables with diffusers' own schedulers."""

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ilf_deploy import schedulers
from ilf_deploy.errors import ConfigError
from ilf_deploy.schedulers import (
    DIT_SCHEDULER_CONFIG,
    PIXART_SCHEDULER_CONFIG,
    StepCoefficients,
    alphas_cumprod,
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
@pytest.mark.parametrize("name", ["pixart", "dpm_trailing_no_lof", "ddim_leading_offset1"])
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
    "name", ["pixart", "dpm_leading_cosine_clipped", "dpm_scaled_euler_at_final", "ddim_leading_offset1"]
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
        ({**PIX, "use_flow_sigmas": True}, "use_flow_sigmas"),
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
