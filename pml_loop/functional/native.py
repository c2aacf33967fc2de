"""The pair-combination search as one C++ loop (CPU), built on first use.

The search is ~150 elementwise operations per combination; in eager PyTorch
their launch overhead, not their arithmetic, is the cost at batch sizes of a
few hundred. This kernel runs the same candidates (see ``arcs.py`` and
``segments.py``, which stay the reference and the path for other devices) in
one pass. It is compiled with ``torch.utils.cpp_extension`` the first time it
is needed (cached on disk); where that fails, callers fall back to PyTorch.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <limits>

template <typename T>
static inline void arc_one(T g12, T g34, T g13, T g14, T g23, T g24, T* bad, T* w) {
  const T eps = std::numeric_limits<T>::epsilon();
  const T tiny = std::numeric_limits<T>::min();
  const T det_a = 1 - g12 * g12, det_b = 1 - g34 * g34;
  const bool flat_a = det_a <= T(1e3) * eps, flat_b = det_b <= T(1e3) * eps;
  const T inv_a = flat_a ? T(0) : T(1) / det_a, inv_b = flat_b ? T(0) : T(1) / det_b;
  T best = g13, a1 = 1, a2 = 0, b1 = 1, b2 = 0;
  auto offer = [&](T v, T x1, T x2, T y1, T y2) {
    if (v > best) { best = v; a1 = x1; a2 = x2; b1 = y1; b2 = y2; }
  };
  offer(g14, 1, 0, 0, 1);
  offer(g23, 0, 1, 1, 0);
  offer(g24, 0, 1, 0, 1);
  // Edges: an endpoint against its projection adj (y.e1, y.e2) on the other arc.
  auto projection = [&](T y1, T y2, T c, T inv, bool flat, T& w1, T& w2) -> T {
    w1 = y1 - c * y2; w2 = y2 - c * y1;
    if (flat || std::min(w1, w2) < 0 || w1 + w2 <= 0) return T(-2);
    return std::sqrt(std::max((y1 * w1 + y2 * w2) * inv, T(0)));
  };
  T w1, w2, v;
  v = projection(g13, g14, g34, inv_b, flat_b, w1, w2); offer(v, 1, 0, w1, w2);
  v = projection(g23, g24, g34, inv_b, flat_b, w1, w2); offer(v, 0, 1, w1, w2);
  v = projection(g13, g23, g12, inv_a, flat_a, w1, w2); offer(v, w1, w2, 1, 0);
  v = projection(g14, g24, g12, inv_a, flat_a, w1, w2); offer(v, w1, w2, 0, 1);
  // Interior: top eigenvector of adj(A) C adj(B) C^T.
  const T p11 = g13 - g12 * g23, p12 = g14 - g12 * g24, p21 = g23 - g12 * g13, p22 = g24 - g12 * g14;
  const T r11 = g13 - g34 * g14, r12 = g23 - g34 * g24, r21 = g14 - g34 * g13, r22 = g24 - g34 * g23;
  const T k11 = p11 * r11 + p12 * r21, k12 = p11 * r12 + p12 * r22;
  const T k21 = p21 * r11 + p22 * r21, k22 = p21 * r12 + p22 * r22;
  const T half_tr = (k11 + k22) / 2;
  const T mu = half_tr + std::sqrt(std::max(half_tr * half_tr - (k11 * k22 - k12 * k21), T(0)));
  const T u1 = k12, u2 = mu - k11, v1 = mu - k22, v2 = k21;
  const bool use_u = u1 * u1 + u2 * u2 >= v1 * v1 + v2 * v2;
  const T l1 = use_u ? u1 : v1, l2 = use_u ? u2 : v2;
  const T n1 = r11 * l1 + r12 * l2, n2 = r21 * l1 + r22 * l2;
  const T lo = std::min(std::min(l1, l2), std::min(n1, n2));
  const T hi = std::max(std::max(l1, l2), std::max(n1, n2));
  const bool off = flat_a || flat_b || (lo < 0 && hi > 0) ||
                   std::abs(l1) + std::abs(l2) == 0 || std::abs(n1) + std::abs(n2) == 0;
  if (!off) offer(std::sqrt(std::max(mu * inv_a * inv_b, T(0))),
                  std::abs(l1), std::abs(l2), std::abs(n1), std::abs(n2));
  const T sa = std::max(a1 + a2, tiny), sb = std::max(b1 + b2, tiny);
  *bad = -best;
  w[0] = a1 / sa; w[1] = a2 / sa; w[2] = b1 / sb; w[3] = b2 / sb;
}

template <typename T>
static inline T safe_ratio(T num, T den, T tiny) { return den > tiny ? num / den : T(0); }

template <typename T>
static inline T clamp01(T x) { return std::min(std::max(x, T(0)), T(1)); }

template <typename T>
static inline void segment_one(T g11, T g12, T g22, T g33, T g34, T g44,
                               T g13, T g14, T g23, T g24, T* bad, T* w) {
  const T a = g22 - 2 * g12 + g11, c = g44 - 2 * g34 + g33;
  const T b = g24 - g23 - g14 + g13, d = g12 - g23 - g11 + g13;
  const T e = g14 - g34 - g13 + g33, f = g11 - 2 * g13 + g33;
  const T eps = std::numeric_limits<T>::epsilon();
  const T tiny = eps * (std::abs(g11 + g22 + g33 + g44) + 1);
  auto value = [&](T s, T t) { return a * s * s + c * t * t - 2 * b * s * t + 2 * d * s - 2 * e * t; };
  T s = 0, t = clamp01(safe_ratio(e, c, tiny)), best = value(s, t);
  auto offer = [&](T s2, T t2) {
    const T v = value(s2, t2);
    if (v < best) { best = v; s = s2; t = t2; }
  };
  offer(T(1), clamp01(safe_ratio(e + b, c, tiny)));
  offer(clamp01(safe_ratio(-d, a, tiny)), T(0));
  offer(clamp01(safe_ratio(b - d, a, tiny)), T(1));
  const T det = a * c - b * b;
  if (det > 64 * eps * (a * c) + tiny * tiny) {
    const T si = (b * e - c * d) / det, ti = (a * e - b * d) / det;
    if (si >= 0 && si <= 1 && ti >= 0 && ti <= 1) offer(si, ti);
  }
  *bad = std::max(best + f, T(0));
  w[0] = 1 - s; w[1] = s; w[2] = 1 - t; w[3] = t;
}

// qq (n_q, n_q), rr (n_r, n_r), qr (n_q, n_r); a, b index query rows, c, d reference rows.
std::vector<torch::Tensor> search(torch::Tensor qq, torch::Tensor rr, torch::Tensor qr,
                                  torch::Tensor a, torch::Tensor b, torch::Tensor c, torch::Tensor d,
                                  bool arc) {
  qq = qq.contiguous(); rr = rr.contiguous(); qr = qr.contiguous();
  a = a.contiguous(); b = b.contiguous(); c = c.contiguous(); d = d.contiguous();
  const int64_t m = a.numel(), nq = qq.size(1), nr = rr.size(1);
  auto bad = torch::empty({m}, qr.options());
  auto w = torch::empty({4, m}, qr.options());
  AT_DISPATCH_FLOATING_TYPES(qr.scalar_type(), "loop_search", [&] {
    const scalar_t *Q = qq.data_ptr<scalar_t>(), *R = rr.data_ptr<scalar_t>(), *X = qr.data_ptr<scalar_t>();
    const int64_t *A = a.data_ptr<int64_t>(), *B = b.data_ptr<int64_t>();
    const int64_t *C = c.data_ptr<int64_t>(), *D = d.data_ptr<int64_t>();
    scalar_t *out = bad.data_ptr<scalar_t>(), *W = w.data_ptr<scalar_t>();
    {
      scalar_t wk[4];
      for (int64_t k = 0; k < m; ++k) {
        const int64_t i = A[k], p = B[k], j = C[k], q = D[k];
        if (arc) {
          arc_one<scalar_t>(Q[i * nq + p], R[j * nr + q], X[i * nr + j], X[i * nr + q],
                            X[p * nr + j], X[p * nr + q], out + k, wk);
        } else {
          segment_one<scalar_t>(Q[i * nq + i], Q[i * nq + p], Q[p * nq + p],
                                R[j * nr + j], R[j * nr + q], R[q * nr + q],
                                X[i * nr + j], X[i * nr + q], X[p * nr + j], X[p * nr + q], out + k, wk);
        }
        for (int r = 0; r < 4; ++r) W[r * m + k] = wk[r];
      }
    }
  });
  return {bad, w};
}

// The whole batch search: combinations (k[m], l[m]) of query pairs ends_q (K_q, 2)
// and reference pairs ends_r (K_r, 2), mirrored when one set; then, for every
// entry (i, j), the best combination over the pairs owned by i and by j.
std::vector<torch::Tensor> search_entries(torch::Tensor qq, torch::Tensor rr, torch::Tensor qr,
                                          torch::Tensor ends_q, torch::Tensor ends_r,
                                          torch::Tensor k, torch::Tensor l, bool mirror,
                                          torch::Tensor owned_q, torch::Tensor owned_r, bool arc) {
  ends_q = ends_q.contiguous(); ends_r = ends_r.contiguous(); k = k.contiguous(); l = l.contiguous();
  owned_q = owned_q.contiguous(); owned_r = owned_r.contiguous();
  const int64_t kq = ends_q.size(0), kr = ends_r.size(0);
  auto eq = ends_q.index_select(0, k), er = ends_r.index_select(0, l);
  auto res = search(qq, rr, qr, eq.select(1, 0), eq.select(1, 1), er.select(1, 0), er.select(1, 1), arc);
  const int64_t m = k.numel();
  const int64_t nq = owned_q.size(0), dq = owned_q.size(1), nr = owned_r.size(0), dr = owned_r.size(1);
  auto query_pair = torch::empty({nq, nr}, owned_q.options());
  auto ref_pair = torch::empty({nq, nr}, owned_q.options());
  auto wout = torch::empty({4, nq, nr}, qr.options());
  AT_DISPATCH_FLOATING_TYPES(qr.scalar_type(), "loop_entries", [&] {
    const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
    // Dense (K_q, K_r) grid of values and of the combination that gave each,
    // negative (-c - 1) for a mirrored one (its weights swap sides).
    std::vector<scalar_t> bad(kq * kr, inf);
    const int64_t unset = std::numeric_limits<int64_t>::min();
    std::vector<int64_t> from(kq * kr, unset);
    const scalar_t *B = res[0].data_ptr<scalar_t>(), *W = res[1].data_ptr<scalar_t>();
    const int64_t *K = k.data_ptr<int64_t>(), *L = l.data_ptr<int64_t>();
    for (int64_t c = 0; c < m; ++c) {
      const int64_t at = K[c] * kr + L[c];
      bad[at] = B[c];
      from[at] = c;
      if (mirror) {
        const int64_t ta = L[c] * kr + K[c];
        bad[ta] = B[c];
        from[ta] = -c - 1;
      }
    }
    const int64_t *OQ = owned_q.data_ptr<int64_t>(), *OR = owned_r.data_ptr<int64_t>();
    int64_t *QP = query_pair.data_ptr<int64_t>(), *RP = ref_pair.data_ptr<int64_t>();
    scalar_t *WO = wout.data_ptr<scalar_t>();
    const int64_t ne = nq * nr;
    for (int64_t i = 0; i < nq; ++i) {
      for (int64_t j = 0; j < nr; ++j) {
        scalar_t best = inf;
        int64_t bk = OQ[i * dq], bl = OR[j * dr];
        for (int64_t a = 0; a < dq; ++a) {
          const int64_t kk = OQ[i * dq + a];
          for (int64_t b = 0; b < dr; ++b) {
            const int64_t ll = OR[j * dr + b];
            const scalar_t v = bad[kk * kr + ll];
            if (v < best) { best = v; bk = kk; bl = ll; }
          }
        }
        const int64_t e = i * nr + j, src = from[bk * kr + bl];
        QP[e] = bk; RP[e] = bl;
        if (src == unset) {  // same-class entry, never searched: a valid corner
          WO[e] = 1; WO[ne + e] = 0; WO[2 * ne + e] = 1; WO[3 * ne + e] = 0;
        } else if (src >= 0) {
          for (int r = 0; r < 4; ++r) WO[r * ne + e] = W[r * m + src];
        } else {
          const int64_t c = -src - 1;
          WO[e] = W[2 * m + c]; WO[ne + e] = W[3 * m + c];
          WO[2 * ne + e] = W[c]; WO[3 * ne + e] = W[m + c];
        }
      }
    }
  });
  return {query_pair, ref_pair, wout};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("search", &search, "LoOp pair-combination search");
  m.def("search_entries", &search_entries, "LoOp batch search: winners of every entry");
}
"""

