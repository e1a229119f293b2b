"""
NASA, Negative-Away Steer Attention (SNOOPI, arXiv 2412.02687): training-free negative prompts for
one-step models. In each cross-attention layer the same queries attend to the positive prompt and
to the negative prompt, and the negative result is subtracted:

    Z_NASA = Attn(Q, K+, V+) - alpha * Attn(Q, K-, V-)

The network is handed both prompts stacked on a pair dimension, context (B, 2, L, C) and mask
(B, 2, L) (see `pair`); every cross-attention layer then receives keys and values (B, 2, L, D),
projected by its own to_k/to_v, and the processor below does both attentions in one call. The DiT's
caption projection is applied per token, so the negative T5 states go through it as well, each
prompt with its own mask.

NAG, Normalized Attention Guidance (Chen et al., arXiv 2505.21179), plugs into the same point with
the same pair of attention outputs Z+ and Z-, but extrapolates and renormalises instead of
subtracting (see `NAG`). NASA-T (SNOOPI v3) trains the student with NASA on: vsd.py.
"""
import torch

from model import attention

# NASA scale alpha per backbone, NASA at inference in SNOOPI v3 (ICCV 2025): one value per backbone.
PAPER_ALPHA = {
    'sd15': 0.1,               # SD1.5-based students
    'sd21': 0.2,               # SD2.1-based students (SDXL, with no value of its own, takes this one)
    'sd_turbo': 0.2,           # SwiftBrush v2 / SD-Turbo: SD2.1-based
    'pixart_alpha_512': 0.5,   # PixArt-alpha-based (v3's best row, after NASA-T, uses 1.0)
    'shapes': 0.30,            # this project's shapes world: the best of a sweep (README)
}
# The alternative: v1's values per model (arXiv 2412.02687v1, Table 8), PG-SB and others.
PAPER_ALPHA_V1 = {
    'sd15': 0.04,              # PG-SB SD1.5 (DMD2-SD1.5 also 0.04)
    'sd21': 0.30,              # PG-SB SD2.1
    'sd_turbo': 0.30,          # SwiftBrush v2 / SD-Turbo family (SBv2 0.30)
    'pixart_alpha_512': 0.80,  # PG-SB PixArt-alpha (DMD-PixArt: 0.45)
    'shapes': 0.30,
}

# NAG's defaults per family as (scale, tau, alpha), NAG paper's phi / tau / alpha with the code's
# scale s = phi + 1 (s = 1 is off). NAG gives none for SD2.1 or PixArt-alpha: their nearest
# family's (SD1.5; PixArt-Sigma, the same DiT) serve.
NAG_DEFAULTS = {
    'sd15': (3.0, 2.5, 0.375),
    'sdxl': (3.0, 2.5, 0.5),
    'pixart_sigma': (5.0, 2.5, 0.375),   # also SANA
    'flux': (5.0, 2.5, 0.25),
    'sd35': (5.0, 2.5, 0.125),
}


def default_alpha(denoiser, table=PAPER_ALPHA):
    """The paper's NASA alpha for a network, recognised by its architecture (v3's by default;
    table=PAPER_ALPHA_V1 for v1's)."""
    cfg = denoiser.cfg
    if cfg.in_channels == 3:                       # pixel space: the shapes world (UNet or DiT)
        return table['shapes']
    if not hasattr(cfg, 'context_dim'):            # a DiT
        return table['pixart_alpha_512']
    return table['sd15' if cfg.context_dim == 768 else 'sd21']


def default_nag(denoiser):
    """NAG's (scale, tau, alpha) for a network's family, recognised by its architecture; the
    shapes world's UNet and DiT take their backbone's (not swept in this world)."""
    cfg = denoiser.cfg
    if not hasattr(cfg, 'context_dim'):            # a DiT
        return NAG_DEFAULTS['pixart_sigma']
    if getattr(cfg, 'addition_embed', None):       # SDXL's added text and size conditioning
        return NAG_DEFAULTS['sdxl']
    return NAG_DEFAULTS['sd15']


def attend_both(attn, q, k, v, mask):
    """(Z+, Z-), each (B, N, D): the same queries attend to the positive and the negative prompt in
    one call. q: (B, N, D); k, v: (B, 2, L, D), positive then negative; mask: (B, 2, L) or None."""
    B, _, L, D = k.shape
    q2 = q[:, None].expand(-1, 2, -1, -1).reshape(2 * B, -1, D)  # the same queries for both prompts
    m2 = None if mask is None else mask.reshape(2 * B, L)
    z = attention(q2, k.reshape(2 * B, L, D), v.reshape(2 * B, L, D), attn.heads, m2)
    z = z.unflatten(0, (B, 2))                                    # (B, 2, N, D)
    return z[:, 0], z[:, 1]


