"""Moved: cards are in ``hf_prune.artifacts.cards``, Hub transport in ``hf_prune.artifacts.hub``. This module keeps
the old import path (``hf_prune.hub.push_pretrained``, ``hf_prune.hub.CardSection``) working."""

from .artifacts.cards import (  # noqa: F401
                              CARD_NAME,
                              CardSection,
                              build_model_card,
                              card_files_for_folder,
                              check_evaluations,
                              check_sections,
                              render_card,
)
from .artifacts.hub import check_repo_id, folder_files, hub_errors, push_folder, push_pretrained  # noqa: F401
