// first-gguf: the graph side of layer skipping, as llm_graph_context hooks called from the
// builders of the supported architectures (src/models/{llama,qwen2,qwen3,gemma3}.cpp; the list is in
// llama-first.cpp). A builder calls two hooks per block:
//   if (build_first_skip(inpL, inp_out_ids, il)) continue;   before the block, on its input
//   cur = build_first_mix(cur, il);                          on the block's output
// Everything else (routers, bypasses, the output-row selection of a skipped or mixed last block)
// is done here from the block input recorded by build_first_skip.
#include "llama-first.h"

#include "llama-graph.h"
#include "llama-model.h"

#include "ggml.h"

// per-token keep flags of one MIXED block: 1 = the token runs the block
class first_input_keep : public llm_graph_input_i {
public:
    first_input_keep(const first_state * state, int il) : state(state), il(il) {}

    void set_input(const llama_ubatch * ubatch) override {
        GGML_ASSERT(ggml_backend_buffer_is_host(keep->buffer));
        first_fill_keep(*state, *ubatch, il, (float *) keep->data);
    }

    // the topology (which blocks are MIXED) is compared through first_plan in allow_reuse
    bool can_reuse(const llm_graph_params & params) override {
        return params.first.state == state && params.first.layer(il) == FIRST_LAYER_MIXED;
    }

    ggml_tensor * keep = nullptr; // F32 [1, n_tokens]

private:
    const first_state * state;
    const int il;
};

// what a skipped block computes: h, or h + up @ (down @ rmsnorm(h)) with a bypass adapter
// (constants.BYPASS_DEFINITION; rmsnorm without weight, the model's eps)
static ggml_tensor * first_bypass(ggml_context * ctx, ggml_tensor * h, const llama_layer & layer, float eps, bool enabled) {
    if (!enabled || !layer.bypass_down || !layer.bypass_up) {
        return h;
    }
    ggml_tensor * x = ggml_rms_norm(ctx, h, eps);
    x = ggml_mul_mat(ctx, layer.bypass_down, x); // [rank, n_tokens]
    x = ggml_mul_mat(ctx, layer.bypass_up, x);   // [n_embd, n_tokens]
    return ggml_add(ctx, h, x);
}

bool llm_graph_context::build_first_skip(ggml_tensor *& inpL, ggml_tensor * inp_out_ids, int il) {
    // the block's input, for build_first_mix and for layer-input extraction (first_set_layer_inp_output)
    // in builders that do not record it themselves
    first_inp     = inpL;
    first_out_ids = inp_out_ids;
    res->t_layer_inp[il] = inpL;

    if (first.layer(il) == FIRST_LAYER_SKIP) {
        // the last block reduces the rows to the output tokens; do it here instead
        if (il == n_layer - 1 && inp_out_ids) {
            inpL = ggml_get_rows(ctx0, inpL, inp_out_ids);
        }
        inpL = first_bypass(ctx0, inpL, first_state_layer(*first.state, il), norm_rms_eps, first.bypass);
        cb(inpL, "first_skip", il);
        return true;
    }
    if (first.score) {
        build_first_route(inpL, il);
    }
    return false;
}

void llm_graph_context::build_first_route(ggml_tensor * inp, int il) {
    const llama_layer & layer = first_state_layer(*first.state, il);
    if (!layer.router) {
        return;
    }
    // the router's input by its definition (first.h): RMSNorm(h) * attn_norm.weight, which is what the
    // block computes first; built here from the block input so no builder has to hand it over
    ggml_tensor * x = build_norm(inp, layer.attn_norm, nullptr, LLM_NORM_RMS, il);
    ggml_tensor * s = ggml_mul_mat(ctx0, layer.router, x); // [1, n_tokens]
    if (layer.router_b) {
        s = ggml_add(ctx0, s, layer.router_b);
    }
    s = ggml_sigmoid(ctx0, s);
    cb(s, "first_router", il);
    ggml_set_output(s);
    ggml_build_forward_expand(gf, s);

    if (res->t_first_score.size() < (size_t) n_layer) {
        res->t_first_score.resize(n_layer, nullptr);
    }
    res->t_first_score[il] = s;
}

ggml_tensor * llm_graph_context::build_first_mix(ggml_tensor * cur, int il) {
    if (first.layer(il) != FIRST_LAYER_MIXED) {
        return cur;
    }
    auto inp = std::make_unique<first_input_keep>(first.state, il);
    inp->keep = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, 1, n_tokens);
    ggml_set_input(inp->keep);
    ggml_tensor * keep = inp->keep;
    res->add_input(std::move(inp));

    // the block's input as build_first_skip saw it: all rows, whatever the builder did to its own copy
    ggml_tensor * h = first_inp;
    GGML_ASSERT(h != nullptr && "build_first_mix without build_first_skip");
    if (il == n_layer - 1 && first_out_ids) {
        h    = ggml_get_rows(ctx0, h,    first_out_ids);
        keep = ggml_get_rows(ctx0, keep, first_out_ids);
    }
    GGML_ASSERT(h->ne[1] == cur->ne[1] && "build_first_mix: the block output and input have different rows");
    // cur*1 + pass*0 == cur and cur*0 + pass*1 == pass exactly: a token's result
    // does not depend on whether other tokens of the ubatch skip the block
    ggml_tensor * pass = first_bypass(ctx0, h, first_state_layer(*first.state, il), norm_rms_eps, first.bypass);
    ggml_tensor * drop = ggml_scale_bias(ctx0, keep, -1.0f, 1.0f);
    cur = ggml_add(ctx0, ggml_mul(ctx0, cur, keep), ggml_mul(ctx0, pass, drop));
    cb(cur, "first_mix", il);
    return cur;
}
