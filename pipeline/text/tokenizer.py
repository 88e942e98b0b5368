"""SentencePiece vocabulary as a `tokenizers` JSON, and upstream's TextTokenizer encode flow.

Ports `TextTokenizer` from indextts/utils/front.py and `tokenize_by_CJK_char` from
indextts/utils/common.py. Upstream encodes with a SentencePiece `bpe.model`; ttsd converts that
model once, at conversion time, into a HuggingFace `tokenizers` JSON (`sentencepiece_to_json`)
whose ids equal SentencePiece's, so the daemon needs no sentencepiece at run time.

SentencePiece semantics reproduced by the JSON (the `normalizer_spec` of the model proto):
  * the precompiled character map (nmt_nfkc for IndexTTS, which also maps a literal "▁" to a
    space), then leading/trailing spaces are dropped and runs of spaces collapse to one;
  * spaces become "▁" and one "▁" is prepended (the dummy prefix);
  * the whole normalised sentence is one word: BPE merges may cross "▁" exactly as in
    SentencePiece, which has no pre-tokenizer.
A piece is the normalised substring it covers; for unknown characters that is the text itself
(consecutive unknown characters fuse into one piece), as `sp.Encode(..., out_type=str)` returns.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ..errors import CheckpointError
from .normalize import TextNormalizer

log = logging.getLogger(__name__)

SPACE = "\u2581"  # "▁", SentencePiece's escaped space
BOS_ID = 0  # `<s>`: upstream hard-codes bos_token_id = 0 (the GPT's start_text_token)
EOS_ID = 1  # `</s>`: upstream hard-codes eos_token_id = 1 (the GPT's stop_text_token)

# SentencePiece ModelProto.SentencePiece.Type values.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType values.
_UNIGRAM, _BPE = 1, 2
# A Unigram vocabulary is a trie over the normalised text, so control pieces ("<s>") would match
# literal text there; SentencePiece never matches them. Their model entries get this suffix (a
# space never survives normalisation) and their real names live in `added_tokens`.
_UNMATCHABLE = "\x00 "

# common.py's CJK_RANGE_PATTERN (from nltk): every such character becomes its own word.
_CJK_SPLIT = re.compile(
    r"([\u1100-\u11ff\u2e80-\ua4cf\ua840-\uD7AF\uF900-\uFAFF\uFE30-\uFE4F\uFF65-\uFFDC\U00020000-\U0002FFFF])"
)
_CJK_CHAR = re.compile(_CJK_SPLIT.pattern[1:-1])


def tokenize_by_cjk_char(line: str) -> str:
    """Split every CJK character into its own word and upper-case every chunk (common.py)."""
    chunks = _CJK_SPLIT.split(line.strip())
    return " ".join(w.strip().upper() for w in chunks if w.strip())


# ---------------------------------------------------------------------------------------------
# Conversion (needs sentencepiece + protobuf; runs only inside ttsd-convert)


def _load_proto(bpe_model: Path) -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # protobuf missing, or a sentencepiece without the generated module
        raise RuntimeError(
            "converting bpe.model needs `sentencepiece` and `protobuf` (pip install 'ttsd[convert]')"
        ) from e
    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]  # generated, no stubs
    try:
        proto.ParseFromString(Path(bpe_model).read_bytes())
    except Exception as e:  # protobuf's DecodeError, or OSError for an unreadable file
        raise CheckpointError(f"{bpe_model}: not a SentencePiece model: {e}") from e
    if not proto.pieces:
        raise CheckpointError(f"{bpe_model}: SentencePiece model has no pieces")
    return proto


def _normalizer(proto: Any) -> dict[str, Any]:
    """`tokenizers` normaliser equal to SentencePiece's normalizer.cc for this model."""
    spec = proto.normalizer_spec
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise CheckpointError("SentencePiece models with treat_whitespace_as_suffix are not supported")
    steps: list[dict[str, Any]] = []
    if spec.precompiled_charsmap:
        charsmap = base64.b64encode(spec.precompiled_charsmap).decode("ascii")
        steps.append({"type": "Precompiled", "precompiled_charsmap": charsmap})

    def replace(pattern: str, content: str, regex: bool = True) -> dict[str, Any]:
        return {"type": "Replace", "pattern": {"Regex" if regex else "String": pattern}, "content": content}

    if spec.remove_extra_whitespaces:
        steps.append(replace(r"\A +", ""))  # \A and \z: onig's ^ and $ are line anchors
        # SentencePiece trims trailing whitespace after escaping, so a literal "▁" at the end goes too.
        steps.append(replace(r"[ \u2581]+\z" if spec.escape_whitespaces else r" +\z", ""))
        steps.append(replace(r" {2,}", " "))
    if spec.escape_whitespaces:
        steps.append(replace(" ", SPACE, regex=False))
    if spec.add_dummy_prefix:
        # Prepend leaves an empty string empty, as SentencePiece encodes "" and "  " to [].
        steps.append({"type": "Prepend", "prepend": SPACE})
    return {"type": "Sequence", "normalizers": steps}


