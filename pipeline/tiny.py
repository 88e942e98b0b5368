"""`ttsd make-tiny`: seeded random IndexTTS-2 checkpoints in the official source layout.

Writes what the IndexTTS-2 release plus its auxiliary models look like on disk (the input of
`ttsd-convert`), with random weights: config.yaml, gpt.pth, s2mel.pth {"net": {cfm,
length_regulator, gpt_layer}}, bpe.model, wav2vec2bert_stats.pt, feat1.pt, feat2.pt and
hf_cache/{w2v-bert-2.0/, semantic_codec_model.safetensors, campplus_cn_common.bin, bigvgan/}.
Every state dict comes from the project's own module classes, so its keys, shapes and
containers are exactly those the loaders expect; the tiny preset reproduces the key sets and
shapes of the shared fixture `indextts2-tiny-s1` file for file.

Two presets: `tiny` (the fixture's dims, about 20 MB) and `full` (the real IndexTTS-2 sizes,
about 6 GB on disk; mainly for `random_pipeline`, which builds it in memory for benchmarks).
Weights are N(0, 1/fan_in) (weight-normed layers: v of that scale, g = ‖v‖ so the effective
weight is v), norm weights 1 + N(0, 0.05²), biases N(0, 0.02²), BatchNorm running variances in
[0.5, 1.5]; persistent buffers (conformer `pe`, BigVGAN filters, DiT `freqs`/`input_pos`) hold
the values the modules compute. Each file draws from its own generator seeded by (seed, file).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import math
import sys
import tempfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from .bigvgan import AA_KERNEL, AA_RATIO, BigVGAN, BigVGANConfig, LowPassFilter1d, Snake, UpSample1d
from .campplus import CAMPPlus, CAMPPlusConfig
from .conformer import RelPositionalEncoding
from .dit import DiT, TimestepEmbedder
from .flow import CFM, CFMConfig
from .gpt import Conv1D, GPTConfig, UnifiedVoice
from .layers import WeightNorm, WNConvTranspose1d
from .length_regulator import GptLayerConfig, InterpolateRegulator, LengthRegulatorConfig, build_gpt_layer
from .semantic_codec import ConvNeXtBlock, SemanticCodec, SemanticCodecConfig
from .w2v_bert import Encoder, W2VBert, W2VBertConfig

if TYPE_CHECKING:
    from .pipeline import Pipeline

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# The real configuration files (structure and values of the release; presets change dims only)

# The release config.yaml (shared/spec/indextts2-config.yaml), key order kept.
CONFIG_YAML = """\
dataset:
  bpe_model: bpe.model
  sample_rate: 24000
  squeeze: false
  mel: {sample_rate: 24000, n_fft: 1024, hop_length: 256, win_length: 1024, n_mels: 100, mel_fmin: 0,
        normalize: false}
gpt:
  model_dim: 1280
  max_mel_tokens: 1815
  max_text_tokens: 600
  heads: 20
  use_mel_codes_as_input: true
  mel_length_compression: 1024
  layers: 24
  number_text_tokens: 12000
  number_mel_codes: 8194
  start_mel_token: 8192
  stop_mel_token: 8193
  start_text_token: 0
  stop_text_token: 1
  train_solo_embeddings: false
  condition_type: conformer_perceiver
  condition_module: {output_size: 512, linear_units: 2048, attention_heads: 8, num_blocks: 6,
                     input_layer: conv2d2, perceiver_mult: 2}
  emo_condition_module: {output_size: 512, linear_units: 1024, attention_heads: 4, num_blocks: 4,
                         input_layer: conv2d2, perceiver_mult: 2}
semantic_codec:
  codebook_size: 8192
  hidden_size: 1024
  codebook_dim: 8
  vocos_dim: 384
  vocos_intermediate_dim: 2048
  vocos_num_layers: 12
