from ...config import register_method
from .config import InputCompensationConfig, run_input_compensation
from .model import InputCompensatedModel, InputCompensator

register_method(InputCompensationConfig, run_input_compensation)

__all__ = ["InputCompensatedModel", "InputCompensationConfig", "InputCompensator"]
