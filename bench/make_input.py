"""Generate benchmark input files (JSONL) for batchllm's benches.

    python bench/make_input.py control /tmp/bl_1m.jsonl --lines 1000000
    python bench/make_input.py chat /tmp/bl_chat256.jsonl --lines 256 --max-tokens 64

``control``: short-form lines with realistic ~100-byte prompts (``{"id", "prompt"}`` and
``{"id", "messages"}``), with every 10th line in the OpenAI Batch form (``custom_id/method/url/body``).
No ``model`` field: submit with ``--model smollm2-135m-instruct``.

``chat``: OpenAI Batch chat lines (``/v1/chat/completions``) that both ``vllm run-batch`` and batchllm read,
``max_tokens`` and ``temperature 0`` set on every line, ``body.model`` = ``--model-name`` (the
served name run_batch checks; batchllm resolves the same name through its catalog).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SUBJECTS = [
    "the French Revolution", "photosynthesis", "a binary search tree", "the water cycle", "inflation",
    "TCP congestion control", "the immune system", "plate tectonics", "a hash map", "the Roman Empire",
    "black holes", "supply and demand", "gradient descent", "the printing press", "vaccines", "compound interest",
    "the moon landing", "jazz music", "climate change", "the Pythagorean theorem", "public key cryptography",
    "the stock market", "volcanoes", "the human heart", "machine translation", "coffee brewing", "bees",
]
TASKS = [
    "Explain {s} to a ten-year-old in three sentences.",
    "Write a short haiku about {s}.",
    "Give two surprising facts about {s} and say why they matter.",
    "Summarise {s} in one paragraph for a busy manager.",
    "List three common misconceptions about {s}.",
    "What is the single most important thing to know about {s}?",
    "Classify this topic as science, history, economics or tech: {s}. Answer with one word.",
    "Write a one-line product slogan inspired by {s}.",
]


def prompt_text(rng: random.Random) -> str:
    return rng.choice(TASKS).format(s=rng.choice(SUBJECTS))


def control_lines(n: int, seed: int = 1):
    rng = random.Random(seed)
    for i in range(1, n + 1):
        p = prompt_text(rng)
        if i % 10 == 0:
            obj = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"messages": [{"role": "user", "content": p}], "max_tokens": 64, "temperature": 0}}
        elif i % 3 == 0:
            obj = {"id": f"req-{i}", "messages": [{"role": "user", "content": p}], "max_tokens": 64}
        else:
            obj = {"id": f"req-{i}", "prompt": p, "max_tokens": 64, "temperature": 0.0}
        yield json.dumps(obj, ensure_ascii=False)


def chat_lines(n: int, max_tokens: int, model_name: str, seed: int = 2):
    rng = random.Random(seed)
    for i in range(1, n + 1):
        obj = {"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": model_name, "messages": [{"role": "user", "content": prompt_text(rng)}],
                        "max_tokens": max_tokens, "temperature": 0}}
        yield json.dumps(obj, ensure_ascii=False)


def write(path: Path, lines) -> int:
    n = 0
    with path.open("w", encoding="utf-8", buffering=1 << 20) as f:
        for line in lines:
            f.write(line)
            f.write("\n")
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("control", "chat"))
    ap.add_argument("path", type=Path)
    ap.add_argument("--lines", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model-name", default="smollm2-135m-instruct")
    a = ap.parse_args()
    if a.kind == "control":
        n = write(a.path, control_lines(a.lines or 1_000_000))
    else:
        n = write(a.path, chat_lines(a.lines or 256, a.max_tokens, a.model_name))
    print(f"wrote {n} lines to {a.path} ({a.path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
