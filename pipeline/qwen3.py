"""Qwen3 causal language model, the backbone of QwenEmotion, with batched greedy decoding.

Ports transformers 4.52 models/qwen3/modeling_qwen3.py (`Qwen3ForCausalLM`) for inference, as
upstream's QwenEmotion runs it through `AutoModelForCausalLM` and `generate()` (greedy). Each
layer: x += o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v)), then x += down(silu(gate(h)) · up(h)),
where h is the RMSNorm of x; GQA shares each key/value head among `num_attention_heads /
num_key_value_heads` query heads; the LM head is tied to the token embedding when the config says so.

Decoding keeps one static KV cache for the whole batch, created once per call: every prompt is one
row, right-padded, with its own cache positions and mask, so a prompt's tokens do not depend on
which other prompts share the batch (pad slots are never attended: a row's queries see only its own
earlier slots). Shapes: B rows, T prompt tokens (padded), N new tokens, S cache slots, D hidden,
H query heads, Hkv key/value heads, G = H / Hkv, Dh head width, F MLP width, V vocabulary."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttsd.api.errors import ConfigError

from .config import require
from .weights import load_module

STOP_CHECK_EVERY = 8  # decode steps between host syncs (have all rows emitted an eos id?)
SEQ_ALIGN = 64  # attention reads the cache in multiples of this many slots (fewer distinct shapes)


@dataclass(frozen=True, kw_only=True, slots=True)
class Qwen3Config:
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int
    num_attention_heads: int  # H
    num_key_value_heads: int  # Hkv
    head_dim: int  # Dh (Qwen3 sets it apart from D / H: the real model has 16 heads of 128 at D 1024)
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int  # V
    tie_word_embeddings: bool  # no lm_head.weight in the file: logits = h · embed_tokens.weightᵀ
    attention_bias: bool

    @property
    def groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_json(cls, path: Path) -> Qwen3Config:
        """config.json of a Qwen3ForCausalLM folder; anything this port does not implement is a ConfigError."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from e
        file = str(path)
        if raw.get("model_type") != "qwen3":
            raise ConfigError(f"{file}: model_type {raw.get('model_type')!r}, expected 'qwen3'")
        # Keys that would change the computation; each one's value here is the only one ported.
        for key, supported in (("hidden_act", "silu"), ("rope_scaling", None), ("use_sliding_window", False)):
            if raw.get(key, supported) != supported:
                raise ConfigError(f"{file}: {key} {raw[key]!r} is not supported (only {supported!r})")
        cfg = cls(
            hidden_size=int(require(raw, "hidden_size", file=file)),
            intermediate_size=int(require(raw, "intermediate_size", file=file)),
            num_hidden_layers=int(require(raw, "num_hidden_layers", file=file)),
            num_attention_heads=int(require(raw, "num_attention_heads", file=file)),
            num_key_value_heads=int(require(raw, "num_key_value_heads", file=file)),
            head_dim=int(require(raw, "head_dim", file=file)),
            rms_norm_eps=float(require(raw, "rms_norm_eps", file=file)),
            rope_theta=float(require(raw, "rope_theta", file=file)),
            vocab_size=int(require(raw, "vocab_size", file=file)),
            tie_word_embeddings=bool(require(raw, "tie_word_embeddings", file=file)),
            attention_bias=bool(raw.get("attention_bias", False)),  # Qwen3Config's default
        )
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(f"{file}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {cfg.num_key_value_heads}")
        return cfg


@dataclass(frozen=True, slots=True)
class KVCache:
    """Keys and values of every layer for one batch: k, v [L, B, Hkv, S, Dh], zeroed (a masked slot
    gets softmax weight exactly 0, and 0 · garbage could be NaN)."""

    k: Tensor
    v: Tensor

    @classmethod
    def empty(cls, cfg: Qwen3Config, rows: int, slots: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, slots, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def slots(self) -> int:
        return self.k.size(3)


class Qwen3RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # As HF: normalise in float32, scale in the input dtype (a no-op cast for a float32 model).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Qwen3RotaryEmbedding(nn.Module):
    inv_freq: Tensor

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.head_dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)  # not in the file

    def build_buffers(self, device: torch.device) -> None:
        # HF's default rope init: 1 / θ^(2i/Dh), the exponent computed in float32.
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        self.inv_freq = 1.0 / (self.theta**exponent)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, T] int64 → cos, sin [B, 1, T, Dh] float32 (rotate-half layout: halves repeat)."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [B, T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, Dh]; a small per-call table, not a cache
        return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = Qwen3RMSNorm(cfg.head_dim, cfg.rms_norm_eps)  # per head, before RoPE
        self.k_norm = Qwen3RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], rows: Tensor, input_pos: Tensor, k_cache: Tensor,
                v_cache: Tensor, mask: Tensor) -> Tensor:
        """x [B, T, D]; rows [B, 1] = 0..B-1; input_pos [B, T] the cache slot of each token; caches
        [B, Hkv, S, Dh]; mask [B, 1, T, n] True where a query may see a slot among the first n."""
        b, t, _ = x.shape
        cos, sin = rope
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim)).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)  # [B, T, Hkv, Dh]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # Row b writes its T new entries at its own slots input_pos[b], in place (index_put_).
        k_cache[rows, :, input_pos] = k.transpose(1, 2)
        v_cache[rows, :, input_pos] = v
        n = mask.size(-1)
        g = self.heads // self.kv_heads
        # Query head h reads key/value head h // G (HF repeat_kv), without materialising the repeat.
        q = q.reshape(b, self.kv_heads, g * t, self.head_dim)  # [B, Hkv, G·T, Dh]
        # Plain matmul + softmax rather than SDPA, as gpt.py: SDPA's CPU kernel splits work by batch
        # size, so a row's result would depend on how many rows share the call.
        scores = (q @ k_cache[:, :, :n].transpose(-1, -2)) * self.scale  # [B, Hkv, G·T, n]
        scores = scores.view(b, self.kv_heads, g, t, n).masked_fill(~mask.unsqueeze(1), -math.inf)
        p = scores.float().softmax(dim=-1).to(q.dtype).view(b, self.kv_heads, g * t, n)
        y = (p @ v_cache[:, :, :n]).view(b, self.heads, t, self.head_dim)  # [B, H, T, Dh]
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], rows: Tensor, input_pos: Tensor, k_cache: Tensor,
                v_cache: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, rows, input_pos, k_cache, v_cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """Keys model.embed_tokens, model.layers.{i}.*, model.norm (rotary_emb holds no stored tensor)."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(cfg)


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Qwen3Model(cfg)
        # Declared only when untied: the released file has no lm_head.weight (tie_word_embeddings).
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, tokens: Tensor, input_pos: Tensor, cache: KVCache, n_slots: int, last: Tensor) -> Tensor:
        """tokens, input_pos [B, T] → logits [B, V] of the token at index last[b] of each row.

        Token (b, i) is written to slot input_pos[b, i] and attends to the slots ≤ its own among the
        first `n_slots`; the caller guarantees a row's earlier slots hold its own earlier tokens."""
        rows = torch.arange(tokens.size(0), device=tokens.device).unsqueeze(1)  # [B, 1]
        slots = torch.arange(n_slots, device=tokens.device)
        mask = (slots <= input_pos.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, n]
        rope = self.model.rotary_emb(input_pos)
        x = self.model.embed_tokens(tokens)  # [B, T, D]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, rows, input_pos, cache.k[i], cache.v[i], mask)
        h = self.model.norm(x[rows.squeeze(1), last])  # [B, D]: only the rows' last tokens
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)  # [B, V]


