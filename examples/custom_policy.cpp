// examples/custom_policy.cpp: a user-defined trust region and advantage clipper plugged
// into tropd::objective, evaluated at token level on a tiny hand-made batch.
//
// Build: the target tropd-example-custom_policy. Run it without arguments; it prints the
// aggregated loss, each token's dL/ds (what the trainer pushes through its own
// log_softmax) and the diagnostics.
#include <stdint.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include <tropd/tropd.hpp>

// A region decides, for each student-sampled token, whether it is inside the trust region
// (the trust estimator applies) or an outlier (the outlier handler applies). It needs:
//   * static constexpr bool needs_student_entropy, needs_teacher_entropy
//   * status check() const
//   * bool trusted(const regions::token_view&, const regions::batch_context&) const
// (and optionally a host-side `prepare` for batch-level decisions such as quantiles).
struct entropy_and_ratio_gate {
  static constexpr bool needs_student_entropy = true;  // reads token_view::ent_s
  static constexpr bool needs_teacher_entropy = false;
  double max_entropy = 2.0;  // trust only tokens where the student is confident ...
  double tau = -2.0;         // ... and the log-ratio R = t - s_old is above tau

  tropd::status check() const noexcept {
    if (!(max_entropy >= 0)) return tropd::make_error(tropd::errc::invalid_parameter, "max_entropy must be >= 0");
    return {};
  }
  bool trusted(const tropd::token& tok, const tropd::regions::batch_context&) const noexcept {
    return tok.ent_s <= max_entropy && tok.R > tau;
  }
};
static_assert(tropd::regions::trust_region<entropy_and_ratio_gate>);

// A clipper turns a policy-gradient advantage A into the surrogate loss L and dL/ds, with
// rho = exp(s - s_old). This one is a soft clip: A' = c tanh(A / c), L = -rho A'.
struct tanh_advantage {
  double c = 1.0;

  tropd::status check() const noexcept {
    if (!(c > 0)) return tropd::make_error(tropd::errc::invalid_parameter, "c must be > 0");
    return {};
  }
  tropd::clippers::clipped_term operator()(double a, double s, double s_old) const noexcept {
    const double clipped = c * std::tanh(a / c);
    const double rho = std::exp(s - s_old);
    tropd::clippers::clipped_term r;
    r.advantage = clipped;
    r.loss = -rho * clipped;
    r.dloss_ds = -rho * clipped;  // d(-rho A')/ds = -rho A'
    r.adv_clipped = std::fabs(a) > c;
    return r;
  }
};
static_assert(tropd::clippers::clipper<tanh_advantage>);

// The composition: region, trust estimator (OPD's reward A = t - s_old), outlier handler
// (drop the token), clipper. Everything else (guidance, aggregation) is a field.
using my_objective =
    tropd::objective<entropy_and_ratio_gate, tropd::estimators::k1_reward, tropd::outliers::drop, tanh_advantage>;

int main() {
  my_objective obj;
  obj.region.max_entropy = 2.0;
  obj.region.tau = -2.0;
  obj.clip.c = 1.0;
  obj.guidance_beta = 0.01;  // -beta log p_S(x) on teacher-prefix tokens
  obj.agg.how = tropd::aggregation::mode::token_mean;

  // Two sequences: [prompt, teacher-prefix, student, student] and [prompt, student x3].
  using tropd::origin;
  std::vector<origin> from = {origin::prompt,  origin::teacher, origin::student, origin::student,
                              origin::prompt,  origin::student, origin::student, origin::student};
  std::vector<float> s = {0.0f, -0.7f, -0.4f, -2.0f, 0.0f, -1.1f, -0.2f, -3.0f};     // current student log-probs
  std::vector<float> t = {0.0f, -0.3f, -0.6f, -6.5f, 0.0f, -0.9f, -0.25f, -1.0f};    // teacher log-probs
  std::vector<float> hs = {0.0f, 1.0f, 0.8f, 1.5f, 0.0f, 2.5f, 0.3f, 1.9f};          // student entropies
  std::vector<tropd::index_t> offsets = {0, 4, 8};

  tropd::token_batch batch;
  batch.s = tropd::view_of(s);  // s_old omitted: s_old = s (first update of a step, rho = 1)
  batch.t = tropd::view_of(t);
  batch.from = tropd::view_of(from);
  batch.seq_offsets = tropd::view_of(offsets);
  batch.student_entropy = tropd::view_of(hs);

  std::vector<float> dloss_ds(s.size()), advantage(s.size());
  std::vector<uint8_t> flags(s.size());
  tropd::token_outputs out;
  out.dloss_ds = tropd::view_of(dloss_ds);
  out.advantage = tropd::view_of(advantage);
  out.flags = tropd::view_of(flags);

  double loss = 0;
  tropd::diagnostics diag;
  out.loss = &loss;
  out.diag = &diag;
  const tropd::status st = tropd::host::evaluate_tokens(obj, batch, out, tropd::host::eval_options{});
  if (!st.ok()) {
    std::fprintf(stderr, "%s\n", st.message().c_str());
    return 1;
  }

  std::printf("loss = %.6f (normaliser %.0f)\n", loss, diag.normaliser);
  std::printf("  i  origin   R        trusted  A'        dL/ds\n");
  for (size_t i = 0; i < s.size(); ++i) {
    const char* who = from[i] == origin::prompt ? "prompt " : (from[i] == origin::teacher ? "teacher" : "student");
    std::printf("  %zu  %s  %+.3f   %s      %+.5f  %+.6f\n", i, who, double(t[i] - s[i]),
                (flags[i] & tropd::flags::trusted) ? "yes" : "no ", double(advantage[i]), double(dloss_ds[i]));
  }
  std::printf("trust fraction %.3f, outlier fraction %.3f, advantage clipped on %.3f of student tokens\n",
              diag.trust_fraction, diag.outlier_fraction, diag.adv_clip_fraction);
  std::printf("mean R inside %.4f, outside %.4f, TV estimate %.4f\n", diag.mean_R_trusted, diag.mean_R_outlier,
              diag.tv_estimate);
  std::printf("loss parts: trust %.6f, guidance %.6f\n", diag.loss_trust, diag.loss_guidance);
  return 0;
}
