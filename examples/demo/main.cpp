// tropd-demo: a real on-policy distillation run, OPD vs EOPD vs REOPOLD vs TrOPD (and
// TrOPD's ablations), on a synthetic multi-step arithmetic task with a verifiable answer,
// long responses, a 256-token vocabulary, and two kinds of outlier (task.hpp).
//
//   1. set up (once, deterministic, shared by every run): held-out prompts; a teacher MLP
//      trained on correct canonical solutions (reading every notation, writing one); a
//      smaller student MLP trained on a different, noisier source; a pool of training
//      prompts with teacher responses sampled before training (for off-policy guidance);
//   2. report how far apart they start (fraction of student tokens with R < -5 of each
//      kind, TV, reverse KL), after a finite-difference check of the model's backward pass;
//   3. run every (method, seed) job, on --threads std::threads (each job single-threaded,
//      with its own copies of the models), all with the same steps, batch, prompts and
//      seeds, each method at its own tuned learning rate (or --lr for all); every step is
//      tropd::runtime::distill_step;
//   4. print the table, write OUT/summary.csv, OUT/curves.csv, OUT/curves.png.
// With --lr-grid it runs every method at every learning rate of the grid instead and writes
// the tuning table (OUT/tuning.md) with each method's best learning rate.
//
// Run `tropd-demo --help` for the flags. See docs/results.md for a discussion of the output.
#include <stdio.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

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
#include "gradcheck.hpp"
#include "mlp.hpp"
#include "report.hpp"
#include "rng.hpp"
#include "task.hpp"

