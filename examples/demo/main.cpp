// tropd-demo: a real on-policy distillation run, OPD vs EOPD vs REOPOLD vs TrOPD (and
// TrOPD's ablations), on a synthetic reasoning task with a verifiable answer.
//
//   1. set up (once, deterministic, shared by every run): held-out prompts; a teacher MLP
//      trained on correct worked solutions; a smaller student MLP trained on a different,
//      noisier source (task.hpp); a pool of training prompts with teacher responses
//      sampled before training (for off-policy guidance);
//   2. report how far apart they start (fraction of student tokens with R < -5, TV);
//   3. run every (method, seed) job, on --threads std::threads (each job single-threaded,
//      with its own copies of the models), all with the same steps, learning rate, batch
//      and seeds; every step is tropd::runtime::distill_step;
//   4. print the table, write OUT/summary.csv, OUT/curves.csv, OUT/curves.png.
//
// Run `tropd-demo --help` for the flags. See docs/results.md for a discussion of the output.
#include <stdio.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "experiment.hpp"
#include "mlp.hpp"
#include "report.hpp"
#include "rng.hpp"
#include "task.hpp"

namespace {

using namespace demo;

const char* usage =
    "tropd-demo: on-policy distillation on multi-digit addition; OPD, EOPD, REOPOLD, TrOPD and ablations.\n"
    "\n"
    "  --out DIR             output folder (default out/demo)\n"
    "  --steps N             distillation steps per run (default 200)\n"
    "  --seeds S             seeds per method (default 5)\n"
    "  --seed-offset K       seeds are K .. K+S-1; K also keys the shared setup (default 0)\n"
    "  --methods LIST        comma list from opd,eopd,reopold,tropd,fkl_outlier,mask_outlier,clip_outlier (default: these\n"
    "                        seven) and the diagnostic opd_prefix (OPD with TrOPD's guidance and cosine prefixes)\n"
    "  --threads T           parallel jobs (default 2); results do not depend on T\n"
    "  --digits N            digits per operand (default 3)\n"
    "  --base B              number base; vocabulary V = B + 6 (default 10)\n"
    "  --window W            model context window (default 2 * digits + 2, the smallest that sees the operands)\n"
    "  --mismatch M          in [0, 1]: fraction of the student's SFT solutions in the other carry format, and\n"
    "                        twice the probability of forgetting a carry (default 0.5)\n"
    "  --prompts P           prompts per step (default 32)\n"
    "  --rollouts N          on-policy samples per prompt (default 4)\n"
    "  --lr X                Adam learning rate of distillation, all methods (default 1e-2)\n"
    "  --eval-every N        held-out evaluation every N steps (default 20)\n"
    "  --eval-prompts N      held-out prompts (default 256)\n"
    "  --eval-samples K      T = 1 samples per held-out prompt for pass@1 and the divergences (default 4)\n"
    "  --tau X               static log-ratio threshold of mask / clip outlier (default -5)\n"
    "  --reopold-floor X     REOPOLD's reward floor (default -5)\n"
    "  --beta X              off-policy guidance weight (default 1e-3, TrOPD's)\n"
    "  --topk K              top-k of the FKL terms (default: the presets' 64 for TrOPD, 16 for EOPD)\n"
    "  --fkl-form c|p        outlier FKL form of tropd / fkl_outlier (default c, the preset's)\n"
    "  --teacher-hidden H, --student-hidden H, --embed D   model sizes (default 128, 48, 16)\n"
    "  --teacher-sft-steps N, --student-sft-steps N        supervised steps of the setup (default 1500, 800)\n"
    "  --no-plot             do not run gnuplot\n";

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

options parse(int argc, char** argv) {
  options o;
  auto need = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw std::runtime_error(std::string("missing value after ") + argv[i]);
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      fputs(usage, stdout);
      std::exit(0);
    } else if (a == "--out") o.out = need(i);
    else if (a == "--steps") o.steps = std::stoi(need(i));
    else if (a == "--seeds") o.seeds = std::stoi(need(i));
    else if (a == "--seed-offset") o.seed_offset = std::stoull(need(i));
    else if (a == "--methods") o.methods = split(need(i), ',');
    else if (a == "--threads") o.threads = std::stoi(need(i));
    else if (a == "--digits") o.task.digits = std::stoi(need(i));
    else if (a == "--base") o.task.base = std::stoi(need(i));
    else if (a == "--window") o.window = std::stoi(need(i));
    else if (a == "--mismatch") o.mismatch = std::stod(need(i));
    else if (a == "--prompts") o.prompts = std::stoi(need(i));
    else if (a == "--rollouts") o.rollouts = std::stoi(need(i));
    else if (a == "--lr") o.lr = std::stod(need(i));
    else if (a == "--eval-every") o.eval_every = std::stoi(need(i));
    else if (a == "--eval-prompts") o.eval_prompts = std::stoi(need(i));
    else if (a == "--eval-samples") o.eval_samples = std::stoi(need(i));
    else if (a == "--tau") o.tau = std::stod(need(i));
    else if (a == "--reopold-floor") o.reopold_floor = std::stod(need(i));
    else if (a == "--beta") o.beta = std::stod(need(i));
    else if (a == "--topk") o.topk = std::stoi(need(i));
    else if (a == "--fkl-form") {
      const std::string f = need(i);
      if (f != "c" && f != "p") throw std::runtime_error("--fkl-form takes c or p");
      o.fkl_form = f == "c" ? tropd::outliers::fkl_form::c : tropd::outliers::fkl_form::p;
    }
    else if (a == "--teacher-hidden") o.teacher_hidden = std::stoi(need(i));
    else if (a == "--student-hidden") o.student_hidden = std::stoi(need(i));
    else if (a == "--embed") o.embed = std::stoi(need(i));
    else if (a == "--teacher-sft-steps") o.teacher_sft_steps = std::stoi(need(i));
    else if (a == "--student-sft-steps") o.student_sft_steps = std::stoi(need(i));
    else if (a == "--no-plot") o.plot = false;
    else throw std::runtime_error("unknown flag " + a + " (see --help)");
  }
  if (o.methods.empty()) o.methods = all_methods();
  for (const auto& m : o.methods) {
    bool known = false;
    for (const auto& k : all_methods()) known = known || k == m;
    for (const auto& k : extra_methods()) known = known || k == m;
    if (!known) throw std::runtime_error("unknown method '" + m + "' (see --help)");
  }
  if (o.window <= 0) o.window = o.task.natural_window();
  if (o.steps < 1 || o.seeds < 1 || o.threads < 1 || o.prompts < 1 || o.rollouts < 1 || o.eval_every < 1 ||
      o.eval_prompts < 1 || o.eval_samples < 1 || o.pool < 1)
    throw std::runtime_error("steps, seeds, threads, prompts, rollouts, eval-every, eval-prompts must be >= 1");
  if (o.task.digits < 1 || o.task.base < 2) throw std::runtime_error("need digits >= 1 and base >= 2");
  if (!(o.mismatch >= 0 && o.mismatch <= 1)) throw std::runtime_error("mismatch must lie in [0, 1]");
  // The held-out prompts must leave most of the problem space (base^(2 digits)) for training.
  double space = 1;
  for (int i = 0; i < 2 * o.task.digits && space < 1e12; ++i) space *= o.task.base;
  if (space < 4.0 * (o.eval_prompts + o.pool))
    throw std::runtime_error("too few distinct problems (" + std::to_string(static_cast<long long>(space)) +
                             ") for the held-out set and the training pool: raise --digits or --base, or lower --eval-prompts");
  return o;
}

