// python/src/module.cpp: tropd._C, the compiled half of the Python package (nanobind).
//
// It only validates arrays and forwards them to the headers: every argument arrives as a
// DLPack array (nb::ndarray: torch tensors, numpy arrays, anything with __dlpack__), is checked
// (dtype, rank, shape, strides, device) and turned into tropd's views without a copy; outputs
// are caller-allocated arrays that tropd writes. No libtorch, no allocation of [n x V] data.
//
//   evaluate_rows(...)    host::evaluate_rows (CPU arrays) or gpu::rows (CUDA arrays: tropd::gpu::evaluate_rows)
//   evaluate_tokens(...)  host::evaluate_tokens (CPU) or gpu::tokens (CUDA: tropd::gpu::evaluate_tokens)
//   rows_scratch_bytes(...), tokens_scratch_bytes(...)  the CUDA path's scratch for the same arguments
//   objective_info(spec)  what the objective reads (top-k width, teacher logits, ...)
//   preset_defaults(name) the preset's fields and default values, as the C++ config has them
//   diagnostic_names()    the order of the diagnostics vector the evaluations write
//
// Argument errors found here raise ValueError (TypeError for a non-array). A failed tropd
// status is returned to Python as a tuple (int(errc), row, column, message) and raised there
// (python/tropd/_errors.py); what the device backend does not do (gpu::not_implemented) raises
// NotImplementedError.
#include <stdint.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <tropd/version.hpp>

#include "calls.hpp"
#include "dist.hpp"
#include "gpu.hpp"
#include "stats.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace tropd_py {
namespace {

using array = nb::ndarray<nb::ro>;   // any dtype, any device, read-only is fine
using out_array = nb::ndarray<>;     // writable
using opt_array = std::optional<array>;
using opt_out = std::optional<out_array>;
using tropd::index_t;

constexpr int dev_cpu = 1, dev_cuda = 2;

// ---------------------------------------------------------------------------
// Diagnostics vector
// ---------------------------------------------------------------------------

/// The diagnostics the evaluations write into their float64 `stats` vector, in this order.
const std::vector<std::string>& diagnostic_names() {
  static const std::vector<std::string> names = {
      "loss",           "loss_trust",         "loss_outlier",          "loss_guidance",        "loss_dense",
      "normaliser",     "n_tokens",           "n_student",             "n_teacher",            "n_counted",
      "n_kept",         "n_trusted",          "n_outlier",             "n_zero_teacher_mass",  "n_masked_input",
      "trust_fraction", "outlier_fraction",   "adv_clip_fraction",     "ratio_clip_fraction",  "mean_R_trusted",
      "mean_R_outlier", "tv_estimate",        "mean_student_entropy",  "mean_teacher_entropy", "mean_topk_teacher_mass",
      "mean_topk_student_mass", "mean_rkl"};
  return names;
}


// ---------------------------------------------------------------------------
// Array checks: every failure is a ValueError naming the argument.
// ---------------------------------------------------------------------------

[[noreturn]] void bad(const char* name, const std::string& what) {
  throw nb::value_error(("tropd: argument '" + std::string(name) + "': " + what).c_str());
}

bool is(const nb::dlpack::dtype& d, nb::dlpack::dtype_code code, int bits) {
  return d.code == uint8_t(code) && d.bits == bits && d.lanes == 1;
}
bool is_f32(const nb::dlpack::dtype& d) { return is(d, nb::dlpack::dtype_code::Float, 32); }
bool is_f64(const nb::dlpack::dtype& d) { return is(d, nb::dlpack::dtype_code::Float, 64); }

std::string dtype_name(const nb::dlpack::dtype& d) {
  const char* code = "?";
  switch (nb::dlpack::dtype_code(d.code)) {
    case nb::dlpack::dtype_code::Int: code = "int"; break;
    case nb::dlpack::dtype_code::UInt: code = "uint"; break;
    case nb::dlpack::dtype_code::Float: code = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: code = "bfloat"; break;
    case nb::dlpack::dtype_code::Bool: return "bool";
    default: break;
  }
  return code + std::to_string(d.bits);
}

/// The device every array of one call must share (set by the student / the first array).
struct device_of_call {
  int type = 0, id = 0;
  const char* first = nullptr;
  template <class A>
  void check(const char* name, const A& a) {
    if (first == nullptr) {
      type = a.device_type();
      id = a.device_id();
      first = name;
      if (type != dev_cpu && type != dev_cuda) bad(name, "only CPU and CUDA arrays are supported");
      return;
    }
    if (a.device_type() != type || (type == dev_cuda && a.device_id() != id))
      bad(name, std::string("is on a different device than '") + first + "' (every tensor of a call must be on the same device)");
  }
};

template <class A>
void check_rank(const char* name, const A& a, size_t ndim) {
  if (a.ndim() != ndim) bad(name, "must have " + std::to_string(ndim) + " dimension(s), has " + std::to_string(a.ndim()));
}

/// A contiguous 1-D array of n elements (n < 0: any).
template <class A>
void check_vector(const char* name, const A& a, index_t n) {
  check_rank(name, a, 1);
  if (n >= 0 && index_t(a.shape(0)) != n)
    bad(name, "must have " + std::to_string(n) + " entries, has " + std::to_string(a.shape(0)));
  if (a.shape(0) > 1 && a.stride(0) != 1) bad(name, "must be contiguous (call .contiguous())");
}

/// A 2-D array with unit column stride and a row stride >= its columns.
template <class A>
void check_matrix(const char* name, const A& a, index_t rows, index_t cols) {
  check_rank(name, a, 2);
  if (rows >= 0 && index_t(a.shape(0)) != rows)
    bad(name, "must have " + std::to_string(rows) + " rows, has " + std::to_string(a.shape(0)));
  if (cols >= 0 && index_t(a.shape(1)) != cols)
    bad(name, "must have " + std::to_string(cols) + " columns, has " + std::to_string(a.shape(1)));
  if (a.shape(1) > 1 && a.stride(1) != 1) bad(name, "must have unit stride along its last dimension (call .contiguous())");
  if (a.shape(0) > 1 && a.stride(0) < index_t(a.shape(1)))
    bad(name, "row stride is smaller than a row (overlapping rows; call .contiguous())");
}

index_t row_stride(const nb::ndarray<nb::ro>& a) { return a.shape(0) > 1 ? a.stride(0) : index_t(a.shape(1)); }
index_t row_stride(const nb::ndarray<>& a) { return a.shape(0) > 1 ? a.stride(0) : index_t(a.shape(1)); }

tropd::values_view values(const char* name, const opt_array& a, index_t n, device_of_call& dev) {
  if (!a) return {};
  dev.check(name, *a);
  check_vector(name, *a, n);
  const index_t size = index_t(a->shape(0));
  if (is_f32(a->dtype())) return tropd::values_view(static_cast<const float*>(a->data()), size);
  if (is_f64(a->dtype())) return tropd::values_view(static_cast<const double*>(a->data()), size);
  bad(name, "must be float32 or float64, is " + dtype_name(a->dtype()));
}

tropd::values_matrix values_matrix(const char* name, const opt_array& a, index_t rows, index_t cols, device_of_call& dev) {
  if (!a) return {};
  dev.check(name, *a);
  check_matrix(name, *a, rows, cols);
  const index_t r = index_t(a->shape(0)), c = index_t(a->shape(1)), s = row_stride(*a);
  if (is_f32(a->dtype())) return tropd::values_matrix(static_cast<const float*>(a->data()), r, c, s);
  if (is_f64(a->dtype())) return tropd::values_matrix(static_cast<const double*>(a->data()), r, c, s);
  bad(name, "must be float32 or float64, is " + dtype_name(a->dtype()));
}

tropd::values_out values_out(const char* name, const opt_out& a, index_t n, device_of_call& dev) {
  if (!a) return {};
  dev.check(name, *a);
  check_vector(name, *a, n);
  if (is_f32(a->dtype())) return tropd::values_out(static_cast<float*>(a->data()), n);
  if (is_f64(a->dtype())) return tropd::values_out(static_cast<double*>(a->data()), n);
  bad(name, "must be float32 or float64, is " + dtype_name(a->dtype()));
}

tropd::values_matrix_out values_matrix_out(const char* name, const opt_out& a, index_t rows, index_t cols, device_of_call& dev) {
  if (!a) return {};
  dev.check(name, *a);
  check_matrix(name, *a, rows, cols);
  const index_t s = row_stride(*a);
  if (is_f32(a->dtype())) return tropd::values_matrix_out(static_cast<float*>(a->data()), rows, cols, s);
  if (is_f64(a->dtype())) return tropd::values_matrix_out(static_cast<double*>(a->data()), rows, cols, s);
  bad(name, "must be float32 or float64, is " + dtype_name(a->dtype()));
}

template <class T, class A>
tropd::vector_view<const T> typed_vector(const char* name, const A& a, index_t n, nb::dlpack::dtype_code code, device_of_call& dev) {
  dev.check(name, a);
  check_vector(name, a, n);
  if (!is(a.dtype(), code, int(8 * sizeof(T))))
    bad(name, "must be " + dtype_name(nb::dlpack::dtype{uint8_t(code), uint8_t(8 * sizeof(T)), 1}) + ", is " + dtype_name(a.dtype()));
  return {static_cast<const T*>(a.data()), index_t(a.shape(0))};
}

logit_type logits_type(const char* name, const nb::dlpack::dtype& d) {
  if (is_f32(d)) return logit_type::f32;
  if (is_f64(d)) return logit_type::f64;
  if (is(d, nb::dlpack::dtype_code::Bfloat, 16)) return logit_type::bf16;
  if (is(d, nb::dlpack::dtype_code::Float, 16)) return logit_type::f16;
  bad(name, "logits must be float32, float64, bfloat16 or float16, are " + dtype_name(d));
}

logits_arg logits(const char* name, const array& a, index_t rows, index_t cols, device_of_call& dev) {
  dev.check(name, a);
  check_matrix(name, a, rows, cols);
  return {a.data(), index_t(a.shape(0)), index_t(a.shape(1)), row_stride(a), logits_type(name, a.dtype())};
}

static_assert(sizeof(index_t) == sizeof(int64_t) && sizeof(tropd::origin) == 1);

/// Copies of the offsets and origin tags in tropd's types (see evaluate_rows).
class host_copies {
 public:
  host_copies(tropd::vector_view<const index_t> offs, tropd::vector_view<const tropd::origin> from)
      : offsets_(static_cast<size_t>(offs.size)), from_(static_cast<size_t>(from.size)) {
    if (offs.size) std::memcpy(offsets_.data(), offs.data, offsets_.size() * sizeof(index_t));
    if (from.size) std::memcpy(from_.data(), from.data, from_.size());
  }
  tropd::vector_view<const index_t> offsets() const { return {offsets_.data(), index_t(offsets_.size())}; }
  tropd::vector_view<const tropd::origin> from() const { return {from_.data(), index_t(from_.size())}; }

