"""Half precision against float32 on the same inputs: how far do logits, codes, latent and audio move?

    python bench/bench_precision.py --checkpoints CKPT --device cuda --dtypes bfloat16,float16
    python bench/bench_precision.py --random full --device cpu --dtypes bfloat16

Three modes per half dtype: `gpt` (the GPT in that dtype: `--dtype` of ttsd serve/synth),
`acoustic` (DiT/CFM and BigVGAN under autocast: `--acoustic-dtype`) and `both`. For each text
segment the float32 pipeline decodes greedy codes. Teacher-forced on those same codes, the GPT
runs in float32 and in the mode's dtype, with its own voice conditioning (conformer/perceiver
and emotion vectors computed in that dtype, as the daemon computes them): the mel logits at
every step, the argmax agreement and the second-pass latent are compared. The acoustic side
then renders each latent from the same noise, in float32 or under autocast, and the mel and the
waveform are compared. Errors are max|a−b| / max(1, max|a|), the repository's parity measure;
the waveform also gets an SNR in dB."""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ttsd.pipeline import Pipeline, SynthesisOptions
from ttsd.pipeline.decode import DecodeParams, Generated, generate
from ttsd.pipeline.engine import AcousticInput
from ttsd.pipeline.gpt import UnifiedVoice
from ttsd.pipeline.pipeline import DTYPES, Segment
from ttsd.tools.tiny import synthetic_voice

TEXT = "The quick brown fox jumps over the lazy dog. Then it runs all the way back home again!"


@dataclass(frozen=True, kw_only=True, slots=True)
class Row:
    dtype: str
    segment: int
    codes: int
    logits_err: float  # max|Δ| / max(1, max|ref|) over all teacher-forced steps
    top1_agree: float  # fraction of steps whose argmax matches float32
    latent_err: float
    mel_err: float
    wav_snr_db: float


def rel_err(a: Tensor, ref: Tensor) -> float:
    scale = max(1.0, float(ref.double().abs().max()))
    return float((a.double() - ref.double()).abs().max()) / scale


def snr_db(a: Tensor, ref: Tensor) -> float:
    noise = float(((a.double() - ref.double()) ** 2).sum())
    signal = float((ref.double() ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


@torch.inference_mode()
def teacher_forced_logits(gpt: UnifiedVoice, prefix: Tensor, codes: Tensor) -> Tensor:
    """Logits for every decode step at once [N, V], with decoding's positions: start at mel
    position 0, the k-th code at k + 1 (upstream's off-by-one)."""
    cfg = gpt.cfg
    n = codes.size(1)
    tokens = torch.cat([torch.full_like(codes[:, :1], cfg.start_mel_token), codes[:, :-1]], dim=1)  # [1, N]
    positions = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(2, n + 1)]).to(codes.device)
    x = torch.cat([prefix, gpt.embed_mel(tokens, positions)], dim=1)  # [1, P + N, D]
    h = gpt(x)[:, prefix.size(1) :]  # [1, N, D]
    return gpt.mel_logits(h)[0].float()


def render(pipe: Pipeline, item: AcousticInput, latent: Tensor) -> tuple[Tensor, Tensor]:
    """One segment from a given second-pass latent in `pipe`'s acoustic precision: (mel (1, 80, T), PCM)."""
    solve = pipe.cfm_solve([pipe._cfm_row(item, latent)], item.opts.diffusion_steps)
    while not solve.done:
        solve.step()
    mel = solve.target(0)
    return mel, pipe.vocode(mel)


def variant(pipe: Pipeline, gpt_dtype: torch.dtype, acoustic_dtype: torch.dtype) -> Pipeline:
    """`pipe` with its GPT in `gpt_dtype` (a copy of the weights) and its acoustic side in `acoustic_dtype`."""
    other = copy.copy(pipe)
    if gpt_dtype != pipe.gpt_dtype:
        other.gpt, other.gpt_dtype = copy.deepcopy(pipe.gpt).to(gpt_dtype), gpt_dtype
    other.acoustic_dtype = acoustic_dtype
    other.acoustic_autocast = None if acoustic_dtype == torch.float32 else acoustic_dtype
    return other


