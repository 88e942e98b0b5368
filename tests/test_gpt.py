"""UnifiedVoice GPT: conditioning, emotion vectors, prefix, generation and latent against golden tensors.

Each stage is fed the golden inputs of that stage (w2v-BERT embeddings, CAMPPlus style, segment
tokens, the manifest's call), so a failure points at one stage."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from ttsd.api.errors import Cancelled
from ttsd.pipeline.decode import (
    DecodeBatch,
    DecodeParams,
    DecodeRequest,
    Generated,
    KVCache,
    cache_slots_for,
    generate,
    prefill,
    sampling_key,
)
from ttsd.pipeline.errors import CheckpointMismatch
from ttsd.pipeline.gpt import (
    CacheAt,
    EmotionMatrices,
    UnifiedVoice,
    load_emotion_matrices,
    load_unified_voice,
    scale_emo_vector,
)

from .conftest import FixtureSet, assert_close, assert_equal, golden_part
from .reference_decode import reference_decode


def _config(ckpt: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8")))


@pytest.fixture(scope="session")
def gpt(converted: Path) -> UnifiedVoice:
    return load_unified_voice(converted, _config(converted), "cpu")


@pytest.fixture(scope="session")
def emo_mats(converted: Path) -> EmotionMatrices:
    return load_emotion_matrices(converted, _config(converted), "cpu")


def _lang(g00: dict[str, Tensor], seg: int) -> int | None:
    """The segment's lang_embedding row (IndexTTS-2.5 stage 00 has one; IndexTTS-2 has no language)."""
    key = f"seg{seg}.lang"
    return int(g00[key]) if key in g00 else None


def _segments(fx: FixtureSet, variant: str) -> range:
    return range(len(fx.variant(variant)["segments"]))


def _unpadded(g9: dict[str, Tensor], seg: int) -> Tensor:
    """The golden prefix without the rows upstream left-pads and masks out (one per dropped id 0/1)."""
    keep = golden_part(g9[f"seg{seg}.gpt_attention_mask"], (0, slice(None, -1))).bool()  # [S]; last is start_mel
    return g9[f"seg{seg}.gpt_inputs_embeds"][:, keep]


def _golden_params(fx: FixtureSet, variant: str) -> DecodeParams:
    kw = fx.variant(variant)["call"]["generation_kwargs"]
    return DecodeParams(
        do_sample=bool(kw["do_sample"]), temperature=1.0, top_k=0, top_p=1.0, num_beams=int(kw["num_beams"]),
        repetition_penalty=float(kw["repetition_penalty"]), max_mel_tokens=int(fx.settings["max_mel_tokens"]),
    )


def _final_emovec(gpt: UnifiedVoice, mats: EmotionMatrices, fx: FixtureSet, variant: str) -> tuple[Tensor, Tensor]:
    """(merge_emovec output, emovec passed to the GPT) as infer_v2 computes them for the manifest call."""
    call = fx.variant(variant)["call"]
    w2v = fx.golden(variant, "03_w2vbert")
    spk, emo = w2v["spk.cond_emb"], w2v["emo.cond_emb"]
    if call["emo_vector"] is None:
        merged = gpt.merge_emovec(spk, emo, float(call["emo_alpha"]))
        return merged, merged
    weights = torch.tensor(scale_emo_vector(call["emo_vector"], float(call["emo_alpha"])))
    merged = gpt.merge_emovec(spk, emo, 1.0)  # vector mode forces alpha 1 (emotion audio = speaker audio)
    assert not call["use_random"]
    rows = mats.nearest_rows(fx.golden(variant, "06_campplus")["style"])
    return merged, mats.mix(weights, rows, merged)


def _recorder() -> tuple[list[tuple[Tensor, Tensor]], Any]:
    seen: list[tuple[Tensor, Tensor]] = []

    def rec(step: int, logits: Tensor, scores: Tensor) -> None:
        seen.append((logits.clone(), scores.clone()))

    return seen, rec


