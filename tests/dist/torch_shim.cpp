// tests/dist/torch_shim.cpp: a C interface to the distributed test cases (tests/dist/cases.hpp)
// for tests/dist/torch_gloo.py, which loads it with ctypes and runs every exchange of the
// split call with torch.distributed (gloo) — the loop the Python package's binding runs
// around dist::rows_call. Test-only.
#include <stddef.h>
#include <stdint.h>

#include <cstring>
#include <memory>
#include <string>

#include "dist/cases.hpp"

using namespace tropd_dist_test;

namespace {
struct handle {
  std::unique_ptr<case_run> run;
  std::string log;
};
std::string names_buffer;
}  // namespace

extern "C" {

/// Presets, comma-separated.
const char* tdt_preset_names() {
  names_buffer.clear();
  for (const auto& n : preset_names()) names_buffer += (names_buffer.empty() ? "" : ",") + n;
  return names_buffer.c_str();
}

int tdt_preset_deterministic(const char* preset) { return preset_deterministic(preset) ? 1 : 0; }

/// A case on this rank. flags: 1 odd shards, 2 split sequences, 4 served teacher, 8 s_old,
/// 16 fp64 logits, 32 NaN + mask, 64 NaN + reject. nullptr for an unknown preset.
void* tdt_case_new(const char* preset, int tp_rank, int tp_size, int dp_rank, int dp_size, int flags) {
  case_spec s;
  s.preset = preset;
  s.tp_rank = tp_rank;
  s.tp_size = tp_size;
  s.dp_rank = dp_rank;
  s.dp_size = dp_size;
  s.odd_shards = flags & 1;
  s.split = (flags & 2) ? data_split::rows : data_split::sequences;
  s.served = flags & 4;
  s.with_s_old = flags & 8;
  s.fp64 = flags & 16;
  s.mask_nan = flags & 32;
  s.reject_nan = flags & 64;
  auto h = std::make_unique<handle>();
  h->run = make_case(s);
  if (!h->run) return nullptr;
  return h.release();
}

/// The next exchange: 1 with *group (0 tensor, 1 data), *send, *bytes, *recv set (recv holds
/// group size x bytes), or 0 when the call is done.
int tdt_case_next(void* c, int* group, const void** send, size_t* bytes, void** recv) {
  tropd::dist::exchange ex;
  if (!static_cast<handle*>(c)->run->next(ex)) return 0;
  *group = int(ex.among);
  *send = ex.send;
  *bytes = ex.bytes;
  *recv = ex.recv;
  return 1;
}

int tdt_case_status(void* c) { return static_cast<handle*>(c)->run->status_code(); }
double tdt_case_loss(void* c) { return static_cast<handle*>(c)->run->loss(); }

/// Mismatches against the single-process run (loss_sum: loss summed over the data group);
/// the details are readable with tdt_case_log.
int tdt_case_compare(void* c, double loss_sum) {
  handle* h = static_cast<handle*>(c);
  h->log.clear();
  return h->run->compare(loss_sum, h->log);
}
const char* tdt_case_log(void* c) { return static_cast<handle*>(c)->log.c_str(); }
void tdt_case_free(void* c) { delete static_cast<handle*>(c); }

}  // extern "C"
