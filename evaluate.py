"""
Evaluate a one-step student with the paper's measures, from weights on disk (nothing is fetched):

  CLIP score     100 * max(cos(image, prompt), 0) with a transformers CLIPModel (--clip), per category
  CLIP+ / CLIP-  CLIP score of each pair's images against its prompt and against its negative prompt,
                 without and with NASA (SNOOPI v3's NegOpt protocol, on the pairs of --pairs)
  success        negative-prompt success (SNOOPI Table 7): the share of a pair's images that zero-shot
                 CLIP classification does not put in the negative class, among the pair's stated classes
  HPSv2          100 * cos(image, prompt) with HPSv2's ViT-H/14 (--hpsv2), per category of the prompt file
  FD             Frechet distance between generated and reference images on the features of a
                 transformers CLIP or DINOv2 vision model (--fd-model, --fd-reference)

  python evaluate.py --convert-hpsv2 HPS_v2_compressed.pt --hpsv2-base CLIP-ViT-H-14-laion2B-s32B-b79K \\
      --hpsv2 weights/hpsv2
  python evaluate.py --checkpoint runs/sd21/student --prompt-file hpsv2_prompts/ \\
      --clip weights/clip-vit-large-patch14 --hpsv2 weights/hpsv2 --pairs table7 \\
      --fd-model weights/dinov2-large --fd-reference coco_val/

Every image of a prompt is drawn from the noise of one seed of --seeds, the same noise for every
prompt, so two checkpoints are compared on the same noise. Prints a table, then one JSON line.
"""
import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import convert
import nasa
import sample

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)



# -----------------------------------------------------------------------------
# Negative-prompt pairs and their zero-shot classes


@dataclass
class Pair:
    prompt: str
    negative: str
    classes: dict  # class name -> the text CLIP compares the image with; `negative` is one of them


# SNOOPI Table 7 names "a photo of a person" - "male" and "a photo of a pet" - "cat"; the
# alternative classes each image is classified among are this file's choice, stated here.
TABLE7 = [
    Pair('a photo of a person', 'male', {'male': 'a photo of a man', 'female': 'a photo of a woman'}),
    Pair('a photo of a pet', 'cat', {a: f'a photo of a {a}' for a in ('cat', 'dog', 'rabbit', 'bird', 'hamster')}),
]


def shapes_pairs():
    """The shapes world's four pairs (shapes.NEGATIVE_PAIRS), classified among its colours or shapes."""
    import shapes
    pairs = []
    for prompt, negative in shapes.NEGATIVE_PAIRS:
        colour, shape = shapes.parse_prompt(prompt)
        if shape:  # "a circle" - "red": which colour is the circle
            pairs.append(Pair(prompt, negative, {c: f'a {c} {shape}' for c in shapes.COLOURS}))
        else:      # "a red shape" - "circle": which shape is red
            pairs.append(Pair(prompt, negative, {s: f'a {colour} {s}' for s in shapes.SHAPES}))
    return pairs


def read_pairs(spec):
    """'table7', 'shapes', 'none', or a JSON file: [{"prompt", "negative", "classes": {name: text}}]."""
    if spec in ('table7', 'shapes', 'none'):
        return {'table7': lambda: TABLE7, 'shapes': shapes_pairs, 'none': list}[spec]()
    path = Path(spec)
    if not path.is_file():
        raise cli.UserError(f"--pairs {spec} not found (pass table7, shapes, none, or a JSON file of pairs)")
    try:
        pairs = [Pair(p['prompt'], p['negative'], dict(p['classes'])) for p in json.loads(path.read_text())]
    except (ValueError, KeyError, TypeError) as e:
        raise cli.UserError(f"--pairs {spec} is not a list of {{\"prompt\", \"negative\", \"classes\"}} "
                        f"({type(e).__name__}: {cli.one_line(e)}; see evaluate.py's TABLE7)") from None
    for p in pairs:
        if p.negative not in p.classes or len(p.classes) < 2:
            raise cli.UserError(f"--pairs {spec}: the pair '{p.prompt}' - '{p.negative}' needs its negative among "
                            "at least two classes (add \"classes\": {negative: text, alternative: text, ...})")
    return pairs

