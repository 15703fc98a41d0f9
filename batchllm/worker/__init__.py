"""Worker side of batchllm: Celery worker process, GPU discovery, the vLLM engine loop, GGUF import.

Importing this package must stay cheap: vllm, torch, transformers and gguf are imported lazily inside
the functions that need them, so ``batchllm --help`` never pays for them.
"""
