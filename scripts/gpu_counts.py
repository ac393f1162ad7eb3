#!/usr/bin/env python3
"""Static counts of tropd's CUDA row kernels, read from a CUDA build (no GPU needed).

Run it through scripts/gpu_counts.sh (which finds or installs cuobjdump and nvdisasm). For each
kernel selected by a name pattern (--kernel; defaults below) and each SASS architecture in the
binary, it prints:

  * registers, stack and spill bytes: cuobjdump's resource usage, and ptxas -v run on the PTX
    embedded in the same binary (the build's "-Xptxas -v"; the two register counts must agree);
  * every innermost loop (a branch back to an earlier address = a back edge; the loop body is
    the instructions from its target to the branch): the SASS instructions of the whole body
    and of its hot path, per element. The hot path leaves out the instructions that come from
    the bodies of "cold" functions (--cold, default rebase, flush, report: the running-maximum
    rebase or new_max, the fp32 -> fp64 flush every 16 vectors, the masked path of a vector
    with -inf or underflowing entries (add_masked), the status-word report), found through
    the binary's line table (-lineinfo, TROPD_CUDA_LINEINFO=ON) and the sources it names. Both
    arms of an if/else stay in the hot path (JSD's pass 1b and 2 are counted that way).
    Elements per iteration of a vector loop (one with 16-byte global loads): a loop that stores
    writes one gradient element (GRAD_BYTES) per element, one that does not reads INPUT_ROWS
    logits per element (so the compiler's unrolling of gpu/detail/vector_io.cuh's sweep is
    followed; --vectors-per-iter fixes it instead). Of the vector loops of one pass (one call
    site), the one with the most elements per iteration is counted; the others are its
    remainders. Head and tail loops (scalar) are listed but not counted per element;
  * the global bytes each loop reads and writes per element on its hot path, summed over the
    vector loops (the HBM traffic per call by construction, when nothing is re-read from L2);
  * a predicted fraction of the device-to-device copy bandwidth, per machine model:
    floor bytes / max(moved bytes, hot instructions x copy bandwidth / issue rate,
    MUFU and fp64 pipe limits), with the limit that binds.

Kernels are found by regular expressions on their demangled names, so a rename needs only new
patterns (--kernel LABEL:LOGIT_BYTES:INPUT_ROWS:REGEX, or TROPD_COUNT_KERNELS with ';' between
entries). A pattern that matches nothing is reported, and the exit status is then 1; --list
prints every kernel of the binary.
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

# label : bytes per logit : input rows read per element (the floor) : regex on the demangled name.
DEFAULT_KERNELS = [
    # Row functions (gpu/rows.cuh): the one-block-per-row kernel holds every pass of a row.
    "rkl fp32:4:2:rows_row_per_block_kernel<[^(]*dense_task<tropd::estimators::reverse_kl, tropd::estimators::moments_needed\\{false, false, true, false\\}>, float, float, float>",
    "rkl bf16:2:2:rows_row_per_block_kernel<[^(]*dense_task<tropd::estimators::reverse_kl, tropd::estimators::moments_needed\\{false, false, true, false\\}>, tropd::bf16, tropd::bf16, float>",
    "jsd fp32:4:2:rows_row_per_block_kernel<[^(]*dense_task<tropd::estimators::jsd, tropd::estimators::moments_needed\\{false, false, true, true\\}>, float, float, float>",
    "jsd bf16:2:2:rows_row_per_block_kernel<[^(]*dense_task<tropd::estimators::jsd, tropd::estimators::moments_needed\\{false, false, true, true\\}>, tropd::bf16, tropd::bf16, float>",
    "topk fp32:4:1:rows_row_per_block_kernel<[^(]*topk_task<false, float>, float, float, float>",
    "topk bf16:2:1:rows_row_per_block_kernel<[^(]*topk_task<false, float>, tropd::bf16, tropd::bf16, float>",
    # The row-level objective (gpu/objective.cuh): pass 1 and pass 2 are two kernels with the
    # token stages between them; a label starting with '+' sums the loops of every match.
    "+opd fp32:4:2:objective_(rows_kernel<tropd::objective<tropd::regions::all_trusted, tropd::estimators::k1_reward, tropd::outliers::drop, [^(]*moments_needed\\{false, false, false, false\\}>, true, float, float>|grad_kernel<tropd::objective<tropd::regions::all_trusted, tropd::estimators::k1_reward, tropd::outliers::drop, [^(]*true, float, float, float>)",
    "+opd bf16:2:2:objective_(rows_kernel<tropd::objective<tropd::regions::all_trusted, tropd::estimators::k1_reward, tropd::outliers::drop, [^(]*moments_needed\\{false, false, false, false\\}>, true, tropd::bf16, tropd::bf16>|grad_kernel<tropd::objective<tropd::regions::all_trusted, tropd::estimators::k1_reward, tropd::outliers::drop, [^(]*true, tropd::bf16, tropd::bf16, float>)",
]
DEFAULT_COLD = "rebase,flush,report,new_max,add_masked"
GRAD_BYTES = 4  # the benchmark's gradient is fp32

# Machine models: name, SMs, clock (GHz), device-to-device copy bandwidth (bytes read + written
# per second), FP64 lanes per SM. Issue: 4 schedulers x 32 lanes = 128 thread-instructions per
# clock per SM; MUFU: 16 per clock per SM.
MACHINES = [
    ("H100", 132, 1.98, 3.0e12, 64),  # copy: assumed (HBM3 3.35 TB/s peak); gpu_check measures it
    ("H200", 132, 1.98, 4.3e12, 64),  # copy: the review's figure
]

INS_RE = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
LABEL_RE = re.compile(r"^(\.L_x_\d+):")
FUNC_RE = re.compile(r"^\.text\.(\S+):\s*$")
LINE_RE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
BRANCH_RE = re.compile(r"\bBRA(?:\.\w+)*\b.*`\((\.L_x_\d+)\)")


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw).stdout


def opcode(text):
    t = re.sub(r"^@!?U?P[T\d]+\s+", "", text)
    return t.split()[0] if t.split() else ""


def mem_bytes(op):
    """(kind, bytes) of a global load/store opcode, else None."""
    m = re.match(r"^(LDG|STG|LD|ST)\b(\.[\w.]+)?$", op)
    if not m:
        return None
    mods = (m.group(2) or "").split(".")
    width = 4
    for w, b in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if w in mods:
            width = b
    return ("load" if m.group(1).startswith("LD") else "store", width)


def is_fp64(op):
    return re.match(r"^(DADD|DMUL|DFMA|DSETP|DMNMX|DMMA)\b", op) is not None


class Source:
    """Line ranges of the bodies of the cold functions, per source file."""

    def __init__(self, cold):
        self.cold = cold
        self.cache = {}

    def ranges(self, path):
        if path in self.cache:
            return self.cache[path]
        out = []
        try:
            text = open(path, encoding="utf-8", errors="replace").read()
        except OSError:
            self.cache[path] = None
            return None
        name_re = re.compile(r"(?<![.>\w])(%s)\s*\(" % "|".join(map(re.escape, self.cold)))
        for m in name_re.finditer(text):
            i = m.end() - 1  # at '('
            depth = 0
            while i < len(text):
                if text[i] == "(":
                    depth += 1
                elif text[i] == ")":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            j = i + 1
            tail = re.match(r"(\s|const\b|noexcept\b|override\b|final\b|&)*", text[j:])
            j += tail.end()
            if j >= len(text) or text[j] != "{":
                continue  # a call or a declaration, not a definition
            depth, k = 0, j
            while k < len(text):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            out.append((text.count("\n", 0, j) + 1, text.count("\n", 0, k) + 1, m.group(1)))
        self.cache[path] = out
        return out

    def cold_of(self, frames):
        """The outermost cold function an instruction comes from (a frame inside its body), or None."""
        for path, line in reversed(frames):
            rs = self.ranges(path)
            for a, b, name in rs or ():
                if a <= line <= b:
                    return name
        return None

    def text(self, path, line):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for n, l in enumerate(f, 1):
                    if n == line:
                        return l.strip()
        except OSError:
            pass
        return "?"


def parse_nvdisasm(text):
    """{mangled name: (instructions, labels)}; instruction = (addr, text, frames)."""
    funcs = {}
    cur = None
    frames = []
    pending_group = []
    for line in text.splitlines():
        m = FUNC_RE.match(line)
        if m:
            cur = m.group(1)
            funcs[cur] = ([], {})
            frames, pending_group = [], []
            continue
        if cur is None:
            continue
        m = LINE_RE.match(line)
        if m:
            pending_group.append(m)
            continue
        if pending_group:
            fr = []
            for g in pending_group:
                fr.append((g.group(1), int(g.group(2))))
                if g.group(3):
                    fr.append((g.group(3), int(g.group(4))))
            frames = list(dict.fromkeys(fr))
            pending_group = []
        m = LABEL_RE.match(line)
        if m:
            funcs[cur][1][m.group(1)] = len(funcs[cur][0])
            continue
        m = INS_RE.match(line)
        if m:
            funcs[cur][0].append((int(m.group(1), 16), m.group(2), tuple(frames)))
    return funcs


def find_loops(ins, labels):
    """Innermost loops: (head index, back-edge index)."""
    edges = []
    for i, (_, t, _) in enumerate(ins):
        m = BRANCH_RE.search(t)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            edges.append((labels[m.group(1)], i))
    inner = []
    for h, e in edges:
        if not any((h2, e2) != (h, e) and h <= h2 and e2 <= e for h2, e2 in edges):
            inner.append((h, e))
    return sorted(set(inner))


def analyse_loop(ins, h, e, src):
    body = ins[h:e + 1]
    hot = [x for x in body if src.cold_of(x[2]) is None]
    cold = collections.Counter(src.cold_of(x[2]) for x in body if src.cold_of(x[2]) is not None)
    ops = [opcode(x[1]) for x in hot]
    loads = [mem_bytes(o) for o in ops]
    vec_loads = sum(1 for l in loads if l and l[0] == "load" and l[1] == 16)
    return {
        "body": len(body),
        "hot": len(hot),
        "cold": dict(cold),
        "vector": vec_loads > 0,
        "vec_loads": vec_loads,
        "read": sum(l[1] for l in loads if l and l[0] == "load"),
        "written": sum(l[1] for l in loads if l and l[0] == "store"),
        "mufu": sum(1 for o in ops if o.startswith("MUFU")),
        "fp64": sum(1 for o in ops if is_fp64(o)),
        "calls": sum(1 for o in ops if o.startswith("CALL")),
        "frames": body[-1][2],
        "addr": (body[0][0], body[-1][0]),
    }


def demangle_all(names):
    if not names:
        return {}
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), stdout=subprocess.PIPE, text=True, check=True).stdout.splitlines()
    return dict(zip(names, out))


def resource_usage(cuobjdump, binary):
    """{(arch, mangled): {REG, STACK, SHARED, LOCAL}} from cuobjdump --dump-resource-usage."""
    text = run([cuobjdump, "--dump-resource-usage", binary])
    res, arch, fn = {}, None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        m = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn:
            res[(arch, fn)] = dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))
            fn = None
    return res


def ptxas_info(ptxas, ptx_files, arch):
    """{mangled: (registers, spill stores, spill loads)} from ptxas -v on the embedded PTX."""
    info = {}
    for ptx in ptx_files:
        out = run([ptxas, "-arch=" + arch, "-v", ptx, "-o", os.devnull])
        fn = None
        for line in out.splitlines():
            m = re.search(r"Compiling entry function '(\S+)'", line) or re.search(r"Function properties for (\S+)", line)
            if m:
                fn = m.group(1)
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and fn:
                info.setdefault(fn, [None, 0, 0])[1:] = [int(m.group(1)), int(m.group(2))]
            m = re.search(r"Used (\d+) registers", line)
            if m and fn:
                info.setdefault(fn, [None, 0, 0])[0] = int(m.group(1))
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binaries", nargs="*", help="CUDA executables (default: BUILD/bin/tropd-bench-gpu)")
    ap.add_argument("--build", default=None, help="build directory (default: the first of build/gpu-check, build/gpu-bare, build/cuda with a bin/tropd-bench-gpu)")
    ap.add_argument("--arch", action="append", help="SASS architecture(s) to analyse, e.g. sm_90 (default: every one in the binary)")
    ap.add_argument("--kernel", action="append", help="LABEL:LOGIT_BYTES:INPUT_ROWS:REGEX (repeatable; default: rkl/jsd/topk x fp32/bf16 fused kernels)")
    ap.add_argument("--cold", default=os.environ.get("TROPD_COUNT_COLD", DEFAULT_COLD), help="comma-separated cold function names (default %(default)s)")
    ap.add_argument("--vectors-per-iter", type=int, default=0,
                    help="vectors per row per vector-loop iteration; 0 (default): from the loop's own stores (GRAD_BYTES per element) "
                         "or loads (INPUT_ROWS x LOGIT_BYTES per element), which follows the compiler's unrolling")
    ap.add_argument("--min-body", type=int, default=20, help="loops with fewer instructions are not listed (default %(default)s)")
    ap.add_argument("--list", action="store_true", help="list every kernel (demangled) with its registers, and stop")
    ap.add_argument("--markdown", action="store_true", help="also print the summary as a Markdown table")
    args = ap.parse_args()

    tools = {}
    for t in ("cuobjdump", "nvdisasm", "ptxas"):
        tools[t] = os.environ.get("TROPD_" + t.upper()) or shutil.which(t)
        tools[t] = os.path.abspath(tools[t]) if tools[t] else None
    for t in ("cuobjdump", "nvdisasm"):
        if not tools[t]:
            sys.exit(f"gpu_counts: {t} not found (scripts/gpu_counts.sh installs it from PyPI into build/cuda-tools)")

    binaries = args.binaries
    if not binaries:
        builds = [args.build] if args.build else ["build/gpu-check", "build/gpu-bare", "build/cuda"]
        binaries = [os.path.join(b, "bin", "tropd-bench-gpu") for b in builds if os.path.exists(os.path.join(b, "bin", "tropd-bench-gpu"))][:1]
        if not binaries:
            sys.exit("gpu_counts: no bin/tropd-bench-gpu in " + ", ".join(builds) + " (build tropd-cuda-all first)")
    specs = args.kernel or (os.environ["TROPD_COUNT_KERNELS"].split(";") if os.environ.get("TROPD_COUNT_KERNELS") else DEFAULT_KERNELS)
    kernels = []
    for s in specs:
        parts = s.split(":", 3)
        if len(parts) != 4:
            sys.exit(f"gpu_counts: bad kernel spec {s!r} (LABEL:LOGIT_BYTES:INPUT_ROWS:REGEX)")
        kernels.append((parts[0], int(parts[1]), int(parts[2]), re.compile(parts[3])))
    src = Source([c for c in args.cold.split(",") if c])
    unmatched = 0
    summary = []

    for binary in binaries:
        tmp = tempfile.mkdtemp(prefix="tropd-counts-")
        try:
            run([tools["cuobjdump"], "-xelf", "all", os.path.abspath(binary)], cwd=tmp)
            run([tools["cuobjdump"], "-xptx", "all", os.path.abspath(binary)], cwd=tmp)
            cubins = sorted(f for f in os.listdir(tmp) if f.endswith(".cubin"))
            ptxs = sorted(f for f in os.listdir(tmp) if f.endswith(".ptx"))
            res = resource_usage(tools["cuobjdump"], binary)
            archs = sorted({re.search(r"(sm_\d+)", c).group(1) for c in cubins})
            if args.arch:
                archs = [a for a in archs if a in args.arch]
            print(f"== {binary}: SASS for {', '.join(archs) or 'no selected architecture'}; "
                  f"cold functions: {', '.join(src.cold)}; elements per vector-loop iteration "
                  + (f"{args.vectors_per_iter} vectors of 16 bytes" if args.vectors_per_iter else "from each loop's stores or loads"))
            if not archs:
                unmatched += 1
                continue
            for arch in archs:
                funcs = {}
                for c in (c for c in cubins if arch in c):
                    funcs.update(parse_nvdisasm(run([tools["nvdisasm"], "-gi", os.path.join(tmp, c)])))
                names = demangle_all(sorted(funcs))
                if args.list:
                    for mangled in sorted(funcs, key=lambda n: names[n]):
                        r = res.get((arch, mangled), {})
                        print(f"  {arch} REG {r.get('REG', '?'):>3} STACK {r.get('STACK', '?'):>4}  {names[mangled]}")
                    continue
                has_lines = any(x[2] for ins, _ in funcs.values() for x in ins[:50])
                if not has_lines:
                    print(f"  WARNING: {arch}: no line table in the binary (build with TROPD_CUDA_LINEINFO=ON): hot = whole body")
                pinfo = {}
                if tools["ptxas"]:
                    arch_ptx = [os.path.join(tmp, p) for p in ptxs if arch in p]
                    try:
                        pinfo = ptxas_info(tools["ptxas"], arch_ptx, arch) if arch_ptx else {}
                    except subprocess.CalledProcessError as e:
                        print(f"  (ptxas -v failed on the embedded PTX: {e.output.strip()[:200]}; spills from cuobjdump's STACK only)")
                for label, esize, rows, pat in kernels:
                    matches = [n for n in funcs if pat.search(names[n])]
                    if not matches:
                        print(f"  NO MATCH [{arch}] {label}: no kernel name matches /{pat.pattern}/ (see --list)")
                        unmatched += 1
                        continue
                    combine = label.startswith("+")
                    combined = []
                    for n in sorted(matches, key=lambda n: names[n]):
                        ins, labels = funcs[n]
                        r = res.get((arch, n), {})
                        p = pinfo.get(n)
                        regs = r.get("REG", p[0] if p else None)
                        spill = f"{p[1]}/{p[2]}" if p else "n/a"
                        print(f"\n  [{arch}] {label}: {names[n][:160]}")
                        print(f"    registers {regs} (ptxas -v: {p[0] if p else 'n/a'}), stack {r.get('STACK', '?')} B, "
                              f"spill stores/loads {spill} B, {len(ins)} instructions")
                        if p and r and p[0] != r.get("REG"):
                            print("    WARNING: ptxas -v and the binary disagree on registers (another ptxas version?)")
                        loops = [lp for lp in find_loops(ins, labels) if lp[1] - lp[0] + 1 >= args.min_body]
                        vec = []
                        for k, (h, e) in enumerate(loops):
                            a = analyse_loop(ins, h, e, src)
                            outer = a["frames"][-1] if a["frames"] else None
                            where = f"line {outer[1]}: {src.text(*outer)[:70]}" if outer else "?"
                            cold = ", ".join(f"{c} {v}" for c, v in sorted(a["cold"].items())) or "none"
                            if a["vector"]:
                                # Elements per iteration (the compiler may unroll a sweep): a loop that
                                # stores writes one gradient element per element; one that does not
                                # reads the input rows (INPUT_ROWS x the logit size per element).
                                if args.vectors_per_iter > 0:
                                    a["per_iter"] = args.vectors_per_iter * (16 // esize)
                                elif a["written"] > 0:
                                    a["per_iter"] = a["written"] / GRAD_BYTES
                                else:
                                    a["per_iter"] = a["read"] / (rows * esize)
                                a["where"] = outer
                                vec.append(a)
                            else:
                                print(f"    scalar loop [{a['addr'][0]:#x}..{a['addr'][1]:#x}] {where}: body {a['body']}, hot {a['hot']} "
                                      f"(head/tail or per-row work: not counted per element)")
                        # Of the vector loops of one pass (one call site), the one with the most
                        # elements per iteration is its main loop; the others are its remainders.
                        main = {}
                        for a in vec:
                            if a["where"] not in main or a["per_iter"] > main[a["where"]]["per_iter"]:
                                main[a["where"]] = a
                        counted = []
                        for idx, a in enumerate(vec, 1):
                            pi = a["per_iter"]
                            cold = ", ".join(f"{c} {v}" for c, v in sorted(a["cold"].items())) or "none"
                            outer = a["where"]
                            where = f"line {outer[1]}: {src.text(*outer)[:70]}" if outer else "?"
                            is_main = main[a["where"]] is a
                            print(f"    vector loop {idx} [{a['addr'][0]:#x}..{a['addr'][1]:#x}] {where}"
                                  + ("" if is_main else " (a remainder of the pass's main loop: not counted)"))
                            print(f"      body {a['body']} = hot {a['hot']} + cold ({cold}); {pi:g} elements/iteration -> "
                                  f"hot {a['hot'] / pi:.1f}/element (body {a['body'] / pi:.1f}); "
                                  f"MUFU {a['mufu'] / pi:.2f}, fp64 {a['fp64'] / pi:.1f}/element; "
                                  f"reads {a['read'] / pi:.1f} B, writes {a['written'] / pi:.1f} B per element"
                                  + (f"; {a['calls']} calls" if a["calls"] else ""))
                            if is_main:
                                counted.append(a)
                        vec = counted
                        if not vec:
                            print("    WARNING: no vector loop found (no 16-byte global load inside a loop)")
                            continue
                        entry = [{k: v / a["per_iter"] for k, v in a.items() if k in ("hot", "body", "read", "written", "mufu", "fp64")} | {"stores": a["written"] > 0}
                                 for a in vec]
                        if combine:
                            combined.append((regs, spill, entry))
                        else:
                            summary.append((arch, label, esize, rows, regs, spill, entry))
                    if combine and combined:
                        summary.append((arch, label[1:], esize, rows, "/".join(str(c[0]) for c in combined),
                                        " ".join(str(c[1]) for c in combined), [l for c in combined for l in c[2]]))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    if args.list:
        return 0
    if summary:
        print("\n== summary: SASS per element on the hot path of each vector loop (whole body in parentheses); how often each\n"
              "   input row is read and the bytes moved per element by construction (no L2 reuse) against the floor (each input\n"
              "   byte read once, each output byte written once); predicted fraction of the copy bandwidth = floor time / the\n"
              "   binding limit, from 'passes one after the other' to 'passes overlapped' (memory, issue, MUFU, fp64 pipes;\n"
              "   per-row work such as the top-k list evaluation is not in this model)")
        for m in MACHINES:
            print(f"   {m[0]}: {m[1]} SMs x 128 lanes x {m[2]} GHz = {m[1] * 128 * m[2] / 1e3:.1f} T thread-instructions/s; "
                  f"copy {m[3] / 1e12:.1f} TB/s; MUFU 16 and fp64 {m[4]} per clock per SM")
        rows_out = []
        for arch, label, esize, rows, regs, spill, loops in summary:
            variants = [("loss+grad", loops, rows * esize + GRAD_BYTES)]
            if label.startswith("rkl"):
                variants.append(("loss only", [l for l in loops if not l["stores"]], rows * esize))
            for vname, ls, floor in variants:
                hot = sum(l["hot"] for l in ls)
                moved = sum(l["read"] + l["written"] for l in ls)
                reads = sum(l["read"] for l in ls) / (rows * esize)
                preds = []
                for name, sms, ghz, bw, f64 in MACHINES:
                    def times(l):
                        return {"memory": (l["read"] + l["written"]) / bw, "issue": l["hot"] / (sms * 128 * ghz * 1e9),
                                "MUFU": l["mufu"] / (sms * 16 * ghz * 1e9), "fp64": l["fp64"] / (sms * f64 * ghz * 1e9)}
                    per = [times(l) for l in ls]
                    total = {k: sum(t[k] for t in per) for k in per[0]}
                    lim = max(total, key=total.get)
                    serial = sum(max(t.values()) for t in per)  # the passes one after the other
                    lo, hi = (floor / bw) / serial, (floor / bw) / total[lim]
                    preds.append(f"{lo:.2f}-{hi:.2f} {lim}" if f"{lo:.2f}" != f"{hi:.2f}" else f"{hi:.2f} {lim}")
                per_loop = " + ".join(f"{l['hot']:.0f} ({l['body']:.0f})" for l in ls)
                rows_out.append((arch, f"{label} {vname}", regs, spill, per_loop, f"{reads:.0f}x", f"{moved:.0f} / {floor}", *preds))
        hdr = ("arch", "kernel", "regs", "spill st/ld B", "SASS/element hot (body): pass 1 [+ 1b] + 2", "input read",
               "moved / floor B/element", *(f"of copy, {m[0]}" for m in MACHINES))
        widths = [max(len(str(r[i])) for r in rows_out + [hdr]) for i in range(len(hdr))]
        for r in [hdr] + rows_out:
            print("   " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if args.markdown:
            print()
            print("| " + " | ".join(hdr) + " |")
            print("|" + " --- |" * len(hdr))
            for r in rows_out:
                print("| " + " | ".join(str(c) for c in r) + " |")
    if unmatched:
        print(f"\ngpu_counts: {unmatched} pattern(s) matched nothing (kernels renamed? see --list, then --kernel or TROPD_COUNT_KERNELS)")
        return 1
    if not summary:
        print("\ngpu_counts: nothing counted")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
