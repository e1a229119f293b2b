"""
Generate images: one step from a distilled student, with NASA (or NAG) negative prompts, or many
DDIM steps with classifier-free guidance from a teacher, for comparison.

    python sample.py                                       # the shipped shapes student, NASA on and off
    python sample.py --checkpoint CKPT --prompt "a photo of a pet" --negative-prompt "cat" --out pets.png
    python sample.py --checkpoint CKPT --prompt "a red shape" --negative-prompt "circle" --guidance nag
    python sample.py --checkpoint TEACHER --steps 25 --cfg 7.5 --prompt "a red circle" --out DIR/

CKPT is a folder written by convert.py or train.py, or a diffusers-format folder.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

import cli
import model as M
import nasa
import vsd

GUIDANCE = ('nasa', 'nag')  # one-step negative guidance, both in nasa.py
DEMO = [('a circle', 'red'), ('a square', 'blue'), ('a red shape', 'circle'), ('a blue shape', 'square')]


class SampleError(cli.UserError):
    pass


def load(checkpoint, device='cpu', dtype=torch.float32):
    """A project checkpoint folder, or a diffusers-format folder read in memory."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise SampleError(f"checkpoint {checkpoint} not found: pass a folder written by convert.py or train.py")
    try:
        if (path / 'model_index.json').is_file():
            import convert
            return convert.read_diffusers(path, device, dtype)  # a model.Pipeline, converted in memory
        return M.load_checkpoint(path, device, dtype)
    except (FileNotFoundError, ValueError) as e:  # convert.ConversionError and M.CheckpointError are ValueErrors
        raise SampleError(cli.one_line(e)) from None


def latent_size(pipe, height, width):
    """Latent (h, w) for an image size, checked against what the network can take."""
    cfg = pipe.denoiser.cfg
    vae = pipe.vae  # each VAE level but the last halves the image (SD: 8x)
    down = 2 ** (len(vae.cfg.channels) - 1) if isinstance(vae, M.VAE) else 1
    size = cfg.sample_size * down
    height, width = height or size, width or size
    if isinstance(cfg, M.UNetConfig):
        multiple = down * 2 ** (len(cfg.channels) - 1)        # each UNet level halves the latent
        why = f"this UNet halves the resolution {len(cfg.channels) - 1} times"
    else:
        multiple, why = down * cfg.patch_size, f"the DiT cuts the latent into {cfg.patch_size}x{cfg.patch_size} patches"
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise SampleError(f"size {height}x{width} cannot be generated: height and width must be positive multiples "
                          f"of {multiple} ({why}{f' on {down}x-downsampled latents' if down > 1 else ''})")
    return height // down, width // down