# -----------------------------------------------------------------------------
# Prompt files


def read_prompts(spec, limit=0):
    """{category: [prompts]} from a .txt (one prompt a line, optionally 'category<TAB>prompt'), a .json
    (a list, named after the file, or {category: [prompts]}: HPSv2's benchmark files are lists named
    anime.json, concept-art.json, paintings.json, photo.json), or a folder of such files."""
    path = Path(spec)
    if not path.exists():
        raise cli.UserError(f"prompt file {spec} not found (pass a .txt or .json file, or a folder of them)")
    files = sorted(f for f in path.iterdir() if f.suffix in ('.txt', '.json')) if path.is_dir() else [path]
    out = {}
    for f in files:
        if f.suffix == '.json':
            try:
                data = json.loads(f.read_text())
            except ValueError as e:
                raise cli.UserError(f"{f} is not JSON ({cli.one_line(e)}; a list of prompts or "
                                "{category: [prompts]})") from None
            for cat, prompts in (data.items() if isinstance(data, dict) else [(f.stem, data)]):
                out.setdefault(cat, []).extend(str(p) for p in prompts)
        else:
            for line in f.read_text().splitlines():
                cat, _, prompt = line.rpartition('\t')
                if prompt.strip():
                    out.setdefault(cat.strip() or (f.stem if path.is_dir() else 'all'), []).append(prompt.strip())
    out = {cat: (prompts[:limit] if limit else prompts) for cat, prompts in out.items() if prompts}
    if not out:
        raise cli.UserError(f"prompt file {spec} holds no prompts (one per line, or a JSON list)")
    return out

# -----------------------------------------------------------------------------
# transformers image and text models


def read_model(folder, flag, kinds):
    """A transformers model folder whose config's model_type is one of kinds, in float32, eval mode."""
    import transformers
    folder = Path(folder)
    if not (folder / 'config.json').is_file():
        raise cli.UserError(f"{flag} {folder}: no config.json there (download the model's transformers folder, "
                        f"e.g. with `huggingface-cli download`, and pass its path)")
    kind = convert.read_json(folder / 'config.json').get('model_type')
    if kind not in kinds:
        raise cli.UserError(f"{flag} {folder} holds a {kind!r} model, not {' or '.join(kinds)} (pass a "
                        f"{' or '.join(kinds)} folder)")
    transformers.logging.set_verbosity_error()
    cls = {'clip': transformers.CLIPModel, 'clip_vision_model': transformers.CLIPVisionModelWithProjection,
           'dinov2': transformers.Dinov2Model}[kind]
    try:
        model = cls.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as e:
        raise cli.UserError(f"{flag} {folder}: transformers cannot load it ({cli.one_line(e)})") from None
    return model.float().requires_grad_(False).eval()


@dataclass
class Preprocess:
    """An image model's input transform: resize (the shorter side to `size`, then a centre crop to
    `crop`, as CLIP's and DINOv2's processors; or, for HPSv2, the longer side to `crop` and zero
    padding to a square), then normalisation. Bicubic with antialiasing in torch, close to the
    processors' PIL resize."""
    size: int
    crop: int
    mean: tuple
    std: tuple
    pad: bool = False

    @classmethod
    def of(cls, folder, image_size, pad=False):
        p = Path(folder) / 'preprocessor_config.json'
        c = convert.read_json(p) if p.is_file() else {}
        side = lambda v, d: v.get('shortest_edge', v.get('height', d)) if isinstance(v, dict) else (v or d)
        crop = side(c.get('crop_size'), image_size)
        return cls(side(c.get('size'), crop), crop, tuple(c.get('image_mean', OPENAI_MEAN)),
                   tuple(c.get('image_std', OPENAI_STD)), pad)

    def __call__(self, images):
        """images in [-1, 1], (N, 3, H, W) -> normalised (N, 3, crop, crop)."""
        x = (images.float() + 1) / 2
        h, w = x.shape[-2:]
        if self.pad:
            s = self.crop / max(h, w)
            x = resize(x, round(h * s), round(w * s))
            dh, dw = self.crop - x.shape[-2], self.crop - x.shape[-1]
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        else:
            s = self.size / min(h, w)
            x = resize(x, round(h * s), round(w * s))
            top, left = (x.shape[-2] - self.crop) // 2, (x.shape[-1] - self.crop) // 2
            x = x[..., top:top + self.crop, left:left + self.crop]
        mean, std = x.new_tensor(self.mean)[:, None, None], x.new_tensor(self.std)[:, None, None]
        return (x - mean) / std


