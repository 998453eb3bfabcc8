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
static void rms_rows(bf16 *x, bf16 *res, const bf16 *w, float *h, Py_ssize_t rows, Py_ssize_t dim, float eps,
                         int has_residual) {
    for (Py_ssize_t r = 0; r < rows; r++) {
        bf16 *xr = x + r * dim, *rr = res + r * dim;
        float ss = 0.f;
        for (Py_ssize_t i = 0; i < dim; i++) {
            float v = f32(xr[i]);
            if (has_residual) v = f32(to_bf16(v + f32(rr[i])));
            h[i] = v;
            ss += v * v;
        }
        float inv = 1.f / sqrtf(ss / (float)dim + eps);
        for (Py_ssize_t i = 0; i < dim; i++) {
            rr[i] = to_bf16(h[i]);
            xr[i] = to_bf16(h[i] * inv * f32(w[i]));
        }
    }
}

/* add_rms_norm(x, residual, weight, rows, dim, eps, has_residual): h = x + residual (rounded to bf16),
 * residual <- h, x <- h * rsqrt(mean(h^2) + eps) * weight. In place on both. */
static PyObject *add_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long px, pr, pw;
    Py_ssize_t rows, dim;
    double eps;
    int has_residual;
    if (!PyArg_ParseTuple(args, "KKKnndp", &px, &pr, &pw, &rows, &dim, &eps, &has_residual)) return NULL;
    float *h = malloc(sizeof(float) * (dim > 0 ? dim : 1));
    if (!h) return PyErr_NoMemory();
    rms_rows((bf16 *)px, (bf16 *)pr, (const bf16 *)pw, h, rows, dim, (float)eps, has_residual);
    free(h);
    Py_RETURN_NONE;
}

static void rope_rows(const bf16 *qkv, bf16 *q_out, const bf16 *cos_t, const bf16 *sin_t, const int64_t *rows,
                          const int64_t *slots, bf16 *kc, bf16 *vc, Py_ssize_t t, Py_ssize_t stride, Py_ssize_t heads,
                          Py_ssize_t kvh, Py_ssize_t d, Py_ssize_t cstride, Py_ssize_t tokens) {
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
}

/* rope_write_kv(qkv, q_out, cos, sin, rows, slots, k_cache, v_cache, t, qkv_stride, heads, kv_heads,
 * head_dim, cos_stride, cache_tokens, cos_rows): for token i, rotate its q heads (neox halves) into
 * q_out [t, heads, head_dim], rotate its k heads and write them, and its v heads, to slot slots[i] of
 * the cache ([kv_heads, cache_tokens, head_dim] each). cos / sin: [cos_rows, head_dim / 2], row rows[i].
 * A slot or row out of range is an IndexError, as PyTorch's index ops raise, and nothing is written. */
static PyObject *rope_write_kv(PyObject *self, PyObject *args) {
    unsigned long long pqkv, pq, pc, ps, prow, pslot, pk, pv;
    Py_ssize_t t, stride, heads, kvh, d, cstride, tokens, crows;
    if (!PyArg_ParseTuple(args, "KKKKKKKKnnnnnnnn", &pqkv, &pq, &pc, &ps, &prow, &pslot, &pk, &pv, &t, &stride,
                          &heads, &kvh, &d, &cstride, &tokens, &crows))
        return NULL;
    const int64_t *rows = (const int64_t *)prow, *slots = (const int64_t *)pslot;
    for (Py_ssize_t i = 0; i < t; i++) {
        if (slots[i] < 0 || slots[i] >= tokens || rows[i] < 0 || rows[i] >= crows) {
            PyErr_Format(PyExc_IndexError, "token %zd: slot %lld (of %zd) or rope row %lld (of %zd) out of range",
                         i, (long long)slots[i], tokens, (long long)rows[i], crows);
            return NULL;
        }
    }
    rope_rows((const bf16 *)pqkv, (bf16 *)pq, (const bf16 *)pc, (const bf16 *)ps, rows, slots, (bf16 *)pk, (bf16 *)pv,
              t, stride, heads, kvh, d, cstride, tokens);
    Py_RETURN_NONE;
}

