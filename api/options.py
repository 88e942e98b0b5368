"""Per-request synthesis options: the one table of their names, types, ranges, defaults and help.

Each option is one field of `SynthesisOptions`; its default is the field default (upstream
IndexTTS2's, from `IndexTTS2.infer` in infer_v2.py: sampling with 3 beams, top-k 30, top-p 0.8,
temperature 0.8, repetition penalty 10, 1500 codes at most, 25 Euler steps, CFG rate 0.7,
segments of at most 120 text tokens, 200 ms of silence between segments), and the rest is in its
`option(...)` metadata. `OPTIONS` reads them back, and everything else is generated from it: the
one validator (`Option.problem`), the flags of `ttsd synth` and `ttsd-say` (`add_option_flags`),
and the options table of docs/protocol.md (`markdown_rows`, checked by a test). Adding an option is
adding a field here.

Validation happens once, at the boundary: the protocol decoder (ttsd.api.protocol) checks each
`synthesize` field with `Option.problem`, and a `SynthesisOptions` cannot be built from values it
refuses (BadOptions), so code that receives one (the daemon's session, the pipeline) holds checked
options and does not check them again.

The emotion comes from one source, chosen as upstream's `IndexTTS2.infer` chooses it: emotion from
text (`emo_text`, or `use_emo_text` for the request's own text) wins over `emo_vector`, which wins
over an emotion reference clip, which wins over the speaker clip itself. Text is read by the
model's QwenEmotion once per request, before its first segment (upstream reads it once per
`infer` call), and its 8 scores then act exactly as an `emo_vector` would: `emo_alpha` scales them
(clamped to [0, 1]) and the emotion clip is ignored. One deliberate difference: upstream reads
`emo_text` only when `use_emo_text` is also true; here setting `emo_text` asks for it by itself
(OpenAI's `instructions` maps to it), rather than being silently ignored.

Limits that depend on the server or the model (num_beams <= the daemon's max_num_beams, a
segment no longer than the model's text table) are checked by `Pipeline.check_options`.
Standard library only: clients import this module without torch."""

from __future__ import annotations

import argparse
import math
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Self, TypeAlias, Union, get_args, get_origin, get_type_hints

from .errors import BadOptions

# Upstream category order of the 8-dim emotion vector (infer_v2.py, QwenEmotion.cn_key_to_en).
EMOTIONS: Final = ("happy", "angry", "sad", "afraid", "disgusted", "melancholic", "surprised", "calm")

# Longest emo_text: a description, not a script (an OpenAI `instructions` paragraph fits). Each
# character is at least one prompt token of QwenEmotion, whose KV cache the prompt sizes.
EMO_TEXT_MAX_CHARS: Final = 1000

# The languages IndexTTS-2.5 was trained on (upstream README), as its `lang` codes.
LANGUAGES_25: Final = ("zh", "en", "ja", "es", "ar")

OptionValue: TypeAlias = bool | int | float | str | tuple[float, ...]
_META: Final = "ttsd.option"  # dataclasses field-metadata key holding an option's OptionMeta


@dataclass(frozen=True, kw_only=True, slots=True)
class OptionMeta:
    """What a field default and annotation do not say: range, unit, help, CLI aliases."""

    group: str                          # section of the --help listing
    help: str                           # one line, no trailing period
    lo: float | None = None             # lower end of the range (for vectors: of each element)
    hi: float | None = None             # upper end
    lo_open: bool = False               # True: lo itself is excluded
    hi_open: bool = False               # True: hi itself is excluded
    unit: str = ""                      # e.g. "ms"; empty for plain numbers
    length: int | None = None           # vectors: the number of elements
    choices: tuple[str, ...] | None = None  # strings: the accepted values (None: any, up to max_chars)
    max_chars: int = 64                 # strings: the longest accepted value
    aliases: tuple[str, ...] = ()       # extra CLI flags with the same meaning
    off_alias: str | None = None        # booleans: an extra CLI flag that sets False


def option(default: Any, **meta: Any) -> Any:
    """A SynthesisOptions field: `default` plus the OptionMeta keywords (group, help, lo, hi, ...)."""
    return field(default=default, metadata={_META: OptionMeta(**meta)})


