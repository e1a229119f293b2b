"""The PG-SB objective (vsd.py): LoRA teacher, random guidance scale, one-step student, VSD gradient
and the LoRA teacher's denoising loss. Schedules are checked against diffusers' schedulers."""
import contextlib
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
import train
import vsd
from conftest import ROOT, seeded

NETS = ['tiny_unet', 'tiny_dit']


def tiny(name, seed=0):
    return seeded(seed, M.build, M.PRESETS[name]).eval()


def texts(name, B=2, seed=1):
    """cond (B, L, 32) and null (1, L, 32) as (context, mask) pairs; masks for the DiT."""
    g = torch.Generator().manual_seed(seed)
    L = 8 if name == 'tiny_unet' else 12
    c, u = torch.randn(B, L, 32, generator=g), torch.randn(1, L, 32, generator=g)
    if name == 'tiny_unet':
        return (c, None), (u, None)
    cm, um = torch.zeros(B, L, dtype=torch.bool), torch.zeros(1, L, dtype=torch.bool)
    cm[0, :5], cm[1:, :9], um[:, :2] = True, True, True
    return (c, cm), (u, um)


def perturb_lora(net, seed=2, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, vsd.LoRA):
                m.lora_up.weight.copy_(scale * torch.randn(m.lora_up.weight.shape, generator=g))


