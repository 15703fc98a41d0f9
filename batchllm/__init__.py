"""batchllm: distributed batch inference for local LLMs (Celery + SQL + vLLM)."""

__version__ = "0.1.0"
