// cudasim core: runs one CUDA kernel launch on the CPU, one fiber per CUDA thread.
//
// Blocks run one after another (in the order the launch asks for); inside a block every thread is a fiber with
// its own small stack, and a fiber gives the CPU back only where CUDA threads meet: __syncthreads (the block
// barrier) and the warp collectives (__shfl*_sync, votes, __syncwarp, mma.sync). A collective is resolved when
// the last lane its mask names arrives; a barrier when every thread of the block waits at it. Anything else
// (threads at different barriers, a lane that exits while others wait for it, a mask without the calling lane,
// a fault) ends the launch with an error that names the kernel, the source line and the threads.
//
// Built once per machine by cudasim/compiler.py and loaded with RTLD_GLOBAL; kernel modules (compiled with
// cudasim.h) call into it.

#include <csetjmp>
#include <dlfcn.h>
#include <ucontext.h>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

#include "cudasim_abi.h"

// ------------------------------------------------------------------------------------------------ fibers
// x86-64 System V: save the callee-saved registers on the old stack, switch rsp. MXCSR and the x87 control word are
// not switched: every fiber of a launch runs with the launch's (flush-to-zero set once in cudasim_launch).
extern "C" void cudasim_switch(void** save_sp, void* new_sp);
extern "C" void cudasim_fiber_start();
asm(R"(
    .text
    .globl cudasim_switch
    .type cudasim_switch,@function
cudasim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cudasim_switch, .-cudasim_switch

    .globl cudasim_fiber_start
    .type cudasim_fiber_start,@function
cudasim_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size cudasim_fiber_start, .-cudasim_fiber_start
)");