/// Supervised training on worked solutions: the teacher on correct ones, the student on its
/// own source. Returns the mean cross-entropy of the last 100 steps.
double supervised(mlp_lm& model, const task_config& t, int steps, int batch, double lr, uint64_t seed, bool student_source,
                  double mismatch, const std::set<problem>& held_out) {
  rng r(seed);
  std::vector<int32_t> tokens;
  std::vector<tropd::index_t> offsets;
  std::vector<uint8_t> train;
  double tail = 0, tail_n = 0;
  for (int s = 0; s < steps; ++s) {
    tokens.clear();
    train.clear();
    offsets.assign(1, 0);
    for (int k = 0; k < batch; ++k) {
      problem p = random_problem(t, r);
      while (held_out.count(p)) p = random_problem(t, r);
      const auto prompt = prompt_tokens(t, p);
      const auto sol = student_source ? student_source_solution(t, p, mismatch, r) : correct_solution(t, p);
      tokens.insert(tokens.end(), prompt.begin(), prompt.end());
      tokens.insert(tokens.end(), sol.begin(), sol.end());
      train.insert(train.end(), prompt.size(), 0);
      train.insert(train.end(), sol.size(), 1);
      offsets.push_back(static_cast<tropd::index_t>(tokens.size()));
    }
    // Cosine decay to 10% of the learning rate.
    const double frac = double(s) / double(steps);
    const double l = lr * (0.1 + 0.9 * 0.5 * (1.0 + std::cos(3.141592653589793 * frac)));
    const double loss = model.sft_step(tropd::runtime::sequence_batch{tokens, offsets}, train, l);
    if (s >= steps - 100) { tail += loss; tail_n += 1; }
  }
  return tail_n > 0 ? tail / tail_n : 0.0;
}

