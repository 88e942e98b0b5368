"""WeTextProcessing 1.0.4.1 text normalisation (TN), English and Chinese, run with kaldifst instead of pynini.

Upstream IndexTTS2 on Linux normalises with WeTextProcessing 1.0.4.1 (the version its uv.lock pins, with
pynini 2.1.6): `tn.english.normalizer.Normalizer(overwrite_cache=False)` on the graphs its wheel ships, and
`tn.chinese.normalizer.Normalizer(remove_interjections=False, remove_erhua=False, overwrite_cache=False)`,
which it compiles with pynini into `indextts/utils/tagger_cache` and reads back on every later run. This
module ports the run-time half of that library: `Processor.tag` / `Processor.verbalize` (tn/processor.py),
the `TokenParser` that reorders tagged tokens between the two (tn/token_parser.py), and the Chinese
verbalizer rules (tn/chinese/rules/*.py) with upstream's options. The library's own FST files run on kaldifst.

Where the graphs come from: the WeTextProcessing 1.0.4.1 wheel, installed without its dependencies
(`pip install --no-deps WeTextProcessing==1.0.4.1`, as scripts/setup.sh does), located through its
distribution metadata (its `tn` package imports pynini, so it is never imported) and checked by
version and SHA-256. Chinese uses the wheel's tagger: upstream's options change only the verbalizer, and
the tagger pynini 2.1.6 compiles with them is byte-identical to the wheel's (scripts/make_text_golden.py
records the digest of the one upstream compiled; tests/test_text_parity.py compares). The wheel's
verbalizer removes erhua and interjections, so the verbalizer is ported instead: for the tagger's
well-formed tokens it is a deterministic function (markup stripped, fixed words inserted, full-width →
half-width per token).

Why not depend on WeTextProcessing itself: it needs pynini (a 155 MB wheel, pinned to 2.1.6 by 1.0.4.1),
compiles the Chinese graphs with upstream's options on first use (100 s on 2 CPU cores, into a writable
cache), and keeps whatever that cache holds even after the package changes. This runtime adds kaldifst
(3.9 MB) and the wheel's files (2 MB wheel), and compiles nothing. Measured on the 433-line parity corpus,
two runs on 2 shared CPU cores (load average 2 to 6): a median of 21-35 ms per English line and 2.1-3.1 ms
per Chinese one here, 61-95 ms and 6.3-9.5 ms with WeTextProcessing itself (1.0.4.1's English tagger takes
about twice as long as 1.2.0's on the same lines).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import string
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ttsd.api.errors import ConfigError

WETEXTPROCESSING_VERSION = "1.0.4.1"
NEEDS = f"text normalisation needs WeTextProcessing {WETEXTPROCESSING_VERSION}"
INSTALL_HINT = f"pip install --no-deps WeTextProcessing=={WETEXTPROCESSING_VERSION}"
# SHA-256 of the files used from the WeTextProcessing 1.0.4.1 wheel (its RECORD lists the same digests).
GRAPH_SHA256: dict[str, str] = {
    "tn/en_tn_tagger.fst": "c98302c885019df7aadf9cabe8cd019ff0d24acfa22a8037b8b5b821b49b93e3",
    "tn/en_tn_verbalizer.fst": "0dc2bd8496a8e4a169592495b15dc1849d502097c8a3d3875346a173761b48b4",
    "tn/zh_tn_tagger.fst": "bc87c97977560ef392c0b566b8d0de5a4b48ab6f5491c5947db2a3067318ddc0",
    "tn/chinese/data/char/fullwidth_to_halfwidth.tsv": (
        "5ecf64c3296aac9a7e130e59ff7d7af3a2f67a503caf6e2ad0560aa8f7cd45ee"
    ),
}

# Token field orders the verbalizers expect (tn/token_parser.py); a token whose name is listed
# prints only these keys, in this order, unless it carries preserve_order: "true".
TN_ORDERS: dict[str, list[str]] = {
    "date": ["year", "month", "day"],
    "fraction": ["denominator", "numerator"],
    "measure": ["denominator", "numerator", "value"],
    "money": ["value", "currency"],
    "time": ["noon", "hour", "minute", "second"],
}
EN_TN_ORDERS: dict[str, list[str]] = {
    "date": ["preserve_order", "text", "day", "month", "year"],
    "money": ["integer_part", "fractional_part", "quantity", "currency_maj"],
}

# Chinese verbalizer (tn/chinese/rules/*.py `build_verbalizer`): for each token name, the key sequences
# it accepts and the text inserted before each key's value. "value" alone is Processor.build_verbalizer.
_Fields = tuple[tuple[str, str], ...]  # (key, text inserted before its value) in printed order
_VALUE: tuple[_Fields, ...] = ((("value", ""),),)
ZH_VERBALIZER: dict[str, tuple[_Fields, ...]] = {
    "cardinal": _VALUE,
    "char": _VALUE,
    "math": _VALUE,
    "date": tuple(
        tuple((k, "") for k in keys)
        for keys in (("month",), ("year", "month"), ("month", "day"), ("year", "month", "day"))
    ),
    "fraction": ((("denominator", ""), ("numerator", "分之")),),
    "measure": _VALUE + ((("denominator", "每"), ("numerator", "")),),
    "money": ((("value", ""), ("currency", "")),),
    "sport": _VALUE + ((("team", ""), ("score", "")),),
    "time": tuple(
        tuple((k, "") for k in keys)
        for keys in (
            ("hour", "minute"),
            ("noon", "hour", "minute"),
            ("hour", "minute", "second"),
            ("noon", "hour", "minute", "second"),
        )
    ),
    # remove_erhua=False: an erhua token keeps its 儿 (and holds nothing else).
    "whitelist": _VALUE + ((("erhua", ""),),),
}


class NormalizationFailed(Exception):
    """The graphs or the token parser cannot process this text (where upstream raises or hangs)."""


# ---------------------------------------------------------------------------------------------
# Token parser


_EOS = None  # the parser's current character past the end of the text
_KEY_CHARS = frozenset(string.ascii_letters + "_")


@dataclass(slots=True)
class Token:
    """One tagged token: `name { key: "value" ... }`; values keep their backslash escapes."""

    name: str
    keys: list[str] = field(default_factory=list)  # in tagger order, repeats kept
    members: dict[str, str] = field(default_factory=dict)  # a repeated key keeps its last value

    def fields(self, orders: dict[str, list[str]]) -> list[tuple[str, str]]:
        """(key, value) pairs in the order the token is printed for the verbalizer."""
        keys = self.keys
        if self.name in orders and self.members.get("preserve_order") != "true":
            keys = orders[self.name]
        return [(k, self.members[k]) for k in keys if k in self.members]

    def string(self, orders: dict[str, list[str]]) -> str:
        return self.name + " {" + "".join(f' {k}: "{v}"' for k, v in self.fields(orders)) + " }"


class _Cursor:
    """TokenParser's character cursor: `char` is None once the text is exhausted."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.index = 0
        self.char: str | None = text[0]

    def read(self) -> bool:
        if self.index < len(self.text) - 1:
            self.index += 1
            self.char = self.text[self.index]
            return True
        self.char = _EOS
        return False

    def skip_spaces(self) -> bool:
        while self.char == " ":
            self.read()
        return self.char is not _EOS

    def take(self, expected: str) -> None:
        # TokenParser.parse_chars: try each character in turn, consuming those that match.
        for c in expected:
            if self.char == c:
                self.read()

    def key(self) -> str:
        if self.char is _EOS or self.char in string.whitespace:
            # upstream: AssertionError in parse_key
            raise NormalizationFailed(f"tagged text has no key at offset {self.index}")
        key = ""
        while self.char is not _EOS and self.char in _KEY_CHARS:
            key += self.char
            self.read()
        return key

    def value(self) -> str:
        # Up to the next unescaped quote; a backslash takes the next character with it. Upstream
        # asserts at the end of the text on entry and loops forever if the quote never comes.
        chars = []
        while self.char != '"':
            if self.char is _EOS:
                raise NormalizationFailed("tagged text ends inside a value")
            escape = self.char == "\\"
            chars.append(self.char)
            self.read()
            if escape:
                if self.char is _EOS:
                    raise NormalizationFailed("tagged text ends inside a value")
                chars.append(self.char)
                self.read()
        return "".join(chars)


