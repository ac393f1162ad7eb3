// Host side of the tropd::gpu row and token tests: every CUDA path against the CPU backend
// (tropd::host), on fresh random inputs, with the device outputs NaN-poisoned before each
// call (tests/gpu/rows_device.hpp) so an element the kernels do not write fails.
//
// Tolerances: per row, max_j |g_gpu - g_host| / max(max_j |g_host|, |s_r| max_j p_j) and the
// loss's relative error below 1e-5 for fp32 (and fp64-output) inputs, 1e-2 for bf16 / fp16
// inputs (both backends accumulate in fp32 / double, so the errors are far smaller in
// practice). s_r = grad_scale[r] / T_S; p_j is the student's probability. The second term of the
// denominator is the scale of the fp32 probabilities every gradient is built from: gradients
// such as p - q or 0.5 p (sgn(p - q) - <sgn>_p) can be much smaller than p in a row dominated by
// one entry, and there an fp32 rounding of p (formed differently, and correctly, by each
// backend) is amplified relative to the gradient itself. Token-level values (double arithmetic on
// both sides) agree to 1e-12; trust decisions and flags exactly.
#include <doctest/doctest.h>

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <tropd/tropd.hpp>

#include "gpu/runs.hpp"

namespace {

using tropd::index_t;
namespace te = tropd::estimators;
namespace tg = tropd_gpu_test;

constexpr double ninf = -std::numeric_limits<double>::infinity();
constexpr double nan_d = std::numeric_limits<double>::quiet_NaN();

template <class T>
T make(double x) {
  if constexpr (std::is_same_v<T, tropd::bf16>)
    return tropd::bf16::from_float(static_cast<float>(x));
  else if constexpr (std::is_same_v<T, tropd::fp16>)
    return tropd::fp16::from_float(static_cast<float>(x));
  else
    return static_cast<T>(x);
}

template <class T>
constexpr double tol_of() {
  return (std::is_same_v<T, float> || std::is_same_v<T, double>) ? 1e-5 : 1e-2;
}

template <class T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "fp32";
  else if constexpr (std::is_same_v<T, double>) return "fp64";
  else if constexpr (std::is_same_v<T, tropd::bf16>) return "bf16";
  else return "fp16";
}

/// [rows x stride] logits ~ N(0, sd); padding columns hold NaN (a kernel that reads them
/// poisons its row). Where `holes` is set, the entry is -inf (zero mass).
template <class T>
std::vector<T> random_logits(std::mt19937_64& rng, index_t rows, index_t V, index_t stride, double sd,
                             const std::vector<char>* holes = nullptr) {
  std::normal_distribution<double> nd(0.0, sd);
  std::vector<T> x(static_cast<size_t>(rows * stride));
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = 0; j < stride; ++j) {
      double v = j < V ? nd(rng) : nan_d;
      if (j < V && holes && (*holes)[static_cast<size_t>(r * V + j)]) v = ninf;
      x[static_cast<size_t>(r * stride + j)] = make<T>(v);
    }
  return x;
}

/// About 3% of the entries of each row (never the first) marked as zero-mass holes, shared by
/// student and teacher so every divergence stays finite.
std::vector<char> random_holes(std::mt19937_64& rng, index_t rows, index_t V) {
  std::bernoulli_distribution b(0.03);
  std::vector<char> h(static_cast<size_t>(rows * V), 0);
  for (index_t r = 0; r < rows; ++r)
    for (index_t j = 1; j < V; ++j) h[static_cast<size_t>(r * V + j)] = b(rng) ? 1 : 0;
  return h;
}

std::string describe(const tg::row_case& c, const char* what) {
  return std::string(what) + " rows=" + std::to_string(c.rows) + " V=" + std::to_string(c.V) +
         " blocks_per_row=" + std::to_string(c.blocks_per_row) + " strides=" + std::to_string(c.ss()) + "/" +
         std::to_string(c.st()) + "/" + std::to_string(c.gs()) + " T=" + std::to_string(c.ts) + "/" + std::to_string(c.tt);
}

bool close(double got, double ref, double tol) {
  if (std::isnan(got) || std::isnan(ref)) return false;
  if (got == ref) return true;
  return std::fabs(got - ref) <= tol * std::max(std::fabs(ref), 1e-2);
}

/// max_j |got_j - ref_j| / max(max_j |ref_j|, floor) of one row (1 for any non-finite got_j).
template <class G>
double row_err(const G* got, const G* ref, index_t V, double floor = 0) {
  double err = 0, scale = floor;
  for (index_t j = 0; j < V; ++j) {
    const double g = static_cast<double>(got[j]), r = static_cast<double>(ref[j]);
    if (!std::isfinite(g)) return 1.0;
    err = std::max(err, std::fabs(g - r));
    scale = std::max(scale, std::fabs(r));
  }
  return scale > 0 ? err / scale : err;
}

