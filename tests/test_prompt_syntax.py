"""A1111's prompt attention syntax against worked cases, and prompts cut into weighted 75-token chunks."""

from __future__ import annotations

import numpy as np
import pytest

from sdonnx.export.tiny.vocab import write_tokenizer
from sdonnx.prompt_chunks import chunk, pad_chunks
from sdonnx.prompt_syntax import BREAK, Fragment, parse
from sdonnx.tokenizer import CLIPTokenizer

from tiny_sd import VOCAB_MERGES, WORDS

B = "BREAK"
# (prompt, [(text, weight) or B]): worked out by hand from the rules in prompt_syntax.py's docstring
CASES = [
    ("a red fox", [("a red fox", 1.0)]),
    ("(red)", [("red", 1.1)]),
    ("((red))", [("red", 1.1 * 1.1)]),
    ("(((red)))", [("red", 1.1 ** 3)]),
    ("[red]", [("red", 1 / 1.1)]),
    ("[[red]]", [("red", 1 / 1.1 / 1.1)]),
    ("(red:1.3)", [("red", 1.3)]),
    ("(red: 0.5 )", [("red", 0.5)]),
    ("(red:-1)", [("red", -1.0)]),
    ("((red:1.5))", [("red", 1.5 * 1.1)]),
    ("([red])", [("red", 1.1 / 1.1)]),
    ("a (red:1.3) fox, ((masterpiece)), [blurry]",
     [("a ", 1.0), ("red", 1.3), (" fox, ", 1.0), ("masterpiece", 1.21), (", ", 1.0), ("blurry", 1 / 1.1)]),
    ("(a (b) c)", [("a ", 1.1), ("b", 1.21), (" c", 1.1)]),
    ("(a [b] c:2)", [("a ", 2.0), ("b", 2 / 1.1), (" c", 2.0)]),
    (r"\(red\)", [("(red)", 1.0)]),
    (r"\[red\]", [("[red]", 1.0)]),
    (r"(\(red\))", [("(red)", 1.1)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"a \ b", [("a  b", 1.0)]),  # a lone backslash is dropped
    ("(red", [("red", 1.1)]),  # unclosed: to the end
    ("a (red fox", [("a ", 1.0), ("red fox", 1.1)]),
    ("a [red (fox", [("a ", 1.0), ("red ", 1 / 1.1), ("fox", 1.0)]),
    ("red)", [("red)", 1.0)]),  # a closing bracket without an opening one is text
    ("red]", [("red]", 1.0)]),
    ("(red]", [("red]", 1.1)]),
    ("a:b", [("a:b", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("red:1.2)", [("red:1.2)", 1.0)]),  # a weight without an open bracket is text
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("(red:1)", [("red", 1.0)]),
    ("a (red:1.0) fox", [("a red fox", 1.0)]),  # weight-1 text joins its neighbours
    ("a BREAK b", [("a", 1.0), B, ("b", 1.0)]),
    ("a BREAK", [("a", 1.0), B]),
    ("BREAK b", [B, ("b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),  # only the upper-case word
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), B, ("b", 1.1)]),
]


@pytest.mark.parametrize("prompt, expected", CASES)
def test_parse_worked_cases(prompt, expected):
    got = parse(prompt)
    assert len(got) == len(expected), got
    for frag, want in zip(got, expected):
        if want == B:
            assert frag is BREAK
        else:
            assert frag.text == want[0] and frag.weight == pytest.approx(want[1], rel=1e-12), (frag, want)


def test_syntax_none_is_literal():
    assert parse("a (red:1.3) BREAK [b]", "none") == [Fragment("a (red:1.3) BREAK [b]")]
    with pytest.raises(ValueError, match="unknown prompt syntax"):
        parse("a", "comfy")


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1-pad", "sd2-pad"])
def tok(request, tmp_path_factory) -> CLIPTokenizer:
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder, WORDS, VOCAB_MERGES, pad_token=request.param)
    return CLIPTokenizer.from_dir(folder)


def test_short_prompt_is_the_plain_tokenizer_row(tok):
    for prompt in ("", "a red circle on a blue background", " ".join(["red"] * 75)):
        c = chunk(parse(prompt), tok)
        assert len(c) == 1 and c.plain
        np.testing.assert_array_equal(c.ids, tok([prompt]))


def test_long_prompt_chunks(tok):
    words = ["red"] * 75 + ["blue"] * 80  # one token each
    c = chunk(parse(" ".join(words)), tok)
    red, blue = tok.encode("red")[0], tok.encode("blue")[0]
    assert c.ids.shape == (3, 77) and c.weights.shape == (3, 77)
    assert (c.ids[:, 0] == tok.bos_id).all()
    np.testing.assert_array_equal(c.ids[0, 1:76], [red] * 75)
    np.testing.assert_array_equal(c.ids[1, 1:76], [blue] * 75)
    np.testing.assert_array_equal(c.ids[2, :7], [tok.bos_id] + [blue] * 5 + [tok.eos_id])
    assert (c.ids[:2, 76] == tok.eos_id).all() and (c.ids[2, 7:] == tok.pad_id).all()


def test_weights_follow_their_tokens(tok):
    c = chunk(parse("a (red circle:1.5) [blue]"), tok)
    n = [len(tok.encode(w)) for w in ("a", "red", "circle", "blue")]
    want = [1.0] + [1.0] * n[0] + [1.5] * (n[1] + n[2]) + [1 / 1.1] * n[3] + [1.0]
    np.testing.assert_allclose(c.weights[0, :len(want)], want, rtol=1e-6)
    assert (c.weights[0, len(want):] == 1).all() and not c.plain


def test_break_starts_a_new_chunk(tok):
    c = chunk(parse("red BREAK blue BREAK"), tok)
    assert len(c) == 2
    np.testing.assert_array_equal(c.ids[0], tok(["red"])[0])
    np.testing.assert_array_equal(c.ids[1], tok(["blue"])[0])
    assert len(chunk(parse("BREAK red"), tok)) == 2  # an empty first chunk, as A1111


def test_chunk_ends_at_a_comma_near_its_end(tok):
    comma = tok.encode(",")[0]
    words = ["red"] * 70 + [","] + ["blue"] * 10
    c = chunk(parse(" ".join(words)), tok)
    # the chunk would fill 4 tokens after the comma: it ends at the comma, the blues move on whole
    np.testing.assert_array_equal(c.ids[0, 1:73], [tok.encode("red")[0]] * 70 + [comma, tok.eos_id])
    np.testing.assert_array_equal(c.ids[1, 1:12], [tok.encode("blue")[0]] * 10 + [tok.eos_id])
    far = ["red"] * 40 + [","] + ["blue"] * 40  # the comma is too far back: cut at 75 tokens
    c = chunk(parse(" ".join(far)), tok)
    assert c.ids[0, 76] == tok.eos_id and c.ids[0, 75] == tok.encode("blue")[0]
    assert c.ids[1, 1:7].tolist() == [tok.encode("blue")[0]] * 6


def test_negative_prompt_padded_with_empty_chunks(tok):
    short = chunk(parse("blue"), tok)
    padded = pad_chunks(short, 3, tok)
    assert len(padded) == 3
    np.testing.assert_array_equal(padded.ids[0], short.ids[0])
    np.testing.assert_array_equal(padded.ids[1:], np.repeat(tok([""]), 2, axis=0))
    assert pad_chunks(short, 1, tok) is short