@pytest.mark.model_versions("2", "2.5")
@torch.inference_mode()
def test_emotion_conditioning_matches_upstream(fx: FixtureSet, variant: str, gpt: UnifiedVoice) -> None:
    """The emotion conformer, its mask, the emotion perceiver and get_emovec match stage 08 for both
    clips, and so do the (feature-width) lengths upstream passes and the merge alpha."""
    w2v, g = fx.golden(variant, "03_w2vbert"), fx.golden(variant, "08_emovec")
    call = fx.variant(variant)["call"]
    # Upstream merges at alpha 1 without an emotion clip, and in vector mode (which drops the clip).
    alpha = float(call["emo_alpha"]) if call["emo_audio_prompt"] and call["emo_vector"] is None else 1.0
    for s in _segments(fx, variant):
        assert_equal(gpt.quirk_lengths(w2v["spk.cond_emb"]), g[f"seg{s}.cond_lengths"], f"seg{s}.cond_lengths")
        assert_equal(gpt.quirk_lengths(w2v["emo.cond_emb"]), g[f"seg{s}.emo_cond_lengths"], "emo_cond_lengths")
        assert_close(torch.tensor([alpha]), g[f"seg{s}.emo_alpha"], f"seg{s}.emo_alpha")
        for ref, x in (("spk_ref", w2v["spk.cond_emb"]), ("emo_ref", w2v["emo.cond_emb"])):
            h, mask = gpt.emo_conditioning_encoder(x, gpt.quirk_lengths(x))
            assert_close(h, g[f"seg{s}.{ref}.emo_conformer_out"], f"seg{s}.{ref}.emo_conformer_out")
            assert_equal(mask, g[f"seg{s}.{ref}.emo_conformer_mask"], f"seg{s}.{ref}.emo_conformer_mask")
            p = gpt.emo_perceiver_encoder(h, gpt.emo_perceiver_encoder.latent_mask(mask))
            assert_close(p, g[f"seg{s}.{ref}.emo_perceiver_out"], f"seg{s}.{ref}.emo_perceiver_out")
            assert_close(gpt.get_emovec(x), g[f"seg{s}.emovec_{ref}"], f"seg{s}.emovec_{ref}")


@pytest.mark.model_versions("2", "2.5")
@torch.inference_mode()
def test_emovec_merge_and_mix_match_upstream(
    fx: FixtureSet, variant: str, gpt: UnifiedVoice, emo_mats: EmotionMatrices
) -> None:
    """merge_emovec and the emotion-matrix mixing reproduce the emovec that upstream fed the GPT."""
    g = fx.golden(variant, "08_emovec")
    merged, final = _final_emovec(gpt, emo_mats, fx, variant)
    for s in _segments(fx, variant):
        assert_close(merged, g[f"seg{s}.emovec_merged"], f"seg{s}.emovec_merged")
        assert_close(final, g[f"seg{s}.emovec_final"], f"seg{s}.emovec_final")
    if "emo_vector_random_index" in g:
        rows = emo_mats.nearest_rows(fx.golden(variant, "06_campplus")["style"])
        assert_equal(rows, g["emo_vector_random_index"], "emo_vector_random_index")
        call = fx.variant(variant)["call"]
        weights = torch.tensor(scale_emo_vector(call["emo_vector"], float(call["emo_alpha"])))
        assert_equal(weights, g["emo_vector_weights"], "emo_vector_weights")
        mat = emo_mats.mix(weights, rows, torch.zeros_like(merged))  # zero emovec isolates Σ w·E
        assert_close(mat, g["emovec_mat"], "emovec_mat")


@torch.inference_mode()
def test_speaker_conformer_matches_upstream(fx: FixtureSet, variant: str, gpt: UnifiedVoice) -> None:
    """IndexTTS-2: the speaker conformer and its mask over the w2v-BERT features match stage 09."""
    spk = fx.golden(variant, "03_w2vbert")["spk.cond_emb"]
    g = fx.golden(variant, "09_gpt_conditioning")
    h, mask = gpt.conditioning_encoder(spk, gpt.quirk_lengths(spk))
    for s in _segments(fx, variant):
        assert_close(h, g[f"seg{s}.spk_conformer_out"], f"seg{s}.spk_conformer_out")
        assert_equal(mask, g[f"seg{s}.spk_conformer_mask"], f"seg{s}.spk_conformer_mask")


@pytest.mark.model_versions("2.5")
@torch.inference_mode()
def test_campplus_projection_and_lang_embedding_match_upstream(
    fx: FixtureSet, variant: str, gpt: UnifiedVoice
) -> None:
    """IndexTTS-2.5: spk_emb_proj of the CAMPPlus style and the segment's language row match stage 09."""
    style = fx.golden(variant, "06_campplus")["style"]
    g, text = fx.golden(variant, "09_gpt_conditioning"), fx.golden(variant, "00_text")
    for s in _segments(fx, variant):
        assert_close(style, g[f"seg{s}.spk_emb_proj_in"], f"seg{s}.spk_emb_proj_in")
        assert_close(gpt.spk_emb_proj(style), g[f"seg{s}.spk_emb_proj_out"], f"seg{s}.spk_emb_proj_out")
        lang = _lang(text, s)
        assert lang is not None
        assert_equal(torch.tensor(lang), g[f"seg{s}.lang_index"], f"seg{s}.lang_index")
        assert_close(gpt.lang_embedding.weight[lang], g[f"seg{s}.lang_emb"], f"seg{s}.lang_emb")


