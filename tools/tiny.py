"""`ttsd make-tiny`: seeded random IndexTTS-2 (or IndexTTS-2.5) checkpoints in the official source layout.

Writes what the IndexTTS-2 release plus its auxiliary models look like on disk (the input of
`ttsd-convert`), with random weights: config.yaml, gpt.pth, s2mel.pth {"net": {cfm,
length_regulator, gpt_layer}}, bpe.model, wav2vec2bert_stats.pt, feat1.pt, feat2.pt and
hf_cache/{w2v-bert-2.0/, semantic_codec_model.safetensors, campplus_cn_common.bin, bigvgan/}.
Every state dict comes from the project's own module classes, so its keys, shapes and
containers are exactly those the loaders expect; the tiny preset reproduces the key sets and
shapes of the shared fixture `indextts2-tiny-s1` file for file.

With `model="indextts-2.5"` it writes the IndexTTS-2.5 layout instead (`indextts25-tiny-s1`'s
files, keys and shapes for the tiny preset): config.yaml with version 2.5 and the codec keys, a
campplus-mode gpt.pth (spk_emb_proj, lang_embedding, no speaker conformer/perceiver), codec.pth
{"model": EnhancedCodec}, s2mel.pth without gpt_layer, and a byte-level BPE vocabulary in
upstream's tiktoken file (256 bytes + TIKTOKEN_MERGES learnt merges, then the special tokens) in
place of bpe.model and MaskGCT's codec. Both presets use that small vocabulary.

Two presets: `tiny` (the fixture's dims, about 20 MB) and `full` (the real IndexTTS-2 sizes,
about 6 GB on disk; for benchmarks). The release configurations (config.yaml, w2v-bert-2.0 and
BigVGAN config.json) are package data in tools/data/; presets replace their dims only. The tensor
values and bpe.model come from `tiny_random`: every file draws from its own generator seeded by
(seed, file).

`write_converted` writes the same model straight into the converted layout `ttsd-convert` would
make of it (a test proves the bytes equal), without the official files in between; this is how
`random_pipeline` (`ttsd serve --random-weights`, the benchmarks) builds a model: written to a
temporary directory, then loaded by `Pipeline.load` like any checkpoint. This package is a tool
for tests and demos: nothing in ttsd.pipeline or ttsd.daemon's request path imports it. It needs
the `convert` extra (sentencepiece, protobuf, tqdm).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from ttsd.pipeline.bigvgan import BigVGAN, BigVGANConfig
from ttsd.pipeline.campplus import CAMPPlus, CAMPPlusConfig
from ttsd.pipeline.codec25 import EnhancedCodec, EnhancedCodecConfig
from ttsd.pipeline.family import ModelFamily, families, family_for, family_named
from ttsd.pipeline.flow import CFM, CFMConfig
from ttsd.pipeline.gpt import GPTConfig, UnifiedVoice
from ttsd.pipeline.length_regulator import (
    GptLayerConfig,
    InterpolateRegulator,
    LengthRegulatorConfig,
    build_gpt_layer,
)
from ttsd.pipeline.semantic_codec import SemanticCodec, SemanticCodecConfig
from ttsd.pipeline.text.tiktoken_tokenizer import LANGUAGES, special_tokens
from ttsd.pipeline.w2v_bert import Encoder, W2VBert, W2VBertConfig

from .tiny_random import file_generator, initialised, package_data, train_bpe, train_tiktoken

if TYPE_CHECKING:
    from ttsd.pipeline.pipeline import Pipeline

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# The real configuration files (structure and values of the release; presets change dims only)

# The release config.yaml (the values of shared/spec/indextts2-config.yaml, key order kept).
CONFIG_YAML = package_data("indextts2-config.yaml")
# facebook/w2v-bert-2.0 config.json (transformers 4.52.1 serialisation); presets replace the dims.
W2V_CONFIG: dict[str, Any] = json.loads(package_data("w2v-bert-2.0-config.json"))
W2V_PREPROCESSOR_CONFIG: dict[str, Any] = json.loads(package_data("w2v-bert-2.0-preprocessor_config.json"))
# nvidia/bigvgan_v2_22khz_80band_256x config.json; presets replace upsample_initial_channel.
BIGVGAN_CONFIG: dict[str, Any] = json.loads(package_data("bigvgan_v2_22khz_80band_256x-config.json"))

# Dims the official code hard-codes (so they are not in config.yaml) and that are equal in both presets.
PERCEIVER_DIM_HEAD = 64  # PerceiverResampler dim_head default
PERCEIVER_DEPTH = 2  # PerceiverResampler depth default
CONDITION_NUM_LATENT = 32  # UnifiedVoice condition_num_latent
GPT_LAYER_HIDDEN = (256, 128)  # MyModel.gpt_layer: Linear(G→256), Linear(256→128), Linear(128→W)
DIT_BLOCK_SIZE = 16384  # DiT transformer block_size (input_pos, RoPE table)
DIT_FREQUENCY_EMBEDDING = 256  # TimestepEmbedder frequency_embedding_size
CAMPPLUS_M_CHANNELS = 32  # FCM m_channels
CAMPPLUS_HEAD_BLOCKS = (2, 2)  # FCM num_blocks
CAMPPLUS_BLOCK_LAYERS = (12, 24, 16)  # CAMDenseTDNNBlock layers
CAMPPLUS_EMBEDDING = 192  # CAMPPlus(embedding_size=192) in infer_v2
CAM_REDUCTION = 2  # CAMLayer reduction

DEFAULT_MODEL = "indextts-2"  # the default model, named as `ttsd fetch --model` names it
MODELS = tuple(f.model_id for f in families())
TIKTOKEN_MERGES = 283  # learnt pieces of the 2.5 vocabulary: 539 ranks, as indextts25-tiny-s1's
TIKTOKEN_FILE = "multilingual_zh_ja_yue_char_del.tiktoken"  # upstream's file name (get_tokenizer reads it)


@dataclass(frozen=True, kw_only=True, slots=True)
class Preset:
    name: str
    config: Mapping[str, Any]  # dotted config.yaml key → value replacing the release's
    w2v: Mapping[str, int]  # w2v-BERT config.json dims (hard-coded 1024 in the GPT and s2mel)
    bigvgan_channels: int  # bigvgan config.json upsample_initial_channel
    campplus: tuple[int, int, int]  # growth_rate, bn_size, init_channels (CAMPPlus defaults 32, 4, 128)


PRESETS: dict[str, Preset] = {
    # The dims of shared/fixtures/indextts2-tiny-s1 (its config.yaml and oracle_tiny_overrides).
    "tiny": Preset(
        name="tiny",
        config={
            "gpt.model_dim": 64, "gpt.heads": 4, "gpt.layers": 2, "gpt.number_text_tokens": 500,
            "gpt.condition_module": {"output_size": 48, "linear_units": 96, "attention_heads": 2, "num_blocks": 2,
                                     "input_layer": "conv2d2", "perceiver_mult": 2},
            "gpt.emo_condition_module": {"output_size": 40, "linear_units": 80, "attention_heads": 2,
                                         "num_blocks": 1, "input_layer": "conv2d2", "perceiver_mult": 2},
            "semantic_codec.hidden_size": 32, "semantic_codec.vocos_dim": 32,
            "semantic_codec.vocos_intermediate_dim": 64, "semantic_codec.vocos_num_layers": 2,
            "s2mel.length_regulator.channels": 64, "s2mel.length_regulator.in_channels": 32,
            "s2mel.DiT.hidden_dim": 64, "s2mel.DiT.num_heads": 4, "s2mel.DiT.depth": 3, "s2mel.DiT.content_dim": 64,
            "s2mel.wavenet.hidden_dim": 64, "s2mel.wavenet.num_layers": 2,
        },
        w2v={"hidden_size": 32, "num_hidden_layers": 18, "num_attention_heads": 2, "intermediate_size": 64,
             "output_hidden_size": 32},
        bigvgan_channels=128,
        campplus=(8, 2, 32),
    ),
    "full": Preset(
        name="full",
        config={},
        w2v={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
             "output_hidden_size": 1024},
        bigvgan_channels=1536,
        campplus=(32, 4, 128),
    ),
}  # fmt: skip


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def check_model(model: str) -> ModelFamily:
    return family_named(model)


def _tiktoken_config(config: dict[str, Any]) -> None:
    del config["dataset"]["bpe_model"]
    config["gpt"]["number_text_tokens"] = 256 + TIKTOKEN_MERGES + len(special_tokens())


def _codec25_config(config: dict[str, Any]) -> None:
    config["semantic_codec"].update(downsample_scale=2, num_quantizers=1)


def _unchanged(config: dict[str, Any]) -> None:
    pass


# The release config's changes for a family's vocabulary and codec, by their official file names
# (ModelFamily.official_tokenizer / official_codec): the release config is IndexTTS-2's.
VOCABULARY_CONFIG: dict[str, Callable[[dict[str, Any]], None]] = {
    "bpe.model": _unchanged,
    TIKTOKEN_FILE: _tiktoken_config,
}
CODEC_CONFIG: dict[str, Callable[[dict[str, Any]], None]] = {
    "hf_cache/semantic_codec_model.safetensors": _unchanged,
    "codec.pth": _codec25_config,
}


def preset_config(p: Preset, model: str = DEFAULT_MODEL) -> dict[str, Any]:
    """The config.yaml document of a preset: the release config with the preset's dims, then the
    model's (IndexTTS-2.5: version 2.5, no bpe_model, the vocabulary's size, and the codec's
    downsampling and quantizers)."""
    config: dict[str, Any] = yaml.safe_load(CONFIG_YAML)
    for dotted, value in p.config.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise KeyError(f"preset {p.name}: {dotted} is not a key of the release config")
        node[leaf] = copy.deepcopy(value)
    family = check_model(model)
    if family_for(config) is not family:  # the release config's own version names another model
        config["version"] = family.version
    VOCABULARY_CONFIG[family.official_tokenizer](config)
    CODEC_CONFIG[family.official_codec](config)
    return config


def w2v_config(p: Preset) -> dict[str, Any]:
    return {**W2V_CONFIG, **p.w2v}


def bigvgan_config(p: Preset) -> dict[str, Any]:
    return {**BIGVGAN_CONFIG, "upsample_initial_channel": p.bigvgan_channels}


# ------------------------------------------------------------------------------------------------
# Components: make_* builds the uninitialised module (works under `torch.device("meta")`),
# build_* fills it from the file's generator.


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def _gpt_shapes(config: Mapping[str, Any], w2v_dim: int) -> dict[str, tuple[int, ...]]:
    """The checkpoint shapes GPTConfig.from_yaml reads for dims the official code hard-codes."""
    g = config["gpt"]
    d = int(g["model_dim"])
    if config.get("version") == 2.5:  # campplus mode: the emotion perceiver sets the perceiver dims
        emo_heads = int(g["emo_condition_module"]["attention_heads"])
        return {
            "emovec_layer.weight": (d, w2v_dim),
            "spk_emb_proj.weight": (d, CAMPPLUS_EMBEDDING),
            "lang_embedding.weight": (len(LANGUAGES) + 1, d),  # upstream sizes it one past the last code
            **{f"emo_perceiver_encoder.layers.{i}.0.to_q.weight": (emo_heads * PERCEIVER_DIM_HEAD, d)
               for i in range(PERCEIVER_DEPTH)},
        }
    heads = int(g["condition_module"]["attention_heads"])
    shapes: dict[str, tuple[int, ...]] = {
        "emovec_layer.weight": (d, w2v_dim),
        "perceiver_encoder.latents": (CONDITION_NUM_LATENT, d),
    }
    for i in range(PERCEIVER_DEPTH):
        shapes[f"perceiver_encoder.layers.{i}.0.to_q.weight"] = (heads * PERCEIVER_DIM_HEAD, d)
    return shapes


def _s2mel_shapes(config: Mapping[str, Any], w2v_dim: int) -> dict[str, tuple[int, ...]]:
    """The s2mel shapes DiTConfig / GptLayerConfig read for dims the official code hard-codes."""
    d = int(config["s2mel"]["DiT"]["hidden_dim"])
    ffn = find_multiple(int(2 * 4 * d / 3), 256)  # gpt-fast ModelArgs.intermediate_size
    widths = (int(config["gpt"]["model_dim"]), *GPT_LAYER_HIDDEN, w2v_dim)
    return {
        "cfm.estimator.transformer.layers.0.feed_forward.w1.weight": (ffn, d),
        "cfm.estimator.t_embedder.mlp.0.weight": (d, DIT_FREQUENCY_EMBEDDING),
        "cfm.estimator.input_pos": (DIT_BLOCK_SIZE,),
        **{f"gpt_layer.{i}.weight": (b, a) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))},
    }


def make_gpt(p: Preset, model: str = DEFAULT_MODEL) -> UnifiedVoice:
    config = preset_config(p, model)
    return check_model(model).gpt_class(GPTConfig.from_yaml(config, _gpt_shapes(config, p.w2v["hidden_size"])))


def make_s2mel(p: Preset, model: str = DEFAULT_MODEL) -> dict[str, nn.Module]:
    """s2mel.pth's `net` parts in file order: cfm, length_regulator and (IndexTTS-2 only) gpt_layer."""
    config = preset_config(p, model)
    shapes = _s2mel_shapes(config, p.w2v["hidden_size"])
    parts: dict[str, nn.Module] = {
        "cfm": CFM(CFMConfig.from_yaml(config, shapes)),
        "length_regulator": InterpolateRegulator(LengthRegulatorConfig.from_yaml(config)),
    }
    if "gpt_layer" in check_model(model).s2mel_parts:  # infer_v2_5 builds MyModel without gpt_layer
        parts["gpt_layer"] = build_gpt_layer(GptLayerConfig.from_shapes(shapes))
    return parts