namespace {

const size_t STACK_BYTES = 128 * 1024;  // per CUDA thread; a guard page below each
const unsigned FTZ_MXCSR = 0x1F80u | 0x8000u | 0x0040u;  // all exceptions masked, flush-to-zero, denormals-are-zero

enum State { RUNNABLE, AT_BARRIER, AT_WARP, DONE };

struct Fiber {
    cudasim_thread t;  // first member: cudasim_cur points here
    void* sp;
    char* stack;  // usable bytes [stack, stack + STACK_BYTES)
    int state, linear, lane, warp;
    int line;                // where it waits
    const char* what;        // what it waits at
    int op, pred, arg, width;
    unsigned mask;
    uint64_t value, result;
    const float* mma_in;     // 10 words: a0..a3, b0, b1 (bits), c0..c3 (floats)
    float mma_out[4];
    const void* ld_row;      // ldmatrix: the 16-byte row this lane addresses
    unsigned ld_out[4];
};

struct Warp {
    unsigned waiting = 0, exited = 0;
};

struct Launch {
    void (*entry)(void**);
    void** args;
    const char* kernel;
    unsigned block_threads;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    void* scheduler_sp;
    char* error;
    int error_len;
    bool failed;
};

Launch* L = nullptr;
sigjmp_buf fault_env;
volatile sig_atomic_t in_launch = 0;
char* stack_pool = nullptr;
size_t stack_pool_threads = 0;
const size_t PAGE = 4096;
struct sigaction old_segv, old_bus;

void set_error(const char* fmt, ...) {
    if (L->failed) return;
    L->failed = true;
    int n = snprintf(L->error, L->error_len, "kernel %s: ", L->kernel);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(L->error + n, L->error_len - n, fmt, ap);
    va_end(ap);
}

Fiber* current() { return reinterpret_cast<Fiber*>(cudasim_cur); }

void describe_thread(const Fiber& f, char* buf, size_t n) {
    snprintf(buf, n, "thread (%u,%u,%u) of block (%u,%u,%u) [warp %d, lane %d]", f.t.threadIdx.x, f.t.threadIdx.y,
             f.t.threadIdx.z, cudasim_blockIdx.x, cudasim_blockIdx.y, cudasim_blockIdx.z, f.warp, f.lane);
}

// Gives the CPU to the next runnable fiber of the block (or back to the scheduler when there is none after this
// one); returns when this fiber is resumed.
void yield_to_scheduler() {
    Fiber* f = current();
    if (!L->failed) {
        for (size_t i = f->linear + 1; i < L->fibers.size(); ++i) {
            Fiber& next = L->fibers[i];
            if (next.state == RUNNABLE) {
                cudasim_cur = &next.t;
                cudasim_switch(&f->sp, next.sp);
                return;
            }
        }
    }
    cudasim_switch(&f->sp, L->scheduler_sp);
}

[[noreturn]] void fail_here(const char* fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    char who[160];
    describe_thread(*current(), who, sizeof who);
    set_error("%s (%s)", msg, who);
    current()->state = DONE;
    for (;;) yield_to_scheduler();  // the scheduler sees `failed` and never resumes it
}

extern "C" void fiber_main(Fiber* f) {
    L->entry(L->args);
    f->state = DONE;
    Warp& w = L->warps[f->warp];
    const unsigned bit = 1u << f->lane;
    w.exited |= bit;
    // A lane waiting in a collective whose mask names this lane would wait forever.
    for (unsigned lane = 0; lane < 32 && !L->failed; ++lane) {
        if (!(w.waiting >> lane & 1u)) continue;
        const Fiber& o = L->fibers[f->warp * 32 + lane];
        if (o.mask & bit) {
            char who[160];
            describe_thread(o, who, sizeof who);
            set_error("%s at line %d waits for lane %d (mask 0x%08x), which exited without reaching it (%s)",
                      o.what, o.line, f->lane, o.mask, who);
        }
    }
    for (;;) yield_to_scheduler();
}

// ---------------------------------------------------------------------------------------- warp collectives

// The lane a shuffle reads (its own when the source falls outside its width-lane segment, as CUDA defines).
int shuffle_source(const Fiber& f) {
    const int width = f.width;
    const int seg = f.lane & ~(width - 1);
    int src = f.lane;
    switch (f.op) {
        case CUDASIM_SHFL_IDX: src = seg + (f.arg & (width - 1)); break;
        case CUDASIM_SHFL_UP: src = f.lane - f.arg < seg ? f.lane : f.lane - f.arg; break;
        case CUDASIM_SHFL_DOWN: src = f.lane + f.arg >= seg + width ? f.lane : f.lane + f.arg; break;
        case CUDASIM_SHFL_XOR: src = f.lane ^ f.arg; if (src >= seg + width || src < seg) src = f.lane; break;
    }
    return src;
}

void mma_m16n8k16_bf16(Fiber* lanes) {
    // PTX ISA, mma.m16n8k16 with .bf16 A/B and .f32 C/D. groupID g = lane >> 2, threadID_in_group t = lane & 3.
    // A 16x16 (row): a_i (i = 0..7, two per 32-bit register, the lower half first) is row g + 8 * ((i >> 1) & 1),
    //   column 2t + (i & 1) + 8 * (i >> 2).
    // B 16x8 (col): b_i (i = 0..3) is row (k) 2t + (i & 1) + 8 * (i >> 1), column g.
    // C, D 16x8: c_i (i = 0..3) is row g + 8 * (i >> 1), column 2t + (i & 1).
    float A[16][16], B[16][8], C[16][8];
    auto bf16 = [](uint32_t bits) { uint32_t u = bits << 16; float f; memcpy(&f, &u, 4); return f; };
    for (int lane = 0; lane < 32; ++lane) {
        const float* in = lanes[lane].mma_in;
        uint32_t a[4], b[2];
        memcpy(a, in, 16);
        memcpy(b, in + 4, 8);
        const int g = lane >> 2, t = lane & 3;
        for (int i = 0; i < 8; ++i) {
            const uint32_t reg = a[i >> 1];
            const uint32_t half = (i & 1) ? reg >> 16 : reg & 0xffffu;
            A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] = bf16(half);
        }
        for (int i = 0; i < 4; ++i) {
            const uint32_t reg = b[i >> 1];
            const uint32_t half = (i & 1) ? reg >> 16 : reg & 0xffffu;
            B[2 * t + (i & 1) + 8 * (i >> 1)][g] = bf16(half);
        }
        for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = in[6 + i];
    }
    // Products of two bf16 are exact in float32; their sum is formed in double and rounded to float32 once with
    // C added (the tensor cores' internal order and rounding are not documented, see docs/gpu.md).
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        for (int i = 0; i < 4; ++i) {
            const int m = g + 8 * (i >> 1), n = 2 * t + (i & 1);
            double s = C[m][n];
            for (int k = 0; k < 16; ++k) s += static_cast<double>(A[m][k]) * static_cast<double>(B[k][n]);
            lanes[lane].mma_out[i] = static_cast<float>(s);
        }
    }
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 (PTX ISA): lanes 8j..8j+7 address the rows of matrix j;
// lane L receives, in register j, matrix j's elements (row L / 4, columns 2 (L % 4) and + 1), lower half first;
// .trans gives the transposed matrix's.
void ldmatrix(Fiber* lanes, int count, bool trans) {
    for (int lane = 0; lane < 32; ++lane) {
        const int r = lane / 4, c = 2 * (lane % 4);
        for (int j = 0; j < count; ++j) {
            auto at = [&](int row, int col) {
                uint16_t v;
                memcpy(&v, static_cast<const char*>(lanes[8 * j + row].ld_row) + 2 * col, 2);
                return static_cast<unsigned>(v);
            };
            const unsigned lo = trans ? at(c, r) : at(r, c), hi = trans ? at(c + 1, r) : at(r, c + 1);
            lanes[lane].ld_out[j] = lo | (hi << 16);
        }
    }
}

