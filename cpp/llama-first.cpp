// first-gguf: per-context skip state, graph plans, router score collection and
// the C API of first.h. Compiled into libllama (see CMakeLists.txt).
#include "first.h"
#include "llama-first.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-model.h"
#include "llama-model-loader.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "gguf.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <cstdio>
#include <stdexcept>

struct first_seq {
    std::vector<uint8_t>   mask;    // per block, 1 = skip; empty = no mask
    bool                   routing = false;
    std::vector<llama_pos> pos;     // positions of scored tokens
    std::vector<float>     scores;  // [n_tokens][n_layer]
};

struct first_state {
    const llama_model * model = nullptr;
    int32_t n_layer   = 0;
    int32_t n_routers  = 0;
    int32_t n_bypasses = 0;
    bool    supported  = false;
    bool    bypass     = true;  // apply bypass adapters to skipped blocks (first_set_bypass)

    std::vector<first_seq> seqs = std::vector<first_seq>(LLAMA_MAX_SEQ);

    // token i of the ubatch skips block il when every sequence it belongs to masks il
    bool token_skips(const llama_ubatch & ubatch, uint32_t i, int il) const {
        for (int32_t j = 0; j < ubatch.n_seq_id[i]; ++j) {
            const auto & mask = seqs[ubatch.seq_id[i][j]].mask;
            if (mask.empty() || !mask[il]) {
                return false;
            }
        }
        return ubatch.n_seq_id[i] > 0;
    }
};

// The architectures whose graph builder calls the build_first_* hooks (patches/0002): the one list,
// read by Python through first_supported_archs.
static const llm_arch FIRST_ARCHS[] = {
    LLM_ARCH_LLAMA,
    LLM_ARCH_LLAMA_EMBED,
    LLM_ARCH_QWEN2,
    LLM_ARCH_QWEN3,
    LLM_ARCH_GEMMA3,
};

static bool first_arch_supported(llm_arch arch) {
    return std::find(std::begin(FIRST_ARCHS), std::end(FIRST_ARCHS), arch) != std::end(FIRST_ARCHS);
}

// "llama, llama-embed, ..." (GGUF names)
static std::string first_archs_list(const char * sep) {
    std::string out;
    for (llm_arch arch : FIRST_ARCHS) {
        out += out.empty() ? "" : sep;
        out += llm_arch_name(arch);
    }
    return out;
}

static std::string first_unsupported_msg(llm_arch arch) {
    return format("the model's architecture '%s' has no layer-skip support (supported: %s)", llm_arch_name(arch),
            first_archs_list(", ").c_str());
}

static int32_t first_count_routers(const llama_model & model) {
    int32_t n = 0;
    for (const auto & layer : model.layers) {
        n += layer.router != nullptr;
    }
    return n;
}

static int32_t first_count_bypasses(const llama_model & model) {
    int32_t n = 0;
    for (const auto & layer : model.layers) {
        n += layer.bypass_down != nullptr && layer.bypass_up != nullptr;
    }
    return n;
}

std::shared_ptr<first_state> first_state_make(const llama_model & model) {
    auto state = std::make_shared<first_state>();
    state->model     = &model;
    state->n_layer   = (int32_t) model.hparams.n_layer();
    state->n_routers  = first_count_routers(model);
    state->n_bypasses = first_count_bypasses(model);
    state->supported  = first_arch_supported(model.arch);
    return state;
}

const llama_layer & first_state_layer(const first_state & state, int il) {
    GGML_ASSERT(state.model && il >= 0 && il < state.n_layer);
    return state.model->layers[il];
}

