// tropd/runtime/driver.hpp: one distillation step with off-policy guidance (method.md 4.4).
//
//   distill_step(student, teacher, prompts, objective, schedule, config, report)
//     1. plan      prefix length per prompt from the schedule; one off-policy sample
//                  (prompt ++ teacher prefix) and n on-policy contexts per prompt
//     2. sample    the student continues each on-policy context (seeded per continuation)
//     3. assemble  the flat batch: tokens, origin tags, CSR offsets, sequence ids
//     4. score     logits of both models (row path), or log-probs (token path)
//     5. evaluate  the objective (host/objective.hpp)
//     6. backward  dL/dz (row path) or dL/ds (token path) handed to the student
//   and returns the loss and diagnostics. The driver owns neither model nor optimiser:
//   the caller steps its optimiser after the call.
//
// Path selection:
//   1. both models expose logits: the row path (every objective, including GKD, except those
//      whose trust estimator needs a third model's log-probs: G-OPD reports errc::unsupported
//      from the driver; call host::evaluate_rows with row_inputs::ref);
//   2. the student exposes logits and the teacher is served (log-probs of the tokens, and its
//      top-k lists where the objective's outlier handler needs them): the row path with
//      host::teacher_logprobs (objectives that read the teacher's entropy, the per-position
//      KL or a dense term need the teacher's logits);
//   3. otherwise the token path with the student's and the teacher's log-probs (objectives
//      whose outlier handler needs top-k lists, whose region needs entropies, in any phase,
//      or with a dense term report errc::unsupported there).
// The served teacher's log-probs and lists, and the token path's log-probs, must be at the
// temperatures the objective should see (a served teacher cannot be re-tempered).
#pragma once

#include <stdint.h>

#include <span>
#include <vector>

#include <tropd/core/random.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token.hpp>
#include <tropd/host/objective.hpp>
#include <tropd/runtime/concepts.hpp>
#include <tropd/schedules/plan.hpp>
#include <tropd/schedules/prefix.hpp>

