"""UnifiedVoice: the IndexTTS2 GPT (GPT-2 decoder over conditioning, text and semantic-code tokens).

Ports indextts/gpt/model_v2.py (`UnifiedVoice` in `conformer_perceiver` speaker mode, which
IndexTTS-2 uses, and in `campplus` mode, which IndexTTS-2.5's infer_v2_5 uses: conditioning,
emotion vectors, `prepare_gpt_inputs`, the second-pass latent), the HF GPT-2 stack it wraps
(transformers 4.52 `GPT2Model` with `wpe` zeroed and `wte` unused) and the emotion-matrix mixing
of indextts/infer_v2.py. Module names match gpt.pth key for key, so loading is a strict
`load_state_dict`. Each speaker mode is a subclass (`PerceiverVoice`, `CampplusVoice`); the model's
family picks one and checks that the tensors have its mode (`spk_emb_proj` means campplus).
Per-request state (the KV cache, owned by decode.py) is passed in as per-layer tensors.
Shapes: B batch (beams), T w2v-BERT frames, W w2v-BERT width, L text tokens, N semantic codes,
S sequence positions, S_max cache capacity, D model_dim, H heads, Dh head dim, V vocabulary."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttsd.api.errors import ConfigError

from .config import require, shape
from .conformer import ConformerConfig, ConformerEncoder
from .device import staged, upload
from .graphs import Graphs, recent
from .perceiver import PerceiverConfig, PerceiverResampler
from .weights import build_buffers, load_module, read_shapes

if TYPE_CHECKING:
    from .family import ModelFamily

LayerKV = tuple[Tensor, Tensor]  # one layer's (K, V) cache, each [B, H, S_cap, Dh]

LN_EPS = 1e-5  # GPT2Config.layer_norm_epsilon default; also final_norm
SPEED_TOKENS = 2  # speed_emb[1] then speed_emb[0] follow the speaker latents (2.5: two zero rows)
CAMPPLUS_LATENTS = 1  # 2.5: spk_emb_proj(style) is one conditioning row
EMO_CATEGORIES = 8  # happy angry sad afraid disgusted melancholic surprised calm


def _count_layers(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    n = 0
    while f"{prefix}{n}.0.to_q.weight" in shapes:
        n += 1
    return n


@dataclass(frozen=True, kw_only=True, slots=True)
class CampplusConditioning:
    """IndexTTS-2.5 speaker conditioning (upstream `spk_cond_mode="campplus"`); dims from gpt.safetensors."""

    style_dim: int  # spk_emb_proj in-features: the CAMPPlus embedding (192)
    num_languages: int  # lang_embedding rows: len(LANGUAGE_DICT) + 1 (107)


@dataclass(frozen=True, kw_only=True, slots=True)
class GPTConfig:
    model_dim: int  # gpt.model_dim
    heads: int  # gpt.heads
    layers: int  # gpt.layers
    max_mel_tokens: int  # gpt.max_mel_tokens
    max_text_tokens: int  # gpt.max_text_tokens
    number_text_tokens: int  # gpt.number_text_tokens
    number_mel_codes: int  # gpt.number_mel_codes
    start_mel_token: int  # gpt.start_mel_token
    stop_mel_token: int  # gpt.stop_mel_token
    start_text_token: int  # gpt.start_text_token
    stop_text_token: int  # gpt.stop_text_token
    # Speaker conformer + perceiver (IndexTTS-2); None in campplus mode, which builds neither.
    condition_module: ConformerConfig | None  # gpt.condition_module (+ input width from shapes)
    perceiver_mult: int | None  # gpt.condition_module.perceiver_mult
    campplus: CampplusConditioning | None  # IndexTTS-2.5 speaker conditioning; None for IndexTTS-2
    emo_condition_module: ConformerConfig  # gpt.emo_condition_module (+ input width from shapes)
    emo_perceiver_mult: int  # gpt.emo_condition_module.perceiver_mult
    # Hard-coded upstream, read from gpt.safetensors shapes:
    condition_num_latent: int  # perceiver_encoder.latents rows (32); 1 in campplus mode
    w2v_dim: int  # emovec_layer in-features (1024: w2v-BERT width, emo perceiver dim)
    perceiver_dim_head: int  # perceiver to_q rows / heads (64); the emotion perceiver's in campplus mode
    perceiver_depth: int  # perceiver layers (2); the emotion perceiver's in campplus mode

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.heads

    @property
    def mel_positions(self) -> int:
        return self.max_mel_tokens + 3  # upstream LearnedPositionEmbeddings(max_mel_tokens + 2 + 1)

    @property
    def text_positions(self) -> int:
        return self.max_text_tokens + 2

    @property
    def prefix_conds(self) -> int:
        return self.condition_num_latent + SPEED_TOKENS  # conditioning rows before the text: 34 (v2), 3 (2.5)

    def perceiver(self) -> PerceiverConfig:
        c = self.condition_module
        if c is None or self.perceiver_mult is None:
            raise ConfigError("campplus speaker conditioning has no speaker perceiver")
        return PerceiverConfig(
            dim=self.model_dim,
            dim_context=c.output_size,
            num_latents=self.condition_num_latent,
            heads=c.attention_heads,
            dim_head=self.perceiver_dim_head,
            ff_mult=self.perceiver_mult,
            depth=self.perceiver_depth,
        )

    def speaker_projection(self) -> CampplusConditioning:
        c = self.campplus
        if c is None:
            raise ConfigError("conformer_perceiver speaker conditioning has no spk_emb_proj")
        return c

    def emo_perceiver(self) -> PerceiverConfig:
        c = self.emo_condition_module
        return PerceiverConfig(
            dim=self.w2v_dim,
            dim_context=c.output_size,
            num_latents=1,
            heads=c.attention_heads,
            dim_head=self.perceiver_dim_head,
            ff_mult=self.emo_perceiver_mult,
            depth=self.perceiver_depth,
        )

    @classmethod
    def from_yaml(cls, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> GPTConfig:
        """Build from the parsed config.yaml and `weights.read_shapes(gpt.safetensors)`.

        The speaker mode comes from the checkpoint: `spk_emb_proj` means campplus (IndexTTS-2.5);
        the model's family (family.py) checks that it is the one its version expects."""
        g = require(config, "gpt", "")
        campplus = "spk_emb_proj.weight" in shapes
        # 2.5 configs keep condition_type, but campplus mode never reads it.
        if not campplus and require(g, "condition_type", "gpt") != "conformer_perceiver":
            raise ConfigError("gpt.condition_type: only conformer_perceiver (IndexTTS2) is supported")
        w2v_dim = shape(shapes, "emovec_layer.weight", "gpt.safetensors")[1]

        def conformer(name: str) -> ConformerConfig:
            raw, where = require(g, name, "gpt"), f"gpt.{name}"
            return ConformerConfig(
                input_size=w2v_dim,
                output_size=int(require(raw, "output_size", where)),
                linear_units=int(require(raw, "linear_units", where)),
                attention_heads=int(require(raw, "attention_heads", where)),
                num_blocks=int(require(raw, "num_blocks", where)),
                input_layer=str(require(raw, "input_layer", where)),
            )

        emo = conformer("emo_condition_module")
        if campplus:
            cond, perceiver_mult, latents, perceiver = None, None, CAMPPLUS_LATENTS, "emo_perceiver_encoder"
            heads = emo.attention_heads
            spk = CampplusConditioning(
                style_dim=shape(shapes, "spk_emb_proj.weight", "gpt.safetensors")[1],
                num_languages=shape(shapes, "lang_embedding.weight", "gpt.safetensors")[0],
            )
        else:
            cond, perceiver, spk = conformer("condition_module"), "perceiver_encoder", None
            perceiver_mult = int(require(g["condition_module"], "perceiver_mult", "gpt.condition_module"))
            latents = shape(shapes, "perceiver_encoder.latents", "gpt.safetensors")[0]
            heads = cond.attention_heads
        return cls(
            model_dim=int(require(g, "model_dim", "gpt")),
            heads=int(require(g, "heads", "gpt")),
            layers=int(require(g, "layers", "gpt")),
            max_mel_tokens=int(require(g, "max_mel_tokens", "gpt")),
            max_text_tokens=int(require(g, "max_text_tokens", "gpt")),
            number_text_tokens=int(require(g, "number_text_tokens", "gpt")),
            number_mel_codes=int(require(g, "number_mel_codes", "gpt")),
            start_mel_token=int(require(g, "start_mel_token", "gpt")),
            stop_mel_token=int(require(g, "stop_mel_token", "gpt")),
            start_text_token=int(require(g, "start_text_token", "gpt")),
            stop_text_token=int(require(g, "stop_text_token", "gpt")),
            condition_module=cond,
            perceiver_mult=perceiver_mult,
            campplus=spk,
            emo_condition_module=emo,
            emo_perceiver_mult=int(require(g["emo_condition_module"], "perceiver_mult", "gpt.emo_condition_module")),
            condition_num_latent=latents,
            w2v_dim=w2v_dim,
            perceiver_dim_head=shape(shapes, f"{perceiver}.layers.0.0.to_q.weight", "gpt.safetensors")[0] // heads,
            perceiver_depth=_count_layers(shapes, f"{perceiver}.layers."),
        )


