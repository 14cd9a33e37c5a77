// LoRA-Flow for llama.cpp: loading a flow GGUF, the gated LoRA delta in the graph, the C API.
//
// For layer l and token t, with x the residual stream entering the layer:
//     w_l(t) = softmax(W_l x / T) + b_l
//     y      = W h + sum_i w_l,i(t) s_i B_i A_i h  =  W h + B_cat (expand(w_l) * (A_cat h))
// A_cat stacks the k LoRAs' A (rank R = sum r_i), B_cat their B with s_i folded in, and
// expand() repeats each adapter's weight over its r_i rank rows: two matmuls per module
// whatever k is. Modules reading the same input share one A matmul (see groups). Inside the
// runtime each adapter's rank rows are padded to the largest rank r_max (row i*r_max + q = rank
// q of adapter i), so expand() is the broadcasting of ggml_mul over a [r_max, k] view; when the
// ranks are equal that is the file's own layout, and B is used as stored (Q8_0 included).

#include "llama-flow-impl.h"

#include "llama-arch.h"
#include "llama-batch.h"
#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-model.h"

#include "gguf.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <tuple>

// mirrors loraflow/schema.py
#define LLAMA_FLOW_FORMAT_VERSION 1
#define LLAMA_FLOW_ADAPTER_TYPE   "lora_flow"
#define LLAMA_FLOW_GATE_INPUT     "layer_input"
#define LLAMA_FLOW_MAX_ADAPTERS   64
#define LLAMA_FLOW_MAX_RANK       65536

// Modules that read the same input in llama.cpp's layer graphs (q, k, v; gate, up): their A
// matmuls become one. Any other adapted module is a group of its own. A hint, not a
// requirement: the shared product is keyed by the input tensor too (llama_flow_graph::apply),
// so a graph where they read different inputs still gets the right numbers.
static const std::vector<std::vector<std::string>> LLAMA_FLOW_SHARED_INPUT = {
    { "attn_q", "attn_k", "attn_v" },
    { "ffn_gate", "ffn_up" },
};

//
// loading
//

namespace {

struct flow_file {
    const gguf_context * g;
    const std::string  & path;

    int64_t key(const char * name, gguf_type type) const {
        const int64_t id = gguf_find_key(g, name);
        if (id < 0) {
            throw std::runtime_error(format("%s: missing key '%s' (not a LoRA-Flow file?)", path.c_str(), name));
        }
        if (gguf_get_kv_type(g, id) != type) {
            throw std::runtime_error(format("%s: key '%s' has type %s, expected %s", path.c_str(), name,
                        gguf_type_name(gguf_get_kv_type(g, id)), gguf_type_name(type)));
        }
        return id;
    }
    int64_t arr(const char * name, gguf_type type, size_t n) const {
        const int64_t id = key(name, GGUF_TYPE_ARRAY);
        if (gguf_get_arr_type(g, id) != type || gguf_get_arr_n(g, id) != n) {
            throw std::runtime_error(format("%s: key '%s' must be an array of %zu %s, found %zu %s", path.c_str(), name,
                        n, gguf_type_name(type), gguf_get_arr_n(g, id), gguf_type_name(gguf_get_arr_type(g, id))));
        }
        return id;
    }
    std::string str(const char * name) const { return gguf_get_val_str(g, key(name, GGUF_TYPE_STRING)); }
    uint32_t    u32(const char * name) const { return gguf_get_val_u32(g, key(name, GGUF_TYPE_UINT32)); }
    float       f32(const char * name) const { return gguf_get_val_f32(g, key(name, GGUF_TYPE_FLOAT32)); }
};

std::string shape_str(const ggml_tensor * t) {
    return format("[%lld, %lld, %lld, %lld]", (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2], (long long) t->ne[3]);
}

void check_shape(const std::string & path, const ggml_tensor * t, int64_t ne0, int64_t ne1, const char * what) {
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1) {
        throw std::runtime_error(format("%s: tensor '%s' has shape %s, expected [%lld, %lld] (%s)", path.c_str(), t->name,
                    shape_str(t).c_str(), (long long) ne0, (long long) ne1, what));
    }
}

struct lora_pair {
    ggml_tensor * a = nullptr;
    ggml_tensor * b = nullptr;
    const ggml_tensor * base = nullptr;
};

// CPU "extra" buffer types repack weights for the CPU kernels; small tensors we add go
// to the plain CPU buffer instead, as llama-adapter.cpp does for LoRAs.
ggml_backend_buffer_type_t flow_buft_for(const ggml_tensor * base) {
    ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(base->buffer);
    ggml_backend_dev_t cpu_dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!cpu_dev) {
        throw std::runtime_error("no CPU backend found");
    }
    auto * cpu_reg = ggml_backend_dev_backend_reg(cpu_dev);
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(cpu_reg, "ggml_backend_dev_get_extra_bufts");
    if (get_extra) {
        for (ggml_backend_buffer_type_t * ex = get_extra(cpu_dev); ex && *ex; ++ex) {
            if (*ex == buft) {
                return ggml_backend_dev_buffer_type(cpu_dev);
            }
        }
    }
    return buft;
}