@pytest.mark.model_versions("2", "2.5")
@torch.inference_mode()
def test_conditioning_and_prefix_match_upstream(fx: FixtureSet, variant: str, gpt: UnifiedVoice) -> None:
    """The speaker latent, conds and the generation prefix match stage 09, and upstream's padded
    layout (one masked zero row per dropped id 0/1, fake ids) follows from the ids the prefix kept."""
    spk, style = fx.golden(variant, "03_w2vbert")["spk.cond_emb"], fx.golden(variant, "06_campplus")["style"]
    g8, g = fx.golden(variant, "08_emovec"), fx.golden(variant, "09_gpt_conditioning")
    text = fx.golden(variant, "00_text")
    latent = gpt.speaker_latent(spk, style)
    for s in _segments(fx, variant):
        assert_close(latent, g[f"seg{s}.speech_conditioning_latent"], f"seg{s}.speech_conditioning_latent")
        emovec = g8[f"seg{s}.emovec_final"]
        assert_close(gpt.conds_latent(latent, emovec), g[f"seg{s}.conds_latent"], f"seg{s}.conds_latent")
        ids = text[f"seg{s}.text_tokens"]
        prefix = gpt.build_prefix(latent, emovec, ids, _lang(text, s))  # [1, P, D]
        pad = ids.size(1) + 2 + gpt.cfg.prefix_conds - prefix.size(1)  # upstream's target_len − P
        padded = torch.cat((prefix.new_zeros(1, pad, prefix.size(2)), prefix), dim=1)
        assert_close(padded, g[f"seg{s}.gpt_inputs_embeds"], f"seg{s}.gpt_inputs_embeds")
        mask = torch.cat((torch.zeros(1, pad), torch.ones(1, prefix.size(1) + 1)), dim=1).long()
        assert_equal(mask, g[f"seg{s}.gpt_attention_mask"], f"seg{s}.gpt_attention_mask")
        fake = torch.ones(1, pad + prefix.size(1) + 1, dtype=torch.long)
        fake[0, -1] = gpt.cfg.start_mel_token
        assert_equal(fake, g[f"seg{s}.gpt_fake_input_ids"], f"seg{s}.gpt_fake_input_ids")


@pytest.mark.model_versions("2", "2.5")
@torch.inference_mode()
def test_prefix_drops_start_and_stop_text_ids(gpt: UnifiedVoice) -> None:
    """Text ids equal to start_text_token/stop_text_token are removed from the generation prefix."""
    cfg = gpt.cfg
    latent = torch.randn(1, cfg.condition_num_latent, cfg.model_dim)
    emovec = torch.randn(1, cfg.model_dim)
    lang = None if cfg.campplus is None else 0
    clean = torch.tensor([[5, 9, 7]])
    dirty = torch.tensor([[cfg.start_text_token, 5, cfg.stop_text_token, 9, 7, cfg.stop_text_token]])
    assert torch.equal(gpt.build_prefix(latent, emovec, dirty, lang), gpt.build_prefix(latent, emovec, clean, lang))


@pytest.mark.model_versions("2", "2.5")
@torch.inference_mode()
def test_lang_argument_follows_the_model_version(gpt: UnifiedVoice) -> None:
    """IndexTTS-2.5 prefixes need the language row and IndexTTS-2 ones refuse one (a clear ValueError)."""
    cfg = gpt.cfg
    latent, emovec = torch.randn(1, cfg.condition_num_latent, cfg.model_dim), torch.randn(1, cfg.model_dim)
    ids = torch.tensor([[5, 9, 7]])
    if cfg.campplus is None:
        with pytest.raises(ValueError, match="lang must be None"):
            gpt.build_prefix(latent, emovec, ids, 0)
        return
    with pytest.raises(ValueError, match="needs the language"):
        gpt.build_prefix(latent, emovec, ids)
    en, zh = gpt.build_prefix(latent, emovec, ids, 0), gpt.build_prefix(latent, emovec, ids, 1)
    text_rows = slice(cfg.prefix_conds, None)
    assert torch.equal(en[:, : cfg.prefix_conds], zh[:, : cfg.prefix_conds])  # conditioning rows untouched
    diff = (zh - en)[0, text_rows]  # every text position moved by the same row difference
    assert torch.allclose(diff, (gpt.lang_embedding.weight[1] - gpt.lang_embedding.weight[0]).expand_as(diff),
                          atol=1e-6)


