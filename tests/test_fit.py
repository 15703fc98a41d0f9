"""The fit rule on real card sizes: which variant each worker gets, and the numbers it shows."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from batchllm.catalog import Catalog, ModelSpec, builtin_models
from batchllm.placement.fit import Device, WorkerCapacity, best_variant, engine_gpus, estimate, explain, fits
from batchllm.sizes import GB, mib

CATALOG = Catalog(builtin_models(Path("/models")))
SMOL = CATALOG.get("smollm2-135m-instruct")
# What NVML reports, in MiB, for cards sold as ...
RTX4060 = 8192  # 8 GB
T4 = 16384  # "16 GB" (V100-16, A4000): must NOT take Mixtral
A10G = 23028  # 24 GB
L4 = 23034  # 24 GB
RTX4090 = 24564  # 24 GB
A100_40 = 40536  # 40 GB
L40S = 46068  # 48 GB
H100 = 81559  # 80 GB
A100_80 = 81920  # 80 GB


def gpus(*sizes: float, advertised: str | None = None) -> WorkerCapacity:
    return WorkerCapacity.of_gpus(*sizes, advertised_bytes=int(float(advertised) * GB) if advertised else None)


def picked(model: str, worker: WorkerCapacity) -> str | None:
    found = best_variant(CATALOG.get(model), worker)
    return found[0].name if found else None


@pytest.mark.parametrize(
    ("model", "worker", "variant"),
    [
        # Mixtral: the 24 GB floor is met by every 24 GB card, never by a 16 GB one.
        ("mixtral-8x7b-instruct", gpus(T4), None),
        ("mixtral-8x7b-instruct", gpus(A10G), "awq-offload"),
        ("mixtral-8x7b-instruct", gpus(L4), "awq-offload"),
        ("mixtral-8x7b-instruct", gpus(RTX4090), "awq-offload"),
        ("mixtral-8x7b-instruct", gpus(A100_40), "awq"),
        ("mixtral-8x7b-instruct", gpus(A100_80), "awq"),
        ("mixtral-8x7b-instruct", gpus(A100_80, A100_80), "bf16-tp2"),
        ("mixtral-8x7b-instruct", gpus(A10G, A10G), "awq"),  # tensor parallel sums: 48.3 GB
        # Llama-2-70B: 4-bit on one 80 GB card, bf16 across two.
        ("llama-2-70b-chat", gpus(A100_80), "awq"),
        ("llama-2-70b-chat", gpus(H100), "awq"),
        ("llama-2-70b-chat", gpus(H100, H100), "bf16-tp2"),
        ("llama-2-70b-chat", gpus(A100_80, A100_80), "bf16-tp2"),
        ("llama-2-70b-chat", gpus(L40S), None),
        ("llama-2-70b-chat", gpus(A10G, A10G), None),
        # Falcon-40B: 4-bit on 48 GB.
        ("falcon-40b-instruct", gpus(L40S), "gptq"),
        ("falcon-40b-instruct", gpus(A100_40), None),
        ("falcon-40b-instruct", gpus(RTX4090), None),
        ("falcon-40b-instruct", gpus(H100, H100), "bf16-tp2"),
        # 7B models: 4-bit on 8 GB, bf16 on 24 GB.
        ("llama-2-7b-chat", gpus(RTX4060), "awq"),
        ("llama-2-7b-chat", gpus(T4), "awq"),
        ("llama-2-7b-chat", gpus(A10G), "bf16"),
        ("mistral-7b-instruct", gpus(RTX4060), "awq"),
        ("mistral-7b-instruct", gpus(A10G), "bf16"),
        ("falcon-7b-instruct", gpus(RTX4060), None),
        ("falcon-7b-instruct", gpus(T4), "gptq"),
        ("falcon-7b-instruct", gpus(A10G), "bf16"),
        ("falcon-7b-instruct", gpus(A10G, A10G), "bf16"),  # 71 heads: runs on one of the two GPUs
        ("llama-2-13b-chat", gpus(T4), "awq"),
        ("llama-2-13b-chat", gpus(A10G), "awq"),
        ("llama-2-13b-chat", gpus(A10G, A10G), "bf16"),  # 26 GB of bf16 over 2 x 24 GB
        ("llama-2-13b-chat", gpus(A100_40), "bf16"),
        # Advertised caps: below physical wins; above physical is ignored.
        ("mixtral-8x7b-instruct", gpus(A100_80, advertised="24"), "awq-offload"),
        ("mixtral-8x7b-instruct", gpus(A100_80, advertised="16"), None),
        ("mixtral-8x7b-instruct", gpus(T4, advertised="80"), None),
        ("smollm2-135m-instruct", gpus(A10G), "bf16"),
    ],
)
def test_fit_table(model: str, worker: WorkerCapacity, variant: str | None) -> None:
    assert picked(model, worker) == variant


def test_floors_compare_bytes_to_bytes() -> None:
    offload = CATALOG.get("mixtral").variant("awq-offload")
    assert mib(A10G) >= offload.floor_bytes == 24 * 10**9 > mib(T4)
    est = estimate(CATALOG.get("mixtral"), offload, gpus(T4))
    assert not est.fits
    assert est.reason == "mixtral-8x7b-instruct@awq-offload needs ≥ 24 GB; the worker has 17.2 GB (16,384 MiB)"


def test_estimate_numbers_and_reason() -> None:
    llama = CATALOG.get("llama-2-7b-chat")
    est = estimate(llama, llama.variant("bf16"), gpus(A10G, advertised="20"))
    assert est.weights_bytes == round(6.74e9 * 2) and est.kv_bytes == 512 * 1024 * 4096
    assert est.overhead_bytes == GB + round(0.05 * est.weights_bytes)
    assert est.total_bytes == est.weights_bytes + est.kv_bytes + est.overhead_bytes
    assert est.budget_bytes == int(0.9 * 20 * GB) and est.capacity_bytes == 20 * GB
    assert est.fits and est.tensor_parallel == 1 and est.max_model_len == 4096
    assert est.reason == "llama-2-7b-chat@bf16: weights 13.5 GB + KV 2.1 GB + overhead 1.7 GB = 17.3 GB ≤ 0.9 × 20.0 GB = 18.0 GB"
    tight = estimate(llama, llama.variant("bf16"), gpus(A10G), gpu_memory_utilization=0.7)
    assert not tight.fits and tight.reason.endswith("= 17.3 GB > 0.7 × 24.1 GB")
    short = estimate(llama, llama.variant("bf16"), gpus(A10G), max_model_len=1024)
    assert short.kv_bytes == 512 * 1024 * 1024 and short.max_model_len == 1024
    row = est.table_row()
    assert row["floor"] == "20 GB" and row["total"] == "17.3 GB" and row["fits"] == "yes" and est.ref == "llama-2-7b-chat@bf16"


def test_offload_and_tensor_parallel_numbers() -> None:
    mixtral = CATALOG.get("mixtral")
    off = estimate(mixtral, mixtral.variant("awq-offload"), gpus(A10G))
    assert off.offload_bytes == 8 * 2**30  # vLLM's cpu_offload_gb is GiB per GPU
    assert off.max_model_len == 8192 and off.fits
    tp = estimate(mixtral, mixtral.variant("bf16-tp2"), gpus(A100_80, A100_80))
    assert tp.tensor_parallel == 2 and tp.capacity_bytes == 2 * mib(A100_80)
    assert tp.overhead_bytes == 2 * GB + round(0.05 * tp.weights_bytes)
    one = estimate(mixtral, mixtral.variant("bf16-tp2"), gpus(A100_80))
    assert not one.fits and one.reason == "mixtral-8x7b-instruct@bf16-tp2 needs 2 GPUs in tensor parallel; the worker has 1"
    # A variant with a tp floor on a 4-GPU worker uses all four.
    four = estimate(mixtral, mixtral.variant("bf16-tp2"), gpus(L40S, L40S, L40S, L40S))
    assert four.fits and four.tensor_parallel == 4


def test_heads_decide_how_many_gpus() -> None:
    falcon7, smol, llama70 = CATALOG.get("falcon-7b"), SMOL, CATALOG.get("llama-2-70b-chat")
    assert engine_gpus(falcon7, 2) == 1 and engine_gpus(smol, 4) == 3 and engine_gpus(llama70, 4) == 4
    est = estimate(falcon7, falcon7.variant("bf16"), gpus(A10G, A10G))
    assert est.tensor_parallel == 1 and est.capacity_bytes == mib(A10G)
    # A worker that uses fewer GPUs together than it has counts only those.
    one_of_two = WorkerCapacity(devices=gpus(A10G, A10G).devices, tensor_parallel=1)
    assert one_of_two.capacity_bytes == mib(A10G) and picked("llama-2-13b-chat", one_of_two) == "awq"
    with pytest.raises(ValueError, match="tensor_parallel 3"):
        WorkerCapacity(devices=gpus(A10G, A10G).devices, tensor_parallel=3)


def test_cpu_worker_hosts_only_cpu_ok_models() -> None:
    cpu = WorkerCapacity.of_cpu(64 * GB)
    found = best_variant(SMOL, cpu)
    assert found is not None and found[1].overhead_bytes < GB and found[1].tensor_parallel == 1
    assert "of RAM (CPU)" in cpu.describe()
    llama = CATALOG.get("llama-2-7b-chat")
    est = estimate(llama, llama.variant("awq"), cpu)
    assert not est.fits and "needs a GPU" in est.reason and "not marked cpu_ok" in est.reason
    assert picked("llama-2-7b-chat", cpu) is None
    # The CPU backend reserves its KV space up front (settings.cpu_kvcache_gb).
    reserved = estimate(SMOL, SMOL.variants[0], WorkerCapacity.of_cpu(4 * GB), cpu_kvcache_bytes=2 * 2**30)
    assert reserved.kv_bytes == 2 * 2**30 and reserved.fits
    assert not estimate(SMOL, SMOL.variants[0], WorkerCapacity.of_cpu(2 * GB), cpu_kvcache_bytes=2 * 2**30).fits


def test_cpu_worker_advertising_vram_stands_in_for_a_gpu() -> None:
    big = SMOL.model_copy(update={"name": "test-big-24gb", "variants": (SMOL.variants[0].model_copy(update={"floor_gb": 24}),)})
    small = big.model_copy(update={"name": "test-small-8gb", "variants": (SMOL.variants[0].model_copy(update={"floor_gb": 8}),)})
    w24 = WorkerCapacity.of_cpu(8 * GB, advertised_bytes=24 * GB)
    w16 = WorkerCapacity.of_cpu(8 * GB, advertised_bytes=16 * GB)
    assert w24.capacity_bytes == 24 * GB and w24.stands_in_for_gpu and not w24.cpu_only
    assert fits(big, big.variants[0], w24) and not fits(big, big.variants[0], w16)
    assert fits(small, small.variants[0], w16)
    assert "advertised by a CPU worker" in estimate(big, big.variants[0], w16).reason
    # Standing in for a GPU, it is placed like one: GPU-only models are considered.
    assert picked("mixtral-8x7b-instruct", w24) == "awq-offload"
    assert estimate(big, big.variants[0], w24).overhead_bytes >= GB


def test_explain() -> None:
    mixtral = CATALOG.get("mixtral-8x7b-instruct")
    assert explain(mixtral, [gpus(T4), gpus(RTX4060)]) == (
        "mixtral-8x7b-instruct needs ≥ 24 GB; the largest worker has 17.2 GB (16,384 MiB)"
    )
    assert explain(mixtral, []) == "mixtral-8x7b-instruct needs ≥ 24 GB; no workers are known"
    assert "only CPU workers are known" in explain(mixtral, [WorkerCapacity.of_cpu(64 * GB)])
    pinned = explain(mixtral, [gpus(A10G)], variant=mixtral.variant("awq"))
    assert pinned == "mixtral-8x7b-instruct@awq needs ≥ 40 GB; the largest worker has 24.1 GB (23,028 MiB)"
    # Floors met but the estimate is not: say so with the numbers.
    tight = explain(CATALOG.get("llama-2-7b-chat"), [gpus(RTX4060)], gpu_memory_utilization=0.5)
    assert tight.startswith("llama-2-7b-chat fits no known worker; on the largest (8.6 GB (8,192 MiB)):")
    assert "@awq: weights" in tight and "> 0.5 × 8.6 GB" in tight


def test_device_model() -> None:
    dev = Device(index=1, name="NVIDIA A10G", total_bytes=mib(A10G), free_bytes=mib(22000))
    worker = WorkerCapacity(devices=[dev])
    assert worker.capacity_bytes == mib(A10G) and worker.engine_devices == 1 and worker.describe() == "24.1 GB (23,028 MiB)"
    assert gpus(A10G, A10G).describe() == "2 GPUs, 48.3 GB (46,056 MiB)"
    assert gpus(A100_80, advertised="24").describe() == "24.0 GB (22,888 MiB) advertised"


# The smallest card actually sold in each floor's class (NVML MiB): every built-in variant must fit the
# smallest card its floor admits, so a floor is never a promise the estimate breaks. The 2 and 4 GB classes
# (2,048 / 4,096 MiB: GTX 1050, GTX 1650, T1000-class cards) are where the embedding models' floors sit.
GTX1050 = 2048  # 2 GB
GTX1650 = 4096  # 4 GB
CLASS_CARDS = {2: GTX1050, 4: GTX1650, 8: RTX4060, 16: T4, 20: 20470, 24: A10G, 40: A100_40, 48: L40S, 80: H100}


def test_class_cards_meet_the_floors_they_stand_for() -> None:
    # A card of the class must meet the class's decimal floor (2,048 MiB = 2.15 GB >= 2 GB), and no card of the
    # next smaller class may: otherwise the table would test a floor against a card it does not admit.
    classes = sorted(CLASS_CARDS)
    for smaller, floor in itertools.pairwise(classes):
        assert mib(CLASS_CARDS[floor]) >= floor * GB > mib(CLASS_CARDS[smaller]), (floor, smaller)
    assert mib(CLASS_CARDS[classes[0]]) >= classes[0] * GB


@pytest.mark.parametrize("spec", [s for s in CATALOG if s.task == "embed" and not s.cpu_ok], ids=lambda s: s.name)
def test_embedding_floors_fit_a_card_of_exactly_their_size(spec: ModelSpec) -> None:
    # Encoders are small: each GPU floor holds with room to spare even on a card of exactly floor_gb bytes.
    for variant in spec.variants:
        est = estimate(spec, variant, gpus(variant.floor_bytes / 2**20))
        assert est.fits and est.total_bytes < 0.9 * variant.floor_bytes, est.reason


@pytest.mark.parametrize("spec", list(CATALOG), ids=lambda s: s.name)
def test_every_builtin_variant_fits_its_floor_class(spec: ModelSpec) -> None:
    for variant in spec.variants:
        if spec.cpu_ok:
            worker = WorkerCapacity.of_cpu(int(variant.floor_gb * GB))
        else:
            per_gpu = variant.floor_gb / variant.tensor_parallel
            worker = gpus(*[CLASS_CARDS[int(per_gpu)]] * variant.tensor_parallel)
        est = estimate(spec, variant, worker)
        assert est.fits, est.reason
        assert est.floor_bytes <= est.capacity_bytes