@dataclass(frozen=True, kw_only=True, slots=True)
class SynthesisOptions:
    """One request's synthesis options, checked: building one with a value outside its `option(...)`
    type or range raises BadOptions naming the field (the first one, in table order)."""

    # emotion
    emo_alpha: float = option(
        1.0, group="emotion", lo=0.0, hi=2.0,
        help="emotion strength (emotion audio: interpolation weight; emo_vector or emotion text: scale, at most 1)",
    )
    emo_vector: tuple[float, ...] | None = option(
        None, group="emotion", lo=0.0, hi=1.2, length=len(EMOTIONS),
        help=f"emotion weights in the order {', '.join(EMOTIONS)} (default: emotion from the reference audio)",
    )
    emo_text: str | None = option(
        None, group="emotion", max_chars=EMO_TEXT_MAX_CHARS,
        help="emotion described in words (e.g. \"angry, shouting\"), read into emotion weights by the model's "
             "QwenEmotion once per request; wins over emo_vector and the emotion audio",
    )
    use_emo_text: bool = option(
        False, group="emotion",
        help="emotion read by QwenEmotion from the request's own text (emo_text, when set, is read instead)",
    )
    use_random: bool = option(
        False, group="emotion", aliases=("--emo-random",),
        help="random emotion-matrix rows instead of the nearest style",
    )
    # sampling (GPT)
    do_sample: bool = option(
        True, group="sampling", off_alias="--greedy",
        help="sample the codes (off: greedy / plain beam search)",
    )
    temperature: float = option(0.8, group="sampling", lo=0.0, hi=100.0, lo_open=True, help="sampling temperature")
    top_k: int = option(30, group="sampling", lo=0, hi=2**20, help="sample from the k likeliest codes (0 disables)")
    top_p: float = option(
        0.8, group="sampling", lo=0.0, hi=1.0, lo_open=True, help="nucleus sampling mass (1 disables)"
    )
    num_beams: int = option(
        3, group="sampling", lo=1, hi=16, help="beams of the GPT's beam search; at most the daemon's max_num_beams"
    )
    repetition_penalty: float = option(
        10.0, group="sampling", lo=0.0, hi=100.0, lo_open=True, help="penalty on codes already generated"
    )
    max_mel_tokens: int = option(
        1500, group="sampling", lo=1, hi=100_000, unit="codes",
        help="semantic codes per segment, 50 per second of audio (capped by the model)",
    )
    seed: int | None = option(
        None, group="sampling", lo=0, hi=2**63, hi_open=True,
        help="seeds GPT sampling and CFM noise: the same seed gives the same audio (default: random)",
    )
    # acoustic model and segmentation
    diffusion_steps: int = option(25, group="acoustic", lo=1, hi=200, unit="steps", help="CFM Euler steps")
    inference_cfg_rate: float = option(
        0.7, group="acoustic", lo=0.0, hi=10.0, aliases=("--cfg-rate",), help="classifier-free guidance rate"
    )
    max_text_tokens_per_segment: int = option(
        120, group="acoustic", lo=2, hi=600, unit="tokens",
        help="BPE tokens per GPT segment; at most the model's gpt.max_text_tokens - 1 (599 for IndexTTS-2)",
    )
    quick_streaming_tokens: int = option(
        0, group="acoustic", lo=0, hi=600, unit="tokens",
        help="keep the first segments this short, for earlier first audio (upstream more_segment_before)",
    )
    interval_silence_ms: int = option(
        200, group="acoustic", lo=0, hi=10_000, unit="ms", help="silence before every segment but the first"
    )
    # chunked streaming inside a segment (issue 24); chunk_codes 0 is the parity mode
    chunk_codes: int = option(
        0, group="chunking", lo=0, hi=100_000, unit="codes",
        help="render a segment's codes in chunks of this many while it decodes, joined by a Hann "
        "crossfade (0: whole segments, the parity mode)",
    )
    chunk_overlap: int = option(
        20, group="chunking", lo=0, hi=100_000, unit="codes",
        help="codes each chunk repeats of the one before, crossfaded; less than chunk_codes and first_chunk_codes",
    )
    first_chunk_codes: int = option(
        0, group="chunking", lo=0, hi=100_000, unit="codes",
        help="codes in a segment's first chunk, for earlier first audio (0: chunk_codes)",
    )
    # IndexTTS-2.5 only (an IndexTTS-2 daemon refuses them: Pipeline.check_options)
    lang: str | None = option(
        None, group="IndexTTS-2.5", choices=LANGUAGES_25, max_chars=8,
        help="IndexTTS-2.5: the text's language (default: zh if the text has a CJK ideograph, else en)",
    )
    duration_factor: float = option(
        1.0, group="IndexTTS-2.5", lo=0.5, hi=2.0,
        help="IndexTTS-2.5: speech duration scale, above 1 slower (IndexTTS-2: 1 only)",
    )

    def __post_init__(self) -> None:
        for spec in OPTIONS:
            problem = spec.problem(getattr(self, spec.name))
            if problem is not None:
                raise BadOptions(problem)
        problem = chunking_problem(self.chunk_codes, self.chunk_overlap, self.first_chunk_codes)
        if problem is not None:
            raise BadOptions(problem)

    def with_seed(self, seed: int) -> Self:
        return replace(self, seed=seed)

    @property
    def wants_emotion_text(self) -> bool:
        """Whether the emotion comes from text (emo_text, or use_emo_text: the request's own text)."""
        return self.emo_text is not None or self.use_emo_text

    def emotion_text(self, text: str) -> str | None:
        """What QwenEmotion reads for a request speaking `text`: emo_text when set, else `text` itself
        with use_emo_text (upstream: `if emo_text is None: emo_text = text`), else None."""
        if self.emo_text is not None:
            return self.emo_text
        return text if self.use_emo_text else None

    def with_emotion_vector(self, weights: Sequence[float]) -> Self:
        """These options with the emotion read from text in place: `weights` (QwenEmotion's 8 scores,
        before emo_alpha) become emo_vector and the text fields are cleared, so the rest of the request
        runs exactly as a request that sent that emo_vector (emo_alpha scales it there, as upstream)."""
        return replace(self, emo_vector=tuple(float(w) for w in weights), emo_text=None, use_emo_text=False)


