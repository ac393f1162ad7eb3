// report.hpp: the demo's outputs: the printed table, summary.csv, curves.csv, and the plot
// (gnuplot data files, a script, and curves.png when gnuplot is installed).
//
// Every file except timing.csv and curves.png is a deterministic function of the options:
// rows are written in (method, seed, step) order whatever order the jobs finished in, and
// numbers are printed with a fixed format.
#pragma once

#include <stdio.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "experiment.hpp"

namespace demo {

/// %.6g, or empty for NaN (CSV).
inline std::string num(double x) {
  if (std::isnan(x)) return "";
  char b[64];
  snprintf(b, sizeof b, "%.6g", x);
  return b;
}

inline std::string fixed(double x, int prec) {
  char b[64];
  snprintf(b, sizeof b, "%.*f", prec, x);
  return b;
}

struct mean_std {
  double mean = NAN, std = NAN;
  int n = 0;
};

/// Mean and sample standard deviation (n - 1) of the finite values.
inline mean_std stats(const std::vector<double>& v) {
  mean_std r;
  double s = 0;
  for (double x : v)
    if (std::isfinite(x)) { s += x; ++r.n; }
  if (r.n == 0) return r;
  r.mean = s / r.n;
  double s2 = 0;
  for (double x : v)
    if (std::isfinite(x)) s2 += (x - r.mean) * (x - r.mean);
  r.std = r.n > 1 ? std::sqrt(s2 / (r.n - 1)) : 0.0;
  return r;
}

inline std::string pm(const mean_std& m, int prec) {
  if (m.n == 0) return "n/a";
  return fixed(m.mean, prec) + " ± " + fixed(m.std, prec);
}

inline std::string sci(double x) {
  char b[64];
  snprintf(b, sizeof b, "%.1e", x);
  return b;
}

/// Results grouped by method, in the order of `methods`.
inline std::map<std::string, std::vector<const run_result*>> by_method(const std::vector<run_result>& runs) {
  std::map<std::string, std::vector<const run_result*>> g;
  for (const auto& r : runs) g[r.method].push_back(&r);
  return g;
}

inline std::string percent(double x) { return std::isfinite(x) ? fixed(100 * x, 1) + "%" : "n/a"; }

/// The results table (markdown). with_time adds the wall-time column (not deterministic).
inline std::string results_table(const std::vector<std::string>& methods, const std::vector<run_result>& runs,
                                 bool with_time) {
  auto g = by_method(runs);
  std::ostringstream os;
  os << "| method | lr | pass@1 (sampled) | pass@1 (greedy) | reverse KL | R<-5 harmless (training / end) | R<-5 harmful "
        "(training / end) | max grad norm | grad-norm variance | trust | diverged";
  if (with_time) os << " | wall s / run";
  os << " |\n|---|---|---|---|---|---|---|---|---|---|---";
  if (with_time) os << "|---";
  os << "|\n";
  for (const auto& m : methods) {
    const auto& rs = g[m];
    std::vector<double> acc, gacc, rkl, gmax, gvar, wall, hl_t, hl_e, hf_t, hf_e, trust;
    std::set<std::string> lrs;
    int div = 0;
    for (const auto* r : rs) {
      acc.push_back(r->final.accuracy);
      gacc.push_back(r->final.greedy_accuracy);
      rkl.push_back(r->final.reverse_kl);
      gmax.push_back(r->grad_norm_max);
      gvar.push_back(r->grad_norm_var);
      wall.push_back(r->wall_s);
      hl_t.push_back(r->harmless_mean);
      hl_e.push_back(r->final.r_lt5_harmless);
      hf_t.push_back(r->harmful_mean);
      hf_e.push_back(r->final.r_lt5_harmful);
      trust.push_back(r->trust_fraction);
      lrs.insert(num(r->lr));
      div += r->diverged ? 1 : 0;
    }
    std::string lr;
    for (const auto& x : lrs) lr += (lr.empty() ? "" : ",") + x;
    os << "| " << m << " | " << lr << " | " << pm(stats(acc), 3) << " | " << pm(stats(gacc), 3) << " | " << pm(stats(rkl), 4)
       << " | " << percent(stats(hl_t).mean) << " / " << percent(stats(hl_e).mean) << " | " << percent(stats(hf_t).mean)
       << " / " << percent(stats(hf_e).mean) << " | " << pm(stats(gmax), 3) << " | " << pm(stats(gvar), 4) << " | "
       << fixed(stats(trust).mean, 3) << " | " << div << "/" << rs.size();
    if (with_time) os << " | " << fixed(stats(wall).mean, 1);
    os << " |\n";
  }
  return os.str();
}

/// The tuning table (markdown): sampled pass@1 per method and learning rate (mean ± std over
/// seeds, diverged runs noted), the best learning rate per method starred: highest mean
/// sampled pass@1, ties broken by lower mean reverse KL.
inline std::string tuning_table(const std::vector<std::string>& methods, const std::vector<double>& grid,
                                const std::vector<run_result>& runs) {
  std::ostringstream os;
  os << "| method";
  for (double x : grid) os << " | lr " << num(x);
  os << " | best lr |\n|---";
  for (size_t i = 0; i <= grid.size(); ++i) os << "|---";
  os << "|\n";
  for (const auto& m : methods) {
    std::vector<std::string> cells;
    double best_acc = -1, best_kl = 0, best_lr = 0;
    for (double x : grid) {
      std::vector<double> acc, kl;
      int div = 0;
      for (const auto& r : runs)
        if (r.method == m && r.lr == x) {
          acc.push_back(r.final.accuracy);
          kl.push_back(r.final.reverse_kl);
          div += r.diverged ? 1 : 0;
        }
      const mean_std a = stats(acc), k = stats(kl);
      std::string c = pm(a, 3);
      if (div > 0) c += " (" + std::to_string(div) + " div.)";
      cells.push_back(c);
      if (a.n > 0 && (a.mean > best_acc || (a.mean == best_acc && k.mean < best_kl))) {
        best_acc = a.mean;
        best_kl = k.mean;
        best_lr = x;
      }
    }
    os << "| " << m;
    for (size_t i = 0; i < grid.size(); ++i) os << " | " << (grid[i] == best_lr ? "**" + cells[i] + "** *" : cells[i]);
    os << " | " << num(best_lr) << " |\n";
  }
  return os.str();
}

inline void write_summary_csv(const std::string& path, const std::vector<run_result>& runs) {
  std::ofstream f(path);
  f << "method,seed,lr,accuracy,reverse_kl,diverged,greedy_accuracy,heldout_tv,heldout_r_lt5,heldout_r_lt5_harmless,"
       "heldout_r_lt5_harmful,training_r_lt5_harmless,training_r_lt5_harmful,variant_fraction,error_fraction,grad_norm_max,"
       "grad_norm_var,grad_norm_mean,trust_fraction,steps_done,reason\n";
  for (const auto& r : runs)
    f << r.method << ',' << r.seed << ',' << num(r.lr) << ',' << num(r.final.accuracy) << ',' << num(r.final.reverse_kl) << ','
      << (r.diverged ? 1 : 0) << ',' << num(r.final.greedy_accuracy) << ',' << num(r.final.tv) << ',' << num(r.final.r_lt5)
      << ',' << num(r.final.r_lt5_harmless) << ',' << num(r.final.r_lt5_harmful) << ',' << num(r.harmless_mean) << ','
      << num(r.harmful_mean) << ',' << num(r.final.variant_fraction) << ',' << num(r.final.error_fraction) << ','
      << num(r.grad_norm_max) << ',' << num(r.grad_norm_var) << ',' << num(r.grad_norm_mean) << ','
      << num(r.trust_fraction) << ',' << r.steps_done << ",\"" << r.why << "\"\n";
}

inline void write_curves_csv(const std::string& path, const std::vector<run_result>& runs) {
  std::ofstream f(path);
  f << "method,seed,lr,step,loss,accuracy,greedy_accuracy,reverse_kl,trust_fraction,outlier_fraction,grad_norm,tv_estimate,"
       "prefix_fraction,student_tokens,loss_trust,loss_outlier,loss_guidance,heldout_tv,heldout_r_lt5,heldout_r_lt5_harmless,"
       "heldout_r_lt5_harmful\n";
  for (const auto& r : runs)
    for (const auto& c : r.curve)
      f << r.method << ',' << r.seed << ',' << num(r.lr) << ',' << c.step << ',' << num(c.loss) << ',' << num(c.accuracy) << ','
        << num(c.greedy_accuracy) << ',' << num(c.reverse_kl) << ',' << num(c.trust_fraction) << ','
        << num(c.outlier_fraction) << ',' << num(c.grad_norm) << ',' << num(c.tv_estimate) << ','
        << num(c.prefix_fraction) << ',' << num(c.student_tokens) << ',' << num(c.loss_trust) << ','
        << num(c.loss_outlier) << ',' << num(c.loss_guidance) << ',' << num(c.heldout_tv) << ','
        << num(c.heldout_r_lt5) << ',' << num(c.heldout_harmless) << ',' << num(c.heldout_harmful) << '\n';
}

inline void write_timing_csv(const std::string& path, const std::vector<run_result>& runs) {
  std::ofstream f(path);
  f << "method,seed,lr,wall_s\n";
  for (const auto& r : runs) f << r.method << ',' << r.seed << ',' << num(r.lr) << ',' << fixed(r.wall_s, 3) << '\n';
}

/// Mean over seeds of a curve column at each step (NaN where no seed has a value).
template <class F>
std::vector<double> mean_curve(const std::vector<const run_result*>& rs, int steps, F col) {
  std::vector<double> s(size_t(steps) + 1, 0.0), n(size_t(steps) + 1, 0.0), out(size_t(steps) + 1, NAN);
  for (const auto* r : rs)
    for (const auto& c : r->curve) {
      const double v = col(c);
      if (std::isfinite(v)) { s[size_t(c.step)] += v; n[size_t(c.step)] += 1; }
    }
  for (size_t i = 0; i < s.size(); ++i)
    if (n[i] > 0) out[i] = s[i] / n[i];
  return out;
}

/// Writes the gnuplot data and script and runs gnuplot (when found) to make curves.png.
/// Returns a line saying what happened.
inline std::string write_plot(const std::string& out, const std::vector<std::string>& methods,
                              const std::vector<run_result>& runs, int steps, double teacher_acc, const eval_result& start,
                              bool run_gnuplot) {
  auto g = by_method(runs);
  const std::string eval_dat = out + "/curves_eval.dat", step_dat = out + "/curves_step.dat", gp = out + "/curves.gp";
  {
    std::ofstream e(eval_dat), s(step_dat);
    e << "# per method (one gnuplot index each): step, mean pass@1 (sampled), its std over seeds, mean reverse KL, mean greedy "
         "pass@1, mean held-out R<-5 harmless fraction, mean held-out R<-5 harmful fraction, mean held-out TV\n";
    s << "# per method (one gnuplot index each): step, grad norm, trust fraction, loss (means over seeds, 9-step moving average)\n";
    for (const auto& m : methods) {
      const auto& rs = g[m];
      e << "# " << m << "\n";
      s << "# " << m << "\n";
      auto acc = mean_curve(rs, steps, [](const curve_row& c) { return c.accuracy; });
      auto rkl = mean_curve(rs, steps, [](const curve_row& c) { return c.reverse_kl; });
      auto gacc = mean_curve(rs, steps, [](const curve_row& c) { return c.greedy_accuracy; });
      auto hl = mean_curve(rs, steps, [](const curve_row& c) { return c.heldout_harmless; });
      auto hf = mean_curve(rs, steps, [](const curve_row& c) { return c.heldout_harmful; });
      auto tv = mean_curve(rs, steps, [](const curve_row& c) { return c.heldout_tv; });
      for (int i = 0; i <= steps; ++i) {
        if (!std::isfinite(acc[size_t(i)])) continue;
        std::vector<double> a;
        for (const auto* r : rs)
          for (const auto& c : r->curve)
            if (c.step == i) a.push_back(c.accuracy);
        e << i << ' ' << num(acc[size_t(i)]) << ' ' << num(stats(a).std) << ' ' << num(rkl[size_t(i)]) << ' '
          << num(gacc[size_t(i)]) << ' ' << num(hl[size_t(i)]) << ' ' << num(hf[size_t(i)]) << ' ' << num(tv[size_t(i)]) << '\n';
      }
      e << "\n\n";
      auto gn = mean_curve(rs, steps, [](const curve_row& c) { return c.grad_norm; });
      auto tf = mean_curve(rs, steps, [](const curve_row& c) { return c.trust_fraction; });
      auto ls = mean_curve(rs, steps, [](const curve_row& c) { return c.loss; });
      auto smooth = [&](const std::vector<double>& v, int i) {
        double a = 0, n = 0;
        for (int j = std::max(0, i - 4); j <= std::min(steps - 1, i + 4); ++j)
          if (std::isfinite(v[size_t(j)])) { a += v[size_t(j)]; n += 1; }
        return n > 0 ? a / n : NAN;
      };
      for (int i = 0; i < steps; ++i) {
        if (!std::isfinite(gn[size_t(i)])) continue;
        s << i << ' ' << num(smooth(gn, i)) << ' ' << num(smooth(tf, i)) << ' ' << num(smooth(ls, i)) << '\n';
      }
      s << "\n\n";
    }
  }
  {
    std::ofstream f(gp);
    f << "# Written by tropd-demo. Run: gnuplot " << gp << "\n";
    f << "set terminal pngcairo noenhanced size 1400,1900 font 'sans,10'\n";
    f << "set output '" << out << "/curves.png'\n";
    f << "set multiplot layout 4,2 title 'tropd-demo: on-policy distillation of a window-MLP student (means over seeds)'\n";
    f << "set key bottom right font ',8'\nset grid\nset xlabel 'step'\n";
    const char* styles[] = {"lc rgb '#1f77b4'", "lc rgb '#ff7f0e'", "lc rgb '#2ca02c'", "lc rgb '#d62728' lw 2.5",
                            "lc rgb '#9467bd'", "lc rgb '#8c564b'", "lc rgb '#e377c2'", "lc rgb '#7f7f7f'",
                            "lc rgb '#bcbd22'"};
    auto series = [&](const std::string& file, const std::string& cols, const std::string& with) {
      std::string p;
      for (size_t i = 0; i < methods.size(); ++i) {
        p += (i ? ", \\\n     " : "plot ") + std::string("'") + file + "' index " + std::to_string(i) + " using " + cols +
             " with " + with + " " + styles[i % 9] + " title '" + methods[i] + "'";
      }
      return p;
    };
    f << "set title 'held-out pass@1 (sampled, T = 1)'\nset ylabel 'pass@1'\nset yrange [0:1.02]\nset key bottom right\n";
    f << series(eval_dat, "1:2", "linespoints pt 7 ps 0.6") << ", \\\n     " << teacher_acc
      << " with lines dt 2 lc rgb 'black' title 'teacher'\n";
    f << "set title 'held-out pass@1 (greedy)'\n";
    f << series(eval_dat, "1:5", "linespoints pt 7 ps 0.6") << "\n";
    f << "set title 'held-out reverse KL(student || teacher) per token'\nset ylabel 'nats'\nset autoscale y\nset logscale y\nset key top right\n";
    f << series(eval_dat, "1:4", "linespoints pt 7 ps 0.6") << "\n";
    f << "set title 'held-out mean TV(student, teacher) per token'\nset ylabel 'TV'\n";
    f << series(eval_dat, "1:8", "linespoints pt 7 ps 0.6") << "\nunset logscale y\n";
    f << "set title 'harmless outliers: student tokens with R < -5 that are accepted surface variants (start "
      << percent(start.r_lt5_harmless) << ")'\nset ylabel 'fraction of student tokens'\n";
    f << series(eval_dat, "1:6", "linespoints pt 7 ps 0.6") << "\n";
    f << "set title 'harmful outliers: student tokens with R < -5 that are errors (start " << percent(start.r_lt5_harmful)
      << ")'\n";
    f << series(eval_dat, "1:7", "linespoints pt 7 ps 0.6") << "\n";
    f << "set title 'gradient norm before Adam (9-step moving average)'\nset ylabel '||g||'\nset logscale y\n";
    f << series(step_dat, "1:2", "lines") << "\nunset logscale y\n";
    f << "set title 'trust fraction of student tokens (9-step moving average)'\nset ylabel 'fraction'\nset yrange [0:1.05]\nset key bottom right\n";
    f << series(step_dat, "1:3", "lines") << "\nunset multiplot\n";
  }
  if (!run_gnuplot) return "plot: skipped (--no-plot); script " + gp;
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0)
    return "plot: gnuplot not found (install gnuplot-nox: scripts/setup.sh); script written to " + gp;
  const std::string cmd = "gnuplot '" + gp + "' 2>'" + out + "/gnuplot.log'";
  if (std::system(cmd.c_str()) != 0) return "plot: gnuplot failed, see " + out + "/gnuplot.log";
  return "plot: " + out + "/curves.png";
}

}  // namespace demo
