"""w2v-BERT, the semantic codecs and CAMPPlus against golden stages 03, 04, 06 and 12.

IndexTTS-2's MaskGCT codec quantizes the reference (04) and embeds GPT codes (12_s2mel_inputs);
IndexTTS-2.5's EnhancedCodec decodes GPT codes to S_infer at twice their length (12_codec_decode)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from ttsd.api.errors import ConfigError
from ttsd.pipeline.campplus import CAMPPlus, load_campplus
from ttsd.pipeline.codec25 import EnhancedCodec, EnhancedCodecConfig, load_codec25
from ttsd.pipeline.errors import CheckpointMismatch
from ttsd.pipeline.semantic_codec import SemanticCodec, SemanticCodecConfig, load_semantic_codec
from ttsd.pipeline.w2v_bert import HIDDEN_STATE_LAYER, W2VBert, W2VStats, load_w2v_bert
from ttsd.pipeline.weights import load_module

from .conftest import EDITS, FixtureSet, assert_close, assert_equal, assert_names_edit, edit_checkpoint


@pytest.fixture(scope="session")
def w2v(converted: Path) -> tuple[W2VBert, W2VStats]:
    return load_w2v_bert(converted, "cpu")


@pytest.fixture(scope="session")
def codec(converted: Path) -> SemanticCodec:
    return load_semantic_codec(converted, "cpu")


@pytest.fixture(scope="session")
def campplus(converted: Path) -> CAMPPlus:
    return load_campplus(converted, "cpu")


def _config(ckpt: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8")))


@pytest.fixture(scope="session")
def codec25(converted: Path) -> EnhancedCodec:
    return load_codec25(converted, _config(converted), "cpu")


@pytest.mark.model_versions("2", "2.5")
def test_w2v_speaker_hidden_states(fx: FixtureSet, variant: str, w2v: tuple[W2VBert, W2VStats]) -> None:
    """Golden speaker features give upstream's hidden_states[0], [1], [17] and the normalised cond_emb."""
    model, stats = w2v
    f, w = fx.golden(variant, "02_features"), fx.golden(variant, "03_w2vbert")
    x, mask = f["spk.input_features"], f["spk.attention_mask"]
    assert_close(model(x, mask, layer=0), w["spk.hidden_state_0"], "spk.hidden_state_0")
    assert_close(model(x, mask, layer=1), w["spk.hidden_state_1"], "spk.hidden_state_1")
    h = model(x, mask)
    assert_close(h, w["spk.hidden_state_17_raw"], "spk.hidden_state_17_raw")
    assert_close(stats(h), w["spk.cond_emb"], "spk.cond_emb")


@pytest.mark.model_versions("2", "2.5")
def test_w2v_emotion_cond_emb(fx: FixtureSet, variant: str, w2v: tuple[W2VBert, W2VStats]) -> None:
    """Golden emotion features give upstream's layer-17 state and emo_cond_emb."""
    model, stats = w2v
    f, w = fx.golden(variant, "02_features"), fx.golden(variant, "03_w2vbert")
    h = model(f["emo.input_features"], f["emo.attention_mask"])
    assert_close(h, w["emo.hidden_state_17_raw"], "emo.hidden_state_17_raw")
    assert_close(stats(h), w["emo.cond_emb"], "emo.cond_emb")


def test_w2v_builds_only_layers_it_reads(w2v: tuple[W2VBert, W2VStats]) -> None:
    """Only the layers up to hidden_states[17] are allocated; later ones are skipped at load."""
    model, _ = w2v
    assert len(model.encoder.layers) == HIDDEN_STATE_LAYER
    assert not any(k.startswith(f"encoder.layers.{HIDDEN_STATE_LAYER}.") for k in model.state_dict())


def test_semantic_codec_quantize(fx: FixtureSet, variant: str, codec: SemanticCodec) -> None:
    """quantize(spk_cond_emb) gives upstream's indices exactly and S_ref within tolerance."""
    q = fx.golden(variant, "04_semantic_codec")
    indices, s_ref = codec.quantize(fx.golden(variant, "03_w2vbert")["spk.cond_emb"])
    assert_equal(indices, q["S_ref_indices"], "S_ref_indices")
    assert_close(s_ref, q["S_ref"], "S_ref")


def test_semantic_codec_vq2emb(fx: FixtureSet, variant: str, codec: SemanticCodec) -> None:
    """vq2emb of the golden GPT codes of every segment matches upstream's content features."""
    gen, s2 = fx.golden(variant, "10_gpt_generate"), fx.golden(variant, "12_s2mel_inputs")
    segs = sorted({k.split(".")[0] for k in s2 if k.endswith(".vq2emb_out")})
    assert segs
    for seg in segs:
        assert_close(codec.vq2emb(gen[f"{seg}.codes"]), s2[f"{seg}.vq2emb_out"], f"{seg}.vq2emb_out")


def test_semantic_codec_fold_matches_weight_norm(
    fx: FixtureSet, converted: Path, codec: SemanticCodec
) -> None:
    """Folding the weight-normed projections changes neither indices nor S_ref beyond float rounding."""
    config = yaml.safe_load((converted / "config.yaml").read_text(encoding="utf-8"))
    cfg = SemanticCodecConfig.from_yaml(config)
    unfolded = load_module(lambda: SemanticCodec(cfg), converted / "semantic_codec.safetensors", "cpu")
    x = fx.golden("base", "03_w2vbert")["spk.cond_emb"]
    (i0, s0), (i1, s1) = unfolded.quantize(x), codec.quantize(x)
    assert torch.equal(i0, i1)
    assert float((s0 - s1).abs().max()) <= 1e-5


