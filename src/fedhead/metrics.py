"""Scores of generated text against references: exact-match accuracy, BLEU and chrF (sacrebleu), ROUGE F1
(rouge-score). Accuracy is a fraction in [0, 1]; BLEU, chrF and ROUGE are on sacrebleu's 0-100 scale."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def score_generations(
    predictions: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str]
) -> dict[str, float]:
    """Corpus scores of `predictions`, each against its own list of references (at least one each).

    accuracy: fraction whose whitespace/case-normalised text equals one of its references. bleu / chrf: corpus
    scores with every reference of an example (inputs with fewer references get None in the missing streams).
    rouge1 / rouge2 / rougeL: mean over examples of the best F1 against any reference (Porter stemming).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if any(len(r) == 0 for r in references):
        raise ValueError("every prediction needs at least one reference")
    out: dict[str, float] = {}
    n = max(len(predictions), 1)
    if "accuracy" in metrics:
        hits = sum(_normal(p) in {_normal(r) for r in refs} for p, refs in zip(predictions, references, strict=True))
        out["accuracy"] = hits / n
    if "bleu" in metrics or "chrf" in metrics:
        import sacrebleu

        width = max(len(r) for r in references)
        # one stream per reference position; None where an example has fewer references (sacrebleu skips it)
        streams = cast(list[list[str]], [[refs[i] if i < len(refs) else None for refs in references]
                                         for i in range(width)])
        if "bleu" in metrics:
            out["bleu"] = sacrebleu.corpus_bleu(list(predictions), streams).score
        if "chrf" in metrics:
            out["chrf"] = sacrebleu.corpus_chrf(list(predictions), streams).score
    rouge = [m for m in ("rouge1", "rouge2", "rougeL") if m in metrics]
    if rouge:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(rouge, use_stemmer=True)
        totals = dict.fromkeys(rouge, 0.0)
        for p, refs in zip(predictions, references, strict=True):
            scores = scorer.score_multi(list(refs), p)
            for m in rouge:
                totals[m] += scores[m].fmeasure
        out.update({m: 100 * totals[m] / n for m in rouge})
    return out
