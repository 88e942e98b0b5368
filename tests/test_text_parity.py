"""Text normalisation parity with upstream (WeTextProcessing 1.0.4.1 as IndexTTS2 runs it) and hostile text.

`data/text_normalization_corpus.txt` holds the inputs and `data/text_normalization_golden.json` what upstream's
own `TextNormalizer` returned for them (its header says how it was made: scripts/make_text_golden.py).
The tests also run the real normalisers themselves (WeTextProcessing 1.0.4.1 with pynini 2.1.6, the `dev`
extra, as upstream's uv.lock pins them) and compare, on the corpus and on seeded random text; without the
dev extra those tests fail.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ttsd.api.errors import ConfigError
from ttsd.pipeline.text import TextNormalizer, tn, use_chinese
from ttsd.pipeline.text import normalize as normalize_mod
from ttsd.pipeline.text.tn import EN_TN_ORDERS, TN_ORDERS, NormalizationFailed, parse_tokens, reorder

from .conftest import fixture_dirs

DATA = Path(__file__).resolve().parent / "data"
CORPUS = DATA / "text_normalization_corpus.txt"
GOLDEN = DATA / "text_normalization_golden.json"
GRAPHS = ["tn/en_tn_tagger.fst", "tn/en_tn_verbalizer.fst", "tn/zh_tn_tagger.fst"]
PYNINI_VERSION = "2.1.6"  # what upstream's uv.lock pins beside WeTextProcessing 1.0.4.1
# upstream's Chinese options (indextts/utils/front.py, TextNormalizer.load)
ZH_OPTIONS = {"remove_interjections": False, "remove_erhua": False, "overwrite_cache": False}


def read_corpus() -> list[str]:
    lines = CORPUS.read_text(encoding="utf-8").split("\n")
    return [line for line in lines if line and not line.startswith("#|")]


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GOLDEN.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def normalizer() -> TextNormalizer:
    return TextNormalizer()


def _mismatches(pairs: Iterator[tuple[str, object, object]]) -> list[tuple[str, object, object]]:
    return [(text, got, want) for text, got, want in pairs if got != want]


# ---------------------------------------------------------------------------------------------
# Against the stored golden file (always)


def test_golden_file_is_for_this_corpus(golden: dict[str, Any]) -> None:
    """The golden file was made from this corpus (≥ 300 lines, both paths) with WeTextProcessing 1.0.4.1."""
    header = golden["header"]
    assert header["corpus_sha256"] == hashlib.sha256(CORPUS.read_bytes()).hexdigest(), "rerun make_text_golden.py"
    assert header["WeTextProcessing"] == tn.WETEXTPROCESSING_VERSION
    assert header["pynini"] == PYNINI_VERSION
    texts = [case["text"] for case in golden["cases"]]
    assert texts == read_corpus()
    chinese = sum(use_chinese(t) for t in texts)
    assert len(texts) >= 300 and chinese >= 100 and len(texts) - chinese >= 150


def test_corpus_matches_upstream_golden(
    golden: dict[str, Any], normalizer: TextNormalizer, caplog: pytest.LogCaptureFixture
) -> None:
    """Every corpus line normalises exactly as upstream's TextNormalizer did on WeTextProcessing 1.0.4.1,
    and ttsd warns on exactly the lines where upstream's FST failed (and printed a traceback)."""
    warned = []
    outputs = []
    for case in golden["cases"]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ttsd.pipeline.text"):
            outputs.append(normalizer.normalize(case["text"]))
        if caplog.records:
            warned.append(case["text"])
    bad = _mismatches((c["text"], out, c["normalized"]) for c, out in zip(golden["cases"], outputs, strict=True))
    assert not bad, f"{len(bad)} of {len(golden['cases'])} differ, first: {bad[:5]}"
    assert warned == [c["text"] for c in golden["cases"] if c.get("upstream_fst_failed")]
    assert len(warned) >= 2


def test_indextts25_fixture_texts(normalizer: TextNormalizer) -> None:
    """IndexTTS-2.5 fixture sets normalise their text (after its char map) as upstream's 2.5 front end did."""
    sets = [d / "golden" / "manifest.json" for d in fixture_dirs() if d.name.startswith("indextts25-")]
    assert sets, "no IndexTTS-2.5 fixture set"
    for manifest in sets:
        for name, variant in json.loads(manifest.read_text(encoding="utf-8"))["variants"].items():
            meta = variant["meta"]
            got = [normalizer.normalize(t) for t in meta["text_after_char_rep_map"]]
            assert got == meta["normalized_text"], f"{manifest.parent.parent.name}/{name}"


