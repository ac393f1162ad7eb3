// tropd/schedules/plan.hpp: the host-side batch plan of one off-policy-guided step
// (method.md 4.4, 10.5).
//
// Two calls per step:
//
//   1. make_plan(schedule, prompts, options, plan): for each of the P prompts, strip one
//      trailing end token from its pre-generated teacher response (L_T = the remaining length),
//      take the prefix length l = prefix_length(schedule, point, cap, global_max) (prefix.hpp)
//      and list the samples to build, prompt by prompt, in this order ("plan order"):
//        - one OFF-POLICY sample  prompt ++ teacher[0, l)   (only when l > 0)
//        - n ON-POLICY contexts   prompt ++ teacher[0, l)   (all n share the prefix)
//      The integrator lets the student sample one continuation from each on-policy context.
//   2. assemble_batch(plan, continuations, batch): given those continuations (one token vector
//      per on-policy context, in plan order), build the flat batch the objective consumes:
//        tokens, origin per token, seq_offsets (CSR, one sequence per sample, plan order),
//        sample_prompt, seq_ids, seq_kind per sequence.
//
// Origin tags (core/token.hpp):
//   off-policy sample:  prompt tokens -> origin::prompt, teacher prefix -> origin::teacher
//                       (these get the off-policy guidance term -beta log p_S(x))
//   on-policy sample:   prompt AND shared teacher prefix -> origin::prompt (context: the paper
//                       applies the on-policy part of J only to continuation tokens),
//                       continuation -> origin::student
//
// Edge cases:
//   - empty teacher response (or one that is only the end token): L_T = 0, l = 0, no off-policy
//     sample; the n on-policy contexts are the bare prompt (plain OPD for that prompt).
//   - l = 0 for any other reason (alpha small, step >= N): the same, no off-policy sample (an
//     off-policy sample without teacher tokens would carry no loss).
//   - l = L_T (the prefix covers the whole response): the off-policy sample is prompt ++ the whole
//     response without its end token (the end token is never part of a prefix, so it is never
//     trained by the guidance term); each on-policy continuation starts right after the full
//     response.
//   - n = 0: only off-policy samples; assemble_batch then takes an empty continuation list.
//   - an empty continuation is allowed: its sequence has no student token.
//
// Sequence ids: seq_ids[j] = step * seq_id_stride + seq_id_offset + j, j the sequence's index in
// the plan (default stride 1'000'003, offset 0). They key the per-token random draws of the
// objective (trust-region acceptance); data-parallel ranks pass disjoint seq_id_offset ranges.
// make_plan rejects a plan whose seq_id_offset + number of sequences exceeds the stride, so ids
// never collide across steps.
//
// Host only (std::vector). A failed call leaves its output untouched.
#pragma once

#include <stdint.h>

#include <span>
#include <utility>
#include <vector>

#include <tropd/config.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/token.hpp>
#include <tropd/schedules/prefix.hpp>

