"""IndexTTS-2.5 text front end: text + language → GPT-sized segments of tiktoken ids.

Ports the text half of `IndexTTS2.infer_generator` in indextts/infer_v2_5.py with its helpers
(`apply_pronunciation_annotations`, `is_kana`, `_split_atomic_pieces`, `split_text_by_tokens`),
the `nemo_tn` call and `JapaneseG2PProcessor(g2p_ratio=0)` (utils/ja_g2p.py). The steps, in
upstream's order:

  1. the character map (`CHAR_REP_MAP`, one regex alternation);
  2. normalisation: zh / zhen / en through `TextNormalizer` (as IndexTTS-2); ja / es through
     NeMo upstream, which has no Japanese grammar and is not an upstream dependency, so both
     pass through unchanged there as here; ar and every other code: none;
  3. case: ja / zh / zhen / en lower-cased, es upper-cased, others unchanged;
  4. pronunciation annotations `<word|PRON>` → `<|SPECIAL_TOKEN_2|>PRON<|SPECIAL_TOKEN_2|>` when
     the word has a CJK character, `_1` otherwise, ` PRON ` for kana; PRON upper-cased;
  5. Japanese only: word segmentation with fugashi (unidic-lite), tokens joined by spaces;
  6. every `<|x|>` upper-cased (the special tokens are upper-case);
  7. `split_text_by_tokens` with budget min(max_text_tokens_per_segment, max_text_tokens) minus
     the `<|lang|> ` prefix's length (at least 1); the separator stays with the previous segment;
  8. ids = encode(`<|lang|> ` + segment). Upstream then appends one id 1 (`PAD_ID`), which the
     GPT's prefix builder drops again together with every other id 0/1.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ttsd.api.errors import BadText, ConfigError

from .normalize import CHAR_REP_MAP, G2P_ANNOTATION_PATTERN, TextNormalizer, apply_char_rep_map
from .tiktoken_tokenizer import TiktokenTokenizer, lang_index

NORMALIZED_LANGS = frozenset({"zh", "zhen", "en"})  # TextNormalizer (WeTextProcessing)
LOWER_CASE_LANGS = frozenset({"ja", "zh", "zhen", "en"})
UPPER_CASE_LANGS = frozenset({"es"})
JAPANESE = "ja"
PAD_ID = 1  # appended to every segment's ids upstream (= stop_text_token)

# Split points: after each of these characters (lookbehind), so the separator ends the part.
_SPLIT_AFTER = re.compile(r"(?<=[，。！？、；：,\.!\?;:\n])")
# Annotated pronunciations are never split, whatever their length.
_PROTECTED = re.compile(r"<\|SPECIAL_TOKEN_\d+\|>.*?<\|SPECIAL_TOKEN_\d+\|>")
_SPECIAL = re.compile(r"<\|([^|]+)\|>")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_HIRAGANA = re.compile(r"[\u3040-\u309F]+")
_KATAKANA = re.compile(r"[\u30A0-\u30FF]+")
_SPACES = re.compile(r"( +)")


def detect_language(text: str) -> str:
    """The language of a request that names none: "zh" when the text has a CJK ideograph, else "en"
    (the two IndexTTS-2 speaks without being told; other languages must be named)."""
    return "zh" if _CJK.search(text) else "en"


def is_kana(s: str) -> bool:
    """All hiragana or all katakana (not a mix), as upstream's is_kana."""
    return _HIRAGANA.fullmatch(s) is not None or _KATAKANA.fullmatch(s) is not None


def apply_pronunciation_annotations(text: str) -> str:
    """`<word|PRON>` → PRON wrapped in SPECIAL_TOKEN_2 (word has a CJK character) or _1; kana → ` PRON `."""

    def replace(m: re.Match[str]) -> str:
        word, pron = m.group(1), m.group(2).upper()
        if is_kana(pron):
            return f" {pron} "
        token = "SPECIAL_TOKEN_2" if _CJK.search(word) else "SPECIAL_TOKEN_1"
        return f"<|{token}|>{pron}<|{token}|>"

    return G2P_ANNOTATION_PATTERN.sub(replace, text)


@functools.cache
def _japanese_tagger() -> Callable[[str], list[Any]]:
    try:
        import fugashi
    except ImportError as e:
        raise ConfigError("Japanese text needs fugashi and unidic-lite: pip install 'ttsd[ja]'") from e
    try:
        tagger: Callable[[str], list[Any]] = fugashi.Tagger()
    except RuntimeError as e:  # fugashi installed without a dictionary
        raise ConfigError(f"Japanese text needs a MeCab dictionary (pip install unidic-lite): {e}") from e
    return tagger


