"""The wire protocol: every message round-trips; malformed frames fail with a stable code."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest

from ttsd.api import protocol as p
from ttsd.api.options import OPTIONS, Option

CLIENT_MESSAGES: list[p.ClientMessage] = [
    p.Hello(client="test/1", version=p.PROTOCOL_VERSION),
    p.RegisterVoice(id=1, audio=b"RIFF....", emo_audio=None),
    p.RegisterVoice(id=2, audio=b"\x00\x01", emo_audio=b"\xff"),
    p.Synthesize(id=3, text="Hello.", voice="abc"),
    p.Synthesize(
        id=4, text="", voice="abc", incremental=True, emo_alpha=0.5, emo_vector=(0.0, 1.0, 0, 0, 0, 0, 0, 0.2),
        emo_voice="def", use_random=False, do_sample=False, temperature=0.7, top_k=0, top_p=1.0, num_beams=1,
        repetition_penalty=10.0, max_mel_tokens=60, seed=2**62, diffusion_steps=3, inference_cfg_rate=0.7,
        max_text_tokens_per_segment=30, quick_streaming_tokens=0, interval_silence_ms=0,
    ),
    p.AppendText(id=4, text="more text. "),
    p.Flush(id=4),
    p.Cancel(id=p.MAX_REQUEST_ID),
    p.ListVoices(id=5),
    p.DeleteVoice(id=6, voice="0123abcd"),
    p.Ping(nonce=7),
]

SERVER_MESSAGES: list[p.ServerMessage] = [
    p.ServerHello(
        version=1, server="ttsd/0.1", sample_rate_hz=22050, max_frame_bytes=1 << 20, max_text_chars=5000,
        max_reference_audio_s=30.0, max_voices=8, max_concurrent_requests=4, max_queued_requests=0,
        model="IndexTTS-2.5", languages=("zh", "en", "ja", "es", "ar"),
    ),
    p.VoiceRegistered(id=1, voice="0123abcd", audio_s=3.5),
    p.VoiceList(id=5, voices=("0123abcd", "4567ef01"), total=3),
    p.VoiceList(id=5, voices=(), total=0),
    p.VoiceDeleted(id=6, voice="0123abcd"),
    p.SegmentStart(id=3, index=0, text="HELLO."),
    p.Audio(id=3, seq=0, pcm=b"\x01\x00\xff\x7f"),
    p.SegmentEnd(id=3, index=0, audio_s=0.5),
    p.Done(id=3, segments=1, first_audio_ms=12.5, total_ms=40.0, audio_s=0.5, rtf=0.08),
    p.Done(id=5, segments=0, first_audio_ms=None, total_ms=1.0, audio_s=0.0, rtf=None),
    p.Error(id=None, code=p.ErrorCode.BAD_FRAME, message="x"),
    p.Error(id=9, code=p.ErrorCode.BUSY, message="retry"),
    p.Pong(nonce=7),
]


def frame(**payload: object) -> bytes:
    return msgpack.packb(payload, use_bin_type=True)


def rejects(data: bytes | str, code: str) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_client(data)
    assert info.value.code == code, info.value
    return info.value


@pytest.mark.parametrize("msg", CLIENT_MESSAGES, ids=lambda m: m.TYPE)
def test_client_messages_round_trip(msg: p.ClientMessage) -> None:
    """Every client message decodes back to an equal object."""
    assert p.decode_client(p.encode(msg)) == msg


@pytest.mark.parametrize("msg", SERVER_MESSAGES, ids=lambda m: m.TYPE)
def test_server_messages_round_trip(msg: p.ServerMessage) -> None:
    """Every server message decodes back to an equal object."""
    assert p.decode_server(p.encode(msg)) == msg


def test_pcm_travels_as_msgpack_bin() -> None:
    """Audio PCM is a msgpack bin (type byte 0xc4..0xc6), not an array of numbers."""
    raw = msgpack.unpackb(p.encode(p.Audio(id=1, seq=0, pcm=b"\x00\x01" * 100)), raw=True)
    assert isinstance(raw[b"pcm"], bytes)


def test_optional_fields_default_when_absent() -> None:
    """A minimal synthesize frame gets upstream defaults (None) for every option."""
    msg = p.decode_client(frame(type="synthesize", id=1, text="Hi.", voice="v"))
    assert msg == p.Synthesize(id=1, text="Hi.", voice="v")


def test_integers_accepted_for_float_fields() -> None:
    """Encoders that write 1.0 as 1 are accepted for float fields."""
    msg = p.decode_client(frame(type="synthesize", id=1, text="x", voice="v", temperature=1))
    assert isinstance(msg, p.Synthesize) and msg.option("temperature") == 1.0
    assert type(msg.option("temperature")) is float


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x81", b"\x93\x01\x02\x03", b"\x01", frame(type="ping") + b"\x00", b"\xff" * 10],
    ids=["empty", "reserved-byte", "truncated-map", "array", "int", "trailing-bytes", "garbage"],
)
def test_malformed_msgpack_is_bad_frame(data: bytes) -> None:
    """Bytes that are not exactly one msgpack map fail with bad_frame."""
    rejects(data, p.ErrorCode.BAD_FRAME)


def test_text_frame_is_bad_frame() -> None:
    """A WebSocket text frame (str) is not part of the protocol."""
    rejects('{"type": "ping"}', p.ErrorCode.BAD_FRAME)


def test_invalid_utf8_is_bad_frame() -> None:
    """A msgpack str holding invalid UTF-8 fails with bad_frame, not an unhandled exception."""
    good = frame(type="synthesize", id=1, text="ab", voice="v")
    bad = good.replace(b"\xa2ab", b"\xa2\xff\xfe")
    assert bad != good
    rejects(bad, p.ErrorCode.BAD_FRAME)


def test_unknown_type_keeps_the_request_id() -> None:
    """An unknown `type` fails with unknown_type and still names the request id when readable."""
    e = rejects(frame(type="sing", id=5), p.ErrorCode.UNKNOWN_TYPE)
    assert e.request_id == 5


@pytest.mark.parametrize(
    "payload",
    [
        {"id": 1},                                                      # no type
        {"type": 3, "id": 1},                                           # non-string type
        {"type": "cancel"},                                             # missing id
        {"type": "cancel", "id": "1"},                                  # id as string
        {"type": "cancel", "id": True},                                 # bool is not int
        {"type": "cancel", "id": -1},                                   # out of range
        {"type": "cancel", "id": 2**32},                                # out of range
        {"type": "cancel", "id": 1.0},                                  # float is not int
        {"type": "cancel", "id": 1, "extra": 0},                        # unknown key
        {"type": "synthesize", "id": 1, "text": b"bytes", "voice": "v"},  # bin for str
        {"type": "synthesize", "id": 1, "text": "x", "voice": 3},
        {"type": "synthesize", "id": 1, "text": "x", "voice": "v", "temperature": 0},
        {"type": "synthesize", "id": 1, "text": "x", "voice": "v", "temperature": float("nan")},
        {"type": "synthesize", "id": 1, "text": "x", "voice": "v", "top_p": 1.5},
        {"type": "synthesize", "id": 1, "text": "x", "voice": "v", "num_beams": 0},
        {"type": "synthesize", "id": 1, "text": "x", "voice": "v", "emo_vector": [0.1] * 7},
        {"type": "synthesize", "id": 1, "text": "x", "voice": "v", "emo_vector": [2.0] * 8},
        {"type": "synthesize", "id": 1, "text": "x", "voice": "v", "emo_vector": "happy"},
        {"type": "synthesize", "id": 1, "text": "x", "voice": "v", "do_sample": 1},
        {"type": "synthesize", "id": 1, "text": "x", "voice": "v", "format": "mp3"},
        {"type": "synthesize", "id": 1, "text": "x", "voice": "v", "incremental": None},
        {"type": "synthesize", "id": 1, "text": "x", "voice": "v" * 65},
        {"type": "register_voice", "id": 1, "audio": "not bytes"},
        {"type": "register_voice", "id": 1},
        {"type": "ping", "nonce": -1},
    ],
)
def test_wrong_fields_are_bad_message(payload: dict[str, object]) -> None:
    """Missing, unknown, ill-typed and out-of-range fields fail with bad_message."""
    rejects(frame(**payload), p.ErrorCode.BAD_MESSAGE)


def test_wrong_field_error_names_the_field_and_id() -> None:
    """The error detail names the offending field, and the request id is kept for the reply."""
    e = rejects(frame(type="synthesize", id=8, text="x", voice="v", top_k="many"), p.ErrorCode.BAD_MESSAGE)
    assert "top_k" in e.detail and e.request_id == 8


def test_non_string_map_keys_are_bad_frame() -> None:
    """Integer map keys cannot be field names (strict_map_key)."""
    rejects(msgpack.packb({1: 2, "type": "ping"}), p.ErrorCode.BAD_FRAME)


def test_deep_nesting_is_bad_frame() -> None:
    """A deeply nested frame fails cleanly instead of exhausting the stack."""
    data = b"\x91" * 100_000 + b"\xc0"
    rejects(data, p.ErrorCode.BAD_FRAME)


def test_server_decoder_rejects_client_messages() -> None:
    """decode_server knows only server messages (a client must not mistake its own echo)."""
    with pytest.raises(p.ProtocolError) as info:
        p.decode_server(p.encode(p.Cancel(id=1)))
    assert info.value.code == p.ErrorCode.UNKNOWN_TYPE


def test_odd_length_pcm_is_rejected() -> None:
    """Audio must carry whole 16-bit samples."""
    with pytest.raises(p.ProtocolError):
        p.decode_server(frame(type="audio", id=1, seq=0, pcm=b"\x00\x01\x02"))


def test_error_codes_are_stable_strings() -> None:
    """The documented error codes exist with their documented spelling."""
    assert p.ErrorCode.ALL == {
        "bad_frame", "bad_message", "unknown_type", "too_large", "bad_text", "text_too_long", "bad_audio",
        "audio_too_long", "unknown_voice", "busy", "cancelled", "slow_consumer", "unauthorized", "internal",
        "shutting_down",
    }


def test_daemon_and_clients_import_without_torch() -> None:
    """ttsd.api, every daemon module and the clients import without torch: clients need no torch, and
    the daemon meets the model only through the Pipeline it is handed (tests/test_api.py blocks torch outright)."""
    modules = ["ttsd.api." + m for m in ("errors", "options", "protocol", "rules", "pcm")]
    modules += ["ttsd.daemon." + m for m in ("server", "session", "worker", "core", "http", "wyoming",
                                            "metrics", "presets", "config", "cli", "encoding", "systemd",
                                            "voice_store")]
    modules += ["ttsd.clients.client", "ttsd.clients.say"]
    code = f"import sys, {', '.join(modules)}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_container_bomb_is_refused_before_it_is_built() -> None:
    """A 16 MiB array of 16.7 M empty maps is bad_frame after allocating almost nothing (it once cost ~1.2 GB)."""
    import tracemalloc

    n = 2**24 - 5
    bomb = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n
    tracemalloc.start()
    try:
        rejects(bomb, p.ErrorCode.BAD_FRAME)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoding the bomb allocated {peak} bytes"


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb([[[None] * 8] * 8] * 8),                                   # nested arrays
        frame(type="ping", nonce=1, x={"a": [1]}),                                # map > map > array
        frame(type="synthesize", id=1, text="x", voice="v", emo_vector=[0.0] * (p._MAX_ARRAY_LEN + 1)),
        frame(type="ping", **{f"k{i}": 0 for i in range(p._MAX_MAP_LEN)}),        # map over the longest message
        frame(type="ping", nonce=msgpack.ExtType(1, b"\x00")),                    # extension type
    ],
    ids=["nested-arrays", "nested-maps", "long-array", "long-map", "ext-type"],
)
def test_frames_beyond_the_structure_limits_are_bad_frame(data: bytes) -> None:
    """Deeper nesting, longer arrays or maps than any message, and extension types fail with bad_frame."""
    rejects(data, p.ErrorCode.BAD_FRAME)


def test_largest_legal_messages_pass_the_structure_limits() -> None:
    """A map as wide as a synthesize with every option set, an 8-element emo_vector and a 16 MiB
    register_voice pass the limits."""
    as_wide = rejects(frame(type="ping", **{f"k{i}": 0 for i in range(p._MAX_MAP_LEN - 1)}), p.ErrorCode.BAD_MESSAGE)
    assert "unknown field" in as_wide.detail       # decoded, then refused field by field
    def legal(o: Option) -> object:  # a value of the right type for options that default to nil
        return {tuple: (0.5,) * 8, int: 1, str: (o.meta.choices or ("x",))[0]}[o.kind]

    every = {o.name: o.default if o.default is not None else legal(o) for o in OPTIONS}
    full = p.Synthesize(id=1, text="x", voice="v", emo_voice="w", **every)
    assert len(msgpack.unpackb(p.encode(full))) == p._MAX_MAP_LEN  # the widest legal frame
    assert p.decode_client(p.encode(full)) == full
    big = p.RegisterVoice(id=1, audio=b"\x00" * (16 * 2**20 - 64))
    assert p.decode_client(p.encode(big)) == big
    listing = p.VoiceList(id=1, voices=tuple(f"{i:032x}" for i in range(p.MAX_LISTED_VOICES)), total=10**6)
    assert p.decode_server(p.encode(listing)) == listing


def test_voice_list_longer_than_its_limit_is_refused() -> None:
    """A voice_list beyond MAX_LISTED_VOICES ids, or with a total below its length, is refused."""
    too_many = frame(type="voice_list", id=1, voices=["a"] * (p.MAX_LISTED_VOICES + 1), total=10**6)
    short_total = frame(type="voice_list", id=1, voices=["a", "b"], total=1)
    for data in (too_many, short_total):
        with pytest.raises(p.ProtocolError):
            p.decode_server(data)


def test_unknown_field_names_are_quoted_short() -> None:
    """An 8 MiB unknown field name comes back cut to a short quote, the error text within MAX_ERROR_CHARS."""
    e = rejects(frame(type="ping", nonce=1, **{"n" * 8 * 2**20: 0, "b": 1, "c": 2}), p.ErrorCode.BAD_MESSAGE)
    assert len(e.detail) <= p.MAX_ERROR_CHARS
    assert f"'b', 'c', {'n' * p.QUOTE_CHARS!r}… (8388608 characters)" in e.detail
    many = rejects(frame(type="ping", **{f"k{i}": 0 for i in range(5)}), p.ErrorCode.BAD_MESSAGE)
    assert many.detail.endswith("'k0', 'k1', 'k2' and 2 more")


def test_error_ids_name_only_requests_the_error_ends() -> None:
    """error_id keeps the id of a refused synthesize or register_voice unless it is live; other frames get nil."""
    assert p.error_id("synthesize", 7, live={1}) == 7
    assert p.error_id("register_voice", 7, live=set()) == 7
    assert p.error_id("synthesize", 1, live={1}) is None      # duplicate: request 1 goes on
    for kind in ("append_text", "flush", "cancel", "ping", "hello", "sing", None):
        assert p.error_id(kind, 7, live=set()) is None
    assert p.error_id("synthesize", None, live=set()) is None
    e = rejects(frame(type="synthesize", id=1, text=3, voice="v"), p.ErrorCode.BAD_MESSAGE)
    assert p.error_of(e, live={1}).id is None and p.error_of(e, live=set()).id == 1


def test_server_hello_from_an_older_server_still_decodes() -> None:
    """A hello without `model` and `languages` (a server from before IndexTTS-2.5 support) reads as IndexTTS-2."""
    raw = msgpack.unpackb(p.encode(SERVER_MESSAGES[0]))
    del raw["model"], raw["languages"]
    hello = p.decode_server(msgpack.packb(raw))
    assert isinstance(hello, p.ServerHello) and (hello.model, hello.languages) == ("IndexTTS-2", ("zh", "en"))
    raw["languages"] = "zh"
    with pytest.raises(p.ProtocolError, match="languages"):
        p.decode_server(msgpack.packb(raw))
