"""The C++ demo's experiment (examples/demo/) through PyTorch and tropd.torch.distill_loss.

    python3 examples/torch/distill.py                 # defaults: 7 methods x 2 seeds x 100 steps (CPU)
    python3 examples/torch/distill.py --help

1. setup (once, shared by every run): held-out prompts; a teacher (the C++ demo's window MLP
   as an nn.Module; --arch transformer for a causal transformer) trained by supervised learning
   on correct canonical solutions whose contexts are rewritten in other surface forms (it reads
   every notation, writes one); a smaller student trained on a noisier source (harmless surface variants h = 0.5, dropped carries e = 0.15); a pool of
   training prompts, each with one teacher response sampled at T = 1 before training (the
   off-policy guidance of the guided methods);
2. every (method, seed) run starts from the same student with a fresh Adam and runs the same
   training loop: sample rollouts from the student (torch.multinomial, no grad), student
   forward with grad and teacher forward without grad on prompt + response, one
   tropd.torch.distill_loss call on the padded [B, T, V] logits with a [B, T] origin tensor,
   loss.backward(), optimizer.step(). Methods differ only in the objective (tropd.presets),
   the teacher-prefix schedule (cosine for the guided ones) and the learning rate;
3. prints the table of the C++ demo (the columns computed here).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import tropd
import tropd.torch as ttorch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import task as tk  # noqa: E402
from model import CausalLM, WindowLM, sample  # noqa: E402

PROMPT, TEACHER, STUDENT = ttorch.PROMPT, ttorch.TEACHER, ttorch.STUDENT

METHODS = ["opd", "eopd", "reopold", "tropd", "fkl_outlier", "mask_outlier", "clip_outlier"]
GUIDED = {"tropd", "mask_outlier", "clip_outlier"}  # cosine teacher prefixes + guidance (as the C++ demo)

# Each method's Adam learning rate, chosen on the tuning setup (--seed-offset 1000: another
# teacher, student, pool, held-out set and seeds 1000-1001) from {3e-4, 1e-3, 3e-3, 1e-2} as the
# highest mean sampled pass@1 after 100 steps, before the evaluation run (docs/results.md, "The
# same experiment through PyTorch"; rerun with --seed-offset 1000 --lr-grid 3e-4,1e-3,3e-3,1e-2).
TUNED_LR = {
    "opd": 3e-3,
    "eopd": 3e-3,
    "reopold": 1e-3,
    "tropd": 3e-3,
    "fkl_outlier": 1e-3,
    "mask_outlier": 3e-3,
    "clip_outlier": 1e-3,
}


def objective(method: str, o: argparse.Namespace):
    """The method's tropd preset (the C++ demo's run_method)."""
    P = tropd.presets
    if method == "opd":
        return P.opd()
    if method == "eopd":
        return P.eopd()
    if method == "reopold":
        return P.reopold(floor=o.reopold_floor, switch_step=o.steps // 2)
    if method == "tropd":
        return P.tropd(beta=o.beta, k=64)
    if method == "fkl_outlier":
        return P.fkl_outlier(k=64)
    if method == "mask_outlier":
        return P.mask_outlier(tau=o.tau, guidance_beta=o.beta)
    if method == "clip_outlier":
        return P.clip_outlier(tau=o.tau, guidance_beta=o.beta)
    raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")


def cosine_alpha(step: int, total: int) -> float:
    """The paper's prefix schedule (tropd/schedules/prefix.hpp: cosine)."""
    if step >= total:
        return 0.0
    if step <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def padded_batch(seqs: list[list[int]], origins: list[list[int]], pad: int, device):
    """Model inputs [B, T] and the rows' targets: token_ids[:, t] = x[t + 1] and origin[:, t] =
    the origin of x[t + 1] (row t of the logits predicts token t + 1); padding and the last
    column are PROMPT (no loss)."""
    B, T = len(seqs), max(len(s) for s in seqs)
    x = torch.full((B, T), pad, dtype=torch.long)
    ids = torch.full((B, T), pad, dtype=torch.long)
    org = torch.zeros((B, T), dtype=torch.uint8)
    for i, (s, g) in enumerate(zip(seqs, origins)):
        x[i, : len(s)] = torch.tensor(s)
        ids[i, : len(s) - 1] = torch.tensor(s[1:])
        org[i, : len(s) - 1] = torch.tensor(g[1:], dtype=torch.uint8)
    return x.to(device), ids.to(device), org.to(device)


