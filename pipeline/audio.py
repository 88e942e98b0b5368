"""Reference-audio front ends: decoding, resampling and the three spectral feature recipes.

Ports what `IndexTTS2.infer_generator` (indextts/infer_v2.py) does to a reference clip before any
model sees it: `librosa.load` (soundfile + soxr), torchaudio's sinc-Hann `Resample(22050, 16000)`,
transformers' `SeamlessM4TFeatureExtractor` (w2v-BERT input), `torchaudio.compliance.kaldi.fbank`
(CAMPPlus input) and indextts/s2mel/modules/audio.py `mel_spectrogram` (s2mel prompt mel, with
librosa's Slaney mel basis). Windows, kernels and filter banks are built once per device.
Shapes: N samples, F frames, T_w stacked w2v rows (F/2), P mel frames, K FFT bins."""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
from torch import Tensor

from ttsd.api.errors import BadAudio

SAMPLE_RATE_HZ = 22_050                    # s2mel / BigVGAN rate (config: s2mel.preprocess_params.sr)
W2V_SAMPLE_RATE_HZ = 16_000                # w2v-BERT and CAMPPlus rate (preprocessor_config sampling_rate)
MAX_PROMPT_S = 15                          # infer_v2 `_load_and_cut_audio(..., 15)` for both prompts
# Largest |sample| accepted in a reference clip (full scale is 1). A float file may exceed full scale
# a little; 1000 (60 dB over) is no recording, and far beyond it the float32 spectra overflow to inf
# (1e30 in a clip came out as NaN conditioning and all-zero speech), so such a file is refused.
MAX_SAMPLE_ABS = 1000.0

# 22.05 kHz prompt mel (config: s2mel.preprocess_params.spect_params)
N_FFT = 1024                               # n_fft
WIN_LENGTH = 1024                          # win_length
HOP_LENGTH = 256                           # hop_length: samples per mel frame
N_MELS = 80                                # n_mels
MEL_PAD = (N_FFT - HOP_LENGTH) // 2        # 384 reflect-padded each side, so P = N // 256 with center=False
MEL_FRAME_RATE_HZ = SAMPLE_RATE_HZ / HOP_LENGTH  # ≈ 86.13 mel frames per second

# Kaldi-style 16 kHz framing shared by the SeamlessM4T features and the CAMPPlus fbank
FRAME_LENGTH = 400                         # 25 ms at 16 kHz
FRAME_SHIFT = 160                          # 10 ms at 16 kHz
FBANK_FFT = 512                            # frame length rounded up to a power of two
FBANK_BINS = FBANK_FFT // 2 + 1            # 257 one-sided bins (the Nyquist bin gets weight 0)
N_FBANK_MELS = 80                          # num_mel_bins of both extractors
FBANK_LOW_HZ = 20.0                        # kaldi low_freq default; high_freq = Nyquist
PREEMPHASIS = 0.97                         # kaldi preemphasis_coefficient
POVEY_POWER = 0.85                         # "povey" window = symmetric Hann ** 0.85
W2V_STRIDE = 2                             # SeamlessM4T stacks 2 frames: 160 features per 20 ms row
W2V_PAD_VALUE = 1.0                        # preprocessor padding_value (pad frame is 1.0, not 0)
W2V_INT16_SCALE = 32768.0                  # SeamlessM4T scales [-1, 1] to the int16 range (Kaldi habit)
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)  # 1.1920929e-07: log floor of both fbank recipes

# torchaudio Resample defaults ("sinc_interp_hann")
RESAMPLE_FILTER_WIDTH = 6                  # lowpass_filter_width (zero crossings per side)
RESAMPLE_ROLLOFF = 0.99                    # rolloff


# ---------------------------------------------------------------------------------------------
# Loading