/// Per row: |grad_scale[r] / T_S| * max_j p_j (p: the student's softmax, in double).
template <class T>
std::vector<double> prob_scale(const std::vector<T>& zs, const tg::row_case& c) {
  std::vector<double> out(static_cast<size_t>(c.rows));
  for (index_t r = 0; r < c.rows; ++r) {
    double m = ninf, sum = 0;
    for (index_t j = 0; j < c.V; ++j) m = std::max(m, double(tropd::to_acc(zs[static_cast<size_t>(r * c.ss() + j)])) / c.ts);
    for (index_t j = 0; j < c.V; ++j) sum += std::exp(double(tropd::to_acc(zs[static_cast<size_t>(r * c.ss() + j)])) / c.ts - m);
    const double gs = c.grad_scale.empty() ? 1.0 : c.grad_scale[static_cast<size_t>(r)];
    out[static_cast<size_t>(r)] = std::fabs(gs / c.ts) / sum;  // max_j p_j = e^0 / sum
  }
  return out;
}

#define REQUIRE_HARNESS(rs) REQUIRE_MESSAGE((rs).harness_ok(), "CUDA harness failure: ", (rs).where)

/// Compares a device gradient [rows x gs] with a host gradient [rows x V]; padding columns
/// must still hold the poison (NaN bytes).
/// `floors` [rows]: prob_scale of the row. `skip` [rows x V] (optional): entries left out of
/// the comparison (still required finite).
template <class G>
void check_grad(const std::vector<G>& dev, const std::vector<G>& host, const tg::row_case& c, double tol, const std::string& what,
                const std::vector<double>& floors, const std::vector<char>* skip = nullptr) {
  REQUIRE(dev.size() == static_cast<size_t>(c.rows * c.gs()));
  double worst = 0;
  index_t worst_row = -1;
  bool padding_ok = true;
  for (index_t r = 0; r < c.rows; ++r) {
    std::vector<G> got(dev.begin() + r * c.gs(), dev.begin() + r * c.gs() + c.V);
    if (skip)
      for (index_t j = 0; j < c.V; ++j)
        if ((*skip)[static_cast<size_t>(r * c.V + j)] && std::isfinite(static_cast<double>(got[static_cast<size_t>(j)])))
          got[static_cast<size_t>(j)] = host[static_cast<size_t>(r * c.V + j)];
    const double e = row_err(got.data(), host.data() + r * c.V, c.V, floors[static_cast<size_t>(r)]);
    if (e > worst) { worst = e; worst_row = r; }
    for (index_t j = c.V; j < c.gs(); ++j)
      if (!std::isnan(static_cast<double>(dev[static_cast<size_t>(r * c.gs() + j)]))) padding_ok = false;
  }
  CHECK_MESSAGE(worst < tol, what, ": gradient error ", worst, " in row ", worst_row);
  CHECK_MESSAGE(padding_ok, what, ": a gradient padding column was written");
}

/// Entries where p and q agree to 1e-4 relative (computed in double from the stored logits):
/// total variation's gradient has sgn(p - q) there, which rounding may flip on either backend.
template <class T>
std::vector<char> near_ties(const std::vector<T>& zs, const std::vector<T>& zt, const tg::row_case& c) {
  std::vector<char> tie(static_cast<size_t>(c.rows * c.V), 0);
  for (index_t r = 0; r < c.rows; ++r) {
    std::vector<double> a(static_cast<size_t>(c.V)), b(static_cast<size_t>(c.V));
    for (index_t j = 0; j < c.V; ++j) {
      a[static_cast<size_t>(j)] = double(tropd::to_acc(zs[static_cast<size_t>(r * c.ss() + j)])) / c.ts;
      b[static_cast<size_t>(j)] = double(tropd::to_acc(zt[static_cast<size_t>(r * c.st() + j)])) / c.tt;
    }
    auto lse = [](const std::vector<double>& x) {
      double m = ninf, s = 0;
      for (double v : x) m = std::max(m, v);
      for (double v : x) s += std::exp(v - m);
      return m + std::log(s);
    };
    const double la = lse(a), lb = lse(b);
    for (index_t j = 0; j < c.V; ++j) {
      const double p = std::exp(a[static_cast<size_t>(j)] - la), q = std::exp(b[static_cast<size_t>(j)] - lb);
      if (p > 0 && std::fabs(p - q) <= 1e-4 * std::max(p, q)) tie[static_cast<size_t>(r * c.V + j)] = 1;
    }
  }
  return tie;
}

// ---------------------------------------------------------------------------
// Full-vocabulary divergences
// ---------------------------------------------------------------------------

