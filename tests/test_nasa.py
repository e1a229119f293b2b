"""NASA (nasa.py): Z = Attn(Q, K+, V+) - alpha Attn(Q, K-, V-) in the cross-attention layers of the
tiny UNet and the tiny DiT, checked against a hand-written attention."""
import math

import pytest
import torch

import model as M
import nasa
import sample
from conftest import seeded

NETS = ['tiny_unet', 'tiny_dit']


def tiny(name, seed=0):
    return seeded(seed, M.build, M.PRESETS[name]).eval()


def inputs(name, B=2, seed=1):
    """Noisy latents, timesteps, positive and negative text states and, for the DiT, masks that
    differ per sample and between the two prompts (positive: 5 and 9 tokens; negative: 3 and 7)."""
    g = torch.Generator().manual_seed(seed)
    L, C = (8, 32) if name == 'tiny_unet' else (12, 32)
    x = torch.randn(B, 4, 16, 16, generator=g)
    t = torch.tensor([999, 400])[:B]
    pos, neg = torch.randn(B, L, C, generator=g), torch.randn(B, L, C, generator=g)
    if name == 'tiny_unet':
        return x, t, pos, neg, None, None
    pm, nm = torch.zeros(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
    for b, (p, n) in enumerate([(5, 3), (9, 7)][:B]):
        pm[b, :p], nm[b, :n] = True, True
    return x, t, pos, neg, pm, nm


@torch.no_grad()
def nasa_forward(net, alpha, x, t, pos, neg, pm, nm, layers=None):
    nasa.enable(net, alpha, layers)
    try:
        return net(x, t, *nasa.pair(pos, neg, pm, nm))
    finally:
        nasa.disable(net)


def ref_attention(q, k, v, heads, mask=None):
    """softmax(Q K^T / sqrt(d)) V per head, written out (float64, no scaled_dot_product_attention)."""
    B, N, D = q.shape
    d = D // heads
    q, k, v = (a.double().reshape(B, -1, heads, d).transpose(1, 2) for a in (q, k, v))  # (B, h, n, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)                                      # (B, h, N, L)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float('-inf'))
    w = torch.exp(scores - scores.amax(-1, keepdim=True))
    w = w / w.sum(-1, keepdim=True)
    return (w @ v).transpose(1, 2).reshape(B, N, D)


def linear64(layer, x):
    out = x.double() @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


# -----------------------------------------------------------------------------
# alpha = 0 is plain attention


@pytest.mark.parametrize('name', NETS)
def test_alpha_zero_is_bit_identical_to_the_plain_forward(name):
    net = tiny(name)
    x, t, pos, neg, pm, nm = inputs(name)
    with torch.no_grad():
        plain = net(x, t, pos, pm)
    assert torch.equal(nasa_forward(net, 0.0, x, t, pos, neg, pm, nm), plain)
    assert not torch.equal(nasa_forward(net, 0.5, x, t, pos, neg, pm, nm), plain)  # the negative is really there


def test_generate_with_nasa_scale_zero_equals_no_negative(unet_teacher):
    pipe = M.load_checkpoint(unet_teacher)
    kw = dict(n=2, seed=3)
    plain = sample.generate(pipe, ['a red circle'], **kw)
    assert torch.equal(sample.generate(pipe, ['a red circle'], 'red', nasa_scale=0.0, **kw), plain)
    assert not torch.equal(sample.generate(pipe, ['a red circle'], 'red', nasa_scale=0.5, **kw), plain)
    assert all(m.processor is None for m in nasa.cross_attention_layers(pipe.denoiser).values())


# -----------------------------------------------------------------------------
# One layer against the formula


def cross_layer(net):
    layers = nasa.cross_attention_layers(net)
    return next(m for name, m in layers.items() if 'attn2' in name)


def layer_inputs(name, seed):
    """A tiny net's first cross-attention layer and random inputs for it: image tokens x (2, 6, D),
    positive and negative text states (2, 12, C); for the DiT each prompt its own padding (4/10
    positive tokens, 7/2 negative ones)."""
    attn = cross_layer(tiny(name))
    D, C = attn.to_q.in_features, attn.to_k.in_features
    g = torch.Generator().manual_seed(seed)
    B, N, L = 2, 6, 12
    x = torch.randn(B, N, D, generator=g)
    pos, neg = torch.randn(B, L, C, generator=g), torch.randn(B, L, C, generator=g)
    pm = nm = None
    if name == 'tiny_dit':
        pm, nm = torch.zeros(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
        pm[0, :4], pm[1, :10], nm[0, :7], nm[1, :2] = True, True, True, True
    return attn, x, pos, neg, pm, nm


def ref_pair(attn, x, pos, neg, pm, nm):
    """(Z+, Z-): the layer's attention to each prompt, in float64, before the output projection."""
    q = linear64(attn.to_q, x)
    return (ref_attention(q, linear64(attn.to_k, pos), linear64(attn.to_v, pos), attn.heads, pm),
            ref_attention(q, linear64(attn.to_k, neg), linear64(attn.to_v, neg), attn.heads, nm))


@pytest.mark.parametrize('name', NETS)
@pytest.mark.parametrize('alpha', [0.3, 1.25])
def test_one_layer_matches_hand_written_attention(name, alpha):
    attn, x, pos, neg, pm, nm = layer_inputs(name, seed=7)
    attn.processor = nasa.NASA(alpha)
    with torch.no_grad():
        out = attn(x, *nasa.pair(pos, neg, pm, nm))
    z_pos, z_neg = ref_pair(attn, x, pos, neg, pm, nm)
    expected = linear64(attn.to_out, z_pos - alpha * z_neg)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # and it is not plain attention to the positive prompt
    plain = linear64(attn.to_out, z_pos)
    assert (out.double() - plain).abs().max() > 1e-3


def test_one_layer_is_affine_in_alpha():
    """to_out(Z+ - alpha Z-): the change from alpha 0 grows exactly linearly in alpha."""
    attn = cross_layer(tiny('tiny_unet'))
    g = torch.Generator().manual_seed(8)
    x, pos, neg = torch.randn(2, 6, 64, generator=g), torch.randn(2, 8, 32, generator=g), torch.randn(2, 8, 32, generator=g)
    context, _ = nasa.pair(pos, neg)
    outs = {}
    for a in (0.0, 0.2, 0.8):
        attn.processor = nasa.NASA(a)
        with torch.no_grad():
            outs[a] = attn(x, context)
    d1, d2 = outs[0.2] - outs[0.0], outs[0.8] - outs[0.0]
    assert d1.abs().max() > 1e-3
    torch.testing.assert_close(d2, 4 * d1, atol=1e-5, rtol=1e-4)


def test_negative_alpha_is_refused():
    with pytest.raises(ValueError, match='>= 0'):
        nasa.NASA(-0.1)


# -----------------------------------------------------------------------------
# The whole network


@pytest.mark.parametrize('name', NETS)
def test_negative_prompt_changes_the_output_more_with_larger_alpha(name):
    net = tiny(name)
    x, t, pos, neg, pm, nm = inputs(name)
    with torch.no_grad():
        plain = net(x, t, pos, pm)
    dist = [(nasa_forward(net, a, x, t, pos, neg, pm, nm) - plain).norm().item() for a in (0.05, 0.3, 1.0)]
    assert 0 < dist[0] < dist[1] < dist[2], dist
    # a different negative prompt gives a different image
    other = torch.randn_like(neg)
    assert not torch.allclose(nasa_forward(net, 0.3, x, t, pos, other, pm, nm),
                              nasa_forward(net, 0.3, x, t, pos, neg, pm, nm), atol=1e-4)


@pytest.mark.parametrize('which', ['positive', 'negative'])
def test_dit_respects_each_prompts_mask(which):
    net = tiny('tiny_dit')
    x, t, pos, neg, pm, nm = inputs('tiny_dit')
    base = nasa_forward(net, 0.7, x, t, pos, neg, pm, nm)

    def changed(where):
        p, n = pos.clone(), neg.clone()
        states, mask = (p, pm) if which == 'positive' else (n, nm)
        states[where] = 10 * torch.randn_like(states[where])
        return nasa_forward(net, 0.7, x, t, p, n, pm, nm)

    mask = pm if which == 'positive' else nm
    out = changed(~mask)  # padding only: no effect
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)
    out = changed(mask)   # real tokens: an effect
    assert (out - base).abs().max() > 1e-3
    # each sample reads its own mask: a token real for sample 1 only moves sample 1 only
    k = int(mask[0].sum())  # the first padding position of sample 0, a real token of sample 1
    assert not mask[0, k] and mask[1, k]
    where = torch.zeros_like(mask)
    where[:, k] = True
    out = changed(where)
    torch.testing.assert_close(out[0], base[0], atol=1e-6, rtol=0)
    assert (out[1] - base[1]).abs().max() > 1e-3


# -----------------------------------------------------------------------------
# Layer selection, enable / disable


def test_layer_subset_by_name():
    net = tiny('tiny_unet')
    names = list(nasa.cross_attention_layers(net))
    assert len(names) >= 3 and all(n.endswith('attn2') for n in names)
    up = [n for n in names if 'up_blocks' in n]
    assert 0 < len(up) < len(names)
    assert nasa.enable(net, 0.6, ['up_blocks']) == len(up)
    for n, m in nasa.cross_attention_layers(net).items():
        assert isinstance(m.processor, nasa.NASA)
        assert m.processor.alpha == (0.6 if n in up else 0.0), n
    assert nasa.enable(net, 0.6) == len(names)  # default: every cross-attention layer
    assert all(m.processor.alpha == 0.6 for m in nasa.cross_attention_layers(net).values())
    nasa.disable(net)


def test_layer_subset_acts_only_in_the_chosen_layers():
    """NASA in the second DiT block only: the first block's output is exactly the alpha-0 one."""
    net = tiny('tiny_dit')
    x, t, pos, neg, pm, nm = inputs('tiny_dit')
    seen = {}
    hooks = [blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
             for i, blk in enumerate(net.transformer_blocks)]
    runs = {}
    for key, alpha, layers in [('off', 0.0, None), ('second', 0.8, ['transformer_blocks.1.']), ('all', 0.8, None)]:
        out = nasa_forward(net, alpha, x, t, pos, neg, pm, nm, layers)
        runs[key] = (out, dict(seen))
    for h in hooks:
        h.remove()
    off, second, every = runs['off'], runs['second'], runs['all']
    assert torch.equal(second[1][0], off[1][0])                     # block 0 untouched
    assert (second[1][1] - off[1][1]).abs().max() > 1e-3           # block 1 steered
    assert not torch.allclose(second[0], off[0], atol=1e-4)
    assert not torch.allclose(second[0], every[0], atol=1e-4)      # fewer layers, a different image


@pytest.mark.parametrize('name', NETS)
def test_unknown_layer_name_is_an_error_and_leaves_the_model_alone(name):
    net = tiny(name)
    x, t, pos, neg, pm, nm = inputs(name)
    with torch.no_grad():
        plain = net(x, t, pos, pm)
    with pytest.raises(ValueError, match='no cross-attention layer matches'):
        nasa.enable(net, 0.5, ['no_such_layer'])
    assert all(m.processor is None for m in nasa.cross_attention_layers(net).values())
    with torch.no_grad():
        assert torch.equal(net(x, t, pos, pm), plain)


@pytest.mark.parametrize('name', NETS)
def test_enable_then_disable_restores_the_plain_network(name):
    net = tiny(name)
    x, t, pos, neg, pm, nm = inputs(name)
    with torch.no_grad():
        plain = net(x, t, pos, pm)
        nasa.enable(net, 0.9)
        steered = net(x, t, *nasa.pair(pos, neg, pm, nm))
        nasa.disable(net)
        after = net(x, t, pos, pm)
    assert not torch.equal(steered, plain)
    assert torch.equal(after, plain)
    assert all(m.processor is None for m in nasa.cross_attention_layers(net).values())


def test_pair_broadcasts_one_negative_over_the_batch():
    pos, neg = torch.randn(3, 5, 4), torch.randn(1, 5, 4)
    pm, nm = torch.ones(3, 5, dtype=torch.bool), torch.tensor([[True, True, False, False, False]])
    context, mask = nasa.pair(pos, neg, pm, nm)
    assert context.shape == (3, 2, 5, 4) and mask.shape == (3, 2, 5)
    assert torch.equal(context[:, 0], pos) and all(torch.equal(context[b, 1], neg[0]) for b in range(3))
    assert torch.equal(mask[:, 1], nm.expand(3, 5)) and torch.equal(mask[:, 0], pm)


# -----------------------------------------------------------------------------
# The paper's scales


def test_default_alpha_is_v3s_per_backbone_with_v1s_table_kept():
    assert nasa.default_alpha(M.build(M.PRESETS['tiny_unet'])) == 0.2      # 32-wide context: not SD1.5's 768
    assert nasa.default_alpha(M.UNet(M.UNetConfig(channels=(32,), attn_levels=(True,), heads=(2,),
                                                   layers_per_block=1, norm_groups=8))) == 0.1  # 768: SD1.5
    assert nasa.default_alpha(tiny('tiny_dit')) == 0.5
    assert nasa.default_alpha(tiny('tiny_dit'), nasa.PAPER_ALPHA_V1) == 0.8
    assert nasa.PAPER_ALPHA['shapes'] == nasa.PAPER_ALPHA_V1['shapes'] == 0.3


# -----------------------------------------------------------------------------
# NAG on the same extension point


@pytest.mark.parametrize('name', NETS)
def test_nag_scale_one_is_bit_identical_to_the_plain_forward(name):
    net = tiny(name)
    x, t, pos, neg, pm, nm = inputs(name)
    with torch.no_grad():
        plain = net(x, t, pos, pm)
    assert torch.equal(nasa_forward(net, nasa.NAG(1.0, 2.5, 0.5), x, t, pos, neg, pm, nm), plain)
    assert not torch.equal(nasa_forward(net, nasa.NAG(3.0, 2.5, 0.5), x, t, pos, neg, pm, nm), plain)


def test_generate_with_nag_scale_one_equals_plain_sampling(unet_teacher):
    pipe = M.load_checkpoint(unet_teacher)
    kw = dict(n=2, seed=3)
    plain = sample.generate(pipe, ['a red circle'], **kw)
    assert torch.equal(sample.generate(pipe, ['a red circle'], 'red', nag=nasa.NAG(1.0, 2.5, 0.375), **kw), plain)
    steered = sample.generate(pipe, ['a red circle'], 'red', nag=nasa.NAG(3.0, 2.5, 0.375), **kw)
    assert not torch.equal(steered, plain)
    nasa_img = sample.generate(pipe, ['a red circle'], 'red', nasa_scale=0.3, **kw)
    assert not torch.equal(steered, nasa_img)  # NAG, not NASA, ran
    assert all(m.processor is None for m in nasa.cross_attention_layers(pipe.denoiser).values())


@pytest.mark.parametrize('name', NETS)
@pytest.mark.parametrize('scale,alpha', [(3.0, 0.375), (5.0, 1.0)])
def test_nag_one_layer_matches_the_formula_by_hand(name, scale, alpha):
    """to_out(alpha g' + (1 - alpha) Z+), g = s Z+ - (s - 1) Z-, g' = g min(r, tau) / r with
    r = ||g||_1 / ||Z+||_1 per token; tau between the tokens' ratios, so some are clipped and some not."""
    attn, x, pos, neg, pm, nm = layer_inputs(name, seed=9)
    z_pos, z_neg = ref_pair(attn, x, pos, neg, pm, nm)
    guided = scale * z_pos - (scale - 1) * z_neg
    r = guided.abs().sum(-1, keepdim=True) / z_pos.abs().sum(-1, keepdim=True)
    tau = r.median().item()
    assert (r > tau * 1.01).any() and (r < tau * 0.99).any()
    clipped = guided * torch.minimum(r, torch.full_like(r, tau)) / r
    expected = linear64(attn.to_out, alpha * clipped + (1 - alpha) * z_pos)
    attn.processor = nasa.NAG(scale, tau, alpha)
    with torch.no_grad():
        out = attn(x, *nasa.pair(pos, neg, pm, nm))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    unclipped = linear64(attn.to_out, alpha * guided + (1 - alpha) * z_pos)
    assert (out.double() - unclipped).abs().max() > 1e-3  # the clipping acts


def test_nag_has_no_division_by_zero():
    """Tokens whose positive attention output is all zeros (a zero value projection of the positive
    prompt), and whose guided features are zero too: the output stays finite."""
    class Layer:
        heads = 2
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 3, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    v = torch.randn(1, 2, 5, 8, generator=g)
    v[:, 0] = 0                                   # Z+ = 0, Z- != 0
    out = nasa.NAG(4.0, 2.5, 0.5)(Layer(), q, k, v)
    assert torch.isfinite(out).all() and out.abs().max() < 1e-30  # clipped to tau * ||Z+|| = 0
    out = nasa.NAG(4.0, 2.5, 0.5)(Layer(), q, k, torch.zeros_like(v))  # Z+ = Z- = 0
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize('args,match', [((3.0, 0.0, 0.5), 'tau must be > 0'), ((3.0, -1.0, 0.5), 'tau must be > 0'),
                                        ((0.5, 2.5, 0.5), 'scale must be >= 1'), ((3.0, 2.5, 1.5), r'alpha must be in \[0, 1\]'),
                                        ((3.0, float('nan'), 0.5), 'tau must be > 0')])
def test_nag_refuses_bad_settings(args, match):
    with pytest.raises(ValueError, match=match):
        nasa.NAG(*args)


def test_nag_defaults_per_family():
    assert nasa.default_nag(tiny('tiny_unet')) == (3.0, 2.5, 0.375)           # SD1.5's: phi 2, s = phi + 1
    assert nasa.default_nag(tiny('tiny_dit')) == (5.0, 2.5, 0.375)            # PixArt-Sigma's
    assert nasa.default_nag(M.build(M.PRESETS['tiny_sdxl'])) == (3.0, 2.5, 0.5)


def test_sample_cli_guidance_nag(unet_teacher, tmp_path):
    """--guidance nag with --nag-scale 1 writes the images of no negative prompt; NAG's defaults do not."""
    def run(name, *extra):
        sample.main(['--checkpoint', str(unet_teacher), '--prompt', 'a red circle', '--n', '2', '--device', 'cpu',
                     '--out', str(tmp_path / name), *extra])
        from PIL import Image
        import numpy as np
        return np.asarray(Image.open(tmp_path / name))
    plain = run('plain.png')
    off = run('off.png', '--negative-prompt', 'red', '--guidance', 'nag', '--nag-scale', '1')
    on = run('on.png', '--negative-prompt', 'red', '--guidance', 'nag', '--nag-tau', '3', '--nag-alpha', '1')
    assert (off == plain).all() and not (on == plain).all()
