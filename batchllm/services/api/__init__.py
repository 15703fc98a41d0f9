"""The OpenAI Files and Batches API (``batchllm serve``): FastAPI handlers over the store and the queue.

Modules: ``app`` (the app factory), ``config`` (what a server runs with), ``auth`` and ``keys`` (bearer API keys),
``errors`` (OpenAI's error shape for every 4xx/5xx), ``files`` and ``upload`` (``/v1/files``), ``outputs``
(output and error files, streamed from the results), ``batches`` (``/v1/batches``) and ``models``
(``/v1/models``). Nothing here imports vLLM or torch; ``batchllm serve --local`` adds the in-process worker
of ``services.local`` from the command line.
"""