@torch.no_grad()
def generate(pipe, prompts, negative=None, nasa_scale=0.0, n=1, seed=0, height=None, width=None,
             steps=1, cfg=1.0, layers=None, noise=None, nag=None):
    """Images in [-1, 1], (len(prompts) * n, 3, H, W), prompt-major. One step (steps=1) runs the
    student from its start timestep, with NASA when a negative prompt and nasa_scale > 0 are given,
    or with NAG in its place when nag (a nasa.NAG) is given and its scale is not 1 (off);
    steps > 1 runs DDIM with classifier-free guidance, the negative prompt in the unconditional slot.
    noise: the starting latents (len(prompts) * n, C, h, w), drawn from seed when None."""
    net, schedule = pipe.denoiser, pipe.schedule
    device, dtype = next(net.parameters()).device, next(net.parameters()).dtype
    h, w = latent_size(pipe, height, width)
    prompts = [p for p in prompts for _ in range(n)]
    c, cm, pooled = pipe.text_encoder.encode(prompts)
    size_ids = lambda pooled: None  # SDXL: the pooled text and the image size join the timestep
    if getattr(net.cfg, 'addition_embed', None):
        if pooled is None:
            raise SampleError("this SDXL checkpoint has one text encoder: it needs text_encoder_2/ and tokenizer_2/ "
                              "as well (convert it with --text-encoder DIR of an SDXL diffusers folder)")
        down = 2 ** (len(pipe.vae.cfg.channels) - 1) if isinstance(pipe.vae, M.VAE) else 1
        size_ids = lambda pooled: M.sdxl_added(pooled, h * down, w * down).to(dtype)
    g = torch.Generator(device).manual_seed(seed)
    if noise is None:
        x = torch.randn(len(prompts), net.cfg.in_channels, h, w, device=device, generator=g, dtype=dtype)
    else:
        x = noise.to(device, dtype)
    c = c.to(dtype)
    if steps == 1:
        steer = nag.scale != 1 if nag is not None else nasa_scale > 0
        if negative is not None and steer:  # both prompts' states go through the pair; the pooled text stays the positive's
            u, um = pipe.text_encoder([negative])
            c, cm = nasa.pair(c, u.to(dtype), cm, um)
            try:
                nasa.enable(net, nag if nag is not None else nasa_scale, layers)
            except ValueError as e:  # --nasa-layers names no cross-attention layer
                raise SampleError(str(e)) from None
        try:
            x = vsd.student_generate(net, schedule, x, c, cm, -1 if pipe.student_t is None else pipe.student_t,
                                     size_ids(pooled), pipe.student_noise)
        finally:
            nasa.disable(net)
    else:
        # no negative prompt: the model's own unconditional input (SDXL: zeros, see TextEncoder.null)
        u, um, upooled = pipe.text_encoder.encode([negative]) if negative is not None else pipe.text_encoder.null()
        x = ddim(net, schedule, x, (c, cm, size_ids(pooled)), (u.to(dtype), um, size_ids(upooled)), steps, cfg)
    return pipe.vae.decode(x).float().clamp(-1, 1)


def ddim(net, schedule, x, cond, null, steps, cfg):
    """Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0) with classifier-free guidance."""
    ts = torch.linspace(schedule.T - 1, 0, steps, device=x.device).round().long()
    kappa = torch.full((x.shape[0],), float(cfg), device=x.device)
    for i, t in enumerate(ts):
        tt = t.expand(x.shape[0])
        eps = vsd.guided_eps(net, schedule, x, tt, cond, null, kappa)
        alpha, sigma = schedule.alpha_sigma(tt)
        x0 = (x - sigma * eps) / alpha
        if i + 1 == len(ts):
            return x0
        a_next, s_next = schedule.alpha_sigma(ts[i + 1].expand(x.shape[0]))
        x = a_next * x0 + s_next * eps


