"""Diffusion schedulers precomputed as per-step linear combinations.

A deployed runtime needs neither diffusers nor torch: for each step ``c`` of
``scheduler_coefficients(config, n)`` it does::

    x0_i = c.x0_x * x + c.x0_eps * eps
    x_next = c.x * x + c.eps * eps + sum(h * x0_hist[-1 - j] for j, h in enumerate(c.history))
    x0_hist.append(x0_i)

where ``eps`` is the (guided) model output: epsilon, or v for v_prediction. The tables mirror diffusers 0.42's
``DPMSolverMultistepScheduler`` (dpmsolver++, order 1/2) and ``DDIMScheduler``
(eta=0): the same timesteps, the same float32 noise schedule (betas,
alphas_cumprod and DPM sigmas are float32 torch tensors in diffusers) and the
same float32 rounding of the per-step scalars, so a float64 runtime tracks
diffusers' own trajectory to ~1e-7. Everything non-linear (thresholding,
clipping) or stochastic (SDE variants) is refused with a ``ConfigError``.

``prev_timestep`` is the training timestep whose noise level a step moves to
(for DDIM it is diffusers' ``t - T // n``, which under "linspace" spacing is not
always the next step's timestep); a step that ends the schedule (clean sample,
or the ``alphas_cumprod[0]`` noise level) has ``prev_timestep = 0.0``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import Any, NoReturn

import numpy as np

from ilf_deploy.errors import ConfigError

# scheduler/scheduler_config.json of PixArt-alpha/PixArt-XL-2-512x512 (diffusers'
# conversion script saves a default DPMSolverMultistepScheduler()); PixArt-sigma
# ships the same.
PIXART_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lambda_min_clipped": -float("inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}

# DDIM with DiT's training schedule (linear betas 1e-4..0.02 over 1000 steps),
# no clipping (DiT samples latents), diffusers' DDIM defaults otherwise.
DIT_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

# diffusers' constructor defaults, applied to keys a config file leaves out.
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "thresholding": False,
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "DPMSolverMultistepScheduler": {
        **_COMMON_DEFAULTS,
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "timestep_spacing": "linspace",
    },
    "DDIMScheduler": {
        **_COMMON_DEFAULTS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "timestep_spacing": "leading",
    },
}
_PREDICTION_TYPES = ("epsilon", "v_prediction")
_SPACINGS = ("linspace", "leading", "trailing")
_DPM_SIGMA_FLAGS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
)
_SCALAR_FIELDS = ("timestep", "prev_timestep", "x", "eps", "x0_x", "x0_eps")


@dataclass(frozen=True)
class StepCoefficients:
    """One scheduler step as coefficients (see the module docstring)."""

    timestep: float  # the model's time conditioning (diffusers' timesteps[i])
    prev_timestep: float  # timestep this step moves to; 0.0 at the end
    x: float
    eps: float
    x0_x: float
    x0_eps: float
    history: tuple[float, ...] = ()  # on earlier x0 predictions, most recent first

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = list(self.history)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepCoefficients:
        try:
            return cls(
                **{k: float(d[k]) for k in _SCALAR_FIELDS},
                history=tuple(float(h) for h in d.get("history", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"bad scheduler step entry {d!r}: {e!r}") from None


def _resolve(scheduler_config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    name = scheduler_config.get("_class_name")
    if name not in _DEFAULTS:
        raise ConfigError(f"unsupported scheduler {name!r}; supported: {', '.join(_DEFAULTS)}")
    return name, {**_DEFAULTS[name], **scheduler_config}


def _refuse(name: str, why: str) -> NoReturn:
    raise ConfigError(f"{name}: {why} is not supported (not a linear ODE step)")


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32), bit for bit.

    torch's CPU kernel fills the first half as start + step*i and the second as
    end - step*(n-1-i) with a fused multiply-add in float32.
    """
    a, b = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([a], np.float32)
    step = np.float64(np.float32((b - a) / np.float32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    lo = np.float64(a) + step * i  # exact product; one rounding like the FMA
    hi = np.float64(b) - step * (n - 1 - i)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def _betas(cfg: dict[str, Any]) -> np.ndarray:
    n = int(cfg["num_train_timesteps"])
    if cfg["trained_betas"] is not None:
        return np.asarray(cfg["trained_betas"], dtype=np.float32)
    schedule = cfg["beta_schedule"]
    if schedule == "linear":
        return _linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    if schedule == "scaled_linear":
        return _linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    if schedule == "squaredcos_cap_v2":  # diffusers' betas_for_alpha_bar, cosine

        def bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)],
            dtype=np.float32,
        )
    raise ConfigError(f"unsupported beta_schedule {schedule!r}")