namespace tropd::schedules {

/// One prompt and its pre-generated teacher response.
struct prompt_example {
  std::vector<int32_t> prompt;            ///< prompt token ids (at least one)
  std::vector<int32_t> teacher_response;  ///< teacher response ids, with or without ONE trailing end token
  long long sample_id = -1;               ///< stable id keying per-sample randomness (random_fraction);
                                          ///< < 0: the prompt's index in this batch
};

/// plan_options::end_token value meaning "the responses carry no end token".
inline constexpr long long no_end_token = -1;

struct plan_options {
  long long step = 0;         ///< optimiser step i, >= 0
  long long total_steps = 0;  ///< N, > 0 (no default: must be set)
  prefix_cap cap = prefix_cap::per_sample_fraction;
  long long global_max = 0;   ///< global_cap only: the global maximum prefix length, >= 0
  long long n = 4;            ///< on-policy continuations per prompt, >= 0 (paper: 4)
  uint64_t seed = 0;          ///< keys per-sample randomness of the schedule
  /// The end-token id: one trailing occurrence is stripped from each teacher response before
  /// L_T is measured (an end token anywhere else is content). no_end_token: strip nothing.
  long long end_token = no_end_token;
  long long vocab_size = 0;   ///< > 0: every id must be in [0, vocab_size); 0: ids must be >= 0
  uint64_t seq_id_stride = 1'000'003;  ///< seq_ids = step * stride + offset + j
  uint64_t seq_id_offset = 0;
};

enum class sample_kind : uint8_t {
  off_policy = 0,  ///< prompt ++ teacher prefix, trained by the guidance term
  on_policy = 1,   ///< prompt ++ teacher prefix ++ student continuation
};

/// One sample of the plan.
struct planned_sample {
  sample_kind kind = sample_kind::on_policy;
  index_t prompt = 0;         ///< index of its prompt in make_plan's input
  index_t rollout = -1;       ///< on-policy: 0..n-1 within its prompt; off-policy: -1
  index_t prompt_length = 0;  ///< tokens[0, prompt_length) are the prompt
  index_t prefix_length = 0;  ///< tokens[prompt_length, prompt_length + prefix_length) the teacher prefix
  /// prompt ++ teacher prefix: the whole off-policy sample, or the on-policy sampling context.
  std::vector<int32_t> tokens;
};

struct batch_plan {
  long long step = 0;
  long long total_steps = 0;
  long long n = 0;
  uint64_t seed = 0;
  uint64_t seq_id_stride = 0;
  uint64_t seq_id_offset = 0;
  long long vocab_size = 0;

  // Per prompt [P].
  std::vector<index_t> teacher_length;  ///< L_T (end token stripped)
  std::vector<double> fraction;         ///< schedule.fraction(point) (a diagnostic)
  std::vector<index_t> prefix_length;   ///< l in [0, L_T]
  std::vector<long long> sample_id;     ///< the id used in the schedule point

  /// All samples in plan order (= batch order of assemble_batch).
  std::vector<planned_sample> samples;
  /// Indices into `samples` of the on-policy samples, in plan order: continuation c of
  /// assemble_batch belongs to samples[on_policy[c]].
  std::vector<index_t> on_policy;

  index_t num_prompts() const noexcept { return static_cast<index_t>(teacher_length.size()); }
  index_t num_sequences() const noexcept { return static_cast<index_t>(samples.size()); }
  index_t num_on_policy() const noexcept { return static_cast<index_t>(on_policy.size()); }
  index_t num_off_policy() const noexcept { return num_sequences() - num_on_policy(); }
  /// The sampling context of continuation c (prompt ++ prefix).
  const std::vector<int32_t>& context(index_t c) const { return samples[static_cast<size_t>(on_policy[static_cast<size_t>(c)])].tokens; }
};

/// The flat batch the objective consumes (n_tok tokens in n_seq sequences).
struct assembled_batch {
  std::vector<int32_t> tokens;         ///< [n_tok] token ids
  std::vector<tropd::origin> origin;   ///< [n_tok] who produced each token (see the header comment)
  std::vector<index_t> seq_offsets;    ///< [n_seq + 1] CSR: sequence j is [seq_offsets[j], seq_offsets[j+1])
  std::vector<index_t> sample_prompt;  ///< [n_seq] the prompt each sequence came from
  std::vector<uint64_t> seq_ids;       ///< [n_seq] step * stride + offset + j
  std::vector<sample_kind> seq_kind;   ///< [n_seq] off- or on-policy
};

namespace detail {
inline status check_ids(const std::vector<int32_t>& ids, long long vocab_size, index_t row, const char* what) noexcept {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || (vocab_size > 0 && ids[i] >= vocab_size))
      return make_error(errc::id_out_of_range, what, row, static_cast<index_t>(i));
  }
  return ok_status();
}
}  // namespace detail

