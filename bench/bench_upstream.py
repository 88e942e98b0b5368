"""The official IndexTTS-2 code timed stage by stage, for a side-by-side with bench_pipeline.py.

    python bench/bench_upstream.py --upstream /path/to/index-tts --checkpoints OFFICIAL_DIR \\
        --voice ref.wav --texts paragraph --codes 40 --threads 2

It runs upstream's own request path, `IndexTTS2.infer_generator` from the given checkout (nothing of
upstream is copied here: the checkout goes on sys.path), on an official-layout checkpoint directory
such as `ttsd make-tiny DIR --seed 1 --preset full --voice ref.wav` writes (its `hf_cache/` holds
the auxiliary models, passed as `aux_paths`). Run it in a virtual environment with upstream's
requirements (transformers 4.52.1, omegaconf, munch, einops, librosa, torchaudio's Python parts)
and ttsd installed without dependencies. Four things differ from a plain upstream call, all for
an equal comparison: the text becomes the same segment ids ttsd decodes (ttsd's front end, which
matches upstream's, replaces upstream's text normaliser, whose WeTextProcessing graphs are not
needed for timing), decoding is greedy (`inference_speech` is called with do_sample=False:
upstream's request path forces sampling), the stop token is made unreachable (mel_head bias
-1e4, as bench_pipeline does for random weights) so every segment decodes exactly `--codes`
codes, and QwenEmotion is not loaded (no emotion text).

Stage times come from wrappers around upstream's methods during a warm request (the voice
cached): prefill = the first GPT forward of each `generate`, decode = the rest of `generate`
(HF's loop, logits processors included) per code, conditioning = `get_conditioning` +
`merge_emovec` (upstream recomputes both for every segment), latent = the second GPT pass, s2mel
= gpt_layer + length regulator + CFM (DiT × steps), bigvgan = the vocoder; prepare_voice is the
voice part of a cold request (w2v-BERT for the speaker and again for the emotion reference,
codec, mel, fbank, CAMPPlus, prompt regulator).

`--versus CONVERTED` also loads ttsd's Pipeline from the same model converted by ttsd-convert and
alternates the two request by request (upstream, then bench_pipeline's `measure` of the same text,
voice, codes and greedy decoding), so both see the same machine load; the table then shows each
stage's median for both and upstream / ttsd. Two processes run one after the other on a shared
machine can differ by a third from load alone, which is why the side by side is measured this way.
ttsd's prepare_voice also holds what upstream recomputes for every segment (the speaker conformer +
perceiver and the emotion vectors): upstream's `conditioning_s` row is that work."""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ttsd.pipeline.text import TextNormalizer, TextTokenizer, split_segments

TEXTS = {  # bench_pipeline.TEXTS, repeated: this script runs where ttsd is installed without its dependencies
    "short": "Hello, how are you today?",
    "sentence": "The quick brown fox jumps over the lazy dog, and then it runs all the way back home again.",
    "paragraph": (
        "Streaming speech synthesis lets a listener hear the first words while the rest is still being "
        "generated. Each sentence becomes a segment: the language model writes semantic codes, the "
        "diffusion transformer turns them into a mel spectrogram, and the vocoder renders the waveform. "
        "The first segment decides how long the listener waits; the others only have to keep up."
    ),
}
STOP_SUPPRESSION_BIAS = -1e4  # as bench_pipeline.suppress_stop
MAX_TEXT_TOKENS_PER_SEGMENT = 120  # upstream infer() default, and ttsd's


class Clock:
    """Durations per key, and the first GPT forward of each generate call (the prefill)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.in_generate = False
        self.first_forward = False

    def add(self, key: str, dt: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + dt

    def wrap(self, obj: Any, name: str, key: str) -> None:
        """Time every call of obj.name under `key` (an instance attribute shadows the method)."""
        fn: Callable[..., Any] = getattr(obj, name)

        @functools.wraps(fn)  # HF's generate validates its kwargs against the signature it sees
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.add(key, time.perf_counter() - t0)
            return out

        setattr(obj, name, timed)


class SegmentIds:
    """Upstream's TextTokenizer interface over ttsd's front end: the same pieces, segments and ids."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tok = tokenizer
        self.unk_token_id = -1  # ttsd's pieces always map to ids

    def tokenize(self, text: str) -> list[str]:
        return list(self.tok.tokenize(text))

    def split_segments(self, pieces: list[str], max_tokens: int, quick_streaming_tokens: int = 0) -> list[list[str]]:
        return [g for g in split_segments(pieces, max_tokens, quick_streaming_tokens) if g]

    def convert_tokens_to_ids(self, pieces: list[str]) -> list[int]:
        return list(self.tok.convert_tokens_to_ids(pieces))