 private:
  std::vector<index_t> offsets_;
  std::vector<tropd::origin> from_;
};

/// The result of a call: None, or (int(errc), row, column, message) for a failed status
/// (code -1: not done by the device backend, NotImplementedError).
nb::object result(const tropd::status& st, const std::string& spec_error) {
  if (st.ok()) return nb::none();
  if (gpu::not_implemented(st)) return nb::make_tuple(-1, st.row, st.col, std::string("tropd: ") + st.detail);
  std::string msg = st.message();
  if (!spec_error.empty()) msg = "tropd: invalid parameter: " + spec_error;
  return nb::make_tuple(int(st.code), st.row, st.col, msg);
}

objective_spec parse(const std::string& text) {
  objective_spec s;
  std::string err;
  if (!parse_spec(text, s, err)) throw nb::value_error(("tropd: " + err).c_str());
  return s;
}

// ---------------------------------------------------------------------------
// The CUDA path's pieces (the scratch, the results), shared by both levels
// ---------------------------------------------------------------------------

void require_cuda_build() {
  if (!gpu::compiled())
    throw nb::value_error(
        "tropd: CUDA tensors need the extension's CUDA build (pip install . with -C cmake.define.TROPD_PYTHON_CUDA=ON); this build is CPU only");
}

/// The caller's scratch: a contiguous uint8 tensor on the call's device (None: no scratch).
struct device_scratch {
  void* data = nullptr;
  size_t bytes = 0;
  device_scratch(const opt_out& scratch, device_of_call& dev) {
    if (!scratch) return;
    dev.check("scratch", *scratch);
    check_vector("scratch", *scratch, -1);
    if (!is(scratch->dtype(), nb::dlpack::dtype_code::UInt, 8)) bad("scratch", "must be uint8, is " + dtype_name(scratch->dtype()));
    data = scratch->data();
    bytes = scratch->nbytes();
  }
};

/// The caller's loss and stats tensors (checked by the call's arguments) for the device.
gpu::device_results results_of(const out_array& loss, const out_array& stats) {
  gpu::device_results r;
  r.loss = loss.data();
  r.loss_f64 = is_f64(loss.dtype());
  r.stats = static_cast<double*>(stats.data());
  return r;
}

/// A scratch-size query's answer: the bytes, or the failed status tuple (raised in Python).
nb::object scratch_answer(const tropd::status& st, size_t bytes, const std::string& spec_error) {
  if (!st.ok()) return result(st, spec_error);
  return nb::int_(bytes);
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

/// The per-row metadata and the outputs every row-level call shares (evaluate_rows,
/// sharded_rows, evaluate_fused), checked and put into the call C (rows_call or fused_call) for
/// n rows.
template <class C>
void row_metadata(C& c, device_of_call& dev, index_t n, const opt_array& teacher_token_logprobs, const array& token_ids,
                  const array& origin, const array& seq_offsets, const opt_array& sequence_ids, const opt_array& old_logprobs,
                  const opt_array& ref_logprobs, const opt_array& topk_ids, const opt_array& topk_logprobs,
                  const opt_array& old_topk_logprobs, const out_array& loss, const out_array& stats, const opt_out& flags,
                  const opt_out& advantage, uint64_t seed, uint64_t step, double student_temperature, double teacher_temperature,
                  double normaliser, int threads, bool mask_bad_input) {
  c.teacher_t = values("teacher_token_logprobs", teacher_token_logprobs, n, dev);
  c.in.ids = typed_vector<int32_t>("token_ids", token_ids, n, nb::dlpack::dtype_code::Int, dev);
  c.in.from = tropd::vector_view<const tropd::origin>{
      reinterpret_cast<const tropd::origin*>(typed_vector<uint8_t>("origin", origin, n, nb::dlpack::dtype_code::UInt, dev).data), n};
  c.in.seq_offsets = typed_vector<index_t>("seq_offsets", seq_offsets, -1, nb::dlpack::dtype_code::Int, dev);
  if (sequence_ids) {
    const auto v = typed_vector<int64_t>("sequence_ids", *sequence_ids, c.in.seq_offsets.size - 1, nb::dlpack::dtype_code::Int, dev);
    c.in.seq_ids = {reinterpret_cast<const uint64_t*>(v.data), v.size};
  }
  c.in.s_old = values("old_logprobs", old_logprobs, n, dev);
  c.in.ref = values("ref_logprobs", ref_logprobs, n, dev);
  if (topk_ids.has_value() != topk_logprobs.has_value())
    throw nb::value_error("tropd: teacher_topk_ids and teacher_topk_logprobs go together");
  if (topk_ids) {
    dev.check("teacher_topk_ids", *topk_ids);
    check_matrix("teacher_topk_ids", *topk_ids, n, -1);
    if (!is(topk_ids->dtype(), nb::dlpack::dtype_code::Int, 32)) bad("teacher_topk_ids", "must be int32, is " + dtype_name(topk_ids->dtype()));
    const index_t K = index_t(topk_ids->shape(1));
    c.in.teacher_topk.ids = tropd::matrix_view<const int32_t>{static_cast<const int32_t*>(topk_ids->data()), n, K, row_stride(*topk_ids)};
    c.in.teacher_topk.logprobs = values_matrix("teacher_topk_logprobs", topk_logprobs, n, K, dev);
  }
  c.in.topk_student_old = values_matrix("old_topk_logprobs", old_topk_logprobs, n, -1, dev);
  c.in.student_temperature = student_temperature;
  c.in.teacher_temperature = teacher_temperature;
  dev.check("loss", loss);
  if (loss.size() != 1 || !(is_f32(loss.dtype()) || is_f64(loss.dtype()))) bad("loss", "must hold one float32 or float64 value");
  dev.check("stats", stats);
  check_vector("stats", stats, index_t(diagnostic_names().size()));
  if (!is_f64(stats.dtype())) bad("stats", "must be float64");
  if (flags) {
    dev.check("flags", *flags);
    check_vector("flags", *flags, n);
    if (!is(flags->dtype(), nb::dlpack::dtype_code::UInt, 8)) bad("flags", "must be uint8");
    c.flags = {static_cast<uint8_t*>(flags->data()), n};
  }
  c.advantage = values_out("advantage", advantage, n, dev);
  c.opt.seed = seed;
  c.opt.step = step;
  c.opt.threads = threads < 1 ? 1 : threads;
  c.opt.bad_input = mask_bad_input ? tropd::host::input_policy::mask : tropd::host::input_policy::reject;
  c.normaliser = normaliser;
}

/// evaluate_rows' arguments, checked and turned into a rows_call (shared with sharded_rows).
void rows_arguments(rows_call& c, device_of_call& dev, const array& student, const opt_array& teacher_logits,
                    const opt_array& teacher_token_logprobs, const array& token_ids, const array& origin, const array& seq_offsets,
                    const opt_array& sequence_ids, const opt_array& old_logprobs, const opt_array& ref_logprobs,
                    const opt_array& topk_ids, const opt_array& topk_logprobs, const opt_array& old_topk_logprobs, const opt_out& grad,
                    const out_array& loss, const out_array& stats, const opt_out& flags, const opt_out& advantage,
                    const opt_out& dloss_ds, uint64_t seed, uint64_t step, double student_temperature, double teacher_temperature,
                    double normaliser, int threads, bool mask_bad_input) {
  c.student = logits("student_logits", student, -1, -1, dev);
  const index_t n = c.student.rows, V = c.student.cols;
  if (teacher_logits && teacher_token_logprobs)
    throw nb::value_error("tropd: pass the teacher as logits or as token log-probs, not both");
  if (!teacher_logits && !teacher_token_logprobs)
    throw nb::value_error("tropd: the teacher is missing: pass teacher_logits or teacher_token_logprobs");
  if (teacher_logits) {
    c.teacher = logits("teacher_logits", *teacher_logits, n, -1, dev);
    if (c.teacher.cols != V)
      bad("teacher_logits",
          "vocabulary " + std::to_string(c.teacher.cols) + " differs from the student's " + std::to_string(V) +
              " (pad or truncate the teacher vocabulary first)");
    if (c.teacher.type != c.student.type) bad("teacher_logits", "must have the student logits' dtype");
  }
  row_metadata(c, dev, n, teacher_token_logprobs, token_ids, origin, seq_offsets, sequence_ids, old_logprobs, ref_logprobs, topk_ids,
               topk_logprobs, old_topk_logprobs, loss, stats, flags, advantage, seed, step, student_temperature, teacher_temperature,
               normaliser, threads, mask_bad_input);
  if (grad) {
    dev.check("grad", *grad);
    check_matrix("grad", *grad, n, V);
    const bool want64 = c.student.type == logit_type::f64;
    if (want64 ? !is_f64(grad->dtype()) : !is_f32(grad->dtype()))
      bad("grad", want64 ? "must be float64 for float64 logits" : "must be float32 (the gradient of 16- and 32-bit logits is written in fp32)");
    c.grad = grad->data();
    c.grad_stride = row_stride(*grad);
  }
  c.dloss_ds = values_out("dloss_ds", dloss_ds, n, dev);
}

nb::object evaluate_rows(const std::string& objective, const array& student, const opt_array& teacher_logits,
                         const opt_array& teacher_token_logprobs, const array& token_ids, const array& origin,
                         const array& seq_offsets, const opt_array& sequence_ids, const opt_array& old_logprobs,
                         const opt_array& ref_logprobs, const opt_array& topk_ids, const opt_array& topk_logprobs,
                         const opt_array& old_topk_logprobs, const opt_out& grad, const out_array& loss, const out_array& stats,
                         const opt_out& flags, const opt_out& advantage, const opt_out& dloss_ds, uint64_t seed, uint64_t step,
                         double student_temperature, double teacher_temperature, double normaliser, int threads,
                         bool mask_bad_input, const opt_out& scratch, uintptr_t stream) {
  const objective_spec spec = parse(objective);
  device_of_call dev;
  rows_call c;
  rows_arguments(c, dev, student, teacher_logits, teacher_token_logprobs, token_ids, origin, seq_offsets, sequence_ids, old_logprobs,
                 ref_logprobs, topk_ids, topk_logprobs, old_topk_logprobs, grad, loss, stats, flags, advantage, dloss_ds, seed, step,
                 student_temperature, teacher_temperature, normaliser, threads, mask_bad_input);
  std::string spec_error;
  tropd::status st;
  if (dev.type == dev_cuda) {
    require_cuda_build();
    const device_scratch scr(scratch, dev);
    const gpu::device_results res = results_of(loss, stats);
    {
      nb::gil_scoped_release release;
      st = gpu::rows(spec, c, scr.data, scr.bytes, stream, res, &spec_error);
    }
    return result(st, spec_error);
  }
  // Host path: the small int64 offsets and uint8 tags are copied into arrays of tropd's own
  // types (index_t is long long, int64_t is long; tropd::origin is an enum): reading the
  // caller's memory through the other type would be undefined behaviour by the letter.
  const host_copies copies(c.in.seq_offsets, c.in.from);
  c.in.seq_offsets = copies.offsets();
  c.in.from = copies.from();
  double loss_value = 0;
  tropd::diagnostics diag;
  c.loss = &loss_value;
  c.diag = &diag;
  {
    nb::gil_scoped_release release;
    switch (c.student.type) {
      case logit_type::f32: st = rows_f32(spec, c, &spec_error); break;
      case logit_type::f64: st = rows_f64(spec, c, &spec_error); break;
      case logit_type::bf16: st = rows_bf16(spec, c, &spec_error); break;
      case logit_type::f16: st = rows_f16(spec, c, &spec_error); break;
    }
  }
  if (st.ok()) {
    if (is_f64(loss.dtype())) *static_cast<double*>(loss.data()) = loss_value;
    else *static_cast<float*>(loss.data()) = float(loss_value);
    write_stats(diag, static_cast<double*>(stats.data()));
  }
  return result(st, spec_error);
}

/// evaluate_tokens' arguments, checked and turned into a tokens_call (shared with the scratch query).
void tokens_arguments(tokens_call& c, device_of_call& dev, const array& s, const array& t, const array& origin, const array& seq_offsets,
                      const opt_array& sequence_ids, const opt_array& s_old, const opt_array& student_entropy,
                      const opt_array& teacher_entropy, const opt_array& rkl, const opt_array& ref, const opt_array& topk_ids,
                      const opt_array& topk_teacher, const opt_array& topk_student, const opt_array& topk_student_old,
                      const out_array& loss, const out_array& stats, const opt_out& dloss_ds, const opt_out& dloss_dtopk,
                      const opt_out& flags, const opt_out& advantage, uint64_t seed, uint64_t step, double normaliser,
                      bool mask_bad_input) {
  auto& b = c.batch;
  b.s = values("student_logprobs", opt_array(s), -1, dev);
  const index_t n = b.s.size;
  b.t = values("teacher_logprobs", opt_array(t), n, dev);
  b.from = tropd::vector_view<const tropd::origin>{
      reinterpret_cast<const tropd::origin*>(typed_vector<uint8_t>("origin", origin, n, nb::dlpack::dtype_code::UInt, dev).data), n};
  b.seq_offsets = typed_vector<index_t>("seq_offsets", seq_offsets, -1, nb::dlpack::dtype_code::Int, dev);
  if (sequence_ids) {
    const auto v = typed_vector<int64_t>("sequence_ids", *sequence_ids, b.seq_offsets.size - 1, nb::dlpack::dtype_code::Int, dev);
    b.seq_ids = {reinterpret_cast<const uint64_t*>(v.data), v.size};
  }
  b.s_old = values("old_logprobs", s_old, n, dev);
  b.student_entropy = values("student_entropy", student_entropy, n, dev);
  b.teacher_entropy = values("teacher_entropy", teacher_entropy, n, dev);
  b.rkl = values("rkl", rkl, n, dev);
  b.ref = values("ref_logprobs", ref, n, dev);
  index_t K = 0;
  if (topk_ids) {
    dev.check("teacher_topk_ids", *topk_ids);
    check_matrix("teacher_topk_ids", *topk_ids, n, -1);
    if (!is(topk_ids->dtype(), nb::dlpack::dtype_code::Int, 32)) bad("teacher_topk_ids", "must be int32, is " + dtype_name(topk_ids->dtype()));
    K = index_t(topk_ids->shape(1));
    b.topk_ids = tropd::matrix_view<const int32_t>{static_cast<const int32_t*>(topk_ids->data()), n, K, row_stride(*topk_ids)};
  }
  if (topk_ids.has_value() != topk_teacher.has_value() || topk_ids.has_value() != topk_student.has_value())
    throw nb::value_error("tropd: teacher_topk_ids, teacher_topk_logprobs and student_topk_logprobs go together");
  b.topk_teacher = values_matrix("teacher_topk_logprobs", topk_teacher, n, K, dev);
  b.topk_student = values_matrix("student_topk_logprobs", topk_student, n, K, dev);
  b.topk_student_old = values_matrix("old_topk_logprobs", topk_student_old, n, K, dev);
  dev.check("loss", loss);
  if (loss.size() != 1 || !(is_f32(loss.dtype()) || is_f64(loss.dtype()))) bad("loss", "must hold one float32 or float64 value");
  dev.check("stats", stats);
  check_vector("stats", stats, index_t(diagnostic_names().size()));
  if (!is_f64(stats.dtype())) bad("stats", "must be float64");
  c.out.dloss_ds = values_out("dloss_ds", dloss_ds, n, dev);
  c.out.dloss_dtopk = values_matrix_out("dloss_dtopk", dloss_dtopk, n, K, dev);
  if (flags) {
    dev.check("flags", *flags);
    check_vector("flags", *flags, n);
    if (!is(flags->dtype(), nb::dlpack::dtype_code::UInt, 8)) bad("flags", "must be uint8");
    c.out.flags = {static_cast<uint8_t*>(flags->data()), n};
  }
  c.out.advantage = values_out("advantage", advantage, n, dev);
  c.opt.seed = seed;
  c.opt.step = step;
  c.opt.bad_input = mask_bad_input ? tropd::host::input_policy::mask : tropd::host::input_policy::reject;
  c.normaliser = normaliser;
}

nb::object evaluate_tokens(const std::string& objective, const array& s, const array& t, const array& origin, const array& seq_offsets,
                           const opt_array& sequence_ids, const opt_array& s_old, const opt_array& student_entropy,
                           const opt_array& teacher_entropy, const opt_array& rkl, const opt_array& ref, const opt_array& topk_ids,
                           const opt_array& topk_teacher, const opt_array& topk_student, const opt_array& topk_student_old,
                           const out_array& loss, const out_array& stats, const opt_out& dloss_ds, const opt_out& dloss_dtopk,
                           const opt_out& flags, const opt_out& advantage, uint64_t seed, uint64_t step, double normaliser,
                           bool mask_bad_input, const opt_out& scratch, uintptr_t stream) {
  const objective_spec spec = parse(objective);
  device_of_call dev;
  tokens_call c;
  tokens_arguments(c, dev, s, t, origin, seq_offsets, sequence_ids, s_old, student_entropy, teacher_entropy, rkl, ref, topk_ids,
                   topk_teacher, topk_student, topk_student_old, loss, stats, dloss_ds, dloss_dtopk, flags, advantage, seed, step,
                   normaliser, mask_bad_input);
  auto& b = c.batch;

  std::string spec_error;
  tropd::status st;
  if (dev.type == dev_cuda) {
    require_cuda_build();
    const device_scratch scr(scratch, dev);
    const gpu::device_results res = results_of(loss, stats);
    {
      nb::gil_scoped_release release;
      st = gpu::tokens(spec, c, scr.data, scr.bytes, stream, res, &spec_error);
    }
    return result(st, spec_error);
  }
  const host_copies copies(b.seq_offsets, b.from);
  b.seq_offsets = copies.offsets();
  b.from = copies.from();
  double loss_value = 0;
  tropd::diagnostics diag;
  c.out.loss = &loss_value;
  c.out.diag = &diag;
  {
    nb::gil_scoped_release release;
    st = tokens(spec, c, &spec_error);
  }
  if (st.ok()) {
    if (is_f64(loss.dtype())) *static_cast<double*>(loss.data()) = loss_value;
    else *static_cast<float*>(loss.data()) = float(loss_value);
    write_stats(diag, static_cast<double*>(stats.data()));
  }
  return result(st, spec_error);
}

/// The CUDA path's scratch size for evaluate_rows with these arguments (bytes, or a failed
/// status tuple); Python allocates it as a uint8 tensor on the logits' device.
nb::object rows_scratch_bytes(const std::string& objective, const array& student, const opt_array& teacher_logits,
                              const opt_array& teacher_token_logprobs, const array& token_ids, const array& origin,
                              const array& seq_offsets, const opt_array& sequence_ids, const opt_array& old_logprobs,
                              const opt_array& ref_logprobs, const opt_array& topk_ids, const opt_array& topk_logprobs,
                              const opt_array& old_topk_logprobs, const opt_out& grad, const out_array& loss, const out_array& stats,
                              const opt_out& flags, const opt_out& advantage, const opt_out& dloss_ds, uint64_t seed, uint64_t step,
                              double student_temperature, double teacher_temperature, double normaliser, int threads,
                              bool mask_bad_input) {
  const objective_spec spec = parse(objective);
  device_of_call dev;
  rows_call c;
  rows_arguments(c, dev, student, teacher_logits, teacher_token_logprobs, token_ids, origin, seq_offsets, sequence_ids, old_logprobs,
                 ref_logprobs, topk_ids, topk_logprobs, old_topk_logprobs, grad, loss, stats, flags, advantage, dloss_ds, seed, step,
                 student_temperature, teacher_temperature, normaliser, threads, mask_bad_input);
  if (dev.type != dev_cuda) bad("student_logits", "the scratch-size query is for CUDA tensors (the CPU path needs no scratch)");
  require_cuda_build();
  size_t bytes = 0;
  std::string spec_error;
  const tropd::status st = gpu::rows_scratch_bytes(spec, c, &bytes, &spec_error);
  return scratch_answer(st, bytes, spec_error);
}

/// The same for evaluate_tokens.
nb::object tokens_scratch_bytes(const std::string& objective, const array& s, const array& t, const array& origin,
                                const array& seq_offsets, const opt_array& sequence_ids, const opt_array& s_old,
                                const opt_array& student_entropy, const opt_array& teacher_entropy, const opt_array& rkl,
                                const opt_array& ref, const opt_array& topk_ids, const opt_array& topk_teacher,
                                const opt_array& topk_student, const opt_array& topk_student_old, const out_array& loss,
                                const out_array& stats, const opt_out& dloss_ds, const opt_out& dloss_dtopk, const opt_out& flags,
                                const opt_out& advantage, uint64_t seed, uint64_t step, double normaliser, bool mask_bad_input) {
  const objective_spec spec = parse(objective);
  device_of_call dev;
  tokens_call c;
  tokens_arguments(c, dev, s, t, origin, seq_offsets, sequence_ids, s_old, student_entropy, teacher_entropy, rkl, ref, topk_ids,
                   topk_teacher, topk_student, topk_student_old, loss, stats, dloss_ds, dloss_dtopk, flags, advantage, seed, step,
                   normaliser, mask_bad_input);
  if (dev.type != dev_cuda) bad("student_logprobs", "the scratch-size query is for CUDA tensors (the CPU path needs no scratch)");
  require_cuda_build();
  size_t bytes = 0;
  std::string spec_error;
  const tropd::status st = gpu::tokens_scratch_bytes(spec, c, &bytes, &spec_error);
  return scratch_answer(st, bytes, spec_error);
}

/// What an objective reads: a dict (raises ValueError for a bad spec).
nb::dict objective_info(const std::string& text) {
  const objective_spec spec = parse(text);
  std::string err;
  objective_traits t;
  const tropd::status st = visit_objective(spec, 0.0, &err, [&](const auto& obj) -> tropd::status {
    t = traits_of(obj);
    return obj.check();
  });
  if (!st.ok()) throw nb::value_error((err.empty() ? st.message() : "tropd: " + err).c_str());
  nb::dict d;
  d["needs_topk"] = t.needs_topk;
  d["needs_teacher_logits"] = t.needs_teacher_logits;
  d["needs_student_entropy"] = t.needs_student_entropy;
  d["needs_teacher_entropy"] = t.needs_teacher_entropy;
  d["needs_rkl"] = t.needs_rkl;
  d["needs_ref"] = t.needs_ref;
  d["has_dense"] = t.has_dense;
  d["k"] = t.k;
  return d;
}

/// A preset's fields and their C++ default values (as spec strings).
std::vector<std::pair<std::string, std::string>> preset_defaults(const std::string& name) {
  const objective_spec spec = parse(name);
  std::vector<std::pair<std::string, std::string>> out;
  std::string err;
  (void)visit_objective(spec, 0.0, &err, [](const auto&) -> tropd::status { return {}; }, &out);
  return out;
}

// ---------------------------------------------------------------------------
// The vocabulary-sharded row level (tropd/dist/rows.hpp) as a split call: Python runs each
// all-gather it asks for with torch.distributed (python/tropd/distributed.py).
// ---------------------------------------------------------------------------

/// A running sharded call. The caller keeps the arrays it passed alive until finish().
class sharded_rows_call {
 public:
  std::unique_ptr<sharded_session> session;
  std::unique_ptr<host_copies> copies;
  double loss_value = 0;
  tropd::diagnostics diag;
  std::optional<out_array> loss, stats;
  tropd::dist::exchange ex;
  int tensor_size = 1, data_size = 1;
  bool done = false;
};

std::unique_ptr<sharded_rows_call> sharded_rows(
    const std::string& objective, const array& student, const opt_array& teacher_logits, const opt_array& teacher_token_logprobs,
    const array& token_ids, const array& origin, const array& seq_offsets, const opt_array& sequence_ids, const opt_array& old_logprobs,
    const opt_array& ref_logprobs, const opt_array& topk_ids, const opt_array& topk_logprobs, const opt_array& old_topk_logprobs,
    const opt_out& grad, const out_array& loss, const out_array& stats, const opt_out& flags, const opt_out& advantage,
    const opt_out& dloss_ds, uint64_t seed, uint64_t step, double student_temperature, double teacher_temperature, double normaliser,
    int threads, bool mask_bad_input, index_t vocab_start, index_t vocab_size, int tensor_rank, int tensor_size, int data_rank,
    int data_size, bool decisions_per_rank, bool normaliser_per_rank) {
  const objective_spec spec = parse(objective);
  device_of_call dev;
  rows_call c;
  rows_arguments(c, dev, student, teacher_logits, teacher_token_logprobs, token_ids, origin, seq_offsets, sequence_ids, old_logprobs,
                 ref_logprobs, topk_ids, topk_logprobs, old_topk_logprobs, grad, loss, stats, flags, advantage, dloss_ds, seed, step,
                 student_temperature, teacher_temperature, normaliser, threads, mask_bad_input);
  if (dev.type != dev_cpu)
    throw nb::value_error("tropd: the sharded row level runs on the host backend: pass CPU arrays (the records go through torch.distributed)");
  if (tensor_size < 1 || data_size < 1 || tensor_rank < 0 || tensor_rank >= tensor_size || data_rank < 0 || data_rank >= data_size)
    throw nb::value_error("tropd: group ranks must lie in [0, size)");
  auto r = std::make_unique<sharded_rows_call>();
  r->copies = std::make_unique<host_copies>(c.in.seq_offsets, c.in.from);
  c.in.seq_offsets = r->copies->offsets();
  c.in.from = r->copies->from();
  c.loss = &r->loss_value;
  c.diag = &r->diag;
  r->loss = loss;
  r->stats = stats;
  r->tensor_size = tensor_size;
  r->data_size = data_size;
  shard_args sh;
  sh.v0 = vocab_start;
  sh.v1 = vocab_start + c.student.cols;
  sh.vocab = vocab_size;
  sh.tensor_rank = tensor_rank;
  sh.tensor_size = tensor_size;
  sh.data_rank = data_rank;
  sh.data_size = data_size;
  sh.decisions_per_rank = decisions_per_rank;
  sh.normaliser_per_rank = normaliser_per_rank;
  std::string spec_error;
  tropd::status unsupported;
  switch (c.student.type) {
    case logit_type::f32: r->session = sharded_f32(spec, c, sh, &spec_error, &unsupported); break;
    case logit_type::bf16: r->session = sharded_bf16(spec, c, sh, &spec_error, &unsupported); break;
    case logit_type::f64:
    case logit_type::f16: throw nb::value_error("tropd: the sharded row level takes float32 or bfloat16 logits");
  }
  if (!spec_error.empty()) throw nb::value_error(("tropd: invalid parameter: " + spec_error).c_str());
  if (!r->session) throw nb::value_error(unsupported.message().c_str());
  return r;
}

/// The next exchange: None when the call is done, else (group, send, recv): group 0 = tensor
/// (the vocabulary shards), 1 = data (the other rows); send and recv are uint8 numpy arrays
/// over the call's own buffers (recv: group size x len(send), rank order), valid until the
/// next call of next().
nb::object sharded_next(nb::handle self) {
  sharded_rows_call& r = *nb::inst_ptr<sharded_rows_call>(self);
  if (r.done) return nb::none();
  bool more;
  {
    nb::gil_scoped_release release;
    more = r.session->next(r.ex);
  }
  if (!more) {
    r.done = true;
    return nb::none();
  }
  const size_t group_size = size_t(r.ex.among == tropd::dist::group::tensor ? r.tensor_size : r.data_size);
  const size_t ns[1] = {r.ex.bytes}, nr[1] = {r.ex.bytes * group_size};
  auto send = nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(const_cast<void*>(r.ex.send), 1, ns, self);
  auto recv = nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(r.ex.recv, 1, nr, self);
  return nb::make_tuple(int(r.ex.among), send, recv);
}

/// After next() returned None: writes loss and stats and returns None or the failed status
/// (int(errc), row, column, message), as evaluate_rows does.
nb::object sharded_finish(sharded_rows_call& r) {
  if (!r.done) throw nb::value_error("tropd: finish() before next() returned None (the call still has exchanges to run)");
  const tropd::status st = r.session->result();
  if (st.ok()) {
    if (is_f64(r.loss->dtype())) *static_cast<double*>(r.loss->data()) = r.loss_value;
    else *static_cast<float*>(r.loss->data()) = float(r.loss_value);
    write_stats(r.diag, static_cast<double*>(r.stats->data()));
  }
  return result(st, "");
}

// ---------------------------------------------------------------------------
// The fused LM head (host::fused_lm_head; python/src/fused_<dtype>.cpp)
// ---------------------------------------------------------------------------

/// A head matrix (hidden states or weight): 2-D, unit column stride, float32 or float64 (the
/// host fused call's element types; tropd.torch widens 16-bit heads). Shape relations between
/// the head's arrays are the library's checks (check_head).
logits_arg head_matrix(const char* name, const array& a, device_of_call& dev, logit_type want, bool first) {
  dev.check(name, a);
  check_matrix(name, a, -1, -1);
  if (!is_f32(a.dtype()) && !is_f64(a.dtype())) bad(name, "must be float32 or float64 (the host fused LM head's types), is " + dtype_name(a.dtype()));
  const logits_arg r{a.data(), index_t(a.shape(0)), index_t(a.shape(1)), row_stride(a),
                     is_f32(a.dtype()) ? logit_type::f32 : logit_type::f64};
  if (!first && r.type != want) bad(name, "must have the student hidden states' dtype");
  return r;
}

void head_bias(head_arg& h, const char* name, const opt_array& bias, device_of_call& dev) {
  if (!bias) return;
  dev.check(name, *bias);
  check_vector(name, *bias, -1);
  if ((h.hidden.type == logit_type::f64) ? !is_f64(bias->dtype()) : !is_f32(bias->dtype())) bad(name, "must have the hidden states' dtype");
  h.bias = bias->data();
  h.bias_size = index_t(bias->shape(0));
}

/// A gradient output of the head's dtype (2-D with unit column stride, or 1-D contiguous).
void* head_grad(const char* name, const opt_out& g, device_of_call& dev, logit_type type, size_t ndim, index_t* stride) {
  if (!g) return nullptr;
  dev.check(name, *g);
  if (ndim == 2) {
    check_matrix(name, *g, -1, -1);
    *stride = row_stride(*g);
  } else {
    check_vector(name, *g, -1);
  }
  if (type == logit_type::f64 ? !is_f64(g->dtype()) : !is_f32(g->dtype())) bad(name, "must have the hidden states' dtype");
  return g->data();
}

nb::object evaluate_fused(const std::string& objective, const array& hidden, const array& weight, const opt_array& bias,
                          const opt_array& teacher_hidden, const opt_array& teacher_weight, const opt_array& teacher_bias,
                          const opt_array& teacher_logits, const opt_array& teacher_token_logprobs, const array& token_ids,
                          const array& origin, const array& seq_offsets, const opt_array& sequence_ids, const opt_array& old_logprobs,
                          const opt_array& ref_logprobs, const opt_array& topk_ids, const opt_array& topk_logprobs,
                          const opt_array& old_topk_logprobs, const opt_out& grad_hidden, const opt_out& grad_weight,
                          const opt_out& grad_bias, const out_array& loss, const out_array& stats, const opt_out& flags,
                          const opt_out& advantage, uint64_t seed, uint64_t step, double logit_scale, double softcap,
                          double teacher_logit_scale, double teacher_softcap, double student_temperature, double teacher_temperature,
                          double normaliser, int64_t chunk, uint64_t scratch_budget, int threads, bool mask_bad_input) {
  const objective_spec spec = parse(objective);
  device_of_call dev;
  fused_call c;
  c.student.hidden = head_matrix("student_hidden", hidden, dev, logit_type::f32, true);
  const logit_type type = c.student.hidden.type;
  if (dev.type != dev_cpu)  // code -1: NotImplementedError (python/tropd/_errors.py)
    return nb::make_tuple(nb::make_tuple(-1, int64_t(-1), int64_t(-1),
                                         std::string("tropd: the fused LM head has no CUDA entry point in this extension (the host "
                                                     "fused_lm_head only): pass CPU tensors, or materialise the logits and use distill_loss")),
                          int64_t(0), uint64_t(0), 0);
  c.student.weight = head_matrix("student_weight", weight, dev, type, false);
  head_bias(c.student, "bias", bias, dev);
  c.student.scale = logit_scale;
  c.student.softcap = softcap;
  const index_t n = c.student.hidden.rows;
  const int forms = int(teacher_hidden.has_value()) + int(teacher_logits.has_value()) + int(teacher_token_logprobs.has_value());
  if (teacher_hidden.has_value() != teacher_weight.has_value())
    throw nb::value_error("tropd: teacher_hidden and teacher_weight go together (the teacher's head)");
  if (teacher_bias && !teacher_hidden) throw nb::value_error("tropd: teacher_bias without the teacher's head (teacher_hidden, teacher_weight)");
  if (forms > 1) throw nb::value_error("tropd: pass the teacher one way: its head, its logits, or its token log-probs");
  if (forms == 0)
    throw nb::value_error("tropd: the teacher is missing: pass teacher_hidden and teacher_weight, teacher_logits, or teacher_token_logprobs");
  if (teacher_hidden) {
    c.teacher_head.hidden = head_matrix("teacher_hidden", *teacher_hidden, dev, type, false);
    c.teacher_head.weight = head_matrix("teacher_weight", *teacher_weight, dev, type, false);
    head_bias(c.teacher_head, "teacher_bias", teacher_bias, dev);
    c.teacher_head.scale = teacher_logit_scale;
    c.teacher_head.softcap = teacher_softcap;
  }
  if (teacher_logits) {
    c.teacher = logits("teacher_logits", *teacher_logits, -1, -1, dev);
    if (c.teacher.type != type) bad("teacher_logits", "must have the student hidden states' dtype");
  }
  row_metadata(c, dev, n, teacher_token_logprobs, token_ids, origin, seq_offsets, sequence_ids, old_logprobs, ref_logprobs, topk_ids,
               topk_logprobs, old_topk_logprobs, loss, stats, flags, advantage, seed, step, student_temperature, teacher_temperature,
               normaliser, threads, mask_bad_input);
  index_t unused = 0;
  c.grad_hidden = head_grad("grad_hidden", grad_hidden, dev, type, 2, &c.grad_hidden_stride);
  c.grad_weight = head_grad("grad_weight", grad_weight, dev, type, 2, &c.grad_weight_stride);
  c.grad_bias = head_grad("grad_bias", grad_bias, dev, type, 1, &unused);
  if (chunk < 0) bad("chunk", "must be >= 0 (0: chosen from scratch_budget)");
  c.chunk = index_t(chunk);
  c.scratch_budget = size_t(scratch_budget);
  const host_copies copies(c.in.seq_offsets, c.in.from);
  c.in.seq_offsets = copies.offsets();
  c.in.from = copies.from();
  double loss_value = 0;
  tropd::diagnostics diag;
  c.loss = &loss_value;
  c.diag = &diag;
  std::string spec_error;
  tropd::status st;
  {
    nb::gil_scoped_release release;
    st = type == logit_type::f64 ? fused_f64(spec, c, &spec_error) : fused_f32(spec, c, &spec_error);
  }
  if (st.ok()) {
    if (is_f64(loss.dtype())) *static_cast<double*>(loss.data()) = loss_value;
    else *static_cast<float*>(loss.data()) = float(loss_value);
    write_stats(diag, static_cast<double*>(stats.data()));
  }
  return nb::make_tuple(result(st, spec_error), int64_t(c.used_chunk), uint64_t(c.scratch_bytes), c.sweeps);
}

}  // namespace
}  // namespace tropd_py

