// first-gguf: internal interface between the patched llama.cpp and our code.
//
// The llama.cpp patch (patches/) only calls into the declarations below; the
// definitions live in cpp/llama-first.cpp and cpp/llama-first-graph.cpp, which
// the top-level CMakeLists.txt compiles into libllama.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct ggml_tensor;
struct ggml_backend_sched;
struct llama_model;
struct llama_model_loader;
struct llama_ubatch;
class  llm_graph_result;

// per-context state: skip masks and router scores per sequence (opaque to llama.cpp)
struct first_state;

enum first_layer_mode : uint8_t {
    FIRST_LAYER_KEEP  = 0, // every token of the ubatch runs the block
    FIRST_LAYER_SKIP  = 1, // every token skips the block: it is not built at all
    FIRST_LAYER_MIXED = 2, // some tokens skip: the block runs, skipping rows pass through
};

// What the graph of one ubatch must do. Part of llm_graph_params, so that graph
// reuse compares it: two ubatches share a graph only with equal plans.
struct first_plan {
    const first_state * state = nullptr;
    bool score = false;          // evaluate the routers on this ubatch
    bool bypass = false;         // skipped blocks run their bypass adapters (when the model has them)
    std::vector<uint8_t> mode;   // first_layer_mode per block; empty = full depth

    uint8_t layer(int il) const { return mode.empty() ? (uint8_t) FIRST_LAYER_KEEP : mode[il]; }

    bool operator==(const first_plan & other) const {
        return score == other.score && bypass == other.bypass && mode == other.mode;
    }
};

std::shared_ptr<first_state> first_state_make(const llama_model & model);

// plan for a real ubatch, from the masks and routing flags of its sequences
first_plan first_make_plan(const first_state & state, const llama_ubatch & ubatch);

// plan for the worst-case reserve graph: full depth, routers scored when present
first_plan first_make_reserve_plan(const first_state & state);

// after a ubatch was computed: copy the router scores of routing sequences out of the graph
void first_collect_scores(first_state & state, ggml_backend_sched * sched, const llm_graph_result & res, const llama_ubatch & ubatch);

// load-time check of a block's router tensors (shapes are checked by create_tensor)
void first_check_router(const ggml_tensor * router, const ggml_tensor * router_b, int il);

// load-time: rank of a block's bypass adapter from its down tensor ([n_embd, rank], F32 or F16), 0 if absent;
// throws with the tensor's name on a wrong shape or type (the up tensor is then required with [rank, n_embd])
int64_t first_bypass_rank(const llama_model_loader & ml, const std::string & down_name, int64_t n_embd);

// per-token keep flag of block il for the tokens of a ubatch (1 = run the block)
void first_fill_keep(const first_state & state, const llama_ubatch & ubatch, int il, float * keep);