template <class Est, class T, class G = float>
void check_divergence(const Est& est, tg::row_case c, std::mt19937_64& rng, const char* name, double sd = 2.0) {
  CAPTURE(describe(c, name));
  CAPTURE(std::string(type_name<T>()));
  const std::vector<char> holes = random_holes(rng, c.rows, c.V);
  const auto zs = random_logits<T>(rng, c.rows, c.V, c.ss(), sd, &holes);
  const auto zt = random_logits<T>(rng, c.rows, c.V, c.st(), sd, &holes);

  std::vector<double> loss_h(static_cast<size_t>(c.rows));
  std::vector<G> grad_h(static_cast<size_t>(c.rows * c.V));
  std::vector<te::row_summary> sum_h(static_cast<size_t>(c.rows));
  tropd::host::row_options ho;
  ho.student_temperature = c.ts;
  ho.teacher_temperature = c.tt;
  const tropd::vector_view<const double> scale_h{c.grad_scale.data(), static_cast<index_t>(c.grad_scale.size())};
  const tropd::status hs = tropd::host::divergence_rows(
      est, tropd::make_matrix<const T>(zs.data(), c.rows, c.V, c.ss()), tropd::make_matrix<const T>(zt.data(), c.rows, c.V, c.st()),
      tropd::view_of(loss_h), c.with_grad ? tropd::make_matrix<G>(grad_h.data(), c.rows, c.V) : tropd::matrix_view<G>{}, ho,
      scale_h, tropd::view_of(sum_h));
  REQUIRE_MESSAGE(hs.ok(), hs.message());

  std::vector<double> loss_d;
  std::vector<G> grad_d;
  std::vector<te::row_summary> sum_d;
  const tg::run_status rs = tg::gpu_divergence(est, c, zs, zt, loss_d, grad_d, sum_d);
  REQUIRE_HARNESS(rs);
  REQUIRE_MESSAGE(rs.call.ok(), rs.call.message());
  REQUIRE_MESSAGE(rs.device.ok(), rs.device.message());
  const double tol = tol_of<T>();
  for (index_t r = 0; r < c.rows; ++r) {
    const auto& a = sum_d[static_cast<size_t>(r)];
    const auto& b = sum_h[static_cast<size_t>(r)];
    CHECK_MESSAGE(close(loss_d[static_cast<size_t>(r)], loss_h[static_cast<size_t>(r)], tol), "row ", r, ": loss ",
                  loss_d[static_cast<size_t>(r)], " vs host ", loss_h[static_cast<size_t>(r)]);
    CHECK_MESSAGE((close(a.lse_s, b.lse_s, tol) && close(a.lse_t, b.lse_t, tol) && close(a.ent_s, b.ent_s, tol) &&
                   close(a.ent_t, b.ent_t, tol) && close(a.rkl, b.rkl, tol) && close(a.fkl, b.fkl, tol)),
                  "row ", r, ": summary differs");
  }
  if (c.with_grad) {
    if constexpr (std::is_same_v<Est, te::total_variation>) {
      const std::vector<char> ties = near_ties(zs, zt, c);
      check_grad(grad_d, grad_h, c, tol, name, prob_scale(zs, c), &ties);
    } else {
      check_grad(grad_d, grad_h, c, tol, name, prob_scale(zs, c));
    }
  } else {
    CHECK(grad_d.empty());
  }
}

template <class T>
void all_divergences(tg::row_case c, std::mt19937_64& rng) {
  check_divergence<te::reverse_kl, T>(te::reverse_kl{}, c, rng, "reverse_kl");
  check_divergence<te::forward_kl, T>(te::forward_kl{}, c, rng, "forward_kl");
  check_divergence<te::jsd, T>(te::jsd{0.3}, c, rng, "jsd(0.3)");
  check_divergence<te::total_variation, T>(te::total_variation{}, c, rng, "total_variation");
}

/// A test vocabulary, capped at TROPD_GPU_TEST_MAX_V when that is set to a positive number
/// (scripts/gpu_check.sh's compute-sanitizer runs: every code path, shorter rows; at a cap
/// below 8192 the heuristic cases take the fused path). V itself otherwise.
index_t cap_v(index_t V) {
  static const index_t cap = [] {
    const char* e = std::getenv("TROPD_GPU_TEST_MAX_V");
    return e ? static_cast<index_t>(std::strtoll(e, nullptr, 10)) : index_t(0);
  }();
  return cap > 0 && V > cap ? cap : V;
}

index_t rows_for(index_t V) { return V >= 100000 ? 6 : (V >= 1000 ? 40 : 64); }

}  // namespace

TEST_CASE("gpu divergence_rows (fused, one block per row) matches the host: V in {1, 31, 1000, 128256}, fp32 and bf16") {
  std::mt19937_64 rng(20261127);
  for (index_t V : {index_t(1), index_t(31), index_t(1000), cap_v(128256)}) {
    tg::row_case c;
    c.rows = rows_for(V);
    c.V = V;
    c.blocks_per_row = 1;
    all_divergences<float>(c, rng);
    all_divergences<tropd::bf16>(c, rng);
  }
}

TEST_CASE("gpu divergence_rows split-row path (several blocks per row) matches the host") {
  std::mt19937_64 rng(7);
  for (index_t V : {index_t(1), index_t(31), index_t(1000), cap_v(128256)}) {
    tg::row_case c;
    c.rows = V >= 100000 ? 3 : 9;
    c.V = V;
    c.blocks_per_row = 7;
    all_divergences<float>(c, rng);
    check_divergence<te::jsd, tropd::bf16>(te::jsd{0.7}, c, rng, "jsd(0.7) split");
  }
  // The heuristic: 3 rows of 128256 on any GPU (>= 1 SM) take the split path.
  tg::row_case c;
  c.rows = 3;
  c.V = cap_v(128256);
  c.blocks_per_row = 0;
  check_divergence<te::reverse_kl, float>(te::reverse_kl{}, c, rng, "reverse_kl heuristic");
  check_divergence<te::total_variation, tropd::bf16>(te::total_variation{}, c, rng, "total_variation heuristic");
  c.rows = 1;
  c.V = cap_v(262144);
  check_divergence<te::jsd, float>(te::jsd{0.5}, c, rng, "jsd heuristic one row");
}