class Counting(nn.Module):
    """A denoiser wrapper that counts forward calls and records their inputs."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, context, mask=None):
        self.calls.append((x.clone(), t.clone(), context.clone(), None if mask is None else mask.clone()))
        return self.net(x, t, context, mask)


class Fixed(nn.Module):
    """A 'network' that returns a fixed output and records the timesteps it was asked for."""

    def __init__(self, out):
        super().__init__()
        self.out, self.ts, self.contexts = out, [], []

    def forward(self, x, t, context, mask=None):
        self.ts.append(t.clone())
        self.contexts.append(context.clone())
        return self.out


def schedule(name):
    return M.NoiseSchedule(M.SCHEDULES[name])


# -----------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize('name', NETS)
def test_fresh_lora_leaves_the_teacher_bit_identical(name):
    net = tiny(name)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 900])
    (c, cm), _ = texts(name)
    with torch.no_grad():
        before = net(x, t, c, cm)
    n_attn = sum(isinstance(m, M.Attention) for m in net.modules())
    params = vsd.add_lora(net, rank=4, alpha=8)
    loras = [m for m in net.modules() if isinstance(m, vsd.LoRA)]
    assert len(loras) == 2 * n_attn and len(params) == 2 * len(loras)  # q and v of every attention
    assert all(m.scale == 2.0 for m in loras)
    assert all(p.requires_grad for p in params)
    with torch.no_grad():
        assert torch.equal(net(x, t, c, cm), before)
        perturb_lora(net)
        after = net(x, t, c, cm)
        assert not torch.allclose(after, before, atol=1e-4)
        with vsd.lora_disabled(net):  # the frozen teacher: the base function exactly
            assert torch.equal(net(x, t, c, cm), before)
        assert torch.equal(net(x, t, c, cm), after)  # adapters back on afterwards


def test_lora_disabled_restores_adapters_after_an_exception():
    net = tiny('tiny_unet')
    vsd.add_lora(net, rank=2, alpha=2)
    with pytest.raises(RuntimeError):
        with vsd.lora_disabled(net):
            raise RuntimeError('boom')
    assert all(m.enabled for m in net.modules() if isinstance(m, vsd.LoRA))


def test_lora_linear_is_base_plus_scaled_low_rank():
    base = seeded(0, nn.Linear, 6, 5)
    lora = seeded(1, vsd.LoRA, base, 3, 12.0)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    x = torch.randn(4, 6)
    expected = base(x) + 4.0 * x @ lora.lora_down.weight.T @ lora.lora_up.weight.T
    torch.testing.assert_close(lora(x), expected)


def test_lora_conv_is_base_plus_scaled_low_rank_convolution():
    base = seeded(0, nn.Conv2d, 4, 5, 3, 1, 1)  # 3x3, stride 1, padding 1
    lora = seeded(1, vsd.LoRA, base, 2, 4.0)
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(lora(x), base(x), rtol=0, atol=0)  # fresh: up is zero
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    low_rank = F.conv2d(F.conv2d(x, lora.lora_down.weight, padding=1), lora.lora_up.weight)
    torch.testing.assert_close(lora(x), base(x) + 2.0 * low_rank)


@pytest.mark.parametrize('linear_proj', [False, True])
def test_lora_on_the_transformer_projections(linear_proj):
    """proj_in / proj_out are 1x1 convs (SD1.5, the shapes UNet) or linear layers (SD2.1): adapters on
    either start as the base function and then change it."""
    from dataclasses import replace
    net = seeded(0, M.build, replace(M.PRESETS['tiny_unet'], linear_proj=linear_proj)).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 900])
    (c, cm), _ = texts('tiny_unet')
    with torch.no_grad():
        before = net(x, t, c, cm)
        vsd.add_lora(net, rank=2, alpha=4, targets=('proj_in', 'proj_out'))
        projs = [p for m in net.modules() if isinstance(m, M.SpatialTransformer) for p in (m.proj_in, m.proj_out)]
        assert projs and all(isinstance(p, vsd.LoRA) for p in projs)  # (the feed-forwards' proj_in/out too)
        assert all(isinstance(p.base, nn.Linear if linear_proj else nn.Conv2d) for p in projs)
        assert torch.equal(net(x, t, c, cm), before)
        perturb_lora(net)
        assert not torch.allclose(net(x, t, c, cm), before, atol=1e-4)
        with vsd.lora_disabled(net):
            assert torch.equal(net(x, t, c, cm), before)


def test_lora_targets_reach_the_resnet_convolutions():
    net = tiny('tiny_unet')
    n_res = sum(isinstance(m, M.ResBlock) for m in net.modules())
    vsd.add_lora(net, rank=2, alpha=2, targets=('conv1', 'conv2'))
    convs = [m for m in net.modules() if isinstance(m, vsd.LoRA)]
    assert len(convs) == 2 * n_res and all(isinstance(m.base, nn.Conv2d) for m in convs)
    with pytest.raises(ValueError, match='no linear or convolution layer named'):
        vsd.add_lora(tiny('tiny_unet'), targets=('to_qq',))


# -----------------------------------------------------------------------------
# The random guidance scale


def test_kappa_is_drawn_per_sample_in_range():
    cfg = vsd.VSDConfig(kappa_min=0.5, kappa_max=3.0)
    kt, kl = vsd.draw_kappa(cfg, 256, 'cpu', torch.Generator().manual_seed(0))
    assert kt.shape == (256,)
    assert kt.min() >= 0.5 and kt.max() <= 3.0
    assert len(set(kt.tolist())) > 200                      # one per sample, not one per batch
    assert kt.min() < 0.7 and kt.max() > 2.8 and 1.5 < kt.mean() < 2.0  # spread over U(0.5, 3)
    again, _ = vsd.draw_kappa(cfg, 256, 'cpu', torch.Generator().manual_seed(0))
    assert torch.equal(again, kt)


@pytest.mark.parametrize('setting', sorted(vsd.RANDOM_KAPPA))
def test_random_kappa_settings(setting):
    cfg = vsd.VSDConfig(kappa_min=1.0, kappa_max=2.0, kappa_fixed=4.5, random_kappa=setting)
    kt, kl = vsd.draw_kappa(cfg, 64, 'cpu', torch.Generator().manual_seed(1))
    random_teacher, random_lora = {'both': (True, True), 'teacher': (True, False),
                                   'lora': (False, True), 'none': (False, False)}[setting]
    for k, is_random in ((kt, random_teacher), (kl, random_lora)):
        if is_random:
            assert k.min() >= 1.0 and k.max() <= 2.0 and k.unique().numel() > 1
        else:
            assert torch.all(k == 4.5)
    if setting == 'both':  # PG-SB: the same per-sample kappa for both teachers
        assert torch.equal(kt, kl)


def test_lora_kappa_one_is_the_unguided_lora_teacher():
    """lora_kappa = 1: the LoRA teacher's eps is its conditional prediction alone (one forward), the
    frozen teacher keeps its random kappa; the loss equals the one from guided_eps at kappa 1."""
    net = tiny('tiny_unet')
    vsd.add_lora(net, rank=2, alpha=2)
    for p in net.parameters():  # adapters that change the output, so the two teachers differ
        p.data.add_(0.01 * torch.randn_like(p))
    cond, null = texts('tiny_unet', B=4)
    x0 = torch.randn(4, 4, 16, 16, requires_grad=True)
    cfg = vsd.VSDConfig(lora_kappa=1.0)
    kt, kl = vsd.draw_kappa(cfg, 4, 'cpu', torch.Generator().manual_seed(0))
    assert torch.all(kl == 1.0) and kt.unique().numel() == 4
    loss, _ = vsd.vsd_loss(net, schedule('sd'), x0, cond, null, cfg, torch.Generator().manual_seed(3))
    slow = vsd.VSDConfig(lora_kappa=1.0 + 1e-9)  # the same scale through the guided path
    ref, _ = vsd.vsd_loss(net, schedule('sd'), x0, cond, null, slow, torch.Generator().manual_seed(3))
    assert loss.item() > 0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('setting', sorted(vsd.RANDOM_KAPPA))
def test_vsd_loss_hands_each_teacher_its_kappa(setting, monkeypatch):
    """Inside vsd_loss: the frozen teacher (adapters off) and the LoRA teacher (adapters on) get the
    kappa draw_kappa gives them, the same per-sample values for both under 'both'."""
    net = tiny('tiny_unet')
    vsd.add_lora(net, rank=2, alpha=2)
    seen, real = [], vsd.guided_eps

    def recording(n, s, x_t, t, cond, null, kappa):
        adapters_on = all(m.enabled for m in n.modules() if isinstance(m, vsd.LoRA))
        seen.append((adapters_on, kappa.clone(), t.clone()))
        return real(n, s, x_t, t, cond, null, kappa)

    monkeypatch.setattr(vsd, 'guided_eps', recording)
    cfg = vsd.VSDConfig(random_kappa=setting, kappa_fixed=4.5)
    cond, null = texts('tiny_unet', B=4)
    x0 = torch.randn(4, 4, 16, 16, requires_grad=True)
    _, kappa = vsd.vsd_loss(net, schedule('sd'), x0, cond, null, cfg, torch.Generator().manual_seed(3))
    assert [on for on, _, _ in seen] == [False, True]  # frozen teacher first, then the LoRA teacher
    (_, k_frozen, t1), (_, k_lora, t2) = seen
    assert torch.equal(t1, t2) and t1.min() >= cfg.t_min and t1.max() <= cfg.t_max
    kt, kl = vsd.draw_kappa(cfg, 4, 'cpu', torch.Generator().manual_seed(0))  # which are random
    for k, fixed in ((k_frozen, bool(torch.all(kt == 4.5))), (k_lora, bool(torch.all(kl == 4.5)))):
        assert bool(torch.all(k == 4.5)) == fixed
        if not fixed:
            assert k.unique().numel() == 4 and k.min() >= cfg.kappa_min and k.max() <= cfg.kappa_max
    if setting == 'both':
        assert torch.equal(k_frozen, k_lora)
    assert torch.equal(kappa, k_frozen)


@pytest.mark.parametrize('config', [vsd.VSDConfig, train.TrainConfig])
def test_timestep_annealing_lowers_t_max_from_its_step(config, monkeypatch):
    """at_step: the settings themselves before step t_anneal, from it on the same settings with t_max
    lowered to t_anneal_max, which vsd_loss then draws t within; off (t_anneal 0) at any step."""
    cfg = config(t_min=20, t_max=980, t_anneal=3, t_anneal_max=100, kappa_max=3.0)
    assert vsd.at_step(cfg, 2) is cfg and vsd.at_step(config(), 10 ** 6).t_max == 980
    late = vsd.at_step(cfg, 3)
    assert type(late) is config and (late.t_min, late.t_max, late.kappa_max, late.t_anneal) == (20, 100, 3.0, 3)
    net, seen, real = tiny('tiny_unet'), [], vsd.guided_eps
    monkeypatch.setattr(vsd, 'guided_eps', lambda n, s, x_t, t, *a: seen.append(t) or real(n, s, x_t, t, *a))
    cond, null = texts('tiny_unet', B=64)
    for c in (cfg, late):
        vsd.vsd_loss(net, schedule('sd'), torch.randn(64, 4, 16, 16), cond, null, c, torch.Generator().manual_seed(0))
    early_t, late_t = seen[::2]  # the frozen teacher's t; the LoRA teacher's is the same
    assert early_t.min() >= 20 and early_t.max() > 100 and late_t.min() >= 20 and late_t.max() <= 100


# -----------------------------------------------------------------------------
# The one-step student and the schedule


def test_schedules_match_diffusers():
    from diffusers import DDPMScheduler
    sd = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')
    pixart = DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule='linear')
    torch.testing.assert_close(schedule('sd').alphas_cumprod, sd.alphas_cumprod.float(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(schedule('pixart').alphas_cumprod, pixart.alphas_cumprod.float(), rtol=1e-5, atol=1e-9)
    assert abs(schedule('sd').alphas_cumprod[999].item() - 0.0047) < 2e-4
    assert 3e-5 < schedule('pixart').alphas_cumprod[999].item() < 5e-5


@pytest.mark.parametrize('sched', ['sd', 'pixart'])
@pytest.mark.parametrize('start_t', [-1, 400])
def test_student_x0_comes_from_the_schedule(sched, start_t):
    s = schedule(sched)
    g = torch.Generator().manual_seed(0)
    z, eps_hat = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    net = Fixed(eps_hat)
    x0 = vsd.student_generate(net, s, z, torch.zeros(3, 1, 32), None, start_t)
    T = start_t % 1000
    assert torch.equal(net.ts[0], torch.full((3,), T))
    ac = s.alphas_cumprod.double()[T]
    expected = (z.double() - (1 - ac).sqrt() * eps_hat.double()) / ac.sqrt()
    torch.testing.assert_close(x0.double(), expected, rtol=1e-5, atol=1e-4)


def test_v_prediction_converts_to_x0_and_eps():
    from diffusers import DDPMScheduler
    s = schedule('sd_v')
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    x_t = s.add_noise(x0, eps, t)
    v = s.target(x0, eps, t)
    oracle = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                           prediction_type='v_prediction')
    torch.testing.assert_close(v, oracle.get_velocity(x0, eps, t).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_t, oracle.add_noise(x0, eps, t).float(), rtol=1e-4, atol=1e-5)
    x0_hat, eps_hat = s.x0_eps(v, x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=1e-4)
    # the one-step student on a v-prediction backbone: x0 = alpha_T z - sigma_T v
    student_x0 = vsd.student_generate(Fixed(v), s, x_t, torch.zeros(4, 1, 32))
    ac = s.alphas_cumprod.double()[999]
    torch.testing.assert_close(student_x0.double(), ac.sqrt() * x_t.double() - (1 - ac).sqrt() * v.double(),
                               rtol=1e-5, atol=1e-5)


def test_no_schedule_constant_is_a_literal():
    source = (ROOT / 'vsd.py').read_text()
    for literal in ('0.0047', '0.00469', '0.00466', '4e-5', '4e-05'):
        assert literal not in source, literal
    assert not re.search(r'\b0\.004\d', source)


# -----------------------------------------------------------------------------
# Classifier-free guidance


@pytest.mark.parametrize('name', NETS)
def test_guided_eps_is_cfg_in_one_batched_forward(name):
    net = Counting(tiny(name))
    s = schedule('sd')
    g = torch.Generator().manual_seed(4)
    x_t, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([100, 800])
    (c, cm), (u, um) = cond, null = texts(name)
    kappa = torch.tensor([0.7, 3.5])
    with torch.no_grad():
        guided = vsd.guided_eps(net, s, x_t, t, cond, null, kappa)
        assert len(net.calls) == 1 and net.calls[0][0].shape[0] == 4  # cond and null halves together
        eps_c = net.net(x_t, t, c, cm)[:, :4]
        eps_u = net.net(x_t, t, u.expand(2, -1, -1), None if um is None else um.expand(2, -1))[:, :4]
    expected = eps_u + kappa.view(-1, 1, 1, 1) * (eps_c - eps_u)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, eps_c, atol=1e-3)  # the guidance does something


# -----------------------------------------------------------------------------
# The VSD loss and its gradient


def student_and_teacher():
    teacher, student = tiny('tiny_unet'), tiny('tiny_unet')  # the student starts as the teacher's copy
    vsd.add_lora(teacher, rank=4, alpha=8)
    teacher.requires_grad_(False)
    return student.train(), teacher


def student_grads(student, teacher, cfg, seed=0):
    s = schedule('sd')
    cond, null = texts('tiny_unet')
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    student.zero_grad(set_to_none=True)
    x0 = vsd.student_generate(student, s, z, *cond)
    loss, _ = vsd.vsd_loss(teacher, s, x0, cond, null, cfg, torch.Generator().manual_seed(seed + 1))
    loss.backward()
    return loss, [p.grad for p in student.parameters()]


def test_student_gradient_is_zero_when_the_lora_teacher_equals_the_teacher():
    student, teacher = student_and_teacher()
    loss, grads = student_grads(student, teacher, vsd.VSDConfig(random_kappa='both'))
    assert loss.item() == 0.0
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    assert not any(p.grad is not None for p in teacher.parameters())
    perturb_lora(teacher)
    loss, grads = student_grads(student, teacher, vsd.VSDConfig(random_kappa='both'))
    assert loss.item() > 0
    assert sum(torch.count_nonzero(g) for g in grads if g is not None) > 0
    assert not any(p.grad is not None for p in teacher.parameters())  # the student only


def test_different_kappas_give_a_gradient_even_with_a_fresh_lora():
    """SwiftBrush's fixed scale on one teacher, a random one on the other: the two disagree."""
    student, teacher = student_and_teacher()
    loss, grads = student_grads(student, teacher, vsd.VSDConfig(random_kappa='teacher'))
    assert loss.item() > 0 and sum(torch.count_nonzero(g) for g in grads if g is not None) > 0


