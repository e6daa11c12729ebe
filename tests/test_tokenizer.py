"""sdonnx.tokenizer.CLIPTokenizer against transformers' slow CLIPTokenizer on a generated corpus."""

from __future__ import annotations

import json
import random
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest

from sdonnx.export.tiny.vocab import write_tokenizer
from sdonnx.tokenizer import CLIPTokenizer, TokenizerError, byte_to_unicode, clean_text, split_words

from tiny_sd import VOCAB_MERGES, WORDS

REAL_BPE = Path(__file__).resolve().parents[1] / "export" / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
PIECES = {
    "words": list(WORDS) + ["Astronaut", "PHOTOREALISTIC", "Hello", "don't", "it's", "we'll", "they're",
                            "I'm", "you've", "he'd", "CAN'T", "masterpiece", "ultra-detailed", "x"],
    "punct": [",", ".", "!", "!!!", "?", "(masterpiece:1.2)", "[", "]", "{cat|dog}", "--", "...", "'", '"',
              "#hashtag", "@user", "a/b", "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "'s", "..'s",
              "¡", "¿", "—", "«»", "™", "©", "°", "$5", "100%", "&", "~", "^_^", "`"],
    "numbers": ["1", "42", "3.14", "1,000,000", "2024-01-01", "8k", "4K", "½", "²", "٣", "Ⅻ", "1st", "0x1F"],
    "accents": ["café", "naïve", "Crème brûlée", "São Paulo", "Ångström", "ﬁne", "e\u0301", "İstanbul",
                "Straße", "ΑΘΗΝΑ", "Москва", "Ärger", "ÉCOLE", "ŁÓDŹ", "résumé", "Ǆ", "ᾳ", "a\u0345b"],
    "cjk": ["日本", "中文字", "한국어", "ひらがな", "カタカナ", "漢字テスト", "𠀋", "龍"],
    "emoji": ["🐱", "👍🏽", "🐱\u200d👤", "🇯🇵", "❤️", "✨", "🎨🖌️", "☕"],
    "space": ["\t", "\n", "\u00a0", "   ", "\r\n", "\u2003", "\u200b", "\u3000", "\u2028", "\x0b", "\x0c"],
    "odd": ["\x00", "\ufffd", "ſ", "'ſ", "\x1f", "\ufeff", "\x7f", "\u0085", "\U000e0041", "\ue000"],
}
SEPARATORS = ["", " ", " ", " ", "  ", ", ", "\t", "\n"]


def make_corpus(n: int = 1100, seed: int = 0) -> list[str]:
    """Fixed edge cases plus random joins of pieces from every group (seeded, so failures reproduce)."""
    rng = random.Random(seed)
    long_prompt = ", ".join(rng.choice(PIECES["words"]) for _ in range(120))
    corpus = ["", " ", "\n\t ", "a", "A photo of a cat", long_prompt, long_prompt.upper(), "x" * 400,
              " ".join(["a"] * 75), " ".join(["a"] * 76), "!" * 80]
    corpus += [p for group in PIECES.values() for p in group]
    groups = list(PIECES)
    while len(corpus) < n:
        k = rng.choice([1, 2, 3, 5, 8, 13, 40])
        parts = [rng.choice(PIECES[rng.choice(groups)]) for _ in range(k)]
        text = ""
        for part in parts:
            text += part + rng.choice(SEPARATORS)
        corpus.append(text if rng.random() < 0.8 else text.strip())
    return corpus


def reference_ids(folder: Path, corpus: list[str]) -> np.ndarray:
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    ref = HFCLIPTokenizer.from_pretrained(folder)
    out = ref(corpus, padding="max_length", max_length=77, truncation=True)["input_ids"]
    return np.asarray(out, dtype=np.int64)


def ours(folder: Path, corpus) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CLIPTokenizer.from_dir(folder)(corpus)


def assert_same_ids(got: np.ndarray, want: np.ndarray, corpus: list[str]) -> None:
    assert got.shape == want.shape == (len(corpus), 77)
    bad = [i for i in range(len(corpus)) if not np.array_equal(got[i], want[i])]
    assert not bad, f"{len(bad)} strings differ, first {corpus[bad[0]]!r}: {got[bad[0]][:12]} vs {want[bad[0]][:12]}"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1-pad-eos", "sd2-pad-bang"])
