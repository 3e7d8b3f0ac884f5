"""Session-wide fixtures: one Ray for the whole run (CI has two cores), the bundled model, and
tiny random models with a real tokenizer."""

from __future__ import annotations

import os
import shutil
import signal
import warnings

import pytest
import torch

# Ray's dashboard and usage reporting only cost time in tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Without a GPU the Triton kernels run in Triton's interpreter (on CPU tensors). Triton reads this
# when a kernel is defined, so it is set for the whole session, before any kernel module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _ctrl_c_reaches_children(request):
    """Children inherit an ignored SIGINT, and a Python child then ignores Ctrl-C for good: if
    anything earlier in this session left SIGINT ignored here, every server a later test spawns
    would not stop on Ctrl-C (CI saw `serve run` and `strata serve` SIGKILLed after 120 s). Put it
    back, and say so, naming the test about to run."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        warnings.warn(f"SIGINT was ignored in the test process before {request.node.nodeid}; restored",
                      stacklevel=1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray per test session, with logical CPUs for up to 8 ranks."""
    import ray

    # A Ray an earlier test's engine started for itself has only the CPUs it needed: the tests
    # here place up to 8 ranks, so start the session's own.
    if ray.is_initialized() and ray.cluster_resources().get("CPU", 0) < 10:
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(num_cpus=10, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from strata.app.bundled_model import ensure_bundled_model

    return ensure_bundled_model()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_dir):
    """Builds a tiny random model of an architecture on demand (cached per session), with the
    bundled model's tokenizer copied in so the engine can detokenize its ids."""
    from tests.model_factory import LLAMA3_ROPE, make_tiny_model
    from tests.moe_factory import make_tiny_moe

    built: dict[str, str] = {}
    variants = {
        "llama": dict(arch="llama", rope_scaling=LLAMA3_ROPE),
        "llama-sharded": dict(arch="llama", num_shards=3),
        "llama-tied": dict(arch="llama", tie=True),
        "mistral": dict(arch="mistral"),
        "qwen2": dict(arch="qwen2"),
        "qwen3": dict(arch="qwen3"),
        "llama-30-layers": dict(arch="llama", num_hidden_layers=30, hidden_size=32, intermediate_size=64,
                                num_attention_heads=2, num_key_value_heads=2),
        "mixtral": dict(arch="mixtral", moe=True),
        "qwen2_moe": dict(arch="qwen2_moe", moe=True),
        "qwen3_moe": dict(arch="qwen3_moe", moe=True),
    }

    def build(name: str, **overrides) -> str:
        key = name + repr(sorted(overrides.items()))
        if key not in built:
            path = tmp_path_factory.mktemp(name)
            spec = dict(variants[name], **overrides)
            if spec.pop("moe", False):
                make_tiny_moe(path=path, **spec)
            else:
                make_tiny_model(path=path, **spec)
            for f in TOKENIZER_FILES:
                if os.path.exists(os.path.join(smollm2_dir, f)):
                    shutil.copy(os.path.join(smollm2_dir, f), path)
            built[key] = str(path)
        return built[key]

    return build


# The HTTP server tests' fixtures (a live `strata serve` per backend, the offline reference).
from tests.ray_room import ray_nodes  # noqa: E402, F401
from tests.ray_tmp_fixtures import ray_tmp  # noqa: E402, F401
from tests.server_fixtures import live_server, reference, server_ray_address  # noqa: E402, F401