def _bpe_merges(pieces: Sequence[Any]) -> list[list[str]]:
    """Every (left, right) split of every mergeable piece, best-scored piece first.

    SentencePiece BPE repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring vocabulary piece, whatever the split; listing all splits in score order
    makes `tokenizers`' rank-ordered merging pick the same pair."""
    # A symbol is a single character or a merged normal piece; user-defined pieces stay frozen.
    symbols = {p.piece for p in pieces if p.type == _NORMAL}
    symbols |= {c for p in pieces if p.type == _NORMAL for c in p.piece}
    order = sorted(
        (i for i, p in enumerate(pieces) if p.type == _NORMAL and len(p.piece) > 1),
        key=lambda i: (-pieces[i].score, i),
    )
    merges: list[list[str]] = []
    for i in order:
        piece = pieces[i].piece
        for k in range(1, len(piece)):
            if piece[:k] in symbols and piece[k:] in symbols:
                merges.append([piece[:k], piece[k:]])
    return merges


def sentencepiece_to_json(bpe_model: Path) -> str:
    """Convert a SentencePiece model file (BPE or Unigram) into a `tokenizers` JSON string.

    Ids equal SentencePiece's for every input when encoded with `encode_special_tokens = True`
    (so that literal "<s>" in text is text, as in SentencePiece) and `add_special_tokens=False`;
    `TextTokenizer` does both."""
    proto = _load_proto(bpe_model)
    pieces = list(proto.pieces)
    model_type = proto.trainer_spec.model_type
    unk_ids = [i for i, p in enumerate(pieces) if p.type == _UNKNOWN]
    if len(unk_ids) != 1:
        raise CheckpointError(f"{bpe_model}: expected exactly one unknown piece, found {len(unk_ids)}")
    unk_id = unk_ids[0]
    # Pieces SentencePiece never matches in text. Unigram also skips unused pieces in its lattice.
    unmatched = (_UNKNOWN, _CONTROL, _UNUSED) if model_type == _UNIGRAM else (_UNKNOWN, _CONTROL)
    reserved = {i for i, p in enumerate(pieces) if p.type in unmatched}
    byte_fallback = bool(proto.trainer_spec.byte_fallback)

    model: dict[str, Any]
    if model_type == _BPE:
        model = {
            "type": "BPE",
            "dropout": None,
            "unk_token": pieces[unk_id].piece,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,  # SentencePiece emits a run of unknown characters as one piece
            "byte_fallback": byte_fallback,
            "ignore_merges": False,
            "vocab": {p.piece: i for i, p in enumerate(pieces)},
            "merges": _bpe_merges(pieces),
        }
    elif model_type == _UNIGRAM:
        vocab = [[p.piece + (_UNMATCHABLE if i in reserved else ""), p.score] for i, p in enumerate(pieces)]
        model = {"type": "Unigram", "unk_id": unk_id, "vocab": vocab, "byte_fallback": byte_fallback}
    else:
        raise CheckpointError(f"{bpe_model}: model_type {model_type} unsupported (BPE or UNIGRAM)")

    added = [
        {
            "id": i,
            "content": p.piece,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": p.type == _USER_DEFINED,  # SentencePiece matches user symbols after normalising
            "special": p.type != _USER_DEFINED,
        }
        for i, p in enumerate(pieces)
        if i in reserved or p.type == _USER_DEFINED
    ]
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": _normalizer(proto),
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "always", "split": False},
        "model": model,
    }
    text = json.dumps(doc, ensure_ascii=False, indent=1)
    _check_against_sentencepiece(bpe_model, text)  # fail at conversion time, not at daemon start
    return text