def replay_draws(cfg, s, x0, seed):
    """vsd_loss's draws replayed from its generator's seed: t, kappa, alphas_cumprod[t] and x_t."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(cfg.t_min, cfg.t_max + 1, (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    k, _ = vsd.draw_kappa(cfg, len(x0), 'cpu', g)
    ac = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    return t, k, ac, ac.sqrt() * x0.detach() + (1 - ac).sqrt() * eps


def cfg_eps(net, x_t, t, c, u, kappa):
    """Classifier-free guidance from two separate plain forwards (epsilon networks)."""
    eps_c = net(x_t, t, c)[:, :4]
    eps_u = net(x_t, t, u.expand(len(x_t), -1, -1))[:, :4]
    return eps_u + kappa.view(-1, 1, 1, 1) * (eps_c - eps_u)


@pytest.mark.parametrize('weight', vsd.VSD_WEIGHTS)
def test_vsd_gradient_is_weighted_teacher_minus_lora(weight):
    """d loss / d x0 = grad / numel, 0.5 mse(x0, sg(x0 - grad)), with grad = sigma_t^2 (eps_teacher -
    eps_lora) (swiftbrush), or x0_lora - x0_teacher over mean |x0 - x0_teacher| per sample (dmd)."""
    _, teacher = student_and_teacher()
    perturb_lora(teacher)
    s = schedule('sd')
    cfg = vsd.VSDConfig(kappa_min=0.5, kappa_max=4.0, vsd_weight=weight)
    (c, _), (u, _) = cond, null = texts('tiny_unet')
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5), requires_grad=True)
    loss, kappa = vsd.vsd_loss(teacher, s, x0, cond, null, cfg, torch.Generator().manual_seed(6))
    loss.backward()

    t, k, ac, x_t = replay_draws(cfg, s, x0, seed=6)
    assert torch.equal(k, kappa)
    with torch.no_grad():
        with vsd.lora_disabled(teacher):
            eps_teacher = cfg_eps(teacher, x_t, t, c, u, k)
        eps_lora = cfg_eps(teacher, x_t, t, c, u, k)
    grad = (1 - ac) * (eps_teacher - eps_lora)
    if weight == 'dmd':
        x0_teacher = (x_t - (1 - ac).sqrt() * eps_teacher) / ac.sqrt()
        x0_lora = (x_t - (1 - ac).sqrt() * eps_lora) / ac.sqrt()
        grad = (x0_lora - x0_teacher) / (x0.detach() - x0_teacher).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert grad.abs().max() > 1e-6
    expected = grad / x0.numel()
    # eps_teacher - eps_lora cancels: compare with a tolerance set by the gradient's own scale
    torch.testing.assert_close(x0.grad, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    torch.testing.assert_close(loss, 0.5 * grad.square().mean(), rtol=1e-2, atol=0)


def test_vsd_gradient_zeroes_nans():
    _, teacher = student_and_teacher()
    perturb_lora(teacher)
    with torch.no_grad():
        next(m for m in teacher.modules() if isinstance(m, vsd.LoRA)).lora_up.weight.fill_(float('nan'))
    cond, null = texts('tiny_unet')
    x0 = torch.randn(2, 4, 16, 16, requires_grad=True)
    loss, _ = vsd.vsd_loss(teacher, schedule('sd'), x0, cond, null, vsd.VSDConfig(), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x0.grad).all()


# -----------------------------------------------------------------------------
# The LoRA teacher's denoising loss


def replay_denoising_draws(B, seed, shape, null_prob):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (B,), generator=g)
    eps = torch.randn(shape, generator=g)
    drop = torch.rand(B, generator=g) < null_prob
    return t, eps, drop


@pytest.mark.parametrize('name', ['sd', 'sd_v'])
def test_swiftbrush_lora_loss_weights_the_eps_error_by_alpha_t(name):
    s = schedule(name)
    B = 64
    g = torch.Generator().manual_seed(0)
    x0, out = torch.randn(B, 4, 4, 4, generator=g), torch.randn(B, 4, 4, 4, generator=g)
    net = Fixed(out)
    cond, null = (torch.zeros(B, 3, 32), None), (torch.ones(1, 3, 32), None)
    loss = vsd.denoising_loss(net, s, x0, cond, null, 0.0, loss='swiftbrush', generator=torch.Generator().manual_seed(9))
    t, eps, _ = replay_denoising_draws(B, 9, x0.shape, 0.0)
    assert torch.equal(net.ts[0], t)
    alpha, sigma = s.alpha_sigma(t)
    x_t = alpha * x0 + sigma * eps
    eps_hat = out if name == 'sd' else sigma * x_t + alpha * out
    expected = ((alpha * (eps_hat - eps)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert abs(loss.item() - ((eps_hat - eps) ** 2).mean().item()) > 0.1


@pytest.mark.parametrize('name', ['sd', 'sd_v'])
def test_native_loss_is_the_simple_loss_on_the_networks_own_output(name):
    """The default: mse against eps for an epsilon network, against v = alpha eps - sigma x0 for a
    v-prediction one; so at every t the loss weighs the network's own error alike (SwiftBrush's
    weighting, on a v network, puts alpha_t^4 on it)."""
    s = schedule(name)
    B = 64
    g = torch.Generator().manual_seed(0)
    x0, out = torch.randn(B, 4, 4, 4, generator=g), torch.randn(B, 4, 4, 4, generator=g)
    out.requires_grad_(True)
    loss = vsd.denoising_loss(Fixed(out), s, x0, (torch.zeros(B, 3, 32), None), (torch.ones(1, 3, 32), None),
                              0.0, generator=torch.Generator().manual_seed(9))
    t, eps, _ = replay_denoising_draws(B, 9, x0.shape, 0.0)
    alpha, sigma = s.alpha_sigma(t)
    target = eps if name == 'sd' else alpha * eps - sigma * x0
    torch.testing.assert_close(loss, ((out - target) ** 2).mean(), rtol=1e-5, atol=0)
    grad, = torch.autograd.grad(loss, out)
    torch.testing.assert_close(grad, 2 * (out - target).detach() / out.numel(), rtol=1e-5, atol=0)
    # SwiftBrush's weighting on the same draws: the network's error weighted by alpha^2 (eps) or alpha^4 (v)
    sb = vsd.denoising_loss(Fixed(out), s, x0, (torch.zeros(B, 3, 32), None), (torch.ones(1, 3, 32), None),
                            0.0, loss='swiftbrush', generator=torch.Generator().manual_seed(9))
    power = 2 if name == 'sd' else 4
    torch.testing.assert_close(sb, (alpha ** power * (out - target) ** 2).mean(), rtol=1e-4, atol=0)


def test_unknown_lora_loss_is_refused():
    with pytest.raises(ValueError, match='native'):
        vsd.denoising_loss(Fixed(torch.zeros(1, 4, 4, 4)), schedule('sd'), torch.zeros(1, 4, 4, 4),
                           (torch.zeros(1, 3, 32), None), (torch.ones(1, 3, 32), None), 0.0, loss='v')


def test_regression_loss_on_block_means():
    """pool 1: the mse on every pixel; pool K: the mse of the KxK block means, by hand, so a change
    inside each block that keeps its mean (an edge drawn sharper or softer) costs nothing."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    torch.testing.assert_close(vsd.regression_loss(a, b), ((a - b) ** 2).mean())
    means = lambda x: x.reshape(2, 3, 2, 4, 2, 4).mean(dim=(3, 5))
    torch.testing.assert_close(vsd.regression_loss(a, b, pool=4), ((means(a) - means(b)) ** 2).mean())
    checker = (torch.arange(8).view(8, 1) + torch.arange(8)) % 2 * 2.0 - 1  # block means 0
    torch.testing.assert_close(vsd.regression_loss(a + checker, a, pool=2), torch.tensor(0.0))
    torch.testing.assert_close(vsd.regression_loss(a + checker, a), torch.tensor(1.0))


