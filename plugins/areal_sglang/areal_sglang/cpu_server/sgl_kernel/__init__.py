"""A stand-in for SGLang's ``sgl_kernel`` extension in an SGLang server running on the CPU.

On this folder's path only in the SGLang server process that areal launches in CPU mode.

Why: with its CPU engine, SGLang 0.5.23 imports these names from ``sgl_kernel`` at module level
(KV-cache moves, request-to-token allocation, speculative-decoding trees). The real extension is
built only from source and only for Intel AMX CPUs; without it those imports fail and the server
cannot start.

Why this changes nothing SGLang computes: on a CPU without AMX SGLang itself takes its native
torch paths (the ``torch_native`` attention and LoRA backends, the custom ops' ``forward_native``),
and areal starts it with no speculative decoding, so none of these functions is called on the
path used. Each raises ``NotImplementedError`` if it ever is, so a change of path fails loudly
instead of computing something else. The module registers no ``torch.ops.sgl_kernel`` operators,
so SGLang's own probe for the AMX backend still answers "not available".
"""

_IMPORTED_AT_MODULE_LEVEL = (
    # sglang.srt.mem_cache.allocation
    "assign_req_to_token_pool_cpu",
    # sglang.kernels.ops.kvcache.cache_move
    "copy_all_layer_kv_cache_cpu",
    # sglang.kernels.ops.speculative (EAGLE draft trees and their cache locations)
    "assign_extend_cache_locs_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "build_tree_kernel_efficient_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "verify_tree_greedy_cpu",
)


def _not_available(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} was called, but this server runs with areal's stand-in for "
            f"sgl_kernel (no AMX kernels on this CPU); SGLang took a path areal does not support"
        )

    kernel.__name__ = kernel.__qualname__ = name
    return kernel


for _name in _IMPORTED_AT_MODULE_LEVEL:
    globals()[_name] = _not_available(_name)
del _name
