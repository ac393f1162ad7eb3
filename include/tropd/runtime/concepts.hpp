// tropd/runtime/concepts.hpp: what tropd needs from the integrator's models.
//
// tropd never owns a model or an optimiser. A distillation step talks to the student and
// the teacher through these small concepts (plain C++ types, no CUDA types). Sequences
// are passed as a flat `sequence_batch` (tokens + CSR offsets); row i of every per-token
// output is the model's next-token distribution that predicts tokens[i] from the tokens
// before it in the same sequence (an empty context at a sequence's first token).
//
//   student_model           sample(context, max_new, temperature, seed) -> continuation
//                           plus at least one of:
//   student_with_logits       logits(batch, [n x V]) and backward_logits(batch, dL/dz [n x V])
//   student_with_logprobs     logprobs(batch, [n]) and backward_logprobs(batch, dL/ds [n])
//   teacher_model           logprobs(batch, [n]) (log p_T of each token)
//   teacher_with_logits     logits(batch, [n x V])
//   teacher_with_topk       topk(batch, k, ids [n x k], logprobs [n x k]) (a served teacher's lists)
//
// Every member returns tropd::status (or the continuation for `sample`). The driver
// (runtime/driver.hpp) checks these concepts with static_asserts that say what is missing.
#pragma once

#include <stdint.h>

#include <concepts>
#include <span>
#include <vector>

#include <tropd/config.hpp>
#include <tropd/core/status.hpp>
#include <tropd/core/views.hpp>

namespace tropd::runtime {

/// A flat batch of token sequences: sequence j is tokens[seq_offsets[j], seq_offsets[j+1]).
struct sequence_batch {
  std::span<const int32_t> tokens;
  std::span<const index_t> seq_offsets;
  index_t size() const noexcept { return static_cast<index_t>(tokens.size()); }
};

/// Samples a continuation of `context` (at most max_new tokens, stopping after an end token
/// if the model has one) at `temperature`, deterministically for a given seed.
template <class M>
concept sampler = requires(M& m, std::span<const int32_t> context, int max_new, double temperature, uint64_t seed) {
  { m.sample(context, max_new, temperature, seed) } -> std::convertible_to<std::vector<int32_t>>;
};

template <class M>
concept has_vocab = requires(const M& m) {
  { m.vocab_size() } -> std::convertible_to<index_t>;
};

/// Logits [n x V] for every position of a batch (row i predicts tokens[i]).
template <class M>
concept logits_source = has_vocab<M> && requires(M& m, const sequence_batch& b, matrix_view<float> out) {
  { m.logits(b, out) } -> std::same_as<status>;
};

/// log p(tokens[i] | tokens before i) for every position.
template <class M>
concept logprob_source = requires(M& m, const sequence_batch& b, vector_view<float> out) {
  { m.logprobs(b, out) } -> std::same_as<status>;
};

/// A student that exposes logits and takes dL/dz (accumulated into its own gradients).
template <class M>
concept student_with_logits = logits_source<M> && requires(M& m, const sequence_batch& b, matrix_view<const float> g) {
  { m.backward_logits(b, g) } -> std::same_as<status>;
};

/// A student that exposes sampled-token log-probs and takes dL/ds.
template <class M>
concept student_with_logprobs = logprob_source<M> && requires(M& m, const sequence_batch& b, vector_view<const float> g) {
  { m.backward_logprobs(b, g) } -> std::same_as<status>;
};

/// What the step driver needs from a student.
template <class M>
concept student_model = sampler<M> && (student_with_logits<M> || student_with_logprobs<M>);

/// What the step driver needs from a teacher, at least.
template <class M>
concept teacher_model = logprob_source<M> || logits_source<M>;

template <class M>
concept teacher_with_logits = logits_source<M>;

template <class M>
concept teacher_with_topk = requires(M& m, const sequence_batch& b, int k, matrix_view<int32_t> ids, matrix_view<float> lp) {
  { m.topk(b, k, ids, lp) } -> std::same_as<status>;
};

}  // namespace tropd::runtime
