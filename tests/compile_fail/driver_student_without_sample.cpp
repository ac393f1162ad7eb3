// expect: the student must provide std::vector<int32_t> sample
// A student with logits + backward_logits but no `sample` member: distill_step must stop at
// its first static_assert (tropd/runtime/driver.hpp), which names the missing member.
#include <stdint.h>

#include <span>
#include <vector>

#include <tropd/objective.hpp>
#include <tropd/runtime/driver.hpp>
#include <tropd/schedules/prefix.hpp>

#include "runtime/mock_runtime.hpp"

namespace {

struct student_without_sample {
  tropd::index_t vocab_size() const { return 7; }
  tropd::status logits(const tropd::runtime::sequence_batch&, tropd::matrix_view<float>) { return {}; }
  tropd::status backward_logits(const tropd::runtime::sequence_batch&, tropd::matrix_view<const float>) { return {}; }
};

}  // namespace

tropd::status step_without_sample(std::span<const tropd::schedules::prompt_example> prompts) {
  student_without_sample student;
  tropd_test::mock::full_teacher teacher(tropd_test::mock::closed_form::make(7, 1, 1.0f));
  tropd::runtime::step_report report;
  return tropd::runtime::distill_step(student, teacher, prompts, tropd::presets::opd(), tropd::schedules::cosine{},
                                      tropd::runtime::step_config{}, report);
}