/// Plans one step (see the header comment). `prompts` accepts a std::vector<prompt_example>.
/// Errors:
///   invalid_parameter  the schedule's check() fails, total_steps <= 0, step < 0, n < 0,
///                      global_max < 0 (global_cap), seq_id_stride == 0, or seq_id_offset plus
///                      the number of sequences exceeds seq_id_stride
///   empty_batch        no prompts, or a prompt without tokens (row = prompt)
///   id_out_of_range    a negative id, or one >= vocab_size when given (row = prompt, col = position)
template <prefix_schedule S>
status make_plan(const S& schedule, std::span<const prompt_example> prompts, const plan_options& opt,
                 batch_plan& out) {
  TROPD_TRY(schedule.check());
  if (opt.total_steps <= 0) return make_error(errc::invalid_parameter, "make_plan: total_steps must be > 0");
  if (opt.step < 0) return make_error(errc::invalid_parameter, "make_plan: step must be >= 0");
  if (opt.n < 0) return make_error(errc::invalid_parameter, "make_plan: n (continuations per prompt) must be >= 0");
  if (opt.cap == prefix_cap::global_cap && opt.global_max < 0)
    return make_error(errc::invalid_parameter, "make_plan: global_max must be >= 0");
  if (opt.seq_id_stride == 0) return make_error(errc::invalid_parameter, "make_plan: seq_id_stride must be > 0");
  if (prompts.empty()) return make_error(errc::empty_batch, "make_plan: no prompts");

  const index_t P = static_cast<index_t>(prompts.size());
  batch_plan plan;
  plan.step = opt.step;
  plan.total_steps = opt.total_steps;
  plan.n = opt.n;
  plan.seed = opt.seed;
  plan.seq_id_stride = opt.seq_id_stride;
  plan.seq_id_offset = opt.seq_id_offset;
  plan.vocab_size = opt.vocab_size;
  plan.teacher_length.resize(static_cast<size_t>(P));
  plan.fraction.resize(static_cast<size_t>(P));
  plan.prefix_length.resize(static_cast<size_t>(P));
  plan.sample_id.resize(static_cast<size_t>(P));

  for (index_t i = 0; i < P; ++i) {
    const prompt_example& ex = prompts[static_cast<size_t>(i)];
    if (ex.prompt.empty()) return make_error(errc::empty_batch, "make_plan: a prompt has no tokens", i);
    TROPD_TRY(detail::check_ids(ex.prompt, opt.vocab_size, i, "make_plan: prompt token id out of range"));
    TROPD_TRY(detail::check_ids(ex.teacher_response, opt.vocab_size, i,
                                "make_plan: teacher-response token id out of range"));

    index_t L = static_cast<index_t>(ex.teacher_response.size());
    if (opt.end_token >= 0 && L > 0 && ex.teacher_response.back() == opt.end_token) --L;
    schedule_point pt;
    pt.step = opt.step;
    pt.total_steps = opt.total_steps;
    pt.teacher_length = L;
    pt.sample_id = ex.sample_id >= 0 ? ex.sample_id : i;
    pt.seed = opt.seed;
    const index_t l = prefix_length(schedule, pt, opt.cap, opt.global_max);

    plan.teacher_length[static_cast<size_t>(i)] = L;
    plan.fraction[static_cast<size_t>(i)] = schedule.fraction(pt);
    plan.prefix_length[static_cast<size_t>(i)] = l;
    plan.sample_id[static_cast<size_t>(i)] = pt.sample_id;

    planned_sample base;
    base.prompt = i;
    base.prompt_length = static_cast<index_t>(ex.prompt.size());
    base.prefix_length = l;
    base.tokens.reserve(ex.prompt.size() + static_cast<size_t>(l));
    base.tokens.insert(base.tokens.end(), ex.prompt.begin(), ex.prompt.end());
    base.tokens.insert(base.tokens.end(), ex.teacher_response.begin(), ex.teacher_response.begin() + l);

    if (l > 0) {
      planned_sample off = base;
      off.kind = sample_kind::off_policy;
      off.rollout = -1;
      plan.samples.push_back(std::move(off));
    }
    for (long long r = 0; r < opt.n; ++r) {
      planned_sample on = base;
      on.kind = sample_kind::on_policy;
      on.rollout = r;
      plan.on_policy.push_back(static_cast<index_t>(plan.samples.size()));
      plan.samples.push_back(std::move(on));
    }
  }
  const uint64_t n_seq = static_cast<uint64_t>(plan.samples.size());
  if (opt.seq_id_offset > opt.seq_id_stride || n_seq > opt.seq_id_stride - opt.seq_id_offset)
    return make_error(errc::invalid_parameter,
                      "make_plan: seq_id_offset + number of sequences exceeds seq_id_stride (ids would collide)");
  out = std::move(plan);
  return ok_status();
}

