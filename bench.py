"""
Benchmark: our networks, one-step generation, the PG-SB training step and NASA, each beside a
reference built from diffusers (and peft for the LoRA teacher, as the public SwiftBrush training
script does) holding the same random weights, with the ratio ours / reference.

    python bench.py                          # every figure the device allows
    python bench.py --quick                  # tiny presets and the smallest real-config sizes
    python bench.py --device cpu --json bench.json

Figures
  1. forward time of the SD2.1 UNet, the PixArt-alpha DiT and the SD VAE decoder (real configs and
     the tiny presets); on the CPU the real configs run at small latent sizes, stated in the table
  2. one-step 512x512 generation, SD2.1 architecture, bf16, batch 1 and 16 (GPU): denoiser + VAE
     decode against diffusers' one-step path (UNet, Euler step, VAE decode) and against the floor
     that the FLOP count and the device's measured bf16 matmul rate give
  3. one PG-SB training step (images/s and peak memory): ours (vsd.py, one base shared by the
     frozen and LoRA teachers, cond/uncond batched) against the SwiftBrush-style step (three
     diffusers UNets, a peft LoRA copy of the teacher, four separate teacher forwards)
  4. NASA's overhead: one-step generation with a negative prompt against without (ours only)

Every pair is checked to agree numerically before it is timed (the `rel err` column: max |ours -
ref| / max |ref|). Times are medians of --repeats runs after a warm-up, ours and the reference
interleaved so that background load hits both alike; the GPU is synchronised around each run.
On a CPU shared with other work, pass --threads 1: threads that must all meet at every parallel
region stall behind the other work, and the timings then measure the scheduler.
Diffusers and peft are imported here and in the tests only, never by the project's modules.
"""
import argparse
import copy
import dataclasses
import gc
import json
import re
import statistics
import time
import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

import cli
import convert
import model as M
import nasa
import train
import vsd

# Reported FLOPs per 512x512 image (figure 2's floor), in TFLOP.
TFLOP_DENOISER, TFLOP_VAE_DECODER = 0.80, 2.5
NOT_MEASURED = 'not measured (no CUDA device)'


@dataclass
class Options:
    device: torch.device
    dtype: torch.dtype = torch.float32
    repeats: int = 10
    warmup: int = 1
    quick: bool = False
    compile: bool = False
    channels_last: bool = False
    grad_checkpointing: bool = False


# -----------------------------------------------------------------------------
# The reference networks (diffusers), and ours holding the same weights


def diffusers_net(cfg, seed=0):
    """The diffusers network for one of our configs (convert.py writes the config), with weights
    drawn by diffusers' own initialisers from a fixed seed."""
    import diffusers
    cls, config = {M.UNetConfig: (diffusers.UNet2DConditionModel, convert.diffusers_unet_config),
                   M.DiTConfig: (diffusers.PixArtTransformer2DModel, convert.diffusers_dit_config),
                   M.VAEConfig: (diffusers.AutoencoderKL, convert.diffusers_vae_config)}[type(cfg)]
    torch.manual_seed(seed)
    return cls.from_config(config(cfg))


def ours_from(ref, cfg):
    """Our network for `cfg` holding a copy of the diffusers network's weights."""
    return ours_from_state(ref.state_dict(), cfg)


def ours_from_state(state, cfg):
    """Our network for `cfg` from a copy of a diffusers state dict, renamed and loaded strictly by
    convert.py."""
    state = {convert.to_ours(k): v.detach().clone() for k, v in state.items()}
    return convert.load_strict(cfg, state, 'the diffusers reference')


def diffusers_from_state(state, cfg):
    """The diffusers network for `cfg` holding a copy of `state`."""
    with torch.device('meta'):
        net = diffusers_net(cfg)
    net.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    return net


def pair(cfg, opt, seed=0):
    """(ours, reference) for a config, same weights, on the device in opt.dtype, eval mode."""
    ref = diffusers_net(cfg, seed)
    ours = ours_from(ref, cfg)
    if opt.channels_last:  # 4-D weights in NHWC order: every conv then runs channels-last
        ours = ours.to(memory_format=torch.channels_last)
    return (ours.to(opt.device, opt.dtype).eval().requires_grad_(False),
            ref.to(opt.device, opt.dtype).eval().requires_grad_(False))


def compiled(net, opt):
    """--compile: torch.compile our network (the VAE: its decoder, the part that is timed)."""
    if not opt.compile:
        return net
    if isinstance(net, M.VAE):
        net.decoder = torch.compile(net.decoder)
        return net
    return torch.compile(net)


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# Timing


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def seconds(fn, n, device):
    """Wall-clock seconds per call of fn over n back-to-back calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - start) / n


def time_pair(ours, ref, opt, min_sample=0.05):
    """Median seconds per call of ours() and ref() over opt.repeats samples each, after opt.warmup
    calls of each. A sample is enough back-to-back calls to last min_sample seconds (one call of
    anything big), so that timer and scheduler noise stay small beside it; the two alternate, and
    swap order every round, so that background load hits both alike."""
    for _ in range(opt.warmup):
        ours(), ref()
    n = max(1, int(min_sample / max(seconds(ours, 1, opt.device), 1e-6)))
    times = ([], [])
    for i in range(opt.repeats):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            times[k].append(seconds((ours, ref)[k], n, opt.device))
    return statistics.median(times[0]), statistics.median(times[1])


def rel_err(a, b):
    """max |a - b| / max |b|: a relative error that does not blow up where b crosses zero."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def tolerance(dtype):
    """Agreement required between the two implementations: the project's parity bound in float32;
    in half precision, rounding in a different order of operations."""
    return 1e-4 if dtype == torch.float32 else 5e-2


# -----------------------------------------------------------------------------
# Table rows


@dataclass
class Row:
    figure: int
    what: str
    ours: float = None         # in `unit`; None: not measured
    ref: float = None
    unit: str = 'ms'
    goal: str = ''             # e.g. '<= 0.8'; '' : none
    err: float = None          # max relative error between the two outputs (or losses)
    tol: float = None          # the agreement the error is checked against
    note: str = ''

    @property
    def ratio(self):
        return None if self.ours is None or self.ref in (None, 0) else self.ours / self.ref

    @property
    def met(self):
        if not self.goal or self.ratio is None:
            return None
        op, value = self.goal.split()
        return self.ratio <= float(value) if op == '<=' else self.ratio >= float(value)

    @property
    def agrees(self):
        return None if self.err is None else self.err <= self.tol

    def asdict(self):
        return {**asdict(self), 'ratio': self.ratio, 'met': self.met, 'agrees': self.agrees}


def fmt(value, unit):
    if value is None:
        return '—'
    if unit == 'ms':
        return f'{value * 1e3:.2f} ms' if value < 0.1 else f'{value * 1e3:.0f} ms'
    return f'{value:.3g} {unit}'


