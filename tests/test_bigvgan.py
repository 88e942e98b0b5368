"""BigVGAN v2: waveform and PCM parity vs upstream goldens, weight-norm folding, strict loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ttsd.pipeline.bigvgan import BigVGAN, BigVGANConfig, load_bigvgan, to_pcm_scale
from ttsd.pipeline.errors import CheckpointMismatch
from ttsd.pipeline.weights import load_module

from .conftest import EDITS, FixtureSet, assert_close, assert_names_edit, edit_checkpoint


@pytest.fixture(scope="session")
def vocoder(converted: Path) -> BigVGAN:
    return load_bigvgan(converted / "bigvgan.safetensors", converted / "bigvgan.json", "cpu")


def _segments(fx: FixtureSet, variant: str) -> list[str]:
    return [f"seg{i}." for i in range(len(fx.variant(variant)["segments"]))]


@pytest.mark.model_versions("2", "2.5")
@torch.no_grad()
def test_bigvgan_matches_upstream(fx: FixtureSet, variant: str, vocoder: BigVGAN) -> None:
    """The vocoder turns the golden vc_target into upstream's waveform and PCM-scale segment."""
    g = fx.golden(variant, "15_bigvgan")
    for seg in _segments(fx, variant):
        wav = vocoder(g[seg + "vc_target"])
        assert_close(wav, g[seg + "bigvgan_out"], seg + "bigvgan_out")
        assert_close(to_pcm_scale(wav), g[seg + "wav_pcm"], seg + "wav_pcm")


@torch.no_grad()
def test_bigvgan_fold_weight_norm_keeps_output(fx: FixtureSet, converted: Path, vocoder: BigVGAN) -> None:
    """Folding weight norm once gives the same waveform as recomputing v·(g/‖v‖) every forward."""
    cfg = BigVGANConfig.load(converted / "bigvgan.json")
    unfolded = load_module(lambda: BigVGAN(cfg), converted / "bigvgan.safetensors", "cpu")
    mel = fx.golden("base", "15_bigvgan")["seg0.vc_target"]
    assert_close(vocoder(mel), unfolded(mel), "folded vs unfolded")
    assert not any(n.endswith(("weight_g", "weight_v")) for n, _ in vocoder.named_parameters())
    assert any(n.endswith("weight_g") for n, _ in unfolded.named_parameters())


@torch.no_grad()
def test_bigvgan_loads_already_folded_checkpoint(
    fx: FixtureSet, converted: Path, tmp_path: Path, vocoder: BigVGAN
) -> None:
    """A checkpoint holding plain folded `weight`s loads through the same entry point and sounds the same."""
    state = {k: v.contiguous() for k, v in vocoder.state_dict().items()}
    save_file(state, str(tmp_path / "bigvgan.safetensors"))
    folded = load_bigvgan(tmp_path / "bigvgan.safetensors", converted / "bigvgan.json", "cpu")
    mel = fx.golden("base", "15_bigvgan")["seg0.vc_target"]
    assert torch.equal(folded(mel), vocoder(mel))


@pytest.mark.parametrize("how", EDITS)
@pytest.mark.parametrize(
    "key", ["ups.2.0.weight_v", "resblocks.4.activations.3.act.beta", "activation_post.upsample.filter"]
)
def test_bigvgan_checkpoint_mismatch_names_tensor(converted: Path, tmp_path: Path, how: str, key: str) -> None:
    """A vocoder checkpoint with a tensor removed, renamed or reshaped raises CheckpointMismatch naming it."""
    bad = edit_checkpoint(converted / "bigvgan.safetensors", tmp_path / "bigvgan.safetensors", how, key)
    with pytest.raises(CheckpointMismatch) as err:
        load_bigvgan(bad, converted / "bigvgan.json", "cpu")
    assert_names_edit(err.value, how, key)


@torch.no_grad()
def test_batched_rows_of_different_lengths_get_their_own_samples(fx: FixtureSet, vocoder: BigVGAN) -> None:
    """Mels of different lengths (1, 2 and 9 frames short of the longest, and the longest) vocoded as
    one right-padded batch with their lengths give each row the samples it gets alone: zero-padded convs
    see zeros past each row's end and the anti-aliased activations their own replicated last frame
    (without the lengths, the padded rows' last samples differ)."""
    mel = fx.golden("base", "15_bigvgan")["seg0.vc_target"]  # (1, M, T)
    t = mel.size(-1)
    lengths = [t, t - 1, t - 2, t - 9]
    batch = torch.zeros(len(lengths), mel.size(1), t)
    for b, n in enumerate(lengths):
        batch[b, :, :n] = mel[0, :, :n]
    together = vocoder(batch, torch.tensor(lengths))
    unmasked = vocoder(batch)
    hop = together.size(-1) // t
    worst_unmasked = 0.0
    for b, n in enumerate(lengths):
        alone = vocoder(mel[:, :, :n])
        assert alone.size(-1) == n * hop
        assert_close(together[b : b + 1, :, : n * hop], alone, f"row {b} of {n} frames")
        worst_unmasked = max(worst_unmasked, float((unmasked[b, :, : n * hop] - alone[0]).abs().max()))
    assert worst_unmasked > 1e-3  # the case needs the lengths
