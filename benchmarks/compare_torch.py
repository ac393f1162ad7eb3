#!/usr/bin/env python3
"""tropd against idiomatic PyTorch eager, on identical inputs, same thread count.

Cases (row level, fp32 logits [N x V], loss + gradient with respect to the student logits):
  rkl    reverse KL per row: F.log_softmax on both rows, F.kl_div(..., log_target=True).sum(-1),
         backward of the sum; tropd: host::divergence_rows(reverse_kl).
  tropd  the TrOPD objective (tropd::presets::tropd(): stochastic trust region, k1 reward
         A = t - s_old on trusted tokens, form-C top-64 forward-KL advantage A = -FKL_k
         (renormalised teacher top-k) on outliers, PG surrogate -rho*A, token mean) with every
         row a sampled student token; PyTorch: log_softmax, gather, torch.topk, the same
         formulas, backward. The trust-region decisions are random (counter-based Philox in
         tropd); PyTorch is given tropd's decisions, as a trainer would pass a mask.

For each case and thread count the script writes the inputs to a binary file, runs
tropd-torch-harness (benchmarks/torch_harness.cpp) on them, runs PyTorch, checks that both give
the same loss and gradient (fp32 tolerance), and prints the times (best of --reps). The last
line is `ratio=X`: the smallest PyTorch/tropd time ratio among the cases run.

torch is installed from PyPI (`pip install torch numpy`) if it is missing.

  python3 benchmarks/compare_torch.py --build-dir build/perf            # V=151936, N=256, 1 and 2 threads
  python3 benchmarks/compare_torch.py --case tropd --threads 1 --N 128
"""
import argparse
import os
import struct
import subprocess
import sys
import tempfile
import time


def ensure_torch():
    try:
        import numpy  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        print("compare_torch: installing torch and numpy from PyPI (a large download, once)", flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "torch", "numpy"])