std::unique_ptr<llama_flow_adapter> flow_load(const llama_model & model, const std::string & path) {
    ggml_context * meta_raw = nullptr;
    gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ &meta_raw };
    gguf_context_ptr g { gguf_init_from_file(path.c_str(), params) };
    if (!g) {
        throw std::runtime_error(format("%s: not a readable GGUF file (missing, truncated or corrupt)", path.c_str()));
    }
    ggml_context_ptr meta { meta_raw };
    const flow_file f { g.get(), path };

    // metadata
    const std::string general_type = f.str("general.type");
    const std::string adapter_type = f.str("adapter.type");
    if (general_type != "adapter" || adapter_type != LLAMA_FLOW_ADAPTER_TYPE) {
        throw std::runtime_error(format("%s: not a LoRA-Flow adapter (general.type = '%s', adapter.type = '%s')",
                    path.c_str(), general_type.c_str(), adapter_type.c_str()));
    }
    const uint32_t version = f.u32("loraflow.version");
    if (version != LLAMA_FLOW_FORMAT_VERSION) {
        throw std::runtime_error(format("%s: LoRA-Flow format version %u, this build reads version %d",
                    path.c_str(), version, LLAMA_FLOW_FORMAT_VERSION));
    }
    const std::string arch = f.str("general.architecture");
    const std::string model_arch = llm_arch_name(model.arch);
    if (arch != model_arch) {
        throw std::runtime_error(format("%s: made for a '%s' model, but the base model is '%s'", path.c_str(), arch.c_str(), model_arch.c_str()));
    }
    // The gate reads the residual stream entering each layer of a decoder-only stack; recurrent
    // and hybrid models carry state outside it, encoder-decoders have two stacks.
    if (llama_model_is_recurrent(&model) || llama_model_is_hybrid(&model)) {
        throw std::runtime_error(format("%s: the base model '%s' is recurrent or hybrid (state-space or linear-attention layers): "
                    "LoRA-Flow supports decoder-only transformer stacks only", path.c_str(), model_arch.c_str()));
    }
    if (llama_model_has_encoder(&model)) {
        throw std::runtime_error(format("%s: the base model '%s' is an encoder-decoder: LoRA-Flow supports decoder-only "
                    "transformer stacks only", path.c_str(), model_arch.c_str()));
    }
    const int64_t n_layer = model.hparams.n_layer();
    const int64_t n_embd  = model.hparams.n_embd;
    const uint32_t file_n_layer = f.u32("loraflow.n_layer");
    const uint32_t file_n_embd  = f.u32("loraflow.n_embd");
    if (file_n_layer != n_layer || file_n_embd != n_embd) {
        throw std::runtime_error(format("%s: made for a base model with %u layers and n_embd %u, but this one has %lld and %lld",
                    path.c_str(), file_n_layer, file_n_embd, (long long) n_layer, (long long) n_embd));
    }
    const std::string gate_input = f.str("loraflow.gate.input");
    if (gate_input != LLAMA_FLOW_GATE_INPUT) {
        throw std::runtime_error(format("%s: gate input '%s' is not supported (expected '%s')", path.c_str(), gate_input.c_str(), LLAMA_FLOW_GATE_INPUT));
    }

    auto ad = std::make_unique<llama_flow_adapter>(model);
    const uint32_t k = f.u32("loraflow.adapter.count");
    if (k < 1 || k > LLAMA_FLOW_MAX_ADAPTERS) {
        throw std::runtime_error(format("%s: adapter count %u out of range [1, %d]", path.c_str(), k, LLAMA_FLOW_MAX_ADAPTERS));
    }
    ad->k = (int32_t) k;
    const int64_t id_names = f.arr("loraflow.adapter.names", GGUF_TYPE_STRING, k);
    const int64_t id_ranks = f.arr("loraflow.adapter.ranks", GGUF_TYPE_UINT32, k);
    f.arr("loraflow.adapter.alphas", GGUF_TYPE_FLOAT32, k);
    f.arr("loraflow.adapter.scales", GGUF_TYPE_FLOAT32, k);
    std::vector<int64_t> ranks(k);
    int64_t n_rank = 0;
    for (uint32_t i = 0; i < k; ++i) {
        ad->names.emplace_back(gguf_get_arr_str(g.get(), id_names, i));
        if (ad->names[i].empty() || std::find(ad->names.begin(), ad->names.end() - 1, ad->names[i]) != ad->names.end() - 1) {
            throw std::runtime_error(format("%s: adapter names in 'loraflow.adapter.names' must be unique and non-empty ('%s' at %u)",
                        path.c_str(), ad->names[i].c_str(), i));
        }
        ranks[i] = ((const uint32_t *) gguf_get_arr_data(g.get(), id_ranks))[i];
        if (ranks[i] < 1 || ranks[i] > LLAMA_FLOW_MAX_RANK) {
            throw std::runtime_error(format("%s: rank %lld of adapter '%s' out of range", path.c_str(), (long long) ranks[i], ad->names[i].c_str()));
        }
        n_rank += ranks[i];
    }
    if (n_rank > LLAMA_FLOW_MAX_RANK) {
        throw std::runtime_error(format("%s: total rank %lld too large", path.c_str(), (long long) n_rank));
    }
    ad->temperature = f.f32("loraflow.gate.temperature");
    if (!std::isfinite(ad->temperature) || ad->temperature <= 0.0f) {
        throw std::runtime_error(format("%s: 'loraflow.gate.temperature' must be a positive finite number, got %g", path.c_str(), ad->temperature));
    }

    // classify and check every tensor against the base model
    std::vector<ggml_tensor *> gate_w(n_layer, nullptr), gate_b(n_layer, nullptr);
    std::map<std::pair<int64_t, std::string>, lora_pair> loras; // (layer, module)
    for (ggml_tensor * t = ggml_get_first_tensor(meta.get()); t; t = ggml_get_next_tensor(meta.get(), t)) {
        const std::string name = t->name;
        int il = -1, pos = 0;
        if (sscanf(t->name, "blk.%d.%n", &il, &pos) != 1 || pos == 0 || il < 0 || il >= n_layer) {
            throw std::runtime_error(format("%s: unexpected tensor '%s'", path.c_str(), t->name));
        }
        const std::string rest = name.substr(pos);
        auto ends_with = [&](const char * suffix) {
            const size_t n = strlen(suffix);
            return rest.size() > n && rest.compare(rest.size() - n, n, suffix) == 0;
        };
        if (rest == "flow_gate.weight" || rest == "flow_gate.bias") {
            if (t->type != GGML_TYPE_F32) {
                throw std::runtime_error(format("%s: gate tensor '%s' has type %s, expected f32", path.c_str(), t->name, ggml_type_name(t->type)));
            }
            if (rest == "flow_gate.weight") {
                check_shape(path, t, n_embd, k, "n_embd, k");
                gate_w[il] = t;
            } else {
                check_shape(path, t, k, 1, "k");
                gate_b[il] = t;
            }
        } else if (ends_with(".flow_a") || ends_with(".flow_b")) {
            // any module: the base model must have blk.N.<module>.weight, checked below
            const std::string module = rest.substr(0, rest.size() - strlen(".flow_a"));
            if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_Q8_0) {
                throw std::runtime_error(format("%s: tensor '%s' has type %s, expected f32, f16 or q8_0", path.c_str(), t->name, ggml_type_name(t->type)));
            }
            lora_pair & p = loras[{il, module}];
            (ends_with(".flow_a") ? p.a : p.b) = t;
        } else {
            throw std::runtime_error(format("%s: unexpected tensor '%s'", path.c_str(), t->name));
        }
    }
    for (int64_t il = 0; il < n_layer; ++il) {
        if (!gate_w[il] || !gate_b[il]) {
            throw std::runtime_error(format("%s: missing gate tensor blk.%lld.flow_gate.%s", path.c_str(), (long long) il, gate_w[il] ? "bias" : "weight"));
        }
    }
    if (loras.empty()) {
        throw std::runtime_error(format("%s: holds no LoRA tensors", path.c_str()));
    }
    for (auto & [key, p] : loras) {
        const std::string base_name = format("blk.%lld.%s.weight", (long long) key.first, key.second.c_str());
        if (!p.a || !p.b) {
            throw std::runtime_error(format("%s: '%s' has flow_%s but no flow_%s", path.c_str(), base_name.c_str(), p.a ? "a" : "b", p.a ? "b" : "a"));
        }
        p.base = model.get_tensor(base_name.c_str());
        if (!p.base) {
            throw std::runtime_error(format("%s: base model has no tensor '%s' (wrong base model?)", path.c_str(), base_name.c_str()));
        }
        if (ggml_n_dims(p.base) == 3) {
            throw std::runtime_error(format("%s: '%s' holds the experts of a MoE layer (a 3-D tensor): LoRA on MoE experts "
                        "is not supported", path.c_str(), base_name.c_str()));
        }
        if (ggml_n_dims(p.base) != 2) {
            throw std::runtime_error(format("%s: base tensor '%s' is not a matrix", path.c_str(), base_name.c_str()));
        }
        check_shape(path, p.a, p.base->ne[0], n_rank, "n_in of the base weight, R");
        check_shape(path, p.b, n_rank, p.base->ne[1], "R, n_out of the base weight");
    }

    // every tensor's data must lie inside the file before anything is allocated
    std::ifstream file(path, std::ios::binary | std::ios::ate);
    if (!file) {
        throw std::runtime_error(format("%s: cannot open", path.c_str()));
    }
    const size_t file_size = (size_t) file.tellg();
    const size_t data_offset = gguf_get_data_offset(g.get());
    auto data_range = [&](const ggml_tensor * t) {
        const int64_t tid = gguf_find_tensor(g.get(), t->name);
        const size_t offs = data_offset + gguf_get_tensor_offset(g.get(), tid);
        const size_t size = ggml_nbytes(t);
        if (offs < data_offset || offs + size < offs || offs + size > file_size) {
            throw std::runtime_error(format("%s: data of tensor '%s' lies outside the file (truncated or corrupt)", path.c_str(), t->name));
        }
        return std::make_pair(offs, size);
    };
    for (ggml_tensor * t = ggml_get_first_tensor(meta.get()); t; t = ggml_get_next_tensor(meta.get(), t)) {
        data_range(t);
    }

    // device tensors, in the buffer type of the base weights they belong to
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_map;
    auto ctx_for = [&](const ggml_tensor * base) {
        ggml_backend_buffer_type_t buft = flow_buft_for(base);
        auto it = ctx_map.find(buft);
        if (it != ctx_map.end()) {
            return it->second;
        }
        ggml_init_params ip = { /*.mem_size =*/ (gguf_get_n_tensors(g.get()) + 2*n_layer + 8)*ggml_tensor_overhead(), nullptr, /*.no_alloc =*/ true };
        ggml_context * c = ggml_init(ip);
        if (!c) {
            throw std::runtime_error("failed to create a ggml context for the flow adapter");
        }
        ad->ctxs.emplace_back(c);
        ctx_map[buft] = c;
        return c;
    };

    // Inside the runtime, internal row i*r_max + q holds rank row q of adapter i (zero where
    // q >= r_i), k * r_max rows in all: the gate's k weights then scale (A h) by broadcasting
    // over a [r_max, k] view. With equal ranks this is the file's layout.
    int64_t r_max = 0;
    for (int64_t r : ranks) {
        r_max = std::max(r_max, r);
    }
    const int64_t n_row = k*r_max;
    std::vector<int64_t> row_of(n_rank); // file row -> internal row
    for (int64_t i = 0, file_row = 0; i < (int64_t) k; ++i) {
        for (int64_t q = 0; q < ranks[i]; ++q) {
            row_of[file_row++] = i*r_max + q;
        }
    }
    ad->n_rank = (int32_t) n_row;
    ad->r_max = (int32_t) r_max;
    const bool file_layout = n_row == n_rank; // equal ranks: B's columns need no moving

    // what to read into each device tensor: as it is (gates), rows to internal rank rows (the
    // A of a group, up to 3 members), columns to internal rank rows (B)
    enum upload_kind { COPY, A_ROWS, B_COLS };
    struct upload { upload_kind kind; ggml_tensor * dst; const ggml_tensor * src[3]; };
    std::vector<upload> uploads;

    ad->gate_w.resize(n_layer);
    for (int64_t il = 0; il < n_layer; ++il) {
        // placed with an adapted weight of the same layer (that layer's device when offloading)
        auto same_layer = loras.lower_bound({il, std::string()});
        const ggml_tensor * anchor = same_layer != loras.end() && same_layer->first.first == il ?
            same_layer->second.base : loras.begin()->second.base;
        ggml_context * c = ctx_for(anchor);
        ad->gate_w[il] = ggml_dup_tensor(c, gate_w[il]);
        uploads.push_back({ COPY, ad->gate_w[il], { gate_w[il] } });
    }

    // groups: per layer, the members of one LLAMA_FLOW_SHARED_INPUT set with the same A type;
    // every other module alone
    std::map<std::tuple<int64_t, std::string, ggml_type>, std::vector<const lora_pair *>> group_members;
    for (const auto & [key, p] : loras) {
        std::string set = "self:" + key.second;
        for (const auto & shared : LLAMA_FLOW_SHARED_INPUT) {
            if (std::find(shared.begin(), shared.end(), key.second) != shared.end()) {
                set = shared[0];
            }
        }
        group_members[{key.first, set, p.a->type}].push_back(&p);
    }
    for (const auto & [gkey, grp] : group_members) {
        const int64_t il = std::get<0>(gkey);
        ggml_context * c = ctx_for(grp[0]->base);
        const int32_t group_id = (int32_t) ad->groups.size();
        ggml_tensor * a = ggml_new_tensor_2d(c, grp[0]->a->type, grp[0]->a->ne[0], n_row*(int64_t) grp.size());
        ggml_format_name(a, "blk.%lld.flow_a_group%d", (long long) il, group_id);
        ad->groups.push_back({ a });
        upload up_a = { A_ROWS, a, {} };
        for (size_t m = 0; m < grp.size(); ++m) {
            const lora_pair & p = *grp[m];
            // B is used as stored when its columns stay where they are; otherwise they are moved,
            // and a Q8_0 B becomes F16 (its blocks would straddle the padding)
            const ggml_type b_type = file_layout || p.b->type == GGML_TYPE_F32 ? p.b->type : GGML_TYPE_F16;
            ggml_tensor * b = ggml_new_tensor_2d(ctx_for(p.base), b_type, n_row, p.b->ne[1]);
            ggml_set_name(b, p.b->name);
            ad->weights[p.base] = { (int32_t) il, group_id, (int64_t) m*n_row, b };
            up_a.src[m] = p.a;
            uploads.push_back({ file_layout ? COPY : B_COLS, b, { p.b } });
        }
        uploads.push_back(up_a);
    }

    for (auto & [buft, c] : ctx_map) {
        ggml_backend_buffer_ptr buf { ggml_backend_alloc_ctx_tensors_from_buft(c, buft) };
        if (!buf) {
            throw std::runtime_error("failed to allocate the flow adapter's buffers");
        }
        LLAMA_LOG_INFO("%s: %10s flow buffer size = %8.2f MiB\n", __func__, ggml_backend_buffer_name(buf.get()),
                ggml_backend_buffer_get_size(buf.get())/1024.0/1024.0);
        ad->bufs.emplace_back(std::move(buf));
    }

    auto read_tensor = [&](const ggml_tensor * t) {
        const auto [offs, size] = data_range(t);
        std::vector<uint8_t> data(size);
        file.seekg((std::streamoff) offs);
        file.read((char *) data.data(), (std::streamsize) size);
        if (!file) {
            throw std::runtime_error(format("%s: failed to read tensor '%s'", path.c_str(), t->name));
        }
        if (!ggml_validate_row_data(t->type, data.data(), size)) {
            throw std::runtime_error(format("%s: tensor '%s' holds NaN or infinite values", path.c_str(), t->name));
        }
        return data;
    };
    std::vector<uint8_t> host;
    std::vector<float> row_f32, file_row_f32;
    for (const auto & up : uploads) {
        host.assign(ggml_nbytes(up.dst), 0); // zero bytes are zeros in F32, F16 and Q8_0
        if (up.kind == B_COLS) {
            // B [R, n_out]: per output row, scatter the file's columns to the internal rank rows
            const ggml_tensor * src = up.src[0];
            const std::vector<uint8_t> data = read_tensor(src);
            const size_t file_row_size = ggml_row_size(src->type, n_rank);
            row_f32.resize(n_row);
            file_row_f32.resize(n_rank);
            for (int64_t o = 0; o < src->ne[1]; ++o) {
                const uint8_t * file_row = data.data() + o*file_row_size;
                if (src->type == GGML_TYPE_F32) {
                    memcpy(file_row_f32.data(), file_row, n_rank*sizeof(float));
                } else {
                    ggml_get_type_traits(src->type)->to_float(file_row, file_row_f32.data(), n_rank);
                }
                std::fill(row_f32.begin(), row_f32.end(), 0.0f);
                for (int64_t r = 0; r < n_rank; ++r) {
                    row_f32[row_of[r]] = file_row_f32[r];
                }
                uint8_t * dst_row = host.data() + o*up.dst->nb[1];
                if (up.dst->type == GGML_TYPE_F32) {
                    memcpy(dst_row, row_f32.data(), n_row*sizeof(float));
                } else {
                    ggml_fp32_to_fp16_row(row_f32.data(), (ggml_fp16_t *) dst_row, n_row);
                }
            }
        } else if (up.kind == A_ROWS) {
            // A of a group: each member's rows, moved to their internal rank rows
            for (int m = 0; m < 3 && up.src[m]; ++m) {
                const std::vector<uint8_t> data = read_tensor(up.src[m]);
                const size_t row_size = up.dst->nb[1];
                for (int64_t r = 0; r < n_rank; ++r) {
                    memcpy(host.data() + (m*n_row + row_of[r])*row_size, data.data() + r*row_size, row_size);
                }
            }
        } else {
            host = read_tensor(up.src[0]);
        }
        ggml_backend_tensor_set(up.dst, host.data(), 0, host.size());
    }
    // the biases stay on the host: a graph input, with the fixed weights of the static modes
    ad->gate_b.resize(n_layer*k);
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::vector<uint8_t> data = read_tensor(gate_b[il]);
        memcpy(ad->gate_b.data() + il*k, data.data(), k*sizeof(float));
    }

    LLAMA_LOG_INFO("%s: loaded flow adapter: %d LoRAs, total rank %d, %zu weights in %zu groups\n",
            __func__, ad->k, ad->n_rank, ad->weights.size(), ad->groups.size());
    return ad;
}