def to_uint8(images):
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, nrow=8):
    from PIL import Image
    arr = to_uint8(images) if torch.is_tensor(images) else images
    n, h, w, _ = arr.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * h, nrow * w, 3), dtype=np.uint8)
    for i, im in enumerate(arr):
        grid[(i // nrow) * h:(i // nrow + 1) * h, (i % nrow) * w:(i % nrow + 1) * w] = im
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def save_images(images, folder):
    from PIL import Image
    Path(folder).mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_uint8(images)):
        Image.fromarray(im).save(Path(folder) / f'{i:05d}.png')


@cli.script('sample.py')
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--checkpoint', default='checkpoints/shapes_student', help='checkpoint folder (default: %(default)s)')
    a('--prompt', action='append', help='a prompt; repeat for several (default: a demo of NASA on the shapes world)')
    a('--prompt-file', help='text file, one prompt per line (default: none)')
    a('--negative-prompt', help='negative prompt: NASA in one step, the unconditional slot of CFG in many (default: none)')
    a('--guidance', default='nasa', help="one-step negative guidance: nasa (SNOOPI) or nag (Normalized Attention "
                                         "Guidance, arXiv 2505.21179) (default: %(default)s)")
    a('--nasa-scale', type=float, help="NASA alpha (default: the paper's value for the backbone, SNOOPI v3; "
                                       "nasa.PAPER_ALPHA_V1 holds v1's Table 8)")
    a('--nag-scale', type=float, help="NAG scale s = phi + 1, 1 is off (default: NAG's value for the backbone family, "
                                      "nasa.NAG_DEFAULTS: 3 for UNets, 5 for DiTs)")
    a('--nag-tau', type=float, help="NAG's bound on the norm ratio of guided to positive attention features "
                                    "(default: NAG's value for the family, 2.5)")
    a('--nag-alpha', type=float, help="NAG's blend of the guided features with the positive ones, in [0, 1] "
                                      "(default: NAG's value for the family: 0.375 SD1.5 and DiTs, 0.5 SDXL)")
    a('--nasa-layers', help="comma-separated substrings of the cross-attention layers NASA or NAG acts in (default: all)")
    a('--n', type=int, default=4, help='images per prompt (default: %(default)s)')
    a('--seed', type=int, default=0, help='random seed (default: %(default)s)')
    a('--height', type=int, help="image height in pixels (default: the network's training size)")
    a('--width', type=int, help="image width in pixels (default: the network's training size)")
    a('--steps', type=int, default=1, help='1: one-step student; more: DDIM on a teacher (default: %(default)s)')
    a('--cfg', type=float, default=1.0, help='classifier-free guidance scale for --steps > 1 (default: %(default)s)')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='device (default: %(default)s)')
    a('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'], help='weights dtype (default: %(default)s)')
    a('--out', default='samples.png', help='FILE.png writes a grid; DIR/ writes one PNG per image (default: %(default)s)')
    run(p.parse_args(argv))


def check_args(args):
    """Everything that can be checked before the model loads."""
    cli.number('--steps', args.steps, low=1, fix='1 runs a one-step student; more run DDIM on a teacher')
    cli.number('--n', args.n, low=1)
    cli.number('--seed', args.seed, low=0, high=2 ** 63 - 1)
    cli.number('--height', args.height, low=1)
    cli.number('--width', args.width, low=1)
    cli.number('--cfg', args.cfg)
    cli.number('--nasa-scale', args.nasa_scale, low=0, fix='it weights the subtracted negative attention')
    if args.guidance not in GUIDANCE:
        raise SampleError(f"--guidance must be one of {', '.join(GUIDANCE)}, got {args.guidance!r}")
    cli.number('--nag-scale', args.nag_scale, low=1, fix='1 is off; more extrapolates away from the negative prompt')
    cli.number('--nag-tau', args.nag_tau, low=0, low_open=True, fix='it bounds the norm ratio of the guided features')
    cli.number('--nag-alpha', args.nag_alpha, low=0, high=1, fix='it blends the guided and the positive features')
    nag_flags = [f for f, v in (('--nag-scale', args.nag_scale), ('--nag-tau', args.nag_tau),
                                ('--nag-alpha', args.nag_alpha)) if v is not None]
    if args.guidance == 'nasa' and nag_flags:
        raise SampleError(f"{nag_flags[0]} applies to --guidance nag (pass it, or drop {nag_flags[0]})")
    if args.guidance == 'nag' and args.nasa_scale is not None:
        raise SampleError("--nasa-scale applies to --guidance nasa (drop it, or pass --nag-scale for NAG)")
    if args.guidance == 'nag' and args.steps > 1:
        raise SampleError("--guidance nag applies to one-step sampling; with --steps > 1 the negative prompt goes into "
                          "CFG (drop --guidance)")
    if args.steps == 1 and args.cfg != 1.0:
        raise SampleError(f"--cfg {args.cfg} applies to DDIM with --steps > 1; a one-step student runs without "
                          "guidance (drop --cfg, or pass --steps N for a teacher)")
    if args.nasa_scale is not None and args.steps > 1:
        raise SampleError("--nasa-scale applies to one-step sampling; with --steps > 1 the negative prompt goes into "
                          "CFG (drop --nasa-scale)")
    given = args.prompt or args.prompt_file
    if given and args.negative_prompt is None and (args.nasa_layers or args.nasa_scale is not None or nag_flags):
        flag = '--nasa-layers' if args.nasa_layers else '--nasa-scale' if args.nasa_scale is not None else nag_flags[0]
        raise SampleError(f"{flag} needs a negative prompt: NASA and NAG steer away from its attention "
                          "(pass --negative-prompt)")
    if args.nasa_layers and args.steps > 1:
        raise SampleError("--nasa-layers applies to one-step sampling (drop it, or pass --steps 1)")
    cli.device('--device', args.device)
    inputs = [('the checkpoint', args.checkpoint), ('the prompt file', args.prompt_file)]
    if args.out.endswith('/') or Path(args.out).is_dir():
        cli.not_an_input('--out', args.out, inputs)
        cli.writable_folder('--out', args.out)
    else:
        from PIL import Image
        if Path(args.out).suffix.lower() not in Image.registered_extensions():
            raise SampleError(f"--out {args.out}: {Path(args.out).suffix or 'no extension'} is not an image format "
                              "Pillow writes (end it with .png for a grid, or with / for a folder of PNGs)")
        cli.not_an_input('--out', args.out, inputs)
        cli.writable_file('--out', args.out)


