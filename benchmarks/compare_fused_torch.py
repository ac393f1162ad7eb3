#!/usr/bin/env python3
"""The fused LM head (tropd::host::fused_lm_head) against PyTorch eager with materialised logits.

Case: the TrOPD objective (tropd::presets::tropd(): stochastic trust region, k1 reward A = t - s_old on
trusted tokens, form-C top-64 forward-KL advantage A = -FKL_k (renormalised teacher top-k) on
outliers, PG surrogate -rho*A, token mean) with every row a student-sampled token, from the
student's hidden states h [N x H] and output weight W [V x H] and the teacher's own head
(h_T [N x H], W_T [V x H]), fp32. One call = forward and backward: loss, dL/dh, dL/dW.

  PyTorch eager: z = h @ W.T (autograd), u = h_T @ W_T.T (no grad), log_softmax, gather, topk,
                 the same formulas, loss.backward(); given tropd's trust decisions (as a trainer
                 would pass a mask), since tropd's are counter-based Philox draws.
  tropd:         tropd-bench-fused --harness (benchmarks/bench_fused.cpp): fused_lm_head, one sweep,
                 chunk chosen from a 256 MiB budget.

Each side runs in its own process; its extra peak memory is its peak resident set size
(VmHWM, reset once its inputs exist) minus its resident size at that point. Both get the same inputs (the tropd
side reads them from a file this script writes; the PyTorch worker regenerates them from the
seed) and the same thread count. The script checks that loss, dL/dh and dL/dW agree (fp32
tolerance), then prints time and memory with their ratios.

  python3 benchmarks/compare_fused_torch.py --build-dir build/perf --V 32000 151936
"""
import argparse
import os
import struct
import subprocess
import sys
import tempfile
import time


