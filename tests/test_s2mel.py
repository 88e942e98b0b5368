"""s2mel parity: gpt_layer, length regulator, DiT estimator and the CFM Euler sampler vs upstream goldens.

The regulator, DiT and sampler are shared by IndexTTS-2 and 2.5; only their inputs differ (the
prompt features and S_infer, stage 12), and each version's codec provides its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor, nn

from ttsd.api.errors import Cancelled, ConfigError
from ttsd.pipeline.codec25 import load_codec25
from ttsd.pipeline.errors import CheckpointMismatch
from ttsd.pipeline.family import family_for
from ttsd.pipeline.flow import CFM, CFMRow, CFMSolve, load_cfm
from ttsd.pipeline.length_regulator import (
    InterpolateRegulator,
    LengthRegulatorConfig,
    load_gpt_layer,
    load_length_regulator,
    mel_lengths,
    nearest_indices,
)
from ttsd.pipeline.semantic_codec import load_semantic_codec
from ttsd.pipeline.voice import ReferenceCodec

from .conftest import EDITS, FixtureSet, assert_close, assert_equal, assert_names_edit, edit_checkpoint, golden_part


@dataclass
class S2Mel:
    config: dict[str, Any]
    length_regulator: InterpolateRegulator
    gpt_layer: nn.Sequential | None  # IndexTTS-2 only (2.5's MyModel has none)
    cfm: CFM
    codec: ReferenceCodec  # the version's semantic codec (for the prompt features)


def _config(ckpt: Path) -> dict[str, Any]:
    with (ckpt / "config.yaml").open(encoding="utf-8") as f:
        config: dict[str, Any] = yaml.safe_load(f)
    return config


@pytest.fixture(scope="session")
def s2mel(converted: Path) -> S2Mel:
    config = _config(converted)
    path = converted / "s2mel.safetensors"
    v2 = family_for(config).second_pass  # IndexTTS-2's parts: gpt_layer and the MaskGCT codec
    return S2Mel(
        config=config,
        length_regulator=load_length_regulator(path, config, "cpu"),
        gpt_layer=load_gpt_layer(path, "cpu") if v2 else None,
        cfm=load_cfm(path, config, "cpu"),
        codec=load_semantic_codec(converted, "cpu") if v2 else load_codec25(converted, config, "cpu"),
    )


def _segments(fx: FixtureSet, variant: str) -> list[str]:
    return [f"seg{i}." for i in range(len(fx.variant(variant)["segments"]))]


@pytest.mark.model_versions("2", "2.5")
@torch.no_grad()
def test_prompt_condition_matches_upstream(fx: FixtureSet, variant: str, s2mel: S2Mel) -> None:
    """The length regulator maps the codec's reference features of the golden w2v-BERT embedding
    (IndexTTS-2: quantized S_ref; 2.5: the features themselves) to upstream's prompt_condition."""
    s_ref = s2mel.codec.reference_features(fx.golden(variant, "03_w2vbert")["spk.cond_emb"])
    g = fx.golden(variant, "07_prompt_condition")
    ylens = torch.tensor([fx.golden(variant, "05_ref_mel")["ref_mel"].size(-1)])
    assert_equal(ylens, g["ref_target_lengths"], "ref_target_lengths")
    assert_close(s2mel.length_regulator(s_ref, ylens), g["prompt_condition"], "prompt_condition")


@pytest.mark.stages("11_gpt_latent", "12_s2mel_inputs")
@torch.no_grad()
def test_s2mel_inputs_match_upstream(fx: FixtureSet, variant: str, s2mel: S2Mel) -> None:
    """gpt_layer on the golden latent, S_infer and the 1.72× target lengths match upstream."""
    latent = fx.golden(variant, "11_gpt_latent")
    codes = fx.golden(variant, "10_gpt_generate")
    g = fx.golden(variant, "12_s2mel_inputs")
    assert s2mel.gpt_layer is not None
    for seg in _segments(fx, variant):
        out = s2mel.gpt_layer(latent[seg + "latent"])
        assert_close(out, g[seg + "gpt_layer_out"], seg + "gpt_layer_out")
        assert_close(g[seg + "vq2emb_out"].transpose(1, 2) + out, g[seg + "S_infer"], seg + "S_infer")
        assert_equal(mel_lengths(codes[seg + "code_lens"]), g[seg + "target_lengths"], seg + "target_lengths")


