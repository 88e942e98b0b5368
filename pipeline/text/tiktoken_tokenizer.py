"""IndexTTS-2.5 text vocabulary: a tiktoken BPE over bytes plus whisper-style special tokens.

Ports `get_encoding` / `get_tokenizer(multilingual=True)` and `lang_to_token` from
indextts/utils/tokenizer.py. Upstream wraps the encoding in whisper's `Tokenizer`, whose
`encode(text, **kw)` is `tiktoken.Encoding.encode(text, **kw)`; infer_v2_5 always passes
`allowed_special='all'`, so literal special tokens in the text (`<|en|>`, `<|SPECIAL_TOKEN_1|>`)
become their ids. The `.tiktoken` file holds one `base64(piece) rank` line per mergeable piece;
the 1673 specials are numbered after the last rank, in the order built here.

The `tiktoken.Encoding` is constructed directly from the local file: `tiktoken.get_encoding`
(which may download) is never called, so loading touches no network.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from ..errors import CheckpointError

# Upstream's LANGUAGES keys in order: the index is the `lang_embedding` row (en 0, zh 1, es 3,
# ja 7, ar 13, ..., common 105). Only the first NUM_SPECIAL_LANGUAGES get a special token.
LANGUAGES: tuple[str, ...] = tuple(
    (
        "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur "
        "hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si "
        "km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha "
        "ba jw su yue minnan wuyu dialect zh/en en/zh common"
    ).split()
)
UNKNOWN_LANGUAGE = "common"  # lang_to_token's fallback for a code not in LANGUAGES
NUM_SPECIAL_LANGUAGES = 99  # get_tokenizer's num_languages: <|en|> ... <|su|>
AUDIO_EVENTS = ("ASR", "AED", "SER", "Speech", "/Speech", "BGM", "/BGM", "Laughter", "/Laughter", "Applause",
                "/Applause")
EMOTIONS = ("HAPPY", "SAD", "ANGRY", "NEUTRAL")
TASKS = ("translate", "transcribe", "startoflm", "startofprev", "nospeech", "notimestamps")
NUM_ANNOTATION_TOKENS = 30  # <|SPECIAL_TOKEN_1|> ... <|SPECIAL_TOKEN_30|>; 1 and 2 wrap pronunciations
TTS_VOCAL_TOKENS = ("TTS/B", "TTS/O", "TTS/Q", "TTS/A", "TTS/CO", "TTS/CL", "TTS/H",
                    *(f"TTS/SP{i:02d}" for i in range(1, 14)))
NUM_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|> in 0.02 s steps
# Upstream's pre-tokeniser regex (GPT-2's, as whisper uses it).
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def special_tokens() -> list[str]:
    """The 1673 special tokens in upstream's order (their ids follow the last mergeable rank)."""
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in LANGUAGES[:NUM_SPECIAL_LANGUAGES]),
        *(f"<|{event}|>" for event in AUDIO_EVENTS),
        *(f"<|{emotion}|>" for emotion in EMOTIONS),
        *(f"<|{task}|>" for task in TASKS),
        *(f"<|SPECIAL_TOKEN_{i}|>" for i in range(1, NUM_ANNOTATION_TOKENS + 1)),
        *(f"<|{tts}|>" for tts in TTS_VOCAL_TOKENS),
        *(f"<|{i * 0.02:.2f}|>" for i in range(NUM_TIMESTAMPS)),
    ]


def lang_index(lang: str) -> int:
    """`lang_to_token`: the language's `lang_embedding` row; an unknown code maps to `common`."""
    code = lang.lower()
    return LANGUAGES.index(code if code in LANGUAGES else UNKNOWN_LANGUAGE)


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse a `.tiktoken` file: `base64(piece) rank` per line → {piece bytes: rank}."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read tiktoken vocabulary: {e}") from e
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError("expected two fields")
            ranks[base64.b64decode(fields[0], validate=True)] = int(fields[1])
        except (ValueError, binascii.Error) as e:
            raise CheckpointError(f"{path}:{n}: not a `base64 rank` line: {e}") from e
    if not ranks:
        raise CheckpointError(f"{path}: tiktoken vocabulary is empty")
    return ranks


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class TiktokenTokenizer:
    """The 2.5 text tokenizer: `encode(text)` is upstream's `tokenizer.encode(text, allowed_special='all')`."""

    encoding: tiktoken.Encoding

    @classmethod
    def from_file(cls, path: Path) -> TiktokenTokenizer:
        """Build from a local `.tiktoken` file (no network)."""
        ranks = read_ranks(path)
        # Upstream numbers the specials from len(ranks), so the ranks must be dense for the ids to
        # be those the GPT was trained with; tiktoken itself also requires unique, in-range ids.
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise CheckpointError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1} without gaps")
        specials = {tok: len(ranks) + i for i, tok in enumerate(special_tokens())}
        encoding = tiktoken.Encoding(
            name=Path(path).name,
            pat_str=PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=specials,
            explicit_n_vocab=len(ranks) + len(specials),
        )
        return cls(encoding=encoding)

    @property
    def vocab_size(self) -> int:
        """Mergeable pieces + specials (upstream's `number_text_tokens`)."""
        return int(self.encoding.n_vocab)

    def encode(self, text: str) -> list[int]:
        """Text → ids, with every special token written in the text recognised as that token."""
        return self.encoding.encode(text, allowed_special="all")

    def token_len(self, text: str) -> int:
        """Upstream `_token_len`: the number of ids `encode(text)` gives."""
        return len(self.encode(text))

    def special_id(self, token: str) -> int:
        """The id of a special token such as `<|en|>`; KeyError if it is not one."""
        if token not in self.encoding.special_tokens_set:
            raise KeyError(token)
        return int(self.encoding.encode_single_token(token))

    def decode(self, ids: list[int]) -> str:
        """Ids → text (bytes decoded as UTF-8 with replacement); for logs and display only."""
        return self.encoding.decode(ids, errors="replace")