// How each token is fused reaches the graph as data, so any mix of modes in a batch, and any
// change of modes, needs no new graph: per token, w = m * softmax(W x / T) + a, with m = 1 and
// a = b_l for a gated sequence, m = 0 and a = its fixed weights for the others.
class llm_graph_input_flow_mix : public llm_graph_input_i {
public:
    llm_graph_input_flow_mix(ggml_tensor * mask, std::vector<ggml_tensor *> add, const llama_flow_state * state)
        : mask(mask), add(std::move(add)), state(state) {}

    void set_input(const llama_ubatch * ubatch) override {
        const llama_flow_adapter & ad = *state->adapter;
        const int64_t n_tokens = mask->ne[1];
        const size_t k = ad.k;
        GGML_ASSERT(ubatch->n_tokens == n_tokens);
        std::vector<float> m(n_tokens);
        std::vector<float> a(add.size()*n_tokens*k);
        for (int64_t i = 0; i < n_tokens; ++i) {
            const llama_flow_mix & mix = state->mix_of(ubatch->seq_id[i][0]);
            m[i] = mix.dynamic ? 1.0f : 0.0f;
            const std::vector<float> & src = mix.dynamic ? ad.gate_b : mix.w;
            for (size_t il = 0; il < add.size(); ++il) {
                std::copy_n(src.data() + il*k, k, a.data() + (il*n_tokens + i)*k);
            }
        }
        ggml_backend_tensor_set(mask, m.data(), 0, ggml_nbytes(mask));
        for (size_t il = 0; il < add.size(); ++il) {
            ggml_backend_tensor_set(add[il], a.data() + il*n_tokens*k, 0, ggml_nbytes(add[il]));
        }
    }
    bool can_reuse(const llm_graph_params & params) override {
        return params.flow == state && params.ubatch.n_tokens == mask->ne[1];
    }