def table(rows):
    """One markdown table per figure."""
    titles = {1: 'Figure 1: forward time', 2: 'Figure 2: one-step generation (text encoding excluded)',
              3: 'Figure 3: one PG-SB training step', 4: "Figure 4: NASA's overhead (ours only: reference = without NASA)"}
    out = []
    for fig in sorted({r.figure for r in rows}):
        out += ['', f'### {titles[fig]}', '',
                '| what | ours | reference | ratio ours/ref | goal | met? | rel err |',
                '|---|---|---|---|---|---|---|']
        for r in (r for r in rows if r.figure == fig):
            if r.note:
                out.append(f'| {r.what} | {r.note} | {r.note} | — | {r.goal or "—"} | — | — |')
                continue
            met = {None: '—', True: 'yes', False: 'no'}[r.met]
            err = '—' if r.err is None else f'{r.err:.1e}' + ('' if r.agrees else ' (DISAGREE)')
            out.append(f'| {r.what} | {fmt(r.ours, r.unit)} | {fmt(r.ref, r.unit)} | {r.ratio:.3f} '
                       f'| {r.goal or "—"} | {met} | {err} |')
    return '\n'.join(out)


def cpu_goal(preset):
    """The CPU forward-time goals: ours at most the reference's time at the real configs, at most
    0.8 of it at the tiny presets (where Python overhead decides)."""
    return '<= 0.8' if preset.startswith('tiny') else '<= 1.0'


# -----------------------------------------------------------------------------
# Figure 1: forward time


def inputs(cfg, size, batch, opt, seed=0):
    """Random network inputs: (x, t, context, mask). The DiT gets a T5-like mask (first 20 of 120
    tokens real); the UNet a 77-token CLIP-like context."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(cfg, M.VAEConfig):
        return torch.randn(batch, cfg.latent_channels, size, size, generator=g).to(opt.device, opt.dtype),
    dit = isinstance(cfg, M.DiTConfig)
    L, C = (120, cfg.caption_channels) if dit else (77, cfg.context_dim)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    context = torch.randn(batch, L, C, generator=g)
    mask = torch.arange(L)[None].expand(batch, L) < 20 if dit else None
    t = torch.full((batch,), 500, dtype=torch.long)
    return (x.to(opt.device, opt.dtype), t.to(opt.device), context.to(opt.device, opt.dtype),
            None if mask is None else mask.to(opt.device))


def forward_fns(ours, ref, cfg, args):
    """Zero-argument calls of our network and the reference on the same inputs."""
    if isinstance(cfg, M.VAEConfig):
        z, = args
        return lambda: ours.decode(z), lambda: ref.decode(z / cfg.scaling_factor).sample
    x, t, context, mask = args
    if isinstance(cfg, M.DiTConfig):
        cond, ref_mask = {'resolution': None, 'aspect_ratio': None}, mask.long()  # diffusers takes a 0/1 mask
        return (lambda: ours(x, t, context, mask),
                lambda: ref(x, context, timestep=t, added_cond_kwargs=cond, encoder_attention_mask=ref_mask).sample)
    return lambda: ours(x, t, context), lambda: ref(x, t, encoder_hidden_states=context).sample


def bench_forward(preset, size, opt, batch=1, goal=None):
    """Figure 1, one row: forward time of a network preset at size x size latents."""
    cfg = M.PRESETS[preset]
    ours, ref = pair(cfg, opt)
    ours = compiled(ours, opt)
    args = inputs(cfg, size, batch, opt)
    f_ours, f_ref = forward_fns(ours, ref, cfg, args)
    with torch.inference_mode():
        err = rel_err(f_ours(), f_ref())
        t_ours, t_ref = time_pair(f_ours, f_ref, opt)
    name = {M.UNetConfig: 'UNet', M.DiTConfig: 'DiT', M.VAEConfig: 'VAE decoder'}[type(cfg)]
    dtype = str(opt.dtype).replace('torch.', '')
    row = Row(1, f'{name} {preset}, {size}x{size} latents, batch {batch}, {dtype}', t_ours, t_ref,
              goal=goal if goal is not None else (cpu_goal(preset) if opt.device.type == 'cpu' else ''),
              err=err, tol=tolerance(opt.dtype))
    del ours, ref
    free()
    return row


def figure1(opt):
    if opt.device.type == 'cpu':
        sizes = (8,) if opt.quick else (8, 16)
    else:
        sizes = (32,) if opt.quick else (32, 64)
    rows = []
    for preset in ('tiny_unet', 'tiny_dit', 'tiny_vae'):
        rows.append(bench_forward(preset, 16, opt))
    for preset in ('sd21', 'pixart_alpha_512', 'sd_vae'):
        for size in sizes:
            rows.append(bench_forward(preset, size, opt))
    return rows


# -----------------------------------------------------------------------------
# Figure 2: one-step generation


def euler_one_step(scheduler, unet, vae, z, context, clamp=True):
    """diffusers' one-step path (as SD-Turbo's pipeline runs it): Euler, trailing timesteps, 1 step."""
    scheduler.set_timesteps(1, device=z.device)
    t = scheduler.timesteps[0]
    # Euler's x_T for our variance-preserving x_T = z. (Its init_noise_sigma is sigma_max itself for
    # trailing spacing, which would feed the UNet 0.998 z: a 0.2% difference in the input, not in speed.)
    latents = z * (scheduler.sigmas[0] ** 2 + 1) ** 0.5
    eps = unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=context).sample
    x0 = scheduler.step(eps, t, latents).prev_sample
    image = vae.decode(x0 / vae.config.scaling_factor).sample
    return image.clamp(-1, 1) if clamp else image


def ours_one_step(unet, vae, schedule, z, context, clamp=True):
    """Our one-step generation: the student from its start timestep, then the VAE decoder."""
    image = vae.decode(vsd.student_generate(unet, schedule, z, context))
    return image.clamp(-1, 1) if clamp else image


def generation_pair(unet_preset, vae_preset, opt):
    """Our (UNet, VAE, schedule) and the reference (UNet, VAE, Euler scheduler), same weights."""
    from diffusers import EulerDiscreteScheduler
    cfg = M.PRESETS[unet_preset]
    unet, ref_unet = pair(cfg, opt)
    vae, ref_vae = pair(M.PRESETS[vae_preset], opt, seed=1)
    unet, vae = compiled(unet, opt), compiled(vae, opt)
    s = M.SCHEDULES['sd']
    scheduler = EulerDiscreteScheduler(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start,
                                       beta_end=s.beta_end, beta_schedule=s.beta_schedule, timestep_spacing='trailing')
    return (unet, vae, M.NoiseSchedule(s).to(opt.device)), (ref_unet, ref_vae, scheduler)


def generation_inputs(cfg, size, batch, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, cfg.in_channels, size, size, generator=g).to(opt.device, opt.dtype)
    context = torch.randn(batch, 77, cfg.context_dim, generator=g).to(opt.device, opt.dtype)
    return z, context


def bench_generation(unet_preset, vae_preset, size, batches, opt, goal='', models=None):
    """Figure 2: one-step generation at size x size latents for each batch size; one row each."""
    (unet, vae, schedule), (ref_unet, ref_vae, scheduler) = models or generation_pair(unet_preset, vae_preset, opt)
    rows = []
    for batch in batches:
        z, context = generation_inputs(M.PRESETS[unet_preset], size, batch, opt)
        f_ours = lambda: ours_one_step(unet, vae, schedule, z, context)
        f_ref = lambda: euler_one_step(scheduler, ref_unet, ref_vae, z, context)
        with torch.inference_mode():  # compared before the clamp, which random weights would saturate
            err = rel_err(ours_one_step(unet, vae, schedule, z, context, clamp=False),
                          euler_one_step(scheduler, ref_unet, ref_vae, z, context, clamp=False))
            t_ours, t_ref = time_pair(f_ours, f_ref, opt)
        px = size * 2 ** (len(M.PRESETS[vae_preset].channels) - 1)
        dtype = str(opt.dtype).replace('torch.', '')
        rows.append(Row(2, f'{unet_preset} + {vae_preset}, {px}x{px} px, batch {batch}, {dtype}', t_ours, t_ref,
                        goal=goal, err=err, tol=tolerance(opt.dtype)))
    return rows


def matmul_rate(opt, n=8192):
    """The device's measured bf16 matrix rate in TFLOP/s (one n x n x n matmul, median of repeats)."""
    a = torch.randn(n, n, device=opt.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=opt.device, dtype=torch.bfloat16)
    seconds(lambda: a @ b, 3, opt.device)  # warm-up
    return 2 * n ** 3 / statistics.median(seconds(lambda: a @ b, 10, opt.device) for _ in range(opt.repeats)) / 1e12


