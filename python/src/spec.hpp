// python/src/spec.hpp: the objective of a Python call, as a text spec, and the one place that
// turns it into a tropd objective (the C++ preset function of the same name, then its knobs).
//
//   "tropd;k=64;beta=0.001;form=c;aggregation=token_mean"
//
// The first field names a preset of tropd/objective/presets.hpp; every other field is
// key=value, a field of that preset's config struct or one of the objective's fields the
// binding exposes (aggregation, aggregation_constant, and the PG clip of every preset whose
// objective has one). Unknown keys, bad values and keys of another preset are errors
// (errc::invalid_parameter): nothing is silently ignored. The Python dataclasses of
// python/tropd/presets.py write these strings; preset_defaults() below is what the tests
// compare their defaults with.
//
// The set of objective types is fixed (one per preset): visit_objective instantiates its
// callable once per type, which is the whole set of objectives the extension compiles.
#pragma once

#include <stdint.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <tropd/objective.hpp>

namespace tropd_py {

using tropd::errc;
using tropd::status;

/// The presets the extension instantiates (the names of tropd::presets' functions).
inline constexpr const char* preset_names[] = {"opd",        "eopd",  "reopold", "entropy_opd", "clip_outlier", "mask_outlier",
                                               "fkl_outlier", "tropd", "gkd",     "vopd",        "gopd"};

/// A parsed spec: the preset and its key=value fields (in order of appearance).
struct objective_spec {
  std::string preset;
  std::vector<std::pair<std::string, std::string>> fields;
};

/// Parses "preset;key=value;...". Whitespace around fields is not allowed (the Python side
/// writes these strings). The message of a failed parse is stored in `error`.
inline bool parse_spec(std::string_view text, objective_spec& out, std::string& error) {
  out = {};
  size_t pos = 0;
  bool first = true;
  while (pos <= text.size()) {
    size_t end = text.find(';', pos);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view field = text.substr(pos, end - pos);
    if (first) {
      out.preset = std::string(field);
      first = false;
    } else if (!field.empty()) {
      const size_t eq = field.find('=');
      if (eq == std::string_view::npos || eq == 0) {
        error = "objective spec: field '" + std::string(field) + "' is not key=value";
        return false;
      }
      out.fields.emplace_back(std::string(field.substr(0, eq)), std::string(field.substr(eq + 1)));
    }
    pos = end + 1;
  }
  bool known = false;
  for (const char* p : preset_names) known |= out.preset == p;
  if (!known) {
    error = "objective spec: unknown preset '" + out.preset + "'";
    return false;
  }
  return true;
}

namespace detail {

/// Reads the fields of one spec into config members, remembering which were used.
class knobs {
 public:
  /// `describe` non-null: no field is read; every key is recorded with its current value.
  explicit knobs(const objective_spec& s, std::vector<std::pair<std::string, std::string>>* describe = nullptr)
      : spec_(s), used_(s.fields.size(), false), describe_(describe) {}

  /// A finite-or-infinite number ("inf", "-inf" allowed; NaN is not).
  bool number(const char* key, double& v) {
    if (describe_) return record(key, format(v));
    const std::string* s = find(key);
    if (!s) return true;
    char* end = nullptr;
    const double x = std::strtod(s->c_str(), &end);
    if (s->empty() || end != s->c_str() + s->size() || std::isnan(x)) return fail(key, *s, "a number");
    v = x;
    return true;
  }
  template <class I>
  bool integer(const char* key, I& v) {
    if (describe_) return record(key, std::to_string(static_cast<long long>(v)));
    double x = double(v);
    const std::string* s = find(key);
    if (!s) return true;
    if (!number(key, x) || !(std::fabs(x) < 9.0e15) || std::floor(x) != x) return fail(key, *s, "an integer");
    v = static_cast<I>(x);
    return true;
  }
  template <class E, size_t N>
  bool choice(const char* key, E& v, const std::pair<const char*, E> (&options)[N]) {
    if (describe_) {
      for (const auto& o : options)
        if (o.second == v) return record(key, o.first);
      return record(key, "?");
    }
    const std::string* s = find(key);
    if (!s) return true;
    for (const auto& o : options)
      if (*s == o.first) {
        v = o.second;
        return true;
      }
    std::string want;
    for (const auto& o : options) want += std::string(want.empty() ? "" : ", ") + o.first;
    return fail(key, *s, ("one of " + want).c_str());
  }
  /// After the preset has read its keys: any field left over is an error.
  bool finish() {
    for (size_t i = 0; i < spec_.fields.size(); ++i)
      if (!used_[i]) {
        error_ = "objective spec: preset '" + spec_.preset + "' has no field '" + spec_.fields[i].first + "'";
        return false;
      }
    return error_.empty();
  }
  const std::string& error() const { return error_; }
  bool ok() const { return error_.empty(); }

