"""The decode loop: autoregressive semantic codes for many requests in one batch (continuous batching).

Ports the HF path of indextts/gpt/model_v2.py `inference_speech` → `GPT2InferenceModel.generate`
(transformers 4.52 `_sample` for num_beams 1; the repo's `_beam_search` with `BeamSearchScorer`
for num_beams > 1) as ONE loop in which a batch row is one beam of one request. Requests join
between steps (their prefill runs into free rows) and leave when they stop, reach their code
budget or are cancelled, without waiting for each other. Every row has its own cache slots,
positions and mask, so a request's codes do not depend on who else is in the batch.

Upstream behaviour kept: the start token sits at mel position 0 and the k-th generated code
(k ≥ 1) at mel position k + 1; the repetition penalty covers the fake prompt ids (all 1), the
start token and every generated code; processors run in the order repetition penalty →
temperature → top-k → top-p, on raw logits for num_beams 1 and on log-softmax scores for beams;
HF beam bookkeeping (2·beams candidates, hypotheses from end-of-sequence candidates ranked below
num_beams, is_done with length_penalty 0, finalize) is reproduced on the device.
Two deliberate differences: the start code can never be emitted (upstream only penalises it, and
a start code would index past the codec's codebook), and sampling draws from a counter-based hash
of (request seed, segment, step, token) instead of a global RNG, so a seeded request samples the
same codes alone or batched, with no random state on the host.

Host syncs: a steady-state step (greedy, sampling or beams) reads nothing back from the device; the
host reads the batch every STOP_CHECK_EVERY steps on CUDA (finished requests) and once when a
request leaves (its codes). On CPU the "device" is the host: reading it costs nothing, so the batch
checks after every step (`stop_check_every`) and no step is spent on a row that already stopped.
On CUDA with graphs a step of one-row requests is two graph replays (the selection, then the forward),
over a row bucket: free rows run too, but their `live` flag of 0 keeps their positions and step counts
where they are. Host values enter the device only between steps, through fills and pinned non-blocking copies
(`upload`), never a blocking copy. On CUDA all of a batch's work, joining and leaving included, is
issued on the stream current when it is called (the engine's GPT stream).
Shapes: R rows, Q requests, nb beams per request, V mel vocabulary, P prefix
length, S_cap cache slots, K code budget, L layers, H heads, Dh head width."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from ttsd.api.errors import Cancelled

from .device import upload
from .gpt import GPTConfig, LayerKV, UnifiedVoice
from .graphs import Graphs

STOP_CHECK_EVERY = 8  # decode steps between host syncs (finished requests) on CUDA; 1 on CPU
FAKE_PROMPT_ID = 1  # upstream fake input_ids are all 1 before the start token: code 1 is always penalised
BEAM_INIT_SCORE = -1e9  # HF beam_scores[:, 1:]: all beams start identical, only beam 0 may expand
SEQ_ALIGN = 64  # cache length granularity: keeps the [S, S_cap] mask aligned for fused SDPA kernels
# On CUDA every decode step runs a multiple of this many rows (idle rows pad it up to a graphed row
# bucket). On CPU each row steps alone (M = 1, see DecodeBatch._forward), so nothing is padded there.
ROW_ALIGN = 4
CAPTURE_TOP_K = 30  # the sampling top-k whose selection graphs warm-up records (the options' default)
_M32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9  # 2^32 / φ: spreads step numbers over the hash input

StepRecorder = Callable[[int, Tensor, Tensor], None]  # (step, raw logits [nb, V], processed scores [nb, V])


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
    codes: Tensor  # [1, N] trimmed at the first stop token (the second pass's input), on the device
    stopped: bool  # the stop token was produced
    codes_host: Tensor  # [1, N] the same codes on the host (lengths and range checks without a sync)


# ------------------------------------------------------------------------------------------------
# Counter-based sampling noise


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2^32 for x < 2^32 held in int64, split so no intermediate exceeds 2^48."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche bijection (Wellons' lowbias32) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sampling_key(seed: int, segment: int) -> int:
    """The 32-bit noise key of one segment of a seeded request (host side, once per segment)."""
    k = _mix32_int(seed & _M32)
    k = _mix32_int(k ^ ((seed >> 32) & _M32))
    return _mix32_int(k ^ _mix32_int(segment))


def gumbel_noise(keys: Tensor, steps: Tensor, width: int) -> Tensor:
    """Standard Gumbel noise [n, width] from (key, step) per row and the column index: the same
    numbers whatever else is in the batch, on any device, without a host sync."""
    base = _mix32((keys + steps * _GOLDEN32) & _M32)  # [n]
    h = _mix32(base[:, None] ^ torch.arange(width, device=keys.device))  # [n, width]
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1)
    return -torch.log(-torch.log(u))


# ------------------------------------------------------------------------------------------------
# Logits processing, one set of parameters per row


def repetition_penalty(scores: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """HF RepetitionPenaltyLogitsProcessor over the ids marked in `seen` [R, V]: x<0 → x·p, else x/p.
    penalty [R, 1]; a penalty of 1 leaves a row unchanged (x·1 and x/1 are exact)."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def top_k_filter(scores: Tensor, k: Tensor, k_max: int) -> Tensor:
    """HF TopKLogitsWarper per row: below the k-th largest score → -inf (ties kept); k [R] (on the scores'
    device) ≤ 0 disables a row. `k_max` is max(k), known on the host, so the step never reads k back."""
    if k_max <= 0:
        return scores
    top = torch.topk(scores, min(k_max, scores.size(-1)), dim=-1).values  # [R, k_max] descending
    kth = top.gather(1, (k.clamp(1, top.size(1)) - 1).unsqueeze(1))  # [R, 1]
    kth = kth.masked_fill((k <= 0).unsqueeze(1), -float("inf"))
    return scores.masked_fill(scores < kth, -float("inf"))


