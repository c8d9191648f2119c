"""Evaluation metrics, one module per kind of task.

* :mod:`~qcalib.evaluate.classification`: top-1 accuracy of a classifier;
* :mod:`~qcalib.evaluate.language`: perplexity of a causal language model;
* :mod:`~qcalib.evaluate.fidelity`: agreement of a quantized model with its FP original
  (embedding cosine similarity of encoders).
"""

from qcalib.evaluate.classification import accuracy
from qcalib.evaluate.fidelity import embedding_cosine
from qcalib.evaluate.language import perplexity, token_batches

__all__ = ["accuracy", "embedding_cosine", "perplexity", "token_batches"]