/// Builds the flat batch from the plan and the student's continuations (one per on-policy
/// context, in plan order: continuations[c] continues plan.context(c)). Sequences follow the
/// plan's sample order. `continuations` accepts a std::vector<std::vector<int32_t>> (or {} when
/// the plan has no on-policy context). Errors:
///   shape_mismatch   continuations.size() != plan.num_on_policy()
///   id_out_of_range  a continuation id < 0 or >= plan.vocab_size when given (row = c, col = position)
inline status assemble_batch(const batch_plan& plan, std::span<const std::vector<int32_t>> continuations,
                             assembled_batch& out) {
  if (static_cast<index_t>(continuations.size()) != plan.num_on_policy())
    return make_error(errc::shape_mismatch,
                      "assemble_batch: need exactly one continuation per on-policy context of the plan");
  for (size_t c = 0; c < continuations.size(); ++c)
    TROPD_TRY(detail::check_ids(continuations[c], plan.vocab_size, static_cast<index_t>(c),
                                "assemble_batch: continuation token id out of range"));

  const size_t n_seq = plan.samples.size();
  size_t n_tok = 0;
  for (const auto& s : plan.samples) n_tok += s.tokens.size();
  for (const auto& c : continuations) n_tok += c.size();

  assembled_batch b;
  b.tokens.reserve(n_tok);
  b.origin.reserve(n_tok);
  b.seq_offsets.reserve(n_seq + 1);
  b.sample_prompt.reserve(n_seq);
  b.seq_ids.reserve(n_seq);
  b.seq_kind.reserve(n_seq);
  b.seq_offsets.push_back(0);

  const uint64_t id0 = static_cast<uint64_t>(plan.step) * plan.seq_id_stride + plan.seq_id_offset;
  size_t c = 0;  // next continuation
  for (size_t j = 0; j < n_seq; ++j) {
    const planned_sample& s = plan.samples[j];
    const size_t np = static_cast<size_t>(s.prompt_length);
    const bool off = s.kind == sample_kind::off_policy;
    b.tokens.insert(b.tokens.end(), s.tokens.begin(), s.tokens.end());
    b.origin.insert(b.origin.end(), np, tropd::origin::prompt);
    b.origin.insert(b.origin.end(), s.tokens.size() - np, off ? tropd::origin::teacher : tropd::origin::prompt);
    if (!off) {
      const std::vector<int32_t>& cont = continuations[c++];
      b.tokens.insert(b.tokens.end(), cont.begin(), cont.end());
      b.origin.insert(b.origin.end(), cont.size(), tropd::origin::student);
    }
    b.seq_offsets.push_back(static_cast<index_t>(b.tokens.size()));
    b.sample_prompt.push_back(s.prompt);
    b.seq_ids.push_back(id0 + j);
    b.seq_kind.push_back(s.kind);
  }
  out = std::move(b);
  return ok_status();
}

}  // namespace tropd::schedules
