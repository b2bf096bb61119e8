// The interface between cudasim's core (core.cpp) and the kernel modules it runs (compiled with cudasim.h).
#pragma once
#include <cstdint>

struct cudasim_uint3 { unsigned int x, y, z; };
struct cudasim_thread { cudasim_uint3 threadIdx; };

enum {
    CUDASIM_BAR, CUDASIM_BAR_COUNT, CUDASIM_BAR_AND, CUDASIM_BAR_OR,
    CUDASIM_SHFL_IDX, CUDASIM_SHFL_UP, CUDASIM_SHFL_DOWN, CUDASIM_SHFL_XOR,
    CUDASIM_BALLOT, CUDASIM_ANY, CUDASIM_ALL, CUDASIM_SYNCWARP, CUDASIM_MMA, CUDASIM_LDMATRIX,
};

extern "C" {
extern cudasim_thread* cudasim_cur;  // the running CUDA thread
extern cudasim_uint3 cudasim_blockIdx, cudasim_blockDim, cudasim_gridDim;
extern uintptr_t cudasim_fault_address;  // of the last invalid access, 0 if none
extern char cudasim_fault_code[1024];     // "library+offset" of the faulting instruction, "" if unknown
void cudasim_barrier_wait(int op, int line, int pred);
int cudasim_barrier_result();
uint64_t cudasim_collective(int op, int line, const char* what, unsigned mask, uint64_t value, int arg, int width);
int cudasim_vote(int op, int line, const char* what, unsigned mask, int pred);
void cudasim_mma(int line, const float* in10, float* out4);
void cudasim_ldmatrix(int line, int count, int trans, const void* row, unsigned* out4);
unsigned cudasim_activemask();
void cudasim_fail(int line, const char* what);
}
