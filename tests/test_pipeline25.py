"""IndexTTS-2.5 through the same Pipeline as IndexTTS-2: its voice preparation, emotion vector and
segment prefixes against the golden tensors (the waveform and `ttsd synth` tests in test_pipeline.py
run on both versions), and what loading refuses."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from ttsd.api.errors import BadOptions, ConfigError
from ttsd.api.options import SynthesisOptions
from ttsd.pipeline import Pipeline
from ttsd.pipeline.gpt import load_unified_voice
from ttsd.pipeline.voice import Voice

from .conftest import FixtureSet, assert_close
from .test_pipeline import golden_options

pytestmark = pytest.mark.model_versions("2.5")

_VOICES: dict[tuple[Path, str], Voice] = {}  # one preparation per set and variant, shared by the tests below


def _voice(fx: FixtureSet, pipeline: Pipeline, variant: str) -> Voice:
    key = (fx.root, variant)
    if key not in _VOICES:
        call = fx.variant(variant)["call"]
        emo = call["emo_audio_prompt"]
        spk = fx.input_path(call["spk_audio_prompt"])
        _VOICES[key] = pipeline.prepare_voice(spk, None if emo is None else fx.input_path(emo))
    return _VOICES[key]


@torch.inference_mode()
def test_voice_preparation_matches_upstream(fx: FixtureSet, variant: str, pipeline: Pipeline) -> None:
    """Pipeline.prepare_voice on a 2.5 checkpoint gives upstream's prompt mel, style, prompt condition (from
    the continuous features), spk_emb_proj speaker row, and Pipeline.emovec the emotion vector fed to the GPT."""
    assert pipeline.version == "2.5"
    voice = _voice(fx, pipeline, variant)
    call = fx.variant(variant)["call"]
    assert_close(voice.spk_cond_emb, fx.golden(variant, "03_w2vbert")["spk.cond_emb"], "spk.cond_emb")
    assert_close(voice.ref_mel, fx.golden(variant, "05_ref_mel")["ref_mel"], "ref_mel")
    assert_close(voice.style, fx.golden(variant, "06_campplus")["style"], "style")
    assert_close(voice.prompt_condition, fx.golden(variant, "07_prompt_condition")["prompt_condition"], "prompt")
    g9, g8 = fx.golden(variant, "09_gpt_conditioning"), fx.golden(variant, "08_emovec")
    assert_close(voice.speech_latent, g9["seg0.speech_conditioning_latent"], "speech_conditioning_latent")
    assert voice.has_emotion_clip == (call["emo_audio_prompt"] is not None)
    emovec = pipeline.emovec(voice, golden_options(fx, variant))
    assert_close(emovec, g8["seg0.emovec_final"], "emovec_final")


@torch.inference_mode()
def test_segment_prefix_matches_upstream(fx: FixtureSet, variant: str, pipeline: Pipeline) -> None:
    """Each segment's decode prefix (text split with the manifest's lang) equals upstream's GPT input
    embeddings without its masked pad rows."""
    call = fx.variant(variant)["call"]
    voice = _voice(fx, pipeline, variant)
    emovec = fx.golden(variant, "08_emovec")["seg0.emovec_final"]
    g9 = fx.golden(variant, "09_gpt_conditioning")
    opts = golden_options(fx, variant)
    segments = pipeline.split_text(call["text"], opts)
    assert len(segments) == sum(1 for k in g9 if k.endswith(".gpt_inputs_embeds"))
    for seg in segments:
        prefix = pipeline.decode_request(voice, seg, opts, emovec).prefix
        keep = g9[f"seg{seg.index}.gpt_attention_mask"][0, :-1].bool()
        assert_close(prefix, g9[f"seg{seg.index}.gpt_inputs_embeds"][:, keep], f"seg{seg.index} prefix")


def test_language_is_detected_when_not_given(pipeline: Pipeline) -> None:
    """Without `lang`, text with CJK ideographs is split as zh and other text as en (the same segments as
    naming the language); an IndexTTS-2-only option is refused, not ignored."""
    opts = SynthesisOptions(max_text_tokens_per_segment=16)
    for text, lang in (("今天天气很好，我们去公园。", "zh"), ("The weather is fine today.", "en")):
        assert pipeline.split_text(text, opts) == pipeline.split_text(text, replace(opts, lang=lang))
    zh, en = (pipeline.split_text(t, opts)[0].lang_index for t in ("今天天气很好。", "Fine weather."))
    assert zh != en
    with pytest.raises(BadOptions, match="quick_streaming_tokens"):
        pipeline.check_options(replace(opts, quick_streaming_tokens=4))


def test_gpt_checkpoint_and_config_version_must_agree(converted: Path, tmp_path: Path) -> None:
    """A 2.5 GPT (spk_emb_proj) under a config that says 2.0 is a ConfigError naming both."""
    for name in ("gpt.safetensors", "tokenizer.tiktoken"):
        shutil.copyfile(converted / name, tmp_path / name)
    config = yaml.safe_load((converted / "config.yaml").read_text(encoding="utf-8"))
    config["version"] = 2.0
    with pytest.raises(ConfigError, match=r"version 2 but gpt.safetensors has spk_emb_proj"):
        load_unified_voice(tmp_path, config, "cpu")
