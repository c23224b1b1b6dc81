"""Batched token sampling from float32 logits [B, V].

One pass handles every request of a batch: penalties (repetition with Hugging Face
semantics over prompt and output ids; frequency and presence with OpenAI semantics over
output ids), then greedy rows take the argmax and the other rows go through temperature,
top-k, top-p and min-p (in transformers' order) and are sampled with the exponential race
(``argmax(p / E)`` with ``E ~ Exp(1)`` is a draw from ``p``). Rows with a seed draw their
noise from their own generator, so a seeded request picks the same token whatever else is
in the batch; all other rows share one generator and one kernel call. Python loops run only
over penalized or seeded rows.

Numerical safety: a temperature below ``GREEDY_TEMPERATURE`` (1e-5) is greedy (dividing by it
would overflow float32), ``SamplingParams`` lets no NaN or infinity in, and penalties or a
huge temperature that push a logit out of range are mapped back (NaN to -inf, +inf to the
largest float), so a row can never sample from NaN probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch

from loopserve.core.sched.sampling_params import SamplingParams


class Sampler:
    """Samples one token per row. ``seed`` seeds the generator of the unseeded rows."""

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        *,
        output_ids: Sequence[Sequence[int] | None] = (),
        prompt_ids: Sequence[Sequence[int] | None] = (),
        step_seeds: Sequence[int | None] = (),
    ) -> torch.Tensor:
        """Token ids [B] (int64, on the logits' device). ``logits`` may be modified in place.

        ``output_ids``/``prompt_ids``/``step_seeds`` are per row and may be empty (meaning
        None for every row); penalized rows need their ids.
        """
        assert logits.dim() == 2 and logits.shape[0] == len(params), (logits.shape, len(params))
        assert logits.dtype == torch.float32, logits.dtype
        num_rows = len(params)
        if apply_penalties(logits, params, output_ids, prompt_ids):
            _to_finite(logits)
        greedy = [p.is_greedy for p in params]
        if all(greedy):
            return logits.argmax(dim=-1)

        dev = logits.device
        temps = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], device=dev)
        x = _to_finite(logits / temps[:, None])
        filtered = [i for i, p in enumerate(params) if not greedy[i] and (p.top_k != -1 or p.top_p < 1.0)]
        if filtered:
            x = self._top_k_top_p(x, params, filtered)
        if any(p.min_p > 0.0 for p, g in zip(params, greedy) if not g):
            min_p = torch.tensor([p.min_p for p in params], device=dev)
            probs = torch.softmax(x, dim=-1)
            threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            x = x.masked_fill(probs < threshold, float("-inf"))
        probs = torch.softmax(x, dim=-1)

        # Exp(1) noise as -log(U): a vectorized uniform draw is several times faster than
        # exponential_ on the CPU. U == 0 gives infinite noise, i.e. that token loses.
        noise = torch.rand(probs.shape, generator=self._generator, device=dev)
        for i, seed in enumerate(step_seeds):
            if seed is not None and not greedy[i]:
                gen = torch.Generator(device=dev)
                gen.manual_seed(seed)
                noise[i] = torch.rand(probs.shape[1], generator=gen, device=dev)
        tokens = (probs / noise.log_().neg_()).argmax(dim=-1)
        if any(greedy):
            is_greedy = torch.tensor(greedy, device=dev)
            tokens = torch.where(is_greedy, logits.argmax(dim=-1), tokens)
        assert tokens.shape == (num_rows,)
        return tokens

    @staticmethod
    def _top_k_top_p(x: torch.Tensor, params: Sequence[SamplingParams], rows: list[int]) -> torch.Tensor:
        """Mask (to -inf) what top-k and then top-p remove, on ``rows`` only (sorting is the
        slow part on the CPU)."""
        dev, vocab = x.device, x.shape[1]
        every_row = len(rows) == x.shape[0]
        idx = torch.tensor(rows, dtype=torch.int64, device=dev)
        sub = x if every_row else x[idx]
        top_k = torch.tensor(
            [vocab if params[i].top_k == -1 else min(params[i].top_k, vocab) for i in rows], device=dev
        )
        if all(params[i].top_p >= 1.0 for i in rows):
            # top-k only: threshold at the k-th largest value; ties with it stay, as in
            # transformers' TopKLogitsWarper.
            kth = sub.topk(int(top_k.max()), dim=-1).values.gather(1, top_k[:, None] - 1)
            sub = sub.masked_fill(sub < kth, float("-inf"))
        else:
            sub = Sampler._top_p_sorted(sub, top_k, torch.tensor([params[i].top_p for i in rows], device=dev))
        if every_row:
            return sub
        x[idx] = sub
        return x

    @staticmethod
    def _top_p_sorted(sub: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        dev, vocab = sub.device, sub.shape[1]
        sorted_x, order = sub.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=dev)[None, :]
        sorted_x = sorted_x.masked_fill(rank >= top_k[:, None], float("-inf"))
        # top-p on the top-k-renormalized distribution: keep a token while the mass of the
        # tokens ranked above it is below top_p (transformers' rule; the top token always
        # stays). Rows with top_p == 1 are left alone so rounding cannot drop their tail.
        sorted_p = torch.softmax(sorted_x, dim=-1)
        mass_above = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop = (mass_above >= top_p[:, None]) & (top_p < 1.0)[:, None]
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        return torch.empty_like(sub).scatter_(-1, order, sorted_x)


def _to_finite(x: torch.Tensor) -> torch.Tensor:
    """In place: NaN -> -inf (never sampled), +inf -> the largest float (-inf stays masked)."""
    return torch.nan_to_num_(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max, neginf=float("-inf"))
def suppress_early_stops(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_ids: Sequence[Sequence[int] | None],
    eos_token_ids: Sequence[int],
) -> None:
    """``min_new_tokens``: a row with fewer outputs than that cannot sample EOS or one of its
    stop token ids (its logits are set to -inf in place)."""
    for i, p in enumerate(params):
        if p.min_new_tokens and i < len(output_ids) and len(output_ids[i] or ()) < p.min_new_tokens:
            banned = [t for t in (*eos_token_ids, *p.stop_token_ids) if 0 <= t < logits.shape[1]]
            if banned:
                logits[i, banned] = float("-inf")


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_ids: Sequence[Sequence[int] | None] = (),
    prompt_ids: Sequence[Sequence[int] | None] = (),
) -> bool:
    """Apply each row's penalties to ``logits`` [B, V] in place; True if any row had one.

    Repetition (transformers): a logit of a token seen in prompt or output is divided by the
    penalty if positive, multiplied if negative. Frequency and presence (OpenAI): subtract
    ``frequency * count + presence * (count > 0)`` with counts over the output only.
    """
    rows = [i for i, p in enumerate(params) if p.needs_penalties]
    if not rows:
        return False
    dev, vocab = logits.device, logits.shape[1]

    def ids_of(lists: Sequence[Sequence[int] | None], i: int) -> list[int]:
        return list(lists[i] or []) if i < len(lists) else []

    def counts(id_lists: list[list[int]]) -> torch.Tensor:
        # One flat tensor of ids and one of their rows, then a single accumulate.
        flat = torch.tensor(list(chain.from_iterable(id_lists)), dtype=torch.int64, device=dev)
        lens = torch.tensor([len(ids) for ids in id_lists], device=dev)
        row = torch.repeat_interleave(torch.arange(len(id_lists), device=dev), lens)
        out = torch.zeros(len(id_lists), vocab, device=dev)
        out.index_put_((row, flat), torch.ones_like(flat, dtype=out.dtype), accumulate=True)
        return out

    idx = torch.tensor(rows, dtype=torch.int64, device=dev)
    sub = logits[idx]
    outs = [ids_of(output_ids, i) for i in rows]
    if any(params[i].repetition_penalty != 1.0 for i in rows):
        rep = torch.tensor([params[i].repetition_penalty for i in rows], device=dev)[:, None]
        seen = counts([ids_of(prompt_ids, i) + out for i, out in zip(rows, outs)]) > 0
        penalized = torch.where(sub < 0, sub * rep, sub / rep)
        sub = torch.where(seen, penalized, sub)
    if any(params[i].frequency_penalty != 0.0 or params[i].presence_penalty != 0.0 for i in rows):
        freq = torch.tensor([params[i].frequency_penalty for i in rows], device=dev)[:, None]
        pres = torch.tensor([params[i].presence_penalty for i in rows], device=dev)[:, None]
        c = counts(outs)
        sub = sub - freq * c - pres * (c > 0).to(sub.dtype)
    logits[idx] = sub
    return True


def token_logprobs(
    log_probs: torch.Tensor, tokens: torch.Tensor, num_top: Sequence[int]
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Per row of ``log_probs`` [R, V] (log-softmax of the raw logits): the log-probability of
    ``tokens`` [R] and the ``num_top[r]`` most likely (token id, log-probability) pairs."""
    chosen = log_probs.gather(1, tokens.view(-1, 1)).view(-1).tolist()
    k = max(num_top, default=0)
    if k == 0:
        return chosen, [[] for _ in num_top]
    values, ids = log_probs.topk(k, dim=-1)
    values_l, ids_l = values.tolist(), ids.tolist()
    top = [list(zip(ids_l[r][:n], values_l[r][:n])) for r, n in enumerate(num_top)]
    return chosen, top