def parse_tokens(tagged: str) -> list[Token]:
    """Split tagger output into tokens exactly as WeTextProcessing's TokenParser.parse does,
    raising NormalizationFailed where it would raise AssertionError or never return."""
    if not tagged:
        raise NormalizationFailed("empty tagged text")
    cur = _Cursor(tagged)
    tokens = []
    while cur.skip_spaces():
        token = Token(cur.key())
        cur.take(" { ")
        while cur.skip_spaces():
            if cur.char == "}":
                cur.read()
                break
            key = cur.key()
            cur.take(': "')
            value = cur.value()
            cur.take('"')
            token.keys.append(key)
            token.members[key] = value
        tokens.append(token)
    return tokens


def reorder(tagged: str, orders: dict[str, list[str]]) -> str:
    """TokenParser.reorder: tokens re-printed with their fields in verbalizer order."""
    return "".join(t.string(orders) + " " for t in parse_tokens(tagged)).strip()


# ---------------------------------------------------------------------------------------------
# Graphs


class _Graph:
    """One FST applied by its shortest path, as pynini's `shortestpath(text @ fst).string()`.

    `fst_bytes` is the graph as upstream holds it in memory (see `optimized`): ties between equally
    weighted paths are broken by arc order, so the order must be the one pynini's `optimize()` leaves."""

    def __init__(self, name: str, fst_bytes: bytes) -> None:
        import kaldifst

        self.name = name
        # kaldifst reads graphs only from a path; the file is gone once read.
        with tempfile.TemporaryDirectory(prefix="ttsd-tn-") as tmp:
            path = Path(tmp) / name
            path.write_bytes(fst_bytes)
            self._rewriter = kaldifst.TextNormalizer(str(path))
            self._fst = kaldifst.StdVectorFst.read(str(path))  # to tell "no path" from an empty output

    def __call__(self, text: str) -> str:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise NormalizationFailed("text is not valid unicode (lone surrogate)") from e
        try:
            out: str = self._rewriter(text)
        except UnicodeDecodeError as e:  # as pynini's .string(), which would fail the same way
            raise NormalizationFailed(f"{self.name} gave bytes that are not UTF-8") from e
        if out == "" and text and not self._accepts(text):
            raise NormalizationFailed(f"no path through {self.name}")
        return out

    def _accepts(self, text: str) -> bool:
        import kaldifst

        string = kaldifst.make_linear_acceptor(list(text.encode("utf-8")))
        return bool(kaldifst.compose(string, self._fst, connect=True).num_states > 0)