first_plan first_make_plan(const first_state & state, const llama_ubatch & ubatch) {
    first_plan plan;
    plan.state = &state;
    if (!state.supported || ubatch.n_tokens == 0 || !ubatch.seq_id) {
        return plan;
    }

    bool any_mask = false;
    bool routing  = false;
    for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
        for (int32_t j = 0; j < ubatch.n_seq_id[i]; ++j) {
            const auto & seq = state.seqs[ubatch.seq_id[i][j]];
            any_mask |= !seq.mask.empty();
            routing  |= seq.routing;
        }
    }
    plan.score = routing && state.n_routers > 0;
    if (!any_mask) {
        return plan;
    }

    plan.mode.assign(state.n_layer, FIRST_LAYER_KEEP);
    bool any_skip = false;
    for (int il = 0; il < state.n_layer; ++il) {
        uint32_t n_skip = 0;
        for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
            n_skip += state.token_skips(ubatch, i, il);
        }
        if (n_skip == ubatch.n_tokens) {
            plan.mode[il] = FIRST_LAYER_SKIP;
        } else if (n_skip > 0) {
            plan.mode[il] = FIRST_LAYER_MIXED;
        }
        any_skip |= n_skip > 0;
    }
    if (!any_skip) {
        plan.mode.clear(); // identical to the stock graph
    }
    plan.bypass = any_skip && state.bypass && state.n_bypasses > 0;
    return plan;
}

first_plan first_make_reserve_plan(const first_state & state) {
    first_plan plan;
    plan.state = &state;
    plan.score = state.supported && state.n_routers > 0;
    return plan;
}

void first_fill_keep(const first_state & state, const llama_ubatch & ubatch, int il, float * keep) {
    for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
        keep[i] = state.token_skips(ubatch, i, il) ? 0.0f : 1.0f;
    }
}

void first_collect_scores(first_state & state, ggml_backend_sched * sched, const llm_graph_result & res, const llama_ubatch & ubatch) {
    if (res.t_first_score.empty()) {
        return;
    }
    const uint32_t n_tokens = ubatch.n_tokens;
    const int32_t  n_layer  = state.n_layer;

    // [n_layer][n_tokens], NaN where no score was computed
    std::vector<float> buf((size_t) n_layer * n_tokens, NAN);
    ggml_backend_sched_synchronize(sched);
    for (int il = 0; il < n_layer && il < (int) res.t_first_score.size(); ++il) {
        const ggml_tensor * t = res.t_first_score[il];
        if (t) {
            GGML_ASSERT(ggml_nelements(t) == (int64_t) n_tokens);
            ggml_backend_tensor_get(t, buf.data() + (size_t) il * n_tokens, 0, n_tokens * sizeof(float));
        }
    }

    for (uint32_t i = 0; i < n_tokens; ++i) {
        for (int32_t j = 0; j < ubatch.n_seq_id[i]; ++j) {
            auto & seq = state.seqs[ubatch.seq_id[i][j]];
            if (!seq.routing) {
                continue;
            }
            seq.pos.push_back(ubatch.pos[i]);
            for (int il = 0; il < n_layer; ++il) {
                seq.scores.push_back(buf[(size_t) il * n_tokens + i]);
            }
        }
    }
}

// a block's router tensors as loaded (their shapes were checked by create_tensor)
static void first_check_router(const ggml_tensor * router, const ggml_tensor * router_b, int il) {
    if (router_b && !router) {
        throw std::runtime_error(format("first-gguf: tensor 'blk.%d.router.bias' has no matching 'blk.%d.router.weight'", il, il));
    }
    if (router && router->type != GGML_TYPE_F32) {
        throw std::runtime_error(format("first-gguf: tensor 'blk.%d.router.weight' has wrong type; expected f32, got %s",
                il, ggml_type_name(router->type)));
    }
    if (router_b && router_b->type != GGML_TYPE_F32) {
        throw std::runtime_error(format("first-gguf: tensor 'blk.%d.router.bias' has wrong type; expected f32, got %s",
                il, ggml_type_name(router_b->type)));
    }
}

// rank of a block's bypass adapter from its down tensor ([n_embd, rank], F32 or F16), 0 if absent;
// throws with the tensor's name on a wrong shape or type (the up tensor is then required with [rank, n_embd])
static int64_t first_bypass_rank(const llama_model_loader & ml, const std::string & down_name, int64_t n_embd) {
    const ggml_tensor * down = ml.get_tensor_meta(down_name.c_str());
    if (!down) {
        return 0;
    }
    if (down->type != GGML_TYPE_F32 && down->type != GGML_TYPE_F16) {
        throw std::runtime_error(format("first-gguf: tensor '%s' has wrong type; expected f32 or f16, got %s",
                down_name.c_str(), ggml_type_name(down->type)));
    }
    if (ggml_n_dims(down) != 2 || down->ne[0] != n_embd || down->ne[1] < 1 || down->ne[1] > n_embd) {
        throw std::runtime_error(format("first-gguf: tensor '%s' has wrong shape; expected [%lld, rank] with "
                "1 <= rank <= %lld, got [%lld, %lld, %lld, %lld]", down_name.c_str(), (long long) n_embd,
                (long long) n_embd, (long long) down->ne[0], (long long) down->ne[1], (long long) down->ne[2],
                (long long) down->ne[3]));
    }
    return down->ne[1];
}

