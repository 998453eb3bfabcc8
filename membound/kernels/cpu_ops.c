/* Fused CPU ops for the bf16 decode path: each replaces a handful of PyTorch ops whose per-op cost
 * (1-2 us) is most of a small step's time (issue 15). Plain C over raw pointers; membound/kernels/cpu.py
 * checks shapes, dtypes and layouts and falls back to PyTorch where these do not apply. Math in fp32,
 * bf16 in and out, round to nearest even. Each row / sequence is computed on its own, the same way
 * whatever else is in the batch. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

static inline float f32(bf16 x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}

static inline bf16 to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    if ((v.u & 0x7f800000u) == 0x7f800000u && (v.u & 0x007fffffu)) return (bf16)((v.u >> 16) | 0x40); /* NaN */
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (bf16)(v.u >> 16);
}

/* add_rms_norm(x, residual, weight, rows, dim, eps, has_residual): h = x + residual (rounded to bf16),
 * residual <- h, x <- h * rsqrt(mean(h^2) + eps) * weight. In place on both. */
static PyObject *add_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long px, pr, pw;
    Py_ssize_t rows, dim;
    double eps;
    int has_residual;
    if (!PyArg_ParseTuple(args, "KKKnndp", &px, &pr, &pw, &rows, &dim, &eps, &has_residual)) return NULL;
    bf16 *x = (bf16 *)px, *res = (bf16 *)pr;
    const bf16 *w = (const bf16 *)pw;
    float *h = malloc(sizeof(float) * dim);
    if (!h) return PyErr_NoMemory();
    for (Py_ssize_t r = 0; r < rows; r++) {
        bf16 *xr = x + r * dim, *rr = res + r * dim;
        float ss = 0.f;
        for (Py_ssize_t i = 0; i < dim; i++) {
            float v = f32(xr[i]);
            if (has_residual) v = f32(to_bf16(v + f32(rr[i])));
            h[i] = v;
            ss += v * v;
        }
        float inv = 1.f / sqrtf(ss / (float)dim + (float)eps);
        for (Py_ssize_t i = 0; i < dim; i++) {
            rr[i] = to_bf16(h[i]);
            xr[i] = to_bf16(h[i] * inv * f32(w[i]));
        }
    }
    free(h);
    Py_RETURN_NONE;
}

/* rope_write_kv(qkv, q_out, cos, sin, rows, slots, k_cache, v_cache, t, qkv_stride, heads, kv_heads,
 * head_dim, cos_stride, cache_tokens): for token i, rotate its q heads (neox halves) into q_out [t, heads,
 * head_dim], rotate its k heads and write them, and its v heads, to slot slots[i] of the cache
 * ([kv_heads, cache_tokens, head_dim] each). cos / sin: [*, head_dim / 2] rows, row rows[i]. */
static PyObject *rope_write_kv(PyObject *self, PyObject *args) {
    unsigned long long pqkv, pq, pc, ps, prow, pslot, pk, pv;
    Py_ssize_t t, stride, heads, kvh, d, cstride, tokens;
    if (!PyArg_ParseTuple(args, "KKKKKKKKnnnnnnn", &pqkv, &pq, &pc, &ps, &prow, &pslot, &pk, &pv, &t, &stride,
                          &heads, &kvh, &d, &cstride, &tokens))
        return NULL;
    const bf16 *qkv = (const bf16 *)pqkv, *cos_t = (const bf16 *)pc, *sin_t = (const bf16 *)ps;
    const int64_t *rows = (const int64_t *)prow, *slots = (const int64_t *)pslot;
    bf16 *q_out = (bf16 *)pq, *kc = (bf16 *)pk, *vc = (bf16 *)pv;
    Py_ssize_t half = d / 2;
    for (Py_ssize_t i = 0; i < t; i++) {
        const bf16 *src = qkv + i * stride, *c = cos_t + rows[i] * cstride, *s = sin_t + rows[i] * cstride;
        for (Py_ssize_t hd = 0; hd < heads + kvh; hd++) {
            const bf16 *x = src + hd * d;
            bf16 *dst = hd < heads ? q_out + (i * heads + hd) * d : kc + ((hd - heads) * tokens + slots[i]) * d;
            for (Py_ssize_t j = 0; j < half; j++) {
                float x1 = f32(x[j]), x2 = f32(x[j + half]), cj = f32(c[j]), sj = f32(s[j]);
                dst[j] = to_bf16(x1 * cj - x2 * sj);
                dst[j + half] = to_bf16(x2 * cj + x1 * sj);
            }
        }
        const bf16 *v = src + (heads + kvh) * d;
        for (Py_ssize_t hd = 0; hd < kvh; hd++) memcpy(vc + (hd * tokens + slots[i]) * d, v + hd * d, d * sizeof(bf16));
    }
    Py_RETURN_NONE;
}