@pytest.mark.model_versions("2", "2.5")
def test_campplus_style(fx: FixtureSet, variant: str, campplus: CAMPPlus) -> None:
    """CAMPPlus on the golden centred fbank gives upstream's 192-d style vector."""
    c = fx.golden(variant, "06_campplus")
    assert_close(campplus(c["fbank_centered"]), c["style"], "style")


@pytest.mark.model_versions("2.5")
@pytest.mark.stages("10_gpt_generate", "12_codec_decode")
@torch.no_grad()
def test_codec25_decode_matches_upstream(fx: FixtureSet, variant: str, codec25: EnhancedCodec) -> None:
    """vq2emb, decoder, ×2 upsampling, the `up` conv (S_infer) and the target frame count of every
    segment's golden codes match upstream's EnhancedCodec.decode and infer_v2_5's arithmetic."""
    gen, g = fx.golden(variant, "10_gpt_generate"), fx.golden(variant, "12_codec_decode")
    duration_factor = float(fx.variant(variant)["call"]["duration_factor"])
    segs = sorted({k.split(".")[0] for k in g if k.endswith(".S_infer")})
    assert segs
    for seg in segs:
        codes = gen[f"{seg}.codes"]
        emb = codec25.embed(codes)
        assert_close(emb, g[f"{seg}.vq2emb_out"], f"{seg}.vq2emb_out")
        dec = codec25.decoder(emb)
        assert_close(dec, g[f"{seg}.decoder_out"], f"{seg}.decoder_out")
        assert_close(codec25.upsample(dec), g[f"{seg}.upsampled"], f"{seg}.upsampled")
        s_infer, target = codec25.content(codes, duration_factor)
        assert_close(s_infer, g[f"{seg}.S_infer"], f"{seg}.S_infer")
        assert_close(codec25.decode(codes), g[f"{seg}.S_infer"], f"{seg}.S_infer (decode)")
        assert_equal(target, g[f"{seg}.target_lengths"], f"{seg}.target_lengths")


@pytest.mark.model_versions("2.5")
@torch.no_grad()
def test_codec25_fold_matches_weight_norm(fx: FixtureSet, converted: Path, codec25: EnhancedCodec) -> None:
    """Folding the quantizer's weight-normed projections leaves S_infer unchanged beyond float rounding."""
    cfg = EnhancedCodecConfig.from_yaml(_config(converted))
    unfolded = load_module(lambda: EnhancedCodec(cfg), converted / "codec.safetensors", "cpu")
    codes = fx.golden("base", "10_gpt_generate")["seg0.codes"]
    assert float((unfolded.decode(codes) - codec25.decode(codes)).abs().max()) <= 1e-5
    assert not any(n.endswith(("weight_g", "weight_v")) for n, _ in codec25.named_parameters())


@pytest.mark.model_versions("2.5")
def test_codec25_config_needs_downsampling(converted: Path) -> None:
    """A 2.5 codec config without down-sampling (upstream would build no `up` conv) is a ConfigError."""
    config = _config(converted)
    codec_cfg = dict(config["semantic_codec"])
    codec_cfg["downsample_scale"] = 1
    with pytest.raises(ConfigError, match="downsample_scale"):
        EnhancedCodecConfig.from_yaml({**config, "semantic_codec": codec_cfg})
    del codec_cfg["downsample_scale"]
    with pytest.raises(ConfigError, match=r"semantic_codec\.downsample_scale"):
        EnhancedCodecConfig.from_yaml({**config, "semantic_codec": codec_cfg})


@pytest.mark.model_versions("2.5")
@pytest.mark.parametrize("edit", EDITS)
def test_codec25_checkpoint_edit_raises_mismatch(converted: Path, tmp_path: Path, edit: str) -> None:
    """A codec.safetensors with one tensor removed, renamed or reshaped raises CheckpointMismatch naming it."""
    key = "up.bias"
    edit_checkpoint(converted / "codec.safetensors", tmp_path / "codec.safetensors", edit, key)
    with pytest.raises(CheckpointMismatch) as ei:
        load_codec25(tmp_path, _config(converted), "cpu")
    assert_names_edit(ei.value, edit, key)


# ---------------------------------------------------------------------------------------------
# Strict loading: one tensor removed, renamed or reshaped names itself in CheckpointMismatch

_LOADERS: dict[str, tuple[str, str, Callable[[Path], object]]] = {
    "w2v_bert": ("w2v_bert.safetensors", "encoder.layers.3.self_attn.linear_q.bias",
                 lambda d: load_w2v_bert(d, "cpu")),
    "semantic_codec": ("semantic_codec.safetensors", "encoder.0.convnext.0.pwconv1.bias",
                       lambda d: load_semantic_codec(d, "cpu")),
    "campplus": ("campplus.safetensors", "xvector.block2.tdnnd1.cam_layer.linear2.bias",
                 lambda d: load_campplus(d, "cpu")),
}


@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("component", sorted(_LOADERS))
def test_checkpoint_edit_raises_mismatch(converted: Path, tmp_path: Path, component: str, edit: str) -> None:
    """A checkpoint with one tensor removed, renamed or reshaped raises CheckpointMismatch naming it."""
    fname, key, load = _LOADERS[component]
    for name in ("config.yaml", "w2v_bert.json", "w2v_stats.safetensors"):
        shutil.copyfile(converted / name, tmp_path / name)
    edit_checkpoint(converted / fname, tmp_path / fname, edit, key)
    with pytest.raises(CheckpointMismatch) as ei:
        load(tmp_path)
    assert_names_edit(ei.value, edit, key)