void resolve(int warp, unsigned mask) {
    Fiber* lanes = &L->fibers[warp * 32];
    Warp& w = L->warps[warp];
    Fiber* first = nullptr;
    for (int lane = 0; lane < 32; ++lane) {
        if (!(mask >> lane & 1u)) continue;
        Fiber& f = lanes[lane];
        if (!first) first = &f;
        if (f.mask != mask || f.op != first->op) {
            fail_here("%s at line %d (mask 0x%08x) meets %s at line %d (mask 0x%08x) in lane %d: the lanes a mask "
                      "names must all call the same collective with the same mask", first->what, first->line,
                      first->mask, f.what, f.line, f.mask, lane);
        }
    }
    const int op = first->op;
    if (op == CUDASIM_MMA) {
        if (mask != 0xffffffffu) fail_here("mma.sync at line %d needs all 32 lanes", first->line);
        mma_m16n8k16_bf16(lanes);
    } else if (op == CUDASIM_LDMATRIX) {
        if (mask != 0xffffffffu) fail_here("ldmatrix at line %d needs all 32 lanes", first->line);
        ldmatrix(lanes, first->arg & 0xff, (first->arg & 0x100) != 0);
    } else if (op == CUDASIM_BALLOT || op == CUDASIM_ANY || op == CUDASIM_ALL) {
        unsigned ballot = 0;
        for (int lane = 0; lane < 32; ++lane)
            if ((mask >> lane & 1u) && lanes[lane].pred) ballot |= 1u << lane;
        const uint64_t r = op == CUDASIM_BALLOT ? ballot : op == CUDASIM_ANY ? ballot != 0 : ballot == mask;
        for (int lane = 0; lane < 32; ++lane)
            if (mask >> lane & 1u) lanes[lane].result = r;
    } else if (op != CUDASIM_SYNCWARP) {
        for (int lane = 0; lane < 32; ++lane) {
            if (!(mask >> lane & 1u)) continue;
            const int src = shuffle_source(lanes[lane]);
            if (!(mask >> src & 1u)) {
                fail_here("%s at line %d: lane %d reads lane %d, which mask 0x%08x does not name (lane %d takes no "
                          "part, so the value is undefined; a mask must name every lane that calls it)",
                          lanes[lane].what, lanes[lane].line, lane, src, mask, src);
            }
            lanes[lane].result = lanes[src].value;
        }
    }
    w.waiting &= ~mask;
    for (int lane = 0; lane < 32; ++lane)
        if (mask >> lane & 1u) lanes[lane].state = RUNNABLE;
}

uint64_t collective(int op, int line, const char* what, unsigned mask, uint64_t value, int arg, int width) {
    Fiber* f = current();
    const unsigned bit = 1u << f->lane;
    if (!(mask & bit))
        fail_here("%s at line %d: mask 0x%08x omits the calling lane %d", what, line, mask, f->lane);
    if (width <= 0 || width > 32 || (width & (width - 1)))
        fail_here("%s at line %d: width %d is not a power of two <= 32", what, line, width);
    Warp& w = L->warps[f->warp];
    if (mask & w.exited) {
        const int gone = __builtin_ctz(mask & w.exited);
        fail_here("%s at line %d: mask 0x%08x names lane %d, which has exited", what, line, mask, gone);
    }
    f->op = op; f->line = line; f->what = what; f->mask = mask; f->value = value; f->arg = arg; f->width = width;
    w.waiting |= bit;
    if ((w.waiting & mask) == mask) {
        resolve(f->warp, mask);
    } else {
        f->state = AT_WARP;
        yield_to_scheduler();
    }
    return f->result;
}

