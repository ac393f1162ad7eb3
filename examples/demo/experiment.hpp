// experiment.hpp: the shared setup (teacher, student start, data), evaluation, and one
// distillation run of one method with one seed.
//
// Every method is trained by the same loop (train_run): at step i the same P prompts (a
// function of the run seed and i only) go to tropd::runtime::distill_step with that
// method's objective and prefix schedule; the student's gradients come only from the dL/dz
// the driver passes to mlp_lm::backward_logits; then one Adam step. Methods differ only in
// the objective preset and in the schedule (cosine teacher prefixes for the variants with
// off-policy guidance, none for the others).
#pragma once

#include <stdint.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <tropd/estimators/full_vocab.hpp>
#include <tropd/host/rows.hpp>
#include <tropd/objective.hpp>
#include <tropd/runtime/driver.hpp>
#include <tropd/schedules/plan.hpp>
#include <tropd/schedules/prefix.hpp>

#include "mlp.hpp"
#include "rng.hpp"
#include "task.hpp"

namespace demo {

/// Everything the command line sets.
struct options {
  std::string out = "out/demo";
  uint64_t seed_offset = 0;
  int steps = 200;
  int seeds = 5;
  int threads = 2;
  std::vector<std::string> methods;  ///< empty: all
  task_config task{};
  int window = 0;            ///< 0: the task's natural window (2 digits + 2)
  double mismatch = 0.5;
  int prompts = 32;          ///< prompts per step
  int rollouts = 4;          ///< on-policy continuations per prompt
  double lr = 1e-2;          ///< Adam learning rate of distillation (all methods; chosen for OPD on seed offset 1000)
  int eval_every = 20;
  int eval_prompts = 256;
  int eval_samples = 4;      ///< T = 1 samples per held-out prompt
  int pool = 4096;           ///< training prompts with pre-generated teacher responses
  double tau = -5.0;         ///< static log-ratio threshold of mask / clip outlier
  double reopold_floor = -5.0;
  double beta = 1e-3;        ///< off-policy guidance weight (TrOPD's)
  int topk = 0;              ///< 0: the presets' k (64 for TrOPD / FKL outlier, 16 for EOPD)
  tropd::outliers::fkl_form fkl_form = tropd::outliers::fkl_form::c;  ///< TrOPD / FKL outlier (the preset's C)
  int teacher_hidden = 128, student_hidden = 48, embed = 16;
  int teacher_sft_steps = 1500, student_sft_steps = 800, sft_batch = 64;
  double sft_lr = 3e-3;
  bool plot = true;
};

/// The methods of a default run.
inline const std::vector<std::string>& all_methods() {
  static const std::vector<std::string> m = {"opd",          "eopd",        "reopold",     "tropd",
                                             "fkl_outlier",  "mask_outlier", "clip_outlier"};
  return m;
}

/// Diagnostic methods, run only when named in --methods.
inline const std::vector<std::string>& extra_methods() {
  static const std::vector<std::string> m = {"opd_prefix"};
  return m;
}

/// One line per method for the report.
inline std::string method_summary(const std::string& m) {
  if (m == "opd") return "A = R on every student token (token-mean)";
  if (m == "eopd") return "K1 reverse KL (PPO clip 0.2) + I[H_T > 0.8] top-k FKL (form P), additive";
  if (m == "reopold") return "A = max(R, floor); phase I keeps R > floor, phase II (from N/2) top-20% student entropy; kept-token mean";
  if (m == "tropd") return "stochastic trust region, top-k FKL on outliers (form C unless --fkl-form p), guidance beta, cosine prefixes";
  if (m == "fkl_outlier") return "TrOPD without guidance (stochastic trust region + FKL outliers, no prefixes)";
  if (m == "mask_outlier") return "A = R if R > tau else dropped, + guidance and cosine prefixes";
  if (m == "clip_outlier") return "A = max(R, tau), + guidance and cosine prefixes";
  if (m == "opd_prefix") return "diagnostic: OPD's A = R on every token, + guidance and cosine prefixes";
  return "?";
}

/// The pieces every run shares (built once, read-only during the runs).
struct shared_setup {
  task_config task{};
  mlp_config teacher_cfg{}, student_cfg{};
  mlp_lm teacher, student0;  ///< the trained teacher and the student's SFT start
  std::vector<problem> eval_set;
  std::vector<std::vector<int32_t>> eval_prompts;
  std::vector<tropd::schedules::prompt_example> pool;  ///< prompts + pre-generated teacher responses
  double teacher_sft_loss = 0, student_sft_loss = 0;
};

/// Held-out evaluation of a student.
struct eval_result {
  double accuracy = 0;         ///< sampled pass@1: mean over held-out prompts and k samples (T = 1) of "correct"
  double greedy_accuracy = 0;  ///< greedy-decoding pass@1
  double reverse_kl = 0;       ///< mean over the samples' response positions of KL(p_S || p_T)
  double tv = 0;               ///< mean total variation over the same positions
  double r_lt5 = 0;            ///< fraction of sampled student tokens with R = log p_T - log p_S < -5
};

/// Evaluates `model` against `teacher` on the held-out prompts: `k` samples per prompt at
/// T = 1 (seeded by sample_seed) for the sampled accuracy and the divergences, and greedy
/// decoding for the greedy accuracy.
inline eval_result evaluate(mlp_lm& model, mlp_lm& teacher, const shared_setup& S, uint64_t sample_seed, int k) {
  const task_config& t = S.task;
  const int max_new = t.response_length() + 2;
  eval_result r;
  std::vector<int32_t> tokens;
  std::vector<tropd::index_t> offsets{0};
  std::vector<uint8_t> is_response;
  for (size_t i = 0; i < S.eval_set.size(); ++i) {
    const auto& prompt = S.eval_prompts[i];
    const auto greedy = model.sample(prompt, max_new, 0.0, 0);
    r.greedy_accuracy += verify(t, S.eval_set[i], greedy) ? 1.0 : 0.0;
    for (int j = 0; j < k; ++j) {
      const auto cont = model.sample(prompt, max_new, 1.0, seed_of({sample_seed, tag::eval_sampling, i, uint64_t(j)}));
      r.accuracy += verify(t, S.eval_set[i], cont) ? 1.0 : 0.0;
      tokens.insert(tokens.end(), prompt.begin(), prompt.end());
      tokens.insert(tokens.end(), cont.begin(), cont.end());
      is_response.insert(is_response.end(), prompt.size(), 0);
      is_response.insert(is_response.end(), cont.size(), 1);
      offsets.push_back(static_cast<tropd::index_t>(tokens.size()));
    }
  }
  const double ne = double(S.eval_set.size());
  r.greedy_accuracy /= ne;
  r.accuracy /= ne * double(k);

  const tropd::index_t n = static_cast<tropd::index_t>(tokens.size()), V = model.vocab_size();
  tropd::runtime::sequence_batch b{tokens, offsets};
  rmat zs(n, V), zt(n, V);
  tropd::throw_if_error(model.logits(b, tropd::make_matrix(zs.data(), n, V)));
  tropd::throw_if_error(teacher.logits(b, tropd::make_matrix(zt.data(), n, V)));
  // Keep the response rows only.
  std::vector<tropd::index_t> rows;
  for (tropd::index_t i = 0; i < n; ++i)
    if (is_response[size_t(i)]) rows.push_back(i);
  const tropd::index_t m = static_cast<tropd::index_t>(rows.size());
  rmat ps(m, V), pt(m, V);
  double lt5 = 0;
  for (tropd::index_t k = 0; k < m; ++k) {
    const tropd::index_t i = rows[size_t(k)];
    ps.row(k) = zs.row(i);
    pt.row(k) = zt.row(i);
    auto logp = [&](const rmat& z, tropd::index_t row, int32_t y) {
      const float mx = z.row(row).maxCoeff();
      return double(z(row, y) - mx) - std::log(double((z.row(row).array() - mx).exp().sum()));
    };
    const int32_t y = tokens[size_t(i)];
    if (logp(zt, i, y) - logp(zs, i, y) < -5.0) lt5 += 1;
  }
  std::vector<double> kl(static_cast<size_t>(m)), tv(static_cast<size_t>(m));
  const auto cs = tropd::make_matrix<const float>(ps.data(), m, V);
  const auto ct = tropd::make_matrix<const float>(pt.data(), m, V);
  tropd::throw_if_error(tropd::host::divergence_rows(tropd::estimators::reverse_kl{}, cs, ct, tropd::view_of(kl)));
  tropd::throw_if_error(tropd::host::divergence_rows(tropd::estimators::total_variation{}, cs, ct, tropd::view_of(tv)));
  for (tropd::index_t k = 0; k < m; ++k) {
    r.reverse_kl += kl[size_t(k)];
    r.tv += tv[size_t(k)];
  }
  r.reverse_kl /= double(m);
  r.tv /= double(m);
  r.r_lt5 = lt5 / double(m);
  return r;
}

/// One row of a run's curve. Training columns describe the update made at `step` (from
/// the model after `step` updates); evaluation columns (NaN where not evaluated) describe
/// the model after `step` updates.
struct curve_row {
  int step = 0;
  double loss = NAN, grad_norm = NAN, trust_fraction = NAN, outlier_fraction = NAN, tv_estimate = NAN;
  double prefix_fraction = NAN, student_tokens = NAN, loss_trust = NAN, loss_outlier = NAN, loss_guidance = NAN;
  double accuracy = NAN, greedy_accuracy = NAN, reverse_kl = NAN, heldout_tv = NAN, heldout_r_lt5 = NAN;
};

struct run_result {
  std::string method;
  uint64_t seed = 0;
  eval_result final{};
  bool diverged = false;
  std::string why;           ///< reason of divergence
  int steps_done = 0;
  double grad_norm_max = 0, grad_norm_var = 0, grad_norm_mean = 0;
  double wall_s = 0;
  std::vector<curve_row> curve;
};

/// One distillation run: `obj` with prefix schedule `sched`, seed index `si`.
template <class Obj, class Sched>
run_result train_run(const shared_setup& S, const options& o, const std::string& method, int si, const Obj& obj,
                     const Sched& sched, double initial_accuracy) {
  const auto t0 = std::chrono::steady_clock::now();
  run_result res;
  res.method = method;
  res.seed = o.seed_offset + uint64_t(si);
  mlp_lm student = S.student0;  // every run starts from the same SFT student, with a fresh Adam
  student.reset_optimizer();
  mlp_lm teacher = S.teacher;   // a private copy (the models cache activations)

  tropd::runtime::step_config cfg;
  cfg.total_steps = o.steps;
  cfg.n = o.rollouts;
  cfg.max_new_tokens = S.task.response_length() + 2;
  cfg.temperature = 1.0;
  cfg.seed = seed_of({res.seed, tag::run});  // method-independent: same samples' seeds, same trust draws
  cfg.end_token = S.task.eos();
  cfg.threads = 1;  // one job per core: jobs run in parallel, each single-threaded

  std::vector<tropd::schedules::prompt_example> batch(size_t(o.prompts));
  std::vector<double> norms;
  const uint64_t eval_seed = seed_of({res.seed, tag::eval_sampling});
  for (int step = 0; step <= o.steps; ++step) {
    curve_row row;
    row.step = step;
    if (step % o.eval_every == 0 || step == o.steps) {
      const eval_result e = evaluate(student, teacher, S, eval_seed + uint64_t(step), o.eval_samples);
      row.accuracy = e.accuracy;
      row.greedy_accuracy = e.greedy_accuracy;
      row.reverse_kl = e.reverse_kl;
      row.heldout_tv = e.tv;
      row.heldout_r_lt5 = e.r_lt5;
      res.final = e;
    }
    if (step == o.steps) {
      res.curve.push_back(row);
      break;
    }
    // The step's prompts: a function of (seed, step) only, identical for every method.
    rng pr(seed_of({res.seed, tag::prompts, uint64_t(step)}));
    for (auto& ex : batch) ex = S.pool[size_t(pr.below(int(S.pool.size())))];
    cfg.step = step;
    student.zero_grad();
    tropd::runtime::step_report rep;
    const tropd::status st = tropd::runtime::distill_step(student, teacher, std::span<const tropd::schedules::prompt_example>(batch),
                                                          obj, sched, cfg, rep);
    if (!st.ok()) {
      res.diverged = true;
      res.why = st.message();
      res.curve.push_back(row);
      break;
    }
    const double gn = student.grad_norm();
    row.loss = rep.loss;
    row.grad_norm = gn;
    row.trust_fraction = rep.diag.trust_fraction;
    row.outlier_fraction = rep.diag.outlier_fraction;
    row.tv_estimate = rep.diag.tv_estimate;
    row.prefix_fraction = rep.mean_prefix_fraction;
    row.student_tokens = double(rep.diag.n_student);
    row.loss_trust = rep.diag.loss_trust;
    row.loss_outlier = rep.diag.loss_outlier;
    row.loss_guidance = rep.diag.loss_guidance;
    res.curve.push_back(row);
    if (!std::isfinite(rep.loss) || !std::isfinite(gn)) {
      res.diverged = true;
      res.why = "non-finite loss or gradient at step " + std::to_string(step);
      break;
    }
    norms.push_back(gn);
    student.adam_step(o.lr);
    res.steps_done = step + 1;
  }
  if (res.diverged && student.parameters_finite() && res.steps_done < o.steps) {
    res.final = evaluate(student, teacher, S, eval_seed + uint64_t(o.steps), o.eval_samples);  // where it stopped
  }
  if (!res.diverged && res.final.accuracy < 0.5 * initial_accuracy) {
    res.diverged = true;
    res.why = "accuracy collapse (final pass@1 below half of the starting student's)";
  }
  if (!norms.empty()) {
    double s = 0, s2 = 0, mx = 0;
    for (double g : norms) {
      s += g;
      mx = std::max(mx, g);
    }
    const double mean = s / double(norms.size());
    for (double g : norms) s2 += (g - mean) * (g - mean);
    res.grad_norm_mean = mean;
    res.grad_norm_max = mx;
    res.grad_norm_var = s2 / double(norms.size());
  }
  res.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

/// Runs `method` with seed index `si`: picks its objective and prefix schedule.
/// Fixed constants (chosen once, documented in docs/results.md): tau and the REOPOLD floor
/// (options), EOPD's tau 0.8 nats and k 16, TrOPD's k 64 and beta 1e-3 (the papers').
inline run_result run_method(const shared_setup& S, const options& o, const std::string& m, int si, double init_acc) {
  namespace P = tropd::presets;
  namespace SC = tropd::schedules;
  const SC::constant none{0.0};  // no teacher prefix: every sample is fully on-policy
  const SC::cosine cosine{};     // the paper's prefix schedule for the variants with guidance
  auto go = [&](const auto& obj, const auto& sched) { return train_run(S, o, m, si, obj, sched, init_acc); };
  if (m == "opd") return go(P::opd(), none);
  if (m == "eopd") {
    auto obj = P::eopd();
    if (o.topk > 0) obj.outlier.fkl.k = o.topk;
    return go(obj, none);
  }
  if (m == "reopold") return go(P::reopold({.floor = o.reopold_floor, .switch_step = SC::reopold_default_switch(o.steps)}), none);
  if (m == "tropd") return go(P::tropd({.beta = o.beta, .k = o.topk > 0 ? o.topk : 64, .form = o.fkl_form}), cosine);
  if (m == "fkl_outlier") return go(P::fkl_outlier({.k = o.topk > 0 ? o.topk : 64, .form = o.fkl_form}), none);
  if (m == "mask_outlier") return go(P::mask_outlier({.tau = o.tau, .guidance_beta = o.beta}), cosine);
  if (m == "clip_outlier") return go(P::clip_outlier({.tau = o.tau, .guidance_beta = o.beta}), cosine);
  if (m == "opd_prefix") {
    auto obj = P::opd();
    obj.guidance_beta = o.beta;
    return go(obj, cosine);
  }
  throw std::runtime_error("unknown method " + m);
}

}  // namespace demo