 private:
  static std::string format(double v) {
    if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.17g", v);
    return buf;
  }
  bool record(const char* key, std::string value) {
    for (const auto& kv : *describe_)
      if (kv.first == key) return true;  // the first reading is the preset's own default
    describe_->emplace_back(key, std::move(value));
    return true;
  }
  const std::string* find(const char* key) {
    const std::string* hit = nullptr;
    for (size_t i = 0; i < spec_.fields.size(); ++i)
      if (spec_.fields[i].first == key) {
        used_[i] = true;
        hit = &spec_.fields[i].second;  // the last one wins
      }
    return hit;
  }
  bool fail(const char* key, const std::string& value, const char* want) {
    if (error_.empty()) error_ = "objective spec: field '" + std::string(key) + "' = '" + value + "' is not " + want;
    return false;
  }

  const objective_spec& spec_;
  std::vector<bool> used_;
  std::vector<std::pair<std::string, std::string>>* describe_;
  std::string error_;
};

inline constexpr std::pair<const char*, tropd::aggregation::mode> aggregation_modes[] = {
    {"token_mean", tropd::aggregation::mode::token_mean},
    {"kept_token_mean", tropd::aggregation::mode::kept_token_mean},
    {"seq_mean_token_mean", tropd::aggregation::mode::seq_mean_token_mean},
    {"seq_mean_token_sum", tropd::aggregation::mode::seq_mean_token_sum},
    {"sum_over_constant", tropd::aggregation::mode::sum_over_constant},
};
inline constexpr std::pair<const char*, tropd::outliers::fkl_form> fkl_forms[] = {
    {"c", tropd::outliers::fkl_form::c},
    {"p", tropd::outliers::fkl_form::p},
};
inline constexpr std::pair<const char*, tropd::estimators::topk_tail> topk_tails[] = {
    {"renormalised", tropd::estimators::topk_tail::renormalised},
    {"raw", tropd::estimators::topk_tail::raw},
    {"tail_bucket", tropd::estimators::topk_tail::tail_bucket},
};
inline constexpr std::pair<const char*, tropd::guidance_form> guidance_forms[] = {
    {"sft", tropd::guidance_form::sft},
    {"pg", tropd::guidance_form::pg},
};

/// The objective fields every preset exposes: aggregation, and the PG clip where there is one.
template <class Obj>
void common_fields(knobs& k, Obj& o) {
  k.choice("aggregation", o.agg.how, aggregation_modes);
  k.number("aggregation_constant", o.agg.constant);
  if constexpr (std::is_same_v<typename Obj::clip_type, tropd::clippers::pg_clip>) {
    k.number("eps_low", o.clip.eps_low);
    k.number("eps_high", o.clip.eps_high);
    k.number("dual_clip", o.clip.dual_c);
  }
}

inline status spec_error(const std::string& msg, std::string* error) {
  if (error) *error = msg;
  return tropd::make_error(errc::invalid_parameter, "objective spec rejected (see the message)");
}

}  // namespace detail

/// Builds the objective a spec names and calls f(obj) -> status. `normaliser` > 0 replaces
/// the objective's aggregation normaliser (the call's external normaliser). A spec error
/// returns errc::invalid_parameter with the sentence in *error.
/// `describe` non-null: the spec's fields are not read; the preset's keys and default values
/// are appended to *describe instead (then f still runs on the default objective).
template <class F>
status visit_objective(const objective_spec& s, double normaliser, std::string* error, F&& f,
                       std::vector<std::pair<std::string, std::string>>* describe = nullptr) {
  namespace P = tropd::presets;
  detail::knobs k(s, describe);
  auto run = [&](auto o) -> status {
    detail::common_fields(k, o);
    if (!k.finish()) return detail::spec_error(k.error(), error);
    if (normaliser > 0) o.agg.normaliser = normaliser;
    else if (normaliser < 0 || std::isnan(normaliser))
      return detail::spec_error("normaliser must be > 0 (or None)", error);
    return f(o);
  };
  const std::string& p = s.preset;
  if (p == "opd") {
    P::opd_config c;
    k.number("adv_low", c.clip.adv_lo);
    k.number("adv_high", c.clip.adv_hi);
    return run(P::opd(c));
  }
  if (p == "eopd") {
    P::eopd_config c;
    k.number("tau", c.tau);
    k.integer("k", c.k);
    k.number("eps_low", c.eps_low);
    k.number("eps_high", c.eps_high);
    k.choice("tail", c.tail, detail::topk_tails);
    return run(P::eopd(c));
  }
  if (p == "reopold") {
    P::reopold_config c;
    k.number("floor", c.floor);
    k.integer("switch_step", c.switch_step);
    k.number("entropy_fraction", c.entropy_fraction);
    return run(P::reopold(c));
  }
  if (p == "entropy_opd") {
    P::entropy_opd_config c;
    k.number("fraction", c.fraction);
    return run(P::entropy_opd(c));
  }
  if (p == "clip_outlier") {
    P::clip_outlier_config c;
    k.number("tau", c.tau);
    k.number("guidance_beta", c.guidance_beta);
    return run(P::clip_outlier(c));
  }
  if (p == "mask_outlier") {
    P::mask_outlier_config c;
    k.number("tau", c.tau);
    k.number("guidance_beta", c.guidance_beta);
    return run(P::mask_outlier(c));
  }
  if (p == "fkl_outlier") {
    P::fkl_outlier_config c;
    k.integer("k", c.k);
    k.choice("form", c.form, detail::fkl_forms);
    k.number("clamp", c.clamp);
    k.choice("tail", c.tail, detail::topk_tails);
    return run(P::fkl_outlier(c));
  }
  if (p == "tropd") {
    P::tropd_config c;
    k.number("beta", c.beta);
    k.integer("k", c.k);
    k.choice("form", c.form, detail::fkl_forms);
    k.number("clamp", c.clamp);
    k.choice("tail", c.tail, detail::topk_tails);
    k.choice("guidance", c.guidance, detail::guidance_forms);
    return run(P::tropd(c));
  }
  if (p == "gkd") {
    P::gkd_config c;
    k.number("beta", c.beta);
    return run(P::gkd(c));
  }
  if (p == "vopd") return run(P::vopd());
  if (p == "gopd") {
    P::gopd_config c;
    k.number("lambda", c.lambda);
    return run(P::gopd(c));
  }
  return detail::spec_error("objective spec: unknown preset '" + p + "'", error);
}

/// Whether an objective type can take a served teacher (sampled-token log-probs, optional
/// top-k lists) at row level: it must not read the teacher's full distribution.
template <class Obj>
inline constexpr bool takes_served_teacher =
    !(Obj::has_dense || Obj::region_type::needs_teacher_entropy || Obj::trust_type::needs_rkl);

/// What each preset's objective reads, for Python's early checks and docs.
struct objective_traits {
  bool needs_topk = false;              ///< an outlier term on the teacher's top-k
  bool needs_teacher_logits = false;    ///< reads the teacher's full distribution (row level)
  bool needs_student_entropy = false;   ///< token level: student_entropy
  bool needs_teacher_entropy = false;   ///< token level: teacher_entropy
  bool needs_rkl = false;               ///< token level: rkl
  bool needs_ref = false;               ///< reference log-probs (G-OPD)
  bool has_dense = false;               ///< a full-vocabulary term (row level only)
  int k = 0;                            ///< the top-k width (0: none)
};

template <class Obj>
objective_traits traits_of(const Obj& o) {
  objective_traits t;
  t.needs_topk = Obj::outlier_type::needs_topk;
  t.needs_teacher_logits = !takes_served_teacher<Obj>;
  t.needs_student_entropy = Obj::region_type::needs_student_entropy;
  t.needs_teacher_entropy = Obj::region_type::needs_teacher_entropy;
  t.needs_rkl = Obj::trust_type::needs_rkl;
  t.needs_ref = Obj::trust_type::needs_ref;
  t.has_dense = Obj::has_dense;
  if constexpr (Obj::outlier_type::needs_topk) t.k = o.outlier.fkl.k;
  return t;
}

}  // namespace tropd_py
