"""Autoregressive semantic-code generation for UnifiedVoice: prefill, the pure decode step, sampling.

Ports the HF path of indextts/gpt/model_v2.py `inference_speech` → `GPT2InferenceModel.generate`
(transformers 4.52 `_sample` for num_beams 1; the repo's `_beam_search` with `BeamSearchScorer`
for num_beams > 1). Upstream behaviour kept: the start token sits at mel position 0 and the
k-th generated code (k ≥ 1) at mel position k + 1; the repetition penalty covers the fake prompt
ids (all 1), the start token and every generated code; processors run in the order
repetition penalty → temperature → top-k → top-p, on raw logits for greedy/sampling and on
log-softmax scores for beams; length_penalty 0 ranks beam hypotheses by their raw score sum.
This is the one place the decode step gets graphed (`graphed`). Shapes: B batch (beams),
P prefix length, S_max cache slots, V mel vocabulary, K codes budget."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import Cancelled
from .gpt import KVCache, UnifiedVoice

STOP_CHECK_EVERY = 8  # decode steps between host syncs (stop token check, cancel poll)
FAKE_PROMPT_ID = 1  # upstream fake input_ids are all 1 before the start token: code 1 is always penalised
BEAM_INIT_SCORE = -1e9  # HF beam_scores[:, 1:]: all beams start identical, only beam 0 may expand

StepFn = Callable[[UnifiedVoice, Tensor, Tensor, Tensor, KVCache], Tensor]
StepRecorder = Callable[[int, Tensor, Tensor], None]  # (step, raw logits [B, V], processed scores [B, V])


@dataclass(frozen=True, kw_only=True, slots=True)
class DecodeParams:
    do_sample: bool
    temperature: float
    top_k: int  # 0 disables
    top_p: float  # 1.0 disables
    num_beams: int
    repetition_penalty: float  # 1.0 disables
    max_mel_tokens: int  # K: codes generated at most (stop token included)

    @classmethod
    def from_options(cls, opts: Any) -> DecodeParams:
        """From `SynthesisOptions` (any object with the same field names)."""
        return cls(
            do_sample=bool(opts.do_sample),
            temperature=float(opts.temperature),
            top_k=int(opts.top_k),
            top_p=float(opts.top_p),
            num_beams=int(opts.num_beams),
            repetition_penalty=float(opts.repetition_penalty),
            max_mel_tokens=int(opts.max_mel_tokens),
        )


@dataclass(frozen=True, slots=True)
class Generated:
    codes_raw: Tensor  # [1, N'] as inference_speech returns them: ends in the stop token if one came
    codes: Tensor  # [1, N] trimmed at the first stop token (the second pass's input)
    stopped: bool  # the stop token was produced


def graphed(fn: StepFn, *, enabled: bool) -> StepFn:
    """The decode step as run: eager on CPU; on CUDA compiled with CUDA graphs (reduce-overhead)."""
    return _compile(fn) if enabled else fn


@functools.cache
def _compile(fn: StepFn) -> StepFn:
    # Once per function, so every request replays the same compiled graphs.
    compiled: StepFn = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    return compiled


def _step_fn(cache: KVCache, device: torch.device, graphs: bool) -> StepFn:
    """The decode step for this device; on CUDA the cache is marked static so graphs replay in place."""
    enabled = graphs and device.type == "cuda"
    if enabled:
        torch._dynamo.mark_static_address(cache.k)
        torch._dynamo.mark_static_address(cache.v)
    return graphed(decode_step, enabled=enabled)


def decode_step(gpt: UnifiedVoice, tokens: Tensor, input_pos: Tensor, mel_pos: Tensor, cache: KVCache) -> Tensor:
    """One token per row: tokens [B, 1] at cache slot input_pos [1], mel position mel_pos [1] → logits [B, V] fp32."""
    h = gpt(gpt.embed_mel(tokens, mel_pos), input_pos, cache)  # [B, 1, D]
    return gpt.mel_logits(h[:, -1]).float()


def prefill(gpt: UnifiedVoice, prefix: Tensor, cache: KVCache) -> Tensor:
    """Prefix [B, P, D] plus the start token at mel position 0 → logits [B, V] fp32 for the first code."""
    b, p, _ = prefix.shape
    dev = prefix.device
    start = torch.full((b, 1), gpt.cfg.start_mel_token, dtype=torch.long, device=dev)
    x = torch.cat((prefix, gpt.embed_mel(start, torch.zeros(1, dtype=torch.long, device=dev))), dim=1)
    h = gpt(x, torch.arange(p + 1, device=dev), cache)  # [B, P + 1, D]
    return gpt.mel_logits(h[:, -1]).float()


def repetition_penalty(scores: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """HF RepetitionPenaltyLogitsProcessor over the ids marked in `seen` [B, V]: x<0 → x·p, else x/p."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def top_k_filter(scores: Tensor, k: int) -> Tensor:
    """HF TopKLogitsWarper: everything below the k-th largest score becomes -inf (ties kept)."""
    kth = torch.topk(scores, min(k, scores.size(-1))).values[..., -1:]
    return scores.masked_fill(scores < kth, -float("inf"))


