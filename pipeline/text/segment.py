"""Segmentation: a piece list → GPT-sized segments, and sentence buffering for streamed text.

`split_segments` ports `TextTokenizer.split_segments` / `split_segments_by_token` from
indextts/utils/front.py exactly, quirks included (spec §1.3):
  * the comma rule fires whenever the current run holds "," or "▁," (not only on overflow), and
    the hyphen rule whenever it holds "-"; each recurses with that split set;
  * a quote after a sentence end is appended *and* left in the input, so it is duplicated into
    the next segment (upstream's `i += 1` inside a `for` loop has no effect);
  * a run of max+1 pieces without a split point is hard-split into [max, 1];
  * every recursion level ends with the merge pass, where `quick_streaming_tokens` keeps the
    first segments apart until the running piece count exceeds it.
Upstream emits a RuntimeWarning on a hard split; here it is a logged warning.

`SentenceBuffer` is ours: it accumulates text that arrives in chunks (e.g. from an LLM) and
releases whole sentences, so synthesis can start before the text is complete.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# "▁!" is deliberately absent upstream: it is not in the IndexTTS2 vocabulary (unk).
SENTENCE_SPLIT_TOKENS = (".", "!", "?", "▁.", "▁?", "▁...")
COMMA_SPLIT_TOKENS = (",", "▁,")
HYPHEN_SPLIT_TOKENS = ("-",)
QUOTE_TOKENS = ("'", "▁'")


def split_segments(
    pieces: Sequence[str], max_text_tokens_per_segment: int = 120, quick_streaming_tokens: int = 0
) -> list[list[str]]:
    """Split the text's BPE pieces into segments of at most `max_text_tokens_per_segment` pieces.

    A segment can be max+1 long when a quote follows its sentence end (upstream quirk)."""
    return split_segments_by_token(
        list(pieces), SENTENCE_SPLIT_TOKENS, max_text_tokens_per_segment, quick_streaming_tokens
    )


def split_segments_by_token(
    pieces: list[str], split_tokens: Sequence[str], max_tokens: int, quick_streaming_tokens: int = 0
) -> list[list[str]]:
    """One recursion level of upstream's `split_segments_by_token`."""
    if not pieces:
        return []
    segments: list[list[str]] = []
    cur: list[str] = []
    q = quick_streaming_tokens
    comma_splits = any(t in split_tokens for t in COMMA_SPLIT_TOKENS)
    for i, piece in enumerate(pieces):
        cur.append(piece)
        if not comma_splits and any(t in cur for t in COMMA_SPLIT_TOKENS):
            segments.extend(split_segments_by_token(cur, COMMA_SPLIT_TOKENS, max_tokens, q))
        elif "-" not in split_tokens and "-" in cur:
            segments.extend(split_segments_by_token(cur, HYPHEN_SPLIT_TOKENS, max_tokens, q))
        elif len(cur) <= max_tokens:
            if piece in split_tokens and len(cur) > 2:
                if i + 1 < len(pieces) and pieces[i + 1] in QUOTE_TOKENS:
                    cur.append(pieces[i + 1])  # and it stays in the input: duplicated (upstream quirk)
                segments.append(cur)
                cur = []
            continue
        else:
            log.warning("segment exceeds max_tokens=%d; hard split pieces=%r", max_tokens, cur)
            segments.extend(cur[j : j + max_tokens] for j in range(0, len(cur), max_tokens))
        cur = []
    if cur:
        assert len(cur) <= max_tokens  # the else-branch above splits any longer run
        segments.append(cur)
    return _merge(segments, max_tokens, quick_streaming_tokens)


def _merge(segments: list[list[str]], max_tokens: int, quick_streaming_tokens: int) -> list[list[str]]:
    """Greedy packing of neighbours; before `quick_streaming_tokens` pieces only up to max/2."""
    merged: list[list[str]] = []
    total = 0
    for seg in segments:
        total += len(seg)
        if not seg:
            continue
        if not merged:
            merged.append(seg)
        elif len(merged[-1]) + len(seg) <= max_tokens and total > quick_streaming_tokens:
            merged[-1] = merged[-1] + seg
        elif len(merged[-1]) + len(seg) <= max_tokens / 2:  # float comparison, as upstream
            merged[-1] = merged[-1] + seg
        else:
            merged.append(seg)
    return merged


# ---------------------------------------------------------------------------------------------
# Streaming text input

_CLOSERS = "\"'”’」』）》)]"
# A run of terminators, then any closing quotes/brackets. Whether it ends a sentence depends on
# what follows (see SentenceBuffer).
_END_PATTERN = re.compile(rf"[.!?。！？…]+[{re.escape(_CLOSERS)}]*")
_CJK_TERMINATORS = frozenset("。！？")


@dataclass(slots=True)
class SentenceBuffer:
    """Collects streamed text and hands out complete sentences.

    A sentence ends after `. ! ? …` (runs such as "?!" or "..." included) and any closing quotes
    or brackets when whitespace follows, or after `。！？` whatever follows. The character after
    the end must already have arrived, so "3.5" and "e.g.x" never split and a closing quote in
    the next chunk still joins its sentence. Returned sentences are stripped; blank ones are
    dropped."""

    _buf: str = field(default="", init=False)

    def feed(self, chunk: str) -> list[str]:
        """Append `chunk`; return the sentences it completed, in order."""
        self._buf += chunk
        out: list[str] = []
        start = 0
        for m in _END_PATTERN.finditer(self._buf):
            end = m.end()
            if end >= len(self._buf):
                break  # the next character decides; wait for it
            nxt = self._buf[end]
            if nxt.isspace() or any(c in _CJK_TERMINATORS for c in m.group()):
                sentence = self._buf[start:end].strip()
                if sentence:
                    out.append(sentence)
                start = end
        self._buf = self._buf[start:]
        return out

    def flush(self) -> str:
        """Return (stripped) whatever is buffered and empty the buffer."""
        rest, self._buf = self._buf.strip(), ""
        return rest
