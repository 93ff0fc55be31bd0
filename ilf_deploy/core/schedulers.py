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

Flow matching (``FlowMatchEulerDiscreteScheduler``: SD3/SD3.5, Flux.1): ``eps`` is
the velocity ``v`` and ``x`` is at noise level ``sigma`` (x = (1 - sigma) x0 +
sigma noise), so a step is ``x_next = x + (sigma_next - sigma) * v`` (x = 1,
eps = the float32 ``sigma_next - sigma``) and ``x0 = x - sigma * v``;
``timestep`` is ``sigma * num_train_timesteps`` in float32, diffusers'
``scheduler.timesteps[i]`` (Flux's transformer is fed ``timestep / 1000``). The
schedule depends on the pipeline, not only on the scheduler config, so these
configs need ``pipeline=``:

* ``"flux"`` (``FluxPipeline``) passes ``sigmas = linspace(1, 1/n, n)`` and
  ``mu`` to ``set_timesteps`` (``mu`` only matters with ``use_dynamic_shifting``);
  a config with ``use_flow_sigmas`` makes it pass no sigmas, like SD3.
* ``"sd3"`` (``StableDiffusion3Pipeline``) passes no sigmas, so ``set_timesteps``
  spaces ``n`` timesteps linearly between ``__init__``'s *already shifted*
  ``sigma_max`` and ``sigma_min`` and shifts them again (in float64); ``mu`` only
  with ``use_dynamic_shifting``.

Flow DPM-Solver (``DPMSolverMultistepScheduler`` with ``use_flow_sigmas``: Sana): the
same DPM-Solver++ tables on flow sigmas, ``alpha_t = 1 - sigma``, ``sigma_t = sigma``
(``_sigma_to_alpha_sigma_t``), and with ``prediction_type="flow_prediction"`` ``eps`` is
the velocity and ``x0 = x - sigma * v``. ``set_timesteps`` makes the sigmas
``flow_shift * s / (1 + (flow_shift - 1) * s)`` of ``s = 1 - linspace(1, 1/T, n + 1)``
(float64, flipped, the last dropped) and the model's timesteps ``int64(sigma * T)``
(truncated); SanaPipeline passes no ``mu``, so ``use_dynamic_shifting`` changes nothing.

E.g. SD3-medium's config (shift 3) under Flux's preparation gives other sigmas
from the second step on, so the two cannot share one path. With
``use_dynamic_shifting`` the shift ``mu`` is the pipelines' ``calculate_shift``
of ``image_seq_len`` (the transformer's token count: Flux's packed latent
length, SD3's ``(H // patch) * (W // patch)``); see
``flow_shift_depends_on_size``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import Any, NoReturn

import numpy as np

from ilf_deploy.core.errors import ConfigError

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

# Sana's DPMSolverMultistepScheduler: diffusers' conversion script (scripts/convert_sana_to_diffusers.py)
# saves `DPMSolverMultistepScheduler(flow_shift=..., use_flow_sigmas=True,
# prediction_type="flow_prediction")`, diffusers' defaults otherwise; flow_shift 3.0 as in
# Efficient-Large-Model/Sana_600M_512px_diffusers and Sana_1600M_1024px_diffusers (from memory of
# the hub files; not confirmed against them here).
SANA_SCHEDULER_CONFIG: dict[str, Any] = {
    **PIXART_SCHEDULER_CONFIG,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "final_sigmas_type": "zero",
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

# scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev (less _diffusers_version;
# values checked against a public copy of the file).
FLUX_DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# black-forest-labs/FLUX.1-schnell: as dev but shift 1.0 and no dynamic shifting (from
# memory of the hub file; not confirmed against it here).
FLUX_SCHNELL_SCHEDULER_CONFIG: dict[str, Any] = {
    **FLUX_DEV_SCHEDULER_CONFIG,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}

# stabilityai/stable-diffusion-3-medium-diffusers (from memory of the hub file; not
# confirmed against it here): diffusers' defaults but shift 3.0.
SD3_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
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
        "flow_shift": 1.0,
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
    "FlowMatchEulerDiscreteScheduler": {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    },
}
_FLOW = "FlowMatchEulerDiscreteScheduler"
_FLOW_PIPELINES = ("flux", "sd3")
_PREDICTION_TYPES = ("epsilon", "v_prediction")
_DPM_PREDICTION_TYPES = (*_PREDICTION_TYPES, "flow_prediction")
_SPACINGS = ("linspace", "leading", "trailing")
_DPM_SIGMA_FLAGS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
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
    if name == _FLOW:
        raise ConfigError(f"{name} is a flow-matching scheduler: it has no alphas_cumprod")
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
    supported = _DPM_PREDICTION_TYPES if name == "DPMSolverMultistepScheduler" else _PREDICTION_TYPES
    if cfg["prediction_type"] not in supported:
        raise ConfigError(
            f"{name}: prediction_type {cfg['prediction_type']!r} is not supported "
            f"(supported: {', '.join(supported)})"
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
    train_sigmas = _f32(np.sqrt(_f32(_f32(1.0 - ac) / ac)))
    last = train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    if cfg["use_flow_sigmas"]:  # set_timesteps' own float64 expressions (module docstring)
        n_train, shift = int(cfg["num_train_timesteps"]), cfg["flow_shift"]
        s = 1.0 - np.linspace(1, 1 / n_train, n + 1)
        sigmas = np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()
        ts = (sigmas * n_train).astype(np.int64)  # torch's .to(int64) truncates too
        return ts, _f32(np.concatenate([sigmas, [last]]))
    ts = _dpm_timesteps(cfg, ac, n)
    interp = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
    return ts, _f32(np.concatenate([interp, [last]]))


def _dpm_x0_coeffs(cfg: dict[str, Any], sigma: float, alpha: float, std: float) -> tuple[float, float]:
    """convert_model_output's x0 = px * x + po * model_output; flow_prediction reads the raw sigma."""
    if cfg["prediction_type"] == "flow_prediction":
        return 1.0, -sigma
    return _x0_coeffs(cfg["prediction_type"], alpha, std)


def _dpm_coefficients(name: str, cfg: dict[str, Any], n: int) -> list[StepCoefficients]:
    for flag in _DPM_SIGMA_FLAGS:
        if cfg[flag]:
            _refuse(name, flag)
    if cfg["algorithm_type"] != "dpmsolver++":
        _refuse(name, f"algorithm_type {cfg['algorithm_type']!r}")
    if cfg["variance_type"] is not None:
        _refuse(name, f"variance_type {cfg['variance_type']!r}")
    if bool(cfg["use_flow_sigmas"]) != (cfg["prediction_type"] == "flow_prediction"):
        raise ConfigError(
            f"{name}: use_flow_sigmas and prediction_type 'flow_prediction' go together (flow models); "
            f"got use_flow_sigmas={cfg['use_flow_sigmas']!r}, prediction_type={cfg['prediction_type']!r}"
        )
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
        if cfg["use_flow_sigmas"]:  # _sigma_to_alpha_sigma_t
            alpha, std = _f32(1.0 - sigmas), sigmas
        else:
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
        x0_x, x0_eps = _dpm_x0_coeffs(cfg, sigmas[i], alpha[i], std[i])
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


def is_flow_model(scheduler_config: dict[str, Any]) -> bool:
    """Whether the model is a rectified-flow one (x = (1 - sigma) x0 + sigma noise, predicting the
    velocity): flow-matching Euler (SD3, Flux) or the flow DPM-Solver (Sana)."""
    name, cfg = _resolve(scheduler_config)
    return name == _FLOW or cfg["prediction_type"] == "flow_prediction"


def flow_shift_depends_on_size(scheduler_config: dict[str, Any]) -> bool:
    """Whether the schedule depends on the image size (``use_dynamic_shifting``)."""
    name, cfg = _resolve(scheduler_config)
    return name == _FLOW and bool(cfg["use_dynamic_shifting"])


def _calculate_shift(name: str, cfg: dict[str, Any], image_seq_len: int | None) -> float:
    """The pipelines' ``calculate_shift(image_seq_len, ...)`` from the scheduler config.

    Both pipelines read the keys with ``config.get(key, default)``, but a diffusers
    config always holds every constructor argument, so the defaults that apply are
    the constructor's (SD3's fallback ``max_shift=1.16`` is never used).
    """
    if image_seq_len is None:
        raise ConfigError(
            f"{name} with use_dynamic_shifting: the schedule depends on the image size; "
            "pass image_seq_len (the transformer's image token count)"
        )
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, Integral) or image_seq_len < 1:
        raise ConfigError(f"image_seq_len must be a positive integer, got {image_seq_len!r}")
    keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    base_len, max_len, base_shift, max_shift = (cfg[k] for k in keys)
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in (cfg[k] for k in keys)):
        raise ConfigError(f"{name}: use_dynamic_shifting needs numeric {', '.join(keys)}")
    if max_len == base_len:
        raise ConfigError(f"{name}: max_image_seq_len equals base_image_seq_len ({base_len})")
    m = (max_shift - base_shift) / (max_len - base_len)
    b = base_shift - m * base_len
    return int(image_seq_len) * m + b


def _flow_sigmas(name: str, cfg: dict[str, Any], n: int, pipeline: str, mu: float | None) -> np.ndarray:
    """float32 ``sigmas[:n]`` after the pipeline's ``retrieve_timesteps``.

    The numpy expressions are set_timesteps' own, dtypes included (float32 for
    Flux's sigmas, float64 for SD3's default ones); the torch float32 ops of
    ``__init__`` are single correctly rounded float32 ops here.
    """
    n_train = cfg["num_train_timesteps"]
    shift = cfg["shift"]
    if pipeline == "flux" and not cfg.get("use_flow_sigmas"):
        sigmas = np.array(np.linspace(1.0, 1 / n, n)).astype(np.float32)
    else:  # sigmas=None: linspace between __init__'s sigma_max and sigma_min (shifted once already)
        init = np.array([n_train, 1], np.float32) / np.float32(n_train)
        if not cfg["use_dynamic_shifting"]:
            init = np.float32(shift) * init / (np.float32(1) + np.float32(shift - 1) * init)
        sigma_max, sigma_min = float(init[0]), float(init[1])
        timesteps = np.linspace(sigma_max * n_train, sigma_min * n_train, n)
        sigmas = timesteps / n_train
    if cfg["use_dynamic_shifting"]:
        if cfg["time_shift_type"] == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:  # linear
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if cfg["shift_terminal"]:
        one_minus_z = 1 - sigmas
        scale_factor = one_minus_z[-1] / (1 - cfg["shift_terminal"])
        sigmas = 1 - (one_minus_z / scale_factor)
    if cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]:
        lo = cfg.get("sigma_min")
        hi = cfg.get("sigma_max")
        lo = lo if lo is not None else sigmas[-1].item()
        hi = hi if hi is not None else sigmas[0].item()
        if cfg["use_karras_sigmas"]:
            rho = 7.0
            ramp = np.linspace(0, 1, n)
            min_inv_rho = lo ** (1 / rho)
            max_inv_rho = hi ** (1 / rho)
            sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
        else:
            sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), n))
    return np.asarray(sigmas).astype(np.float32)