    ggml_tensor * mask;
    std::vector<ggml_tensor *> add;
    const llama_flow_state * state;
};

} // namespace

//
// graph
//

// The gate's input, the residual stream entering layer l, is found by name, the same way for
// every architecture: llama.cpp's graph builders name each layer's output "l_out" (after the
// residual add and the control vector: what the next layer reads), and the embeddings "embd"
// (build_inp_embd, after any embedding multiplier); a builder that goes on to scale or normalize
// them names the result too, so for layer 0 the last of these names seen before the layer wins.
static const char * const LLAMA_FLOW_EMBD_NAMES[] = {
    "embd",            // build_inp_embd
    "inp_scaled",      // Gemma's sqrt(n_embd), MiniCPM3
    "inp_embd_scaled", // AFMoE
    "inp_norm",        // a norm on the embeddings: Bloom, Talkie
    "embd_norm",
};

void llama_flow_graph::observe(ggml_tensor * t, const char * name, int il) {
    if (!state || !state->active()) {
        return;
    }
    if (il >= 0 && strcmp(name, "l_out") == 0) {
        layer_inp[il + 1] = t;
        return;
    }
    if (il <= 0 && !gate_exp.count(0)) { // some builders tag the embeddings' norm as layer 0's
        for (const char * embd : LLAMA_FLOW_EMBD_NAMES) {
            if (strcmp(name, embd) == 0) {
                layer_inp[0] = t;
            }
        }
    }
}

