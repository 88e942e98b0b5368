"""Voice: everything IndexTTS2 derives from a reference clip, computed once and reused.

Ports the per-prompt half of `IndexTTS2.infer_generator` (infer_v2.py and infer_v2_5.py), which
upstream caches keyed on the prompt path: w2v-BERT layer-17 embeddings of the speaker clip
(22.05 kHz load + sinc resample) and of the emotion clip (a direct 16 kHz load), the s2mel
prompt condition, the 22.05 kHz prompt mel and the CAMPPlus style. The GPT's speaker latent and
the two emotion vectors depend only on the clip, so they are cached here too instead of being
recomputed for every segment. Two steps differ by model version, each decided by the loaded
part: the prompt condition is regulated from the semantic codec's quantized embeddings
(IndexTTS-2) or from the continuous w2v-BERT features (2.5) — `codec.reference_features` — and
the GPT speaker latent is conformer + perceiver over the features (IndexTTS-2) or
`spk_emb_proj(style)` (2.5) — `gpt.speaker_latent`. Shapes: T w2v frames (50 Hz), P mel frames,
Cw w2v width, D GPT width, C regulator channels, S speaker rows (32 for IndexTTS-2, 1 for 2.5)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from ttsd.api.errors import BadAudio

from . import audio

if TYPE_CHECKING:
    from .campplus import CAMPPlus
    from .gpt import UnifiedVoice
    from .length_regulator import InterpolateRegulator
    from .w2v_bert import W2VBert, W2VStats

AudioSource = Path | bytes


class ReferenceCodec(Protocol):
    def reference_features(self, spk_cond_emb: Tensor) -> Tensor: ...


class VoiceModels(Protocol):
    """The loaded parts prepare_voice reads (a Pipeline of either model version has them)."""

    @property
    def device(self) -> torch.device: ...
    @property
    def w2v(self) -> W2VBert: ...
    @property
    def w2v_stats(self) -> W2VStats: ...
    @property
    def codec(self) -> ReferenceCodec: ...
    @property
    def campplus(self) -> CAMPPlus: ...
    @property
    def length_regulator(self) -> InterpolateRegulator: ...
    @property
    def gpt(self) -> UnifiedVoice: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Voice:
    spk_cond_emb: Tensor  # (1, T, Cw) normalised w2v-BERT layer 17 of the speaker clip
    style: Tensor  # (1, 192) CAMPPlus speaker style
    ref_mel: Tensor  # (1, 80, P) 22.05 kHz log-mel prompt
    prompt_condition: Tensor  # (1, P, C) length-regulated content features of the prompt
    speech_latent: Tensor  # (1, S, D) GPT speaker latent (UnifiedVoice.speaker_latent)
    emovec_spk: Tensor  # (1, D) get_emovec(spk_cond_emb): base of merge_emovec
    emovec_self: Tensor  # (1, D) get_emovec of the speaker clip loaded at 16 kHz (vector mode)
    emovec_emo: Tensor  # (1, D) get_emovec of the emotion clip (= emovec_self without one)
    audio_s: float  # speaker clip length used, seconds

    @property
    def has_emotion_clip(self) -> bool:
        """Whether an emotion clip other than the speaker's was given (prepare_voice makes
        emovec_emo the very tensor emovec_self when there is none)."""
        return self.emovec_emo is not self.emovec_self

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor of the voice (emovec_emo may be emovec_self itself)."""
        return (self.spk_cond_emb, self.style, self.ref_mel, self.prompt_condition, self.speech_latent,
                self.emovec_spk, self.emovec_self, self.emovec_emo)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


MIN_REFERENCE_S = 0.25  # shorter clips leave the conformers' 2x subsampling with (almost) no frames


