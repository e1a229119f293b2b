"""Tests of the shapes world (shapes.py) against SHAPES.md."""
import math
import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import shapes  # noqa: E402
from shapes import COLOURS, IMAGE_SIZE, SHAPES, classify, parse_prompt, render  # noqa: E402


def draw(rng, shape, colour):
    """A real-looking image of the given shape and colour at a random size and position."""
    size = int(rng.integers(10, 19))
    x0, y0 = rng.integers(0, IMAGE_SIZE - size + 1, size=2)
    return render(shape, colour, size, x0 + size / 2, y0 + size / 2)


def ideal_generator(prompts, negative_prompts, nasa_scale, seed):
    """Draws what the prompt names; unnamed attributes avoid the negative prompt when NASA is on."""
    rng = np.random.default_rng(seed)
    images = []
    for i, prompt in enumerate(prompts):
        colour, shape = parse_prompt(prompt)
        avoid = (None, None)
        if negative_prompts is not None and nasa_scale > 0:
            avoid = parse_prompt(negative_prompts[i])
        colours = [colour] if colour else [c for c in COLOURS if c != avoid[0]]
        shape_names = [shape] if shape else [s for s in SHAPES if s != avoid[1]]
        images.append(draw(rng, shape_names[rng.integers(len(shape_names))],
                           colours[rng.integers(len(colours))]))
    return np.stack(images)


def red_circle_generator(prompts, negative_prompts, nasa_scale, seed):
    """Ignores its prompts and always draws a red circle."""
    rng = np.random.default_rng(seed)
    return np.stack([draw(rng, "circle", "red") for _ in prompts])


# -----------------------------------------------------------------------------
# The world


def test_sample_world_is_deterministic_from_the_seed():
    images_a, captions_a = shapes.sample_world(64, seed=3)
    images_b, captions_b = shapes.sample_world(64, seed=3)
    images_c, _ = shapes.sample_world(64, seed=4)
    assert images_a.dtype == np.uint8 and images_a.shape == (64, 32, 32, 3)
    assert np.array_equal(images_a, images_b) and captions_a == captions_b
    assert not np.array_equal(images_a, images_c)


def test_caption_mix_and_captions_describe_the_scene():
    scenes = shapes.sample_scenes(4000, seed=0)
    kinds = Counter()
    for s in scenes:
        expected = {f"a {s.colour} {s.shape}": "both", f"a {s.shape}": "shape",
                    f"a {s.colour} shape": "colour", "": "null"}
        assert s.caption in expected, s
        kinds[expected[s.caption]] += 1
    for kind, share in (("both", 0.7), ("shape", 0.1), ("colour", 0.1), ("null", 0.1)):
        assert abs(kinds[kind] / len(scenes) - share) < 0.02, kinds
    # Shapes and colours are uniform.
    for counts in (Counter(s.shape for s in scenes), Counter(s.colour for s in scenes)):
        assert all(abs(c / len(scenes) - 1 / len(counts)) < 0.03 for c in counts.values())


def test_real_images_pass_the_checks():
    scenes = shapes.sample_scenes(512, seed=1)
    images, _ = shapes.sample_world(512, seed=1)
    correct = [classify(im) == (True, s.colour, s.shape) for s, im in zip(scenes, images)]
    assert np.mean(correct) >= 0.99
    # The rasterisation is chosen so that every size and colour classifies right, not just most.
    for shape in SHAPES:
        for colour in COLOURS:
            for size in range(10, 19):
                for x0, y0 in ((0, 0), (32 - size, 32 - size), (3, 7)):
                    image = render(shape, colour, size, x0 + size / 2, y0 + size / 2)
                    assert classify(image) == (True, colour, shape), (shape, colour, size)