def make_w2v(p: Preset, *, all_layers: bool = True) -> W2VBert:
    """w2v-BERT with every layer of the file (all_layers) or only the ones inference runs."""
    cfg = W2VBertConfig.from_json(w2v_config(p))
    model = W2VBert(cfg)
    if all_layers:
        model.encoder = Encoder(cfg, cfg.num_hidden_layers)
    return model


def make_codec(p: Preset) -> SemanticCodec:
    return SemanticCodec(SemanticCodecConfig.from_yaml(preset_config(p)))


def make_codec25(p: Preset) -> EnhancedCodec:
    config = preset_config(p)
    _codec25_config(config)
    return EnhancedCodec(EnhancedCodecConfig.from_yaml(config))


def campplus_config(p: Preset) -> CAMPPlusConfig:
    growth, bn_size, init = p.campplus
    return CAMPPlusConfig(
        m_channels=CAMPPLUS_M_CHANNELS,
        head_blocks=CAMPPLUS_HEAD_BLOCKS,
        init_channels=init,
        growth_rate=growth,
        bn_channels=bn_size * growth,
        cam_channels=bn_size * growth // CAM_REDUCTION,
        block_layers=CAMPPLUS_BLOCK_LAYERS,
        embedding_size=CAMPPLUS_EMBEDDING,
    )


