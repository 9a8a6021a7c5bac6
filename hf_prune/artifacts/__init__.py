"""What hf_prune writes: model cards (``cards``), pictures (``plots``), the one save path of a model folder
(``save``) and Hub transport (``hub``). The atomic folder and file writers they use live in ``hf_prune.atomic``."""