s2mel:
  preprocess_params:
    sr: 22050
    spect_params: {n_fft: 1024, win_length: 1024, hop_length: 256, n_mels: 80, fmin: 0, fmax: "None"}
  dit_type: DiT
  reg_loss_type: l1
  style_encoder: {dim: 192}
  length_regulator:
    channels: 512
    is_discrete: false
    in_channels: 1024
    content_codebook_size: 2048
    sampling_ratios: [1, 1, 1, 1]
    vector_quantize: false
    n_codebooks: 1
    quantizer_dropout: 0.0
    f0_condition: false
    n_f0_bins: 512
  DiT:
    hidden_dim: 512
    num_heads: 8
    depth: 13
    class_dropout_prob: 0.1
    block_size: 8192
    in_channels: 80
    style_condition: true
    final_layer_type: wavenet
    target: mel
    content_dim: 512
    content_codebook_size: 1024
    content_type: discrete
    f0_condition: false
    n_f0_bins: 512
    content_codebooks: 1
    is_causal: false
    long_skip_connection: true
    zero_prompt_speech_token: false
    time_as_token: false
    style_as_token: false
    uvit_skip_connection: true
    add_resblock_in_transformer: false
  wavenet: {hidden_dim: 512, num_layers: 8, kernel_size: 5, dilation_rate: 1, p_dropout: 0.2,
            style_condition: true}
gpt_checkpoint: gpt.pth
w2v_stat: wav2vec2bert_stats.pt
s2mel_checkpoint: s2mel.pth
emo_matrix: feat2.pt
spk_matrix: feat1.pt
emo_num: [3, 17, 2, 8, 4, 5, 10, 24]
qwen_emo_path: qwen0.6bemo4-merge/
vocoder: {type: bigvgan, name: bigvgan}
version: 2.0
"""

# facebook/w2v-bert-2.0 config.json (transformers 4.52.1 serialisation); presets replace the dims.
W2V_CONFIG: dict[str, Any] = {
    "activation_dropout": 0.0, "adapter_act": "relu", "adapter_kernel_size": 3, "adapter_stride": 2,
    "add_adapter": False, "apply_spec_augment": False, "architectures": ["Wav2Vec2BertModel"],
    "attention_dropout": 0.0, "bos_token_id": 1, "classifier_proj_size": 768, "codevector_dim": 768,
    "conformer_conv_dropout": 0.1, "contrastive_logits_temperature": 0.1, "conv_depthwise_kernel_size": 31,
    "ctc_loss_reduction": "sum", "ctc_zero_infinity": False, "diversity_loss_weight": 0.1, "eos_token_id": 2,
    "feat_proj_dropout": 0.0, "feat_quantizer_dropout": 0.0, "feature_projection_input_dim": 160,
    "final_dropout": 0.1, "hidden_act": "swish", "hidden_dropout": 0.0, "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-05, "layerdrop": 0.1,
    "left_max_position_embeddings": 64, "mask_feature_length": 10, "mask_feature_min_masks": 0,
    "mask_feature_prob": 0.0, "mask_time_length": 10, "mask_time_min_masks": 2, "mask_time_prob": 0.05,
    "max_source_positions": 5000, "model_type": "wav2vec2-bert", "num_adapter_layers": 1,
    "num_attention_heads": 16, "num_codevector_groups": 2, "num_codevectors_per_group": 320,
    "num_hidden_layers": 24, "num_negatives": 100, "output_hidden_size": 1024, "pad_token_id": 0,
    "position_embeddings_type": "relative_key", "proj_codevector_dim": 768, "right_max_position_embeddings": 8,
    "rotary_embedding_base": 10000, "tdnn_dilation": [1, 2, 3, 1, 1], "tdnn_dim": [512, 512, 512, 512, 1500],
    "tdnn_kernel": [5, 3, 3, 1, 1], "torch_dtype": "float32", "transformers_version": "4.52.1",
    "use_intermediate_ffn_before_adapter": False, "use_weighted_layer_sum": False, "vocab_size": None,
    "xvector_output_dim": 512,
}  # fmt: skip

W2V_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "feature_extractor_type": "SeamlessM4TFeatureExtractor", "feature_size": 80, "num_mel_bins": 80,
    "padding_side": "right", "padding_value": 1, "processor_class": "Wav2Vec2BertProcessor",
    "return_attention_mask": True, "sampling_rate": 16000, "stride": 2,
}  # fmt: skip

# nvidia/bigvgan_v2_22khz_80band_256x config.json; presets replace upsample_initial_channel.
BIGVGAN_CONFIG: dict[str, Any] = {
    "resblock": "1", "num_gpus": 0, "batch_size": 32, "learning_rate": 0.0001, "adam_b1": 0.8, "adam_b2": 0.99,
    "lr_decay": 0.9999996, "seed": 1234, "upsample_rates": [4, 4, 2, 2, 2, 2],
    "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4], "upsample_initial_channel": 1536,
    "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "use_tanh_at_final": False, "use_bias_at_final": False, "activation": "snakebeta", "snake_logscale": True,
    "use_cqtd_instead_of_mrd": True, "cqtd_filters": 128, "cqtd_max_filters": 1024, "cqtd_filters_scale": 1,
    "cqtd_dilations": [1, 2, 4], "cqtd_hop_lengths": [512, 256, 256], "cqtd_n_octaves": [9, 9, 9],
    "cqtd_bins_per_octaves": [24, 36, 48], "mpd_reshapes": [2, 3, 5, 7, 11], "use_spectral_norm": False,
    "discriminator_channel_mult": 1, "use_multiscale_melloss": True, "lambda_melloss": 15,
    "clip_grad_norm": 500, "segment_size": 65536, "num_mels": 80, "num_freq": 1025, "n_fft": 1024,
    "hop_size": 256, "win_size": 1024, "sampling_rate": 22050, "fmin": 0, "fmax": None, "fmax_for_loss": None,
    "normalize_volume": True, "num_workers": 4,
    "dist_config": {"dist_backend": "nccl", "dist_url": "tcp://localhost:54321", "world_size": 1},
}  # fmt: skip

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


def preset_config(p: Preset) -> dict[str, Any]:
    """The config.yaml document of a preset: the release config with the preset's dims."""
    config: dict[str, Any] = yaml.safe_load(CONFIG_YAML)
    for dotted, value in p.config.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise KeyError(f"preset {p.name}: {dotted} is not a key of the release config")
        node[leaf] = copy.deepcopy(value)
    return config