def figure2(opt):
    rows = []
    if opt.device.type == 'cuda':
        gen_opt = dataclasses.replace(opt, dtype=torch.bfloat16)
        models = generation_pair('sd21', 'sd_vae', gen_opt)
        batches = (1, 16)
        rows += bench_generation('sd21', 'sd_vae', 64, batches, gen_opt, goal='<= 0.6', models=models)
        rate, tflop = matmul_rate(gen_opt), TFLOP_DENOISER + TFLOP_VAE_DECODER
        for batch, r in zip(batches, list(rows)):
            rows.append(Row(2, f'ours against the FLOP floor, batch {batch} (reference = {batch} x {tflop} TFLOP '
                               f'at the measured bf16 matmul rate, {rate:.0f} TFLOP/s)', r.ours, batch * tflop / rate))
        del models
        free()
    else:
        for batch in (1, 16):
            rows.append(Row(2, f'sd21 + sd_vae, 512x512 px, batch {batch}, bfloat16', goal='<= 0.6', note=NOT_MEASURED))
        rows.append(Row(2, 'ours against the FLOP floor (bf16 matmul rate)', note=NOT_MEASURED))
    # the tiny presets run everywhere, so the code path above is exercised on any machine
    rows += bench_generation('tiny_unet', 'tiny_vae', 16, (1,), opt)
    return rows


# -----------------------------------------------------------------------------
# Figure 3: one PG-SB training step


LORA_RANK, LORA_ALPHA = 64, 128  # SNOOPI Table 6


def autocast(device, bf16=None):
    """bf16 autocast on CUDA (or wherever bf16=True asks for it); off elsewhere."""
    bf16 = device.type == 'cuda' if bf16 is None else bf16
    return torch.autocast(device.type, torch.bfloat16, enabled=bf16)


class OursPGSB:
    """Our step, as train.py runs it: vsd.pgsb_step, one teacher whose LoRA adapters are switched off
    for the frozen pass, cond/uncond batched. The LoRA teacher's loss is SwiftBrush's alpha_t-weighted
    eps error, as in the reference. Frozen base weights held as train.py holds them when `frozen_dtype`
    is bf16 (train.hold_bf16); the student and the adapters train in fp32 (bf16 autocast on GPU, or
    wherever `bf16` asks for it). AdamW as train.py builds it (train.adamw: fused on CUDA), with
    `adam`'s options on top."""

    def __init__(self, student, teacher, schedule, device, bf16=None, adam=None, **levers):
        self.device, self.student, self.teacher, self.schedule = device, student.train(), teacher, schedule
        self.bf16 = device.type == 'cuda' if bf16 is None else bf16
        self.vsd = vsd.VSDConfig(lora_loss='swiftbrush', **levers)  # levers: vsd's memory options
        lora_params = [p for n, p in teacher.named_parameters() if '.lora_' in n]
        adam = adam or {}
        self.opts = {'student': train.adamw(self.student.parameters(), device, lr=1e-6, **adam),
                     'lora': train.adamw(lora_params, device, lr=1e-3, **adam)}

    @classmethod
    def from_state(cls, state, lora_state, cfg, device, frozen_dtype, opt=None):
        """From a diffusers state dict; opt's levers (gradient checkpointing, channels-last) applied."""
        student = ours_from_state(state, cfg).to(device)
        teacher = ours_from_state(state, cfg).to(device).requires_grad_(False)
        if frozen_dtype == torch.bfloat16:
            train.hold_bf16(teacher)
        student.grad_checkpointing = bool(opt and opt.grad_checkpointing)
        if opt and opt.channels_last:
            student, teacher = (n.to(memory_format=torch.channels_last) for n in (student, teacher))
        vsd.add_lora(teacher, LORA_RANK, LORA_ALPHA)
        load_lora(teacher, lora_state)
        return cls(student, teacher, M.NoiseSchedule(M.SCHEDULES['sd']).to(device), device)

    def step(self, z, c, null, generator):
        cond = (c, None) if torch.is_tensor(c) else (c[0], None, c[1])  # SDXL: (context, added)
        info, _ = vsd.pgsb_step(self.student, self.teacher, self.schedule, self.opts, lambda: (z, cond, None),
                                null, self.vsd, generator, lambda: autocast(self.device, self.bf16))
        return info['vsd'], info['lora']


def peft_lora(teacher):
    """The LoRA teacher as the public SwiftBrush script builds it: peft adapters on a copy of the teacher."""
    from peft import LoraConfig, inject_adapter_in_model
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=['to_q', 'to_v'], init_lora_weights='gaussian')
    if hasattr(teacher, 'add_adapter'):
        teacher.add_adapter(config)
    else:  # diffusers' PixArt model has no adapter methods: peft's own injection, the same layers
        inject_adapter_in_model(config, teacher)
    return teacher


