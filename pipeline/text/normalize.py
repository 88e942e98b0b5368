"""Text normalisation before tokenisation: numbers, dates, symbols → words, punctuation folded.

Ports `TextNormalizer` from indextts/utils/front.py (IndexTTS2 constructs it with
`enable_glossary=True`; a `glossary.yaml` beside the checkpoint replaces the term glossary).
The FST back end is WeTextProcessing 1.0.4.1, as upstream's lock file installs it on Linux (`tn.py`: its graphs
run with kaldifst, configured like upstream: interjections and erhua kept, traditional characters
become simplified and full-width characters half-width).

Every quirk of the upstream function is kept on purpose (see the spec, §1.1): the Chinese path
returns "" when the FST fails, `，，，` becomes `,,,` (the alternation tries `，` first), all
brackets and quotes become `'`, placeholders are restored with plain `str.replace`. Where upstream
prints a traceback (text the graphs cannot process), ttsd logs one warning line instead.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from .tn import NormalizationFailed, check_installed, chinese, english

log = logging.getLogger(__name__)

# `<字|读音>` pronunciation annotations (added with IndexTTS-2.5, active for v2 too).
G2P_ANNOTATION_PATTERN = re.compile(r"<([^|>\n]+)\|([^>\n]+)>")
# Toned pinyin such as xuan4, jve2, shang5; not beta1 or voice2. Used case-insensitively, which also
# makes the look-behind reject upper-case letters.
PINYIN_TONE_PATTERN = re.compile(
    r"(?<![a-z])((?:[bpmfdtnlgkhjqxzcsryw]|[zcs]h)?(?:[aeiouüv]|[ae]i|u[aio]|ao|ou|i[aue]|[uüv]e|[uvü]ang?|uai"
    r"|[aeiuv]n|[aeio]ng|ia[no]|i[ao]ng)|ng|er)([1-5])",
    re.IGNORECASE,
)
# Chinese names joined by -, · or —, e.g. 克里斯托弗·诺兰.
NAME_PATTERN = re.compile(r"[\u4e00-\u9fff]+(?:[-·—][\u4e00-\u9fff]+){1,2}", re.IGNORECASE)
# Hyphenated technical terms starting with a letter (GPT-5-nano, F5-TTS), not phone numbers.
TECH_TERM_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)+")
# Only these `'s` contractions become "is"; a possessive `'s` is left alone.
ENGLISH_CONTRACTION_PATTERN = re.compile(
    r"(what|where|who|which|how|t?here|it|s?he|that|this)'s", re.IGNORECASE
)
EMAIL_PATTERN = re.compile(r"^[a-zA-Z0-9]+@[a-zA-Z0-9]+\.[a-zA-Z]+$")
_JQX_U_PATTERN = re.compile(r"([jqx])[uü](n|e|an)*(\d)", re.IGNORECASE)
_TECH_HYPHEN = "<H>"
_TECH_RESTORE_PATTERN = re.compile(r"\s*<H>\s*")

# Upstream's dict order matters: the alternation tries keys in this order at each position.
CHAR_REP_MAP: dict[str, str] = {
    "：": ",",
    "；": ",",
    ";": ",",
    "，": ",",
    "。": ".",
    "！": "!",
    "？": "?",
    "\n": " ",
    "·": "-",
    "、": ",",
    "...": "…",
    ",,,": "…",
    "，，，": "…",
    "……": "…",
    "“": "'",
    "”": "'",
    '"': "'",
    "‘": "'",
    "’": "'",
    "（": "'",
    "）": "'",
    "(": "'",
    ")": "'",
    "《": "'",
    "》": "'",
    "【": "'",
    "】": "'",
    "[": "'",
    "]": "'",
    "—": "-",
    "～": "-",
    "~": "-",
    "「": "'",
    "」": "'",
    ":": ",",
}
ZH_CHAR_REP_MAP: dict[str, str] = {"$": ".", **CHAR_REP_MAP}


@functools.cache
def _alternation(keys: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(k) for k in keys))


def apply_char_rep_map(text: str, table: Mapping[str, str]) -> str:
    """Replace every key of `table` by its value, as one regex alternation over the keys in dict
    order: at each position the first key that matches wins (so `，` beats `，，，`)."""
    return _alternation(tuple(table)).sub(lambda m: table[m.group()], text)


class _Normalizer(Protocol):
    def normalize(self, text: str) -> str: ...


def _zh_normalizer() -> _Normalizer:
    return chinese()


def _en_normalizer() -> _Normalizer:
    return english()


def _spreadsheet_tag(n: int) -> str:
    """0 → a, 25 → z, 26 → aa, 27 → ab, ... (the G2P placeholder tags)."""
    s = ""
    while True:
        s = chr(ord("a") + n % 26) + s
        n = n // 26 - 1
        if n < 0:
            return s


def _distinct_longest_first(items: list[str]) -> list[str]:
    # Upstream iterates a Python `set` (any order, per process). Longest first is one of those
    # orders, and the one in which no placeholder replacement cuts into a longer match.
    return sorted(dict.fromkeys(items), key=len, reverse=True)


def use_chinese(text: str) -> bool:
    """Upstream's routing: CJK, no ASCII letter, a bare e-mail, or toned pinyin → Chinese path."""
    has_chinese = re.search(r"[\u4e00-\u9fff]", text) is not None
    has_alpha = re.search(r"[a-zA-Z]", text) is not None
    if has_chinese or not has_alpha or EMAIL_PATTERN.match(text) is not None:
        return True
    return PINYIN_TONE_PATTERN.search(text) is not None


def correct_pinyin(pinyin: str) -> str:
    """j/q/x + u/ü finals are written with v and upper-cased (ju4 → JV4); others unchanged."""
    if pinyin[0] not in "jqxJQX":
        return pinyin
    return _JQX_U_PATTERN.sub(r"\g<1>v\g<2>\g<3>", pinyin).upper()