namespace {

using namespace demo;

const char* usage =
    "tropd-demo: on-policy distillation on a multi-step arithmetic task (x_(k+1) = x_k + x_(k-1) mod 1000 with a\n"
    "carry scratchpad; 36-token responses, V = 256, harmless and harmful outliers); OPD, EOPD, REOPOLD, TrOPD, ablations.\n"
    "\n"
    "  --out DIR             output folder (default out/demo)\n"
    "  --steps N             distillation steps per run (default 200)\n"
    "  --seeds S             seeds per method (default 5)\n"
    "  --seed-offset K       seeds are K .. K+S-1; K also keys the shared setup (default 0; the tuning setup is 1000)\n"
    "  --methods LIST        comma list from opd,eopd,reopold,tropd,fkl_outlier,mask_outlier,clip_outlier,topk_fkl\n"
    "                        (default: these eight) and the diagnostic opd_prefix (OPD with TrOPD's guidance and prefixes)\n"
    "  --lr X                Adam learning rate for every method (default: each method's tuned one, see --help-lr)\n"
    "  --lr-grid LIST        tuning mode: every method at every learning rate of LIST; writes OUT/tuning.md\n"
    "  --threads T           parallel jobs (default 2); results do not depend on T\n"
    "  --numbers K           numbers the response computes, 2D tokens each (default 6: 36-token responses)\n"
    "  --digits D            digits per number (default 3)\n"
    "  --vocab V             vocabulary size; ids from 30 up are separator variants (default 256)\n"
    "  --window W            model context window (default 4 D + 1, the smallest that sees the operands)\n"
    "  --harmless H          student source: rate of surface variants (separator H, carries H/2, digits H/4; default 0.5)\n"
    "  --harmful E           student source: probability of dropping each carry of 1 (default 0.15)\n"
    "  --prompts P           prompts per step (default 8)\n"
    "  --rollouts N          on-policy samples per prompt (default 4)\n"
    "  --eval-every N        held-out evaluation every N steps (default 20)\n"
    "  --eval-prompts N      held-out prompts of the final evaluation (default 256)\n"
    "  --eval-samples K      T = 1 samples per held-out prompt, final evaluation (default 4)\n"
    "  --curve-prompts N, --curve-samples K   the same for the evaluations during training (default 64, 2)\n"
    "  --tau X               static log-ratio threshold of mask / clip outlier (default -5)\n"
    "  --reopold-floor X     REOPOLD's reward floor (default -5)\n"
    "  --beta X              off-policy guidance weight (default 1e-3, TrOPD's)\n"
    "  --topk K              top-k of the FKL terms (default: the presets' 64 for TrOPD, 16 for EOPD)\n"
    "  --fkl-form c|p        outlier FKL form of tropd / fkl_outlier (default c, the preset's)\n"
    "  --teacher-hidden H, --student-hidden H, --embed D   model sizes (default 128, 64, 16)\n"
    "  --teacher-sft-steps N, --student-sft-steps N        supervised steps of the setup (default 1500, 600)\n"
    "  --no-plot             do not run gnuplot\n"
    "  --help-lr             print each method's tuned learning rate\n";

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

bool known_method(const std::string& m) {
  for (const auto& k : all_methods())
    if (k == m) return true;
  for (const auto& k : extra_methods())
    if (k == m) return true;
  return false;
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
    } else if (a == "--help-lr") {
      for (const auto& m : all_methods()) printf("%-12s %g\n", m.c_str(), tuned_lr(m));
      for (const auto& m : extra_methods()) printf("%-12s %g\n", m.c_str(), tuned_lr(m));
      std::exit(0);
    } else if (a == "--out") o.out = need(i);
    else if (a == "--steps") o.steps = std::stoi(need(i));
    else if (a == "--seeds") o.seeds = std::stoi(need(i));
    else if (a == "--seed-offset") o.seed_offset = std::stoull(need(i));
    else if (a == "--methods") o.methods = split(need(i), ',');
    else if (a == "--threads") o.threads = std::stoi(need(i));
    else if (a == "--numbers") o.task.numbers = std::stoi(need(i));
    else if (a == "--digits") o.task.digits = std::stoi(need(i));
    else if (a == "--vocab") o.task.vocab_size = std::stoi(need(i));
    else if (a == "--window") o.window = std::stoi(need(i));
    else if (a == "--harmless") o.harmless = std::stod(need(i));
    else if (a == "--harmful") o.harmful = std::stod(need(i));
    else if (a == "--prompts") o.prompts = std::stoi(need(i));
    else if (a == "--rollouts") o.rollouts = std::stoi(need(i));
    else if (a == "--lr") o.lr = std::stod(need(i));
    else if (a == "--lr-grid") {
      for (const auto& x : split(need(i), ',')) o.lr_grid.push_back(std::stod(x));
    }
    else if (a == "--eval-every") o.eval_every = std::stoi(need(i));
    else if (a == "--eval-prompts") o.eval_prompts = std::stoi(need(i));
    else if (a == "--eval-samples") o.eval_samples = std::stoi(need(i));
    else if (a == "--curve-prompts") o.curve_prompts = std::stoi(need(i));
    else if (a == "--curve-samples") o.curve_samples = std::stoi(need(i));
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
    else if (a == "--tie-sigma") o.tie_sigma = std::stod(need(i));
    else if (a == "--sft-lr") o.sft_lr = std::stod(need(i));
    else if (a == "--sft-batch") o.sft_batch = std::stoi(need(i));
    else throw std::runtime_error("unknown flag " + a + " (see --help)");
  }
  if (o.methods.empty()) o.methods = all_methods();
  for (const auto& m : o.methods)
    if (!known_method(m)) throw std::runtime_error("unknown method '" + m + "' (see --help)");
  o.task.validate();
  if (o.window <= 0) o.window = o.task.natural_window();
  if (o.steps < 1 || o.seeds < 1 || o.threads < 1 || o.prompts < 1 || o.rollouts < 1 || o.eval_every < 1 ||
      o.eval_prompts < 1 || o.eval_samples < 1 || o.curve_prompts < 1 || o.curve_samples < 1 || o.pool < 1)
    throw std::runtime_error("steps, seeds, threads, prompts, rollouts and the evaluation sizes must be >= 1");
  if (!(o.harmless >= 0 && o.harmless <= 1) || !(o.harmful >= 0 && o.harmful <= 1))
    throw std::runtime_error("--harmless and --harmful must lie in [0, 1]");
  if (!(o.lr >= 0)) throw std::runtime_error("--lr must be > 0");
  for (double x : o.lr_grid)
    if (!(x > 0)) throw std::runtime_error("--lr-grid values must be > 0");
  // The held-out prompts must leave most of the problem space (base^(2 digits)) for training.
  double space = 1;
  for (int i = 0; i < 2 * o.task.digits && space < 1e12; ++i) space *= o.task.base;
  if (space < 4.0 * (o.eval_prompts + o.pool))
    throw std::runtime_error("too few distinct problems (" + std::to_string(static_cast<long long>(space)) +
                             ") for the held-out set and the training pool: raise --digits or lower --eval-prompts");
  return o;
}

