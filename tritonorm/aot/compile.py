"""Compile recorded variants ahead of time for sm_90a on a machine without a GPU, and judge them.

For each variant (a kernel and its arguments as recorded, see variants.py):
  1. Triton's own binder specializes the arguments (mock tensors carry the dtype and the
     pointer's alignment), exactly as ``JITFunction.run`` would before compiling;
  2. ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` lowers it to PTX
     for sm_90a (no driver needed);
  3. the bundled ``ptxas -v`` (with the flags Triton's own cubin step uses) reports registers
     and spill bytes;
  4. the PTX is scanned for global loads and stores; each one's address is traced back to the
     kernel parameter it is based on, so the width of every access to each tensor is known.

A tensor is *bulk* when it has as many elements as the largest tensor of the launch (x, y, dy,
dx, residual); a bulk tensor is *streamed* by a kernel when each thread moves at least 4 of its
elements (pivot reads of a few elements per row do not count). The figure of merit is the
widest access to each streamed bulk tensor: 16 bytes means 128-bit vector accesses on the
unit-stride side, less means the tile is moved in scalar (or 8-byte) pieces.

Compiling needs Triton's compiled kernels, not the interpreter's, so ``compile_all`` runs the
work in child processes with ``TRITON_INTERPRET`` cleared; results are cached on disk, keyed by
the kernel's source hash (Triton's ``cache_key``, which covers the helpers it calls), the
specialization, the options, the target and the Triton version.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ARCH = 90
MIN_STREAM_ELEMENTS = 4
RESULT_VERSION = 1  # bump when the analysis changes, so cached results are recomputed


def cache_root() -> Path:
    from ..tuning.cache import cache_dir

    return cache_dir() / "sm90"


# -- worker side (a process where triton.jit makes JITFunctions) --------------------------------

class _MockTensor:
    """What the binder needs of a tensor: its dtype and a data pointer with the recorded
    alignment (0 for 16-byte aligned)."""

    def __init__(self, dtype, ptr_mod16: int):
        self.dtype = dtype
        self._ptr = ptr_mod16 or 0

    def data_ptr(self) -> int:
        return 1 << 20 | self._ptr  # any address with that residue modulo 16


def _kernel(qualname: str):
    module, name = qualname.split(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    from triton.runtime.jit import JITFunction

    if not isinstance(obj, JITFunction):
        raise RuntimeError(f"{qualname} is a {type(obj).__name__}, not a JITFunction: compile "
                           "in a process without TRITON_INTERPRET=1")
    return obj


def _value(a: dict, torch):
    """The Python value an argument description stands for (tensors: an aligned mock)."""
    if a["kind"] == "tensor":
        return _MockTensor(getattr(torch, a["dtype"]), a["ptr_mod16"])
    if a["kind"] == "tuple":
        return tuple(_value(e, torch) for e in a["value"])
    return a.get("value")


def _bind(fn, variant: dict, backend):
    """(options, signature, constexprs, attrs) as JITFunction.run computes them."""
    import torch
    from triton.runtime.jit import create_function_from_signature

    # By name: a launch may leave a defaulted parameter out (DH=None) and pass later ones.
    kw = {name: _value(a, torch) for name, a in variant["args"].items()}
    kw.update(variant.get("options", {}))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**kw)
    if hasattr(fn, "_pack_args"):
        return fn._pack_args(backend, kw, bound, specialization, options)
    # Triton versions without _pack_args inline the same steps in JITFunction.run (flat
    # argument lists only, which is all these kernels take).
    names = [p.name for p in fn.params]
    values = list(bound.values())
    signature = {n: spec[0] for n, spec in zip(names, specialization)}
    constexprs = {(i,): values[i] for i, spec in enumerate(specialization) if spec[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(spec[1]) for i, spec in enumerate(specialization)
             if spec[0] != "constexpr" and isinstance(spec[1], str)}
    return backend.parse_options(kw), signature, constexprs, attrs


def _ptxas_path() -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(ARCH).path
    except Exception:  # older layouts of the nvidia backend
        import triton

        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def ptxas_available() -> str | None:
    """Why ptxas cannot run here, or None."""
    try:
        path = _ptxas_path()
    except Exception as exc:
        return f"no ptxas: {exc}"
    if not os.path.exists(path):
        return f"ptxas not found at {path}"
    try:
        subprocess.run([path, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as exc:
        return f"ptxas does not run: {exc}"
    return None


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_STACK = re.compile(r"(\d+) bytes stack frame")


def run_ptxas(ptx: str, fp_fusion: bool = True) -> dict:
    """Registers, spill bytes and stack frame of the PTX's kernel for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_ptxas_path(), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{ARCH}a",
               src, "-o", os.path.join(tmp, "k.cubin")]
        if not fp_fusion:
            cmd.insert(2, "--fmad=false")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed ({out.returncode}): {log[-2000:]}")
    regs = _RE_REGS.search(log)
    spill = _RE_SPILL.search(log)
    stack = _RE_STACK.search(log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else 0,
            "spill_load_bytes": int(spill.group(2)) if spill else 0,
            "stack_bytes": int(stack.group(1)) if stack else 0}


