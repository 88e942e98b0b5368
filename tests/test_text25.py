"""IndexTTS-2.5 text front end: tiktoken vocabulary, language rules, annotations, split_text_by_tokens."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import torch
import yaml

from ttsd.api.errors import BadText
from ttsd.pipeline.errors import CheckpointError
from ttsd.pipeline.text import TextNormalizer
from ttsd.pipeline.text.front25 import (
    PAD_ID,
    TextFrontEnd25,
    apply_pronunciation_annotations,
    is_kana,
    split_text_by_tokens,
)
from ttsd.pipeline.text.tiktoken_tokenizer import (
    LANGUAGES,
    NUM_SPECIAL_LANGUAGES,
    TiktokenTokenizer,
    lang_index,
    special_tokens,
)

from .conftest import FixtureSet, assert_equal

pytestmark = pytest.mark.model_versions("2.5")


def _config(ckpt: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def front(converted: Path) -> TextFrontEnd25:
    return TextFrontEnd25(
        tokenizer=TiktokenTokenizer.from_file(converted / "tokenizer.tiktoken"),
        normalizer=TextNormalizer(),
        max_text_tokens=int(_config(converted)["gpt"]["max_text_tokens"]),
    )


# ---------------------------------------------------------------------------------------------
# Golden parity


def test_text_plan_matches_golden(fx: FixtureSet, variant: str, front: TextFrontEnd25) -> None:
    """Every front-end step, the segments, each segment's ids (+ the pad id) and the language row
    reproduce upstream's stage 00 for the manifest's call."""
    call, meta = fx.variant(variant)["call"], fx.variant(variant)["meta"]
    golden = fx.golden(variant, "00_text")
    plan = front.plan(call["text"], call["lang"], int(call["max_text_tokens_per_segment"]))
    assert [plan.text_after_char_rep_map] == meta["text_after_char_rep_map"]
    assert [plan.normalized_text] == meta["normalized_text"]
    assert plan.text_for_split == meta["text_for_split"]
    assert plan.lang_prefix == meta["lang_prefix"]
    assert plan.split_budget == meta["split_budget"]
    assert list(plan.segments) == meta["segments"]
    assert [list(ids) for ids in plan.segment_ids] == meta["segment_token_ids"]
    assert len(plan.segments) == sum(1 for k in golden if k.endswith(".text_tokens"))
    for i, ids in enumerate(plan.segment_ids):
        tokens = torch.tensor([[*ids, PAD_ID]], dtype=torch.int32)
        assert_equal(tokens, golden[f"seg{i}.text_tokens"], f"seg{i}.text_tokens")
        assert_equal(torch.tensor([plan.lang_index]), golden[f"seg{i}.lang"], f"seg{i}.lang")


def test_vocabulary_size_and_specials_follow_upstream(fx: FixtureSet, front: TextFrontEnd25) -> None:
    """Ranks + the 1673 specials give the GPT's number_text_tokens; specials are numbered after the
    last rank in upstream's order, and a literal special in the text encodes as that one id."""
    tok = front.tokenizer
    assert tok.vocab_size == int(_config(fx.ckpt)["gpt"]["number_text_tokens"])
    specials = special_tokens()
    assert len(specials) == len(set(specials)) == 1673
    first = tok.vocab_size - len(specials)
    assert [tok.special_id(t) for t in specials] == list(range(first, tok.vocab_size))
    assert specials[2 : 2 + NUM_SPECIAL_LANGUAGES] == [f"<|{c}|>" for c in LANGUAGES[:NUM_SPECIAL_LANGUAGES]]
    assert tok.encode("<|SPECIAL_TOKEN_1|>") == [tok.special_id("<|SPECIAL_TOKEN_1|>")]
    assert tok.decode(tok.encode("hello world, 今天")) == "hello world, 今天"


def test_language_rows_follow_lang_to_token() -> None:
    """lang_to_token: the spec's rows (en 0, zh 1, es 3, ja 7, ar 13), any case; unknown → common."""
    assert [lang_index(c) for c in ("en", "ZH", "es", "ja", "Ar")] == [0, 1, 3, 7, 13]
    assert lang_index("zhen") == lang_index("klingon") == LANGUAGES.index("common") == len(LANGUAGES) - 1


def test_vocabulary_loads_without_network(fx: FixtureSet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the vocabulary opens no socket and never asks tiktoken's registry for an encoding."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    tok = TiktokenTokenizer.from_file(fx.ckpt / "multilingual_zh_ja_yue_char_del.tiktoken")
    assert tok.encode("<|en|> hello")[0] == tok.special_id("<|en|>")


@pytest.mark.parametrize(
    ("lines", "match"),
    [(["AA== 0", "AQ== 2"], "without gaps"), (["AA== 0", "not-a-line"], ":2:"), ([], "empty")],
)
def test_bad_vocabulary_files_are_clear_errors(tmp_path: Path, lines: list[str], match: str) -> None:
    """A vocabulary with gaps in its ranks, a malformed line or no line is a CheckpointError saying so."""
    path = tmp_path / "v.tiktoken"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match=match):
        TiktokenTokenizer.from_file(path)