def _flow_coefficients(
    name: str, cfg: dict[str, Any], n: int, pipeline: str | None, image_seq_len: int | None
) -> list[StepCoefficients]:
    for flag in ("stochastic_sampling", "invert_sigmas", "use_beta_sigmas"):
        if cfg[flag]:
            _refuse(name, flag)
    if cfg["use_karras_sigmas"] and cfg["use_exponential_sigmas"]:
        raise ConfigError(f"{name}: use_karras_sigmas and use_exponential_sigmas exclude each other")
    if cfg["time_shift_type"] not in ("exponential", "linear"):
        kind = cfg["time_shift_type"]
        raise ConfigError(f"{name}: time_shift_type must be exponential or linear, got {kind!r}")
    n_train = cfg["num_train_timesteps"]
    if isinstance(n_train, bool) or not isinstance(n_train, Integral) or n_train < 1:
        raise ConfigError(f"{name}: num_train_timesteps must be a positive integer, got {n_train!r}")
    if pipeline not in _FLOW_PIPELINES:
        raise ConfigError(
            f"{name}: the schedule depends on the pipeline; pass pipeline= one of "
            f"{', '.join(_FLOW_PIPELINES)} (got {pipeline!r})"
        )
    mu = _calculate_shift(name, cfg, image_seq_len) if cfg["use_dynamic_shifting"] else None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sigmas = _f32(_flow_sigmas(name, cfg, n, pipeline, mu))
        ts = _f32(sigmas * np.float32(n_train))  # torch: sigmas * num_train_timesteps
        sigmas = np.concatenate([sigmas, [0.0]])
        dt = _f32(sigmas[1:] - sigmas[:-1])  # step(): sigma_next - sigma in float32
    return [
        StepCoefficients(
            timestep=float(ts[i]),
            prev_timestep=float(ts[i + 1]) if i + 1 < n else 0.0,
            x=1.0,
            eps=float(dt[i]),
            x0_x=1.0,
            x0_eps=float(-sigmas[i]),
        )
        for i in range(n)
    ]


