"""Text front end: normaliser, SentencePiece → tokenizers conversion, encode flow, segmentation."""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ttsd.pipeline.text import (
    CHAR_REP_MAP,
    ZH_CHAR_REP_MAP,
    SentenceBuffer,
    TextNormalizer,
    TextTokenizer,
    apply_char_rep_map,
    correct_pinyin,
    sentencepiece_to_json,
    split_segments,
    tokenize_by_cjk_char,
    use_chinese,
)
from ttsd.pipeline.text import normalize as normalize_mod
from ttsd.pipeline.text.tn import NormalizationFailed

from .conftest import FixtureSet, assert_equal

spm = pytest.importorskip("sentencepiece")
Tokenizer = pytest.importorskip("tokenizers").Tokenizer


@pytest.fixture(scope="module")
def normalizer() -> TextNormalizer:
    return TextNormalizer()


@pytest.fixture(scope="module")
def tokenizer(converted: Path, normalizer: TextNormalizer) -> TextTokenizer:
    return TextTokenizer.from_file(converted / "tokenizer.json", normalizer)


# ---------------------------------------------------------------------------------------------
# Golden parity


def test_normalized_text_matches_golden(fx: FixtureSet, variant: str, normalizer: TextNormalizer) -> None:
    """The normaliser reproduces upstream's normalised and CJK-split text for the fixture input."""
    meta = fx.variant(variant)["meta"]
    normalized = normalizer.normalize(fx.text)
    assert [normalized] == meta["normalized_text"]
    assert [tokenize_by_cjk_char(normalized)] == meta["pre_tokenized_text"]


def test_pieces_and_segments_match_golden(fx: FixtureSet, variant: str, tokenizer: TextTokenizer) -> None:
    """tokenize() and split_segments() reproduce upstream's pieces and segments."""
    meta = fx.variant(variant)["meta"]
    pieces = tokenizer.tokenize(fx.text)
    assert pieces == meta["tokens"]
    assert split_segments(pieces, meta["max_text_tokens_per_segment"]) == meta["segments"]


def test_ids_match_golden(fx: FixtureSet, variant: str, tokenizer: TextTokenizer) -> None:
    """Whole-text ids and every segment's ids equal upstream's golden tensors exactly."""
    meta = fx.variant(variant)["meta"]
    golden = fx.golden(variant, "00_text")
    pieces = tokenizer.tokenize(fx.text)
    text_ids = torch.tensor(tokenizer.convert_tokens_to_ids(pieces), dtype=golden["text_ids"].dtype)
    assert_equal(text_ids, golden["text_ids"], "text_ids")
    segments = split_segments(pieces, meta["max_text_tokens_per_segment"])
    assert len(segments) == sum(1 for k in golden if k.endswith(".text_tokens"))
    for i, seg in enumerate(segments):
        ids = torch.tensor(tokenizer.convert_tokens_to_ids(seg), dtype=torch.int32).unsqueeze(0)
        want = golden[f"seg{i}.text_tokens"]
        assert ids.dtype == want.dtype, f"seg{i}"
        assert_equal(ids, want, f"seg{i}.text_tokens")


def test_unk_id_read_from_model(fx: FixtureSet, tokenizer: TextTokenizer) -> None:
    """The unk id and unknown-piece mapping come from bpe.model, as sp.unk_id()/PieceToId do."""
    sp = spm.SentencePieceProcessor(model_file=str(fx.ckpt / "bpe.model"))
    assert tokenizer.unk_id == sp.unk_id()
    pieces = ["▁THE", "never-a-piece", "<s>", "</s>", sp.id_to_piece(sp.get_piece_size() - 1)]
    assert tokenizer.convert_tokens_to_ids(pieces) == [sp.piece_to_id(p) for p in pieces]
    ids = list(range(sp.get_piece_size()))
    assert tokenizer.convert_ids_to_tokens(ids) == [sp.id_to_piece(i) for i in ids]