# OpenFst VectorFst binary layout (little-endian): a header, then per state a float32 final weight,
# an int64 arc count and that many arcs.
_FST_MAGIC = 2125659606
_HEAD = np.dtype([("final", "<f4"), ("count", "<i8")])  # packed: 12 bytes
_ARC = np.dtype([("ilabel", "<i4"), ("olabel", "<i4"), ("weight", "<f4"), ("nextstate", "<i4")])


def optimized(fst_bytes: bytes) -> bytes:
    """The graph as pynini's `Fst.read(path).optimize()` holds it, which is how WeTextProcessing loads
    its graphs: the same paths with states renumbered and arcs reordered, which decides every tie
    between equally weighted paths (the raw file's order picks other readings, e.g. of "+1-800").

    The wheel's graphs were themselves written by `optimize()`, so re-optimising one comes down to:
    RmEpsilon (no epsilon arcs here, but it re-adds each state's arcs in reverse order); Encode, which
    numbers (ilabel, olabel, weight) triples in first-seen order; Determinize, which numbers states
    breadth-first along arcs in encoded-label order (the graph is already a minimal DFA over triples,
    so Minimize keeps it); Decode; and ArcSum, which sorts each state's arcs by (ilabel, olabel,
    nextstate). tests/test_text_parity.py compares the result with pynini's byte for byte."""
    buf = np.frombuffer(fst_bytes, dtype=np.uint8)
    magic, = struct.unpack_from("<i", fst_bytes, 0)
    offset = 4
    names = []
    for _ in range(2):  # FST type, arc type
        (n,) = struct.unpack_from("<i", fst_bytes, offset)
        names.append(fst_bytes[offset + 4 : offset + 4 + n])
        offset += 4 + n
    _version, flags, _props, start, num_states, _num_arcs = struct.unpack_from("<iiQqqq", fst_bytes, offset)
    start_field = offset + 16
    offset += 40
    if magic != _FST_MAGIC or names != [b"vector", b"standard"] or flags != 0:
        raise ConfigError("a WeTextProcessing graph is not a plain standard VectorFst")
    header = bytearray(fst_bytes[:offset])

    starts, sizes = [], []  # byte offset of each state's record, its arc count
    unpack_count = struct.Struct("<q").unpack_from
    for _ in range(num_states):
        (count,) = unpack_count(fst_bytes, offset + 4)
        starts.append(offset)
        sizes.append(count)
        offset += 12 + 16 * count
    if offset != len(fst_bytes):
        raise ConfigError("a WeTextProcessing graph has trailing bytes")
    head_at = np.asarray(starts, dtype=np.int64)
    counts = np.asarray(sizes, dtype=np.int64)
    heads = buf[head_at[:, None] + np.arange(12)].copy().view(_HEAD).reshape(-1)  # [S]
    first = np.concatenate(([0], np.cumsum(counts)))  # [S+1] index of each state's first arc
    state = np.repeat(np.arange(num_states), counts)  # [A] source state of each arc
    position = np.arange(len(state)) - first[state]  # [A] index within its state
    arc_at = head_at[state] + 12 + 16 * position
    arcs = buf[arc_at[:, None] + np.arange(16)].copy().view(_ARC).reshape(-1)  # [A]

    ilabel, olabel, nextstate = (arcs[k].astype(np.int64) for k in ("ilabel", "olabel", "nextstate"))
    weight_bits = arcs["weight"].view("<u4").astype(np.int64)
    finals = heads["final"]
    pair = (ilabel << 16) | olabel  # labels are bytes here (checked), so (pair << 32) | weight fits in int64
    if (
        min(ilabel.min(initial=0), olabel.min(initial=0)) < 0
        or max(ilabel.max(initial=0), olabel.max(initial=0)) >= 1 << 15
        or np.any((ilabel == 0) & (olabel == 0))
        or np.any((finals != 0) & ~np.isinf(finals))
    ):
        raise ConfigError("a WeTextProcessing graph is not in the form optimize() writes")
    by_dest = np.lexsort((nextstate, pair, state))
    same = (np.diff(state[by_dest]) == 0) & (np.diff(pair[by_dest]) == 0) & (np.diff(nextstate[by_dest]) == 0)
    if np.any(same):  # parallel arcs, which RmEpsilon would merge
        raise ConfigError("a WeTextProcessing graph is not in the form optimize() writes")

    # Encode: triples numbered in first-seen order, scanning states in order and arcs in reverse.
    scan = np.lexsort((-position, state))
    triple = ((pair << 32) | weight_bits)[scan]
    _, seen_at, inverse = np.unique(triple, return_index=True, return_inverse=True)
    rank = np.empty(len(seen_at), dtype=np.int64)
    rank[np.argsort(seen_at)] = np.arange(len(seen_at))
    code = np.empty(len(state), dtype=np.int64)
    code[scan] = rank[inverse]

    # Determinize: states numbered breadth-first along arcs in encoded-label order.
    dest = nextstate[np.lexsort((code, state))].tolist()
    bounds = first.tolist()
    new_id = [-1] * num_states
    new_id[start] = 0
    queue = [start]
    for s in queue:
        for d in dest[bounds[s] : bounds[s + 1]]:
            if new_id[d] < 0:
                new_id[d] = len(queue)
                queue.append(d)
    if len(queue) != num_states:
        raise ConfigError("a WeTextProcessing graph has unreachable states")

    # Decode + ArcSum: states in their new order, arcs by (ilabel, olabel, new nextstate).
    renumber = np.asarray(new_id, dtype=np.int64)
    old_of_new = np.asarray(queue, dtype=np.int64)
    order = np.lexsort((renumber[nextstate], pair, renumber[state]))
    out_arcs = arcs[order]
    out_arcs["nextstate"] = renumber[nextstate[order]]
    out_heads = heads[old_of_new]
    out_first = np.concatenate(([0], np.cumsum(out_heads["count"])))
    out_head_at = len(header) + 12 * np.arange(num_states) + 16 * out_first[:-1]
    out_state = np.repeat(np.arange(num_states), out_heads["count"])
    out_arc_at = out_head_at[out_state] + 12 + 16 * (np.arange(len(out_state)) - out_first[out_state])
    out = np.empty(len(fst_bytes), dtype=np.uint8)
    struct.pack_into("<q", header, start_field, 0)
    out[: len(header)] = np.frombuffer(bytes(header), dtype=np.uint8)
    out[out_head_at[:, None] + np.arange(12)] = out_heads.view(np.uint8).reshape(-1, 12)
    out[out_arc_at[:, None] + np.arange(16)] = out_arcs.view(np.uint8).reshape(-1, 16)
    return out.tobytes()


