// python/src/dist_impl.hpp: the body of dist_<dtype>.cpp (python/src/dist.hpp): a
// dist::rows_call for every preset's objective, student (and teacher) logits of one element
// type. Each dist_<dtype>.cpp defines TROPD_PY_LOGIT and TROPD_PY_SHARDED and includes this file.
#pragma once

#include <tropd/dist/rows.hpp>

#include "dist.hpp"

namespace tropd_py {

namespace {

template <class Obj, class T, class Teacher, class G>
class session_impl final : public sharded_session {
 public:
  session_impl(const Obj& obj, const rows_call& c, const Teacher& teacher, const shard_args& sh)
      : obj_(obj),
        c_(c),
        call_(obj_, tropd::matrix_view<const T>{static_cast<const T*>(c_.student.data), c_.student.rows, c_.student.cols, c_.student.stride},
              teacher, c_.in, outputs(), c_.opt, options(sh), {sh.tensor_rank, sh.tensor_size}, {sh.data_rank, sh.data_size}) {}

  bool next(tropd::dist::exchange& ex) override { return call_.next(ex); }
  tropd::status result() const override { return call_.result(); }

 private:
  Obj obj_;
  rows_call c_;
  tropd::dist::rows_call<Obj, T, Teacher, G> call_;

  tropd::host::row_outputs<G> outputs() const {
    tropd::host::row_outputs<G> out{};
    if (c_.grad) out.grad = tropd::matrix_view<G>{static_cast<G*>(c_.grad), c_.student.rows, c_.student.cols, c_.grad_stride};
    out.loss = c_.loss;
    out.diag = c_.diag;
    out.dloss_ds = c_.dloss_ds;
    out.advantage = c_.advantage;
    out.flags = c_.flags;
    return out;
  }
  static tropd::dist::shard_options options(const shard_args& sh) {
    tropd::dist::shard_options so;
    so.shard = {sh.v0, sh.v1, sh.vocab};
    so.data.decisions = sh.decisions_per_rank ? tropd::dist::scope::per_rank : tropd::dist::scope::global;
    so.data.normaliser = sh.normaliser_per_rank ? tropd::dist::scope::per_rank : tropd::dist::scope::global;
    return so;
  }
};

}  // namespace

std::unique_ptr<sharded_session> TROPD_PY_SHARDED(const objective_spec& spec, const rows_call& c, const shard_args& sh, std::string* error,
                                                  tropd::status* unsupported) {
  using T = TROPD_PY_LOGIT;
  using G = std::conditional_t<std::is_same_v<T, double>, double, float>;
  std::unique_ptr<sharded_session> s;
  const tropd::status st = visit_objective(spec, c.normaliser, error, [&](const auto& obj) -> tropd::status {
    using Obj = std::decay_t<decltype(obj)>;
    if (c.teacher.data) {
      using Teacher = tropd::matrix_view<const T>;
      const Teacher teacher{static_cast<const T*>(c.teacher.data), c.teacher.rows, c.teacher.cols, c.teacher.stride};
      s = std::make_unique<session_impl<Obj, T, Teacher, G>>(obj, c, teacher, sh);
      return {};
    }
    if constexpr (takes_served_teacher<Obj>) {
      s = std::make_unique<session_impl<Obj, T, tropd::host::teacher_logprobs, G>>(obj, c, tropd::host::teacher_logprobs{c.teacher_t}, sh);
      return {};
    } else {
      return tropd::make_error(tropd::errc::unsupported,
                               "this objective reads the teacher's full distribution (entropy, KL or a dense term): pass teacher logits");
    }
  });
  if (!st.ok() && unsupported) *unsupported = st;
  return s;
}

}  // namespace tropd_py