TEST_CASE("gpu divergence_rows: strides (scalar fallback), temperatures, grad_scale, fp16 inputs, fp64 gradients, value only") {
  std::mt19937_64 rng(11);
  for (int split : {1, 5}) {
    for (index_t V : {index_t(31), index_t(1000), cap_v(128256)}) {
      tg::row_case c;
      c.rows = V >= 100000 ? 4 : 17;
      c.V = V;
      c.blocks_per_row = split;
      c.student_stride = V + 3;
      c.teacher_stride = V + 5;
      c.grad_stride = V + 2;
      c.ts = 1.7;
      c.tt = 0.6;
      std::uniform_real_distribution<double> u(-2.0, 3.0);
      for (index_t r = 0; r < c.rows; ++r) c.grad_scale.push_back(r % 5 == 2 ? 0.0 : u(rng));
      all_divergences<float>(c, rng);
      check_divergence<te::reverse_kl, tropd::fp16>(te::reverse_kl{}, c, rng, "reverse_kl fp16", 1.0);
      check_divergence<te::reverse_kl, float, double>(te::reverse_kl{}, c, rng, "reverse_kl fp64 grad");
      // Aligned rows with an fp64 gradient (vector path with two 16-byte stores per 4 elements).
      tg::row_case a;
      a.rows = c.rows;
      a.V = V;
      a.blocks_per_row = split;
      check_divergence<te::reverse_kl, float, double>(te::reverse_kl{}, a, rng, "reverse_kl fp64 grad aligned");
      check_divergence<te::reverse_kl, tropd::fp16>(te::reverse_kl{}, a, rng, "reverse_kl fp16 aligned", 1.0);
      a.with_grad = false;
      check_divergence<te::jsd, float>(te::jsd{0.5}, a, rng, "jsd value only");
      check_divergence<te::forward_kl, tropd::bf16>(te::forward_kl{}, a, rng, "forward_kl value only");
    }
  }
  // JSD's beta = 0 and beta = 1 limits.
  tg::row_case c;
  c.rows = 8;
  c.V = 1000;
  check_divergence<te::jsd, float>(te::jsd{0.0}, c, rng, "jsd(0)");
  check_divergence<te::jsd, float>(te::jsd{1.0}, c, rng, "jsd(1)");
}

TEST_CASE("gpu divergence_rows: argument errors are returned, data errors land in the status word") {
  std::mt19937_64 rng(5);
  for (int split : {1, 4}) {
    CAPTURE(split);
    tg::row_case c;
    c.rows = 6;
    c.V = 1000;
    c.blocks_per_row = split;
    auto zs = random_logits<float>(rng, c.rows, c.V, c.V, 2.0);
    auto zt = random_logits<float>(rng, c.rows, c.V, c.V, 2.0);
    std::vector<double> loss;
    std::vector<float> grad;
    std::vector<te::row_summary> sums;

    // The first bad (row, column) in the host's order: row 2, where the student's NaN at column
    // 900 comes before the teacher's +inf at column 700 (the same 1024-column chunk: the host
    // reads the student's chunk first).
    zs[4 * 1000 + 10] = std::numeric_limits<float>::quiet_NaN();
    zt[2 * 1000 + 700] = std::numeric_limits<float>::infinity();
    zs[2 * 1000 + 900] = std::numeric_limits<float>::quiet_NaN();
    tg::run_status rs = tg::gpu_divergence(te::reverse_kl{}, c, zs, zt, loss, grad, sums);
    REQUIRE_HARNESS(rs);
    REQUIRE(rs.call.ok());
    {
      std::vector<double> lh(size_t(c.rows));
      const tropd::status hs = tropd::host::divergence_rows(te::reverse_kl{}, tropd::make_matrix<const float>(zs.data(), c.rows, c.V),
                                                            tropd::make_matrix<const float>(zt.data(), c.rows, c.V), tropd::view_of(lh));
      CHECK(rs.device.code == hs.code);
      CHECK(rs.device.row == hs.row);
      CHECK(rs.device.col == hs.col);
    }
    CHECK(rs.device.code == tropd::errc::non_finite_input);
    CHECK(rs.device.row == 2);
    CHECK(rs.device.col == 900);
    CHECK(std::string(rs.device.detail).find("student") != std::string::npos);
    CHECK(std::isnan(loss[2]));
    CHECK(std::isnan(loss[4]));
    for (index_t r : {0, 1, 3, 5}) CHECK(std::isfinite(loss[static_cast<size_t>(r)]));
    CHECK(std::isnan(grad[2 * 1000 + 5]));

    // R1: a finite logit that leaves fp32 once divided by the temperature is unsupported.
    zs = random_logits<float>(rng, c.rows, c.V, c.V, 2.0);
    zt = random_logits<float>(rng, c.rows, c.V, c.V, 2.0);
    zs[static_cast<size_t>(1 * c.V + 333)] = 3.0e38f;
    c.ts = 0.5;
    rs = tg::gpu_divergence(te::forward_kl{}, c, zs, zt, loss, grad, sums);
    REQUIRE_HARNESS(rs);
    CHECK(rs.device.code == tropd::errc::unsupported);
    CHECK(rs.device.row == 1);
    CHECK(rs.device.col == 333);
    c.ts = 1;

    // A student row without a finite entry.
    zs = random_logits<float>(rng, c.rows, c.V, c.V, 2.0);
    zt = random_logits<float>(rng, c.rows, c.V, c.V, 2.0);
    for (index_t j = 0; j < c.V; ++j) zs[static_cast<size_t>(3 * c.V + j)] = -std::numeric_limits<float>::infinity();
    rs = tg::gpu_divergence(te::forward_kl{}, c, zs, zt, loss, grad, sums);
    REQUIRE_HARNESS(rs);
    CHECK(rs.device.code == tropd::errc::no_finite_entry);
    CHECK(rs.device.row == 3);
    CHECK(rs.device.col == -1);

    // Reverse KL with q = 0 < p: infinite.
    zs = random_logits<float>(rng, c.rows, c.V, c.V, 2.0);
    zt[static_cast<size_t>(5 * c.V + 17)] = -std::numeric_limits<float>::infinity();
    rs = tg::gpu_divergence(te::reverse_kl{}, c, zs, zt, loss, grad, sums);
    REQUIRE_HARNESS(rs);
    CHECK(rs.device.code == tropd::errc::infinite_divergence);
    CHECK(rs.device.row == 5);
    // ... while forward KL of the same rows is finite.
    rs = tg::gpu_divergence(te::forward_kl{}, c, zs, zt, loss, grad, sums);
    REQUIRE_HARNESS(rs);
    CHECK(rs.device.ok());

    // grad_scale not finite.
    c.grad_scale.assign(static_cast<size_t>(c.rows), 1.0);
    c.grad_scale[1] = std::numeric_limits<double>::infinity();
    rs = tg::gpu_divergence(te::forward_kl{}, c, zs, zt, loss, grad, sums);
    REQUIRE_HARNESS(rs);
    CHECK(rs.device.code == tropd::errc::non_finite_input);
    CHECK(rs.device.row == 1);
    c.grad_scale.clear();

    // Host-side errors: nothing launched.
    c.small_scratch = true;
    rs = tg::gpu_divergence(te::reverse_kl{}, c, zs, zt, loss, grad, sums);
    REQUIRE_HARNESS(rs);
    CHECK(rs.call.code == tropd::errc::insufficient_scratch);
    c.small_scratch = false;
    rs = tg::gpu_divergence(te::jsd{2.0}, c, zs, zt, loss, grad, sums);
    REQUIRE_HARNESS(rs);
    CHECK(rs.call.code == tropd::errc::invalid_parameter);
    c.ts = 0;
    rs = tg::gpu_divergence(te::reverse_kl{}, c, zs, zt, loss, grad, sums);
    REQUIRE_HARNESS(rs);
    CHECK(rs.call.code == tropd::errc::invalid_parameter);
  }
}

