"""How the vLLM engine is configured: options, vLLM's own CLI arguments, environment and log noise.

The options are turned into a command line and parsed by vLLM's own ``vllm serve`` parser, so the
serving objects get exactly the ``args`` Namespace they expect (every default included) and our
options go through vLLM's validation. Everything here that touches vLLM imports it lazily.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from batchllm.errors import ModelLoadError

#: vLLM's historical ``VLLM_CPU_KVCACHE_SPACE`` default, in GiB; used when neither option nor env sets one.
DEFAULT_CPU_KVCACHE_GB = 4.0
#: Python warnings from these packages follow the engine's log level (their module names, as a regex).
NOISY_MODULES = r"(vllm|torch|transformers|triton|tokenizers|huggingface_hub)(\.|$)"
NOISY_CATEGORIES: tuple[type[Warning], ...] = (FutureWarning, UserWarning, DeprecationWarning)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Plain values the worker starts an engine with.

    Attributes:
        model_dir: local model directory (or an HF repo id, for GPU workers with hub access).
        served_name: the catalog name; responses carry it as ``model``.
        device: ``"cpu"`` or ``"cuda"``; must match the installed vLLM build.
        dtype: weights/activations dtype (``bfloat16``, ``float16``, ``float32``, ``auto``).
        max_model_len: context length; None takes the model's.
        tensor_parallel: GPUs to split the model over.
        gpu_memory_utilization: share of each GPU vLLM may use.
        enforce_eager: skip CUDA graphs / torch.compile (faster start, slower steps on GPUs).
        quantization: ``awq`` / ``gptq`` / None.
        cpu_offload_gb: GiB of weights per GPU kept in CPU memory.
        cpu_kvcache_gb: KV cache size on the CPU backend (GiB); None: ``VLLM_CPU_KVCACHE_SPACE`` or 4.
        seed: the engine's default seed.
        task: ``generate`` (chat/completions) or ``embed`` (a pooling model for /v1/embeddings).
        log_level: vLLM's log level; also decides whether library warnings are shown (WARNING or lower).
        max_num_seqs: requests the engine runs at once; None: vLLM's offline (``LLM`` class) default.
        max_num_batched_tokens: tokens per engine step; None: vLLM's offline default.
        trust_remote_code: let transformers run the model's own config code (catalog entries that need it).
        engine_log: file for the engine-core process's stdout/stderr. None: the worker's own streams when
            ``log_level`` is WARNING or lower, else ``<tmp>/batchllm-engine-<pid>.log``.
    """

    model_dir: str
    served_name: str
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: str = "bfloat16"
    max_model_len: int | None = None
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = True
    quantization: str | None = None
    cpu_offload_gb: float = 0.0
    cpu_kvcache_gb: float | None = None
    seed: int = 0
    task: Literal["generate", "embed"] = "generate"
    log_level: str = "WARNING"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    engine_log: str | None = None
    trust_remote_code: bool = False

    @property
    def verbose(self) -> bool:
        """True when library warnings and progress bars should reach the terminal."""
        return _level(self.log_level) <= logging.WARNING

    def engine_log_path(self) -> str | None:
        """Where the engine-core process writes its output (None: inherit the worker's streams)."""
        if self.engine_log:
            return self.engine_log
        return None if self.verbose else os.path.join(tempfile.gettempdir(), f"batchllm-engine-{os.getpid()}.log")


def _level(name: str) -> int:
    value = logging.getLevelName(name.upper())
    return value if isinstance(value, int) else logging.WARNING


def _level_name(name: str) -> str:
    return name.upper() if name.upper() in LOG_LEVELS else "WARNING"


def check_weights(opts: EngineOptions) -> str:
    """Fail fast, before importing vLLM, when a local model directory is missing or incomplete.

    An argument that is not a path (``org/name``) is left to vLLM (it downloads from the hub).

    Returns:
        The model argument for vLLM (a resolved local path, or the repo id as given).

    Raises:
        ModelLoadError: the local directory has no ``config.json``; the message says how to fetch it.
    """
    text = opts.model_dir.strip()
    path = Path(text).expanduser()
    if not (path.is_absolute() or text.startswith((".", "~")) or path.exists()):
        return text  # an HF repo id
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model {opts.served_name}: no weights at {path} (need a model directory with config.json); "
            f"run: batchllm models pull {opts.served_name} (or `batchllm models import-gguf`), or fix BATCHLLM_MODEL_DIR"
        )
    return str(path.resolve())