@pytest.mark.model_versions("2", "2.5")
@torch.no_grad()
def test_cond_matches_upstream(fx: FixtureSet, variant: str, s2mel: S2Mel) -> None:
    """The regulated target content and its concatenation after the prompt match upstream."""
    g12 = fx.golden(variant, fx.stage_name(variant, "12"))  # S_infer + target_lengths in both versions
    g13 = fx.golden(variant, "13_cond")
    prompt_condition = fx.golden(variant, "07_prompt_condition")["prompt_condition"]
    for seg in _segments(fx, variant):
        cond = s2mel.length_regulator(g12[seg + "S_infer"], g12[seg + "target_lengths"])
        assert_close(cond, g13[seg + "cond"], seg + "cond")
        assert_close(
            torch.cat([prompt_condition, cond], dim=1), g13[seg + "cat_condition"], seg + "cat_condition"
        )


@pytest.mark.model_versions("2", "2.5")
@torch.no_grad()
def test_dit_estimator_matches_upstream(fx: FixtureSet, variant: str, s2mel: S2Mel) -> None:
    """At every recorded Euler step, the DiT velocity of both CFG halves matches upstream."""
    g = fx.golden(variant, "14_cfm")
    for seg in _segments(fx, variant):
        cond, uncond = [], []
        for i in range(len(g[seg + "est_steps"])):
            x, t = g[seg + "est_x"][i], g[seg + "est_t"][i]  # [1, M, N], [1]
            v = s2mel.cfm.estimator(
                torch.cat([x, x]),
                g[seg + "est_prompt_x"],
                torch.cat([t, t]),
                g[seg + "est_style"],
                g[seg + "est_mu"],
            )
            cond.append(v[:1])
            uncond.append(v[1:])
        assert_close(torch.stack(cond), g[seg + "est_dphi_cond"], f"{seg}est_dphi_cond")
        assert_close(torch.stack(uncond), g[seg + "est_dphi_uncond"], f"{seg}est_dphi_uncond")


def _sample(s2mel: S2Mel, fx: FixtureSet, variant: str, seg: str, **kw: Any) -> Tensor:
    g = fx.golden(variant, "14_cfm")
    return s2mel.cfm.inference(
        fx.golden(variant, "13_cond")[seg + "cat_condition"],
        fx.golden(variant, "05_ref_mel")["ref_mel"],
        fx.golden(variant, "06_campplus")["style"],
        n_timesteps=int(g[seg + "n_timesteps"]),
        inference_cfg_rate=float(g[seg + "inference_cfg_rate"]),
        **kw,
    )


@pytest.mark.model_versions("2", "2.5")
def test_cfm_sampler_matches_upstream(fx: FixtureSet, variant: str, s2mel: S2Mel) -> None:
    """The full Euler/CFG sampler from the golden noise reproduces mel_full and the vocoder input of
    every segment, and feeds the estimator upstream's inputs: the step count, the sequence length,
    the time grid and the stacked x, accumulated t, prompt_x, style and mu."""
    g = fx.golden(variant, "14_cfm")
    vc = fx.golden(variant, "15_bigvgan")
    prompt_frames = fx.golden(variant, "05_ref_mel")["ref_mel"].size(-1)
    seen: list[tuple[Tensor, ...]] = []

    def record(_: nn.Module, args: tuple[Tensor, ...]) -> None:
        seen.append(tuple(a.clone() for a in args[:5]))  # x, prompt_x, t, style, mu

    for seg in _segments(fx, variant):
        seen.clear()
        handle = s2mel.cfm.estimator.register_forward_pre_hook(record)
        try:
            mel = _sample(s2mel, fx, variant, seg, noise=g[seg + "noise"])
        finally:
            handle.remove()
        assert_close(mel, g[seg + "mel_full"], seg + "mel_full")
        assert_close(mel[:, :, prompt_frames:], vc[seg + "vc_target"], seg + "vc_target")

        assert_equal(torch.tensor([len(seen)]), g[seg + "n_timesteps"], seg + "n_timesteps")
        x, prompt_x, t, style, mu = seen[0]
        assert_equal(torch.tensor([mu.size(1)]), g[seg + "x_lens"], seg + "x_lens")
        assert_close(prompt_x, g[seg + "est_prompt_x"], seg + "est_prompt_x")
        assert_close(style, g[seg + "est_style"], seg + "est_style")
        assert_close(mu, g[seg + "est_mu"], seg + "est_mu")
        ts = torch.stack([step_t[0] for _, _, step_t, _, _ in seen])  # the t of every step
        assert_close(ts, golden_part(g[seg + "t_span"], slice(None, -1)), seg + "t_span")
        steps = g[seg + "est_steps"].tolist()
        xs = torch.stack([seen[step][0] for step in steps])  # [n, 2, M, N]
        assert torch.equal(xs[:, :1], xs[:, 1:]), "both CFG halves must see the same x"
        assert_close(xs[:, :1], g[seg + "est_x"], seg + "est_x")
        # float32 accumulation (t += dt), bit-exact
        assert_equal(torch.stack([seen[step][2][:1] for step in steps]), g[seg + "est_t"], seg + "est_t")


