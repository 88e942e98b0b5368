"""w2v-BERT, semantic codec and CAMPPlus against golden stages 03, 04, 06 and 12 (vq2emb)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from ttsd.pipeline.campplus import CAMPPlus, load_campplus
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


def test_campplus_style(fx: FixtureSet, variant: str, campplus: CAMPPlus) -> None:
    """CAMPPlus on the golden centred fbank gives upstream's 192-d style vector."""
    c = fx.golden(variant, "06_campplus")
    assert_close(campplus(c["fbank_centered"]), c["style"], "style")


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