def alphas_cumprod(scheduler_config: dict[str, Any]) -> np.ndarray:
    """The scheduler's float32 ``alphas_cumprod``, equal to diffusers' tensor."""
    name, cfg = _resolve(scheduler_config)
    if cfg["rescale_betas_zero_snr"]:
        _refuse(name, "rescale_betas_zero_snr")
    alphas = np.float32(1.0) - _betas(cfg)
    # torch's CPU cumprod accumulates float32 in double and rounds each entry.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _x0_coeffs(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """x0 = px * x + po * model_output for a VP sample x = alpha*x0 + sigma*noise."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    return alpha, -sigma  # v_prediction


def _common_checks(name: str, cfg: dict[str, Any], num_steps: int) -> None:
    if cfg["thresholding"]:
        _refuse(name, "thresholding")
    if cfg["prediction_type"] not in _PREDICTION_TYPES:
        raise ConfigError(
            f"{name}: prediction_type {cfg['prediction_type']!r} is not supported "
            f"(supported: {', '.join(_PREDICTION_TYPES)})"
        )
    if cfg["timestep_spacing"] not in _SPACINGS:
        raise ConfigError(
            f"{name}: timestep_spacing {cfg['timestep_spacing']!r} is not supported "
            f"(supported: {', '.join(_SPACINGS)})"
        )
    n_train = int(cfg["num_train_timesteps"])
    if isinstance(num_steps, bool) or not isinstance(num_steps, Integral) or not 1 <= num_steps <= n_train:
        raise ConfigError(f"num_steps must be in [1, {n_train}] for this scheduler, got {num_steps}")


def _f32(v: Any) -> np.ndarray:
    """Round to float32 but keep float64: one float32 torch op, correctly rounded."""
    return np.asarray(v, dtype=np.float64).astype(np.float32).astype(np.float64)


def _dpm_timesteps(cfg: dict[str, Any], ac: np.ndarray, n: int) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps' integer timesteps."""
    n_train = int(cfg["num_train_timesteps"])
    lam = _f32(np.log(_f32(np.sqrt(ac))) - np.log(_f32(np.sqrt(_f32(1.0 - ac)))))
    clipped = int(np.searchsorted(lam[::-1], cfg["lambda_min_clipped"]))
    last = n_train - clipped
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1]
        ts = ts + cfg["steps_offset"]
    else:  # trailing
        ts = np.arange(last, 0, -n_train / n).round() - 1
    return ts.astype(np.int64)


def _dpm_sigmas(cfg: dict[str, Any], n: int) -> tuple[np.ndarray, np.ndarray]:
    """set_timesteps' ``timesteps`` and float32 ``sigmas`` (one longer)."""
    ac = alphas_cumprod(cfg).astype(np.float64)
    ts = _dpm_timesteps(cfg, ac, n)
    train_sigmas = _f32(np.sqrt(_f32(_f32(1.0 - ac) / ac)))
    last = train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    interp = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
    return ts, _f32(np.concatenate([interp, [last]]))


