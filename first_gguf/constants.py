"""Every first-gguf name stored in a GGUF file, in one place.

The C++ side declares the same tensor names in patches/0001 (LLM_TENSOR_LAYER_ROUTER,
LLM_TENSOR_LAYER_BYPASS_DOWN, LLM_TENSOR_LAYER_BYPASS_UP).
"""
from __future__ import annotations

# router definition shared by the runtime (cpp/first.h) and training
ROUTER_DEFINITION = (
    "input=attn_norm(h_in): the block input, RMS-normalised and scaled by the block's attn_norm.weight; "
    "score=sigmoid(router.weight . input + router.bias) per prompt token; "
    "aggregate=mean over prompt tokens; skip=lowest aggregated scores first"
)
ROUTER_DEFINITION_VERSION = 1

# bypass adapter definition shared by the runtime (cpp/llama-first-graph.cpp) and training
BYPASS_DEFINITION = (
    "skipped block: h_out = h + up @ (down @ rmsnorm(h)); rmsnorm without weight, eps = the model's "
    "layer_norm_rms_epsilon; down [rank, n_embd], up [n_embd, rank] (numpy shapes); a block that runs is unchanged"
)


class Keys:
    """GGUF metadata keys written by first-gguf."""

    VERSION = "first.version"                        # uint32, format version of the first.* keys
    ROUTER_DEFINITION = "first.router.definition"    # string, ROUTER_DEFINITION
    ROUTER_N_OUT = "first.router.n_out"              # uint32, router outputs (1)
    ROUTER_SOURCE = "first.router.source"            # string, JSON provenance of the routers
    BYPASS_DEFINITION = "first.bypass.definition"    # string, BYPASS_DEFINITION
    BYPASS_RANK = "first.bypass.rank"                # uint32, rank of every bypass
    BYPASS_SOURCE = "first.bypass.source"            # string, JSON provenance of the bypasses
    STATIC_RANKINGS = "first.static_rankings"        # string array, names of stored rankings, default first
    STATIC_RANKING = "first.static_ranking.{name}"   # int32 array, block indices, most skippable first
    STATIC_RANKING_SOURCE = "first.static_ranking.{name}.source"  # string, JSON provenance
    BASE_FINGERPRINT = "first.base.fingerprint"      # string, JSON: the model a sidecar belongs to

    PREFIX = "first."


class Tensors:
    """Per-block tensor names (GGUF names, llama.cpp's ``blk.N.*`` scheme)."""

    ROUTER_WEIGHT = "blk.{bid}.router.weight"  # F32, GGUF shape [n_embd, 1]
    ROUTER_BIAS = "blk.{bid}.router.bias"      # F32, GGUF shape [1]
    BYPASS_DOWN = "blk.{bid}.bypass.down.weight"  # F32/F16, GGUF shape [n_embd, rank]
    BYPASS_UP = "blk.{bid}.bypass.up.weight"      # F32/F16, GGUF shape [rank, n_embd]

    @staticmethod
    def is_router_tensor(name: str) -> bool:
        return name.startswith("blk.") and ".router." in name

    @staticmethod
    def is_bypass_tensor(name: str) -> bool:
        return name.startswith("blk.") and ".bypass." in name

    @staticmethod
    def is_first_tensor(name: str) -> bool:
        return Tensors.is_router_tensor(name) or Tensors.is_bypass_tensor(name)


FORMAT_VERSION = 1

# adapter.type of a sidecar GGUF (general.type = "adapter"): first-gguf data for an untouched base GGUF
SIDECAR_ADAPTER_TYPE = "first-gguf"

# The GGUF architectures whose graph builder honours skip masks are listed once, on the C side
# (cpp/llama-first.cpp): first_gguf._lib.supported_architectures().
