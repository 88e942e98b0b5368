"""Half precision against float32 on the same inputs: how far do codes, latent and audio move?

    python bench/bench_precision.py --checkpoints CKPT --device cuda --dtypes bfloat16,float16
    python bench/bench_precision.py --random full --device cpu --dtypes bfloat16

Three modes per half dtype: `gpt` (the decode loop in that dtype: `--dtype` of ttsd serve/synth;
conditioning, prefixes and the second-pass latent stay float32), `acoustic` (the DiT/CFM under
autocast, BigVGAN float32: `--acoustic-dtype`) and `both`. For each text segment float32 and the
mode each decode their own greedy codes; teacher-forced on the float32 codes, their mel logits and argmax
agreement are compared, and "same codes" counts the free-running codes equal before the first
difference. Each side then renders its codes (second-pass latent, CFM from the same noise,
BigVGAN) and the latent, mel and waveform are compared over their common length. Errors are
max|a−b| / max(1, max|a|), the repository's parity measure; the waveform also gets an SNR in dB."""

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

from ttsd.api.options import SynthesisOptions
from ttsd.daemon.cli import simulated_cuda
from ttsd.pipeline import Pipeline
from ttsd.pipeline.decode import DecodeParams, Generated, generate
from ttsd.pipeline.engine import AcousticInput
from ttsd.pipeline.gpt import UnifiedVoice, decode_copy
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
    same_codes: int  # free-running greedy codes equal to float32's before the first difference
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
    """`pipe` with its decode loop in `gpt_dtype` (a copy of the weights, as Pipeline.load(dtype=) makes
    it) and its acoustic side in `acoustic_dtype`."""
    other = copy.copy(pipe)
    if gpt_dtype != torch.float32:
        other.decode_gpt, other.gpt_dtype = decode_copy(pipe.gpt, gpt_dtype), gpt_dtype
    other.acoustic_dtype = acoustic_dtype
    other.acoustic_autocast = None if acoustic_dtype == torch.float32 else acoustic_dtype
    return other


@torch.inference_mode()
def compare(
    pipe: Pipeline, mode: Pipeline, voice: Voice, seg: Segment, opts: SynthesisOptions
) -> tuple[float, float, int, float, float, float, int]:
    """`mode` against the float32 `pipe` on one segment, each decoding its own greedy codes: (logits err and
    top-1 agreement teacher-forced on the float32 codes, codes equal before the first difference, latent
    err, mel err, waveform SNR over the common length, float32 codes)."""
    emovec = pipe.request_emovec(voice, opts, None)
    params = DecodeParams.from_options(opts)
    prefix32 = pipe.decode_request(voice, seg, opts, emovec).prefix
    prefix_h = mode.decode_request(voice, seg, opts, emovec).prefix
    codes32 = generate(pipe.decode_gpt, prefix32, params).codes
    codes_h = generate(mode.decode_gpt, prefix_h, params).codes
    ref_logits = teacher_forced_logits(pipe.decode_gpt, prefix32, codes32)
    half_logits = teacher_forced_logits(mode.decode_gpt, prefix_h, codes32)
    agree = float((ref_logits.argmax(-1) == half_logits.argmax(-1)).float().mean())
    n = min(codes32.size(1), codes_h.size(1))
    differ = (codes32[0, :n] != codes_h[0, :n]).nonzero()
    same = int(differ[0, 0]) if differ.numel() else n
    text = torch.tensor([seg.text_ids], dtype=torch.long, device=pipe.device)
    lat32 = pipe.gpt.latent(voice.speech_latent, emovec, text, codes32).float()
    lat_h = mode.gpt.latent(voice.speech_latent, emovec, text, codes_h).float()
    frames = voice.ref_mel.size(2) + int(max(codes32.size(1), codes_h.size(1)) * 1.72)
    noise = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(0))

    def rendered(p: Pipeline, codes: Tensor, latent: Tensor) -> tuple[Tensor, Tensor]:
        item_noise = noise[..., : voice.ref_mel.size(2) + int(codes.size(1) * 1.72)]
        gen = Generated(codes, codes, True, codes.cpu())
        return render(p, AcousticInput(voice, emovec, seg, gen, opts, item_noise), latent)

    mel32, wav32 = rendered(pipe, codes32, lat32)
    mel_h, wav_h = rendered(mode, codes_h, lat_h)
    t, w = min(mel32.size(-1), mel_h.size(-1)), min(wav32.size(-1), wav_h.size(-1))
    m = min(lat32.size(1), lat_h.size(1))
    return (
        rel_err(half_logits, ref_logits),
        agree,
        same,
        rel_err(lat_h[:, :m], lat32[:, :m]),
        rel_err(mel_h[..., :t], mel32[..., :t]),
        snr_db(wav_h[..., :w], wav32[..., :w]),
        codes32.size(1),
    )


def main(argv: list[str] | None = None) -> int:
    simulated_cuda()  # TTSD_SIMCUDA=1: --device cuda on the simulated device (before the defaults read torch.cuda)
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
    f32 = torch.float32
    for dt in args.dtypes.split(","):
        dtype = DTYPES[dt]
        for label, gpt_dtype, acoustic_dtype in (("gpt", dtype, f32), ("acoustic", f32, dtype), ("both", dtype, dtype)):
            if acoustic_dtype == torch.float16 and pipe.device.type != "cuda":
                continue  # float16 autocast is a CUDA mode
            mode = variant(pipe, gpt_dtype, acoustic_dtype)
            for seg in segments:
                le, agree, same, lat, mel, snr, n = compare(pipe, mode, voice, seg, opts)
                rows.append(
                    Row(
                        dtype=f"{label} {dt}",
                        segment=seg.index,
                        codes=n,
                        logits_err=le,
                        top1_agree=agree,
                        same_codes=same,
                        latent_err=lat,
                        mel_err=mel,
                        wav_snr_db=snr,
                    )
                )
            del mode
    print("| mode | segment | codes | logits err | top-1 agree | same codes | latent err | mel err | wav SNR dB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.dtype} | {r.segment} | {r.codes} | {r.logits_err:.2e} | {r.top1_agree:.1%} | {r.same_codes} | "
            f"{r.latent_err:.2e} | {r.mel_err:.2e} | {r.wav_snr_db:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