# What a table needs beyond a diffusers scheduler config, carried in the config dict under keys
# diffusers never writes: which pipeline prepares the flow sigmas, and the image token counts a
# size-dependent schedule (Flux-dev's dynamic shift) is made for (core/plan/builders.py makes one
# schedule per count).
PIPELINE_KEY = "_ilf_pipeline"
IMAGE_TOKENS_KEY = "_ilf_image_tokens"


def for_pipeline(scheduler_config: dict[str, Any], pipeline: str) -> dict[str, Any]:
    """The config, marked with the pipeline ("flux" or "sd3") whose sigma preparation it follows."""
    return {**scheduler_config, PIPELINE_KEY: pipeline}


def for_image_tokens(scheduler_config: dict[str, Any], tokens: list[int]) -> dict[str, Any]:
    """The config, marked with the image token counts its plans are made for (first: the default)."""
    return {**scheduler_config, IMAGE_TOKENS_KEY: list(dict.fromkeys(int(n) for n in tokens))}


def image_tokens_of(scheduler_config: dict[str, Any]) -> tuple[int | None, ...]:
    """The image token counts to tabulate: (None,) where the schedule does not depend on the size."""
    if not flow_shift_depends_on_size(scheduler_config):
        return (None,)
    tokens = tuple(scheduler_config.get(IMAGE_TOKENS_KEY) or ())
    if not tokens:
        raise ConfigError(
            f"{scheduler_config.get('_class_name')}: the schedule depends on the image size "
            "(use_dynamic_shifting); say which sizes the plan is for"
        )
    return tokens