namespace tropd::runtime {

/// Settings of one step.
struct step_config {
  long long step = 0;         ///< optimiser step i (>= 0)
  long long total_steps = 1;  ///< N (> 0)
  long long n = 4;            ///< on-policy continuations per prompt
  int max_new_tokens = 64;    ///< sampling budget per continuation
  double temperature = 1.0;   ///< sampling temperature; the row path scores the student at the same
                              ///< temperature (p_S is the distribution the tokens were drawn from)
  uint64_t seed = 0;          ///< keys sampling, the schedule and the stochastic trust region
  schedules::prefix_cap cap = schedules::prefix_cap::per_sample_fraction;
  long long global_max = 0;   ///< global_cap only
  long long end_token = schedules::no_end_token;
  uint64_t seq_id_stride = 1'000'003;  ///< sequence ids = step * stride + offset + j (plan.hpp)
  uint64_t seq_id_offset = 0;          ///< data-parallel ranks pass disjoint offsets
  double teacher_temperature = 1.0;    ///< row path: teacher logits are divided by it
  int threads = 1;            ///< CPU threads for the row passes
  bool force_token_path = false;  ///< use log-probs even when both models expose logits
};

/// What a step returns.
struct step_report {
  double loss = 0;
  diagnostics diag{};
  schedules::batch_plan plan{};
  schedules::assembled_batch batch{};
  bool row_path = false;
  double mean_prefix_fraction = 0;  ///< mean over prompts of l / L_T (prompts with L_T > 0)
};

/// Stream id of the per-continuation sampling seeds.
inline constexpr uint32_t sampling_stream = 0x7361u;  // "sa"

/// Seed of the continuation with global sequence id `seq_id` at a step: 64 Philox bits, so
/// seeds differ across steps, continuations and (through seq_id_offset) ranks.
inline uint64_t sample_seed(uint64_t seed, long long step, uint64_t seq_id) {
  return random_bits64(draw_key{seed, static_cast<uint64_t>(step), seq_id, 0, sampling_stream});
}

/// Global sequence id of continuation c (the id assemble_batch gives its sequence).
inline uint64_t continuation_seq_id(const schedules::batch_plan& plan, index_t c) {
  return static_cast<uint64_t>(plan.step) * plan.seq_id_stride + plan.seq_id_offset +
         static_cast<uint64_t>(plan.on_policy[static_cast<size_t>(c)]);
}

template <class Student, class Teacher, class Obj, class Sched>
status distill_step(Student& student, Teacher& teacher, std::span<const schedules::prompt_example> prompts, const Obj& obj,
                    const Sched& schedule, const step_config& cfg, step_report& report) {
  static_assert(sampler<Student>,
                "tropd: the student must provide std::vector<int32_t> sample(std::span<const int32_t> context, int max_new, "
                "double temperature, uint64_t seed) (see tropd/runtime/concepts.hpp)");
  static_assert(student_with_logits<Student> || student_with_logprobs<Student>,
                "tropd: the student must provide logits(batch, matrix_view<float>) + backward_logits(batch, matrix_view<const float>) "
                "or logprobs(batch, vector_view<float>) + backward_logprobs(batch, vector_view<const float>)");
  static_assert(teacher_model<Teacher>,
                "tropd: the teacher must provide logprobs(batch, vector_view<float>) or logits(batch, matrix_view<float>)");
  static_assert(schedules::prefix_schedule<Sched>, "tropd: the schedule must satisfy tropd::schedules::prefix_schedule");

  step_report rep;
  schedules::plan_options po;
  po.step = cfg.step;
  po.total_steps = cfg.total_steps;
  po.cap = cfg.cap;
  po.global_max = cfg.global_max;
  po.n = cfg.n;
  po.seed = cfg.seed;
  po.end_token = cfg.end_token;
  po.seq_id_stride = cfg.seq_id_stride;
  po.seq_id_offset = cfg.seq_id_offset;
  if constexpr (has_vocab<Student>) po.vocab_size = student.vocab_size();
  TROPD_TRY(schedules::make_plan(schedule, prompts, po, rep.plan));

  std::vector<std::vector<int32_t>> cont(static_cast<size_t>(rep.plan.num_on_policy()));
  for (index_t c = 0; c < rep.plan.num_on_policy(); ++c) {
    const auto& ctx = rep.plan.context(c);
    cont[static_cast<size_t>(c)] = student.sample(std::span<const int32_t>(ctx.data(), ctx.size()), cfg.max_new_tokens,
                                                  cfg.temperature,
                                                  sample_seed(cfg.seed, cfg.step, continuation_seq_id(rep.plan, c)));
  }
  TROPD_TRY(schedules::assemble_batch(rep.plan, std::span<const std::vector<int32_t>>(cont.data(), cont.size()), rep.batch));
  {
    double fr = 0, np = 0;
    for (index_t p = 0; p < rep.plan.num_prompts(); ++p) {
      const index_t lt = rep.plan.teacher_length[static_cast<size_t>(p)];
      if (lt > 0) { fr += double(rep.plan.prefix_length[static_cast<size_t>(p)]) / double(lt); np += 1; }
    }
    rep.mean_prefix_fraction = np > 0 ? fr / np : 0.0;
  }

  const auto& B = rep.batch;
  const index_t n = static_cast<index_t>(B.tokens.size());
  sequence_batch sb{std::span<const int32_t>(B.tokens.data(), B.tokens.size()),
                    std::span<const index_t>(B.seq_offsets.data(), B.seq_offsets.size())};
  host::eval_options eo{.seed = cfg.seed, .step = static_cast<uint64_t>(cfg.step), .threads = cfg.threads};

  if constexpr (student_with_logits<Student> && teacher_with_logits<Teacher>) {
    if (!cfg.force_token_path) {
      const index_t V = student.vocab_size();
      if (teacher.vocab_size() != V)
        return make_error(errc::shape_mismatch, "student and teacher vocabulary sizes differ");
      std::vector<float> zs(static_cast<size_t>(n * V)), zt(static_cast<size_t>(n * V)), g(static_cast<size_t>(n * V));
      TROPD_TRY(student.logits(sb, make_matrix(zs.data(), n, V)));
      TROPD_TRY(teacher.logits(sb, make_matrix(zt.data(), n, V)));
      const host::row_inputs in{.ids = {B.tokens.data(), n},
                                .from = {B.origin.data(), n},
                                .seq_offsets = {B.seq_offsets.data(), static_cast<index_t>(B.seq_offsets.size())},
                                .seq_ids = {B.seq_ids.data(), static_cast<index_t>(B.seq_ids.size())},
                                .student_temperature = cfg.temperature,
                                .teacher_temperature = cfg.teacher_temperature};
      TROPD_TRY(host::evaluate_rows(obj, make_matrix<const float>(zs.data(), n, V), make_matrix<const float>(zt.data(), n, V), in,
                                    host::row_outputs<>{.grad = make_matrix(g.data(), n, V), .loss = &rep.loss, .diag = &rep.diag}, eo));
      TROPD_TRY(student.backward_logits(sb, make_matrix<const float>(g.data(), n, V)));
      rep.row_path = true;
      report = std::move(rep);
      return {};
    }
  }
  // A served teacher: its log-probs of the tokens and, for a top-k outlier term, its lists.
  constexpr bool served = student_with_logits<Student> && !teacher_with_logits<Teacher> && logprob_source<Teacher> &&
                          (!Obj::outlier_type::needs_topk || teacher_with_topk<Teacher>) && !Obj::has_dense &&
                          !Obj::region_type::needs_teacher_entropy && !Obj::trust_type::needs_rkl;
  if constexpr (served) {
    if (!cfg.force_token_path) {
      const index_t V = student.vocab_size();
      std::vector<float> zs(static_cast<size_t>(n * V)), g(static_cast<size_t>(n * V)), t(static_cast<size_t>(n));
      TROPD_TRY(student.logits(sb, make_matrix(zs.data(), n, V)));
      TROPD_TRY(teacher.logprobs(sb, vector_view<float>{t.data(), n}));
      host::row_inputs in{.ids = {B.tokens.data(), n},
                          .from = {B.origin.data(), n},
                          .seq_offsets = {B.seq_offsets.data(), static_cast<index_t>(B.seq_offsets.size())},
                          .seq_ids = {B.seq_ids.data(), static_cast<index_t>(B.seq_ids.size())},
                          .student_temperature = cfg.temperature};
      std::vector<int32_t> ids;
      std::vector<float> lp;
      if constexpr (Obj::outlier_type::needs_topk) {
        const int k = obj.outlier.fkl.k;
        if (k < 1) return make_error(errc::invalid_parameter, "topk_forward_kl: k must be >= 1");
        ids.assign(static_cast<size_t>(n * k), 0);
        lp.assign(static_cast<size_t>(n * k), 0.f);
        TROPD_TRY(teacher.topk(sb, k, make_matrix(ids.data(), n, k), make_matrix(lp.data(), n, k)));
        in.teacher_topk = {make_matrix<const int32_t>(ids.data(), n, k), make_matrix<const float>(lp.data(), n, k)};
      }
      TROPD_TRY(host::evaluate_rows(obj, make_matrix<const float>(zs.data(), n, V), host::teacher_logprobs{.t = {t.data(), n}}, in,
                                    host::row_outputs<>{.grad = make_matrix(g.data(), n, V), .loss = &rep.loss, .diag = &rep.diag}, eo));
      TROPD_TRY(student.backward_logits(sb, make_matrix<const float>(g.data(), n, V)));
      rep.row_path = true;
      report = std::move(rep);
      return {};
    }
  }
  if constexpr (student_with_logprobs<Student> && logprob_source<Teacher>) {
    if constexpr (Obj::has_dense || Obj::outlier_type::needs_topk || Obj::region_type::needs_student_entropy ||
                  Obj::region_type::needs_teacher_entropy || Obj::trust_type::needs_rkl || Obj::trust_type::needs_ref) {
      return make_error(errc::unsupported,
                        "this objective needs logits, top-k lists, entropies or extra log-probs: give both models logits (row path)");
    } else {
      std::vector<float> s(static_cast<size_t>(n)), t(static_cast<size_t>(n)), g(static_cast<size_t>(n));
      TROPD_TRY(student.logprobs(sb, vector_view<float>{s.data(), n}));
      TROPD_TRY(teacher.logprobs(sb, vector_view<float>{t.data(), n}));
      const token_batch tb{.s = {s.data(), n},
                           .t = {t.data(), n},
                           .from = {B.origin.data(), n},
                           .seq_offsets = {B.seq_offsets.data(), static_cast<index_t>(B.seq_offsets.size())},
                           .seq_ids = {B.seq_ids.data(), static_cast<index_t>(B.seq_ids.size())}};
      TROPD_TRY(host::evaluate_tokens(obj, tb, {.loss = &rep.loss, .diag = &rep.diag, .dloss_ds = {g.data(), n}}, eo));
      TROPD_TRY(student.backward_logprobs(sb, vector_view<const float>{g.data(), n}));
      rep.row_path = false;
      report = std::move(rep);
      return {};
    }
  } else {
    return make_error(errc::unsupported,
                      "no usable path: need logits on both models, a student with logits and a served teacher (log-probs, and "
                      "top-k lists for a top-k objective), or log-probs on both models");
  }
}

}  // namespace tropd::runtime
