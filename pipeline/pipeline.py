"""Pipeline: every IndexTTS2 component on one device, and the per-segment glue between them.

Ports the per-segment half of `IndexTTS2.infer_generator` (indextts/infer_v2.py): text →
segments → GPT codes and latent → s2mel (gpt_layer + vq2emb, length regulator, CFM) → BigVGAN.
`stream()` overlaps segment k+1's GPT with segment k's DiT + BigVGAN on two CUDA streams; on
CPU the same code runs sequentially. Shapes: M codes, D GPT width, T target mel frames,
P prompt mel frames."""

from __future__ import annotations

import dataclasses
import io
import logging
import secrets
import time
import wave
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import audio
from .bigvgan import BigVGAN, load_bigvgan, to_pcm_scale
from .campplus import CAMPPlus, load_campplus
from .config import load_yaml
from .errors import BadOptions, BadText, CheckpointError, ConfigError
from .flow import CFM, load_cfm
from .generate import DecodeParams, generate
from .gpt import (
    EmotionMatrices,
    KVCache,
    UnifiedVoice,
    interpolate_emovec,
    load_emotion_matrices,
    load_unified_voice,
    scale_emo_vector,
)
from .length_regulator import InterpolateRegulator, load_gpt_layer, load_length_regulator, mel_lengths
from .options import SynthesisOptions
from .pcm import PCM_MAX, to_s16le
from .semantic_codec import SemanticCodec, load_semantic_codec
from .text import TextNormalizer, TextTokenizer, split_segments
from .voice import AudioSource, Voice, prepare_voice
from .w2v_bert import W2VBert, W2VStats, load_w2v_bert

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True, slots=True)
class Segment:
    index: int  # 0, 1, 2, ... within one request
    pieces: list[str]  # BPE pieces
    text_ids: list[int]  # ids fed to the GPT
    text: str  # the pieces decoded back to readable text


@dataclass(frozen=True, kw_only=True, slots=True)
class GptOutput:
    codes: Tensor  # (1, M) int64 semantic codes, stop token trimmed
    latent: Tensor  # (1, M, D) float32 second-pass latent


def _seed_for(seed: int, segment: int) -> int:
    # One independent, reproducible RNG per segment: offline, streamed and interleaved runs of
    # the same request draw the same numbers whatever order the segments run in.
    return (seed * 1000 + segment) % (2**63)


