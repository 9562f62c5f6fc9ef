"""Sparse dictionaries on final MLP layers: activation caching, training, loading, quality."""