/// Rewrites each response token of a canonical solution, with probability `rate`, in
/// another surface form of the same value (alternative digit or carry, random separator).
std::vector<int32_t> surface_noise(const task_config& t, std::vector<int32_t> sol, double rate, rng& r) {
  for (int32_t& tok : sol) {
    if (!r.bernoulli(rate)) continue;
    if (t.digit_value(tok) >= 0) tok = t.alt_digit(t.digit_value(tok));
    else if (t.carry_value(tok) >= 0) tok = t.carry_value(tok) ? t.alt_c1() : t.alt_c0();
    else if (t.is_separator(tok)) tok = t.first_variant() + r.below(t.num_variants());
  }
  return sol;
}

/// Supervised training on worked solutions. The teacher: canonical targets, and contexts
/// whose response tokens are rewritten in other surface forms with probability 0.3 each
/// (it learns to read every notation and write one). The student: its own source (targets
/// = contexts). Returns the mean cross-entropy of the last 100 steps.
double supervised(mlp_lm& model, const task_config& t, int steps, int batch, double lr, uint64_t seed, bool student_source,
                  double harmless, double harmful, const std::set<problem>& held_out) {
  rng r(seed);
  std::vector<int32_t> tokens, targets;
  std::vector<tropd::index_t> offsets;
  std::vector<uint8_t> train;
  double tail = 0, tail_n = 0;
  for (int s = 0; s < steps; ++s) {
    tokens.clear();
    targets.clear();
    train.clear();
    offsets.assign(1, 0);
    for (int k = 0; k < batch; ++k) {
      problem p = random_problem(t, r);
      while (held_out.count(p)) p = random_problem(t, r);
      const auto prompt = prompt_tokens(t, p);
      std::vector<int32_t> target, context;
      if (student_source) {
        target = student_source_solution(t, p, harmless, harmful, r);
        context = target;
      } else {
        target = correct_solution(t, p);
        context = surface_noise(t, target, 0.3, r);
      }
      tokens.insert(tokens.end(), prompt.begin(), prompt.end());
      tokens.insert(tokens.end(), context.begin(), context.end());
      targets.insert(targets.end(), prompt.begin(), prompt.end());
      targets.insert(targets.end(), target.begin(), target.end());
      train.insert(train.end(), prompt.size(), 0);
      train.insert(train.end(), target.size(), 1);
      offsets.push_back(static_cast<tropd::index_t>(tokens.size()));
    }
    // Cosine decay to 10% of the learning rate.
    const double frac = double(s) / double(steps);
    const double l = lr * (0.1 + 0.9 * 0.5 * (1.0 + std::cos(3.141592653589793 * frac)));
    const double loss = model.sft_step(tropd::runtime::sequence_batch{tokens, offsets}, targets, train, l);
    if (s >= steps - 100) { tail += loss; tail_n += 1; }
  }
  return tail_n > 0 ? tail / tail_n : 0.0;
}

