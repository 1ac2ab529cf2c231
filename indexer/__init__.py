"""Indexer: find image sources, turn them into model input, embed and write them to a store.

Depends on :mod:`retrieval` (the model layer and the store); never the other way round.
"""
