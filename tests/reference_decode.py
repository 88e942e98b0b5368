"""A deliberately plain reference for decoding, used only by tests.

It recomputes the whole sequence with one uncached causal GPT pass per step and keeps HF's beam
bookkeeping (BeamSearchScorer / BeamHypotheses, length_penalty 0, early_stopping False) on the
host, step by step, as transformers 4.52 writes it. The batched decode loop (pipeline/decode.py)
must produce exactly its codes. Sampling draws its noise from the same counter-based Gumbel noise
as the decode loop, so sampled runs are comparable too."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ttsd.pipeline.decode import (
    BEAM_INIT_SCORE,
    FAKE_PROMPT_ID,
    DecodeParams,
    gumbel_noise,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
)
from ttsd.pipeline.gpt import UnifiedVoice


def _logits(gpt: UnifiedVoice, prefix: Tensor, seqs: list[list[int]]) -> Tensor:
    """Uncached: [start, c_1..c_k] at mel positions 0, 2, .., k+1 after the prefix → last logits [B, V]."""
    rows = []
    for seq in seqs:
        tokens = torch.tensor([[gpt.cfg.start_mel_token, *seq]])
        mel_pos = torch.tensor([0, *range(2, len(seq) + 2)])
        rows.append(torch.cat((prefix, gpt.embed_mel(tokens, mel_pos)), dim=1))
    x = torch.cat(rows)
    return gpt.mel_logits(gpt(x)[:, -1]).float()


def _process(scores: Tensor, seqs: list[list[int]], p: DecodeParams, start: int, v: int) -> Tensor:
    seen = torch.zeros(len(seqs), v, dtype=torch.bool)
    seen[:, FAKE_PROMPT_ID] = True
    seen[:, start] = True
    for i, seq in enumerate(seqs):
        seen[i, seq] = True
    scores = repetition_penalty(scores, seen, torch.full((len(seqs), 1), p.repetition_penalty))
    if p.do_sample:
        min_keep = 2 if p.num_beams > 1 else 1
        scores = scores / p.temperature
        k = max(p.top_k, min_keep) if p.top_k > 0 else 0
        scores = top_k_filter(scores, torch.full((len(seqs),), k), k)
        scores = top_p_filter(scores, torch.full((len(seqs), 1), p.top_p), torch.full((len(seqs),), min_keep))
    scores[:, start] = -float("inf")
    return scores


LogitsFn = Callable[[int, list[list[int]]], Tensor]  # (step, beams' codes so far) → raw logits [nb, V]


@torch.inference_mode()
def reference_decode(
    gpt: UnifiedVoice, prefix: Tensor, p: DecodeParams, key: int = 0, logits_fn: LogitsFn | None = None
) -> list[int]:
    """The codes inference_speech returns (ending in the stop code when one came). `logits_fn` replaces
    the uncached GPT pass (to replay another run's logits and check only the bookkeeping)."""
    cfg = gpt.cfg

    def logits(step: int, seqs: list[list[int]]) -> Tensor:
        return _logits(gpt, prefix, seqs) if logits_fn is None else logits_fn(step, seqs)

    stop, start, v = cfg.stop_mel_token, cfg.start_mel_token, cfg.number_mel_codes
    nb = p.num_beams
    if nb == 1:
        seq: list[int] = []
        for step in range(p.max_mel_tokens):
            scores = _process(logits(step, [seq]), [seq], p, start, v)
            if p.do_sample:
                scores = scores + gumbel_noise(torch.tensor([key]), torch.tensor([step]), v)
            tok = int(scores.argmax(-1))
            seq.append(tok)
            if tok == stop:
                break
        return seq
    beams: list[list[int]] = [[] for _ in range(nb)]
    beam_scores = torch.tensor([0.0] + [BEAM_INIT_SCORE] * (nb - 1))
    hyps: list[tuple[float, list[int]]] = []
    worst = 1e9
    done = False
    for step in range(p.max_mel_tokens):
        scores = _process(logits(step, beams).log_softmax(-1), beams, p, start, v)
        flat = (scores + beam_scores[:, None]).view(1, -1)
        keys = flat + gumbel_noise(torch.tensor([key]), torch.tensor([step]), nb * v) if p.do_sample else flat
        cand = keys.topk(2 * nb, dim=1).indices
        cand_scores, order = flat.gather(1, cand).sort(dim=1, descending=True, stable=True)
        cand = cand.gather(1, order)
        new_beams, new_scores = [], []
        for rank, (sc, cid) in enumerate(zip(cand_scores[0].tolist(), cand[0].tolist(), strict=True)):
            b, tok = divmod(cid, v)
            if tok == stop:
                if rank < nb:  # BeamHypotheses.add
                    if len(hyps) < nb or sc > worst:
                        hyps.append((sc, list(beams[b])))
                        if len(hyps) > nb:
                            ranked = sorted((s, i) for i, (s, _) in enumerate(hyps))
                            del hyps[ranked[0][1]]
                            worst = ranked[1][0]
                        else:
                            worst = min(sc, worst)
            else:
                new_beams.append([*beams[b], tok])
                new_scores.append(sc)
            if len(new_beams) == nb:
                break
        done = len(hyps) >= nb and worst >= float(cand_scores[0, 0])
        beams, beam_scores = new_beams, torch.tensor(new_scores)
        if done:
            break
    if not done:
        for b in range(nb):
            sc = float(beam_scores[b])
            if len(hyps) < nb or sc > worst:
                hyps.append((sc, beams[b]))
                if len(hyps) > nb:
                    ranked = sorted((s, i) for i, (s, _) in enumerate(hyps))
                    del hyps[ranked[0][1]]
                    worst = ranked[1][0]
                else:
                    worst = min(sc, worst)
    best = sorted(hyps, key=lambda h: h[0])[-1][1]
    return best + [stop] if len(best) < p.max_mel_tokens else best