def _dpm_coefficients(name: str, cfg: dict[str, Any], n: int) -> list[StepCoefficients]:
    for flag in _DPM_SIGMA_FLAGS:
        if cfg[flag]:
            _refuse(name, flag)
    if cfg["algorithm_type"] != "dpmsolver++":
        _refuse(name, f"algorithm_type {cfg['algorithm_type']!r}")
    if cfg["variance_type"] is not None:
        _refuse(name, f"variance_type {cfg['variance_type']!r}")
    order, solver, final = int(cfg["solver_order"]), cfg["solver_type"], cfg["final_sigmas_type"]
    if order not in (1, 2):
        raise ConfigError(f"{name}: solver_order must be 1 or 2, got {order}")
    if solver not in ("midpoint", "heun"):
        raise ConfigError(f"{name}: solver_type must be midpoint or heun, got {solver!r}")
    if final not in ("zero", "sigma_min"):
        raise ConfigError(f"{name}: final_sigmas_type must be zero or sigma_min, got {final!r}")

    ts, sigmas = _dpm_sigmas(cfg, n)
    # The scalar algebra of diffusers' step() runs in float32 torch; each op is
    # rounded the same way here so the tables track diffusers to ~1e-7, not 1e-6.
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = _f32(1.0 / _f32(np.sqrt(_f32(_f32(sigmas * sigmas) + 1.0))))
        std = _f32(sigmas * alpha)
        lam = _f32(_f32(np.log(alpha)) - _f32(np.log(std)))  # +inf at sigma 0
        h = _f32(lam[1:] - lam[:-1])  # +inf on a final step to sigma 0
        em1 = _f32(_f32(np.exp(-h)) - 1.0)
        x_ratio = _f32(std[1:] / std[:-1])
        b = -_f32(alpha[1:] * em1)  # weight of this step's x0 (first order)
        # second order: x_t += w * D1, D1 = (1 / r0) * (x0_i - x0_{i-1})
        inv_r0 = np.concatenate([[np.nan], _f32(1.0 / _f32(_f32(lam[1:-1] - lam[:-2]) / h[1:]))])
        w = 0.5 * b if solver == "midpoint" else _f32(alpha[1:] * _f32(_f32(em1 / h) + 1.0))

    steps: list[StepCoefficients] = []
    count = len(ts)
    for i in range(count):
        # diffusers' step(): which solver order this step uses
        lower_final = i == count - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and count < 15) or final == "zero"
        )
        x0_x, x0_eps = _x0_coeffs(cfg["prediction_type"], alpha[i], std[i])
        on_x0, history = b[i], ()
        if order == 2 and i >= 1 and not lower_final:
            on_x0, history = b[i] + w[i] * inv_r0[i], (-w[i] * inv_r0[i],)
        steps.append(
            StepCoefficients(
                timestep=float(ts[i]),
                prev_timestep=float(ts[i + 1]) if i + 1 < count else 0.0,
                x=float(x_ratio[i] + on_x0 * x0_x),
                eps=float(on_x0 * x0_eps),
                x0_x=float(x0_x),
                x0_eps=float(x0_eps),
                history=tuple(float(v) for v in history),
            )
        )
    return steps


def _ddim_coefficients(name: str, cfg: dict[str, Any], n: int) -> list[StepCoefficients]:
    if cfg["clip_sample"]:
        _refuse(name, "clip_sample")
    n_train = int(cfg["num_train_timesteps"])
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, n_train - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (n_train // n)).round()[::-1] + cfg["steps_offset"]
    else:  # trailing
        ts = np.round(np.arange(n_train, 0, -n_train / n)) - 1
    ts = ts.astype(np.int64)
    if ts.max() >= n_train:
        raise ConfigError(f"{name}: steps_offset pushes timestep {ts.max()} past {n_train - 1}")

    ac = alphas_cumprod(cfg).astype(np.float64)
    final_ac = 1.0 if cfg["set_alpha_to_one"] else ac[0]
    v_pred = cfg["prediction_type"] == "v_prediction"
    steps: list[StepCoefficients] = []
    for t in ts:
        prev = int(t) - n_train // n  # diffusers' DDIM target, not always ts[i + 1]
        a, a_prev = ac[t], (ac[prev] if prev >= 0 else final_ac)
        sa, sb = _f32(np.sqrt(a)), _f32(np.sqrt(_f32(1.0 - a)))  # float32 like diffusers
        sp, sd = _f32(np.sqrt(a_prev)), _f32(np.sqrt(_f32(1.0 - a_prev)))
        x0_x, x0_eps = _x0_coeffs(cfg["prediction_type"], sa, sb)
        ex, eo = (sb, sa) if v_pred else (0.0, 1.0)  # pred_eps = ex*x + eo*eps
        steps.append(
            StepCoefficients(
                timestep=float(t),
                prev_timestep=float(max(prev, 0)),
                x=float(sp * x0_x + sd * ex),
                eps=float(sp * x0_eps + sd * eo),
                x0_x=float(x0_x),
                x0_eps=float(x0_eps),
            )
        )
    return steps


def scheduler_coefficients(scheduler_config: dict[str, Any], num_steps: int) -> list[StepCoefficients]:
    """Per-step coefficients reproducing ``scheduler.set_timesteps(num_steps)`` + ``step``."""
    name, cfg = _resolve(scheduler_config)
    _common_checks(name, cfg, num_steps)
    num_steps = int(num_steps)
    if name == "DDIMScheduler":
        steps = _ddim_coefficients(name, cfg, num_steps)
    else:
        steps = _dpm_coefficients(name, cfg, num_steps)
    values = [v for s in steps for v in (s.x, s.eps, s.x0_x, s.x0_eps, *s.history)]
    if not np.all(np.isfinite(values)):  # e.g. repeated timesteps make h = 0
        raise ConfigError(f"{name} with {num_steps} steps gives non-finite coefficients; use fewer steps")
    return steps