@pytest.mark.model_versions("2", "2.5")
@torch.inference_mode()
def test_greedy_generation_matches_upstream(fx: FixtureSet, variant: str, gpt: UnifiedVoice) -> None:
    """Greedy decoding from the golden prefix reproduces upstream's logits, scores and codes exactly.

    The one deliberate difference, the start code masked to -inf after the processors, is checked on
    its own: every other score matches, and upstream never chose the start code."""
    g9, g = fx.golden(variant, "09_gpt_conditioning"), fx.golden(variant, "10_gpt_generate")
    params = _golden_params(fx, variant)
    start = gpt.cfg.start_mel_token
    for s in _segments(fx, variant):
        steps, rec = _recorder()
        out = generate(gpt, _unpadded(g9, s), params, recorder=rec)
        n8 = g[f"seg{s}.logits_first8"].size(1)
        assert_close(torch.stack([lg for lg, _ in steps[:n8]], 1), g[f"seg{s}.logits_first8"], f"seg{s}.logits_first8")
        scores = torch.stack([sc for _, sc in steps[:n8]], 1)  # [1, 8, V]
        golden = g[f"seg{s}.scores_first8"]
        assert bool((scores[..., start] == -float("inf")).all())
        keep = torch.arange(golden.size(-1)) != start
        assert_close(scores[..., keep], golden_part(golden, (..., keep)), f"seg{s}.scores_first8")
        assert not bool((g[f"seg{s}.scores_argmax"] == start).any())  # masking cannot change upstream's choice
        steps = steps[: out.codes_raw.size(1)]  # the loop may run past the stop until its next stop check
        argmax = torch.stack([sc.argmax(-1) for _, sc in steps], 1)
        assert_equal(argmax, g[f"seg{s}.scores_argmax"], f"seg{s}.scores_argmax")
        assert_close(torch.stack([lg.max(-1).values for lg, _ in steps], 1), g[f"seg{s}.logits_max"], "logits_max")
        assert_equal(out.codes_raw, g[f"seg{s}.codes_raw"], f"seg{s}.codes_raw")
        assert_equal(out.codes, g[f"seg{s}.codes"], f"seg{s}.codes")
        assert_equal(torch.tensor([out.codes.size(1)]), g[f"seg{s}.code_lens"], f"seg{s}.code_lens")
        assert_equal(torch.tensor([out.stopped]), g[f"seg{s}.stop_produced"], f"seg{s}.stop_produced")


@pytest.mark.stages("11_gpt_latent")
@torch.inference_mode()
def test_latent_matches_upstream(fx: FixtureSet, variant: str, gpt: UnifiedVoice) -> None:
    """The second GPT pass over golden codes reproduces upstream's latent for s2mel."""
    g8, g9 = fx.golden(variant, "08_emovec"), fx.golden(variant, "09_gpt_conditioning")
    g10, g = fx.golden(variant, "10_gpt_generate"), fx.golden(variant, "11_gpt_latent")
    text = fx.golden(variant, "00_text")
    for s in _segments(fx, variant):
        latent = gpt.latent(
            g9[f"seg{s}.speech_conditioning_latent"], g8[f"seg{s}.emovec_final"],
            text[f"seg{s}.text_tokens"], g10[f"seg{s}.codes"],
        )
        assert_close(latent, g[f"seg{s}.latent"], f"seg{s}.latent")


def _prefix(fx: FixtureSet) -> Tensor:
    return fx.golden("base", "09_gpt_conditioning")["seg0.gpt_inputs_embeds"]


def _params(**kw: Any) -> DecodeParams:
    base: dict[str, Any] = dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, num_beams=1,
                                repetition_penalty=10.0, max_mel_tokens=24)
    base.update(kw)
    return DecodeParams(**base)


@torch.inference_mode()
def test_cached_decoding_equals_full_forward(fx: FixtureSet, gpt: UnifiedVoice) -> None:
    """Logits of every cached decode step equal one uncached causal pass over the same sequence."""
    prefix = _prefix(fx)
    steps, rec = _recorder()
    out = generate(gpt, prefix, _params(max_mel_tokens=24), recorder=rec)
    n = out.codes_raw.size(1)
    # Mel positions as upstream decoding sees them: start token at 0, code k at k + 1.
    tokens = torch.cat((torch.tensor([[gpt.cfg.start_mel_token]]), out.codes_raw[:, : n - 1]), dim=1)
    mel_pos = torch.cat((torch.tensor([0]), torch.arange(2, n + 1)))
    x = torch.cat((prefix, gpt.embed_mel(tokens, mel_pos)), dim=1)
    full = gpt.mel_logits(gpt(x))[:, prefix.size(1):]  # [1, n, V]
    assert_close(torch.stack([lg for lg, _ in steps], 1), full, "cached vs full logits")