def _wheel_bytes(rel: str) -> bytes:
    """A file of the installed WeTextProcessing wheel, checked against the pinned version and digest."""
    try:
        dist = importlib.metadata.distribution("WeTextProcessing")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"{NEEDS}, which is not installed: {INSTALL_HINT}") from None
    if dist.version != WETEXTPROCESSING_VERSION:
        raise ConfigError(f"{NEEDS}, found {dist.version}: {INSTALL_HINT}")
    path = Path(str(dist.locate_file(rel)))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{NEEDS}; cannot read {path} ({e.strerror}): {INSTALL_HINT}") from None
    if hashlib.sha256(data).hexdigest() != GRAPH_SHA256[rel]:
        raise ConfigError(f"{NEEDS}; {path} is not the file it ships: {INSTALL_HINT}")
    return data


@functools.cache
def check_installed() -> None:
    """Raise ConfigError (one line) unless the pinned WeTextProcessing files are installed intact."""
    for rel in GRAPH_SHA256:
        _wheel_bytes(rel)


def _graph(rel: str) -> _Graph:
    return _Graph(Path(rel).name, optimized(_wheel_bytes(rel)))


# ---------------------------------------------------------------------------------------------
# Normalisers


class EnglishNormalizer:
    """`tn.english.normalizer.Normalizer()`'s normalize(): tag, reorder (EN_TN_ORDERS), verbalize."""

    def __init__(self) -> None:
        self.tagger = _graph("tn/en_tn_tagger.fst")
        self.verbalizer = _graph("tn/en_tn_verbalizer.fst")

    def tag(self, text: str) -> str:
        return self.tagger(text) if text else ""

    def verbalize(self, tagged: str) -> str:
        return self.verbalizer(reorder(tagged, EN_TN_ORDERS)) if tagged else ""

    def normalize(self, text: str) -> str:
        """Normalised text; NormalizationFailed where WeTextProcessing raises or hangs."""
        return self.verbalize(self.tag(text))


