"""The one synthesis-option table: the protocol, `SynthesisOptions`, both CLIs and the docs agree with it."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Any

import msgpack
import pytest

from ttsd.api import protocol as p
from ttsd.api.errors import BadOptions
from ttsd.api.options import (
    OPTIONS,
    Option,
    SynthesisOptions,
    add_option_flags,
    given_options,
    markdown_rows,
    option,
    options_of,
)
from ttsd.clients import say
from ttsd.daemon.core import OptionError, options_from
from ttsd.daemon.session import synthesis_options
from ttsd.pipeline import synth

from .conftest import REPO

# IndexTTS2.infer's defaults (indextts/infer_v2.py, generation_kwargs and the s2mel call): the oracle.
UPSTREAM_DEFAULTS = {
    "emo_alpha": 1.0, "emo_vector": None, "emo_text": None, "use_emo_text": False, "use_random": False,
    "do_sample": True, "temperature": 0.8,
    "top_k": 30, "top_p": 0.8, "num_beams": 3, "repetition_penalty": 10.0, "max_mel_tokens": 1500,
    "seed": None, "diffusion_steps": 25, "inference_cfg_rate": 0.7, "max_text_tokens_per_segment": 120,
    "quick_streaming_tokens": 0, "interval_silence_ms": 200,
    "lang": None, "duration_factor": 1.0,  # infer_v2_5: lang is required there; ttsd detects zh/en when absent
    # Off, as upstream's infer; the overlap is its TensorRT StreamingDecoder's default.
    "chunk_codes": 0, "chunk_overlap": 20, "first_chunk_codes": 0,
}
# Options whose valid values depend on each other (chunking_problem): a consistent set, not different
# from the defaults one by one.
RELATED_SAMPLES = {"chunk_codes": 60, "chunk_overlap": 10, "first_chunk_codes": 25}
PARSERS = {"ttsd synth": synth.build_parser, "ttsd-say": say.build_parser}
REQUIRED = {"ttsd synth": ["--checkpoints", "c", "--voice", "v.wav", "--text", "t", "--out", "o.wav"],
            "ttsd-say": ["--voice", "v.wav"]}


def frame(**payload: object) -> bytes:
    return msgpack.packb({"type": "synthesize", "id": 1, "text": "x", "voice": "v", **payload}, use_bin_type=True)


def probes(o: Option) -> list[tuple[Any, bool]]:
    """(value, valid) pairs at and just beyond both ends of an option's range."""
    lo, hi = o.meta.lo, o.meta.hi
    assert lo is not None and hi is not None, o.name
    step = 1 if o.kind is int else 1e-3 * max(1.0, abs(hi - lo))
    cast = int if o.kind is int else float
    pairs = [(cast(lo), not o.meta.lo_open), (cast(lo - step), False), (cast(hi), not o.meta.hi_open),
             (cast(hi + step), False), (cast((lo + hi) / 2), True)]
    if o.kind is float:
        pairs += [(math.nan, False), (math.inf, False)]
    return pairs


def sample_value(o: Option) -> Any:
    """A valid value different from the default, for round trips."""
    if o.name in RELATED_SAMPLES:
        return RELATED_SAMPLES[o.name]
    if o.kind is bool:
        return not o.default
    if o.kind is tuple:
        return tuple(0.1 * i for i in range(o.meta.length or 0))
    if o.kind is str:
        return o.meta.choices[-1] if o.meta.choices else "angry, shouting"
    assert o.meta.lo is not None and o.meta.hi is not None
    if o.kind is int:
        return int(o.meta.lo) + 1 if o.default != int(o.meta.lo) + 1 else int(o.meta.lo) + 2
    return (o.meta.lo + o.meta.hi) / 2 if o.default != (o.meta.lo + o.meta.hi) / 2 else o.meta.hi


