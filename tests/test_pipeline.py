"""End to end on the fixture: every variant's waveform, `ttsd synth`, streaming and bad input."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ttsd.api.errors import BadAudio, BadOptions, BadText, Cancelled
from ttsd.api.options import SynthesisOptions
from ttsd.pipeline import Pipeline
from ttsd.pipeline.engine import Engine

from .conftest import FixtureSet, assert_close


@pytest.fixture(scope="module")
def pipe(pipeline: Pipeline) -> Pipeline:
    return pipeline


def golden_options(fx: FixtureSet, variant: str) -> SynthesisOptions:
    """The decoding settings the golden run used, read from its manifest (never hard-coded)."""
    call = fx.variant(variant)["call"]
    gen = call["generation_kwargs"]
    return SynthesisOptions(
        lang=call.get("lang"),  # IndexTTS-2.5 calls name the language and the duration factor
        duration_factor=float(call.get("duration_factor", 1.0)),
        emo_alpha=float(call["emo_alpha"]),
        emo_vector=None if call["emo_vector"] is None else tuple(float(w) for w in call["emo_vector"]),
        use_random=bool(call["use_random"]),
        do_sample=bool(gen["do_sample"]),
        num_beams=int(gen["num_beams"]),
        repetition_penalty=float(gen["repetition_penalty"]),
        max_mel_tokens=int(gen["max_mel_tokens"]),
        diffusion_steps=int(fx.settings["diffusion_steps"]),
        inference_cfg_rate=float(fx.settings["inference_cfg_rate"]),
        max_text_tokens_per_segment=int(call["max_text_tokens_per_segment"]),
        interval_silence_ms=int(call["interval_silence"]),
        seed=0,
    )


def golden_noise(fx: FixtureSet, variant: str) -> dict[int, torch.Tensor]:
    cfm = fx.golden(variant, "14_cfm")
    return {int(k[3:].split(".")[0]): v for k, v in cfm.items() if k.endswith(".noise")}


def golden_text(fx: FixtureSet, variant: str) -> str:
    """The variant's text: its call's own (IndexTTS-2.5 variants may differ), else the set's."""
    return str(fx.variant(variant)["call"].get("text", fx.text))


def synth_flags(fx: FixtureSet, variant: str) -> list[str]:
    """`ttsd synth` flags for the variant's call: inputs, emotion, decoding, segmentation and (2.5) language."""
    call, opts = fx.variant(variant)["call"], golden_options(fx, variant)
    flags = ["--voice", str(fx.input_path(call["spk_audio_prompt"])), "--text", golden_text(fx, variant),
             "--greedy", "--num-beams", str(opts.num_beams), "--repetition-penalty", str(opts.repetition_penalty),
             "--max-mel-tokens", str(opts.max_mel_tokens),
             "--max-text-tokens-per-segment", str(opts.max_text_tokens_per_segment), "--emo-alpha", str(opts.emo_alpha)]
    if call["emo_audio_prompt"] is not None:
        flags += ["--emo-audio", str(fx.input_path(call["emo_audio_prompt"]))]
    if opts.emo_vector is not None:
        flags += ["--emo-vector", ",".join(str(w) for w in opts.emo_vector)]
    if opts.lang is not None:
        flags += ["--lang", opts.lang, "--duration-factor", str(opts.duration_factor)]
    return flags


def noise_file(fx: FixtureSet, variant: str, tmp_path: Path) -> Path:
    """The variant's golden CFM noise as the safetensors file `ttsd synth --noise` reads."""
    from safetensors.torch import save_file

    noise = tmp_path / "noise.safetensors"
    save_file({k: v.contiguous() for k, v in fx.golden(variant, "14_cfm").items() if k.endswith(".noise")}, str(noise))
    return noise


def golden_int16(fx: FixtureSet, variant: str) -> torch.Tensor:
    """Upstream's waveform as the 16-bit samples a WAV holds, [1, N] float."""
    from ttsd.api.pcm import to_int16

    golden = fx.golden(variant, "16_output")["wav_pcm"][0].numpy()
    return torch.from_numpy(to_int16(golden).astype(np.float32))[None]


def read_wav(path: Path) -> torch.Tensor:
    """A `ttsd synth` WAV (22050 Hz mono 16-bit, checked) as [1, N] float samples."""
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")
    mine, _ = sf.read(str(path), dtype="int16")
    return torch.from_numpy(mine.astype(np.float32))[None]


