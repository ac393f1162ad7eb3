"""Two torch.distributed (gloo) processes drive tropd's distributed row level.

Usage: python torch_gloo.py <path to the tropd-dist-shim shared library>

Each process loads the test shim (tests/dist/torch_shim.cpp: a C interface to
tests/dist/cases.hpp) with ctypes and, for every preset and both layouts of two processes
(a tensor group of 2 = vocabulary shards; a data group of 2 = rows), runs the split call
dist::rows_call, performing each exchange it asks for with torch.distributed on a gloo
process group -- exactly the loop the Python package's binding runs (docs/distributed.md):

    while call.next(ex):                      # ex: group, send bytes, recv bytes
        dist.all_gather_into_tensor(recv, send, group=tensor_group or data_group)

then compares the result with the single-process evaluate_rows (computed in each process).
Exit status 0: every case matched in both processes; 77: torch / gloo unavailable (skipped).
"""

import ctypes
import os
import socket
import sys


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def byte_tensor(torch, address, nbytes):
    """A uint8 tensor over memory the C++ call owns (no copy)."""
    buf = (ctypes.c_char * nbytes).from_address(address)
    return torch.frombuffer(buf, dtype=torch.uint8)


def all_gather_bytes(torch, dist, send_ptr, nbytes, recv_ptr, group):
    size = dist.get_world_size(group)
    send = byte_tensor(torch, send_ptr, nbytes)
    recv = byte_tensor(torch, recv_ptr, nbytes * size)
    try:
        dist.all_gather_into_tensor(recv, send, group=group)
    except (RuntimeError, NotImplementedError):
        # Backends without a flat all-gather: the list form, into views of the same buffer.
        dist.all_gather(list(recv.chunk(size)), send, group=group)


def worker(rank, world, port, lib_path, result_path):
    import torch
    import torch.distributed as dist

    warnings_off = os.environ.get("TROPD_TORCH_VERBOSE") is None
    if warnings_off:
        import warnings
        warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    lib = ctypes.CDLL(lib_path)
    lib.tdt_preset_names.restype = ctypes.c_char_p
    lib.tdt_case_new.restype = ctypes.c_void_p
    lib.tdt_case_new.argtypes = [ctypes.c_char_p] + [ctypes.c_int] * 5
    lib.tdt_case_next.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_void_p),
                                  ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_void_p)]
    lib.tdt_case_status.argtypes = [ctypes.c_void_p]
    lib.tdt_case_loss.argtypes = [ctypes.c_void_p]
    lib.tdt_case_loss.restype = ctypes.c_double
    lib.tdt_case_compare.argtypes = [ctypes.c_void_p, ctypes.c_double]
    lib.tdt_case_log.argtypes = [ctypes.c_void_p]
    lib.tdt_case_log.restype = ctypes.c_char_p
    lib.tdt_case_free.argtypes = [ctypes.c_void_p]
    lib.tdt_preset_deterministic.argtypes = [ctypes.c_char_p]

    world_group = dist.group.WORLD
    presets = lib.tdt_preset_names().decode().split(",")
    failures, cases, log = 0, 0, []
    # (tensor size, data size): two vocabulary shards of the same rows; two halves of the rows.
    for tp, dp in ((2, 1), (1, 2)):
        t, d = rank % tp, rank // tp
        tensor_group = world_group if tp == 2 else None
        data_group = world_group if dp == 2 else None
        variants = [0, 1 | 8]  # plain; odd shards (widths 1 and 40) with rollout-time log-probs
        for preset in presets:
            vs = list(variants)
            if dp == 2 and lib.tdt_preset_deterministic(preset.encode()):
                vs.append(2)  # sequences split across the two data ranks
            if preset in ("opd", "tropd", "tropd_p_tail", "reopold_2"):
                vs.append(4)  # a served teacher (log-probs and top-k lists)
            if preset in ("tropd", "gkd"):
                vs += [16, 32, 64]  # fp64 logits; NaN under mask; NaN under reject
            for flags in vs:
                c = lib.tdt_case_new(preset.encode(), t, tp, d, dp, flags)
                if not c:
                    failures += 1
                    log.append(f"unknown preset {preset}")
                    continue
                group, send, nbytes, recv = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_size_t(), ctypes.c_void_p()
                while lib.tdt_case_next(c, ctypes.byref(group), ctypes.byref(send), ctypes.byref(nbytes), ctypes.byref(recv)):
                    g = tensor_group if group.value == 0 else data_group
                    all_gather_bytes(torch, dist, send.value, nbytes.value, recv.value, g)
                loss = lib.tdt_case_loss(c) if lib.tdt_case_status(c) == 0 else 0.0
                if data_group is not None:
                    x = torch.tensor([loss], dtype=torch.float64)
                    dist.all_reduce(x, group=data_group)
                    loss = float(x[0])
                bad = lib.tdt_case_compare(c, loss)
                cases += 1
                if bad:
                    failures += 1
                    log.append(f"rank {rank} FAIL {preset} (tp {t}/{tp}, dp {d}/{dp}, flags {flags}):\n"
                               + lib.tdt_case_log(c).decode())
                lib.tdt_case_free(c)
    with open(f"{result_path}.{rank}", "w") as f:
        f.write(f"{failures} {cases}\n" + "".join(x if x.endswith("\n") else x + "\n" for x in log))
    dist.barrier()
    dist.destroy_process_group()


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    try:
        import torch
        import torch.distributed as dist
        import torch.multiprocessing as mp
    except ImportError as e:
        print(f"torch is not importable ({e}): skipped")
        return 77
    if not dist.is_available() or not dist.is_gloo_available():
        print("torch.distributed with gloo is not available: skipped")
        return 77
    lib_path = os.path.abspath(sys.argv[1])
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result")
        world = 2
        mp.spawn(worker, args=(world, free_port(), lib_path, result_path), nprocs=world, join=True)
        total_fail, total_cases = 0, 0
        for r in range(world):
            with open(f"{result_path}.{r}") as f:
                head, *rest = f.read().splitlines()
                fails, cases = map(int, head.split())
                total_fail += fails
                total_cases += cases
                for line in rest:
                    print(line)
    print(f"torch.distributed gloo, 2 processes: {total_cases} case runs, {total_fail} failed")
    return 0 if total_fail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