def resize(x, h, w):
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=(h, w), mode='bicubic', antialias=True, align_corners=False).clamp(0, 1)


class Clip:
    """A transformers CLIPModel with its tokenizer: unit image and text embeddings and their cosine."""

    def __init__(self, folder, flag='--clip', pad=False, device='cpu'):
        import transformers
        self.model = read_model(folder, flag, ['clip']).to(device)
        tok = Path(folder) / ('tokenizer' if (Path(folder) / 'tokenizer').is_dir() else '')
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(tok)
        except (OSError, ValueError) as e:
            raise cli.UserError(f"{flag} {folder}: no tokenizer ({cli.one_line(e)}; the folder needs the "
                            "tokenizer files of the model's download)") from None
        self.preprocess = Preprocess.of(folder, self.model.config.vision_config.image_size, pad)
        self.device = device

    @torch.no_grad()
    def image_embeds(self, images):
        x = self.preprocess(images.to(self.device))
        e = self.model.visual_projection(self.model.vision_model(pixel_values=x).pooler_output)
        return F.normalize(e.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts):
        length = self.model.config.text_config.max_position_embeddings
        tok = self.tokenizer(list(texts), padding='max_length', max_length=length, truncation=True,
                             return_tensors='pt').to(self.device)
        out = self.model.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def cosine(self, images, texts):
        """cos(image i, text i) for each i."""
        return (self.image_embeds(images) * self.text_embeds(texts)).sum(-1)


def clip_score(clip, images, texts):
    """CLIP score (Hessel et al. 2021, with w = 100 as in torchmetrics): 100 * max(cos, 0) per image."""
    return 100 * clip.cosine(images, texts).clamp(min=0)


def hps_score(hps, images, texts):
    """HPSv2 (Wu et al. 2023): 100 * cos of HPSv2's image and text embeddings (its score.py reports the
    cosine; the paper's tables, and SNOOPI's, 100 times it)."""
    return 100 * hps.cosine(images, texts)


@torch.no_grad()
def zero_shot(clip, images, texts):
    """Index of the text (among texts) each image is closest to: CLIP's zero-shot classifier."""
    return (clip.image_embeds(images) @ clip.text_embeds(texts).T).argmax(-1)


def success_rate(classify, images, pair):
    """Negative-prompt success (SNOOPI Table 7): the share of images not classified as the negative.
    classify(images, texts) -> class index per image."""
    names = list(pair.classes)
    got = classify(images, [pair.classes[n] for n in names])
    return float((got != names.index(pair.negative)).float().mean())

# -----------------------------------------------------------------------------
# Frechet distance


class Features:
    """Image features for the Frechet distance: a CLIP model's projected image embedding, or a vision
    model's pooled output (DINOv2: its normalised CLS token, as in Stein et al. 2023's FD_DINOv2)."""

    def __init__(self, folder, device='cpu'):
        self.model = read_model(folder, '--fd-model', ['clip', 'clip_vision_model', 'dinov2']).to(device)
        cfg = getattr(self.model.config, 'vision_config', self.model.config)
        self.preprocess = Preprocess.of(folder, cfg.image_size)
        self.device = device

    @torch.no_grad()
    def __call__(self, images):
        x = self.preprocess(images.to(self.device))
        m = self.model
        if hasattr(m, 'visual_projection') and hasattr(m, 'text_model'):  # CLIPModel
            f = m.visual_projection(m.vision_model(pixel_values=x).pooler_output)
        else:
            out = m(pixel_values=x)
            f = out.image_embeds if hasattr(out, 'image_embeds') else out.pooler_output
        return f.double().cpu()


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + tr(A + B - 2 (A B)^1/2) between Gaussians fitted to two feature sets (the
    formula of FID, Heusel et al. 2017), in float64. tr((A B)^1/2) = tr((A^1/2 B A^1/2)^1/2), whose
    argument is symmetric, so two symmetric eigen-decompositions do it."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def sqrt_psd(m):
        values, vectors = np.linalg.eigh((m + m.T) / 2)
        return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    root_a = sqrt_psd(cov_a)
    cross = np.trace(sqrt_psd(root_a @ cov_b @ root_a))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def read_images(folder, limit=0):
    """Images of a folder (PNG, JPEG, WebP) as [-1, 1] tensors (1, 3, H, W), sorted by name."""
    from PIL import Image
    files = sorted(f for f in Path(folder).glob('*') if f.suffix.lower() in ('.png', '.jpg', '.jpeg', '.webp'))
    if not files:
        raise cli.UserError(f"--fd-reference {folder} holds no PNG or JPEG images (pass a folder of reference images)")
    for f in files[:limit or None]:
        arr = np.asarray(Image.open(f).convert('RGB'), np.float32)
        yield torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1