# --------------------------------------------------------------------------------------------
# The table, read back from the dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class Option:
    """One synthesis option: its field name, value type and default, plus its OptionMeta."""

    name: str
    kind: type                  # bool, int, float, str, or tuple (a vector of `meta.length` floats)
    optional: bool              # None is a value (then it is the default: "not set")
    default: OptionValue | None
    meta: OptionMeta

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def interval(self) -> str:
        """The range as written in errors and docs, e.g. "(0, 100]"; "" when unbounded."""
        m = self.meta
        if m.lo is None or m.hi is None:
            return ""
        return f"{'(' if m.lo_open else '['}{_number(m.lo)}, {_number(m.hi)}{')' if m.hi_open else ']'}"

    @property
    def type_text(self) -> str:
        """The type as the docs write it: "float (0, 100]", "8 floats [0, 1.2]", "bool"."""
        name = {bool: "bool", int: "int", float: "float", str: "str"}.get(self.kind, "")
        if self.kind is tuple:
            return f"{self.meta.length} floats {self.interval}"
        if self.kind is str and self.meta.choices:
            return f"str ({', '.join(self.meta.choices)})"
        if self.kind is str:
            return f"str, at most {self.meta.max_chars} characters"
        return f"{name} {self.interval}".strip()

    @property
    def default_text(self) -> str:
        """The default as the docs write it: upstream's value, or nil for "not set"."""
        d = self.default
        if d is None:
            return "nil"
        if isinstance(d, bool):
            return "true" if d else "false"
        if isinstance(d, float):
            return repr(d)  # 1.0, 0.8: a float default reads as a float
        return str(d)

    def contains(self, x: float) -> bool:
        """True if `x` lies in the range (ends open or closed as declared); NaN and ±inf never do."""
        m = self.meta
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if m.lo is not None and (x < m.lo or (m.lo_open and x == m.lo)):
            return False
        return not (m.hi is not None and (x > m.hi or (m.hi_open and x == m.hi)))

    def problem(self, value: object) -> str | None:
        """Why `value` is not valid for this option, in one line; None if it is."""
        if value is None:
            return None if self.optional else f"{self.name} must be set"
        if self.kind is bool:
            return None if isinstance(value, bool) else f"{self.name} must be a boolean"
        if self.kind is str:
            if not isinstance(value, str):
                return f"{self.name} must be a string"
            if len(value) > self.meta.max_chars:  # first: a client's 8 MiB string is never quoted
                return f"{self.name} is longer than {self.meta.max_chars}"
            if self.meta.choices is not None and value not in self.meta.choices:
                return f"{self.name} must be one of {', '.join(self.meta.choices)}, got {value!r}"
            return None
        if self.kind is tuple:
            if not isinstance(value, tuple | list) or len(value) != self.meta.length:
                return f"{self.name} needs {self.meta.length} weights"
            if not all(_is_number(v) and self.contains(float(v)) for v in value):
                return f"{self.name} weights must be in {self.interval}"
            return None
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            return f"{self.name} must be an integer"
        if not _is_number(value):
            return f"{self.name} must be a number"
        assert isinstance(value, int | float)  # _is_number
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        return None if self.contains(value) else f"{self.name} must be in {self.interval}, got {shown}"


def chunking_problem(chunk_codes: int, chunk_overlap: int, first_chunk_codes: int) -> str | None:
    """Why the three chunking options do not fit together, in one line; None if they do. Each chunk
    after the first starts `chunk_overlap` codes before the end of the one before, so the overlap must
    leave every chunk at least one new code. With chunk_codes 0 (off) the other two are not used."""
    if chunk_codes == 0:
        return None
    first = first_chunk_codes or chunk_codes
    if chunk_overlap >= min(chunk_codes, first):
        return (f"chunk_overlap must be less than chunk_codes and first_chunk_codes, got {chunk_overlap} "
                f"with chunks of {chunk_codes} (first {first})")
    return None


