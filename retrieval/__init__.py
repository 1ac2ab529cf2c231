"""Retrieval core: model towers, preprocessing, the vector store and search.

Nothing here imports :mod:`indexer`; the indexer writes through this package.
"""

__version__ = "0.1.0"
