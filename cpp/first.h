// first-gguf C API: prompt-decided layer skipping for llama.cpp (FiRST).
//
// Compiled into libllama by first-gguf's CMakeLists.txt, next to the llama.cpp
// API. All functions are thread-compatible like the rest of llama_context:
// do not call them concurrently with llama_decode on the same context.
//
// Router definition (the training code uses exactly this):
//   x_t     = RMSNorm(h_t) * attn_norm.weight   block input h_t of prompt token t,
//                                               normalised as the block itself does
//   s_t     = sigmoid(router.weight . x_t + router.bias)      keep-score in (0, 1)
//   score   = mean over the prompt tokens of s_t              one score per block
// A low score means the block may be skipped. Tensors:
//   blk.N.router.weight  F32 [n_embd, 1]
//   blk.N.router.bias    F32 [1]            (optional)
//
// Skip semantics: while a sequence has a skip mask, its tokens bypass the
// masked blocks: the residual stream passes through unchanged, or, when the
// model carries a bypass adapter for the block (and bypasses are enabled),
//   h_out = h + up @ (down @ RMSNorm(h))     RMSNorm without weight, model eps
//   blk.N.bypass.down.weight  F32/F16 [n_embd, rank]
//   blk.N.bypass.up.weight    F32/F16 [rank, n_embd]
// A block that runs never uses its bypass: full depth is unchanged. Their K/V for
// those blocks are NOT written: cells of skipped tokens hold stale data in the
// masked layers. The sequence itself never reads them while the mask stays
// set, but before evaluating those positions at full depth again (continuing a
// conversation), remove them with llama_memory_seq_rm and re-evaluate them.
#pragma once

#include "llama.h"

#include <stdbool.h>
#include <stdint.h>

#define FIRST_API LLAMA_API

#ifdef __cplusplus
extern "C" {
#endif

// return codes
#define FIRST_OK                  0
#define FIRST_ERR_UNSUPPORTED    -1 // the model's architecture has no layer-skip support
#define FIRST_ERR_SEQ_ID         -2 // seq_id out of [0, n_seq_max)
#define FIRST_ERR_MASK_SIZE      -3 // mask length differs from the number of blocks
#define FIRST_ERR_MASK_ALL       -4 // the mask would skip every block
#define FIRST_ERR_NO_ROUTERS     -5 // routing asked for on a model without router tensors
#define FIRST_ERR_BUFFER         -6 // output buffer too small
#define FIRST_ERR_SIDECAR        -7 // the sidecar file is unreadable or does not fit the model (see err)

// 1 if the model's graph builder honours skip masks (an architecture of first_supported_archs), else 0
FIRST_API int32_t first_model_supports_skip(const struct llama_model * model);

// The GGUF names (general.architecture) of the architectures whose graph builder honours skip
// masks, comma-separated ("llama,llama-embed,..."), written like snprintf into buf[size] (may be
// NULL with size 0). Returns the length of the whole list, without the terminating NUL.
FIRST_API int32_t first_supported_archs(char * buf, size_t size);

// number of blocks that carry a router tensor
FIRST_API int32_t first_model_n_routers(const struct llama_model * model);

// number of blocks that carry a bypass adapter
FIRST_API int32_t first_model_n_bypasses(const struct llama_model * model);

// Attach a first-gguf sidecar GGUF (general.type = "adapter", adapter.type =
// "first-gguf") to a loaded model: its blk.N.router.{weight,bias} and
// blk.N.bypass.{down,up}.weight tensors are read into a buffer of the model's
// own buffer type and used as if the model file held them; the model file is
// not touched. Call before creating any context of the model. Everything is
// checked before anything is applied (architecture, block indices, shapes,
// types, one bypass rank; a model that already carries first-gguf tensors is
// refused): on error nothing changes and err (when not NULL) holds one line.
// The memory is released with the model.
FIRST_API int32_t first_model_attach_sidecar(
        struct llama_model * model,
        const char         * path,
        char               * err,
        size_t               err_size);

// Apply bypass adapters to skipped blocks (default: enabled), for every
// sequence of the context. Takes effect from the next llama_decode.
FIRST_API int32_t first_set_bypass(struct llama_context * ctx, bool enable);
FIRST_API bool    first_get_bypass(const struct llama_context * ctx);

// Set the skip mask of a sequence: mask[il] != 0 skips block il.
// mask == NULL or n == 0 clears it. Takes effect from the next llama_decode.
FIRST_API int32_t first_set_skip_mask(
        struct llama_context * ctx,
        llama_seq_id           seq_id,
        const uint8_t        * mask,
        int32_t                n);

// Write the current mask of a sequence into mask[n] (all zero when unset).
FIRST_API int32_t first_get_skip_mask(
        const struct llama_context * ctx,
        llama_seq_id                 seq_id,
        uint8_t                    * mask,
        int32_t                      n);

// Enable or disable router scoring for the tokens of a sequence. While
// enabled, every llama_decode stores one keep-score per block for each token
// of the sequence (see first_get_router_scores).
FIRST_API int32_t first_set_routing(struct llama_context * ctx, llama_seq_id seq_id, bool enable);

// number of tokens with stored router scores for a sequence
FIRST_API int32_t first_get_router_n_tokens(const struct llama_context * ctx, llama_seq_id seq_id);

// Copy the stored per-token scores: scores is F32 [n_tokens][n_layer] (row per
// token, NaN for blocks without a router or skipped while scoring), pos[n_tokens]
// their positions (may be NULL). Returns the number of tokens copied or an error.
FIRST_API int32_t first_get_router_scores(
        const struct llama_context * ctx,
        llama_seq_id                 seq_id,
        float                      * scores,
        llama_pos                  * pos,
        int32_t                      n_tokens);

// Drop the stored scores of a sequence (seq_id < 0: all sequences).
FIRST_API void first_clear_router_scores(struct llama_context * ctx, llama_seq_id seq_id);

// Block-input hidden states of the last llama_decode, for tests and analysis:
// enable before decoding, then read F32 [n_tokens][n_embd] of block il.
FIRST_API void    first_set_layer_inp_output(struct llama_context * ctx, int32_t il, bool enable);
FIRST_API float * first_get_layer_inp(struct llama_context * ctx, int32_t il);

#ifdef __cplusplus
}
#endif