// a graph the flow cannot be applied to: keep the reason (llama_flow_set_adapter's trial graph
// turns it into a refusal) and leave the weight without the flow delta
ggml_tensor * llama_flow_graph::fail(std::string msg) const {
    if (state->graph_error.empty()) {
        state->graph_error = std::move(msg);
    }
    return nullptr;
}

ggml_tensor * llama_flow_graph::gate(ggml_context * ctx0, llm_graph_result * res, int32_t il, int64_t n_cols) {
    const llama_flow_adapter & ad = *state->adapter;

    ggml_tensor *& g = gate_exp[il];
    if (!g) {
        const auto it = layer_inp.find(il);
        if (it == layer_inp.end()) {
            return fail(format("the %s graph does not name the input of layer %d (the previous layer's \"l_out\", "
                        "or \"embd\"/\"inp_scaled\" for layer 0), so the gate has no input: this architecture's "
                        "graph is not a standard decoder loop", llm_arch_name(ad.model.arch), il));
        }
        ggml_tensor * x = it->second;
        if (x->ne[0] != ad.gate_w[il]->ne[0] || ggml_n_dims(x) > 2) {
            return fail(format("the input of layer %d in the %s graph is %s, expected [n_embd = %lld, n_tokens]",
                        il, llm_arch_name(ad.model.arch), shape_str(x).c_str(), (long long) ad.gate_w[il]->ne[0]));
        }
        if (!mix_mask) { // the mix inputs, once per graph (llm_graph_input_flow_mix)
            const int64_t n_tokens = x->ne[1];
            mix_mask = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, 1, n_tokens);
            ggml_set_input(mix_mask);
            ggml_set_name(mix_mask, "flow_mix_mask");
            for (size_t l = 0; l < ad.gate_w.size(); ++l) {
                ggml_tensor * a = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, ad.k, n_tokens);
                ggml_set_input(a);
                ggml_format_name(a, "flow_mix_add.%zu", l);
                mix_add.push_back(a);
            }
            res->add_input(std::make_unique<llm_graph_input_flow_mix>(mix_mask, mix_add, state));
        }
        ggml_tensor * w = ggml_mul_mat(ctx0, ad.gate_w[il], x);                // [k, n_tokens]
        w = ggml_soft_max_ext(ctx0, w, nullptr, 1.0f/ad.temperature, 0.0f);
        w = ggml_add(ctx0, ggml_mul(ctx0, w, mix_mask), mix_add[il]);          // the bias after the softmax
        if (state->record) {
            ggml_set_output(w);
            res->t_flow_gate[il] = w;
        }
        g = w; // [k, n_tokens]
    }
    if (g->ne[1] == n_cols) {
        return g;
    }

    // before their last FFN, most archs keep only the rows of the output tokens
    ggml_tensor *& g_out = gate_exp_out[il];
    if (!g_out) {
        ggml_tensor * out_ids = nullptr;
        for (const auto & inp : res->inputs) {
            if (auto * o = dynamic_cast<llm_graph_input_out_ids *>(inp.get())) {
                out_ids = o->out_ids;
            }
        }
        if (!out_ids || out_ids->ne[0] != n_cols) {
            return fail(format("an adapted weight of layer %d in the %s graph reads %lld tokens, but the gate has %lld",
                        il, llm_arch_name(ad.model.arch), (long long) n_cols, (long long) g->ne[1]));
        }
        g_out = ggml_get_rows(ctx0, g, out_ids);
    }
    return g_out;
}

