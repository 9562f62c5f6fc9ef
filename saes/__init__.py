"""Sparse dictionaries on final MLP layers: activation caching, training, loading, quality.

    from crosspatch.saes.cache import build_cache, ActivationCache      # sharded, resumable MLP in/out cache
    from crosspatch.saes.train import make_config, train_dictionary     # SAE / transcoder / crosscoder via sae_lens
    from crosspatch.saes.load import load_dictionary, Dictionary        # uniform encode/decode/W_dec per branch
    from crosspatch.saes.quality import evaluate_dictionary, require_gate
    from crosspatch.saes.registry import DictionaryRegistry

Importing `saes.arch` (done by `saes.load`) registers crosspatch's crosscoder and BatchTopK transcoder
classes with sae_lens, so `sae_lens.SAE.load_from_disk` opens every dictionary crosspatch saves.
"""