def test_double_quotes_leave_no_backslash(normalizer: TextNormalizer) -> None:
    """A double quote in English becomes an apostrophe with no stray backslash before it (issue 10 item 11)."""
    assert normalizer.normalize('He said "hello" to me.') == "He said 'hello' to me."
    assert normalizer.normalize('A "double" and a \'single\' quote.') == "A 'double' and a 'single' quote."
    for text in ['"Quoted" at the start.', 'x "y" 3 "z"', '"', 'say ""twice"" now', '“curly” and "straight"']:
        assert "\\" not in normalizer.normalize(text), text
    # A backslash the text really has is kept, once.
    assert normalizer.normalize('A backslash \\" before a quote.') == "A backslash \\' before a quote."


# ---------------------------------------------------------------------------------------------
# Token parser (tn/token_parser.py semantics)


def test_token_parser_keeps_escapes_and_reorders() -> None:
    """Values keep their escapes; listed tokens print their fields in verbalizer order, others as tagged."""
    tagged = 'w { v: "a\\"b" } money { currency_maj: "dollars" integer_part: "five" } p { v: "\\\\" }'
    tokens = parse_tokens(tagged)
    assert [t.name for t in tokens] == ["w", "money", "p"]
    assert tokens[0].members == {"v": 'a\\"b'} and tokens[2].members == {"v": "\\\\"}
    assert reorder(tagged, EN_TN_ORDERS) == (
        'w { v: "a\\"b" } money { integer_part: "five" currency_maj: "dollars" } p { v: "\\\\" }'
    )


def test_token_parser_order_quirks() -> None:
    """Keys missing from a listed order are dropped, preserve_order keeps the tagger's, repeats print twice."""
    assert reorder('date { day: "d" extra: "x" year: "y" }', TN_ORDERS) == 'date { year: "y" day: "d" }'
    kept = 'date { preserve_order: "true" text: "t" year: "y" day: "d" }'
    assert reorder(kept, EN_TN_ORDERS) == kept
    assert reorder('char { value: "a" value: "b" }', TN_ORDERS) == 'char { value: "b" value: "b" }'


@pytest.mark.parametrize(
    "tagged",
    ['w { v: "never closed }', 'w { v: "ends in a backslash\\', "w { v", 'w { v: "a" }\tp { v: "b" }', "w {\n"],
)
def test_token_parser_rejects_where_upstream_hangs_or_asserts(tagged: str) -> None:
    """Text on which upstream's TokenParser loops forever or asserts raises NormalizationFailed at once."""
    with pytest.raises(NormalizationFailed):
        parse_tokens(tagged)


def test_chinese_verbalizer_rules() -> None:
    """Tokens verbalise per WeTextProcessing's zh rules: orders, inserted words, erhua kept, full-width folded."""
    zh = tn.chinese()
    assert zh.verbalize('fraction { numerator: "一" denominator: "三" }') == "三分之一"
    assert zh.verbalize('measure { numerator: "六十公里" denominator: "小时" }') == "每小时六十公里"
    assert zh.verbalize('date { day: "五日" month: "一月" year: "二零二四年" }') == "二零二四年一月五日"
    assert zh.verbalize('time { minute: "三十分" hour: "三点" noon: "下午" }') == "下午三点三十分"
    assert zh.verbalize('whitelist { erhua: "儿" } char { value: "\\"" } char { value: "，" }') == '儿",'
    for bad in ['date { day: "五日" }', 'nosuch { value: "x" }', 'whitelist { erhua: "子" }', 'char { value: "\\x" }']:
        with pytest.raises(NormalizationFailed):
            zh.verbalize(bad)


# ---------------------------------------------------------------------------------------------
# Hostile text


def _hostile_strings(seed: int, n: int) -> Iterator[str]:
    """Seeded random unicode: controls, combining marks, emoji, long digit runs, quotes and markup."""
    rng = random.Random(seed)
    pieces = [
        "\t", "\n", "\r", "\x00", "\x1b", "\x7f", "\u200b", "\u202e", "\ufeff", "\u0301\u0308", "e\u0301",
        "😀", "👨‍👩‍👧", "🇨🇳", "❤️", '"', "\\", '\\"', "{", "}", ': "', "w { v:", "} ", "[", "]", "<|x|>",
        "<字|ZI4>", "$", "%", "#", "*", "@", "&", "￥", "ＡＢＣ", "臺灣", "哪儿", "xuan4", "3:30", "1/2", "-5",
        "2024-01-05", "v1.2.3", "0.001", "1st", "https://x.y/z", "a@b.co", "Hello", "it's", "中文",
    ]
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(1, 12)):
            r = rng.random()
            if r < 0.5:
                parts.append(rng.choice(pieces))
            elif r < 0.6:
                parts.append("".join(rng.choice("0123456789") for _ in range(rng.randrange(8, 30))))
            else:
                cp = rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0x3000), rng.randrange(0x3000, 0xA000),
                                 rng.randrange(0xE000, 0x10000), rng.randrange(0x10000, 0x30000)])
                parts.append(chr(cp) if not 0xD800 <= cp < 0xE000 else "?")
            if rng.random() < 0.4:
                parts.append(" ")
        yield "".join(parts)