ggml_tensor * llama_flow_graph::apply(ggml_context * ctx0, llm_graph_result * res,
                                      const ggml_tensor * w, ggml_tensor * cur, ggml_tensor * y) {
    if (!state || !state->active()) {
        return y;
    }
    const llama_flow_adapter & ad = *state->adapter;
    const auto it = ad.weights.find(w);
    if (it == ad.weights.end()) {
        return y;
    }
    const llama_flow_weight & fw = it->second;
    if (ggml_n_dims(cur) > 2) {
        fail(format("the %s graph gives the adapted weight %s an input of shape %s, not [n_in, n_tokens]",
                    llm_arch_name(ad.model.arch), w->name, shape_str(cur).c_str()));
        return y;
    }

    ggml_tensor * g = gate(ctx0, res, fw.il, cur->ne[1]);
    if (!g) {
        return y;
    }

    ggml_tensor *& gah = group_out[{fw.group, cur}];
    if (!gah) {
        // A h viewed as [r_max, k * members, n]: g, viewed as [1, k, n], broadcasts over each
        // adapter's rank rows and over the group's stacked modules (each has the same layout)
        ggml_tensor * ah = ggml_mul_mat(ctx0, ad.groups[fw.group].a, cur);
        const int64_t n = ah->ne[1];
        ggml_tensor * gah3 = ggml_mul(ctx0, ggml_reshape_3d(ctx0, ah, ad.r_max, ah->ne[0]/ad.r_max, n),
                                      ggml_reshape_3d(ctx0, g, 1, ad.k, n));
        gah = ggml_reshape_2d(ctx0, gah3, ah->ne[0], n);
    }
    ggml_tensor * gah_w = gah->ne[0] == ad.n_rank ? gah :
        ggml_view_2d(ctx0, gah, ad.n_rank, gah->ne[1], gah->nb[1], fw.row0*gah->nb[0]);
    if (!ggml_is_contiguous(gah_w)) {
        // several tokens: the backends' fast matmul paths (e.g. the CPU's sgemm) want a contiguous input
        gah_w = ggml_cont(ctx0, gah_w);
    }

    return ggml_add(ctx0, y, ggml_mul_mat(ctx0, fw.b, gah_w));
}

