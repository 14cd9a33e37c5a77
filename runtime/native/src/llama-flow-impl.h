// LoRA-Flow inside llama.cpp: the loaded adapter, a context's flow state, and the
// per-graph builder that build_lora_mm calls. See llama-flow.h for the C API.
#pragma once

#include "llama-flow.h"

#include "ggml-cpp.h"

#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

struct llama_model;
struct llama_ubatch;
class  llm_graph_result;

// One adapted base weight W (blk.N.<module>.weight): y += B (g * (A h)).
struct llama_flow_weight {
    int32_t       il;    // layer
    int32_t       group; // index into llama_flow_adapter::groups (holds A)
    int64_t       row0;  // first row of this module's A inside the group's A
    ggml_tensor * b;     // [n_rank, n_out], columns scaled by s_i
};

// Modules of a layer that read the same input (q, k, v; gate, up) share one A matmul:
// their A_cat are stacked into one [n_in, n_members * n_rank] tensor.
struct llama_flow_group {
    ggml_tensor * a;
};

struct llama_flow_adapter {
    const llama_model & model;

    int32_t k      = 0; // number of fused LoRAs
    int32_t n_rank = 0; // rank rows per module inside the runtime: k * r_max, adapter by adapter
    int32_t r_max  = 0; // the largest rank: each adapter's rows are padded to it
    float   temperature = 1.0f;

    std::vector<std::string> names;

    std::vector<ggml_tensor *> gate_w; // per layer, [n_embd, k] F32
    std::vector<float>         gate_b; // [n_layer][k], on the host: a graph input (llama_flow_mix)

    std::unordered_map<const ggml_tensor *, llama_flow_weight> weights; // keyed by base weight
    std::vector<llama_flow_group> groups;

    std::vector<ggml_context_ptr>        ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;

    explicit llama_flow_adapter(const llama_model & model) : model(model) {}

    // upper bound of graph nodes the flow adds, for llama_context::graph_max_nodes
    uint32_t n_nodes() const { return 5u*weights.size() + 5u*groups.size() + 8u*gate_w.size() + 16u; }

    size_t n_bytes() const; // of its tensors in backend buffers
};

// How one sequence's tokens are fused: the gate (dynamic), or fixed weights (static, average,
// single and off are all fixed weights: off is zeros). Data of the graph, not its shape.
struct llama_flow_mix {
    bool dynamic = true;
    std::vector<float> w; // [n_layer][k] when not dynamic
};

// What a context has set; lives in llama_context.
struct llama_flow_state {
    llama_flow_adapter * adapter = nullptr;
    llama_flow_mix       mix;                               // the context's: sequences without their own
    std::map<int32_t, llama_flow_mix> seq_mix;              // seq_id -> its own
    bool                 record  = false;
    uint32_t             gen     = 0; // bumped by every change that alters the graph

    const llama_flow_mix & mix_of(int32_t seq_id) const {
        const auto it = seq_mix.find(seq_id);
        return it == seq_mix.end() ? mix : it->second;
    }

    std::vector<std::vector<float>> gates; // recorded, per layer [n_recorded][k]
    int32_t n_recorded = 0;

    // set while a graph is built when the flow cannot be applied to it (see llama_flow_set_adapter)
    mutable std::string graph_error;

    bool active() const { return adapter != nullptr; }

    // copy the gate weights of an evaluated ubatch to the host (when recording), in batch order;
    // n_prev: tokens of this batch in earlier ubatches
    void record_ubatch(ggml_backend_sched_t sched, const llm_graph_result * res, const llama_ubatch & ubatch,
                       uint32_t n_prev, uint32_t n_tokens_all);
};

// Built once per graph; caches the per-layer gate and the shared A products.
struct llama_flow_graph {
    const llama_flow_state * state;

    explicit llama_flow_graph(const llama_flow_state * state) : state(state) {}

    // y = W cur (already computed) -> y + gated LoRA delta, when W is adapted
    ggml_tensor * apply(ggml_context * ctx0, llm_graph_result * res,
                        const ggml_tensor * w, ggml_tensor * cur, ggml_tensor * y);

    // every tensor the graph builder names (llm_graph_context::cb): finds the gate inputs
    void observe(ggml_tensor * t, const char * name, int il);

private:
    ggml_tensor * gate(ggml_context * ctx0, llm_graph_result * res, int32_t il, int64_t n_cols);
    ggml_tensor * fail(std::string msg) const;

    std::map<int32_t, ggml_tensor *> layer_inp;                      // il -> residual stream entering layer il

    ggml_tensor * mix_mask = nullptr;                                // [1, n_tokens]: 1 for gated tokens
    std::vector<ggml_tensor *> mix_add;                              // per layer [k, n_tokens]: b_l or fixed w
    std::map<int32_t, ggml_tensor *> gate_exp;                       // il -> [k, n_tokens] (or [k, 1])
    std::map<int32_t, ggml_tensor *> gate_exp_out;                   // il -> rows of the output tokens
    std::map<std::pair<int32_t, const ggml_tensor *>, ggml_tensor *> group_out; // (group, input) -> g * (A h)
};
