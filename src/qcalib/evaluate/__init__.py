"""Evaluation metrics, one module per kind of task.

* :mod:`~qcalib.evaluate.classification`: top-1 accuracy of a classifier;
* :mod:`~qcalib.evaluate.language`: perplexity of a causal language model;
* :mod:`~qcalib.evaluate.fidelity`: agreement of a quantized model with its FP original
  (embedding cosine similarity of encoders);
* :mod:`~qcalib.evaluate.agreement`: label-free fidelity of a quantized classifier (top-1
  agreement, mean KL(FP || quantized)) and top-k accuracy.
"""

from qcalib.evaluate.agreement import Agreement, agreement_and_kl, kl_divergence, topk_accuracy
from qcalib.evaluate.classification import accuracy
from qcalib.evaluate.fidelity import embedding_cosine
from qcalib.evaluate.language import perplexity, token_batches

__all__ = [
    "Agreement",
    "accuracy",
    "agreement_and_kl",
    "embedding_cosine",
    "kl_divergence",
    "perplexity",
    "token_batches",
    "topk_accuracy",
]