NB_MODULE(_C, m) {
  using namespace tropd_py;
  m.doc() = "tropd's compiled core: DLPack arrays in, tropd::host (and, when built with CUDA, tropd::gpu) evaluations out";
  m.attr("__version__") = TROPD_VERSION_STRING;
  m.attr("cuda_compiled") = gpu::compiled();
  if (diagnostic_names().size() != size_t(n_stats)) throw std::logic_error("tropd: diagnostic_names() and stats.hpp disagree");
  m.def("diagnostic_names", &diagnostic_names);
  m.def("objective_info", &objective_info, "objective"_a);
  m.def("preset_defaults", &preset_defaults, "name"_a);
  m.def("preset_names", [] {
    std::vector<std::string> v(std::begin(preset_names), std::end(preset_names));
    return v;
  });
  m.def("evaluate_rows", &evaluate_rows, "objective"_a, "student_logits"_a, "teacher_logits"_a.none(), "teacher_token_logprobs"_a.none(),
        "token_ids"_a, "origin"_a, "seq_offsets"_a, "sequence_ids"_a.none(), "old_logprobs"_a.none(), "ref_logprobs"_a.none(),
        "teacher_topk_ids"_a.none(), "teacher_topk_logprobs"_a.none(), "old_topk_logprobs"_a.none(), "grad"_a.none(), "loss"_a,
        "stats"_a, "flags"_a.none(), "advantage"_a.none(), "dloss_ds"_a.none(), "seed"_a, "step"_a, "student_temperature"_a,
        "teacher_temperature"_a, "normaliser"_a, "threads"_a, "mask_bad_input"_a, "scratch"_a.none(), "stream"_a,
        "Row level: tropd::host::evaluate_rows on DLPack arrays (outputs are written in place). Returns None, or "
        "(int(tropd::errc), row, column, message) for a failed tropd status.");
  m.def("rows_scratch_bytes", &rows_scratch_bytes, "objective"_a, "student_logits"_a, "teacher_logits"_a.none(),
        "teacher_token_logprobs"_a.none(), "token_ids"_a, "origin"_a, "seq_offsets"_a, "sequence_ids"_a.none(), "old_logprobs"_a.none(),
        "ref_logprobs"_a.none(), "teacher_topk_ids"_a.none(), "teacher_topk_logprobs"_a.none(), "old_topk_logprobs"_a.none(),
        "grad"_a.none(), "loss"_a, "stats"_a, "flags"_a.none(), "advantage"_a.none(), "dloss_ds"_a.none(), "seed"_a, "step"_a,
        "student_temperature"_a, "teacher_temperature"_a, "normaliser"_a, "threads"_a, "mask_bad_input"_a,
        "CUDA arrays: the bytes of the uint8 scratch evaluate_rows needs with the same arguments (tropd::gpu::"
        "evaluate_rows_scratch_bytes plus the binding's 256), or a failed status tuple.");
  nb::class_<sharded_rows_call>(m, "ShardedRowsCall",
                                "A vocabulary-sharded evaluate_rows in progress (tropd/dist/rows.hpp): run each exchange next() "
                                "returns as an all-gather among its group, then finish().")
      .def("next", &sharded_next, "Returns None when done, else (group, send, recv): uint8 arrays over the call's buffers.")
      .def("finish", &sharded_finish, "Returns None, or (int(tropd::errc), row, column, message) for a failed status.");
  m.def("sharded_rows", &sharded_rows, "objective"_a, "student_logits"_a, "teacher_logits"_a.none(), "teacher_token_logprobs"_a.none(),
        "token_ids"_a, "origin"_a, "seq_offsets"_a, "sequence_ids"_a.none(), "old_logprobs"_a.none(), "ref_logprobs"_a.none(),
        "teacher_topk_ids"_a.none(), "teacher_topk_logprobs"_a.none(), "old_topk_logprobs"_a.none(), "grad"_a.none(), "loss"_a,
        "stats"_a, "flags"_a.none(), "advantage"_a.none(), "dloss_ds"_a.none(), "seed"_a, "step"_a, "student_temperature"_a,
        "teacher_temperature"_a, "normaliser"_a, "threads"_a, "mask_bad_input"_a, "vocab_start"_a, "vocab_size"_a, "tensor_rank"_a,
        "tensor_size"_a, "data_rank"_a, "data_size"_a, "decisions_per_rank"_a, "normaliser_per_rank"_a,
        "The vocabulary-sharded row level (tropd::dist::rows_call) on CPU DLPack arrays: this rank's columns "
        "[vocab_start, vocab_start + cols) of the logits; returns a ShardedRowsCall.");
  m.def("evaluate_fused", &evaluate_fused, "objective"_a, "student_hidden"_a, "student_weight"_a, "bias"_a.none(),
        "teacher_hidden"_a.none(), "teacher_weight"_a.none(), "teacher_bias"_a.none(), "teacher_logits"_a.none(),
        "teacher_token_logprobs"_a.none(), "token_ids"_a, "origin"_a, "seq_offsets"_a, "sequence_ids"_a.none(), "old_logprobs"_a.none(),
        "ref_logprobs"_a.none(), "teacher_topk_ids"_a.none(), "teacher_topk_logprobs"_a.none(), "old_topk_logprobs"_a.none(),
        "grad_hidden"_a.none(), "grad_weight"_a.none(), "grad_bias"_a.none(), "loss"_a, "stats"_a, "flags"_a.none(), "advantage"_a.none(),
        "seed"_a, "step"_a, "logit_scale"_a, "softcap"_a, "teacher_logit_scale"_a, "teacher_softcap"_a, "student_temperature"_a,
        "teacher_temperature"_a, "normaliser"_a, "chunk"_a, "scratch_budget"_a, "threads"_a, "mask_bad_input"_a,
        "The fused LM head: tropd::host::fused_lm_head on CPU DLPack arrays (grad_weight / grad_bias are ADDED to). Returns "
        "(status, chunk, scratch_bytes, sweeps), status None or (int(tropd::errc), row, column, message).");
  m.def("evaluate_tokens", &evaluate_tokens, "objective"_a, "student_logprobs"_a, "teacher_logprobs"_a, "origin"_a, "seq_offsets"_a,
        "sequence_ids"_a.none(), "old_logprobs"_a.none(), "student_entropy"_a.none(), "teacher_entropy"_a.none(), "rkl"_a.none(),
        "ref_logprobs"_a.none(), "teacher_topk_ids"_a.none(), "teacher_topk_logprobs"_a.none(), "student_topk_logprobs"_a.none(),
        "old_topk_logprobs"_a.none(), "loss"_a, "stats"_a, "dloss_ds"_a.none(), "dloss_dtopk"_a.none(), "flags"_a.none(),
        "advantage"_a.none(), "seed"_a, "step"_a, "normaliser"_a, "mask_bad_input"_a, "scratch"_a.none(), "stream"_a,
        "Token level: tropd::host::evaluate_tokens on DLPack arrays (outputs are written in place). Returns None, or "
        "(int(tropd::errc), row, column, message) for a failed tropd status.");
  m.def("tokens_scratch_bytes", &tokens_scratch_bytes, "objective"_a, "student_logprobs"_a, "teacher_logprobs"_a, "origin"_a,
        "seq_offsets"_a, "sequence_ids"_a.none(), "old_logprobs"_a.none(), "student_entropy"_a.none(), "teacher_entropy"_a.none(),
        "rkl"_a.none(), "ref_logprobs"_a.none(), "teacher_topk_ids"_a.none(), "teacher_topk_logprobs"_a.none(),
        "student_topk_logprobs"_a.none(), "old_topk_logprobs"_a.none(), "loss"_a, "stats"_a, "dloss_ds"_a.none(),
        "dloss_dtopk"_a.none(), "flags"_a.none(), "advantage"_a.none(), "seed"_a, "step"_a, "normaliser"_a, "mask_bad_input"_a,
        "CUDA arrays: the bytes of the uint8 scratch evaluate_tokens needs with the same arguments, or a failed status tuple.");
}
