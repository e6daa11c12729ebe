"""The tiny model's caption language and its evaluator."""

import numpy as np
from PIL import Image, ImageFilter

from sdonnx.export.tiny.shapes import COLORS, Scene, batch, judge, parse_caption, random_scene, render, score


def test_captions_round_trip_and_read_naturally():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(300)]
    assert all(parse_caption(s.caption()) == s for s in scenes)
    assert Scene("circle", "orange", "blue", "small", "top left").caption() == \
        "a small orange circle in the top left on a blue background"
    assert Scene("square", "red", "orange").caption() == "a red square on an orange background"


def test_judge_reads_rendered_scenes():
    rng = np.random.default_rng(1)
    scenes = [random_scene(rng) for _ in range(300)]
    acc = score(scenes, [render(s) for s in scenes])
    assert acc == {"background": 100.0, "color": 100.0, "shape": 100.0, "position": 100.0}


def test_judge_survives_blur_and_noise():
    rng = np.random.default_rng(2)
    scenes = [random_scene(rng) for _ in range(100)]
    noisy = []
    for s in scenes:
        img = render(s).filter(ImageFilter.GaussianBlur(1.0))
        pix = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (64, 64, 3))
        noisy.append(Image.fromarray(np.clip(pix, 0, 255).astype(np.uint8)))
    acc = score(scenes, noisy)
    assert min(acc.values()) >= 95.0, acc


def test_judge_flags_wrong_answers():
    img = render(Scene("circle", "red", "blue"))
    j = judge(img)
    assert (j.shape, j.color, j.background, j.position) == ("circle", "red", "blue", "center")
    blank = Image.new("RGB", (64, 64), COLORS["green"])
    assert judge(blank).shape is None
    assert score([Scene("square", "red", "blue")], [img])["shape"] == 0.0


def test_batch_is_deterministic_and_scaled():
    a, ca = batch(np.random.default_rng(3), 4)
    b, cb = batch(np.random.default_rng(3), 4)
    assert ca == cb and np.array_equal(a, b)
    assert a.shape == (4, 3, 64, 64) and a.min() >= -1.0 and a.max() <= 1.0