class Conv1D(nn.Module):
    """HF GPT-2 Conv1D: y = x·W + b with W stored [in, out] (keys `*.weight`, `*.bias`)."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.empty(nf))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


@dataclass(frozen=True, slots=True)
class CacheAt:
    """Where a cached forward writes and what it reads, made once per forward for every layer (per layer
    it would be two more kernels each): rows [B, 1] and input_pos [B, S] index the new entries; `mask`
    [B, 1, S, n] covers the first n slots. On CUDA (`fused`) it is the additive bias the fused kernel
    takes (0 visible, -inf hidden, in the activations' dtype: a boolean mask would cost each call a
    conversion kernel); on CPU it is True where a slot is hidden from the plain softmax."""

    rows: Tensor
    input_pos: Tensor
    mask: Tensor
    fused: bool

    @classmethod
    def of(cls, input_pos: Tensor, n: int, dtype: torch.dtype) -> CacheAt:
        dev = input_pos.device
        hidden = (torch.arange(n, device=dev)[None, None, :] > input_pos[:, :, None]).unsqueeze(1)
        fused = dev.type == "cuda"
        mask = torch.zeros(hidden.shape, dtype=dtype, device=dev).masked_fill_(hidden, -float("inf")) if fused \
            else hidden
        return cls(torch.arange(input_pos.size(0), device=dev).unsqueeze(1), input_pos, mask, fused)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        # HF Conv1D layout, weight [in, out]: keys gpt.h.{i}.attn.c_attn.{weight,bias}; q | k | v on out.
        self.c_attn = Conv1D(cfg.model_dim, 3 * cfg.model_dim)
        self.c_proj = Conv1D(cfg.model_dim, cfg.model_dim)

    def forward(self, x: Tensor, at: CacheAt | None, kv: LayerKV | None) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)  # [B, H, S, Dh]
        if kv is None or at is None:
            k = k.view(b, s, self.heads, self.head_dim).transpose(1, 2)
            v = v.view(b, s, self.heads, self.head_dim).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k_cache, v_cache = kv
            # Row b writes its S new entries at its own slots input_pos[b] (in place: index_put_).
            k_cache[at.rows, :, at.input_pos] = k.view(b, s, self.heads, self.head_dim)  # cache [B, H, S_cap, Dh]
            v_cache[at.rows, :, at.input_pos] = v.view(b, s, self.heads, self.head_dim)
            n = at.mask.size(-1)
            keys, values = k_cache[:, :, :n], v_cache[:, :, :n]
            if at.fused:
                # One fused kernel (memory-efficient attention takes the mask) instead of five, with
                # its softmax in float32 whatever the dtype; the CUDA step is graphed and launch-bound.
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=at.mask)
            else:
                # CPU: plain matmul + softmax, upstream's order of operations (float32 parity); each
                # row steps alone there (decode.py), so nothing is gained by fusing.
                if q.dtype == torch.float16:
                    # float16 tops out at 65504: q·kᵀ before the 1/√Dh scale overflows to inf (then NaN,
                    # then silence). Scale q first and take the softmax in float32, as fused kernels do.
                    scores = ((q * self.scale) @ keys.transpose(-1, -2)).float()  # [B, H, S, n]
                else:
                    scores = (q @ keys.transpose(-1, -2)) * self.scale
                scores = scores.masked_fill(at.mask, -float("inf"))
                y = scores.softmax(dim=-1).to(v_cache.dtype) @ values  # [B, H, S, Dh]
        return self.c_proj(y.transpose(1, 2).reshape(b, s, d))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(cfg.model_dim, 4 * cfg.model_dim)  # n_inner None -> 4·D
        self.c_proj = Conv1D(4 * cfg.model_dim, cfg.model_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # HF "gelu_new"


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.model_dim, eps=LN_EPS)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.model_dim, eps=LN_EPS)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: Tensor, at: CacheAt | None, kv: LayerKV | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), at, kv)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """HF GPT2Model without wte/wpe (upstream deletes wte and replaces wpe by zeros): keys gpt.h.*, gpt.ln_f."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.model_dim, eps=LN_EPS)


