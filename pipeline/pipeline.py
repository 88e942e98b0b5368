"""Pipeline: every IndexTTS2 component on one device, the per-segment glue between them, and the facade
the daemon and the command line use.

Ports the per-segment half of `IndexTTS2.infer_generator` (indextts/infer_v2.py): text →
segments → GPT codes and latent → s2mel (gpt_layer + vq2emb, length regulator, CFM) → BigVGAN.
IndexTTS-2.5 (infer_v2_5.py) differs in three per-segment steps, each answered by the model's
family (family.py, picked once in `load`): its text front end (tiktoken, a `<|lang|> ` prefix, a
language row per text position), no second GPT pass (the 2.5 codec decodes the codes alone into
S_infer at twice their length), and `duration_factor` stretching the target length. Everything
else is shared.
Each step exists once, as a method on one segment (or on a list of segments where batching pays):
`run_gpt` / `run_acoustic` chain them for one segment alone (the plain reference path), and the
engine (engine.py) runs the same methods for many requests at once. `stream()` and `synthesize()`
drive an engine with one request. Shapes: M codes, D GPT width, T target mel frames, P prompt mel
frames, C regulator channels, Cw w2v width."""

from __future__ import annotations

import io
import logging
import math
import time
import wave
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ttsd.api.errors import BadOptions, BadText, ConfigError, TtsdError
from ttsd.api.options import SynthesisOptions

from . import audio
from .accel import ROW_BUCKETS, Streams, step_function
from .bigvgan import BigVGAN, VocoderGraphs, load_bigvgan, to_pcm_scale
from .campplus import CAMPPlus, load_campplus
from .chunking import ChunkInput
from .config import load_yaml
from .decode import DecodeParams, DecodeRequest, Generated, generate, sampling_key
from .device import resolve_device, upload
from .engine import AcousticInput, Engine, Request, RequestFailed, SegmentAudio, SegmentDone, run_to_end
from .errors import CheckpointError, DeviceFault
from .family import Codec, ModelFamily, family_for
from .flow import CFM, CFMRow, CFMSolve, CFMWorkspaces, load_cfm
from .gpt import (
    EmotionMatrices,
    LatentGraphs,
    UnifiedVoice,
    decode_copy,
    interpolate_emovec,
    load_emotion_matrices,
    load_unified_voice,
    scale_emo_vector,
)
from .length_regulator import InterpolateRegulator, RegulatorGraphs, load_length_regulator
from .qwen_emo import DEFAULT_MAX_NEW_TOKENS, QWEN_EMO_DIR, QwenEmotion, load_qwen_emo
from .requests import Segment
from .text import TextNormalizer
from .voice import AudioSource, Voice, prepare_voice, voice_from_bytes, voice_to_bytes
from .w2v_bert import W2VBert, W2VStats, load_w2v_bert

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WARM_UP_TEXT = "Warm up."
NO_EMO_TEXT = (f"emotion from text (emo_text, use_emo_text) needs the checkpoint's QwenEmotion model, which "
               f"this server has not loaded (the checkpoint has no {QWEN_EMO_DIR}/, or it was started with "
               "--no-emo-text); set the emotion with emo_vector or an emotion voice instead")

@dataclass(frozen=True, slots=True)
class PrepGraphs:
    """An engine's graphs for turning codes into CFM inputs (CUDA): the second pass (None for a family
    without one) and the length regulator, each one replay per job."""

    latent: LatentGraphs | None
    regulator: RegulatorGraphs


@dataclass(frozen=True, kw_only=True, slots=True)
class GptOutput:
    codes: Tensor  # (1, M) int64 semantic codes, stop token trimmed
    latent: Tensor | None  # (1, M, D) float32 second-pass latent; None for IndexTTS-2.5 (no second pass)


def seed_for(seed: int, segment: int) -> int:
    """One independent, reproducible RNG seed per segment: offline, streamed and batched runs of
    the same request draw the same numbers whatever order the segments run in."""
    return (seed * 1000 + segment) % (2**63)