def cli_text(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def test_table_is_the_dataclass_with_upstream_defaults() -> None:
    """OPTIONS lists every SynthesisOptions field with its default, and the defaults are upstream's."""
    assert [o.name for o in OPTIONS] == [f.name for f in fields(SynthesisOptions)]
    assert {o.name: o.default for o in OPTIONS} == UPSTREAM_DEFAULTS
    assert SynthesisOptions() == SynthesisOptions(**UPSTREAM_DEFAULTS)
    for o in OPTIONS:
        assert o.meta.help and not o.meta.help.endswith("."), o.name
        if o.kind in (int, float, tuple):
            assert o.interval, f"{o.name} has no range"


@pytest.mark.parametrize("o", [o for o in OPTIONS if o.kind in (int, float)], ids=lambda o: o.name)
def test_protocol_and_options_share_each_range(o: Option) -> None:
    """At both ends of the range and beyond, the decoder and SynthesisOptions accept exactly the same values."""
    for value, valid in probes(o):
        try:
            SynthesisOptions(**{o.name: value})
            checked = True
        except BadOptions as e:
            assert o.name in str(e) and o.interval in str(e)
            checked = False
        try:
            msg = p.decode_client(frame(**{o.name: value}))
            decoded = True
        except p.ProtocolError as e:
            assert e.code == p.ErrorCode.BAD_MESSAGE and o.name in e.detail and o.interval in e.detail
            decoded = False
        assert (checked, decoded) == (valid, valid), (o.name, value)
        if valid:
            assert isinstance(msg, p.Synthesize) and msg.option(o.name) == value


def test_vector_option_range_applies_to_each_element() -> None:
    """emo_vector takes exactly 8 weights in [0, 1.2], in the decoder and in SynthesisOptions."""
    (o,) = [o for o in OPTIONS if o.kind is tuple]
    n, lo, hi = o.meta.length, o.meta.lo, o.meta.hi
    assert n == 8 and (lo, hi) == (0.0, 1.2)
    for weights in ([hi] * n, [lo] * n):
        SynthesisOptions(emo_vector=tuple(weights))
        assert p.decode_client(frame(emo_vector=weights)) == p.Synthesize(
            id=1, text="x", voice="v", emo_vector=tuple(weights))
    for weights in ([hi + 0.01] * n, [lo - 0.01] * n, [lo] * (n - 1), [lo] * (n + 1)):
        with pytest.raises(BadOptions, match="emo_vector"):
            SynthesisOptions(emo_vector=tuple(weights))
        with pytest.raises(p.ProtocolError, match="emo_vector"):
            p.decode_client(frame(emo_vector=weights))


def test_absent_options_take_the_defaults_and_set_ones_arrive() -> None:
    """A bare synthesize frame gives SynthesisOptions(); every option set on the wire reaches the options."""
    assert synthesis_options(p.decode_client(frame())) == SynthesisOptions()
    values = {o.name: sample_value(o) for o in OPTIONS}
    msg = p.decode_client(p.encode(p.Synthesize(id=1, text="x", voice="v", **values)))
    assert isinstance(msg, p.Synthesize)
    assert synthesis_options(msg) == SynthesisOptions(**values)


@pytest.mark.parametrize("o", OPTIONS, ids=lambda o: o.name)
def test_plain_maps_and_frames_are_checked_alike(o: Option) -> None:
    """A JSON or TOML map (HTTP body, preset file) gives the options a synthesize frame with the same value
    gives, and is refused with the decoder's message, blaming the option, where the frame is refused."""
    as_json: Any = list(sample_value(o)) if o.kind is tuple else sample_value(o)
    msg = p.decode_client(frame(**{o.name: as_json}))
    assert isinstance(msg, p.Synthesize)
    assert options_from({o.name: as_json}).opts == synthesis_options(msg) != SynthesisOptions()
    bad = 1.5 if o.kind is int else 7 if o.kind is str and not o.meta.choices else "nope"
    with pytest.raises(p.ProtocolError) as refused:
        p.decode_client(frame(**{o.name: bad}))
    with pytest.raises(OptionError) as e:
        options_from({o.name: bad})
    assert (str(e.value), e.value.param) == (refused.value.detail.removeprefix("synthesize: "), o.name)


def test_plain_maps_refuse_unknown_keys_and_carry_the_emotion_voice() -> None:
    """A key that is no option is refused by name; emo_voice travels beside the options; None means unset."""
    with pytest.raises(OptionError) as e:
        options_from({"colour": "blue"})
    assert e.value.param == "colour" and "colour" in str(e.value)
    checked = options_from({"emo_voice": "calm", "top_k": None, "temperature": 1})
    assert checked.emo_voice == "calm" and checked.opts == SynthesisOptions(temperature=1.0)
    assert isinstance(checked.opts.temperature, float)
    with pytest.raises(OptionError) as e:
        options_from({"emo_voice": 7})
    assert e.value.param == "emo_voice"


def test_wire_keys_are_flat_and_unset_options_are_left_out() -> None:
    """Options travel as top-level keys named as in the table; options not set are not sent at all."""
    raw = msgpack.unpackb(p.encode(p.Synthesize(id=1, text="x", voice="v", top_k=5, seed=None)))
    assert raw == {"type": "synthesize", "id": 1, "text": "x", "voice": "v", "incremental": False,
                   "format": "pcm_s16le", "emo_voice": None, "top_k": 5}
    with pytest.raises(TypeError, match="unknown synthesis option"):
        p.Synthesize(id=1, text="x", voice="v", top_q=5)


@pytest.mark.parametrize("cli", PARSERS)
def test_every_option_is_a_flag_with_the_table_default(cli: str) -> None:
    """Each CLI has one flag per option, named after it, whose help states the table's default and range."""
    ap = PARSERS[cli]()
    actions = {s: a for a in ap._actions for s in a.option_strings}
    for o in OPTIONS:
        assert o.flag in actions, f"{cli} lacks {o.flag}"
        action = actions[o.flag]
        assert action.dest == o.name and action.default is None
        if o.default is not None:
            assert f"default {o.default_text}" in str(action.help), (cli, o.name)
        if o.kind in (int, float):
            assert o.interval in str(action.help), (cli, o.name)
    assert given_options(ap.parse_args(REQUIRED[cli])) == {}


@pytest.mark.parametrize("cli", PARSERS)
def test_every_option_flag_reaches_the_options(cli: str) -> None:
    """Each flag given on a CLI ends up as that option's value; the short aliases mean the same."""
    ap = PARSERS[cli]()
    argv = list(REQUIRED[cli])
    values = {o.name: sample_value(o) for o in OPTIONS}
    for o in OPTIONS:
        if o.kind is bool:
            argv.append(o.flag if values[o.name] else "--no-" + o.flag[2:])
        else:
            argv += [o.flag, cli_text(values[o.name])]
    assert SynthesisOptions(**given_options(ap.parse_args(argv))) == SynthesisOptions(**values)
    aliases = ["--greedy", "--cfg-rate", "0.5", "--emo-random"]
    assert given_options(ap.parse_args([*REQUIRED[cli], *aliases])) == {
        "do_sample": False, "inference_cfg_rate": 0.5, "use_random": True}


def test_docs_options_table_matches_the_code() -> None:
    """docs/protocol.md's synthesize table has exactly the generated option rows, in table order."""
    doc = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8").splitlines()
    names = {f"| `{o.name}` |" for o in OPTIONS}
    rows = [line for line in doc if any(line.startswith(n) for n in names)]
    assert rows == markdown_rows(), "regenerate the rows with ttsd.api.options.markdown_rows():\n" + "\n".join(
        markdown_rows())


@dataclass(frozen=True, kw_only=True, slots=True)
class _Extended(SynthesisOptions):
    """SynthesisOptions plus two made-up options, declared the one way options are."""

    accent: str | None = option(None, group="text", choices=("en", "zh"), help="accent of the text")
    pitch_factor: float = option(1.0, group="acoustic", lo=0.5, hi=2.0, help="pitch factor")


def test_a_new_option_is_a_one_place_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """Options declared with option(...) get their flag, docs row, validation and wire decoding with no other edit."""
    table = options_of(_Extended)
    accent, factor = table[-2:]
    assert (accent.kind, accent.optional, factor.kind, factor.interval) == (str, True, float, "[0.5, 2]")
    assert markdown_rows([accent, factor]) == [
        "| `accent` | str (en, zh) | nil | | accent of the text |",
        "| `pitch_factor` | float [0.5, 2] | 1.0 | | pitch factor |",
    ]
    ap = argparse.ArgumentParser()
    add_option_flags(ap, table)
    assert given_options(ap.parse_args(["--accent", "zh", "--pitch-factor", "1.25"]), table) == {
        "accent": "zh", "pitch_factor": 1.25}
    assert factor.problem(2.5) == "pitch_factor must be in [0.5, 2], got 2.5"
    assert accent.problem("fr") is not None and accent.problem("zh") is None

    monkeypatch.setattr(p, "OPTIONS", table)
    monkeypatch.setattr(p, "OPTION_NAMES", frozenset(o.name for o in table))
    msg = p.decode_client(frame(accent="zh", pitch_factor=1.25))
    assert isinstance(msg, p.Synthesize)
    assert (msg.option("accent"), msg.option("pitch_factor")) == ("zh", 1.25)
    with pytest.raises(p.ProtocolError, match="pitch_factor must be in \\[0.5, 2\\]"):
        p.decode_client(frame(pitch_factor=3))
    assert p.decode_client(p.encode(msg)) == msg


def test_emo_vector_flag_accepts_commas_or_spaces() -> None:
    """The one --emo-vector parser takes 8 numbers separated by commas or spaces and names a wrong count."""
    ap = say.build_parser()
    args = ap.parse_args(["--voice", "v.wav", "--emo-vector", "0 0.5,0 0 0 0 0 1"])
    assert args.emo_vector == (0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(SystemExit):
        ap.parse_args(["--voice", "v.wav", "--emo-vector", "1,2,3"])


@pytest.mark.parametrize(("chunk", "overlap", "first", "ok"), [
    (0, 500, 0, True),      # off: the other two are not used
    (100, 20, 0, True),     # first chunk as long as the others
    (100, 20, 25, True),
    (100, 99, 0, True),
    (100, 100, 0, False),   # a chunk with no new code
    (100, 20, 20, False),   # the first chunk no longer than the overlap
    (10, 20, 0, False),     # the default overlap with short chunks
])
def test_chunking_options_are_checked_together(chunk: int, overlap: int, first: int, ok: bool) -> None:
    """chunk_overlap must leave every chunk (the first included) a new code, whenever chunk_codes is on."""
    build = lambda: SynthesisOptions(chunk_codes=chunk, chunk_overlap=overlap, first_chunk_codes=first)  # noqa: E731
    if ok:
        assert build().chunk_codes == chunk
    else:
        with pytest.raises(BadOptions, match="chunk_overlap must be less than"):
            build()