def load_upstream(upstream: Path, ckpt: Path, tokenizer_json: Path) -> Any:
    """upstream's IndexTTS2 on CPU, float32, without QwenEmotion, its text front end replaced by ttsd's."""
    sys.path.insert(0, str(upstream))
    # Imported by upstream for QwenEmotion and the IndexTTS-2.5 tokenizer only, neither of which runs here.
    sys.modules.setdefault("modelscope", types.SimpleNamespace(AutoModelForCausalLM=None))  # type: ignore[arg-type]
    sys.modules.setdefault("whisper", types.ModuleType("whisper"))
    # descript-audiotools: imported by upstream's DAC package, whose quantizer the length regulator
    # imports; only DAC's training and codec classes use it.
    base = type("BaseModel", (), {"INTERN": [], "EXTERN": []})
    ml = types.SimpleNamespace(BaseModel=base, Accelerator=object)
    audiotools = types.SimpleNamespace(AudioSignal=object, STFTParams=object, ml=ml)
    sys.modules.setdefault("audiotools", audiotools)  # type: ignore[arg-type]
    sys.modules.setdefault("audiotools.ml", audiotools.ml)
    sys.modules.setdefault("audiotools.core", types.SimpleNamespace(util=None))  # type: ignore[arg-type]
    sys.modules.setdefault("whisper.tokenizer", types.SimpleNamespace(Tokenizer=object))  # type: ignore[arg-type]
    front = importlib.import_module("indextts.utils.front")
    front.TextNormalizer.load = lambda self: None  # graphs unused: ttsd's front end makes the ids
    infer_v2 = importlib.import_module("indextts.infer_v2")
    hf = ckpt / "hf_cache"
    aux = {"w2v_bert": str(hf / "w2v-bert-2.0"), "semantic_codec": str(hf / "semantic_codec_model.safetensors"),
           "campplus": str(hf / "campplus_cn_common.bin"), "bigvgan": str(hf / "bigvgan")}
    tts = infer_v2.IndexTTS2(cfg_path=str(ckpt / "config.yaml"), model_dir=str(ckpt), device="cpu",
                             use_qwen_emo=False, aux_paths=aux)
    tts.tokenizer = SegmentIds(TextTokenizer.from_file(tokenizer_json, TextNormalizer()))
    with torch.no_grad():
        tts.gpt.mel_head.bias[tts.stop_mel_token] += STOP_SUPPRESSION_BIAS
    return tts


