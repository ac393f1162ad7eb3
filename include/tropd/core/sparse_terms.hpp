// tropd/core/sparse_terms.hpp: the sparse part of one row's gradient, and its one builder.
//
// Every sampled-token and top-k term of a row is a list of coefficients g_v = dL/d log p_S(v)
// at a few ids v (the sampled token y; the teacher's top-k ids). With a = z / T_S and
// p = softmax(a), the row gradient they induce is
//
//   dL/da_j = sum_{entries e with id j} g_e  -  p_j * P_j,
//   P_j = sum_e g_e - tail_teacher                  if j is one of the listed (top-k) ids,
//   P_j = sum_e g_e - tail_teacher + tail_coef      otherwise,
//
// which is g_j - p_j sum_v g_v when there is no tail bucket (tail_coef = tail_teacher = 0).
// With the tail bucket (estimators/topk.hpp) the coefficients are the raw -q_v and
// tail_coef = c = (1 - S_K) / (1 - P_K), tail_teacher = 1 - S_K (both times the term's
// weight): the same gradient as the folded g_v = -q_v + c p_v, without the cancellation of
// c p_v (c can be ~1e15) in fp32. Backends write p_j * P_j with the P_j of j's class, then
// add the entries' coefficients in list order (host/row_passes.hpp, gpu passes).
#pragma once

#include <stdint.h>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/token.hpp>

namespace tropd {

struct sparse_terms {
  const int32_t* ids = nullptr;  ///< entry ids (listed ids first: [0, n_listed); unique among themselves)
  const double* coef = nullptr;  ///< entry coefficients g_e (unweighted by the row's scale)
  int n = 0;                     ///< entries
  int n_listed = 0;              ///< leading entries that are top-k list ids (the rest: the sampled token)
  double tail_coef = 0;          ///< c (0: no tail bucket)
  double tail_teacher = 0;       ///< 1 - S_K where the tail bucket is used (0 otherwise)
  /// The sum of the coefficients of the row's entries that are not in this view: a
  /// vocabulary shard's terms hold only the entries in its columns, but every P_j reads the
  /// sum over all of them (dist/). 0 for a whole row.
  double sum_elsewhere = 0;

  TROPD_HD double sum() const noexcept {
    double g = 0;
    for (int i = 0; i < n; ++i) g += coef[i];
    return g + sum_elsewhere;
  }
  /// P_j for a listed id j and for every other column (see the header comment).
  TROPD_HD double p_coef_listed(double sum_g) const noexcept { return sum_g - tail_teacher; }
  TROPD_HD double p_coef_other(double sum_g) const noexcept { return sum_g - tail_teacher + tail_coef; }
  /// Whether listed ids need their own P_j.
  TROPD_HD bool split() const noexcept { return tail_coef != 0.0 || tail_teacher != 0.0; }
  /// An upper bound of max_j |dL/da_j| (for output-range checks before anything is written):
  /// |entries at j| + p_j |P_j| <= sum |g_e| + |sum g_e| + 2 tail_teacher (p_j c <= 1 - S_K off the list).
  TROPD_HD double magnitude_bound() const noexcept {
    double a = abs_(sum_elsewhere), g = sum_elsewhere;
    for (int i = 0; i < n; ++i) { a += abs_(coef[i]); g += coef[i]; }
    return a + abs_(g) + 2.0 * abs_(tail_teacher);
  }
};

/// Builds a row's entries into ids_out / coef_out (room for k + 1): the finite entries of a
/// top-k list (teacher -inf entries are padding and dropped) with coefficients g_list, then
/// the sampled token y with coefficient g_y (when y >= 0). k = 0 or g_list = nullptr: no list.
TROPD_HD inline sparse_terms build_sparse_terms(const int32_t* list_ids, values_row list_teacher, const double* g_list, int k,
                                                double tail_coef, double tail_teacher, int32_t y, double g_y,
                                                int32_t* ids_out, double* coef_out) noexcept {
  sparse_terms sp;
  sp.ids = ids_out;
  sp.coef = coef_out;
  int m = 0;
  if (g_list != nullptr)
    for (int i = 0; i < k; ++i) {
      if (list_teacher[i] == -inf<double>()) continue;
      ids_out[m] = list_ids[i];
      coef_out[m] = g_list[i];
      ++m;
    }
  sp.n_listed = m;
  if (y >= 0) {
    ids_out[m] = y;
    coef_out[m] = g_y;
    ++m;
  }
  sp.n = m;
  if (sp.n_listed > 0) {
    sp.tail_coef = tail_coef;
    sp.tail_teacher = tail_teacher;
  }
  return sp;
}

}  // namespace tropd