void first_load_tensors(llama_model_base & model, llama_model_loader & ml) {
    const int     n_layer = (int) model.hparams.n_layer();
    const int64_t n_embd  = model.hparams.n_embd;
    const auto  & tn      = model.tn;
    const int     TENSOR_NOT_REQUIRED = llama_model_loader::TENSOR_NOT_REQUIRED;

    if (!first_arch_supported(model.arch)) {
        // the builder would ignore them (and the loader would only count them as unused): say what they are
        for (int il = 0; il < n_layer; ++il) {
            for (const std::string name : { tn(LLM_TENSOR_LAYER_ROUTER, "weight", il).str(),
                                            tn(LLM_TENSOR_LAYER_ROUTER, "bias", il).str(),
                                            tn(LLM_TENSOR_LAYER_BYPASS_DOWN, "weight", il).str(),
                                            tn(LLM_TENSOR_LAYER_BYPASS_UP, "weight", il).str() }) {
                if (ml.get_tensor_meta(name.c_str())) {
                    throw std::runtime_error(format("first-gguf: the file carries tensor '%s', but %s; remove the "
                            "first-gguf data with first-gguf strip", name.c_str(), first_unsupported_msg(model.arch).c_str()));
                }
            }
        }
        return;
    }

    for (int il = 0; il < n_layer; ++il) {
        auto & layer = model.layers[il];

        // optional layer-skip router
        layer.router   = model.create_tensor(tn(LLM_TENSOR_LAYER_ROUTER, "weight", il), {n_embd, 1}, TENSOR_NOT_REQUIRED);
        layer.router_b = model.create_tensor(tn(LLM_TENSOR_LAYER_ROUTER, "bias",   il), {1},         TENSOR_NOT_REQUIRED);
        first_check_router(layer.router, layer.router_b, il);

        // optional bypass adapter of a skipped block (its rank is read from the file)
        if (const int64_t n_rank = first_bypass_rank(ml, tn(LLM_TENSOR_LAYER_BYPASS_DOWN, "weight", il).str(), n_embd)) {
            layer.bypass_down = model.create_tensor(tn(LLM_TENSOR_LAYER_BYPASS_DOWN, "weight", il), {n_embd, n_rank}, 0);
            layer.bypass_up   = model.create_tensor(tn(LLM_TENSOR_LAYER_BYPASS_UP,   "weight", il), {n_rank, n_embd}, 0);
        }
    }
}

//
// sidecar GGUF: routers and bypasses for a model loaded from an untouched file
//

struct first_sidecar {
    ggml_context_ptr        ctx; // tensor descriptors (no data)
    ggml_backend_buffer_ptr buf; // their data, in the model's buffer type
};

// the tensors a sidecar may hold, per block
struct first_sidecar_layer {
    ggml_tensor * router   = nullptr;
    ggml_tensor * router_b = nullptr;
    ggml_tensor * down     = nullptr;
    ggml_tensor * up       = nullptr;
};

static std::string first_shape(const ggml_tensor * t) {
    return format("[%lld, %lld, %lld, %lld]", (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2],
            (long long) t->ne[3]);
}

// parse "blk.N.<kind>" with kind one of the sidecar tensors; returns the slot or nullptr
static ggml_tensor ** first_sidecar_slot(std::vector<first_sidecar_layer> & layers, const char * name) {
    int bid = -1;
    int n   = 0;
    if (std::sscanf(name, "blk.%d.%n", &bid, &n) != 1 || n == 0 || bid < 0 || bid >= (int) layers.size()) {
        return nullptr;
    }
    const std::string kind = name + n;
    auto & l = layers[bid];
    if (kind == "router.weight")      { return &l.router;   }
    if (kind == "router.bias")        { return &l.router_b; }
    if (kind == "bypass.down.weight") { return &l.down;     }
    if (kind == "bypass.up.weight")   { return &l.up;       }
    return nullptr;
}