# -- PTX access analysis ------------------------------------------------------------------------

_RE_PARAM = re.compile(r"ld\.param\.\w+\s+(%\w+),\s*\[(\w+?)_param_(\d+)\]")
_RE_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)\s")
_RE_REG = re.compile(r"%[a-z]+\d+")
_BITS = {"8": 8, "16": 16, "32": 32, "64": 64, "128": 128}


def _width(suffixes: str) -> tuple[int, int]:
    """(bytes, elements) of one ld/st from its suffixes, e.g. '.v4.b32' -> (16, 4)."""
    vec, bits = 1, 32
    for part in suffixes.split(".")[1:]:
        if part.startswith("v") and part[1:].isdigit():
            vec = int(part[1:])
        m = re.fullmatch(r"[bsuf](8|16|32|64|128)", part)
        if m:
            bits = _BITS[m.group(1)]
    return vec * bits // 8, vec


def ptx_accesses(ptx: str) -> list[dict]:
    """Global loads and stores of the PTX: kind, bytes, elements (per instruction, per thread),
    and the parameter indices their address is computed from."""
    defs: dict[str, list[list[str]]] = {}
    params: dict[str, int] = {}
    accesses = []
    for raw in ptx.splitlines():
        line = raw.split("//")[0].strip()
        if not line or line.startswith("."):
            continue
        m = _RE_PARAM.search(line)
        if m:
            params[m.group(1)] = int(m.group(3))
            continue
        a = _RE_ACCESS.search(line)
        if a:
            addr = re.search(r"\[\s*(%\w+)", line)
            nbytes, elems = _width(a.group(2))
            accesses.append({"kind": a.group(1), "bytes": nbytes, "elements": elems,
                             "addr": addr.group(1) if addr else None})
            if a.group(1) == "ld":  # defines data registers only: no address flows through them
                continue
        body = re.sub(r"^@!?%\w+\s+", "", line).rstrip(";")
        regs = _RE_REG.findall(body)
        if len(regs) >= 1 and " " in body:
            dst, srcs = regs[0], regs[1:]
            defs.setdefault(dst, []).append(srcs)
    cache: dict[str, frozenset] = {}

    def bases(reg: str) -> frozenset:
        if reg in cache:
            return cache[reg]
        found, seen, stack = set(), set(), [reg]
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            if r in params:
                found.add(params[r])
                continue
            for srcs in defs.get(r, ()):
                stack.extend(s for s in srcs if s.startswith("%rd"))
        cache[reg] = frozenset(found)
        return cache[reg]

    for acc in accesses:
        acc["params"] = sorted(bases(acc.pop("addr"))) if acc.get("addr") else []
    return accesses


