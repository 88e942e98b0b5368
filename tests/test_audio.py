"""Reference-audio front ends against golden stages 01_audio, 02_features, 05_ref_mel and 06_campplus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ttsd.api.errors import BadAudio
from ttsd.pipeline import audio

from .conftest import FixtureSet, assert_close, assert_equal

pytestmark = pytest.mark.model_versions("2", "2.5")  # the reference front ends are shared


def _emo_path(fx: FixtureSet, variant: str) -> Path:
    name = fx.variant(variant)["call"]["emo_audio_prompt"] or fx.variant(variant)["call"]["spk_audio_prompt"]
    return fx.golden_dir / name


def test_speaker_audio_loads_like_librosa(fx: FixtureSet, variant: str) -> None:
    """The speaker prompt decodes at 22.05 kHz and is cut to 15 s exactly as upstream loads it."""
    g = fx.golden(variant, "01_audio")
    spk = fx.golden_dir / fx.variant(variant)["call"]["spk_audio_prompt"]
    a22 = audio.cut_audio(audio.load_audio(spk, audio.SAMPLE_RATE_HZ), audio.SAMPLE_RATE_HZ)
    assert a22.dtype == torch.float32
    assert_close(a22, g["spk.loaded_audio"], "spk.loaded_audio")
    assert_close(audio.resample(a22, audio.SAMPLE_RATE_HZ, audio.SAMPLE_RATE_HZ), g["spk.audio_22050"], "a22")


def test_resample_matches_torchaudio(fx: FixtureSet, variant: str) -> None:
    """The sinc-Hann 22050→16000 resampler reproduces torchaudio's Resample on the golden input."""
    g = fx.golden(variant, "01_audio")
    a16 = audio.resample(g["spk.audio_22050"], audio.SAMPLE_RATE_HZ, audio.W2V_SAMPLE_RATE_HZ)
    assert_close(a16, g["spk.audio_16000"], "spk.audio_16000")


def test_emotion_audio_loads_at_16k(fx: FixtureSet, variant: str) -> None:
    """The emotion prompt (the speaker file when none is given) goes straight to 16 kHz with soxr."""
    g = fx.golden(variant, "01_audio")
    emo = audio.load_audio(_emo_path(fx, variant).read_bytes(), audio.W2V_SAMPLE_RATE_HZ)
    assert_close(audio.cut_audio(emo, audio.W2V_SAMPLE_RATE_HZ), g["emo.loaded_audio"], "emo.loaded_audio")


def test_seamless_features_match(fx: FixtureSet, variant: str) -> None:
    """SeamlessM4T input features and the odd-frame attention mask match for both prompts."""
    g = fx.golden(variant, "01_audio")
    f = fx.golden(variant, "02_features")
    for who, src in (("spk", "spk.audio_16000"), ("emo", "emo.loaded_audio")):
        feats, mask = audio.seamless_features(g[src])
        assert_close(feats, f[f"{who}.input_features"], f"{who}.input_features")
        assert_equal(mask, f[f"{who}.attention_mask"], f"{who}.attention_mask")
        assert mask.dtype == torch.int32


def test_seamless_odd_frame_count_pads_with_one() -> None:
    """An odd frame count appends a pad frame of 1.0 and masks the last stacked row."""
    n = audio.FRAME_LENGTH + 2 * audio.FRAME_SHIFT
    x = 0.1 * torch.randn(1, n, generator=torch.Generator().manual_seed(0))
    feats, mask = audio.seamless_features(x)  # F = 3 → 2 stacked rows
    assert feats.shape == (1, 2, 160)
    assert mask.tolist() == [[1, 0]]
    assert torch.equal(feats[0, 1, 80:], torch.ones(80))


def test_ref_mel_matches(fx: FixtureSet, variant: str) -> None:
    """The 22.05 kHz Slaney log-mel of the speaker prompt matches the s2mel prompt mel."""
    g = fx.golden(variant, "01_audio")
    golden = fx.golden(variant, "05_ref_mel")["ref_mel"]
    assert_close(audio.mel_spectrogram(g["spk.audio_22050"]), golden, "ref_mel")


def test_kaldi_fbank_matches(fx: FixtureSet, variant: str) -> None:
    """The Kaldi fbank and its time-centred CAMPPlus input match torchaudio's."""
    g = fx.golden(variant, "01_audio")
    c = fx.golden(variant, "06_campplus")
    assert_close(audio.kaldi_fbank(g["spk.audio_16000"]), c["fbank_raw"], "fbank_raw")
    assert_close(audio.speaker_fbank(g["spk.audio_16000"]), c["fbank_centered"], "fbank_centered")


def test_stereo_is_mean_of_channels(fx: FixtureSet, tmp_path: Path) -> None:
    """A stereo file loads as the mean of its channels, before resampling."""
    mono = audio.load_audio(fx.golden_dir / "speaker.wav", audio.SAMPLE_RATE_HZ)[0].numpy()
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([mono, np.zeros_like(mono)], axis=1), audio.SAMPLE_RATE_HZ, subtype="FLOAT")
    got = audio.load_audio(path, audio.SAMPLE_RATE_HZ)
    assert torch.equal(got[0], torch.from_numpy(mono / np.float32(2)))


def test_resampled_length_is_ceil(fx: FixtureSet) -> None:
    """Resampling with soxr forces the length to ceil(N · sr / sr_native), as librosa does."""
    n22 = audio.load_audio(fx.golden_dir / "speaker.wav", audio.SAMPLE_RATE_HZ).shape[-1]
    out = audio.load_audio(fx.golden_dir / "speaker.wav", 8000)
    assert out.shape == (1, int(np.ceil(n22 * (8000 / audio.SAMPLE_RATE_HZ))))


@pytest.mark.parametrize("payload", [b"", b"not audio at all, just some bytes" * 10])
def test_undecodable_audio_raises_bad_audio(payload: bytes) -> None:
    """Bytes that libsndfile cannot decode raise BadAudio, not a library exception."""
    with pytest.raises(BadAudio):
        audio.load_audio(payload, audio.SAMPLE_RATE_HZ)


def test_empty_audio_raises_bad_audio(tmp_path: Path) -> None:
    """A valid WAV with no samples raises BadAudio."""
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), audio.SAMPLE_RATE_HZ)
    with pytest.raises(BadAudio, match="no samples"):
        audio.load_audio(path, audio.SAMPLE_RATE_HZ)


def test_missing_file_raises_bad_audio(tmp_path: Path) -> None:
    """A path that does not exist raises BadAudio."""
    with pytest.raises(BadAudio):
        audio.load_audio(tmp_path / "nope.wav", audio.SAMPLE_RATE_HZ)