def ref_eps(net, x, t, c, added=None):
    """A diffusers denoiser's prediction: the UNet's, or PixArt's first channels (its learned sigma
    dropped). added: SDXL's pooled text and 6 size ids, concatenated (model.sdxl_added)."""
    if hasattr(net.config, 'caption_channels'):
        cond = {'resolution': None, 'aspect_ratio': None}
        return net(x, c, timestep=t, added_cond_kwargs=cond).sample[:, :x.shape[1]]
    if added is not None:
        cond = {'text_embeds': added[:, :-6], 'time_ids': added[:, -6:]}
        return net(x, t, encoder_hidden_states=c, added_cond_kwargs=cond).sample
    return net(x, t, encoder_hidden_states=c).sample


class RefPGSB:
    """The step as the public SwiftBrush script builds it: three diffusers networks (student, frozen
    teacher, a peft-LoRA copy of the teacher), four separate teacher forwards, DDPMScheduler noise.
    Random numbers are drawn in the same order as vsd.py, so the two steps compute the same losses."""

    def __init__(self, student, teacher, lora, device, bf16=None, foreach=None):
        from diffusers import DDPMScheduler
        self.device, self.student, self.teacher, self.lora = device, student.train(), teacher, lora
        self.bf16 = device.type == 'cuda' if bf16 is None else bf16
        s = M.SCHEDULES['sd']
        self.scheduler = DDPMScheduler(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start,
                                       beta_end=s.beta_end, beta_schedule=s.beta_schedule)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.vsd = vsd.VSDConfig()
        self.student_params = list(self.student.parameters())
        self.lora_params = [p for p in self.lora.parameters() if p.requires_grad]
        self.opts = {'student': torch.optim.AdamW(self.student_params, lr=1e-6, foreach=foreach),
                     'lora': torch.optim.AdamW(self.lora_params, lr=1e-3, foreach=foreach)}

    @classmethod
    def from_state(cls, state, lora_state, cfg, device, frozen_dtype, opt=None):
        from diffusers.training_utils import cast_training_params
        student = diffusers_from_state(state, cfg).to(device)
        teacher = diffusers_from_state(state, cfg).to(device, frozen_dtype).requires_grad_(False)
        lora = peft_lora(copy.deepcopy(teacher))
        unexpected = lora.load_state_dict(lora_state, strict=False).unexpected_keys
        assert not unexpected, f'LoRA weights peft does not know: {unexpected[:3]}'
        cast_training_params(lora, dtype=torch.float32)
        return cls(student, teacher, lora, device)

    def step(self, z, c, null, generator):
        u, _, *ua = null
        c, added = (c, None) if torch.is_tensor(c) else c  # SDXL: (context, added)
        u_added = ua[0].expand_as(added) if added is not None else None
        B, T, v = z.shape[0], self.scheduler.config.num_train_timesteps, self.vsd
        a = lambda t: self.alphas_cumprod[t].view(-1, 1, 1, 1)
        with autocast(self.device, self.bf16):
            t_student = torch.full((B,), T - 1, device=z.device, dtype=torch.long)
            eps_hat = ref_eps(self.student, z, t_student, c, added)
            x0 = (z - (1 - a(t_student)).sqrt() * eps_hat) / a(t_student).sqrt()
            t = torch.randint(v.t_min, v.t_max + 1, (B,), device=z.device, generator=generator)
            eps = torch.randn(x0.shape, device=z.device, dtype=x0.dtype, generator=generator)
            x_t = self.scheduler.add_noise(x0.detach(), eps, t)
            kappa = v.kappa_min + (v.kappa_max - v.kappa_min) * torch.rand(B, device=z.device, generator=generator)
            kappa = kappa.view(-1, 1, 1, 1)
            with torch.no_grad():
                uncond = u.expand_as(c)
                teacher_c = ref_eps(self.teacher, x_t, t, c, added)
                teacher_u = ref_eps(self.teacher, x_t, t, uncond, u_added)
                lora_c = ref_eps(self.lora, x_t, t, c, added)
                lora_u = ref_eps(self.lora, x_t, t, uncond, u_added)
                eps_teacher = teacher_u + kappa * (teacher_c - teacher_u)
                eps_lora = lora_u + kappa * (lora_c - lora_u)
                grad = torch.nan_to_num((1 - a(t)) * (eps_teacher - eps_lora))
            loss = 0.5 * F.mse_loss(x0.float(), (x0 - grad).detach().float())
        self.opts['student'].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student_params, 1.0)
        self.opts['student'].step()
        with autocast(self.device, self.bf16):
            x0 = x0.detach()
            t = torch.randint(0, T, (B,), device=z.device, generator=generator)
            eps = torch.randn(x0.shape, device=z.device, dtype=x0.dtype, generator=generator)
            drop = torch.rand(B, device=z.device, generator=generator) < v.null_prob
            c = torch.where(drop.view(-1, 1, 1), u.expand_as(c), c)
            added = None if added is None else torch.where(drop.view(-1, 1), u_added, added)
            eps_pred = ref_eps(self.lora, self.scheduler.add_noise(x0, eps, t), t, c, added)
            w = a(t).sqrt()
            lora_loss = F.mse_loss((w * eps_pred).float(), (w * eps).float())
        self.opts['lora'].zero_grad(set_to_none=True)
        lora_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.lora_params, 1.0)
        self.opts['lora'].step()
        return loss.detach(), lora_loss.detach()


def lora_weights(cfg, seed=2):
    """peft LoRA weights for the teacher (keys as peft names them), with a non-zero up-projection
    so that the LoRA teacher differs from the frozen one and the VSD loss is not trivially 0."""
    teacher = peft_lora(diffusers_net(cfg))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in teacher.state_dict().items():
        if 'lora_A' in k:
            state[k] = v.clone()
        elif 'lora_B' in k:
            state[k] = 0.05 * torch.randn(v.shape, generator=g)
    return state


def load_lora(teacher, lora_state):
    """Copy peft's LoRA weights (lora_A/lora_B) into our adapters (lora_down/lora_up)."""
    ours = {}
    for k, v in lora_state.items():  # e.g. ...attn1.to_q.lora_A.default_0.weight -> ...attn1.to_q.lora_down.weight
        k = re.sub(r'\.lora_A\.[^.]+\.', '.lora_down.', re.sub(r'\.lora_B\.[^.]+\.', '.lora_up.', k))
        ours[convert.to_ours(k)] = v
    missing = set(ours) - set(teacher.state_dict())
    if missing:
        raise KeyError(f'LoRA keys with no place in our teacher: {sorted(missing)[:3]}')
    teacher.load_state_dict(ours, strict=False)


