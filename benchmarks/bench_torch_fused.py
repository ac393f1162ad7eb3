#!/usr/bin/env python3
"""tropd.torch.fused_linear_distill_loss (the fused LM head through the Python package) against
PyTorch eager with materialised logits: time and peak memory of one forward + backward.

Inputs: the student's hidden states h [N, H] and output weight W [V, H] (fp32, both with
autograd), the teacher's own head (h_T [N, H], W_T [V, H], no autograd), every row a
student-sampled token. Objective: OPD (tropd.presets.opd(): A = t - s on every student token,
-rho A, token mean). Cases, each in a process of its own:

  fused@B      tropd.torch.fused_linear_distill_loss(h, W, ..., teacher_hidden=h_T,
               teacher_weight=W_T, scratch_budget=B MiB), the chunk chosen from the budget
               (--budgets-mib, default 256 (the default) and 32)
  eager_tropd  z = h @ W.T, u = h_T @ W_T.T (fp32 logits materialised), tropd.torch.distill_loss
  eager_torch  the same logits, a pure-PyTorch OPD (K1) loss: log_softmax, gather, the
               surrogate -exp(s - sg(s)) sg(t - s), token mean

One call = loss + loss.backward() (dL/dh and dL/dW). Time: best of --reps calls (the first
also warms up). Memory: each worker's peak resident set (VmHWM, reset once its inputs exist)
minus its resident size then: what the call needs above its inputs (torch's CPU allocator
returns large blocks to the OS, so the peak is the honest measure; tracemalloc does not see
torch's allocations). Also printed: the bytes of the [N, V] fp32 logits an eager path
materialises (student + teacher, analytic) and the scratch the fused call reports
(diagnostics "fused_scratch_bytes"). The workers' losses and gradients are checked against each
other (fp32 tolerance). Ratios are of numbers measured in the same run.

  python3 benchmarks/bench_torch_fused.py                       # N = H = 1024, V = 32000, 1 thread
  python3 benchmarks/bench_torch_fused.py --V 32000 151936 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

EAGER = ("eager_tropd", "eager_torch")


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    """VmHWM of this process (ru_maxrss cannot be reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_inputs(N, H, V, seed):
    import torch

    import tropd

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    ht = h + 0.3 * torch.randn(N, H, generator=g)
    W = (2.0 / H**0.5) * torch.randn(V, H, generator=g)
    Wt = W + (0.5 / H**0.5) * torch.randn(V, H, generator=g)
    # Sampled ids: Gumbel-max over chunks of the student's logits (never all [N, V] at once).
    ids = torch.empty(N, dtype=torch.int64)
    for r0 in range(0, N, 64):
        z = h[r0 : r0 + 64] @ W.T
        ids[r0 : r0 + 64] = torch.argmax(z - torch.log(-torch.log(torch.rand(z.shape, generator=g).clamp_min(1e-20))), -1)
    origin = torch.full((N,), tropd.STUDENT, dtype=torch.uint8)
    return h, W, ht, Wt, ids, origin


def pure_torch_opd(z, u, ids, origin):
    import torch

    s = torch.log_softmax(z, -1).gather(-1, ids[:, None])[:, 0]
    t = torch.log_softmax(u, -1).gather(-1, ids[:, None])[:, 0]
    mask = origin == 2
    L = -torch.exp(s - s.detach()) * (t - s).detach()
    return torch.where(mask, L, torch.zeros_like(L)).sum() / mask.sum()


def worker(args) -> None:
    import torch

    import tropd
    import tropd.torch as tt

    torch.set_num_threads(args.threads)
    h, W, ht, Wt, ids, origin = make_inputs(args.N, args.H, args.V[0], args.seed)
    h.requires_grad_()
    W.requires_grad_()
    cfg = tropd.presets.opd()
    info = {}

    def call():
        h.grad = W.grad = None
        if args.worker == "fused":
            loss, d = tt.fused_linear_distill_loss(h, W, ids, origin, objective=cfg, teacher_hidden=ht, teacher_weight=Wt,
                                                   scratch_budget=args.budget << 20)  # fmt: skip
            info["scratch"] = int(d["fused_scratch_bytes"])
            info["chunk"] = int(d["fused_chunk"])
        else:
            z = h @ W.T
            with torch.no_grad():
                u = ht @ Wt.T
            if args.worker == "eager_tropd":
                loss, _ = tt.distill_loss(z, ids, origin, objective=cfg, teacher_logits=u)
            else:
                loss = pure_torch_opd(z, u, ids, origin)
        loss.backward()
        return loss.detach()

    times = []
    base = rss_now()
    reset_peak()
    for _ in range(args.reps):
        t0 = time.perf_counter()
        loss = call()
        times.append(time.perf_counter() - t0)
    peak = rss_peak()
    out = dict(time=min(times), times=times, extra=peak - base, loss=float(loss), **info)
    torch.save({"dh": h.grad, "dW": W.grad}, args.out + ".pt")
    with open(args.out, "w") as f:
        json.dump(out, f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=1024)
    p.add_argument("--H", type=int, default=1024)
    p.add_argument("--V", type=int, nargs="+", default=[32000])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budgets-mib", type=int, nargs="+", default=[256, 32])
    p.add_argument("--budget", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=("fused",) + EAGER, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    import torch

    print(f"torch {torch.__version__}, N={args.N}, H={args.H}, fp32, OPD, teacher head, {args.threads} thread(s), best of {args.reps}")
    print("| V | case | time | extra peak memory | [N, V] fp32 logits (student + teacher) | fused scratch (chunk) | time / first fused | memory / first fused |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for V in args.V:
            res = {}
            cases = [(f"fused@{b}", "fused", b) for b in args.budgets_mib] + [(c, c, 0) for c in EAGER]
            for name, case, budget in cases:
                out = os.path.join(tmp, f"{case}-{budget}-{V}.json")
                cmd = [sys.executable, __file__, "--worker", case, "--out", out, "--N", str(args.N), "--H", str(args.H),
                       "--V", str(V), "--reps", str(args.reps), "--threads", str(args.threads), "--seed", str(args.seed),
                       "--budget", str(budget)]  # fmt: skip
                subprocess.check_call(cmd)
                with open(out) as f:
                    res[name] = json.load(f)
                res[name]["grads"] = torch.load(out + ".pt")
            f = res[cases[0][0]]
            logits_bytes = 2 * args.N * V * 4
            for name, case, _ in cases:
                r = res[name]
                scratch = f"{r['scratch'] / 2**20:.1f} MiB ({r['chunk']})" if case == "fused" else "-"
                print(f"| {V} | {name} | {r['time']:.2f} s | {r['extra'] / 2**20:.1f} MiB | {logits_bytes / 2**20:.1f} MiB | "
                      f"{scratch} | {r['time'] / f['time']:.2f} | {r['extra'] / max(f['extra'], 1):.2f} |")  # fmt: skip
            for fname, case, _ in cases:
                if case != "fused":
                    continue
                fr = res[fname]
                for e in EAGER:
                    r = res[e]
                    print(f"  V={V} {e} / {fname}: time {r['time'] / fr['time']:.2f}, extra memory {r['extra'] / max(fr['extra'], 1):.2f}")
            for name, case, _ in cases[1:]:
                r = res[name]
                rel = abs(r["loss"] - f["loss"]) / max(abs(r["loss"]), 1e-30)
                errs = []
                for key in ("dh", "dW"):
                    a, b = f["grads"][key], r["grads"][key]
                    errs.append(float((a - b).abs().max() / b.abs().max()))
                agree = rel < 1e-4 and max(errs) < 1e-3
                ok &= agree
                print(f"  V={V} {cases[0][0]} vs {name}: loss rel. error {rel:.1e}, dL/dh {errs[0]:.1e}, dL/dW {errs[1]:.1e} "
                      f"(max error / max |value|){'' if agree else '  MISMATCH'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