// ---------------------------------------------------------------------------
// Sampled-token estimators
// ---------------------------------------------------------------------------

namespace {

template <class E, class U, class T>
void check_sampled(tg::row_case c, std::mt19937_64& rng, bool with_s_old, const char* name) {
  CAPTURE(describe(c, name));
  CAPTURE(std::string(type_name<T>()));
  CAPTURE(with_s_old);
  const te::sampled<E, U> est{};
  const auto zs = random_logits<T>(rng, c.rows, c.V, c.ss(), 1.5);
  const auto zt = random_logits<T>(rng, c.rows, c.V, c.st(), 1.5);
  // Every coefficient dL/ds here vanishes where t = s (k2, k3 as losses) or t = s_old (the PG
  // rewards), so near those points an fp32-level difference in the log-sum-exps (both backends
  // sum fp32 partials, in different orders) is amplified without bound. Keep the test away from
  // them: y with |t - s| >= 0.5 and s_old with |t - s_old| >= 0.5 (computed in double).
  std::normal_distribution<double> jitter(0.0, 0.2);
  std::vector<int32_t> ids(static_cast<size_t>(c.rows));
  std::vector<double> s_old;
  for (index_t r = 0; r < c.rows; ++r) {
    std::vector<double> ls(static_cast<size_t>(c.V)), lt(static_cast<size_t>(c.V));
    for (index_t j = 0; j < c.V; ++j) {
      ls[static_cast<size_t>(j)] = double(tropd::to_acc(zs[static_cast<size_t>(r * c.ss() + j)])) / c.ts;
      lt[static_cast<size_t>(j)] = double(tropd::to_acc(zt[static_cast<size_t>(r * c.st() + j)])) / c.tt;
    }
    for (auto* v : {&ls, &lt}) {
      double m = ninf, sum = 0;
      for (double x : *v) m = std::max(m, x);
      for (double x : *v) sum += std::exp(x - m);
      for (double& x : *v) x -= m + std::log(sum);
    }
    std::vector<int32_t> ok;
    for (index_t j = 0; j < c.V; ++j)
      if (std::fabs(lt[static_cast<size_t>(j)] - ls[static_cast<size_t>(j)]) >= 0.5) ok.push_back(static_cast<int32_t>(j));
    if (ok.empty()) ok.push_back(0);  // V = 1: s = t = 0, every coefficient is exactly 0 on both sides
    const int32_t y = ok[std::uniform_int_distribution<size_t>(0, ok.size() - 1)(rng)];
    ids[static_cast<size_t>(r)] = y;
    if (with_s_old) {
      const double sy = ls[static_cast<size_t>(y)], ty = lt[static_cast<size_t>(y)];
      double so = sy + jitter(rng);
      for (int tries = 0; tries < 100 && std::fabs(ty - so) < 0.5; ++tries) so = sy + jitter(rng);
      if (std::fabs(ty - so) < 0.5) so = ty + (sy >= ty ? 0.5 : -0.5);
      s_old.push_back(so);
    }
  }
  std::vector<double> loss_h(static_cast<size_t>(c.rows));
  std::vector<float> grad_h(static_cast<size_t>(c.rows * c.V));
  tropd::host::row_options ho;
  ho.student_temperature = c.ts;
  ho.teacher_temperature = c.tt;
  const tropd::status hs = tropd::host::sampled_rows(
      est, tropd::make_matrix<const T>(zs.data(), c.rows, c.V, c.ss()), tropd::make_matrix<const T>(zt.data(), c.rows, c.V, c.st()),
      tropd::vector_view<const int32_t>{ids.data(), c.rows}, tropd::vector_view<const double>{s_old.data(), index_t(s_old.size())},
      tropd::view_of(loss_h), c.with_grad ? tropd::make_matrix<float>(grad_h.data(), c.rows, c.V) : tropd::matrix_view<float>{}, ho,
      tropd::vector_view<const double>{c.grad_scale.data(), index_t(c.grad_scale.size())});
  REQUIRE_MESSAGE(hs.ok(), hs.message());
  std::vector<double> loss_d;
  std::vector<float> grad_d;
  const tg::run_status rs = tg::gpu_sampled(est, c, zs, zt, ids, s_old, loss_d, grad_d);
  REQUIRE_HARNESS(rs);
  REQUIRE_MESSAGE(rs.call.ok(), rs.call.message());
  REQUIRE_MESSAGE(rs.device.ok(), rs.device.message());
  const double tol = tol_of<T>();
  for (index_t r = 0; r < c.rows; ++r)
    CHECK_MESSAGE(close(loss_d[static_cast<size_t>(r)], loss_h[static_cast<size_t>(r)], tol), "row ", r, ": loss ",
                  loss_d[static_cast<size_t>(r)], " vs host ", loss_h[static_cast<size_t>(r)]);
  if (c.with_grad) check_grad(grad_d, grad_h, c, tol, name, prob_scale(zs, c));
}

template <class T>
void all_sampled(const tg::row_case& c, std::mt19937_64& rng) {
  for (bool so : {false, true}) {
    check_sampled<te::k1, te::as_pg_reward, T>(c, rng, so, "k1 as PG reward");
    if constexpr (std::is_same_v<T, float>) {
      check_sampled<te::k2, te::as_loss, T>(c, rng, so, "k2 as loss");
      check_sampled<te::k3, te::as_loss, T>(c, rng, so, "k3 as loss");
      check_sampled<te::k3, te::as_pg_reward, T>(c, rng, so, "k3 as PG reward");
      check_sampled<te::k2, te::as_pg_reward, T>(c, rng, so, "k2 as PG reward");
    }
  }
}

}  // namespace

