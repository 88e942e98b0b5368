"""The ttsd wire protocol: typed messages carried as msgpack maps in binary WebSocket frames.

Imports only the standard library, msgpack and its neighbours `errors` (where the error codes are
defined once) and `options` (the one table of synthesis options, whose one validator checks the
`synthesize` fields), so client programs can use it without torch.
Every frame is one msgpack map with a `type` key naming the message and one key per field.
`encode(msg)` writes any message; `decode_client(frame)` (server side) and `decode_server(frame)`
(client side) check every field's type and range, reject unknown types and unknown keys, and raise
`ProtocolError(code, detail)` with a stable `ErrorCode`. Decoding never splats a payload into a
class: each message names its fields one by one. PCM travels as a msgpack `bin`, never a list.

Request ids are chosen by the client (0 <= id < 2**32) and echoed on every reply to that request.
See docs/protocol.md for the message flow and an example session."""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, fields
from typing import ClassVar, Final, TypeVar, cast, get_args

import msgpack

from .errors import ErrorCode
from .options import EMOTIONS, OPTION_NAMES, OPTIONS, Option, OptionValue

PROTOCOL_VERSION: Final = 1
SAMPLE_RATE_HZ: Final = 22_050          # the only output rate: BigVGAN's (config: s2mel.preprocess_params.sr)
PCM_FORMAT: Final = "pcm_s16le"         # the only output format: signed 16-bit little-endian, mono
N_EMOTIONS: Final = len(EMOTIONS)       # happy angry sad afraid disgusted melancholic surprised calm
MAX_REQUEST_ID: Final = 2**32 - 1
MAX_VOICE_ID_CHARS: Final = 64
MAX_NAME_CHARS: Final = 256             # client name in Hello, server name, error code
MAX_LANGUAGES: Final = 32               # entries of ServerHello.languages
MAX_LISTED_VOICES: Final = 1024         # voice ids in one VoiceList (the most recently used)
# Error text is bounded whatever a client sends: a reply or log line quoting a client's 8 MiB field
# name must not cost 8 MiB per frame. Client strings are quoted at QUOTE_CHARS, a whole message
# is cut at MAX_ERROR_CHARS.
MAX_ERROR_CHARS: Final = 512
QUOTE_CHARS: Final = 40


def clip(text: str, max_chars: int = MAX_ERROR_CHARS) -> str:
    """`text` cut to at most `max_chars` characters, ending in "…" when it was cut."""
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def quote(value: str) -> str:
    """A client-supplied string for an error or log line: repr-escaped and at most ~QUOTE_CHARS long."""
    if len(value) <= QUOTE_CHARS:
        return repr(value)
    return f"{value[:QUOTE_CHARS]!r}… ({len(value)} characters)"


class ProtocolError(Exception):
    """A frame that does not decode to a valid message, or a message the server refuses as malformed.

    `kind` is the message type and `request_id` the frame's id, each set when it could be read;
    `detail` is at most MAX_ERROR_CHARS characters."""

    def __init__(self, code: str, detail: str, request_id: int | None = None, kind: str | None = None) -> None:
        detail = clip(detail)
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.request_id = request_id
        self.kind = kind


# --------------------------------------------------------------------------------------------
# Client → server


@dataclass(frozen=True, kw_only=True, slots=True)
class Hello:
    """Optional first message; the server answers with `ServerHello`."""

    TYPE: ClassVar[str] = "hello"
    client: str                 # free-form client name and version, for logs
    version: int                # PROTOCOL_VERSION the client speaks


@dataclass(frozen=True, kw_only=True, slots=True)
class RegisterVoice:
    """Reference audio → a voice id usable by any later `Synthesize` (answer: `VoiceRegistered`)."""

    TYPE: ClassVar[str] = "register_voice"
    id: int                         # request id, echoed in the reply
    audio: bytes                    # speaker reference: a wav/flac/ogg/mp3 file of <= max_reference_audio_s
    emo_audio: bytes | None = None  # optional emotion reference file; default: the speaker audio


