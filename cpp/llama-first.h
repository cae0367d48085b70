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
struct llama_layer;
struct llama_model;
struct llama_model_base;
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

// the model's block il (its router, attn_norm and bypass tensors), for the graph hooks
const llama_layer & first_state_layer(const first_state & state, int il);

// plan for a real ubatch, from the masks and routing flags of its sequences
first_plan first_make_plan(const first_state & state, const llama_ubatch & ubatch);

// plan for the worst-case reserve graph: full depth, routers scored when present
first_plan first_make_reserve_plan(const first_state & state);

// after a ubatch was computed: copy the router scores of routing sequences out of the graph
void first_collect_scores(first_state & state, ggml_backend_sched * sched, const llm_graph_result & res, const llama_ubatch & ubatch);

// Load time, once for every architecture (llama_model_base::load_tensors, after the architecture's
// own tensors): the optional router (blk.N.router.{weight,bias}) and bypass (blk.N.bypass.{down,up}.weight)
// tensors of every block. On an architecture without layer-skip support a file that carries any of
// them is refused with an error naming the tensor and the supported architectures.
void first_load_tensors(llama_model_base & model, llama_model_loader & ml);

// per-token keep flag of block il for the tokens of a ubatch (1 = run the block)
void first_fill_keep(const first_state & state, const llama_ubatch & ubatch, int il, float * keep);