def load_glossary(path: Path) -> dict[str, Any] | None:
    """Read a glossary YAML (`term: reading` or `term: {en: ..., zh: ...}`); None if absent/empty."""
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return data if isinstance(data, dict) and data else None


@dataclass(frozen=True, kw_only=True, slots=True)
class TextNormalizer:
    """Upstream TextNormalizer; `normalize(text)` is the whole function.

    `glossary` maps a term to its reading (a string, or a dict with "zh"/"en" entries);
    `glossary_path`, when it names an existing non-empty YAML dict, replaces `glossary`
    (as IndexTTS2 does with `<model_dir>/glossary.yaml`)."""

    glossary: Mapping[str, Any] = field(default_factory=dict)
    glossary_path: Path | None = None
    enable_glossary: bool = True
    _terms: tuple[tuple[str, re.Pattern[str], Any], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        glossary = self.glossary
        if self.glossary_path is not None:
            glossary = load_glossary(Path(self.glossary_path)) or glossary
        # Longest term first, so "PCIe 5.0" is replaced before "PCIe"; sorted() keeps dict order on ties.
        terms = tuple(
            (str(term), re.compile(re.escape(str(term)), re.IGNORECASE), glossary[term])
            for term in sorted(glossary, key=lambda t: len(str(t)), reverse=True)
        )
        object.__setattr__(self, "_terms", terms)
        # A missing or wrong WeTextProcessing install fails here, when the pipeline loads, in one line.
        check_installed()

    def load(self) -> None:
        """Read the FST graphs now (about a second; they are otherwise read on first use)."""
        _zh_normalizer()
        _en_normalizer()

    def normalize(self, text: str) -> str:
        text, annotations = self._protect_annotations(text)
        if use_chinese(text):
            result = self._normalize_zh(text)
        else:
            result = self._normalize_en(text)
        for key, original in annotations.items():
            result = result.replace(key, original)
        return result

    def _normalize_zh(self, text: str) -> str:
        text = ENGLISH_CONTRACTION_PATTERN.sub(r"\1 is", text)
        if self.enable_glossary:
            text = self._apply_glossary(text, "zh")
        replaced, tech_terms = self._save_tech_terms(text.rstrip())
        replaced, pinyins = self._save(replaced, PINYIN_TONE_PATTERN, "pinyin")
        replaced, names = self._save(replaced, NAME_PATTERN, "n")
        try:
            result = _zh_normalizer().normalize(replaced)
        except NormalizationFailed as e:  # upstream prints the traceback and speaks nothing
            log.warning("text normalisation failed lang=zh result=empty (as upstream) chars=%d reason=%s", len(text), e)
            result = ""
        except Exception:  # as upstream; only a bug gets here
            log.exception("text normalisation raised lang=zh result=empty")
            result = ""
        for i, name in enumerate(names):
            result = result.replace(f"<n_{chr(ord('a') + i)}>", name)
        for i, pinyin in enumerate(pinyins):
            result = result.replace(f"<pinyin_{chr(ord('a') + i)}>", correct_pinyin(pinyin))
        if tech_terms:
            result = _TECH_RESTORE_PATTERN.sub("-", result)
        return apply_char_rep_map(result, ZH_CHAR_REP_MAP)

    def _normalize_en(self, text: str) -> str:
        try:
            text = ENGLISH_CONTRACTION_PATTERN.sub(r"\1 is", text)
            if self.enable_glossary:
                text = self._apply_glossary(text, "en")
            replaced, tech_terms = self._save_tech_terms(text)
            result = _en_normalizer().normalize(replaced)
            if tech_terms:
                result = _TECH_RESTORE_PATTERN.sub("-", result)
        except NormalizationFailed as e:  # upstream falls back to the text after contractions and glossary
            log.warning(
                "text normalisation failed lang=en result=unnormalised (as upstream) chars=%d reason=%s", len(text), e
            )
            result = text
        except Exception:  # as upstream, e.g. a glossary reading that is a bad re template; a bug otherwise
            log.exception("text normalisation raised lang=en result=unnormalised")
            result = text
        return apply_char_rep_map(result, CHAR_REP_MAP)

    def _apply_glossary(self, text: str, lang: str) -> str:
        for term, pattern, value in self._terms:
            reading = value.get(lang, term) if isinstance(value, Mapping) else value
            # Upstream passes the reading to re.sub as a template, so backslashes are escapes.
            text = pattern.sub(str(reading), text)
        return text

    @staticmethod
    def _protect_annotations(text: str) -> tuple[str, dict[str, str]]:
        placeholders: dict[str, str] = {}

        def replace(m: re.Match[str]) -> str:
            key = f"PRONPLACEHOLDER{_spreadsheet_tag(len(placeholders))}PRONPLACEHOLDER"
            placeholders[key] = m.group(0)
            return key

        return G2P_ANNOTATION_PATTERN.sub(replace, text), placeholders

    @staticmethod
    def _save_tech_terms(text: str) -> tuple[str, list[str]]:
        terms = _distinct_longest_first(TECH_TERM_PATTERN.findall(text))
        for term in terms:
            text = text.replace(term, term.replace("-", _TECH_HYPHEN))
        return text, terms

    @staticmethod
    def _save(text: str, pattern: re.Pattern[str], prefix: str) -> tuple[str, list[str]]:
        found = ["".join(m) if isinstance(m, tuple) else m for m in pattern.findall(text)]
        items = _distinct_longest_first(found)
        for i, item in enumerate(items):
            text = text.replace(item, f"<{prefix}_{chr(ord('a') + i)}>")
        return text, items