def make_campplus(p: Preset) -> CAMPPlus:
    return CAMPPlus(campplus_config(p))


def make_bigvgan(p: Preset) -> BigVGAN:
    return BigVGAN(BigVGANConfig.from_json(bigvgan_config(p)))


def build_gpt(p: Preset, seed: int, model: str = DEFAULT_MODEL) -> UnifiedVoice:
    return initialised(make_gpt(p, model), file_generator(seed, "gpt.pth"))


def build_s2mel(p: Preset, seed: int, model: str = DEFAULT_MODEL) -> dict[str, nn.Module]:
    gen = file_generator(seed, "s2mel.pth")  # one stream for the file, in its key order
    return {name: initialised(m, gen) for name, m in make_s2mel(p, model).items()}


def build_w2v(p: Preset, seed: int, *, all_layers: bool = True) -> W2VBert:
    """The layers are drawn in order, so the truncated model equals a prefix of the full one."""
    return initialised(make_w2v(p, all_layers=all_layers), file_generator(seed, "w2v-bert-2.0/model.safetensors"))


def build_w2v_stats(p: Preset, seed: int) -> dict[str, Tensor]:
    """Layer-17 mean ~ N(0, 0.1²) and variance in [0.5, 2.0] (strictly positive: it is square-rooted)."""
    gen = file_generator(seed, "wav2vec2bert_stats.pt")
    d = p.w2v["hidden_size"]
    return {"mean": torch.randn(d, generator=gen) * 0.1, "var": torch.rand(d, generator=gen) * 1.5 + 0.5}