@dataclass(frozen=True, slots=True)
class Greedy:
    """What `greedy` produced, on the host."""

    generated: list[list[int]]  # per row: new ids up to and including the first eos id (or the budget)
    eos_reached: list[bool]
    logits: Tensor | None  # [B, K, V] float32 logits of the first K steps (step 0: after the prompt), if asked


@torch.inference_mode()
def greedy(model: Qwen3ForCausalLM, prompts: list[list[int]], eos_ids: frozenset[int], max_new_tokens: int,
           pad_id: int, record_logits: int = 0) -> Greedy:
    """Greedy decoding of every prompt at once (HF `generate` with do_sample False and num_beams 1):
    argmax over the whole vocabulary (first index on ties, as torch.argmax), stopping a row right
    after it emits an id of `eos_ids`. A row that reaches `max_new_tokens` without one stops there.

    One prefill of all rows right-padded with `pad_id`, then one token per row per step. The KV
    cache, the output buffer and the positions are created once; the host looks at the device
    only every STOP_CHECK_EVERY steps (have all rows finished?) and once at the end."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("greedy needs at least one prompt and no empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    weight = model.model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    b, t = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [B]
    tokens = torch.tensor([p + [pad_id] * (t - len(p)) for p in prompts], device=device)  # [B, T]
    # Slot j holds position j; a row's last new token goes to slot len + N - 2 at most.
    cache = KVCache.empty(model.cfg, b, t + max_new_tokens, device, dtype)
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), device=device)
    recorded = torch.empty((b, record_logits, model.cfg.vocab_size), device=device) if record_logits else None

    positions = torch.arange(t, device=device).expand(b, t)  # [B, T]: pads sit after a row's tokens
    logits = model(tokens, positions, cache, t, lengths - 1)  # [B, V]
    input_pos = lengths.clone().unsqueeze(1)  # [B, 1]: the slot of each row's next token
    first = torch.zeros_like(lengths)  # a decode step feeds one token per row: logits of index 0
    steps = max_new_tokens
    for step in range(max_new_tokens):
        if recorded is not None and step < record_logits:
            recorded[:, step] = logits
        tok = logits.argmax(dim=-1)  # [B]
        out[:, step] = tok
        done |= torch.isin(tok, eos)
        if step + 1 == max_new_tokens:
            break
        # Host sync, every few steps on purpose: the extra tokens of finished rows are trimmed below.
        if (step + 1) % STOP_CHECK_EVERY == 0 and bool(done.all()) and step + 1 >= record_logits:
            steps = step + 1
            break
        # Attend over the longest row's slots so far, rounded up (a host-side number: no sync).
        n = min(cache.slots, -(-(t + step + 1) // SEQ_ALIGN) * SEQ_ALIGN)
        logits = model(tok.unsqueeze(1), input_pos, cache, n, first)
        input_pos.add_(1)

    generated, reached = [], []
    for row in out[:, :steps].tolist():  # the one host copy of the ids
        stop = next((i for i, x in enumerate(row) if x in eos_ids), None)
        generated.append(row if stop is None else row[: stop + 1])
        reached.append(stop is not None)
    return Greedy(generated, reached, None if recorded is None else recorded.float().cpu())


def load_qwen3(folder: Path, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM:
    """config.json + model.safetensors of a Qwen3ForCausalLM folder, loaded strictly, its weights cast
    to `dtype` on the host (the release stores bfloat16; float32 is an exact upcast and upstream's CPU
    parity dtype; the device never holds the bfloat16 copy beside the float32 one)."""
    folder = Path(folder)
    cfg = Qwen3Config.from_json(folder / "config.json")
    return load_module(lambda: Qwen3ForCausalLM(cfg), folder / "model.safetensors", device, dtype=dtype)


def expected_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes a Qwen3ForCausalLM of `cfg` stores (built on meta: no memory)."""
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