def test_unknown_pieces_are_logged(tokenizer: TextTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    """Converting a piece outside the vocabulary logs a warning naming it, as infer_v2 prints one."""
    with caplog.at_level(logging.WARNING, logger="ttsd.pipeline.text.tokenizer"):
        tokenizer.convert_tokens_to_ids(["▁THE", "😀"])
    assert "😀" in caplog.text


# ---------------------------------------------------------------------------------------------
# tokenizers JSON == SentencePiece on many inputs

_WORDS = ["hello", "WORLD", "The", "quick", "BROWN", "fox", "GPT", "tts", "IndexTTS", "a", "I", "OK"]
_CJK = "你好世界是的中文我们这个人来了说天下大小日月水火山"
_PINYIN = ["XUAN4", "jve2", "SHANG5", "ZHONG4", "er2", "NG1", "lv4"]
_PUNCT = list(".,!?;:'\"-…。，！？、：；“”‘’（）《》【】「」()[]~～—·$%&@#*/\\<>|_+=^`{}")
_SPACES = [" ", "  ", "\t", "\n", "\u3000", "\xa0", "\u2009", "\u200b", "▁", " ▁ ", "\r\n"]
_EMOJI = ["😀", "👍🏽", "🇨🇳", "❤️", "👨‍👩‍👧", "🤖"]
_ODD = ["e\u0301", "ﬁ", "Ⅻ", "①", "²", "Ａｂｃ１２", "ß", "İ", "ǅ", "\u00a8", "\u0000", "\x7f"]
_ODD += ["<s>", "</s>", "<unk>"]


_RANGES = [(0x20, 0x7F), (0xA0, 0x3000), (0x3000, 0xA000), (0xAC00, 0xD7A4), (0xF900, 0x10000)]
_RANGES += [(0x10000, 0x30000)]


def _random_char(rng: random.Random) -> str:
    while True:
        lo, hi = rng.choice(_RANGES)
        cp = rng.randrange(lo, hi)
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


def _random_strings(seed: int, n: int, odd: bool = True) -> Iterator[str]:
    """Seeded mixes of words, CJK, pinyin, punctuation, digits, whitespace oddities, emoji, unicode."""
    rng = random.Random(seed)
    digits = [str(d) for d in range(10)] + ["3.5", "8:00"]
    pools = [_WORDS, list(_CJK), _PINYIN, _PUNCT, _SPACES, digits] + ([_EMOJI, _ODD] if odd else [])
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(0, 12)):
            r = rng.random()
            if r < 0.85 or not odd:
                pool = rng.choice(pools)
                word = rng.choice(pool)
                parts.append(word.upper() if rng.random() < 0.5 else word)
            else:
                parts.append(_random_char(rng))
            if rng.random() < 0.5:
                parts.append(" ")
        yield "".join(parts)


def _train(model_type: str, tmp: Path, rule: str = "nmt_nfkc") -> Path:
    corpus = [tokenize_by_cjk_char(s) for s in _random_strings(seed=7, n=3000, odd=False)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=out, model_type=model_type, vocab_size=300,
        character_coverage=0.995, bos_id=0, eos_id=1, unk_id=2, pad_id=-1, num_threads=1,
        minloglevel=2, hard_vocab_limit=False, normalization_rule_name=rule,
    )
    path = tmp / f"{model_type}-{rule}.model"
    path.write_bytes(out.getvalue())
    return path