def judge_accesses(accesses: list[dict], signature: dict, args: dict) -> dict:
    """Per streamed bulk tensor: widest load/store in bytes; and the variant's worst of those."""
    runtime = [n for n, t in signature.items() if t != "constexpr"]
    tensors = {n: a for n, a in args.items() if a["kind"] == "tensor"}
    numel = {n: _prod(a["shape"]) for n, a in tensors.items()}
    big = max(numel.values(), default=0)
    bulk = {n for n, k in numel.items() if k == big}
    per: dict[str, dict] = {}
    for acc in accesses:
        names = [runtime[i] for i in acc["params"] if i < len(runtime)]
        ptrs = [n for n in names if n in tensors]
        if len(ptrs) != 1:
            continue
        name = ptrs[0]
        d = per.setdefault(name, {"ld": [0, 0], "st": [0, 0]})  # [max bytes, elements]
        d[acc["kind"]][0] = max(d[acc["kind"]][0], acc["bytes"])
        d[acc["kind"]][1] += acc["elements"]
    tensors_out, worst = {}, {"ld": None, "st": None}
    for name, d in sorted(per.items()):
        entry = {}
        for kind in ("ld", "st"):
            width, elems = d[kind]
            if elems:
                entry[kind] = width
                if name in bulk and elems >= MIN_STREAM_ELEMENTS:
                    worst[kind] = width if worst[kind] is None else min(worst[kind], width)
        entry["bulk"] = name in bulk
        tensors_out[name] = entry
    return {"tensors": tensors_out, "load_bytes": worst["ld"], "store_bytes": worst["st"]}


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def compile_one(variant: dict, cache: Path | None = None, keep_ptx: Path | None = None) -> dict:
    """Compile one variant (a Variant.to_json()) for sm_90a; the result dict (cached)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", ARCH, 32)
    backend = make_backend(target)
    fn = _kernel(variant["kernel"])
    options, signature, constexprs, attrs = _bind(fn, variant, backend)
    ident = json.dumps([RESULT_VERSION, triton.__version__, fn.cache_key, ARCH, signature,
                        sorted((str(k), repr(v)) for k, v in constexprs.items()),
                        sorted((str(k), repr(v)) for k, v in attrs.items()),
                        sorted((k, repr(v)) for k, v in options.__dict__.items())], default=str)
    key = hashlib.sha256(ident.encode()).hexdigest()[:32]
    path = cache / f"{key}.json" if cache is not None else None
    if path is not None and path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass  # a torn write: compile again
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    ptx = compiled.asm["ptx"]
    if keep_ptx is not None:
        keep_ptx.mkdir(parents=True, exist_ok=True)
        (keep_ptx / f"{key}.ptx").write_text(ptx)
    result = {"key": key, "kernel": variant["kernel"], "num_warps": options.num_warps,
              "num_stages": options.num_stages,
              **run_ptxas(ptx, getattr(options, "enable_fp_fusion", True)),
              **judge_accesses(ptx_accesses(ptx), signature, variant["args"])}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
    return result


def _worker(argv) -> int:
    """Child process: compile the variants of a JSON file, write results as JSON lines."""
    src, dst, cache = argv[:3]
    keep = Path(argv[3]) if len(argv) > 3 and argv[3] else None
    variants = json.loads(Path(src).read_text())
    with open(dst, "w") as out:
        for i, v in enumerate(variants):
            try:
                r = compile_one(v, Path(cache) if cache else None, keep)
            except Exception as exc:  # one failing variant must not hide the others
                r = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
            out.write(json.dumps({"index": i, **r}) + "\n")
            out.flush()
    return 0


# -- parent side --------------------------------------------------------------------------------

def compile_all(variants: list[dict], jobs: int = 1, cache: Path | None = None,
                keep_ptx: Path | None = None, progress=None) -> list[dict]:
    """Compile every variant in ``jobs`` child processes; results in the variants' order."""
    if not variants:
        return []
    cache = cache_root() if cache is None else cache
    jobs = max(1, min(jobs, len(variants)))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    results: list = [None] * len(variants)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for j in range(jobs):
            idx = list(range(j, len(variants), jobs))
            src, dst = os.path.join(tmp, f"in{j}.json"), os.path.join(tmp, f"out{j}.jsonl")
            Path(src).write_text(json.dumps([variants[i] for i in idx]))
            cmd = [sys.executable, "-m", "tritonorm.aot.compile", src, dst, str(cache),
                   str(keep_ptx or "")]
            procs.append((idx, dst, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True)))
        for idx, dst, proc in procs:
            log, _ = proc.communicate()
            lines = Path(dst).read_text().splitlines() if os.path.exists(dst) else []
            for line in lines:
                r = json.loads(line)
                results[idx[r.pop("index")]] = r
            for i in idx:
                if results[i] is None:
                    results[i] = {"error": f"worker exited {proc.returncode}: {log[-2000:]}"}
    return results


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
