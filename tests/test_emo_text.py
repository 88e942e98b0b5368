"""Emotion from text (emo_text, use_emo_text, OpenAI's instructions) through every interface.

The checkpoint is the indextts2 fixture converted, with the qwen-emo-tiny-s1 QwenEmotion folder
beside its files, as `ttsd fetch` lays out a release. The tiny QwenEmotion answers upstream's way
only for the texts it was imprinted with, so the emotion texts here are fixture cases: each reads
as the vector `ttsd emotion` prints for it (upstream's, in cases.json). Every request is greedy,
short and seeded (test_daemon's FAST), so audio compares sample for sample with offline synthesis
from that vector."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import wave
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from ttsd.api import protocol as p
from ttsd.api.errors import BadOptions
from ttsd.api.options import SynthesisOptions
from ttsd.daemon.worker import VoiceCache
from ttsd.pipeline.errors import EmotionScoreError
from ttsd.pipeline.pipeline import Pipeline
from ttsd.pipeline.qwen_emo import QWEN_EMO_DIR

from .conftest import REPO_FIXTURES, FixtureSet
from .test_daemon import (
    FAST,
    GATE_TIMEOUT_S,
    assert_pcm_close,
    client,
    hold_voice_preparation,
    offline_pcm,
    pcm_of,
    running,
    until_true,
)

QWEN_SET = REPO_FIXTURES / "qwen-emo-tiny-s1"
CASES = {c["key"]: c for c in json.loads((QWEN_SET / "golden" / "cases.json").read_text(encoding="utf-8"))}
SURPRISE = CASES["A5"]  # "Wait, you drove all the way here ...": a short answer (18 ids)
DISGUST = CASES["A7"]   # a label answer, 21 ids
SPOKEN = "Hello there."


def vector(case: dict[str, Any]) -> tuple[float, ...]:
    return tuple(case["emo_vector"])


@pytest.fixture(scope="module")
def emo_ckpt(converted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted TTS checkpoint with the released-format QwenEmotion folder in it (symlinks, no copies)."""
    ckpt = tmp_path_factory.mktemp("emo-ckpt")
    for entry in converted.iterdir():
        (ckpt / entry.name).symlink_to(entry.resolve())
    (ckpt / QWEN_EMO_DIR).symlink_to((QWEN_SET / "ckpt" / QWEN_EMO_DIR).resolve())
    return ckpt


@pytest.fixture(scope="module")
def emo_pipeline(emo_ckpt: Path) -> Pipeline:
    pipe = Pipeline.load(emo_ckpt, device="cpu")
    assert pipe.qwen_emo is not None
    return pipe


@pytest.fixture(scope="module")
def speaker(fx: FixtureSet) -> Path:
    return fx.root / "inputs" / "speaker.wav"


def offline(pipe: Pipeline, speaker: Path, text: str, **opts: Any) -> bytes:
    return offline_pcm(pipe, pipe.prepare_voice(speaker), text, **{**FAST, **opts})


# ------------------------------------------------------------------------------------------------
# The options and the pipeline


def test_which_text_is_read() -> None:
    """emo_text is read when set (even beside use_emo_text), else the spoken text with use_emo_text; the
    read vector replaces the text fields, so the request runs as one that sent emo_vector."""
    assert SynthesisOptions().emotion_text("spoken") is None
    assert SynthesisOptions(use_emo_text=True).emotion_text("spoken") == "spoken"
    assert SynthesisOptions(emo_text="calm").emotion_text("spoken") == "calm"
    assert SynthesisOptions(emo_text="calm", use_emo_text=True).emotion_text("spoken") == "calm"
    read = SynthesisOptions(emo_text="calm", use_emo_text=True, emo_alpha=0.5).with_emotion_vector([0.1] * 8)
    assert read == SynthesisOptions(emo_vector=(0.1,) * 8, emo_alpha=0.5)
    assert not read.wants_emotion_text
    with pytest.raises(p.ProtocolError, match="emo_text is longer than 1000"):
        p.decode_client(p.encode(p.Synthesize(id=1, text="x", voice="v", emo_text="x" * 1001)))


