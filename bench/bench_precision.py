"""Half-precision GPT against float32 on the same inputs: how far do logits, codes, latent and audio move?

    python bench/bench_precision.py --checkpoints CKPT --device cuda --dtypes bfloat16,float16
    python bench/bench_precision.py --random tiny --device cpu --dtypes bfloat16

For each text segment the float32 pipeline decodes greedy codes. Then, teacher-forced on those
same codes, the GPT runs once in float32 and once per half dtype (a copy of the same weights):
the mel logits at every step, the argmax agreement, and the second-pass latent are compared.
Finally the acoustic side (float32, as upstream) renders both latents from the same noise, and
the mel and the waveform are compared. Errors are max|a−b| / max(1, max|a|), the repository's
parity measure; the waveform also gets an SNR in dB. Only the GPT changes dtype: that is what
`--dtype` does in the daemon."""

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
from ttsd.pipeline.bigvgan import to_pcm_scale
from ttsd.pipeline.decode import DecodeParams, Generated, generate
from ttsd.pipeline.engine import AcousticInput
from ttsd.pipeline.flow import CFMSolve
from ttsd.pipeline.gpt import UnifiedVoice
from ttsd.pipeline.pipeline import DTYPES, Segment
from ttsd.pipeline.voice import Voice
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


def target_mel(pipe: Pipeline, item: AcousticInput, latent: Tensor) -> Tensor:
    """s2mel for one segment from a given second-pass latent: regulator, CFM (the item's noise) → (1, 80, T)."""
    solve = CFMSolve(pipe.cfm, [pipe._cfm_row(item, latent)], item.opts.diffusion_steps)
    while not solve.done:
        solve.step()
    return solve.target(0)


@torch.inference_mode()
def compare(
    pipe: Pipeline, gpt: UnifiedVoice, voice: Voice, seg: Segment, opts: SynthesisOptions, dtype: torch.dtype
) -> tuple[float, float, float, float, float, int]:
    emovec = pipe.emovec(voice, opts)
    text = torch.tensor([seg.text_ids], dtype=torch.long, device=pipe.device)
    prefix32 = pipe.gpt.build_prefix(voice.speech_latent, emovec, text)
    codes = generate(pipe.gpt, prefix32, DecodeParams.from_options(opts)).codes  # float32 reference
    half_latent = voice.speech_latent.to(dtype)
    prefix_h = gpt.build_prefix(half_latent, emovec.to(dtype), text)
    ref_logits = teacher_forced_logits(pipe.gpt, prefix32, codes)
    half_logits = teacher_forced_logits(gpt, prefix_h, codes)
    agree = float((ref_logits.argmax(-1) == half_logits.argmax(-1)).float().mean())
    lat32 = pipe.gpt.latent(voice.speech_latent, emovec, text, codes).float()
    lat_h = gpt.latent(half_latent, emovec.to(dtype), text, codes).float()
    mel_frames = int(codes.size(1) * 1.72)
    noise = torch.randn(1, 80, voice.ref_mel.size(2) + mel_frames, generator=torch.Generator().manual_seed(0))
    gen = Generated(codes, codes, True, codes.cpu())
    item = AcousticInput(voice, emovec, seg, gen, opts, noise)
    mel32, mel_h = (target_mel(pipe, item, lat) for lat in (lat32, lat_h))
    wav32, wav_h = (to_pcm_scale(pipe.bigvgan(m))[0] for m in (mel32, mel_h))
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
    voice = pipe.prepare_voice(args.voice if args.voice is not None else synthetic_voice(4.0))
    opts = SynthesisOptions(
        do_sample=False, num_beams=1, max_mel_tokens=args.codes, diffusion_steps=args.diffusion_steps, seed=0
    )
    segments = pipe.split_text(args.text, opts)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"model: {model}; device: {name}; torch {torch.__version__}; greedy, {args.codes} codes max")
    rows: list[Row] = []
    for dt in args.dtypes.split(","):
        dtype = DTYPES[dt]
        gpt = copy.deepcopy(pipe.gpt).to(dtype)
        for seg in segments:
            le, agree, lat, mel, snr, n = compare(pipe, gpt, voice, seg, opts, dtype)
            rows.append(
                Row(
                    dtype=dt,
                    segment=seg.index,
                    codes=n,
                    logits_err=le,
                    top1_agree=agree,
                    latent_err=lat,
                    mel_err=mel,
                    wav_snr_db=snr,
                )
            )
        del gpt
    print("| dtype | segment | codes | logits err | top-1 agree | latent err | mel err | wav SNR dB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.dtype} | {r.segment} | {r.codes} | {r.logits_err:.2e} | {r.top1_agree:.1%} | "
            f"{r.latent_err:.2e} | {r.mel_err:.2e} | {r.wav_snr_db:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
