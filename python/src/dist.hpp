// python/src/dist.hpp: the vocabulary-sharded row level (tropd/dist/rows.hpp) for the binding:
// a split call whose collectives the Python side runs with torch.distributed
// (python/tropd/distributed.py; docs/distributed.md section 6). No nanobind here, so the
// instantiations (one dist::rows_call per preset and dtype) build in parallel units
// (dist_<dtype>.cpp), like rows_<dtype>.cpp.
#pragma once

#include <memory>
#include <string>

#include <tropd/dist/records.hpp>

#include "calls.hpp"

namespace tropd_py {

/// This rank's shard and groups.
struct shard_args {
  tropd::index_t v0 = 0, v1 = 0, vocab = 0;
  int tensor_rank = 0, tensor_size = 1, data_rank = 0, data_size = 1;
  bool decisions_per_rank = false, normaliser_per_rank = false;
};

/// A running sharded call (dist::rows_call behind a virtual interface). It keeps its own copy
/// of the objective and of the call's views; the arrays they point to must outlive it.
class sharded_session {
 public:
  virtual ~sharded_session() = default;
  /// The next all-gather to run (false: the call is done; read result()).
  virtual bool next(tropd::dist::exchange& ex) = 0;
  virtual tropd::status result() const = 0;
};

/// One per student logits dtype the sharded call takes (dist_<dtype>.cpp: float32 and
/// bfloat16, the dtypes trainers shard; fp64 / fp16 would each add a unit as long to build as
/// rows_<dtype>.cpp). nullptr with *error set for a bad spec,
/// or with *unsupported set when the objective cannot take the call's teacher.
std::unique_ptr<sharded_session> sharded_f32(const objective_spec& spec, const rows_call& c, const shard_args& sh, std::string* error,
                                             tropd::status* unsupported);
std::unique_ptr<sharded_session> sharded_bf16(const objective_spec& spec, const rows_call& c, const shard_args& sh, std::string* error,
                                              tropd::status* unsupported);

}  // namespace tropd_py