void llama_flow_state::record_ubatch(ggml_backend_sched_t sched, const llm_graph_result * res,
                                     const llama_ubatch & ubatch, uint32_t n_prev, uint32_t n_tokens_all) {
    const bool first = n_prev == 0;
    if (first) {
        gates.clear();
        n_recorded = 0;
    }
    if (!record || !adapter) {
        return;
    }
    const size_t n_layer = adapter->gate_w.size();
    const size_t k = adapter->k;
    if (first) {
        gates.assign(n_layer, std::vector<float>(n_tokens_all*k, 0.0f));
        n_recorded = (int32_t) n_tokens_all;
    }
    // a batch of several sequences may be split out of order: put each row at its batch index
    const std::vector<int32_t> * batch_idxs = ubatch.data ? &ubatch.data->batch_idxs : nullptr;
    const bool in_order = !batch_idxs || batch_idxs->size() != ubatch.n_tokens;
    ggml_backend_sched_synchronize(sched);
    std::vector<float> rows;
    for (size_t il = 0; il < n_layer; ++il) {
        const ggml_tensor * t = res->t_flow_gate[il];
        if (!t) {
            continue;
        }
        GGML_ASSERT(t->ne[0] == (int64_t) k && t->ne[1] == (int64_t) ubatch.n_tokens);
        rows.resize(ggml_nelements(t));
        ggml_backend_tensor_get(t, rows.data(), 0, ggml_nbytes(t));
        for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
            const size_t dst = in_order ? n_prev + i : (size_t) (*batch_idxs)[i];
            GGML_ASSERT(dst < n_tokens_all);
            std::copy_n(rows.data() + i*k, k, gates[il].data() + dst*k);
        }
    }
}

//
// C API
//

llama_flow_adapter * llama_flow_adapter_init(llama_model * model, const char * path, char * err, size_t err_size) {
    try {
        if (!model || !path) {
            throw std::runtime_error("model and path are required");
        }
        return flow_load(*model, path).release();
    } catch (const std::exception & e) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, e.what());
        if (err && err_size > 0) {
            snprintf(err, err_size, "%s", e.what());
        }
        return nullptr;
    }
}

void llama_flow_adapter_free(llama_flow_adapter * adapter) {
    delete adapter;
}

int32_t llama_flow_adapter_n_adapters(const llama_flow_adapter * adapter) {
    return adapter->k;
}

int32_t llama_flow_adapter_n_layer(const llama_flow_adapter * adapter) {
    return (int32_t) adapter->gate_w.size();
}

const char * llama_flow_adapter_name(const llama_flow_adapter * adapter, int32_t i) {
    return i >= 0 && i < adapter->k ? adapter->names[i].c_str() : nullptr;
}

size_t llama_flow_adapter::n_bytes() const {
    size_t n = 0;
    for (const auto & buf : bufs) {
        n += ggml_backend_buffer_get_size(buf.get());
    }
    return n;
}

uint64_t llama_flow_adapter_n_bytes(const llama_flow_adapter * adapter) {
    return adapter->n_bytes();
}