@pytest.mark.model_versions("2", "2.5")
def test_every_variant_through_synth_matches_golden_waveform(
    fx: FixtureSet, pipe: Pipeline, variant: str, converted: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every variant of both versions, from reference WAVs and text through `ttsd synth`'s flags, checks,
    progress report and writer (on the session's loaded model), reproduces upstream's joined waveform:
    the float PCM under the parity rule, the WAV as upstream's 16-bit samples."""
    import logging
    import re

    from ttsd.pipeline.synth import build_parser, check, synthesize, write

    out = tmp_path / "out.wav"
    args = build_parser().parse_args(["--checkpoints", str(converted), *synth_flags(fx, variant), "--out", str(out),
                                      "--noise", str(noise_file(fx, variant, tmp_path))])
    caplog.set_level(logging.INFO, logger="ttsd.pipeline.synth")
    job = check(args, args.text)
    pcm = synthesize(pipe, job, args)
    assert_close(torch.from_numpy(pcm)[None], fx.golden(variant, "16_output")["wav_pcm"], f"{variant} wav_pcm")
    total = int(re.search(r"segments=(\d+)", caplog.text).group(1))  # type: ignore[union-attr]
    done = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("segment ")]
    assert done == [f"{i}/{total}" for i in range(1, total + 1)]
    write(job.out, pcm, pipe.sample_rate_hz, job.out_format)
    written = read_wav(out)
    assert_close(written, golden_int16(fx, variant), f"{variant} wav")
    upstream_wav = fx.golden_dir / f"{variant}_output.wav"  # the WAV upstream itself wrote, where the set has it
    if upstream_wav.is_file():
        ref, _ = sf.read(str(upstream_wav), dtype="int16")
        assert_close(written, torch.from_numpy(ref.astype(np.float32))[None], upstream_wav.name)


@pytest.mark.model_versions("2", "2.5")
def test_synth_cli_loads_and_writes_golden_wav(fx: FixtureSet, converted: Path, tmp_path: Path) -> None:
    """`ttsd synth` as a command (its own model load, both versions) writes the golden WAV of the set's
    first variant; the test above covers every variant's flags on an already loaded model."""
    from ttsd.pipeline.synth import main

    variant = fx.variants[0]
    out = tmp_path / "out.wav"
    argv = ["--checkpoints", str(converted), *synth_flags(fx, variant), "--out", str(out),
            "--noise", str(noise_file(fx, variant, tmp_path))]
    assert main(argv) == 0
    assert_close(read_wav(out), golden_int16(fx, variant), f"{variant} wav")


def test_sampling_is_seeded(fx: FixtureSet, pipe: Pipeline) -> None:
    """Sampling with beams is reproducible for one seed and differs for another."""
    voice = pipe.prepare_voice(fx.input_path("speaker.wav"))
    opts = SynthesisOptions(max_mel_tokens=12, diffusion_steps=2, num_beams=2, seed=3)
    a = pipe.synthesize(voice, "Hello there.", opts)
    b = pipe.synthesize(voice, "Hello there.", opts)
    c = pipe.synthesize(voice, "Hello there.", opts.with_seed(4))
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_bad_inputs_raise_typed_errors(fx: FixtureSet, pipe: Pipeline) -> None:
    """Garbage audio, empty text, bad options, oversize segments and cancellation raise their own error types."""
    with pytest.raises(BadAudio):
        pipe.prepare_voice(b"this is not audio at all")
    voice = pipe.prepare_voice(fx.input_path("speaker.wav"))
    with pytest.raises(BadText):
        pipe.synthesize(voice, "   ", SynthesisOptions(max_mel_tokens=4, diffusion_steps=1))
    with pytest.raises(BadOptions):
        pipe.synthesize(voice, "Hi there.", SynthesisOptions(top_p=0.0))
    with pytest.raises(BadOptions, match="max_text_tokens_per_segment"):
        pipe.split_text("Hi there.", SynthesisOptions(max_text_tokens_per_segment=pipe.gpt.cfg.max_text_tokens + 5))
    with pytest.raises(BadOptions, match="num_beams"):
        pipe.synthesize(voice, "Hi there.", SynthesisOptions(num_beams=pipe.max_num_beams + 1, max_mel_tokens=4))
    with pytest.raises(Cancelled):
        pipe.synthesize(voice, "Hi there.", SynthesisOptions(max_mel_tokens=30, diffusion_steps=2), cancel=lambda: True)


def test_segments_overlap_only_where_streams_run_at_once(fx: FixtureSet, pipe: Pipeline) -> None:
    """With prefetch (CUDA), segment k+1 decodes while segment k renders and k's audio goes out as soon as
    it is ready, not after k+1's decode; without it (CPU), segment k+1 starts only after k is out."""
    opts = SynthesisOptions(max_mel_tokens=6, diffusion_steps=1, max_text_tokens_per_segment=8, seed=1)
    voice = pipe.prepare_voice(fx.input_path("speaker.wav"))
    text = "One two. Three four. Five six."
    assert len(pipe.split_text(text, opts)) == 3
    for prefetch in (True, False):
        events: list[str] = []
        engine = Engine(pipe, max_batch_rows=4, prefetch=prefetch,
                        observer=lambda what, _r, i, events=events: events.append(f"{what}{i}"))
        for _ in pipe.stream(voice, text, opts, engine=engine):
            pass
        order = {e: n for n, e in enumerate(events)}
        if prefetch:
            assert order["decode1"] < order["audio0"]  # k+1 decodes while k renders ...
            assert order["audio0"] < order["codes1"] or order["acoustic0"] < order["codes1"]
            assert order["audio1"] < order["audio2"]  # ... and audio still comes out in order
        else:
            assert order["audio0"] < order["decode1"] and order["audio1"] < order["decode2"]


def test_warm_up_runs_every_allowed_beam_count(pipe: Pipeline) -> None:
    """warm_up synthesises through the given engine for each beam count 1..max_num_beams and leaves it idle."""
    beams: list[int] = []
    engine = pipe.engine()
    engine.observer = lambda what, r, _i: beams.append(r.opts.num_beams) if what == "decode" else None
    assert pipe.warm_up(engine) > 0
    assert sorted(set(beams)) == list(range(1, pipe.max_num_beams + 1))
    assert not engine.busy and not engine.batch.active


@pytest.mark.model_versions("2", "2.5")
def test_emo_alpha_applies_only_with_an_emotion_reference(fx: FixtureSet, pipe: Pipeline) -> None:
    """As upstream: without an emotion clip, emo_alpha is taken as 1 (the speaker clip is its own emotion
    reference); with one it interpolates; with an emotion vector it scales the vector."""
    plain = pipe.prepare_voice(fx.input_path("speaker.wav"))
    with_emo = pipe.prepare_voice(fx.input_path("speaker.wav"), fx.input_path("emo_speaker.wav"))
    full, weak = SynthesisOptions(), SynthesisOptions(emo_alpha=0.3)
    assert not torch.equal(plain.emovec_spk, plain.emovec_self)  # so alpha would show if it were applied
    assert torch.equal(pipe.emovec(plain, weak), pipe.emovec(plain, full))
    assert not torch.allclose(pipe.emovec(with_emo, weak), pipe.emovec(with_emo, full))
    by_voice = [pipe.emovec(plain, o, emo_voice=with_emo) for o in (full, weak)]  # a separate emotion voice
    assert not torch.allclose(*by_voice)
    vector = (0.0, 0.6, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0)
    scaled = [pipe.emovec(plain, replace(o, emo_vector=vector)) for o in (full, weak)]
    assert not torch.allclose(*scaled)


def test_bfloat16_acoustic_mode_stays_close_to_float32(fx: FixtureSet, converted: Path, pipe: Pipeline) -> None:
    """acoustic_dtype=bfloat16 (the DiT/CFM under autocast) gives float32 audio of the same length from
    the same inputs and noise, within 20 dB SNR of the float32 path's (upstream's) waveform; float16 on
    CPU is refused at load."""
    from ttsd.api.errors import ConfigError

    half = Pipeline.load(converted, device="cpu", acoustic_dtype="bfloat16")
    assert half.acoustic_autocast == torch.bfloat16 and pipe.acoustic_autocast is None
    # The float32 path's audio is upstream's (the golden tests hold it to the parity rule): compared with that.
    ref = fx.golden("base", "16_output")["wav_pcm"][0].numpy()
    voice = half.prepare_voice(fx.input_path("speaker.wav"))
    got = half.synthesize(voice, golden_text(fx, "base"), golden_options(fx, "base"), noise=golden_noise(fx, "base"))
    assert got.dtype == np.float32 and got.shape == ref.shape and np.isfinite(got).all()
    snr = 10 * np.log10(float((ref.astype(np.float64) ** 2).sum()) / float(((got - ref).astype(np.float64) ** 2).sum()))
    assert 20.0 <= snr < 200.0, snr  # close, yet really computed in another precision
    with pytest.raises(ConfigError, match="acoustic_dtype float16 needs a CUDA device"):
        Pipeline.load(converted, device="cpu", acoustic_dtype="float16")


def test_bfloat16_decode_serves_every_emotion_mode(fx: FixtureSet, converted: Path, pipe: Pipeline) -> None:
    """dtype=bfloat16 decodes with a bfloat16 copy of the GPT while conditioning and the second pass stay
    float32 (the same voice as float32's, exactly); it prefills and decodes in speaker, emotion-audio,
    emotion-vector and random-row modes, with beams, and the audio is finite float32."""
    half = Pipeline.load(converted, device="cpu", dtype="bfloat16")
    assert half.gpt_dtype == torch.bfloat16 and next(half.gpt.parameters()).dtype == torch.float32
    voice = half.prepare_voice(fx.input_path("speaker.wav"), fx.input_path("emo_speaker.wav"))
    same = pipe.prepare_voice(fx.input_path("speaker.wav"), fx.input_path("emo_speaker.wav"))
    assert torch.equal(voice.speech_latent, same.speech_latent) and torch.equal(voice.emovec_emo, same.emovec_emo)
    vector = (0.0, 0.6, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0)
    base = SynthesisOptions(seed=1, max_mel_tokens=8, diffusion_steps=2, num_beams=2)
    for opts in (base, replace(base, emo_alpha=0.5), replace(base, emo_vector=vector),
                 replace(base, emo_vector=vector, use_random=True)):
        pcm = half.synthesize(voice, "Hello world.", opts)
        assert pcm.dtype == np.float32 and pcm.size > 0 and np.isfinite(pcm).all(), opts