def pgsb_inputs(cfg, size, batch, device, seed=0):
    """A batch for one step: noise z, prompt states c, the null prompt's (states, mask)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, cfg.in_channels, size, size, generator=g).to(device)
    c = torch.randn(batch, 77, cfg.context_dim, generator=g).to(device)
    return z, c, (torch.randn(1, 77, cfg.context_dim, generator=g).to(device), None)


def first_step(setup, inputs, device):
    """One step from a fresh generator: its (VSD, LoRA) losses, and a zero-argument call for more."""
    generator = torch.Generator(device).manual_seed(0)
    losses = torch.stack(setup.step(*inputs, generator))
    return losses, lambda: setup.step(*inputs, generator)


def pgsb_alone(cls, state, lora_state, cfg, inputs, opt, frozen_dtype):
    """Build one implementation's step on the GPU and measure it with nothing else there:
    (first step's losses, median seconds per step, peak memory in GiB)."""
    free()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    setup = cls.from_state(state, lora_state, cfg, opt.device, frozen_dtype, opt)
    losses, step = first_step(setup, inputs, opt.device)
    for _ in range(opt.warmup):
        step()
    t = statistics.median(seconds(step, 1, opt.device) for _ in range(opt.repeats))
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    del setup, step
    free()
    return losses, t, peak


def bench_pgsb(preset, size, batch, opt, goals=True):
    """Figure 3: one PG-SB step, ours against the reference; rows for images/s and peak memory.
    On the GPU each implementation is built and measured alone, so that peak memory is its own;
    on the CPU (no memory figure) both are built and their steps interleaved, like the others."""
    cfg = M.PRESETS[preset]
    state = diffusers_net(cfg).state_dict()
    lora_state = lora_weights(cfg)
    inputs = pgsb_inputs(cfg, size, batch, opt.device)
    frozen = torch.bfloat16 if opt.device.type == 'cuda' else torch.float32
    if opt.device.type == 'cuda':
        ref_losses, ref_t, ref_mem = pgsb_alone(RefPGSB, state, lora_state, cfg, inputs, opt, frozen)
        losses, t, mem = pgsb_alone(OursPGSB, state, lora_state, cfg, inputs, opt, frozen)
    else:
        losses, step = first_step(OursPGSB.from_state(state, lora_state, cfg, opt.device, frozen, opt), inputs, opt.device)
        ref_losses, ref_step = first_step(RefPGSB.from_state(state, lora_state, cfg, opt.device, frozen), inputs, opt.device)
        (t, ref_t), mem, ref_mem = time_pair(step, ref_step, opt, min_sample=0), None, None
    err = max(rel_err(a, b) for a, b in zip(losses, ref_losses))  # VSD loss, LoRA loss
    prec = 'bf16 autocast, frozen weights bf16' if opt.device.type == 'cuda' else 'fp32'
    what = f'{preset}, {size}x{size} latents, batch {batch}, {prec}'
    # err: the first step's two losses against the reference's. Under bf16 autocast the VSD loss is
    # mostly rounding of the small difference of the two teachers' predictions (in both
    # implementations), so there the bound only catches gross errors; fp32 (CPU, tests) is exact.
    rows = [Row(3, f'{what}: images/s (higher is better)', batch / t, batch / ref_t, unit='img/s',
                goal='>= 1.5' if goals else '', err=err, tol=1e-4 if opt.device.type == 'cpu' else 0.25)]
    if mem is not None:
        rows.append(Row(3, f'{what}: peak memory', mem, ref_mem, unit='GiB', goal='<= 0.7' if goals else ''))
    else:
        rows.append(Row(3, f'{what}: peak memory', note='n/a (CPU)'))
    return rows


def figure3(opt):
    rows = []
    if opt.device.type == 'cuda':
        rows += bench_pgsb('sd21', 64, 4, opt)
    else:
        rows.append(Row(3, 'sd21, 64x64 latents, batch 4, bf16: images/s (higher is better)', goal='>= 1.5',
                        note=NOT_MEASURED))
        rows.append(Row(3, 'sd21, 64x64 latents, batch 4, bf16: peak memory', goal='<= 0.7', note=NOT_MEASURED))
    rows += bench_pgsb('tiny_unet', 16, 4, opt)
    return rows


# -----------------------------------------------------------------------------
# Figure 4: NASA's overhead


def bench_nasa(unet_preset, vae_preset, size, batch, opt, models=None):
    """Figure 4: our one-step generation with NASA (a negative prompt) against without."""
    (unet, vae, schedule), _ = models or generation_pair(unet_preset, vae_preset, opt)
    z, context = generation_inputs(M.PRESETS[unet_preset], size, batch, opt)
    negative = torch.randn(1, *context.shape[1:], generator=torch.Generator().manual_seed(3)).to(context)
    paired, _ = nasa.pair(context, negative)
    nasa_unet = copy.deepcopy(getattr(unet, '_orig_mod', unet))  # NASA on for good in a copy: no recompiles
    nasa.enable(nasa_unet, nasa.default_alpha(nasa_unet))
    nasa_unet = compiled(nasa_unet, opt)
    with torch.inference_mode():
        t_with, t_without = time_pair(lambda: ours_one_step(nasa_unet, vae, schedule, z, paired),
                                      lambda: ours_one_step(unet, vae, schedule, z, context), opt)
    px = size * 2 ** (len(M.PRESETS[vae_preset].channels) - 1)
    goal = '<= 1.05' if not unet_preset.startswith('tiny') else ''
    return Row(4, f'{unet_preset} + {vae_preset}, {px}x{px} px, batch {batch}: with / without NASA', t_with, t_without,
               goal=goal)


def figure4(opt):
    rows = []
    if opt.device.type == 'cuda':
        gen_opt = dataclasses.replace(opt, dtype=torch.bfloat16)
        models = generation_pair('sd21', 'sd_vae', gen_opt)
        rows += [bench_nasa('sd21', 'sd_vae', 64, b, gen_opt, models=models) for b in (1, 16)]
        del models
        free()
    else:
        rows += [Row(4, f'sd21 + sd_vae, 512x512 px, batch {b}, bf16: with / without NASA', goal='<= 1.05',
                     note=NOT_MEASURED) for b in (1, 16)]
        rows += [bench_nasa('sd21', 'sd_vae', size, 1, opt) for size in ((8,) if opt.quick else (8, 16))]
    rows.append(bench_nasa('tiny_unet', 'tiny_vae', 16, 1, opt))
    return rows


# -----------------------------------------------------------------------------
# The plan: peak memory and FLOPs of one PG-SB step per GPU at the real sizes, computed on the CPU
#
# Under FakeTensorMode a tensor has its shape, dtype and a storage of the right size, but no data:
# an SD2.1 step at batch 16 runs in seconds. LiveBytes adds each new storage's bytes when an op
# creates it and takes them off when the storage dies; its high-water mark is what CUDA's
# max_memory_allocated reports (less the allocator's rounding). Flops counts matmuls,
# convolutions and attention (a multiply-add is 2 FLOPs). The fake tensors live on the CPU with CPU
# bf16 autocast; attention takes the fused (flash) path there as on the GPU, so no N x N matrix.

PLAN_MODELS = ('sd15', 'sd21', 'sdxl', 'pixart_alpha_512')  # those model.py has presets for are planned
GPU_GB = (24, 40, 80)
HEADROOM = 0.9  # a step fits a GPU when its tensors take at most this share (CUDA context, workspaces, fragmentation)
FSDP_GPUS = 4   # the paper's 4 GPUs


class LiveBytes(TorchDispatchMode):
    """Bytes held by live tensor storages: now (`live`) and at most (`peak`). Fake tensors are also
    held in reference cycles (the fake mode's bookkeeping) that a real run does not make; before a
    new high is recorded, once the bytes have grown by `slack` since the last time, the garbage
    collector frees them, so the peak is within `slack` of the real one."""

    def __init__(self, slack=0.05):
        super().__init__()
        self.live = self.peak = self.collected_at = 0
        self.held, self.slack = set(), slack

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t.untyped_storage())
        if self.live > self.peak:
            if self.live > (1 + self.slack) * self.collected_at:
                self.collect()
            self.peak = max(self.peak, self.live)
        return out

    def __enter__(self):
        gc.collect()
        gc.freeze()  # what exists now is not the step's garbage: each collection then scans only the new objects
        return super().__enter__()

    def __exit__(self, *exc):
        gc.unfreeze()
        return super().__exit__(*exc)

    def collect(self):
        """The bytes live once the garbage is gone."""
        gc.collect()
        self.collected_at = self.live
        return self.live

    def restart(self):
        """A new high-water mark from here."""
        self.peak = self.collect()

    def track(self, storage):
        key = storage._cdata  # the storage itself: views and Parameters share it
        if key not in self.held:
            self.held.add(key)
            self.live += storage.nbytes()
            weakref.finalize(storage, self.release, key, storage.nbytes())

    def release(self, key, nbytes):
        self.held.discard(key)
        self.live -= nbytes


