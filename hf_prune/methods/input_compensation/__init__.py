from ...registry import register_method
from .config import HOW_TO_RUN, InputCompensationConfig
from .model import InputCompensatedModel, InputCompensator

register_method(InputCompensationConfig, None, display_name="Input Compensation", kind="trained",
                how_to_run=HOW_TO_RUN, card_template="input_compensation.md.j2")

__all__ = ["InputCompensatedModel", "InputCompensationConfig", "InputCompensator"]
