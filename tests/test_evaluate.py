"""evaluate.py: CLIP score against transformers, the HPSv2 conversion against open_clip, the Frechet
distance against a float64 reference, the success rate on known answers, and the user errors."""
import importlib
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, assert_clean_error, run_script, seeded

import evaluate as E
import shapes

TEXTS = ['a red circle', 'a blue square', 'a green triangle', 'a yellow circle', 'red', 'a square', 'circle',
         'a cyan shape']


def tiny_clip_config(vocab, projection=16):
    """A CLIPConfig shaped like OpenCLIP's ViT-H/14 (GELU, pre-norm, class token) at toy size."""
    from transformers import CLIPConfig
    ids = shapes.build_vocab()[0]
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=8, hidden_act='gelu', bos_token_id=ids['<|startoftext|>'],
                eos_token_id=ids['<|endoftext|>'], pad_token_id=ids['<|endoftext|>'])
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act='gelu')
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


@pytest.fixture(scope='module')
def world_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp('world_text')
    tokenizer, _ = shapes.make_text_encoder(str(folder), hidden_size=32)
    return tokenizer


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory, world_tokenizer):
    """A random transformers CLIPModel folder with the shapes world's tokenizer."""
    from transformers import CLIPModel
    folder = tmp_path_factory.mktemp('clip')
    model = seeded(0, CLIPModel, tiny_clip_config(len(world_tokenizer)))
    model.save_pretrained(folder)
    world_tokenizer.save_pretrained(folder)
    return folder


def random_images(n, seed=0, size=32):
    return seeded(seed, lambda: torch.rand(n, 3, size, size) * 2 - 1)


def transformers_logits(folder, images, texts):
    """logits_per_image / logit_scale, i.e. cos(image i, text j), by transformers' own forward."""
    from transformers import AutoTokenizer, CLIPModel
    model, tok = CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    mean, std = torch.tensor(E.OPENAI_MEAN)[:, None, None], torch.tensor(E.OPENAI_STD)[:, None, None]
    pixels = ((images + 1) / 2 - mean) / std  # 32 x 32: the model's size, nothing to resize
    ids = tok(texts, padding='max_length', max_length=8, return_tensors='pt')
    with torch.no_grad():
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels)
    return out.logits_per_image / model.logit_scale.exp()


def test_clip_score_equals_transformers(tiny_clip):
    images = random_images(len(TEXTS))
    cos = transformers_logits(tiny_clip, images, TEXTS).diagonal()
    assert (cos < 0).any() and (cos > 0).any()  # so the max(cos, 0) is exercised both ways
    ours = E.clip_score(E.Clip(tiny_clip), images, TEXTS)
    torch.testing.assert_close(ours, 100 * cos.clamp(min=0), atol=1e-4, rtol=0)


def test_zero_shot_is_transformers_argmax(tiny_clip):
    images = random_images(16, seed=1)
    texts = [f'a {c} circle' for c in shapes.COLOURS]
    want = transformers_logits(tiny_clip, images, texts).argmax(-1)
    got = E.zero_shot(E.Clip(tiny_clip), images, texts)
    assert len(set(want.tolist())) > 1
    assert torch.equal(got, want)


def test_success_rate_on_known_answers():
    """A stub classifier whose answers are set: success is the share not put in the negative class."""
    pair = E.Pair('a photo of a pet', 'cat', {'dog': 'a dog', 'cat': 'a cat', 'bird': 'a bird'})
    answers = torch.tensor([1, 0, 2, 1, 0, 0, 2, 1, 1, 0])  # 4 of 10 are 'cat' (index 1)
    seen = []

    def classify(images, texts):
        seen.append(texts)
        return answers[:len(images)]
    assert E.success_rate(classify, torch.zeros(10, 3, 4, 4), pair) == pytest.approx(0.6)
    assert seen == [['a dog', 'a cat', 'a bird']]
    assert E.success_rate(classify, torch.zeros(3, 3, 4, 4), pair) == pytest.approx(2 / 3)


def test_shapes_pairs_name_the_world():
    pairs = E.read_pairs('shapes')
    assert [(p.prompt, p.negative) for p in pairs] == list(shapes.NEGATIVE_PAIRS)
    assert pairs[0].classes['red'] == 'a red circle' and len(pairs[0].classes) == len(shapes.COLOURS)
    assert pairs[2].classes == {'circle': 'a red circle', 'square': 'a red square', 'triangle': 'a red triangle'}