def split_japanese_words(text: str) -> str:
    """JapaneseG2PProcessor(g2p_ratio=0).process_ja_text: each space-free run becomes its fugashi
    tokens joined by one space; runs of spaces between them are kept. (Ratio 0 replaces no kanji.)"""
    tagger = _japanese_tagger()
    return "".join(
        " ".join(str(tok.surface) for tok in tagger(part)) if part.strip() else part
        for part in _SPACES.split(text)
    )


def _atomic_pieces(text: str) -> list[tuple[str, bool]]:
    """Text cut into (piece, protected) around every annotated pronunciation."""
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for m in _PROTECTED.finditer(text):
        if m.start() > pos:
            pieces.append((text[pos : m.start()], False))
        pieces.append((m.group(0), True))
        pos = m.end()
    if pos < len(text):
        pieces.append((text[pos:], False))
    return pieces


def split_text_by_tokens(tokenizer: TiktokenTokenizer, text: str, budget: int) -> list[str]:
    """Upstream split_text_by_tokens after its budget is known: parts end at punctuation; a part
    over budget is cut character by character; parts are then packed greedily up to the budget.
    Token counts are those of each piece encoded alone, as upstream counts them."""
    n = tokenizer.token_len
    if n(text) <= budget:
        return [text]
    chunks: list[str] = []
    for piece, protected in _atomic_pieces(text):
        if protected:
            chunks.append(piece)
            continue
        for part in _SPLIT_AFTER.split(piece):
            if not part:
                continue
            if n(part) <= budget:
                chunks.append(part)
                continue
            current = ""
            for ch in part:
                if current and n(current + ch) > budget:
                    chunks.append(current)
                    current = ch
                else:
                    current += ch
            if current:
                chunks.append(current)
    segments: list[str] = []
    current = ""
    for chunk in chunks:
        if current and n(current + chunk) > budget:
            segments.append(current)
            current = chunk
        else:
            current += chunk
    if current:
        segments.append(current)
    return segments or [text]


@dataclass(frozen=True, kw_only=True, slots=True)
class TextPlan:
    """Every intermediate of the 2.5 front end for one text (what upstream prints with verbose)."""

    lang: str  # the language code as given (upstream lower-cases it where it matters)
    lang_index: int  # lang_embedding row (lang_to_token)
    lang_prefix: str  # "<|lang|> "
    text_after_char_rep_map: str
    normalized_text: str  # after normalisation, before the case rules
    text_for_split: str  # after case rules, annotations, Japanese word split, special-token case
    split_budget: int  # tokens per segment, prefix excluded
    segments: tuple[str, ...]  # segment texts (without the prefix)
    segment_ids: tuple[tuple[int, ...], ...]  # encode(prefix + segment), without the PAD_ID upstream appends


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class TextFrontEnd25:
    """The 2.5 text front end bound to its vocabulary, normaliser and the GPT's text capacity."""

    tokenizer: TiktokenTokenizer
    normalizer: TextNormalizer
    max_text_tokens: int  # gpt.max_text_tokens (text_pos_embedding rows − 2): the budget's upper bound

    def prepare(self, text: str, lang: str) -> tuple[str, str, str]:
        """Steps 1–6 → (text after the character map, normalised text, text to split)."""
        code = lang.lower()
        mapped = apply_char_rep_map(text, CHAR_REP_MAP)
        normalized = self.normalizer.normalize(mapped) if code in NORMALIZED_LANGS else mapped
        if code in LOWER_CASE_LANGS:
            cased = normalized.lower()
        elif code in UPPER_CASE_LANGS:
            cased = normalized.upper()
        else:
            cased = normalized
        out = apply_pronunciation_annotations(cased)
        if code == JAPANESE:
            out = split_japanese_words(out)
        out = _SPECIAL.sub(lambda m: f"<|{m.group(1).upper()}|>", out)
        return mapped, normalized, out

    def plan(self, text: str, lang: str, max_text_tokens_per_segment: int) -> TextPlan:
        """Text in language `lang` (upstream codes: zh en ja es ar ...; unknown → `common` row)
        → segments and their ids. Raises BadText when nothing speakable is left."""
        if max_text_tokens_per_segment < 1:
            raise ValueError("max_text_tokens_per_segment must be >= 1")
        mapped, normalized, for_split = self.prepare(text, lang)
        if not for_split.strip():
            raise BadText("nothing to speak: the text is empty after normalisation")
        prefix = f"<|{lang.lower()}|> "
        budget = max(1, min(max_text_tokens_per_segment, self.max_text_tokens) - self.tokenizer.token_len(prefix))
        segments = tuple(split_text_by_tokens(self.tokenizer, for_split, budget))
        return TextPlan(
            lang=lang,
            lang_index=lang_index(lang),
            lang_prefix=prefix,
            text_after_char_rep_map=mapped,
            normalized_text=normalized,
            text_for_split=for_split,
            split_budget=budget,
            segments=segments,
            segment_ids=tuple(tuple(self.tokenizer.encode(prefix + s)) for s in segments),
        )
