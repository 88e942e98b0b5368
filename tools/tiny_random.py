"""Seeded random contents of `ttsd make-tiny` (tiny.py): values for every tensor, and bpe.model.

Weights are N(0, 1/fan_in) (weight-normed layers: v of that scale, g = ‖v‖ so the effective
weight is v), norm weights 1 + N(0, 0.05²), biases N(0, 0.02²), BatchNorm running variances in
[0.5, 1.5]; persistent buffers (conformer `pe`, BigVGAN filters, DiT `freqs`/`input_pos`) hold
the values the modules compute. Each file draws from its own generator seeded by (seed, file).

bpe.model is a SentencePiece BPE model trained on a small corpus: the English sentences of
tools/data/bpe-corpus-english.txt (upper-cased, as the normaliser leaves them) and the CJK
characters of tools/data/bpe-cjk-common.txt, extended from U+4E00 up for large vocabularies.
"""

from __future__ import annotations

import io
import math
import zlib
from importlib.resources import files
from typing import TypeVar

import torch
from torch import Tensor, nn

from ttsd.pipeline.bigvgan import AA_KERNEL, AA_RATIO, LowPassFilter1d, Snake, UpSample1d
from ttsd.pipeline.conformer import RelPositionalEncoding
from ttsd.pipeline.dit import DiT, TimestepEmbedder
from ttsd.pipeline.gpt import Conv1D
from ttsd.pipeline.layers import WeightNorm, WNConvTranspose1d
from ttsd.pipeline.semantic_codec import ConvNeXtBlock


def package_data(name: str) -> str:
    """A package data file of tools/data/ (installed as ttsd/tools/data/)."""
    return (files("ttsd.tools") / "data" / name).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# Initialisation


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


def file_generator(seed: int, name: str) -> torch.Generator:
    # One stream per file: regenerating one component never shifts another's values.
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


M = TypeVar("M", bound=nn.Module)


def initialised(module: M, gen: torch.Generator, *, layer_scale: float = 1.0) -> M:
    _Init(gen).run(module, layer_scale=layer_scale)
    return module.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# bpe.model

# English sentences (pangrams, prose, numbers, dates, emotions), one a line.
ENGLISH_CORPUS = package_data("bpe-corpus-english.txt")
# Frequent simplified characters (plus those of the usual test sentences); the tiny vocabulary
# keeps the first TINY_CJK_CHARS, the full one also takes code points from U+4E00 up.
CJK_COMMON = "".join(package_data("bpe-cjk-common.txt").split())
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


def train_tiktoken(merges: int) -> bytes:
    """A byte-level BPE vocabulary in tiktoken's file format (`base64(piece) rank` per line): the 256
    single bytes, then `merges` pieces learnt from the English and CJK corpus, most frequent pair
    first, ties broken by the pair's bytes (so the same count gives the same file). Every text
    encodes with it (single bytes cover everything); IndexTTS-2.5 adds its special tokens after."""
    import base64
    from collections import Counter

    import regex

    from ttsd.pipeline.text.tiktoken_tokenizer import PAT_STR

    words = Counter(
        tuple(bytes([b]) for b in piece.encode("utf-8"))
        for line in bpe_corpus(TINY_CJK_CHARS)
        for piece in regex.findall(PAT_STR, line.lower())
    )
    ranks = [bytes([b]) for b in range(256)]
    for _ in range(merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        (a, b), _count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        ranks.append(a + b)
        merged: Counter[tuple[bytes, ...]] = Counter()
        for word, n in words.items():
            out: list[bytes] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return "".join(f"{base64.b64encode(piece).decode('ascii')} {rank}\n" for rank, piece in enumerate(ranks)).encode()