@torch.inference_mode()
def test_prefill_writes_cache_in_place(fx: FixtureSet, gpt: UnifiedVoice) -> None:
    """Prefill fills exactly the first P + 1 slots of its row of the preallocated cache."""
    prefix = _prefix(fx)
    p = prefix.size(1)
    cache = KVCache(gpt.cfg, 4, p + 8, prefix.device, prefix.dtype, max_rows=4, max_slots=p + 8, growable=False)
    ptr = cache.buf.data_ptr()
    prefill(gpt, prefix, cache.view(1, 2))
    assert cache.buf.data_ptr() == ptr
    filled = cache.buf.abs().sum(dim=(0, 1, 3, 5)) > 0  # [R, S]
    assert filled[1].tolist() == [True] * (p + 1) + [False] * 7
    assert not bool(filled[0].any() or filled[2:].any())


def _stop_biased(gpt: UnifiedVoice, bias: float) -> UnifiedVoice:
    """A copy whose stop logit is raised, so that decoding ends after a few codes (eos paths run)."""
    out = copy.deepcopy(gpt)
    out.mel_head.bias.data[out.cfg.stop_mel_token] += bias
    return out


DECODE_CASES = {
    "greedy": dict(do_sample=False, num_beams=1, repetition_penalty=10.0),
    "sample": dict(do_sample=True, num_beams=1, repetition_penalty=10.0, temperature=0.8, top_k=30, top_p=0.8),
    "beams3": dict(do_sample=False, num_beams=3, repetition_penalty=10.0),
    "beams3-nopenalty": dict(do_sample=False, num_beams=3, repetition_penalty=1.0),
    "beam-sample3": dict(do_sample=True, num_beams=3, repetition_penalty=10.0, temperature=0.8, top_k=30, top_p=0.8),
    "beam-sample2-boost": dict(do_sample=True, num_beams=2, repetition_penalty=0.1, top_k=0, top_p=1.0),
    "beams4-boost": dict(do_sample=False, num_beams=4, repetition_penalty=0.05),
    "beam-sample4-topk1": dict(do_sample=True, num_beams=4, repetition_penalty=2, temperature=1.3, top_k=1, top_p=0.5),
}


@pytest.mark.parametrize("bias", [0.0, 2.8, 3.2])
@pytest.mark.parametrize("case", sorted(DECODE_CASES))
@torch.inference_mode()
def test_decode_loop_equals_plain_reference(fx: FixtureSet, gpt: UnifiedVoice, case: str, bias: float) -> None:
    """The cached, batched decode loop picks exactly the codes of an uncached step-by-step HF reference.

    Deterministic cases compare against a reference that recomputes every step from scratch (the
    cache, its beam reorders and the positions are all checked); sampled cases replay this run's own
    logits through the reference, so the HF bookkeeping is checked without depending on float ties."""
    model = _stop_biased(gpt, bias) if bias else gpt
    params = _params(max_mel_tokens=30, **DECODE_CASES[case])
    g9 = fx.golden("base", "09_gpt_conditioning")
    for s in _segments(fx, "base"):
        prefix = g9[f"seg{s}.gpt_inputs_embeds"]
        for key in (sampling_key(7, s), sampling_key(12345, s)):
            steps, rec = _recorder()
            out = generate(model, prefix, params, key=key, recorder=rec)

            def replay(step: int, _beams: list[list[int]], steps: list[tuple[Tensor, Tensor]] = steps) -> Tensor:
                return steps[step][0]

            want = reference_decode(model, prefix, params, key=key, logits_fn=replay if params.do_sample else None)
            assert out.codes_raw[0].tolist() == want, (case, bias, s)
            assert gpt.cfg.start_mel_token not in out.codes_raw[0].tolist()


@torch.inference_mode()
def test_stop_paths_are_exercised(fx: FixtureSet, gpt: UnifiedVoice) -> None:
    """With the stop bias used above, greedy and beam decoding end early (eos hypotheses are taken)."""
    model = _stop_biased(gpt, 3.2)
    lengths = {
        case: generate(model, _prefix(fx), _params(max_mel_tokens=30, **DECODE_CASES[case])).codes_raw.size(1)
        for case in ("greedy", "beams3")
    }
    assert all(1 < n < 30 for n in lengths.values()), lengths