_module = None
_failed = False


def native_search_available() -> bool:
    """Build (once) and report whether the C++ search can be used."""
    global _module, _failed
    if _module is not None or _failed:
        return _module is not None
    if os.environ.get("PML_LOOP_NO_NATIVE"):
        _failed = True
        return False
    try:
        from torch.utils.cpp_extension import load_inline

        # Serial on purpose: a second OpenMP runtime beside PyTorch's own
        # made the threads of both spin against each other. Built on the
        # machine that runs it, so -march=native is safe.
        _module = load_inline(name="pml_loop_search", cpp_sources=[_SOURCE],
                              extra_cflags=["-O3", "-march=native"], verbose=False)
    except Exception as exc:  # no compiler, no headers: PyTorch ops still work
        _failed = True
        warnings.warn(f"pml_loop: C++ search unavailable ({type(exc).__name__}: {exc}); "
                      "using PyTorch operations", RuntimeWarning, stacklevel=2)
    return _module is not None


def native_search(qq: Tensor, rr: Tensor, qr: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor,
                  geometry: str) -> tuple[Tensor, Tensor]:
    """Badness ``(C,)`` and weights ``(4, C)`` of C combinations (x_a, x_b | x_c, x_d)."""
    return tuple(_module.search(qq, rr, qr, a, b, c, d, geometry == "arc"))


def native_search_entries(qq: Tensor, rr: Tensor, qr: Tensor, ends_q: Tensor, ends_r: Tensor,
                          k: Tensor, l: Tensor, mirror: bool, owned_q: Tensor, owned_r: Tensor,
                          geometry: str) -> tuple[Tensor, Tensor, Tensor]:
    """Winners ``(n_q, n_r)`` x2 and their weights ``(4, n_q, n_r)`` of a whole batch."""
    return tuple(_module.search_entries(qq, rr, qr, ends_q, ends_r, k, l, mirror, owned_q, owned_r,
                                        geometry == "arc"))


def can_use_native(g: Tensor, geometry: str) -> bool:
    return (g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64)
            and geometry in ("arc", "segment") and native_search_available())