def test_shapes_are_inside_the_image_at_their_size():
    scenes = shapes.sample_scenes(512, seed=2)
    images, _ = shapes.sample_world(512, seed=2)
    sizes = Counter(s.size for s in scenes)
    assert set(sizes) == set(range(10, 19))
    for s, image in zip(scenes, images):
        assert s.cx - s.size / 2 >= 0 and s.cx + s.size / 2 <= IMAGE_SIZE
        assert s.cy - s.size / 2 >= 0 and s.cy + s.size / 2 <= IMAGE_SIZE
        # An unclipped shape fills a size x size box (base = height for triangles).
        ys, xs = np.nonzero(image.max(axis=-1) > 0)
        assert xs.max() - xs.min() + 1 == s.size and ys.max() - ys.min() + 1 == s.size
        assert (xs.min() + xs.max() + 1) / 2 == s.cx and (ys.min() + ys.max() + 1) / 2 == s.cy


def test_every_colour_is_exact_on_a_black_background():
    scenes = shapes.sample_scenes(256, seed=5)
    images, _ = shapes.sample_world(256, seed=5)
    for s, image in zip(scenes, images):
        pixels = {tuple(p) for p in image.reshape(-1, 3)}
        assert pixels == {(0, 0, 0), COLOURS[s.colour]}
    assert list(COLOURS) == ["red", "green", "blue", "yellow", "magenta", "cyan"]
    assert COLOURS["green"] == (0, 200, 0)


def test_triangle_is_upright():
    image = render("triangle", "red", 12, 16, 16).max(axis=-1) > 0
    widths = image.sum(axis=1)[image.any(axis=1)]
    assert np.all(np.diff(widths) >= 0) and widths[-1] == 12  # widens downwards to the base


def test_prompts():
    prompts = shapes.all_prompts()
    assert len(prompts) == 18 == len(set(prompts))
    assert "a magenta triangle" in prompts
    assert parse_prompt("a red circle") == ("red", "circle")
    assert parse_prompt("a square") == (None, "square")
    assert parse_prompt("a cyan shape") == ("cyan", None)
    assert parse_prompt("red") == ("red", None) and parse_prompt("") == (None, None)


# -----------------------------------------------------------------------------
# Checks


def test_classify_follows_the_thresholds():
    empty = np.zeros((32, 32, 3), np.uint8)
    assert classify(empty) == (False, None, None)
    dim = empty.copy()
    dim[5:20, 5:20] = (100, 100, 100)  # not above 100: background
    assert classify(dim) == (False, None, None)
    big = empty.copy()
    big[0:21, 0:20] = (250, 10, 5)  # 420 pixels: too many to be one shape
    assert classify(big) == (False, "red", "square")
    tiny = render("circle", "blue", 6, 10, 10)  # under 40 pixels
    assert classify(tiny)[0] is False
    noisy = render("square", "yellow", 12, 16, 16)
    noisy[10, 10] = (0, 0, 255)  # one odd pixel does not move the median
    assert classify(noisy) == (True, "yellow", "square")


def test_prompt_accuracy():
    images = np.stack([render("circle", "red", 12, 16, 16), render("square", "red", 12, 16, 16),
                       np.zeros((32, 32, 3), np.uint8), render("triangle", "cyan", 14, 16, 16)])
    prompts = ["a red circle", "a red circle", "a red circle", "a triangle"]
    assert shapes.prompt_accuracy(images, prompts) == 0.5


def test_negative_success_on_hand_built_images():
    images = np.stack([render("circle", "red", 12, 16, 16)] * 3
                      + [render("circle", "blue", 12, 16, 16)]
                      + [render("square", "red", 12, 16, 16)] * 2
                      + [render("circle", "red", 6, 16, 16)]  # too small to be present
                      + [np.zeros((32, 32, 3), np.uint8)])
    # Circles present: 3 red, 1 blue.
    assert shapes.negative_success(images, "a circle", "red") == (0.25, 4 / 8)
    # Red shapes present: 3 circles, 2 squares.
    assert shapes.negative_success(images, "a red shape", "circle") == (0.4, 5 / 8)
    success, accuracy = shapes.negative_success(images, "a triangle", "red")
    assert math.isnan(success) and accuracy == 0.0