@dataclass(frozen=True, slots=True, init=False)
class Synthesize:
    """Start a request. Synthesis options travel as flat keys beside the other fields, one per
    `ttsd.api.options.OPTIONS` entry (its name, type and range); an absent or nil option takes
    the upstream IndexTTS2 default. Build it with keywords: `Synthesize(id=1, text="Hi.",
    voice=v, temperature=0.6)`; `options` holds the options that were set, in table order."""

    TYPE: ClassVar[str] = "synthesize"
    id: int                                     # request id, unique among this connection's live requests
    text: str                                   # the whole text; incremental: the first chunk (may be "")
    voice: str                                  # voice id from VoiceRegistered
    incremental: bool                           # True: more text follows in AppendText, ended by Flush
    format: str                                 # output encoding; only "pcm_s16le"
    emo_voice: str | None                       # voice id whose speaker audio is the emotion reference
    options: tuple[tuple[str, OptionValue], ...]  # (name, value) of each option set, in OPTIONS order

    def __init__(
        self,
        *,
        id: int,
        text: str,
        voice: str,
        incremental: bool = False,
        format: str = PCM_FORMAT,
        emo_voice: str | None = None,
        options: Iterable[tuple[str, OptionValue]] = (),
        **option_values: OptionValue | None,
    ) -> None:
        given = dict(options)
        given.update((k, v) for k, v in option_values.items() if v is not None)
        unknown = sorted(given.keys() - OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown synthesis option(s): {', '.join(unknown)}")
        # Frozen: the generated __init__ would set the fields this way too.
        for name, value in (("id", id), ("text", text), ("voice", voice), ("incremental", incremental),
                            ("format", format), ("emo_voice", emo_voice)):
            object.__setattr__(self, name, value)
        ordered = tuple((o.name, _frozen(given[o.name])) for o in OPTIONS if o.name in given)
        object.__setattr__(self, "options", ordered)

    def option(self, name: str) -> OptionValue | None:
        """The value of option `name` if it was set, else None (the upstream default applies)."""
        if name not in OPTION_NAMES:
            raise KeyError(f"unknown synthesis option {name!r}")
        return dict(self.options).get(name)


def _frozen(value: OptionValue) -> OptionValue:
    # A vector given as a list (msgpack arrays decode to lists) is kept as a tuple: messages are immutable.
    return tuple(float(v) for v in value) if isinstance(value, list | tuple) else value


@dataclass(frozen=True, kw_only=True, slots=True)
class AppendText:
    """More text for an incremental request; each sentence is spoken as soon as it is complete."""

    TYPE: ClassVar[str] = "append_text"
    id: int
    text: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Flush:
    """End of text for an incremental request: speak what is buffered, then `Done`."""

    TYPE: ClassVar[str] = "flush"
    id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Cancel:
    """Stop a request at the next decode step; the reply is `Error(code="cancelled")`."""

    TYPE: ClassVar[str] = "cancel"
    id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ListVoices:
    """Ask for the registered voices (answer: `VoiceList`)."""

    TYPE: ClassVar[str] = "list_voices"
    id: int                     # request id, echoed in the reply


@dataclass(frozen=True, kw_only=True, slots=True)
class DeleteVoice:
    """Remove a registered voice from this daemon and from the voice library (answer: `VoiceDeleted`,
    or `Error(code="unknown_voice")`). Requests already using it finish."""

    TYPE: ClassVar[str] = "delete_voice"
    id: int                     # request id, echoed in the reply
    voice: str                  # voice id from VoiceRegistered


@dataclass(frozen=True, kw_only=True, slots=True)
class Ping:
    """Application-level liveness check, answered by `Pong` in order with other replies."""

    TYPE: ClassVar[str] = "ping"
    nonce: int = 0              # echoed in Pong


ClientMessage = Hello | RegisterVoice | Synthesize | AppendText | Flush | Cancel | ListVoices | DeleteVoice | Ping


# --------------------------------------------------------------------------------------------
# Server → client


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerHello:
    """Reply to `Hello`: the protocol version, the audio format and the limits in force."""

    TYPE: ClassVar[str] = "hello"
    version: int                        # PROTOCOL_VERSION
    server: str                         # "ttsd/<version>"
    sample_rate_hz: int                 # 22050; every Audio.pcm is at this rate
    max_frame_bytes: int                # larger client frames close the connection with 1009
    max_text_chars: int                 # per request (incremental: all chunks together)
    max_reference_audio_s: float        # per reference audio file
    max_voices: int                     # voice cache size; the least recently used voice is evicted
    max_concurrent_requests: int        # requests synthesised at once (sharing every model step), daemon-wide
    max_queued_requests: int            # requests waiting beyond those; more get `busy`
    model: str                          # "IndexTTS-2" or "IndexTTS-2.5": one daemon serves one model
    languages: tuple[str, ...]          # `lang` codes the model speaks (IndexTTS-2: detected, not chosen)


@dataclass(frozen=True, kw_only=True, slots=True)
class VoiceRegistered:
    TYPE: ClassVar[str] = "voice_registered"
    id: int                     # the RegisterVoice request id
    voice: str                  # voice id (a content hash: the same audio gives the same id)
    audio_s: float              # duration of the speaker reference audio in seconds


@dataclass(frozen=True, kw_only=True, slots=True)
class VoiceList:
    """Reply to `ListVoices`: voice ids usable in `Synthesize`, most recently used first (voice
    presets are not listed: they have names, not ids)."""

    TYPE: ClassVar[str] = "voice_list"
    id: int                     # the ListVoices request id
    voices: tuple[str, ...]     # at most MAX_LISTED_VOICES voice ids
    total: int                  # registered voices in all (more than len(voices) when cut)


@dataclass(frozen=True, kw_only=True, slots=True)
class VoiceDeleted:
    TYPE: ClassVar[str] = "voice_deleted"
    id: int                     # the DeleteVoice request id
    voice: str                  # the voice id, no longer registered


@dataclass(frozen=True, kw_only=True, slots=True)
class SegmentStart:
    """Audio for one text segment follows; `text` is the segment as the model reads it."""

    TYPE: ClassVar[str] = "segment_start"
    id: int
    index: int                  # 0, 1, 2, ... per request
    text: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Audio:
    TYPE: ClassVar[str] = "audio"
    id: int                     # request id
    seq: int                    # 0, 1, 2, ... per request, across segments
    pcm: bytes                  # s16le mono at ServerHello.sample_rate_hz Hz; even length


@dataclass(frozen=True, kw_only=True, slots=True)
class SegmentEnd:
    TYPE: ClassVar[str] = "segment_end"
    id: int
    index: int
    audio_s: float              # seconds of audio sent for this segment (leading silence included)


@dataclass(frozen=True, kw_only=True, slots=True)
class Done:
    """The request finished; no more frames for this id."""

    TYPE: ClassVar[str] = "done"
    id: int
    segments: int                   # segments spoken
    first_audio_ms: float | None    # from the request's arrival to its first Audio frame; None without audio
    total_ms: float                 # from the request's arrival to Done
    audio_s: float                  # seconds of audio sent
    rtf: float | None               # real-time factor total_ms / 1000 / audio_s; None without audio


@dataclass(frozen=True, kw_only=True, slots=True)
class Error:
    """A failed message or request. With an id, that request has ended; the connection stays open."""

    TYPE: ClassVar[str] = "error"
    id: int | None              # request id, or None when the frame could not be attributed
    code: str                   # an ErrorCode value
    message: str                # human-readable detail


@dataclass(frozen=True, kw_only=True, slots=True)
class Pong:
    TYPE: ClassVar[str] = "pong"
    nonce: int


ServerMessage = (
    ServerHello | VoiceRegistered | VoiceList | VoiceDeleted | SegmentStart | Audio | SegmentEnd | Done | Error | Pong
)
Message = ClientMessage | ServerMessage


# --------------------------------------------------------------------------------------------
# Encoding


def encode(msg: Message) -> bytes:
    """One message → one msgpack map (bytes fields become `bin`, tuples become arrays)."""
    payload: dict[str, object] = {"type": msg.TYPE}
    for f in fields(msg):
        value = getattr(msg, f.name)
        if isinstance(msg, Synthesize) and f.name == "options":
            # Flat keys on the wire; options left unset are left out (absent = the default).
            payload.update((name, list(v) if isinstance(v, tuple) else v) for name, v in msg.options)
            continue
        payload[f.name] = list(value) if isinstance(value, tuple) else value
    return msgpack.packb(payload, use_bin_type=True)


# --------------------------------------------------------------------------------------------
# Decoding

_MISSING: Final = object()
_M = TypeVar("_M")
_C = TypeVar("_C")
_UNKNOWN_FIELDS_SHOWN: Final = 3


class _Fields:
    """Typed reads from one decoded map. Every read removes its key, so what is left is unknown."""

    def __init__(self, kind: str, payload: dict[str, object]) -> None:
        self.kind = kind
        self.rest = payload
        raw_id = payload.get("id")
        # Attribute the error to a request whenever the id itself is well-formed.
        self.request_id = raw_id if type(raw_id) is int and 0 <= raw_id <= MAX_REQUEST_ID else None

    def fail(self, detail: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_MESSAGE, f"{self.kind}: {detail}", self.request_id, self.kind)

    def _take(self, key: str, required: bool) -> object:
        value = self.rest.pop(key, _MISSING)
        if value is _MISSING and required:
            raise self.fail(f"missing field {key!r}")
        return value

    def integer(self, key: str, lo: int, hi: int, default: int | None = None) -> int:
        value = self._take(key, default is None)
        if value is _MISSING:
            assert default is not None  # _take raised otherwise
            return default
        return self._check_int(key, value, lo, hi)

    def opt_integer(self, key: str, lo: int, hi: int) -> int | None:
        value = self._take(key, False)
        return None if value is _MISSING or value is None else self._check_int(key, value, lo, hi)

    def _check_int(self, key: str, value: object, lo: int, hi: int) -> int:
        # bool is a subclass of int in Python; msgpack true/false must not pass as 1/0.
        if type(value) is not int:
            raise self.fail(f"{key!r} must be an integer, got {_kind_of(value)}")
        if not lo <= value <= hi:
            raise self.fail(f"{key!r} must be in [{lo}, {hi}], got {value}")
        return value

    def number(self, key: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
        return self._check_float(key, self._take(key, True), lo, hi, lo_open)

    def opt_number(self, key: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
        value = self._take(key, False)
        return None if value is _MISSING or value is None else self._check_float(key, value, lo, hi, lo_open)

    def _check_float(self, key: str, value: object, lo: float, hi: float, lo_open: bool) -> float:
        x = self._check_number(key, value)
        if not math.isfinite(x) or x > hi or x < lo or (lo_open and x == lo):
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise self.fail(f"{key!r} must be in {interval}, got {x:g}")
        return x

    def string(self, key: str, max_chars: int | None = None, default: str | None = None) -> str:
        value = self._take(key, default is None)
        if value is _MISSING:
            assert default is not None  # _take raised otherwise
            return default
        return self._check_str(key, value, max_chars)

    def opt_string(self, key: str, max_chars: int | None = None) -> str | None:
        value = self._take(key, False)
        return None if value is _MISSING or value is None else self._check_str(key, value, max_chars)

    def strings(self, key: str, max_items: int, max_chars: int, default: tuple[str, ...] | None = None
                ) -> tuple[str, ...]:
        value = self._take(key, default is None)
        if value is _MISSING:
            assert default is not None  # _take raised otherwise
            return default
        if not isinstance(value, list | tuple) or len(value) > max_items:
            raise self.fail(f"{key!r} must be a list of at most {max_items} strings")
        return tuple(self._check_str(key, v, max_chars) for v in value)

    def _check_str(self, key: str, value: object, max_chars: int | None) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{key!r} must be a string, got {_kind_of(value)}")
        if max_chars is not None and len(value) > max_chars:
            raise self.fail(f"{key!r} is longer than {max_chars} characters")
        return value

    def binary(self, key: str) -> bytes:
        return self._check_bytes(key, self._take(key, True))

    def opt_binary(self, key: str) -> bytes | None:
        value = self._take(key, False)
        return None if value is _MISSING or value is None else self._check_bytes(key, value)

    def _check_bytes(self, key: str, value: object) -> bytes:
        if not isinstance(value, bytes):
            raise self.fail(f"{key!r} must be binary (msgpack bin), got {_kind_of(value)}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._take(key, False)
        return default if value is _MISSING else self._check_bool(key, value)

    def opt_flag(self, key: str) -> bool | None:
        value = self._take(key, False)
        return None if value is _MISSING or value is None else self._check_bool(key, value)

    def _check_bool(self, key: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"{key!r} must be a boolean, got {_kind_of(value)}")
        return value

    def option(self, o: Option) -> OptionValue | None:
        """A synthesis option by its table entry: absent or nil → None, else checked by `Option.problem`,
        the one validator (`SynthesisOptions` uses it too)."""
        value = self._take(o.name, False)
        if value is _MISSING or value is None:
            return None
        problem = o.problem(value)
        if problem is not None:
            raise self.fail(problem)
        if isinstance(value, list):
            return tuple(float(v) for v in value)
        if o.kind is float and isinstance(value, int):
            return float(value)  # many msgpack encoders write 1.0 as 1
        return cast(OptionValue, value)  # problem() accepted it: a bool, int, float or str of o.kind

    def _check_number(self, key: str, value: object) -> float:
        # Integers are accepted for float fields: many msgpack encoders write 1.0 as 1.
        if type(value) is not float and type(value) is not int:
            raise self.fail(f"{key!r} must be a number, got {_kind_of(value)}")
        return float(value)

    def opt_id(self, key: str) -> int | None:
        return self.opt_integer(key, 0, MAX_REQUEST_ID)

    def id(self) -> int:
        return self.integer("id", 0, MAX_REQUEST_ID)

    def finish(self, msg: _M) -> _M:
        if self.rest:
            # Names are client strings: a few, each quoted short (an 8 MiB name must not come back whole).
            names = sorted(self.rest)
            shown = ", ".join(quote(name) for name in names[:_UNKNOWN_FIELDS_SHOWN])
            more = f" and {len(names) - _UNKNOWN_FIELDS_SHOWN} more" if len(names) > _UNKNOWN_FIELDS_SHOWN else ""
            raise self.fail(f"unknown field(s) {shown}{more}")
        return msg


def _kind_of(value: object) -> str:
    return {
        bool: "boolean", int: "integer", float: "float", str: "string", bytes: "binary",
        list: "array", dict: "map", type(None): "nil",
    }.get(type(value), type(value).__name__)


def _hello(r: _Fields) -> Hello:
    return r.finish(
        Hello(client=r.string("client", MAX_NAME_CHARS), version=r.integer("version", 0, 2**31 - 1))
    )


def _register_voice(r: _Fields) -> RegisterVoice:
    return r.finish(RegisterVoice(id=r.id(), audio=r.binary("audio"), emo_audio=r.opt_binary("emo_audio")))


def _synthesize(r: _Fields) -> Synthesize:
    msg = Synthesize(
        id=r.id(),
        text=r.string("text"),
        voice=r.string("voice", MAX_VOICE_ID_CHARS),
        incremental=r.flag("incremental", False),
        format=r.string("format", default=PCM_FORMAT),
        emo_voice=r.opt_string("emo_voice", MAX_VOICE_ID_CHARS),
        options=[(o.name, value) for o in OPTIONS if (value := r.option(o)) is not None],
    )
    if msg.format != PCM_FORMAT:
        raise r.fail(f"format {msg.format!r} is not supported (only {PCM_FORMAT!r})")
    return r.finish(msg)


def _append_text(r: _Fields) -> AppendText:
    return r.finish(AppendText(id=r.id(), text=r.string("text")))


def _flush(r: _Fields) -> Flush:
    return r.finish(Flush(id=r.id()))


def _cancel(r: _Fields) -> Cancel:
    return r.finish(Cancel(id=r.id()))


def _list_voices(r: _Fields) -> ListVoices:
    return r.finish(ListVoices(id=r.id()))


def _delete_voice(r: _Fields) -> DeleteVoice:
    return r.finish(DeleteVoice(id=r.id(), voice=r.string("voice", MAX_VOICE_ID_CHARS)))


def _ping(r: _Fields) -> Ping:
    return r.finish(Ping(nonce=r.integer("nonce", 0, 2**63 - 1, default=0)))


def _server_hello(r: _Fields) -> ServerHello:
    return r.finish(
        ServerHello(
            version=r.integer("version", 0, 2**31 - 1),
            server=r.string("server", MAX_NAME_CHARS),
            sample_rate_hz=r.integer("sample_rate_hz", 1, 1_000_000),
            max_frame_bytes=r.integer("max_frame_bytes", 1, 2**63 - 1),
            max_text_chars=r.integer("max_text_chars", 1, 2**63 - 1),
            max_reference_audio_s=r.number("max_reference_audio_s", 0.0, math.inf, lo_open=True),
            max_voices=r.integer("max_voices", 1, 2**63 - 1),
            max_concurrent_requests=r.integer("max_concurrent_requests", 1, 2**63 - 1),
            max_queued_requests=r.integer("max_queued_requests", 0, 2**63 - 1),
            # Servers from before IndexTTS-2.5 support sent neither: they served IndexTTS-2.
            model=r.string("model", MAX_NAME_CHARS, default="IndexTTS-2"),
            languages=r.strings("languages", MAX_LANGUAGES, MAX_NAME_CHARS, default=("zh", "en")),
        )
    )


def _voice_registered(r: _Fields) -> VoiceRegistered:
    return r.finish(
        VoiceRegistered(
            id=r.id(), voice=r.string("voice", MAX_VOICE_ID_CHARS), audio_s=r.number("audio_s", 0.0, math.inf)
        )
    )


def _voice_list(r: _Fields) -> VoiceList:
    voices = r.strings("voices", MAX_LISTED_VOICES, MAX_VOICE_ID_CHARS)
    total = r.integer("total", len(voices), 2**63 - 1)
    return r.finish(VoiceList(id=r.id(), voices=voices, total=total))


def _voice_deleted(r: _Fields) -> VoiceDeleted:
    return r.finish(VoiceDeleted(id=r.id(), voice=r.string("voice", MAX_VOICE_ID_CHARS)))


def _segment_start(r: _Fields) -> SegmentStart:
    return r.finish(SegmentStart(id=r.id(), index=r.integer("index", 0, 2**63 - 1), text=r.string("text")))


def _audio(r: _Fields) -> Audio:
    msg = Audio(id=r.id(), seq=r.integer("seq", 0, 2**63 - 1), pcm=r.binary("pcm"))
    if len(msg.pcm) % 2:
        raise r.fail("'pcm' must hold whole 16-bit samples (even length)")
    return r.finish(msg)


def _segment_end(r: _Fields) -> SegmentEnd:
    index = r.integer("index", 0, 2**63 - 1)
    return r.finish(SegmentEnd(id=r.id(), index=index, audio_s=r.number("audio_s", 0.0, math.inf)))


def _done(r: _Fields) -> Done:
    return r.finish(
        Done(
            id=r.id(),
            segments=r.integer("segments", 0, 2**63 - 1),
            first_audio_ms=r.opt_number("first_audio_ms", 0.0, math.inf),
            total_ms=r.number("total_ms", 0.0, math.inf),
            audio_s=r.number("audio_s", 0.0, math.inf),
            rtf=r.opt_number("rtf", 0.0, math.inf),
        )
    )


def _error(r: _Fields) -> Error:
    code = r.string("code", MAX_NAME_CHARS)
    return r.finish(Error(id=r.opt_id("id"), code=code, message=r.string("message")))


def _pong(r: _Fields) -> Pong:
    return r.finish(Pong(nonce=r.integer("nonce", 0, 2**63 - 1)))


_CLIENT_DECODERS: Final[dict[str, Callable[[_Fields], ClientMessage]]] = {
    Hello.TYPE: _hello,
    RegisterVoice.TYPE: _register_voice,
    Synthesize.TYPE: _synthesize,
    AppendText.TYPE: _append_text,
    Flush.TYPE: _flush,
    Cancel.TYPE: _cancel,
    ListVoices.TYPE: _list_voices,
    DeleteVoice.TYPE: _delete_voice,
    Ping.TYPE: _ping,
}

_SERVER_DECODERS: Final[dict[str, Callable[[_Fields], ServerMessage]]] = {
    ServerHello.TYPE: _server_hello,
    VoiceRegistered.TYPE: _voice_registered,
    VoiceList.TYPE: _voice_list,
    VoiceDeleted.TYPE: _voice_deleted,
    SegmentStart.TYPE: _segment_start,
    Audio.TYPE: _audio,
    SegmentEnd.TYPE: _segment_end,
    Done.TYPE: _done,
    Error.TYPE: _error,
    Pong.TYPE: _pong,
}


# Decoder limits sized from the protocol: no frame makes msgpack build more objects than the
# largest legal message holds. Without them a 16 MiB frame of 16.7 M empty maps costs ~1.2 GB and
# seconds of the event loop before it fails. Strings and bins may fill the frame (reference audio
# travels in one bin of up to max_frame_bytes); no message uses an extension type.
# Every field plus `type`; Synthesize carries each option as a key of its own instead of `options`.
_MAX_MAP_LEN: Final = 1 + max(
    len(fields(m)) - 1 + len(OPTIONS) if m is Synthesize else len(fields(m)) for m in get_args(Message)
)
# The array fields are Synthesize.emo_vector (N_EMOTIONS numbers; a few times that lets a vector of
# the wrong length get its own `bad_message` naming the field), ServerHello.languages and
# VoiceList.voices (server → client; a client frame is still bounded by its size and the map limit).
_MAX_ARRAY_LEN: Final = max(8 * N_EMOTIONS, MAX_LANGUAGES, MAX_LISTED_VOICES)
# Per-container limits do not bound nesting (8 arrays of 8 arrays of ... of nil), so the hooks
# below count containers as msgpack completes them: a message is one map holding at most one array.
_MAX_CONTAINERS: Final = 2


class _TooManyContainers(ValueError):
    pass


class _ContainerBudget:
    """object_hook / list_hook: aborts decoding once more containers than any message has are built."""

    def __init__(self) -> None:
        self.left = _MAX_CONTAINERS

    def __call__(self, container: _C) -> _C:
        self.left -= 1
        if self.left < 0:
            raise _TooManyContainers
        return container


def _unpack(frame: bytes | str) -> _Fields:
    """Frame → (type, fields) with every structural failure mapped to a ProtocolError."""
    if isinstance(frame, str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "text frames are not part of the protocol")
    budget = _ContainerBudget()
    try:
        payload = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, use_list=True, object_hook=budget, list_hook=budget,
            max_str_len=len(frame), max_bin_len=len(frame), max_ext_len=0,
            max_array_len=_MAX_ARRAY_LEN, max_map_len=_MAX_MAP_LEN,
        )
    except UnicodeDecodeError as e:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"invalid UTF-8 in a string at byte {e.start}") from None
    except _TooManyContainers:
        detail = f"more than {_MAX_CONTAINERS} maps and arrays (a message is one map with at most one array)"
        raise ProtocolError(ErrorCode.BAD_FRAME, detail) from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        # ExtraData, FormatError and StackError are ValueError subclasses; truncated input and the
        # length limits above raise ValueError. msgpack's own text names no client data.
        reason = f"{type(e).__name__}: {clip(str(e), 120)}" if str(e) else type(e).__name__
        raise ProtocolError(ErrorCode.BAD_FRAME, f"not a msgpack frame: {reason}") from None
    if not isinstance(payload, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"a frame must be a msgpack map, got {_kind_of(payload)}")
    kind = payload.pop("type", None)
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "missing or non-string 'type' field")
    return _Fields(kind, payload)


def _unknown_type(r: _Fields) -> ProtocolError:
    return ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {quote(r.kind)}", r.request_id, r.kind)


def decode_client(frame: bytes | str) -> ClientMessage:
    """A frame received by the server → a client message, or ProtocolError."""
    r = _unpack(frame)
    decoder = _CLIENT_DECODERS.get(r.kind)
    if decoder is None:
        raise _unknown_type(r)
    return decoder(r)


def decode_server(frame: bytes | str) -> ServerMessage:
    """A frame received by a client → a server message, or ProtocolError."""
    r = _unpack(frame)
    decoder = _SERVER_DECODERS.get(r.kind)
    if decoder is None:
        raise _unknown_type(r)
    return decoder(r)


# Client messages whose id starts a request; the others name a live request or none.
REQUEST_TYPES: Final = frozenset({Synthesize.TYPE, RegisterVoice.TYPE, ListVoices.TYPE, DeleteVoice.TYPE})


def error_id(kind: str | None, request_id: int | None, live: Container[int]) -> int | None:
    """The id a server's Error about one client frame may carry (docs/protocol.md, "Error ids").

    An Error with an id ends that request, so it names `request_id` only when the frame of type
    `kind` would have started that request and no live request has the id: the refusal is then
    that request's one reply. Every other error about a frame (undecodable, a duplicate id, a bad
    append_text, flush, cancel, ping or hello) carries nil, and a live request with the id goes on."""
    if kind in REQUEST_TYPES and request_id is not None and request_id not in live:
        return request_id
    return None


def error_of(exc: ProtocolError, live: Container[int]) -> Error:
    """The Error a server sends for a refused frame, given the ids of the connection's live requests."""
    return Error(id=error_id(exc.kind, exc.request_id, live), code=exc.code, message=exc.detail)


__all__ = [
    "PROTOCOL_VERSION", "SAMPLE_RATE_HZ", "PCM_FORMAT", "N_EMOTIONS", "MAX_REQUEST_ID", "ErrorCode",
    "OPTIONS", "OPTION_NAMES", "OptionValue",
    "ProtocolError", "Hello", "RegisterVoice", "Synthesize", "AppendText", "Flush", "Cancel", "ListVoices",
    "DeleteVoice", "Ping", "ClientMessage", "ServerHello", "VoiceRegistered", "VoiceList", "VoiceDeleted",
    "SegmentStart", "Audio", "SegmentEnd", "Done", "Error", "Pong", "ServerMessage", "Message", "encode",
    "decode_client", "decode_server", "error_of", "error_id", "REQUEST_TYPES", "MAX_ERROR_CHARS",
    "MAX_LISTED_VOICES", "clip", "quote",
]