# Probe strings for the conversion self-check: the kinds of text the front end produces plus
# whitespace and Unicode oddities where SentencePiece and `tokenizers` normalisers could differ.
_PROBES = (
    "HELLO WORLD, THIS IS A TEST OF THREE APPLES AT EIGHT AM.",
    "你 好 世 界 是 HELLO WORLD, XING2 JVE2 NG1 ER5",
    "  leading, trailing  and   inner\tspaces\n ",
    "A▁▁B ▁ C▁",
    "…'\"-!?.,;:()[]《》“”，。！？、：；",
    "3.5 8:00 2025 ①²Ⅻ ﬁ ß İ ǅ e\u0301 E\u0301 Ａｂｃ１２ \u3000\xa0\u2009\u200b",
    "😀😀 👍🏽 🇨🇳 ❤️ 👨\u200d👩\u200d👧 <s> </s> <unk>",
)


def _check_against_sentencepiece(bpe_model: Path, text: str) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(bpe_model))
    tok = TextTokenizer(tokenizer=Tokenizer.from_str(text))
    for probe in _PROBES:
        for s in (probe, probe.upper(), probe.lower()):
            want = sp.encode(s, out_type=str), sp.encode(s)
            got = tok.encode_pieces(s), tok.encode_ids(s)
            if got != want:
                raise CheckpointError(f"{bpe_model}: converted tokenizer differs from SentencePiece on {s!r}")


