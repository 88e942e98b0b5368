"""IndexTTS-2.5 synthesis steps: the loaded parts and the per-segment glue of infer_v2_5.

Ports the per-segment half of `IndexTTS2.infer_generator` in indextts/infer_v2_5.py. The steps
that differ from IndexTTS-2 are small functions with explicit inputs, so the batched engine can
call them one by one; `synthesize_segment` chains them for one segment and `synthesize` for a
whole text (what the parity tests drive). Per segment:

    plan = parts.front.plan(text, lang, max_tokens)     text → segments, tiktoken ids, lang row
    prefix = segment_prefix(parts.gpt, voice, emovec,   [1, 3 + L' + 2, D]: [spk + emovec, 0, 0],
                            ids, plan.lang_index)       text (ids 0/1 dropped) + lang embedding
    codes = generate(parts.gpt, prefix, params).codes   the shared decode loop, 25 codes per second
    s_infer, target = parts.codec.content(codes, df)    [1, 2L, W] content, int(2L·1.72·df) frames
    pcm = render(parts, voice, s_infer, target, ...)    regulator → CFM → BigVGAN (as IndexTTS-2)

Voice preparation is voice.prepare_voice (shared; the parts decide the two 2.5 differences) and
the emotion vector is `emotion_vector`. There is no second GPT pass and no gpt_layer.
Shapes: L codes, W w2v-BERT width, D GPT width, T target mel frames, P prompt mel frames."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import audio
from .bigvgan import BigVGAN, load_bigvgan, to_pcm_scale
from .campplus import CAMPPlus, load_campplus
from .codec25 import EnhancedCodec, load_codec25
from .config import V2_5, load_yaml, model_version
from .decode import DecodeParams, generate, sampling_key
from .errors import CheckpointError, ConfigError
from .flow import CFM, load_cfm
from .gpt import (
    EmotionMatrices,
    UnifiedVoice,
    interpolate_emovec,
    load_emotion_matrices,
    load_unified_voice,
    scale_emo_vector,
)
from .length_regulator import InterpolateRegulator, load_length_regulator
from .text import TextNormalizer
from .text.front25 import TextFrontEnd25
from .text.tiktoken_tokenizer import TiktokenTokenizer
from .voice import Voice
from .w2v_bert import W2VBert, W2VStats, load_w2v_bert

TOKENIZER_FILE = "tokenizer.tiktoken"  # ttsd-convert's name for the 2.5 vocabulary


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Parts25:
    """Every IndexTTS-2.5 component on one device (weights only; no per-request state)."""

    config: Mapping[str, Any]
    front: TextFrontEnd25
    w2v: W2VBert
    w2v_stats: W2VStats
    codec: EnhancedCodec
    campplus: CAMPPlus
    gpt: UnifiedVoice
    length_regulator: InterpolateRegulator
    cfm: CFM
    bigvgan: BigVGAN
    emotion: EmotionMatrices
    device: torch.device
    gpt_dtype: torch.dtype = torch.float32


def load_parts25(ckpt_dir: Path | str, device: str | torch.device = "cpu") -> Parts25:
    """Load a converted IndexTTS-2.5 checkpoint directory (ttsd-convert output), float32."""
    ckpt, dev = Path(ckpt_dir), torch.device(device)
    cfg_path = ckpt / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{ckpt}: no config.yaml (convert the official checkpoint with ttsd-convert)")
    config = load_yaml(cfg_path)
    if model_version(config) != V2_5:
        raise ConfigError(f"{cfg_path}: not an IndexTTS-2.5 config (version {config.get('version')!r})")
    gpt = load_unified_voice(ckpt, config, dev)
    glossary = ckpt / "glossary.yaml"  # as IndexTTS-2: a glossary beside the weights is used
    front = TextFrontEnd25(
        tokenizer=TiktokenTokenizer.from_file(ckpt / TOKENIZER_FILE),
        normalizer=TextNormalizer(glossary_path=glossary if glossary.is_file() else None),
        max_text_tokens=gpt.cfg.max_text_tokens,
    )
    if front.tokenizer.vocab_size != gpt.cfg.number_text_tokens:
        raise ConfigError(
            f"{ckpt / TOKENIZER_FILE}: {front.tokenizer.vocab_size} tokens but gpt.number_text_tokens is "
            f"{gpt.cfg.number_text_tokens}"
        )
    w2v, w2v_stats = load_w2v_bert(ckpt, dev)
    s2mel = ckpt / "s2mel.safetensors"
    return Parts25(
        config=config,
        front=front,
        w2v=w2v,
        w2v_stats=w2v_stats,
        codec=load_codec25(ckpt, config, dev),
        campplus=load_campplus(ckpt, dev),
        gpt=gpt,
        length_regulator=load_length_regulator(s2mel, config, dev),
        cfm=load_cfm(s2mel, config, dev),
        bigvgan=load_bigvgan(ckpt / "bigvgan.safetensors", ckpt / "bigvgan.json", dev),
        emotion=load_emotion_matrices(ckpt, config, dev),
        device=dev,
    )


def emotion_vector(
    emotion: EmotionMatrices,
    voice: Voice,
    *,
    emo_alpha: float = 1.0,
    emo_vector: Sequence[float] | None = None,
    use_random: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The (1, D) emotion vector added to the speaker row, as infer_v2_5 computes it (same as
    IndexTTS-2): merge_emovec of the speaker clip and the emotion clip, where `emo_alpha`
    applies only when the voice has an emotion clip (upstream forces 1.0 otherwise); with
    `emo_vector`, the emotion-matrix rows mixed in over the speaker clip's own vector."""
    if emo_vector is None:
        alpha = emo_alpha if voice.has_emotion_clip else 1.0
        return interpolate_emovec(voice.emovec_spk, voice.emovec_emo, alpha)
    weights = torch.tensor(scale_emo_vector(emo_vector, emo_alpha), dtype=torch.float32)
    rows = emotion.random_rows(generator) if use_random else emotion.nearest_rows(voice.style)
    # Vector mode drops the emotion clip: the audio term is the speaker clip at merge alpha 1.
    return emotion.mix(weights.to(voice.style.device), rows, voice.emovec_self)