static std::shared_ptr<first_sidecar> first_load_sidecar(const llama_model & model, const char * path,
        std::vector<first_sidecar_layer> & layers) {
    const int64_t n_embd  = model.hparams.n_embd;
    const int     n_layer = (int) model.hparams.n_layer();
    if (!first_arch_supported(model.arch)) {
        throw std::runtime_error(first_unsupported_msg(model.arch));
    }
    for (const auto & layer : model.layers) {
        if (layer.router || layer.router_b || layer.bypass_down || layer.bypass_up) {
            throw std::runtime_error("the model file already carries first-gguf tensors; load the base GGUF "
                    "without them (first-gguf strip) to use a sidecar");
        }
    }

    ggml_context * meta = nullptr;
    gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ &meta };
    gguf_context_ptr gctx { gguf_init_from_file(path, params) };
    if (!gctx) {
        throw std::runtime_error("not a readable GGUF file");
    }
    auto sidecar = std::make_shared<first_sidecar>();
    sidecar->ctx.reset(meta);

    auto get_str = [&](const char * key) -> std::string {
        const int64_t i = gguf_find_key(gctx.get(), key);
        return i >= 0 && gguf_get_kv_type(gctx.get(), i) == GGUF_TYPE_STRING ? gguf_get_val_str(gctx.get(), i) : "";
    };
    if (get_str("general.type") != "adapter" || get_str("adapter.type") != "first-gguf") {
        throw std::runtime_error(format("not a first-gguf sidecar (general.type '%s', adapter.type '%s'; expected "
                "'adapter' and 'first-gguf')", get_str("general.type").c_str(), get_str("adapter.type").c_str()));
    }
    const std::string arch = get_str("general.architecture");
    if (arch != llm_arch_name(model.arch)) {
        throw std::runtime_error(format("made for architecture '%s'; the model is '%s'", arch.c_str(),
                llm_arch_name(model.arch)));
    }

    layers.assign(n_layer, {});
    for (ggml_tensor * t = ggml_get_first_tensor(meta); t; t = ggml_get_next_tensor(meta, t)) {
        ggml_tensor ** slot = first_sidecar_slot(layers, ggml_get_name(t));
        if (!slot) {
            throw std::runtime_error(format("unexpected tensor '%s' (expected blk.N.router.weight/bias or "
                    "blk.N.bypass.down/up.weight with N < %d)", ggml_get_name(t), n_layer));
        }
        *slot = t;
    }
    int64_t rank = 0;
    int n_tensors = 0;
    for (int il = 0; il < n_layer; ++il) {
        const auto & l = layers[il];
        if (l.router_b && !l.router) {
            throw std::runtime_error(format("tensor 'blk.%d.router.bias' has no matching 'blk.%d.router.weight'", il, il));
        }
        if (l.router && (l.router->type != GGML_TYPE_F32 || l.router->ne[0] != n_embd || ggml_nelements(l.router) != n_embd)) {
            throw std::runtime_error(format("tensor 'blk.%d.router.weight' must be f32 [%lld, 1]; got %s %s", il,
                    (long long) n_embd, ggml_type_name(l.router->type), first_shape(l.router).c_str()));
        }
        if (l.router_b && (l.router_b->type != GGML_TYPE_F32 || ggml_nelements(l.router_b) != 1)) {
            throw std::runtime_error(format("tensor 'blk.%d.router.bias' must be f32 [1]; got %s %s", il,
                    ggml_type_name(l.router_b->type), first_shape(l.router_b).c_str()));
        }
        if (!l.down != !l.up) {
            throw std::runtime_error(format("block %d has a bypass %s tensor but no %s tensor", il,
                    l.down ? "down" : "up", l.down ? "up" : "down"));
        }
        if (l.down) {
            const int64_t r = l.down->ne[1];
            const bool types = (l.down->type == GGML_TYPE_F32 || l.down->type == GGML_TYPE_F16) && l.up->type == l.down->type;
            if (!types || ggml_n_dims(l.down) != 2 || l.down->ne[0] != n_embd || r < 1 || r > n_embd ||
                    ggml_n_dims(l.up) != 2 || l.up->ne[0] != r || l.up->ne[1] != n_embd) {
                throw std::runtime_error(format("bypass of block %d must be f32 or f16 down [%lld, rank] and up [rank, "
                        "%lld]; got %s %s and %s %s", il, (long long) n_embd, (long long) n_embd,
                        ggml_type_name(l.down->type), first_shape(l.down).c_str(), ggml_type_name(l.up->type),
                        first_shape(l.up).c_str()));
            }
            if (rank && r != rank) {
                throw std::runtime_error(format("bypasses of different ranks (%lld and %lld)", (long long) rank, (long long) r));
            }
            rank = r;
        }
        n_tensors += (l.router != nullptr) + (l.router_b != nullptr) + 2 * (l.down != nullptr);
    }
    if (n_tensors == 0) {
        throw std::runtime_error("holds no router or bypass tensor");
    }

    // the data, in the buffer type of the model's own block weights (CPU here; a GPU buffer where the model is)
    ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
    if (!model.layers.empty() && model.layers[0].attn_norm && model.layers[0].attn_norm->buffer) {
        buft = ggml_backend_buffer_get_type(model.layers[0].attn_norm->buffer);
    }
    sidecar->buf.reset(ggml_backend_alloc_ctx_tensors_from_buft(meta, buft));
    if (!sidecar->buf) {
        throw std::runtime_error("could not allocate the tensors' buffer");
    }
    std::unique_ptr<FILE, decltype(&std::fclose)> f(std::fopen(path, "rb"), &std::fclose);
    if (!f) {
        throw std::runtime_error("cannot open the file for reading");
    }
    std::vector<uint8_t> data;
    for (ggml_tensor * t = ggml_get_first_tensor(meta); t; t = ggml_get_next_tensor(meta, t)) {
        const int64_t ti = gguf_find_tensor(gctx.get(), ggml_get_name(t));
        const size_t offs = gguf_get_data_offset(gctx.get()) + gguf_get_tensor_offset(gctx.get(), ti);
        data.resize(ggml_nbytes(t));
        if (std::fseek(f.get(), (long) offs, SEEK_SET) != 0 || std::fread(data.data(), 1, data.size(), f.get()) != data.size()) {
            throw std::runtime_error(format("tensor '%s' is cut short (the file is truncated)", ggml_get_name(t)));
        }
        ggml_backend_tensor_set(t, data.data(), 0, data.size());
    }
    return sidecar;
}