@torch.inference_mode()
def compare(
    pipe: Pipeline, mode: Pipeline, audio: bytes, seg: Segment, opts: SynthesisOptions
) -> tuple[float, float, float, float, float, int]:
    """`mode` against the float32 `pipe` on one segment: (logits err, top-1 agreement, latent err, mel err,
    waveform SNR, codes). Each prepares the voice itself, so half conditioning is measured too."""
    voice32, voice_h = pipe.prepare_voice(audio), mode.prepare_voice(audio)
    emovec32, emovec_h = pipe.request_emovec(voice32, opts, None), mode.request_emovec(voice_h, opts, None)
    text = torch.tensor([seg.text_ids], dtype=torch.long, device=pipe.device)
    prefix32 = pipe.gpt.build_prefix(voice32.speech_latent, emovec32, text)
    codes = generate(pipe.gpt, prefix32, DecodeParams.from_options(opts)).codes  # float32 reference
    prefix_h = mode.gpt.build_prefix(voice_h.speech_latent, emovec_h, text)
    ref_logits = teacher_forced_logits(pipe.gpt, prefix32, codes)
    half_logits = teacher_forced_logits(mode.gpt, prefix_h, codes)
    agree = float((ref_logits.argmax(-1) == half_logits.argmax(-1)).float().mean())
    lat32 = pipe.gpt.latent(voice32.speech_latent, emovec32, text, codes).float()
    lat_h = mode.gpt.latent(voice_h.speech_latent, emovec_h, text, codes).float()
    mel_frames = int(codes.size(1) * 1.72)
    noise = torch.randn(1, 80, voice32.ref_mel.size(2) + mel_frames, generator=torch.Generator().manual_seed(0))
    gen = Generated(codes, codes, True, codes.cpu())
    mel32, wav32 = render(pipe, AcousticInput(voice32, emovec32, seg, gen, opts, noise), lat32)
    mel_h, wav_h = render(mode, AcousticInput(voice_h, emovec_h, seg, gen, opts, noise), lat_h)
    return (
        rel_err(half_logits, ref_logits),
        agree,
        rel_err(lat_h, lat32),
        rel_err(mel_h, mel32),
        snr_db(wav_h, wav32),
        codes.size(1),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", type=Path, help="converted checkpoint directory (ttsd-convert)")
    src.add_argument("--random", choices=["tiny", "full"], help="random weights of a make-tiny preset")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated half dtypes to compare with float32")
    ap.add_argument("--voice", type=Path, help="reference audio (default: a synthetic voiced signal)")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--codes", type=int, default=60, help="max_mel_tokens per segment")
    ap.add_argument("--diffusion-steps", type=int, default=SynthesisOptions().diffusion_steps)
    args = ap.parse_args(argv)

    if args.random is not None:
        from ttsd.tools.tiny import random_pipeline

        pipe = random_pipeline(args.random, 0, args.device, "float32")
        model = f"random {args.random} (seed 0)"
    else:
        pipe = Pipeline.load(args.checkpoints, device=args.device)
        model = str(args.checkpoints)
    audio = args.voice.read_bytes() if args.voice is not None else synthetic_voice(4.0)
    opts = SynthesisOptions(
        do_sample=False, num_beams=1, max_mel_tokens=args.codes, diffusion_steps=args.diffusion_steps, seed=0
    )
    segments = pipe.split_text(args.text, opts)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"model: {model}; device: {name}; torch {torch.__version__}; greedy, {args.codes} codes max")
    rows: list[Row] = []
    f32 = torch.float32
    for dt in args.dtypes.split(","):
        dtype = DTYPES[dt]
        for label, gpt_dtype, acoustic_dtype in (("gpt", dtype, f32), ("acoustic", f32, dtype), ("both", dtype, dtype)):
            if acoustic_dtype == torch.float16 and pipe.device.type != "cuda":
                continue  # float16 autocast is a CUDA mode
            mode = variant(pipe, gpt_dtype, acoustic_dtype)
            for seg in segments:
                le, agree, lat, mel, snr, n = compare(pipe, mode, audio, seg, opts)
                rows.append(
                    Row(
                        dtype=f"{label} {dt}",
                        segment=seg.index,
                        codes=n,
                        logits_err=le,
                        top1_agree=agree,
                        latent_err=lat,
                        mel_err=mel,
                        wav_snr_db=snr,
                    )
                )
            del mode
    print("| mode | segment | codes | logits err | top-1 agree | latent err | mel err | wav SNR dB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.dtype} | {r.segment} | {r.codes} | {r.logits_err:.2e} | {r.top1_agree:.1%} | "
            f"{r.latent_err:.2e} | {r.mel_err:.2e} | {r.wav_snr_db:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