def configure_noise(log_level: str) -> None:
    """Make vLLM's, torch's and transformers' output follow ``log_level``, in this process and in the
    engine-core process vLLM spawns (which inherits the environment, not our filters).

    Above WARNING (ERROR/CRITICAL), Python warnings of those libraries are ignored, torch's C++ warnings
    (NUMA binding, …) are silenced and transformers says only errors. Call before vLLM is imported (torch
    reads ``TORCH_CPP_LOG_LEVEL`` when it loads). The engine-core process's output goes to a log file
    besides (see ``EngineOptions.engine_log_path``): what it prints before reading any setting stays out too.
    """
    level = _level_name(log_level)
    os.environ["VLLM_LOGGING_LEVEL"] = level
    if _level(level) > logging.WARNING:
        for category in NOISY_CATEGORIES:
            warnings.filterwarnings("ignore", category=category, module=NOISY_MODULES)
        # The engine-core process is spawned, so only the environment reaches it.
        child = ",".join(f"ignore::{c.__name__}" for c in NOISY_CATEGORIES)
        os.environ["PYTHONWARNINGS"] = ",".join(p for p in (os.environ.get("PYTHONWARNINGS"), child) if p)
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    # vLLM configures its logger only when an engine starts; warnings logged while it is being imported
    # (e.g. "Triton is installed, but doesn't include CPU backend") otherwise reach stderr unformatted.
    logging.getLogger("vllm").setLevel(level)


def configure_environment(opts: EngineOptions) -> None:
    """Environment vLLM reads at engine start (inherited by the engine-core process).

    ``AsyncLLM`` always runs its engine core in a process of its own; ``VLLM_ENABLE_V1_MULTIPROCESSING``
    only picks, on the CPU backend, the executor inside it. 1 (vLLM's default) runs the model in a third
    process with vLLM's OpenMP thread binding, one core reserved for the scheduler and this process; 0
    runs it inside the engine core without binding, which vLLM says is unsupported on CPU and which
    measured ~15 % fewer tokens/s on 2 cores (the old in-process engine loop set 0, so it is reset here).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if opts.device == "cpu":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        if opts.cpu_kvcache_gb is not None:
            # VLLM_CPU_KVCACHE_SPACE (whole GiB) would override kv_cache_memory_bytes on the CPU backend.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)


def engine_argv(opts: EngineOptions, model: str) -> list[str]:
    """The ``vllm serve`` command line for ``opts`` (without the program name)."""
    argv = [
        "--model", model, "--served-model-name", opts.served_name, "--dtype", opts.dtype,
        "--tensor-parallel-size", str(opts.tensor_parallel), "--gpu-memory-utilization", str(opts.gpu_memory_utilization),
        "--cpu-offload-gb", str(opts.cpu_offload_gb), "--seed", str(opts.seed), "--disable-log-stats",
        "--generation-config", "auto",  # the model's generation_config.json defaults, as `vllm serve` applies them
        "--log-level", _level_name(opts.log_level),
    ]
    if opts.max_model_len:
        argv += ["--max-model-len", str(opts.max_model_len)]
    if opts.enforce_eager:
        argv.append("--enforce-eager")
    if opts.quantization:
        argv += ["--quantization", opts.quantization]
    if opts.task == "embed":
        argv += ["--runner", "pooling"]
    if opts.trust_remote_code:
        argv.append("--trust-remote-code")
    if opts.max_num_seqs:
        argv += ["--max-num-seqs", str(opts.max_num_seqs)]
    if opts.max_num_batched_tokens:
        argv += ["--max-num-batched-tokens", str(opts.max_num_batched_tokens)]
    if not opts.verbose:
        argv.append("--no-use-tqdm-on-load")
    if opts.device == "cpu":
        gib = opts.cpu_kvcache_gb
        if gib is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            gib = DEFAULT_CPU_KVCACHE_GB  # else vLLM sizes it from RAM and refuses to start on a busy host
        if gib is not None:
            argv += ["--kv-cache-memory-bytes", str(int(gib * 2**30))]
    return argv


def parse_engine_args(opts: EngineOptions, model: str) -> Namespace:
    """Parse :func:`engine_argv` with vLLM's own ``vllm serve`` parser (imports vLLM).

    Raises:
        ModelLoadError: vLLM is not installed, or refuses an option.
    """
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except Exception as exc:
        raise ModelLoadError(f"cannot import vllm ({exc}); install batchllm[gpu] or batchllm[cpu]") from exc
    parser = make_arg_parser(FlexibleArgumentParser(prog="batchllm-engine", exit_on_error=False))
    try:
        return parser.parse_args(engine_argv(opts, model))
    except (SystemExit, Exception) as exc:  # argparse exits on bad values
        raise ModelLoadError(f"model {opts.served_name}: vLLM refused the engine options ({exc})") from None


def check_device(opts: EngineOptions) -> None:
    """Raise :class:`ModelLoadError` when ``opts.device`` is not what this vLLM build runs on."""
    from vllm.platforms import current_platform

    want_cuda = opts.device == "cuda"
    if want_cuda != current_platform.is_cuda_alike() or (opts.device == "cpu") != current_platform.is_cpu():
        raise ModelLoadError(
            f"device {opts.device!r} requested but this vLLM build targets {current_platform.device_type!r}"
        )