def instrument(tts: Any, clock: Clock) -> None:
    gpt, inf = tts.gpt, tts.gpt.inference_model
    speech = gpt.inference_speech

    def greedy_speech(*args: Any, **kwargs: Any) -> Any:
        kwargs.update(do_sample=False)  # upstream's request path passes do_sample=True
        clock.first_forward = True
        return speech(*args, **kwargs)

    gpt.inference_speech = greedy_speech
    forward = inf.forward

    @functools.wraps(forward)  # as Clock.wrap: generate reads forward's signature
    def forward_split(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = forward(*args, **kwargs)
        clock.add("prefill" if clock.first_forward else "decode_forward", time.perf_counter() - t0)
        clock.first_forward = False
        return out

    inf.forward = forward_split
    clock.wrap(inf, "generate", "generate")
    clock.wrap(gpt, "get_conditioning", "conditioning")
    clock.wrap(gpt, "merge_emovec", "conditioning")
    clock.wrap(gpt, "forward", "latent")
    for name in ("gpt_layer", "length_regulator"):
        clock.wrap(tts.s2mel.models[name], "forward", "s2mel")
    clock.wrap(tts.s2mel.models["cfm"], "inference", "s2mel")
    clock.wrap(tts.bigvgan, "forward", "bigvgan")


def request(tts: Any, voice: Path, text: str, codes: int) -> tuple[float, float, dict[str, float]]:
    """(first audio s, total s, stage times) of one streamed request through infer_generator."""
    clock = Clock()
    instrument(tts, clock)
    marks: dict[str, float] = {}
    tts.gr_progress = lambda value, desc: marks.setdefault(desc, time.perf_counter())
    t0 = time.perf_counter()
    first = None
    gen = tts.infer_generator(str(voice), text, None, stream_return=True, num_beams=1, max_mel_tokens=codes,
                              repetition_penalty=10.0, length_penalty=0.0, verbose=False)
    for i, _ in enumerate(gen):
        if i == 0:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    clock.t["voice"] = marks.get("text processing...", t0) - marks.get("starting inference...", t0)
    for obj in (tts.gpt, tts.gpt.inference_model, tts.bigvgan, tts.s2mel.models["cfm"],
                tts.s2mel.models["gpt_layer"], tts.s2mel.models["length_regulator"]):
        for name in ("inference_speech", "forward", "generate", "get_conditioning", "merge_emovec", "inference"):
            obj.__dict__.pop(name, None)  # drop the wrappers
    return first if first is not None else total, total, clock.t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", type=Path, required=True, help="an index-tts checkout (e.g. commit ee40fa7)")
    ap.add_argument("--checkpoints", type=Path, required=True, help="official-layout directory (ttsd make-tiny)")
    ap.add_argument("--tokenizer", type=Path, required=True,
                    help="tokenizer.json of the same model converted by ttsd-convert (make-tiny --convert)")
    ap.add_argument("--voice", type=Path, required=True, help="reference audio (the same file bench_pipeline gets)")
    ap.add_argument("--texts", default="paragraph", help=f"comma-separated subset of {list(TEXTS)}")
    ap.add_argument("--codes", type=int, default=40, help="codes per segment (stop token suppressed)")
    ap.add_argument("--repeat", type=int, default=2, help="warm requests per text (min and median shown)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--versus", type=Path, help="the same model converted by ttsd-convert: alternate with ttsd")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tts = load_upstream(args.upstream, args.checkpoints, args.tokenizer)
    print(f"load_s: {time.perf_counter() - t0:.1f}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    ours = Ours(args.versus, args.voice, args.codes) if args.versus is not None else None
    for name in [t for t in args.texts.split(",") if t]:
        tts.cache_spk_cond = tts.cache_emo_cond = None  # a cold request first: it prepares the voice
        _, cold_total, cold = request(tts, args.voice, TEXTS[name], args.codes)
        if ours is not None:
            ours.warm(TEXTS[name])
        runs = []
        for _ in range(args.repeat):
            runs.append(request(tts, args.voice, TEXTS[name], args.codes))
            if ours is not None:
                ours.measure(name)
        print(f"\n{name}: cold request {cold_total:.2f} s, prepare_voice {cold['voice']:.2f} s, {args.repeat} warm:")
        rows: dict[str, list[float]] = {"first_audio_s": [r[0] for r in runs], "total_s": [r[1] for r in runs]}
        segments = len(tts.tokenizer.split_segments(tts.tokenizer.tokenize(TEXTS[name]), MAX_TEXT_TOKENS_PER_SEGMENT))
        for _, _, t in runs:
            decode = t.get("generate", 0.0) - t.get("prefill", 0.0)
            for key, value in (("conditioning_s", t.get("conditioning", 0.0)), ("prefill_s", t.get("prefill", 0.0)),
                               ("decode_s", decode), ("decode_ms_per_code", 1000 * decode / (segments * args.codes)),
                               ("latent_s", t.get("latent", 0.0)),
                               ("s2mel_s", t.get("s2mel", 0.0)), ("bigvgan_s", t.get("bigvgan", 0.0))):
                rows.setdefault(key, []).append(value)
        if ours is None:
            print("| stage | min | median |\n|---|---|---|")
            for key, values in rows.items():
                print(f"| {key} | {min(values):.3f} | {statistics.median(values):.3f} |")
            continue
        rows["prepare_voice_s"] = [cold["voice"]]
        theirs = ours.table(name)
        print("| stage | upstream median | ttsd median | upstream / ttsd |\n|---|---|---|---|")
        for key, values in rows.items():
            up, tt = statistics.median(values), theirs.get(key)
            ratio = "" if not tt else f"{up / tt:.2f}×"
            print(f"| {key} | {up:.3f} | {'' if tt is None else f'{tt:.3f}'} | {ratio} |")
        print(f"(ttsd's prepare_voice_s includes the conditioning upstream repeats per segment: "
              f"{statistics.median(rows['conditioning_s']):.3f} s of upstream's requests)")
    return 0


class Ours:
    """ttsd's Pipeline on the converted model, measured by bench_pipeline between upstream's requests."""

    def __init__(self, converted: Path, voice: Path, codes: int) -> None:
        sys.path.insert(0, str(Path(__file__).parent))
        bp = importlib.import_module("bench_pipeline")
        from ttsd.api.options import SynthesisOptions
        from ttsd.pipeline import Pipeline

        self.bp = bp
        t0 = time.perf_counter()
        self.pipe = Pipeline.load(converted, "cpu")
        bp.suppress_stop(self.pipe)
        print(f"ttsd load_s: {time.perf_counter() - t0:.1f}")
        self.opts = SynthesisOptions(do_sample=False, num_beams=1, max_mel_tokens=codes)
        t0 = time.perf_counter()
        self.voice = self.pipe.prepare_voice(voice)  # cold, as upstream's first request
        self.voice_s = time.perf_counter() - t0
        self.rows: dict[str, list[Any]] = {}

    def warm(self, text: str) -> None:
        self.bp.run_stream(self.pipe, self.voice, text, self.opts)

    def measure(self, name: str) -> None:
        self.rows.setdefault(name, []).append(self.bp.measure(self.pipe, self.voice, name, TEXTS[name], self.opts))

    def table(self, name: str) -> dict[str, float]:
        """Medians under upstream's row names."""
        m = self.bp.median_row(self.rows[name])
        return {"first_audio_s": m.first_audio_s, "total_s": m.total_s, "conditioning_s": 0.0,
                "prefill_s": m.gpt_prefill_ms / 1000, "decode_s": m.gpt_decode_s,
                "decode_ms_per_code": m.gpt_step_ms, "latent_s": m.gpt_latent_s,
                "s2mel_s": m.s2mel_s, "bigvgan_s": m.bigvgan_s, "prepare_voice_s": self.voice_s}


if __name__ == "__main__":
    sys.exit(main())