def scheduler_coefficients(
    scheduler_config: dict[str, Any],
    num_steps: int,
    image_seq_len: int | None = None,
    *,
    pipeline: str | None = None,
) -> list[StepCoefficients]:
    """Per-step coefficients reproducing the pipeline's ``set_timesteps`` + ``step``.

    DPM-Solver and DDIM: ``scheduler.set_timesteps(num_steps)``; ``image_seq_len``
    and ``pipeline`` are ignored. ``FlowMatchEulerDiscreteScheduler``: what
    ``pipeline`` ("flux" or "sd3") passes to ``set_timesteps`` (see the module
    docstring); ``image_seq_len`` is needed when ``flow_shift_depends_on_size``.
    """
    name, cfg = _resolve(scheduler_config)
    pipeline = pipeline or scheduler_config.get(PIPELINE_KEY)
    if name == _FLOW:
        if isinstance(num_steps, bool) or not isinstance(num_steps, Integral) or num_steps < 1:
            raise ConfigError(f"num_steps must be a positive integer for this scheduler, got {num_steps}")
        num_steps = int(num_steps)
        steps = _flow_coefficients(name, cfg, num_steps, pipeline, image_seq_len)
    else:
        _common_checks(name, cfg, num_steps)
        num_steps = int(num_steps)
        if name == "DDIMScheduler":
            steps = _ddim_coefficients(name, cfg, num_steps)
        else:
            steps = _dpm_coefficients(name, cfg, num_steps)
    values = [v for s in steps for v in (s.timestep, s.x, s.eps, s.x0_x, s.x0_eps, *s.history)]
    if not np.all(np.isfinite(values)):  # e.g. repeated timesteps make h = 0
        hint = "" if name == _FLOW else "; use fewer steps"  # flow: e.g. shift_terminal with 1 step
        raise ConfigError(f"{name} with {num_steps} steps gives non-finite coefficients{hint}")
    return steps