def test_features():
    image = render("triangle", "magenta", 10, 8, 20)
    f = shapes.features(np.stack([image, np.zeros_like(image)]))
    assert f.shape == (2, 12)
    expected = np.zeros(12)
    expected[4] = expected[6 + 2] = 1
    expected[9:] = (8 / 32, 20 / 32, 10 / 32)
    assert np.allclose(f[0], expected) and np.all(f[1] == 0)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    b = rng.normal(size=(400, 4)) * 2 + 1
    assert abs(shapes.frechet_distance(a, a)) < 1e-6
    # Independent reference: tr sqrt(A B) from the (real, positive) eigenvalues of A B.
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real).sum()
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b) - 2 * cross
    assert shapes.frechet_distance(a, b) == pytest.approx(reference, rel=1e-4)
    real = shapes.features(shapes.sample_world(300, 0)[0])
    other_real = shapes.features(shapes.sample_world(300, 1)[0])
    red = shapes.features(red_circle_generator([""] * 300, None, 0.0, 0))
    assert shapes.frechet_distance(red, real) > 10 * shapes.frechet_distance(other_real, real) > 0


# -----------------------------------------------------------------------------
# Evaluation


def test_evaluate_ideal_generator():
    calls = []

    def spy(prompts, negative_prompts, nasa_scale, seed):
        calls.append((list(prompts), negative_prompts, nasa_scale))
        return ideal_generator(prompts, negative_prompts, nasa_scale, seed)

    results = shapes.evaluate(ideal_generator, spy, n=144, seed=0, nasa_scale=2.0)
    assert results["teacher"]["accuracy"] == results["student"]["accuracy"] == 1.0
    assert results["student"]["fd"] < 3 * results["real_fd"] + 0.05
    for row in results["negative"]:
        assert row["success_with"] == 1.0 and row["accuracy_with"] == 1.0
        assert row["accuracy_without"] == 1.0
        # Without NASA a random colour (shape) hits the negative 1/6 (1/3) of the time.
        chance = 5 / 6 if parse_prompt(row["negative"])[0] else 2 / 3
        assert abs(row["success_without"] - chance) < 0.2 and row["success_without"] < 1.0
    # Accuracy uses 144 // 18 = 8 images of each full prompt, without negatives.
    accuracy_call = next(c for c in calls if len(c[0]) == 144 and c[0][0] == "a red circle")
    assert Counter(accuracy_call[0]) == {p: 8 for p in shapes.all_prompts()}
    negative_calls = [c for c in calls if c[1] is not None]
    assert len(negative_calls) == 4 and all(c[2] == 2.0 and len(c[0]) == 36 for c in negative_calls)
    assert [(c[0][0], c[1][0]) for c in negative_calls] == list(shapes.NEGATIVE_PAIRS)


def test_evaluate_red_circle_generator():
    results = shapes.evaluate(None, red_circle_generator, n=144, seed=0)
    assert results["teacher"] is None
    assert results["student"]["accuracy"] == pytest.approx(1 / 18)
    assert results["student"]["fd"] > 10 * results["real_fd"]
    rows = {(r["prompt"], r["negative"]): r for r in results["negative"]}
    for pair in (("a circle", "red"), ("a red shape", "circle")):
        assert rows[pair]["success_with"] == rows[pair]["success_without"] == 0.0
        assert rows[pair]["accuracy_with"] == 1.0
    for pair in (("a square", "blue"), ("a blue shape", "square")):
        assert math.isnan(rows[pair]["success_with"]) and rows[pair]["accuracy_with"] == 0.0
    report = shapes.format_report(results)
    assert "| student | 0.056 |" in report and "| teacher | n/a | n/a |" in report
    assert "| a square | blue | n/a | n/a | 0.000 | 0.000 |" in report