def w2v_config(p: Preset) -> dict[str, Any]:
    return {**W2V_CONFIG, **p.w2v}


def bigvgan_config(p: Preset) -> dict[str, Any]:
    return {**BIGVGAN_CONFIG, "upsample_initial_channel": p.bigvgan_channels}


# ------------------------------------------------------------------------------------------------
# Initialisation


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def kaiser_sinc_filter(cutoff: float = 0.25, half_width: float = 0.3, kernel_size: int = AA_KERNEL) -> Tensor:
    """BigVGAN alias_free_activation kaiser_sinc_filter1d → (1, 1, K), the stored `*.filter` buffers."""
    half = kernel_size // 2
    delta_f = 4 * half_width
    a = 2.285 * (half - 1) * math.pi * delta_f + 7.95
    if a > 50.0:
        beta = 0.1102 * (a - 8.7)
    elif a >= 21.0:
        beta = 0.5842 * (a - 21) ** 0.4 + 0.07886 * (a - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False)
    time = torch.arange(-half, half) + 0.5  # even kernel size
    h = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    return (h / h.sum()).view(1, 1, kernel_size)


def relative_positional_table(length: int, d_model: int) -> Tensor:
    """wenet PositionalEncoding `pe` (1, length, C): sin on even channels, cos on odd ones."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.unsqueeze(0)


class _Init:
    """Fills every parameter and persistent buffer of a module from one generator, or raises."""

    BIAS_STD = 0.02
    NORM_STD = 0.05
    EMBEDDING_STD = 0.3
    SMALL_STD = 0.1  # position tables, relative-key distances, unused mask/spec embeddings, u/v biases
    LATENT_STD = 0.5

    def __init__(self, gen: torch.Generator) -> None:
        self.gen = gen
        self.done: set[int] = set()
        self.layer_scale = 1.0

    def normal(self, t: Tensor, std: float, mean: float = 0.0) -> None:
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=self.gen) * std + mean)
        self.done.add(id(t))

    def uniform(self, t: Tensor, low: float, high: float) -> None:
        with torch.no_grad():
            t.copy_(torch.rand(t.shape, generator=self.gen) * (high - low) + low)
        self.done.add(id(t))

    def set(self, t: Tensor, value: Tensor) -> None:
        with torch.no_grad():
            t.copy_(value)
        self.done.add(id(t))

    def keep(self, t: Tensor) -> None:
        """A buffer the module already computed in its constructor."""
        if not torch.isfinite(t.float()).all():
            raise RuntimeError("a module-computed buffer is not finite")
        self.done.add(id(t))

    def fan_in_weight(self, t: Tensor, fan_in: float) -> None:
        self.normal(t, 1.0 / math.sqrt(fan_in))

    def bias(self, t: Tensor | None) -> None:
        if t is not None:
            self.normal(t, self.BIAS_STD)

    def norm_weight(self, t: Tensor | None) -> None:
        if t is not None:
            self.normal(t, self.NORM_STD, mean=1.0)

    def module(self, m: nn.Module, path: str) -> None:
        """Initialise `m`'s own (non-recursive) tensors by its type."""
        if isinstance(m, WeightNorm):
            shape = (m.weight if m.folded else m.weight_v).shape
            fan_in = float(math.prod(shape[1:]))
            if isinstance(m, WNConvTranspose1d):
                fan_in = shape[0] * shape[2] / m.stride  # inputs reaching one output sample
            if m.folded:
                self.fan_in_weight(m.weight, fan_in)
            else:
                self.fan_in_weight(m.weight_v, fan_in)
                # g = ‖v‖ (weight_norm's own init), so the effective weight is v itself.
                dims = tuple(range(1, m.weight_v.dim()))
                self.set(m.weight_g, m.weight_v.detach().norm(dim=dims, keepdim=True))
            self.bias(m.bias)
        elif isinstance(m, Conv1D):  # HF layout [in, out]
            self.fan_in_weight(m.weight, m.weight.shape[0])
            self.bias(m.bias)
        elif isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d):
            self.fan_in_weight(m.weight, m.weight[0].numel())
            self.bias(m.bias)
        elif isinstance(m, nn.Embedding):
            if path.endswith("codebook"):
                std = 1.0
            elif path.endswith("pos_embedding.emb") or path.endswith("distance_embedding"):
                std = self.SMALL_STD
            else:
                std = self.EMBEDDING_STD
            self.normal(m.weight, std)
        elif isinstance(m, nn.LayerNorm | nn.GroupNorm):
            self.norm_weight(m.weight)
            self.bias(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            self.norm_weight(m.weight)
            self.bias(m.bias)
            if m.running_mean is not None and m.running_var is not None:
                self.normal(m.running_mean, self.SMALL_STD)
                self.uniform(m.running_var, 0.5, 1.5)
            if m.num_batches_tracked is not None:
                self.keep(m.num_batches_tracked)
        elif isinstance(m, Snake):
            # Log-scale α, β: exp(0 ± 0.1) ≈ 1; linear scale: 1 ± 0.1.
            mean = 0.0 if m.logscale else 1.0
            for name in ("alpha", "beta"):
                if hasattr(m, name):
                    self.normal(getattr(m, name), self.SMALL_STD, mean=mean)
        elif isinstance(m, UpSample1d | LowPassFilter1d):
            self.set(m.filter, kaiser_sinc_filter(0.5 / AA_RATIO, 0.6 / AA_RATIO, m.filter.shape[-1]))
        elif isinstance(m, RelPositionalEncoding):
            self.set(m.pe, relative_positional_table(m.pe.shape[1], m.pe.shape[2]))
        elif isinstance(m, TimestepEmbedder):
            self.keep(m.freqs)
        elif isinstance(m, DiT):
            self.keep(m.input_pos)
        self._named_leftovers(m)

    def _named_leftovers(self, m: nn.Module) -> None:
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if id(t) in self.done:
                continue
            if name in ("pos_bias_u", "pos_bias_v", "masked_spec_embed", "mask_token"):
                self.normal(t, self.SMALL_STD)
            elif name == "latents":
                self.normal(t, self.LATENT_STD)
            elif name == "gamma" and isinstance(m, ConvNeXtBlock):
                # Vocos layer scale starts at 1 / num_layers; ±10 % makes each block distinct.
                self.normal(t, self.SMALL_STD * self.layer_scale, mean=self.layer_scale)
            elif name in ("weight", "gamma") and "Norm" in type(m).__name__ and t.dim() == 1:
                self.norm_weight(t)  # RMSNorm (DiT `weight`, perceiver `gamma`)

    def run(self, root: nn.Module, *, layer_scale: float = 1.0) -> None:
        self.layer_scale = layer_scale
        for path, m in root.named_modules():
            self.module(m, path)
        persistent = dict(root.state_dict(keep_vars=True))
        left = sorted(k for k, t in persistent.items() if id(t) not in self.done)
        if left:
            raise RuntimeError(f"{type(root).__name__}: no init rule for {left}")
        bad = sorted(k for k, t in persistent.items() if t.is_floating_point() and not torch.isfinite(t).all())
        if bad:
            raise RuntimeError(f"{type(root).__name__}: non-finite values after init in {bad}")


def _generator(seed: int, name: str) -> torch.Generator:
    # One stream per file: regenerating one component never shifts another's values.
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


M = TypeVar("M", bound=nn.Module)


def _initialised(module: M, gen: torch.Generator, *, layer_scale: float = 1.0) -> M:
    _Init(gen).run(module, layer_scale=layer_scale)
    return module.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Components: make_* builds the uninitialised module (works under `torch.device("meta")`),
# build_* fills it from the file's generator.


def _gpt_shapes(config: Mapping[str, Any], w2v_dim: int) -> dict[str, tuple[int, ...]]:
    """The checkpoint shapes GPTConfig.from_yaml reads for dims the official code hard-codes."""
    g = config["gpt"]
    d, heads = int(g["model_dim"]), int(g["condition_module"]["attention_heads"])
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


def make_gpt(p: Preset) -> UnifiedVoice:
    config = preset_config(p)
    return UnifiedVoice(GPTConfig.from_yaml(config, _gpt_shapes(config, p.w2v["hidden_size"])))


def make_s2mel(p: Preset) -> tuple[CFM, InterpolateRegulator, nn.Sequential]:
    config = preset_config(p)
    shapes = _s2mel_shapes(config, p.w2v["hidden_size"])
    return (
        CFM(CFMConfig.from_yaml(config, shapes)),
        InterpolateRegulator(LengthRegulatorConfig.from_yaml(config)),
        build_gpt_layer(GptLayerConfig.from_shapes(shapes)),
    )


def make_w2v(p: Preset, *, all_layers: bool = True) -> W2VBert:
    """w2v-BERT with every layer of the file (all_layers) or only the ones inference runs."""
    cfg = W2VBertConfig.from_json(w2v_config(p))
    model = W2VBert(cfg)
    if all_layers:
        model.encoder = Encoder(cfg, cfg.num_hidden_layers)
    return model


def make_codec(p: Preset) -> SemanticCodec:
    return SemanticCodec(SemanticCodecConfig.from_yaml(preset_config(p)))


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


def build_gpt(p: Preset, seed: int) -> UnifiedVoice:
    return _initialised(make_gpt(p), _generator(seed, "gpt.pth"))


def build_s2mel(p: Preset, seed: int) -> tuple[CFM, InterpolateRegulator, nn.Sequential]:
    gen = _generator(seed, "s2mel.pth")  # one stream for the file, in its key order
    cfm, lr, gpt_layer = make_s2mel(p)
    return _initialised(cfm, gen), _initialised(lr, gen), _initialised(gpt_layer, gen)


def build_w2v(p: Preset, seed: int, *, all_layers: bool = True) -> W2VBert:
    """The layers are drawn in order, so the truncated model equals a prefix of the full one."""
    return _initialised(make_w2v(p, all_layers=all_layers), _generator(seed, "w2v-bert-2.0/model.safetensors"))


def build_w2v_stats(p: Preset, seed: int) -> dict[str, Tensor]:
    """Layer-17 mean ~ N(0, 0.1²) and variance in [0.5, 2.0] (strictly positive: it is square-rooted)."""
    gen = _generator(seed, "wav2vec2bert_stats.pt")
    d = p.w2v["hidden_size"]
    return {"mean": torch.randn(d, generator=gen) * 0.1, "var": torch.rand(d, generator=gen) * 1.5 + 0.5}


def build_codec(p: Preset, seed: int) -> SemanticCodec:
    codec = make_codec(p)
    layer_scale = 1.0 / int(preset_config(p)["semantic_codec"]["vocos_num_layers"])
    return _initialised(codec, _generator(seed, "semantic_codec_model.safetensors"), layer_scale=layer_scale)


def build_campplus(p: Preset, seed: int) -> CAMPPlus:
    return _initialised(make_campplus(p), _generator(seed, "campplus_cn_common.bin"))


def build_bigvgan(p: Preset, seed: int) -> BigVGAN:
    return _initialised(make_bigvgan(p), _generator(seed, "bigvgan_generator.pt"))


def build_emotion(p: Preset, seed: int) -> tuple[Tensor, Tensor]:
    """feat1 (R, 192) speaker-style rows ~ N(0, 1) and feat2 (R, D) emotion rows ~ N(0, 0.5²)."""
    config = preset_config(p)
    rows = sum(int(n) for n in config["emo_num"])
    gen = _generator(seed, "feat.pt")
    spk = torch.randn(rows, CAMPPLUS_EMBEDDING, generator=gen)
    emo = torch.randn(rows, int(config["gpt"]["model_dim"]), generator=gen) * 0.5
    return spk, emo


# ------------------------------------------------------------------------------------------------
# bpe.model

ENGLISH_CORPUS = """\
The quick brown fox jumps over the lazy dog while five boxing wizards jump quickly.
Pack my box with five dozen liquor jugs, said the judge, and everyone laughed.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
It is a truth universally acknowledged that a single man in possession of a good fortune must be in want of a wife.
Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about a little.
All happy families are alike; each unhappy family is unhappy in its own way.
It was the best of times, it was the worst of times, it was the age of wisdom.
The weather today is sunny with a light breeze from the west, and tomorrow will bring rain.
Please remember to turn off the lights when you leave the room, thank you very much.
Speech synthesis converts written text into natural sounding audio in real time.
The model listens to a short reference recording and speaks new sentences in the same voice.
Streaming lets the listener hear the first words while the rest of the paragraph is still being generated.
We measured the latency of every stage: the transformer, the diffusion model and the vocoder.
Could you tell me the way to the railway station? Yes, go straight ahead and then turn left.
I'd like a cup of tea with milk, please, and a slice of lemon cake if you have one.
They're going to the museum on Saturday morning, aren't they? I think so, but I'm not sure.
Doctor Smith paid twelve dollars and fifty cents for the book at three forty five in the afternoon.
One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen.
Sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million.
First second third fourth fifth sixth seventh eighth ninth tenth, point, percent, minus, plus, zero.
January February March April May June July August September October November December.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday, morning, noon, evening, night, today, yesterday.
Happy angry sad afraid disgusted melancholic surprised calm, the voice can express every emotion.
Good morning everyone, welcome to the meeting. Let's start with a short review of last week's results.
Where are you from? What time is it? Who is speaking? Which one do you prefer? Why not?
The server accepts many clients at once, and each request can be cancelled at any moment.
Reading aloud is a skill: pause at the comma, stop at the period, and rise at the question mark?
The children played in the garden until the sun went down behind the old stone wall.
Music, science, history, language, mathematics, engineering, medicine and art are taught here.
Network, computer, program, memory, device, model, layer, token, sample, signal, frequency, channel.
A journey of a thousand miles begins with a single step, as the old saying goes.
Knowledge is power, and practice makes perfect; never give up, always keep going!
Excuse me, is this seat taken? No, please sit down. Thank you! You're welcome.
The quarterly report shows revenue growth of seven percent, driven by strong demand overseas.
Her brother's jacket was hanging on the back of the kitchen chair next to the window.
Xylophones, quizzes, jazz, jackets, zigzags and quick foxes vex every keyboard.
"""

# Frequent simplified characters (plus those of the usual test sentences); the tiny vocabulary
# keeps the first TINY_CJK_CHARS, the full one also takes code points from U+4E00 up.
CJK_COMMON = (
    "你好世界今天吃饭吧语音零四五六七八九的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其里所去"
    "行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从知身现两"
    "明文体长把高理意已关点几实外月老动向本结东区很它正手利位队机期新被感变处代打气内太果平加或给员海世记相物"
    "战论情想声今开但回路间更走水完头百资重全最基提制金力应少电合问教常因务色"
)
TINY_CJK_CHARS = 120
PUNCTUATION = ".,!?'-"
SPECIAL_PIECES = {"bos": (0, "<s>"), "eos": (1, "</s>"), "unk": (2, "<unk>")}


def _cjk_chars(count: int) -> list[str]:
    chars = list(dict.fromkeys(CJK_COMMON))
    code = 0x4E00
    while len(chars) < count:
        c = chr(code)
        if c not in chars:
            chars.append(c)
        code += 1
    return chars[:count]


def bpe_corpus(cjk_chars: int) -> list[str]:
    """Training sentences: upper-case English (as the normaliser leaves it) and space-split CJK."""
    lines = [line.upper() for line in ENGLISH_CORPUS.splitlines() if line]
    chars = _cjk_chars(cjk_chars)
    for i in range(0, len(chars), 20):
        group = chars[i : i + 20]
        lines.append(" ".join(group[:10]) + " , " + " ".join(group[10:]) + " .")
    lines.append(" ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + " " + " ".join("0123456789") + " " + " ".join(PUNCTUATION))
    return lines


def train_bpe(vocab_size: int) -> bytes:
    """A SentencePiece BPE model (bytes of bpe.model) with ids 0/1/2 = <s>/</s>/<unk>, as upstream's.

    Every letter A–Z, digit, `.,!?'-`, `▁` and the corpus' CJK characters are pieces. The
    corpus is small: a vocabulary the corpus cannot fill ends up smaller than `vocab_size`
    (hard_vocab_limit=false); the full preset's 12000 is reached through the CJK pieces."""
    import sentencepiece as spm

    # Characters fill about half the tiny vocabulary; the full one gets two merges (▁X, X) per CJK char.
    cjk = TINY_CJK_CHARS if vocab_size <= 1000 else vocab_size // 2
    required = "".join(["ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", PUNCTUATION, *_cjk_chars(cjk)])
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(bpe_corpus(cjk)),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        required_chars=required,
        bos_id=SPECIAL_PIECES["bos"][0],
        eos_id=SPECIAL_PIECES["eos"][0],
        unk_id=SPECIAL_PIECES["unk"][0],
        pad_id=-1,
        num_threads=1,  # deterministic merges
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return out.getvalue()


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


def plan(p: Preset, seed: int) -> dict[str, Callable[[Path], None]]:
    """Relative path in the official layout → writer. Each writer builds only its own component."""
    config = preset_config(p)

    def write_config(path: Path) -> None:
        path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")

    def write_s2mel(path: Path) -> None:
        cfm, lr, gpt_layer = build_s2mel(p, seed)
        # Upstream's checkpoint: a plain dict with the training script's `net` dict of state dicts.
        _torch_save({"net": {"cfm": _state(cfm), "length_regulator": _state(lr), "gpt_layer": _state(gpt_layer)}}, path)

    def write_emotion(which: int) -> Callable[[Path], None]:
        return lambda path: _torch_save(build_emotion(p, seed)[which].contiguous(), path)

    return {
        "config.yaml": write_config,
        "bpe.model": lambda path: path.write_bytes(train_bpe(int(config["gpt"]["number_text_tokens"]))),
        "gpt.pth": lambda path: _torch_save(_state(build_gpt(p, seed)), path),
        "s2mel.pth": write_s2mel,
        "wav2vec2bert_stats.pt": lambda path: _torch_save(build_w2v_stats(p, seed), path),
        "feat1.pt": write_emotion(0),
        "feat2.pt": write_emotion(1),
        "hf_cache/w2v-bert-2.0/config.json": lambda path: _json(w2v_config(p), path),
        "hf_cache/w2v-bert-2.0/preprocessor_config.json": lambda path: _json(W2V_PREPROCESSOR_CONFIG, path),
        "hf_cache/w2v-bert-2.0/model.safetensors": lambda path: _safetensors(
            _state(build_w2v(p, seed)), path, {"format": "pt"}
        ),
        # MaskGCT's file was written by accelerate's save_model: no metadata.
        "hf_cache/semantic_codec_model.safetensors": lambda path: _safetensors(
            _state(build_codec(p, seed)), path, None
        ),
        "hf_cache/campplus_cn_common.bin": lambda path: _torch_save(_state(build_campplus(p, seed)), path),
        "hf_cache/bigvgan/config.json": lambda path: _json(bigvgan_config(p), path),
        "hf_cache/bigvgan/bigvgan_generator.pt": lambda path: _torch_save(
            {"generator": _state(build_bigvgan(p, seed))}, path
        ),
    }


def write_official(out_dir: Path | str, preset: str = "tiny", seed: int = 0, *, progress: bool = False) -> Path:
    """Write a complete official-format IndexTTS-2 source directory with seeded random weights.

    The result is what `ttsd-convert` takes; returns `out_dir`. Same (preset, seed) → same bytes
    for every tensor file."""
    p = get_preset(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(p, seed)
    bar = tqdm(steps.items(), desc=f"make-tiny {p.name}", unit="file", disable=not progress, file=sys.stderr)
    for rel, write in bar:
        bar.set_postfix_str(rel)
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        write(tmp)
        tmp.replace(dst)  # a crash never leaves a half-written file under its real name
    log.info("make-tiny done preset=%s seed=%d out=%s files=%d", p.name, seed, out, len(steps))
    return out


# ------------------------------------------------------------------------------------------------
# In memory (benchmarks at full size without writing ~6 GB)


@dataclass(kw_only=True, slots=True)
class RandomComponents:
    """Every model of one preset, randomly initialised, on CPU in float32, weight norm not folded."""

    config: dict[str, Any]
    bpe_model: bytes
    gpt: UnifiedVoice
    cfm: CFM
    length_regulator: InterpolateRegulator
    gpt_layer: nn.Sequential
    w2v: W2VBert  # the inference layers only
    w2v_stats: dict[str, Tensor]
    codec: SemanticCodec
    campplus: CAMPPlus
    bigvgan: BigVGAN
    spk_matrix: Tensor
    emo_matrix: Tensor

    def modules(self) -> Iterator[nn.Module]:
        yield from (self.gpt, self.cfm, self.length_regulator, self.gpt_layer, self.w2v, self.codec)
        yield from (self.campplus, self.bigvgan)


def random_components(preset: str = "tiny", seed: int = 0) -> RandomComponents:
    """The same weights `write_official(preset, seed)` writes, built in memory (w2v-BERT truncated)."""
    p = get_preset(preset)
    config = preset_config(p)
    cfm, lr, gpt_layer = build_s2mel(p, seed)
    spk, emo = build_emotion(p, seed)
    return RandomComponents(
        config=config,
        bpe_model=train_bpe(int(config["gpt"]["number_text_tokens"])),
        gpt=build_gpt(p, seed),
        cfm=cfm,
        length_regulator=lr,
        gpt_layer=gpt_layer,
        w2v=build_w2v(p, seed, all_layers=False),
        w2v_stats=build_w2v_stats(p, seed),
        codec=build_codec(p, seed),
        campplus=build_campplus(p, seed),
        bigvgan=build_bigvgan(p, seed),
        spk_matrix=spk,
        emo_matrix=emo,
    )


def random_pipeline(
    preset: str = "tiny",
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    *,
    cuda_graphs: bool = True,
) -> Pipeline:
    """A `Pipeline` over `random_components(preset, seed)`, prepared as `Pipeline.load` prepares a
    loaded one: weight norm folded, non-persistent buffers built on `device`, GPT in `dtype`."""
    from .errors import ConfigError
    from .gpt import EmotionMatrices
    from .pipeline import DTYPES, Pipeline
    from .text import TextNormalizer, TextTokenizer, sentencepiece_to_json
    from .w2v_bert import W2VStats
    from .weights import build_buffers

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dev = torch.device(device)
    c = random_components(preset, seed)
    stats = W2VStats(c.w2v_stats["mean"].numel())
    stats.mean, stats.var = c.w2v_stats["mean"], c.w2v_stats["var"]
    emo_num = [int(n) for n in c.config["emo_num"]]
    emotion = EmotionMatrices(emo_num, c.spk_matrix.size(1), c.emo_matrix.size(1))
    emotion.spk_matrix, emotion.emo_matrix = c.spk_matrix, c.emo_matrix
    c.codec.fold()
    c.cfm.fold_weight_norm()
    c.bigvgan.fold_weight_norm()
    modules: list[nn.Module] = [*c.modules(), stats, emotion]
    for m in modules:
        m.to(dev)
        build_buffers(m, dev)
        m.eval().requires_grad_(False)
    if dtype != "float32":
        c.gpt.to(DTYPES[dtype])
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        bpe = Path(tmp) / "bpe.model"
        bpe.write_bytes(c.bpe_model)
        tokenizer = TextTokenizer(tokenizer=Tokenizer.from_str(sentencepiece_to_json(bpe)), normalizer=TextNormalizer())
    return Pipeline(
        config=c.config,
        tokenizer=tokenizer,
        w2v=c.w2v,
        w2v_stats=stats,
        codec=c.codec,
        campplus=c.campplus,
        gpt=c.gpt,
        gpt_layer=c.gpt_layer,
        length_regulator=c.length_regulator,
        cfm=c.cfm,
        bigvgan=c.bigvgan,
        emotion=emotion,
        device=dev,
        gpt_dtype=DTYPES[dtype],
        cuda_graphs=cuda_graphs,
    )


def synthetic_voice(seconds: float, seed: int = 0) -> bytes:
    """A voiced test signal (glottal-like pulse train through two formant resonances + breath noise) as WAV."""
    import io

    import numpy as np
    import soundfile as sf

    from .audio import SAMPLE_RATE_HZ

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
    ap.add_argument("out", type=Path, help="output directory (official IndexTTS-2 layout)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (default %(default)s)")
    ap.add_argument("--convert", type=Path, metavar="DST", help="also run ttsd-convert into DST")
    ap.add_argument("--voice", type=Path, metavar="WAV", help="also write a synthetic 6 s reference voice here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .errors import TtsdError

    try:
        write_official(args.out, args.preset, args.seed, progress=True)
        if args.convert is not None:
            from .convert import convert

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