def test_hostile_text_never_raises_nor_logs_a_traceback(
    normalizer: TextNormalizer, caplog: pytest.LogCaptureFixture
) -> None:
    """Random hostile text always normalises to a string with at most one warning line and no traceback."""
    strings = list(_hostile_strings(seed=5, n=100))
    strings += ["\tleading tab", "\ud800 lone surrogate", "x\udfff", "", "1" * 120, "a" + "9" * 120, "\u0301" * 50]
    for text in strings:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ttsd.pipeline.text"):
            out = normalizer.normalize(text)
        assert isinstance(out, str)
        assert len(caplog.records) <= 1, (text, caplog.text)
        assert all(r.exc_info is None and r.levelno == logging.WARNING for r in caplog.records), (text, caplog.text)


def test_fst_failures_fall_back_as_upstream(normalizer: TextNormalizer, caplog: pytest.LogCaptureFixture) -> None:
    """Where the graphs have no path, English keeps its text and Chinese gives "" (upstream), each with one line."""
    with caplog.at_level(logging.WARNING, logger="ttsd.pipeline.text"):
        assert normalizer.normalize("\tIt's 5 o'clock.") == "\tIt is 5 o'clock."
        assert normalizer.normalize("你好\ud800") == ""
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]
    assert "lang=en result=unnormalised" in caplog.records[0].getMessage()
    assert "lang=zh result=empty" in caplog.records[1].getMessage()
    assert all("\n" not in r.getMessage() and r.exc_info is None for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Installation checks


def test_missing_or_wrong_wetextprocessing_is_one_config_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """No WeTextProcessing, another version or a changed graph each give one ConfigError line naming the fix."""
    real = importlib.metadata.distribution

    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    class Other:
        version = "1.2.0"

    check = tn.check_installed.__wrapped__  # uncached
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ConfigError, match="not installed: pip install --no-deps WeTextProcessing==1.0.4.1"):
        check()
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Other())
    with pytest.raises(ConfigError, match="found 1.2.0"):
        check()
    monkeypatch.setattr(importlib.metadata, "distribution", real)
    monkeypatch.setitem(tn.GRAPH_SHA256, "tn/en_tn_tagger.fst", "0" * 64)
    with pytest.raises(ConfigError, match="is not the file it ships") as err:
        check()
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Against the real WeTextProcessing 1.0.4.1 (dev extra: pynini 2.1.6)


@dataclass(frozen=True)
class Reference:
    en: Any  # tn.english.normalizer.Normalizer
    zh: Any  # tn.chinese.normalizer.Normalizer
    zh_cache: Path  # its cache_dir, as upstream's tagger_cache


def _wheel_path(rel: str) -> Path:
    return Path(str(importlib.metadata.distribution("WeTextProcessing").locate_file(rel)))


