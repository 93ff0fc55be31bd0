"""Train an ILF feedback module with Fast Approximate Distillation (ILF paper §3.2).

For a clean latent x0 and noise ε:
  student = backbone + feedback on x_t at t (blocks after the feedback and the final layer at t_post)
  teacher = backbone alone on x_{t/2} = the same x0 and ε noised to t/2 (one teacher forward)
  loss    = MSE(student, teacher) + MSE(student, ε)
Only the feedback block and its zero-initialised scales learn; the backbone is frozen.

Which `t_post` the student sees: inference runs the blocks after the feedback at the plan's `t_post`
(eq. 4, `t - gap·n/m` for the rescale rule), so training uses that same rule. With
`timesteps="plan"` (default) the (t, t_post) pairs are those of the feedback steps of the ilf plans
the module is for (ilf-10 and ilf-12: first 2 and last 2 steps), t jittered by up to ±¼ of the step
gap; with `timesteps="uniform"`, t is uniform in [0, 1000) and t_post = the rule with the gap of a
randomly chosen plan step count. Training on any other t_post (e.g. t/2) would teach the blocks after
the feedback a conditioning they never get at inference.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ilf_deploy.build.training.common import (
    NoiseSchedule,
    alphas_cumprod,
    load_checkpoint,
    save_checkpoint,
    warmup_lr,
)
from ilf_deploy.core.errors import ConfigError, check_at_least
from ilf_deploy.core.plan import T_POST_MODES, ilf_plan, post_timestep, validate_loop
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.core.schedulers import for_image_tokens, is_flow_model
from ilf_deploy.engines.backends.pytorch import TorchGenerator
from ilf_deploy.model.adapters import Adapter, Cond
from ilf_deploy.model.data import TRAIN_SEED, make_batch, to_tensor_range
from ilf_deploy.model.ilf import FEEDBACK_DIR, FeedbackModule, inner_loop, run_blocks
from ilf_deploy.model.loading import LoadedModel, torch_device

CHECKPOINT = "fad_checkpoint.pt"
TEXT_LENGTH = 32  # shapes captions are shorter; masked padding is inert (see training.base.encode_text)


@dataclass
class FeedbackTrainConfig:
    loop: tuple[int, int]
    steps: int = 400
    batch_size: int = 16
    lr: float = 5e-4
    plan_steps: tuple[int, ...] = (10, 12)  # the ilf-N plans whose feedback steps we train for
    feedback: str = "first2,last2"
    t_post: str = "rescale"
    timesteps: str = "plan"  # "plan" or "uniform", see the module docstring
    distill_weight: float = 1.0
    recon_weight: float = 1.0
    caption_dropout: float = 0.1  # guidance runs the feedback on the unconditional branch too
    # > 1: distil the classifier-free-guided output (uncond + w·(cond − uncond)) of student and teacher,
    # which is what sampling uses; each sample then runs with its caption and with the empty one.
    guidance: float = 0.0
    pool: int = 1024  # clean latents encoded once up front
    image_size: int | None = None  # pixels of the training images (default: the model's)
    seed: int = 0
    checkpoint_every: int = 50
    device: str = "cpu"  # "cuda" on a GPU machine (random draws stay on the CPU: same stream)

    def validate(self, num_blocks: int) -> None:
        validate_loop(*self.loop, num_blocks)
        check_at_least("steps", self.steps)
        check_at_least("batch size", self.batch_size)
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.t_post not in T_POST_MODES:
            raise ConfigError(f"unknown t_post mode {self.t_post!r}; choose from {', '.join(T_POST_MODES)}")
        if self.timesteps not in ("plan", "uniform"):
            raise ConfigError(f"unknown timestep sampling {self.timesteps!r}; choose plan or uniform")
        check_at_least("guidance", self.guidance, 0)
        if not self.plan_steps or min(self.plan_steps) < 1:
            raise ConfigError(f"plan steps must be >= 1, got {self.plan_steps}")
        torch_device(self.device)


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)  # total loss per step
    distill: list[float] = field(default_factory=list)
    recon: list[float] = field(default_factory=list)


# -- data --------------------------------------------------------------------------------------


class FeedbackData:
    """Clean latents (the shapes dataset through the model's VAE) and the adapter's inputs."""

    def __init__(
        self, model: LoadedModel, pool: int, seed: int, device: str = "cpu", size: int | None = None
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        adapter = model.adapter
        self.text = adapter.architecture != "dit"
        # SD3, Flux, Sana: inputs as the reference generator makes them (its pipeline's text encoders)
        self.generator = TorchGenerator(model, device) if model.text_pipeline is not None else None
        self.size = size or model.default_image_size
        if self.text and self.generator is None and (model.tokenizer is None or model.text_encoder is None):
            raise ConfigError(
                f"{model.source}: feedback training needs a pipeline directory with its text encoder"
            )
        batch = make_batch(range(pool), TRAIN_SEED + 7)  # a fixed pool: each x0 gets fresh noise and t
        self.captions = batch.captions
        latent = self.size // model.vae_scale_factor
        shape = (adapter.latent_channels, latent, latent)
        for part in (model.vae, model.text_encoder):
            if part is not None:
                part.to(self.device)
        if model.vae is not None:
            self.latents = self._encode(batch.images, self.size)
        else:  # a bare transformer directory: no VAE to make real latents with
            gen = torch.Generator().manual_seed(seed)
            self.latents = torch.randn((pool, *shape), generator=gen).to(self.device)
        if tuple(self.latents.shape[1:]) != shape:
            raise ConfigError(
                f"latents of shape {tuple(self.latents.shape[1:])} do not fit the model's {shape}"
            )
        self.null = self._encode_text([""]) if self.text and self.generator is None else None

    @torch.no_grad()
    def _encode(self, images: np.ndarray, size: int, chunk: int = 128) -> torch.Tensor:
        vae = self.model.vae
        dtype = next(vae.parameters()).dtype
        out = []
        for start in range(0, len(images), chunk):
            x = to_tensor_range(images[start : start + chunk]).to(self.device)
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            encoded = vae.encode(x.to(dtype))
            # AutoencoderDC (Sana) encodes deterministically; AutoencoderKL: its distribution's mean
            mean = (encoded.latent if self.model.architecture == "sana" else encoded.latent_dist.mean).float()
            shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD3, Flux: the latent shift
            out.append((mean - shift) * vae.config.scaling_factor)
        return torch.cat(out)

    @torch.no_grad()
    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.tokenizer(
            [c.lower().strip() for c in captions],
            padding="max_length",
            max_length=TEXT_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        return self.model.text_encoder(ids, attention_mask=mask)[0], mask

    def generator_inputs(self, captions: list[str]) -> Cond:
        """SD3/Flux: the batch's inputs exactly as the reference generator builds them (text
        embeddings, pooled embeddings, Flux's position ids and embedded guidance)."""
        assert self.generator is not None
        requests = [
            self.generator.resolve(Request(prompt=c, height=self.size, width=self.size)) for c in captions
        ]
        latent = self.size // self.model.vae_scale_factor
        return self.generator.batch_inputs(requests, False, (latent, latent))

    def unconditional(self, inputs: Cond) -> Cond:
        """The same batch's inputs with every caption (or class) replaced by the null one."""
        if self.generator is not None:  # the text inputs of the pipeline's empty negative prompt
            null = self.generator.encode_cached("", negative=True)
            rows = inputs["prompt_embeds"].shape[0]
            return {**inputs, **{k: v.expand(rows, *v.shape[1:]) for k, v in null.items()}}
        if not self.text:
            labels = inputs["class_labels"]
            return {"class_labels": torch.full_like(labels, self.model.adapter.num_classes)}  # type: ignore[attr-defined]
        null_embeds, null_mask = self.null  # type: ignore[misc]
        embeds = inputs["prompt_embeds"]
        return {
            **inputs,
            "prompt_embeds": null_embeds.to(embeds.dtype).expand_as(embeds),
            "prompt_mask": null_mask.expand_as(inputs["prompt_mask"]),
        }

    def sample(self, batch: int, gen: torch.Generator, dropout: float) -> tuple[torch.Tensor, Cond]:
        idx = torch.randint(len(self.latents), (batch,), generator=gen)
        x0 = self.latents[idx.to(self.device)]
        drop = (torch.rand(batch, generator=gen) < dropout).to(self.device)
        dtype = next(self.model.adapter.transformer.parameters()).dtype
        if not self.text:
            null = self.model.adapter.num_classes  # type: ignore[attr-defined]
            labels = torch.randint(null, (batch,), generator=gen).to(self.device)
            return x0.to(dtype), {"class_labels": torch.where(drop, torch.full_like(labels, null), labels)}
        if self.generator is not None:
            captions = ["" if d else self.captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
            return x0.to(dtype), self.generator_inputs(captions)
        embeds, mask = self._encode_text([self.captions[i] for i in idx.tolist()])
        null_embeds, null_mask = self.null  # type: ignore[misc]
        embeds = torch.where(drop[:, None, None], null_embeds.expand_as(embeds), embeds)
        mask = torch.where(drop[:, None], null_mask.expand_as(mask), mask)
        inputs = {"prompt_embeds": embeds.to(dtype), "prompt_mask": mask}
        if self.model.adapter.uses_size_conditions:  # type: ignore[attr-defined]
            px = float(self.model.default_image_size)
            inputs["resolution"] = torch.tensor([[px, px]], device=self.device).repeat(batch, 1)
            inputs["aspect_ratio"] = torch.ones(batch, 1, device=self.device)
        return x0.to(dtype), inputs


# -- timesteps ---------------------------------------------------------------------------------


def plan_timesteps(model: LoadedModel, config: FeedbackTrainConfig) -> list[tuple[float, float, float]]:
    """(t, t_post, gap) of every feedback step of the ilf plans we train for, exactly as planned."""
    out = []
    for steps in config.plan_steps:
        feedback = config.feedback if steps >= 4 else "all"
        size = config.image_size or model.default_image_size
        scheduler = for_image_tokens(model.scheduler_config, [model.image_tokens(size, size)])
        plan = ilf_plan(steps, model.adapter.num_blocks, config.loop, feedback, config.t_post, scheduler)
        for step in plan.steps:
            if step.t_post is not None:
                gap = step.timestep - step.coefficients.prev_timestep
                out.append((step.timestep, step.t_post, max(gap, 1.0)))
    return out


def draw_timesteps(
    model: LoadedModel, config: FeedbackTrainConfig, batch: int, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (t, t_post) following `config.timesteps` (see the module docstring)."""
    n, m = model.adapter.num_blocks, config.loop[1] - config.loop[0] + 1
    num_train = int(model.scheduler_config.get("num_train_timesteps", 1000))
    ts, posts = [], []
    table = plan_timesteps(model, config) if config.timesteps == "plan" else []
    for _ in range(batch):
        if table:
            t0, tp0, gap = rng.choice(table)
            shift = rng.uniform(-gap / 4, gap / 4)
            t = min(max(t0 + shift, 0.0), num_train - 1.0)
            tp = min(max(tp0 + shift, 0.0), t)
        else:
            t = rng.uniform(0, num_train - 1)
            gap = (num_train - 1) / rng.choice(config.plan_steps)
            tp = post_timestep(config.t_post, t, max(t - gap, 0.0), n, m, False, num_train)
        ts.append(t)
        posts.append(tp)
    return torch.tensor(ts), torch.tensor(posts)


# -- the two forwards --------------------------------------------------------------------------


def student_forward(
    adapter: Adapter,
    feedback: FeedbackModule,
    x: torch.Tensor,
    t: torch.Tensor,
    t_post: torch.Tensor,
    inputs: Cond,
) -> torch.Tensor:
    """One ILF step's network evaluation, as `runtime.loop.model_output` runs an ilf op."""
    context = adapter.context(inputs)
    cond, cond_post = adapter.conditioning(t, context), adapter.conditioning(t_post, context)
    start, end = feedback.loop
    h = adapter.embed(x, cond)
    if start > 0:
        h = run_blocks(adapter, 0, start - 1, h, cond)
    h = inner_loop(adapter, feedback, h, cond, cond_post)
    if end < adapter.num_blocks - 1:
        h = run_blocks(adapter, end + 1, adapter.num_blocks - 1, h, cond_post)
    return adapter.final(h, cond_post, x.shape[-2], x.shape[-1])[:, : adapter.latent_channels]


def teacher_forward(adapter: Adapter, x: torch.Tensor, t: torch.Tensor, inputs: Cond) -> torch.Tensor:
    with torch.no_grad():
        return adapter.forward(x, t, inputs)[:, : adapter.latent_channels]


# -- the loop ----------------------------------------------------------------------------------


def train_feedback(
    model: LoadedModel,
    config: FeedbackTrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    data: FeedbackData | None = None,
) -> tuple[FeedbackModule, TrainState]:
    """Train (or resume) and save the module to `out_dir` (ilf_config.json + safetensors)."""
    adapter = model.adapter
    config.validate(adapter.num_blocks)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    device = torch.device(config.device)
    adapter.transformer.to(device).eval().requires_grad_(False)
    torch.manual_seed(config.seed)
    feedback = FeedbackModule.create(adapter, config.loop, config.t_post)
    dtype = next(adapter.transformer.parameters()).dtype
    feedback = feedback.to(device=device, dtype=dtype).train()
    opt = torch.optim.AdamW(feedback.parameters(), lr=config.lr, weight_decay=0.0)
    rng = random.Random(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    state = _restore(ckpt_path, config, feedback, opt, rng, gen) if resume else TrainState()
    data = data or FeedbackData(model, config.pool, config.seed, config.device, config.image_size)
    num_train = int(model.scheduler_config.get("num_train_timesteps", 1000))
    ac = (
        None
        if is_flow_model(model.scheduler_config)
        else alphas_cumprod(num_train).to(device=device, dtype=dtype)
    )
    schedule = NoiseSchedule(ac, num_train)

    while state.step < config.steps:
        for group in opt.param_groups:
            group["lr"] = warmup_lr(state.step, config.lr, 20)
        x0, inputs = data.sample(config.batch_size, gen, config.caption_dropout)
        noise = torch.randn(x0.shape, generator=gen).to(device=device, dtype=dtype)
        t, t_post = (v.to(device) for v in draw_timesteps(model, config, config.batch_size, rng))
        batch = (x0, noise, inputs)
        loss, distill, recon = fad_loss(adapter, feedback, config, data, batch, (t, t_post), schedule)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(feedback.parameters(), 1.0)
        opt.step()
        state.step += 1
        state.losses.append(loss.item())
        state.distill.append(distill.item())
        state.recon.append(recon.item())
        if on_step is not None:
            on_step(state.step, state.losses[-1])
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            save_checkpoint(ckpt_path, _checkpoint(feedback, opt, state, rng, gen, config))
    feedback.eval().requires_grad_(False)
    feedback.save(out_dir)
    return feedback, state


def fad_loss(
    adapter: Adapter,
    feedback: FeedbackModule,
    config: FeedbackTrainConfig,
    data: FeedbackData,
    batch: tuple[torch.Tensor, torch.Tensor, Cond],
    times: tuple[torch.Tensor, torch.Tensor],
    schedule: NoiseSchedule,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fast Approximate Distillation on one batch: (loss, distillation term, reconstruction term).

    The student (one step with feedback at t) matches the teacher at t/2 on the same noise."""
    x0, noise, inputs = batch
    t, t_post = times
    t_teacher = (t / 2).floor()
    x_teacher, x_student = schedule.add(x0, noise, t_teacher), schedule.add(x0, noise, t)
    target = teacher_forward(adapter, x_teacher, t_teacher, inputs)
    pred = student_forward(adapter, feedback, x_student, t, t_post, inputs)
    truth = schedule.target(x0, noise)  # ε, or a flow model's velocity
    distill, recon = F.mse_loss(pred, target), F.mse_loss(pred, truth)
    if config.guidance > 1:  # distil what sampling combines: uncond + w·(cond − uncond)
        null = data.unconditional(inputs)
        target_u = teacher_forward(adapter, x_teacher, t_teacher, null)
        pred_u = student_forward(adapter, feedback, x_student, t, t_post, null)
        w = config.guidance
        distill = F.mse_loss(pred_u + w * (pred - pred_u), target_u + w * (target - target_u))
        recon = (recon + F.mse_loss(pred_u, truth)) / 2
    return config.distill_weight * distill + config.recon_weight * recon, distill, recon


def _checkpoint(feedback, opt, state: TrainState, rng: random.Random, gen, config) -> dict[str, Any]:
    return {
        "feedback": feedback.state_dict(),
        "opt": opt.state_dict(),
        "state": asdict(state),
        "rng": rng.getstate(),
        "gen": gen.get_state(),
        "config": asdict(config),
    }


def _restore(ckpt_path: Path, config, feedback, opt, rng: random.Random, gen) -> TrainState:
    """Resume from `ckpt_path`: weights, optimiser and both random streams, as an uninterrupted run."""
    if not ckpt_path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
    saved = load_checkpoint(ckpt_path)  # on the CPU; load_state_dict copies to the device
    if tuple(saved["config"]["loop"]) != tuple(config.loop):
        raise ConfigError(
            f"--resume: the checkpoint is for loop {saved['config']['loop']}, not {config.loop}"
        )
    feedback.load_state_dict(saved["feedback"])
    opt.load_state_dict(saved["opt"])
    rng.setstate(saved["rng"])
    gen.set_state(saved["gen"])
    return TrainState(**saved["state"])


def default_out_dir(model: LoadedModel) -> Path:
    if model.path is None:
        raise ConfigError("pass --out: the model has no local directory")
    return model.path / FEEDBACK_DIR


def summary(state: TrainState, window: int = 20) -> dict[str, Any]:
    def mean(xs: list[float]) -> float:
        return float(np.mean(xs)) if xs else float("nan")

    return {
        "steps": state.step,
        "loss_first": mean(state.losses[:window]),
        "loss_last": mean(state.losses[-window:]),
        "distill_last": mean(state.distill[-window:]),
        "recon_last": mean(state.recon[-window:]),
    }