def attend_positive(attn, q, k, v, mask):
    """Plain attention to the positive half of the pair, exactly as without a negative prompt."""
    return attention(q, k[:, 0], v[:, 0], attn.heads, None if mask is None else mask[:, 0])


class NASA:
    """Cross-attention processor computing Z+ - alpha Z-. With alpha == 0 it attends to the
    positive prompt alone, exactly as plain attention would."""

    def __init__(self, alpha):
        if alpha < 0:
            raise ValueError(f"NASA scale must be >= 0, got {alpha}: it weights a subtraction")
        self.alpha = alpha

    def __call__(self, attn, q, k, v, mask=None):
        # q: (B, N, D); k, v: (B, 2, L, D), positive then negative; mask: (B, 2, L) or None
        if self.alpha == 0:
            return attend_positive(attn, q, k, v, mask)
        z_pos, z_neg = attend_both(attn, q, k, v, mask)
        return z_pos - self.alpha * z_neg


class NAG:
    """Normalized Attention Guidance (arXiv 2505.21179), as its public code computes it, per token:

        g = s Z+ - (s - 1) Z-                 extrapolate away from the negative prompt
        r = ||g||_1 / ||Z+||_1                over the channels of each token
        g <- g min(r, tau) / r                clip the growth of the norm at tau
        out = alpha g + (1 - alpha) Z+        blend back towards the positive prompt

    applied to the attention output before the output projection, like NASA. scale 1 is off: the
    layer then attends to the positive prompt alone, exactly as plain attention would."""

    def __init__(self, scale, tau, alpha):
        if not scale >= 1:
            raise ValueError(f"NAG scale must be >= 1, got {scale}: 1 is off, more extrapolates away from the negative")
        if not tau > 0:
            raise ValueError(f"NAG tau must be > 0, got {tau}: it bounds the norm ratio of the guided features")
        if not 0 <= alpha <= 1:
            raise ValueError(f"NAG alpha must be in [0, 1], got {alpha}: it blends the guided and positive features")
        self.scale, self.tau, self.alpha = scale, tau, alpha

    def __call__(self, attn, q, k, v, mask=None):
        if self.scale == 1:
            return attend_positive(attn, q, k, v, mask)
        z_pos, z_neg = attend_both(attn, q, k, v, mask)
        g = self.scale * z_pos - (self.scale - 1) * z_neg
        tiny = torch.finfo(z_pos.dtype).tiny  # a token whose Z+ is all zeros: no division by zero
        r = g.norm(p=1, dim=-1, keepdim=True) / z_pos.norm(p=1, dim=-1, keepdim=True).clamp_min(tiny)
        g = g * (self.tau / r.clamp_min(self.tau))  # min(r, tau) / r, without dividing by an r of zero
        return self.alpha * g + (1 - self.alpha) * z_pos


def cross_attention_layers(model):
    return {name: m for name, m in model.named_modules() if getattr(m, 'is_cross', False)}


def enable(model, guidance, layers=None):
    """Put NASA with scale `guidance` (or the processor `guidance`, such as NAG(...)) in every
    cross-attention layer of `model` (UNet or DiT), or in those whose name contains one of `layers`
    (e.g. ['up_blocks'] or ['transformer_blocks.3.']). The other cross-attention layers still
    receive the stacked context and attend to the positive half."""
    found = cross_attention_layers(model)
    chosen = {name for name in found if layers is None or any(s in name for s in layers)}
    if not chosen:  # checked before any layer changes, so a bad name leaves the model as it was
        raise ValueError(f"no cross-attention layer matches {layers}: names look like "
                         f"{next(iter(found), '(none)')}")
    on, off = guidance if callable(guidance) else NASA(guidance), NASA(0.0)
    for name, module in found.items():
        module.processor = on if name in chosen else off
    return len(chosen)


def disable(model):
    for module in cross_attention_layers(model).values():
        module.processor = None


def pair(pos, neg, pos_mask=None, neg_mask=None):
    """Stack positive and negative text states (B, L, C) into the (B, 2, L, C) context NASA reads."""
    if neg.shape[0] == 1 and pos.shape[0] > 1:  # one negative prompt for the whole batch
        neg = neg.expand(pos.shape[0], -1, -1)
        neg_mask = None if neg_mask is None else neg_mask.expand(pos.shape[0], -1)
    context = torch.stack([pos, neg], dim=1)
    mask = None if pos_mask is None else torch.stack([pos_mask, neg_mask], dim=1)
    return context, mask