class ChineseNormalizer:
    """`tn.chinese.normalizer.Normalizer(remove_interjections=False, remove_erhua=False)`'s normalize()
    (traditional_to_simple, full_to_half on; remove_puncts, tag_oov off)."""

    def __init__(self) -> None:
        self.tagger = _graph("tn/zh_tn_tagger.fst")
        self.full_to_half = _char_map(_wheel_bytes("tn/chinese/data/char/fullwidth_to_halfwidth.tsv"))

    def tag(self, text: str) -> str:
        return self.tagger(text) if text else ""

    def verbalize(self, tagged: str) -> str:
        if not tagged:
            return ""
        return "".join(self._verbalize_token(t) for t in parse_tokens(tagged))

    def normalize(self, text: str) -> str:
        """Normalised text; NormalizationFailed where WeTextProcessing raises or hangs."""
        return self.verbalize(self.tag(text))

    def _verbalize_token(self, token: Token) -> str:
        fields = token.fields(TN_ORDERS)
        keys = tuple(k for k, _ in fields)
        for rule in ZH_VERBALIZER.get(token.name, ()):
            if keys == tuple(k for k, _ in rule):
                text = "".join(prefix + _unescape(v) for (_, prefix), (_, v) in zip(rule, fields, strict=True))
                if token.name == "whitelist" and keys == ("erhua",) and text != "儿":
                    break
                # The postprocessor is composed with each token's verbalizer; full_to_half is the only
                # rewrite left on with upstream's options (interjections kept, punctuation kept).
                return text.translate(self.full_to_half)
        raise NormalizationFailed(f"no verbalizer for token {token.name!r} with keys {list(keys)}")


def _unescape(value: str) -> str:
    r"""Processor.SIGMA on the verbalizer side: `\\` → `\`, `\"` → `"`; any other backslash has no path."""
    out = []
    chars = iter(value)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            if nxt not in ("\\", '"'):
                raise NormalizationFailed("tagged value has a stray backslash")
            c = nxt
        out.append(c)
    return "".join(out)


def _char_map(tsv: bytes) -> dict[int, str]:
    """A two-column TSV of single characters as a str.translate table."""
    table: dict[int, str] = {}
    for line in tsv.decode("utf-8").splitlines():
        src, dst = line.split("\t")
        table[ord(src)] = dst
    return table


@functools.cache
def english() -> EnglishNormalizer:
    """The process-wide English normaliser (graphs are read once)."""
    return EnglishNormalizer()


@functools.cache
def chinese() -> ChineseNormalizer:
    """The process-wide Chinese normaliser (graphs are read once)."""
    return ChineseNormalizer()