def load_audio(src: Path | bytes, sr: int) -> Tensor:
    """Decode `src` (a path or the file's bytes) to mono float32 at `sr` Hz: (1, N) in [-1, 1].

    Reproduces `librosa.load(path, sr=sr)`: soundfile decode (wav/flac/ogg/mp3, whatever libsndfile
    reads), mean over channels, `soxr` "HQ" resampling unless the file is already at `sr`, then the
    length forced to ceil(N_native · sr / sr_native). Raises BadAudio for undecodable or empty input,
    and for NaN, infinite or absurd (|x| > MAX_SAMPLE_ABS) samples."""
    what = "audio bytes" if isinstance(src, bytes) else str(src)
    try:
        with sf.SoundFile(io.BytesIO(src) if isinstance(src, bytes) else str(src)) as f:
            sr_native = int(f.samplerate)
            y = f.read(frames=-1, dtype="float32", always_2d=False).T  # (N,) or (channels, N)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError, OSError) as e:
        raise BadAudio(f"cannot decode reference audio {what}: {e}") from e
    if y.ndim > 1:
        y = np.mean(y, axis=0)  # librosa.to_mono: arithmetic mean over channels, before resampling
    if y.size == 0:
        raise BadAudio(f"reference audio {what} holds no samples")
    peak = float(np.max(np.abs(y)))  # NaN if any sample is NaN
    if not peak <= MAX_SAMPLE_ABS:
        raise BadAudio(
            f"reference audio {what} has non-finite or absurd sample values "
            f"(peak {peak:g}; full scale is 1, at most {MAX_SAMPLE_ABS:g} is accepted)"
        )
    if sr_native != sr:
        # librosa.resample: ratio computed as float(target)/orig, then ceil, then fix_length.
        n_out = int(np.ceil(y.shape[-1] * (float(sr) / sr_native)))
        y = soxr.resample(np.ascontiguousarray(y), sr_native, sr, quality="HQ")
        y = y[:n_out] if y.shape[-1] >= n_out else np.pad(y, (0, n_out - y.shape[-1]))
    y = np.asarray(y, dtype=np.float32)
    if y.size == 0:
        raise BadAudio(f"reference audio {what} is too short to resample to {sr} Hz")
    return torch.from_numpy(np.ascontiguousarray(y)).unsqueeze(0)  # [1, N]


def cut_audio(audio: Tensor, sr: int, max_s: float = MAX_PROMPT_S) -> Tensor:
    """Keep the first int(max_s · sr) samples of (1, N) audio (upstream cuts after resampling)."""
    return audio[:, : int(max_s * sr)]


# ---------------------------------------------------------------------------------------------
# torchaudio sinc-Hann resampling (transforms.Resample, exact)


@functools.cache
def _resample_kernel(orig_hz: int, new_hz: int, device: torch.device) -> tuple[Tensor, int]:
    """torchaudio `_get_sinc_resample_kernel` with dtype=None: (new, 1, 2·width + orig) float32."""
    gcd = math.gcd(orig_hz, new_hz)
    o, n = orig_hz // gcd, new_hz // gcd
    base = min(o, n) * RESAMPLE_ROLLOFF
    width = math.ceil(RESAMPLE_FILTER_WIDTH * o / base)
    idx = torch.arange(-width, width + o, dtype=torch.float64)[None, None] / o
    # torchaudio divides the integer phase ramp in float32 and only then adds the float64 taps.
    t = (torch.arange(0, -n, -1)[:, None, None] / n).to(torch.float32) + idx  # [n, 1, taps] float64
    t = (t * base).clamp(-RESAMPLE_FILTER_WIDTH, RESAMPLE_FILTER_WIDTH)
    window = torch.cos(t * math.pi / RESAMPLE_FILTER_WIDTH / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0, dtype=t.dtype), t.sin() / t)
    kernel = (kernel * (window * (base / o))).to(torch.float32)
    return kernel.to(device), width


def resample(audio: Tensor, orig_hz: int, new_hz: int) -> Tensor:
    """torchaudio `Resample(orig_hz, new_hz)` (sinc_interp_hann, width 6, rolloff 0.99): (1, N) → (1, N')."""
    if orig_hz == new_hz:
        return audio  # Resample(sr, sr) returns its input untouched
    gcd = math.gcd(orig_hz, new_hz)
    o, n = orig_hz // gcd, new_hz // gcd
    kernel, width = _resample_kernel(orig_hz, new_hz, audio.device)
    length = audio.shape[-1]
    x = F.pad(audio.reshape(-1, length), (width, width + o))  # [C, width + N + width + o]
    y = F.conv1d(x[:, None], kernel, stride=o)  # [C, n phases, frames]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)  # sample n·m + j is phase j of frame m
    return y[:, : math.ceil(n * length / o)].reshape(*audio.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------
# Kaldi framing shared by the two 16 kHz extractors


def _kaldi_hz_to_mel(f: Tensor) -> Tensor:
    return 1127.0 * (1.0 + f / 700.0).log()


@functools.cache
def _povey_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    if dtype == torch.float64:  # transformers window_function(400, "povey", periodic=False)
        k = torch.arange(FRAME_LENGTH, dtype=torch.float64)
        w = (0.5 - 0.5 * torch.cos(2 * math.pi * k / (FRAME_LENGTH - 1))) ** POVEY_POWER
    else:  # torchaudio kaldi: hann_window(400, periodic=False) ** 0.85
        w = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=dtype) ** POVEY_POWER
    return w.to(device)