# -----------------------------------------------------------------------------
# Text encoder and tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_ckpt")
    shapes.main(["make-text-encoder", str(out)])
    return out


def test_format_curves_groups_seeds_into_mean_and_deviation():
    curves = {"runs/exp/none-s0": [(25, 1.0, 0.5), (50, 2.0, 0.25)],
              "runs/exp/none-s1": [(25, 3.0, 0.75), (50, 4.0, 0.25)],
              "runs/exp/lora-s0": [(25, 0.5, 1.0)]}
    text = shapes.format_curves(curves)
    fd, acc = text.split("prompt accuracy:")
    assert "| step | none (2 runs) | lora (1 run) |" in fd
    assert "| 25 | 2.000 +- 1.000 | 0.500 |" in fd
    assert "| 50 | 3.000 +- 1.000 | n/a |" in fd
    assert "| 25 | 0.625 +- 0.125 | 1.000 |" in acc
    assert "| 50 | 0.250 +- 0.000 | n/a |" in acc


def test_tokenizer_gives_one_token_per_word(checkpoint):
    from transformers import AutoTokenizer, CLIPTokenizer
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (checkpoint / "tokenizer" / name).exists()
    tokenizer = CLIPTokenizer.from_pretrained(checkpoint / "tokenizer")
    auto = AutoTokenizer.from_pretrained(checkpoint / "tokenizer")
    assert tokenizer.model_max_length == 8
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    word_ids = {w: tokenizer(w).input_ids for w in shapes.world_words()}
    assert all(len(ids) == 3 and ids[0] == bos and ids[2] == eos for ids in word_ids.values())
    assert len({ids[1] for ids in word_ids.values()}) == len(word_ids)  # distinct tokens
    ids = tokenizer("a red circle", padding="max_length", max_length=8).input_ids
    assert ids == [bos, word_ids["a"][1], word_ids["red"][1], word_ids["circle"][1]] + [eos] * 4
    assert auto("a red circle", padding="max_length", max_length=8).input_ids == ids
    assert tokenizer.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "red</w>", "circle</w>"]
    # Unknown words and characters split or map to the unknown token instead of failing.
    odd = tokenizer("A Purple zebra, 42!", padding="max_length", max_length=8, truncation=True)
    assert len(odd.input_ids) == 8 and odd.input_ids[0] == bos and odd.input_ids[-1] == eos


def test_text_encoder_round_trip(checkpoint, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer
    assert (checkpoint / "text_encoder" / "model.safetensors").exists()
    tokenizer = CLIPTokenizer.from_pretrained(checkpoint / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
    assert encoder.config.max_position_embeddings == 8
    prompts = shapes.all_prompts() + ["a circle", "a red shape", ""]
    embeddings = shapes.encode_prompts(tokenizer, encoder, prompts)
    assert embeddings.shape == (len(prompts), 8, encoder.config.hidden_size)
    pooled = embeddings.mean(dim=1)
    assert torch.cdist(pooled, pooled).add(torch.eye(len(prompts))).min() > 1e-3  # all differ
    # Same seed, same weights; the written files hold exactly the model that was built.
    _, model = shapes.make_text_encoder(tmp_path, seed=0)
    for (name, p), q in zip(model.state_dict().items(), encoder.state_dict().values()):
        assert torch.equal(p, q), name
    assert torch.equal(shapes.encode_prompts(tokenizer, model, prompts), embeddings)


def test_show_writes_a_grid(tmp_path):
    from PIL import Image
    shapes.main(["show", str(tmp_path / "grid.png")])
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == ((8 * 33 - 1) * 4, (8 * 33 - 1) * 4, 3)  # 32 px cells, 1 px lines
    first, _ = shapes.sample_world(1, seed=0)
    assert np.array_equal(grid[:128:4, :128:4], first[0])
