"""The task metrics of ``first-gguf eval``: pure functions of a reply and its reference.

ROUGE-L (summarization, docs, news), chrF and BLEU (translation, de), exact match and token F1 (qa), and
whether the reply's first word is the reference's yes or no (yesno); ``task_metrics`` picks a task's.
Multiple choice (mc) is scored by log-likelihood in ``loop``, not here.
"""
from __future__ import annotations

import re
import string
from collections import Counter


def rouge_l(pred: str, ref: str) -> float:
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure)


def chrf(pred: str, ref: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(pred, [ref]).score)


def bleu(pred: str, ref: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(pred, [ref]).score)


def _norm_answer(s: str) -> list[str]:
    s = s.lower()
    s = "".join(c for c in s if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return s.split()


def exact_match(pred: str, ref: str) -> float:
    return float(_norm_answer(pred) == _norm_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = _norm_answer(pred), _norm_answer(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def yes_no_match(pred: str, ref: str) -> float:
    """Whether the first word of ``pred`` is the yes/no that ``ref`` starts with."""
    p, r = _norm_answer(pred)[:1], _norm_answer(ref)[:1]
    return float(bool(r) and r[0] in ("yes", "no") and p == r)


def task_metrics(task: str, pred: str, ref: str) -> dict[str, float]:
    if task in ("summarization", "docs", "news"):
        return {"rougeL": rouge_l(pred, ref)}
    if task in ("translation", "de"):
        return {"chrF": chrf(pred, ref), "BLEU": bleu(pred, ref)}
    if task == "qa":
        return {"EM": exact_match(pred, ref), "F1": token_f1(pred, ref)}
    if task == "yesno":
        return {"yes/no": yes_no_match(pred, ref)}
    return {}