class LearnedPositionEmbeddings(nn.Module):
    def __init__(self, seq_len: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(seq_len, dim)  # key *_pos_embedding.emb.weight


class EmotionMatrices(nn.Module):
    """feat1 (speaker-style rows) and feat2 (emotion rows), split into 8 groups by config `emo_num`.

    Loaded from emotion.safetensors (`spk_matrix` = feat1 [R, 192], `emo_matrix` = feat2 [R, D])."""

    spk_matrix: Tensor
    emo_matrix: Tensor

    def __init__(self, emo_num: Sequence[int], style_dim: int, model_dim: int) -> None:
        super().__init__()
        self.emo_num = tuple(emo_num)
        self.register_buffer("spk_matrix", torch.empty(sum(self.emo_num), style_dim))
        self.register_buffer("emo_matrix", torch.empty(sum(self.emo_num), model_dim))

    def nearest_rows(self, style: Tensor) -> Tensor:
        """Per group, the row of feat1 most cosine-similar to `style` [1, 192] → [8] local row indices."""
        groups = self.spk_matrix.float().split(self.emo_num)
        return torch.stack([F.cosine_similarity(style.float(), g, dim=1).argmax() for g in groups])

    def random_rows(self, generator: torch.Generator | None) -> Tensor:
        """use_random: a uniform row per group (upstream uses Python `random.randint`; seeded here)."""
        dev = generator.device if generator is not None else torch.device("cpu")
        return torch.tensor([int(torch.randint(n, (1,), generator=generator, device=dev)) for n in self.emo_num])

    def mix(self, weights: Tensor, rows: Tensor, emovec: Tensor) -> Tensor:
        """Σ_g w_g·feat2_g[rows_g] + (1 − Σw)·emovec: weights [8] float32, emovec [1, D] → [1, D]."""
        groups = self.emo_matrix.split(self.emo_num)
        e = torch.stack([g[int(i)] for g, i in zip(groups, rows.tolist(), strict=True)])  # [8, D]
        w = weights.to(e)
        mat = (w.unsqueeze(1) * e).sum(0).unsqueeze(0)  # [1, D]
        return mat + (1 - w.sum()) * emovec  # nothing clamps Σw, as upstream


def scale_emo_vector(weights: Sequence[float], emo_alpha: float) -> list[float]:
    """Vector mode: clamp alpha to [0, 1]; unless it is 1, scale and truncate to 4 decimals (upstream)."""
    s = max(0.0, min(1.0, emo_alpha))
    if s == 1.0:
        return [float(w) for w in weights]
    return [int(w * s * 10000) / 10000 for w in weights]


def interpolate_emovec(base: Tensor, emo: Tensor, alpha: float) -> Tensor:
    """merge_emovec on precomputed vectors: base + alpha·(emo − base), [B, D]."""
    return base + alpha * (emo - base)


class UnifiedVoice(nn.Module):
    """The GPT both speaker modes share. `PerceiverVoice` (IndexTTS-2) and `CampplusVoice` (2.5) add
    their speaker conditioning and text rows; which one a checkpoint builds is its family's
    `gpt_class` (family.py). Modules are declared in upstream's order: make-tiny draws its random
    weights in this order."""

    text_embedding: nn.Embedding  # declared by declare_text, where the speaker mode puts it

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.model_dim
        self.declare_speaker(cfg)
        self.emo_conditioning_encoder = ConformerEncoder(cfg.emo_condition_module)
        self.emo_perceiver_encoder = PerceiverResampler(cfg.emo_perceiver())
        self.declare_text(cfg)
        self.emo_layer = nn.Linear(d, d)
        self.emovec_layer = nn.Linear(cfg.w2v_dim, d)
        self.mel_embedding = nn.Embedding(cfg.number_mel_codes, d)
        self.gpt = GPT2Model(cfg)
        self.mel_pos_embedding = LearnedPositionEmbeddings(cfg.mel_positions, d)
        self.text_pos_embedding = LearnedPositionEmbeddings(cfg.text_positions, d)
        self.final_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.text_head = nn.Linear(d, cfg.number_text_tokens + 1)  # in gpt.pth, unused at inference
        self.mel_head = nn.Linear(d, cfg.number_mel_codes)

    def declare_speaker(self, cfg: GPTConfig) -> None:
        """The speaker-conditioning modules, declared before the emotion encoder."""
        raise NotImplementedError

    def declare_text(self, cfg: GPTConfig) -> None:
        """text_embedding and the speaker mode's rows around it."""
        raise NotImplementedError

    # --- conditioning -------------------------------------------------------------------------

    @staticmethod
    def quirk_lengths(x: Tensor) -> Tensor:
        """Upstream passes `x.shape[-1]` of a [B, T, W] tensor as the frame count: W, not T (kept)."""
        return torch.full((x.size(0),), x.size(-1), dtype=torch.long, device=x.device)

    def speaker_latent(self, spk_cond_emb: Tensor, style: Tensor) -> Tensor:
        """The speaker rows of the prefix (what emovec is added to), per speaker mode:
        IndexTTS-2: w2v-BERT features [B, T, W] → conformer → perceiver → [B, 32, D];
        IndexTTS-2.5: spk_emb_proj(CAMPPlus style [B, 192]) → [B, 1, D]. The other input is unused."""
        raise NotImplementedError

    def get_emovec(self, emo_cond_emb: Tensor) -> Tensor:
        """Emotion vector: [B, T, W] → emo conformer → emo perceiver → emovec_layer → emo_layer → [B, D]."""
        h, mask = self.emo_conditioning_encoder(emo_cond_emb, self.quirk_lengths(emo_cond_emb))
        e = self.emo_perceiver_encoder(h, self.emo_perceiver_encoder.latent_mask(mask))[:, 0]  # [B, W]
        return self.emo_layer(self.emovec_layer(e))  # no activation between them, as upstream

    def merge_emovec(self, spk_cond_emb: Tensor, emo_cond_emb: Tensor, alpha: float) -> Tensor:
        """Upstream merge_emovec: get_emovec of both clips interpolated by alpha → [B, D]."""
        return interpolate_emovec(self.get_emovec(spk_cond_emb), self.get_emovec(emo_cond_emb), alpha)

    def conds_latent(self, speech_latent: Tensor, emovec: Tensor) -> Tensor:
        """IndexTTS-2: [latent + emovec (32) | speed_emb[1] | speed_emb[0]] → [B, 34, D];
        IndexTTS-2.5: [latent + emovec | 0 | 0] → [B, 3, D]. emovec skips the last two rows."""
        return torch.cat((speech_latent + emovec.unsqueeze(1), self.speed_rows(speech_latent)), dim=1)

    def speed_rows(self, speech_latent: Tensor) -> Tensor:
        """The two rows after the speaker latents → [B, 2, D]."""
        raise NotImplementedError

    def embed_text(self, text_ids: Tensor, lang: int | Tensor | None = None) -> Tensor:
        """[B, L] ids → [B, L + 2, D]: start/stop text tokens added, text positions 0..L+1.

        `lang` (IndexTTS-2.5 only, and required there): the lang_embedding row (an int, or [B]
        ints), added to every position, start and stop tokens included."""
        c = self.cfg
        ids = F.pad(F.pad(text_ids.long(), (1, 0), value=c.start_text_token), (0, 1), value=c.stop_text_token)
        pos = torch.arange(ids.size(1), device=ids.device)
        return self.add_language(self.text_embedding(ids) + self.text_pos_embedding.emb(pos), lang)  # [B, L + 2, D]

    def add_language(self, emb: Tensor, lang: int | Tensor | None) -> Tensor:
        """Text embeddings [B, L + 2, D] with the language row added where the speaker mode has one."""
        raise NotImplementedError

    def build_prefix(
        self, speech_latent: Tensor, emovec: Tensor, text_ids: Sequence[int] | Tensor, lang: int | Tensor | None = None
    ) -> Tensor:
        """Generation prefix (upstream prepare_gpt_inputs, batch 1): [1, C + L' + 2, D] with C = 34
        (IndexTTS-2) or 3 (IndexTTS-2.5, where `lang` is required: see `embed_text`).

        Every text id equal to start_text_token or stop_text_token is removed first (upstream).
        Upstream instead left-pads the sequence with one zero row per removed id and masks those
        rows out of attention; attention never sees them, so the prefix here simply omits them.
        The ids are host values (a list or a CPU tensor): removing ids changes a shape, which on the
        device would be a host sync."""
        c = self.cfg
        ids = text_ids.reshape(-1).tolist() if isinstance(text_ids, Tensor) else list(text_ids)
        kept = [i for i in ids if i not in (c.start_text_token, c.stop_text_token)]
        dev = speech_latent.device
        ids_dev = upload([kept], dev) if kept else torch.zeros((1, 0), dtype=torch.long, device=dev)  # [1, L']
        return torch.cat((self.conds_latent(speech_latent, emovec), self.embed_text(ids_dev, lang)), dim=1)

    # --- GPT-2 stack --------------------------------------------------------------------------

    def embed_mel(self, codes: Tensor, mel_pos: Tensor) -> Tensor:
        """[B, S] codes at mel positions [S] → [B, S, D]."""
        return self.mel_embedding(codes) + self.mel_pos_embedding.emb(mel_pos)

    def forward(
        self,
        x: Tensor,
        input_pos: Tensor | None = None,
        kv: Sequence[LayerKV] | None = None,
        kv_len: int | None = None,
    ) -> Tensor:
        """GPT-2 over input embeddings [B, S, D] → hidden states after ln_f [B, S, D].

        Without `kv`: one full causal pass (right padding is harmless: a position never sees a later
        one). With `kv` (one (K, V) pair per layer, each [B, H, S_cap, Dh], rows matching x's rows):
        `input_pos` [B, S] are each row's cache slots for its S inputs, written in place, and every
        input attends to the slots ≤ its own among the first `kv_len` (default: all S_cap)."""
        at = None
        if kv is not None:
            if input_pos is None:
                raise ValueError("input_pos is required with a KV cache")
            at = CacheAt.of(input_pos, kv[0][0].size(2) if kv_len is None else kv_len, x.dtype)
        for i, block in enumerate(self.gpt.h):
            x = block(x, at, None if kv is None else kv[i])
        return self.gpt.ln_f(x)

    def gemv_layout(self) -> None:
        """Inference transform for CPU decoding, called after the strict load: mel_head's weight is stored
        [in, out] in memory, as HF Conv1D stores every GPT-2 block weight (same shape, values and key: a
        transposed view of a contiguous [in, out] copy). A one-row decode step is memory-bound, and MKL's
        GEMV streams an [in, out] weight faster than an [out, in] one (bench/RESULTS.md, CPU layouts)."""
        w = self.mel_head.weight.detach().t().contiguous()  # [D, V] in memory
        self.mel_head.weight = nn.Parameter(w.t(), requires_grad=False)  # [V, D], strides (1, V)

    def mel_logits(self, h: Tensor) -> Tensor:
        """Hidden states after ln_f → mel logits (the second LayerNorm, final_norm, then mel_head)."""
        return self.mel_head(self.final_norm(h))

    def latent_inputs(self, speech_latent: Tensor, emovec: Tensor, text_ids: Tensor, codes: Tensor) -> Tensor:
        """Input embeddings of the second pass (upstream `UnifiedVoice.forward`, return_latent) → [B, S, D].

        Text ids are NOT filtered here; codes [B, N] (stop trimmed) become [start, c_1..c_N, stop]
        at mel positions 0..N+1 (correct positions, no off-by-one), after conds and text."""
        c = self.cfg
        mel = F.pad(F.pad(codes.long(), (1, 0), value=c.start_mel_token), (0, 1), value=c.stop_mel_token)
        mel_pos = torch.arange(mel.size(1), device=mel.device)
        return torch.cat(
            (self.conds_latent(speech_latent, emovec), self.embed_text(text_ids), self.embed_mel(mel, mel_pos)), dim=1
        )

    def packed_latent_inputs(self, speech_latent: Tensor, emovec: Tensor, tokens: Tensor) -> Tensor:
        """`latent_inputs` of B rows laid out by `LatentGraphs` (tokens [PACKED_ROWS, B, S]: the text and
        mel blocks' ids and positions, and each position's block) → [B, conds + S, D], zero at padding.
        Each embedding is the same lookup and sum as `latent_inputs`', so the rows match it exactly."""
        block = tokens[PACKED_BLOCK].unsqueeze(-1)  # [B, S, 1]
        text = self.text_embedding(tokens[PACKED_TEXT]) + self.text_pos_embedding.emb(tokens[PACKED_TEXT_POS])
        mel = self.mel_embedding(tokens[PACKED_MEL]) + self.mel_pos_embedding.emb(tokens[PACKED_MEL_POS])
        body = torch.where(block == TEXT_BLOCK, self.add_language(text, None),
                           torch.where(block == MEL_BLOCK, mel, 0.0))  # [B, S, D]
        return torch.cat((self.conds_latent(speech_latent, emovec), body), dim=1)

    def latent(self, speech_latent: Tensor, emovec: Tensor, text_ids: Tensor, codes: Tensor) -> Tensor:
        """Second pass → [B, N, D] for s2mel: the normalised states at the first N mel slots."""
        x = self.latent_inputs(speech_latent, emovec, text_ids, codes)
        h = self.final_norm(self.forward(x))  # [B, 34 + L + 2 + N + 2, D]
        return h[:, -(codes.size(1) + 2) : -2]  # drop the two tokens the pass added at the end


class LatentGraphs:
    """The second pass on CUDA, inputs included, as one graph replay per (rows, length bucket). Every
    host value of a call (text ids, codes, their positions, which block each position is in) is staged
    in one host→device copy and each row's speaker latents and emotion vector in one concatenation
    each; the graph recorded for the shape builds the input embeddings (`packed_latent_inputs`) and
    runs the GPT and final_norm over B rows right-padded to a multiple of SEQ_BUCKET positions.
    Padding is exact (the pass is causal: a position never sees a later one). Beyond `keep` shapes,
    the least recently used one is dropped, graph and buffers with it."""

    SEQ_BUCKET = 32  # a pass costs in proportion to its length: padding kept small (the CFM pads to 64)

    def __init__(self, gpt: UnifiedVoice, *, keep: int = 8) -> None:
        self.gpt, self.keep = gpt, keep
        self.shapes: dict[tuple[int, int], tuple[PackedInputs, Graphs]] = {}  # oldest first

    def __call__(self, speech_latents: Sequence[Tensor], emovecs: Sequence[Tensor],
                 text_ids: Sequence[Sequence[int]], codes: Sequence[Tensor]) -> Tensor:
        """Per row: speaker latents [1, 32, D] and emotion vector [1, D] on the device, text ids and
        codes [1, M] (stop trimmed) on the host → normalised states [B, S_bucket, D] of
        [conds | start, text, stop | start, codes, stop | padding], owned by the graph: valid until the
        next call (the caller copies what it keeps)."""
        gpt, c = self.gpt, self.gpt.cfg
        if any(m.device.type != "cpu" for m in codes):
            raise ValueError("the graphed second pass takes its codes on the host (a device copy would sync)")
        blocks = [(len(t) + 2, m.size(-1) + 2) for t, m in zip(text_ids, codes, strict=True)]
        first = speech_latents[0]
        n_cond = first.size(1) + SPEED_TOKENS
        longest = n_cond + max(a + b for a, b in blocks)
        key = (len(codes), -(-longest // self.SEQ_BUCKET) * self.SEQ_BUCKET)
        span = key[1] - n_cond
        inputs, graphs = recent(self.shapes, key, lambda: (PackedInputs(
            latent=torch.zeros((key[0], *first.shape[1:]), device=first.device, dtype=first.dtype),
            emovec=torch.zeros((key[0], emovecs[0].size(-1)), device=first.device, dtype=first.dtype),
            tokens=torch.zeros((PACKED_ROWS, key[0], span), device=first.device, dtype=torch.long)),
            Graphs("second pass")), self.keep)
        with staged(inputs.tokens) as host:
            for b, ((n_text, n_mel), t, m) in enumerate(zip(blocks, text_ids, codes, strict=True)):
                host[PACKED_TEXT, b, 0], host[PACKED_TEXT, b, n_text - 1] = c.start_text_token, c.stop_text_token
                host[PACKED_TEXT, b, 1 : n_text - 1] = torch.as_tensor(t, dtype=torch.long)
                host[PACKED_TEXT_POS, b, :n_text] = torch.arange(n_text)
                mel = slice(n_text, n_text + n_mel)
                host[PACKED_MEL, b, mel.start], host[PACKED_MEL, b, mel.stop - 1] = c.start_mel_token, c.stop_mel_token
                host[PACKED_MEL, b, mel.start + 1 : mel.stop - 1] = m.reshape(-1)
                host[PACKED_MEL_POS, b, mel] = torch.arange(n_mel)
                host[PACKED_BLOCK, b, :n_text], host[PACKED_BLOCK, b, mel] = TEXT_BLOCK, MEL_BLOCK
        torch.cat(list(speech_latents), out=inputs.latent)
        torch.cat(list(emovecs), out=inputs.emovec)
        return graphs.run("pass", lambda: gpt.final_norm(gpt(gpt.packed_latent_inputs(
            inputs.latent, inputs.emovec, inputs.tokens))))


# The rows of `packed_latent_inputs`' tokens: ids and positions of the text and mel blocks (0 elsewhere)
# and the block of each position.
PACKED_TEXT, PACKED_TEXT_POS, PACKED_MEL, PACKED_MEL_POS, PACKED_BLOCK = range(5)
PACKED_ROWS = 5
TEXT_BLOCK, MEL_BLOCK = 1, 2  # 0: padding


@dataclass(frozen=True, slots=True)
class PackedInputs:
    """A graphed second pass's input buffers: speaker latents [B, 32, D], emotion vectors [B, D] and the
    packed tokens [PACKED_ROWS, B, S]."""

    latent: Tensor
    emovec: Tensor
    tokens: Tensor


class PerceiverVoice(UnifiedVoice):
    """IndexTTS-2 (`conformer_perceiver`): 32 perceiver latents of the w2v-BERT features, then speed_emb."""

    def declare_speaker(self, cfg: GPTConfig) -> None:
        perceiver = cfg.perceiver()  # a ConfigError without the speaker conformer
        assert cfg.condition_module is not None  # perceiver() needs it
        self.conditioning_encoder = ConformerEncoder(cfg.condition_module)
        self.perceiver_encoder = PerceiverResampler(perceiver)

    def declare_text(self, cfg: GPTConfig) -> None:
        self.speed_emb = nn.Embedding(SPEED_TOKENS, cfg.model_dim)
        self.text_embedding = nn.Embedding(cfg.number_text_tokens + 1, cfg.model_dim)

    def speaker_latent(self, spk_cond_emb: Tensor, style: Tensor) -> Tensor:
        return self.conditioning_latent(spk_cond_emb)

    def conditioning_latent(self, spk_cond_emb: Tensor) -> Tensor:
        """Speaker latents: [B, T, W] w2v-BERT features → conformer → perceiver → [B, 32, D]."""
        h, mask = self.conditioning_encoder(spk_cond_emb, self.quirk_lengths(spk_cond_emb))
        return self.perceiver_encoder(h, self.perceiver_encoder.latent_mask(mask))

    def speed_rows(self, speech_latent: Tensor) -> Tensor:
        w = self.speed_emb.weight  # rows 1 then 0 (indexing with [1, 0] would copy that list to the device)
        return torch.stack((w[1], w[0])).unsqueeze(0).expand(speech_latent.size(0), -1, -1)  # [B, 2, D]

    def add_language(self, emb: Tensor, lang: int | Tensor | None) -> Tensor:
        if lang is not None:
            raise ValueError("IndexTTS-2 has no language embedding: lang must be None")
        return emb


class CampplusVoice(UnifiedVoice):
    """IndexTTS-2.5 (`campplus`): one spk_emb_proj row of the CAMPPlus style, two zero rows, and a
    language row added to every text position."""

    def declare_speaker(self, cfg: GPTConfig) -> None:
        self.spk_emb_proj = nn.Linear(cfg.speaker_projection().style_dim, cfg.model_dim)  # style → one row

    def declare_text(self, cfg: GPTConfig) -> None:
        self.text_embedding = nn.Embedding(cfg.number_text_tokens + 1, cfg.model_dim)
        # added to every text position
        self.lang_embedding = nn.Embedding(cfg.speaker_projection().num_languages, cfg.model_dim)

    def speaker_latent(self, spk_cond_emb: Tensor, style: Tensor) -> Tensor:
        return self.spk_emb_proj(style).unsqueeze(1)

    def speed_rows(self, speech_latent: Tensor) -> Tensor:
        return speech_latent.new_zeros(speech_latent.size(0), SPEED_TOKENS, speech_latent.size(2))  # [B, 2, D]

    def add_language(self, emb: Tensor, lang: int | Tensor | None) -> Tensor:
        if lang is None:
            raise ValueError("IndexTTS-2.5 needs the language: pass its lang_embedding row")
        if isinstance(lang, int):  # a host index selects its row without a host→device copy
            return emb + self.lang_embedding.weight[lang]  # [B, L + 2, D]
        rows = lang.to(device=emb.device, dtype=torch.long).reshape(-1, 1)  # [B or 1, 1]
        return emb + self.lang_embedding(rows)  # [B, L + 2, D]


def load_unified_voice(
    ckpt_dir: Path, config: Mapping[str, Any], device: torch.device | str, family: ModelFamily | None = None
) -> UnifiedVoice:
    """Build the GPT of the model family (by default config.yaml's) from its config + gpt.safetensors
    shapes (the family checks the speaker mode the tensors have), load it strictly, and on CPU lay
    mel_head out for the decode step's GEMV (`UnifiedVoice.gemv_layout`)."""
    from .family import family_for  # the families import this module

    path = Path(ckpt_dir) / "gpt.safetensors"
    cfg = GPTConfig.from_yaml(config, read_shapes(path))
    family = family or family_for(config)
    family.check_gpt(cfg)
    gpt = load_module(lambda: family.gpt_class(cfg), path, device)
    if torch.device(device).type == "cpu":
        gpt.gemv_layout()
    return gpt


def decode_copy(gpt: UnifiedVoice, dtype: torch.dtype) -> UnifiedVoice:
    """The same weights in `dtype`, for a half-precision decode loop beside the float32 model (which
    keeps the conditioning and the second pass). Built tensor by tensor: no second float32 copy."""
    with torch.device("meta"):
        twin = type(gpt)(gpt.cfg)
    twin.load_state_dict({k: v.to(dtype) for k, v in gpt.state_dict().items()}, assign=True)
    device = next(gpt.parameters()).device
    build_buffers(twin, device)
    return twin.to(dtype).eval().requires_grad_(False)


def load_emotion_matrices(ckpt_dir: Path, config: Mapping[str, Any], device: torch.device | str) -> EmotionMatrices:
    """feat1/feat2 from emotion.safetensors, grouped by the config's `emo_num`."""
    path = Path(ckpt_dir) / "emotion.safetensors"
    emo_num = [int(n) for n in require(config, "emo_num", "")]
    if len(emo_num) != EMO_CATEGORIES:
        raise ConfigError(f"config.yaml: emo_num has {len(emo_num)} groups, expected {EMO_CATEGORIES}")
    shapes = read_shapes(path)
    style_dim = shape(shapes, "spk_matrix", "emotion.safetensors")[1]
    model_dim = shape(shapes, "emo_matrix", "emotion.safetensors")[1]
    return load_module(lambda: EmotionMatrices(emo_num, style_dim, model_dim), path, device)
