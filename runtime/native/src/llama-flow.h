// LoRA-Flow: per-token, per-layer dynamic fusion of k LoRAs (Wang et al., ACL 2024).
// Public C API of the loraflow patch to llama.cpp. The file format is docs/FORMAT.md;
// its key and tensor names mirror loraflow/schema.py.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

struct llama_flow_adapter;

enum llama_flow_mode {
    LLAMA_FLOW_MODE_OFF     = 0, // base model only
    LLAMA_FLOW_MODE_DYNAMIC = 1, // w_l(t) = softmax(W_l x / T) + b_l, per token and layer
    LLAMA_FLOW_MODE_STATIC  = 2, // fixed weights: k for every layer, or n_layer * k
};

// Load a LoRA-Flow GGUF for `model`. Every key, shape and type is checked against the
// model first; on failure returns NULL and writes the reason into err (if err_size > 0).
LLAMA_API struct llama_flow_adapter * llama_flow_adapter_init(
        struct llama_model * model, const char * path, char * err, size_t err_size);

LLAMA_API void llama_flow_adapter_free(struct llama_flow_adapter * adapter);

LLAMA_API int32_t      llama_flow_adapter_n_adapters(const struct llama_flow_adapter * adapter);
LLAMA_API int32_t      llama_flow_adapter_n_layer   (const struct llama_flow_adapter * adapter);
LLAMA_API const char * llama_flow_adapter_name      (const struct llama_flow_adapter * adapter, int32_t i);
// Bytes of the adapter's tensors in backend buffers (LoRA A and B as loaded, and the gates):
// what a decoded token reads besides the base model.
LLAMA_API uint64_t     llama_flow_adapter_n_bytes   (const struct llama_flow_adapter * adapter);

// Attach (or, with NULL, detach) a flow adapter on a context. The context's graphs are built
// at once with the adapter, so a model whose graph the flow cannot follow is refused here.
// Returns 0, or -1 (the adapter stays detached) when the adapter was loaded for another model
// or the graph does not fit; the reason goes into err (if err_size > 0). The adapter must
// outlive its use by the context.
LLAMA_API int32_t llama_flow_set_adapter(
        struct llama_context * ctx, struct llama_flow_adapter * adapter, char * err, size_t err_size);

// Choose the fusion mode of the context (of every sequence without its own). STATIC takes k
// weights (all layers) or n_layer * k weights (layer-major); other modes take none. Returns 0,
// or -1 for bad arguments.
LLAMA_API int32_t llama_flow_set_mode(
        struct llama_context * ctx, enum llama_flow_mode mode, const float * weights, int32_t n_weights);

// The fusion mode of one sequence's tokens, over the context's (llama_flow_set_mode) for them;
// the same modes and weights. Modes are data of the graph, not its shape: sequences in
// different modes decode in one batch, and a change of mode needs no new graph. (The KV cache
// keeps what earlier tokens computed under the mode they had.) Returns 0, or -1 for bad arguments.
LLAMA_API int32_t llama_flow_set_seq_mode(
        struct llama_context * ctx, llama_seq_id seq_id, enum llama_flow_mode mode, const float * weights, int32_t n_weights);

// Sequence seq_id follows the context's mode again (seq_id < 0: every sequence).
LLAMA_API void llama_flow_clear_seq_mode(struct llama_context * ctx, llama_seq_id seq_id);

// Record the fusion weights of every token llama_decode evaluates (off by default): the gate's
// for gated tokens, the fixed ones for the others.
LLAMA_API void llama_flow_set_record(struct llama_context * ctx, bool record);

// Tokens recorded by the last llama_decode call (0 unless recording).
LLAMA_API int32_t llama_flow_n_recorded(const struct llama_context * ctx);

// Fusion weights of layer il for the recorded tokens, in batch order: [n_recorded][k] floats, or NULL.
LLAMA_API const float * llama_flow_get_gates(const struct llama_context * ctx, int32_t il);

// Batch-invariant CPU kernels on this context (the CPU backend's use_ref, ggml-cpu's reference
// path: no sgemm, no gemm over repacked rows, no fused ops): every token's numbers are those it
// gets alone, whatever shares its batch. 0, or -1 when the context has no CPU backend.
LLAMA_API int32_t llama_flow_set_batch_invariant(struct llama_context * ctx, bool on);

#ifdef __cplusplus
}
#endif