def test_frechet_distance_against_float64_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(0.3, 1.2, size=(200, 6)) @ rng.normal(size=(6, 6))
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((A B)^1/2) as the sum of the square roots of A B's eigenvalues (real and >= 0 for PSD A, B)
    cross = np.sqrt(np.linalg.eigvals(ca @ cb).real.clip(min=0)).sum()
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross
    assert want > 1
    assert E.frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    assert E.frechet_distance(torch.tensor(a, dtype=torch.float32).numpy(), b) == pytest.approx(want, rel=1e-5)
    assert abs(E.frechet_distance(a, a)) < 1e-9


def test_preprocess_resizes_and_crops():
    """The shorter side to `size`, a centre crop; HPSv2's variant pads the longer side's rest with 0."""
    x = torch.full((1, 3, 40, 80), 1.0)
    x[..., 20:, :] = -1.0  # top half white, bottom half black
    crop = E.Preprocess(size=20, crop=20, mean=(0, 0, 0), std=(1, 1, 1))(x)
    assert crop.shape == (1, 3, 20, 20)
    assert crop[..., :9, :].min() > 0.99 and crop[..., 11:, :].max() < 0.01
    pad = E.Preprocess(size=20, crop=20, mean=(0, 0, 0), std=(1, 1, 1), pad=True)(x)
    assert pad.shape == (1, 3, 20, 20)
    assert pad[..., :5, :].abs().max() == 0 and pad[..., 15:, :].abs().max() == 0  # the padding rows
    assert pad[..., 5:9, :].min() > 0.99


def test_generator_noise_per_seed_not_per_batch():
    """An image depends on its prompt and seed only: the batch it is drawn in changes nothing, and
    every prompt gets the same noise for a seed."""
    import sample
    pipe = sample.load(ROOT / 'checkpoints' / 'shapes_student')
    prompts = ['a red circle', 'a blue square', 'a green triangle']
    a = E.Generator(pipe, [3, 7], batch_size=1)(prompts)
    b = E.Generator(pipe, [3, 7], batch_size=4)(prompts)
    assert a.shape == (6, 3, 32, 32)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # batched convolutions round differently
    assert not torch.allclose(a[0], a[1])  # two seeds, two images
    g = E.Generator(pipe, [3], batch_size=1)
    torch.testing.assert_close(g.noise[3], E.Generator(pipe, [3], batch_size=8).noise[3])

# -----------------------------------------------------------------------------
# HPSv2: the OpenCLIP checkpoint converted, against open_clip's own forward


def open_clip_model():
    """open_clip.model. `import open_clip` runs the package's __init__, whose image transforms import
    torchvision; PyPI's torchvision wheels are built against CUDA torch and do not load beside a
    CPU-only torch build (and, installed, break transformers' imports). Without torchvision the
    package is entered without its __init__, with a stand-in for the one name its utils import from
    torchvision (FrozenBatchNorm2d, used only to freeze ResNet towers), removed again after."""
    if importlib.util.find_spec('torchvision') is not None:
        import open_clip
        return open_clip.model
    from transformers.utils import import_utils
    import_utils.is_torchvision_available()  # cached as False before the stand-in exists
    stand_ins = {name: types.ModuleType(name) for name in ('torchvision', 'torchvision.ops', 'torchvision.ops.misc')}
    stand_ins['torchvision.ops.misc'].FrozenBatchNorm2d = torch.nn.BatchNorm2d
    if 'open_clip' not in sys.modules:
        package = types.ModuleType('open_clip')
        package.__path__ = list(importlib.util.find_spec('open_clip').submodule_search_locations)
        sys.modules['open_clip'] = package
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module('open_clip.model')
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


def test_hpsv2_conversion_matches_open_clip(tmp_path, world_tokenizer):
    oc = open_clip_model()
    vocab = len(world_tokenizer)
    model = seeded(0, oc.CLIP, 16, oc.CLIPVisionCfg(layers=2, width=32, head_width=8, patch_size=8, image_size=32),
                   oc.CLIPTextCfg(context_length=8, vocab_size=vocab, width=32, heads=4, layers=2))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # LayerNorms off 1 and 0, every tensor off its init
        torch.manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'HPS_v2_tiny.pt')  # as HPSv2 ships its weights
    base = tmp_path / 'base'
    from transformers import CLIPModel
    seeded(2, CLIPModel, tiny_clip_config(vocab)).save_pretrained(base)  # the config and tokenizer donor
    world_tokenizer.save_pretrained(base)
    E.main(['--convert-hpsv2', str(tmp_path / 'HPS_v2_tiny.pt'), '--hpsv2-base', str(base),
            '--hpsv2', str(tmp_path / 'hps')])
    hps = E.Clip(tmp_path / 'hps', '--hpsv2', pad=True)
    images = random_images(4, seed=3)
    ids = world_tokenizer(TEXTS[:4], padding='max_length', max_length=8, return_tensors='pt').input_ids
    with torch.no_grad():
        want_image = model.encode_image(hps.preprocess(images), normalize=True)
        want_text = model.encode_text(ids, normalize=True)
    err_image = (hps.image_embeds(images) - want_image).abs().max().item()
    err_text = (hps.text_embeds(TEXTS[:4]) - want_text).abs().max().item()
    print(f"HPSv2 conversion vs open_clip: max |diff| image {err_image:.2e}, text {err_text:.2e}")
    assert err_image < 1e-4 and err_text < 1e-4
    want = 100 * (want_image * want_text).sum(-1)
    torch.testing.assert_close(E.hps_score(hps, images, TEXTS[:4]), want, atol=1e-3, rtol=0)
    assert (want_image - hps.image_embeds(random_images(4, seed=4))).abs().max() > 0.01  # the check can fail


