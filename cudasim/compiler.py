"""CUDA C++ source -> a shared library the host C++ compiler builds, cached on disk, loaded with ctypes.

A module is compiled from the unmodified source with `runtime/cudasim.h` force-included (the CUDA built-ins), its
inline PTX rewritten into calls of the emulated instructions (`rewrite_inline_ptx`), and a generated trailer that
gives every `__global__` function an entry point taking its arguments as `void**` plus its parameter signature.
Compiled once per (source, options, runtime, compiler) into the cache folder (CUDASIM_CACHE, default
build/cudasim-cache beside this package).
"""

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile

RUNTIME = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime")
CACHE = os.environ.get("CUDASIM_CACHE") or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                        "build", "cudasim-cache")
CXX = os.environ.get("CXX", "g++")
# -ffp-contract=off: a * b + c is never fused (only explicit fmaf is); NVRTC's default --fmad=true may fuse, see
# docs/gpu.md. -fno-fast-math keeps IEEE semantics; -march=native gives the CPU's fma instruction to fmaf.
CXXFLAGS = ("-std=gnu++17", "-O2", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-g",
            "-Wno-unknown-pragmas", "-Wno-attributes")
MMA_BF16 = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"


class CompileError(RuntimeError):
    """The host compiler rejected a module (its message is included), or an option is not understood."""


def _compiler_id():
    try:
        return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise CompileError(f"cudasim needs a host C++ compiler ({CXX}): {e}") from None


def _runtime_text():
    return "".join(open(os.path.join(RUNTIME, f)).read() for f in sorted(os.listdir(RUNTIME)))


def _build(name, sources_text, command_tail, key_extra=""):
    """Compile (once) into CACHE/<name>-<hash>.so; -> its path."""
    key = hashlib.sha256("\0".join([sources_text, _runtime_text(), _compiler_id(), " ".join(CXXFLAGS),
                                    key_extra]).encode()).hexdigest()[:20]
    os.makedirs(CACHE, exist_ok=True)
    target = os.path.join(CACHE, f"{name}-{key}.so")
    if os.path.exists(target):
        return target
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        out = os.path.join(tmp, "out.so")
        cmd = [CXX, *CXXFLAGS, *command_tail(tmp), "-o", out]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise CompileError(f"{CXX} failed compiling {name}:\n{done.stderr.strip()}")
        os.replace(out, target)  # atomic: another process may build the same module at the same time
    return target


_core = None


def core():
    """The runtime's core library (scheduler, fibers, device memory), loaded once with RTLD_GLOBAL."""
    global _core
    if _core is None:
        source = os.path.join(RUNTIME, "core.cpp")
        path = _build("core", open(source).read(), lambda tmp: [f"-I{RUNTIME}", source])
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        lib.cudasim_launch.restype = ctypes.c_int
        lib.cudasim_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p,
                                       ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                       ctypes.POINTER(ctypes.c_uint), ctypes.c_ulonglong, ctypes.c_void_p,
                                       ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.cudasim_malloc.restype = ctypes.c_void_p
        lib.cudasim_malloc.argtypes = [ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                                       ctypes.POINTER(ctypes.c_size_t)]
        lib.cudasim_free.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
        lib.cudasim_free.restype = None
        _core = lib
    return _core


