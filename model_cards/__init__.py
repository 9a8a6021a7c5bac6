"""Jinja templates of the model cards hf_prune writes (shipped inside the package as hf_prune.model_cards)."""