def top_p_filter(scores: Tensor, top_p: float, min_keep: int) -> Tensor:
    """HF TopPLogitsWarper: drop the low tail whose probability mass is ≤ 1 − top_p, keep ≥ min_keep."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - top_p)
    drop[..., -min_keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))


def process_scores(scores: Tensor, seen: Tensor, p: DecodeParams) -> Tensor:
    """Upstream processor order; the warpers (temperature, top-k, top-p) only when sampling."""
    if p.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seen, p.repetition_penalty)
    if not p.do_sample:
        return scores
    if p.temperature != 1.0:
        scores = scores / p.temperature
    if p.top_k > 0:
        scores = top_k_filter(scores, p.top_k)
    if p.top_p < 1.0:
        scores = top_p_filter(scores, p.top_p, min_keep=2 if p.num_beams > 1 else 1)
    return scores


def _poll(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("generation cancelled")


def _new_state(
    gpt: UnifiedVoice, prefix: Tensor, p: DecodeParams, batch: int, cache: KVCache | None
) -> tuple[KVCache, Tensor]:
    cfg = gpt.cfg
    need = prefix.size(1) + 1 + p.max_mel_tokens
    if cache is None:
        cache = KVCache(cfg, batch, need, prefix.device, prefix.dtype)
    elif cache.k.size(1) != batch or cache.max_seq_len < need:
        raise ValueError(f"KV cache holds {cache.k.size(1)} rows x {cache.max_seq_len} slots; need {batch} x {need}")
    # A reused cache needs no clearing: slots past the current position are masked out.
    seen = torch.zeros(batch, cfg.number_mel_codes, dtype=torch.bool, device=prefix.device)  # [B, V]
    seen[:, FAKE_PROMPT_ID] = True
    seen[:, cfg.start_mel_token] = True
    return cache, seen


def _finish(codes_raw: Tensor, stop: int) -> Generated:
    hits = (codes_raw[0] == stop).nonzero()
    if hits.numel() == 0:
        return Generated(codes_raw, codes_raw, False)
    n = int(hits[0, 0])  # host sync, once per segment
    return Generated(codes_raw[:, : n + 1], codes_raw[:, :n], True)


@torch.inference_mode()
def generate(
    gpt: UnifiedVoice,
    prefix: Tensor,
    params: DecodeParams,
    *,
    generator: torch.Generator | None = None,
    cancel: Callable[[], bool] | None = None,
    recorder: StepRecorder | None = None,
    cache: KVCache | None = None,
    graphs: bool = True,
) -> Generated:
    """Generate semantic codes after `prefix` [1, P, D] (from `UnifiedVoice.build_prefix`).

    num_beams 1: greedy (do_sample False) or multinomial sampling with `generator`;
    num_beams > 1: beam search / beam sampling as upstream. `cancel` is polled every
    STOP_CHECK_EVERY steps and raises Cancelled; `recorder` sees every step's logits and scores.
    `cache` (optional) is a per-slot KVCache with num_beams rows reused across requests, so that
    graphed steps replay on the same buffers; by default one is allocated for this call.
    `graphs` False keeps the decode step eager on CUDA too (it is always eager on CPU)."""
    if params.num_beams > 1:
        return beam_search(
            gpt, prefix, params, generator=generator, cancel=cancel, recorder=recorder, cache=cache, graphs=graphs
        )
    _poll(cancel)
    stop = gpt.cfg.stop_mel_token
    cache, seen = _new_state(gpt, prefix, params, 1, cache)
    step_fn = _step_fn(cache, prefix.device, graphs)
    codes = torch.full((1, params.max_mel_tokens), stop, dtype=torch.long, device=prefix.device)  # [1, K]
    input_pos = torch.tensor([prefix.size(1) + 1], device=prefix.device)  # cache slot of the first code
    mel_pos = torch.tensor([2], device=prefix.device)  # upstream off-by-one: code k sits at mel position k+1
    logits = prefill(gpt, prefix, cache)
    n = 0
    for step in range(params.max_mel_tokens):
        scores = process_scores(logits, seen, params)
        if recorder is not None:
            recorder(step, logits, scores)
        if params.do_sample:
            # Exponential race: argmax(p / Exp(1)) draws from p without a host sync (= multinomial).
            probs = scores.softmax(dim=-1)
            tok = (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1, keepdim=True)
        else:
            tok = scores.argmax(-1, keepdim=True)  # [1, 1]
        codes[:, step] = tok[:, 0]
        seen.scatter_(1, tok, True)
        n = step + 1
        if n == params.max_mel_tokens:
            break
        if n % STOP_CHECK_EVERY == 0:  # host sync: stop check and cancel poll every few steps
            _poll(cancel)
            if bool((codes[:, :n] == stop).any()):
                break
        logits = step_fn(gpt, tok, input_pos, mel_pos, cache)
        input_pos.add_(1)
        mel_pos.add_(1)
    return _finish(codes[:, :n], stop)


class _Hypotheses:
    """HF BeamHypotheses with length_penalty 0: the best `num_beams` finished sequences by raw score."""

    def __init__(self, num_beams: int) -> None:
        self.num_beams = num_beams
        self.beams: list[tuple[float, list[int]]] = []
        self.worst_score = 1e9

    def add(self, tokens: list[int], score: float) -> None:
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_candidate: float) -> bool:
        return len(self.beams) >= self.num_beams and self.worst_score >= best_candidate

    def best(self) -> list[int]:
        return sorted(self.beams, key=lambda b: b[0])[-1][1]


@torch.inference_mode()
def beam_search(
    gpt: UnifiedVoice,
    prefix: Tensor,
    params: DecodeParams,
    *,
    generator: torch.Generator | None = None,
    cancel: Callable[[], bool] | None = None,
    recorder: StepRecorder | None = None,
    cache: KVCache | None = None,
    graphs: bool = True,
) -> Generated:
    """HF beam search (do_sample False) / beam sampling (True) with num_beams ≥ 1 rows.

    The hypothesis bookkeeping runs on the host, so this path reads 2·B candidates every step."""
    _poll(cancel)
    nb, stop, dev = params.num_beams, gpt.cfg.stop_mel_token, prefix.device
    cache, seen = _new_state(gpt, prefix, params, nb, cache)
    step_fn = _step_fn(cache, dev, graphs)
    seqs = torch.full((nb, params.max_mel_tokens), stop, dtype=torch.long, device=dev)  # [B, K]
    scratch = torch.empty_like(seqs)
    seen_scratch = torch.empty_like(seen)
    beam_scores = torch.full((nb,), BEAM_INIT_SCORE, device=dev)
    beam_scores[0] = 0.0
    input_pos = torch.tensor([prefix.size(1) + 1], device=dev)
    mel_pos = torch.tensor([2], device=dev)
    n_keep = 2 * nb  # max(2, 1 + number of eos ids) · beams
    hyps = _Hypotheses(nb)
    done = False
    logits = prefill(gpt, prefix.expand(nb, -1, -1), cache)
    n = 0
    for step in range(params.max_mel_tokens):
        scores = process_scores(torch.log_softmax(logits, dim=-1), seen, params)  # penalty acts on log-probs
        if recorder is not None:
            recorder(step, logits, scores)
        flat = (scores + beam_scores[:, None]).view(1, -1)  # [1, B·V]
        if params.do_sample:
            cand = torch.multinomial(flat.softmax(dim=-1), n_keep, generator=generator)
            cand_scores, order = torch.gather(flat, 1, cand).sort(dim=1, descending=True)
            cand = cand.gather(1, order)
        else:
            cand_scores, cand = flat.topk(n_keep, dim=1)
        v = scores.size(-1)
        c_scores, c_ids = cand_scores[0].tolist(), cand[0].tolist()  # host sync: beam bookkeeping
        beams, tokens, new_scores = [], [], []
        for rank, (sc, cid) in enumerate(zip(c_scores, c_ids, strict=True)):
            b, tok = divmod(cid, v)
            if tok == stop:
                if rank < nb:  # an eos outside the top num_beams candidates is ignored (HF)
                    hyps.add(seqs[b, :step].tolist(), sc)
            else:
                beams.append(b)
                tokens.append(tok)
                new_scores.append(sc)
            if len(beams) == nb:
                break
        done = hyps.is_done(max(c_scores))
        beam_idx = torch.tensor(beams, device=dev)
        tok_t = torch.tensor(tokens, device=dev).unsqueeze(1)  # [B, 1]
        torch.index_select(seqs, 0, beam_idx, out=scratch)
        seqs.copy_(scratch)
        torch.index_select(seen, 0, beam_idx, out=seen_scratch)
        seen.copy_(seen_scratch)
        if beams != list(range(nb)):  # every beam kept its own row: nothing to move
            cache.reorder(beam_idx, prefix.size(1) + 1 + step)  # slots written: prefix, start, `step` codes
        seqs[:, step] = tok_t[:, 0]
        seen.scatter_(1, tok_t, True)
        beam_scores.copy_(torch.tensor(new_scores, device=dev))
        n = step + 1
        if done or n == params.max_mel_tokens:
            break
        if n % STOP_CHECK_EVERY == 0:
            _poll(cancel)
        logits = step_fn(gpt, tok_t, input_pos, mel_pos, cache)
        input_pos.add_(1)
        mel_pos.add_(1)
    if not done:  # finalize: open beams compete with the stored hypotheses
        for b, sc in enumerate(beam_scores.tolist()):
            hyps.add(seqs[b, :n].tolist(), sc)
    best = hyps.best()
    if len(best) < params.max_mel_tokens:
        best = [*best, stop]  # HF appends eos to a hypothesis shorter than max_length
    codes_raw = torch.tensor([best], dtype=torch.long, device=dev)
    return _finish(codes_raw, stop)