@torch.inference_mode()
def test_start_code_is_never_emitted(fx: FixtureSet, gpt: UnifiedVoice) -> None:
    """Even when the start code dominates every other logit, no decoding mode emits it."""
    model = copy.deepcopy(gpt)
    model.mel_head.bias.data[model.cfg.start_mel_token] += 1e4
    for case in DECODE_CASES.values():
        out = generate(model, _prefix(fx), _params(max_mel_tokens=12, **case), key=3)
        assert gpt.cfg.start_mel_token not in out.codes_raw[0].tolist()
        assert all(0 <= c < gpt.cfg.number_mel_codes for c in out.codes_raw[0].tolist())


@torch.inference_mode()
def test_batched_requests_decode_bit_identically_to_alone(fx: FixtureSet, gpt: UnifiedVoice) -> None:
    """Six requests (1–4 beams, sampling) joining a running batch at different steps see, step by step,
    exactly the logits they see alone, so a seeded request gives the same codes either way."""
    prefixes = [
        fx.golden(v, "09_gpt_conditioning")[f"seg{s}.gpt_inputs_embeds"] for v in fx.variants for s in _segments(fx, v)
    ]
    beams = (1, 3, 1, 2, 1, 4)
    params = [_params(do_sample=True, num_beams=beams[i % len(beams)], temperature=0.8, top_k=30, top_p=0.8,
                      max_mel_tokens=40) for i in range(len(prefixes))]

    def run(members: list[int], join_every: int) -> dict[int, tuple[list[int], list[Tensor]]]:
        batch = DecodeBatch(gpt, max_rows=16, dtype=torch.float32)
        logs: dict[int, list[Tensor]] = {i: [] for i in members}
        reqs: dict[int, DecodeRequest] = {}
        waiting = list(members)
        while waiting or batch.active:
            if waiting and batch.step_count % join_every == 0:
                i = waiting.pop(0)
                reqs[i] = DecodeRequest(prefix=prefixes[i], params=params[i], key=sampling_key(i, 0),
                                        recorder=lambda _s, lg, _sc, i=i: logs[i].append(lg.clone()))
                batch.admit(reqs[i])
            batch.step()
        return {i: (reqs[i].result.codes_raw[0].tolist(), logs[i]) for i in members if reqs[i].result}

    together = run(list(range(len(prefixes))), 3)
    for i in range(len(prefixes)):
        codes, logits = run([i], 1)[i]
        assert together[i][0] == codes
        assert all(torch.equal(a, b) for a, b in zip(together[i][1], logits, strict=True))


@torch.inference_mode()
def test_one_row_selection_over_a_slice_equals_the_general_selection(fx: FixtureSet, gpt: UnifiedVoice) -> None:
    """Batches of one-row requests select over a slice of the row state (`_select_rows`: one graph on
    CUDA); the general selection (gathers per beam group) runs when a request records its steps. Greedy
    and sampling requests joining at different steps, with early stops, pick the same codes either way."""
    model = _stop_biased(gpt, 2.8)  # some requests stop early, so rows are freed and reused
    prefixes = [fx.golden(v, "09_gpt_conditioning")[f"seg{s}.gpt_inputs_embeds"]
                for v in fx.variants for s in _segments(fx, v)]
    cases = [DECODE_CASES["greedy"], DECODE_CASES["sample"], dict(do_sample=True, repetition_penalty=1.0, top_k=0),
             dict(do_sample=True, repetition_penalty=2.0, top_k=7, top_p=1.0)]
    params = [_params(max_mel_tokens=30, **cases[i % len(cases)]) for i in range(2 * len(cases))]
    selections: list[str] = []
    select_rows = DecodeBatch._select_rows

    def spy(self: DecodeBatch, *args: Any) -> None:
        selections.append("slice")
        select_rows(self, *args)

    def run(recorded: bool) -> list[list[int]]:
        batch = DecodeBatch(model, max_rows=8, dtype=torch.float32)
        reqs = [DecodeRequest(prefix=prefixes[i % len(prefixes)], params=pr, key=sampling_key(i, 3),
                              recorder=(lambda *_: None) if recorded else None) for i, pr in enumerate(params)]
        waiting = list(reqs)
        while waiting or batch.active:
            if waiting and batch.step_count % 2 == 0 and batch.free_rows():
                batch.admit(waiting.pop(0))
            batch.step()
        return [r.result.codes_raw[0].tolist() for r in reqs if r.result is not None]

    general = run(recorded=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DecodeBatch, "_select_rows", spy)
        sliced = run(recorded=False)
    assert selections, "the slice selection never ran"
    assert len(sliced) == len(params) and sliced == general
    assert any(len(c) < 30 for c in sliced) and any(len(c) == 30 for c in sliced)  # early stops and full runs


