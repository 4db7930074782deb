from .registry import build_model, get_spec, list_models, spec_names  # noqa: F401
from .summary import summary  # noqa: F401
