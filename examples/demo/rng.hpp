// rng.hpp: small deterministic random numbers for the demo.
//
// Every random choice of the demo (problems, initial weights, SFT noise, prompts per step,
// sampling) comes from a SplitMix64 stream whose seed is a hash of named parts, e.g.
// seed_of({seed_offset, tag::prompts, run_seed, step}). The same parts give the same numbers
// on every run and in every thread, so results do not depend on scheduling.
#pragma once

#include <stdint.h>

#include <cmath>
#include <initializer_list>
#include <vector>

#include <Eigen/Core>

namespace demo {

/// SplitMix64's finaliser: a bijective 64-bit mixer.
inline uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// A seed from an ordered list of parts.
inline uint64_t seed_of(std::initializer_list<uint64_t> parts) {
  uint64_t h = 0x243F6A8885A308D3ull;
  for (uint64_t p : parts) h = mix64(h ^ mix64(p + 0x632BE59BD9B4E019ull));
  return h;
}

/// Tags that keep the demo's random streams apart.
namespace tag {
inline constexpr uint64_t eval_set = 1, teacher_init = 2, student_init = 3, teacher_sft = 4, student_sft = 5,
                          pool = 6, teacher_responses = 7, prompts = 8, run = 9, eval_sampling = 10, gradcheck = 11;
}

/// SplitMix64 generator.
class rng {
 public:
  explicit rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    s_ += 0x9E3779B97F4A7C15ull;
    uint64_t z = s_;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, 1).
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  /// Uniform integer in [0, n).
  int below(int n) { return static_cast<int>(uniform() * n); }
  bool bernoulli(double p) { return uniform() < p; }
  /// Standard normal (Box-Muller).
  double normal() {
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  uint64_t s_;
};

/// Samples an index from unnormalised log-weights z (temperature > 0), or the argmax
/// (temperature <= 0; ties: lowest index). u is uniform in [0, 1); scratch is reused. The
/// weights exp((z - max z) / T) are computed in float with Eigen's vectorised exp and summed
/// in double. The scratch is an Eigen array (aligned storage): Eigen evaluates the elements
/// before the first aligned address with the scalar exp, so an unaligned buffer whose
/// address changes between runs would change the rounding of a few weights.
inline int sample_logits(const float* z, int n, double temperature, double u, Eigen::ArrayXf& scratch) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (z[i] > z[best]) best = i;
  if (temperature <= 0) return best;
  scratch.resize(n);
  Eigen::Map<const Eigen::ArrayXf> zv(z, n);
  Eigen::ArrayXf& p = scratch;
  p = ((zv - z[best]) * float(1.0 / temperature)).exp();
  double total = 0;
  for (int i = 0; i < n; ++i) total += double(p[i]);
  double acc = 0, target = u * total;
  for (int i = 0; i < n; ++i) {
    acc += double(p[i]);
    if (target < acc) return i;
  }
  return n - 1;
}

}  // namespace demo