//
// C API
//

int32_t first_model_attach_sidecar(llama_model * model, const char * path, char * err, size_t err_size) {
    std::vector<first_sidecar_layer> layers;
    try {
        auto sidecar = first_load_sidecar(*model, path, layers);
        for (size_t il = 0; il < layers.size(); ++il) { // everything checked and read: apply all at once
            auto & dst = model->layers[il];
            dst.router      = layers[il].router;
            dst.router_b    = layers[il].router_b;
            dst.bypass_down = layers[il].down;
            dst.bypass_up   = layers[il].up;
        }
        model->first_sidecar = std::move(sidecar);
        return FIRST_OK;
    } catch (const std::exception & e) {
        if (err && err_size > 0) {
            std::snprintf(err, err_size, "%s: %s", path, e.what());
        }
        return FIRST_ERR_SIDECAR;
    }
}

static first_seq * first_get_seq(const llama_context * ctx, llama_seq_id seq_id) {
    if (seq_id < 0 || (uint32_t) seq_id >= ctx->n_seq_max()) {
        return nullptr;
    }
    return &ctx->first->seqs[seq_id];
}

int32_t first_model_supports_skip(const llama_model * model) {
    return first_arch_supported(model->arch) ? 1 : 0;
}

int32_t first_supported_archs(char * buf, size_t size) {
    const std::string list = first_archs_list(",");
    if (buf && size > 0) {
        std::snprintf(buf, size, "%s", list.c_str());
    }
    return (int32_t) list.size();
}

int32_t first_model_n_routers(const llama_model * model) {
    return first_count_routers(*model);
}

