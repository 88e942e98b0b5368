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

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from ttsd.api.errors import BadAudio

from . import audio
from .errors import VoiceFileError

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


# A stored voice (the daemon's voice library, daemon/voice_store.py) is one safetensors file: the
# tensors of Voice by field name, and string metadata in its header. emovec_emo is stored only when
# an emotion clip was given; without one it is emovec_self again on load, the same object, which is
# what `has_emotion_clip` reads.
VOICE_FORMAT: Final = "ttsd-voice-1"
_STORED_NDIM: Final = {  # field → ndim; every tensor is float32 with batch 1
    "spk_cond_emb": 3, "style": 2, "ref_mel": 3, "prompt_condition": 3, "speech_latent": 3,
    "emovec_spk": 2, "emovec_self": 2,
}
_EMOTION_CLIP: Final = "emovec_emo"
_RESERVED: Final = ("format", "voice_audio_s", "checksum")  # metadata keys written here, not by the caller
_HEADER_LEN_BYTES: Final = 8  # safetensors: a little-endian u64 header length, then the JSON header


def _checksum(tensors: Mapping[str, Tensor]) -> str:
    """blake2b over every tensor's name, dtype, shape and bytes (CPU tensors), in name order: a flipped
    bit in a stored file is refused instead of becoming a wrong voice."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def voice_to_bytes(voice: Voice, metadata: Mapping[str, str]) -> bytes:
    """Voice → the bytes of one safetensors file, `metadata` (plus format, length, checksum) in its header."""
    clash = sorted(metadata.keys() & set(_RESERVED))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved")
    tensors = {name: getattr(voice, name).detach().to("cpu").contiguous() for name in _STORED_NDIM}
    if voice.has_emotion_clip:
        tensors[_EMOTION_CLIP] = voice.emovec_emo.detach().to("cpu").contiguous()
    header = {**metadata, "format": VOICE_FORMAT, "voice_audio_s": repr(voice.audio_s),
              "checksum": _checksum(tensors)}
    return bytes(safetensors.torch.save(tensors, metadata=header))


def read_voice_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a stored voice's safetensors header (no tensor is read). VoiceFileError
    when the header cannot be parsed."""
    if len(data) < _HEADER_LEN_BYTES:
        raise VoiceFileError("shorter than a safetensors header")
    n = int.from_bytes(data[:_HEADER_LEN_BYTES], "little")
    if n > len(data) - _HEADER_LEN_BYTES:
        raise VoiceFileError(f"header of {n} bytes runs past the end of the file ({len(data)} bytes)")
    try:
        header = json.loads(data[_HEADER_LEN_BYTES:_HEADER_LEN_BYTES + n])
    except (ValueError, RecursionError) as e:
        raise VoiceFileError(f"header is not JSON: {e}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise VoiceFileError("header has no string metadata")
    return meta


def voice_from_bytes(data: bytes, device: torch.device) -> tuple[Voice, dict[str, str]]:
    """The bytes of `voice_to_bytes` → (Voice on `device`, the caller's metadata). VoiceFileError when
    they are not a whole, unaltered stored voice."""
    meta = read_voice_metadata(data)
    if meta.get("format") != VOICE_FORMAT:
        raise VoiceFileError(f"format {meta.get('format')!r} is not {VOICE_FORMAT!r}")
    try:
        tensors = safetensors.torch.load(data)
        audio_s = float(meta["voice_audio_s"])
    except (safetensors.SafetensorError, ValueError, KeyError) as e:
        raise VoiceFileError(f"{type(e).__name__}: {e}") from None
    expected = set(_STORED_NDIM) | ({_EMOTION_CLIP} & tensors.keys())
    if tensors.keys() != expected:
        missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
        raise VoiceFileError(f"tensors missing {missing}, unexpected {unexpected}")
    for name, t in tensors.items():
        ndim = _STORED_NDIM.get(name, 2)
        if t.dtype != torch.float32 or t.ndim != ndim or t.shape[0] != 1:
            raise VoiceFileError(f"{name}: {t.dtype} {tuple(t.shape)}, expected float32 with {ndim} dims, batch 1")
    if _checksum(tensors) != meta["checksum"]:
        raise VoiceFileError("tensor bytes do not match the stored checksum")
    on = {name: t.to(device) for name, t in tensors.items()}
    voice = Voice(
        spk_cond_emb=on["spk_cond_emb"], style=on["style"], ref_mel=on["ref_mel"],
        prompt_condition=on["prompt_condition"], speech_latent=on["speech_latent"], emovec_spk=on["emovec_spk"],
        emovec_self=on["emovec_self"], emovec_emo=on.get(_EMOTION_CLIP, on["emovec_self"]), audio_s=audio_s,
    )
    return voice, {k: v for k, v in meta.items() if k not in _RESERVED}
