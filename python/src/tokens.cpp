// host::evaluate_tokens for every preset whose objective has no full-vocabulary term.
#include "calls.hpp"

namespace tropd_py {

tropd::status tokens(const objective_spec& spec, const tokens_call& c, std::string* error) {
  return visit_objective(spec, c.normaliser, error, [&](const auto& obj) -> tropd::status {
    using Obj = std::decay_t<decltype(obj)>;
    if constexpr (Obj::has_dense) {
      return tropd::make_error(tropd::errc::unsupported, needs_logits);
    } else {
      return tropd::host::evaluate_tokens(obj, c.batch, c.out, c.opt);
    }
  });
}

}  // namespace tropd_py