def build_codec(p: Preset, seed: int) -> SemanticCodec:
    codec = make_codec(p)
    layer_scale = 1.0 / int(preset_config(p)["semantic_codec"]["vocos_num_layers"])
    return initialised(codec, file_generator(seed, "semantic_codec_model.safetensors"), layer_scale=layer_scale)


def build_codec25(p: Preset, seed: int) -> EnhancedCodec:
    codec = make_codec25(p)
    layer_scale = 1.0 / int(preset_config(p)["semantic_codec"]["vocos_num_layers"])  # the 2.5 codec's depth too
    return initialised(codec, file_generator(seed, "codec.pth"), layer_scale=layer_scale)


def build_campplus(p: Preset, seed: int) -> CAMPPlus:
    return initialised(make_campplus(p), file_generator(seed, "campplus_cn_common.bin"))


def build_bigvgan(p: Preset, seed: int) -> BigVGAN:
    return initialised(make_bigvgan(p), file_generator(seed, "bigvgan_generator.pt"))


def build_emotion(p: Preset, seed: int) -> tuple[Tensor, Tensor]:
    """feat1 (R, 192) speaker-style rows ~ N(0, 1) and feat2 (R, D) emotion rows ~ N(0, 0.5²)."""
    config = preset_config(p)
    rows = sum(int(n) for n in config["emo_num"])
    gen = file_generator(seed, "feat.pt")
    spk = torch.randn(rows, CAMPPLUS_EMBEDDING, generator=gen)
    emo = torch.randn(rows, int(config["gpt"]["model_dim"]), generator=gen) * 0.5
    return spk, emo


