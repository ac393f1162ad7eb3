// tropd/core/tokens.hpp: how a batch of token sequences is described to tropd.
//
// A batch is a flat array of n tokens grouped into sequences by CSR offsets:
// sequence j owns tokens [seq_offsets[j], seq_offsets[j+1]), seq_offsets[0] = 0 and
// seq_offsets[n_seq] = n. Each token carries an origin tag saying who produced it.
#pragma once

#include <stdint.h>

#include <tropd/config.hpp>

namespace tropd {

/// Who produced a token (method.md 4.4).
enum class origin : uint8_t {
  prompt = 0,   ///< part of the prompt: no loss, not counted by any normaliser
  teacher = 1,  ///< a teacher-prefix token (off-policy guidance: -beta log p_S(x))
  student = 2,  ///< sampled by the student (on-policy part of the objective)
};

}  // namespace tropd
