// The one-token LoRA B product of a whole model, timed in ggml alone, in the ways it could be
// written (benchmarks/b_product.py builds and runs this; see its docstring).
//
//     b_product THREADS REPS R N_LAYER N_OUT...     (N_OUT: each adapted module's output size)
//
// Prints one line per variant and repetition, "variant rep milliseconds", then one per variant,
// "error variant E": its largest difference from the exact product, over the RMS of B g.
#include "ggml.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

// t's values from `f` (row-major over t's rows), in t's type
static void set(ggml_tensor * t, const std::vector<float> & f) {
    if (t->type == GGML_TYPE_F32) {
        memcpy(t->data, f.data(), f.size() * sizeof(float));
    } else if (t->type == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(f.data(), (ggml_fp16_t *) t->data, (int64_t) f.size());
    } else {
        ggml_quantize_chunk(t->type, f.data(), t->data, 0, ggml_nrows(t), t->ne[0], nullptr);
    }
}

struct module_values {
    std::vector<float> b;           // B as n_out rows of R
    std::vector<float> g;           // the gated A h of one token: R values
};

// y = B g for one module, B of rank R, written as `variant`
static ggml_tensor * product(ggml_context * ctx, const std::string & v, int R, int n_out, const module_values & m) {
    ggml_tensor * g = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, R, 1);
    set(g, m.g);
    if (v == "q8_0" || v == "f16" || v == "f32") {          // the runtime's: B as [R, n_out], one dot per output
        ggml_tensor * b = ggml_new_tensor_2d(ctx, v == "q8_0" ? GGML_TYPE_Q8_0 : v == "f16" ? GGML_TYPE_F16 : GGML_TYPE_F32,
                                             R, n_out);
        set(b, m.b);
        return ggml_mul_mat(ctx, b, g);
    }
    if (v == "q8_0_plus_y") {                               // the runtime's y + B g: one fused node (our patch)
        ggml_tensor * b = ggml_new_tensor_2d(ctx, GGML_TYPE_Q8_0, R, n_out);
        set(b, m.b);
        ggml_tensor * y = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_out, 1);
        set(y, std::vector<float>(n_out, 0.0f));
        return ggml_add(ctx, ggml_mul_mat(ctx, b, g), y);
    }
    if (v == "q8_0_two_columns") {                          // g twice: n = 2 takes ggml's sgemm (tinyBLAS) path
        ggml_tensor * b = ggml_new_tensor_2d(ctx, GGML_TYPE_Q8_0, R, n_out);
        set(b, m.b);
        ggml_tensor * y = ggml_mul_mat(ctx, b, ggml_concat(ctx, g, g, 1));
        return ggml_cont(ctx, ggml_view_2d(ctx, y, n_out, 1, y->nb[1], 0));
    }
    if (v == "out_prod_q8_0") {                             // B stored transposed: R rows of n_out, axpy each
        std::vector<float> bt(m.b.size());
        for (int o = 0; o < n_out; o++) {
            for (int r = 0; r < R; r++) {
                bt[(size_t) r * n_out + o] = m.b[(size_t) o * R + r];
            }
        }
        ggml_tensor * b = ggml_new_tensor_2d(ctx, GGML_TYPE_Q8_0, n_out, R);
        set(b, bt);
        return ggml_out_prod(ctx, b, ggml_reshape_2d(ctx, g, 1, R));
    }
    if (v == "swapped_f16") {                               // mul_mat(g, B): n_out columns, so sgemm may take it
        ggml_tensor * b = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, R, n_out);
        set(b, m.b);
        ggml_tensor * g16 = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, R, 1);
        set(g16, m.g);
        return ggml_mul_mat(ctx, g16, b);
    }
    fprintf(stderr, "unknown variant %s\n", v.c_str());
    exit(2);
}

int main(int argc, char ** argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s THREADS REPS R N_LAYER N_OUT...\n", argv[0]);
        return 2;
    }
    const int n_threads = atoi(argv[1]), reps = atoi(argv[2]), R = atoi(argv[3]), n_layer = atoi(argv[4]);
    std::vector<int> n_out;
    for (int i = 5; i < argc; i++) {
        n_out.push_back(atoi(argv[i]));
    }
    const char * variants[] = {"q8_0", "q8_0_plus_y", "f16", "f32", "q8_0_two_columns", "out_prod_q8_0", "swapped_f16"};
    const int n_variants = sizeof(variants) / sizeof(variants[0]);
    std::mt19937 rng(0);
    std::normal_distribution<float> dist(0.0f, 0.02f);
    std::vector<module_values> values;                      // the same values for every variant
    std::vector<int> outs;
    for (int l = 0; l < n_layer; l++) {
        for (int n : n_out) {
            module_values m{std::vector<float>((size_t) R * n), std::vector<float>(R)};
            for (float & x : m.b) {
                x = dist(rng);
            }
            for (float & x : m.g) {
                x = dist(rng) * 50.0f;
            }
            values.push_back(std::move(m));
            outs.push_back(n);
        }
    }
    std::vector<ggml_context *> ctxs;
    std::vector<ggml_cgraph *> graphs;
    std::vector<std::vector<ggml_tensor *>> ys(n_variants);
    for (int i = 0; i < n_variants; i++) {
        size_t bytes = 64 << 20;
        for (int n : outs) {
            bytes += 2 * (4 * (size_t) R * n + 4096);
        }
        ggml_context * ctx = ggml_init({bytes, nullptr, false});
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, 8 * outs.size() + 64, false);
        for (size_t j = 0; j < outs.size(); j++) {
            ys[i].push_back(product(ctx, variants[i], R, outs[j], values[j]));
            ggml_build_forward_expand(gf, ys[i].back());
        }
        ctxs.push_back(ctx);
        graphs.push_back(gf);
    }
    for (int rep = -1; rep < reps; rep++) {                 // rep -1 warms up; the variants interleave
        for (int i = 0; i < n_variants; i++) {
            const auto t0 = std::chrono::steady_clock::now();
            ggml_graph_compute_with_ctx(ctxs[i], graphs[i], n_threads);
            const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            if (rep >= 0) {
                printf("%s %d %.4f\n", variants[i], rep, ms);
            }
        }
    }
    // every variant computes B g: its largest error against the product in double, over the RMS of y
    for (int i = 0; i < n_variants; i++) {
        double worst = 0.0;
        for (size_t j = 0; j < outs.size(); j++) {
            const float * y = (const float *) ys[i][j]->data;
            std::vector<double> ref(outs[j], 0.0);
            double ss = 0.0;
            for (int o = 0; o < outs[j]; o++) {
                for (int r = 0; r < R; r++) {
                    ref[o] += (double) values[j].b[(size_t) o * R + r] * values[j].g[r];
                }
                ss += ref[o] * ref[o];
            }
            const double rms = std::sqrt(ss / outs[j]);
            for (int o = 0; o < outs[j]; o++) {
                worst = std::max(worst, std::fabs(y[o] - ref[o]) / rms);
            }
        }
        printf("error %s %.3g\n", variants[i], worst);
    }
    for (ggml_context * ctx : ctxs) {
        ggml_free(ctx);
    }
    return 0;
}