class Pipeline:
    """All weights of one IndexTTS2 model on one device. Holds no per-request state: what a
    request needs (voice, options, seed, emotion vector) is passed in; batches live in engines."""

    sample_rate_hz = audio.SAMPLE_RATE_HZ

    def __init__(
        self,
        *,
        family: ModelFamily,
        tokenizer: object,
        w2v: W2VBert,
        w2v_stats: W2VStats,
        codec: Codec,
        campplus: CAMPPlus,
        gpt: UnifiedVoice,
        gpt_layer: torch.nn.Module | None,
        length_regulator: InterpolateRegulator,
        cfm: CFM,
        bigvgan: BigVGAN,
        emotion: EmotionMatrices,
        device: torch.device,
        decode_gpt: UnifiedVoice | None = None,
        acoustic_dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = True,
        compile: bool | None = None,
        max_num_beams: int = 4,
        max_batch_rows: int = 16,
        qwen_emo: QwenEmotion | None = None,
    ) -> None:
        family.check_parts(tokenizer, codec, gpt_layer)
        self.family = family  # what differs between model versions; nothing here compares them
        self.version = family.name
        self.qwen_emo = qwen_emo  # emotion from text; None when the checkpoint has no QwenEmotion folder
        self.languages = family.languages
        self.tokenizer = tokenizer  # the family's text front end
        self.w2v, self.w2v_stats, self.codec, self.campplus = w2v, w2v_stats, codec, campplus
        # `gpt` (float32) conditions, builds prefixes and runs the second pass; `decode_gpt`, the same
        # weights in the decode dtype (or `gpt` itself), runs the decode loop.
        self.gpt, self.gpt_layer, self.length_regulator = gpt, gpt_layer, length_regulator
        self.decode_gpt = decode_gpt if decode_gpt is not None else gpt
        self.cfm, self.bigvgan, self.emotion = cfm, bigvgan, emotion
        self.device = device
        self.gpt_dtype = next(self.decode_gpt.parameters()).dtype  # the decode loop's dtype
        # float32: the parity path. Otherwise the DiT/CFM runs under autocast in this dtype.
        self.acoustic_dtype = acoustic_dtype
        self.acoustic_autocast = None if acoustic_dtype == torch.float32 else acoustic_dtype
        self.max_num_beams = max_num_beams
        self.max_batch_rows = max_batch_rows
        self.lanes = Streams(device)
        self.cuda_graphs = cuda_graphs  # CUDA: the decode step replays CUDA graphs ...
        self.compile = device.type == "cuda" if compile is None else compile  # ... compiled with inductor first
        self.row_buckets: tuple[int, ...] = ROW_BUCKETS if device.type == "cuda" and cuda_graphs else ()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        ckpt_dir: Path | str,
        device: str | torch.device = "auto",
        dtype: str = "float32",
        *,
        acoustic_dtype: str = "float32",
        cuda_graphs: bool = True,
        compile: bool | None = None,
        max_num_beams: int = 4,
        max_batch_rows: int = 16,
        emo_text: bool = True,
    ) -> Pipeline:
        """Load a converted checkpoint directory (ttsd-convert output) of IndexTTS-2 or IndexTTS-2.5
        (the config's `version` says which). `device` "auto" is CUDA when available; `dtype` applies
        to the GPT's decode loop (conditioning, prefixes and the second-pass latent stay float32, so
        a half decode changes the audio only where it picks other codes); `acoustic_dtype` (float32
        by default, as upstream runs it even in fp16 mode) runs the DiT/CFM under autocast when it
        is bfloat16 or float16 (CUDA). `compile` (default: on CUDA only) compiles the decode
        step with inductor.
        `max_batch_rows` sizes the decode batch (one row per beam of every segment decoding at once);
        `max_num_beams` is the most beams one request may ask for. With `emo_text`, the checkpoint's
        emotion-from-text model (qwen_emo.py) is loaded too when the directory has one."""
        ckpt = Path(ckpt_dir)
        dev = resolve_device(str(device))
        for name, value in (("dtype", dtype), ("acoustic_dtype", acoustic_dtype)):
            if value not in DTYPES:
                raise ConfigError(f"{name} must be one of {sorted(DTYPES)}, got {value!r}")
            if dev.type == "cpu" and value == "float16":
                raise ConfigError(f"{name} float16 needs a CUDA device; use float32 or bfloat16 on CPU")
        if not 1 <= max_num_beams <= max_batch_rows:
            raise ConfigError(f"max_num_beams must be in [1, max_batch_rows={max_batch_rows}], got {max_num_beams}")
        cfg_path = ckpt / "config.yaml"
        if not cfg_path.is_file():
            raise CheckpointError(f"{ckpt}: no config.yaml (convert the official checkpoint with ttsd-convert)")
        config = load_yaml(cfg_path)
        family = family_for(config)  # the one place the model version is read
        normalizer = TextNormalizer(glossary_path=_glossary(ckpt))
        gpt = load_unified_voice(ckpt, config, dev, family)  # the family's GPT class, its speaker mode checked
        s2mel = ckpt / "s2mel.safetensors"
        tokenizer = family.load_front_end(ckpt, normalizer, gpt.cfg)
        codec, gpt_layer = family.load_codec(ckpt, config, dev), family.load_gpt_layer(s2mel, dev)
        w2v, w2v_stats = load_w2v_bert(ckpt, dev)
        return cls(
            family=family,
            tokenizer=tokenizer,
            w2v=w2v,
            w2v_stats=w2v_stats,
            codec=codec,
            campplus=load_campplus(ckpt, dev),
            gpt=gpt,
            gpt_layer=gpt_layer,
            length_regulator=load_length_regulator(s2mel, config, dev),
            cfm=load_cfm(s2mel, config, dev),
            bigvgan=load_bigvgan(ckpt / "bigvgan.safetensors", ckpt / "bigvgan.json", dev),
            emotion=load_emotion_matrices(ckpt, config, dev),
            device=dev,
            decode_gpt=None if dtype == "float32" else decode_copy(gpt, DTYPES[dtype]),
            acoustic_dtype=DTYPES[acoustic_dtype],
            cuda_graphs=cuda_graphs,
            compile=compile,
            max_num_beams=max_num_beams,
            max_batch_rows=max_batch_rows,
            qwen_emo=load_qwen_emo(ckpt, dev) if emo_text else None,
        )

    @property
    def max_mel_tokens(self) -> int:
        return int(self.gpt.cfg.max_mel_tokens)

    # ------------------------------------------------------------------ voice, text, options

    def prepare_voice(
        self, spk_audio: AudioSource, emo_audio: AudioSource | None = None, max_input_s: float | None = None
    ) -> Voice:
        """Reference clip (and optional emotion clip) → cached conditioning. Raises BadAudio. Safe to call
        from another thread while an engine runs (CUDA: on the voice stream; returns once it is computed)."""
        lanes = self.lanes
        with lanes.on(lanes.voice):
            lanes.start(lanes.voice)
            voice = prepare_voice(self, spk_audio, emo_audio, max_input_s)
            lanes.publish(lanes.voice, voice.tensors())
        return voice

    def voice_to_bytes(self, voice: Voice, metadata: Mapping[str, str]) -> bytes:
        """A prepared voice → one safetensors file's bytes with `metadata` in its header (the voice
        library stores these; pipeline/voice.py has the layout)."""
        return voice_to_bytes(voice, metadata)

    def voice_from_bytes(self, data: bytes) -> tuple[Voice, dict[str, str]]:
        """`voice_to_bytes` output → (Voice on this pipeline's device, metadata); VoiceFileError when
        the bytes are not a whole stored voice. Safe from any thread, like prepare_voice (CUDA: copied
        on the voice stream, published to the others)."""
        lanes = self.lanes
        with lanes.on(lanes.voice):
            voice, metadata = voice_from_bytes(data, self.device)
            lanes.publish(lanes.voice, voice.tensors())
        return voice, metadata

    def check_options(self, opts: SynthesisOptions) -> SynthesisOptions:
        """`opts` (checked when it was built) if valid for this model and server, else BadOptions naming the field."""
        if opts.num_beams > self.max_num_beams:
            raise BadOptions(f"num_beams must be <= {self.max_num_beams} on this server")
        # Quote duplication can add one piece to a segment; the GPT's text position table must hold it.
        limit = self.gpt.cfg.max_text_tokens - 1
        if opts.max_text_tokens_per_segment > limit:
            raise BadOptions(f"max_text_tokens_per_segment must be <= {limit} for this model")
        self.family.check_options(opts)
        if opts.wants_emotion_text and self.qwen_emo is None:
            raise BadOptions(NO_EMO_TEXT)
        return opts

    def split_text(self, text: str, opts: SynthesisOptions) -> list[Segment]:
        """Text → GPT-sized segments, exactly as upstream segments it. Raises BadText, BadOptions."""
        self.check_options(opts)
        return self.family.split_text(self.tokenizer, text, opts)

    def split_pieces(
        self, texts: Iterable[str], opts: SynthesisOptions, *, incremental: bool,
        stopped: Callable[[], bool] = lambda: False,
    ) -> tuple[list[tuple[Segment, ...]], TtsdError | None]:
        """Each text's segments, one tuple per text, and the error that ended the request, if any: the
        one rule for a request's text, wherever it is split. An incremental request skips a piece with
        nothing to say ("**", "..." between sentences of a stream); any other request fails on it.
        `stopped` is asked before each text: a request that ended needs no more of its text split."""
        pieces: list[tuple[Segment, ...]] = []
        for text in texts:
            if stopped():
                break
            try:
                pieces.append(tuple(self.split_text(text, opts)))
            except BadText as e:
                if incremental:
                    log.debug("skipped unspeakable text chars=%d", len(text))
                    continue
                return pieces, e
            except TtsdError as e:
                return pieces, e
        return pieces, None

    # ------------------------------------------------------------------ emotion

    def emovec(
        self,
        voice: Voice,
        opts: SynthesisOptions,
        emo_voice: Voice | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The (1, D) emotion vector added to the speaker latents (infer_v2 + UnifiedVoice.merge_emovec).
        Emotion from text must have been read into emo_vector first (read_emotion_texts)."""
        assert not opts.wants_emotion_text, "emotion text not read before the request ran"
        if opts.emo_vector is None:
            emo = voice.emovec_emo if emo_voice is None else emo_voice.emovec_self
            # Upstream sets emo_alpha to 1 when no emotion clip is given (the speaker clip stands in).
            alpha = opts.emo_alpha if emo_voice is not None or voice.has_emotion_clip else 1.0
            return interpolate_emovec(voice.emovec_spk, emo, alpha)
        weights = upload(scale_emo_vector(opts.emo_vector, opts.emo_alpha), self.device, torch.float32)
        rows = self.emotion.random_rows(generator) if opts.use_random else self.emotion.nearest_rows(voice.style)
        # Vector mode: the audio term is the speaker clip itself at merge alpha 1 (emovec_self).
        return self.emotion.mix(weights, rows, voice.emovec_self)

    def read_emotion_texts(self, requests: Sequence[tuple[SynthesisOptions, str]],
                           max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[SynthesisOptions | TtsdError]:
        """Emotion from text for several requests at once: (options asking for it, the request's text)
        → the options with QwenEmotion's scores as emo_vector (`with_emotion_vector`), or the error
        that request's answer gave (EmotionTextError). All prompts decode as one greedy batch (each
        answer as it would be alone); a text asked for twice decodes once. On CUDA it runs on the
        voice stream, so a daemon's decode steps never queue behind it. Raises BadOptions without the
        model."""
        qwen = self.qwen_emo
        if qwen is None:
            raise BadOptions(NO_EMO_TEXT)
        texts: list[str] = []
        for opts, text in requests:
            wanted = opts.emotion_text(text)
            assert wanted is not None, "read_emotion_texts got options that do not ask for emotion from text"
            texts.append(wanted)
        unique = list(dict.fromkeys(texts))
        lanes = self.lanes
        t0 = time.perf_counter()
        with lanes.on(lanes.voice):
            lanes.start(lanes.voice)
            answers = dict(zip(unique, qwen.generate(unique, max_new_tokens), strict=True))
        log.info("emotion text read requests=%d prompts=%d read_ms=%.0f", len(requests), len(unique),
                 (time.perf_counter() - t0) * 1000)
        out: list[SynthesisOptions | TtsdError] = []
        for (opts, _), text in zip(requests, texts, strict=True):
            try:
                out.append(opts.with_emotion_vector(answers[text].vector()))
            except TtsdError as e:
                out.append(e)
        return out

    def request_emovec(self, voice: Voice, opts: SynthesisOptions, emo_voice: Voice | None) -> Tensor:
        """The request's emotion vector (float32); `use_random` rows come from its seed."""
        seed = 0 if opts.seed is None else opts.seed
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return self.emovec(voice, opts, emo_voice, gen)

    # ------------------------------------------------------------------ the GPT

    def decode_request(self, voice: Voice, segment: Segment, opts: SynthesisOptions, emovec: Tensor) -> DecodeRequest:
        """One segment's entry into a decode batch: its prefix, decoding parameters and noise key."""
        params = DecodeParams.from_options(opts)
        if params.max_mel_tokens > self.max_mel_tokens:
            params = replace(params, max_mel_tokens=self.max_mel_tokens)
        prefix = self.family.prefix(self.gpt, voice.speech_latent, emovec, segment).to(self.gpt_dtype)  # [1, P, D]
        seed = 0 if opts.seed is None else opts.seed
        return DecodeRequest(prefix=prefix, params=params, key=sampling_key(seed, segment.index))

    def latents(self, items: Sequence[tuple[Voice, Tensor, Segment, Tensor]],
                graphs: LatentGraphs | None = None, *, views: bool = False) -> list[Tensor]:
        """The second GPT pass for several segments in one padded batch → each (1, M_b, D) float32.

        items: (voice, emovec, segment, codes (1, M_b)). Right padding is exact: the pass is causal
        and each segment's states are read before its padding. With `graphs` (CUDA) the codes are the
        host copies and the pass, its inputs included, is one replay of the graph of its (rows, length
        bucket). `views` (with graphs): each row as a view of the graph's output, valid until its next
        replay, for a caller that copies it at once; otherwise each is a copy."""
        if graphs is None:
            xs = [self.gpt.latent_inputs(v.speech_latent, e, upload([s.text_ids], self.device), c)
                  for v, e, s, c in items]
            longest = max(x.size(1) for x in xs)
            batch = torch.cat([torch.nn.functional.pad(x, (0, 0, 0, longest - x.size(1))) for x in xs])
            h = self.gpt.final_norm(self.gpt(batch))  # [B, S_max, D]
        else:
            h = graphs([v.speech_latent for v, _, _, _ in items], [e for _, e, _, _ in items],
                       [s.text_ids for _, _, s, _ in items], [c for _, _, _, c in items])
        out = []
        n_cond = self.gpt.cfg.prefix_conds
        for b, (_, _, s, c) in enumerate(items):
            m = c.size(1)
            end = n_cond + len(s.text_ids) + 2 + m  # the mel block is [start, c_1..c_M, stop]: its first M states
            # A graph's output is rewritten by the next replay: each row is copied out (unless `views`).
            out.append(h[b : b + 1, end - m : end].to(torch.float32, copy=graphs is not None and not views))
        return out

    @torch.inference_mode()
    def run_gpt(self, voice: Voice, segment: Segment, opts: SynthesisOptions, emovec: Tensor) -> GptOutput:
        """One segment alone: its codes, then the second pass that yields the latent (the reference path)."""
        req = self.decode_request(voice, segment, opts, emovec)
        codes = generate(self.decode_gpt, req.prefix, req.params, key=req.key).codes  # [1, M]
        latent = self.latents([(voice, emovec, segment, codes)])[0] if self.family.second_pass else None
        return GptOutput(codes=codes, latent=latent)

    # ------------------------------------------------------------------ the acoustic stage

    def acoustic_frames(self, voice: Voice, codes: Generated, opts: SynthesisOptions) -> int:
        """Frames a segment's CFM sequence will have, without touching the device: prompt + floor(1.72 M)
        (IndexTTS-2.5: prompt + int(2M · 1.72 · duration_factor))."""
        return voice.ref_mel.size(2) + self.family.mel_frames(self.codec, codes.codes_host.size(1), opts)

    def cfm_rows(self, items: Sequence[AcousticInput], graphs: PrepGraphs | None = None) -> list[CFMRow]:
        """Segments with codes → their CFM inputs: gpt_layer + vq2emb, the length regulator and the start noise.
        `graphs` (CUDA): the second pass of whole segments, and the regulator of every row, one replay each."""
        k = self.codec.codebook_size
        for it in items:
            bad = it.codes.codes_host
            if bad.numel() and (int(bad.max()) >= k or int(bad.min()) < 0):
                # A code outside the codebook would index past it (a device-side assert on CUDA).
                raise RuntimeError(f"segment {it.segment.index}: a code outside [0, {k}) reached the codec")
        latents: list[Tensor | None] = [None] * len(items)
        if self.family.second_pass:
            whole = [b for b, it in enumerate(items) if it.chunk is None]
            latent_graphs = None if graphs is None else graphs.latent
            # The graphed pass stages the host copy of the codes (reading the device's back would sync);
            # the regulator's graph copies its latents in before any other replay of the pass: views do.
            views = graphs is not None and graphs.regulator.content is not None
            lat = self.latents([(items[b].voice, items[b].emovec, items[b].segment,
                                 items[b].codes.codes if latent_graphs is None else items[b].codes.codes_host)
                                for b in whole], latent_graphs, views=views) if whole else []
            for b, latent in zip(whole, lat, strict=True):
                latents[b] = latent
            for b, it in enumerate(items):
                if it.chunk is not None:
                    latents[b] = self.chunk_latent(it.voice, it.emovec, it.segment, it.chunk)
        regulate = None if graphs is None else graphs.regulator
        conds: list[Tensor | None] = [None] * len(items)
        if regulate is not None and regulate.content is not None:
            # The content and the regulator of every row with frames in one replay, from the host codes.
            frames = [self.family.mel_frames(self.codec, it.codes.codes_host.size(1), it.opts) for it in items]
            fused = [b for b, n in enumerate(frames) if n > 0 and latents[b] is not None]
            if fused:
                stretched = regulate.of_codes([items[b].codes.codes_host for b in fused],
                                              [x for b in fused if (x := latents[b]) is not None],
                                              [frames[b] for b in fused])
                for b, cond in zip(fused, stretched, strict=True):
                    conds[b] = cond
        # The rest: the family's content row by row, then the regulator (graphed for rows with frames).
        rest = [b for b, cond in enumerate(conds) if cond is None]
        content = {b: self.family.content(self.codec, self.gpt_layer, items[b].codes.codes, latents[b], items[b].opts)
                   for b in rest}  # ([1, M', Cw], [T])
        if regulate is not None and regulate.content is None:
            graphed = [b for b in rest if content[b][1][0] > 0]
            if graphed:
                stretched = regulate([content[b][0] for b in graphed], [content[b][1][0] for b in graphed])
                for b, cond in zip(graphed, stretched, strict=True):
                    conds[b] = cond
        return [self._row_of(it, self.length_regulator(*content[b]) if cond is None else cond)  # [1, T, C]
                for b, (it, cond) in enumerate(zip(items, conds, strict=True))]

    def chunk_latent(self, voice: Voice, emovec: Tensor, segment: Segment, chunk: ChunkInput) -> Tensor:
        """The second-pass latent (1, M_c, D) float32 of one chunk's codes, computed incrementally: only
        positions its segment's earlier chunks have not fed yet go through the GPT, against the keys and
        values they left (chunk.second_pass). Row j is the state at mel token j of [start, c_0, c_1, ...],
        as in `latents`, which runs the same pass at once over a whole segment."""
        sp, codes = chunk.second_pass, chunk.prefix_codes  # codes [1, end]
        end, done = codes.size(1), 0 if sp.rows is None else sp.rows.size(1)
        if end > done:
            gpt = self.gpt
            cfg = gpt.cfg
            mel = torch.nn.functional.pad(codes[:, : end - 1].long(), (1, 0), value=cfg.start_mel_token)  # [1, end]
            x = gpt.embed_mel(mel[:, done:end], torch.arange(done, end, device=self.device))  # [1, new, D]
            if sp.fed == 0:
                cond = gpt.conds_latent(voice.speech_latent, emovec)
                text = gpt.embed_text(upload([segment.text_ids], self.device))
                x = torch.cat((cond, text, x), dim=1)
            need = sp.fed + x.size(1)
            if sp.kv is None or sp.kv.size(4) < need:
                # Grown by doubling (aligned), so a long segment copies its keys and values a few times only.
                cap = max(need, 2 * (0 if sp.kv is None else sp.kv.size(4)))
                cap = -(-cap // 64) * 64
                kv = torch.zeros((cfg.layers, 2, 1, cfg.heads, cap, cfg.head_dim), device=self.device,
                                 dtype=x.dtype)  # [L, 2, 1, H, S_cap, Dh]
                if sp.kv is not None:
                    kv[..., : sp.fed, :] = sp.kv[..., : sp.fed, :]
                sp.kv = kv
            layers = [(sp.kv[i, 0], sp.kv[i, 1]) for i in range(cfg.layers)]
            pos = torch.arange(sp.fed, need, device=self.device).unsqueeze(0)  # [1, new]
            h = gpt.final_norm(gpt(x, pos, layers, need))[:, -(end - done) :].float()  # [1, end - done, D]
            sp.rows = h if sp.rows is None else torch.cat((sp.rows, h), dim=1)
            sp.fed = need
        assert sp.rows is not None  # end > 0: a chunk has codes
        return sp.rows[:, chunk.start : end]

    def _cfm_row(self, it: AcousticInput, latent: Tensor | None) -> CFMRow:
        """One segment's CFM row, eagerly: gpt_layer + vq2emb, the length regulator, the start noise."""
        s_infer, target = self.family.content(self.codec, self.gpt_layer, it.codes.codes, latent, it.opts)
        return self._row_of(it, self.length_regulator(s_infer, target))  # cond [1, T, C]

    def _row_of(self, it: AcousticInput, cond: Tensor) -> CFMRow:
        """A segment's CFM row from its regulated content `cond` [1, T, C]."""
        voice, opts = it.voice, it.opts
        mu = torch.cat([voice.prompt_condition, cond], dim=1)  # [1, P+T, C]
        shape = (1, self.cfm.in_channels, mu.size(1))
        if it.noise is not None and it.chunk is None:
            noise = it.noise.to(self.device)
        else:
            seed = 0 if opts.seed is None else opts.seed
            # A chunk after the first draws its own noise: chunk k of segment i from seed_for(...) + k·2^40.
            k = 0 if it.chunk is None else it.chunk.index
            gen = torch.Generator(device=self.device).manual_seed((seed_for(seed, it.segment.index) + (k << 40))
                                                                   % (2**63))
            noise = torch.randn(shape, generator=gen, device=self.device, dtype=mu.dtype)
        return CFMRow(mu, voice.ref_mel, voice.style, noise, opts.inference_cfg_rate)

    def cfm_solve(self, rows: Sequence[CFMRow], steps: int) -> CFMSolve:
        """A batched CFM solve over `rows` in this pipeline's acoustic precision."""
        return CFMSolve(self.cfm, rows, steps, autocast=self.acoustic_autocast)

    def cfm_workspaces(self) -> CFMWorkspaces | None:
        """Graphed CFM solves for an engine (CUDA with graphs); None: every solve allocates and runs eagerly."""
        if self.device.type != "cuda" or not self.cuda_graphs:
            return None
        return CFMWorkspaces(self.cfm, self.acoustic_autocast)

    def prep_graphs(self) -> PrepGraphs | None:
        """Graphed CFM prep for an engine (CUDA with graphs): the second pass (a family with one) and the
        length regulator; None: eager."""
        if self.device.type != "cuda" or not self.cuda_graphs:
            return None
        content = self.family.padded_content(self.codec, self.gpt_layer)
        return PrepGraphs(LatentGraphs(self.gpt) if self.family.second_pass else None,
                          RegulatorGraphs(self.length_regulator, content))

    def vocoder_graphs(self) -> VocoderGraphs | None:
        """Batched, graphed vocoding for an engine (CUDA with graphs); None: one segment at a time, eagerly."""
        if self.device.type != "cuda" or not self.cuda_graphs:
            return None
        return VocoderGraphs(self.bigvgan)

    def vocode(self, mel: Tensor) -> Tensor:
        """Target mel (1, 80, T) → float PCM (256 T,) at ±32767 scale on the device. Always float32:
        BigVGAN is ~3 % of a segment, and under bfloat16 it was slower on CPU and the least accurate part."""
        return to_pcm_scale(self.bigvgan(mel.float()))[0]

    @torch.inference_mode()
    def run_acoustic(
        self,
        voice: Voice,
        out: GptOutput,
        opts: SynthesisOptions,
        *,
        segment: Segment,
        emovec: Tensor,
        noise: Tensor | None = None,
    ) -> Tensor:
        """One segment alone: GPT output → float PCM (N,) at ±32767 scale on the device (the reference path)."""
        if out.codes.size(1) == 0:  # the GPT stopped at once: nothing to render for this segment
            return torch.zeros(0, device=self.device)
        codes = Generated(out.codes, out.codes, True, out.codes.cpu())
        row = self._cfm_row(AcousticInput(voice, emovec, segment, codes, opts, noise), out.latent)
        solve = self.cfm_solve([row], opts.diffusion_steps)
        while not solve.done:
            solve.step()
        return self.vocode(solve.target(0))

    # ------------------------------------------------------------------ whole requests

    def engine(self, *, max_batch_rows: int | None = None, prefetch: bool | None = None) -> Engine:
        """A new engine serving requests on this pipeline (one thread drives it). On CUDA it records
        its own decode graphs (they replay on its buffers): keep one engine for a server's lifetime."""
        return Engine(
            self,
            max_batch_rows=max_batch_rows or self.max_batch_rows,
            step_fn=step_function(self.device, compile=self.compile),
            row_buckets=self.row_buckets,
            prefetch=prefetch,
        )

    def stream(
        self,
        voice: Voice,
        text: str,
        opts: SynthesisOptions | None = None,
        *,
        emo_voice: Voice | None = None,
        noise: Mapping[int, Tensor] | None = None,
        cancel: Callable[[], bool] | None = None,
        engine: Engine | None = None,
    ) -> Iterator[SegmentAudio]:
        """Yield each segment's audio as it is ready: one request through `engine`, by default an engine
        of its own. Raises BadText, BadOptions, Cancelled (polled between steps) and what the request
        failed with."""
        opts = self.check_options(opts or SynthesisOptions())
        if opts.wants_emotion_text:
            read = self.read_emotion_texts([(opts, text)])[0]
            if isinstance(read, TtsdError):
                raise read
            opts = read
        req = Request(voice=voice, opts=opts, emo_voice=emo_voice, texts=deque([text]), noise=noise)
        if engine is None:
            engine = self.engine(max_batch_rows=max(4, opts.num_beams))
        for ev in run_to_end(engine, [req], cancel):
            if isinstance(ev, SegmentDone):
                yield ev.audio
            elif isinstance(ev, RequestFailed):
                raise ev.error

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
        parts: list[np.ndarray] = []
        for seg in self.stream(voice, text, opts, emo_voice=emo_voice, noise=noise, cancel=cancel):
            if seg.silence_samples:
                parts.append(np.zeros(seg.silence_samples, dtype=np.float32))
            parts.append(seg.samples)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    # ------------------------------------------------------------------ operations

    def warm_up(self, engine: Engine) -> float:
        """Before serving: a short synthesis through `engine` for every beam count a request may use,
        then (CUDA) the decode graph of every row bucket recorded on its buffers, all on the calling
        thread (the one that will serve: cuBLAS/cuDNN handles are per thread). Returns the seconds."""
        t0 = time.perf_counter()
        voice = self.prepare_voice(reference_tone(2.0))
        for beams in range(1, self.max_num_beams + 1):
            opts = SynthesisOptions(num_beams=beams, max_mel_tokens=16, diffusion_steps=2, seed=0)
            for _ in self.stream(voice, WARM_UP_TEXT, opts, engine=engine):
                pass
        engine.capture()
        return time.perf_counter() - t0

    def check_device(self, error: BaseException) -> None:
        """After an unexpected failure: raise DeviceFault if the device itself is unusable, so the daemon
        restarts; else return. An AcceleratorError (device-side assert, illegal address) is always
        fatal; anything else (Triton launcher and dynamo-wrapped errors arrive as plain exceptions) is
        followed by a probe of the device, and a failing probe is fatal too."""
        if isinstance(error, TtsdError):
            return
        if isinstance(error, torch.AcceleratorError):
            raise DeviceFault(f"device fault: {type(error).__name__}: {_first_line(error)}") from error
        try:
            probe_device(self.device)
        except Exception as e:
            raise DeviceFault(f"device fault: the probe after {type(error).__name__} failed: {_first_line(e)}") from e


def probe_device(device: torch.device) -> None:
    """A tiny computation on `device`, read back: raises if the device cannot compute any more."""
    x = torch.ones(4, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if float((x * 2).sum()) != 8.0:
        raise RuntimeError("the device computed a wrong value")


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def _glossary(ckpt: Path) -> Path | None:
    # Upstream: a glossary.yaml next to the checkpoint replaces the built-in term glossary.
    path = ckpt / "glossary.yaml"
    return path if path.is_file() else None


def reference_tone(seconds: float) -> bytes:
    """A deterministic voiced-like test signal (a 120 Hz harmonic tone with a slow vibrato, 22.05 kHz
    16-bit WAV) for warm-up: it exercises every stage; what it sounds like does not matter."""
    sr = audio.SAMPLE_RATE_HZ
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120.0 + 8.0 * np.sin(2 * math.pi * 3.0 * t)
    phase = 2 * math.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 8)) * 0.2
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()