/* decode_attention(q, out, k_cache, v_cache, block_tables, seq_lens, b, heads, kv_heads, head_dim,
 * q_stride, block_size, table_stride, num_blocks, scale, window): one query token per sequence over
 * its cached keys (all of them, or the last `window` when window > 0), grouped-query heads sharing
 * their KV head. q rows are q_stride apart ([b, heads, head_dim] within a row); out [b, heads, head_dim]. */
static PyObject *decode_attention(PyObject *self, PyObject *args) {
    unsigned long long pq, po, pk, pv, pt, pl;
    Py_ssize_t b, heads, kvh, d, qstride, bs, tstride, nblocks, window;
    double scale;
    if (!PyArg_ParseTuple(args, "KKKKKKnnnnnnnndn", &pq, &po, &pk, &pv, &pt, &pl, &b, &heads, &kvh, &d, &qstride,
                          &bs, &tstride, &nblocks, &scale, &window))
        return NULL;
    const bf16 *q = (const bf16 *)pq, *kc = (const bf16 *)pk, *vc = (const bf16 *)pv;
    const int32_t *tables = (const int32_t *)pt, *lens = (const int32_t *)pl;
    bf16 *out = (bf16 *)po;
    Py_ssize_t group = heads / kvh, maxlen = 0;
    for (Py_ssize_t i = 0; i < b; i++) maxlen = lens[i] > maxlen ? lens[i] : maxlen;
    float *p = malloc(sizeof(float) * (maxlen * group + group * d + group * d + 1));
    if (!p) return PyErr_NoMemory();
    float *qf = p + maxlen * group, *acc = qf + group * d;
    Py_BEGIN_ALLOW_THREADS  /* the server's event loop runs meanwhile */
    for (Py_ssize_t i = 0; i < b; i++) {
        Py_ssize_t n = lens[i], lo = (window > 0 && n > window) ? n - window : 0, m = n - lo;
        const int32_t *table = tables + i * tstride;
        for (Py_ssize_t g = 0; g < kvh; g++) {
            for (Py_ssize_t hh = 0; hh < group; hh++)
                for (Py_ssize_t j = 0; j < d; j++) qf[hh * d + j] = f32(q[i * qstride + (g * group + hh) * d + j]) * (float)scale;
            const bf16 *kh = kc + g * nblocks * bs * d, *vh = vc + g * nblocks * bs * d;
            for (Py_ssize_t tok = lo; tok < n; tok++) {
                const bf16 *kt = kh + ((Py_ssize_t)table[tok / bs] * bs + tok % bs) * d;
                for (Py_ssize_t hh = 0; hh < group; hh++) {
                    float s = 0.f;
                    for (Py_ssize_t j = 0; j < d; j++) s += qf[hh * d + j] * f32(kt[j]);
                    p[hh * m + tok - lo] = s;
                }
            }
            for (Py_ssize_t hh = 0; hh < group; hh++) {
                float *ph = p + hh * m, mx = -INFINITY, sum = 0.f;
                for (Py_ssize_t j = 0; j < m; j++) mx = ph[j] > mx ? ph[j] : mx;
                for (Py_ssize_t j = 0; j < m; j++) {
                    ph[j] = expf(ph[j] - mx);
                    sum += ph[j];
                }
                float inv = 1.f / sum;
                for (Py_ssize_t j = 0; j < m; j++) ph[j] *= inv;
            }
            memset(acc, 0, sizeof(float) * group * d);
            for (Py_ssize_t tok = lo; tok < n; tok++) {
                const bf16 *vt = vh + ((Py_ssize_t)table[tok / bs] * bs + tok % bs) * d;
                for (Py_ssize_t hh = 0; hh < group; hh++) {
                    float w = p[hh * m + tok - lo];
                    for (Py_ssize_t j = 0; j < d; j++) acc[hh * d + j] += w * f32(vt[j]);
                }
            }
            for (Py_ssize_t hh = 0; hh < group; hh++)
                for (Py_ssize_t j = 0; j < d; j++) out[(i * heads + g * group + hh) * d + j] = to_bf16(acc[hh * d + j]);
        }
    }
    Py_END_ALLOW_THREADS
    free(p);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add_rms_norm", add_rms_norm, METH_VARARGS, "residual add + RMSNorm, bf16, in place"},
    {"rope_write_kv", rope_write_kv, METH_VARARGS, "RoPE on q and k, k and v to their cache slots, bf16"},
    {"decode_attention", decode_attention, METH_VARARGS, "paged GQA decode attention, bf16"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_ops", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_ops(void) { return PyModule_Create(&module); }