@pytest.fixture(scope="module", params=["fixture", "unigram", "bpe", "bpe-identity", "unigram-nfkc"])
def sp_model(
    request: pytest.FixtureRequest, fx: FixtureSet, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    if request.param == "fixture":
        return fx.ckpt / "bpe.model"
    model_type, _, rule = request.param.partition("-")
    return _train(model_type, tmp_path_factory.mktemp("spm"), rule or "nmt_nfkc")


def test_json_ids_equal_sentencepiece(sp_model: Path) -> None:
    """On a few hundred seeded strings, the converted JSON gives SentencePiece's pieces and ids."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    text = sentencepiece_to_json(sp_model)
    tok = TextTokenizer(tokenizer=Tokenizer.from_str(text))
    hf = Tokenizer.from_str(text)
    hf.encode_special_tokens = True  # literal "<s>" in text is text, as in SentencePiece
    strings = list(_random_strings(seed=1, n=400)) + [s.upper() for s in _random_strings(seed=2, n=200)]
    strings += ["", " ", "▁", "<s>hi</s>", "你好世界是 HELLO WORLD, XING2", "THE  QUICK\tBROWN\n", "A▁▁B ▁"]
    mismatches = []
    for s in strings:
        want = (sp.encode(s, out_type=str), sp.encode(s))
        got = (tok.encode_pieces(s), tok.encode_ids(s))
        if got != want or hf.encode(s, add_special_tokens=False).ids != want[1]:
            mismatches.append((s, got, want))
    assert not mismatches, f"{len(mismatches)} of {len(strings)} differ, first: {mismatches[:3]}"


def test_json_records_model_type(sp_model: Path) -> None:
    """The JSON model type follows the proto's trainer_spec (Unigram or BPE), not the file name."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model.read_bytes())
    want = {1: "Unigram", 2: "BPE"}[proto.trainer_spec.model_type]
    assert Tokenizer.from_str(sentencepiece_to_json(sp_model)).model.__class__.__name__ == want


# ---------------------------------------------------------------------------------------------
# Encode flow


def test_single_char_is_encoded_raw(fx: FixtureSet, tokenizer: TextTokenizer) -> None:
    """One character after strip() skips normalisation and upper-casing; longer text gets both."""
    sp = spm.SentencePieceProcessor(model_file=str(fx.ckpt / "bpe.model"))
    for s in ["a", " 3 ", "你", "!"]:
        assert tokenizer.tokenize(s) == sp.encode(s, out_type=str), s
    assert tokenizer.tokenize("ab") == sp.encode("AB", out_type=str)
    assert tokenizer.tokenize("") == []


def test_cjk_split_upper_cases_chunks() -> None:
    """tokenize_by_CJK_char: each CJK character is its own word and every chunk is upper-cased."""
    assert tokenize_by_cjk_char("你好世界是 hello world, xing2") == "你 好 世 界 是 HELLO WORLD, XING2"
    assert tokenize_by_cjk_char("  abc  ") == "ABC"


def test_decode_gives_readable_text(tokenizer: TextTokenizer) -> None:
    """decode() turns pieces back into spaced text without spaces between CJK characters."""
    assert tokenizer.decode(["▁THE", "▁", "QU", "IC", "K", "!"]) == "THE QUICK!"
    assert tokenizer.decode(["▁你", "▁好", "▁A"]) == "你好 A"


# ---------------------------------------------------------------------------------------------
# Normaliser


def test_char_rep_map_is_one_alternation_in_dict_order() -> None:
    """At each position the first key in dict order wins: `，，，` → `,,,`, `……` → `…`, brackets → `'`."""
    assert apply_char_rep_map("，，，", CHAR_REP_MAP) == ",,,"
    assert apply_char_rep_map("...", CHAR_REP_MAP) == "…"
    assert apply_char_rep_map(",,,", CHAR_REP_MAP) == "…"
    assert apply_char_rep_map("……", CHAR_REP_MAP) == "…"
    assert apply_char_rep_map("《书》（注）[x]“y”", CHAR_REP_MAP) == "'书''注''x''y'"
    assert apply_char_rep_map("a：b；c、d\ne~f—g·h", CHAR_REP_MAP) == "a,b,c,d e-f-g-h"
    assert apply_char_rep_map("$5", ZH_CHAR_REP_MAP) == ".5"
    assert apply_char_rep_map("$5", CHAR_REP_MAP) == "$5"


def test_pinyin_is_protected_and_corrected(normalizer: TextNormalizer) -> None:
    """Toned pinyin survives the Chinese FST (no 四), and j/q/x + u is rewritten with v, upper-cased."""
    out = normalizer.normalize("晕xuan4是一种GAN3觉")
    assert "XVAN4" in out and "GAN3" in out and "四" not in out and "三" not in out
    assert correct_pinyin("xuan4") == "XVAN4"
    assert correct_pinyin("ju4") == "JV4"
    assert correct_pinyin("jiang1") == "JIANG1"
    assert correct_pinyin("lv4") == "lv4"


def test_pinyin_routing() -> None:
    """PINYIN_TONE_PATTERN sends toned pinyin to the Chinese path but not beta1 or voice2."""
    assert use_chinese("say xuan4 now")
    assert use_chinese("jve2")
    assert not use_chinese("use beta1 here")
    assert not use_chinese("voice2")
    assert use_chinese("1234, 56")  # no ASCII letter


def test_tech_terms_keep_hyphens(normalizer: TextNormalizer) -> None:
    """GPT-5-nano keeps its hyphens on both paths while its digit is still verbalised."""
    assert normalizer.normalize("GPT-5-nano is small.").startswith("GPT-five-nano ")
    assert normalizer.normalize("GPT-5-nano 很小").startswith("GPT-五-nano")


def test_email_takes_chinese_path(normalizer: TextNormalizer) -> None:
    """A bare e-mail routes to the Chinese path, which leaves it unchanged (the English one would not)."""
    assert use_chinese("test@example.com")
    assert normalizer.normalize("test@example.com") == "test@example.com"


def test_contractions_annotations_and_names(normalizer: TextNormalizer) -> None:
    """`where's` → `where is`; <字|读音> annotations survive verbatim; names keep their joiner."""
    assert normalizer.normalize("where's the money?") == "where is the money?"
    assert "<行|XING2>" in normalizer.normalize("我<行|XING2>了 2 个")
    assert normalizer.normalize("克里斯托弗·诺兰执导") == "克里斯托弗-诺兰执导"


def test_many_annotations_use_spreadsheet_tags(normalizer: TextNormalizer) -> None:
    """More than 26 <字|读音> annotations get tags a..z, aa, ab, ... and all come back verbatim."""
    text = "".join(f"<字{i}|ZI{i % 5 + 1}>" for i in range(30))
    assert normalizer.normalize(text) == text


def test_glossary_dict_and_yaml(tmp_path: Path) -> None:
    """Glossary readings are chosen per language path; a glossary.yaml replaces the given dict."""
    n = TextNormalizer(glossary={"C++": {"en": "C plus plus", "zh": "C 加加"}, "TTS": "T T S"})
    assert n.normalize("I like C++ and tts.") == "I like C plus plus and T T S."
    assert n.normalize("我喜欢c++") == "我喜欢C 加加"
    yaml_path = tmp_path / "glossary.yaml"
    yaml_path.write_text("NVMe: N V M E\n", encoding="utf-8")
    m = TextNormalizer(glossary={"TTS": "T T S"}, glossary_path=yaml_path)
    assert m.normalize("NVMe and TTS.") == "N V M E and TTS."
    assert TextNormalizer(glossary_path=tmp_path / "absent.yaml").normalize("TTS.") == "TTS."


def test_zh_normaliser_failure_gives_empty_text(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the Chinese FST fails, upstream's result is the empty string; English falls back to the input;
    each failure is one warning line without a traceback."""

    class Boom:
        def normalize(self, text: str) -> str:
            raise NormalizationFailed("fst failure")

    monkeypatch.setattr(normalize_mod, "_zh_normalizer", lambda: Boom())
    monkeypatch.setattr(normalize_mod, "_en_normalizer", lambda: Boom())
    n = TextNormalizer()
    with caplog.at_level(logging.WARNING, logger="ttsd.pipeline.text"):
        assert n.normalize("你好") == ""
        assert n.normalize("who's (here)") == "who is 'here'"
    assert [(r.levelno, r.exc_info) for r in caplog.records] == [(logging.WARNING, None)] * 2


# ---------------------------------------------------------------------------------------------
# Segmentation


def _words(prefix: str, n: int) -> list[str]:
    return [f"▁{prefix}{i}" for i in range(n)]


def test_unpunctuated_250_pieces_split_120_1_120_9(caplog: pytest.LogCaptureFixture) -> None:
    """250 pieces without split points give [120, 1, 120, 9] and log the hard split."""
    pieces = _words("w", 250)
    with caplog.at_level(logging.WARNING, logger="ttsd.pipeline.text.segment"):
        segments = split_segments(pieces)
    assert [len(s) for s in segments] == [120, 1, 120, 9]
    assert sum(segments, []) == pieces
    assert "hard split" in caplog.text


def test_quote_after_sentence_end_is_duplicated() -> None:
    """A quote right after a sentence end closes that segment and also opens the next one."""
    pieces = ["▁A", "B", "C", ".", "'", "▁D", "E", "F", "."]
    assert split_segments(pieces, 5) == [["▁A", "B", "C", ".", "'"], ["'", "▁D", "E", "F", "."]]


def test_quick_streaming_tokens_keeps_first_segments_apart() -> None:
    """With q > 0, neighbours merge only after the running count exceeds q (or within max/2)."""
    sentences = [_words(c, 9) + ["."] for c in "abcd"]
    pieces = sum(sentences, [])
    a, b, c, d = sentences
    assert split_segments(pieces, 30) == [a + b + c, d]
    assert split_segments(pieces, 30, quick_streaming_tokens=25) == [a, b + c + d]
    assert split_segments(pieces, 30, quick_streaming_tokens=35) == [a, b, c + d]


def test_comma_and_hyphen_recursion() -> None:
    """Commas, then hyphens, become split points when a sentence would overflow."""
    left, right = _words("a", 6), _words("b", 6)
    assert split_segments(left + [","] + right + ["."], 10) == [left + [","], right + ["."]]
    assert split_segments(left + ["▁,"] + right, 10) == [left + ["▁,"], right]
    assert split_segments(left + ["-"] + right, 10) == [left + ["-"], right]
    assert split_segments(left + [","] + right + ["."], 120) == [left + [","] + right + ["."]]
    assert split_segments(left + ["▁!"] + right, 120) == [left + ["▁!"] + right]  # "▁!" is no split token


def test_segment_edge_cases() -> None:
    """Empty input gives no segments; a sentence end within the first two pieces does not split."""
    assert split_segments([]) == []
    assert split_segments(["▁A", ".", "▁B", "C", "D", "."], 3) == [["▁A", ".", "▁B"], ["C", "D", "."]]


# ---------------------------------------------------------------------------------------------
# SentenceBuffer


def test_sentence_buffer_releases_complete_sentences() -> None:
    """Sentences are released once the character after their end has arrived; flush returns the rest."""
    buf = SentenceBuffer()
    assert buf.feed("Hello wor") == []
    assert buf.feed("ld. How are") == ["Hello world."]
    assert buf.feed(" you?") == []
    assert buf.feed(" Fine") == ["How are you?"]
    assert buf.flush() == "Fine"
    assert buf.flush() == ""


def test_sentence_buffer_keeps_decimals_and_quotes() -> None:
    """Decimals and unspaced abbreviations never split; a closing quote stays with its sentence."""
    buf = SentenceBuffer()
    assert buf.feed("It costs 3.5 dollars, e.g.x works. ") == ["It costs 3.5 dollars, e.g.x works."]
    assert buf.feed('He said "Stop."') == []
    assert buf.feed(" Then?! Wait... what") == ['He said "Stop."', "Then?!", "Wait..."]
    assert buf.flush() == "what"


def test_sentence_buffer_cjk() -> None:
    """CJK terminators end a sentence without following whitespace."""
    buf = SentenceBuffer()
    assert buf.feed("你好。我很好！谢") == ["你好。", "我很好！"]
    assert buf.feed("谢」") == []
    assert buf.flush() == "谢谢」"


def test_sentence_buffer_chunking_is_irrelevant() -> None:
    """Feeding text one character at a time yields the same sentences as feeding it whole."""
    text = 'One. Two 2.5 "three!" 四。五？ six… seven... end'
    whole = SentenceBuffer()
    want = whole.feed(text) + [whole.flush()]
    chunked = SentenceBuffer()
    got = [s for ch in text for s in chunked.feed(ch)] + [chunked.flush()]
    assert got == want
    assert want == ["One.", 'Two 2.5 "three!"', "四。", "五？", "six…", "seven...", "end"]
