"""lm_eval's HF model with multiple-choice answers scored against one shared context.

lm_eval's HF backend runs ``context + answer`` for every answer, so TruthfulQA MC2 (817
questions x ~7.6 answers, a ~150-token context each, mostly the fixed 6-shot preamble) feeds
~6,200 rows of ~165 tokens = ~1.0 M tokens. Here the answers of one context are packed into one
row: ``context[:-1]`` once, then per answer a branch ``[context[-1]] + answer[:-1]`` that attends
to the shared context and to itself only (a 4-D boolean mask) at the positions it would have had
alone. On MC2-shaped data (``python -m eval.bench_mc2``) that is 197,569 tokens instead of
1,062,512 (5.4x fewer; scored in 8.4 s on an H100, whole run 37-45 s vs 73-92 s for plain lm_eval:
docs/benchmarks.md),
and the logits come out for answer positions only. The log-likelihoods equal lm_eval's up to
floating-point order; its ``softmax_dtype`` is honoured the same way.

Tokenization follows lm_eval's ``TemplateLM._encode_pair`` token for token, but each distinct
string is encoded once, in one batched call of the fast tokenizer: MC2's 6,324 (context, answer)
pairs cost lm_eval 12,648 ``tokenizer.encode`` calls plus one ``decode`` each (~5.8 s on the
H100 host); here 817 contexts and 6,324 ``context + answer`` strings go through the tokenizer
once.
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix
from lm_eval.models.utils_hf import get_dtype

from kobllla.evaluation._preload import preloaded_state
from kobllla.host_copy import to_device

Request = tuple[tuple[str, str], list[int], list[int]]


def pack_group(context: list[int], continuations: list[list[int]],
               prefix_len: int = 0) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """One packed row: token ids, position ids, and each branch's (start, length) in the row.

    The first ``prefix_len`` context tokens are left out (they come from the shared KV prefix);
    positions still count them.
    """
    shared = context[prefix_len:-1]
    ids, pos, spans = list(shared), list(range(prefix_len, len(context) - 1)), []
    for cont in continuations:
        branch = [context[-1]] + cont[:-1]
        spans.append((len(ids), len(branch)))
        ids += branch
        pos += range(len(context) - 1, len(context) - 1 + len(branch))
    return ids, pos, spans


def common_prefix_len(contexts: list[tuple[int, ...]], *, min_len: int = 16) -> int:
    """Tokens every context starts with, leaving each its last token; 0 if fewer than ``min_len``."""
    if not contexts:
        return 0
    first, n = contexts[0], min(len(c) for c in contexts) - 1
    for ctx in contexts[1:]:
        i = 0
        while i < n and ctx[i] == first[i]:
            i += 1
        n = i
    return n if n >= min_len else 0


def packed_mask(n_shared: int, spans: list[tuple[int, int]], length: int) -> torch.Tensor:
    """[length, length] bool: causal within the shared part, each branch sees the shared part and itself.

    Padding rows (after the last branch) see only themselves, so attention never divides by zero.
    """
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:n_shared, :n_shared] = torch.ones(n_shared, n_shared, dtype=torch.bool).tril()
    for start, size in spans:
        mask[start : start + size, :n_shared] = True
        mask[start : start + size, start : start + size] = torch.ones(size, size, dtype=torch.bool).tril()
    used = spans[-1][0] + spans[-1][1] if spans else n_shared
    idx = torch.arange(used, length)
    mask[idx, idx] = True
    return mask


class SharedPrefixHFLM(HFLM):
    """``HFLM`` whose loglikelihood packs all answers of one context into one row.

    Args:
        max_batch_tokens: packed tokens per forward (rows x padded length); bounds activation memory.
        preloaded: a future of the checkpoint's state dict already on the device
            (:func:`kobllla.evaluation._preload.start_preload`); the model is built from it.
        shared_kv_prefix: compute the tokens that every context starts with once, as a KV cache
            that all rows attend to (MC2: the ~130-token 6-shot preamble of every question). Off by
            default: same scores in fp32, but in bf16 it moved MC2 1.6e-3 from plain lm_eval's on the
            8B bench (lm_eval rounds each answer's sum to bf16), against 8e-4 without it.
        Everything else as lm_eval's ``HFLM`` (``pretrained``, ``dtype``, ``device``, ``max_length``...).
    """

    def __init__(self, *args, max_batch_tokens: int = 32768, shared_kv_prefix: bool = False,
                 preloaded: Future | None = None, **kwargs) -> None:
        self._preloaded = preloaded  # read by _create_model, which HFLM.__init__ calls
        super().__init__(*args, **kwargs)
        self.max_batch_tokens = max_batch_tokens
        self.shared_kv_prefix = shared_kv_prefix
        self.timing: dict[str, float] = {}

    def _create_model(self, pretrained: str, **kwargs) -> None:
        state = preloaded_state(self._preloaded)
        self._preloaded = None
        unsupported = [k for k in ("parallelize", "peft", "delta", "autogptq", "gptqmodel", "gguf_file",
                                   "quantization_config", "tp_plan", "device_map", "subfolder") if kwargs.get(k)]
        import transformers

        names = getattr(self.config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if len(names) == 1 else None
        if state is None or unsupported or model_class is None:
            return super()._create_model(pretrained, **kwargs)
        # the tensors are on self.device already: build the config's model class around them
        self._model = model_class.from_pretrained(
            None, config=self.config, state_dict=state, dtype=get_dtype(kwargs.get("dtype", "auto")),
            device_map={"": str(self.device)}, trust_remote_code=bool(kwargs.get("trust_remote_code")))
        if (Path(pretrained) / "generation_config.json").is_file():
            self._model.generation_config = transformers.GenerationConfig.from_pretrained(pretrained)
        return None

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm_eval's ``TemplateLM.loglikelihood`` with every distinct string encoded once, batched."""
        if self.backend != "causal":
            return super().loglikelihood(requests, disable_tqdm)
        t0 = time.perf_counter()
        pairs = []
        for context, continuation in (req.args for req in requests):
            if context == "":  # lm_eval's own rule (BOS as context), one request at a time
                pairs.append((context, continuation, None, None))
                continue
            n_spaces = len(context) - len(context.rstrip())  # trailing spaces move to the answer
            ctx, cont = context, continuation
            if n_spaces:
                ctx, cont = context[:-n_spaces], context[-n_spaces:] + continuation
            pairs.append((context, continuation, ctx, ctx + cont))
        enc = self._encode_unique([s for _, _, a, b in pairs if a is not None for s in (a, b)])
        new_reqs = []
        for context, continuation, ctx, whole in pairs:
            if ctx is None:
                cont_enc = self.tok_encode(continuation, add_special_tokens=False)
                ctx_enc, cont_enc = (([self.prefix_token_id], cont_enc) if self.prefix_token_id != cont_enc[0]
                                     else (cont_enc[:1], cont_enc[1:]))
            else:
                ctx_enc = enc[ctx]
                cont_enc = enc[whole][len(ctx_enc):]
            new_reqs.append(((context, continuation), ctx_enc, cont_enc))
        t1 = time.perf_counter()
        out = self._loglikelihood_tokens(new_reqs, disable_tqdm=disable_tqdm)
        self.timing["tokenize_s"] = self.timing.get("tokenize_s", 0.0) + t1 - t0  # the run record's timing
        self.timing["score_s"] = self.timing.get("score_s", 0.0) + time.perf_counter() - t1
        return out

    def _encode_unique(self, strings: list[str]) -> dict[str, list[int]]:
        """``{s: self.tok_encode(s)}`` for each distinct string, in one tokenizer call per special-token setting."""
        bos = self.tokenizer.decode(self.prefix_token_id)
        by_kwargs: dict[tuple, list[str]] = defaultdict(list)
        for text in dict.fromkeys(strings):
            kwargs = _add_special_kwargs(None, self.add_bos_token)
            if has_bos_prefix(text, bos):
                kwargs["add_special_tokens"] = False
            by_kwargs[tuple(sorted(kwargs.items()))].append(text)
        out: dict[str, list[int]] = {}
        for kwargs, texts in by_kwargs.items():
            out.update(zip(texts, self.tokenizer(texts, **dict(kwargs))["input_ids"], strict=True))
        return out

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, ctx, _cont) in enumerate(requests):
            groups[tuple(ctx)].append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        packable, too_long = [], []
        for ctx, idxs in groups.items():
            n = len(ctx) - 1 + sum(len(requests[i][2]) for i in idxs)
            (packable if n <= self.max_length and len(ctx) > 0 else too_long).append((ctx, idxs, n))
        if too_long:  # lm_eval left-truncates these; let it
            flat = [i for _, idxs, _ in too_long for i in idxs]
            scored = super()._loglikelihood_tokens([requests[i] for i in flat], disable_tqdm, override_bs)
            for i, res in zip(flat, scored, strict=True):
                results[i] = res
        # The prefix every context shares (MC2's fixed 6-shot preamble) runs once; rows hold the rest.
        self._prefix_len = common_prefix_len([ctx for ctx, _, _ in packable]) if self.shared_kv_prefix else 0
        self._prefix_kv = self._prefix_cache(packable[0][0][: self._prefix_len]) if self._prefix_len else None
        packable = [(ctx, idxs, n - self._prefix_len) for ctx, idxs, n in packable]
        packable.sort(key=lambda g: -g[2])  # longest first: padding stays small, OOM shows at once
        batches, batch = [], []
        for group in packable:
            if batch and (len(batch) + 1) * batch[0][2] > self.max_batch_tokens:
                batches.append(batch)
                batch = []
            batch.append(group)
        if batch:
            batches.append(batch)
        for k, batch in enumerate(batches):
            t0 = time.perf_counter()
            self._score_batch(batch, requests, results)  # ends in a host copy of the sums: t is the GPU's too
            if k == 0:  # the first pass also pays CUDA's lazy kernel loading and the allocator's growth
                self.timing["first_batch_s"] = time.perf_counter() - t0
        self.timing["batches"] = self.timing.get("batches", 0) + len(batches)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _prefix_cache(self, prefix: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) ``[1, kv_heads, len(prefix), head_dim]`` of the shared prefix."""
        ids = torch.tensor([prefix], device=self.device)
        out = self.model.get_decoder()(input_ids=ids, position_ids=torch.arange(len(prefix), device=self.device)[None],
                                       use_cache=True)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    @torch.no_grad()
    def _score_batch(self, batch: list, requests: list[Request], results: list) -> None:
        from transformers import DynamicCache

        length, p = batch[0][2], self._prefix_len
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        pos = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.ones(len(batch), 1, length, p + length, dtype=torch.bool)  # every row sees the whole prefix
        where, targets, bounds, sizes = [], [], [], []  # per question: its answer tokens' rows in the batch
        for r, (ctx, idxs, n) in enumerate(batch):
            row_ids, row_pos, spans = pack_group(list(ctx), [requests[i][2] for i in idxs], prefix_len=p)
            ids[r, :n], pos[r, :n] = torch.tensor(row_ids), torch.tensor(row_pos)
            pos[r, n:] = torch.arange(p, p + length - n)
            mask[r, 0, :, p:] = packed_mask(len(ctx) - 1 - p, spans, length)
            first = len(where)
            for start, size in spans:
                where += range(r * length + start, r * length + start + size)
            targets += [t for i in idxs for t in requests[i][2]]
            bounds.append((first, len(where)))
            sizes += [size for _, size in spans]
        seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        # One host-to-device copy per tensor and batch, from pinned memory without waiting: the GPU is
        # not drained before each question's head pass, as a copy from pageable memory would drain it.
        ids, pos, mask, where, targets, seg = (to_device(t, self.device) for t in (
            ids, pos, mask, torch.tensor(where), torch.tensor(targets), seg))
        cache = None
        if p:
            cache = DynamicCache()
            for layer, (k, v) in enumerate(self._prefix_kv):
                cache.update(k.expand(len(batch), -1, -1, -1), v.expand(len(batch), -1, -1, -1), layer)
        hidden = self.model.get_decoder()(
            input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=cache is not None,
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        head = self.model.get_output_embeddings()
        token_lls, token_hits = [], []
        for a, b in bounds:  # one lm_head pass per question, answer tokens only
            logprobs = F.log_softmax(head(hidden[where[a:b]]), dim=-1, dtype=self.softmax_dtype)
            want = targets[a:b]
            token_lls.append(logprobs.gather(1, want[:, None])[:, 0].float())
            token_hits.append(logprobs.argmax(dim=-1) == want)
            lp_dtype = logprobs.dtype
        # Per answer: sum the token log-probs in fp32, then round to the log-softmax dtype, as
        # lm_eval's ``tensor.sum()`` does (with a bf16 model and no softmax_dtype that is bf16).
        sums = torch.zeros(len(sizes), device=self.device).index_add_(0, seg, torch.cat(token_lls))
        misses = torch.zeros(len(sizes), dtype=torch.long, device=self.device).index_add_(
            0, seg, (~torch.cat(token_hits)).long())
        lls, misses = torch.stack([sums.to(lp_dtype).float(), misses.float()]).tolist()  # one host sync
        flat = [i for _, idxs, _ in batch for i in idxs]
        for i, ll, miss in zip(flat, lls, misses, strict=True):
            results[i] = (ll, miss == 0)
            self.cache_hook.add_partial("loglikelihood", requests[i][0], (ll, miss == 0))