def _is_number(value: object) -> bool:
    # bool is an int subclass; True must not pass as 1.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(x: float) -> str:
    """1.0 → "1", 0.8 → "0.8", 2**63 → "2^63": how ranges and defaults are written."""
    if float(x).is_integer():
        n = int(x)
        if n >= 2**20 and n & (n - 1) == 0:
            return f"2^{n.bit_length() - 1}"
        return str(n)
    return f"{x:g}"


def _kind(hint: Any) -> tuple[type, bool]:
    """A field annotation → (value type, optional). `tuple[float, ...] | None` → (tuple, True)."""
    optional = False
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        optional = len(args) < len(get_args(hint))
        (hint,) = args
    base = get_origin(hint) or hint
    if base not in (bool, int, float, str, tuple):
        raise TypeError(f"unsupported option type {hint!r}")
    return base, optional


def options_of(cls: type) -> tuple[Option, ...]:
    """The Option table of a dataclass whose fields were declared with `option(...)`."""
    hints = get_type_hints(cls)
    table = []
    for f in fields(cls):
        meta = f.metadata.get(_META)
        if not isinstance(meta, OptionMeta):
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with option(...)")
        kind, optional = _kind(hints[f.name])
        default: OptionValue | None = f.default  # type: ignore[assignment]  # option() always sets one
        table.append(Option(name=f.name, kind=kind, optional=optional, default=default, meta=meta))
    return tuple(table)


OPTIONS: Final = options_of(SynthesisOptions)
OPTION_NAMES: Final = frozenset(o.name for o in OPTIONS)


# --------------------------------------------------------------------------------------------
# Command-line flags (ttsd synth, ttsd-say)

GROUP_TITLES: Final = {
    "emotion": "emotion",
    "sampling": "sampling (GPT)",
    "acoustic": "acoustic model and segmentation",
    "chunking": "chunked streaming inside a segment",
}


def parse_emo_vector(text: str) -> tuple[float, ...]:
    """`--emo-vector` text → 8 floats: comma- and/or space-separated. Range is checked by SynthesisOptions."""
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if len(values) != len(EMOTIONS):
        raise argparse.ArgumentTypeError(f"needs {len(EMOTIONS)} numbers ({' '.join(EMOTIONS)}), got {len(values)}")
    return values


def _cli_help(o: Option) -> str:
    parts = [o.meta.help]
    if o.kind in (int, float, tuple) and o.interval:
        parts.append(f"range {o.interval}" + (f" {o.meta.unit}" if o.meta.unit else ""))
    if o.default is not None:
        parts.append(f"default {o.default_text}")
    return "; ".join(parts).replace("%", "%%")


def add_option_flags(ap: argparse.ArgumentParser, options: Sequence[Option] = OPTIONS) -> None:
    """One flag per option, named after it (`inference_cfg_rate` → `--inference-cfg-rate`), plus
    its aliases; every default is None (= not given), so `given_options` returns only what was typed."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for o in options:
        title = GROUP_TITLES.get(o.meta.group, o.meta.group)
        g = groups.get(title) or groups.setdefault(title, ap.add_argument_group(title))
        names = [o.flag, *o.meta.aliases]
        if o.kind is bool:
            g.add_argument(*names, dest=o.name, action=argparse.BooleanOptionalAction, default=None, help=_cli_help(o))
            if o.meta.off_alias is not None:
                g.add_argument(o.meta.off_alias, dest=o.name, action="store_false", default=None,
                               help=f"same as --no-{o.flag[2:]}")
        elif o.kind is tuple:
            g.add_argument(*names, dest=o.name, type=parse_emo_vector, default=None, metavar="W,W,...",
                           help=_cli_help(o))
        else:
            g.add_argument(*names, dest=o.name, type=o.kind, choices=o.meta.choices, default=None,
                           metavar=o.kind.__name__.upper(), help=_cli_help(o))


def given_options(args: argparse.Namespace, options: Iterable[Option] = OPTIONS) -> dict[str, Any]:
    """The options given on the command line (flags left out are absent: the upstream default applies)."""
    return {o.name: getattr(args, o.name) for o in options if getattr(args, o.name, None) is not None}


# --------------------------------------------------------------------------------------------
# docs/protocol.md


def markdown_rows(options: Iterable[Option] = OPTIONS) -> list[str]:
    """The option rows of the `synthesize` table in docs/protocol.md: field, type, default, unit, meaning."""
    return [f"| `{o.name}` | {o.type_text} | {o.default_text} | {o.meta.unit} | {o.meta.help} |".replace("|  |", "| |")
            for o in options]