@pytest.mark.model_versions("2", "2.5")
def test_cfm_noise_is_the_seeded_draw(fx: FixtureSet, variant: str) -> None:
    """Each segment's golden start noise is randn drawn right after seeding noise_seed·1000 + segment,
    times the temperature, as the manifest says: a generator seeded so reproduces it exactly."""
    g = fx.golden(variant, "14_cfm")
    noise_seed = int(fx.settings["noise_seed"])
    for k, seg in enumerate(_segments(fx, variant)):
        golden = g[seg + "noise"]
        gen = torch.Generator().manual_seed(noise_seed * 1000 + k)
        drawn = torch.randn(golden.shape, generator=gen) * float(g[seg + "temperature"])
        assert_equal(drawn, golden, seg + "noise")


def test_cfm_generator_noise_is_reproducible(fx: FixtureSet, s2mel: S2Mel) -> None:
    """Noise drawn from a seeded generator equals injecting randn(generator) · temperature."""
    seg = "seg0."
    mel_shape = fx.golden("base", "14_cfm")[seg + "noise"].shape
    noise = torch.randn(mel_shape, generator=torch.Generator().manual_seed(7)) * 0.5
    drawn = _sample(s2mel, fx, "base", seg, generator=torch.Generator().manual_seed(7), temperature=0.5)
    injected = _sample(s2mel, fx, "base", seg, noise=noise)
    assert torch.equal(drawn, injected)


def test_cfm_cancel_raises_between_steps(fx: FixtureSet, s2mel: S2Mel) -> None:
    """A cancel callback that turns true stops the sampler with Cancelled before the next step."""
    polls = 0

    def cancel() -> bool:
        nonlocal polls
        polls += 1
        return polls > 3

    calls = 0

    def count(_: nn.Module, __: tuple[Tensor, ...]) -> None:
        nonlocal calls
        calls += 1

    handle = s2mel.cfm.estimator.register_forward_pre_hook(count)
    try:
        with pytest.raises(Cancelled):
            _sample(s2mel, fx, "base", "seg0.", generator=torch.Generator().manual_seed(0), cancel=cancel)
    finally:
        handle.remove()
    assert calls == 3


def _estimator_args(g: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, ...]:
    """The DiT inputs of recorded Euler step `step` of segment 0, CFG-stacked as the sampler feeds them."""
    x, t = g["seg0.est_x"][step], g["seg0.est_t"][step]
    return torch.cat([x, x]), g["seg0.est_prompt_x"], torch.cat([t, t]), g["seg0.est_style"], g["seg0.est_mu"]


def test_dit_fold_weight_norm_keeps_output(fx: FixtureSet, converted: Path, s2mel: S2Mel) -> None:
    """Folding the DiT's weight norm once gives the same velocity as recomputing it every forward."""
    unfolded = load_cfm(converted / "s2mel.safetensors", s2mel.config, "cpu", fold=False).estimator
    g = fx.golden("base", "14_cfm")
    args = _estimator_args(g, 0)
    with torch.no_grad():
        assert_close(s2mel.cfm.estimator(*args), unfolded(*args), "folded vs unfolded")
    assert not any(n.endswith(("weight_g", "weight_v")) for n, _ in s2mel.cfm.named_parameters())