def test_texts_are_read_in_one_batch_as_each_alone(emo_pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several requests' texts decode as one QwenEmotion batch (a repeated text once), and each gets
    upstream's vector for its text, the other options untouched."""
    qwen = emo_pipeline.qwen_emo
    assert qwen is not None
    batches: list[list[str]] = []
    real = qwen.generate

    def recorded(texts: list[str], *args: Any, **kwargs: Any) -> Any:
        batches.append(list(texts))
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(qwen, "generate", recorded)
    requests = [(SynthesisOptions(use_emo_text=True, seed=1), SURPRISE["text"]),
                (SynthesisOptions(emo_text=DISGUST["text"], emo_alpha=0.3), SPOKEN),
                (SynthesisOptions(emo_text=SURPRISE["text"], emo_vector=(1.0,) * 8), SPOKEN)]
    read = emo_pipeline.read_emotion_texts(requests)
    assert batches == [[SURPRISE["text"], DISGUST["text"]]]
    assert read == [SynthesisOptions(emo_vector=vector(SURPRISE), seed=1),
                    SynthesisOptions(emo_vector=vector(DISGUST), emo_alpha=0.3),
                    SynthesisOptions(emo_vector=vector(SURPRISE))]


def test_text_emotion_wins_as_upstream(emo_pipeline: Pipeline, speaker: Path) -> None:
    """emo_text gives the audio of emo_vector = its vector, whatever emo_vector and emotion voice are also
    set (upstream: text, then vector, then emotion audio); use_emo_text reads the spoken text."""
    pipe = emo_pipeline
    voice = pipe.prepare_voice(speaker)
    want = offline(pipe, speaker, SPOKEN, emo_vector=vector(SURPRISE))
    assert want != offline(pipe, speaker, SPOKEN)  # the emotion changes the audio at all
    opts = SynthesisOptions(**FAST, emo_text=SURPRISE["text"], emo_vector=(0.0, 1.0, 0, 0, 0, 0, 0, 0))
    assert offline_pcm_with(pipe, voice, SPOKEN, opts, emo_voice=pipe.prepare_voice(speaker)) == want
    own = SynthesisOptions(**FAST, use_emo_text=True)
    assert offline_pcm_with(pipe, voice, SURPRISE["text"], own) == offline(
        pipe, speaker, SURPRISE["text"], emo_vector=vector(SURPRISE))


def offline_pcm_with(pipe: Pipeline, voice: Any, text: str, opts: SynthesisOptions, emo_voice: Any = None) -> bytes:
    from ttsd.api.pcm import to_s16le

    return to_s16le(pipe.synthesize(voice, text, opts, emo_voice=emo_voice))


# ------------------------------------------------------------------------------------------------
# ttsd synth and ttsd emotion


def wav_frames(path: Path) -> bytes:
    with wave.open(str(path), "rb") as w:
        return w.readframes(w.getnframes())


def fast_flags() -> list[str]:
    return ["--greedy", "--num-beams", "1", "--max-mel-tokens", str(FAST["max_mel_tokens"]), "--diffusion-steps",
            str(FAST["diffusion_steps"]), "--max-text-tokens-per-segment", str(FAST["max_text_tokens_per_segment"]),
            "--seed", str(FAST["seed"])]


def test_synth_emo_text_equals_the_vector_ttsd_emotion_prints(
    emo_ckpt: Path, emo_pipeline: Pipeline, speaker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ttsd synth --emo-text T` writes the audio of `--emo-vector V`, V being what `ttsd emotion T` prints."""
    from ttsd.daemon.cli import main as ttsd

    assert ttsd(["emotion", "--checkpoints", str(emo_ckpt), "--device", "cpu", SURPRISE["text"]]) == 0
    printed = json.loads(capsys.readouterr().out)["vector"]
    assert printed == SURPRISE["emo_vector"]
    out = tmp_path / "emo.wav"
    assert ttsd(["synth", "--checkpoints", str(emo_ckpt), "--voice", str(speaker), "--text", SPOKEN, "--out",
                 str(out), "--device", "cpu", "--emo-text", SURPRISE["text"], *fast_flags()]) == 0, capsys.readouterr()
    # What `ttsd synth --emo-vector V` writes (test_pipeline checks synth's WAV against Pipeline.synthesize).
    assert wav_frames(out) == offline(emo_pipeline, speaker, SPOKEN, emo_vector=tuple(printed))


def test_synth_refuses_text_emotion_without_the_model_before_loading(
    converted: Path, emo_ckpt: Path, speaker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the QwenEmotion folder, or with --no-emo-text, --emo-text/--use-emo-text stop with one line
    and status 2 before any weight is loaded."""
    from ttsd.daemon.cli import main as ttsd

    def no_load(*args: Any, **kwargs: Any) -> Pipeline:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Pipeline, "load", no_load)
    base = ["synth", "--voice", str(speaker), "--text", SPOKEN, "--out", str(tmp_path / "x.wav"), "--device", "cpu"]
    for ckpt, extra, words in ((converted, ["--emo-text", "angry"], QWEN_EMO_DIR),
                               (converted, ["--use-emo-text"], QWEN_EMO_DIR),
                               (emo_ckpt, ["--emo-text", "angry", "--no-emo-text"], "--no-emo-text")):
        assert ttsd([*base, "--checkpoints", str(ckpt), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ttsd synth: ") and words in err and len(err.splitlines()) == 1, err


def test_serve_no_emo_text_skips_the_model(emo_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ttsd serve --no-emo-text` (emo_text = false) loads the checkpoint without its QwenEmotion."""
    from ttsd.daemon import config as daemon_config
    from ttsd.daemon.server import load_pipeline
    from ttsd.pipeline.device import resolve_device

    ap = argparse.ArgumentParser()
    daemon_config.add_flags(ap)
    assert daemon_config.from_args(ap.parse_args([])).emo_text is True
    config = daemon_config.from_args(ap.parse_args(["--checkpoints", str(emo_ckpt), "--no-emo-text"]))
    assert config.emo_text is False
    pipe = load_pipeline(config, resolve_device("cpu"))
    assert pipe.qwen_emo is None
    with pytest.raises(BadOptions, match="QwenEmotion"):
        pipe.check_options(SynthesisOptions(emo_text="angry"))


# ------------------------------------------------------------------------------------------------
# The daemon


def hold_emotion_reading(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event,
                                                                                     list[int]]:
    """Make `pipe.read_emotion_texts` wait for the returned gate: (gate, entered, batch sizes)."""
    gate, entered, sizes = threading.Event(), threading.Event(), []
    real = pipe.read_emotion_texts

    def held(requests: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(requests))
        entered.set()
        assert gate.wait(GATE_TIMEOUT_S), "the test never released the emotion reading"
        return real(requests, *args, **kwargs)

    monkeypatch.setattr(pipe, "read_emotion_texts", held)
    return gate, entered, sizes


async def until_all_end(c: Any, ids: set[int]) -> list[p.ServerMessage]:
    """Messages until every request in `ids` has ended (Done or Error), in any order."""
    out: list[p.ServerMessage] = []
    while ids:
        msg = await c.recv()
        out.append(msg)
        if isinstance(msg, p.Done | p.Error):
            ids.discard(msg.id or -1)
    return out


async def test_daemon_reads_waiting_texts_in_one_batch_without_stalling_others(
    emo_pipeline: Pipeline, speaker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests asking for emotion from text while the voice thread is busy are read in one batch;
    while that batch is held, a plain request is synthesised from start to end; then each gets the audio
    of emo_vector = its text's vector."""
    wav = speaker.read_bytes()
    async with running(emo_pipeline, VoiceCache(8), None) as server, client(server) as c:
        voice = await c.register(wav)
        voice_gate, voice_entered = hold_voice_preparation(emo_pipeline, monkeypatch)
        emo_gate, emo_entered, sizes = hold_emotion_reading(emo_pipeline, monkeypatch)
        try:
            await c.send(p.RegisterVoice(id=9, audio=wav + b"\0" * 64))  # a new voice id: the voice thread is busy
            assert await asyncio.to_thread(voice_entered.wait, GATE_TIMEOUT_S)
            await c.send(p.Synthesize(id=1, text=SPOKEN, voice=voice, emo_text=SURPRISE["text"], **FAST))
            await c.send(p.Synthesize(id=2, text=SURPRISE["text"], voice=voice, use_emo_text=True, **FAST))
            await until_true(lambda: server.worker is not None and server.worker.live_jobs == 2)
            voice_gate.set()
            assert await asyncio.to_thread(emo_entered.wait, GATE_TIMEOUT_S)
            await c.send(p.Synthesize(id=3, text=SPOKEN, voice=voice, **FAST))
            plain = await c.until(3)
            assert isinstance(plain[-1], p.Done) and not emo_gate.is_set()  # done while the batch was held
            emo_gate.set()
            messages = await until_all_end(c, {1, 2})
        finally:
            voice_gate.set()
            emo_gate.set()
    assert sizes == [2]
    # 1 and 2 shared their batches, which round differently from solo steps in the last bits.
    assert_pcm_close(pcm_of(messages, 1), offline(emo_pipeline, speaker, SPOKEN, emo_vector=vector(SURPRISE)), "1")
    assert_pcm_close(pcm_of(messages, 2), offline(emo_pipeline, speaker, SURPRISE["text"],
                                                  emo_vector=vector(SURPRISE)), "2")
    assert pcm_of(plain, 3) == offline(emo_pipeline, speaker, SPOKEN)


async def test_daemon_refuses_what_it_cannot_read(
    pipeline: Pipeline, emo_pipeline: Pipeline, speaker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bad_message, naming the cause: emotion text on a daemon without QwenEmotion, and use_emo_text on an
    incremental request (its whole text is not there before the first segment); an answer that cannot be
    read ends its request with bad_text; the daemon serves on."""
    wav = speaker.read_bytes()
    async with running(pipeline, VoiceCache(8), None) as server, client(server) as c:
        voice = await c.register(wav)
        for rid, extra in ((1, {"emo_text": "angry"}), (2, {"use_emo_text": True})):
            await c.send(p.Synthesize(id=rid, text=SPOKEN, voice=voice, **extra, **FAST))
            reply = (await c.until(rid))[-1]
            assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.BAD_MESSAGE, reply
            assert "QwenEmotion" in reply.message and "--no-emo-text" in reply.message, reply.message
    async with running(emo_pipeline, VoiceCache(8), None) as server, client(server) as c:
        voice = await c.register(wav)
        await c.send(p.Synthesize(id=1, text="", voice=voice, incremental=True, use_emo_text=True, **FAST))
        reply = (await c.until(1))[-1]
        assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.BAD_MESSAGE and "emo_text" in reply.message
        unreadable = EmotionScoreError("could not convert string to float: '1.2.3'")
        monkeypatch.setattr(emo_pipeline, "read_emotion_texts", lambda requests: [unreadable] * len(requests))
        await c.send(p.Synthesize(id=2, text=SPOKEN, voice=voice, emo_text="odd", **FAST))
        reply = (await c.until(2))[-1]
        assert isinstance(reply, p.Error) and (reply.code, reply.message) == (p.ErrorCode.BAD_TEXT, str(unreadable))
        await c.send(p.Synthesize(id=3, text=SPOKEN, voice=voice, **FAST))
        assert isinstance((await c.until(3))[-1], p.Done)


async def test_http_instructions_are_emo_text(emo_pipeline: Pipeline, speaker: Path, tmp_path: Path) -> None:
    """OpenAI's `instructions` give the same audio as `emo_text`, which is that of its vector; both at once is 400."""
    voices_dir = tmp_path / "voices"
    voices_dir.mkdir()
    (voices_dir / "alice.wav").write_bytes(speaker.read_bytes())
    (voices_dir / "alice.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in FAST.items()))
    body = {"model": "tts-1", "input": SPOKEN, "voice": "alice", "response_format": "pcm"}
    async with running(emo_pipeline, VoiceCache(8), None, http_port=0, voices_dir=voices_dir) as server:
        assert server.http is not None
        async with aiohttp.ClientSession(base_url=server.http.url) as h:
            replies = []
            for extra in ({"instructions": SURPRISE["text"]}, {"emo_text": SURPRISE["text"]},
                          {"emo_vector": list(vector(SURPRISE))}):
                async with h.post("/v1/audio/speech", json={**body, **extra}) as r:
                    assert r.status == 200, await r.text()
                    replies.append(await r.read())
            async with h.post("/v1/audio/speech", json={**body, "instructions": "x", "emo_text": "y"}) as r:
                error = (await r.json())["error"]
                assert (r.status, error["code"], error["param"]) == (400, p.ErrorCode.BAD_MESSAGE, "instructions")
    assert replies[0] == replies[1] == replies[2] and len(replies[0]) > 0
    assert np.frombuffer(replies[0], dtype="<i2").any()