# ------------------------------------------------------------------------------------------------
# Writing the official layout


def _state(module: nn.Module) -> OrderedDict[str, Tensor]:
    return OrderedDict((k, v.detach().contiguous()) for k, v in module.state_dict().items())


def _torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def _safetensors(state: Mapping[str, Tensor], path: Path, metadata: dict[str, str] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(state), str(path), metadata=metadata)


def _json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def plan(p: Preset, seed: int, model: str = DEFAULT_MODEL) -> dict[str, Callable[[Path], None]]:
    """Relative path in the official layout → writer. Each writer builds only its own component."""
    config = preset_config(p, model)
    family = check_model(model)

    def write_config(path: Path) -> None:
        path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")

    def write_s2mel(path: Path) -> None:
        # Upstream's checkpoint: a plain dict with the training script's `net` dict of state dicts.
        _torch_save({"net": {name: _state(m) for name, m in build_s2mel(p, seed, model).items()}}, path)

    def write_emotion(which: int) -> Callable[[Path], None]:
        return lambda path: _torch_save(build_emotion(p, seed)[which].contiguous(), path)

    def write_bpe(path: Path) -> None:
        path.write_bytes(train_bpe(int(config["gpt"]["number_text_tokens"])))

    def write_tiktoken(path: Path) -> None:
        path.write_bytes(train_tiktoken(TIKTOKEN_MERGES))

    # By the official file names a family's release has (ModelFamily.official_tokenizer / official_codec).
    vocabularies: dict[str, Callable[[Path], None]] = {"bpe.model": write_bpe, TIKTOKEN_FILE: write_tiktoken}
    codecs: dict[str, Callable[[Path], None]] = {
        # MaskGCT's file was written by accelerate's save_model: no metadata.
        "hf_cache/semantic_codec_model.safetensors": lambda path: _safetensors(
            _state(build_codec(p, seed)), path, None
        ),
        # EnhancedCodec.load_checkpoint reads checkpoint["model"].
        "codec.pth": lambda path: _torch_save({"model": _state(build_codec25(p, seed))}, path),
    }
    steps = {
        "config.yaml": write_config,
        family.official_tokenizer: vocabularies[family.official_tokenizer],
        "gpt.pth": lambda path: _torch_save(_state(build_gpt(p, seed, model)), path),
        "s2mel.pth": write_s2mel,
        "wav2vec2bert_stats.pt": lambda path: _torch_save(build_w2v_stats(p, seed), path),
        "feat1.pt": write_emotion(0),
        "feat2.pt": write_emotion(1),
        "hf_cache/w2v-bert-2.0/config.json": lambda path: _json(w2v_config(p), path),
        "hf_cache/w2v-bert-2.0/preprocessor_config.json": lambda path: _json(W2V_PREPROCESSOR_CONFIG, path),
        "hf_cache/w2v-bert-2.0/model.safetensors": lambda path: _safetensors(
            _state(build_w2v(p, seed)), path, {"format": "pt"}
        ),
        family.official_codec: codecs[family.official_codec],
        "hf_cache/campplus_cn_common.bin": lambda path: _torch_save(_state(build_campplus(p, seed)), path),
        "hf_cache/bigvgan/config.json": lambda path: _json(bigvgan_config(p), path),
        "hf_cache/bigvgan/bigvgan_generator.pt": lambda path: _torch_save(
            {"generator": _state(build_bigvgan(p, seed))}, path
        ),
    }
    return steps


