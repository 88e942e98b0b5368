"""Text front end: normalisation, BPE tokenisation, segmentation."""

from .normalize import (
    CHAR_REP_MAP,
    ZH_CHAR_REP_MAP,
    TextNormalizer,
    apply_char_rep_map,
    correct_pinyin,
    load_glossary,
    use_chinese,
)
from .segment import SENTENCE_SPLIT_TOKENS, SentenceBuffer, split_segments
from .tokenizer import BOS_ID, EOS_ID, TextTokenizer, sentencepiece_to_json, tokenize_by_cjk_char

__all__ = [
    "BOS_ID",
    "CHAR_REP_MAP",
    "EOS_ID",
    "SENTENCE_SPLIT_TOKENS",
    "SentenceBuffer",
    "TextNormalizer",
    "TextTokenizer",
    "ZH_CHAR_REP_MAP",
    "apply_char_rep_map",
    "correct_pinyin",
    "load_glossary",
    "sentencepiece_to_json",
    "split_segments",
    "tokenize_by_cjk_char",
    "use_chinese",
]
