"""The shared-prefix scorer's batched tokenization gives lm_eval's own token requests.

Reference: lm_eval 0.4.13's ``TemplateLM.loglikelihood`` (one ``tok_encode`` per string) on the
same model and tokenizer; both hand their requests to ``_loglikelihood_tokens``, captured here.
"""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM

from kobllla.evaluation._shared_prefix import SharedPrefixHFLM

PAIRS = [
    ("Q: What is the capital of Korea?\nA:", " Seoul"),
    ("Q: What is the capital of Korea?\nA:", " Busan is"),
    ("Q: 대한민국의 수도는?\nA: ", "서울입니다."),  # trailing space moves to the answer
    ("Q: 대한민국의 수도는?\nA:  ", " 서울"),
    ("<|begin_of_text|>Already has BOS:", " yes"),
    ("", "An answer with no context"),
]


class _Capture(SharedPrefixHFLM):
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        self.captured = requests
        return [(0.0, True)] * len(requests)


@pytest.fixture(scope="module")
def lm(tiny_base):
    return _Capture(pretrained=str(tiny_base), device="cpu", dtype="float32", batch_size=1)


def _instances():
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(PAIRS)]


def test_batched_tokenization_gives_lm_evals_requests_token_for_token(lm):
    lm.loglikelihood(_instances(), disable_tqdm=True)
    ours = lm.captured
    TemplateLM.loglikelihood(lm, _instances(), disable_tqdm=True)  # lm_eval's one-string-at-a-time path
    theirs = lm.captured
    assert ours == theirs
    assert len(ours) == len(PAIRS) and all(len(cont) > 0 for _, _, cont in ours)
    assert ours[0][1] == ours[1][1]  # one context, encoded once, shared by both answers
    assert ours[4][1][0] == 128000 and ours[4][1][1] != 128000  # no second BOS before a BOS-prefixed context


def test_each_distinct_string_is_encoded_once(lm, monkeypatch):
    calls = []
    real = type(lm.tokenizer).__call__

    def counting(self, texts, **kwargs):
        calls.append(list(texts))
        return real(self, texts, **kwargs)

    monkeypatch.setattr(type(lm.tokenizer), "__call__", counting)
    lm.loglikelihood(_instances(), disable_tqdm=True)
    encoded = [t for batch in calls for t in batch]
    assert len(encoded) == len(set(encoded)) == 8  # 3 distinct stripped contexts + 5 context+answer strings
    assert len(calls) == 2  # one call per special-token setting (BOS added / already there)


PREAMBLE = "Q: What is human life expectancy in the United States?\nA: Human life expectancy is 78 years.\n\n"


def _requests(lm):
    questions = [("Where is Seoul?", [" In Korea.", " In Japan.", " On the moon, of course."]),
                 ("한국의 수도는 어디인가요?", [" 서울", " 부산입니다."]),
                 ("Who wrote Hamlet?", [" Shakespeare"])]
    pairs = [(f"{PREAMBLE}Q: {q}\nA:", a) for q, answers in questions for a in answers]
    lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)],
                     disable_tqdm=True)
    return lm.captured


def test_common_prefix_leaves_every_context_its_last_token():
    from kobllla.evaluation._shared_prefix import common_prefix_len

    assert common_prefix_len([tuple(range(40)) + (7,), tuple(range(40)) + (8, 9)], min_len=16) == 40
    assert common_prefix_len([tuple(range(20)), tuple(range(20))], min_len=16) == 19
    assert common_prefix_len([tuple(range(20)), (5,) + tuple(range(19))], min_len=16) == 0
    assert common_prefix_len([tuple(range(10)), tuple(range(10))], min_len=16) == 0
    assert common_prefix_len([], min_len=1) == 0


def test_shared_kv_prefix_scores_equal_lm_evals_own_loglikelihoods(lm):
    from lm_eval.models.huggingface import HFLM

    from kobllla.evaluation._shared_prefix import common_prefix_len

    reqs = _requests(lm)
    assert common_prefix_len([tuple(c) for _, c, _ in reqs]) >= 16  # the preamble is shared
    want = HFLM._loglikelihood_tokens(lm, reqs, disable_tqdm=True)  # lm_eval: one row per answer
    lm.shared_kv_prefix = True
    got = SharedPrefixHFLM._loglikelihood_tokens(lm, reqs)
    assert lm._prefix_len >= 16
    lm.shared_kv_prefix = False
    plain = SharedPrefixHFLM._loglikelihood_tokens(lm, reqs)
    assert lm._prefix_len == 0
    for (w, wg), (g, gg), (p, pg) in zip(want, got, plain, strict=True):
        assert g == pytest.approx(w, abs=1e-4) and p == pytest.approx(w, abs=1e-4)
        assert gg == wg == pg


def test_lm_evals_environment_report_is_skipped_inside_and_restored_after():
    import lm_eval.evaluator

    from kobllla.evaluation._runner import _no_env_report

    real = lm_eval.evaluator.add_env_info
    with _no_env_report():
        storage: dict = {}
        lm_eval.evaluator.add_env_info(storage)
        assert storage == {}
    assert lm_eval.evaluator.add_env_info is real
    storage = {}
    real(storage)
    assert "pretty_env_info" in storage  # what simple_evaluate would have spent ~3 s on