def source_line(code):
    """ "library+0xoffset" -> ", at <file>:<line> (<function>)" by addr2line, or "" when it cannot say."""
    library, _, offset = code.rpartition("+")
    try:
        done = subprocess.run(["addr2line", "-f", "-C", "-i", "-e", library, offset], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = done.stdout.split("\n")
    if len(lines) < 2 or lines[1].startswith("??"):
        return ""
    return f", at {os.path.basename(lines[1].split(' ')[0])} in {lines[0]}"


# ---------------------------------------------------------------------------------------------- options

def host_options(options):
    """NVRTC options -> host compiler flags (include paths, defines); an option that would change what the
    kernels compute and that cudasim cannot honour is an error naming it."""
    flags = []
    ignored = re.compile(r"^(-ftz=true|--ftz=true|-arch=.*|--gpu-architecture=.*|-lineinfo|--device-debug|-G|"
                         r"--fmad=true|-fmad=true|--std=c\+\+1[47]|-std=c\+\+1[47]|--std=c\+\+17|-std=c\+\+17)$")
    for option in options:
        if option.startswith("-I") and len(option) > 2:
            flags.append(option)
        elif option.startswith("--include-path="):
            flags.append("-I" + option.split("=", 1)[1])
        elif option.startswith(("-D", "--define-macro=")):
            flags.append("-D" + option.split("=", 1)[1] if option.startswith("--") else option)
        elif ignored.match(option):
            continue
        else:
            raise CompileError(f"NVRTC option {option!r} is not supported by cudasim")
    return flags


# --------------------------------------------------------------------------------------------- inline PTX

def _matching_paren(text, start):
    # text[start] == "(" -> index of its ")" (string literals skipped)
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == '"':
            i += 1
            while text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise CompileError("unbalanced parentheses in an asm statement")


def _split_top(text, sep):
    parts, depth, cur, i = [], 0, [], 0
    while i < len(text):
        c = text[i]
        if c == '"':
            j = i + 1
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            cur.append(text[i:j + 1])
            i = j + 1
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _operands(part):
    # '"+f"(c[0]), "r"(a)' -> [(constraint, expression)]
    found = []
    for item in _split_top(part, ","):
        item = item.strip()
        if item:
            m = re.match(r'"([^"]*)"\s*\((.*)\)$', item, re.S)
            if not m:
                raise CompileError(f"cannot read the asm operand {item!r}")
            found.append((m.group(1), m.group(2).strip()))
    return found


def _emulated_call(template, operands):
    """An inline PTX statement -> the C++ that emulates it, or a call that fails naming the instruction."""
    instruction = template.strip().rstrip(";").strip()
    opcode = instruction.split(None, 1)[0] if instruction else "<empty>"
    if opcode == MMA_BF16:
        groups = [[int(n) for n in re.findall(r"%(\d+)", g)] for g in re.findall(r"\{([^}]*)\}", instruction)]
        if [len(g) for g in groups] == [4, 4, 2, 4]:
            d, a, b, c = ([operands[n][1] for n in g] for g in groups)
            return f"cudasim::mma_m16n8k16_bf16(__LINE__, {', '.join(d + a + b + c)});"
    m = re.fullmatch(r"ldmatrix\.sync\.aligned\.m8n8\.x([124])(\.trans)?\.shared(::cta)?\.b16", opcode)
    if m:
        count, trans = int(m.group(1)), int(bool(m.group(2)))
        dests = [int(n) for n in re.findall(r"%(\d+)", re.search(r"\{([^}]*)\}", instruction).group(1))]
        address = re.search(r"\[\s*%(\d+)\s*\]", instruction)
        if len(dests) == count and address:
            stores = " ".join(f"{operands[n][1]} = cudasim_ld[{j}];" for j, n in enumerate(dests))
            return (f"{{ unsigned cudasim_ld[4]; cudasim::ldmatrix(__LINE__, {count}, {trans}, "
                    f"(unsigned)({operands[int(address.group(1))][1]}), cudasim_ld); {stores} }}")
    return f'cudasim_fail(__LINE__, "unsupported inline PTX under cudasim: {opcode}");'


def rewrite_inline_ptx(source):
    """Every `asm [volatile] (...)` statement replaced by its emulation, keeping the line count (so error messages
    name the source's own lines)."""
    out, pos = [], 0
    for m in re.finditer(r"\b(?:asm|__asm__)\s*(?:volatile|__volatile__)?\s*\(", source):
        if m.start() < pos:
            continue
        close = _matching_paren(source, m.end() - 1)
        end = close + 1
        if end < len(source) and source[end] == ";":
            end += 1
        parts = _split_top(source[m.end():close], ":")
        template = "".join(bytes(s, "utf-8").decode("unicode_escape") for s in re.findall(r'"((?:[^"\\]|\\.)*)"',
                                                                                         parts[0]))
        operands = (_operands(parts[1]) if len(parts) > 1 else []) + (_operands(parts[2]) if len(parts) > 2 else [])
        out.append(source[pos:m.start()])
        out.append(_emulated_call(template, operands) + "\n" * source[m.start():end].count("\n"))
        pos = end
    out.append(source[pos:])
    return "".join(out)


# ----------------------------------------------------------------------------------------------- modules

_TRAILER_HEAD = r"""
#include <string>
namespace cudasim_entry {
template <typename T> std::string code() {
    using U = typename std::remove_cv<T>::type;
    if (std::is_pointer<U>::value) return "p";
    if (std::is_same<U, bool>::value) return "b1";
    if (std::is_floating_point<U>::value) return "f" + std::to_string(sizeof(U));
    if (std::is_integral<U>::value) return (std::is_signed<U>::value ? "i" : "u") + std::to_string(sizeof(U));
    return "?";
}
template <typename... A, std::size_t... I> void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<typename std::remove_cv<A>::type*>(args[I])...);
}
template <typename... A> void invoke(void (*f)(A...), void** args) { call(f, args, std::index_sequence_for<A...>{}); }
template <typename... A> const char* signature(void (*)(A...)) {
    static const std::string s = (std::string() + ... + (code<A>() + ","));
    return s.c_str();
}
}  // namespace cudasim_entry
extern "C" void cudasim_module_anchor() {}
"""


def shared_variables(library):
    """-> [(offset from the load base, size)] of the module's function-local statics: its __shared__ memory."""
    done = subprocess.run(["nm", "-S", "--defined-only", library], capture_output=True, text=True, check=True)
    found, anchor = [], None
    for line in done.stdout.splitlines():
        parts = line.split()
        if parts and parts[-1] == "cudasim_module_anchor":
            anchor = int(parts[0], 16)
        if len(parts) == 4 and parts[2] in "bBdDuV" and parts[3].startswith("_ZZ") and "cudasim_entry" not in parts[3]:
            found.append((int(parts[0], 16), int(parts[1], 16)))
    return anchor, found


def kernel_names(source, flags):
    """The __global__ functions of a source, found by preprocessing it with __global__ left as a marker."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scan.cu")
        with open(path, "w") as f:
            f.write(source)
        done = subprocess.run([CXX, "-E", "-x", "c++", "-std=gnu++17", "-DCUDASIM_SCAN", f"-I{RUNTIME}", "-include",
                               "cudasim.h", *flags, path], capture_output=True, text=True)
    if done.returncode != 0:
        raise CompileError(f"{CXX} -E failed:\n{done.stderr.strip()}")
    return sorted(set(re.findall(r"\bcudasim_global_marker\b[^;{()]*?\bvoid\s+(\w+)\s*\(", done.stdout)))


def build_module(source, options):
    """-> (path of the compiled library, kernel names)."""
    flags = host_options(options)
    rewritten = rewrite_inline_ptx(source)
    names = kernel_names(rewritten, flags)
    trailer = _TRAILER_HEAD + "".join(
        f'extern "C" void cudasim_entry_{n}(void** a) {{ cudasim_entry::invoke(&{n}, a); }}\n'
        f'extern "C" const char* cudasim_signature_{n}() {{ return cudasim_entry::signature(&{n}); }}\n'
        for n in names)

    def command(tmp):
        kernel = os.path.join(tmp, "kernel.cu")
        with open(kernel, "w") as f:
            f.write(rewritten)
        main = os.path.join(tmp, "module.cpp")
        with open(main, "w") as f:
            f.write(f'#include "{kernel}"\n{trailer}')
        return [f"-I{RUNTIME}", "-include", "cudasim.h", *flags, main]

    return _build("module", rewritten + trailer, command, key_extra=" ".join(flags)), names