def test_denoising_loss_replaces_prompts_with_the_null_prompt():
    s = schedule('sd')
    B = 200
    x0 = torch.randn(B, 4, 2, 2)
    net = Fixed(torch.zeros(B, 4, 2, 2))
    cond, null = (torch.zeros(B, 3, 32), None), (torch.ones(1, 3, 32), None)
    vsd.denoising_loss(net, s, x0, cond, null, 0.3, generator=torch.Generator().manual_seed(1))
    _, _, drop = replay_denoising_draws(B, 1, x0.shape, 0.3)
    dropped = net.contexts[0].flatten(1).eq(1).all(1)
    assert torch.equal(dropped, drop) and 30 < int(dropped.sum()) < 90
    assert net.contexts[0][~dropped].eq(0).all()
    # the masks follow the prompts (T5)
    cm, um = torch.ones(B, 3, dtype=torch.bool), torch.tensor([[True, False, False]])
    seen = []

    def masked(x, t, context, mask=None):
        seen.append(mask)
        return torch.zeros_like(x)

    vsd.denoising_loss(masked, s, x0, (cond[0], cm), (null[0], um), 0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(seen[0][drop], um.expand(int(drop.sum()), 3)) and seen[0][~drop].all()


def test_denoising_loss_trains_the_lora_adapters_only():
    teacher = tiny('tiny_unet')
    params = vsd.add_lora(teacher, rank=2, alpha=4)
    base = [p for n, p in teacher.named_parameters() if 'lora_' not in n]
    for p in base:
        p.requires_grad_(False)
    cond, null = texts('tiny_unet')
    x0 = torch.randn(2, 4, 16, 16, requires_grad=True)
    loss = vsd.denoising_loss(teacher, schedule('sd'), x0, cond, null, 0.1, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert x0.grad is None  # x0 is detached: the student gets nothing from the LoRA teacher's loss
    assert any(torch.count_nonzero(p.grad) for p in params if p.grad is not None)


# -----------------------------------------------------------------------------
# The whole step (train.py and bench.py both run vsd.pgsb_step)


@pytest.mark.parametrize('fresh', [False, True])
def test_pgsb_step_updates_the_student_then_the_lora_teacher_k_times(fresh):
    student, teacher = tiny('tiny_unet').train(), tiny('tiny_unet')
    teacher.requires_grad_(False)
    base = {k: v.clone() for k, v in teacher.state_dict().items()}
    lora_params = vsd.add_lora(teacher, rank=2, alpha=4)
    perturb_lora(teacher)  # the LoRA teacher differs from the frozen one: the student gets a gradient
    opts = {'student': torch.optim.AdamW(student.parameters(), lr=1e-3),
            'lora': torch.optim.AdamW(lora_params, lr=1e-3)}
    before = [p.clone() for p in student.parameters()]
    cond, null = texts('tiny_unet')
    g = torch.Generator().manual_seed(0)
    draws = []

    def draw():
        draws.append(torch.randn(2, 4, 16, 16, generator=g))
        return draws[-1], cond, ['a', 'b']

    cfg = vsd.VSDConfig(lora_updates=3, lora_fresh=fresh)
    info, kappa = vsd.pgsb_step(student, teacher, schedule('sd'), opts, draw, null, cfg, torch.Generator().manual_seed(1))
    assert set(info) == {'vsd', 'lora'} and kappa.shape == (2,)
    assert len(draws) == (4 if fresh else 1)  # fresh: a new batch of the updated student per LoRA update
    assert opts['lora'].state[lora_params[0]]['step'] == 3 and opts['student'].state[next(student.parameters())]['step'] == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    state = teacher.state_dict()
    for k, v in base.items():  # the frozen teacher's base weights never move
        torch.testing.assert_close(state[k.replace('to_q.', 'to_q.base.').replace('to_v.', 'to_v.base.')], v, rtol=0, atol=0)


# -----------------------------------------------------------------------------
# DMD2's GAN term


LAST = {'tiny_unet': 'conv_out', 'tiny_dit': 'proj_out'}  # the network's last layer


@pytest.mark.parametrize('name', NETS)
def test_layer_features_are_the_modules_output_and_the_forward_stops_there(name):
    net = tiny(name)
    cond, _ = texts(name)
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([10, 700])
    layer, seen, ran = vsd.bottleneck(net), [], []
    handles = [net.get_submodule(layer).register_forward_hook(lambda m, a, out: seen.append(out)),
               net.get_submodule(LAST[name]).register_forward_hook(lambda m, a, out: ran.append(1))]
    net(x, t, *cond)
    assert len(ran) == 1
    features = vsd.layer_features(net, layer, x, t, cond)
    assert len(ran) == 1  # the layers past the one read did not run
    for h in handles:
        h.remove()
    torch.testing.assert_close(features, seen[0], rtol=0, atol=0)
    assert features.shape == ((2, 64, 8, 8) if name == 'tiny_unet' else (2, 64, 32))
    if name == 'tiny_unet':  # a module the forward never calls (it calls the block's layers one by one)
        with pytest.raises(ValueError, match="does not run its module 'mid_block'"):
            vsd.layer_features(net, 'mid_block', x, t, cond)


def gan_setup(name, real_seed=5):
    teacher = tiny(name)
    teacher.requires_grad_(False)
    lora_params = seeded(3, vsd.add_lora, teacher, 2, 4)
    perturb_lora(teacher)
    real = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(real_seed))
    draw = lambda n, g: real[torch.randint(len(real), (n,), generator=g)]
    gan = seeded(4, vsd.GAN, vsd.bottleneck(teacher), 64 if name == 'tiny_unet' else 32, draw)
    return teacher, lora_params, gan, real


@pytest.mark.parametrize('name', NETS)
def test_gan_logits_are_the_head_on_the_lora_teachers_noised_features_by_hand(name):
    teacher, _, gan, _ = gan_setup(name)
    _, null = texts(name)
    cfg, sched = vsd.VSDConfig(t_min=50, t_max=300), schedule('sd')
    x0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    logits = gan.logits(teacher, sched, x0, null, cfg, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws, by hand
    t = torch.randint(50, 301, (3,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    seen = []
    h = teacher.get_submodule(gan.layer).register_forward_hook(lambda m, a, out: seen.append(out))
    teacher(x_t, t, null[0].expand(3, -1, -1), None if null[1] is None else null[1].expand(3, -1))
    h.remove()
    tokens = seen[0].flatten(2).transpose(1, 2) if seen[0].ndim == 4 else seen[0]
    torch.testing.assert_close(logits, gan.head(tokens).squeeze(-1), rtol=1e-5, atol=1e-6)
    assert logits.shape == ((3, 64) if name == 'tiny_unet' else (3, 64))  # one logit per position


def test_gan_losses_are_the_non_saturating_softplus_losses():
    """With the head's last layer at zero weights and bias b every logit is b: the student's loss is
    softplus(-b), the classifier's softplus(b) + softplus(-b). Then, with a live head, the student's
    loss reaches x0 (through the LoRA teacher) and the classifier's reaches the head and the adapters,
    not x0."""
    teacher, lora_params, gan, _ = gan_setup('tiny_unet')
    _, null = texts('tiny_unet')
    cfg, sched = vsd.VSDConfig(), schedule('sd')
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    last = gan.head[-1]
    saved = last.weight.detach().clone(), last.bias.detach().clone()
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(0.7)
    b = torch.tensor(0.7)
    torch.testing.assert_close(gan.generator_loss(teacher, sched, x0, null, cfg), F.softplus(-b))
    torch.testing.assert_close(gan.discriminator_loss(teacher, sched, x0, null, cfg), F.softplus(b) + F.softplus(-b))
    with torch.no_grad():
        last.weight.copy_(saved[0])
        last.bias.copy_(saved[1])
    x0.requires_grad_(True)
    gan.generator_loss(teacher, sched, x0, null, cfg, torch.Generator().manual_seed(1)).backward()
    assert torch.count_nonzero(x0.grad) > 0
    x0.grad = None
    gan.discriminator_loss(teacher, sched, x0, null, cfg, torch.Generator().manual_seed(1)).backward()
    assert x0.grad is None
    assert all(torch.count_nonzero(p.grad) for p in gan.parameters())
    assert any(p.grad is not None and torch.count_nonzero(p.grad) for p in lora_params)


def test_pgsb_step_with_the_gan_term():
    """The GAN term at weight 0 leaves the student's update bit-identical to the step without it (its
    draws come after the VSD term's); at weight 1 it changes it; the head learns with the adapters."""
    def step(gan_weight, with_gan=True):
        student = tiny('tiny_unet').train()
        teacher, lora_params, gan, _ = gan_setup('tiny_unet')
        opts = {'student': torch.optim.AdamW(student.parameters(), lr=1e-3),
                'lora': torch.optim.AdamW([{'params': lora_params}, {'params': list(gan.parameters()), 'lr': 1e-2}],
                                          lr=1e-3)}
        head = [p.detach().clone() for p in gan.parameters()]
        cond, null = texts('tiny_unet')
        g = torch.Generator().manual_seed(0)
        draw = lambda: (torch.randn(2, 4, 16, 16, generator=g), cond, ['a', 'b'])
        cfg = vsd.VSDConfig(lora_updates=2, gan_weight=gan_weight)
        info, _ = vsd.pgsb_step(student, teacher, schedule('sd'), opts, draw, null, cfg,
                                torch.Generator().manual_seed(1), gan=gan if with_gan else None)
        moved = any(not torch.equal(a, b) for a, b in zip(head, gan.parameters()))
        return info, [p.detach().clone() for p in student.parameters()], moved
    plain, zero, one = step(0.0, with_gan=False), step(0.0), step(1.0)
    assert set(plain[0]) == {'vsd', 'lora'} and set(zero[0]) == {'vsd', 'lora', 'gan_g', 'gan_d'}
    assert all(torch.equal(a, b) for a, b in zip(plain[1], zero[1]))
    assert any(not torch.equal(a, b) for a, b in zip(plain[1], one[1]))
    assert zero[2] and one[2] and not plain[2]


# -----------------------------------------------------------------------------
# NASA-T (SNOOPI v3): negative prompts in distillation


def nasa_t_setup(name, seed=0):
    """A student, and a LoRA teacher whose adapters differ from the frozen teacher, with optimizers."""
    student, teacher = tiny(name, seed).train(), tiny(name, seed)
    teacher.requires_grad_(False)
    lora_params = seeded(seed + 3, vsd.add_lora, teacher, 2, 4)  # its down weights: the same in every call
    perturb_lora(teacher)
    opts = {'student': torch.optim.AdamW(student.parameters(), lr=1e-3),
            'lora': torch.optim.AdamW(lora_params, lr=1e-3)}
    return student, teacher, opts


def run_step(name, negative, alpha, cfg, B=2):
    """One pgsb_step from fixed weights and seeds; negative None is the plain PG-SB step."""
    student, teacher, opts = nasa_t_setup(name)
    cond, null = texts(name, B=B)
    g = torch.Generator().manual_seed(0)

    def draw():
        z = torch.randn(B, 4, 16, 16, generator=g)
        return (z, cond, ['a'] * B) if negative is None else (z, cond, ['a'] * B, negative, alpha)

    info, kappa = vsd.pgsb_step(student, teacher, schedule('sd'), opts, draw, null, cfg, torch.Generator().manual_seed(1))
    return info, kappa, [p.detach().clone() for p in student.parameters()], \
        [p.detach().clone() for p in opts['lora'].param_groups[0]['params']]


@pytest.mark.parametrize('name', NETS)
@pytest.mark.parametrize('fresh', [False, True])
def test_nasa_t_at_alpha_zero_with_the_null_as_negative_is_the_plain_pgsb_step(name, fresh):
    """The negative slot holding the null prompt and NASA's alpha 0: the student, the LoRA teacher and the
    losses come out bit for bit as the plain PG-SB step's, from the same seeds."""
    cfg = vsd.VSDConfig(lora_updates=2, lora_fresh=fresh)
    _, null = texts(name, B=2)
    no_negative = (null[0].expand(2, -1, -1), None if null[1] is None else null[1].expand(2, -1))
    plain = run_step(name, None, 0.0, cfg)
    nasa_t = run_step(name, no_negative, 0.0, cfg)
    assert torch.equal(plain[0]['vsd'], nasa_t[0]['vsd']) and torch.equal(plain[0]['lora'], nasa_t[0]['lora'])
    assert torch.equal(plain[1], nasa_t[1]) and nasa_t[0]['nasa_alpha'] == 0
    for a, b in zip(plain[2] + plain[3], nasa_t[2] + nasa_t[3]):
        assert torch.equal(a, b)
    # a real negative, or alpha > 0, changes the step
    other = (torch.randn(no_negative[0].shape, generator=torch.Generator().manual_seed(5)), no_negative[1])
    for changed in (run_step(name, other, 0.0, cfg), run_step(name, no_negative, 0.7, cfg)):
        assert any(not torch.equal(a, b) for a, b in zip(plain[2], changed[2]))


def test_nasa_t_frozen_teacher_puts_the_negative_in_the_unconditional_slot():
    """d loss / d x0 = sigma_t^2 (eps_teacher - eps_lora) / numel with, written out by hand from plain
    forwards, eps_teacher = (1 - kappa) eps(x_t, y-) + kappa eps(x_t, y) (adapters off) and the LoRA
    teacher's eps_u + kappa (eps_c - eps_u) on the null prompt (adapters on)."""
    _, teacher = student_and_teacher()
    perturb_lora(teacher)
    s = schedule('sd')
    cfg = vsd.VSDConfig()
    (c, _), (u, _) = cond, null = texts('tiny_unet')
    neg = torch.randn(c.shape, generator=torch.Generator().manual_seed(11))
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5), requires_grad=True)
    loss, kappa = vsd.vsd_loss(teacher, s, x0, cond, null, cfg, torch.Generator().manual_seed(6), negative=(neg, None))
    loss.backward()

    t, k, ac, x_t = replay_draws(cfg, s, x0, seed=6)
    assert torch.equal(k, kappa)
    kk = k.view(-1, 1, 1, 1)
    with torch.no_grad():
        with vsd.lora_disabled(teacher):
            eps_teacher = (1 - kk) * teacher(x_t, t, neg) + kk * teacher(x_t, t, c)
            eps_teacher_null = cfg_eps(teacher, x_t, t, c, u, k)
        eps_lora = cfg_eps(teacher, x_t, t, c, u, k)
    grad = (1 - ac) * (eps_teacher - eps_lora)
    expected = grad / x0.numel()
    torch.testing.assert_close(x0.grad, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    # and not the null prompt's guidance: the negative really is in the frozen teacher's slot
    with_null = (1 - ac) * (eps_teacher_null - eps_lora) / x0.numel()
    assert (x0.grad - with_null).abs().max() > 10 * (x0.grad - expected).abs().max()


class Recording(nn.Module):
    """Records, per forward, whether the LoRA adapters were on and the context it was given."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, context, mask=None):
        on = all(m.enabled for m in self.modules() if isinstance(m, vsd.LoRA))
        self.calls.append((on, context.clone()))
        return self.net(x, t, context, mask)


def test_nasa_t_lora_teacher_never_sees_a_negative_prompt():
    """A whole NASA-T step (two LoRA updates, half of the prompts dropped to the null prompt): the
    student's forwards hold the negative prompt, the frozen teacher's hold it in the unconditional
    half, and no forward of the LoRA teacher (guided eps, denoising loss) holds it anywhere."""
    student, teacher, opts = nasa_t_setup('tiny_unet')
    student, teacher = Recording(student), Recording(teacher)
    cond, null = texts('tiny_unet', B=3)
    neg = torch.full_like(cond[0], 3.0)  # a negative prompt's states, recognisable by value
    g = torch.Generator().manual_seed(0)
    draw = lambda: (torch.randn(3, 4, 16, 16, generator=g), cond, ['a'] * 3, (neg, None), 0.5)
    cfg = vsd.VSDConfig(lora_updates=2, lora_fresh=True, null_prob=0.5)
    vsd.pgsb_step(student, teacher, schedule('sd'), opts, draw, null, cfg, torch.Generator().manual_seed(1))

    def holds_negative(context):  # any (sample, token) row equal to a negative's
        return bool((context == 3.0).all(-1).any())
    assert len(student.calls) == 3 and all(c.shape[1] == 2 and torch.equal(c[:, 1], neg) for _, c in student.calls)
    frozen = [c for on, c in teacher.calls if not on]
    lora = [c for on, c in teacher.calls if on]
    assert len(frozen) == 1 and torch.equal(frozen[0][3:], neg) and torch.equal(frozen[0][:3], cond[0])
    assert len(lora) == 3  # the guided eps, then one denoising forward per LoRA update
    assert not any(holds_negative(c) for c in lora)
    assert torch.equal(lora[0][3:], null[0].expand(3, -1, -1))  # its unconditional half: the null prompt
    dropped = [c for c in lora[1:] if (c == null[0]).all(-1).all(-1).any()]
    assert dropped  # the denoising loss's dropped prompts are the null prompt, not the negative


@pytest.mark.parametrize('name', NETS)
def test_memory_levers_leave_the_step_bit_identical(name, monkeypatch):
    """The LoRA teacher's loss with the teacher checkpointed, and the student's gradients dropped before
    it: the losses, the student and the adapters come out bit for bit as without; the checkpointing
    does recompute the teacher's blocks (in the LoRA update only) and the gradients are gone."""
    calls = []
    real = M.checkpoint
    monkeypatch.setattr(M, 'checkpoint', lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    on = run_step(name, None, 0.0, vsd.VSDConfig(lora_updates=2))
    assert calls  # the teacher's blocks went through torch's checkpoint
    calls.clear()
    off = run_step(name, None, 0.0, vsd.VSDConfig(lora_updates=2, lora_grad_checkpointing=False,
                                                  free_student_grads=False))
    assert not calls
    assert torch.equal(on[0]['vsd'], off[0]['vsd']) and torch.equal(on[0]['lora'], off[0]['lora'])
    for a, b in zip(on[2] + on[3], off[2] + off[3]):
        assert torch.equal(a, b)
    student, teacher, opts = nasa_t_setup(name)
    cond, null = texts(name, B=2)
    draw = lambda: (torch.randn(2, 4, 16, 16), cond, ['a', 'b'])
    vsd.pgsb_step(student, teacher, schedule('sd'), opts, draw, null, vsd.VSDConfig(), torch.Generator().manual_seed(1))
    assert all(p.grad is None for p in student.parameters()) and not teacher.grad_checkpointing
    assert any(p.grad is not None for p in opts['lora'].param_groups[0]['params'])


def step_with_levers(name, on, frozen_bf16=False, autocast=False):
    """One PG-SB step (two LoRA updates) from fixed weights and seeds with the memory and speed levers
    on or off (the student's and the LoRA teacher's blocks checkpointed, the student's gradients freed,
    channels-last, fused AdamW) and the frozen teacher held in bf16 (train.hold_bf16) or not: its losses
    and every weight it updated. AdamW's eps is 1, so its first step is lr g / (|g| + 1), about lr g here:
    the weights then agree as far as the gradients do (with eps 1e-8 it is lr g / |g|, and the rounding
    of a near-zero gradient would move its weight by up to the learning rate)."""
    student, teacher = tiny(name).train(), tiny(name).requires_grad_(False)
    lora = seeded(3, vsd.add_lora, teacher, 2, 4)
    perturb_lora(teacher)
    if frozen_bf16:
        train.hold_bf16(teacher)
    if on:
        student.grad_checkpointing = True
        for net in (student, teacher):
            net.to(memory_format=torch.channels_last)
    opts = {'student': torch.optim.AdamW(student.parameters(), lr=1e-3, eps=1.0, fused=on),
            'lora': torch.optim.AdamW(lora, lr=1e-3, eps=1.0, fused=on)}
    cfg = vsd.VSDConfig(lora_updates=2, lora_grad_checkpointing=on, free_student_grads=on)
    cond, null = texts(name, B=2)
    g = torch.Generator().manual_seed(0)
    draw = lambda: (torch.randn(2, 4, 16, 16, generator=g), cond, ['a'] * 2)
    bf16 = (lambda: torch.autocast('cpu', torch.bfloat16)) if autocast else contextlib.nullcontext
    info, _ = vsd.pgsb_step(student, teacher, schedule('sd'), opts, draw, null, cfg, torch.Generator().manual_seed(1), bf16)
    return info, [p.detach() for p in list(student.parameters()) + lora]


@pytest.mark.parametrize('name', NETS)
def test_every_lever_on_gives_the_step_of_every_lever_off(name):
    """Every lever on against every lever off, in fp32: the same losses and updated weights to rounding
    (channels-last and the fused AdamW round differently; the rest is exact, test above). Under bf16
    autocast, the frozen teacher's base held in bf16 against fp32, every other lever on: the same to the bit."""
    (off, w_off), (on, w_on) = step_with_levers(name, False), step_with_levers(name, True)
    for k in ('vsd', 'lora'):
        torch.testing.assert_close(on[k], off[k], rtol=1e-4, atol=0)  # the VSD loss: a small difference of two teachers
    for a, b in zip(w_on, w_off):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-7)  # about lr g = 1e-5; 1 ulp of a weight of 1 is 1.2e-7
    (off, w_off), (on, w_on) = (step_with_levers(name, True, frozen_bf16=f, autocast=True) for f in (False, True))
    assert torch.equal(on['vsd'], off['vsd']) and torch.equal(on['lora'], off['lora'])
    assert all(torch.equal(a, b) for a, b in zip(w_on, w_off))
