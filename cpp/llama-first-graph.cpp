// first-gguf: the graph side of layer skipping, as llm_graph_context hooks
// called from the llama builder (src/models/llama.cpp).
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

bool llm_graph_context::build_first_skip(ggml_tensor *& inpL, ggml_tensor * inp_out_ids, const llama_layer & layer, int il) const {
    if (first.layer(il) != FIRST_LAYER_SKIP) {
        return false;
    }
    // the last block reduces the rows to the output tokens; do it here instead
    if (il == n_layer - 1 && inp_out_ids) {
        inpL = ggml_get_rows(ctx0, inpL, inp_out_ids);
    }
    inpL = first_bypass(ctx0, inpL, layer, norm_rms_eps, first.bypass);
    cb(inpL, "first_skip", il);
    return true;
}

void llm_graph_context::build_first_route(ggml_tensor * cur, ggml_tensor * router, ggml_tensor * router_b, int il) const {
    if (!first.score || !router) {
        return;
    }
    ggml_tensor * s = ggml_mul_mat(ctx0, router, cur); // [1, n_tokens]
    if (router_b) {
        s = ggml_add(ctx0, s, router_b);
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

ggml_tensor * llm_graph_context::build_first_mix(ggml_tensor * cur, ggml_tensor * inpL, ggml_tensor * inp_out_ids,
                                                const llama_layer & layer, int il) const {
    if (first.layer(il) != FIRST_LAYER_MIXED) {
        return cur;
    }
    auto inp = std::make_unique<first_input_keep>(first.state, il);
    inp->keep = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, 1, n_tokens);
    ggml_set_input(inp->keep);
    ggml_tensor * keep = inp->keep;
    res->add_input(std::move(inp));

    if (il == n_layer - 1 && inp_out_ids) {
        inpL = ggml_get_rows(ctx0, inpL, inp_out_ids);
        keep = ggml_get_rows(ctx0, keep, inp_out_ids);
    }
    // cur*1 + pass*0 == cur and cur*0 + pass*1 == pass exactly: a token's result
    // does not depend on whether other tokens of the ubatch skip the block
    ggml_tensor * pass = first_bypass(ctx0, inpL, layer, norm_rms_eps, first.bypass);
    ggml_tensor * drop = ggml_scale_bias(ctx0, keep, -1.0f, 1.0f);
    cur = ggml_add(ctx0, ggml_mul(ctx0, cur, keep), ggml_mul(ctx0, pass, drop));
    cb(cur, "first_mix", il);
    return cur;
}
