"""GPU cost, counted on a CPU: launches, bytes, FLOPs and host syncs per decode step and per acoustic job.

    python bench/gpu_cost.py --random full --dtype bfloat16        # the issue's workload, real dims
    python bench/gpu_cost.py --random tiny                          # a quick run (tests)

The CUDA branch runs on the simulated device (ttsd.tools.simcuda) with a cost meter open (tools/simcuda/
cost.py): every operation a GPU would run is counted — an eager launch, or a node of a replayed graph —
with the bytes it touches (views resolved) and the FLOPs of its matrix work. Counts are properties of
the code, not of a device; `DeviceModel` turns them into time with a stated roofline (H100 SXM datasheet:
3.35 TB/s, 989 TFLOP/s bf16, 67 TFLOP/s fp32, 5 µs per eager launch, 2 µs per graph node). Every
time printed here is MODELLED, NOT MEASURED.

Workload: a reference voice of `--prompt-s` seconds; decode steps of `--rows` greedy requests whose
rows hold `--live-slots` written cache slots each (a text long enough that the prefix fills them);
the same rows as `--rows // 3` requests of 3 beams; an acoustic job of `--segments` segments of
`--codes` codes (CFM prep, one CFM step — the others are the same work — and the vocoder).
Modelled serving: streams sustained in real time (decode at 50 codes per audio second per stream,
shared steps, plus each stream's acoustic work, issued one after the other) and first audio of a
`--codes`-code first sentence on an idle server (prefill, decode, acoustic job).
Last line, for scripts: `modelled h100: streams=N first_audio_ms=M step_ms=S step_bytes_ratio=R
step_launches=L step_syncs=K`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ttsd.tools import simcuda

CODES_PER_S = 50  # semantic codes per second of audio


@dataclass(frozen=True, slots=True)
class Measured:
    cost: simcuda.Cost
    seconds: float  # modelled


def fmt(name: str, m: Measured, extra: str = "") -> str:
    c = m.cost
    return (f"| {name} | {c.launches} | {c.graph_nodes} | {c.bytes / 2**20:.1f} | "
            f"{(c.flops_half + c.flops_fp32) / 1e9:.2f} | {c.syncs} | {1000 * m.seconds:.3f} | {extra} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", type=Path)
    src.add_argument("--random", choices=["tiny", "full"], help="seeded random weights of a make-tiny preset")
    ap.add_argument("--random-full", dest="random", action="store_const", const="full")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="decode and DiT precision")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--live-slots", type=int, default=300)
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--codes", type=int, default=100, help="codes per acoustic segment (50 per second)")
    ap.add_argument("--prompt-s", type=float, default=3.0)
    ap.add_argument("--diffusion-steps", type=int, default=25)
    args = ap.parse_args(argv)
    os.environ.setdefault(simcuda.ENV_MEMORY, "64")
    simcuda.install(budget_gib=float(os.environ[simcuda.ENV_MEMORY]))
    from ttsd.api.options import SynthesisOptions
    from ttsd.pipeline import Pipeline
    from ttsd.pipeline.decode import Generated
    from ttsd.pipeline.engine import CFM_STEPS_PER_REPLAY, AcousticInput
    from ttsd.pipeline.pipeline import Segment
    from ttsd.tools.tiny import synthetic_voice, write_converted

    model = simcuda.DeviceModel()
    rows = args.rows
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoints
        if ckpt is None:
            ckpt = Path(tmp) / "ckpt"
            write_converted(ckpt, args.random, 0)
        pipe = Pipeline.load(ckpt, device="cuda", dtype=args.dtype, acoustic_dtype=args.dtype, compile=False,
                             max_num_beams=3, max_batch_rows=rows)
    cfg = pipe.decode_gpt.cfg
    with torch.no_grad():
        pipe.decode_gpt.mel_head.bias[cfg.stop_mel_token] -= 1e4  # never stop: every step is a steady step
    voice = pipe.prepare_voice(synthetic_voice(args.prompt_s))
    engine = pipe.engine(max_batch_rows=rows)
    engine.capture()
    batch, lanes = engine.batch, pipe.lanes
    opts = pipe.check_options(SynthesisOptions(do_sample=False, num_beams=1, max_mel_tokens=64,
                                               diffusion_steps=args.diffusion_steps, seed=1))
    emovec = pipe.request_emovec(voice, opts, None)
    prefix_rows = cfg.prefix_conds  # conds before text
    text_len = max(1, args.live_slots - prefix_rows - 2 - 1 - 2)  # + start/stop text, start code, 2 steps
    text_ids = [(7 * i) % (cfg.number_text_tokens - 10) + 5 for i in range(text_len)]

    def decode_cost(beams: int) -> tuple[Measured, int]:
        """One steady decode step of `rows` rows as requests of `beams` beams; also the live slots."""
        o = replace(opts, num_beams=beams)
        with lanes.on(lanes.gpt):
            lanes.start(lanes.gpt)  # the voice and emotion vector come from the default stream
            for i in range(rows // beams):
                seg = Segment(index=i, text_ids=text_ids, text="")
                batch.admit(pipe.decode_request(voice, seg, o, emovec))
            batch.step()
            batch.step()
            live = sum(r.written * r.rows for r in batch.requests)
            with simcuda.meter() as c:
                batch.step()
            for r in list(batch.requests):
                batch.remove(r)
        return Measured(c, model.seconds(c)), live

    greedy, live = decode_cost(1)
    beams, _ = decode_cost(3)
    decode_params = [p for name, p in pipe.decode_gpt.named_parameters()
                     if name.startswith(("gpt.", "final_norm.", "mel_head."))]
    weight_bytes = sum(p.numel() * p.element_size() for p in decode_params)
    slot_bytes = 2 * cfg.layers * cfg.model_dim * batch.cache.buf.element_size()  # K and V, every layer
    floor = weight_bytes + live * slot_bytes

    def one_row_step() -> Measured:
        with lanes.on(lanes.gpt):
            lanes.start(lanes.gpt)
            batch.admit(pipe.decode_request(voice, Segment(index=0, text_ids=text_ids[:20], text=""), opts, emovec))
            batch.step()
            batch.step()
            with simcuda.meter() as c:
                batch.step()
            for r in list(batch.requests):
                batch.remove(r)
        return Measured(c, model.seconds(c))

    single = one_row_step()

    with lanes.on(lanes.gpt), simcuda.meter() as pc:
        lanes.start(lanes.gpt)
        batch.admit(pipe.decode_request(voice, Segment(index=0, text_ids=text_ids[:20], text=""), opts, emovec))
    with lanes.on(lanes.gpt):
        for r in list(batch.requests):
            batch.remove(r)
    prefill = Measured(pc, model.seconds(pc))

    # The acoustic job: CFM prep, one CFM step (each of the steps is the same work), the vocoder.
    seg = Segment(index=0, text_ids=text_ids[:20], text="")
    codes = torch.randint(0, pipe.codec.codebook_size, (1, args.codes), device="cuda")
    gen = Generated(codes, codes, True, codes.cpu())
    items = [AcousticInput(voice, emovec, seg.with_index(i), gen, opts) for i in range(args.segments)]
    workspaces = engine.cfm_workspaces
    assert workspaces is not None  # CUDA with graphs: the engine's solves replay a graph per step
    with lanes.on(lanes.acoustic):
        lanes.start(lanes.acoustic)
        warm = workspaces.solve(pipe.cfm_rows(items, engine.prep_graphs), args.diffusion_steps)
        warm.step()  # the first solve of a shape records its graphs (once per shape while serving)
        warm.close()
        with simcuda.meter() as prep_c:
            rows_in = pipe.cfm_rows(items, engine.prep_graphs)
            solve = workspaces.solve(rows_in, args.diffusion_steps)
        with simcuda.meter() as step_c:
            solve.step()
        vocoder = engine.vocoder_graphs
        assert vocoder is not None
        while not solve.done:
            solve.step()
        mels = [solve.target(b) for b in range(args.segments)]
        vocoder.stage(mels)  # the shape's buffers, allocated once while serving
        with simcuda.meter() as voc_c:
            # Staging is eager; the render is one replay of a graph of exactly these kernels, booked with
            # as_replay: the simulator's capture keeps every intermediate alive (a device's graph pool
            # reuses memory), which at full size would not fit this machine.
            mel, lengths, _ = vocoder.stage(mels)
            with simcuda.as_replay():
                vocoder.render(mel, lengths)
    prep, cfm_step, vocoder = (Measured(c, model.seconds(c)) for c in (prep_c, step_c, voc_c))
    # The engine replays CFM_STEPS_PER_REPLAY steps per graph and the steps left one at a time
    # (CFMSolve.step): the steps are identical graph bodies, so a k-step replay is k of the step counted
    # here in nodes, bytes and FLOPs, and one launch. (Counted per step: recording a k-step graph in the
    # simulator keeps k steps' intermediates alive, more than this machine holds at full size.)
    replays = args.diffusion_steps // CFM_STEPS_PER_REPLAY + args.diffusion_steps % CFM_STEPS_PER_REPLAY
    job_s = prep.seconds + args.diffusion_steps * cfm_step.seconds + vocoder.seconds
    job_launches = prep.cost.launches + replays * cfm_step.cost.launches + vocoder.cost.launches
    audio_s_per_segment = args.codes / CODES_PER_S
    acoustic_per_stream_s = job_s / (args.segments * audio_s_per_segment)  # device seconds per audio second

    # Streams sustained: B streams need 50 shared decode steps per audio second (step cost linear in rows
    # between the one-row and the `rows`-row steps) plus B × their acoustic work, one after the other.
    def step_s(b: int) -> float:
        return single.seconds + (greedy.seconds - single.seconds) * (b - 1) / max(1, rows - 1)

    streams = 0
    while streams < 4096 and CODES_PER_S * step_s(streams + 1) + (streams + 1) * acoustic_per_stream_s <= 1.0:
        streams += 1
    one_segment_job = prep.seconds / args.segments + args.diffusion_steps * cfm_step.seconds / args.segments \
        + vocoder.seconds / args.segments
    first_audio_s = prefill.seconds + args.codes * single.seconds + one_segment_job

    source = ckpt if args.checkpoints else args.random
    print(f"# modelled on {model.name}; counted with the simulated device on {source}"
          f" weights, dtype {args.dtype}; MODELLED, NOT MEASURED")
    print("| work | eager launches | graph nodes | MiB moved | GFLOP | host syncs | modelled ms | note |")
    print("|---|---|---|---|---|---|---|---|")
    print(fmt(f"decode step, {rows} rows greedy", greedy, f"{live} live slots; floor {floor / 2**20:.1f} MiB"))
    print(fmt(f"decode step, {rows // 3} requests × 3 beams", beams,
              f"{beams.cost.bytes / max(1, greedy.cost.bytes):.2f}× the greedy step's bytes"))
    print(fmt("decode step, 1 row", single))
    print(fmt("prefill, 1 request", prefill))
    print(fmt(f"acoustic prep, {args.segments} segments", prep))
    print(fmt("one CFM step (DiT × CFG)", cfm_step, f"× {args.diffusion_steps} steps in {replays} replays"))
    print(fmt(f"vocoder, {args.segments} segments", vocoder))
    print(f"acoustic job of {args.segments} × {args.codes} codes: launches={job_launches} "
          f"modelled_ms={1000 * job_s:.1f} ({1000 * acoustic_per_stream_s:.1f} ms per stream-second of audio)")
    print(f"modelled h100: streams={streams} first_audio_ms={1000 * first_audio_s:.0f} "
          f"step_ms={1000 * greedy.seconds:.3f} step_bytes_ratio={greedy.cost.bytes / floor:.2f} "
          f"step_launches={greedy.cost.launches} step_syncs={greedy.cost.syncs}")
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