def test_hpsv2_conversion_refuses_a_text_only_openclip(tmp_path, tiny_clip, capsys):
    save_file({'transformer.resblocks.0.attn.in_proj_weight': torch.zeros(96, 32)}, str(tmp_path / 'text.safetensors'))
    with pytest.raises(SystemExit) as e:
        E.main(['--convert-hpsv2', str(tmp_path / 'text.safetensors'), '--hpsv2-base', str(tiny_clip),
                '--hpsv2', str(tmp_path / 'out')])
    msg = capsys.readouterr().err.rstrip('\n')
    assert e.value.code == 2
    assert msg.startswith('evaluate.py: error: ') and 'not an HPSv2 checkpoint' in msg and '\n' not in msg
    assert 'OpenCLIP text encoder' in msg

# -----------------------------------------------------------------------------
# The command line


def test_cli_end_to_end(tmp_path, tiny_clip):
    """The shapes student scored with a tiny CLIP: every section present, values in range, the
    kept images and the JSON line written."""
    (tmp_path / 'p.txt').write_text('circles\ta red circle\ncircles\ta blue circle\nsquares\ta green square\n')
    ref = tmp_path / 'ref'
    ref.mkdir()
    from PIL import Image
    for i, im in enumerate(shapes.sample_world(8, seed=0)[0]):
        Image.fromarray(im).save(ref / f'{i}.png')
    proc = run_script('evaluate.py', '--clip', tiny_clip, '--fd-model', tiny_clip, '--fd-reference', ref,
                      '--prompt-file', tmp_path / 'p.txt', '--pairs', 'shapes', '--seeds', '0,1,2',
                      '--pair-images', '4',
                      '--keep-images', tmp_path / 'kept', '--json', tmp_path / 'out.jsonl', timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == json.loads((tmp_path / 'out.jsonl').read_text())
    assert res['images'] == 9 and set(res['clip_score']) == {'circles', 'squares', 'all'}
    assert 0 <= res['clip_score']['all'] <= 100 and res['fd'] > 0 and res['fd_images'] == [9, 8]
    assert [r['negative'] for r in res['pairs']] == [n for _, n in shapes.NEGATIVE_PAIRS]
    for r in res['pairs']:
        assert 0 <= r['success_without'] <= 1 and 0 <= r['success_with'] <= 1
        assert r['success_without'] * 4 % 1 == 0 and r['success_with'] * 4 % 1 == 0  # 4 images a pair
    assert len(list((tmp_path / 'kept' / 'pair-red-with').glob('*.png'))) == 4
    assert len(list((tmp_path / 'kept' / 'prompts-circles').glob('*.png'))) == 6
    assert 'CLIP+ NASA' in proc.stdout and 'Frechet distance' in proc.stdout


def test_cli_errors_are_one_line(tmp_path, tiny_clip, capsys):
    empty = tmp_path / 'empty.txt'
    empty.write_text('\n  \n')
    dino = tmp_path / 'dino'
    dino.mkdir()
    (dino / 'config.json').write_text(json.dumps({'model_type': 'dinov2'}))
    cases = [(['--clip', tmp_path / 'nowhere'], 'no such folder'),
             (['--clip', tiny_clip, '--prompt-file', empty], 'holds no prompts'),
             (['--clip', dino], "holds a 'dinov2' model, not clip"),
             (['--clip', tiny_clip, '--checkpoint', tiny_clip], 'not a checkpoint folder')]
    for args, what in cases:
        with pytest.raises(SystemExit) as e:
            E.main(list(map(str, args)))
        msg = capsys.readouterr().err.rstrip('\n')
        assert e.value.code == 2
        assert msg.startswith('evaluate.py: error: ') and what in msg and '\n' not in msg, msg
        assert '(' in msg  # how to fix it
    proc = run_script('evaluate.py', '--clip', tiny_clip, '--prompt-file', empty)
    assert 'holds no prompts' in assert_clean_error(proc, 'evaluate.py: error: ')
