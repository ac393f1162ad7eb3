// tropd/core/token.hpp: one token as every per-token policy sees it (host and device).
//
// A batch is a flat array of n tokens grouped into sequences by CSR offsets: sequence j owns
// tokens [seq_offsets[j], seq_offsets[j+1]), seq_offsets[0] = 0, seq_offsets[n_seq] = n
// (core/token_batch.hpp holds the arrays). Each token carries an origin tag saying who
// produced it. The per-token policies (regions, trust estimators, outlier handlers) and the
// objective's per-token rule read one `token`, and outlier handlers that need the teacher's
// top-k list one `topk_row`; core/token_rules.hpp builds both from a batch, once, for every
// backend.
#pragma once

#include <stdint.h>

#include <tropd/config.hpp>
#include <tropd/core/numerics.hpp>
#include <tropd/core/values.hpp>

namespace tropd {

/// Who produced a token (method.md 4.4).
enum class origin : uint8_t {
  prompt = 0,   ///< part of the prompt: no loss, not counted by any normaliser
  teacher = 1,  ///< a teacher-prefix token (off-policy guidance: -beta log p_S(x))
  student = 2,  ///< sampled by the student (on-policy part of the objective)
};

/// One token y at one position. Log-probabilities are natural logs; fields a caller did not
/// supply are NaN (never a plausible stand-in value).
struct token {
  origin from = origin::prompt;
  double s = 0;       ///< log p_S(y), the current student (differentiated)
  double s_old = 0;   ///< log p_S_old(y) at rollout time (detached); = s when not supplied
  double t = 0;       ///< log p_T(y) (may be -inf: zero teacher mass)
  double R = 0;       ///< t - s_old, the detached log-ratio reward (may be -inf)
  double ent_s = quiet_nan<double>();  ///< H_S at the position (full vocabulary)
  double ent_t = quiet_nan<double>();  ///< H_T at the position
  double rkl = quiet_nan<double>();    ///< detached KL(p_S || p_T) at the position (may be +inf)
  double ref = quiet_nan<double>();    ///< a reference model's log-prob of y (G-OPD)
  uint64_t seq_id = 0;     ///< global sequence id (keys random draws)
  uint64_t position = 0;   ///< position of the token inside its sequence (keys random draws)
  index_t seq_index = 0;   ///< index of the sequence in this batch
};

/// The teacher's top-k list at one position and the student's log-probs at its ids
/// (k entries each; a teacher entry of -inf is padding and its other entries are not read).
struct topk_row {
  values_row teacher;      ///< log p_T at the ids (any normalisation; -inf: padding)
  values_row student;      ///< current log p_S at the ids (form P differentiates these)
  values_row student_old;  ///< rollout-time log p_S at the ids (form C; empty: = student)
  int k = 0;
  /// log(1 - P_K), the current student's exact log-mass outside the list, when the caller
  /// computed it from the whole student row (-inf: none); NaN: unknown, estimated from
  /// `student` by the tail-bucket policy (estimators/topk.hpp).
  double student_tail_log = quiet_nan<double>();
};

}  // namespace tropd