def top_p_filter(scores: Tensor, top_p: Tensor, min_keep: Tensor) -> Tensor:
    """HF TopPLogitsWarper per row: drop the low tail whose probability mass is ≤ 1 − top_p, keeping
    at least min_keep [R] tokens; top_p [R, 1] of 1.0 disables the row."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - top_p)
    v = scores.size(-1)
    keep_tail = torch.arange(v, device=scores.device)[None, :] >= (v - min_keep)[:, None]
    drop = drop & ~keep_tail & (top_p < 1.0)
    return scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))


# ------------------------------------------------------------------------------------------------
# The KV cache


class KVCache:
    """Per-layer key/value buffers for every batch row: layer i is (k[i], v[i]), each [R_cap, H, S_cap, Dh],
    views of one allocation [L, 2, R_cap, H, S_cap, Dh] written in place.

    `growable` caches (CPU) start small and grow in row and slot buckets as requests need them, so
    memory follows the work; fixed caches (CUDA) are allocated once at their full size, because
    graphed steps replay on fixed addresses."""

    def __init__(
        self,
        cfg: GPTConfig,
        rows: int,
        slots: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        max_rows: int,
        max_slots: int,
        growable: bool,
    ) -> None:
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.max_rows, self.max_slots, self.growable = max_rows, max_slots, growable
        self.buf = self._alloc(rows, slots)

    def _alloc(self, rows: int, slots: int) -> Tensor:
        c = self.cfg
        return torch.zeros(
            (c.layers, 2, rows, c.heads, slots, c.head_dim), device=self.device, dtype=self.dtype
        )  # [L, 2, R_cap, H, S_cap, Dh]

    @property
    def rows(self) -> int:
        return self.buf.size(2)

    @property
    def slots(self) -> int:
        return self.buf.size(4)

    def ensure(self, rows: int, slots: int) -> bool:
        """Make room for `rows` rows of `slots` slots (growing by doubling rows / aligned slots).
        Returns True when the buffer moved (callers re-take their views)."""
        if rows <= self.rows and slots <= self.slots:
            return False
        if not self.growable or rows > self.max_rows or slots > self.max_slots:
            raise RuntimeError(
                f"KV cache of {self.rows} rows x {self.slots} slots cannot hold {rows} rows x {slots} slots"
            )
        new_rows = max(self.rows, min(self.max_rows, 1 << (max(rows, 1) - 1).bit_length()))
        new_slots = max(self.slots, min(self.max_slots, -(-slots // 256) * 256))
        buf = self._alloc(new_rows, new_slots)
        buf[:, :, : self.rows, :, : self.slots] = self.buf
        self.buf = buf
        return True

    def view(self, start: int, stop: int) -> list[LayerKV]:
        """Rows [start, stop) as the per-layer (K, V) pairs UnifiedVoice.forward takes (shared storage)."""
        return [(self.buf[i, 0, start:stop], self.buf[i, 1, start:stop]) for i in range(self.buf.size(0))]

    def copy_rows(self, dst: Tensor, src: Tensor, start: int, stop: int) -> None:
        """Rows dst ← rows src over slots [start, stop) (beam reorder); src is read before any write."""
        self.buf[:, :, dst, :, start:stop] = self.buf[:, :, src, :, start:stop]

    def move_rows(self, dst: int, src: int, count: int, length: int) -> None:
        """Rows [dst, dst+count) ← rows [src, src+count) over `length` slots (compaction, dst < src)."""
        self.buf[:, :, dst : dst + count, :, :length] = self.buf[:, :, src : src + count, :, :length].clone()

    def clear_rows(self, start: int, stop: int, length: int) -> None:
        """Zero what rows [start, stop) hold in their first `length` slots. Called when rows are freed, so
        no value a request wrote (an overflow to ±inf in half precision, say) outlives it: masked slots
        are hidden by -inf scores, and inf·0 would turn a later request's scores into NaN."""
        self.buf[:, :, start:stop, :, :length] = 0