shared_setup build_setup(const options& o) {
  shared_setup S;
  S.task = o.task;
  const task_config& t = S.task;
  S.teacher_cfg = mlp_config{t.vocab(), o.window, o.embed, o.teacher_hidden, t.max_sequence(), t.pad(), t.eos()};
  S.student_cfg = mlp_config{t.vocab(), o.window, o.embed, o.student_hidden, t.max_sequence(), t.pad(), t.eos()};

  // Held-out prompts: never seen in any training (SFT, pool).
  std::set<problem> held_out;
  rng er(seed_of({o.seed_offset, tag::eval_set}));
  S.eval_set = distinct_problems(t, o.eval_prompts, er, held_out, true);
  for (const auto& p : S.eval_set) S.eval_prompts.push_back(prompt_tokens(t, p));

  // Teacher and student SFT: independent, so they run side by side.
  S.teacher = mlp_lm(S.teacher_cfg, seed_of({o.seed_offset, tag::teacher_init}));
  S.student0 = mlp_lm(S.student_cfg, seed_of({o.seed_offset, tag::student_init}));
  if (o.tie_sigma >= 0) {
    std::vector<int32_t> base(size_t(t.vocab()));
    for (int v = 0; v < t.vocab(); ++v) base[size_t(v)] = t.surface_base(v);
    S.teacher.tie_embeddings(base, o.tie_sigma, seed_of({o.seed_offset, tag::teacher_init, 1}));
    S.student0.tie_embeddings(base, o.tie_sigma, seed_of({o.seed_offset, tag::student_init, 1}));
  }
  auto teach = [&] {
    S.teacher_sft_loss = supervised(S.teacher, t, o.teacher_sft_steps, o.sft_batch, o.sft_lr,
                                    seed_of({o.seed_offset, tag::teacher_sft}), false, 0.0, 0.0, held_out);
  };
  auto stud = [&] {
    S.student_sft_loss = supervised(S.student0, t, o.student_sft_steps, o.sft_batch, o.sft_lr,
                                    seed_of({o.seed_offset, tag::student_sft}), true, o.harmless, o.harmful, held_out);
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

/// Progress on the terminal: on a TTY one status line, rewritten after every step of every
/// running job; otherwise a line per job at each quarter of its steps.
class progress_board {
 public:
  progress_board(int slots, size_t jobs, int steps, std::chrono::steady_clock::time_point t0)
      : tty_(isatty(fileno(stdout)) != 0), label_(size_t(slots)), step_(size_t(slots), -1), jobs_(jobs), steps_(steps), t0_(t0) {}

  void start(int slot, const std::string& label) {
    std::lock_guard<std::mutex> lk(mu_);
    label_[size_t(slot)] = label;
    step_[size_t(slot)] = 0;
  }
  void step(int slot, int done) {
    std::lock_guard<std::mutex> lk(mu_);
    step_[size_t(slot)] = done;
    if (tty_) {
      const auto now = std::chrono::steady_clock::now();
      if (std::chrono::duration<double>(now - last_).count() < 0.1 && done != steps_) return;
      last_ = now;
      draw();
    } else if (done < steps_ && done % std::max(1, steps_ / 4) == 0) {
      printf("        %s: step %d/%d (%.0f s elapsed)\n", label_[size_t(slot)].c_str(), done, steps_, seconds_since(t0_));
      fflush(stdout);
    }
  }
  /// Prints a finished job's line above the status line.
  void finish(int slot, const std::string& line) {
    std::lock_guard<std::mutex> lk(mu_);
    step_[size_t(slot)] = -1;
    ++finished_;
    if (tty_) printf("\r\033[K");
    fputs(line.c_str(), stdout);
    if (tty_ && finished_ < jobs_) draw();
    fflush(stdout);
  }

 private:
  void draw() {
    std::string s = "\r\033[K  [" + std::to_string(finished_) + "/" + std::to_string(jobs_) + " done]";
    for (size_t i = 0; i < label_.size(); ++i)
      if (step_[i] >= 0) s += "  " + label_[i] + " step " + std::to_string(step_[i]) + "/" + std::to_string(steps_);
    s += "  (" + fixed(seconds_since(t0_), 0) + " s)";
    fputs(s.c_str(), stdout);
    fflush(stdout);
  }
  bool tty_;
  std::mutex mu_;
  std::vector<std::string> label_;
  std::vector<int> step_;
  size_t jobs_, finished_ = 0;
  int steps_;
  std::chrono::steady_clock::time_point t0_, last_{};
};

int run(int argc, char** argv) {
  const options o = parse(argc, argv);
  const auto t0 = std::chrono::steady_clock::now();
  std::filesystem::create_directories(o.out);
  const task_config& t = o.task;
  const bool tuning = !o.lr_grid.empty();

  printf("tropd-demo: x(k+1) = x(k) + x(k-1) mod %d^%d, %d numbers per response (%d tokens), V = %d, window %d\n", t.base,
         t.digits, t.numbers, t.response_length(), t.vocab(), o.window);
  printf("  student source: harmless variants h = %.2f, dropped carries e = %.2f\n", o.harmless, o.harmful);
  std::string lr_text;
  if (tuning) {
    lr_text = "tuning grid";
    for (double x : o.lr_grid) lr_text += " " + num(x);
  } else if (o.lr > 0) {
    lr_text = "Adam lr " + num(o.lr) + " for every method";
  } else {
    lr_text = "Adam lr tuned per method";
  }
  printf("  %zu methods x %d seeds (seeds %llu..%llu), %d steps, %d prompts x %d rollouts per step, %s, %d threads\n",
         o.methods.size(), o.seeds, (unsigned long long)o.seed_offset, (unsigned long long)(o.seed_offset + o.seeds - 1),
         o.steps, o.prompts, o.rollouts, lr_text.c_str(), o.threads);
  fflush(stdout);

  // 1. Shared setup.
  printf("setup: training the teacher and the student's start, sampling the teacher's responses...\n");
  fflush(stdout);
  const shared_setup S = build_setup(o);
  mlp_lm teacher = S.teacher, student = S.student0;
  // The hand-written backward pass against finite differences of an independent forward.
  gradcheck_result gc;
  {
    const auto& ex = S.pool.front();
    std::vector<int32_t> toks(ex.prompt);  // the prompt and two numbers of a teacher response
    toks.insert(toks.end(), ex.teacher_response.begin(),
                ex.teacher_response.begin() + std::min<long>(long(ex.teacher_response.size()), 2 * t.block_length()));
    std::vector<tropd::index_t> off{0, tropd::index_t(toks.size())};
    mlp_lm probe = S.student0;
    gc = check_gradients(probe, toks, off, seed_of({o.seed_offset, tag::gradcheck}));
    if (!(gc.gradient_error < 1e-2) || !(gc.logit_error < 1e-3))
      throw std::runtime_error("gradient check failed: relative gradient error " + num(gc.gradient_error) +
                               ", logit error " + num(gc.logit_error));
  }
  const eval_result te =
      evaluate(teacher, teacher, S, seed_of({o.seed_offset, tag::eval_sampling, 1}), o.eval_prompts, o.eval_samples);
  const eval_result se =
      evaluate(student, teacher, S, seed_of({o.seed_offset, tag::eval_sampling, 2}), o.eval_prompts, o.eval_samples);
  std::ostringstream setup;
  setup << "setup (shared by every run; " << fixed(seconds_since(t0), 1) << " s)\n";
  setup << "  backward pass vs finite differences (" << gc.entries << " entries): max relative error "
        << sci(gc.gradient_error) << ", logits vs double reference: max error " << sci(gc.logit_error) << "\n";
  setup << "  teacher: MLP hidden " << o.teacher_hidden << " (" << S.teacher.num_parameters() << " parameters), "
        << o.teacher_sft_steps << " SFT steps on canonical solutions, final CE " << fixed(S.teacher_sft_loss, 4) << "\n";
  setup << "           held-out pass@1 sampled (T = 1) " << fixed(te.accuracy, 3) << ", greedy "
        << fixed(te.greedy_accuracy, 3) << "\n";
  setup << "  student: MLP hidden " << o.student_hidden << " (" << S.student0.num_parameters() << " parameters), "
        << o.student_sft_steps << " SFT steps on the noisier source (h = " << fixed(o.harmless, 2)
        << ", e = " << fixed(o.harmful, 2) << "), final CE " << fixed(S.student_sft_loss, 4) << "\n";
  setup << "           held-out pass@1 sampled (T = 1) " << fixed(se.accuracy, 3) << ", greedy "
        << fixed(se.greedy_accuracy, 3) << "\n";
  setup << "  start mismatch on held-out student samples (" << static_cast<long long>(se.tokens) << " tokens):\n";
  setup << "    R < -5: " << fixed(100 * se.r_lt5, 1) << "% of student tokens; harmless (accepted surface variants) "
        << fixed(100 * se.r_lt5_harmless, 1) << "%, harmful (errors) " << fixed(100 * se.r_lt5_harmful, 1) << "%\n";
  setup << "    median R of those: harmless " << fixed(se.median_R_harmless, 1) << ", harmful " << fixed(se.median_R_harmful, 1)
        << "; all variants " << fixed(100 * se.variant_fraction, 1) << "%, all errors " << fixed(100 * se.error_fraction, 1)
        << "% of student tokens\n";
  setup << "    advantage on those tokens: OPD's R (median above); TrOPD's form C -FKL_64, median harmless "
        << fixed(-se.median_fkl_harmless, 2) << ", harmful " << fixed(-se.median_fkl_harmful, 2) << "\n";
  setup << "    mean TV " << fixed(se.tv, 3) << "; reverse KL " << fixed(se.reverse_kl, 3) << " nats/token\n";
  setup << "  teacher samples: " << fixed(100 * te.variant_fraction, 2) << "% variants, " << fixed(100 * te.error_fraction, 2)
        << "% errors among their tokens\n";
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
  struct job { std::string method; int seed_index; double lr; };
  std::vector<job> jobs;
  for (int si = 0; si < o.seeds; ++si)
    for (const auto& m : o.methods) {
      if (tuning) {
        for (double x : o.lr_grid) jobs.push_back({m, si, x});
      } else {
        jobs.push_back({m, si, o.lr > 0 ? o.lr : tuned_lr(m)});
      }
    }
  std::vector<run_result> results(jobs.size());
  std::atomic<size_t> next{0};
  const int slots = std::min<int>(o.threads, int(jobs.size()));
  progress_board board(slots, jobs.size(), o.steps, t0);
  const auto t_jobs = std::chrono::steady_clock::now();
  std::atomic<int> done{0};
  auto worker = [&](int slot) {
    for (;;) {
      const size_t j = next.fetch_add(1);
      if (j >= jobs.size()) return;
      const std::string label = jobs[j].method + "/s" + std::to_string(o.seed_offset + uint64_t(jobs[j].seed_index)) +
                                (tuning ? "/lr" + num(jobs[j].lr) : "");
      board.start(slot, label);
      const progress_fn progress = [&board, slot](int d) { board.step(slot, d); };
      results[j] = run_method(S, o, jobs[j].method, jobs[j].seed_index, jobs[j].lr, se.accuracy, progress);
      const run_result& r = results[j];
      char line[512];
      snprintf(line, sizeof line, "  [%3d/%zu] %-12s seed %-4llu lr %-6s pass@1 %.3f  rKL %.4f  R<-5 %.1f%%/%.1f%%  max|g| %7.3f%s  (%.1f s, %.0f s elapsed)\n",
               ++done, jobs.size(), r.method.c_str(), (unsigned long long)r.seed, num(r.lr).c_str(), r.final.accuracy,
               r.final.reverse_kl, 100 * r.final.r_lt5_harmless, 100 * r.final.r_lt5_harmful, r.grad_norm_max,
               r.diverged ? ("  DIVERGED: " + r.why).c_str() : "", r.wall_s, seconds_since(t0));
      board.finish(slot, line);
    }
  };
  printf("runs (%zu jobs on %d threads; per job: held-out pass@1, reverse KL, final R < -5 fractions harmless/harmful):\n",
         jobs.size(), o.threads);
  fflush(stdout);
  {
    std::vector<std::thread> pool;
    for (int i = 1; i < slots; ++i) pool.emplace_back(worker, i);
    worker(0);
    for (auto& th : pool) th.join();
  }
  const double jobs_s = seconds_since(t_jobs);

  // 3. Outputs, in a fixed order (the job order: seed, method, lr).
  std::vector<run_result> ordered;
  for (const auto& m : o.methods)
    for (const auto& r : results)
      if (r.method == m) ordered.push_back(r);
  write_summary_csv(o.out + "/summary.csv", ordered);
  write_timing_csv(o.out + "/timing.csv", ordered);
  if (tuning) {
    const std::string table = tuning_table(o.methods, o.lr_grid, ordered);
    {
      std::ofstream f(o.out + "/tuning.md");
      f << table;
    }
    printf("\ntuning: sampled pass@1 after %d steps, mean ± std over %d seeds (seeds %llu..%llu); * = best per method\n"
           "(highest mean sampled pass@1; ties: lower mean reverse KL)\n\n",
           o.steps, o.seeds, (unsigned long long)o.seed_offset, (unsigned long long)(o.seed_offset + o.seeds - 1));
    fputs(table.c_str(), stdout);
    printf("\nwrote %s/tuning.md, summary.csv, timing.csv, setup.txt\n", o.out.c_str());
    printf("wall time: %.1f s (runs %.1f s)\n", seconds_since(t0), jobs_s);
    return 0;
  }
  write_curves_csv(o.out + "/curves.csv", ordered);
  {
    std::ofstream f(o.out + "/table.md");
    f << results_table(o.methods, ordered, false);
  }
  const std::string plot = write_plot(o.out, o.methods, ordered, o.steps, te.accuracy, se, o.plot);

  printf("\nresults after %d steps, mean ± std over %d seeds. pass@1: sampled at T = 1, %d samples on each of %d held-out\n"
         "prompts (greedy: one greedy decode each); reverse KL: KL(student || teacher) per token on those samples;\n"
         "R < -5 harmless / harmful: fraction of the student's sampled tokens with R < -5 that are accepted surface\n"
         "variants / errors, mean over the evaluations during training and at the end (start: %.1f%% / %.1f%%);\n"
         "grad norm: L2 norm of the student's parameter gradient per step (max / variance over the steps of a run);\n"
         "trust: mean fraction of student tokens in the trust region; diverged: a tropd error, a non-finite loss or\n"
         "gradient, or final pass@1 below half the start's %.3f\n\n",
         o.steps, o.seeds, o.eval_samples, o.eval_prompts, 100 * se.r_lt5_harmless, 100 * se.r_lt5_harmful, se.accuracy);
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
#if defined(__GLIBC__)
  // Keep freed batch buffers in the heap instead of returning them to the kernel after
  // every step (saves the page faults of re-mapping them; no effect on any number).
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 512 << 20);
#endif
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    fprintf(stderr, "tropd-demo: %s\n", e.what());
    return 1;
  }
}