class Pipeline:
    """All weights of one IndexTTS2 model on one device. Holds no per-request state: what a
    request needs (voice, options, seed, emotion vector) is passed in. It owns the reusable KV
    caches, so one thread drives a Pipeline at a time (the daemon's worker thread)."""

    sample_rate_hz = audio.SAMPLE_RATE_HZ

    def __init__(
        self,
        *,
        config: Mapping[str, Any],
        tokenizer: TextTokenizer,
        w2v: W2VBert,
        w2v_stats: W2VStats,
        codec: SemanticCodec,
        campplus: CAMPPlus,
        gpt: UnifiedVoice,
        gpt_layer: torch.nn.Module,
        length_regulator: InterpolateRegulator,
        cfm: CFM,
        bigvgan: BigVGAN,
        emotion: EmotionMatrices,
        device: torch.device,
        gpt_dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = True,
        max_num_beams: int = 4,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.w2v, self.w2v_stats, self.codec, self.campplus = w2v, w2v_stats, codec, campplus
        self.gpt, self.gpt_layer, self.length_regulator, self.cfm, self.bigvgan = (
            gpt,
            gpt_layer,
            length_regulator,
            cfm,
            bigvgan,
        )
        self.device = device
        self.gpt_dtype = gpt_dtype
        self.cuda_graphs = cuda_graphs  # CUDA only: the decode step compiled into CUDA graphs
        self.emotion = emotion
        self.max_num_beams = max_num_beams
        self._kv_base: KVCache | None = None
        self._kv: dict[int, KVCache] = {}
        # Prefetching segment k+1's GPT before handing out segment k only pays where the two can
        # run at once (two CUDA streams); on CPU it would only delay segment k.
        self.overlap_segments = device.type == "cuda"
        self.lanes = _Lanes(device)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        ckpt_dir: Path | str,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        *,
        cuda_graphs: bool = True,
        max_num_beams: int = 4,
    ) -> Pipeline:
        """Load a converted checkpoint directory (ttsd-convert output). `dtype` applies to the GPT;
        the acoustic side stays float32, as upstream runs it even in fp16 mode. `cuda_graphs`
        compiles the GPT decode step into CUDA graphs on CUDA devices. `max_num_beams` sizes the one
        KV cache every request decodes in (its rows); requests asking for more beams get BadOptions."""
        ckpt = Path(ckpt_dir)
        dev = torch.device(device)
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if dev.type == "cpu" and dtype == "float16":
            raise ConfigError("float16 needs a CUDA device; use float32 or bfloat16 on CPU")
        cfg_path = ckpt / "config.yaml"
        if not cfg_path.is_file():
            raise CheckpointError(f"{ckpt}: no config.yaml (convert the official checkpoint with ttsd-convert)")
        config = load_yaml(cfg_path)
        tokenizer = TextTokenizer.from_file(ckpt / "tokenizer.json", TextNormalizer(glossary_path=_glossary(ckpt)))
        w2v, w2v_stats = load_w2v_bert(ckpt, dev)
        s2mel = ckpt / "s2mel.safetensors"
        gpt = load_unified_voice(ckpt, config, dev)
        if dtype != "float32":
            gpt = gpt.to(DTYPES[dtype])
        return cls(
            config=config,
            tokenizer=tokenizer,
            w2v=w2v,
            w2v_stats=w2v_stats,
            codec=load_semantic_codec(ckpt, dev),
            campplus=load_campplus(ckpt, dev),
            gpt=gpt,
            gpt_layer=load_gpt_layer(s2mel, dev),
            length_regulator=load_length_regulator(s2mel, config, dev),
            cfm=load_cfm(s2mel, config, dev),
            bigvgan=load_bigvgan(ckpt / "bigvgan.safetensors", ckpt / "bigvgan.json", dev),
            emotion=load_emotion_matrices(ckpt, config, dev),
            device=dev,
            gpt_dtype=DTYPES[dtype],
            cuda_graphs=cuda_graphs,
            max_num_beams=max_num_beams,
        )

    @property
    def max_mel_tokens(self) -> int:
        return int(self.gpt.cfg.max_mel_tokens)

    # ------------------------------------------------------------------ voice and text

    def prepare_voice(
        self, spk_audio: AudioSource, emo_audio: AudioSource | None = None, max_input_s: float | None = None
    ) -> Voice:
        """Reference clip (and optional emotion clip) → cached conditioning. Raises BadAudio."""
        return prepare_voice(self, spk_audio, emo_audio, max_input_s)

    def check_options(self, opts: SynthesisOptions) -> SynthesisOptions:
        """`opts` if valid for this model and server, else BadOptions naming the field."""
        opts.validated()
        if opts.num_beams > self.max_num_beams:
            raise BadOptions(f"num_beams must be <= {self.max_num_beams} on this server")
        # Quote duplication can add one piece to a segment; the GPT's text position table must hold it.
        limit = self.gpt.cfg.max_text_tokens - 1
        if opts.max_text_tokens_per_segment > limit:
            raise BadOptions(f"max_text_tokens_per_segment must be <= {limit} for this model")
        return opts

    def split_text(self, text: str, opts: SynthesisOptions) -> list[Segment]:
        """Text → GPT-sized segments, exactly as upstream segments it. Raises BadText, BadOptions."""
        self.check_options(opts)
        pieces = self.tokenizer.tokenize(text)
        groups = split_segments(pieces, opts.max_text_tokens_per_segment, opts.quick_streaming_tokens)
        segments = [
            Segment(
                index=i, pieces=list(g), text_ids=self.tokenizer.convert_tokens_to_ids(g), text=self.tokenizer.decode(g)
            )
            for i, g in enumerate(g for g in groups if g)
        ]
        if not segments:
            raise BadText("nothing to speak: the text is empty after normalisation")
        return segments

    def warm_up(self) -> float:
        """Run a short synthesis for every beam count a request may use, so that on CUDA the decode
        step is compiled and its graphs recorded for each batch size before the first client waits
        on them. Returns the seconds taken."""
        t0 = time.perf_counter()
        voice = self.prepare_voice(warm_up_voice())
        for beams in range(1, self.max_num_beams + 1):
            opts = SynthesisOptions(num_beams=beams, max_mel_tokens=16, diffusion_steps=2, seed=0)
            self.synthesize(voice, "Warm up.", opts)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ emotion

    def emovec(
        self,
        voice: Voice,
        opts: SynthesisOptions,
        emo_voice: Voice | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The (1, D) emotion vector added to the speaker latents (infer_v2 + UnifiedVoice.merge_emovec)."""
        if opts.emo_vector is None:
            emo = voice.emovec_emo if emo_voice is None else emo_voice.emovec_self
            return interpolate_emovec(voice.emovec_spk, emo, opts.emo_alpha)
        weights = torch.tensor(scale_emo_vector(opts.emo_vector, opts.emo_alpha), dtype=torch.float32)
        rows = self.emotion.random_rows(generator) if opts.use_random else self.emotion.nearest_rows(voice.style)
        # Vector mode: the audio term is the speaker clip itself at merge alpha 1 (emovec_self).
        return self.emotion.mix(weights.to(self.device), rows, voice.emovec_self)

    # ------------------------------------------------------------------ one segment

    def _kv_cache(self, rows: int) -> KVCache:
        # One cache of max_num_beams rows, allocated at the first request and reused by all: each
        # beam count decodes in a view of its first rows, so memory is bounded whatever clients
        # ask for, and on CUDA the graphed decode step replays on the same addresses.
        if rows > self.max_num_beams:
            raise BadOptions(f"num_beams must be <= {self.max_num_beams} on this server")
        view = self._kv.get(rows)
        if view is None:
            if self._kv_base is None:
                self._kv_base = KVCache.for_slot(self.gpt.cfg, self.max_num_beams, self.device, self.gpt_dtype)
            view = self._kv[rows] = self._kv_base.rows(rows)
        return view

    @torch.inference_mode()
    def run_gpt(
        self,
        voice: Voice,
        segment: Segment,
        opts: SynthesisOptions,
        emovec: Tensor,
        *,
        seed: int,
        cancel: Callable[[], bool] | None = None,
        timings: dict[str, float] | None = None,
    ) -> GptOutput:
        """Autoregressive codes for one segment, then the second pass that yields the latent."""
        gen = torch.Generator(device=self.device).manual_seed(_seed_for(seed, segment.index))
        text = torch.tensor([segment.text_ids], dtype=torch.int64, device=self.device)  # [1, L]
        params = DecodeParams.from_options(opts)
        if params.max_mel_tokens > self.max_mel_tokens:
            params = dataclasses.replace(params, max_mel_tokens=self.max_mel_tokens)
        with _timed(timings, "gpt_s", self.device):
            prefix = self.gpt.build_prefix(voice.speech_latent, emovec, text)  # [1, 34 + L', D]
            cache = self._kv_cache(params.num_beams)
            codes = generate(
                self.gpt, prefix, params, generator=gen, cancel=cancel, cache=cache, graphs=self.cuda_graphs
            ).codes  # [1, M]
        with _timed(timings, "gpt_latent_s", self.device):
            latent = self.gpt.latent(voice.speech_latent, emovec, text, codes).float()  # [1, M, D]
        if timings is not None:
            timings["gpt_codes"] = timings.get("gpt_codes", 0.0) + codes.size(1)
        return GptOutput(codes=codes, latent=latent)

    @torch.inference_mode()
    def run_acoustic(
        self,
        voice: Voice,
        out: GptOutput,
        opts: SynthesisOptions,
        *,
        seed: int,
        segment_index: int,
        noise: Tensor | None = None,
        cancel: Callable[[], bool] | None = None,
        timings: dict[str, float] | None = None,
    ) -> Tensor:
        """GPT output → float PCM (N,) at ±32767 scale on the device (s2mel in float32, as upstream)."""
        m = out.codes.size(1)
        if m == 0:  # the GPT stopped at once: nothing to render for this segment
            return torch.zeros(0, device=self.device)
        with _timed(timings, "s2mel_s", self.device):
            mel = self.s2mel(voice, out, opts, seed, segment_index, noise, cancel)  # [1, 80, T]
        with _timed(timings, "bigvgan_s", self.device):
            return to_pcm_scale(self.bigvgan(mel))[0]  # [256 T]

    def s2mel(
        self,
        voice: Voice,
        out: GptOutput,
        opts: SynthesisOptions,
        seed: int,
        segment_index: int,
        noise: Tensor | None,
        cancel: Callable[[], bool] | None,
    ) -> Tensor:
        """gpt_layer + vq2emb → length regulator → CFM → the target mel (1, 80, T), in float32."""
        m = out.codes.size(1)
        s_infer = self.codec.vq2emb(out.codes).transpose(1, 2) + self.gpt_layer(out.latent)  # [1, M, Cw]
        target = mel_lengths(torch.tensor([m], device=self.device))  # floor(1.72 M) in float32, as upstream
        cond = self.length_regulator(s_infer, target)  # [1, T, C]
        mu = torch.cat([voice.prompt_condition, cond], dim=1)  # [1, P+T, C]
        gen = None
        if noise is None:
            gen = torch.Generator(device=self.device).manual_seed(_seed_for(seed, segment_index))
        mel = self.cfm.inference(
            mu,
            voice.ref_mel,
            voice.style,
            n_timesteps=opts.diffusion_steps,
            inference_cfg_rate=opts.inference_cfg_rate,
            noise=None if noise is None else noise.to(self.device),
            generator=gen,
            cancel=cancel,
        )
        return mel[:, :, voice.ref_mel.size(2) :]  # [1, 80, T]

    # ------------------------------------------------------------------ whole requests

    def stream(
        self,
        voice: Voice,
        segments: Sequence[Segment],
        opts: SynthesisOptions,
        *,
        emo_voice: Voice | None = None,
        noise: Mapping[int, Tensor] | None = None,
        cancel: Callable[[], bool] | None = None,
        timings: dict[str, float] | None = None,
    ) -> Iterator[tuple[Segment, np.ndarray]]:
        """Yield (segment, PCM) as each segment finishes. On CUDA the GPT of segment k+1 runs on
        its own stream while segment k's DiT + BigVGAN run on another; on CPU the same code runs
        the stages one after the other."""
        seed = opts.seed if opts.seed is not None else secrets.randbits(62)
        noise = noise or {}
        lanes = self.lanes
        lanes.start()
        with lanes.on(lanes.gpt):  # made and read on the GPT lane only: no cross-stream lifetime to manage
            gen = torch.Generator(device=self.device).manual_seed(seed)
            emovec = self.emovec(voice, opts, emo_voice, gen).to(self.gpt_dtype)
        pending: tuple[GptOutput, torch.cuda.Event | None] | None = None

        def gpt(k: int) -> tuple[GptOutput, torch.cuda.Event | None]:
            with lanes.on(lanes.gpt):
                out = self.run_gpt(voice, segments[k], opts, emovec, seed=seed, cancel=cancel, timings=timings)
                return out, lanes.mark(lanes.gpt)

        for k, seg in enumerate(segments):
            out, gpt_done = pending if pending is not None else gpt(k)
            lanes.hand_over(gpt_done, lanes.acoustic, out.codes, out.latent)  # GPT lane → acoustic lane
            with lanes.on(lanes.acoustic):
                pcm = self.run_acoustic(
                    voice,
                    out,
                    opts,
                    seed=seed,
                    segment_index=seg.index,
                    noise=noise.get(seg.index),
                    cancel=cancel,
                    timings=timings,
                ).to("cpu", non_blocking=True)
                acoustic_done = lanes.mark(lanes.acoustic)
            # Segment k+1's decode runs while segment k's DiT + BigVGAN are on the GPU. Not after
            # segment 0: its audio goes out as soon as it exists, so first audio waits on nothing.
            pending = gpt(k + 1) if self.overlap_segments and 0 < k < len(segments) - 1 else None
            lanes.wait_host(acoustic_done)  # the host waits for segment k's audio only
            yield seg, pcm.numpy()

    def synthesize(
        self,
        voice: Voice,
        text: str,
        opts: SynthesisOptions | None = None,
        *,
        emo_voice: Voice | None = None,
        noise: Mapping[int, Tensor] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """Offline synthesis: all segments joined by `interval_silence_ms` of zeros → float32 (N,)."""
        opts = self.check_options(opts or SynthesisOptions())
        segments = self.split_text(text, opts)
        silence = np.zeros(int(self.sample_rate_hz * opts.interval_silence_ms / 1000), dtype=np.float32)
        parts: list[np.ndarray] = []
        for _, pcm in self.stream(voice, segments, opts, emo_voice=emo_voice, noise=noise, cancel=cancel):
            if parts:
                parts.append(silence)  # between segments only, as upstream's insert_interval_silence
            parts.append(pcm)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def warm_up_voice(seconds: float = 2.0) -> bytes:
    """A deterministic reference clip for warm_up, as 16-bit mono WAV bytes: a 100 → 400 Hz chirp
    with a little seeded noise (any voiced-looking signal serves: only the shapes matter)."""
    rate = audio.SAMPLE_RATE_HZ
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (100 * t + 150 * t**2 / seconds)  # instantaneous frequency 100 + 300 t / seconds Hz
    x = 0.3 * np.sin(phase) + 0.02 * np.random.default_rng(0).standard_normal(t.size)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(to_s16le(x * PCM_MAX))
    return buf.getvalue()


def _glossary(ckpt: Path) -> Path | None:
    # Upstream: a glossary.yaml next to the checkpoint replaces the built-in term glossary.
    path = ckpt / "glossary.yaml"
    return path if path.is_file() else None


@contextmanager
def _timed(timings: dict[str, float] | None, key: str, device: torch.device) -> Iterator[None]:
    """Add the wall time of the block to timings[key]; a no-op (and no sync) without timings."""
    if timings is None:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync on purpose: only when timings are requested
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


class _Lanes:
    """The GPT lane and the acoustic lane: two CUDA streams created once, or, on CPU, no-ops so
    the same stream() code runs sequentially. Every hand-off between lanes goes through here."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.gpt = torch.cuda.Stream(device) if self.cuda else None
        self.acoustic = torch.cuda.Stream(device) if self.cuda else None

    def start(self) -> None:
        if self.cuda:
            main = torch.cuda.current_stream(self.device)
            for lane in (self.gpt, self.acoustic):
                if lane is not None:
                    lane.wait_stream(main)  # voice tensors were produced on the main stream

    def on(self, lane: torch.cuda.Stream | None) -> AbstractContextManager[object]:
        return torch.cuda.stream(lane) if lane is not None else nullcontext()

    def mark(self, lane: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        if lane is None:
            return None
        event = torch.cuda.Event()
        event.record(lane)
        return event

    def hand_over(self, event: torch.cuda.Event | None, to: torch.cuda.Stream | None, *tensors: Tensor) -> None:
        if event is None or to is None:
            return
        to.wait_event(event)  # produced on the other lane: wait for it on this one ...
        for t in tensors:
            t.record_stream(to)  # ... and keep its memory alive until this lane is done with it

    def wait_host(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            event.synchronize()