def _align(n: int, k: int) -> int:
    return -(-max(n, 1) // k) * k



def kv_buckets(max_slots: int) -> tuple[int, ...]:
    """Attention lengths a graphed step is recorded for: every 64 slots up to 512, every 128 up to 1024,
    every 256 beyond, and the whole cache. A step reads the first bucket ≥ its longest row (at most
    ~1/8 more than needed up to 1024 slots, 1/5 beyond), so its KV traffic follows the live lengths
    instead of the cache's capacity."""
    out: list[int] = []
    n = 0
    while n < max_slots:
        n += SEQ_ALIGN if n < 512 else 2 * SEQ_ALIGN if n < 1024 else 4 * SEQ_ALIGN
        out.append(min(n, max_slots))
    return tuple(out)


def cache_slots_for(cfg: GPTConfig) -> int:
    """Slots any request can need: 34 conds + the longest text + the longest code run, aligned."""
    need = cfg.prefix_conds + cfg.text_positions + cfg.mel_positions
    return _align(need, SEQ_ALIGN)


# ------------------------------------------------------------------------------------------------
# The pure decode step (the one place that may run graphed on CUDA)


def decode_step(
    gpt: UnifiedVoice, tokens: Tensor, input_pos: Tensor, mel_pos: Tensor, kv: Sequence[LayerKV], kv_len: int
) -> Tensor:
    """One token per row: tokens [R, 1] at cache slots input_pos [R, 1], mel positions mel_pos [R, 1]
    → logits [R, V] float32. Attention covers the first kv_len slots of each row."""
    h = gpt(gpt.embed_mel(tokens, mel_pos), input_pos, kv, kv_len)  # [R, 1, D]
    return gpt.mel_logits(h[:, -1]).float()


def prefill(gpt: UnifiedVoice, prefix: Tensor, kv: Sequence[LayerKV]) -> Tensor:
    """Prefix [1, P, D] plus the start token at mel position 0 into one row's cache → logits [1, V] fp32."""
    dev = prefix.device
    p = prefix.size(1)
    start = torch.full((1, 1), gpt.cfg.start_mel_token, dtype=torch.long, device=dev)
    x = torch.cat((prefix, gpt.embed_mel(start, torch.zeros(1, dtype=torch.long, device=dev))), dim=1)
    kv_len = min(_align(p + 1, SEQ_ALIGN), kv[0][0].size(2))
    h = gpt(x, torch.arange(p + 1, device=dev).unsqueeze(0), kv, kv_len)
    return gpt.mel_logits(h[:, -1]).float()


StepFn = Callable[[UnifiedVoice, Tensor, Tensor, Tensor, Sequence[LayerKV], int], Tensor]


# ------------------------------------------------------------------------------------------------
# Requests in the batch


@dataclass(eq=False)
class DecodeRequest:
    """One segment's decode: a prefix, its parameters and its noise key. Rows and state are the batch's."""

    prefix: Tensor  # [1, P, D] from UnifiedVoice.build_prefix, in the GPT's dtype
    params: DecodeParams
    key: int = 0  # sampling_key(seed, segment); unused by greedy decoding
    recorder: StepRecorder | None = None  # tests: sees every step's logits and scores
    tag: Any = None  # the caller's handle (the engine's segment job)
    # Set by the batch:
    row: int = -1  # first row
    steps: int = 0  # codes selected so far
    result: Generated | None = None
    group: _BeamGroup | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return self.params.num_beams

    @property
    def written(self) -> int:
        """Cache slots this request's rows have written: prefix + start token + one per forwarded code."""
        return self.prefix.size(1) + 1 + self.steps


@dataclass(eq=False)
class _RowState:
    """Everything the batch keeps per row, on the device (top_k also on the host: top-k needs its maximum
    as a Python int, and reading the device copy would sync)."""

    tokens: Tensor  # [R, 1] the code each row feeds to its next forward
    input_pos: Tensor  # [R, 1] the cache slot of that code
    mel_pos: Tensor  # [R, 1] its mel position
    logits: Tensor  # [R, V] float32, from the last forward (or the prefill)
    seen: Tensor  # [R, V] bool: ids the repetition penalty covers
    seqs: Tensor  # [R, K_max] codes selected so far
    penalty: Tensor  # [R, 1]
    temperature: Tensor  # [R, 1]
    top_p: Tensor  # [R, 1]
    do_sample: Tensor  # [R] bool
    is_beam: Tensor  # [R] bool
    key: Tensor  # [R] int64 sampling key (32-bit value)
    step: Tensor  # [R] codes selected so far (the noise counter and the seqs write position)
    top_k: Tensor  # [R] int64, 0 = off
    min_keep: Tensor  # [R] int64
    top_k_host: Tensor  # [R] the same as top_k, on the host
    live: Tensor  # [R] int64: 1 for a row in use, 0 for a free one (graphed steps run over free rows too)
    done: Tensor  # [R] bool: the row has selected its stop code (one-row requests)

    @classmethod
    def alloc(cls, rows: int, vocab: int, k_max: int, stop: int, device: torch.device) -> _RowState:
        def z(*shape: int, dtype: torch.dtype = torch.float32, value: float = 0.0) -> Tensor:
            return torch.full(shape, value, dtype=dtype, device=device)

        return cls(
            tokens=z(rows, 1, dtype=torch.long),
            input_pos=z(rows, 1, dtype=torch.long),
            mel_pos=z(rows, 1, dtype=torch.long),
            logits=z(rows, vocab),
            seen=z(rows, vocab, dtype=torch.bool),
            seqs=z(rows, k_max, dtype=torch.long, value=stop),
            penalty=z(rows, 1, value=1.0),
            temperature=z(rows, 1, value=1.0),
            top_p=z(rows, 1, value=1.0),
            do_sample=z(rows, dtype=torch.bool),
            is_beam=z(rows, dtype=torch.bool),
            key=z(rows, dtype=torch.long),
            step=z(rows, dtype=torch.long),
            top_k=z(rows, dtype=torch.long),
            min_keep=z(rows, dtype=torch.long, value=1),
            top_k_host=torch.zeros(rows, dtype=torch.long),
            live=z(rows, dtype=torch.long),
            done=z(rows, dtype=torch.bool),
        )

    def device_tensors(self) -> list[Tensor]:
        return [t for f in fields(self) if (t := getattr(self, f.name)).device.type != "cpu"]

    def free(self, start: int, stop: int) -> None:
        """Rows [start, stop) hold no request: a step over them advances nothing."""
        self.live[start:stop] = 0
        self.step[start:stop] = 0

    def move(self, src: _RowState, dst_row: int, src_row: int, count: int) -> None:
        """Rows [dst_row, dst_row+count) ← src's rows [src_row, src_row+count) (src may be self)."""
        for f in fields(self):
            t, o = getattr(self, f.name), getattr(src, f.name)
            t[dst_row : dst_row + count] = o[src_row : src_row + count].clone()


@dataclass(eq=False)
class _BeamGroup:
    """Device state of the requests decoding with one beam count, stacked [Qg, ...] for vectorised steps."""

    nb: int
    members: list[DecodeRequest] = field(default_factory=list)
    idx: Tensor | None = None  # [Qg, nb] rows of each member
    beam_scores: Tensor | None = None  # [Qg, nb]
    hyp_score: Tensor | None = None  # [Qg, nb] +inf in empty slots
    hyp_order: Tensor | None = None  # [Qg, nb] insertion counter (HF list order)
    hyp_len: Tensor | None = None  # [Qg, nb]
    hyp_tok: Tensor | None = None  # [Qg, nb, K_max]
    hyp_count: Tensor | None = None  # [Qg]
    counter: Tensor | None = None  # [Qg]
    done: Tensor | None = None  # [Qg] HF is_done (beams; one-row requests use the rows' own flag)


class DecodeBatch:
    """The continuous batch. Driven by one thread: `admit` between steps, `step`, and `finished` results.

    Rows are kept packed: request i holds rows [row, row + num_beams), and a leaving request's rows are
    filled by moving the later rows down, so a step runs over rows [0, n) only."""

    def __init__(
        self,
        gpt: UnifiedVoice,
        *,
        max_rows: int,
        dtype: torch.dtype,
        step_fn: StepFn | None = None,
        fixed: bool | None = None,
        row_buckets: Sequence[int] = (),
    ) -> None:
        self.gpt = gpt
        cfg = gpt.cfg
        self.cfg = cfg
        self.device = next(gpt.parameters()).device
        self.max_rows = max_rows
        self.vocab = cfg.number_mel_codes
        self.k_max = cfg.max_mel_tokens
        fixed = self.device.type == "cuda" if fixed is None else fixed
        # CPU: every row runs the step on its own (see _forward), so rows are never padded there.
        self.rowwise = self.device.type == "cpu"
        # A stop found at once frees its row at once (results do not depend on the cadence: a finished
        # row's later steps are discarded); on CUDA each check is a host sync, so it is amortised.
        self.stop_check_every = 1 if self.device.type == "cpu" else STOP_CHECK_EVERY
        self.row_align = 1 if self.rowwise else ROW_ALIGN
        max_slots = cache_slots_for(cfg)
        cache_rows = _align(max_rows, self.row_align)
        self.cache = KVCache(
            cfg,
            cache_rows if fixed else self.row_align,
            max_slots if fixed else SEQ_ALIGN,
            self.device,
            dtype,
            max_rows=cache_rows,
            max_slots=max_slots,
            growable=not fixed,
        )
        self.fixed = fixed
        self.step_fn: StepFn = step_fn or decode_step
        # Graphed steps run over a fixed set of row counts, the last one the whole cache, so every batch
        # size has a bucket recorded at warm-up (`capture`); eager steps run over exactly the rows in use.
        self.row_buckets = tuple(sorted({b for b in row_buckets if b < cache_rows} | {cache_rows})) if row_buckets \
            else ()
        # ... and over a fixed set of attention lengths (fixed caches: a graph per (rows, kv bucket)).
        self.kv_buckets = kv_buckets(max_slots) if fixed else ()
        # With buckets the forward is one graph replay per step, and so is the selection of a batch of
        # one-row requests (`_select`); beam bookkeeping runs eagerly.
        self.graphs = Graphs("decode") if self.row_buckets else None
        self.requests: list[DecodeRequest] = []
        self.groups: dict[int, _BeamGroup] = {}
        self.n = 0  # rows in use
        self.step_count = 0
        self._alloc_state(self.cache.rows)

    # --------------------------------------------------------------------------- state

    def _alloc_state(self, rows: int) -> None:
        old = getattr(self, "s", None)
        self.s = _RowState.alloc(rows, self.vocab, self.k_max, self.cfg.stop_mel_token, self.device)
        if old is not None:
            self.s.move(old, 0, 0, self.n)

    @property
    def active(self) -> bool:
        return bool(self.requests)

    @torch.inference_mode()
    def reset(self) -> None:
        """Drop every request and zero the cache (after a failed step), keeping every buffer where it
        is: graphs recorded on them stay valid."""
        self.requests.clear()
        self.groups.clear()
        self.n = 0
        self.cache.buf.zero_()
        self.s.free(0, self.s.tokens.size(0))  # graphed steps run over every row: none may advance

    @torch.inference_mode()
    def capture(self, top_k: Sequence[int] = (CAPTURE_TOP_K,)) -> None:
        """Record the graphs of every row bucket now (server warm-up) rather than inside a request: the
        forward at every kv bucket, the greedy selection, and the sampling selection for each top-k in
        `top_k` (other top-k values are recorded when first used). A no-op without buckets (eager steps)."""
        if self.requests:
            raise RuntimeError("capture() runs on an idle batch")
        if self.graphs is None:
            return
        for rows in self.row_buckets:
            if rows > self.cache.rows:
                continue
            self._select_graphed(rows, False, False, 0)
            for k in top_k:
                self._select_graphed(rows, True, True, k)
            for kv_len in self.kv_buckets:
                self._forward_graphed(rows, kv_len)
        self.cache.buf.zero_()
        self.s.free(0, self.s.tokens.size(0))

    def free_rows(self) -> int:
        return self.max_rows - self.n

    # --------------------------------------------------------------------------- joining

    def admit(self, req: DecodeRequest) -> None:
        """Prefill `req` into free rows (between steps). Raises ValueError when it cannot fit."""
        nb, p = req.params.num_beams, req.prefix.size(1)
        if req.params.max_mel_tokens > self.k_max:
            raise ValueError(f"max_mel_tokens {req.params.max_mel_tokens} exceeds the model's {self.k_max}")
        if nb > self.free_rows():
            raise ValueError(f"{nb} rows requested, {self.free_rows()} free")
        need_slots = p + 1 + req.params.max_mel_tokens
        if need_slots > self.cache.max_slots:
            raise ValueError(f"a prefix of {p} positions leaves no room for {req.params.max_mel_tokens} codes")
        r0 = self.n
        if self.cache.ensure(_align(r0 + nb, self.row_align), need_slots) and self.cache.rows > self.s.tokens.size(0):
            self._alloc_state(self.cache.rows)
        with torch.inference_mode():
            logits = prefill(self.gpt, req.prefix, self.cache.view(r0, r0 + 1))  # [1, V]
            if nb > 1:  # every beam starts from the same prefix: copy the first row's cache
                src = torch.full((nb - 1,), r0, device=self.device)
                self.cache.copy_rows(torch.arange(r0 + 1, r0 + nb, device=self.device), src, 0, p + 1)
            rows = slice(r0, r0 + nb)
            pr = req.params
            self.s.logits[rows] = logits
            self.s.tokens[rows] = 0
            self.s.input_pos[rows] = p + 1  # cache slot of the first code
            self.s.mel_pos[rows] = 2  # upstream off-by-one: code k sits at mel position k+1
            self.s.seen[rows] = False
            self.s.seen[rows, FAKE_PROMPT_ID] = True
            self.s.seen[rows, self.cfg.start_mel_token] = True
            self.s.seqs[rows] = self.cfg.stop_mel_token
            self.s.penalty[rows] = pr.repetition_penalty
            self.s.temperature[rows] = pr.temperature
            self.s.top_p[rows] = pr.top_p
            self.s.do_sample[rows] = pr.do_sample
            self.s.is_beam[rows] = nb > 1
            self.s.key[rows] = req.key
            self.s.step[rows] = 0
            # HF: top-k keeps at least 2 tokens with beams (min_tokens_to_keep), top-p likewise.
            top_k = max(pr.top_k, 2 if nb > 1 else 1) if pr.top_k > 0 and pr.do_sample else 0
            self.s.top_k[rows] = top_k
            self.s.top_k_host[rows] = top_k
            self.s.min_keep[rows] = 2 if nb > 1 else 1
            self.s.live[rows] = 1
            self.s.done[rows] = False
        req.row, req.steps, req.result = r0, 0, None
        self.n += nb
        self.requests.append(req)
        self._join_group(req)

    def _join_group(self, req: DecodeRequest) -> None:
        nb, dev = req.params.num_beams, self.device
        g = self.groups.get(nb)
        if g is None:
            g = self.groups[nb] = _BeamGroup(nb)
        k = self.k_max
        beam_scores = torch.full((1, nb), BEAM_INIT_SCORE, device=dev)
        beam_scores[:, 0] = 0.0
        fresh = {
            "beam_scores": beam_scores,
            "hyp_score": torch.full((1, nb), float("inf"), device=dev),
            "hyp_order": torch.zeros(1, nb, dtype=torch.long, device=dev),
            "hyp_len": torch.zeros(1, nb, dtype=torch.long, device=dev),
            "hyp_tok": torch.full((1, nb, k), self.cfg.stop_mel_token, dtype=torch.long, device=dev),
            "hyp_count": torch.zeros(1, dtype=torch.long, device=dev),
            "counter": torch.zeros(1, dtype=torch.long, device=dev),
            "done": torch.zeros(1, dtype=torch.bool, device=dev),
        }
        for name, t in fresh.items():
            old = getattr(g, name)
            setattr(g, name, t if old is None else torch.cat((old, t)))
        g.members.append(req)
        req.group = g
        self._reindex(g)

    def _reindex(self, g: _BeamGroup) -> None:
        g.idx = upload([m.row + b for m in g.members for b in range(g.nb)], self.device).view(-1, g.nb)

    # --------------------------------------------------------------------------- leaving

    @torch.inference_mode()
    def remove(self, req: DecodeRequest) -> None:
        """Take `req` out of the batch now (finished or cancelled); later rows move down into its place."""
        if req not in self.requests:
            return
        g = req.group
        assert g is not None  # set by admit
        i = g.members.index(req)
        keep = [j for j in range(len(g.members)) if j != i]
        del g.members[i]
        if g.members:
            sel = upload(keep, self.device)
            for name in ("beam_scores", "hyp_score", "hyp_order", "hyp_len", "hyp_tok", "hyp_count", "counter",
                         "done"):
                setattr(g, name, getattr(g, name).index_select(0, sel))
        else:
            del self.groups[g.nb]
        req.group = None
        self.requests.remove(req)
        nb, r0 = req.rows, req.row
        tail = self.n - (r0 + nb)
        length = max((r.written for r in self.requests), default=0) + 1
        length = min(max(length, req.written + 1), self.cache.slots)
        if tail:
            self.cache.move_rows(r0, r0 + nb, tail, length)
            self.s.move(self.s, r0, r0 + nb, tail)
            for r in self.requests:
                if r.row > r0:
                    r.row -= nb
        self.n -= nb
        self.s.free(self.n, self.n + nb)
        self.cache.clear_rows(self.n, self.n + nb, length)
        for grp in self.groups.values():
            self._reindex(grp)

    # --------------------------------------------------------------------------- one step

    @torch.inference_mode()
    def step(self) -> list[DecodeRequest]:
        """Select one code per row from the current logits, then run the GPT on them (unless every
        request is at its budget). Returns the requests that finished, with `result` set."""
        if not self.requests:
            return []
        n = self.n
        self._select(n)
        self.step_count += 1
        finished = [r for r in self.requests if r.steps >= r.params.max_mel_tokens]
        if self.stop_checked:
            finished = self._check_done(finished)  # host sync: stop codes and beam completion
        for req in finished:
            req.result = self._result(req)
            self.remove(req)
        if self.requests:
            self._forward()
        return finished

    def _forward(self) -> None:
        n = self.n
        if self.rowwise:
            self._forward_rowwise()
            self.s.input_pos[:n] += 1
            self.s.mel_pos[:n] += 1
            return
        rows = self._rows_for(n)
        need = max(r.written for r in self.requests) + 1  # the slot this step writes, and all before it
        kv_len = next((b for b in self.kv_buckets if b >= need), self.cache.slots) if self.fixed else min(
            self.cache.slots, _align(need, SEQ_ALIGN)
        )
        if self.graphs is not None:
            self._forward_graphed(rows, kv_len)
        else:
            self._forward_rows(rows, kv_len)

    def _rows_for(self, n: int) -> int:
        """The rows a batched step runs over: n padded to ROW_ALIGN, then to the next graphed bucket."""
        rows = _align(n, ROW_ALIGN)
        return next((b for b in self.row_buckets if b >= rows), rows)

    def _forward_rows(self, rows: int, kv_len: int) -> None:
        """The forward over rows [0, rows), free ones included (their logits are never read, their
        positions stay put), entirely on the device: one graph when replayed."""
        s = self.s
        logits = self.step_fn(self.gpt, s.tokens[:rows], s.input_pos[:rows], s.mel_pos[:rows],
                              self.cache.view(0, rows), kv_len)
        s.logits[:rows] = logits
        live = s.live[:rows, None]
        s.input_pos[:rows] += live
        s.mel_pos[:rows] += live

    def _forward_graphed(self, rows: int, kv_len: int) -> None:
        assert self.graphs is not None
        self.graphs.run(("forward", rows, kv_len), lambda: self._forward_rows(rows, kv_len), self.s.device_tensors())

    def _forward_rowwise(self) -> None:
        """CPU: one step per row, attending over exactly the slots its request has written (no masked
        padding: SEQ_ALIGN serves fused GPU kernels). The step is memory-bound (every weight is read
        once per step), and with one row each GEMM is MKL's GEMV, which streams the weights fastest
        (bench/RESULTS.md, CPU layouts; a GEMM of 2-8 rows re-packs them on every call and rounds a row
        otherwise than alone). A row's logits are those it gets alone, bit for bit, whoever shares its
        batch: a seeded request samples the same codes either way."""
        s = self.s
        for req in self.requests:
            kv_len = req.written + 1  # the slot this step writes, and every one before it
            for r in range(req.row, req.row + req.rows):
                s.logits[r : r + 1] = self.step_fn(
                    self.gpt, s.tokens[r : r + 1], s.input_pos[r : r + 1], s.mel_pos[r : r + 1],
                    self.cache.view(r, r + 1), kv_len,
                )

    def _select(self, n: int) -> None:
        if set(self.groups) == {1} and all(r.recorder is None for r in self.requests):
            # One-row requests only: rows [0, n) are the group's members in order, so the selection runs
            # over a slice of the state, without gathers, and on CUDA as one graph per (bucket, mode).
            sample = any(r.params.do_sample for r in self.requests)
            top_p = any(r.params.do_sample and r.params.top_p < 1.0 for r in self.requests)
            k_max = int(self.s.top_k_host[:n].max()) if sample else 0  # host tensor: no sync
            if self.graphs is not None:
                self._select_graphed(self._rows_for(n), sample, top_p, k_max)
            else:
                self._select_rows(n, sample, top_p, k_max)
            for r in self.requests:
                r.steps += 1
            return
        logits = self.s.logits[:n]
        is_beam = self.s.is_beam[:n]
        any_beam = any(r.rows > 1 for r in self.requests)
        base = torch.where(is_beam[:, None], logits.log_softmax(-1), logits) if any_beam else logits
        scores = repetition_penalty(base, self.s.seen[:n], self.s.penalty[:n])
        if any(r.params.do_sample for r in self.requests):
            w = scores / self.s.temperature[:n]
            w = top_k_filter(w, self.s.top_k[:n], int(self.s.top_k_host[:n].max()))  # host tensor: no sync
            if any(r.params.do_sample and r.params.top_p < 1.0 for r in self.requests):
                w = top_p_filter(w, self.s.top_p[:n], self.s.min_keep[:n])
            scores = torch.where(self.s.do_sample[:n, None], w, scores)
        # The start code is never a valid output (upstream only penalises it): it would index past
        # the codec's codebook. Masked last, so every processor above sees upstream's scores.
        scores[:, self.cfg.start_mel_token] = -float("inf")
        for r in self.requests:
            if r.recorder is not None:
                rows = slice(r.row, r.row + r.rows)
                r.recorder(r.steps, logits[rows], scores[rows])
        g1 = self.groups.get(1)
        if g1 is not None:
            self._select_single(g1, scores)
        for g in self.groups.values():
            if g.nb > 1:
                self._select_beams(g, scores)
        for r in self.requests:
            r.steps += 1
        self.s.step[:n] += 1

    def _select_rows(self, rows: int, sample: bool, top_p: bool, k_max: int) -> None:
        """Select one code for each of rows [0, rows) of one-row requests: `_select` and `_select_single`
        for that case, row for row the same operations (the same codes), over a slice. Free rows
        select too (their codes are never read) but do not advance."""
        s = self.s
        scores = repetition_penalty(s.logits[:rows], s.seen[:rows], s.penalty[:rows])
        if sample:
            w = top_k_filter(scores / s.temperature[:rows], s.top_k[:rows], k_max)
            if top_p:
                w = top_p_filter(w, s.top_p[:rows], s.min_keep[:rows])
            scores = torch.where(s.do_sample[:rows, None], w, scores)
        scores[:, self.cfg.start_mel_token] = -float("inf")
        if sample:
            noisy = scores + gumbel_noise(s.key[:rows], s.step[:rows], scores.size(-1))
            scores = torch.where(s.do_sample[:rows, None], noisy, scores)
        tok = scores.argmax(-1, keepdim=True)  # [rows, 1]
        s.seqs[:rows].scatter_(1, s.step[:rows, None], tok)
        s.seen[:rows].scatter_(1, tok, True)
        s.tokens[:rows] = tok
        s.done[:rows] |= tok[:, 0] == self.cfg.stop_mel_token
        s.step[:rows] += s.live[:rows]

    def _select_graphed(self, rows: int, sample: bool, top_p: bool, k_max: int) -> None:
        assert self.graphs is not None
        # top_k_filter gives the same scores for any k_max ≥ every row's k: round it up to a power of
        # two, so a handful of graphs serve every top-k.
        k_max = min(1 << (k_max - 1).bit_length(), self.vocab) if k_max > 0 else 0
        self.graphs.run(("select", rows, sample, top_p, k_max),
                        lambda: self._select_rows(rows, sample, top_p, k_max), self.s.device_tensors())

    def _select_single(self, g: _BeamGroup, scores: Tensor) -> None:
        assert g.idx is not None and g.done is not None
        rows = g.idx[:, 0]  # [Q1]
        sc = scores.index_select(0, rows)  # [Q1, V]
        if any(m.params.do_sample for m in g.members):
            # Gumbel-max: argmax(score + G) draws from softmax(score) (= multinomial), with no host sync.
            noisy = sc + gumbel_noise(self.s.key[rows], self.s.step[rows], sc.size(-1))
            sc = torch.where(self.s.do_sample[rows, None], noisy, sc)
        tok = sc.argmax(-1)  # [Q1]
        step = self.s.step[rows]
        self.s.seqs[rows, step] = tok
        self.s.seen[rows, tok] = True
        self.s.tokens[rows, 0] = tok
        self.s.done[rows] = self.s.done[rows] | (tok == self.cfg.stop_mel_token)

    def _select_beams(self, g: _BeamGroup, scores: Tensor) -> None:
        assert g.idx is not None and g.beam_scores is not None and g.done is not None
        assert g.hyp_score is not None and g.hyp_order is not None and g.hyp_len is not None
        assert g.hyp_tok is not None and g.hyp_count is not None and g.counter is not None
        nb, V, dev = g.nb, self.vocab, self.device
        q = g.idx.size(0)
        first = g.idx[:, 0]  # [Qg]
        flat = (scores[g.idx] + g.beam_scores[:, :, None]).view(q, nb * V)  # [Qg, nb·V]
        keys = flat
        if any(m.params.do_sample for m in g.members):
            # Gumbel-top-k: the top 2·nb of score + G sample 2·nb candidates without replacement in
            # proportion to softmax(score), as HF's multinomial(softmax(scores), 2·nb) does.
            noise = gumbel_noise(self.s.key[first], self.s.step[first], nb * V)
            keys = torch.where(self.s.do_sample[first, None], flat + noise, flat)
        cand = keys.topk(2 * nb, dim=1).indices  # [Qg, 2nb]
        cand_scores, order = flat.gather(1, cand).sort(dim=1, descending=True, stable=True)
        cand = cand.gather(1, order)
        cand_beam, cand_tok = cand // V, cand % V  # [Qg, 2nb]
        is_eos = cand_tok == self.cfg.stop_mel_token
        steps = self.s.step[first]  # [Qg] codes so far = length of each beam's sequence
        seqs = self.s.seqs[g.idx]  # [Qg, nb, K]
        live = ~g.done
        slots = torch.arange(nb, device=dev)
        for j in range(nb):  # only eos candidates ranked below num_beams become hypotheses (HF)
            sc = cand_scores[:, j]
            full = g.hyp_count >= nb
            worst = g.hyp_score.min(dim=1).values
            add = is_eos[:, j] & live & (~full | (sc > worst))
            # When full, the new hypothesis replaces the worst one; among equal worst scores, the oldest.
            tied = g.hyp_score == worst[:, None]
            oldest = torch.where(tied, g.hyp_order, torch.full_like(g.hyp_order, 1 << 62)).argmin(dim=1)
            slot = torch.where(full, oldest, g.hyp_count.clamp(max=nb - 1))
            hit = (slots[None, :] == slot[:, None]) & add[:, None]  # [Qg, nb]
            g.hyp_score = torch.where(hit, sc[:, None], g.hyp_score)
            g.hyp_order = torch.where(hit, g.counter[:, None], g.hyp_order)
            g.hyp_len = torch.where(hit, steps[:, None], g.hyp_len)
            src = seqs.gather(1, cand_beam[:, j, None, None].expand(q, 1, seqs.size(2)))  # [Qg, 1, K]
            g.hyp_tok = torch.where(hit[:, :, None], src, g.hyp_tok)
            g.hyp_count = g.hyp_count + (add & ~full).long()
            g.counter = g.counter + add.long()
        worst = g.hyp_score.min(dim=1).values
        g.done = g.done | ((g.hyp_count >= nb) & (worst >= cand_scores[:, 0]))
        # The next beams: the first nb candidates that are not end-of-sequence (there are always nb).
        pick = (is_eos.long() * (2 * nb) + torch.arange(2 * nb, device=dev)).argsort(dim=1)[:, :nb]
        new_beam = cand_beam.gather(1, pick)  # [Qg, nb]
        new_tok = cand_tok.gather(1, pick)
        g.beam_scores = cand_scores.gather(1, pick)
        dst = g.idx.reshape(-1)
        src_rows = g.idx.gather(1, new_beam).reshape(-1)
        # Beam reorder of the cache: a request's beams share its prefix slots (copied once at admission,
        # never rewritten), so only the slots written since, by the beams' own codes, can differ.
        shared = min(m.prefix.size(1) + 1 for m in g.members)
        self.cache.copy_rows(dst, src_rows, shared, max(m.written for m in g.members))
        self.s.seqs[dst] = self.s.seqs[src_rows]
        self.s.seen[dst] = self.s.seen[src_rows]
        tok = new_tok.reshape(-1)
        self.s.seqs[dst, self.s.step[dst]] = tok
        self.s.seen[dst, tok] = True
        self.s.tokens[dst, 0] = tok

    # --------------------------------------------------------------------------- results

    @property
    def stop_checked(self) -> bool:
        """Whether the last step read the batch for its stop check (every `stop_check_every` steps):
        callers with their own host reads (cancel polls, committed codes) take them then."""
        return self.step_count % self.stop_check_every == 0

    def committed(self, req: DecodeRequest) -> Tensor:
        """The codes of `req` that can no longer change, on the host [n] (a host sync: callers read it
        with the stop check, every `stop_check_every` steps). One row: every code selected before the
        first stop code. Beams: the common prefix of every live beam and every finished hypothesis
        (any of them may still be the final choice), so with 3 beams the committed codes lag the
        newest by however far back the beams last diverged."""
        if req.rows == 1:
            seq = self.s.seqs[req.row, : req.steps].cpu()
            stops = (seq == self.cfg.stop_mel_token).nonzero()
            return seq[: int(stops[0, 0])] if stops.numel() else seq
        g = req.group
        assert g is not None and g.hyp_tok is not None and g.hyp_len is not None and g.hyp_count is not None
        i = g.members.index(req)
        seqs = self.s.seqs[req.row : req.row + req.rows, : req.steps]  # [nb, steps]
        count = g.hyp_count[i]
        lens = g.hyp_len[i]  # [nb]
        hyps = g.hyp_tok[i, :, : req.steps]  # [nb, steps]
        host = torch.cat((seqs, hyps, lens[:, None], count.view(1, 1).expand(hyps.size(0), 1)), dim=1).cpu()  # sync
        steps = req.steps
        seqs, hyps = host[:, :steps], host[:, steps : 2 * steps]  # [nb, steps] each
        lens_host, n_hyp = host[:, 2 * steps], int(host[0, 2 * steps + 1])
        agree = (seqs == seqs[:1]).all(dim=0)  # [steps]
        for h in range(n_hyp):
            length = int(lens_host[h])
            agree[length:] = False
            agree[:length] &= hyps[h, :length] == seqs[0, :length]
        agree &= seqs[0] != self.cfg.stop_mel_token
        n = int(agree.logical_not().nonzero()[0, 0]) if not bool(agree.all()) else agree.numel()
        return seqs[0, :n].clone()

    def _check_done(self, finished: list[DecodeRequest]) -> list[DecodeRequest]:
        """Requests done at this step: one-row requests whose row selected its stop code (s.done),
        beam requests whose hypotheses are complete (their group's done), and `finished`."""
        beams = [(g, g.done) for g in self.groups.values() if g.nb > 1 and g.done is not None]
        flags = torch.cat([self.s.done[: self.n], *(done for _, done in beams)]).tolist()  # host sync
        done = {id(r) for r in self.requests if r.rows == 1 and flags[r.row]}
        at = self.n
        for g, _ in beams:
            done |= {id(m) for m, f in zip(g.members, flags[at : at + len(g.members)], strict=True) if f}
            at += len(g.members)
        return [r for r in self.requests if id(r) in done or r in finished]

    def _result(self, req: DecodeRequest) -> Generated:
        stop, k = self.cfg.stop_mel_token, req.params.max_mel_tokens
        if req.rows == 1:
            codes_raw = self.s.seqs[req.row, : req.steps].unsqueeze(0).clone()  # [1, steps]
            return _trim(codes_raw, stop)
        g = req.group
        assert g is not None and g.hyp_score is not None and g.hyp_order is not None and g.done is not None
        assert g.hyp_len is not None and g.hyp_tok is not None and g.hyp_count is not None
        assert g.beam_scores is not None
        i = g.members.index(req)
        count = int(g.hyp_count[i])
        order = g.hyp_order[i].tolist()
        scores, lens = g.hyp_score[i].tolist(), g.hyp_len[i].tolist()
        slots = sorted(range(count), key=lambda s: order[s])
        hyps = _Hypotheses(req.rows)
        for s in slots:
            hyps.beams.append((scores[s], g.hyp_tok[i, s, : lens[s]].tolist()))
        hyps.worst_score = min((sc for sc, _ in hyps.beams), default=1e9)
        if not bool(g.done[i]):  # finalize: open beams compete with the stored hypotheses (HF)
            for b, sc in enumerate(g.beam_scores[i].tolist()):
                hyps.add(self.s.seqs[req.row + b, : req.steps].tolist(), sc)
        best = hyps.best()
        if len(best) < k:
            best = [*best, stop]  # HF appends eos to a hypothesis shorter than max_length
        return _trim(torch.tensor([best], dtype=torch.long, device=self.device), stop)


class _Hypotheses:
    """HF BeamHypotheses with length_penalty 0, on the host: the finalize step and the final choice."""

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

    def best(self) -> list[int]:
        return sorted(self.beams, key=lambda b: b[0])[-1][1]


def _trim(codes_raw: Tensor, stop: int) -> Generated:
    host = codes_raw.cpu()  # host sync, once per segment
    hits = (host[0] == stop).nonzero()
    n = int(hits[0, 0]) if hits.numel() else host.size(1)
    keep = min(n + 1, host.size(1))
    return Generated(codes_raw[:, :keep], codes_raw[:, :n], bool(hits.numel()), host[:, :n])


# ------------------------------------------------------------------------------------------------
# One request on its own (tests, benchmarks): the same batch with one member


@torch.inference_mode()
def generate(
    gpt: UnifiedVoice,
    prefix: Tensor,
    params: DecodeParams,
    *,
    key: int = 0,
    cancel: Callable[[], bool] | None = None,
    recorder: StepRecorder | None = None,
) -> Generated:
    """Generate semantic codes after `prefix` [1, P, D] (from `UnifiedVoice.build_prefix`) through a
    batch of one request. `key` (sampling_key) drives sampling; `cancel` is polled with every stop
    check and raises Cancelled."""
    batch = DecodeBatch(gpt, max_rows=params.num_beams, dtype=prefix.dtype)
    req = DecodeRequest(prefix=prefix, params=params, key=key, recorder=recorder)
    if cancel is not None and cancel():
        raise Cancelled("generation cancelled")
    batch.admit(req)
    while req.result is None:
        batch.step()
        if cancel is not None and batch.stop_checked and cancel():
            raise Cancelled("generation cancelled")
    return req.result