def segment_prefix(gpt: UnifiedVoice, voice: Voice, emovec: Tensor, text_ids: Sequence[int], lang_index: int) -> Tensor:
    """One segment's generation prefix [1, 3 + L' + 2, D]: `text_ids` are the segment's tiktoken
    ids (TextPlan.segment_ids; an upstream pad id 1 may be included, it is dropped with all 0/1)."""
    dev = voice.speech_latent.device
    ids = torch.tensor([list(text_ids)], dtype=torch.long, device=dev)  # [1, L]
    return gpt.build_prefix(voice.speech_latent, emovec.to(voice.speech_latent.dtype), ids, lang=lang_index)


def render(
    parts: Parts25,
    voice: Voice,
    s_infer: Tensor,
    target: Tensor,
    *,
    diffusion_steps: int = 25,
    inference_cfg_rate: float = 0.7,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Tensor:
    """S_infer [1, 2L, W] + target frames [1] → float PCM (N,) at ±32767 scale, N = 256·T:
    length regulator, [prompt | cond] CFM from `noise` (or drawn with `generator`), BigVGAN."""
    cond = parts.length_regulator(s_infer, target)  # [1, T, C]
    mu = torch.cat([voice.prompt_condition, cond], dim=1)  # [1, P + T, C]
    mel = parts.cfm.inference(
        mu,
        voice.ref_mel,
        voice.style,
        n_timesteps=diffusion_steps,
        inference_cfg_rate=inference_cfg_rate,
        noise=None if noise is None else noise.to(mu.device),
        generator=generator,
        cancel=cancel,
    )
    vc_target = mel[:, :, voice.ref_mel.size(2) :]  # [1, 80, T]
    return to_pcm_scale(parts.bigvgan(vc_target))[0]  # [256 T]


@torch.inference_mode()
def synthesize_segment(
    parts: Parts25,
    voice: Voice,
    emovec: Tensor,
    text_ids: Sequence[int],
    lang_index: int,
    params: DecodeParams,
    *,
    duration_factor: float = 1.0,
    diffusion_steps: int = 25,
    inference_cfg_rate: float = 0.7,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    key: int = 0,
    cancel: Callable[[], bool] | None = None,
) -> Tensor:
    """One segment's ids → float PCM (N,) at ±32767 scale (empty when the GPT stops at once).
    `key` (decode.sampling_key) drives GPT sampling; `generator`, without `noise`, the CFM start noise."""
    prefix = segment_prefix(parts.gpt, voice, emovec, text_ids, lang_index)
    codes = generate(parts.gpt, prefix, params, key=key, cancel=cancel).codes  # [1, L]
    if codes.size(1) == 0:
        return torch.zeros(0, device=parts.device)
    s_infer, target = parts.codec.content(codes, duration_factor)
    return render(
        parts,
        voice,
        s_infer,
        target,
        diffusion_steps=diffusion_steps,
        inference_cfg_rate=inference_cfg_rate,
        noise=noise,
        generator=generator,
        cancel=cancel,
    )


def synthesize(
    parts: Parts25,
    voice: Voice,
    text: str,
    lang: str,
    params: DecodeParams,
    *,
    emovec: Tensor,
    max_text_tokens_per_segment: int = 120,
    duration_factor: float = 1.0,
    diffusion_steps: int = 25,
    inference_cfg_rate: float = 0.7,
    interval_silence_ms: int = 200,
    noise: Mapping[int, Tensor] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Offline: every segment of `text` joined by `interval_silence_ms` of zeros → float32 (N,)
    at ±32767 scale (infer_v2_5's output before the int16 cast). `noise[k]` is segment k's CFM
    start noise; segments without one draw it from a generator seeded `seed·1000 + k`."""
    plan = parts.front.plan(text, lang, max_text_tokens_per_segment)
    silence = np.zeros(int(audio.SAMPLE_RATE_HZ * interval_silence_ms / 1000), dtype=np.float32)
    out: list[np.ndarray] = []
    for k, ids in enumerate(plan.segment_ids):
        gen = torch.Generator(device=parts.device).manual_seed(seed * 1000 + k)
        pcm = synthesize_segment(
            parts,
            voice,
            emovec,
            ids,
            plan.lang_index,
            params,
            duration_factor=duration_factor,
            diffusion_steps=diffusion_steps,
            inference_cfg_rate=inference_cfg_rate,
            noise=None if noise is None else noise.get(k),
            generator=gen,
            key=sampling_key(seed, k),
        )
        if out:
            out.append(silence)  # between segments only, as insert_interval_silence
        out.append(pcm.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
