"""Answer loss: how well a model answers questions in the Llama 3 chat format.

For each (question, answer) pair the prompt is the chat template up to the assistant header,
and the loss is the mean negative log-likelihood of the answer tokens (and ``<|eot_id|>``)
given it: the instruction-following signal the chat vector is meant to carry.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kobllla.jsonl import iter_jsonl


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """First user/assistant exchange of each LIMA-shaped row."""
    pairs = []
    for line_no, row in iter_jsonl(Path(path)):
        turns = row.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2:
            raise ValueError(f"{path} line {line_no}: expected 'conversations' with a question and an answer")
        pairs.append((turns[0], turns[1]))
    return pairs


def answer_loss(model_dir: Path, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Mean NLL per answer token (nats) of a HF checkpoint on question/answer pairs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for question, answer in pairs:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tok(answer.strip() + "<|eot_id|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
        targets = ids[0, len(prompt_ids) :]
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += len(answer_ids)
    mean = nll / count
    return {"answer_nll": mean, "answer_ppl": math.exp(mean), "tokens": count, "pairs": len(pairs)}