# -----------------------------------------------------------------------------
# Generation


class Generator:
    """One-step images for (prompt, seed) jobs, in batches, with the noise of each seed shared by
    every prompt; optionally saved as PNGs."""

    def __init__(self, pipe, seeds, batch_size, height=None, width=None, keep=None, layers=None):
        self.pipe, self.seeds, self.batch_size, self.keep, self.layers = pipe, seeds, batch_size, keep, layers
        net = pipe.denoiser
        self.h, self.w = sample.latent_size(pipe, height, width)
        self.noise = {s: torch.randn(net.cfg.in_channels, self.h, self.w, generator=torch.Generator().manual_seed(s))
                      for s in seeds}
        self.height, self.width = height, width

    def __call__(self, prompts, negative=None, scale=0.0, name='images'):
        """Images (len(prompts) * len(seeds), 3, H, W) in [-1, 1], prompt-major, on the CPU."""
        jobs = [(p, s) for p in prompts for s in self.seeds]
        out = []
        for i in tqdm(range(0, len(jobs), self.batch_size), desc=name, leave=False, file=sys.stderr):
            chunk = jobs[i:i + self.batch_size]
            noise = torch.stack([self.noise[s] for _, s in chunk])
            out.append(sample.generate(self.pipe, [p for p, _ in chunk], negative, scale, n=1, height=self.height,
                                       width=self.width, layers=self.layers, noise=noise).cpu())
        images = torch.cat(out)
        if self.keep:
            folder = Path(self.keep) / name
            sample.save_images(images, folder)
            (folder / 'prompts.txt').write_text(''.join(f'{i:05d}\t{s}\t{p}\n' for i, (p, s) in enumerate(jobs)))
        return images

# -----------------------------------------------------------------------------
# The evaluation


def mean(values):
    return float(torch.as_tensor(values, dtype=torch.float64).mean()) if len(values) else math.nan


def evaluate(generate, prompts=None, pairs=(), clip=None, hps=None, features=None, reference=None,
             nasa_scale=0.3, negative=None, generate_pairs=None):
    """Every measure whose model is given. generate: a Generator for the prompts, generate_pairs one
    for the pairs (default: the same); prompts: {category: [prompts]}; reference: an iterable of
    reference image batches for the Frechet distance."""
    generate_pairs = generate_pairs or generate
    res = {}
    if prompts:
        images, cats = [], []
        for cat, ps in prompts.items():
            images.append(generate(ps, negative, nasa_scale if negative else 0.0, name=f'prompts-{cat}'))
            cats += [(cat, p) for p in ps for _ in generate.seeds]
        images = torch.cat(images)
        texts = [p for _, p in cats]
        res['images'] = len(images)
        for key, model, fn in (('clip_score', clip, clip_score), ('hpsv2', hps, hps_score)):
            if model is not None:
                s = torch.cat([fn(model, images[i:i + 64], texts[i:i + 64]) for i in range(0, len(images), 64)])
                res[key] = {cat: mean(s[torch.tensor([c == cat for c, _ in cats])]) for cat in prompts}
                res[key]['all'] = mean(s)
        if features is not None:
            fake = torch.cat([features(images[i:i + 64]) for i in range(0, len(images), 64)])
            real = torch.cat([features(r) for r in reference])
            res['fd'] = frechet_distance(fake.numpy(), real.numpy())
            res['fd_images'] = [len(fake), len(real)]
    if pairs and clip is not None:
        rows = []
        for p in pairs:
            row = {'prompt': p.prompt, 'negative': p.negative}
            for tag, scale in (('without', 0.0), ('with', nasa_scale)):
                neg = p.negative if scale else None
                im = generate_pairs([p.prompt], neg, scale, name=f'pair-{p.negative}-{tag}')
                row[f'clip_plus_{tag}'] = mean(clip_score(clip, im, [p.prompt] * len(im)))
                row[f'clip_minus_{tag}'] = mean(clip_score(clip, im, [p.negative] * len(im)))
                row[f'success_{tag}'] = success_rate(lambda x, t: zero_shot(clip, x, t), im, p)
            rows.append(row)
        res['pairs'] = rows
        res['pairs_mean'] = {k: mean([r[k] for r in rows]) for k in rows[0] if k not in ('prompt', 'negative')}
    return res