@torch.inference_mode()
def test_beam_reorder_copies_only_the_slots_after_the_prefix(fx: FixtureSet, gpt: UnifiedVoice) -> None:
    """Beams of a request share its prefix slots (copied once at admission, never rewritten), so a reorder
    copies the slots written since, not the whole row (defect: every written slot of every beam row was
    copied on every step, ~2x a greedy step's bytes at 300 live slots). The codes are the reference's."""
    prefix = _prefix(fx)
    params = _params(num_beams=3, max_mel_tokens=20)
    copies: list[tuple[int, int]] = []
    copy_rows = KVCache.copy_rows

    def spy(self: KVCache, dst: Tensor, src: Tensor, start: int, stop: int) -> None:
        copies.append((start, stop))
        copy_rows(self, dst, src, start, stop)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KVCache, "copy_rows", spy)
        out = generate(gpt, prefix, params)
    p = prefix.size(1)
    assert copies[0] == (0, p + 1)  # admission: the prefix and the start code, once
    steady = copies[1:]
    assert len(steady) >= 10 and all(start == p + 1 for start, _ in steady)
    assert [stop - start for start, stop in steady] == list(range(len(steady)))  # only the codes so far
    assert out.codes_raw[0].tolist() == reference_decode(gpt, prefix, params)


@torch.inference_mode()
def test_batch_rows_are_reused_cleanly(fx: FixtureSet, gpt: UnifiedVoice) -> None:
    """Rows freed by a finished request (longer prefix first) decode a new request as a fresh batch
    would, and freed rows are zeroed (nothing a request wrote outlives it)."""
    g9 = fx.golden("base", "09_gpt_conditioning")
    params = _params(max_mel_tokens=30)
    batch = DecodeBatch(gpt, max_rows=4, dtype=torch.float32)
    for prefix in (g9["seg1.gpt_inputs_embeds"], g9["seg0.gpt_inputs_embeds"]):
        req = DecodeRequest(prefix=prefix, params=params)
        batch.admit(req)
        while req.result is None:
            batch.step()
        buf = batch.cache.buf  # [L, 2, R, H, S, Dh]
        assert not bool(buf[:, :, 0].any())  # the request's row is cleared when it leaves ...
        assert not bool(buf[:, :, :, :, 1:].any())  # ... and idle padding rows only ever touch slot 0
    fresh = generate(gpt, g9["seg0.gpt_inputs_embeds"], params)
    assert req.result.codes_raw.tolist() == fresh.codes_raw.tolist()


@torch.inference_mode()
def test_sampling_is_seeded_and_respects_top_k(fx: FixtureSet, gpt: UnifiedVoice) -> None:
    """Sampling with a fixed key is reproducible, differs for another key, and never leaves the top-k."""
    params = _params(do_sample=True, temperature=0.8, top_k=5, top_p=0.8, max_mel_tokens=24)

    def run(key: int) -> tuple[Generated, list[tuple[Tensor, Tensor]]]:
        steps, rec = _recorder()
        return generate(gpt, _prefix(fx), params, key=key, recorder=rec), steps

    a, steps = run(sampling_key(1234, 0))
    b, _ = run(sampling_key(1234, 0))
    c, _ = run(sampling_key(1234, 1))
    assert a.codes_raw.tolist() == b.codes_raw.tolist()
    assert a.codes_raw.tolist() != c.codes_raw.tolist()
    for (_, scores), tok in zip(steps, a.codes_raw[0].tolist(), strict=False):
        assert int(torch.isfinite(scores).sum()) <= 5
        assert bool(torch.isfinite(scores[0, tok])) and tok in torch.topk(scores[0], 5).indices.tolist()


@torch.inference_mode()
def test_cancel_raises(fx: FixtureSet, gpt: UnifiedVoice) -> None:
    """A cancel callback that turns true stops generation with Cancelled, for greedy and beams."""
    polls = 0

    def cancel_on_second_poll() -> bool:
        nonlocal polls
        polls += 1
        return polls >= 2

    with pytest.raises(Cancelled):
        generate(gpt, _prefix(fx), _params(max_mel_tokens=40), cancel=cancel_on_second_poll)
    assert polls == 2
    with pytest.raises(Cancelled):
        generate(gpt, _prefix(fx), _params(num_beams=2, max_mel_tokens=40), cancel=lambda: True)


def test_cache_covers_the_longest_request(gpt: UnifiedVoice) -> None:
    """The cache length fits 34 conds + the longest text + the longest code run, aligned to 64 slots."""
    cfg = gpt.cfg
    slots = cache_slots_for(cfg)
    assert slots % 64 == 0 and slots >= cfg.prefix_conds + cfg.text_positions + cfg.mel_positions