int32_t first_set_skip_mask(llama_context * ctx, llama_seq_id seq_id, const uint8_t * mask, int32_t n) {
    first_seq * seq = first_get_seq(ctx, seq_id);
    if (!seq) {
        return FIRST_ERR_SEQ_ID;
    }
    if (!mask || n == 0) {
        seq->mask.clear();
        return FIRST_OK;
    }
    const auto & state = *ctx->first;
    if (!state.supported) {
        return FIRST_ERR_UNSUPPORTED;
    }
    if (n != state.n_layer) {
        return FIRST_ERR_MASK_SIZE;
    }
    int32_t n_skip = 0;
    for (int32_t il = 0; il < n; ++il) {
        n_skip += mask[il] != 0;
    }
    if (n_skip == n) {
        return FIRST_ERR_MASK_ALL;
    }
    if (n_skip == 0) {
        seq->mask.clear();
        return FIRST_OK;
    }
    seq->mask.assign(n, 0);
    for (int32_t il = 0; il < n; ++il) {
        seq->mask[il] = mask[il] != 0;
    }
    return FIRST_OK;
}

int32_t first_get_skip_mask(const llama_context * ctx, llama_seq_id seq_id, uint8_t * mask, int32_t n) {
    const first_seq * seq = first_get_seq(ctx, seq_id);
    if (!seq) {
        return FIRST_ERR_SEQ_ID;
    }
    if (n < ctx->first->n_layer) {
        return FIRST_ERR_BUFFER;
    }
    for (int32_t il = 0; il < ctx->first->n_layer; ++il) {
        mask[il] = seq->mask.empty() ? 0 : seq->mask[il];
    }
    return FIRST_OK;
}

int32_t first_set_routing(llama_context * ctx, llama_seq_id seq_id, bool enable) {
    first_seq * seq = first_get_seq(ctx, seq_id);
    if (!seq) {
        return FIRST_ERR_SEQ_ID;
    }
    if (enable && !ctx->first->supported) {
        return FIRST_ERR_UNSUPPORTED;
    }
    if (enable && ctx->first->n_routers == 0) {
        return FIRST_ERR_NO_ROUTERS;
    }
    seq->routing = enable;
    return FIRST_OK;
}

int32_t first_model_n_bypasses(const llama_model * model) {
    return first_count_bypasses(*model);
}

int32_t first_set_bypass(llama_context * ctx, bool enable) {
    if (!ctx->first->supported) {
        return FIRST_ERR_UNSUPPORTED;
    }
    ctx->first->bypass = enable;
    return FIRST_OK;
}

bool first_get_bypass(const llama_context * ctx) {
    return ctx->first->bypass;
}

int32_t first_get_router_n_tokens(const llama_context * ctx, llama_seq_id seq_id) {
    const first_seq * seq = first_get_seq(ctx, seq_id);
    return seq ? (int32_t) seq->pos.size() : FIRST_ERR_SEQ_ID;
}

int32_t first_get_router_scores(const llama_context * ctx, llama_seq_id seq_id, float * scores, llama_pos * pos, int32_t n_tokens) {
    const first_seq * seq = first_get_seq(ctx, seq_id);
    if (!seq) {
        return FIRST_ERR_SEQ_ID;
    }
    const int32_t n = (int32_t) seq->pos.size();
    if (n_tokens < n) {
        return FIRST_ERR_BUFFER;
    }
    std::copy(seq->scores.begin(), seq->scores.end(), scores);
    if (pos) {
        std::copy(seq->pos.begin(), seq->pos.end(), pos);
    }
    return n;
}

void first_clear_router_scores(llama_context * ctx, llama_seq_id seq_id) {
    for (llama_seq_id s = 0; s < (llama_seq_id) ctx->n_seq_max(); ++s) {
        if (seq_id < 0 || s == seq_id) {
            ctx->first->seqs[s].pos.clear();
            ctx->first->seqs[s].scores.clear();
        }
    }
}

void first_set_layer_inp_output(llama_context * ctx, int32_t il, bool enable) {
    llama_set_embeddings_layer_inp(ctx, (uint32_t) il, enable);
}

float * first_get_layer_inp(llama_context * ctx, int32_t il) {
    return llama_get_embeddings_layer_inp(ctx, (uint32_t) il);
}