def tiny_dir(request, tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"), WORDS, VOCAB_MERGES, pad_token=request.param)


def test_corpus_is_broad(corpus):
    assert len(corpus) >= 1000
    assert len(set(corpus)) > 900
    assert any(len(s) > 300 for s in corpus) and "" in corpus


def test_tiny_vocab_matches_transformers(tiny_dir, corpus):
    want = reference_ids(tiny_dir, corpus)
    assert_same_ids(ours(tiny_dir, corpus), want, corpus)
    # The parity covered both single-byte fallback tokens (ids < 512) and merged ones.
    tok = CLIPTokenizer.from_dir(tiny_dir)
    body = want[(want != tok.pad_id) & (want != tok.bos_id) & (want != tok.eos_id)]
    assert (body < 512).sum() > 1000 and (body >= 512).sum() > 1000


def test_padding_convention(tiny_dir):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    ref = HFCLIPTokenizer.from_pretrained(tiny_dir)
    tok = CLIPTokenizer.from_dir(tiny_dir)
    ids = tok("a cat")
    assert ids.dtype == np.int64 and ids.shape == (1, 77)
    assert tok.pad_id == ref.pad_token_id
    assert ids[0, 0] == ref.bos_token_id and ids[0, 3] == ref.eos_token_id
    assert (ids[0, 4:] == ref.pad_token_id).all()
    if ref.pad_token == "!":
        assert tok.pad_id != tok.eos_id


def test_saved_by_transformers_with_added_tokens_decoder(tmp_path, corpus):
    """Folders written by newer transformers describe special tokens in `added_tokens_decoder`."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    src = write_tokenizer(tmp_path / "src", WORDS, VOCAB_MERGES, pad_token="!")
    HFCLIPTokenizer.from_pretrained(src).save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert "added_tokens_decoder" in config
    sample = corpus[:300]
    assert_same_ids(ours(tmp_path / "saved", sample), reference_ids(tmp_path / "saved", sample), sample)


def test_truncation_keeps_end_token_and_warns(tiny_dir):
    tok = CLIPTokenizer.from_dir(tiny_dir)
    prompt = " ".join(["cat"] * 80)  # "cat" is one token: 80 ids, 75 fit
    with pytest.warns(UserWarning, match=r"5 tokens too long"):
        ids = tok([prompt, "dog"])
    assert ids.shape == (2, 77)
    assert ids[0, 76] == tok.eos_id and (ids[0, 1:76] == ids[0, 1]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 75 tokens: no warning
        tok(" ".join(["cat"] * 75))


def test_single_string_and_bad_input(tiny_dir, tmp_path):
    tok = CLIPTokenizer.from_dir(tiny_dir)
    assert np.array_equal(tok("a red circle"), tok(["a red circle"]))
    assert tok([]).shape == (0, 77)
    with pytest.raises(TokenizerError, match="string"):
        tok([3])
    with pytest.raises(ValueError, match="vocab.json"):
        CLIPTokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "vocab.json").write_text("{not json")
    (tmp_path / "bad" / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="cannot read"):
        CLIPTokenizer.from_dir(tmp_path / "bad")


def test_bpe_cache_reused(tiny_dir):
    tok = CLIPTokenizer.from_dir(tiny_dir)
    tok(["astronaut astronaut"])
    key = "".join(byte_to_unicode()[b] for b in b"astronaut")
    assert key in tok.cache and tok.bpe(key) is tok.cache[key]


def test_word_pattern_agrees_with_regex_package():
    """`split_words` (re + unicodedata) equals CLIP's \\p{L}/\\p{N} pattern run by `regex`, on every code point."""
    regex = pytest.importorskip("regex")
    pattern = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                            r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    bad = []
    for cp in range(0x110000):
        ch = chr(cp)
        if unicodedata.category(ch)[0] == "C":
            continue  # clean_text drops controls, format and unassigned characters before the pattern runs
        for text in (f"a{ch}b", f"'{ch}x", f"1{ch}.", f"{ch}{ch}", f"'l{ch}"):
            if pattern.findall(text) != split_words(text):
                bad.append(text)
    assert not bad, bad[:10]
    assert split_words("<|endoftext|>it's 12 ..'s") == ["<|endoftext|>", "it", "'s", "1", "2", "..'", "s"]


def test_clean_text():
    assert clean_text("  A\tB\n\u00a0C\x00D\u200b ") == "a b cd"
    assert clean_text("日本") == "日 本"
    assert clean_text("e\u0301") == "é"  # NFC, accents kept


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1-pad-eos", "sd2-pad-bang"])
def real_clip_dir(request, tmp_path_factory) -> Path:
    """OpenAI CLIP's 49408-token vocabulary, built by the exporter from its bundled BPE asset."""
    weights = pytest.importorskip("sdonnx.export.weights")
    if not hasattr(weights, "clip_tokenizer_dir") or not REAL_BPE.exists():
        pytest.skip("the exporter does not provide the real CLIP BPE vocabulary")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDONNX_CACHE", str(tmp_path_factory.mktemp("cache")))
        return weights.clip_tokenizer_dir(request.param)


def test_real_clip_vocab_matches_transformers(real_clip_dir, corpus):
    want = reference_ids(real_clip_dir, corpus)
    assert_same_ids(ours(real_clip_dir, corpus), want, corpus)
    tok = CLIPTokenizer.from_dir(real_clip_dir)
    assert len(tok.encoder) == 49408 and tok.bos_id == 49406 and tok.eos_id == 49407
    pad = json.loads((real_clip_dir / "tokenizer_config.json").read_text())["pad_token"]
    assert tok.pad_id == {"!": 0, "<|endoftext|>": 49407}[pad]
    assert tok("a photo of an astronaut riding a horse")[0, :10].tolist() == [
        49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