# ---------------------------------------------------------------------------------------------
# Language rules, annotations, splitting


def test_case_and_normalisation_rules_per_language(front: TextFrontEnd25) -> None:
    """en/zh are normalised and lower-cased, es passes through and is upper-cased, ar passes through
    unchanged, and every language gets its own `<|lang|> ` prefix and row."""
    text = "Hello World, 3 apples."
    en, es, ar = (front.plan(text, lang, 120) for lang in ("en", "es", "ar"))
    assert en.text_for_split == front.normalizer.normalize(text).lower()
    assert "3" not in en.text_for_split
    assert es.text_for_split == text.upper() and ar.text_for_split == text
    assert (en.lang_prefix, es.lang_prefix, ar.lang_prefix) == ("<|en|> ", "<|es|> ", "<|ar|> ")
    assert (en.lang_index, es.lang_index, ar.lang_index) == (lang_index("en"), lang_index("es"), lang_index("ar"))
    assert front.plan("今天，很好。", "ZH", 120).text_after_char_rep_map == "今天,很好."
    for p in (en, es, ar):
        assert p.segment_ids[0][0] == front.tokenizer.special_id(p.lang_prefix.strip())


def test_japanese_is_split_into_words(front: TextFrontEnd25) -> None:
    """Japanese text is lower-cased, left unnormalised (no NeMo grammar upstream) and word-split by
    fugashi with single spaces; existing runs of spaces are kept."""
    pytest.importorskip("fugashi")
    plan = front.plan("実は昨年、11KGの減量  成功", "ja", 120)
    assert plan.normalized_text == "実は昨年,11KGの減量  成功"
    words = plan.text_for_split.split("  ")
    assert len(words) == 2 and words[1] == "成功"
    assert words[0].replace(" ", "") == "実は昨年,11kgの減量" and words[0].count(" ") >= 4


def test_pronunciation_annotations_become_special_tokens(front: TextFrontEnd25) -> None:
    """`<word|PRON>` becomes PRON (upper-cased) between SPECIAL_TOKEN_2 (CJK word) or _1; kana stands alone."""
    assert apply_pronunciation_annotations("<going|g ow1 . ih0 ng>") == (
        "<|SPECIAL_TOKEN_1|>G OW1 . IH0 NG<|SPECIAL_TOKEN_1|>"
    )
    assert apply_pronunciation_annotations("他<行|xing2>走") == "他<|SPECIAL_TOKEN_2|>XING2<|SPECIAL_TOKEN_2|>走"
    assert apply_pronunciation_annotations("<雨|あめ>") == " あめ "
    assert is_kana("あめ") and is_kana("アメ") and not is_kana("あメ") and not is_kana("AME")
    plan = front.plan("Say <going|g ow1 . ih0 ng> now.", "en", 120)
    one = front.tokenizer.special_id("<|SPECIAL_TOKEN_1|>")
    assert plan.segment_ids[0].count(one) == 2


def test_split_keeps_separators_and_budget(front: TextFrontEnd25) -> None:
    """Segments concatenate back to the text, end after their separator, and stay within the budget
    unless one character or one protected annotation is longer (seeded random texts)."""
    tok = front.tokenizer
    rng = random.Random(5)
    words = ["hello", "world", "the", "quick", "fox", "今天", "天气", "3", "<|SPECIAL_TOKEN_1|>AH<|SPECIAL_TOKEN_1|>"]
    seps = [",", ".", "!", "?", "，", "。", " ", " "]
    for _ in range(200):
        text = "".join(rng.choice(words) + rng.choice(seps) for _ in range(rng.randrange(1, 20)))
        budget = rng.randrange(1, 12)
        segments = split_text_by_tokens(tok, text, budget)
        assert "".join(segments) == text
        for seg in segments:
            atomic = seg.startswith("<|SPECIAL") and seg.endswith("|>") and seg.count("<|") == 2
            assert tok.token_len(seg) <= budget or len(seg) == 1 or atomic, (text, budget, seg)
    assert split_text_by_tokens(tok, "hello world. the fox!", 3) == ["hello world.", " the fox!"]


def test_long_text_uses_the_gpt_text_capacity(front: TextFrontEnd25) -> None:
    """The budget is min(max_text_tokens_per_segment, max_text_tokens) minus the prefix's tokens."""
    prefix_len = front.tokenizer.token_len("<|en|> ")
    assert front.plan("hello.", "en", 10).split_budget == 10 - prefix_len
    assert front.plan("hello.", "en", 10**6).split_budget == front.max_text_tokens - prefix_len


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_text_is_bad_text(front: TextFrontEnd25, text: str) -> None:
    """Text with nothing left to speak raises BadText in one line."""
    with pytest.raises(BadText, match="nothing to speak"):
        front.plan(text, "en", 120)