static void attend_rows(const bf16 *q, bf16 *out, const bf16 *kc, const bf16 *vc, const int32_t *tables,
                            const int32_t *lens, Py_ssize_t b, Py_ssize_t heads, Py_ssize_t kvh, Py_ssize_t d,
                            Py_ssize_t qstride, Py_ssize_t bs, Py_ssize_t tstride, Py_ssize_t nblocks, float scale,
                            Py_ssize_t window, float *p) {
    Py_ssize_t group = heads / kvh, maxlen = 0;
    for (Py_ssize_t i = 0; i < b; i++) maxlen = lens[i] > maxlen ? lens[i] : maxlen;
    float *qf = p + maxlen * group, *acc = qf + group * d;
    for (Py_ssize_t i = 0; i < b; i++) {
        Py_ssize_t n = lens[i], lo = (window > 0 && n > window) ? n - window : 0, m = n - lo;
        const int32_t *table = tables + i * tstride;
        for (Py_ssize_t g = 0; g < kvh; g++) {
            for (Py_ssize_t hh = 0; hh < group; hh++)
                for (Py_ssize_t j = 0; j < d; j++) qf[hh * d + j] = f32(q[i * qstride + (g * group + hh) * d + j]) * scale;
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
}

/* decode_attention(q, out, k_cache, v_cache, block_tables, seq_lens, b, heads, kv_heads, head_dim,
 * q_stride, block_size, table_stride, num_blocks, scale, window, table_width): one query token per
 * sequence over its cached keys (all of them, or the last `window` when window > 0), grouped-query heads
 * sharing their KV head. q rows are q_stride apart ([heads, head_dim] within a row); out [b, heads,
 * head_dim]. A length past the table, a block id out of range or an empty sequence is an error. */
static PyObject *decode_attention(PyObject *self, PyObject *args) {
    unsigned long long pq, po, pk, pv, pt, pl;
    Py_ssize_t b, heads, kvh, d, qstride, bs, tstride, nblocks, window, width;
    double scale;
    if (!PyArg_ParseTuple(args, "KKKKKKnnnnnnnndnn", &pq, &po, &pk, &pv, &pt, &pl, &b, &heads, &kvh, &d, &qstride,
                          &bs, &tstride, &nblocks, &scale, &window, &width))
        return NULL;
    const int32_t *tables = (const int32_t *)pt, *lens = (const int32_t *)pl;
    if (kvh < 1 || heads % kvh) {
        PyErr_SetString(PyExc_ValueError, "query heads must be a multiple of KV heads");
        return NULL;
    }
    Py_ssize_t maxlen = 0;
    for (Py_ssize_t i = 0; i < b; i++) {
        Py_ssize_t n = lens[i];
        if (n < 1 || n > width * bs) {
            PyErr_Format(PyExc_IndexError, "sequence %zd: length %zd outside 1..%zd", i, n, width * bs);
            return NULL;
        }
        for (Py_ssize_t j = 0; j < (n + bs - 1) / bs; j++) {
            int32_t blk = tables[i * tstride + j];
            if (blk < 0 || blk >= nblocks) {
                PyErr_Format(PyExc_IndexError, "sequence %zd: block %d (of %zd) out of range", i, blk, nblocks);
                return NULL;
            }
        }
        maxlen = n > maxlen ? n : maxlen;
    }
    Py_ssize_t group = heads / kvh;
    float *p = malloc(sizeof(float) * (maxlen * group + 2 * group * d + 1));
    if (!p) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS  /* the server's event loop runs meanwhile */
    attend_rows((const bf16 *)pq, (bf16 *)po, (const bf16 *)pk, (const bf16 *)pv, tables, lens, b, heads, kvh, d,
                qstride, bs, tstride, nblocks, (float)scale, window, p);
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