def make_inputs(N, H, V, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    h = rng.standard_normal((N, H), dtype=np.float32)
    ht = (h + 0.3 * rng.standard_normal((N, H), dtype=np.float32)).astype(np.float32)
    sw = np.float32(2.0 / np.sqrt(H))
    W = (sw * rng.standard_normal((V, H), dtype=np.float32)).astype(np.float32)
    Wt = (W + 0.5 * sw * rng.standard_normal((V, H), dtype=np.float32)).astype(np.float32)
    return h, W, ht, Wt


def sample_ids(h, W, seed):
    """y ~ softmax(h W^T) per row (Gumbel-max), 64 rows at a time."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    ids = np.empty(h.shape[0], dtype=np.int32)
    for r0 in range(0, h.shape[0], 64):
        z = h[r0:r0 + 64] @ W.T
        g = -np.log(-np.log(rng.random(z.shape, dtype=np.float32) + 1e-20) + 1e-20)
        ids[r0:r0 + 64] = np.argmax(z + g, axis=1)
    return ids


def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak():
    """VmHWM of this address space (not ru_maxrss, which remembers the pre-exec image's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def torch_tropd(h, W, ht, Wt, y, trusted, k):
    import torch
    import torch.nn.functional as F

    h = h.detach().requires_grad_()
    W = W.detach().requires_grad_()
    z = h @ W.T
    ls = F.log_softmax(z, dim=-1)
    with torch.no_grad():
        u = ht @ Wt.T
        lt = F.log_softmax(u, dim=-1)
        t = lt.gather(-1, y[:, None]).squeeze(-1)
        s_old = ls.detach().gather(-1, y[:, None]).squeeze(-1)
        top_lq, top_id = lt.topk(k, dim=-1)
        ls_top = ls.detach().gather(-1, top_id)
        log_sk = torch.logsumexp(top_lq, dim=-1, keepdim=True)
        qn = (top_lq - log_sk).exp()
        fkl = (qn * ((top_lq - log_sk) - ls_top)).sum(-1)  # renormalised top-k forward KL
        adv = torch.where(trusted, t - s_old, -fkl)
        del u, lt, top_lq, top_id, ls_top
    s = ls.gather(-1, y[:, None]).squeeze(-1)
    rho = (s - s_old).exp()
    loss = (-(rho * adv)).mean()
    loss.backward()
    return loss.detach(), h.grad, W.grad


def worker(args):
    """The PyTorch side, in its own process: regenerate the inputs, run, report."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    h, W, ht, Wt = make_inputs(args.N, args.H, args.V, args.seed)
    side = np.load(args.side)
    y = torch.from_numpy(side["ids"].astype(np.int64))
    trusted = torch.from_numpy(side["trusted"].astype(bool))
    h_t, W_t, ht_t, Wt_t = (torch.from_numpy(a) for a in (h, W, ht, Wt))
    reset_peak()
    base = rss_now()
    times = []
    for rep in range(args.reps + 1):  # the first call warms up the allocator and is not timed
        t0 = time.perf_counter()
        loss, dh, dW = torch_tropd(h_t, W_t, ht_t, Wt_t, y, trusted, args.k)
        if rep > 0:
            times.append(time.perf_counter() - t0)
        if rep < args.reps:
            del dh, dW
    peak = rss_peak()
    np.savez(args.out, loss=np.float64(loss), dh=dh.numpy(), dW=dW.numpy(), times=np.array(times), extra=np.float64(peak - base))
    return 0


def find_bench(args, root):
    if args.bench:
        return args.bench
    build = args.build_dir or os.path.join(root, "build", "perf")
    exe = os.path.join(build, "bin", "tropd-bench-fused")
    if not os.path.exists(os.path.join(build, "CMakeCache.txt")):
        subprocess.check_call(["cmake", "-S", root, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-G", "Ninja"])
    subprocess.check_call(["cmake", "--build", build, "-j2", "--target", "tropd-bench-fused"])
    return exe


def run_child(cmd):
    """Runs cmd; returns its exit status."""
    return subprocess.call(cmd)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--H", type=int, default=1024)
    ap.add_argument("--V", type=int, nargs="+", default=[32000, 151936])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-mib", type=int, default=256)
    ap.add_argument("--build-dir", default=None, help="CMake build directory holding bin/tropd-bench-fused (default build/perf)")
    ap.add_argument("--bench", default=None, help="path of a built tropd-bench-fused")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.V = args.V[0]
        return worker(args)

    import numpy as np
    import torch

    exe = find_bench(args, root)
    print(f"torch {torch.__version__}; TrOPD (k={args.k}), teacher head, fp32, N={args.N} H={args.H}, threads={args.threads}, "
          f"best of {args.reps} calls (forward + backward)", flush=True)
    failed = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for V in args.V:
            h, W, ht, Wt = make_inputs(args.N, args.H, V, args.seed)
            ids = sample_ids(h, W, args.seed)
            inp, out = os.path.join(tmp, "in.bin"), os.path.join(tmp, "out.bin")
            with open(inp, "wb") as f:
                f.write(b"TRFH")
                f.write(struct.pack("<iiii", args.threads, args.reps, 0, args.budget_mib))
                f.write(struct.pack("<qqq", args.N, args.H, V))
                for a in (h, W, ht, Wt):
                    f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
                f.write(np.ascontiguousarray(ids, dtype="<i4").tobytes())
            del h, W, ht, Wt
            rc = run_child([exe, "--harness", inp, out])
            os.remove(inp)
            if rc != 0:
                sys.exit(f"compare_fused_torch: {exe} --harness failed ({rc})")
            with open(out, "rb") as f:
                if f.read(4) != b"TRFO":
                    sys.exit("compare_fused_torch: malformed harness output")
                extra_c, scratch_c, chunk_c, nt = struct.unpack("<qqqq", f.read(32))
                loss_c = struct.unpack("<d", f.read(8))[0]
                times_c = np.frombuffer(f.read(8 * nt), dtype="<f8").copy()
                flags = np.frombuffer(f.read(args.N), dtype=np.uint8).copy()
                dh_c = np.frombuffer(f.read(4 * args.N * args.H), dtype="<f4").reshape(args.N, args.H).copy()
                dW_c = np.frombuffer(f.read(4 * V * args.H), dtype="<f4").reshape(V, args.H).copy()
            os.remove(out)
            side = os.path.join(tmp, "side.npz")
            np.savez(side, ids=ids, trusted=(flags & 1).astype(np.uint8))
            res = os.path.join(tmp, "torch.npz")
            rc = run_child([sys.executable, os.path.abspath(__file__), "--worker", "--N", str(args.N), "--H", str(args.H), "--V", str(V),
                               "--k", str(args.k), "--threads", str(args.threads), "--reps", str(args.reps), "--seed", str(args.seed),
                               "--side", side, "--out", res])
            if rc != 0:
                sys.exit(f"compare_fused_torch: the PyTorch worker failed ({rc})")
            r = np.load(res)
            lerr = abs(loss_c - float(r["loss"])) / max(1.0, abs(float(r["loss"])))
            gh = float(np.max(np.abs(dh_c - r["dh"])) / max(float(np.max(np.abs(r["dh"]))), 1e-30))
            gw = float(np.max(np.abs(dW_c - r["dW"])) / max(float(np.max(np.abs(r["dW"]))), 1e-30))
            ok = lerr <= 1e-4 and gh <= 1e-3 and gw <= 1e-3
            failed |= not ok
            tt, tc = float(np.min(r["times"])), float(np.min(times_c))
            mt, mc = float(r["extra"]), float(extra_c)
            mib = 1.0 / (1 << 20)
            print(f"V={V}: torch {1e3 * tt:10.1f} ms {mt * mib:9.1f} MiB extra | tropd fused {1e3 * tc:10.1f} ms {mc * mib:8.1f} MiB extra "
                  f"(scratch {scratch_c * mib:.1f} MiB, chunk {chunk_c}) | time ratio torch/tropd {tt / tc:5.2f}, memory ratio "
                  f"tropd/torch {mc / mt:6.3f} | check: loss {lerr:.1e}, dL/dh {gh:.1e}, dL/dW {gw:.1e} {'ok' if ok else 'MISMATCH'} "
                  f"trusted={int((flags & 1).sum())}/{args.N}", flush=True)
            rows.append((V, tt, tc, mt, mc))
            del dh_c, dW_c, r
    if failed:
        print("compare_fused_torch: tropd and PyTorch disagree beyond fp32 tolerance", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