shared_setup build_setup(const options& o) {
  shared_setup S;
  S.task = o.task;
  const task_config& t = S.task;
  S.teacher_cfg = mlp_config{t.vocab(), o.window, o.embed, o.teacher_hidden, t.pad(), t.eos()};
  S.student_cfg = mlp_config{t.vocab(), o.window, o.embed, o.student_hidden, t.pad(), t.eos()};

  // Held-out prompts: never seen in any training (SFT, pool).
  std::set<problem> held_out;
  rng er(seed_of({o.seed_offset, tag::eval_set}));
  S.eval_set = distinct_problems(t, o.eval_prompts, er, held_out, true);
  for (const auto& p : S.eval_set) S.eval_prompts.push_back(prompt_tokens(t, p));

  // Teacher and student SFT: independent, so they run side by side.
  S.teacher = mlp_lm(S.teacher_cfg, seed_of({o.seed_offset, tag::teacher_init}));
  S.student0 = mlp_lm(S.student_cfg, seed_of({o.seed_offset, tag::student_init}));
  auto teach = [&] {
    S.teacher_sft_loss = supervised(S.teacher, t, o.teacher_sft_steps, o.sft_batch, o.sft_lr,
                                    seed_of({o.seed_offset, tag::teacher_sft}), false, 0.0, held_out);
  };
  auto stud = [&] {
    S.student_sft_loss = supervised(S.student0, t, o.student_sft_steps, o.sft_batch, o.sft_lr,
                                    seed_of({o.seed_offset, tag::student_sft}), true, o.mismatch, held_out);
  };
  if (o.threads >= 2) {
    std::thread th(stud);
    teach();
    th.join();
  } else {
    teach();
    stud();
  }

  // Training prompts with one teacher response each, sampled (T = 1) before training.
  std::set<problem> excl = held_out;
  rng pr(seed_of({o.seed_offset, tag::pool}));
  const auto pool = distinct_problems(t, o.pool, pr, excl, true);
  for (size_t i = 0; i < pool.size(); ++i) {
    tropd::schedules::prompt_example ex;
    ex.prompt = prompt_tokens(t, pool[i]);
    ex.teacher_response = S.teacher.sample(ex.prompt, t.response_length() + 2, 1.0,
                                           seed_of({o.seed_offset, tag::teacher_responses, i}));
    ex.sample_id = static_cast<long long>(i);
    S.pool.push_back(std::move(ex));
  }
  return S;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int run(int argc, char** argv) {
  const options o = parse(argc, argv);
  const auto t0 = std::chrono::steady_clock::now();
  std::filesystem::create_directories(o.out);
  const task_config& t = o.task;

  printf("tropd-demo: %d-digit addition in base %d (V = %d), window %d, mismatch %.2f\n", t.digits, t.base, t.vocab(),
         o.window, o.mismatch);
  printf("  %zu methods x %d seeds (seeds %llu..%llu), %d steps, %d prompts x %d rollouts per step, Adam lr %g, %d threads\n",
         o.methods.size(), o.seeds, (unsigned long long)o.seed_offset, (unsigned long long)(o.seed_offset + o.seeds - 1),
         o.steps, o.prompts, o.rollouts, o.lr, o.threads);
  fflush(stdout);

  // 1. Shared setup.
  printf("setup: training the teacher and the student's start, sampling the teacher's responses...\n");
  fflush(stdout);
  const shared_setup S = build_setup(o);
  mlp_lm teacher = S.teacher, student = S.student0;
  const eval_result te = evaluate(teacher, teacher, S, seed_of({o.seed_offset, tag::eval_sampling, 1}), o.eval_samples);
  const eval_result se = evaluate(student, teacher, S, seed_of({o.seed_offset, tag::eval_sampling, 2}), o.eval_samples);
  std::ostringstream setup;
  setup << "setup (shared by every run; " << fixed(seconds_since(t0), 1) << " s)\n";
  setup << "  teacher: MLP hidden " << o.teacher_hidden << " (" << S.teacher.num_parameters() << " parameters), "
        << o.teacher_sft_steps << " SFT steps on correct solutions, final CE " << fixed(S.teacher_sft_loss, 4) << "\n";
  setup << "           held-out pass@1 sampled (T = 1) " << fixed(te.accuracy, 3) << ", greedy "
        << fixed(te.greedy_accuracy, 3) << "\n";
  setup << "  student: MLP hidden " << o.student_hidden << " (" << S.student0.num_parameters() << " parameters), "
        << o.student_sft_steps << " SFT steps on the mismatched source (m = " << fixed(o.mismatch, 2) << "), final CE "
        << fixed(S.student_sft_loss, 4) << "\n";
  setup << "           held-out pass@1 sampled (T = 1) " << fixed(se.accuracy, 3) << ", greedy "
        << fixed(se.greedy_accuracy, 3) << "\n";
  setup << "  start mismatch on held-out student samples: " << fixed(100 * se.r_lt5, 1)
        << "% of student tokens have R < -5; mean TV " << fixed(se.tv, 3) << "; reverse KL " << fixed(se.reverse_kl, 3)
        << " nats/token\n";
  int n_pool_ok = 0;
  for (const auto& ex : S.pool) n_pool_ok += static_cast<int>(ex.teacher_response.size()) == t.response_length() ? 1 : 0;
  setup << "  pool: " << S.pool.size() << " training prompts with pre-generated teacher responses (" << n_pool_ok
        << " of full length); " << S.eval_set.size() << " held-out prompts\n";
  fputs(setup.str().c_str(), stdout);
  {
    std::ofstream f(o.out + "/setup.txt");
    std::string s = setup.str();
    s = s.substr(s.find('\n') + 1);  // drop the timing line: the file is deterministic
    f << s;
  }
  fflush(stdout);

  // 2. Jobs: seed-major so that both threads mix methods; results land in fixed slots.
  struct job { std::string method; int seed_index; };
  std::vector<job> jobs;
  for (int si = 0; si < o.seeds; ++si)
    for (const auto& m : o.methods) jobs.push_back({m, si});
  std::vector<run_result> results(jobs.size());
  std::atomic<size_t> next{0};
  std::atomic<int> done{0};
  std::mutex print_mutex;
  const auto t_jobs = std::chrono::steady_clock::now();
  auto worker = [&] {
    for (;;) {
      const size_t j = next.fetch_add(1);
      if (j >= jobs.size()) return;
      results[j] = run_method(S, o, jobs[j].method, jobs[j].seed_index, se.accuracy);
      const run_result& r = results[j];
      std::lock_guard<std::mutex> lk(print_mutex);
      printf("  [%3d/%zu] %-12s seed %-3llu acc %.3f  rKL %.4f  max|g| %7.3f%s  (%.1f s, %.0f s elapsed)\n", ++done,
             jobs.size(), r.method.c_str(), (unsigned long long)r.seed, r.final.accuracy, r.final.reverse_kl,
             r.grad_norm_max, r.diverged ? ("  DIVERGED: " + r.why).c_str() : "", r.wall_s, seconds_since(t0));
      fflush(stdout);
    }
  };
  printf("runs (%zu jobs on %d threads):\n", jobs.size(), o.threads);
  {
    std::vector<std::thread> pool;
    for (int i = 1; i < std::min<int>(o.threads, int(jobs.size())); ++i) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
  }
  const double jobs_s = seconds_since(t_jobs);

  // 3. Outputs, in a fixed order.
  std::vector<run_result> ordered;
  for (const auto& m : o.methods)
    for (const auto& r : results)
      if (r.method == m) ordered.push_back(r);
  write_summary_csv(o.out + "/summary.csv", o.methods, ordered);
  write_curves_csv(o.out + "/curves.csv", o.methods, ordered);
  write_timing_csv(o.out + "/timing.csv", o.methods, ordered);
  {
    std::ofstream f(o.out + "/table.md");
    f << results_table(o.methods, ordered, false);
  }
  const std::string plot = write_plot(o.out, o.methods, ordered, o.steps, te.accuracy, o.plot);

  printf("\nresults after %d steps, mean ± std over %d seeds. pass@1: sampled at T = 1, %d samples on each of %d held-out\n"
         "prompts (greedy: one greedy decode each); reverse KL: KL(student || teacher) per token on those samples;\n"
         "grad norm: L2 norm of the student's parameter gradient per step (max / variance over the steps of a run);\n"
         "diverged: a tropd error, a non-finite loss or gradient, or final pass@1 below half the start's %.3f\n\n",
         o.steps, o.seeds, o.eval_samples, o.eval_prompts, se.accuracy);
  fputs(results_table(o.methods, ordered, true).c_str(), stdout);
  printf("\n  teacher pass@1 %.3f (greedy %.3f); student start %.3f (greedy %.3f), reverse KL %.3f\n", te.accuracy,
         te.greedy_accuracy, se.accuracy, se.greedy_accuracy, se.reverse_kl);
  for (const auto& m : o.methods) printf("  %-12s %s\n", m.c_str(), method_summary(m).c_str());
  printf("\nwrote %s/summary.csv, curves.csv, timing.csv, table.md, setup.txt; %s\n", o.out.c_str(), plot.c_str());
  printf("wall time: %.1f s (runs %.1f s)\n", seconds_since(t0), jobs_s);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    fprintf(stderr, "tropd-demo: %s\n", e.what());
    return 1;
  }
}