// ---------------------------------------------------------------------------------------------- scheduler

void init_fiber(Fiber& f) {
    char* top = f.stack + STACK_BYTES - 64;
    top = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
    void** sp = reinterpret_cast<void**>(top);
    *--sp = reinterpret_cast<void*>(&cudasim_fiber_start);             // ret target
    *--sp = nullptr;                                                   // rbp
    *--sp = nullptr;                                                   // rbx
    *--sp = &f;                                                        // r12: argument
    *--sp = reinterpret_cast<void*>(&fiber_main);                      // r13: function
    *--sp = nullptr;                                                   // r14
    *--sp = nullptr;                                                   // r15
    f.sp = sp;
    f.state = RUNNABLE;
}

bool ensure_stacks(size_t threads) {
    if (threads <= stack_pool_threads) return true;
    if (stack_pool) munmap(stack_pool, stack_pool_threads * (STACK_BYTES + PAGE));
    const size_t bytes = threads * (STACK_BYTES + PAGE);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    stack_pool = static_cast<char*>(p);
    for (size_t i = 0; i < threads; ++i) mprotect(stack_pool + i * (STACK_BYTES + PAGE), PAGE, PROT_NONE);
    stack_pool_threads = threads;
    return true;
}

// After every runnable fiber has run: release a complete barrier, or say why the block cannot go on.
bool settle_block() {
    std::vector<Fiber>& fs = L->fibers;
    const Fiber* barrier = nullptr;
    const Fiber* done = nullptr;
    for (const Fiber& f : fs) {
        if (f.state == AT_WARP) {
            const Warp& w = L->warps[f.warp];
            // a named lane that is not waiting in this collective: at a barrier, or elsewhere
            for (unsigned lane = 0; lane < 32; ++lane) {
                if (!(f.mask >> lane & 1u) || (w.waiting >> lane & 1u)) continue;
                const Fiber& o = fs[f.warp * 32 + lane];
                char who[160];
                describe_thread(f, who, sizeof who);
                if (o.state == AT_BARRIER)
                    set_error("%s at line %d waits for lane %d (mask 0x%08x), which waits at %s at line %d (%s)",
                              f.what, f.line, lane, f.mask, o.what, o.line, who);
                else
                    set_error("%s at line %d waits for lane %d (mask 0x%08x), which never arrives (%s)", f.what,
                              f.line, lane, f.mask, who);
                return false;
            }
            set_error("%s at line %d cannot complete", f.what, f.line);
            return false;
        }
        if (f.state == AT_BARRIER) {
            if (barrier && (barrier->line != f.line || barrier->op != f.op)) {
                char a[160], b[160];
                describe_thread(*barrier, a, sizeof a);
                describe_thread(f, b, sizeof b);
                set_error("divergent barrier: %s waits at %s at line %d, %s at %s at line %d", a, barrier->what,
                          barrier->line, b, f.what, f.line);
                return false;
            }
            barrier = &f;
        } else if (f.state == DONE) {
            done = &f;
        }
    }
    if (!barrier) return true;  // every thread is done
    if (done) {
        char a[160], b[160];
        describe_thread(*barrier, a, sizeof a);
        describe_thread(*done, b, sizeof b);
        set_error("divergent barrier: %s waits at %s at line %d, but %s has exited without reaching it", a,
                  barrier->what, barrier->line, b);
        return false;
    }
    int count = 0;
    for (const Fiber& f : fs) count += f.pred != 0;
    const int n = static_cast<int>(fs.size());
    for (Fiber& f : fs) {
        f.result = f.op == CUDASIM_BAR_COUNT ? count : f.op == CUDASIM_BAR_AND ? count == n : count != 0;
        f.state = RUNNABLE;
    }
    return true;
}

bool run_block() {
    for (Fiber& f : L->fibers) init_fiber(f);
    for (Warp& w : L->warps) w = Warp();
    // lanes of a partial last warp never exist: a mask naming them is an error
    const unsigned tail = L->block_threads % 32;
    if (tail) L->warps.back().exited = ~((1u << tail) - 1u);
    for (;;) {
        bool ran = true;
        while (ran) {
            ran = false;
            for (Fiber& f : L->fibers) {
                while (f.state == RUNNABLE) {
                    cudasim_cur = &f.t;
                    cudasim_switch(&L->scheduler_sp, f.sp);
                    if (L->failed) return false;
                    ran = true;
                }
            }
        }
        bool all_done = true;
        for (const Fiber& f : L->fibers) all_done &= f.state == DONE;
        if (all_done) return true;
        if (!settle_block()) return false;
    }
}