def _kaldi_frames(x: Tensor) -> Tensor:
    """(N,) → (F, 512): snip-edges framing, DC removal, pre-emphasis, povey window, zero pad."""
    if x.shape[-1] < FRAME_LENGTH:
        raise BadAudio(f"reference audio too short: {x.shape[-1]} samples at 16 kHz, need {FRAME_LENGTH}")
    frames = x.unfold(0, FRAME_LENGTH, FRAME_SHIFT)  # [F, 400], F = 1 + (N - 400) // 160
    frames = frames - frames.mean(dim=1, keepdim=True)  # DC removal comes before pre-emphasis
    # y[k] = x[k] - 0.97·x[k-1], and y[0] = x[0] - 0.97·x[0] (kaldi replicate-pads the first sample)
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - PREEMPHASIS * prev
    frames = frames * _povey_window(x.dtype, x.device)
    return F.pad(frames, (0, FBANK_FFT - FRAME_LENGTH))  # [F, 512]


@functools.cache
def _seamless_mel_filters(device: torch.device) -> Tensor:
    """transformers `mel_filter_bank(257, 80, 20, 8000, kaldi, triangularize_in_mel_space)`: (257, 80) f64."""
    mel = np.linspace(
        1127.0 * np.log(1.0 + FBANK_LOW_HZ / 700.0), 1127.0 * np.log(1.0 + (W2V_SAMPLE_RATE_HZ // 2) / 700.0),
        N_FBANK_MELS + 2,
    )
    fft_bin_width = W2V_SAMPLE_RATE_HZ / ((FBANK_BINS - 1) * 2)
    fft_mel = 1127.0 * np.log(1.0 + (fft_bin_width * np.arange(FBANK_BINS)) / 700.0)
    diff = np.diff(mel)
    slopes = mel[None, :] - fft_mel[:, None]  # [257, 82]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    return torch.from_numpy(np.maximum(0.0, np.minimum(down, up))).to(device)  # no area normalisation


@functools.cache
def _kaldi_mel_banks(device: torch.device) -> Tensor:
    """torchaudio `get_mel_banks(80, 512, 16000, 20, 0)` plus its zero Nyquist column: (80, 257) f32."""
    mel_low = 1127.0 * math.log(1.0 + FBANK_LOW_HZ / 700.0)
    mel_high = 1127.0 * math.log(1.0 + (0.5 * W2V_SAMPLE_RATE_HZ) / 700.0)
    delta = (mel_high - mel_low) / (N_FBANK_MELS + 1)
    # Same op order and float32 dtype as torchaudio, so the banks are bit-identical.
    b = torch.arange(N_FBANK_MELS).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _kaldi_hz_to_mel((W2V_SAMPLE_RATE_HZ / FBANK_FFT) * torch.arange(FBANK_FFT / 2)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))  # [80, 256]
    return F.pad(banks, (0, 1)).to(device)  # [80, 257]


def seamless_features(audio_16k: Tensor) -> tuple[Tensor, Tensor]:
    """SeamlessM4TFeatureExtractor (w2v-BERT 2.0 preprocessor) on (1, N) float32 16 kHz audio.

    Returns input_features (1, T_w, 160) float32 and attention_mask (1, T_w) int32, T_w = ceil(F/2).
    Float64 framing and FFT, log-mel floor 1.19e-7, per-bin normalisation with ddof=1; an odd F
    gets a pad frame of 1.0 whose stacked row is masked (the mask is that of the odd frame)."""
    x = (audio_16k[0] * W2V_INT16_SCALE).to(torch.float64)  # float32 product, as numpy does, then f64
    spec = torch.fft.rfft(_kaldi_frames(x))  # [F, 257] complex128
    # transformers stores the spectrum as complex64 before taking |X| in float64: keep that rounding.
    power = spec.to(torch.complex64).to(torch.complex128).abs() ** 2
    mel = (power @ _seamless_mel_filters(x.device)).clamp_min(1.192092955078125e-07).log()
    feats = mel.to(torch.float32).to(torch.float64)  # [F, 80] (extractor output is float32)
    mean = feats.mean(dim=0, keepdim=True)
    var = feats.var(dim=0, correction=1, keepdim=True)  # unbiased, unlike numpy's default
    feats = ((feats - mean) / torch.sqrt(var + 1e-7)).to(torch.float32)
    n_frames = feats.shape[0]
    mask = torch.ones(n_frames, dtype=torch.int32, device=feats.device)
    if n_frames % W2V_STRIDE:
        feats = torch.cat([feats, feats.new_full((1, N_FBANK_MELS), W2V_PAD_VALUE)])
        mask = torch.cat([mask, mask.new_zeros(1)])
    feats = feats.reshape(1, -1, W2V_STRIDE * N_FBANK_MELS)  # [1, T_w, 160]: row r = frames 2r, 2r+1
    mask = mask[W2V_STRIDE - 1 :: W2V_STRIDE].unsqueeze(0)  # [1, T_w]: mask of the odd frame
    return feats, mask


def kaldi_fbank(audio_16k: Tensor) -> Tensor:
    """torchaudio `kaldi.fbank(audio, num_mel_bins=80, dither=0, sample_frequency=16000)`: (F, 80) f32.

    Input (1, N) float32 in [-1, 1], not rescaled; all math in float32, log floor float32 eps."""
    frames = _kaldi_frames(audio_16k[0].to(torch.float32))  # [F, 512]
    power = torch.fft.rfft(frames).abs().pow(2.0)  # [F, 257]
    mel = torch.mm(power, _kaldi_mel_banks(frames.device).T)  # [F, 80]
    return mel.clamp_min(FLOAT32_EPS).log()


def speaker_fbank(audio_16k: Tensor) -> Tensor:
    """CAMPPlus input: kaldi fbank minus its time mean per bin, (1, F, 80) float32."""
    feat = kaldi_fbank(audio_16k)
    return (feat - feat.mean(dim=0, keepdim=True)).unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# 22.05 kHz log-mel (s2mel prompt, BigVGAN domain)


def _slaney_hz_to_mel(f: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_mel = 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = f >= 1000.0
    mels[log_t] = min_log_mel + np.log(f[log_t] / 1000.0) / logstep
    return mels


def _slaney_mel_to_hz(m: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_mel = 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = m >= min_log_mel
    freqs[log_t] = 1000.0 * np.exp(logstep * (m[log_t] - min_log_mel))
    return freqs


@functools.cache
def _slaney_mel_basis(device: torch.device) -> Tensor:
    """librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=0, fmax=None): (80, 513) f32."""
    fft_freqs = np.fft.rfftfreq(n=N_FFT, d=1.0 / SAMPLE_RATE_HZ)
    edges = np.array([0.0, SAMPLE_RATE_HZ / 2.0])
    mel_lo, mel_hi = _slaney_hz_to_mel(edges)
    mel_f = _slaney_mel_to_hz(np.linspace(mel_lo, mel_hi, N_MELS + 2))  # 82 band edges in Hz
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    weights = np.zeros((N_MELS, N_FFT // 2 + 1), dtype=np.float32)
    for i in range(N_MELS):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / fdiff[i], ramps[i + 2] / fdiff[i + 1]))
    # librosa rounds to float32 twice: the triangles, then after the Slaney area normalisation.
    weights *= (2.0 / (mel_f[2 : N_MELS + 2] - mel_f[:N_MELS]))[:, None]
    return torch.from_numpy(weights).to(device)


@functools.cache
def _hann_window(device: torch.device) -> Tensor:
    return torch.hann_window(WIN_LENGTH).to(device)  # periodic Hann, as torch.stft's callers pass it


def mel_spectrogram(audio_22k: Tensor) -> Tensor:
    """s2mel prompt mel of (1, N) float32 22.05 kHz audio: natural-log Slaney mel (1, 80, P), P = N // 256."""
    if audio_22k.shape[-1] <= MEL_PAD:
        raise BadAudio(f"reference audio too short: {audio_22k.shape[-1]} samples at 22.05 kHz")
    y = F.pad(audio_22k.unsqueeze(1), (MEL_PAD, MEL_PAD), mode="reflect").squeeze(1)  # [1, N + 768]
    spec = torch.stft(
        y, N_FFT, hop_length=HOP_LENGTH, win_length=WIN_LENGTH, window=_hann_window(y.device),
        center=False, normalized=False, onesided=True, return_complex=True,
    )  # [1, 513, P]
    spec = torch.view_as_real(spec)
    mag = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)  # epsilon inside the root, as upstream
    mel = torch.matmul(_slaney_mel_basis(mag.device), mag)  # [1, 80, P]
    return torch.log(torch.clamp(mel, min=1e-5))