# ---------------------------------------------------------------------------------------------
# Setup: teacher, student start, pool, held-out set
# ---------------------------------------------------------------------------------------------


@dataclass
class Setup:
    task: tk.TaskConfig
    teacher: CausalLM
    student0: CausalLM
    eval_set: list
    pool: list  # (problem, prompt tokens, teacher response)
    teacher_ce: float = 0.0
    student_ce: float = 0.0


def supervised(model: CausalLM, t: tk.TaskConfig, steps: int, batch: int, lr: float, seed: int, student_source: bool,
               h: float, e: float, held_out: set, device) -> float:
    """SFT on worked solutions (the C++ demo's supervised()): the teacher on canonical targets
    with contexts rewritten in other surface forms (probability 0.3 per token); the student on
    its own noisier source (targets = contexts). Adam with cosine decay to 10 %. Returns the
    mean cross-entropy of the last 50 steps."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    tail = []
    for s in range(steps):
        ctx, tgt = [], []
        for _ in range(batch):
            p = tk.random_problem(t, rng)
            while p in held_out:
                p = tk.random_problem(t, rng)
            prompt = tk.prompt_tokens(t, p)
            if student_source:
                target = tk.student_source_solution(t, p, h, e, rng)
                context = target
            else:
                target = tk.correct_solution(t, p)
                context = tk.surface_noise(t, target, 0.3, rng)
            ctx.append(prompt + context)
            tgt.append([-100] * (len(prompt) - 1) + target + [-100])
        x = torch.tensor(ctx, device=device)
        y = torch.tensor(tgt, device=device)
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * s / steps)))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if s >= steps - 50:
            tail.append(loss.item())
    return float(np.mean(tail)) if tail else float("nan")


def build_setup(o: argparse.Namespace, log) -> Setup:
    t = tk.TaskConfig()
    dev = o.device
    held_out: set = set()
    eval_set = tk.distinct_problems(t, o.eval_prompts, np.random.default_rng([o.seed_offset, 1]), held_out)
    torch.manual_seed(o.seed_offset)
    if o.arch == "window":
        teacher = WindowLM(t.vocab_size, t.max_sequence, hidden=o.teacher_dim, pad=t.pad).to(dev)
        student = WindowLM(t.vocab_size, t.max_sequence, hidden=o.student_dim, pad=t.pad).to(dev)
    else:
        teacher = CausalLM(t.vocab_size, t.max_sequence, d_model=o.teacher_dim).to(dev)
        student = CausalLM(t.vocab_size, t.max_sequence, d_model=o.student_dim).to(dev)
    base = [t.surface_base(v) for v in range(t.vocab_size)]
    teacher.tie_surface_embeddings(base, 0.1, torch.Generator().manual_seed(o.seed_offset * 7 + 1))
    student.tie_surface_embeddings(base, 0.1, torch.Generator().manual_seed(o.seed_offset * 7 + 2))
    t0 = time.perf_counter()
    tce = supervised(teacher, t, o.teacher_steps, 32, o.sft_lr, o.seed_offset * 7 + 3, False, 0, 0, held_out, dev)
    log(f"  teacher: {o.teacher_steps} SFT steps in {time.perf_counter() - t0:.1f} s, final CE {tce:.4f}")
    t0 = time.perf_counter()
    sce = supervised(student, t, o.student_steps, 32, o.sft_lr, o.seed_offset * 7 + 4, True, o.harmless, o.harmful,
                     held_out, dev)
    log(f"  student: {o.student_steps} SFT steps in {time.perf_counter() - t0:.1f} s, final CE {sce:.4f}")
    teacher.eval()
    student.eval()
    # The pool: training prompts, each with one teacher response sampled at T = 1 before training.
    excl = set(held_out)
    probs = tk.distinct_problems(t, o.pool, np.random.default_rng([o.seed_offset, 2]), excl)
    prompts = [tk.prompt_tokens(t, p) for p in probs]
    gen = torch.Generator().manual_seed(o.seed_offset * 7 + 5)
    responses = []
    for i in range(0, len(prompts), 256):
        responses += sample(teacher, prompts[i : i + 256], t.max_new_tokens, t.eos, t.pad, 1.0, gen)
    pool = list(zip(probs, prompts, responses))
    return Setup(t, teacher, student, eval_set, pool, tce, sce)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    accuracy: float = 0.0  # sampled pass@1 (T = 1)
    greedy_accuracy: float = 0.0
    reverse_kl: float = 0.0  # mean KL(p_S || p_T) per response position of the samples
    r_lt5: float = 0.0  # fraction of sampled tokens with R < -5
    harmless: float = 0.0  # ... that are accepted surface variants
    harmful: float = 0.0  # ... that are errors
    tokens: int = 0


@torch.no_grad()
def evaluate(model: CausalLM, teacher: CausalLM, S: Setup, n_prompts: int, k: int, seed: int) -> EvalResult:
    t, dev = S.task, model.head.weight.device
    probs = S.eval_set[:n_prompts]
    prompts = [tk.prompt_tokens(t, p) for p in probs]
    r = EvalResult()
    greedy = sample(model, prompts, t.max_new_tokens, t.eos, t.pad, 0.0, None)
    r.greedy_accuracy = float(np.mean([tk.verify(t, p, g) for p, g in zip(probs, greedy)]))
    gen = torch.Generator().manual_seed(seed)
    ctx = [pr for pr in prompts for _ in range(k)]
    cont = sample(model, ctx, t.max_new_tokens, t.eos, t.pad, 1.0, gen)
    ok, kl, n, lt5, hl, hf = 0, 0.0, 0, 0, 0, 0
    for i0 in range(0, len(ctx), 256):
        seqs = [c + y for c, y in zip(ctx[i0 : i0 + 256], cont[i0 : i0 + 256])]
        orig = [[PROMPT] * len(c) + [STUDENT] * len(y) for c, y in zip(ctx[i0 : i0 + 256], cont[i0 : i0 + 256])]
        x, ids, org = padded_batch(seqs, orig, t.pad, dev)
        ls = torch.log_softmax(model(x).double(), -1)
        lt = torch.log_softmax(teacher(x).double(), -1)
        m = org == STUDENT
        kl += float((ls.exp() * (ls - lt)).sum(-1)[m].sum())
        R = (lt.gather(-1, ids.unsqueeze(-1)) - ls.gather(-1, ids.unsqueeze(-1))).squeeze(-1)
        for b in range(len(seqs)):
            j = i0 + b
            p, y = probs[j // k], cont[j]
            ok += tk.verify(t, p, y)
            pl = len(ctx[j])
            for q in range(len(y)):
                n += 1
                if float(R[b, pl - 1 + q]) < -5.0:
                    lt5 += 1
                    kind = tk.classify(t, p, y, q)
                    hl += kind == tk.VARIANT
                    hf += kind == tk.ERROR
    r.accuracy = ok / len(ctx)
    d = max(1, n)
    r.reverse_kl, r.r_lt5, r.harmless, r.harmful, r.tokens = kl / d, lt5 / d, hl / d, hf / d, n
    return r


# ---------------------------------------------------------------------------------------------
# One distillation run
# ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    method: str
    seed: int
    lr: float
    final: EvalResult = field(default_factory=EvalResult)
    diverged: bool = False
    why: str = ""
    grad_norms: list = field(default_factory=list)
    trust: list = field(default_factory=list)
    wall_s: float = 0.0


class CudaNotSupported(RuntimeError):
    """tropd refused the CUDA tensors of --device cuda (main() reports it and exits with 2)."""


def update(student, teacher, opt, x, ids, org, obj, seed: int, step: int):
    """One optimiser step on a batch: student forward with grad, teacher forward without,
    tropd.torch.distill_loss on the padded [B, T, V] logits, backward, Adam. Returns the loss,
    the gradient's L2 norm (before the step) and tropd's diagnostics. The step is skipped (and
    the caller told through the non-finite values) when the loss or the gradient is not finite."""
    logits = student(x)  # [B, T, V], with grad
    with torch.no_grad():
        tlogits = teacher(x)
    try:
        loss, diag = ttorch.distill_loss(logits, ids, org, objective=obj, teacher_logits=tlogits, seed=seed, step=step)
    except (NotImplementedError, ValueError) as e:
        if x.is_cuda:  # this build of tropd does not evaluate CUDA tensors (docs/python.md, "CUDA")
            raise CudaNotSupported(str(e)) from e
        raise
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad.norm() for p in student.parameters() if p.grad is not None]
    gn = float(torch.linalg.vector_norm(torch.stack(grads)))
    lv = float(loss.detach())
    if math.isfinite(lv) and math.isfinite(gn):
        opt.step()
    return lv, gn, diag


def train_run(S: Setup, o: argparse.Namespace, method: str, seed: int, lr: float, init_acc: float, log) -> RunResult:
    t0 = time.perf_counter()
    t, dev = S.task, o.device
    res = RunResult(method, seed, lr)
    obj = objective(method, o)
    guided = method in GUIDED
    student = copy.deepcopy(S.student0).train()  # every run starts from the same student, fresh Adam
    teacher = S.teacher
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 11)  # sampling: method-independent per seed
    for step in range(o.steps):
        # The step's prompts: a function of (seed, step) only, the same for every method.
        rng = np.random.default_rng([seed, 3, step])
        batch = [S.pool[int(i)] for i in rng.integers(len(S.pool), size=o.prompts)]
        alpha = cosine_alpha(step, o.steps) if guided else 0.0
        seqs, origins, contexts = [], [], []
        for _, prompt, resp in batch:
            lt = len(resp) - (1 if resp and resp[-1] == t.eos else 0)  # L_T without the end token
            l = int(math.floor(alpha * lt + 1e-9))
            prefix = resp[:l]
            if l > 0:  # the off-policy sample: prompt ++ teacher prefix, trained by the guidance term
                seqs.append(prompt + prefix)
                origins.append([PROMPT] * len(prompt) + [TEACHER] * l)
            contexts += [prompt + prefix] * o.rollouts
        student.eval()
        conts = sample(student, contexts, t.max_new_tokens, t.eos, t.pad, 1.0, gen)
        student.train()
        for c, y in zip(contexts, conts):
            seqs.append(c + y)
            origins.append([PROMPT] * len(c) + [STUDENT] * len(y))
        x, ids, org = padded_batch(seqs, origins, t.pad, dev)
        try:
            lv, gn, diag = update(student, teacher, opt, x, ids, org, obj, seed, step)
        except tropd.EvaluationError as e:
            res.diverged, res.why = True, f"tropd: {e}"
            break
        if not (math.isfinite(lv) and math.isfinite(gn)):
            res.diverged, res.why = True, f"non-finite loss or gradient at step {step}"
            break
        res.grad_norms.append(gn)
        res.trust.append(float(diag["trust_fraction"]))
        if o.log_every > 0 and ((step + 1) % o.log_every == 0 or step + 1 == o.steps):
            log(f"    {method:<12} seed {seed:<4} step {step + 1:>4}/{o.steps}  loss {lv:+.4f}  |g| {gn:7.3f}  "
                f"trust {float(diag['trust_fraction']):.3f}  outliers {float(diag['outlier_fraction']):.3f}  "
                f"({time.perf_counter() - t0:.1f} s)")
    student.eval()
    res.final = evaluate(student, teacher, S, o.eval_prompts, o.eval_samples, seed * 1_000_003 + 17)
    if not res.diverged and res.final.accuracy < 0.5 * init_acc:
        res.diverged, res.why = True, "accuracy collapse (final pass@1 below half of the start's)"
    res.wall_s = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def pm(v: list[float], prec: int) -> str:
    v = [x for x in v if math.isfinite(x)]
    if not v:
        return "n/a"
    sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return f"{np.mean(v):.{prec}f} ± {sd:.{prec}f}"


def table(methods: list[str], runs: list[RunResult]) -> str:
    rows = [
        "| method | lr | pass@1 (sampled) | pass@1 (greedy) | reverse KL | R<-5 harmless (end) | R<-5 harmful (end) | "
        "max grad norm | grad-norm variance | trust | diverged | wall s / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        rs = [r for r in runs if r.method == m]
        if not rs:
            continue
        gmax = [max(r.grad_norms) if r.grad_norms else float("nan") for r in rs]
        gvar = [float(np.var(r.grad_norms)) if r.grad_norms else float("nan") for r in rs]
        trust = [float(np.mean(r.trust)) if r.trust else float("nan") for r in rs]
        lrs = ",".join(sorted({f"{r.lr:g}" for r in rs}))
        rows.append(
            f"| {m} | {lrs} | {pm([r.final.accuracy for r in rs], 3)} | {pm([r.final.greedy_accuracy for r in rs], 3)} | "
            f"{pm([r.final.reverse_kl for r in rs], 4)} | {100 * np.mean([r.final.harmless for r in rs]):.1f}% | "
            f"{100 * np.mean([r.final.harmful for r in rs]):.1f}% | {pm(gmax, 3)} | {pm(gvar, 4)} | "
            f"{np.nanmean(trust):.3f} | {sum(r.diverged for r in rs)}/{len(rs)} | {np.mean([r.wall_s for r in rs]):.1f} |"
        )
    return "\n".join(rows) + "\n"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list from " + ",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=2, help="seeds per method (default 2)")
    ap.add_argument("--seed-offset", type=int, default=0, help="seeds are K..K+S-1; K also keys the setup (tuning: 1000)")
    ap.add_argument("--steps", type=int, default=100, help="distillation steps per run (default 100)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (default 8)")
    ap.add_argument("--rollouts", type=int, default=4, help="student samples per prompt (default 4)")
    ap.add_argument("--lr", type=float, default=0.0, help="Adam learning rate of every method (default: each its tuned one)")
    ap.add_argument("--lr-grid", default="", help="tuning mode: every method at every learning rate of this comma list")
    ap.add_argument("--tau", type=float, default=-5.0, help="mask / clip outlier threshold (default -5)")
    ap.add_argument("--reopold-floor", type=float, default=-5.0, help="REOPOLD's floor (default -5)")
    ap.add_argument("--beta", type=float, default=1e-3, help="off-policy guidance weight (default 1e-3)")
    ap.add_argument("--harmless", type=float, default=0.5, help="student source: surface-variant rate h (default 0.5)")
    ap.add_argument("--harmful", type=float, default=0.15, help="student source: dropped-carry rate e (default 0.15)")
    ap.add_argument("--arch", choices=["window", "transformer"], default="window",
                    help="window: the C++ demo's window MLP (default); transformer: a 2-layer causal transformer")
    ap.add_argument("--teacher-dim", type=int, default=128, help="teacher hidden width (default 128)")
    ap.add_argument("--student-dim", type=int, default=64, help="student hidden width (default 64)")
    ap.add_argument("--teacher-steps", type=int, default=800, help="teacher SFT steps (default 800)")
    ap.add_argument("--student-steps", type=int, default=600, help="student SFT steps (default 600)")
    ap.add_argument("--sft-lr", type=float, default=3e-2, help="SFT Adam learning rate (default 3e-2; 3e-3 for --arch transformer)")
    ap.add_argument("--pool", type=int, default=1024, help="training prompts with a teacher response (default 1024)")
    ap.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts (default 128)")
    ap.add_argument("--eval-samples", type=int, default=2, help="T = 1 samples per held-out prompt (default 2)")
    ap.add_argument("--log-every", type=int, default=20, help="progress line every N steps (0: none)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: these models are too small to gain from more; "
                         "examples/torch/README.md)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    o = ap.parse_args(argv)
    o.methods = [m for m in o.methods.split(",") if m]
    for m in o.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} (choose from {', '.join(METHODS)})")
    o.lr_grid = [float(x) for x in o.lr_grid.split(",") if x]
    if o.steps < 1 or o.seeds < 1 or o.prompts < 1 or o.rollouts < 1 or o.eval_prompts < 1 or o.eval_samples < 1:
        ap.error("steps, seeds, prompts, rollouts and the evaluation sizes must be >= 1")
    if o.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    return o


def main(argv=None) -> int:
    o = parse(argv)
    torch.set_num_threads(o.threads)
    T0 = time.perf_counter()

    def log(s: str) -> None:
        print(s, flush=True)

    t = tk.TaskConfig()
    log(f"distill.py: x(k+1) = x(k) + x(k-1) mod {t.base}^{t.digits}, {t.response_length}-token responses, V = {t.vocab_size}; "
        f"student source h = {o.harmless}, e = {o.harmful}")
    log(f"  {len(o.methods)} methods x {o.seeds} seeds, {o.steps} steps, {o.prompts} prompts x {o.rollouts} rollouts per step, "
        f"device {o.device}, {o.threads} threads")
    log("setup: training the teacher and the student's start, sampling the teacher's responses...")
    S = build_setup(o, log)
    te = evaluate(S.teacher, S.teacher, S, o.eval_prompts, o.eval_samples, o.seed_offset * 7 + 6)
    se = evaluate(S.student0, S.teacher, S, o.eval_prompts, o.eval_samples, o.seed_offset * 7 + 7)
    log(f"  teacher: pass@1 sampled {te.accuracy:.3f}, greedy {te.greedy_accuracy:.3f}")
    log(f"  student start: pass@1 sampled {se.accuracy:.3f}, greedy {se.greedy_accuracy:.3f}, reverse KL {se.reverse_kl:.3f}; "
        f"R < -5 on {100 * se.r_lt5:.1f}% of its tokens: harmless {100 * se.harmless:.1f}%, harmful {100 * se.harmful:.1f}%")
    log(f"  setup took {time.perf_counter() - T0:.1f} s")

    jobs = []
    for si in range(o.seeds):
        for m in o.methods:
            for lr in o.lr_grid or [o.lr if o.lr > 0 else TUNED_LR[m]]:
                jobs.append((m, o.seed_offset + si, lr))
    runs = []
    t_runs = time.perf_counter()
    for i, (m, seed, lr) in enumerate(jobs):
        try:
            r = train_run(S, o, m, seed, lr, se.accuracy, log)
        except CudaNotSupported as e:
            print(f"distill.py: tropd cannot evaluate the loss on CUDA tensors in this build: {e}\n"
                  "  (docs/python.md, section CUDA). Run with --device cpu.", file=sys.stderr)
            return 2
        runs.append(r)
        log(f"  [{i + 1}/{len(jobs)}] {m:<12} seed {seed:<4} lr {lr:<6g} pass@1 {r.final.accuracy:.3f} (greedy "
            f"{r.final.greedy_accuracy:.3f})  rKL {r.final.reverse_kl:.4f}  R<-5 {100 * r.final.harmless:.1f}%/"
            f"{100 * r.final.harmful:.1f}%  max|g| {max(r.grad_norms, default=float('nan')):.3f}"
            f"{'  DIVERGED: ' + r.why if r.diverged else ''}  ({r.wall_s:.1f} s)")
    if o.lr_grid:
        log("\ntuning: sampled pass@1, mean ± std over seeds")
        for m in o.methods:
            cells = []
            for lr in o.lr_grid:
                acc = [r.final.accuracy for r in runs if r.method == m and r.lr == lr]
                cells.append(f"lr {lr:g}: {pm(acc, 3)}")
            log(f"  {m:<12} " + "  ".join(cells))
    else:
        log(f"\nresults after {o.steps} steps, mean ± std over {o.seeds} seeds. pass@1: sampled at T = 1, {o.eval_samples} "
            f"samples on each of {o.eval_prompts} held-out prompts (greedy: one decode each); reverse KL: KL(student || teacher)\n"
            "per token on those samples; R < -5 harmless / harmful: fraction of the student's sampled tokens with R < -5 that\n"
            f"are accepted surface variants / errors, at the end (start: {100 * se.harmless:.1f}% / {100 * se.harmful:.1f}%); "
            "grad norm: L2 norm of the student's gradient per step\n(max / variance over a run's steps); trust: mean of "
            "tropd's trust_fraction diagnostic; diverged: a tropd error, a non-finite loss or\ngradient, or final pass@1 "
            f"below half the start's {se.accuracy:.3f}\n")
        log(table(o.methods, runs))
        log(f"  teacher pass@1 {te.accuracy:.3f} (greedy {te.greedy_accuracy:.3f}); student start {se.accuracy:.3f} "
            f"(greedy {se.greedy_accuracy:.3f}), reverse KL {se.reverse_kl:.3f}")
    log(f"wall time: {time.perf_counter() - T0:.1f} s (runs {time.perf_counter() - t_runs:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