void on_fault(int sig, siginfo_t* info, void* ctx) {
    if (in_launch) {
        in_launch = 0;
        const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
        Fiber* f = current();
        char who[160] = "the scheduler";
        if (f) describe_thread(*f, who, sizeof who);
        const uintptr_t pool = reinterpret_cast<uintptr_t>(stack_pool);
        if (addr >= pool && addr < pool + stack_pool_threads * (STACK_BYTES + PAGE) &&
            (addr - pool) % (STACK_BYTES + PAGE) < PAGE) {
            set_error("stack overflow (a CUDA thread's stack is %zu KiB) in %s", STACK_BYTES / 1024, who);
        } else {
            cudasim_fault_address = addr;
            Dl_info where{};
            const uintptr_t pc = static_cast<uintptr_t>(static_cast<ucontext_t*>(ctx)->uc_mcontext.gregs[REG_RIP]);
            if (dladdr(reinterpret_cast<void*>(pc), &where) && where.dli_fname) {
                snprintf(cudasim_fault_code, sizeof cudasim_fault_code, "%s+0x%llx", where.dli_fname,
                         static_cast<unsigned long long>(pc - reinterpret_cast<uintptr_t>(where.dli_fbase)));
            }
            set_error("invalid memory access at address 0x%llx (%s) in %s", static_cast<unsigned long long>(addr),
                      sig == SIGBUS ? "SIGBUS" : "SIGSEGV", who);
        }
        siglongjmp(fault_env, 1);
    }
    struct sigaction* old = sig == SIGBUS ? &old_bus : &old_segv;
    if (old->sa_flags & SA_SIGINFO) {
        old->sa_sigaction(sig, info, ctx);
    } else if (old->sa_handler != SIG_IGN && old->sa_handler != SIG_DFL) {
        old->sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);  // return and fault again, with the default action
    }
}

void install_fault_handler() {
    static bool done = false;
    if (done) return;
    done = true;
    static char alt[64 * 1024];
    stack_t ss{};
    ss.ss_sp = alt;
    ss.ss_size = sizeof alt;
    sigaltstack(&ss, nullptr);
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
}

}  // namespace

// -------------------------------------------------------------------------------------------- the C ABI