def format_table(res):
    """The results as plain-text tables."""
    lines = []
    for key, title in (('clip_score', 'CLIP score'), ('hpsv2', 'HPSv2')):
        if key in res:
            lines += [f"{title} ({res['images']} images)", *(f"  {c:<24} {v:8.3f}" for c, v in res[key].items())]
    if 'fd' in res:
        lines.append(f"Frechet distance {res['fd']:.4f} ({res['fd_images'][0]} generated, "
                     f"{res['fd_images'][1]} reference images)")
    if 'pairs' in res:
        head = ('prompt', 'negative', 'CLIP+', 'CLIP+ NASA', 'CLIP-', 'CLIP- NASA', 'success', 'success NASA')
        keys = ('clip_plus_without', 'clip_plus_with', 'clip_minus_without', 'clip_minus_with',
                'success_without', 'success_with')
        rows = [(r['prompt'], r['negative'], *(f'{r[k]:.3f}' for k in keys)) for r in res['pairs']]
        rows.append(('mean', '', *(f"{res['pairs_mean'][k]:.3f}" for k in keys)))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        for row in (head, *rows):
            lines.append('  '.join(str(x).ljust(w) for x, w in zip(row, widths)))
    return '\n'.join(lines)

# -----------------------------------------------------------------------------
# HPSv2: its OpenCLIP ViT-H/14 checkpoint to a transformers CLIPModel folder

# OpenCLIP multiplies by its projections (x @ proj); transformers' Linear layers hold them transposed.
TRANSPOSED = ('text_projection.weight', 'visual_projection.weight')


def open_clip_model_names(text_layers, vision_layers):
    """transformers' CLIPModel keys -> OpenCLIP's: convert.py's text map, the same block map for the
    vision tower under `visual.`, and the embeddings, final norms and projections."""
    names = convert.open_clip_names(text_layers)
    for ours, theirs in convert.open_clip_names(vision_layers).items():
        if ours.startswith('text_model.encoder.'):
            key, i, n = theirs if isinstance(theirs, tuple) else (theirs, 0, 1)
            names[ours.replace('text_model.', 'vision_model.', 1)] = ('visual.' + key, i, n)
    v = 'vision_model.'
    names.update({
        'text_projection.weight': 'text_projection', 'visual_projection.weight': 'visual.proj',
        'logit_scale': 'logit_scale',
        f'{v}embeddings.class_embedding': 'visual.class_embedding',
        f'{v}embeddings.patch_embedding.weight': 'visual.conv1.weight',
        f'{v}embeddings.position_embedding.weight': 'visual.positional_embedding',
        f'{v}pre_layrnorm.weight': 'visual.ln_pre.weight', f'{v}pre_layrnorm.bias': 'visual.ln_pre.bias',
        f'{v}post_layernorm.weight': 'visual.ln_post.weight', f'{v}post_layernorm.bias': 'visual.ln_post.bias'})
    return names


