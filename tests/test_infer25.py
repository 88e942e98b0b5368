"""IndexTTS-2.5 end to end through infer25's steps (not Pipeline): reference WAVs and text → PCM.

Voice preparation, the emotion vector, the text plan, prefix, greedy codes, codec decode,
s2mel and BigVGAN run from the fixture's inputs with only the golden CFM noise injected; every
variant's joined waveform must match `16_output`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ttsd.pipeline.decode import DecodeParams
from ttsd.pipeline.errors import CheckpointError, ConfigError
from ttsd.pipeline.gpt import load_unified_voice
from ttsd.pipeline.infer25 import Parts25, emotion_vector, load_parts25, segment_prefix, synthesize
from ttsd.pipeline.voice import Voice, prepare_voice

from .conftest import FixtureSet, assert_close

pytestmark = pytest.mark.model_versions("2.5")


@pytest.fixture(scope="module")
def parts(converted: Path) -> Parts25:
    return load_parts25(converted, "cpu")


_VOICES: dict[tuple[Path, str], Voice] = {}  # one preparation per set and variant, shared by the tests below


def _voice(fx: FixtureSet, parts: Parts25, variant: str) -> Voice:
    key = (fx.root, variant)
    if key not in _VOICES:
        call = fx.variant(variant)["call"]
        emo = call["emo_audio_prompt"]
        spk = fx.input_path(call["spk_audio_prompt"])
        _VOICES[key] = prepare_voice(parts, spk, None if emo is None else fx.input_path(emo))
    return _VOICES[key]


def _params(fx: FixtureSet, variant: str) -> DecodeParams:
    """The golden run's decoding (greedy), read from its manifest."""
    kw = fx.variant(variant)["call"]["generation_kwargs"]
    return DecodeParams(
        do_sample=bool(kw["do_sample"]), temperature=1.0, top_k=0, top_p=1.0, num_beams=int(kw["num_beams"]),
        repetition_penalty=float(kw["repetition_penalty"]), max_mel_tokens=int(kw["max_mel_tokens"]),
    )


@torch.inference_mode()
def test_voice_preparation_matches_upstream(fx: FixtureSet, variant: str, parts: Parts25) -> None:
    """prepare_voice on the 2.5 parts gives upstream's prompt mel, style, prompt condition (from the
    continuous features), spk_emb_proj speaker row and the emotion vector fed to the GPT."""
    voice = _voice(fx, parts, variant)
    call = fx.variant(variant)["call"]
    assert_close(voice.spk_cond_emb, fx.golden(variant, "03_w2vbert")["spk.cond_emb"], "spk.cond_emb")
    assert_close(voice.ref_mel, fx.golden(variant, "05_ref_mel")["ref_mel"], "ref_mel")
    assert_close(voice.style, fx.golden(variant, "06_campplus")["style"], "style")
    assert_close(voice.prompt_condition, fx.golden(variant, "07_prompt_condition")["prompt_condition"], "prompt")
    g9, g8 = fx.golden(variant, "09_gpt_conditioning"), fx.golden(variant, "08_emovec")
    assert_close(voice.speech_latent, g9["seg0.speech_conditioning_latent"], "speech_conditioning_latent")
    assert voice.has_emotion_clip == (call["emo_audio_prompt"] is not None)
    emovec = emotion_vector(
        parts.emotion, voice, emo_alpha=float(call["emo_alpha"]), emo_vector=call["emo_vector"],
        use_random=bool(call["use_random"]),
    )
    assert_close(emovec, g8["seg0.emovec_final"], "emovec_final")


@torch.inference_mode()
def test_segment_prefix_matches_upstream(fx: FixtureSet, variant: str, parts: Parts25) -> None:
    """segment_prefix of the planned ids equals upstream's GPT input embeddings without its masked pad rows."""
    call = fx.variant(variant)["call"]
    voice = _voice(fx, parts, variant)
    emovec = fx.golden(variant, "08_emovec")["seg0.emovec_final"]
    g9 = fx.golden(variant, "09_gpt_conditioning")
    plan = parts.front.plan(call["text"], call["lang"], int(call["max_text_tokens_per_segment"]))
    for i, ids in enumerate(plan.segment_ids):
        prefix = segment_prefix(parts.gpt, voice, emovec, ids, plan.lang_index)
        keep = g9[f"seg{i}.gpt_attention_mask"][0, :-1].bool()
        assert_close(prefix, g9[f"seg{i}.gpt_inputs_embeds"][:, keep], f"seg{i} prefix")


@torch.inference_mode()
def test_every_variant_matches_golden_waveform(fx: FixtureSet, variant: str, parts: Parts25) -> None:
    """Text → segments → codes → codec → s2mel → BigVGAN from the reference WAVs reproduces upstream's
    joined waveform (lang and duration_factor from the manifest's call, golden CFM noise)."""
    call = fx.variant(variant)["call"]
    voice = _voice(fx, parts, variant)
    emovec = emotion_vector(
        parts.emotion, voice, emo_alpha=float(call["emo_alpha"]), emo_vector=call["emo_vector"],
        use_random=bool(call["use_random"]),
    )
    cfm = fx.golden(variant, "14_cfm")
    noise = {int(k[3:].split(".")[0]): v for k, v in cfm.items() if k.endswith(".noise")}
    pcm = synthesize(
        parts, voice, call["text"], call["lang"], _params(fx, variant),
        emovec=emovec,
        max_text_tokens_per_segment=int(call["max_text_tokens_per_segment"]),
        duration_factor=float(call["duration_factor"]),
        diffusion_steps=int(fx.settings["diffusion_steps"]),
        inference_cfg_rate=float(fx.settings["inference_cfg_rate"]),
        interval_silence_ms=int(call["interval_silence"]),
        noise=noise,
    )
    assert_close(torch.from_numpy(pcm)[None], fx.golden(variant, "16_output")["wav_pcm"], f"{variant} wav_pcm")


def test_load_parts25_refuses_other_versions(converted: Path, tmp_path: Path) -> None:
    """A directory whose config is not IndexTTS-2.5, or that has no config, is a one-line error."""
    config = yaml.safe_load((converted / "config.yaml").read_text(encoding="utf-8"))
    config["version"] = 2.0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(ConfigError, match="not an IndexTTS-2.5 config"):
        load_parts25(tmp_path)
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_parts25(tmp_path / "missing")


def test_gpt_checkpoint_and_config_version_must_agree(converted: Path, tmp_path: Path) -> None:
    """A 2.5 GPT (spk_emb_proj) under a config that says 2.0 is a ConfigError naming both."""
    for name in ("gpt.safetensors", "tokenizer.tiktoken"):
        shutil.copyfile(converted / name, tmp_path / name)
    config = yaml.safe_load((converted / "config.yaml").read_text(encoding="utf-8"))
    config["version"] = 2.0
    with pytest.raises(ConfigError, match=r"version 2 but gpt.safetensors has spk_emb_proj"):
        load_unified_voice(tmp_path, config, "cpu")