def materialize(module, device='cpu'):
    """Storages for a module built on the meta device (fake ones under FakeTensorMode), set in place:
    Module.to() cannot swap fake tensors into a module."""
    for m in module.modules():
        for d in (m._parameters, m._buffers):
            for k, v in d.items():
                if v is not None and v.is_meta:
                    new = torch.empty_like(v, device=device)
                    d[k] = nn.Parameter(new, v.requires_grad) if isinstance(v, nn.Parameter) else new
    return module


def cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def cpu_flash_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# the CPU's fused attention, counted like CUDA's flash attention
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_flops,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_flash_backward_flops}


class Flops(TorchDispatchMode):
    """FLOPs of the ops run under it (`total`), by torch's own formulas (flop_counter's registry and
    CPU_ATTENTION_FLOPS); an op without one is decomposed first, as FlopCounterMode does. Not
    FlopCounterMode itself: its module tracker puts gradient hooks on every module's inputs and
    outputs, and with checkpointed blocks those hooks keep tensors alive that a real step has freed,
    so the plan's peak counted them (SD2.1 at batch 16, first step: 21.8 GiB against 17.9)."""
    FORMULAS = {**flop_counter.flop_registry, **{k: flop_counter.shape_wrapper(v) for k, v in CPU_ATTENTION_FLOPS.items()}}

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.ops.prim.device.default:  # (no kernels to decompose into)
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        count = self.FORMULAS.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


@dataclass
class Levers:
    frozen_bf16: bool = True          # teacher base and VAE weights held in bf16 (train.hold_bf16)
    grad_checkpointing: bool = True   # the student's blocks recomputed in the backward pass
    lora_checkpointing: bool = True   # the teacher's blocks recomputed in the LoRA teacher's backward (vsd.py)
    free_student_grads: bool = True   # the student's gradients dropped before the LoRA update (vsd.py)
    fused_adam: bool = True           # AdamW fused (train.adamw on CUDA); off: the multi-tensor one, CUDA's default

    NAMES = {'frozen_bf16': 'frozen bf16', 'grad_checkpointing': 'grad checkpointing',
             'lora_checkpointing': 'LoRA checkpointing', 'free_student_grads': 'student grads freed',
             'fused_adam': 'fused AdamW'}

    def __str__(self):
        return ', '.join(name for k, name in self.NAMES.items() if getattr(self, k)) or 'none'

    def vsd(self):
        return dict(lora_grad_checkpointing=self.lora_checkpointing, free_student_grads=self.free_student_grads)


def schedule_for(cfg):
    return M.SCHEDULES['pixart' if isinstance(cfg, M.DiTConfig) else 'sd']


def plan_vae(frozen_bf16, ours=True):
    """The frozen VAE a training holds beside the networks (for validation images and the CLIP loss):
    ours as train.py holds it (train.hold_bf16), the reference's all of it in bf16."""
    vae = M.build(M.PRESETS['sd_vae']).requires_grad_(False)
    return vae if not frozen_bf16 else train.hold_bf16(vae) if ours else vae.bfloat16()


def plan_ours(cfg, levers, vae=True, bf16=True):
    """Our step's networks on the meta device: () -> (OursPGSB on fake storages, the VAE's). bf16: the
    step under bf16 autocast, as on CUDA (off: fp32 throughout, which needs frozen_bf16 off)."""
    with torch.device('meta'):
        student = M.build(cfg)
        student.grad_checkpointing = levers.grad_checkpointing
        teacher = M.build(cfg).requires_grad_(False)
        if levers.frozen_bf16:
            train.hold_bf16(teacher)
        vsd.add_lora(teacher, LORA_RANK, LORA_ALPHA)
        schedule = M.NoiseSchedule(schedule_for(cfg))
        held = plan_vae(levers.frozen_bf16) if vae else None
    device = torch.device('cpu')
    adam = {'fused': True} if levers.fused_adam else {'foreach': True}
    return lambda: (OursPGSB(materialize(student), materialize(teacher), materialize(schedule), device,
                             bf16=bf16, adam=adam, **levers.vsd()), held and materialize(held))


def plan_ref(cfg, levers, vae=True):
    """The reference step's networks on the meta device (three diffusers networks, peft LoRA)."""
    from diffusers.training_utils import cast_training_params
    frozen = torch.bfloat16 if levers.frozen_bf16 else torch.float32
    with torch.device('meta'):
        student = diffusers_net(cfg)
        teacher = diffusers_net(cfg).to(frozen).requires_grad_(False)
        lora = peft_lora(copy.deepcopy(teacher))
        cast_training_params(lora, dtype=torch.float32)
        held = plan_vae(levers.frozen_bf16, ours=False) if vae else None
    device = torch.device('cpu')
    return lambda: (RefPGSB(materialize(student), materialize(teacher), materialize(lora), device,
                            bf16=True, foreach=True), held and materialize(held))