def write_official(out_dir: Path | str, preset: str = "tiny", seed: int = 0, *, model: str = DEFAULT_MODEL,
                   progress: bool = False) -> Path:
    """Write a complete official-format IndexTTS-2 (or 2.5) source directory with seeded random weights.

    The result is what `ttsd-convert` takes; returns `out_dir`. Same (preset, seed) → same bytes
    for every tensor file."""
    p = get_preset(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(p, seed, model)
    bar = tqdm(steps.items(), desc=f"make-tiny {p.name}", unit="file", disable=not progress, file=sys.stderr)
    for rel, write in bar:
        bar.set_postfix_str(rel)
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        write(tmp)
        tmp.replace(dst)  # a crash never leaves a half-written file under its real name
    log.info("make-tiny done model=%s preset=%s seed=%d out=%s files=%d", model, p.name, seed, out, len(steps))
    return out


# ------------------------------------------------------------------------------------------------
# The converted layout directly (what ttsd-convert makes of write_official's output)


def converted_plan(p: Preset, seed: int, model: str = DEFAULT_MODEL) -> dict[str, Callable[[Path], None]]:
    """Converted file name → writer, in convert.plan's order. Each state dict is written with the
    keys and safetensors metadata conversion gives it: nesting as dotted prefixes, `format: pt`
    except for the two files conversion copies as they are (MaskGCT's has no metadata)."""
    official = plan(p, seed, model)
    family = check_model(model)
    pt = {"format": "pt"}

    def write_tokenizer(path: Path) -> None:
        from ttsd.pipeline.text.tokenizer import sentencepiece_to_json

        with tempfile.TemporaryDirectory() as tmp:
            bpe = Path(tmp) / "bpe.model"
            official["bpe.model"](bpe)
            path.write_text(sentencepiece_to_json(bpe), encoding="utf-8")

    def write_s2mel(path: Path) -> None:
        parts = build_s2mel(p, seed, model)
        _safetensors({f"{name}.{k}": v for name, m in parts.items() for k, v in _state(m).items()}, path, pt)

    def write_emotion(path: Path) -> None:
        spk, emo = build_emotion(p, seed)
        _safetensors({"spk_matrix": spk.contiguous(), "emo_matrix": emo.contiguous()}, path, pt)

    # By converted file name (ModelFamily.tokenizer_file / codec_file), as convert's plans write them.
    vocabularies: dict[str, Callable[[Path], None]] = {
        "tokenizer.json": write_tokenizer,
        "tokenizer.tiktoken": lambda path: official[TIKTOKEN_FILE](path),
    }
    codecs: dict[str, Callable[[Path], None]] = {
        "semantic_codec.safetensors": lambda path: official["hf_cache/semantic_codec_model.safetensors"](path),
        "codec.safetensors": lambda path: _safetensors(_state(build_codec25(p, seed)), path, pt),
    }
    steps = {
        "config.yaml": official["config.yaml"],
        family.tokenizer_file: vocabularies[family.tokenizer_file],
        "gpt.safetensors": lambda path: _safetensors(_state(build_gpt(p, seed, model)), path, pt),
        "s2mel.safetensors": write_s2mel,
        "w2v_bert.json": official["hf_cache/w2v-bert-2.0/config.json"],
        "w2v_bert.safetensors": official["hf_cache/w2v-bert-2.0/model.safetensors"],
        "w2v_stats.safetensors": lambda path: _safetensors(build_w2v_stats(p, seed), path, pt),
        family.codec_file: codecs[family.codec_file],
        "campplus.safetensors": lambda path: _safetensors(_state(build_campplus(p, seed)), path, pt),
        "bigvgan.json": official["hf_cache/bigvgan/config.json"],
        "bigvgan.safetensors": lambda path: _safetensors(_state(build_bigvgan(p, seed)), path, pt),
        "emotion.safetensors": write_emotion,
    }
    return steps


def write_converted(out_dir: Path | str, preset: str = "tiny", seed: int = 0, *, model: str = DEFAULT_MODEL,
                    force: bool = False, progress: bool = False) -> Path:
    """Write the converted checkpoint directory of `write_official(preset, seed)` without the official
    files, with a manifest, under ttsd-convert's rules (a temporary directory renamed on success; a
    non-empty `out_dir` only with `force`). Returns the manifest path."""
    from ttsd.pipeline.convert import staged, write_manifest

    p = get_preset(preset)
    out = Path(out_dir)
    steps = converted_plan(p, seed, model)
    with staged(out, force=force) as tmp:
        bar = tqdm(steps.items(), desc=f"random {p.name}", unit="file", disable=not progress, file=sys.stderr)
        for name, write in bar:
            bar.set_postfix_str(name)
            write(tmp / name)
        write_manifest(tmp, steps, source=f"ttsd make-tiny model={model} preset={p.name} seed={seed}")
    log.info("random checkpoint written preset=%s seed=%d out=%s files=%d", p.name, seed, out, len(steps))
    return out / "manifest.json"


def random_pipeline(
    preset: str = "tiny",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    *,
    model: str = DEFAULT_MODEL,
    **load: Any,
) -> Pipeline:
    """A Pipeline over the weights of `write_official(preset, seed)`: written as a converted checkpoint
    into a temporary directory (about 6 GB for `full`: mind $TMPDIR), loaded by `Pipeline.load` (with
    the keyword arguments `load`) exactly as a real checkpoint is, then deleted (the weights are in
    memory by then)."""
    from ttsd.pipeline.pipeline import Pipeline

    with tempfile.TemporaryDirectory(prefix=f"ttsd-random-{preset}-") as tmp:
        ckpt = write_converted(Path(tmp) / "ckpt", preset, seed, model=model, progress=preset == "full").parent
        return Pipeline.load(ckpt, device, dtype, **load)


def synthetic_voice(seconds: float, seed: int = 0) -> bytes:
    """A voiced test signal (glottal-like pulse train through two formant resonances + breath noise) as WAV."""
    import io

    import numpy as np
    import soundfile as sf

    from ttsd.pipeline.audio import SAMPLE_RATE_HZ

    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE_HZ)
    t = np.arange(n) / SAMPLE_RATE_HZ
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)  # slow intonation
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE_HZ
    src = sum(np.sin(k * phase) / k for k in range(1, 30))
    voiced = src * (0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t) ** 2)  # syllable-rate envelope
    sig = 0.1 * voiced + 0.01 * rng.standard_normal(n)
    buf = io.BytesIO()
    sf.write(buf, (sig / np.abs(sig).max() * 0.5).astype(np.float32), SAMPLE_RATE_HZ, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ttsd make-tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output directory (official layout of the model)")
    ap.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL,
                    help="model version to write (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (default %(default)s)")
    ap.add_argument("--convert", type=Path, metavar="DST", help="also run ttsd-convert into DST")
    ap.add_argument("--voice", type=Path, metavar="WAV", help="also write a synthetic 6 s reference voice here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ttsd.api.errors import TtsdError

    try:
        write_official(args.out, args.preset, args.seed, model=args.model, progress=True)
        if args.convert is not None:
            from ttsd.pipeline.convert import convert

            convert(args.out, args.convert)
        if args.voice is not None:
            args.voice.parent.mkdir(parents=True, exist_ok=True)
            args.voice.write_bytes(synthetic_voice(6.0, args.seed))
    except (TtsdError, OSError) as e:
        print(f"ttsd make-tiny: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