def _check_length(x: Tensor, sr: int, what: str, max_s: float | None) -> None:
    if x.shape[-1] < MIN_REFERENCE_S * sr:
        raise BadAudio(f"{what} is too short ({x.shape[-1] / sr * 1000:.0f} ms); the minimum is {MIN_REFERENCE_S:g} s")
    if max_s is not None and x.shape[-1] > max_s * sr:
        raise BadAudio(f"{what} is {x.shape[-1] / sr:.1f} s long; the limit is {max_s:g} s")


@torch.inference_mode()
def w2v_embedding(pipe: VoiceModels, audio_16k: Tensor) -> Tensor:
    """16 kHz audio (1, N) → normalised w2v-BERT layer-17 embedding (1, T, Cw) (IndexTTS2.get_emb)."""
    feats, mask = audio.seamless_features(audio_16k.to(pipe.device))
    return pipe.w2v_stats(pipe.w2v(feats, mask))


@torch.inference_mode()
def emotion_embedding(pipe: VoiceModels, src: AudioSource, max_input_s: float | None = None) -> Tensor:
    """Emotion path: a direct 16 kHz load (a different resampler from the speaker path), cut to 15 s."""
    emo = audio.load_audio(src, audio.W2V_SAMPLE_RATE_HZ)
    _check_length(emo, audio.W2V_SAMPLE_RATE_HZ, "emotion reference audio", max_input_s)
    emo = audio.cut_audio(emo, audio.W2V_SAMPLE_RATE_HZ)
    return w2v_embedding(pipe, emo)


@torch.inference_mode()
def prepare_voice(
    pipe: VoiceModels, spk: AudioSource, emo: AudioSource | None = None, max_input_s: float | None = None
) -> Voice:
    """Reference clip (path or encoded bytes) → Voice. `max_input_s` rejects longer input outright
    (the daemon's limit); the model itself only ever sees the first 15 s, as upstream."""
    a22 = audio.load_audio(spk, audio.SAMPLE_RATE_HZ)
    _check_length(a22, audio.SAMPLE_RATE_HZ, "speaker reference audio", max_input_s)
    a22 = audio.cut_audio(a22, audio.SAMPLE_RATE_HZ).to(pipe.device)  # [1, N22]
    a16 = audio.resample(a22, audio.SAMPLE_RATE_HZ, audio.W2V_SAMPLE_RATE_HZ)  # [1, N16]

    spk_cond_emb = w2v_embedding(pipe, a16)  # [1, T, Cw]
    s_ref = pipe.codec.reference_features(spk_cond_emb)  # [1, T, Cw]
    ref_mel = audio.mel_spectrogram(a22)  # [1, 80, P]
    style = pipe.campplus(audio.speaker_fbank(a16))  # [1, 192]
    prompt_condition = pipe.length_regulator(s_ref, [ref_mel.size(2)])  # [1, P, C]

    # Upstream's emotion reference defaults to the speaker file, loaded a second time at 16 kHz.
    self_emb = emotion_embedding(pipe, spk, max_input_s)
    emo_emb = self_emb if emo is None else emotion_embedding(pipe, emo, max_input_s)
    # Always the float32 GPT: a half-precision decode loop has its own copy of the weights, and the
    # conditioning it reads (once per voice) costs nothing worth rounding for.
    gpt = pipe.gpt
    speech_latent = gpt.speaker_latent(spk_cond_emb, style)  # [1, S, D]
    emovec_spk = gpt.get_emovec(spk_cond_emb)
    emovec_self = gpt.get_emovec(self_emb)
    emovec_emo = emovec_self if emo is None else gpt.get_emovec(emo_emb)
    return Voice(
        spk_cond_emb=spk_cond_emb,
        style=style,
        ref_mel=ref_mel,
        prompt_condition=prompt_condition,
        speech_latent=speech_latent,
        emovec_spk=emovec_spk,
        emovec_self=emovec_self,
        emovec_emo=emovec_emo,
        audio_s=a22.shape[-1] / audio.SAMPLE_RATE_HZ,
    )
