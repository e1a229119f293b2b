"""
The training objective: SwiftBrush's Variational Score Distillation (VSD) of a multi-step teacher
into a one-step student, with SNOOPI's Proper Guidance (PG-SB, arXiv 2412.02687): the
classifier-free guidance scale kappa is drawn at random, per sample, from U(kappa_min, kappa_max)
and applied to both the frozen teacher and the LoRA teacher.

One step, per batch of text states c (and the null prompt's c0):
  1. student:       z ~ N(0, I) at the start timestep  ->  x0 = (z - sigma_T eps_hat) / alpha_T
  2. VSD:           x_t = alpha_t x0 + sigma_t eps,  t ~ U{t_min..t_max}
                    grad = sigma_t^2 (eps_teacher^kappa - eps_lora^kappa)   (or DMD's normalised
                    x0 difference, vsd_weight='dmd'; plus DMD's regression term,
                    regression_loss, on pairs train.py draws)
                    loss = 0.5 mse(x0, sg(x0 - grad))             -> the student only
  3. LoRA teacher:  denoising loss on sg(x0) at t ~ U{0..T-1}       -> the LoRA adapters only
     (denoising_loss, on the network's own output, eps or v; the same function trains a teacher
     from scratch), K times per student step, on fresh samples if asked, so it keeps up.
pgsb_step runs the three; train.py and bench.py both call it. Optionally, DMD2's GAN term (GAN):
a classifier on the LoRA teacher's features tells real images from the student's, and the student
learns to fool it.
Two properties of the objective (README, "The shapes world"): the update is linear in kappa, so a
random kappa has the expectation of the fixed kappa at its mean and changes only the update's
variance; and with the same kappa on both teachers and a LoRA teacher that models the student
exactly (its conditional and, through the null prompt, its marginal), the update vanishes once the
student draws the teacher's unguided distribution, whatever kappa: guidance reaches the student
only through the LoRA teacher's error. An unguided LoRA teacher (lora_kappa = 1, DMD's fake score)
moves that fixed point to the teacher guided at the mean kappa.
The frozen and LoRA teachers share one copy of the base weights: the frozen teacher is the LoRA
teacher with its adapters switched off.

NASA-T (SNOOPI v3, NASA in distillation), when a batch carries negative prompts y-: the student
generates with NASA (nasa.py) at a scale alpha ~ U(0, 1) drawn each iteration; the frozen teacher's
guidance puts y- in the unconditional slot, (1 - kappa) eps(x_t, y-) + kappa eps(x_t, y); the LoRA
teacher gets no negative prompt, in its guided eps or its denoising loss.
"""
import contextlib
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import nasa

# -----------------------------------------------------------------------------
# LoRA adapters


