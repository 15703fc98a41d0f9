"""The scheduler: VRAM fit (``fit``), placement, dispatch, lease reaping and recurring schedules.

It sits on the bottom layer (catalog, store, queue, settings) and never imports ``batchllm.worker``;
the two meet in the store, the queue contracts and the model catalog.
"""