int32_t llama_flow_set_adapter(llama_context * ctx, llama_flow_adapter * adapter, char * err, size_t err_size) {
    auto refuse = [&](const std::string & msg) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, msg.c_str());
        if (err && err_size > 0) {
            snprintf(err, err_size, "%s", msg.c_str());
        }
        return -1;
    };
    if (adapter && &adapter->model != &ctx->get_model()) {
        return refuse("the flow adapter was loaded for another model");
    }
    llama_flow_state & st = ctx->flow;
    if (st.adapter == adapter) {
        return 0;
    }
    st.adapter = adapter;
    st.mix = llama_flow_mix{};
    st.seq_mix.clear();
    ctx->flow_changed(true);
    if (!adapter) {
        return 0;
    }
    // build the context's graphs now (as the next decode would), so an architecture whose
    // graph the flow cannot follow is refused here, not computed without its LoRAs
    // (with the gate weights recorded: the largest graph, so no later mode needs a bigger buffer)
    std::string error;
    st.graph_error.clear();
    const bool record = st.record;
    st.record = true;
    try {
        ctx->sched_reserve();
        error = st.graph_error;
    } catch (const std::exception & e) {
        error = e.what();
    }
    st.record = record;
    if (!error.empty()) {
        st.adapter = nullptr;
        ctx->flow_changed(true);
        return refuse(error);
    }
    return 0;
}

namespace {

// a mode and its weights as a llama_flow_mix, or false (and the reason logged) for bad arguments
bool make_mix(const llama_flow_state & st, llama_flow_mode mode, const float * weights, int32_t n_weights,
              llama_flow_mix & mix, const char * func) {
    if (mode != LLAMA_FLOW_MODE_OFF && mode != LLAMA_FLOW_MODE_DYNAMIC && mode != LLAMA_FLOW_MODE_STATIC) {
        LLAMA_LOG_ERROR("%s: unknown mode %d\n", func, (int) mode);
        return false;
    }
    if (!st.adapter) {
        LLAMA_LOG_ERROR("%s: no flow adapter set\n", func);
        return false;
    }
    const int32_t k = st.adapter->k;
    const int32_t n_layer = (int32_t) st.adapter->gate_w.size();
    if (mode != LLAMA_FLOW_MODE_STATIC && n_weights != 0) {
        LLAMA_LOG_ERROR("%s: only static mode takes weights\n", func);
        return false;
    }
    mix = llama_flow_mix{};
    if (mode == LLAMA_FLOW_MODE_DYNAMIC) {
        return true;
    }
    mix.dynamic = false;
    mix.w.assign((size_t) k*n_layer, 0.0f); // off: no LoRA at all
    if (mode == LLAMA_FLOW_MODE_OFF) {
        return true;
    }
    if (!weights || (n_weights != k && n_weights != k*n_layer)) {
        LLAMA_LOG_ERROR("%s: static mode takes %d or %d weights, got %d\n", func, k, k*n_layer, n_weights);
        return false;
    }
    for (int32_t i = 0; i < n_weights; ++i) {
        if (!std::isfinite(weights[i])) {
            LLAMA_LOG_ERROR("%s: static weight %d is not finite\n", func, i);
            return false;
        }
    }
    for (int32_t i = 0; i < k*n_layer; ++i) {
        mix.w[i] = weights[n_weights == k ? i % k : i];
    }
    return true;
}

} // namespace

int32_t llama_flow_set_mode(llama_context * ctx, llama_flow_mode mode, const float * weights, int32_t n_weights) {
    llama_flow_state & st = ctx->flow;
    llama_flow_mix mix;
    if (!make_mix(st, mode, weights, n_weights, mix, __func__)) {
        return -1;
    }
    st.mix = std::move(mix); // data of the next ubatch: no new graph
    return 0;
}

int32_t llama_flow_set_seq_mode(llama_context * ctx, llama_seq_id seq_id, llama_flow_mode mode,
                                const float * weights, int32_t n_weights) {
    llama_flow_state & st = ctx->flow;
    llama_flow_mix mix;
    if (seq_id < 0) {
        LLAMA_LOG_ERROR("%s: sequence id %d is negative\n", __func__, seq_id);
        return -1;
    }
    if (!make_mix(st, mode, weights, n_weights, mix, __func__)) {
        return -1;
    }
    st.seq_mix[seq_id] = std::move(mix);
    return 0;
}

void llama_flow_clear_seq_mode(llama_context * ctx, llama_seq_id seq_id) {
    if (seq_id < 0) {
        ctx->flow.seq_mix.clear();
    } else {
        ctx->flow.seq_mix.erase(seq_id);
    }
}

void llama_flow_set_record(llama_context * ctx, bool record) {
    if (ctx->flow.record != record) {
        ctx->flow.record = record;
        ctx->flow_changed(true); // the record's output tensors change the graph: reserve it again
    }
}

int32_t llama_flow_set_batch_invariant(llama_context * ctx, bool on) {
    ggml_backend_t cpu = ctx->flow_backend_cpu();
    if (cpu == nullptr) {
        return -1;
    }
    auto * reg = ggml_backend_dev_backend_reg(ggml_backend_get_device(cpu));
    auto * set_use_ref = (void (*)(ggml_backend_t, bool)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_cpu_set_use_ref");
    if (set_use_ref == nullptr) {
        return -1;
    }
    set_use_ref(cpu, on);
    return 0;
}

int32_t llama_flow_n_recorded(const llama_context * ctx) {
    return ctx->flow.n_recorded;
}

const float * llama_flow_get_gates(const llama_context * ctx, int32_t il) {
    const llama_flow_state & st = ctx->flow;
    if (st.n_recorded == 0 || il < 0 || (size_t) il >= st.gates.size() || st.gates[il].empty()) {
        return nullptr;
    }
    return st.gates[il].data();
}