class LoRA(nn.Module):
    """y = base(x) + (alpha / rank) * up(down(x)); `up` starts at zero, so a fresh adapter leaves
    the base layer's function unchanged. For a convolution, `down` has the base's kernel, stride
    and padding, and `up` is 1x1."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            y = y + self.scale * self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))).to(y.dtype)
        return y


def add_lora(model, rank=64, alpha=128, targets=('to_q', 'to_v')):
    """Wrap the linear and convolution layers named in `targets` (attention q and v by default;
    a ResNet's conv1, conv2 reach the resolutions attention does not) with LoRA adapters; returns
    their parameters."""
    wrapped = []
    for module in list(model.modules()):
        for name in targets:
            child = getattr(module, name, None)
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                lora = LoRA(child, rank, alpha).to(child.weight.device)
                setattr(module, name, lora)
                wrapped.append(lora)
    if not wrapped:
        raise ValueError(f"no linear or convolution layer named {targets} to put LoRA on")
    return [p for lora in wrapped for p in (lora.lora_down.weight, lora.lora_up.weight)]


@contextlib.contextmanager
def lora_disabled(model):
    """Run `model` as the frozen teacher: every adapter off."""
    loras = [m for m in model.modules() if isinstance(m, LoRA)]
    for m in loras:
        m.enabled = False
    try:
        yield model
    finally:
        for m in loras:
            m.enabled = True


# -----------------------------------------------------------------------------
# Denoiser helpers: the network is only a function; the schedule owns the parameterisation


def denoise(net, schedule, x_t, t, context, mask=None, added=None):
    """(x0, eps) predicted by `net` at x_t. PixArt's learned-sigma channels are dropped. added: SDXL's
    pooled text and size/crop ids (model.sdxl_added), for the UNets that take them."""
    out = (net(x_t, t, context, mask) if added is None else net(x_t, t, context, mask, added=added))[:, :x_t.shape[1]]
    return schedule.x0_eps(out, x_t, t)


def guided_eps(net, schedule, x_t, t, cond, null, kappa):
    """Classifier-free guidance, eps_u + kappa (eps_c - eps_u), kappa per sample (B,).
    cond/null are (context, mask) or (context, mask, added) tuples (added: SDXL's, see denoise);
    the two halves run as one batched forward."""
    B = x_t.shape[0]
    (c, cm, *ca), (u, um, *ua) = cond, null
    context = torch.cat([c, u.expand(B, *u.shape[1:])])
    mask = None if cm is None else torch.cat([cm, um.expand(B, *um.shape[1:])])
    added = torch.cat([ca[0], ua[0].expand(B, -1)]) if ca and ca[0] is not None else None
    _, eps = denoise(net, schedule, x_t.repeat(2, 1, 1, 1), t.repeat(2), context, mask, added)
    eps_c, eps_u = eps.chunk(2)
    return eps_u + kappa.view(-1, 1, 1, 1).to(eps.dtype) * (eps_c - eps_u)


# -----------------------------------------------------------------------------
# PG-SB


def option(default, help):
    return field(default=default, metadata={'help': help})


@dataclass
class VSDConfig:
    kappa_min: float = option(0.5, 'PG-SB guidance scale kappa ~ U(kappa_min, kappa_max) (Table 6)')
    kappa_max: float = option(4.0, 'upper end of the random guidance scale')
    kappa_fixed: float = option(4.5, "SwiftBrush's fixed guidance scale, for a teacher whose kappa is not random")
    random_kappa: str = option('both', 'which teachers draw kappa at random: both (PG-SB), teacher, lora, none (Table 2)')
    lora_kappa: float = option(0.0, "the LoRA teacher's guidance scale, overriding random_kappa for it when > 0; 1 is no guidance: the LoRA teacher then models the student's own conditional distribution, as DMD2's fake score does")
    t_min: int = option(20, 'VSD timesteps t ~ U{t_min..t_max}')
    t_max: int = option(980, 'upper end of the VSD timesteps')
    t_anneal: int = option(0, "ProlificDreamer's timestep annealing: from this training step on, t ~ U{t_min..t_anneal_max}, the lower noise levels where edges are drawn (0: off)")
    t_anneal_max: int = option(600, 'upper end of the VSD timesteps from step t_anneal on')
    student_t: int = option(-1, "the student's start timestep; -1 is the schedule's last (T - 1)")
    vsd_weight: str = option('swiftbrush', "the VSD gradient's weighting over t: swiftbrush (sigma_t^2 on the eps difference) or dmd (the x0 difference over the mean |x0 - teacher's x0|, DMD's normalisation)")
    null_prob: float = option(0.1, "share of prompts replaced by the null prompt in the LoRA teacher's loss")
    lora_loss: str = option('native', "the LoRA teacher's loss: native (mse on its own output, eps or v) or swiftbrush (alpha_t-weighted eps)")
    lora_updates: int = option(1, 'LoRA teacher updates per student step (two time-scale update rule)')
    lora_fresh: bool = option(False, 'each LoRA update on fresh samples (new noise and prompts) of the updated student')
    clip_weight: float = option(0.0, 'SwiftBrush v2 clamped CLIP loss weight (needs --clip)')
    clip_tau: float = option(0.37, 'the clamped CLIP loss stops pushing above this cosine similarity')
    clip_warmup: int = option(0, 'steps over which the CLIP loss weight ramps up linearly from 0')
    regression_weight: float = option(0.0, "weight of DMD's regression term: the student's image from a noise against the teacher's DDIM image from the same noise (0: off)")
    regression_pairs: int = option(512, 'teacher (noise, image) pairs drawn once per rank for the regression term')
    regression_steps: int = option(25, "DDIM steps of the teacher's pairs")
    regression_cfg: float = option(3.0, "guidance scale of the teacher's pairs")
    regression_decay: int = option(0, 'steps over which the regression weight falls linearly to 0, leaving VSD alone to sharpen what the pairs laid out (0: constant)')
    regression_pool: int = option(1, "compare the student's and the teacher's images averaged over KxK blocks (pixels or latents): the pairs fix the layout, VSD the edges (1: every pixel)")
    gan_weight: float = option(0.0, "weight of DMD2's GAN term in the student's loss: a classifier on the LoRA teacher's features at --gan-layer tells real images from the student's, both noised (needs --real-images; 0: off)")
    gan_d_weight: float = option(1e-2, "weight of the classifier's loss in the LoRA teacher's (DMD2's guidance_cls_loss_weight)")
    gan_t_max: int = option(0, "upper end of the GAN term's timesteps, t ~ U{t_min..gan_t_max}: the classifier sees edges at low noise (0: t_max)")
    gan_layer: str = option('', "the LoRA teacher's module whose output the classifier reads ('': its bottleneck, the UNet's mid_block.resnets.1 or the DiT's middle block)")
    lora_grad_checkpointing: bool = option(True, "recompute the teacher's activations in the LoRA teacher's backward pass (its frozen forwards keep none); the same numbers, less memory at the step's peak")
    free_student_grads: bool = option(True, "drop the student's gradients once it has stepped, before the LoRA teacher's update (the next step makes new ones); the same numbers, less memory")


RANDOM_KAPPA = {'both': (True, True), 'teacher': (True, False), 'lora': (False, True), 'none': (False, False)}


def draw_kappa(cfg: VSDConfig, B, device, generator=None):
    """Guidance scales (frozen teacher, LoRA teacher), each (B,). PG-SB draws one kappa per sample
    and gives the same one to both teachers; a teacher left out uses the fixed scale."""
    kappa = cfg.kappa_min + (cfg.kappa_max - cfg.kappa_min) * torch.rand(B, device=device, generator=generator)
    fixed = torch.full((B,), cfg.kappa_fixed, device=device)
    rt, rl = RANDOM_KAPPA[cfg.random_kappa]
    lora = torch.full((B,), cfg.lora_kappa, device=device) if cfg.lora_kappa > 0 else kappa if rl else fixed
    return (kappa if rt else fixed), lora


def at_step(cfg: VSDConfig, step):
    """The settings of training step `step` (counted from 0): cfg itself, or, from step cfg.t_anneal
    on, cfg with its timesteps' upper end lowered to cfg.t_anneal_max."""
    return replace(cfg, t_max=cfg.t_anneal_max) if cfg.t_anneal and step >= cfg.t_anneal else cfg


def student_generate(student, schedule, z, context, mask=None, start_t=-1, added=None, noise='unit'):
    """One-step generation: pure noise read as x_t at the start timestep (negative: counted from T;
    a rectified-flow network starts at T itself), mapped to x0. noise='sigma': x_t = sigma_t z, as
    diffusers' Euler schedulers with trailing spacing start (their initial noise is sigma_max, not
    sqrt(sigma_max^2 + 1), in their variance-exploding units)."""
    start_t = start_t + schedule.T if start_t < 0 else start_t
    t = torch.full((z.shape[0],), start_t, device=z.device, dtype=torch.long)
    if noise == 'sigma':
        z = z * schedule.alpha_sigma(t, z.ndim)[1].to(z.dtype)
    x0, _ = denoise(student, schedule, z, t, context, mask, added)
    return x0


def nasa_student_generate(student, schedule, z, cond, negative, alpha, start_t=-1, noise='unit'):
    """student_generate with NASA at scale alpha (NASA-T's student): the positive prompts cond and the
    negative ones, (context, mask) each per sample, go in as nasa.pair; SDXL's pooled text stays the
    positive's. alpha 0 is plain attention (nasa.NASA), so the pair is skipped: the student, its
    gradients included, is then the plain one to the bit (the DiT's caption projection would
    otherwise sum its weight gradient over the negative's zero-gradient rows as well, in another
    order)."""
    if alpha == 0:
        return student_generate(student, schedule, z, cond[0], cond[1], start_t, *cond[2:], noise=noise)
    context, mask = nasa.pair(cond[0], negative[0], cond[1], negative[1])
    nasa.enable(student, alpha)
    try:
        return student_generate(student, schedule, z, context, mask, start_t, *cond[2:], noise=noise)
    finally:
        nasa.disable(student)


def vsd_loss(teacher, schedule, x0, cond, null, cfg: VSDConfig, generator=None, negative=None):
    """The student's VSD loss on its samples x0 (gradient flows into x0 only), and the kappa drawn.
    negative: NASA-T's negative prompts, in the frozen teacher's unconditional slot in place of null
    (the same tuple form as cond, one per sample); the LoRA teacher keeps null."""
    B = x0.shape[0]
    t = torch.randint(cfg.t_min, cfg.t_max + 1, (B,), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = schedule.add_noise(x0.detach(), eps, t)
    kappa_teacher, kappa_lora = draw_kappa(cfg, B, x0.device, generator)
    with torch.no_grad():
        with lora_disabled(teacher):
            eps_teacher = guided_eps(teacher, schedule, x_t, t, cond, null if negative is None else negative,
                                     kappa_teacher)
        if cfg.lora_kappa == 1:  # unguided: the conditional half alone
            eps_lora = denoise(teacher, schedule, x_t, t, *cond)[1]
        else:
            eps_lora = guided_eps(teacher, schedule, x_t, t, cond, null, kappa_lora)
        alpha, sigma = (a.to(x0.dtype) for a in schedule.alpha_sigma(t, x0.ndim))
        if cfg.vsd_weight == 'dmd':  # x0_lora - x0_teacher, over how far the teacher's x0 is from x0
            x0_teacher = (x_t - sigma * eps_teacher) / alpha
            norm = (x0.detach() - x0_teacher).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            grad = sigma / alpha * (eps_teacher - eps_lora) / norm.clamp_min(1e-6)
        else:
            grad = sigma ** 2 * (eps_teacher - eps_lora)
        grad = torch.nan_to_num(grad)
    target = (x0 - grad).detach()
    loss = 0.5 * F.mse_loss(x0.float(), target.float())
    return loss, kappa_teacher


def regression_loss(x0_student, x0_teacher, pool=1):
    """DMD's regression term, mse between the student's image from a noise and the teacher's DDIM
    image from the same noise, on the KxK block means when pool = K > 1. An mse on every pixel asks
    the one-step student for the teacher's exact edges, which it can only average (squares bow);
    the block means still fix where each noise puts a shape, how big and in which colour (the
    variety the VSD term alone loses), and leave the edges to VSD."""
    if pool > 1:
        x0_student, x0_teacher = F.avg_pool2d(x0_student, pool), F.avg_pool2d(x0_teacher, pool)
    return F.mse_loss(x0_student.float(), x0_teacher.float())


# -----------------------------------------------------------------------------
# DMD2's GAN term (optional)


class StopForward(Exception):
    """Raised by layer_features' hook, so the layers past the one read do not run."""


def layer_features(net, layer, x_t, t, cond):
    """The output of net's module `layer` (a dotted name) on a forward at x_t with cond, (context, mask)
    or (context, mask, added); the forward stops there."""
    got = []

    def hook(module, args, out):
        got.append(out)
        raise StopForward
    context, mask, *added = cond
    handle = net.get_submodule(layer).register_forward_hook(hook)
    try:
        net(x_t, t, context, mask, *(a for a in added if a is not None))
    except StopForward:
        pass
    finally:
        handle.remove()
    if not got:
        raise ValueError(f"the network's forward does not run its module {layer!r}")
    return got[0]


def bottleneck(net):
    """The module DMD2 puts its classifier on: the UNet's last mid-block layer, the DiT's middle block."""
    if hasattr(net, 'mid_block'):
        return 'mid_block.resnets.1'
    return f'transformer_blocks.{len(net.transformer_blocks) // 2 - 1}'


class GAN(nn.Module):
    """DMD2's GAN term (arXiv 2405.14867): a classifier head on the fake score's features (the LoRA
    teacher's, at one layer), on images noised at t ~ U{t_min..gan_t_max}, real against the student's.
    The student's loss gets softplus(-D(x0)) (the non-saturating generator loss), the gradient
    reaching x0 through the LoRA teacher's layers; the LoRA teacher and the head get
    softplus(D(x0)) + softplus(-D(real)) at each of their updates. Real images give the student a
    target beyond its teacher's score (DMD2's reason for the term); in the shapes world it did not
    straighten the squares (README). The classifier reads the null prompt's features, so it judges
    realism, not the prompt (the VSD term's job); it gives one logit per position of the layer (a
    patch classifier). real(n, generator): n real images in the student's space (latents for a
    latent model)."""

    def __init__(self, layer, channels, real):
        super().__init__()
        self.layer, self.real = layer, real
        self.head = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, channels), nn.SiLU(),
                                  nn.Linear(channels, 1))

    def logits(self, net, schedule, x0, null, cfg, generator=None):
        B = x0.shape[0]
        t = torch.randint(cfg.t_min, (cfg.gan_t_max or cfg.t_max) + 1, (B,), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        cond = tuple(None if u is None else u.expand(B, *u.shape[1:]) for u in null)
        feats = layer_features(net, self.layer, schedule.add_noise(x0, eps, t), t, cond)
        feats = feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats  # (B, positions, channels)
        return self.head(feats.float()).squeeze(-1)

    def generator_loss(self, net, schedule, x0, null, cfg, generator=None):
        return F.softplus(-self.logits(net, schedule, x0, null, cfg, generator)).mean()

    def discriminator_loss(self, net, schedule, x0, null, cfg, generator=None):
        real = self.real(x0.shape[0], generator).to(x0.dtype)
        fake_logits, real_logits = self.logits(net, schedule, torch.cat([x0.detach(), real]), null, cfg,
                                               generator).chunk(2)
        return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


VSD_WEIGHTS = ('swiftbrush', 'dmd')
LORA_LOSSES = ('native', 'swiftbrush')


def denoising_loss(net, schedule, x0, cond, null, null_prob, loss='native', generator=None):
    """Plain denoising on x0 at t ~ U{0..T-1}, with null_prob of the prompts replaced by the null
    prompt so the network can do guidance.

    loss='native': mse on the network's own output, eps for an epsilon network, v for a v network:
    the objective the teacher itself was trained with, so the LoRA teacher stays the same kind of
    denoiser as the frozen one and the two differ only by the data they fit (the choice of
    threestudio's VSD for v networks). loss='swiftbrush': SwiftBrush's script,
    mse(alpha_t eps_hat, alpha_t eps). On an epsilon network the two weight the error by 1 and
    alpha_t^2; on a v network eps_hat - eps = alpha_t (v_hat - v), so SwiftBrush's weight on the
    network's own error becomes alpha_t^4 (2e-4 at t = 900): the LoRA teacher then barely learns
    the student at the high noise levels where layout and colour are decided."""
    if loss not in LORA_LOSSES:
        raise ValueError(f"unknown loss {loss!r}: expected one of {LORA_LOSSES}")
    x0 = x0.detach()
    B = x0.shape[0]
    t = torch.randint(0, schedule.T, (B,), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    drop = torch.rand(B, device=x0.device, generator=generator) < null_prob
    (c, cm, *ca), (u, um, *ua) = cond, null
    c = torch.where(drop.view(-1, 1, 1), u.expand_as(c), c)
    cm = None if cm is None else torch.where(drop.view(-1, 1), um.expand_as(cm), cm)
    added = ca[0] if ca and ca[0] is not None else None  # SDXL: the pooled text is dropped with the sequence
    if added is not None:
        added = torch.where(drop.view(-1, 1), ua[0].expand_as(added), added)
    x_t = schedule.add_noise(x0, eps, t)
    if loss == 'native':
        out = (net(x_t, t, c, cm) if added is None else net(x_t, t, c, cm, added=added))[:, :x0.shape[1]]
        return F.mse_loss(out.float(), schedule.target(x0, eps, t).float())
    _, eps_hat = denoise(net, schedule, x_t, t, c, cm, added)
    w = schedule.alpha_sigma(t, x0.ndim)[0]
    return F.mse_loss((w * eps_hat).float(), (w * eps).float())


def whole(t):
    """A tensor as a whole: an FSDP shard (DTensor) gathered from every rank (each rank must call it)."""
    return t.full_tensor() if hasattr(t, 'full_tensor') else t


def clip_grad_norm(params, max_norm):
    """Scale the gradients of `params` to a total norm of at most max_norm, as torch's clip_grad_norm_
    does (its 1e-6 included), the squares summed in float64: the norm's float32 value then does not
    depend on the order of the sum, so a student sharded over ranks (train.py --fsdp: each rank sums
    its shard of a gradient, then the ranks add theirs) is clipped exactly as a whole one (DDP)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    total = whole(torch.stack([g.double().square().sum() for g in grads]).sum())  # FSDP: the ranks' partial sums added
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.sqrt().float())


def optimizer_step(opt, loss, grad_clip):
    """Back-propagate `loss` and step `opt`, its gradients clipped to norm `grad_clip` (0: off)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        clip_grad_norm([p for g in opt.param_groups for p in g['params']], grad_clip)
    opt.step()


@contextlib.contextmanager
def checkpointing(net, on):
    """`net` (or the module a DDP wrapper holds) with gradient checkpointing `on` for the block."""
    net = getattr(net, 'module', net)
    before = getattr(net, 'grad_checkpointing', False)
    net.grad_checkpointing = on
    try:
        yield net
    finally:
        net.grad_checkpointing = before


def unpack(batch):
    """(z, cond, prompts, nasa_t) of a draw(); nasa_t is (negative cond, alpha), or None without NASA-T."""
    z, cond, prompts, *nasa_t = batch
    return z, cond, prompts, tuple(nasa_t) if nasa_t else None


def student_samples(student, schedule, z, cond, nasa_t, start_t):
    """The student's x0 for a batch, with NASA at NASA-T's (negative cond, alpha) when given."""
    if nasa_t is None:
        return student_generate(student, schedule, z, cond[0], cond[1], start_t, *cond[2:])
    return nasa_student_generate(student, schedule, z, cond, *nasa_t, start_t)


def pgsb_step(student, teacher, schedule, opts, draw, null, cfg: VSDConfig, generator=None,
              autocast=contextlib.nullcontext, grad_clip=1.0, extra_loss=None, gan=None):
    """One PG-SB iteration: the student's VSD update (steps 1-2), then cfg.lora_updates updates of the
    LoRA teacher (step 3). draw() gives a batch (z, cond, prompts): noise, (context, mask) or
    (context, mask, added) (SDXL's pooled text and size ids, see denoise), texts; for NASA-T,
    (z, cond, prompts, negative, alpha): the negative prompts in cond's form and this iteration's
    NASA scale (see the module's docstring).
    opts holds the 'student' and 'lora' optimizers; extra_loss(x0, prompts), if given, returns
    (weighted loss, {name: unweighted value}): a term added to the student's loss (SwiftBrush v2's
    CLIP loss, the teacher-pair regression) and what to log of it.
    The LoRA teacher fits the samples the student drew for its update, or, with cfg.lora_fresh,
    each time a new batch from the student just updated (DMD2 feeds its fake score fresh samples).
    gan: a GAN (DMD2's GAN term, weighted by cfg.gan_weight and cfg.gan_d_weight), or None."""
    z, cond, prompts, nasa_t = unpack(draw())
    with autocast():
        x0 = student_samples(student, schedule, z, cond, nasa_t, cfg.student_t)
        negative = None if nasa_t is None else nasa_t[0]
        loss, kappa = vsd_loss(teacher, schedule, x0, cond, null, cfg, generator, negative)
        info = {'vsd': loss.detach()}
        if nasa_t is not None:
            info['nasa_alpha'] = loss.detach().new_tensor(float(nasa_t[1]))
        if extra_loss is not None:
            term, values = extra_loss(x0, prompts)
            info.update(values)
            loss = loss + term
        if gan is not None:
            g_loss = gan.generator_loss(teacher, schedule, x0, null, cfg, generator)
            info['gan_g'] = g_loss.detach()
            loss = loss + cfg.gan_weight * g_loss
    optimizer_step(opts['student'], loss, grad_clip)  # the LoRA teacher's gradients from gan_g: zeroed below
    if cfg.free_student_grads:
        opts['student'].zero_grad(set_to_none=True)
    for _ in range(cfg.lora_updates):
        if cfg.lora_fresh:
            z, cond, _, nasa_t = unpack(draw())
            with torch.no_grad(), autocast():
                x0 = student_samples(student, schedule, z, cond, nasa_t, cfg.student_t)
        with autocast(), checkpointing(teacher, cfg.lora_grad_checkpointing):
            lora_loss = denoising_loss(teacher, schedule, x0, cond, null, cfg.null_prob, cfg.lora_loss, generator)
        info['lora'] = lora_loss.detach()
        if gan is not None:
            with autocast():
                d_loss = gan.discriminator_loss(teacher, schedule, x0, null, cfg, generator)
            info['gan_d'] = d_loss.detach()
            lora_loss = lora_loss + cfg.gan_d_weight * d_loss
        optimizer_step(opts['lora'], lora_loss, grad_clip)  # checkpointed blocks recompute here
    return info, kappa


# -----------------------------------------------------------------------------
# SwiftBrush v2's clamped CLIP loss (optional)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClampedCLIPLoss(nn.Module):
    """max(0, tau - cos(CLIP_image(image), CLIP_text(prompt))), averaged: a push towards the prompt
    that stops once the image is close enough. The image comes through the VAE decoder, so the
    gradient reaches the student."""

    def __init__(self, folder, tau):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel
        self.clip = CLIPModel.from_pretrained(folder).requires_grad_(False).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tau = tau
        self.register_buffer('mean', torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images, prompts):
        size = self.clip.config.vision_config.image_size
        x = F.interpolate((images.float() + 1) / 2, size=(size, size), mode='bicubic', align_corners=False)
        img = self.clip.get_image_features(pixel_values=(x - self.mean) / self.std)
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors='pt').to(images.device)
        txt = self.clip.get_text_features(**tok)
        cos = F.cosine_similarity(img, txt, dim=-1)
        return F.relu(self.tau - cos).mean()
