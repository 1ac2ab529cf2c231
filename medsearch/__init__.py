"""The `medsearch` command line: wires the retrieval core and the indexer together."""