TEST_CASE("gpu sampled_rows (k1/k2/k3, both usages) matches the host, fused and split") {
  std::mt19937_64 rng(99);
  for (int split : {1, 6}) {
    for (index_t V : {index_t(1), index_t(31), index_t(1000), cap_v(128256)}) {
      tg::row_case c;
      c.rows = rows_for(V);
      c.V = V;
      c.blocks_per_row = split;
      all_sampled<float>(c, rng);
      all_sampled<tropd::bf16>(c, rng);
    }
  }
  tg::row_case c;
  c.rows = 13;
  c.V = 1000;
  c.student_stride = 1001;
  c.teacher_stride = 1003;
  c.grad_stride = 1002;
  c.ts = 0.7;
  c.tt = 1.3;
  for (index_t r = 0; r < c.rows; ++r) c.grad_scale.push_back(r == 4 ? 0.0 : 0.5 + 0.1 * double(r));
  all_sampled<float>(c, rng);
}

TEST_CASE("gpu sampled_rows: ids out of range and zero teacher mass land in the status word") {
  std::mt19937_64 rng(3);
  tg::row_case c;
  c.rows = 5;
  c.V = 31;
  const auto zs = random_logits<float>(rng, c.rows, c.V, c.V, 1.0);
  auto zt = random_logits<float>(rng, c.rows, c.V, c.V, 1.0);
  std::vector<int32_t> ids = {1, 2, 31, -4, 0};
  std::vector<double> loss;
  std::vector<float> grad;
  tg::run_status rs = tg::gpu_sampled(te::sampled<te::k1, te::as_pg_reward>{}, c, zs, zt, ids, {}, loss, grad);
  REQUIRE_HARNESS(rs);
  CHECK(rs.device.code == tropd::errc::id_out_of_range);
  CHECK(rs.device.row == 2);
  CHECK(rs.device.col == 31);
  CHECK(std::isnan(loss[2]));
  CHECK(std::isnan(loss[3]));
  CHECK(std::isfinite(loss[4]));
  ids = {1, 2, 3, 4, 5};
  zt[static_cast<size_t>(1 * c.V + 2)] = -std::numeric_limits<float>::infinity();
  rs = tg::gpu_sampled(te::sampled<te::k1, te::as_pg_reward>{}, c, zs, zt, ids, {}, loss, grad);
  REQUIRE_HARNESS(rs);
  CHECK(rs.device.code == tropd::errc::infinite_divergence);
  CHECK(rs.device.row == 1);
  CHECK(rs.device.col == 2);
}