def read_prompt_file(path):
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SampleError(f"prompt file {path} not found") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise SampleError(f"prompt file {path} is not a text file (pass a UTF-8 file, one prompt per line)") from None
    prompts = [l.strip() for l in text.splitlines() if l.strip()]
    if not prompts:
        raise SampleError(f"prompt file {path} holds no prompts (one per line)")
    return prompts


def run(args):
    check_args(args)
    prompts = list(args.prompt or []) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    pipe = load(args.checkpoint, args.device, getattr(torch, args.dtype))
    latent_size(pipe, args.height, args.width)  # a size the network cannot take fails before any work
    for prompt, n in pipe.text_encoder.too_long(prompts + [args.negative_prompt or '']):
        cli.warn('sample.py', f"the prompt '{prompt[:40]}...' is {n} tokens; the text encoder reads only the first "
                              f"{pipe.text_encoder.max_length}")
    scale = args.nasa_scale if args.nasa_scale is not None else nasa.default_alpha(pipe.denoiser)
    nag = None
    if args.guidance == 'nag':  # each value not given is NAG's default for the family
        given = (args.nag_scale, args.nag_tau, args.nag_alpha)
        nag = nasa.NAG(*(v if v is not None else d for v, d in zip(given, nasa.default_nag(pipe.denoiser))))
    layers = args.nasa_layers.split(',') if args.nasa_layers else None
    common = dict(n=args.n, seed=args.seed, height=args.height, width=args.width, steps=args.steps, cfg=args.cfg,
                  nag=nag)
    if prompts:
        images = generate(pipe, prompts, args.negative_prompt, scale, layers=layers, **common)
        nrow = args.n
    else:  # the demo: each pair without, then with, its negative prompt
        rows = [generate(pipe, [pos], neg if on else None, scale, layers=layers, **{**common, 'n': 8})
                for pos, neg in DEMO for on in (False, True)]
        images, nrow = torch.cat(rows), 8
        how = f"NAG scale {nag.scale}, tau {nag.tau}, alpha {nag.alpha}" if nag else f"NASA alpha {scale}"
        for i, (pos, neg) in enumerate(DEMO):
            print(f"rows {2 * i + 1}-{2 * i + 2}: '{pos}', then with negative prompt '{neg}' ({how})")
    if args.out.endswith('/') or Path(args.out).is_dir():
        save_images(images, args.out)
    else:
        save_grid(images, args.out, nrow=nrow)
    print(f"wrote {len(images)} images to {args.out}")


if __name__ == '__main__':
    main()