def plan_inputs(cfg, batch):
    """z, prompt states, the null prompt's: 77 CLIP tokens for a UNet, 120 T5 tokens for a DiT; for
    SDXL the states come with the pooled text and size ids: (context, added) and (null, None, added)."""
    L, C = (120, cfg.caption_channels) if isinstance(cfg, M.DiTConfig) else (77, cfg.context_dim)
    z = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    c, u = torch.randn(batch, L, C), torch.randn(1, L, C)
    if getattr(cfg, 'addition_embed', None):
        px = cfg.sample_size * 8
        added = M.sdxl_added(torch.randn(batch, cfg.pooled_dim), px, px)
        return z, (c, added), (u, None, M.sdxl_added(torch.randn(1, cfg.pooled_dim), px, px))
    return z, c, (u, None)


@dataclass
class StepPlan:
    peak: int      # bytes, the step's high-water mark with every weight, gradient and optimizer state
    static: int    # bytes still held after the step: weights, gradients, optimizer state (no activations)
    flops: int     # one step's FLOPs
    batch: int
    student_params: int
    grads_freed: bool = False  # the student's gradients are dropped after its update (not in `static`)
    units: tuple = ()          # parameters of each unit train.py's --fsdp shards (train.fsdp_units)

    def fsdp_gathered(self):
        """Bytes FSDP holds unsharded on top of the shards (fp32): the root's own parameters (held
        through the forward), two units (the one running and the one prefetched) and one unit's full
        gradients before their reduce-scatter. Counted as if all were live at the step's peak: an
        upper bound, since the peak may come in the LoRA update, when the student holds only its shards."""
        root = self.student_params - sum(self.units)
        return 4 * (root + 3 * max(self.units, default=0))

    def peak_at(self, batch, shard_gpus=1):
        """Peak bytes at another batch: the activations scale with it, the rest does not. With the
        student sharded over shard_gpus (FSDP, an estimate), its fp32 weights and AdamW moments (12
        bytes a parameter; 16 with the gradients when they are held after the step) shrink to their
        share, and fsdp_gathered() is added."""
        sharded = gathered = 0
        if shard_gpus > 1:
            sharded = (12 if self.grads_freed else 16) * self.student_params * (1 - 1 / shard_gpus)
            gathered = self.fsdp_gathered()
        return self.static - sharded + gathered + (self.peak - self.static) * batch / self.batch

    def largest_batch(self, gib, shard_gpus=1):
        per_image = (self.peak - self.static) / self.batch
        room = HEADROOM * gib * 2 ** 30 - self.peak_at(0, shard_gpus)
        return max(0, int(room // per_image))


def trace_step(build, cfg, batch):
    """One step (ours or the reference) on fake tensors, the second: a training holds what the first
    leaves between steps (AdamW's moments, the gradients a step keeps). Its StepPlan."""
    with FakeTensorMode(allow_non_fake_inputs=True), LiveBytes() as mem:
        setup, vae = build()
        inputs = plan_inputs(cfg, batch)
        setup.step(*inputs, None)
        mem.restart()
        with Flops() as counter:
            setup.step(*inputs, None)
        del inputs
        static = mem.collect()
        units = tuple(sum(p.numel() for p in u.parameters()) for u in train.fsdp_units(setup.student))
        return StepPlan(mem.peak, static, counter.total, batch,
                        sum(p.numel() for p in setup.student.parameters()),
                        isinstance(setup, OursPGSB) and setup.vsd.free_student_grads, units)


def measured_peak(setup, inputs):
    """The measured counterpart of trace_step on real CPU tensors: the high-water mark of the bytes the
    CPU allocator hands out during a second step (the profiler's memory events, from before the first,
    so that what the first leaves is counted when it is freed), plus those held before the first."""
    held = sum(t.untyped_storage().nbytes() for t in {id(x): x for x in tensors_of(setup, inputs)}.values())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        setup.step(*inputs, None)
        with torch.profiler.record_function('second step'):
            setup.step(*inputs, None)
    events = list(prof.profiler.kineto_results.events())
    second = next(e.start_ns() for e in events if e.name() == 'second step')
    level = top = 0
    for e in sorted((e for e in events if e.name() == '[memory]'), key=lambda e: e.start_ns()):
        level += e.nbytes()
        if e.start_ns() >= second:
            top = max(top, level)
    return held + top


def tensors_of(setup, inputs):
    nets = [setup.student, setup.teacher] + ([setup.lora] if hasattr(setup, 'lora') else [])
    out = [t for n in nets for t in list(n.parameters()) + list(n.buffers())]
    return out + [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]


def generation_flops(cfg):
    """FLOPs of one-step generation of one image, ours (student + VAE decoder) and diffusers'."""
    out = []
    for build_net, build_vae, run in (
            (lambda: M.build(cfg), lambda: M.build(M.PRESETS['sd_vae']),
             lambda net, vae, z, c, added: vae.decode(
                 (net(z, torch.full((1,), 999), c) if added is None else
                  net(z, torch.full((1,), 999), c, added=added))[:, :4])),
            (lambda: diffusers_net(cfg), lambda: diffusers_net(M.PRESETS['sd_vae']),
             lambda net, vae, z, c, added: vae.decode(ref_eps(net, z, torch.full((1,), 999), c, added)).sample)):
        with torch.device('meta'):
            net, vae = build_net().to(torch.bfloat16), build_vae().to(torch.bfloat16)
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            net, vae = materialize(net), materialize(vae)
            z, c, _ = plan_inputs(cfg, 1)
            c, added = (c, None) if torch.is_tensor(c) else c
            with Flops() as counter:
                run(net, vae, z.bfloat16(), c.bfloat16(), None if added is None else added.bfloat16())
        out.append(counter.total)
    return out


def plan(batch, models=PLAN_MODELS, lever_model='sd21', log=print, vae=True):
    """The plan's rows: per model, ours and the reference at the default levers and ours with FSDP; for
    lever_model, ours with the levers off one at a time and all off; and one-step generation FLOPs.
    vae: hold the frozen VAE beside the networks, as a training does."""
    rows, gen = [], []
    default = Levers()
    for name in (m for m in models if m in M.PRESETS):
        cfg = M.PRESETS[name]
        start = time.time()
        ours = trace_step(plan_ours(cfg, default, vae), cfg, batch)
        ref = trace_step(plan_ref(cfg, default, vae), cfg, batch)
        rows.append((name, str(default), ours, ref, 1))
        rows.append((name, f'{default} + FSDP over {FSDP_GPUS} GPUs (estimate)', ours, None, FSDP_GPUS))
        if name == lever_model:  # each lever off alone, then all of them
            off = [Levers(**{k: False}) for k in Levers.NAMES] + [Levers(**{k: False for k in Levers.NAMES})]
            for levers in off:
                rows.append((name, str(levers), trace_step(plan_ours(cfg, levers, vae), cfg, batch), None, 1))
        gen.append((name, *generation_flops(cfg)))
        log(f'planned {name} in {time.time() - start:.0f} s')
    return rows, gen


def gib(nbytes):
    return nbytes / 2 ** 30


def plan_table(rows, gen):
    out = ['', f'### Plan: one PG-SB step per GPU, bf16 autocast (fake tensors; fits = at most {HEADROOM:.0%} '
               'of the GPU)', '',
           '| model | levers | batch/GPU | ours peak | reference peak | ours/ref | ours TFLOP | ref TFLOP | '
           'ours largest batch at ' + ' / '.join(f'{g}' for g in GPU_GB) + ' GB | reference\'s |',
           '|---|---|---|---|---|---|---|---|---|---|']
    for name, levers, ours, ref, shards in rows:
        fits = ' / '.join(str(ours.largest_batch(g, shards)) for g in GPU_GB)
        peak = gib(ours.peak_at(ours.batch, shards))
        if ref is None:
            out.append(f'| {name} | {levers} | {ours.batch} | {peak:.1f} GiB | — | — | {ours.flops / 1e12:.1f} | — '
                       f'| {fits} | — |')
            continue
        ref_fits = ' / '.join(str(ref.largest_batch(g)) for g in GPU_GB)
        out.append(f'| {name} | {levers} | {ours.batch} | {peak:.1f} GiB | {gib(ref.peak):.1f} GiB | '
                   f'{ours.peak / ref.peak:.2f} | {ours.flops / 1e12:.1f} | {ref.flops / 1e12:.1f} | {fits} | {ref_fits} |')
    floor = TFLOP_DENOISER + TFLOP_VAE_DECODER
    out += ['', '### Plan: one-step generation, one image at the model\'s size (denoiser + VAE decoder)', '',
            f'| model | ours TFLOP | diffusers TFLOP | ours/diffusers | reported floor (SD: {floor} TFLOP) |',
            '|---|---|---|---|---|']
    for name, ours, ref in gen:
        f = f'{ours / 1e12 / floor:.2f} x' if name in ('sd15', 'sd21') else '—'  # the floor is SD's
        out.append(f'| {name} | {ours / 1e12:.2f} | {ref / 1e12:.2f} | {ours / ref:.3f} | {f} |')
    return '\n'.join(out)


# -----------------------------------------------------------------------------


@cli.script('bench.py')
def main(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='device (default: %(default)s)')
    a('--quick', action='store_true', help='tiny presets and only the smallest real-config sizes (default: off)')
    a('--compile', action='store_true', help='torch.compile our networks in figures 1, 2 and 4; the reference runs '
                                             'eager, as its scripts do (default: off)')
    a('--channels-last', action='store_true', help='run our convolutional networks in channels-last memory format; '
                                                   'the reference keeps the default format (default: off)')
    a('--dtype', choices=['auto', 'float32', 'bfloat16', 'float16'], default='auto',
      help='weights and activations of figure 1 and of the small rows of figures 2 and 4 (their 512x512 GPU rows '
           'are bf16 by definition; figure 3 trains fp32 weights under bf16 autocast on the GPU, fp32 on the CPU); '
           'auto: bfloat16 on CUDA, float32 on the CPU (default: %(default)s)')
    a('--repeats', type=int, default=10, help='timed samples per measurement; the median is reported '
                                             '(default: %(default)s)')
    a('--figures', default='1,2,3,4', help='comma-separated figures to run (default: %(default)s)')
    a('--threads', type=int, help="torch CPU threads (default: torch's own setting, left as it is)")
    a('--json', metavar='OUT', help='also write the rows to this JSON file (default: none)')
    a('--plan', action='store_true', help='instead of timing: peak memory and FLOPs of one PG-SB step per GPU at the '
                                          'real sizes, ours and the reference, computed with fake tensors (default: off)')
    a('--plan-models', default=','.join(PLAN_MODELS), help='comma-separated model.py presets to plan; those it '
                                                           'lacks are left out (default: %(default)s)')
    a('--plan-batch', type=int, default=16, help='images per GPU in the plan (default: %(default)s, the paper\'s 64 on 4 GPUs)')
    args = p.parse_args(argv)
    device = cli.device('--device', args.device)
    cli.number('--repeats', args.repeats, low=1)
    cli.number('--threads', args.threads, low=1)
    figures = {1: figure1, 2: figure2, 3: figure3, 4: figure4}
    chosen = args.figures.split(',')
    if not all(f.strip() in ('1', '2', '3', '4') for f in chosen):
        raise cli.UserError(f"--figures {args.figures}: pass comma-separated figure numbers from 1 to 4")
    if args.json:
        cli.writable_file('--json', args.json)
    cli.number('--plan-batch', args.plan_batch, low=1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plan:
        import diffusers
        diffusers.utils.logging.set_verbosity_error()
        start = time.time()
        print(plan_table(*plan(args.plan_batch, args.plan_models.split(','))))
        print(f'\nwall time {time.time() - start:.0f} s')
        return
    if args.dtype == 'auto':
        dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    opt = Options(device, dtype, args.repeats, quick=args.quick, compile=args.compile,
                  channels_last=args.channels_last)
    import diffusers
    diffusers.utils.logging.set_verbosity_error()  # its advice on casting with .to() does not apply here
    print(f'device {device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}), '
          f'torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}, '
          f'repeats {args.repeats}{", quick" if args.quick else ""}{", ours compiled" if args.compile else ""}'
          f'{", ours channels-last" if args.channels_last else ""}')
    start = time.time()
    rows = []
    for f in (int(x) for x in chosen):
        fig_rows = figures[f](opt)
        print(table(fig_rows), flush=True)
        rows += fig_rows
    wall = time.time() - start
    print(f'\nwall time {wall:.0f} s')
    if args.json:
        meta = {'device': str(device), 'torch': torch.__version__, 'threads': torch.get_num_threads(),
                'dtype': args.dtype, 'repeats': args.repeats, 'quick': args.quick, 'compile': args.compile,
                'channels_last': args.channels_last, 'wall_s': wall}
        with open(args.json, 'w') as f:
            json.dump({**meta, 'rows': [r.asdict() for r in rows]}, f, indent=2)
    bad = [r.what for r in rows if r.agrees is False]
    if bad:
        raise SystemExit(f'bench.py: ours and the reference disagree in: {bad}')


if __name__ == '__main__':
    main()
