// The per-token outputs of host::evaluate_tokens (core/token_batch.hpp, token_outputs): an
// ok status means every requested output is written and finite. Here: dloss_dtopk for an
// objective without a top-k term, whose width K is the top-k ids' while the batch's teacher
// list is narrower or absent (the objective never reads them): zeros in every column.
#include <stdint.h>

#include <cmath>
#include <limits>
#include <vector>

#include <doctest/doctest.h>
#include <tropd/host/objective.hpp>
#include <tropd/objective/presets.hpp>

using tropd::index_t;

TEST_CASE("token outputs: dloss_dtopk is written in every column for an objective without a top-k term") {
  // Found by the fuzz stage (objective target): OPD with top-k ids [n x 6] and a teacher list
  // [n x 5] left column 5 of dloss_dtopk unwritten (its poison NaN) under an ok status.
  const index_t n = 3, K = 6;
  const std::vector<double> s = {-0.5, -1.0, -2.0}, t = {-0.7, -0.4, -2.5};
  const std::vector<tropd::origin> from = {tropd::origin::prompt, tropd::origin::student, tropd::origin::student};
  const std::vector<index_t> off = {0, 1, 3};
  std::vector<int32_t> ids(static_cast<size_t>(n * K));
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i % 7);
  const std::vector<double> lq(static_cast<size_t>(n * K), -1.5), ls(static_cast<size_t>(n * K), -2.0);
  for (index_t teacher_cols : {K - 1, index_t(0)}) {
    CAPTURE(teacher_cols);
    tropd::token_batch b;
    b.s = {s.data(), n};
    b.t = {t.data(), n};
    b.from = {from.data(), n};
    b.seq_offsets = {off.data(), 3};
    b.topk_ids = tropd::make_matrix<const int32_t>(ids.data(), n, K);
    if (teacher_cols > 0) {
      b.topk_teacher = tropd::values_matrix(lq.data(), n, teacher_cols, K);
      b.topk_student = tropd::values_matrix(ls.data(), n, teacher_cols, K);
    }
    std::vector<float> g(static_cast<size_t>(n * K), std::numeric_limits<float>::quiet_NaN());
    std::vector<float> dlds(static_cast<size_t>(n), std::numeric_limits<float>::quiet_NaN());
    double loss = std::numeric_limits<double>::quiet_NaN();
    tropd::token_outputs out;
    out.loss = &loss;
    out.dloss_ds = tropd::view_of(dlds);
    out.dloss_dtopk = tropd::make_matrix(g.data(), n, K);
    const tropd::status st = tropd::host::evaluate_tokens(tropd::presets::opd(), b, out);
    REQUIRE_MESSAGE(st.ok(), st.message());
    CHECK(std::isfinite(loss));
    for (size_t i = 0; i < g.size(); ++i) {
      CAPTURE(i);
      CHECK(g[i] == 0.0f);
    }
    for (float x : dlds) CHECK(std::isfinite(x));
  }
}