# ---------------------------------------------------------------------------------------------
# Run time


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class TextTokenizer:
    """Upstream's TextTokenizer over a converted `tokenizer.json`.

    `tokenize(text)` returns SentencePiece pieces (normalised substrings), `convert_tokens_to_ids`
    maps pieces to ids with unknown pieces → `unk_id`."""

    tokenizer: Tokenizer
    normalizer: TextNormalizer | None = None
    unk_id: int = field(init=False)
    _piece_to_id: dict[str, int] = field(init=False, repr=False)
    _user_pattern: re.Pattern[str] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        doc = json.loads(self.tokenizer.to_str())
        model = doc["model"]
        added = doc.get("added_tokens") or []
        if model["type"] == "BPE":
            piece_to_id = dict(model["vocab"])
            unk_id = piece_to_id[model["unk_token"]]
        elif model["type"] == "Unigram":
            piece_to_id = {}
            for i, (piece, _) in enumerate(model["vocab"]):
                piece_to_id.setdefault(piece, i)
            unk_id = int(model["unk_id"])
        else:
            raise CheckpointError(f"tokenizer.json: unsupported model type {model['type']!r}")
        # Reserved pieces' real names (Unigram entries carry an unmatchable suffix).
        piece_to_id.update({t["content"]: int(t["id"]) for t in added})
        users = sorted((t["content"] for t in added if not t["special"]), key=len, reverse=True)
        pattern = re.compile("|".join(re.escape(u) for u in users)) if users else None
        object.__setattr__(self, "unk_id", unk_id)
        object.__setattr__(self, "_piece_to_id", piece_to_id)
        object.__setattr__(self, "_user_pattern", pattern)

    @classmethod
    def from_file(cls, path: Path, normalizer: TextNormalizer | None = None) -> TextTokenizer:
        """Load a converted `tokenizer.json`; with a normaliser, multi-character text is normalised."""
        return cls(tokenizer=Tokenizer.from_file(str(path)), normalizer=normalizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def encode_pieces(self, text: str) -> list[str]:
        """Raw SentencePiece encode of `text` into pieces (no TextNormalizer, no upper-casing)."""
        return [piece for piece, _ in self._encode(text)]

    def encode_ids(self, text: str) -> list[int]:
        """Raw SentencePiece encode of `text` into ids (no TextNormalizer, no upper-casing)."""
        return [i for _, i in self._encode(text)]

    def _encode(self, text: str) -> list[tuple[str, int]]:
        assert self.tokenizer.normalizer is not None  # sentencepiece_to_json always writes one
        normalized = self.tokenizer.normalizer.normalize_str(text)
        out: list[tuple[str, int]] = []
        chunks = self._user_pattern.split(normalized) if self._user_pattern else [normalized]
        users = self._user_pattern.findall(normalized) if self._user_pattern else []
        for n, chunk in enumerate(chunks):
            raw = chunk.encode("utf-8")
            # Model offsets are byte offsets into the chunk; the piece is the covered substring,
            # which for an unknown token is the text itself, as SentencePiece reports it.
            for t in self.tokenizer.model.tokenize(chunk):
                s, e = t.offsets
                out.append((raw[s:e].decode("utf-8"), t.id))
            if n < len(users):
                out.append((users[n], self._piece_to_id[users[n]]))
        return out

    def tokenize(self, text: str) -> list[str]:
        """Upstream `TextTokenizer.tokenize`: text → pieces.

        Empty text gives []; text that is one character after strip() is encoded raw (no
        normalisation, no upper-casing); anything else is normalised, CJK-split and upper-cased."""
        if len(text) == 0:
            return []
        if len(text.strip()) == 1:
            return self.encode_pieces(text)
        if self.normalizer is not None:
            text = self.normalizer.normalize(text)
        return self.encode_pieces(tokenize_by_cjk_char(text))

    def encode(self, text: str) -> list[int]:
        """`tokenize` followed by `convert_tokens_to_ids`."""
        return self.convert_tokens_to_ids(self.tokenize(text))

    def convert_tokens_to_ids(self, pieces: Sequence[str]) -> list[int]:
        """Pieces → ids (SentencePiece PieceToId); a piece outside the vocabulary → `unk_id`.

        Logs a warning listing such pieces, as infer_v2 prints one."""
        ids = [self._piece_to_id.get(p, self.unk_id) for p in pieces]
        unknown = [p for p, i in zip(pieces, ids, strict=True) if i == self.unk_id]
        if unknown:
            log.warning("unknown tokens count=%d unk_id=%d pieces=%r", len(unknown), self.unk_id, unknown)
        return ids

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Ids → vocabulary pieces (reserved pieces by their real names)."""
        out = []
        for i in ids:
            piece = self.tokenizer.id_to_token(i)
            if piece is None:
                raise IndexError(f"token id {i} outside the vocabulary of {self.vocab_size}")
            out.append(piece.removesuffix(_UNMATCHABLE))
        return out

    def decode(self, pieces: Sequence[str]) -> str:
        """Pieces → readable text: "▁" becomes a space and spaces between CJK characters go.

        For display only (upstream's decode also undoes tokenize_by_CJK_char)."""
        text = "".join(pieces).replace(SPACE, " ").strip()
        text = re.sub(r"\s+", " ", text)
        return re.sub(rf"(?<={_CJK_CHAR.pattern}) (?={_CJK_CHAR.pattern})", "", text)