def find_harness(args, root):
    if args.harness:
        return args.harness
    build = args.build_dir or os.path.join(root, "build", "perf")
    exe = os.path.join(build, "bin", "tropd-torch-harness")
    if not os.path.exists(os.path.join(build, "CMakeCache.txt")):
        subprocess.check_call(["cmake", "-S", root, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-G", "Ninja"])
    subprocess.check_call(["cmake", "--build", build, "-j2", "--target", "tropd-torch-harness"])
    if not os.path.exists(exe):
        sys.exit(f"compare_torch: {exe} was not built")
    return exe


def make_inputs(N, V, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    zs = (2.0 * rng.standard_normal((N, V), dtype=np.float32)).astype(np.float32)
    zt = (zs + 1.2 * rng.standard_normal((N, V), dtype=np.float32)).astype(np.float32)
    # Sampled tokens: y ~ softmax(zs) per row (Gumbel-max).
    g = -np.log(-np.log(rng.random((N, V), dtype=np.float32) + 1e-20) + 1e-20)
    ids = np.argmax(zs + g, axis=1).astype(np.int32)
    return zs, zt, ids


def run_harness(exe, kind, zs, zt, ids, threads, reps, k, tmp):
    import numpy as np

    N, V = zs.shape
    inp = os.path.join(tmp, "in.bin")
    out = os.path.join(tmp, "out.bin")
    with open(inp, "wb") as f:
        f.write(b"TRPD")
        f.write(struct.pack("<iiiiqq", kind, threads, reps, k, N, V))
        f.write(np.ascontiguousarray(zs, dtype="<f4").tobytes())
        f.write(np.ascontiguousarray(zt, dtype="<f4").tobytes())
        f.write(np.ascontiguousarray(ids, dtype="<i4").tobytes())
    subprocess.check_call([exe, inp, out])
    with open(out, "rb") as f:
        if f.read(4) != b"TRPO":
            sys.exit("compare_torch: malformed harness output")
        n, v, r = struct.unpack("<qqi", f.read(20))
        loss = np.frombuffer(f.read(8 * n), dtype="<f8").copy()
        trusted = np.frombuffer(f.read(n), dtype=np.uint8).copy()
        grad = np.frombuffer(f.read(4 * n * v), dtype="<f4").reshape(n, v).copy()
        seconds = np.frombuffer(f.read(8 * r), dtype="<f8").copy()
    os.remove(inp)
    os.remove(out)
    return loss, trusted, grad, seconds


def torch_rkl(zs_t, zt_t):
    import torch
    import torch.nn.functional as F

    s = zs_t.detach().requires_grad_()
    ls = F.log_softmax(s, dim=-1)
    lt = F.log_softmax(zt_t, dim=-1)
    kl = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)  # sum_v p (log p - log q)
    kl.sum().backward()
    return kl.detach(), s.grad


def torch_tropd(zs_t, zt_t, y, trusted, k):
    import torch
    import torch.nn.functional as F

    s_logits = zs_t.detach().requires_grad_()
    ls = F.log_softmax(s_logits, dim=-1)
    with torch.no_grad():
        lt = F.log_softmax(zt_t, dim=-1)
        t = lt.gather(-1, y[:, None]).squeeze(-1)
        s_old = ls.detach().gather(-1, y[:, None]).squeeze(-1)
        top_lq, top_id = lt.topk(k, dim=-1)
        ls_top = ls.detach().gather(-1, top_id)
        log_sk = torch.logsumexp(top_lq, dim=-1, keepdim=True)
        qn = (top_lq - log_sk).exp()
        fkl = (qn * ((top_lq - log_sk) - ls_top)).sum(-1)  # renormalised top-k forward KL
        adv = torch.where(trusted, t - s_old, -fkl)
    s = ls.gather(-1, y[:, None]).squeeze(-1)
    rho = (s - s_old).exp()
    loss = (-(rho * adv)).mean()
    loss.backward()
    return loss.detach(), s_logits.grad


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["rkl", "tropd", "both"], default="both")
    ap.add_argument("--N", type=int, default=256)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build-dir", default=None, help="CMake build directory holding bin/tropd-torch-harness (default build/perf)")
    ap.add_argument("--harness", default=None, help="path of a built tropd-torch-harness")
    args = ap.parse_args()

    ensure_torch()
    import numpy as np
    import torch

    exe = find_harness(args, root)
    zs, zt, ids = make_inputs(args.N, args.V, args.seed)
    zs_t, zt_t, y = torch.from_numpy(zs), torch.from_numpy(zt), torch.from_numpy(ids).long()
    cases = ["rkl", "tropd"] if args.case == "both" else [args.case]
    print(f"torch {torch.__version__}; N={args.N} V={args.V} fp32; best of {args.reps} runs", flush=True)
    ratios = []
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for th in args.threads:
                kind = 0 if case == "rkl" else 1
                loss_c, trusted, grad_c, sec = run_harness(exe, kind, zs, zt, ids, th, args.reps, args.k, tmp)
                torch.set_num_threads(th)
                times = []
                for rep in range(args.reps + 1):  # the first run warms up the allocator and is not timed
                    t0 = time.perf_counter()
                    if case == "rkl":
                        loss_t, grad_t = torch_rkl(zs_t, zt_t)
                    else:
                        loss_t, grad_t = torch_tropd(zs_t, zt_t, y, torch.from_numpy(trusted.astype(bool)), args.k)
                    if rep > 0:
                        times.append(time.perf_counter() - t0)
                    del grad_t
                if case == "rkl":
                    loss_t, grad_t = torch_rkl(zs_t, zt_t)
                    lerr = float(np.max(np.abs(loss_c - loss_t.double().numpy()) / np.maximum(1.0, np.abs(loss_t.double().numpy()))))
                else:
                    loss_t, grad_t = torch_tropd(zs_t, zt_t, y, torch.from_numpy(trusted.astype(bool)), args.k)
                    lerr = abs(loss_c[0] - float(loss_t)) / max(1.0, abs(float(loss_t)))
                g = grad_t.numpy()
                gerr = float(np.max(np.abs(grad_c - g)) / max(float(np.max(np.abs(g))), 1e-30))
                ok = lerr <= 1e-4 and gerr <= 1e-4
                failed |= not ok
                tt, tc = min(times), float(np.min(sec))
                ratio = tt / tc
                ratios.append(ratio)
                extra = f" trusted={int(trusted.sum())}/{args.N}" if case == "tropd" else ""
                print(f"{case:5s} threads={th}: torch {1e3 * tt:9.2f} ms  tropd {1e3 * tc:8.2f} ms  speedup {ratio:6.1f}x  "
                      f"| check: loss rel err {lerr:.1e}, grad rel err {gerr:.1e} {'ok' if ok else 'MISMATCH'}{extra}", flush=True)
                del grad_t, g, grad_c
    if failed:
        print("compare_torch: tropd and PyTorch disagree beyond fp32 tolerance", file=sys.stderr)
    print(f"ratio={min(ratios):.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