def convert_hpsv2(src, base, out):
    """HPSv2's OpenCLIP checkpoint (.pt, read with weights_only=True, or .safetensors) as a transformers
    CLIPModel folder; config, tokenizer and preprocessor config from `base`, the transformers folder
    of the CLIP it was fine-tuned from (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""
    import transformers
    from safetensors.torch import save_file
    if not Path(src).is_file():
        raise cli.UserError(f"--convert-hpsv2 {src} not found (download HPS_v2_compressed.pt or "
                        "HPS_v2.1_compressed.pt from the xswu/HPSv2 model repository)")
    if not (Path(base) / 'config.json').is_file() or \
            convert.read_json(Path(base) / 'config.json').get('model_type') != 'clip':
        raise cli.UserError(f"--hpsv2-base {base} is not a transformers CLIPModel folder (download "
                        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K and pass its folder)")
    sd = convert.read_tensors(src)
    if not any(k.startswith('visual.') for k in sd):
        raise cli.UserError(f"{src} holds no OpenCLIP image tower (visual.*), so it is not an HPSv2 checkpoint"
                        f"{convert.looks_like(sd)} (pass HPS_v2_compressed.pt)")
    cfg = transformers.CLIPConfig.from_pretrained(base)
    names = open_clip_model_names(cfg.text_config.num_hidden_layers, cfg.vision_config.num_hidden_layers)
    # attn_mask: OpenCLIP's causal mask, saved by some versions; transformers builds its own
    state = convert.gather({k: v for k, v in sd.items() if k != 'attn_mask'}, names, f"{src} (OpenCLIP)")
    state = {k: (v.T if k in TRANSPOSED else v).contiguous() for k, v in state.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / 'model.safetensors'), metadata={'format': 'pt'})
    cfg.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(out)
    if (Path(base) / 'preprocessor_config.json').is_file():
        shutil.copy(Path(base) / 'preprocessor_config.json', out)
    transformers.logging.set_verbosity_error()
    try:  # transformers checks every key and shape once more
        _, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
    except RuntimeError as e:
        raise cli.UserError(f"{src} does not fit {base}'s config ({cli.one_line(e)}; pass the CLIP it was "
                        "fine-tuned from as --hpsv2-base)") from None
    if info['missing_keys'] or info['unexpected_keys'] or info.get('mismatched_keys'):
        raise cli.UserError(f"{src} does not fit {base}'s config ({info}; pass the CLIP it was fine-tuned from)")
    return out

# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--checkpoint', default='checkpoints/shapes_student', help='one-step student folder (default: %(default)s)')
    a('--prompt-file', help='prompts for CLIP score, HPSv2 and FD: .txt (a prompt a line, or CATEGORY<TAB>PROMPT), '
                            '.json, or a folder of them, one category a file (default: none)')
    a('--limit', type=int, default=0, help='prompts per category, 0 for all (default: %(default)s)')
    a('--pairs', default='table7', help="negative-prompt pairs: table7, shapes, none, or a JSON file of "
                                        "{prompt, negative, classes} (default: %(default)s)")
    a('--seeds', default='0,1,2,3', help='comma-separated seeds: the images of every prompt, one per seed '
                                          '(default: %(default)s)')
    a('--pair-images', type=int, default=100, help='images per pair and setting, from seeds 0 to N-1 (SNOOPI '
                                                    'Table 7: 100) (default: %(default)s)')
    a('--clip', help='transformers CLIPModel folder for CLIP score, CLIP+/CLIP- and success (default: none)')
    a('--hpsv2', help='HPSv2 as a transformers CLIPModel folder (written by --convert-hpsv2) (default: none)')
    a('--convert-hpsv2', metavar='FILE', help='convert HPSv2\'s OpenCLIP checkpoint into the --hpsv2 folder, '
                                              'then exit (default: none)')
    a('--hpsv2-base', help='transformers folder of the CLIP HPSv2 was fine-tuned from '
                           '(laion/CLIP-ViT-H-14-laion2B-s32B-b79K): config and tokenizer (default: none)')
    a('--fd-model', help='transformers CLIP or DINOv2 folder whose image features the FD uses (default: none)')
    a('--fd-reference', help='folder of reference images for the FD (default: none)')
    a('--fd-reference-limit', type=int, default=0, help='reference images read, 0 for all (default: %(default)s)')
    a('--negative-prompt', help='negative prompt with NASA for the prompt-file images (SNOOPI v3 uses a generic '
                                '"worst quality, low quality, ..." for HPSv2) (default: none)')
    a('--nasa-scale', type=float, help="NASA alpha (default: the paper's value for the backbone, SNOOPI v3)")
    a('--nasa-layers', help='comma-separated substrings of the cross-attention layers NASA acts in (default: all)')
    a('--batch-size', type=int, default=16, help='images per generator call (default: %(default)s)')
    a('--height', type=int, help="image height in pixels (default: the network's training size)")
    a('--width', type=int, help="image width in pixels (default: the network's training size)")
    a('--keep-images', help='folder to save every generated image in, with its prompt and seed (default: none)')
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='device (default: %(default)s)')
    a('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'],
      help="the generator's dtype; scoring models run in float32 (default: %(default)s)")
    a('--json', help='also append the JSON line to this file (default: none)')
    return p.parse_args(argv)


def run(args):
    if args.convert_hpsv2:
        if not args.hpsv2 or not args.hpsv2_base:
            raise cli.UserError("--convert-hpsv2 needs --hpsv2 OUT and --hpsv2-base DIR (the folder to write, and "
                            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K's transformers folder)")
        print(f"wrote {convert_hpsv2(args.convert_hpsv2, args.hpsv2_base, args.hpsv2)}")
        return None
    try:
        seeds = [int(s) for s in args.seeds.split(',')]
    except ValueError:
        raise cli.UserError(f"--seeds {args.seeds}: not a comma-separated list of integers (e.g. 0,1,2,3)") from None
    if bool(args.fd_model) != bool(args.fd_reference):
        raise cli.UserError("the Frechet distance needs both --fd-model and --fd-reference")
    if not (args.clip or args.hpsv2 or args.fd_model):
        raise cli.UserError("nothing to measure (pass --clip, --hpsv2 or --fd-model with the folder of its weights)")
    if (args.hpsv2 or args.fd_model) and not args.prompt_file:
        raise cli.UserError("HPSv2 and the Frechet distance score the images of --prompt-file (pass one)")
    prompts = read_prompts(args.prompt_file, args.limit) if args.prompt_file else None
    pairs = read_pairs(args.pairs)
    for flag, folder in (('--clip', args.clip), ('--hpsv2', args.hpsv2), ('--fd-model', args.fd_model),
                         ('--fd-reference', args.fd_reference)):
        if folder and not Path(folder).is_dir():
            raise cli.UserError(f"{flag} {folder}: no such folder (download the weights and pass their folder; "
                            "see the README's evaluation section)")
    clip = Clip(args.clip, device=args.device) if args.clip else None
    hps = Clip(args.hpsv2, '--hpsv2', pad=True, device=args.device) if args.hpsv2 else None
    features = Features(args.fd_model, args.device) if args.fd_model else None
    reference = read_images(args.fd_reference, args.fd_reference_limit) if args.fd_reference else None
    pipe = sample.load(args.checkpoint, args.device, getattr(torch, args.dtype))
    scale = args.nasa_scale if args.nasa_scale is not None else nasa.default_alpha(pipe.denoiser)
    layers = args.nasa_layers.split(',') if args.nasa_layers else None
    generate = Generator(pipe, seeds, args.batch_size, args.height, args.width, args.keep_images, layers)
    generate_pairs = Generator(pipe, range(args.pair_images), args.batch_size, args.height, args.width,
                               args.keep_images, layers)
    res = evaluate(generate, prompts, pairs, clip, hps, features, reference, scale, args.negative_prompt,
                   generate_pairs)
    return {'checkpoint': args.checkpoint, 'seeds': seeds, 'pair_images': args.pair_images, 'nasa_scale': scale,
            **res}


@cli.script('evaluate.py')
def main(argv=None):
    args = parse_args(argv)
    res = run(args)
    if res is None:
        return
    print(format_table(res))
    line = json.dumps(res)
    print(line)
    if args.json:
        with open(args.json, 'a') as f:
            f.write(line + '\n')


if __name__ == '__main__':
    main()