@pytest.fixture(scope="module")
def wetextprocessing(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """Upstream's two normalisers: tn.english as shipped, tn.chinese with upstream's options, read from a cache
    as every upstream run after the first reads it. Fails (never skips) without the dev extra."""
    try:
        importlib.import_module("pynini")
    except ImportError:
        pytest.fail(f"the reference run needs pynini {PYNINI_VERSION} (the dev extra: pip install -e '.[dev]')")
    assert importlib.metadata.version("pynini") == PYNINI_VERSION, "pynini is not the version upstream pins"
    assert importlib.metadata.version("WeTextProcessing") == tn.WETEXTPROCESSING_VERSION
    # WeTextProcessing's package is also called `tn`; importlib keeps it apart from ttsd's tn module.
    chinese_normalizer = importlib.import_module("tn.chinese.normalizer").Normalizer
    english_normalizer = importlib.import_module("tn.english.normalizer").Normalizer
    for name in ("wetext-zh_normalizer", "wetext-en_normalizer"):
        # build_fst() sets these loggers to INFO and gives them a stderr handler each time it runs, then logs
        # every graph it reads; a logger filter outlives both.
        logging.getLogger(name).addFilter(lambda record: record.levelno >= logging.WARNING)
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    key = f"wetextprocessing-{tn.WETEXTPROCESSING_VERSION}-pynini-{PYNINI_VERSION}-zh"
    cache_dir = cache.mkdir(key) if cache is not None else tmp_path_factory.mktemp("zh")
    verbalizer = cache_dir / "zh_tn_verbalizer.fst"
    if not verbalizer.is_file():
        # The graphs upstream's load() writes into tagger_cache on its first run. Its options change only the
        # verbalizer, so that is compiled here as build_fst() compiles it (5 s); the tagger it compiles is the
        # wheel's, byte for byte (test_upstream_compiled_the_wheels_zh_tagger), and compiling it again would
        # take 100 s. Written under another name first, so a killed run leaves no half graph behind.
        class VerbalizerOnly(chinese_normalizer):  # type: ignore[misc, valid-type]
            def build_fst(self, prefix: str, cache_dir: str, overwrite_cache: bool) -> None:
                self.build_verbalizer()
                self.verbalizer.optimize().write(str(Path(cache_dir) / "partial.fst"))

        VerbalizerOnly(cache_dir=str(cache_dir), **ZH_OPTIONS)
        shutil.copyfile(_wheel_path("tn/zh_tn_tagger.fst"), cache_dir / "zh_tn_tagger.fst")
        (cache_dir / "partial.fst").rename(verbalizer)
    return Reference(
        en=english_normalizer(overwrite_cache=False),
        zh=chinese_normalizer(cache_dir=str(cache_dir), **ZH_OPTIONS),
        zh_cache=cache_dir,
    )


def test_upstream_compiled_the_wheels_zh_tagger(golden: dict[str, Any], wetextprocessing: Reference) -> None:
    """The Chinese graphs upstream compiled with its options when the golden file was made are the wheel's
    tagger and the verbalizer the reference run compiles."""
    compiled = golden["header"]["zh_graphs_sha256"]
    assert compiled["zh_tn_tagger.fst"] == tn.GRAPH_SHA256["tn/zh_tn_tagger.fst"]
    built = hashlib.sha256((wetextprocessing.zh_cache / "zh_tn_verbalizer.fst").read_bytes()).hexdigest()
    assert compiled["zh_tn_verbalizer.fst"] == built


def _outcome(fn: Callable[[str], str], text: str) -> tuple[str, str]:
    try:
        return "ok", fn(text)
    except Exception:  # any failure, of either side, counts as "failed"
        return "failed", ""


def test_graphs_are_reordered_as_pynini_optimizes_them(tmp_path: Path, wetextprocessing: Reference) -> None:
    """tn.optimized() gives, byte for byte, the graph pynini's Fst.read().optimize() holds."""
    import pynini

    for rel in GRAPHS:
        path = _wheel_path(rel)
        pynini.Fst.read(str(path)).optimize().write(str(tmp_path / "opt.fst"))
        assert tn.optimized(path.read_bytes()) == (tmp_path / "opt.fst").read_bytes(), rel


def test_corpus_matches_wetextprocessing_run_here(
    golden: dict[str, Any], wetextprocessing: Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the corpus, upstream's recorded outputs equal the same TextNormalizer logic on the real
    WeTextProcessing graphs run here; with the test above (ttsd equals those outputs), ttsd's normaliser
    equals WeTextProcessing 1.0.4.1 on every line."""
    texts = [c["text"] for c in golden["cases"]]
    monkeypatch.setattr(normalize_mod, "_en_normalizer", lambda: wetextprocessing.en)
    monkeypatch.setattr(normalize_mod, "_zh_normalizer", lambda: wetextprocessing.zh)
    reference = TextNormalizer()
    recorded = [c["normalized"] for c in golden["cases"]]
    bad = _mismatches((t, want, reference.normalize(t)) for t, want in zip(texts, recorded, strict=True))
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[:5]}"


def _fst_mismatches(wetextprocessing: Reference, texts: list[str]) -> list[tuple[str, object, object]]:
    en, zh = wetextprocessing.en, wetextprocessing.zh
    pairs = []
    for text in texts:
        pairs.append((f"en:{text!r}", _outcome(tn.english().normalize, text), _outcome(en.normalize, text)))
        pairs.append((f"zh:{text!r}", _outcome(tn.chinese().normalize, text), _outcome(zh.normalize, text)))
    return _mismatches(iter(pairs))


def test_fst_normalizers_match_wetextprocessing_on_random_text(wetextprocessing: Reference) -> None:
    """Both graphs give WeTextProcessing's output (or fail where it fails) on seeded random text, whichever
    language it is in (3000 such strings, seed 1234, agreed with 1.0.4.1; 30 keep the suite fast)."""
    texts = list(_hostile_strings(seed=11, n=30))
    bad = _fst_mismatches(wetextprocessing, texts)
    assert not bad, f"{len(bad)} of {2 * len(texts)} differ, first: {bad[:5]}"


def test_no_output_on_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    """Running the graphs (including a text with no path) prints nothing on stdout or stderr."""
    with pytest.raises(NormalizationFailed):
        tn.english().normalize("\tx")
    tn.chinese().normalize("你好 123")
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
