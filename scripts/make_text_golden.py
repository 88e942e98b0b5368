"""Regenerate tests/data/text_normalization_golden.json: upstream's normaliser run on the parity corpus.

Runs the real thing: `TextNormalizer` from an index-tts checkout's indextts/utils/front.py (on Linux it
builds WeTextProcessing's `tn.chinese` / `tn.english` normalisers), on WeTextProcessing 1.0.4.1 with pynini
2.1.6 as upstream's uv.lock pins them (the `dev` extra). Nothing from ttsd is imported. Usage:

    python scripts/make_text_golden.py /path/to/index-tts   # a checkout at the commit named in the spec

front.py is copied into a temporary directory and imported from there, so its Chinese graph cache,
`tagger_cache/`, lands beside it and is always new. That matters: upstream never rebuilds an existing
cache, so a checkout whose cache was compiled under another WeTextProcessing keeps that version's Chinese
readings after the package changes. The Chinese graphs (about 100 s on 2 CPU cores) are compiled by a
first TextNormalizer and read back by a second one, which is the one used: WeTextProcessing keeps the
graphs it has just compiled (optimised once) but re-optimises graphs it reads, so only the second matches
every later run of upstream (they differ where equally weighted readings tie). The header records the
SHA-256 of the compiled graphs, which tests/test_text_parity.py compares with the ones ttsd uses.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "text_normalization_corpus.txt"
GOLDEN = ROOT / "tests" / "data" / "text_normalization_golden.json"


def read_corpus(path: Path) -> list[str]:
    """The corpus inputs: every line except blank ones and `#|` comments, without its newline."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return [line for line in lines if line and not line.startswith("#|")]


def _import_front(front: Path) -> Any:
    # front.py imports indextts.utils.common and sentencepiece for its tokenizer class only.
    common = types.ModuleType("indextts.utils.common")
    common.tokenize_by_CJK_char = lambda s: s  # type: ignore[attr-defined]
    common.de_tokenized_by_CJK_char = lambda s: s  # type: ignore[attr-defined]
    sys.modules.update(
        {"indextts": types.ModuleType("indextts"), "indextts.utils": types.ModuleType("indextts.utils"),
         "indextts.utils.common": common}
    )
    if importlib.util.find_spec("sentencepiece") is None:
        spm = types.ModuleType("sentencepiece")
        spm.SentencePieceProcessor = object  # type: ignore[attr-defined]
        sys.modules["sentencepiece"] = spm
    spec = importlib.util.spec_from_file_location("upstream_front", front)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("index_tts", type=Path, help="an index-tts checkout")
    args = parser.parse_args()
    for name in ("wetext-zh_normalizer", "wetext-en_normalizer"):
        # WeTextProcessing sets these to INFO with a stderr handler whenever it loads, then logs each graph.
        logging.getLogger(name).addFilter(lambda record: record.levelno >= logging.WARNING)
    src = args.index_tts / "indextts" / "utils" / "front.py"
    commit = subprocess.run(
        ["git", "-C", str(args.index_tts), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        front_path = Path(tmp) / "front.py"
        shutil.copy(src, front_path)
        front = _import_front(front_path)
        front.TextNormalizer(enable_glossary=True).load()  # compiles the Chinese graphs into tagger_cache/
        zh_graphs = {
            name: hashlib.sha256((Path(tmp) / "tagger_cache" / name).read_bytes()).hexdigest()
            for name in ("zh_tn_tagger.fst", "zh_tn_verbalizer.fst")
        }
        normalizer = front.TextNormalizer(enable_glossary=True)
        normalizer.load()  # reads them back, as every later upstream run does
        cases = []
        for text in read_corpus(CORPUS):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):  # upstream prints a traceback where its FST fails
                normalized = normalizer.normalize(text)
            case = {"text": text, "normalized": normalized}
            if "Traceback" in printed.getvalue():
                case["upstream_fst_failed"] = True
            cases.append(case)
    header = {
        "what": "upstream IndexTTS2 TextNormalizer(enable_glossary=True).normalize() on each corpus line",
        "made_by": "python scripts/make_text_golden.py <index-tts checkout>",
        "index_tts_commit": commit,
        "front_py_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        "corpus_sha256": hashlib.sha256(CORPUS.read_bytes()).hexdigest(),
        "WeTextProcessing": importlib.metadata.version("WeTextProcessing"),
        "pynini": importlib.metadata.version("pynini"),
        "python": sys.version.split()[0],
        "zh_graphs": "compiled by upstream's load() (remove_interjections=False, remove_erhua=False), then read back",
        "zh_graphs_sha256": zh_graphs,
        "en_graphs": "the WeTextProcessing wheel's tn/en_tn_*.fst, read by upstream's load()",
    }
    GOLDEN.write_text(
        json.dumps({"header": header, "cases": cases}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    print(f"wrote {GOLDEN} ({len(cases)} cases, {sum('upstream_fst_failed' in c for c in cases)} FST failures)")


if __name__ == "__main__":
    main()