@torch.no_grad()
def test_dit_full_length_mask_equals_no_mask(fx: FixtureSet, s2mel: S2Mel) -> None:
    """Passing x_lens equal to the sequence length (upstream's call) gives the unmasked velocity."""
    g = fx.golden("base", "14_cfm")
    args = _estimator_args(g, 1)
    masked = s2mel.cfm.estimator(*args, x_lens=g["seg0.x_lens"])
    assert_close(masked, s2mel.cfm.estimator(*args), "x_lens=N vs None")
    assert_close(masked[:1], g["seg0.est_dphi_cond"][1], "dphi_cond with x_lens")


@torch.no_grad()
def test_batched_solve_gives_each_row_the_frames_it_gets_alone(fx: FixtureSet, s2mel: S2Mel) -> None:
    """Sequences 1, 2 and 9 frames shorter than the longest, solved together (each padded, masked and
    re-reflected at its own end), get the frames each gets alone (defect: a row fewer frames short than
    the WaveNet's reach saw the padded tensor's reflection at its end instead of its own: errors of ~0.5
    on its last frames). The golden segment's mu, prompt and style, cut to each length."""
    g = fx.golden("base", "14_cfm")
    mu, prompt, style = g["seg0.est_mu"][:1], g["seg0.est_prompt_x"][:1], g["seg0.est_style"][:1]
    p, n = int(prompt[0].abs().sum(0).gt(0).sum()), mu.size(1)  # the prompt: its nonzero frames
    assert s2mel.cfm.estimator.wavenet.reach >= 2, "the case needs a conv that reaches 2 frames"
    gen = torch.Generator().manual_seed(0)
    rows = [CFMRow(mu[:, :m], prompt[:, :, :p], style, torch.randn(1, s2mel.cfm.in_channels, m, generator=gen), 0.7)
            for m in (n, n - 1, n - 2, n - 9)]

    def solve(batch: list[CFMRow]) -> list[Tensor]:
        sv = CFMSolve(s2mel.cfm, batch, 3)
        while not sv.done:
            sv.step()
        return [sv.target(b) for b in range(len(batch))]

    together = solve(rows)
    for i, row in enumerate(rows):
        alone = solve([row])[0]
        assert together[i].shape == alone.shape
        err = float((together[i] - alone).abs().max())
        assert err <= 1e-4 * max(1.0, float(alone.abs().max())), (i, err)


def test_nearest_indices_follow_legacy_nearest() -> None:
    """The regulator's frame map equals torch's legacy nearest interpolation for awkward ratios."""
    for t_in, t_out in [(60, 103), (208, 359), (7, 3), (5, 10), (9, 9), (1, 17)]:
        src = torch.arange(t_in, dtype=torch.float32)[None, None]
        want = torch.nn.functional.interpolate(src, size=t_out, mode="nearest")[0, 0].long()
        assert nearest_indices(t_in, t_out, torch.device("cpu")).tolist() == want.tolist()


def test_length_regulator_config_names_missing_key(converted: Path) -> None:
    """A config.yaml without a regulator key raises ConfigError naming that key."""
    config = _config(converted)
    del config["s2mel"]["length_regulator"]["in_channels"]
    with pytest.raises(ConfigError, match=r"s2mel\.length_regulator\.in_channels"):
        LengthRegulatorConfig.from_yaml(config)


@pytest.mark.parametrize("how", EDITS)
@pytest.mark.parametrize(
    ("part", "key"),
    [
        ("cfm", "cfm.estimator.wavenet.in_layers.0.conv.conv.weight_v"),
        ("length_regulator", "length_regulator.model.12.bias"),
        ("gpt_layer", "gpt_layer.1.bias"),
    ],
)
def test_s2mel_checkpoint_mismatch_names_tensor(
    converted: Path, tmp_path: Path, s2mel: S2Mel, how: str, part: str, key: str
) -> None:
    """A s2mel checkpoint with one tensor removed, renamed or reshaped raises CheckpointMismatch naming it."""
    bad = edit_checkpoint(converted / "s2mel.safetensors", tmp_path / "s2mel.safetensors", how, key)
    load = {
        "cfm": lambda: load_cfm(bad, s2mel.config, "cpu"),
        "length_regulator": lambda: load_length_regulator(bad, s2mel.config, "cpu"),
        "gpt_layer": lambda: load_gpt_layer(bad, "cpu"),
    }[part]
    with pytest.raises(CheckpointMismatch) as err:
        load()
    assert_names_edit(err.value, how, key.removeprefix(part + "."))