// ---------------------------------------------------------------------------
// Teacher top-k forward KL with given lists
// ---------------------------------------------------------------------------

namespace {

/// Teacher top-k lists from a random teacher distribution: the K most likely ids with their
/// log-probs (unsorted; the last `pad` entries of every third row are -inf padding). For the
/// renormalised tail the log-probs are shifted by +0.3 (unnormalised, as a server may send).
void make_lists(std::mt19937_64& rng, index_t rows, index_t V, index_t K, te::topk_tail tail, std::vector<int32_t>& ids,
                std::vector<float>& lp) {
  std::normal_distribution<double> nd(0.0, 2.0);
  ids.assign(static_cast<size_t>(rows * K), 0);
  lp.assign(static_cast<size_t>(rows * K), 0.f);
  for (index_t r = 0; r < rows; ++r) {
    std::vector<double> u(static_cast<size_t>(V));
    for (auto& x : u) x = nd(rng);
    double m = *std::max_element(u.begin(), u.end()), s = 0;
    for (double x : u) s += std::exp(x - m);
    const double lse = m + std::log(s);
    std::vector<int32_t> order(static_cast<size_t>(V));
    std::iota(order.begin(), order.end(), 0);
    const index_t kk = std::min(K, V);
    std::partial_sort(order.begin(), order.begin() + kk, order.end(),
                      [&](int32_t a, int32_t b) { return u[static_cast<size_t>(a)] > u[static_cast<size_t>(b)]; });
    std::shuffle(order.begin(), order.begin() + kk, rng);
    const index_t pad = (r % 3 == 1 && kk > 2) ? 2 : 0;
    for (index_t i = 0; i < K; ++i) {
      const size_t at = static_cast<size_t>(r * K + i);
      if (i >= kk - pad) {
        ids[at] = static_cast<int32_t>(i % V);  // ignored: padding
        lp[at] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const int32_t id = order[static_cast<size_t>(i)];
      ids[at] = id;
      double l = u[static_cast<size_t>(id)] - lse;
      if (tail == te::topk_tail::renormalised) l += 0.3;
      lp[at] = static_cast<float>(l);
    }
  }
}

template <class T>
void check_topk(tg::row_case c, index_t K, te::topk_tail tail, std::mt19937_64& rng) {
  CAPTURE(describe(c, tropd::estimators::to_string(tail)));
  CAPTURE(std::string(type_name<T>()));
  CAPTURE(K);
  const te::topk_forward_kl est{64, tail};
  const auto zs = random_logits<T>(rng, c.rows, c.V, c.ss(), 1.5);
  std::vector<int32_t> ids;
  std::vector<float> lp;
  make_lists(rng, c.rows, c.V, K, tail, ids, lp);
  std::vector<double> loss_h(static_cast<size_t>(c.rows));
  std::vector<float> grad_h(static_cast<size_t>(c.rows * c.V));
  tropd::host::row_options ho;
  ho.student_temperature = c.ts;
  const tropd::host::topk_lists lists{tropd::make_matrix<const int32_t>(ids.data(), c.rows, K),
                                      tropd::values_matrix(tropd::make_matrix<const float>(lp.data(), c.rows, K))};
  const tropd::status hs = tropd::host::topk_forward_kl_rows(
      est, tropd::make_matrix<const T>(zs.data(), c.rows, c.V, c.ss()), lists, tropd::view_of(loss_h),
      c.with_grad ? tropd::make_matrix<float>(grad_h.data(), c.rows, c.V) : tropd::matrix_view<float>{}, ho,
      tropd::vector_view<const double>{c.grad_scale.data(), index_t(c.grad_scale.size())});
  REQUIRE_MESSAGE(hs.ok(), hs.message());
  std::vector<double> loss_d;
  std::vector<float> grad_d;
  const tg::run_status rs = tg::gpu_topk(est, c, zs, ids, lp, K, loss_d, grad_d);
  REQUIRE_HARNESS(rs);
  REQUIRE_MESSAGE(rs.call.ok(), rs.call.message());
  REQUIRE_MESSAGE(rs.device.ok(), rs.device.message());
  const double tol = tol_of<T>();
  for (index_t r = 0; r < c.rows; ++r)
    CHECK_MESSAGE(close(loss_d[static_cast<size_t>(r)], loss_h[static_cast<size_t>(r)], tol), "row ", r, ": loss ",
                  loss_d[static_cast<size_t>(r)], " vs host ", loss_h[static_cast<size_t>(r)]);
  if (c.with_grad) check_grad(grad_d, grad_h, c, tol, "topk_forward_kl", prob_scale(zs, c));
}

}  // namespace

TEST_CASE("gpu topk_forward_kl_rows (given lists: raw, renormalised, tail bucket) matches the host, fused and split") {
  std::mt19937_64 rng(64);
  for (int split : {1, 5}) {
    for (index_t V : {index_t(1), index_t(31), index_t(1000), cap_v(128256)}) {
      for (index_t K : {index_t(1), index_t(8), index_t(64)}) {
        if (K > V) continue;
        for (te::topk_tail tail : {te::topk_tail::raw, te::topk_tail::renormalised, te::topk_tail::tail_bucket}) {
          if (tail == te::topk_tail::tail_bucket && K == V) continue;  // S_K = 1: the tail bucket is empty
          tg::row_case c;
          c.rows = V >= 100000 ? 4 : 24;
          c.V = V;
          c.blocks_per_row = split;
          check_topk<float>(c, K, tail, rng);
          check_topk<tropd::bf16>(c, K, tail, rng);
        }
      }
    }
  }
  tg::row_case c;
  c.rows = 10;
  c.V = 1000;
  c.student_stride = 1003;
  c.grad_stride = 1001;
  c.ts = 1.4;
  for (index_t r = 0; r < c.rows; ++r) c.grad_scale.push_back(r == 7 ? 0.0 : 1.0 / double(r + 1));
  check_topk<float>(c, 64, te::topk_tail::renormalised, rng);
  c.blocks_per_row = 3;
  check_topk<float>(c, 64, te::topk_tail::raw, rng);
}

TEST_CASE("gpu topk_forward_kl_rows: bad lists land in the status word") {
  std::mt19937_64 rng(8);
  tg::row_case c;
  c.rows = 4;
  c.V = 100;
  const index_t K = 8;
  const auto zs = random_logits<float>(rng, c.rows, c.V, c.V, 1.0);
  std::vector<int32_t> ids;
  std::vector<float> lp;
  make_lists(rng, c.rows, c.V, K, te::topk_tail::renormalised, ids, lp);
  ids[static_cast<size_t>(2 * K + 5)] = ids[static_cast<size_t>(2 * K + 1)];  // row 2 entry 5 repeats entry 1
  ids[static_cast<size_t>(3 * K + 0)] = 100;                                   // row 3 entry 0 out of range
  std::vector<double> loss;
  std::vector<float> grad;
  tg::run_status rs = tg::gpu_topk(te::topk_forward_kl{}, c, zs, ids, lp, K, loss, grad);
  REQUIRE_HARNESS(rs);
  CHECK(rs.device.code == tropd::errc::duplicate_topk_id);
  CHECK(rs.device.row == 2);
  CHECK(rs.device.col == 5);
  CHECK(std::isnan(loss[2]));
  CHECK(std::isnan(loss[3]));
  CHECK(std::isfinite(loss[0]));
  // raw tail with a list heavier than 1 (row 2, no padding): topk_forward_kl::eval rejects it.
  make_lists(rng, c.rows, c.V, K, te::topk_tail::raw, ids, lp);
  for (index_t i = 0; i < K; ++i) lp[static_cast<size_t>(2 * K + i)] = -0.5f;
  rs = tg::gpu_topk(te::topk_forward_kl{64, te::topk_tail::raw}, c, zs, ids, lp, K, loss, grad);
  REQUIRE_HARNESS(rs);
  CHECK(rs.device.code == tropd::errc::invalid_topk_list);
  CHECK(rs.device.row == 2);
  CHECK(std::isfinite(loss[1]));
}


TEST_CASE("gpu topk_forward_kl_rows with the top-k selected from teacher logits matches the host (ties, V < k, K = 1024)") {
  std::mt19937_64 rng(65);
  for (int split : {1, 4})
    for (index_t V : {index_t(1), index_t(31), index_t(1000), index_t(5000)})
      for (int k : {1, 16, 64, 1024})
        for (te::topk_tail tail : {te::topk_tail::raw, te::topk_tail::renormalised, te::topk_tail::tail_bucket}) {
          if (V > 1000 && k < 64) continue;
          tg::row_case c;
          c.rows = 7;
          c.V = V;
          c.blocks_per_row = split;
          c.tt = 0.9;
          CAPTURE(describe(c, tropd::estimators::to_string(tail)));
          CAPTURE(k);
          const te::topk_forward_kl est{k, tail};
          auto check = [&](auto tag, double sd) {
            using T = decltype(tag);
            const auto zs = random_logits<T>(rng, c.rows, c.V, c.V, 1.5);
            const auto zt = random_logits<T>(rng, c.rows, c.V, c.V, sd);  // bf16 at sd 0.3: many ties
            std::vector<double> loss_h(static_cast<size_t>(c.rows));
            std::vector<float> grad_h(static_cast<size_t>(c.rows * c.V));
            tropd::host::row_options ho;
            ho.teacher_temperature = c.tt;
            const tropd::status hs = tropd::host::topk_forward_kl_rows(est, tropd::make_matrix<const T>(zs.data(), c.rows, c.V),
                                                                       tropd::make_matrix<const T>(zt.data(), c.rows, c.V),
                                                                       tropd::view_of(loss_h), tropd::make_matrix<float>(grad_h.data(), c.rows, c.V), ho);
            std::vector<double> loss_d;
            std::vector<float> grad_d;
            const tg::run_status rs = tg::gpu_topk_selected(est, c, zs, zt, loss_d, grad_d);
            REQUIRE_HARNESS(rs);
            REQUIRE_MESSAGE(rs.call.ok(), rs.call.message());
            CHECK(rs.device.code == hs.code);
            if (!hs.ok()) return;
            const double tol = tol_of<T>();
            for (index_t r = 0; r < c.rows; ++r) CHECK_MESSAGE(close(loss_d[size_t(r)], loss_h[size_t(r)], tol), "row ", r);
            check_grad(grad_d, grad_h, c, tol, "topk selected", prob_scale(zs, c));
          };
          check(float{}, 2.0);
          check(tropd::bf16{}, 0.3);
          if (V <= 1000) check(double{}, 2.0);
        }
}