def test_checkpoint_mismatch_names_every_bad_key(converted: Path, tmp_path: Path) -> None:
    """A gpt checkpoint with a tensor removed, renamed and reshaped raises CheckpointMismatch naming them."""
    tensors = load_file(str(converted / "gpt.safetensors"))
    del tensors["mel_head.bias"]
    tensors["final_norm.gamma"] = tensors.pop("final_norm.weight")
    tensors["gpt.h.0.mlp.c_fc.bias"] = tensors["gpt.h.0.mlp.c_fc.bias"][:-1].clone()
    save_file(tensors, str(tmp_path / "gpt.safetensors"))
    with pytest.raises(CheckpointMismatch) as e:
        load_unified_voice(tmp_path, _config(converted), "cpu")
    assert e.value.missing == ["final_norm.weight", "mel_head.bias"]
    assert e.value.unexpected == ["final_norm.gamma"]
    assert len(e.value.misshaped) == 1 and e.value.misshaped[0].startswith("gpt.h.0.mlp.c_fc.bias")


@pytest.mark.cuda
@torch.inference_mode()
def test_graphed_greedy_on_cuda_matches_upstream(fx: FixtureSet, converted: Path) -> None:
    """On CUDA the compiled decode step reproduces upstream's greedy codes."""
    gpt = load_unified_voice(converted, _config(converted), "cuda")
    g9, g = fx.golden("base", "09_gpt_conditioning"), fx.golden("base", "10_gpt_generate")
    out = generate(gpt, g9["seg0.gpt_inputs_embeds"].cuda(), _golden_params(fx, "base"))
    assert_equal(out.codes, g["seg0.codes"], "seg0.codes")


@torch.inference_mode()
def test_float16_cached_attention_does_not_overflow(gpt: UnifiedVoice) -> None:
    """A float16 decode step whose raw q·kᵀ exceeds float16's range (65504) still attends correctly: the
    scale is applied before the product and the softmax runs in float32 (defect: inf, then NaN, then
    silence). Compared with the same weights in float32."""
    attn32 = copy.deepcopy(gpt.gpt.h[0].attn).float()
    d = gpt.cfg.model_dim
    with torch.no_grad():
        attn32.c_attn.weight.mul_(40.0)  # q and k 40× larger: q·kᵀ 1600× larger
        attn32.c_attn.bias.zero_()
    attn16 = copy.deepcopy(attn32).half()
    x = torch.randn(1, 1, d, generator=torch.Generator().manual_seed(0))
    slots, heads, dh = 8, gpt.cfg.heads, gpt.cfg.head_dim
    k = torch.randn(1, heads, slots, dh, generator=torch.Generator().manual_seed(1)) * 200
    v = torch.randn(1, heads, slots, dh, generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[slots - 1]])
    raw = (attn16.c_attn(x.half()).split(d, dim=-1)[0].view(1, 1, heads, dh).transpose(1, 2).float()
           @ k.transpose(-1, -2)).abs().max()
    assert raw > 65504, "the case must overflow float16 without the fix"
    out32 = attn32(x, CacheAt.of(pos, slots, torch.float32), (k.clone(), v.clone()))
    out16 = attn16(x.half(), CacheAt.of(pos, slots, torch.float16), (k.half(), v.half()))
    assert torch.isfinite(out16).all()
    scale = float(out32.abs().max())
    assert float((out16.float() - out32).abs().max()) <= 0.05 * max(1.0, scale)


def test_gemv_layout_keeps_the_function(converted: Path, gpt: UnifiedVoice) -> None:
    """The CPU load stores mel_head's weight [in, out] in memory with its shape, key and values kept, and
    the mel logits stay within the parity rule of the file's [out, in] layout."""
    path = converted / "gpt.safetensors"
    raw = load_file(str(path))["mel_head.weight"]  # [V, D] as stored
    w = gpt.mel_head.weight
    assert w.shape == raw.shape and w.t().is_contiguous() and not w.is_contiguous()
    assert torch.equal(w, raw) and gpt.state_dict()["mel_head.weight"].shape == raw.shape
    h = torch.randn(3, 1, gpt.cfg.model_dim, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.linear(gpt.final_norm(h), raw, gpt.mel_head.bias)
    assert_close(gpt.mel_logits(h), want, "mel logits, [in, out] vs [out, in]")
    fresh = copy.deepcopy(gpt)
    fresh.gemv_layout()  # idempotent: applying it again keeps the layout and the values
    assert fresh.mel_head.weight.t().is_contiguous() and torch.equal(fresh.mel_head.weight, raw)