extern "C" {

cudasim_thread* cudasim_cur = nullptr;
cudasim_uint3 cudasim_blockIdx, cudasim_blockDim, cudasim_gridDim;
uintptr_t cudasim_fault_address = 0;
char cudasim_fault_code[1024];

int cudasim_launch(void (*entry)(void**), void** args, const char* kernel, const unsigned* grid,
                   const unsigned* block, const unsigned* order, unsigned long long num_blocks,
                   const uint64_t* shared, int shared_ranges, char* error, int error_len) {
    Launch launch{};
    launch.entry = entry;
    launch.args = args;
    launch.kernel = kernel;
    launch.error = error;
    launch.error_len = error_len;
    launch.block_threads = block[0] * block[1] * block[2];
    error[0] = 0;
    cudasim_fault_address = 0;
    cudasim_fault_code[0] = 0;
    L = &launch;
    install_fault_handler();
    if (!ensure_stacks(launch.block_threads)) {
        snprintf(error, error_len, "kernel %s: cannot map stacks for %u threads", kernel, launch.block_threads);
        return 1;
    }
    launch.fibers.resize(launch.block_threads);
    launch.warps.resize((launch.block_threads + 31) / 32);
    for (unsigned i = 0; i < launch.block_threads; ++i) {
        Fiber& f = launch.fibers[i];
        f.stack = stack_pool + i * (STACK_BYTES + PAGE) + PAGE;
        f.linear = i;
        f.lane = i % 32;
        f.warp = i / 32;
        f.t.threadIdx = {i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
    }
    cudasim_blockDim = {block[0], block[1], block[2]};
    cudasim_gridDim = {grid[0], grid[1], grid[2]};
    unsigned saved_mxcsr;
    asm volatile("stmxcsr %0" : "=m"(saved_mxcsr));
    asm volatile("ldmxcsr %0" : : "m"(FTZ_MXCSR));
    int status = 0;
    if (sigsetjmp(fault_env, 1) == 0) {
        in_launch = 1;
        for (unsigned long long b = 0; b < num_blocks; ++b) {
            const unsigned long long id = order ? order[b] : b;
            cudasim_blockIdx = {static_cast<unsigned>(id % grid[0]), static_cast<unsigned>(id / grid[0] % grid[1]),
                                static_cast<unsigned>(id / (static_cast<unsigned long long>(grid[0]) * grid[1]))};
            // shared memory starts as NaN bit patterns in every block (0x7fff7fff: NaN as float32, float64 and bf16,
            // a huge index as an integer)
            for (int r = 0; r < shared_ranges; ++r) {
                char* end = reinterpret_cast<char*>(shared[2 * r + 1]);
                for (char* p = reinterpret_cast<char*>(shared[2 * r]); p + 4 <= end; p += 4) {
                    const uint32_t nan = 0x7fff7fffu;
                    memcpy(p, &nan, 4);
                }
            }
            if (!run_block()) { status = 1; break; }
        }
        in_launch = 0;
    } else {
        status = 1;
    }
    asm volatile("ldmxcsr %0" : : "m"(saved_mxcsr));
    cudasim_cur = nullptr;
    L = nullptr;
    return status;
}

void cudasim_barrier_wait(int op, int line, int pred) {
    Fiber* f = current();
    f->op = op;
    f->line = line;
    f->pred = pred;
    f->what = op == CUDASIM_BAR ? "__syncthreads()" : op == CUDASIM_BAR_COUNT ? "__syncthreads_count()"
              : op == CUDASIM_BAR_AND ? "__syncthreads_and()" : "__syncthreads_or()";
    f->state = AT_BARRIER;
    yield_to_scheduler();
}

int cudasim_barrier_result() { return static_cast<int>(current()->result); }

uint64_t cudasim_collective(int op, int line, const char* what, unsigned mask, uint64_t value, int arg, int width) {
    return collective(op, line, what, mask, value, arg, width);
}

int cudasim_vote(int op, int line, const char* what, unsigned mask, int pred) {
    current()->pred = pred;
    return static_cast<int>(collective(op, line, what, mask, 0, 0, 32));
}

void cudasim_mma(int line, const float* in10, float* out4) {
    Fiber* f = current();
    f->mma_in = in10;
    collective(CUDASIM_MMA, line, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", 0xffffffffu, 0, 0, 32);
    memcpy(out4, f->mma_out, 16);
}

void cudasim_ldmatrix(int line, int count, int trans, const void* row, unsigned* out4) {
    Fiber* f = current();
    f->ld_row = row;
    collective(CUDASIM_LDMATRIX, line, "ldmatrix.sync.aligned.m8n8.shared.b16", 0xffffffffu, 0,
               count | (trans ? 0x100 : 0), 32);
    memcpy(out4, f->ld_out, 4 * count);
}

unsigned cudasim_activemask() {
    Fiber* f = current();
    const Warp& w = L->warps[f->warp];
    return ~w.exited;
}

int cudasim_lane() { return current()->lane; }

void cudasim_fail(int line, const char* what) { fail_here("%s at line %d", what, line); }

// Device memory: [guard page][data, ending at the end of its last page (16-byte aligned start)][guard page].
void* cudasim_malloc(size_t bytes, size_t* map_base, size_t* map_len) {
    const size_t span = (bytes + 15) & ~size_t(15);
    const size_t data_pages = (span + PAGE - 1) / PAGE;
    const size_t len = (data_pages + 2) * PAGE;
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    char* base = static_cast<char*>(p);
    mprotect(base, PAGE, PROT_NONE);
    mprotect(base + (data_pages + 1) * PAGE, PAGE, PROT_NONE);
    char* data_begin = base + PAGE;
    char* data = base + (data_pages + 1) * PAGE - span;
    const uint32_t nan = 0x7fff7fffu;
    for (char* q = data_begin; q < base + (data_pages + 1) * PAGE; q += 4) memcpy(q, &nan, 4);
    *map_base = reinterpret_cast<size_t>(base);
    *map_len = len;
    return data;
}

void cudasim_free(size_t map_base, size_t map_len) { munmap(reinterpret_cast<void*>(map_base), map_len); }

}  // extern "C"
