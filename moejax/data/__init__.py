"""Data: the synthetic mixture corpus and TFDS text, as deterministic resumable batches.

    ds = data.make_dataset(config.data, seq_len=L, global_batch_size=B, seed=0,
                           process_index=p, process_count=P)
    it = ds.train_iterator()      # next(it) -> {"inputs", "targets", "weights", ...}
    it.set_state({"step": s})     # resumes exactly at step s
    ds.eval_batches(n)            # the same held-out batches on every call
"""

from moejax.data.base import Batch, Dataset, StepIterator
from moejax.data.pipeline import (DEFAULTS, SYNTHETIC, batch_spec, default_config,
                                  make_dataset, validate_data_config, vocab_size)
from moejax.data.synthetic import MarkovMixture, SyntheticMixtureDataset
from moejax.data.text import TextDataset
from moejax.data.tokenizers import (TOKENIZERS, ByteTokenizer, SentencePieceTokenizer,
                                    train_sentencepiece)

__all__ = [
    "Batch", "ByteTokenizer", "DEFAULTS", "Dataset", "MarkovMixture", "SYNTHETIC",
    "SentencePieceTokenizer", "StepIterator", "SyntheticMixtureDataset", "TOKENIZERS",
    "TextDataset", "batch_spec", "default_config", "make_dataset", "train_sentencepiece",
    "validate_data_config", "vocab_size",
]
