"""What hf_prune writes: atomic folders and files (``files``), model cards (``cards``), pictures (``plots``),
the one save path (``save``) and Hub transport (``hub``)."""
